"""`executor` command line (DESIGN §4). Each subcommand's work lives in its own module; this file parses
arguments and turns bad input into exit 2 with one line (no traceback)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spdsim.errors import UserError

DEFAULT_TINY = Path(__file__).parent / "weights" / "tiny.safetensors"


def _cmd_train_lm(args: argparse.Namespace) -> int:
    from executor.train import TrainLMConfig, train_lm
    if args.steps < 1 or (args.schedule_steps is not None and args.schedule_steps < args.steps):
        raise UserError("--steps must be ≥ 1 and --schedule-steps ≥ --steps")
    meta = train_lm(TrainLMConfig(out=args.out, steps=args.steps, schedule_steps=args.schedule_steps,
                                  seed=args.seed, threads=args.threads))
    print(f"validation loss {meta['val_loss_nats_per_byte']} nats/byte, "
          f"greedy next-byte accuracy {meta['val_greedy_next_byte_accuracy']}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from executor.runner import run_command
    return run_command(args)


def _cmd_profile(args: argparse.Namespace) -> int:
    from executor.profile import profile_command
    return profile_command(args)


def _cmd_validate(args: argparse.Namespace) -> int:
    from executor.validate import validate_command
    return validate_command(args)


def _module_shape(args: argparse.Namespace) -> dict:
    """--proj / --ffn-dim as given; left out, TrainHeadConfig's defaults (the committed modules') apply."""
    if args.ffn_dim is not None and args.ffn_dim < 0:
        raise UserError("--ffn-dim must be ≥ 0 (0: attention-only layers)")
    return {k: v for k, v in (("proj", args.proj), ("ffn_dim", args.ffn_dim)) if v is not None}


def train_head_config(args: argparse.Namespace):
    """`train-head`'s options → its TrainHeadConfig (also how a recorded command is checked to reproduce)."""
    from executor.spec_head import KINDS
    from executor.train_head import TrainHeadConfig
    if args.stages < 1 or args.steps < 1 or args.batch < 1 or args.layers < 1:
        raise UserError("--stages, --steps, --batch and --layers must be ≥ 1")
    if args.kind not in KINDS or args.kind == "early-exit-raw":
        raise UserError(f"--kind {args.kind!r}: expected one of spd, window, k-ahead, early-exit")
    if args.width < 0 or (args.width and args.width % 4):
        raise UserError("--width must be 0 (the target's) or a positive multiple of 4 (the module's heads)")
    return TrainHeadConfig(stages=args.stages, kind=args.kind, steps=args.steps, batch=args.batch, seed=args.seed,
                           threads=args.threads, n_layers=args.layers, grad_checkpoint=args.grad_checkpoint,
                           query_window=args.query_window, width=args.width, **_module_shape(args))


def _cmd_train_head(args: argparse.Namespace) -> int:
    from executor.train_head import train_head
    tc = train_head_config(args)
    try:
        train_head(args.model, args.out, tc)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    return 0


def _cmd_acceptance(args: argparse.Namespace) -> int:
    from executor.acceptance import acceptance_study
    from executor.train_head import TrainHeadConfig
    if not args.stages or min(args.stages) < 1 or args.steps < 1 or args.windows < 1:
        raise UserError("--stages, --steps and --windows must be ≥ 1")
    tc = TrainHeadConfig(stages=max(args.stages), steps=args.steps, batch=args.batch, seed=args.seed,
                         threads=args.threads, query_window=args.query_window, **_module_shape(args))
    if len(args.width) not in (1, len(args.stages)) or any(w < 0 or w % 4 for w in args.width):
        raise UserError("--width: one value, or one per --stages value; each 0 (the target's) or a multiple of 4")
    widths = dict(zip(args.stages, args.width * len(args.stages) if len(args.width) == 1 else args.width))
    try:
        acceptance_study(args.model, sorted(set(args.stages)), args.out, args.heads, args.table, tc,
                         n_windows=args.windows, timing=not args.no_timing, widths=widths)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    return 0


def _module_shape_options(p: argparse.ArgumentParser) -> None:
    """--proj / --ffn-dim, shared by train-head and acceptance (read back by `_module_shape`)."""
    p.add_argument("--proj", choices=["level", "shared", "none"], default=None,
                   help="spd/window input rows: 'shared' (one map over a per-level gated sum of the checkpoints; "
                        "a call reads one matrix whatever n is), 'none' (that gated sum is the row: no map, the "
                        "cheapest) or 'level' (one map per checkpoint level); default: as the committed modules")
    p.add_argument("--ffn-dim", type=int, default=None, metavar="F",
                   help="spd/window feed-forward size (0: attention-only layers, cheaper per call); default: "
                        "as the committed modules")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="executor",
                                description="A real PyTorch pipeline executor for AR / PP / SPD decoding.",
                                epilog="docs: docs/README.md (an index of the docs pages)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train-lm", help="train the built-in byte-level tiny model on the stdlib sources",
                       epilog="docs: docs/executor.md",
                       description="Train the built-in tiny model (byte-level, d=256, 8 layers) on this "
                                   "machine's Python standard library sources; checkpoints as it goes.")
    t.add_argument("--out", type=Path, default=DEFAULT_TINY, help=f"checkpoint path (default {DEFAULT_TINY})")
    t.add_argument("--steps", type=int, default=500, help="optimizer steps of 16×256 bytes (default 500)")
    t.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the cosine LR schedule (default --steps); the shipped model stopped at "
                        "200 steps of a 500-step schedule")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.set_defaults(func=_cmd_train_lm)

    from executor.runner import DEFAULT_PROMPT   # no torch import: runner imports torch lazily
    r = sub.add_parser("run", help="decode with AR / PP / SPD across one process per stage",
                       epilog="docs: docs/executor.md",
                       description="Decode with AR (one process), PP or SPD (one process per stage; "
                                   "spawned here, or one rank under torchrun), greedily or by sampling "
                                   "(--temperature). Prints tokens/s, bubble, waste and acceptance, all "
                                   "computed from the measured trace.")
    r.add_argument("--stages", type=int, default=1, help="pipeline stages (default 1)")
    r.add_argument("--tp", type=int, default=1, metavar="T",
                   help="tensor-parallel ranks per stage: T × stages processes, each holding its shard "
                        "(default 1); T must divide the heads, the feed-forward size and the vocabulary")
    r.add_argument("--allreduce", default="direct", choices=["direct", "ring"],
                   help="the local transport's all-reduce under --tp (default direct: one message per peer)")
    r.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="under --tp (greedy) and with --requests, rank 0 also decodes the one-device AR reference "
                        "before timing and --json reports matches_reference (default on; under --tp it loads the "
                        "whole model once)")
    r.add_argument("--scheme", default="ar", help="ar | pp | spd | spd_dedicated (n + 1 processes: rank 0 "
                                                        "embeds, drafts and verifies; default ar)")
    r.add_argument("--model", default="tiny", help="'tiny' (the shipped checkpoint), our checkpoint path, "
                                                   "or a Hugging Face directory (default tiny)")
    r.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    r.add_argument("--draft", default=None, metavar="SPEC",
                   help="spd drafter: oracle:ALPHA (true greedy token with probability ALPHA) or head:PATH")
    r.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (UTF-8 bytes are the token ids)")
    r.add_argument("--seed", type=int, default=0, help="drafter and sampling seed (default 0)")
    r.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy (default); T > 0 samples from softmax(logits / T), SPD verifying drafts "
                        "by speculative sampling: equal to AR in distribution, not token for token. "
                        "ar, pp and spd with --draft head:PATH")
    r.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    r.add_argument("--transport", default="auto",
                   help="local (sockets, one CPU host) | dist (torch.distributed: gloo / NCCL) | auto (default)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    r.add_argument("--repeat", type=int, default=1, help="decode R times in the same processes; figures are "
                                                       "medians, the trace is the last run's (default 1)")
    r.add_argument("--timeout", type=float, default=20.0, help="seconds a rank waits for a message mid-run "
                                                               "before giving up (default 20)")
    r.add_argument("--trace", type=Path, default=None, metavar="DIR",
                   help="write DIR/rank<k>.jsonl traces and DIR/timeline.json (Chrome / Perfetto)")
    sv = r.add_argument_group("serving (several requests through one pipeline; docs/executor-serving.md)")
    sv.add_argument("--requests", type=int, default=None, metavar="K",
                    help="decode K prompts (held-out standard-library files, or --prompts FILE), each "
                         "--new-tokens long, through the same pipeline")
    sv.add_argument("--concurrency", type=int, default=None, metavar="C",
                    help="at most C requests in flight (admitted) at once, one KV cache each (default 1)")
    sv.add_argument("--policy", default=None, metavar="P",
                    help="what enters stage 1 each tick: fcfs (one request at a time; default) | interleave | "
                         "spd_first | adaptive (a draft enters when the module's confidence ≥ --threshold; "
                         "--draft head:PATH only)")
    sv.add_argument("--threshold", type=float, default=0.5, help="adaptive: the confidence threshold (default 0.5)")
    sv.add_argument("--arrivals", default=None, metavar="poisson:R",
                    help="requests arrive as a Poisson process of R per second (default: all at once)")
    sv.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                    help="one prompt per line (UTF-8 bytes; cycled if fewer than K)")
    r.add_argument("--json", action="store_true", help="print one JSON object with every figure, last")
    r.add_argument("--verbose", action="store_true", help="each rank says on stderr when it is ready")
    r.set_defaults(func=_cmd_run)

    h = sub.add_parser("train-head", help="train a speculative module (or a baseline drafter) by self-distillation",
                       epilog="docs: docs/speculative-module.md",
                       description="Self-distil a drafter from the frozen target on the stdlib sources (KL to the "
                                   "target's next-token distribution), every position in parallel under the SPD "
                                   "depth rule. Reproducible: a fixed step count and seed.")
    h.add_argument("--stages", type=int, required=True, help="pipeline stages n the module drafts for")
    h.add_argument("--model", default="tiny", help="'tiny' (the shipped checkpoint) or a checkpoint path")
    h.add_argument("--out", type=Path, required=True, help="output .safetensors (+ .json)")
    h.add_argument("--kind", default="spd", help="spd (default) | window | k-ahead | early-exit")
    h.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600, the committed modules)")
    h.add_argument("--batch", type=int, default=4, help="windows of 256 bytes per step (default 4)")
    h.add_argument("--layers", type=int, default=1, help="transformer layers in the module (default 1)")
    h.add_argument("--width", type=int, default=0,
                   help="module width (default 0: the target's); narrower is cheaper per call, it must stay "
                        "below the slowest stage's time (see `executor acceptance`'s head_timing.csv)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward (memory)")
    h.add_argument("--query-window", action=argparse.BooleanOptionalAction, default=True,
                   help="spd/window: a linear path from the window's rows to the query row (default on)")
    _module_shape_options(h)
    h.set_defaults(func=_cmd_train_head)

    a = sub.add_parser("acceptance", help="acceptance of each drafter vs pipeline depth on held-out files",
                       epilog="docs: docs/speculative-module.md",
                       description="Measure greedy agreement with the target (and top-5) of the speculative "
                                   "module and the baselines at each n, offline, exactly as the pipeline sees "
                                   "it. Trains drafters that are missing (same data and budget for all).")
    a.add_argument("--model", default="tiny", help="'tiny' (the shipped checkpoint) or a checkpoint path")
    a.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8], help="stage counts (default 2 4 8)")
    a.add_argument("--out", type=Path, default=Path("reports/acceptance"), help="output directory")
    a.add_argument("--heads", type=Path, default=Path(__file__).parent / "weights",
                   help="where head_n<N>.safetensors live (default executor/weights)")
    a.add_argument("--table", default=None, help="per-n acceptance table for scenarios (default "
                                                  "scenarios/acceptance/<model>_head.yaml; 'none' to skip)")
    a.add_argument("--steps", type=int, default=600, help="training steps of any missing drafter (default 600, as the committed modules)")
    a.add_argument("--batch", type=int, default=4, help="windows of 256 bytes per step (default 4)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--windows", type=int, default=48, help="held-out windows of 512 bytes (default 48)")
    a.add_argument("--width", type=int, nargs="+", default=[0], metavar="W",
                   help="speculative module width: one for every n, or one per --stages value "
                        "(0: the target's; default 0)")
    a.add_argument("--no-timing", action="store_true", help="skip the per-call timing of the module")
    a.add_argument("--query-window", action=argparse.BooleanOptionalAction, default=True,
                   help="spd/window modules with the query-window path (see train-head; default on)")
    _module_shape_options(a)
    a.set_defaults(func=_cmd_acceptance)

    pr = sub.add_parser("profile", help="layer, head and link microbenchmarks plus AR / PP / SPD run traces",
                        epilog="docs: docs/calibration.md",
                        description="Measure what `spdsim calibrate` fits: per-layer decode time against context "
                                    "length, embedding, final norm + LM head, message time against size between "
                                    "ranks, and full AR / PP / SPD run traces (medians over repeats, warm-up "
                                    "excluded). Writes TRACE_DIR/profile.json and TRACE_DIR/runs/<run>/.")
    pr.add_argument("--model", default="tiny", help="'tiny' (the shipped checkpoint) or a checkpoint path")
    pr.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    pr.add_argument("--stages", type=int, default=2, help="profile runs on 1..N ranks (default 2)")
    pr.add_argument("--out", type=Path, required=True, metavar="TRACE_DIR")
    pr.add_argument("--repeats", type=int, default=7, help="timed calls per microbenchmark (default 7)")
    pr.add_argument("--contexts", default=None, metavar="C1,C2,...", help="context lengths of the layer sweep "
                                                                        "(default: 1, 16, 64, 256, half and full limit)")
    pr.add_argument("--new-tokens", type=int, default=32, help="tokens per run trace (default 32)")
    pr.add_argument("--alphas", default="0.5,0.8", help="oracle acceptance of the SPD run traces (default 0.5,0.8)")
    pr.add_argument("--head", default=None, metavar="PATH", help="also trace an SPD run with this trained module")
    pr.add_argument("--threads", type=int, default=1)
    pr.add_argument("--tp", type=int, default=1, metavar="T",
                    help="also time all-reduce / all-gather against size on T ranks (profile.json 'allreduce', "
                         "'allgather') and trace TP runs into TRACE_DIR/runs_tp/ (default 1: neither)")
    pr.set_defaults(func=_cmd_profile)

    v = sub.add_parser("validate", help="measure a scenario's points here, predict them, compare",
                       epilog="docs: docs/calibration.md",
                       description="For every point of SCENARIO this hardware can run: measure it with the "
                                   "executor (tokens/s as throughput over repeats, bubble as a mean), predict "
                                   "it with the simulator from a calibration fitted on separate runs (another "
                                   "prompt, interleaved), replaying each measured accept/reject sequence, "
                                   "with a 95% bootstrap interval of every error; rounds of repeats are added "
                                   "until each point passes or fails for sure, or --max-minutes is spent. "
                                   "Writes OUT/validation.csv, a parity plot and a table. Exit 0: every point "
                                   "passes; 1: some point fails; 3: none fails, some undetermined.")
    v.add_argument("scenario", type=Path, metavar="SCENARIO.yaml")
    v.add_argument("--tolerance", type=float, default=0.05,
                   help="largest relative error allowed on tokens_per_s and speedup_vs_pp (default 0.05)")
    v.add_argument("--out", type=Path, default=Path("reports/validation"), help="default reports/validation/")
    v.add_argument("--bubble-tolerance", type=float, default=0.03,
                   help="largest absolute error allowed on bubble_ratio (default 0.03)")
    v.add_argument("--model", default=None, help="checkpoint to run (default: the scenario's model name, 'tiny')")
    v.add_argument("--calibration", type=Path, default=None, metavar="CALIB.yaml",
                   help="use this calibration (default: the scenario's, else profile + calibrate now)")
    v.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    v.add_argument("--repeats", type=int, default=8,
                   help="measured decodes per point and round (default 8: the fewest an interval can decide "
                        "on); rounds are added until every point's verdict is known or --max-minutes is spent")
    v.add_argument("--max-minutes", type=float, default=15.0,
                   help="stop adding rounds after this long (default 15; 0: the 3 rounds every verdict needs at least)")
    v.add_argument("--warmup", type=int, default=1,
                   help="untimed decodes at the start of each launch (default 1)")
    v.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False,
                   help="pin each rank to its own core when ranks ≤ cores (default off)")
    v.add_argument("--new-tokens", type=int, default=None, help="override the scenario's workload.new_tokens")
    v.add_argument("--head", default=None, metavar="PATH", help="also validate SPD with this trained module")
    v.add_argument("--concurrency", type=int, nargs="+", default=None, metavar="C",
                   help="serving scenarios (workload.arrivals): measure every point at each concurrency C "
                        "(default 2 3; fcfs once, at 1)")
    v.add_argument("--requests", type=int, default=None, metavar="K",
                   help="serving scenarios: requests per measured run (default: the scenario's workload.requests)")
    v.add_argument("--threads", type=int, default=1)
    v.set_defaults(func=_cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"executor: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("executor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
