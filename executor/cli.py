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
