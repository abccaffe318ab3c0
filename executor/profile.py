"""`executor profile`: the measurements `spdsim calibrate` fits the simulator's cost model to.

Writes into TRACE_DIR:
  profile.json   microbenchmarks, each a median over `repeats` timed calls after `warmup` untimed ones:
                   layers    one decoder layer's decode step (one token) against context length, per layer
                   embed     the embedding of one token
                   lm_head   final norm + LM head of one position
                   prefill   a serving request's prompt chunk: one layer's forward over T positions
                             0..T-1 against T (median over layers), and the chunk's embedding
                   link      point-to-point message time against size for each device pair used: the
                             sender's blocking send, and half the round trip (one-way delivery) of a
                             ping-pong between two ranks over the same transport the runs use
                 with --tp T (T > 1), on one TP group of T ranks over the runs' transport
                 (executor/collective_bench.py; sizes in bytes of the fp32 tensor, medians in seconds):
                   allreduce {"tp", "transport", "algorithm", "sizes", "seconds", "samples_s"}: the sum
                             of one tensor of `size` bytes over the group (a TP layer does two per token,
                             of one hidden state: dim × 4 bytes)
                   allgather the same keys; `size` is the gathered row (each rank gives size / T): the
                             vocab-parallel LM head's logits row, vocab × 4 bytes
  runs/<name>/   full AR / PP / SPD decode traces (spdsim.trace schema, one file per rank) from
                 `executor run`'s launcher, on the calibration prompt; `repeat` decodes per run in the
                 same processes, the trace is the last one's (the first ones warm up).
  runs_tp/<name>/  with --tp T: the same for AR on one TP group (ar-n1-tp<T>) and PP / SPD on T × 2 ranks
                 where this host allows them (the trace header's `tp` says T). Kept apart from runs/, so a
                 calibration that does not model TP yet never fits TP traces as if they were TP = 1.
The calibration prompt differs from `executor validate`'s measurement prompt: a calibration is never fitted
to the very runs it then predicts (issue 6, honesty rule).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from spdsim.errors import UserError

# The calibration prompt: not the validation prompt (executor.validate.VALIDATION_PROMPT).
CALIBRATION_PROMPT = "class Queue:\n    def __init__(self, maxsize=0):\n        self.maxsize = "
MESSAGE_SIZES = (0, 256, 1024, 4096, 16384, 65536, 262144)   # tensor payload bytes (a header comes on top)


@dataclass
class ProfileConfig:
    model: str                       # checkpoint path
    stages: int = 2
    device: str = "cpu"
    repeats: int = 7                 # timed calls per microbenchmark (median)
    warmup: int = 2                  # untimed calls first
    contexts: list[int] | None = None   # context lengths for the layer sweep (default: spread up to the limit)
    sizes: tuple[int, ...] = MESSAGE_SIZES
    new_tokens: int = 32             # per run trace
    run_repeat: int = 2              # decodes per run (the trace is the last one's)
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.8])   # oracle SPD runs
    head: str | None = None          # a trained speculative module (head:PATH run) if given
    prompt: str = CALIBRATION_PROMPT
    threads: int = 1
    links: bool = True
    runs: bool = True
    tp: int = 1                      # > 1: the all-reduce / all-gather microbenchmark and TP run traces


def _median_s(fn, repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) * 1e-9)
    return statistics.median(samples), samples


def default_contexts(max_seq_len: int) -> list[int]:
    """A few context lengths up to the model's limit (1 and the limit itself included)."""
    pts = {1, max_seq_len}
    c = 16
    while c < max_seq_len:
        pts.add(c)
        c *= 4
    pts.add(max_seq_len // 2)
    return sorted(pts)


def compute_benchmarks(cfg: ProfileConfig) -> dict:
    """Per-layer decode time vs context, embedding, final norm + LM head (one process, one thread)."""
    import torch
    from executor.checkpoints import load_checkpoint
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model = load_checkpoint(cfg.model).to(device).eval()
    mc = model.cfg
    contexts = cfg.contexts or default_contexts(mc.max_seq_len)
    if max(contexts) > mc.max_seq_len or min(contexts) < 1:
        raise UserError(f"profile contexts must be in [1, {mc.max_seq_len}]")
    model.setup_cache()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(1, 1, mc.dim, device=device)
    # Each timed pass runs every layer in order, as a decode step does (a layer timed alone in a hot loop
    # finds its weights in cache), and the passes go round-robin over the contexts so that warm-up and
    # slow spells hit every context alike (measured one context after another, the slope came out 0).
    samples: dict[tuple[int, int], list[float]] = {(i, c): [] for c in contexts for i in range(mc.n_layers)}
    with torch.no_grad():
        for rep in range(cfg.warmup + cfg.repeats):
            for ctx in contexts[rep % len(contexts):] + contexts[:rep % len(contexts)]:
                pos = torch.tensor([ctx - 1], device=device)     # attends to ctx cached positions
                cos, sin = model.rope_cos[pos], model.rope_sin[pos]
                h = x
                for i, layer in enumerate(model.layers):
                    t0 = time.perf_counter_ns()
                    h = layer(h, cos, sin, pos)
                    sync()
                    if rep >= cfg.warmup:
                        samples[(i, ctx)].append((time.perf_counter_ns() - t0) * 1e-9)
        tok = torch.tensor([[1]], device=device)
        embed, _ = _median_s(lambda: (model.tok_embeddings(tok), sync()), cfg.repeats, cfg.warmup)
        lm_head, _ = _median_s(lambda: (model.output(model.norm(x)), sync()), cfg.repeats, cfg.warmup)
        prefill = prefill_benchmarks(model, cfg, sync)
    layers = [{"layer": i, "ctx": c, "median_s": statistics.median(v), "samples_s": v} for (i, c), v in samples.items()]
    return {"model": {"layers": mc.n_layers, "dim": mc.dim, "ffn": mc.ffn_dim, "heads": mc.n_heads,
                      "kv_heads": mc.n_kv_heads, "vocab": mc.vocab_size, "max_seq_len": mc.max_seq_len,
                      "dtype_bytes": next(model.parameters()).element_size()},
            "contexts": contexts, "layers": layers, "embed_s": embed, "lm_head_s": lm_head, "prefill": prefill}


def prefill_sizes(max_seq_len: int) -> list[int]:
    """Prompt chunk lengths of the prefill sweep: 4 × 4^k below the model's context (serving's prompts)."""
    out, t = [], 4
    while t < max_seq_len:
        out.append(t)
        t *= 4
    return out or [max(1, max_seq_len - 1)]


def prefill_benchmarks(model, cfg: ProfileConfig, sync) -> list[dict]:
    """Per-layer time of a prefill chunk (a serving request's prompt: positions 0..T-1 in one forward,
    executor/serving.py) against T, the median over every layer and repeat; plus the chunk's embedding
    on the first stage. Round-robin over the sizes, as the decode sweep goes over the contexts."""
    import torch
    device = next(model.parameters()).device
    sizes = prefill_sizes(model.cfg.max_seq_len)
    per: dict[int, list[float]] = {t: [] for t in sizes}
    emb: dict[int, list[float]] = {t: [] for t in sizes}
    for rep in range(cfg.warmup + cfg.repeats):
        for t in sizes[rep % len(sizes):] + sizes[:rep % len(sizes)]:
            pos = torch.arange(t, device=device)
            cos, sin = model.rope_cos[pos], model.rope_sin[pos]
            ids = torch.ones(1, t, dtype=torch.long, device=device)
            t0 = time.perf_counter_ns()
            h = model.tok_embeddings(ids)
            sync()
            if rep >= cfg.warmup:
                emb[t].append((time.perf_counter_ns() - t0) * 1e-9)
            for layer in model.layers:
                t0 = time.perf_counter_ns()
                h = layer(h, cos, sin, pos)
                sync()
                if rep >= cfg.warmup:
                    per[t].append((time.perf_counter_ns() - t0) * 1e-9)
    return [{"tokens": t, "median_s": statistics.median(per[t]), "embed_s": statistics.median(emb[t])}
            for t in sizes]


# --- links: a ping-pong between two ranks over the runs' transport ---------------------------------

def _link_rank(rank: int, port: int, kind: str, device: str, sizes: tuple[int, ...], repeats: int,
               warmup: int) -> list[dict]:
    """One side of the ping-pong: rank 0 sends and times, rank 1 echoes. Returns rank 0's medians."""
    import torch
    from executor.transport import ACT, Message, connect_on_port
    dev = torch.device(device)
    tr = connect_on_port(kind, rank, 2, dev, port)
    out = []
    try:
        for size in sizes:
            t = torch.zeros(1, max(size // 4, 0), device=dev)
            msg = Message(ACT, tensor=t if size else None)
            sends, rtts = [], []
            for i in range(warmup + repeats):
                if rank == 0:
                    t0 = time.perf_counter_ns()
                    tr.send(1, msg)
                    t1 = time.perf_counter_ns()
                    tr.recv([1], 60)
                    t2 = time.perf_counter_ns()
                    if i >= warmup:
                        sends.append((t1 - t0) * 1e-9)
                        rtts.append((t2 - t0) * 1e-9)
                else:
                    _, m = tr.recv([0], 60)
                    tr.send(0, m)
            if rank == 0:
                out.append({"src": "rank0", "dst": "rank1", "bytes": msg.nbytes,
                            "send_s": statistics.median(sends), "one_way_s": statistics.median(rtts) / 2,
                            "samples_one_way_s": [r / 2 for r in rtts]})
    finally:
        tr.close()
    return out


def link_benchmarks(cfg: ProfileConfig, transport: str) -> list[dict]:
    """Message time against size between two ranks (every pair is the same loopback link on one host).
    Rank 0 is this process (torch already loaded), rank 1 one spawned process."""
    from executor.runner import _free_port
    port = _free_port()
    args = (port, transport, cfg.device, cfg.sizes, cfg.repeats * 3, cfg.warmup)
    peer = mp.get_context("spawn").Process(target=_link_rank, args=(1, *args))
    peer.start()
    try:
        return _link_rank(0, *args)
    finally:
        peer.join(timeout=30)
        if peer.is_alive():
            peer.kill()
            peer.join()


# --- full runs ---------------------------------------------------------------------------------------

def run_configs(cfg: ProfileConfig) -> list[tuple[str, int, str, str | None]]:
    """(name, stages, scheme, draft): AR on one rank, PP and SPD on 2..stages ranks."""
    out = [("ar-n1", 1, "ar", None)]
    for n in range(2, cfg.stages + 1):
        out.append((f"pp-n{n}", n, "pp", None))
        out += [(f"spd-n{n}-a{a:g}", n, "spd", f"oracle:{a:g}") for a in cfg.alphas]
        if cfg.head:
            out.append((f"spd-n{n}-head", n, "spd", f"head:{cfg.head}"))
    return out


def tp_run_configs(cfg: ProfileConfig, max_ranks: int) -> list[tuple[str, int, str, str | None]]:
    """The TP runs: AR on one TP group; PP and SPD on T × 2 ranks when the host allows that many."""
    t = cfg.tp
    out = [(f"ar-n1-tp{t}", 1, "ar", None)]
    if cfg.stages >= 2 and 2 * t <= max_ranks:
        out.append((f"pp-n2-tp{t}", 2, "pp", None))
        out += [(f"spd-n2-tp{t}-a{a:g}", 2, "spd", f"oracle:{a:g}") for a in cfg.alphas]
    return out


def run_traces(cfg: ProfileConfig, out_dir: Path, log=print, tp: int = 1) -> list[dict]:
    from executor.runner import RANKS_PER_CORE, RunSpec, launch
    prompt = list(cfg.prompt.encode("utf-8"))
    summaries = []
    if tp == 1:
        configs, where = run_configs(cfg), "runs"
    else:
        configs, where = tp_run_configs(cfg, RANKS_PER_CORE * (os.cpu_count() or 1) if cfg.device == "cpu"
                                        else _gpus()), "runs_tp"
    for name, n, scheme, draft in configs:
        jobs = [{"scheme": scheme, "prompt": prompt, "new_tokens": cfg.new_tokens, "draft": draft, "seed": 100 + i}
                for i in range(cfg.run_repeat)]
        spec = RunSpec(model=cfg.model, stages=n, jobs=jobs, device=cfg.device, threads=cfg.threads, tp=tp,
                       trace_dir=str(out_dir / where / name), model_label=Path(cfg.model).name)
        t0 = time.time()
        res = launch(spec)
        last = res[-1]
        log(f"profile: run {name}: {last['tokens_per_s']:.1f} tok/s, bubble {last['bubble_ratio']:.3f} "
            f"({time.time() - t0:.0f} s)")
        summaries.append({"name": name, "stages": n, "scheme": scheme, "draft": draft, "tp": tp,
                          "tokens_per_s": [r["tokens_per_s"] for r in res],
                          "bubble_ratio": [r["bubble_ratio"] for r in res]})
    return summaries


def _gpus() -> int:
    import torch
    return torch.cuda.device_count()


def collective_profile(cfg: ProfileConfig, transport: str) -> dict:
    """profile.json's "allreduce" and "allgather" keys, over the transport (and algorithm) the runs use."""
    from executor.collective_bench import collective_benchmarks
    from executor.runner import RunSpec
    algorithm = RunSpec.allreduce if transport == "local" else f"{transport}-{'nccl' if cfg.device == 'cuda' else 'gloo'}"
    res = collective_benchmarks(cfg.tp, transport, cfg.device, repeats=cfg.repeats * 3, warmup=cfg.warmup,
                                algorithms=(RunSpec.allreduce,))
    out = {}
    for op in ("allreduce", "allgather"):
        (rows,) = res[op].values()
        out[op] = {"tp": cfg.tp, "transport": transport, "algorithm": algorithm if op == "allreduce" else
                   ("direct" if transport == "local" else algorithm), **rows}
    return out


def profile(cfg: ProfileConfig, out_dir: Path, log=print) -> Path:
    """Run every measurement; returns the path of profile.json."""
    from executor.runner import model_shape
    shape = model_shape(Path(cfg.model))
    if not 1 <= cfg.stages <= shape["n_layers"]:
        raise UserError(f"--stages {cfg.stages}: must be between 1 and the model's {shape['n_layers']} layers")
    if cfg.device not in ("cpu", "cuda"):
        raise UserError(f"--device {cfg.device!r}: expected cpu or cuda")
    if cfg.tp > 1:
        from executor.runner import RunSpec, check_ranks
        check_ranks(RunSpec(model=cfg.model, stages=1, jobs=[], tp=cfg.tp, device=cfg.device), shape)
    elif cfg.tp < 1:
        raise UserError(f"--tp must be ≥ 1, got {cfg.tp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = compute_benchmarks(cfg)
    log(f"profile: layers × {len(data['contexts'])} contexts, embedding, LM head ({time.time() - t0:.0f} s)")
    transport = "local" if cfg.device == "cpu" else "dist"
    data.update(device=cfg.device, threads=cfg.threads, transport=transport, cpu_count=os.cpu_count(),
                load_avg=os.getloadavg()[0], model_path=str(cfg.model), prompt_tokens=len(cfg.prompt.encode()),
                link=[], runs=[])
    if cfg.links and cfg.stages > 1:
        t0 = time.time()
        data["link"] = link_benchmarks(cfg, transport)
        log(f"profile: link rank0 <-> rank1 ({transport}), {len(cfg.sizes)} sizes ({time.time() - t0:.0f} s)")
    if cfg.tp > 1:
        t0 = time.time()
        data.update(collective_profile(cfg, transport))
        log(f"profile: all-reduce and all-gather on {cfg.tp} ranks ({transport}), "
            f"{len(data['allreduce']['sizes'])} sizes ({time.time() - t0:.0f} s)")
    if cfg.runs:
        data["runs"] = run_traces(cfg, out_dir, log)
        if cfg.tp > 1:
            data["runs_tp"] = run_traces(cfg, out_dir, log, tp=cfg.tp)
    path = out_dir / "profile.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def profile_command(args) -> int:
    from executor.runner import resolve_model
    model = str(resolve_model(args.model))
    if args.repeats < 1 or args.new_tokens < 1:
        raise UserError("--repeats and --new-tokens must be ≥ 1")
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else None
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else []
    if any(not 0 <= a <= 1 for a in alphas):
        raise UserError("--alphas: each α must be in [0, 1]")
    cfg = ProfileConfig(model=model, stages=args.stages, device=args.device, repeats=args.repeats,
                        contexts=contexts, new_tokens=args.new_tokens, alphas=alphas, head=args.head,
                        threads=args.threads, tp=args.tp)
    path = profile(cfg, Path(args.out))
    print(f"wrote {path} and {Path(args.out) / 'runs'}/ (calibrate with: spdsim calibrate {args.out} --out CALIB.yaml)")
    return 0
