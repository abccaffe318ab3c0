"""Predicted decode speed under plain tensor parallelism, beside public measurements (acceptance checks).

Prints, for Llama-2-7B, Llama-3-8B and Llama-2-70B on 8 × A100-80GB SXM and 8 × H100 SXM (NVSwitch),
the simulator's tokens/s at TP 1 / 2 / 4 / 8 (scheme ar at one stage, roofline costs and the all-reduce
model of spdsim/collectives.py, batch 1), and where a public measurement exists, the measurement and
predicted ÷ measured. Nothing in the simulator is fitted to these measurements: they check it.

Measurements (../shared/REFERENCE.md, "Decode speed at batch 1"):
  gpt-fast README (pytorch-labs/gpt-fast; A100-80GB at 330 W, bf16, torch.compile, batch 1):
    Llama-2-7B on 1 GPU 104.9 tok/s; Llama-2-70B with tensor parallel 2 / 4 / 8: 21.3 / 38.0 / 62.5 tok/s.
  Its benchmark generates 200 tokens after a short prompt ("Hello, my name is"): the workload below.
No H100 or Llama-3-8B TP figure is in REFERENCE.md: those rows print predictions only.

Run: python benchmarks/tp_table.py [--new-tokens 200] [--prompt-tokens 8] [--allreduce auto|ring|tree|oneshot]
(Simulated figures do not depend on the machine's load; the wall time printed at the end does.)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from spdsim.engine import simulate_point  # noqa: E402
from spdsim.errors import UserError  # noqa: E402
from spdsim.scenario import Point, parse_scenario  # noqa: E402
from spdsim.textable import align, cell  # noqa: E402

MODELS = ("llama-2-7b", "llama-3-8b", "llama-2-70b")
GPUS = ("a100-80gb-sxm", "h100-sxm")
TPS = (1, 2, 4, 8)
# (model, gpu, tp) → (tokens/s, source); REFERENCE.md "Decode speed at batch 1", gpt-fast README.
MEASURED = {
    ("llama-2-7b", "a100-80gb-sxm", 1): (104.9, "gpt-fast"),
    ("llama-2-70b", "a100-80gb-sxm", 2): (21.3, "gpt-fast"),
    ("llama-2-70b", "a100-80gb-sxm", 4): (38.0, "gpt-fast"),
    ("llama-2-70b", "a100-80gb-sxm", 8): (62.5, "gpt-fast"),
}


def predict(model: str, gpu: str, tp: int, prompt: int, new: int,
            allreduce: str = "auto") -> tuple[float | None, float | None]:
    """(tokens/s, all-reduce share of the forward) of plain TP; (None, None) when it does not fit."""
    try:
        s = parse_scenario(yaml.safe_dump({
            "name": f"{model}-{gpu}-tp{tp}", "hardware": {"gpu": gpu, "count": 8, "topology": "nvswitch"},
            "model": model, "workload": {"prompt_tokens": prompt, "new_tokens": new},
            "sweep": {"stages": [1], "tp": [tp], "partition": ["uniform"], "schemes": ["ar"]},
            "costs": {"allreduce": allreduce}}))
    except UserError:          # the model does not fit that TP group's memory
        return None, None
    if not s.ar_fits(tp):
        return None, None
    m = simulate_point(s, Point("ar", 1, "uniform", None, tp)).metrics
    return m.tokens_per_s, m.allreduce_share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--allreduce", default="auto", choices=("auto", "ring", "tree", "oneshot"),
                    help="pin the all-reduce algorithm (default auto: the fastest per size)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = [("model", "gpu", "tp", "predicted tok/s", "all-reduce share", "measured tok/s", "pred ÷ meas", "source")]
    for model in MODELS:
        for gpu in GPUS:
            for tp in TPS:
                tps, share = predict(model, gpu, tp, args.prompt_tokens, args.new_tokens, args.allreduce)
                meas, src = MEASURED.get((model, gpu, tp), (None, ""))
                rows.append((model, gpu, str(tp), cell(tps, ".1f") if tps else "does not fit",
                             cell(share, ".2f"), cell(meas, ".1f"),
                             cell(tps / meas, ".2f") if tps and meas else "", src))
    print(align(rows, left=(0, 1, 7)))
    print(f"\nbatch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, roofline + all-reduce "
          f"model ({args.allreduce}; auto is one-shot on NVSwitch); nothing fitted to the measurements "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
