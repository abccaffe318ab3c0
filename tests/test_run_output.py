"""What `spdsim run` prints: the baselines and the fastest configuration per α, not every point."""
from __future__ import annotations

import pandas as pd
import yaml

from spdsim.sweep import run_command
from test_sim_run import SMALL, args


def test_run_prints_the_best_per_alpha_not_every_point(tmp_path, capsys):
    p = tmp_path / "small.yaml"
    p.write_text(yaml.safe_dump(SMALL))
    assert run_command(args(p, tmp_path / "out", quiet=False)) == 0
    out = capsys.readouterr().out
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    table = out.split("every scheme competes):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(table) == 2 + 2                                 # header, rule, one row per α
    best = df[df.acceptance == 0.9].sort_values("tokens_per_s").iloc[-1]
    assert f"{best.tokens_per_s:.1f}" in table[-1] and table[-1].startswith("0.9")
    assert len(out.splitlines()) < len(df)                      # fewer lines than points
    assert run_command(args(p, tmp_path / "out", quiet=False, full=True)) == 0
    assert len(capsys.readouterr().out.splitlines()) > len(df)  # --full prints them all
