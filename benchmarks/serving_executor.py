"""Serving on this machine: throughput and TPOT against the concurrency C for PP and SPD, measured with
`executor run --requests K --concurrency C` beside the simulator's prediction of each measured run
(spdsim.replay_serving: its arrivals, lengths and verdicts replayed, the costs from a calibration fitted
on other runs) — where SPD's per-request speed stops paying against PP's filled pipeline, measured.

Each (scheme, C) runs --repeats times, interleaved in the same processes (load drift hits all alike); the
table shows medians. Requests arrive all at once by default (a closed batch of K: the capacity figure), or
as a Poisson process (--rate R). Without --calibration the script profiles and calibrates first, into
OUT/profile and OUT/calibration.yaml (a minute or two). Take the figures on a quiet machine: on shared
cores they are noise.

    python benchmarks/serving_executor.py [--model tiny] [--stages 2] [--concurrency 1,2,3,4] [--requests 8]
        [--new-tokens 32] [--alpha 0.8] [--rate R] [--repeats 3] [--calibration CALIB.yaml] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from executor.prompts import heldout_prompts
from executor.runner import RunSpec, launch, parse_arrivals, resolve_model
from executor.validate import Case, predict_serving
from spdsim.textable import align

FIGURES = ("tokens_per_s", "tpot_p50_ms", "ttft_p50_ms", "bubble_ratio")


def model_entry(path: Path) -> dict:
    """The checkpoint's shape as a scenario's inline model (our checkpoints: PATH.json's config)."""
    cfg = json.loads(Path(str(path) + ".json").read_text())["config"]
    return {"layers": cfg["n_layers"], "dim": cfg["dim"], "ffn": cfg["ffn_dim"], "heads": cfg["n_heads"],
            "kv_heads": cfg["n_kv_heads"], "vocab": cfg["vocab_size"], "dtype_bytes": 4}


def calibration_for(args, model: Path, out: Path) -> Path:
    if args.calibration:
        return Path(args.calibration)
    from executor.profile import ProfileConfig, profile
    from spdsim.calibrate import calibrate
    from spdsim.calibration_file import write_calibration
    pcfg = ProfileConfig(model=str(model), stages=args.stages, repeats=args.profile_repeats,
                         new_tokens=args.new_tokens, alphas=[args.alpha])
    profile(pcfg, out / "profile", log=lambda s: print(s, file=sys.stderr))
    costs, err, _ = calibrate(out / "profile")
    return write_calibration(out / "calibration.yaml", costs, err)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--concurrency", default="1,2,3,4", help="C values, comma-separated (default 1,2,3,4)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=0.8, help="the SPD oracle's acceptance (default 0.8)")
    ap.add_argument("--policy", default="interleave")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile-repeats", type=int, default=5, help="microbenchmark repeats when calibrating here")
    ap.add_argument("--calibration", default=None, metavar="CALIB.yaml", help="default: profile + calibrate now")
    ap.add_argument("--out", type=Path, default=Path("reports/serving_executor"))
    args = ap.parse_args()
    model = resolve_model(args.model)
    cs = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    calib = calibration_for(args, model, args.out)
    from spdsim.replay import _replay_scenario
    scenario = _replay_scenario(model_entry(model), args.stages)
    prompts = heldout_prompts(args.requests)
    arrivals = f"poisson:{args.rate:g}" if args.rate else None
    cases = [Case(s, args.stages, f"oracle:{args.alpha:g}" if s == "spd" else None,
                  f"{args.alpha:g}" if s == "spd" else "", policy=args.policy, concurrency=c, rate=args.rate)
             for c in cs for s in ("pp", "spd")]
    jobs = []
    for i in range(args.repeats):
        for c in cases:
            times = parse_arrivals(arrivals, args.requests, 1000 + i)
            jobs.append({"scheme": c.scheme, "prompt": prompts[0], "new_tokens": args.new_tokens, "draft": c.draft,
                         "seed": 1000 + i, "serving": {"policy": c.policy, "concurrency": c.concurrency,
                                                       "arrivals": arrivals, "requests": [
                                                           {"prompt": p, "new_tokens": args.new_tokens, "arrival_s": t}
                                                           for p, t in zip(prompts, times)]}})
    results = launch(RunSpec(model=str(model), stages=args.stages, jobs=jobs, model_label=model.name))
    rows = [("scheme", "C", "tok/s measured", "predicted", "TPOT p50 ms measured", "predicted",
             "TTFT p50 ms measured", "predicted", "bubble measured", "predicted")]
    table = []
    for k, c in enumerate(cases):
        runs = results[k::len(cases)]
        preds = [predict_serving(scenario, c, calib, r, seed=i) for i, r in enumerate(runs)]
        med = {f: (statistics.median(r[f] for r in runs), statistics.median(p[f] for p in preds)) for f in FIGURES}
        table.append({"scheme": c.scheme, "concurrency": c.concurrency, **{f"{f}_measured": m for f, (m, _) in med.items()},
                      **{f"{f}_predicted": p for f, (_, p) in med.items()}})
        rows.append((c.scheme, str(c.concurrency)) + tuple(
            x for f in FIGURES for x in (format(med[f][0], ".3f" if f == "bubble_ratio" else ".1f"),
                                         format(med[f][1], ".3f" if f == "bubble_ratio" else ".1f"))))
    print(f"serving {args.requests} requests × {args.new_tokens} tokens, policy {args.policy}, n = {args.stages}, "
          f"SPD oracle α = {args.alpha:g}, arrivals {arrivals or 'all at once'}; medians of {args.repeats}; "
          f"predicted with {calib}")
    print(align(rows))
    for what in ("measured", "predicted"):
        better = [t["concurrency"] for t in table if t["scheme"] == "pp" and t[f"tokens_per_s_{what}"] >= next(
            u[f"tokens_per_s_{what}"] for u in table if u["scheme"] == "spd" and u["concurrency"] == t["concurrency"])]
        print(f"{what}: PP's throughput ≥ SPD's from C = {min(better)}" if better
              else f"{what}: SPD's throughput stays above PP's for every C here")
    (args.out / "serving_executor.json").write_text(json.dumps(table, indent=1))
    print(f"wrote {args.out / 'serving_executor.json'} (take the figures on a quiet machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
