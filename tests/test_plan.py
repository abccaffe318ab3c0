"""spdsim plan: memory rejection with the stage and the excess, exit codes, a recommendation the
simulator confirms, bounds that never undercut a simulated figure."""
from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from spdsim.cli import main
from spdsim.costs import stage_memory, usable_bytes
from spdsim.engine import simulate_point
from spdsim.hardware import GPU_CATALOG
from spdsim.models import MODEL_CATALOG
from spdsim.scenario import Point, parse_scenario


def _plan(tmp_path, *extra: str) -> tuple[int, pd.DataFrame]:
    rc = main(["plan", "--quiet", "--out", str(tmp_path), *extra])
    return rc, pd.read_csv(tmp_path / "plan.csv", keep_default_na=False, na_values=[""])


def test_70b_does_not_fit_one_a100_and_the_plan_says_why(tmp_path, capsys):
    rc, df = _plan(tmp_path, "--model", "llama-2-70b", "--gpu", "a100", "--max-gpus", "1",
                   "--target-tokens-per-s", "1")
    assert rc == 1
    assert set(df["status"]) == {"infeasible"}          # ar, and sd / chain on that one GPU
    reason = df[df["scheme"] == "ar"].iloc[0]["reason"]
    need, over, usable = map(float, re.search(r"needs ([\d.]+) GB.*: ([\d.]+) GB over the ([\d.]+) GB usable",
                                               reason).groups())
    m, gpu = MODEL_CATALOG["llama-2-70b"], GPU_CATALOG["a100-80gb-sxm"]
    expect = stage_memory(m, m.layers, True, True, 512 + 256, 0, 512)
    assert reason.startswith("stage 1 of 1")
    assert need == pytest.approx(expect.total / 1e9, abs=0.05)
    assert usable == pytest.approx(usable_bytes(gpu) / 1e9, abs=0.05)
    assert over == pytest.approx(need - usable, abs=0.1)
    assert "fits in memory" in capsys.readouterr().out


def test_memory_report_names_the_stage_that_overflows(tmp_path):
    # 70B over 2 L40S (48 GB): each half is ~69 GB, both stages over; more stages fit
    rc, df = _plan(tmp_path, "--model", "llama-2-70b", "--gpu", "l40s", "--max-gpus", "4",
                   "--schemes", "pp", "--partition", "uniform", "--new-tokens", "16", "--tp", "1",
                   "--target-tokens-per-s", "1")
    two = df[df["stages"] == 2].iloc[0]
    assert two["status"] == "infeasible" and "2 devices over" in two["reason"]
    assert re.search(r"stage [12] of 2 needs", two["reason"])
    four = df[df["stages"] == 4].iloc[0]
    assert four["status"] != "infeasible"
    sizes = [float(x.split("=")[1]) for x in four["memory_gb"].split(" (")[0].split()]
    assert len(sizes) == 4 and max(sizes) < 48 * 0.9


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan_unreachable")
    args = ["--model", "llama-2-70b", "--gpu", "h100,a100", "--max-gpus", "4", "--new-tokens", "48",
            "--prompt-tokens", "128", "--partition", "uniform,comm_aware", "--schemes", "ar,pp,spd", "--tp", "1"]
    rc, df = _plan(out, *args, "--target-tokens-per-s", "1e6")
    return args, rc, df


def test_unreachable_target_exits_1_with_the_best_achievable(unreachable, capsys):
    args, rc, df = unreachable
    assert rc == 1
    best = df["tokens_per_s"].max()
    assert best > 0
    # the best achievable figure is exact: nothing left unsimulated could beat it
    pruned = df[df["status"] == "pruned"]
    assert (pruned["bound_tokens_per_s"] <= best).all()


def test_bounds_never_undercut_simulated_figures(unreachable):
    _, _, df = unreachable
    sim = df[df["tokens_per_s"].notna()]
    assert len(sim) > 5
    assert (sim["tokens_per_s"] <= sim["bound_tokens_per_s"]).all()


def test_reachable_target_recommends_a_configuration_the_simulator_confirms(unreachable, tmp_path, capsys):
    args, _, before = unreachable
    best = before["tokens_per_s"].max()
    target = 0.8 * best
    rc, df = _plan(tmp_path, *args, "--target-tokens-per-s", f"{target}")
    assert rc == 0
    out = capsys.readouterr().out
    assert "cheapest meeting the target" in out
    rec = df.iloc[0]
    assert rec["status"] == "ok" and rec["tokens_per_s"] >= target
    ok = df[df["status"] == "ok"]
    assert rec["usd_per_hour"] == ok["usd_per_hour"].min()
    # re-simulate the recommendation from a scenario: it loads (so it fits memory) and gives the figure
    head = f"head: {{placement: {rec['head']}}}\n" if isinstance(rec["head"], str) and rec["head"] else ""
    acc = rec["acceptance"] if not (isinstance(rec["acceptance"], float) and math.isnan(rec["acceptance"])) else 0.8
    s = parse_scenario(f"""
hardware: {{gpu: {rec['gpu']}, count: {rec['gpus']}, topology: {rec['topology']}}}
model: llama-2-70b
workload: {{prompt_tokens: 128, new_tokens: 48}}
{head}sweep: {{stages: [{rec['stages']}], tp: [{rec['tp']}], partition: [{rec['partition']}], acceptance: [{acc}], schemes: [{rec['scheme']}]}}
""")
    point = next(p for p in s.points() if p.scheme == rec["scheme"])
    r = simulate_point(s, Point(point.scheme, point.stages, point.partition, point.acceptance, point.tp))
    assert r.plan.layers_str() == rec["layers"]
    assert r.metrics.tokens_per_s == pytest.approx(rec["tokens_per_s"], rel=1e-9)
    assert r.metrics.tokens_per_s >= target


@pytest.mark.parametrize("bad", [
    ["--model", "nope", "--gpu", "a100", "--max-gpus", "2", "--target-tokens-per-s", "5"],
    ["--model", "llama-2-7b", "--gpu", "x9000", "--max-gpus", "2", "--target-tokens-per-s", "5"],
    ["--model", "llama-2-7b", "--gpu", "a100", "--max-gpus", "0", "--target-tokens-per-s", "5"],
    ["--model", "llama-2-7b", "--gpu", "a100", "--max-gpus", "2", "--target-tokens-per-s", "-1"],
    ["--model", "llama-2-7b", "--gpu", "a100", "--max-gpus", "2", "--target-tokens-per-s", "5",
     "--acceptance", "1.5"],
    ["--model", "llama-2-7b", "--gpu", "a100", "--max-gpus", "2", "--target-tokens-per-s", "5",
     "--price", "a100=cheap"],
])
def test_bad_input_exits_2_with_one_line(bad, tmp_path, capsys):
    assert main(["plan", "--quiet", "--out", str(tmp_path), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spdsim: error:") and "\n" not in err


def test_price_override_changes_the_ranking_not_the_figures(tmp_path):
    args = ["--model", "llama-2-7b", "--gpu", "a100,l40s", "--max-gpus", "2", "--new-tokens", "24",
            "--prompt-tokens", "64", "--schemes", "ar", "--target-tokens-per-s", "10"]
    _, cheap_l40s = _plan(tmp_path / "a", *args, "--price", "l40s=0.1,a100=5")
    _, cheap_a100 = _plan(tmp_path / "b", *args, "--price", "l40s=5,a100=0.1")
    assert cheap_l40s.iloc[0]["gpu"] == "l40s" and cheap_a100.iloc[0]["gpu"] == "a100-80gb-sxm"
    merge = cheap_l40s.merge(cheap_a100, on=["gpu", "tp"])
    assert (merge["tokens_per_s_x"] == merge["tokens_per_s_y"]).all()
