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
