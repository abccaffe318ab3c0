"""Executor decode speed on this machine: AR, PP n=2 and SPD n=2 with oracle α ∈ {0, 0.5, 0.8, 1}, per
transport; every SPD figure also as a fraction of its ideal (DESIGN §2):
    vs PP: SPD ÷ (PP × n/(1+(1-α)(n-1)))        vs AR: SPD ÷ (AR × n/(1+(1-α)(n-1)))
with α the run's measured acceptance. Issue targets (local transport): PP ≥ 0.85× AR; SPD/PP ≥ 0.95 of
ideal; SPD/AR ≥ 0.85 of ideal. Each configuration runs --repeats times, interleaved in the same
processes (so load drift hits all alike), and the table shows medians: runs vary ±10% here.

TP rows (--tp T, default 2; 1 skips them; local transport): AR on one TP group of T ranks ("vs AR" is
TPT ÷ AR, the figure to set beside the simulator's prediction for this machine: with --calibration FILE
— a calibration with a tp section, e.g. the one `executor validate scenarios/local-cpu.yaml` writes — the
table adds the predicted ÷AR of the same decode), and PP / SPD on T × n
ranks where this host allows that many (executor.runner.RANKS_PER_CORE per core), their ideal fractions
taken against TP PP and TP AR. On 2 shared cores T × n processes oversubscribe them: take the figures on
a quiet machine.

    python benchmarks/executor_speed.py [--model tiny] [--new-tokens 128] [--repeats 5] [--transports local,dist]
                                        [--tp 2] [--calibration reports/validation/calibration.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from executor.runner import DEFAULT_PROMPT, RANKS_PER_CORE, RunSpec, launch, resolve_model
from spdsim.metrics import ideal_spd_speedup

ALPHAS = (0.0, 0.5, 0.8, 1.0)


def medians(results: list[dict]) -> dict:
    rates = [r["acceptance_rate"] for r in results if r["acceptance_rate"] is not None]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "ms_per_token": statistics.median(r["ms_per_token"] for r in results),
            "bubble_ratio": statistics.median(r["bubble_ratio"] for r in results),
            "waste_ratio": statistics.median(r["waste_ratio"] for r in results),
            "acceptance_rate": statistics.median(rates) if rates else None,
            "spread": (max(r["tokens_per_s"] for r in results) - min(r["tokens_per_s"] for r in results)) / 2,
            "repeats": len(results)}


def predicted_tp_vs_ar(calibration: str, prompt_tokens: int, new_tokens: int, tp: int) -> float:
    """The simulator's TP tp ÷ AR for this machine's decode (scenarios/local-cpu.yaml, the calibration)."""
    import dataclasses
    from pathlib import Path
    from spdsim.replay import replay_point
    from spdsim.scenario import load_scenario
    sc = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "local-cpu.yaml")
    sc = dataclasses.replace(sc, calibration=str(Path(calibration).resolve()), path=None)
    one = replay_point(sc, "ar", 1, prompt_tokens, new_tokens, [], False).metrics.tokens_per_s
    return replay_point(sc, "ar", 1, prompt_tokens, new_tokens, [], False, tp=tp).metrics.tokens_per_s / one


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--transports", default="local,dist")
    ap.add_argument("--tp", type=int, default=2, help="TP rows on T ranks per stage (default 2; 1: none)")
    ap.add_argument("--json", default=None, help="also write every row to this file")
    ap.add_argument("--calibration", default=None, help="predict TP ÷ AR with this calibration (needs its tp section)")
    args = ap.parse_args()
    model = str(resolve_model(args.model))
    prompt = list(DEFAULT_PROMPT.encode())
    n, R, N = args.stages, args.repeats, args.new_tokens
    t_start = time.time()
    load = os.getloadavg()[0]

    ar = launch(RunSpec(model=model, stages=1, jobs=[dict(scheme="ar", prompt=prompt, new_tokens=N)] * R))
    rows = [{"config": "AR", "transport": "-", **medians(ar)}]
    ar_tps = rows[0]["tokens_per_s"]
    def pipeline_rows(transport: str, tp: int, ar_base: float) -> None:
        """PP and SPD α ∈ ALPHAS on tp × n ranks, interleaved in the same processes; ideals against ar_base."""
        configs = [("PP", dict(scheme="pp"))] + [(f"SPD α={a}", dict(scheme="spd", draft=f"oracle:{a}")) for a in ALPHAS]
        jobs = [dict(prompt=prompt, new_tokens=N, seed=i, **c) for i in range(R) for _, c in configs]
        results = launch(RunSpec(model=model, stages=n, tp=tp, jobs=jobs, transport=transport))
        name = results[0]["transport"]
        pp = None
        for k, (label, _) in enumerate(configs):
            row = {"config": f"{label} n={n}" + (f" tp={tp}" if tp > 1 else ""), "transport": name,
                   **medians(results[k::len(configs)])}
            if label == "PP":
                pp = row["tokens_per_s"]
                row["vs_ar"] = pp / ar_base
            else:
                ideal = ideal_spd_speedup(n, row["acceptance_rate"])
                row["ideal"] = ideal
                row["frac_ideal_vs_pp"] = row["tokens_per_s"] / (pp * ideal)
                row["frac_ideal_vs_ar"] = row["tokens_per_s"] / (ar_base * ideal)
            rows.append(row)

    for transport in args.transports.split(","):
        pipeline_rows(transport, 1, ar_tps)
    if args.tp > 1:
        tp_ar = launch(RunSpec(model=model, stages=1, tp=args.tp,
                               jobs=[dict(scheme="ar", prompt=prompt, new_tokens=N)] * R))
        row = {"config": f"AR tp={args.tp}", "transport": tp_ar[0]["transport"], **medians(tp_ar)}
        row["vs_ar"] = row["tokens_per_s"] / ar_tps
        if args.calibration:
            row["predicted_vs_ar"] = predicted_tp_vs_ar(args.calibration, len(prompt), N, args.tp)
        rows.append(row)
        if args.tp * n <= RANKS_PER_CORE * (os.cpu_count() or 1):
            pipeline_rows("local", args.tp, row["tokens_per_s"])

    print(f"# executor speed: {args.model}, {N} new tokens, n={n}, median of {R} "
          f"(load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end, {time.time() - t_start:.0f} s)")
    print(f"| config | transport | tokens/s | ±half-range | ms/token | bubble | waste | acceptance | "
          f"÷AR | predicted ÷AR | ideal | SPD÷(PP×ideal) | SPD÷(AR×ideal) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, d=3: "" if v is None else f"{v:.{d}f}"
    for r in rows:
        print(f"| {r['config']} | {r['transport']} | {r['tokens_per_s']:.1f} | {r['spread']:.1f} | "
              f"{r['ms_per_token']:.2f} | {r['bubble_ratio']:.3f} | {r['waste_ratio']:.3f} | "
              f"{fmt(r['acceptance_rate'], 2)} | {fmt(r.get('vs_ar'), 2)} | {fmt(r.get('predicted_vs_ar'), 2)} | "
              f"{fmt(r.get('ideal'), 2)} | "
              f"{fmt(r.get('frac_ideal_vs_pp'), 2)} | {fmt(r.get('frac_ideal_vs_ar'), 2)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
