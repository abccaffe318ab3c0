"""Is the speculative module off the critical path? Prints its time per drafter call against one pipeline
stage's forward of one token, for the shipped tiny model at n = 2, 4, 8 and a few module widths (not a
timed test: this machine's timings are noisy, so compare the ratios printed by one run).

The module must stay below the slowest stage's time (issue 5, DESIGN §2): the first (embedding + layers)
or the last (layers + norm + LM head) of a uniform partition, whichever is slower.
Untrained modules of the right shape are timed (the weights' values do not change the cost), so this
runs without any committed head. One thread, context 128, median of `--calls` calls, features delivered
as the pipeline delivers them (outside the timer, as a dict insert each); module and stage calls
alternate (`executor.acceptance.time_head`), so a slow spell of the host hits both sides of the ratio.

`--layers L` times against an untrained target of the tiny model's width with L layers instead (a
deeper model has more layers per stage at the same n; the cost of a stage or a module call does not
depend on the weights' values).

Run: python benchmarks/head_speed.py [--widths 256 128] [--calls 150] [--rounds 3] [--layers 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from executor.acceptance import time_head  # noqa: E402
from executor.checkpoints import load_checkpoint  # noqa: E402
from executor.model import Transformer  # noqa: E402
from executor.train_head import DEFAULT_TINY, TrainHeadConfig  # noqa: E402
from executor.spec_head import PROJS, SpecHead  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 128])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--calls", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3, help="repeat the whole table; medians are printed")
    ap.add_argument("--layers", type=int, default=0, help="an untrained target with this many layers (default: "
                                                          "the shipped tiny model)")
    ap.add_argument("--proj", choices=PROJS, default="level", help="input projection (spec_head)")
    ap.add_argument("--ffn-dim", type=int, default=-1, help="feed-forward size (-1: the target's ratio; 0: none)")
    ap.add_argument("--query-window", action=argparse.BooleanOptionalAction, default=True,
                    help="the query-window path (spec_head; default on, as the committed modules)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    target = load_checkpoint(DEFAULT_TINY).eval()
    if args.layers:
        target = Transformer(dataclasses.replace(target.cfg, n_layers=args.layers)).init_weights(0).eval()
    heads = {(n, w): SpecHead(TrainHeadConfig(stages=n, width=w, proj=args.proj, ffn_dim=args.ffn_dim,
                                         query_window=args.query_window).head_config(target.cfg, "spd"), target).eval()
             for n in args.stages for w in args.widths}
    samples: dict[tuple[int, int], list[tuple[float, float]]] = {k: [] for k in heads}
    for _ in range(args.rounds):            # interleaved: a slow spell hits every configuration alike
        for key, head in heads.items():
            samples[key].append(time_head(head, target, calls=args.calls))
    print(f"{'n':>3} {'width':>6} {'module ms':>10} {'stage ms':>9} {'module/stage':>13}  (stage: the slowest of a uniform partition of {target.cfg.n_layers} layers)")
    for (n, w), xs in samples.items():
        head_ms = statistics.median(h for h, _ in xs)
        stage_ms = statistics.median(s for _, s in xs)
        ratio = statistics.median(h / s for h, s in xs)
        print(f"{n:>3} {w:>6} {head_ms:>10.3f} {stage_ms:>9.3f} {ratio:>13.2f}")


if __name__ == "__main__":
    main()
