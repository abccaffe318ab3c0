"""`spdsim` command line (DESIGN §4). Each subcommand's work lives in its own module; this file only
parses arguments and turns bad input into exit 2 with one line (no traceback)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spdsim.errors import UserError


def _cmd_run(args: argparse.Namespace) -> int:
    from spdsim.sweep import run_command
    return run_command(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from spdsim.report import report_command
    return report_command(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from spdsim.compare import compare_command
    return compare_command(args)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from spdsim.calibrate import calibrate_command
    return calibrate_command(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.qps is not None or args.max_qps:       # planning by latency SLO (serving)
        from spdsim.plan_serving import plan_serving_command
        return plan_serving_command(args)
    from spdsim.plan import plan_command
    return plan_command(args)


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    """`spdsim plan`'s options (spdsim/plan.py checks their values)."""
    p.add_argument("--model", required=True, help="catalog model, e.g. llama-2-70b")
    p.add_argument("--gpu", required=True, metavar="G[,G2...]",
                   help="GPU types to consider: catalog names or unique prefixes (a100, h100, h200, l40s)")
    p.add_argument("--max-gpus", type=int, required=True, metavar="K", help="at most this many GPUs")
    p.add_argument("--target-tokens-per-s", type=float, default=None, metavar="T",
                   help="decode speed to reach (batch 1, tokens/s); or plan by SLO with --qps / --max-qps")
    p.add_argument("--qps", type=float, default=None, metavar="R",
                   help="serving: the cheapest configuration meeting --slo at R requests/s (Poisson)")
    p.add_argument("--max-qps", action="store_true",
                   help="serving: the highest rate each configuration sustains within --slo, and QPS per $")
    p.add_argument("--slo", default=None, metavar="tpot_p99=40ms,ttft_p99=1s",
                   help="serving: latency bounds (p99 TTFT and / or TPOT; ms or s)")
    p.add_argument("--policies", default="fcfs,interleave,spd_first,adaptive",
                   help="serving policies to consider (default all four)")
    p.add_argument("--requests", type=int, default=200, help="serving: requests per simulated run (default 200)")
    p.add_argument("--max-batch", type=int, default=1, help="serving: positions per tick (default 1)")
    p.add_argument("--search-steps", type=int, default=6,
                   help="--max-qps: bisection steps on the rate (default 6: within 7%%)")
    p.add_argument("--acceptance", default="0.8", metavar="ALPHA|N:ALPHA,...",
                   help="SPD draft acceptance: one α, or a table per stage count, e.g. 2:0.9,4:0.85 (default 0.8)")
    p.add_argument("--topology", default=None, metavar="KIND",
                   help="interconnect (default: nvswitch up to 8 NVLink GPUs, multi-node beyond; pcie-tree without NVLink)")
    p.add_argument("--schemes", default="ar,pp,spd,sd,chain",
                   help="schemes to consider (default ar,pp,spd,sd,chain; ar with tp > 1 is plain tensor "
                        "parallelism, sd / chain run at one stage on a TP group)")
    p.add_argument("--tp", default=None, metavar="T[,T2...]",
                   help="TP degrees (GPUs per stage) to consider (default: every power of two up to 8 that "
                        "the model's heads allow)")
    p.add_argument("--partition", default=None,
                   help="partitioners to consider (default uniform,compute_balanced,comm_aware; serving: compute_balanced)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--price", default=None, metavar="GPU=USD,...",
                   help="hourly price per GPU, overriding the catalog's assumed figures")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of each GPU's memory kept free (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output directory (default reports/plan-<model>/)")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--dask", default=None, metavar="ADDRESS", help="run on a Dask distributed cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spdsim",
        description="Predict the decode speed, speedup and bubble ratio of Speculative Pipeline Decoding "
                    "(SPD) against plain pipelining (PP) and one-device decoding (AR).",
        epilog="docs: docs/README.md (an index of the docs pages)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="simulate every point of a scenario's sweep", epilog="docs: docs/simulator.md",
                       description="Simulate every point of SCENARIO's sweep; write OUT/results.csv, plots "
                                   "and an HTML summary; print a table.")
    r.add_argument("scenario", type=Path, metavar="SCENARIO.yaml")
    r.add_argument("--out", type=Path, default=None, help="output directory (default: reports/<scenario name>/)")
    r.add_argument("--jobs", type=int, default=1, help="simulate sweep points in N processes (default 1)")
    r.add_argument("--dask", default=None, metavar="ADDRESS",
                   help="simulate on a Dask distributed cluster (scheduler address; needs the dask extra)")
    r.add_argument("--quiet", action="store_true", help="print no table and no progress")
    r.add_argument("--no-plots", action="store_true", help="write results.csv only, no plots or HTML")
    r.add_argument("--full", action="store_true",
                   help="print every simulated point (default: the fastest configuration per α and the baselines)")
    r.add_argument("--trace", default=None, metavar="SELECT",
                   help="keep timelines for selected points: 'all', 'best', or 'scheme=spd,stages=4,...'")
    r.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="(re)draw plots and the HTML summary from DIR/results.csv",
                         epilog="docs: docs/reports.md",
                         description="(Re)draw DIR's report from DIR/results.csv: speedup_vs_n.png, "
                                     "bubble_vs_n.png, tokens_per_s.png, utilization.png; for every "
                                     "DIR/timelines/<point>.jsonl a Perfetto timeline_<point>.json and a "
                                     "gantt_<point>.png; and DIR/index.html, which links them all.")
    rep.add_argument("dir", type=Path, metavar="DIR")
    rep.set_defaults(func=_cmd_report)

    cmp = sub.add_parser("compare", help="SPD vs traditional speculative decoding on one scenario",
                         epilog="docs: docs/baselines.md",
                         description="Simulate SCENARIO and print, per (n, α), the fastest partition of each "
                                     "scheme: GPUs, parallelism, acceptance by depth, bubbles, speedups "
                                     "(SPD, spd_dedicated vs sd, chain). Writes OUT/compare.csv.")
    cmp.add_argument("scenario", type=Path, metavar="SCENARIO.yaml")
    cmp.add_argument("--out", type=Path, default=None, help="output directory (default: reports/<scenario name>/)")
    cmp.add_argument("--jobs", type=int, default=1, help="simulate sweep points in N processes (default 1)")
    cmp.set_defaults(func=_cmd_compare)

    c = sub.add_parser("calibrate", help="fit cost models from executor traces", epilog="docs: docs/calibration.md")
    c.add_argument("trace_dir", type=Path, metavar="TRACE_DIR")
    c.add_argument("--out", type=Path, required=True, metavar="CALIB.yaml")
    c.set_defaults(func=_cmd_calibrate)

    pl = sub.add_parser("plan", help="capacity planning: which GPUs, how many, which partition",
                        epilog="docs: docs/planning.md",
                        description="Enumerate GPU types, counts, stage counts, partitioners and schemes; "
                                    "reject what does not fit memory; simulate; rank by cost. Writes "
                                    "OUT/plan.csv and OUT/pareto.png. Exit 0: target met, 1: not met. "
                                    "With --qps R / --max-qps and --slo: plan by latency SLO under Poisson "
                                    "arrivals (docs/serving.md), OUT/plan_serving.csv and pareto_serving.png.")
    _plan_arguments(pl)
    pl.set_defaults(func=_cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"spdsim: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("spdsim."):
            print(f"spdsim: error: '{args.command}' is not built yet ({e.name} missing)", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("spdsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
