"""One-command GPU check: measure decode costs on the visible device, predict them with the simulator's
catalog entry for it, and write a calibration the simulator can load.

    python benchmarks/gpu_check.py --device cuda --out DIR     # on a GPU machine: ≤ 8 minutes on one H200
    python benchmarks/gpu_check.py --device cpu --out DIR      # the same script end to end, tiny shape

Nothing is downloaded: random weights (bf16 on CUDA, fp32 on CPU, where bf16 matmuls are slow) in the
catalog shapes (spdsim/models.py): llama-3-8b, qwen3.5-4b and one llama-2-70b layer on CUDA, tiny on CPU.
What it measures, each a median of CUDA-event (CPU: wall-clock) timings after warm-up:
  ceilings     a device-to-device copy (GB/s, bytes read + written) and a large matmul (TFLOP/s)
  layer        one decoder layer's decode step (one token) against context 1 … 4k, from a pass over every
               layer of the shape (a layer timed alone in a loop would find its weights in cache), with the
               step replayed as a CUDA graph (`graphs`) and launched eagerly (`eager`)
  embed, lm_head   the embedding of one token; final norm + LM head of one position
  ar           greedy decoding tokens/s of the whole model (executor/decode_step.py), with and without graphs
  nccl         (≥ 2 GPUs) send/recv one way between GPU 0 and 1, and all-reduce over every GPU, vs size
Predictions come from the simulator's cost model for the detected GPU (its name matched to the catalog:
H100 / H200 / A100 / L40S); for a GPU not in the catalog (and on CPU) from inline numbers: the measured
copy bandwidth and matmul rate stand in for the datasheet, and the check says so.

Writes DIR/gpu_check.csv (`shape, metric, context, predicted, measured, error_pct`; error_pct =
100·(predicted − measured)/measured; `context` is the context length for layer rows, the message bytes for
nccl rows, empty elsewhere), DIR/gpu_check.json (every sample and note), and DIR/<gpu>.yaml, a
`kind: gpu-roofline` calibration (spdsim/gpu_calibration.py): the roofline's HBM efficiency and per-layer
overhead fitted to the layer rows, with and without graphs. A scenario uses it with
`hardware.gpu: <gpu>` and `calibration: DIR/<gpu>.yaml` (docs/gpu.md).

Time budget (--budget-s, 420 s on CUDA): every measurement takes ≥ --min-repeats samples and adds more up
to --repeats while its share of time lasts; past the budget, only the minimum (and the check says so).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spdsim.costs import HBM_EFFICIENCY, CostOverrides, RooflineCosts  # noqa: E402
from spdsim.errors import UserError  # noqa: E402
from spdsim.gpu_calibration import (GpuCalibration, RooflineFit, catalog_gpu_for, fit_link,  # noqa: E402
                                    fit_roofline, write_gpu_calibration)
from spdsim.hardware import GPU, GPU_CATALOG, TopologySpec, build_topology, default_topology_params  # noqa: E402
from spdsim.models import MODEL_CATALOG, ModelShape  # noqa: E402

CSV_COLUMNS = ("shape", "metric", "context", "predicted", "measured", "error_pct")
DEFAULTS = {   # per device: what runs when no option says otherwise
    "cuda": dict(shapes="llama-3-8b,qwen3.5-4b,llama-2-70b:1", contexts="1,128,512,1024,2048,4096",
                 prompt_tokens=128, new_tokens=128, budget_s=420.0, dtype="bf16", max_s=2.0),
    "cpu": dict(shapes="tiny", contexts="1,128,512,1024", prompt_tokens=32, new_tokens=24, budget_s=90.0,
                dtype="fp32", max_s=0.5),
}
NCCL_SIZES = (2048, 8192, 32768, 131072, 524288, 2 << 20, 8 << 20, 32 << 20)
SEED = 0


# --- rows, budget, timing --------------------------------------------------------------------------

@dataclass
class Row:
    shape: str
    metric: str
    context: int | None
    predicted: float
    measured: float

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.predicted - self.measured) / self.measured if self.measured else float("nan")

    def csv(self) -> dict:
        return {"shape": self.shape, "metric": self.metric, "context": "" if self.context is None else self.context,
                "predicted": f"{self.predicted:.6g}", "measured": f"{self.measured:.6g}",
                "error_pct": f"{self.error_pct:.2f}"}


@dataclass
class Budget:
    total_s: float
    max_s: float                       # one measurement's share while the budget lasts
    start: float = field(default_factory=time.monotonic)
    over_at: str | None = None         # the first measurement that found the budget spent

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)


class Timer:
    """Medians of repeated calls: CUDA events around each call (the host runs ahead, so a call's interval
    is its device time plus any launch gaps the host left), wall-clock with a sync on CPU."""

    def __init__(self, torch, device, budget: Budget, warmup: int, min_repeats: int, repeats: int) -> None:
        self.torch, self.device, self.budget = torch, device, budget
        self.warmup, self.min_repeats, self.repeats = warmup, min_repeats, repeats
        self.samples: dict[str, list[float]] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def median_s(self, label: str, fn, calls_per_sample: int = 1) -> float:
        """Median seconds per call of fn (each sample runs it calls_per_sample times)."""
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        self.sync()
        deadline = time.monotonic() + self.budget.max_s
        samples: list[float] = []
        pairs = []
        for i in range(self.repeats):
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(calls_per_sample):
                    fn()
                b.record()
                pairs.append((a, b))
            else:
                t0 = time.perf_counter()
                for _ in range(calls_per_sample):
                    fn()
                samples.append(time.perf_counter() - t0)
            if i + 1 >= self.min_repeats:
                if self.budget.left() <= 0:
                    self.budget.over_at = self.budget.over_at or label
                    break
                if time.monotonic() > deadline:
                    break
        self.sync()
        if pairs:
            samples = [a.elapsed_time(b) * 1e-3 for a, b in pairs]
        samples = [s / calls_per_sample for s in samples]
        self.samples[label] = samples
        return statistics.median(samples)


# --- the device and its catalog entry ------------------------------------------------------------------

def measure_ceilings(torch, device, dtype, timer: Timer) -> dict:
    """Copy bandwidth (bytes read + written per second) and matmul rate on random data (METHOD.md)."""
    if device.type == "cuda":
        n_copy, n_mm = 1 << 29, 8192          # 1 GiB of bf16 moved each way; 1.1 TFLOP per product
    else:
        n_copy, n_mm = 1 << 23, 512           # 32 MiB of fp32; 0.27 GFLOP
    g = torch.Generator(device=device).manual_seed(SEED)
    src = torch.randn(n_copy, device=device, dtype=dtype, generator=g)
    dst = torch.empty_like(src)
    t_copy = timer.median_s("ceiling:copy", lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * src.element_size() / t_copy / 1e9
    del src, dst
    a = torch.randn(n_mm, n_mm, device=device, dtype=dtype, generator=g)
    b = torch.randn(n_mm, n_mm, device=device, dtype=dtype, generator=g)
    t_mm = timer.median_s("ceiling:matmul", lambda: a @ b)
    return {"copy_gbps": copy_gbps, "matmul_tflops": 2 * n_mm ** 3 / t_mm / 1e12}


def device_gpu(torch, device, ceilings: dict) -> tuple[str, GPU, bool, str]:
    """(name, spec, in catalog, device name): the catalog entry for the device, else inline numbers with
    the measured copy bandwidth and matmul rate in place of the datasheet's."""
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
        name = catalog_gpu_for(dev_name)
        if name:
            return name, GPU_CATALOG[name], True, dev_name
        props = torch.cuda.get_device_properties(device)
        slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-") or "gpu"
        return slug, GPU(slug, mem_gb=round(props.total_memory / 1e9, 1), hbm_gbps=round(ceilings["copy_gbps"], 1),
                         bf16_tflops=round(ceilings["matmul_tflops"], 1)), False, dev_name
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        mem_gb = 16.0
    dev_name = platform.machine() or "cpu"
    try:
        dev_name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "cpu", GPU("cpu", mem_gb=round(mem_gb, 1), hbm_gbps=round(ceilings["copy_gbps"], 2),
                      bf16_tflops=round(ceilings["matmul_tflops"], 4), nvlink_gbps=0.0), False, dev_name


# --- shapes and random models ----------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeSpec:
    label: str            # the CSV's shape column
    shape: ModelShape     # for the prediction (dtype_bytes = the run's)
    layers: int           # layers actually built


def parse_shapes(text: str, dtype_bytes: int) -> list[ShapeSpec]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, layers = item.partition(":")
        if name not in MODEL_CATALOG:
            raise UserError(f"--shapes: unknown shape {name!r} (catalog: {', '.join(MODEL_CATALOG)})")
        base = MODEL_CATALOG[name]
        n = int(layers) if layers else base.layers
        if not 1 <= n <= base.layers:
            raise UserError(f"--shapes: {item!r}: layers must be 1..{base.layers}")
        label = name if n == base.layers else f"{name}/{n}-layer" + ("s" if n > 1 else "")
        out.append(ShapeSpec(label, dataclasses.replace(base, dtype_bytes=dtype_bytes), n))
    if not out:
        raise UserError("--shapes: empty")
    return out


def build_model(torch, spec: ShapeSpec, max_seq_len: int, device, dtype):
    """Random weights of the shape, made on the device in its dtype (no fp32 copy on the host)."""
    from executor.model import ModelConfig, Transformer
    s = spec.shape
    cfg = ModelConfig(vocab_size=s.vocab, n_layers=spec.layers, dim=s.hidden, n_heads=s.heads,
                      n_kv_heads=s.kv_heads, ffn_dim=s.ffn, max_seq_len=max_seq_len,
                      head_dim=s.hd if s.hd * s.heads != s.hidden else 0)
    torch.manual_seed(SEED)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model.to(dtype).eval()        # the rope tables too, as a checkpoint loaded in dtype has them


# --- predictions -------------------------------------------------------------------------------------

def roofline(shape: ModelShape, gpu: GPU, overrides: CostOverrides = CostOverrides()) -> RooflineCosts:
    kind = "nvswitch" if gpu.nvlink_gbps else "pcie-tree"
    topo = build_topology(TopologySpec(kind, default_topology_params(kind, gpu)), 2)
    return RooflineCosts(shape, gpu, topo, overrides)


def layer_bytes(shape: ModelShape, ctx: int) -> int:
    """What the roofline charges one layer at context ctx for: its weights + ctx cached K and V."""
    return shape.layer_bytes + ctx * shape.kv_bytes_per_token_layer()


def predict_ar(shape: ModelShape, gpu_name: str, gpu: GPU, in_catalog: bool, prompt: int, new: int,
               calibration: GpuCalibration | None = None) -> tuple[float, str]:
    """AR tokens/s of the whole shape on one GPU: the simulator's (spdsim.engine), or where SimPy is not
    installed the roofline's closed form (one full forward per token at its context), and which."""
    overrides = calibration.overrides(CostOverrides()) if calibration else CostOverrides()
    try:
        import yaml
        from spdsim.engine import simulate_point
        from spdsim.scenario import Point, parse_scenario
    except ImportError:
        costs = roofline(shape, gpu, overrides)
        t = statistics.fmean(costs.stage_s(0, 0, shape.layers, ctx, True, True) for ctx in range(prompt, prompt + new))
        return 1.0 / t, "closed form (no SimPy)"
    gpu_entry = gpu_name if in_catalog else {f.name: getattr(gpu, f.name) for f in dataclasses.fields(GPU)}
    model = {f.name: getattr(shape, f.name) for f in dataclasses.fields(ModelShape)}
    d = {"name": "gpu-check", "hardware": {"gpu": gpu_entry, "count": 1}, "model": model,
         "workload": {"prompt_tokens": prompt, "new_tokens": new},
         "sweep": {"stages": [1], "partition": ["uniform"], "acceptance": [0.5], "schemes": ["ar"]}}
    scen = parse_scenario(yaml.safe_dump(d))
    costs = calibration.cost_model(scen.model, scen.hardware, scen.costs, scen.head.layers) if calibration else None
    return simulate_point(scen, Point("ar", 1, "uniform", None), costs=costs).metrics.tokens_per_s, "simulator"


# --- the measurements --------------------------------------------------------------------------------

def check_shape(torch, spec: ShapeSpec, contexts: list[int], modes: list[str], args, device, dtype,
                timer: Timer, gpu: GPU, notes: list[str], rows: list[Row], points: list[dict],
                ar_rows: list[tuple], progress) -> None:
    """One shape's rows (appended to rows, points, ar_rows as they are measured: a failure later keeps
    them). A CUDA-graph failure is noted and drops "graphs" from `modes` for the rest of the run."""
    from executor.decode_step import capture_graph, make_decoder, run_layers
    s = spec.shape
    pred = roofline(s, gpu)
    max_seq = max(max(contexts), args.prompt_tokens + args.new_tokens)
    progress(f"{spec.label}: random weights")
    model = build_model(torch, spec, max_seq, device, dtype)
    model.setup_cache()
    g = torch.Generator(device=device).manual_seed(SEED)
    x = torch.randn(1, 1, s.hidden, device=device, dtype=dtype, generator=g) * 0.1
    pos = torch.zeros(1, dtype=torch.long, device=device)
    positions = torch.arange(max_seq, device=device)

    def graphs_failed(e: Exception, where: str) -> None:
        notes.append(f"CUDA graphs failed at {spec.label} {where} ({type(e).__name__}: {str(e)[:300]}): "
                     "eager only from there on")
        modes.remove("graphs")

    with torch.no_grad():
        for mode in list(modes):
            progress(f"{spec.label}: layer vs context ({mode})")
            where = "layers"
            try:
                for ctx in contexts:
                    pos.fill_(ctx - 1)                              # the token at ctx - 1 attends ctx positions
                    cos, sin = model.rope_cos.index_select(0, pos), model.rope_sin.index_select(0, pos)
                    fn = (lambda span=ctx, cos=cos, sin=sin:        # the layers alone: rope rows fixed per ctx
                          run_layers(model.layers, x, cos, sin, pos, positions, span))
                    call = capture_graph(fn).replay if mode == "graphs" else fn
                    t = timer.median_s(f"{spec.label}:layer:{mode}:{ctx}", call) / spec.layers
                    rows.append(Row(spec.label, f"layer_ms_{mode}", ctx, pred.layer_s(0, ctx) * 1e3, t * 1e3))
                    points.append({"mode": mode, "bytes": layer_bytes(s, ctx), "seconds": t, "shape": spec.label})
                progress(f"{spec.label}: embedding, LM head ({mode})")
                where = "embedding / LM head"
                tok = torch.ones(1, 1, dtype=torch.long, device=device)
                for metric, fn, p in (("embed_ms", lambda: model.tok_embeddings(tok), pred.embed_s()),
                                      ("lm_head_ms", lambda: model.output(model.norm(x)), pred.lm_head_s())):
                    call = capture_graph(fn).replay if mode == "graphs" else fn
                    t = timer.median_s(f"{spec.label}:{metric}:{mode}", call)
                    rows.append(Row(spec.label, f"{metric}_{mode}", None, p * 1e3, t * 1e3))
            except RuntimeError as e:
                if mode != "graphs":
                    raise
                graphs_failed(e, where)

        if spec.layers == s.layers:                                  # the whole model: AR decoding
            prompt = torch.randint(0, s.vocab, (args.prompt_tokens,),
                                   generator=torch.Generator().manual_seed(SEED)).tolist()
            tokens = {}
            for mode in list(modes):
                progress(f"{spec.label}: AR decode ({mode})")
                try:
                    dec = make_decoder(model, device, graphs=(mode == "graphs"))
                except RuntimeError as e:
                    if mode != "graphs":
                        raise
                    graphs_failed(e, "AR decoder capture")
                    continue
                n_steps = args.new_tokens - 1
                tokens[mode] = dec.generate(prompt, args.new_tokens)

                def decode():            # the decode steps after the prompt (prefill is eager either way)
                    dec.seek(args.prompt_tokens)
                    for _ in range(n_steps):
                        dec.step()

                t = timer.median_s(f"{spec.label}:ar:{mode}", decode) / n_steps
                ar_rows.append((spec, mode, 1.0 / t))
                del dec, decode
            ref = reference_tokens(torch, model, prompt, args.new_tokens, device)
            for mode, toks in tokens.items():
                same = sum(a == b for a, b in zip(toks, ref))
                notes.append(f"{spec.label}: the static step ({mode}) agrees with model.forward's cache path on "
                             f"{same}/{len(ref)} greedy tokens" + (" (bf16: a near-tie may flip)" if same < len(ref)
                                                                    and dtype != torch.float32 else ""))


def reference_tokens(torch, model, prompt: list[int], n: int, device) -> list[int]:
    """`executor.model.greedy_decode` on the device: the model's own cache path, token by token."""
    with torch.no_grad():
        model.setup_cache()
        logits = model(torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device))
        out = []
        for i in range(n):
            out.append(int(logits[0, -1].argmax()))
            if i + 1 < n:
                logits = model(torch.tensor([[out[-1]]], device=device),
                               torch.tensor([len(prompt) + i], device=device))
    return out


def _nccl_worker(rank: int, world: int, port: int, sizes: tuple[int, ...], out_path: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {"sendrecv": [], "allreduce": []}
    try:
        for nbytes in sizes:
            t = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
            if rank < 2:                     # ping-pong between GPU 0 and 1: one way = round trip / 2
                peer = 1 - rank
                for it in range(3 + repeats):
                    if it == 3:
                        torch.cuda.synchronize()
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                    if rank == 0:
                        dist.send(t, peer)
                        dist.recv(t, peer)
                    else:
                        dist.recv(t, peer)
                        dist.send(t, peer)
                b.record()
                torch.cuda.synchronize()
                res["sendrecv"].append({"bytes": nbytes, "seconds": a.elapsed_time(b) * 1e-3 / (2 * repeats)})
            dist.barrier()
            for _ in range(3):
                dist.all_reduce(t)
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(repeats):
                dist.all_reduce(t)
            b.record()
            torch.cuda.synchronize()
            res["allreduce"].append({"bytes": nbytes, "seconds": a.elapsed_time(b) * 1e-3 / repeats})
            dist.barrier()
        if rank == 0:
            Path(out_path).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def check_nccl(torch, gpu: GPU, out: Path, repeats: int, notes: list[str]) -> tuple[list[Row], dict]:
    """send/recv and all-reduce vs size over NCCL, one process per GPU (≥ 2 GPUs)."""
    import socket
    import torch.multiprocessing as mp
    world = min(torch.cuda.device_count(), 8)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = out / "nccl_raw.json"
    mp.spawn(_nccl_worker, args=(world, port, NCCL_SIZES, str(path), repeats), nprocs=world, join=True)
    res = json.loads(path.read_text())
    path.unlink()
    kind = "nvswitch" if gpu.nvlink_gbps else "pcie-tree"
    topo = build_topology(TopologySpec(kind, default_topology_params(kind, gpu)), world)
    lat, bw = gpu.link_latency_us * 1e-6, (gpu.nvlink_gbps or gpu.pcie_gbps) * 1e9
    rows = []
    for r in res["sendrecv"]:
        rows.append(Row("nccl", "sendrecv_us", r["bytes"], topo.transfer_s("gpu0", "gpu1", r["bytes"]) * 1e6,
                        r["seconds"] * 1e6))
    for r in res["allreduce"]:
        # a ring all-reduce over the catalog link: 2(t−1) steps of latency + (bytes / t) / bandwidth
        steps = 2 * (world - 1)
        rows.append(Row(f"nccl/{world}-gpu", "allreduce_us", r["bytes"],
                        steps * (lat + r["bytes"] / world / bw) * 1e6, r["seconds"] * 1e6))
    fits = {}
    for key in ("sendrecv", "allreduce"):
        try:
            fits[key] = fit_link([r["bytes"] for r in res[key]], [r["seconds"] for r in res[key]])
        except ValueError as e:
            notes.append(f"nccl {key}: no fit ({e})")
    notes.append(f"nccl: {world} GPUs; all-reduce predicted by an inline ring model over the catalog link "
                 "(the simulator's tensor-parallel all-reduce model is not on this branch)")
    return rows, fits


# --- the run -----------------------------------------------------------------------------------------

def rel_rms(pairs: list[tuple[float, float]]) -> float:
    r = [(p - m) / m for p, m in pairs if m > 0]
    return 100.0 * math.sqrt(sum(x * x for x in r) / len(r)) if r else float("nan")


def print_table(rows: list[Row]) -> None:
    print("| shape | metric | context | predicted | measured | error % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ctx = "" if r.context is None else r.context
        print(f"| {r.shape} | {r.metric} | {ctx} | {r.predicted:.4g} | {r.measured:.4g} | {r.error_pct:+.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="docs: docs/gpu.md")
    ap.add_argument("--device", choices=("cuda", "cpu"), required=True)
    ap.add_argument("--out", required=True, help="directory for gpu_check.csv, gpu_check.json and <gpu>.yaml")
    ap.add_argument("--shapes", default=None, help="comma list of catalog shapes, NAME:L for L layers of one "
                    "(default cuda: llama-3-8b,qwen3.5-4b,llama-2-70b:1; cpu: tiny)")
    ap.add_argument("--contexts", default=None, help="context lengths for the layer rows (default cuda: "
                    "1,128,512,1024,2048,4096; cpu: 1,128,512,1024)")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="time budget of the whole run (cuda 420, cpu 90)")
    ap.add_argument("--repeats", type=int, default=30, help="most samples per measurement")
    ap.add_argument("--min-repeats", type=int, default=3, help="fewest samples per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="weights (default cuda bf16, cpu fp32)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (--device cpu)")
    ap.add_argument("--no-graphs", action="store_true", help="eager only (on CUDA)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    t_start = time.monotonic()
    dflt = DEFAULTS[args.device]
    for k in ("shapes", "contexts", "prompt_tokens", "new_tokens", "budget_s", "dtype"):
        if getattr(args, k) is None:
            setattr(args, k, dflt[k])
    try:
        contexts = sorted({int(c) for c in args.contexts.split(",") if c.strip()})
    except ValueError:
        raise UserError(f"--contexts: expected integers, got {args.contexts!r}") from None
    if not contexts or contexts[0] < 1:
        raise UserError("--contexts: need context lengths ≥ 1")
    if args.prompt_tokens < 1 or args.new_tokens < 2:
        raise UserError("--prompt-tokens must be ≥ 1 and --new-tokens ≥ 2")
    if args.min_repeats < 1 or args.repeats < args.min_repeats:
        raise UserError("--repeats must be ≥ --min-repeats ≥ 1")
    import torch
    from tqdm import tqdm
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch")
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    shapes = parse_shapes(args.shapes, dtype_bytes)
    from executor.decode_step import can_capture
    modes = ["graphs", "eager"] if can_capture(device) and not args.no_graphs else ["eager"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if device.type == "cpu":
        notes.append(f"cpu: weights {args.dtype}" + ("" if "graphs" in modes else
                     "; CUDA graphs are CUDA only: eager rows alone"))
    budget = Budget(args.budget_s, dflt["max_s"])
    timer = Timer(torch, device, budget, args.warmup, args.min_repeats, args.repeats)
    n_phases = 1 + sum(1 + 2 * len(modes) + (len(modes) if s.layers == s.shape.layers else 0) for s in shapes)
    multi_gpu = device.type == "cuda" and torch.cuda.device_count() >= 2
    n_phases += 1 if multi_gpu else 0
    bar = tqdm(total=n_phases, unit="phase", file=sys.stderr, mininterval=0, dynamic_ncols=True)

    def progress(what: str) -> None:
        bar.set_description_str(f"gpu_check {time.monotonic() - t_start:5.0f}s {what}")
        bar.update(1)

    progress("ceilings: copy, matmul")
    ceilings = measure_ceilings(torch, device, dtype, timer)
    gpu_name, gpu, in_catalog, dev_name = device_gpu(torch, device, ceilings)
    if not in_catalog:
        notes.append(f"{dev_name!r} is not in the simulator's catalog: predicted with inline numbers, "
                     f"hbm_gbps {gpu.hbm_gbps:g} and bf16_tflops {gpu.bf16_tflops:g} as measured here "
                     "(copy and matmul), not a datasheet")
    rows = [Row("-", "copy_gbps", None, gpu.hbm_gbps, ceilings["copy_gbps"]),
            Row("-", "matmul_tflops", None, gpu.bf16_tflops, ceilings["matmul_tflops"])]
    points: list[dict] = []
    ar_rows: list[tuple] = []
    link_fits: dict = {}
    failed = None
    try:
        for spec in shapes:
            check_shape(torch, spec, contexts, modes, args, device, dtype, timer, gpu, notes, rows, points,
                        ar_rows, progress)
            if device.type == "cuda":
                torch.cuda.empty_cache()     # the shape's weights and graphs went with check_shape's frame
        if multi_gpu:
            progress("nccl: send/recv, all-reduce")
            try:
                r, link_fits = check_nccl(torch, gpu, out, max(args.min_repeats, 20), notes)
                rows += r
            except Exception as e:           # noqa: BLE001 - spawned NCCL workers: keep the rest of the check
                notes.append(f"nccl: failed ({type(e).__name__}: {str(e)[:300]}): no link rows")
        elif device.type == "cuda":
            notes.append("nccl: one GPU visible: send/recv and all-reduce skipped")
    except Exception as e:                   # noqa: BLE001 - write what was measured, then fail
        failed = e
        notes.append(f"stopped early ({type(e).__name__}: {str(e)[:300]}): the files hold what was measured")
    bar.close()

    # the fit: the roofline's parameters from the layer rows, per mode
    fits: dict[str, RooflineFit] = {}
    default_err: dict[str, float] = {}
    for mode in modes:
        pts = [q for q in points if q["mode"] == mode]
        try:
            fits[mode] = fit_roofline([q["bytes"] for q in pts], [q["seconds"] for q in pts], gpu.hbm_gbps,
                                      fallback_efficiency=HBM_EFFICIENCY)
            if fits[mode].note:
                notes.append(f"fit {mode}: {fits[mode].note}")
        except ValueError as e:
            notes.append(f"fit {mode}: none ({e})")
        default_err[mode] = rel_rms([(r.predicted, r.measured) for r in rows if r.metric == f"layer_ms_{mode}"])
    cal = None
    if fits:
        mode = "graphs" if "graphs" in fits else next(iter(fits))
        cal = GpuCalibration(
            gpu=gpu_name, gpu_spec=gpu, mode=mode, fits=fits, link=link_fits.get("sendrecv"),
            allreduce=link_fits.get("allreduce"),
            source={"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
                    "device_name": dev_name, "in_catalog": in_catalog, "torch": str(torch.__version__),
                    "cuda": getattr(torch.version, "cuda", None), "dtype": args.dtype,
                    "shapes": [s.label for s in shapes], "contexts": contexts,
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "catalog_roofline_error_pct": default_err,
                    "measured_ceilings": ceilings})
        write_gpu_calibration(cal, out / f"{gpu_name}.yaml")

    # AR: the catalog roofline's prediction, and the fitted one's (out of sample: the fit saw layers only)
    how = set()
    for spec, mode, measured in ar_rows:
        p, h = predict_ar(spec.shape, gpu_name, gpu, in_catalog, args.prompt_tokens, args.new_tokens)
        how.add(h)
        rows.append(Row(spec.label, f"ar_tokens_per_s_{mode}", None, p, measured))
        if cal and mode in cal.fits:
            pf, _ = predict_ar(spec.shape, gpu_name, gpu, in_catalog, args.prompt_tokens, args.new_tokens,
                               dataclasses.replace(cal, mode=mode))
            rows.append(Row(spec.label, f"ar_tokens_per_s_{mode}_fitted", None, pf, measured))
    if how:
        notes.append(f"AR predicted by: {', '.join(sorted(how))}; prompt {args.prompt_tokens}, "
                     f"{args.new_tokens} new tokens")
    if budget.over_at:
        notes.append(f"time budget of {args.budget_s:g} s spent at {budget.over_at}: later measurements took "
                     f"the minimum {args.min_repeats} samples")

    with open(out / "gpu_check.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r.csv())
    elapsed = time.monotonic() - t_start
    (out / "gpu_check.json").write_text(json.dumps({
        "device": args.device, "device_name": dev_name, "gpu": gpu_name, "in_catalog": in_catalog,
        "gpu_spec": dataclasses.asdict(gpu), "ceilings": ceilings, "elapsed_s": elapsed, "notes": notes,
        "rows": [dataclasses.asdict(r) | {"error_pct": r.error_pct} for r in rows],
        "fits": {k: v.to_dict() for k, v in fits.items()}, "catalog_roofline_error_pct": default_err,
        "link_fits": {k: v.to_dict() for k, v in link_fits.items()}, "samples_s": timer.samples}, indent=1))

    print(f"# gpu_check: {dev_name} → {gpu_name}{'' if in_catalog else ' (not in the catalog)'}, {args.dtype}, "
          f"torch {torch.__version__}, {elapsed:.0f} s")
    print_table(rows)
    for mode, f in fits.items():
        print(f"fit {mode}: hbm_efficiency {f.hbm_efficiency:.3f}, layer_overhead_us {f.layer_overhead_us:.1f} "
              f"(layer rows: fit error {f.fit_error_pct:.1f}% rms; catalog roofline {default_err[mode]:.1f}% rms)")
    for k, v in link_fits.items():
        print(f"fit {k}: latency {v.latency_us:.1f} us, {v.gbps:.1f} GB/s (error {v.fit_error_pct:.1f}% rms)")
    for n in notes:
        print(f"note: {n}")
    if cal:
        print(f"calibration: {out / (gpu_name + '.yaml')} (scenario: hardware.gpu: {gpu_name}, "
              f"calibration: {out / (gpu_name + '.yaml')})")
    print(f"wrote {out / 'gpu_check.csv'}")
    if failed is not None:
        raise failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
