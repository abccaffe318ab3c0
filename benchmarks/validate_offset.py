"""Where does a level offset between predicted and measured tokens/s come from, and what does validate's
way of comparing do to it? Reads what `executor validate --out DIR` left (DIR/measured.json,
DIR/calibration.yaml, the calibration runs in DIR/profile/runs*) and prints two tables.

Per scheme and stage count:

  in-sample    the calibration runs (calibration prompt) predicted from the calibration itself
  validation   the measured runs (validation prompt), medians as validate compared them before issue 15
  prompt ratio measured tokens/s on the validation prompt ÷ on the calibration prompt, against the same
               ratio predicted (the model's context and prompt-length terms): a mismatch here means a
               prompt-dependent cost the model lacks
  first/rest   the error of each launch's first repeat against the others (a cold first decode, or
               the order within a round)

Then the same measurements compared three ways, with pass / fail / undetermined counts and the error
intervals' half-widths: medians at one host speed (validate before issue 15), throughput at one host
speed, throughput with each decode predicted at its neighbouring calibration decodes' speed (validate
now). A directory from before the change (no `calibration_neighbours` recorded) gets the neighbours its
job order had: the calibration block that opened the repeat and the one that opened the next.

Run: python benchmarks/validate_offset.py reports/validation
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from executor.validate import CALIB_ALPHA, Case, calibration_jobs, compare, neighbour_speed, predict, summary  # noqa: E402
from spdsim.calibration_file import load_calibration  # noqa: E402
from spdsim.replay import draft_kind, host_speed, replayed_runs  # noqa: E402
from spdsim.scenario import load_scenario  # noqa: E402
from spdsim.textable import align  # noqa: E402
from spdsim.verdict import error_interval, verdict  # noqa: E402


def _key(scheme: str, stages: int, draft: str, tp: int = 1) -> str:
    kind = draft.split(":")[0] if draft else ""
    return f"{scheme}-n{stages}" + (f"-tp{tp}" if tp > 1 else "") + (f" {kind}" if kind else "")


def in_sample(trace_dir: Path, calib: Path) -> dict[str, list[tuple[float, float]]]:
    """(measured, predicted) tokens/s of every calibration run, by case key."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for _, tr, meas, pred in replayed_runs(trace_dir, load_calibration(calib)):
        h = tr.header
        out[_key(h.scheme, h.stages, draft_kind(tr), h.tp)].append((meas.tokens_per_s, pred.tokens_per_s))
    return out


def _err(pairs: list[tuple[float, float]]) -> float:
    m = statistics.median(p[0] for p in pairs)
    return 100.0 * (statistics.median(p[1] for p in pairs) / m - 1)


def offset_table(meas: dict, ins: dict) -> str:
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
        per_launch = _per_launch(meas, len(val))
        first = [v for i, v in enumerate(val) if i % per_launch == 0]
        rest = [v for i, v in enumerate(val) if i % per_launch != 0]
        rows.append((key, f"{_err(cal):+.1f}%" if cal else "", f"{_err(val):+.1f}%", ratio_m, ratio_p,
                     f"{_err(first):+.1f}%" if first else "", f"{_err(rest):+.1f}%" if rest else ""))
    return align(rows)


def _per_launch(meas: dict, repeats: int) -> int:
    """Repeats per launch (per round)."""
    return meas.get("round_repeats") or max(1, repeats // max(1, meas.get("rounds", 1)))


def _old_neighbours(i: int, repeats: int, per_launch: int, names: list[str]) -> list[str]:
    """What validate's job order before the change put next to repeat i of a case: the calibration
    block opening repeat i (its last run) and the one opening repeat i + 1 in the same launch."""
    after = [f"{names[0]}-r{i + 1}"] if (i + 1) % per_launch and i + 1 < repeats else []
    return [f"{names[-1]}-r{i}"] + after


def _calibration_names(stages: int, tp: int, speeds: dict[str, float]) -> list[str]:
    """The calibration runs of one launch in their job order (executor.validate.calibration_jobs), with
    a trained-module run where this directory has one (the oracle's α as validate's default)."""
    head = "head" if any(n.startswith(f"spd-n{stages}-head-r") for n in speeds) else None
    return [name for name, _, _ in calibration_jobs(stages, tp, CALIB_ALPHA, head)]


def _old_rows(cases: list[Case], measured: dict, predicted: dict) -> list[dict]:
    """validate's comparison before issue 15: medians, speedup_vs_pp as the median of per-round ratios."""
    rows = []
    pp = {(c.stages, c.tp): c for c in cases if c.scheme == "pp"}
    for k, c in enumerate(cases):
        series = {m: ([r[m] for r in measured[c]], [r[m] for r in predicted[c]]) for m in ("tokens_per_s", "bubble_ratio")}
        if (c.stages, c.tp) in pp:
            b = pp[(c.stages, c.tp)]
            series["speedup_vs_pp"] = tuple([x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(d[c], d[b])]
                                            for d in (measured, predicted))
        for j, (metric, (m, p)) in enumerate(series.items()):
            err = error_interval(m, p, metric != "bubble_ratio", seed=7919 * k + j)
            rows.append({"metric": metric, "error_pct": err.estimate, "error_ci_low": err.low,
                         "error_ci_high": err.high, "measured_spread": 0.0,
                         "verdict": verdict(err, 3.0 if metric == "bubble_ratio" else 5.0)})
    return rows


def comparison_table(meas: dict, trace_dir: Path, calib: Path) -> str:
    speeds = host_speed(trace_dir, load_calibration(calib))
    scenario = load_scenario(meas["scenario"])
    per_launch = _per_launch(meas, meas["repeats"])
    cases, measured, raw, tracked = [], {}, {}, {}
    for c in meas["cases"]:
        if c.get("policy"):
            continue
        case = Case(c["scheme"], c["stages"], c["draft"], c["acceptance"], c.get("tp", 1))
        names = _calibration_names(case.stages, case.tp, speeds)
        ms = [m if "calibration_neighbours" in m else
              {**m, "calibration_neighbours": _old_neighbours(i, meas["repeats"], per_launch, names)}
              for i, m in enumerate(c["measured"])]
        # predicted again at the calibration's one speed (what was stored may be at another host speed)
        base = [predict(scenario, case, calib, m["prompt_tokens"], meas["new_tokens"], m["accepts"], seed=i)
                for i, m in enumerate(ms)]
        cases.append(case)
        measured[case], raw[case] = ms, base
        tracked[case] = [{**p, "tokens_per_s": p["tokens_per_s"] * neighbour_speed(m, speeds)} for p, m in zip(base, ms)]
    out = [("comparison", "pass / fail / undet.", "tokens/s |err| median / max", "speedup |err| median / max",
            "half-width median / max")]
    for label, rows in (("medians, one host speed", _old_rows(cases, measured, raw)),
                        ("throughput, one host speed", compare(cases, measured, raw)),
                        ("throughput, neighbours' speed", compare(cases, measured, tracked))):
        s = summary(rows)
        hw = [(r["error_ci_high"] - r["error_ci_low"]) / 2 for r in rows
              if r["metric"] != "bubble_ratio" and r["error_ci_high"] > r["error_ci_low"]]
        n = {v: sum(r["verdict"] == v for r in rows) for v in ("pass", "fail", "undetermined")}
        out.append((label, f"{n['pass']} / {n['fail']} / {n['undetermined']}",
                    f"{s['tokens_per_s']['median_abs']:.1f}% / {s['tokens_per_s']['max_abs']:.1f}%",
                    f"{s['speedup_vs_pp']['median_abs']:.1f}% / {s['speedup_vs_pp']['max_abs']:.1f}%",
                    f"±{np.median(hw):.1f}% / ±{max(hw):.1f}%"))
    return align(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="an `executor validate --out` directory")
    args = ap.parse_args()
    meas = json.loads((args.dir / "measured.json").read_text())
    calib = args.dir / "calibration.yaml"
    trace_dir = args.dir / "profile"
    has_runs = (trace_dir / "runs").is_dir()
    ins = in_sample(trace_dir, calib) if has_runs else {}
    print(offset_table(meas, ins))
    print(f"\n{meas.get('repeats')} repeats in {meas.get('rounds', 1)} round(s); prompt lengths: validation "
          f"{len(meas['prompt'].encode())} bytes; calibration runs: {sum(len(v) for v in ins.values())}\n")
    if has_runs:
        print(comparison_table(meas, trace_dir, calib))


if __name__ == "__main__":
    main()
