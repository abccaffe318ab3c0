"""Where does a level offset between predicted and measured tokens/s come from? Reads what
`executor validate --out DIR` left (DIR/measured.json, DIR/calibration.yaml, the calibration runs in
DIR/profile/runs) and prints, per scheme and stage count:

  in-sample    the calibration runs (calibration prompt) predicted from the calibration itself
  validation   the measured runs (validation prompt), as validate compared them
  prompt ratio measured tokens/s on the validation prompt ÷ on the calibration prompt, against the same
               ratio predicted (the model's context and prompt-length terms): a mismatch here means a
               prompt-dependent cost the model lacks
  first/rest   the error of each launch's first repeat against the others (a cold first decode, or
               the order within a round)

A validation error that the in-sample check does not show, with the prompt ratio mispredicted, points at
the prompt; one that the in-sample check shows too points at the model; one concentrated in first
repeats points at warm-up. Used for issue 15 (docs/calibration.md says what it found).

Run: python benchmarks/validate_offset.py reports/validation
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spdsim.calibration_file import load_calibration  # noqa: E402
from spdsim.metrics import run_metrics  # noqa: E402
from spdsim.replay import _replay, _replay_scenario, draft_kind, load_runs, replay_seeds  # noqa: E402
from spdsim.textable import align  # noqa: E402


def _key(scheme: str, stages: int, draft: str, tp: int = 1) -> str:
    kind = draft.split(":")[0] if draft else ""
    return f"{scheme}-n{stages}" + (f"-tp{tp}" if tp > 1 else "") + (f" {kind}" if kind else "")


def in_sample(trace_dir: Path, calib: Path) -> dict[str, list[tuple[float, float]]]:
    """(measured, predicted) tokens/s of every calibration run, by case key."""
    prof = json.loads((trace_dir / "profile.json").read_text())
    costs = load_calibration(calib)
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for sub in ("runs", "runs_tp"):
        runs = load_runs(trace_dir, sub)
        if not runs:
            continue
        tp = max(t.header.tp for t in runs)
        base = _replay_scenario(prof["model"], max(t.header.stages for t in runs), tp)
        for tr, seed in zip(runs, replay_seeds(runs)):
            h = tr.header
            meas = run_metrics(tr.events, h.scheme, h.stages, h.new_tokens, h.placement).tokens_per_s
            pred = _replay(base, tr, costs, seed=seed).metrics.tokens_per_s
            out[_key(h.scheme, h.stages, draft_kind(tr), h.tp)].append((meas, pred))
    return out


def _err(pairs: list[tuple[float, float]]) -> float:
    m = statistics.median(p[0] for p in pairs)
    return 100.0 * (statistics.median(p[1] for p in pairs) / m - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="an `executor validate --out` directory")
    args = ap.parse_args()
    meas = json.loads((args.dir / "measured.json").read_text())
    calib = args.dir / "calibration.yaml"
    ins = in_sample(args.dir / "profile", calib) if (args.dir / "profile" / "runs").is_dir() else {}
    rows = [("case", "in-sample err", "validation err", "meas. prompt ratio", "pred. prompt ratio",
             "first-repeat err", "other repeats err")]
    for c in meas["cases"]:
        key = _key(c["scheme"], c["stages"], c.get("draft") or ("oracle" if c["scheme"] == "spd" else ""), c.get("tp", 1))
        val = [(m["tokens_per_s"], p["tokens_per_s"]) for m, p in zip(c["measured"], c["predicted"])]
        cal = ins.get(key, [])
        ratio_m = ratio_p = ""
        if cal:
            ratio_m = f"{statistics.median(v[0] for v in val) / statistics.median(v[0] for v in cal):.3f}"
            ratio_p = f"{statistics.median(v[1] for v in val) / statistics.median(v[1] for v in cal):.3f}"
        per_launch = max(1, meas.get("repeats", len(val)) // max(1, meas.get("rounds", 1)))
        first = [v for i, v in enumerate(val) if i % per_launch == 0]
        rest = [v for i, v in enumerate(val) if i % per_launch != 0]
        rows.append((key, f"{_err(cal):+.1f}%" if cal else "", f"{_err(val):+.1f}%", ratio_m, ratio_p,
                     f"{_err(first):+.1f}%" if first else "", f"{_err(rest):+.1f}%" if rest else ""))
    print(align(rows))
    print(f"\n{meas.get('repeats')} repeats in {meas.get('rounds', 1)} round(s); prompt lengths: validation "
          f"{len(meas['prompt'].encode())} bytes; calibration runs: {sum(len(v) for v in ins.values())}")


if __name__ == "__main__":
    main()
