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
    meta = train_lm(TrainLMConfig(out=args.out, steps=args.steps, seed=args.seed, threads=args.threads))
    print(f"validation loss {meta['val_loss_nats_per_byte']} nats/byte, "
          f"greedy next-byte accuracy {meta['val_greedy_next_byte_accuracy']}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from executor.runner import run_command
    return run_command(args)


def _cmd_train_head(args: argparse.Namespace) -> int:
    from executor.spec_head import KINDS
    from executor.train_head import TrainHeadConfig, train_head
    if args.stages < 1 or args.steps < 1 or args.batch < 1 or args.layers < 1:
        raise UserError("--stages, --steps, --batch and --layers must be ≥ 1")
    if args.kind not in KINDS or args.kind == "early-exit-raw":
        raise UserError(f"--kind {args.kind!r}: expected one of spd, window, k-ahead, early-exit")
    tc = TrainHeadConfig(stages=args.stages, kind=args.kind, steps=args.steps, batch=args.batch, seed=args.seed,
                         threads=args.threads, n_layers=args.layers, grad_checkpoint=args.grad_checkpoint)
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
                         threads=args.threads)
    try:
        acceptance_study(args.model, sorted(set(args.stages)), args.out, args.heads, args.table, tc,
                         n_windows=args.windows, timing=not args.no_timing)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="executor",
                                description="A real PyTorch pipeline executor for AR / PP / SPD decoding.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train-lm", help="train the built-in byte-level tiny model on the stdlib sources",
                       description="Train the built-in tiny model (byte-level, d=256, 8 layers) on this "
                                   "machine's Python standard library sources; checkpoints as it goes.")
    t.add_argument("--out", type=Path, default=DEFAULT_TINY, help=f"checkpoint path (default {DEFAULT_TINY})")
    t.add_argument("--steps", type=int, default=500, help="optimizer steps of 16×256 bytes (default 500)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.set_defaults(func=_cmd_train_lm)

    from executor.runner import DEFAULT_PROMPT   # no torch import: runner imports torch lazily
    r = sub.add_parser("run", help="decode with AR / PP / SPD across one process per stage",
                       description="Decode greedily with AR (one process), PP or SPD (one process per stage; "
                                   "spawned here, or one rank under torchrun). Prints tokens/s, bubble, "
                                   "waste and acceptance, all computed from the measured trace.")
    r.add_argument("--stages", type=int, default=1, help="pipeline stages = processes (default 1)")
    r.add_argument("--scheme", default="ar", help="ar | pp | spd (default ar)")
    r.add_argument("--model", default="tiny", help="'tiny' (the shipped checkpoint), our checkpoint path, "
                                                   "or a Hugging Face directory (default tiny)")
    r.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    r.add_argument("--draft", default=None, metavar="SPEC",
                   help="spd drafter: oracle:ALPHA (true greedy token with probability ALPHA) or head:PATH")
    r.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (UTF-8 bytes are the token ids)")
    r.add_argument("--seed", type=int, default=0, help="drafter seed (default 0)")
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
    r.add_argument("--json", action="store_true", help="print one JSON object with every figure, last")
    r.set_defaults(func=_cmd_run)

    h = sub.add_parser("train-head", help="train a speculative module (or a baseline drafter) by self-distillation",
                       description="Self-distil a drafter from the frozen target on the stdlib sources (KL to the "
                                   "target's next-token distribution), every position in parallel under the SPD "
                                   "depth rule. Reproducible: a fixed step count and seed.")
    h.add_argument("--stages", type=int, required=True, help="pipeline stages n the module drafts for")
    h.add_argument("--model", default="tiny", help="'tiny' (the shipped checkpoint) or a checkpoint path")
    h.add_argument("--out", type=Path, required=True, help="output .safetensors (+ .json)")
    h.add_argument("--kind", default="spd", help="spd (default) | window | k-ahead | early-exit")
    h.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    h.add_argument("--batch", type=int, default=4, help="windows of 256 bytes per step (default 4)")
    h.add_argument("--layers", type=int, default=1, help="transformer layers in the module (default 1)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward (memory)")
    h.set_defaults(func=_cmd_train_head)

    a = sub.add_parser("acceptance", help="acceptance of each drafter vs pipeline depth on held-out files",
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
    a.add_argument("--steps", type=int, default=200, help="training steps of any missing drafter (default 200)")
    a.add_argument("--batch", type=int, default=4, help="windows of 256 bytes per step (default 4)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--windows", type=int, default=48, help="held-out windows of 512 bytes (default 48)")
    a.add_argument("--no-timing", action="store_true", help="skip the per-call timing of the module")
    a.set_defaults(func=_cmd_acceptance)
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
