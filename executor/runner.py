"""`executor run`: validate the options, start one process per stage (or join torchrun's), run the jobs
through executor/pipeline.py, and turn rank 0's merged trace into the DESIGN §3 figures.

Launch modes:
  * `executor run --stages N` on one machine: this process picks a free port, spawns N ranks
    (`python -m executor.runner SPEC RESULT` with torchrun's environment variables) and watches them:
    when one dies the others exit on their own within seconds (their receives fail or time out); a
    straggler is killed after 30 s. Ctrl-C stops them all.
  * under torchrun (RANK / WORLD_SIZE set): this process is one rank; rank 0 prints the results.
  * --stages 1: everything in this process, no transport.
  * --scheme spd_dedicated: n + 1 ranks (rank 0 without layers, executor/dedicated.py).
  * --tp T: T ranks per stage (tensor parallel, executor/tp.py): T × N ranks (+ 1 under spd_dedicated),
    numbered by executor/ranks.py; each TP rank loads only its shard of its stage.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from spdsim.errors import UserError

DEFAULT_TINY = Path(__file__).parent / "weights" / "tiny.safetensors"
DEFAULT_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
SCHEMES = ("ar", "pp", "spd", "spd_dedicated")
TRANSPORTS = ("auto", "local", "dist")
# CPU: at most this many ranks per core. Each rank is a process with its own torch threads; further
# past one per core every forward waits for a time slice, a decode crawls and the ranks' receive
# timeouts start to fire on a loaded machine. 4 × leaves the tests' 4 ranks on 2 cores (slow, correct)
# and refuses what could only time out.
RANKS_PER_CORE = 4


@dataclass
class RunSpec:
    model: str                      # a checkpoint path (ours) or a HF directory
    stages: int
    jobs: list[dict]                # executor.pipeline.Job fields
    tp: int = 1                     # ranks per stage (tensor parallel)
    allreduce: str = "direct"       # the socket transport's all-reduce (transport.ALLREDUCE_ALGORITHMS)
    device: str = "cpu"
    transport: str = "auto"
    threads: int = 1
    timeout: float = 20.0           # a receive during a job; between jobs: idle_timeout
    idle_timeout: float = 600.0
    trace_dir: str | None = None
    model_label: str = ""
    verbose: bool = False
    trace_each: bool = False        # every job's trace, under trace_dir/job<i>/ (executor validate)
    pin: bool = False               # one core per rank when ranks ≤ cores (executor/affinity.py)


# --- validation (in the launching process, before any rank starts) -------------------------------

def resolve_model(name: str) -> Path:
    if name == "tiny":
        if not DEFAULT_TINY.exists():
            raise UserError(f"the tiny model is not trained yet ({DEFAULT_TINY} missing): run `executor train-lm`")
        return DEFAULT_TINY
    path = Path(name)
    if not path.exists():
        raise UserError(f"--model {name}: no such file or directory")
    return path


def model_shape(path: Path) -> dict:
    """n_layers, vocab_size, max_seq_len, heads, KV heads and ffn_dim of a checkpoint, from its config only
    (no weights loaded)."""
    try:
        if path.is_dir():
            from executor.hf_loader import hf_config
            cfg = hf_config(json.loads((path / "config.json").read_text()))
        else:
            from executor.model import ModelConfig
            cfg = ModelConfig.from_json(json.loads(Path(str(path) + ".json").read_text())["config"])
    except FileNotFoundError as e:
        raise UserError(f"--model {path}: not a checkpoint ({e.filename} missing)") from None
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"--model {path}: unreadable config ({e})") from None
    return {"n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
            "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim}


def check_ranks(spec: RunSpec, shape: dict) -> None:
    """--tp against the model (heads, KV heads, ffn, vocab must split) and the ranks against the device:
    on CPU at most RANKS_PER_CORE per core; on CUDA one GPU per rank (NCCL refuses two ranks of one
    communicator on one device; only --transport local can share a GPU)."""
    from executor.tp import tp_problem
    if not isinstance(spec.tp, int) or spec.tp < 1:
        raise UserError(f"--tp must be ≥ 1, got {spec.tp}")
    problem = tp_problem(shape["n_heads"], shape["n_kv_heads"], shape["ffn_dim"], shape["vocab_size"], spec.tp)
    if problem:
        raise UserError(f"--tp {spec.tp}: {problem}")
    from executor.transport import ALLREDUCE_ALGORITHMS
    if spec.allreduce not in ALLREDUCE_ALGORITHMS:
        raise UserError(f"--allreduce {spec.allreduce!r}: expected one of {ALLREDUCE_ALGORITHMS}")
    world = world_of(spec)
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world))     # ranks on this host (torchrun: its share)
    what = (f"--tp {spec.tp} × --stages {spec.stages}" + (" + 1 (spd_dedicated)" if dedicated(spec) else "")
            + f" = {world} ranks")
    if spec.device == "cpu":
        cores = os.cpu_count() or 1
        if here > RANKS_PER_CORE * cores:
            raise UserError(f"{what}: more than {RANKS_PER_CORE} per core on this host's {cores} cores "
                            f"(lower --tp or --stages)")
    elif spec.device == "cuda" and pick_transport(spec, world) != "local":
        import torch
        gpus = torch.cuda.device_count()
        if here > gpus:
            raise UserError(f"{what}: more than the {gpus} visible GPU(s) (one GPU per rank; lower --tp or "
                            f"--stages)")


def validate(spec: RunSpec) -> None:
    from executor.drafters import parse_draft
    shape = model_shape(Path(spec.model))
    if spec.stages < 1:
        raise UserError(f"--stages must be ≥ 1, got {spec.stages}")
    if spec.stages > shape["n_layers"]:
        raise UserError(f"--stages {spec.stages} > the model's {shape['n_layers']} layers")
    if spec.transport not in TRANSPORTS:
        raise UserError(f"--transport {spec.transport!r}: expected one of {TRANSPORTS}")
    if spec.device not in ("cpu", "cuda"):
        raise UserError(f"--device {spec.device!r}: expected cpu or cuda")
    if spec.threads < 1:
        raise UserError("--threads must be ≥ 1")
    check_ranks(spec, shape)
    for job in spec.jobs:
        if job.get("serving"):
            check_serving(job, shape)
        if job["scheme"] not in SCHEMES:
            raise UserError(f"--scheme {job['scheme']!r}: expected one of {SCHEMES}")
        if job["scheme"] == "ar" and spec.stages != 1:
            raise UserError("--scheme ar runs on one process: use --stages 1")
        if job["scheme"] == "spd" and spec.stages > 1 and not job.get("draft"):
            raise UserError("--scheme spd needs --draft oracle:ALPHA or --draft head:PATH")
        if job.get("draft") and job["scheme"] not in ("spd", "spd_dedicated"):
            raise UserError("--draft applies to --scheme spd only (and spd_dedicated)")
        if dedicated(spec) and job["scheme"] != "spd_dedicated":
            raise UserError("--scheme spd_dedicated cannot share a run with other schemes")
        if job["scheme"] == "spd_dedicated":
            kind = (job.get("draft") or "").partition(":")[0]
            if spec.stages > 1 and kind != "oracle":
                raise UserError("--scheme spd_dedicated runs the oracle drafter only: use --draft oracle:ALPHA "
                                "(head:PATH is not supported in this layout yet)")
        parse_draft(job.get("draft"))
        check_temperature(job)
        check_prompt(job["prompt"], job["new_tokens"], shape)


def check_prompt(prompt: list[int], new_tokens: int, shape: dict, what: str = "the prompt") -> None:
    if new_tokens < 1:
        raise UserError("--new-tokens must be ≥ 1")
    if len(prompt) < 2:
        raise UserError(f"{what} needs at least 2 tokens")
    if any(not 0 <= t < shape["vocab_size"] for t in prompt):
        raise UserError(f"{what} has token ids outside the model's vocabulary ({shape['vocab_size']})")
    if len(prompt) + new_tokens > shape["max_seq_len"]:
        raise UserError(f"{what} ({len(prompt)}) + new tokens ({new_tokens}) exceed the "
                        f"model's context ({shape['max_seq_len']})")


def check_serving(job: dict, shape: dict) -> None:
    """--requests / --concurrency / --policy / --threshold and each request's prompt (executor/serving.py)."""
    from executor.serving import POLICIES
    sv = job["serving"]
    reqs = sv.get("requests") or []
    if not reqs:
        raise UserError("--requests must be ≥ 1")
    c = sv.get("concurrency", 1)
    if not isinstance(c, int) or c < 1:
        raise UserError(f"--concurrency must be ≥ 1, got {c}")
    if sv.get("policy", "fcfs") not in POLICIES:
        raise UserError(f"--policy {sv.get('policy')!r}: expected one of {', '.join(POLICIES)}")
    t = sv.get("threshold", 0.5)
    if not isinstance(t, (int, float)) or not 0 <= t <= 1:
        raise UserError(f"--threshold must be in [0, 1], got {t}")
    if job["scheme"] == "spd_dedicated":
        raise UserError("--requests: serving runs the co-located layout (--scheme ar, pp or spd), not spd_dedicated")
    if job.get("temperature", 0.0):
        raise UserError("--requests: serving decodes greedily only (use --temperature 0)")
    if sv.get("policy") == "adaptive":
        kind = (job.get("draft") or "").partition(":")[0]
        if job["scheme"] != "spd" or kind == "oracle":
            raise UserError("--policy adaptive thresholds the trained module's confidence (its top probability); "
                            "the oracle drafter has none: use --scheme spd --draft head:PATH")
    for i, r in enumerate(reqs):
        check_prompt(list(r["prompt"]), int(r["new_tokens"]), shape, what=f"request {i}'s prompt")
        if not r.get("arrival_s", 0.0) >= 0:
            raise UserError(f"request {i}: arrival time {r.get('arrival_s')} is not ≥ 0")


def check_temperature(job: dict) -> None:
    """--temperature: finite and ≥ 0; sampling needs a drafter with a distribution, and not the
    dedicated layout (its rank 0 runs the oracle only)."""
    t = job.get("temperature", 0.0)
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise UserError(f"--temperature must be a finite number ≥ 0 (0 = greedy), got {t}")
    if t == 0:
        return
    if job["scheme"] == "spd_dedicated":
        raise UserError("--scheme spd_dedicated decodes greedily only: use --temperature 0, or --scheme spd")
    if (job.get("draft") or "").partition(":")[0] == "oracle":
        raise UserError("--draft oracle:ALPHA is undefined with --temperature > 0 (it drafts from the greedy "
                        "reference, not from a distribution): use --draft head:PATH")


def dedicated(spec: RunSpec) -> bool:
    return any(j["scheme"] == "spd_dedicated" for j in spec.jobs)


def layout_of(spec: RunSpec):
    from executor.ranks import RankLayout
    return RankLayout(spec.stages, spec.tp, dedicated(spec))


def world_of(spec: RunSpec) -> int:
    """Processes a run needs: tp per stage, plus rank 0 of its own under spd_dedicated."""
    return layout_of(spec).world


# --- one rank --------------------------------------------------------------------------------------

def rank_main(spec: RunSpec, rank: int, world: int) -> list[dict] | None:
    """Run every job of `spec` as `rank`; rank 0 returns one summary per job (and writes the trace)."""
    import torch
    from executor.model import Stage, uniform_partition
    from executor.checkpoints import load_checkpoint
    from executor.pipeline import Job, Worker
    from executor import dedicated as ded
    from executor.tp import TPComm, attach, load_tp_stage
    from executor.transport import PeerLost, connect

    torch.set_num_threads(spec.threads)
    if spec.pin and spec.device != "cuda":
        from executor.affinity import pin_rank
        pin_rank(rank, world)
    layout = dedicated(spec)
    L = layout_of(spec)
    if world != L.world:
        raise UserError(f"--tp {spec.tp} × --stages {spec.stages}" + (" + 1 (spd_dedicated)" if layout else "")
                        + f" = {L.world} ranks but WORLD_SIZE is {world}: run one process per rank")
    if spec.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device here")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    transport_kind = pick_transport(spec, world)
    parts = uniform_partition(model_shape(Path(spec.model))["n_layers"], spec.stages)
    s, tp_rank = L.stage_of(rank), L.tp_rank_of(rank)
    full_model = None
    if spec.tp == 1 or s < 0:
        # the whole model; spd_dedicated's rank 0 (s = -1, its module TP = 1) has no layers: its Stage
        # object is never run
        model = load_checkpoint(spec.model).to(device)
        stage = Stage(model, *parts[max(s, 0)])
    else:                       # only this rank's shard of its stage; the oracle's reference loads the rest
        stage = load_tp_stage(spec.model, *parts[s], spec.tp, tp_rank).to(device)
        model, full_model = stage, (lambda: load_checkpoint(spec.model).to(device))
    tr = (connect(transport_kind, rank, world, device, timeout=max(spec.timeout, 25),
                  groups=L.groups() if spec.tp > 1 else [], algorithm=spec.allreduce) if world > 1 else None)
    comm = None
    if spec.tp > 1 and s >= 0:
        comm = TPComm(tr, L.group(s))
        attach(stage, comm)
    worker = Worker(rank, world, model, stage, tr, spec.timeout, device, layout=L, full_model=full_model, comm=comm)
    if spec.verbose:
        _say(f"executor: [rank {rank}] ready (stage {s}" + (f", tp rank {tp_rank}" if spec.tp > 1 else "")
             + f", layers {stage.first, stage.last}, transport {tr.name if tr else 'none'})")
    failed = True
    try:
        if rank > 0:
            if layout:
                ded.serve_dedicated(worker, spec.idle_timeout)
            else:
                worker.serve(spec.idle_timeout)
            failed = False
            return None
        results = []
        for i, jd in enumerate(spec.jobs):
            job = Job(**jd)
            trace_dir = ((str(Path(spec.trace_dir) / f"job{i}") if spec.trace_each
                          else spec.trace_dir if i == len(spec.jobs) - 1 else None) if spec.trace_dir else None)
            if job.serving:
                from executor.serving import lead_serving
                from executor.serving_report import summarise_serving
                res = lead_serving(worker, job, spec.idle_timeout)
                results.append(summarise_serving(res, job, spec, parts, tr.name if tr else "none", trace_dir))
                continue
            res = (ded.lead_dedicated(worker, job, spec.idle_timeout) if layout
                   else worker.lead(job, spec.idle_timeout))
            results.append(summarise(res, job, spec, parts, tr.name if tr else "none", trace_dir=trace_dir))
        if layout:
            ded.shutdown_dedicated(worker)
        else:
            worker.shutdown()
        failed = False
        return results
    except PeerLost as e:
        if tr is not None:
            tr.abort(e.rank)
        raise
    finally:
        if tr is not None:
            tr.close(failed)


def pick_transport(spec: RunSpec, world: int) -> str:
    if spec.transport != "auto":
        return spec.transport
    one_host = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
    return "local" if spec.device == "cpu" and one_host else "dist"


def summarise(res, job, spec: RunSpec, parts, transport: str, trace_dir: str | None) -> dict:
    """Every reported figure comes from spdsim.metrics.run_metrics over the merged trace."""
    from spdsim.metrics import run_metrics
    from spdsim.trace import Trace, TraceHeader, write_chrome_trace, write_trace
    n = spec.stages
    L = layout_of(spec)
    shift = int(job.scheme == "spd_dedicated")       # stage s on rank s+1; rank 0 does head/verify
    placement = [f"rank{L.rank(s)}" for s in range(n)]     # a stage's device: its TP rank 0
    m = run_metrics(res.events, job.scheme, n, job.new_tokens, placement=placement)
    if trace_dir:
        header = TraceHeader(scheme=job.scheme, stages=n, new_tokens=job.new_tokens, source="executor",
                             partition=[list(p) for p in parts], placement=placement,
                             prompt_tokens=len(job.prompt), model=spec.model_label or spec.model,
                             device_kind=spec.device, tp=spec.tp,
                             extra={"transport": transport, "draft": job.draft, "threads": spec.threads,
                                    "accepts": res.accepts,
                                    **({"groups": L.groups(), "allreduce": spec.allreduce} if spec.tp > 1 else {}),
                                    **({"rank0": "embed, draft, LM head, verify"} if shift else {})})
        for r in range(L.world):
            write_trace(Path(trace_dir) / f"rank{r}.jsonl", TraceHeader(**{**asdict(header), "rank": r}),
                        [e for e in res.events if e.device == f"rank{r}"])
        write_chrome_trace(Path(trace_dir) / "timeline.json", Trace(header, res.events))
    out = {"scheme": job.scheme, "stages": n, "new_tokens": job.new_tokens, "tokens": res.tokens,
           "tokens_per_s": m.tokens_per_s, "ms_per_token": m.ms_per_token,
           "acceptance_rate": m.acceptance_rate, "bubble_ratio": m.bubble_ratio, "waste_ratio": m.waste_ratio,
           "accepts": res.accepts, "accepted": m.accepted, "rejected": m.rejected,
           "utilization": list(m.utilization), "transport": transport, "partition": [list(p) for p in parts],
           "draft": job.draft, "prompt_tokens": len(job.prompt), "model": spec.model_label or spec.model,
           "device": spec.device, "threads": spec.threads, "epochs": res.epochs,
           "temperature": job.temperature, "tp": spec.tp, "gpus": L.world,
           "allreduce_share": m.allreduce_share}
    if res.reference is not None:
        out["matches_reference"] = res.tokens == res.reference
    return out


# --- launching -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: RunSpec, grace_s: float = 30.0) -> list[dict]:
    """Run `spec` on this machine: in-process for one stage, else one spawned process per stage."""
    validate(spec)
    world = world_of(spec)
    if world == 1:
        return rank_main(spec, 0, 1)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C works even where SIGINT was ignored
    tmp = Path(tempfile.mkdtemp(prefix="spd-run."))
    spec_file, result_file = tmp / "spec.json", tmp / "result.json"
    spec_file.write_text(json.dumps(asdict(spec)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": str(spec.threads), "PYTHONUNBUFFERED": "1"}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    procs = []
    try:
        for r in range(world):
            procs.append(subprocess.Popen([sys.executable, "-m", "executor.runner", str(spec_file), str(result_file)],
                                          env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
        failed = _watch(procs, grace_s)
        if failed:
            raise RuntimeError(failed)
        return json.loads(result_file.read_text())
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        raise
    finally:
        _stop(procs, signal.SIGTERM)
        for f in (spec_file, result_file):
            f.unlink(missing_ok=True)
        tmp.rmdir()


def _watch(procs: list[subprocess.Popen], grace_s: float) -> str | None:
    """Wait for every rank. On the first failure give the others `grace_s` to exit, then kill them.
    Returns a one-line description of the failure, or None."""
    first: tuple[int, int] | None = None
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if first is None:
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                first = bad[0]
                deadline = time.monotonic() + grace_s
        if all(c is not None for c in codes):
            break
        if deadline and time.monotonic() > deadline:
            _stop(procs, signal.SIGKILL)
            break
        time.sleep(0.05)
    if first is None:
        return None
    r, code = first
    how = f"was killed by signal {-code}" if code < 0 else f"failed (exit {code})"
    return f"rank {r} {how}"


def _stop(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _say(line: str) -> None:
    """One line to stderr in one write, so the lines of concurrent ranks never interleave."""
    os.write(2, (line + "\n").encode())


def _child_main(spec_file: str, result_file: str) -> int:
    """A spawned rank (also what torchrun's environment looks like)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    spec = RunSpec(**json.loads(Path(spec_file).read_text()))
    try:
        results = rank_main(spec, rank, world)
    except KeyboardInterrupt:
        return 130
    except UserError as e:
        _say(f"executor: error: [rank {rank}] {e}")
        return 2
    except Exception as e:                       # PeerLost and friends: one line, no traceback
        from executor.transport import PeerLost
        if not isinstance(e, PeerLost):
            raise
        _say(f"executor: error: [rank {rank}] {e}")
        return 3
    if results is not None:
        tmp = Path(result_file + ".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(result_file)
    return 0


# --- the `executor run` command --------------------------------------------------------------------

def spec_from_args(args) -> RunSpec:
    from executor.drafters import parse_draft
    parse_draft(args.draft)                            # malformed --draft: exit 2 before anything starts
    if args.scheme not in SCHEMES:
        raise UserError(f"--scheme {args.scheme!r}: expected one of {SCHEMES}")
    model = resolve_model(args.model)
    prompt = list(args.prompt.encode("utf-8"))
    job = {"scheme": args.scheme, "prompt": prompt, "new_tokens": args.new_tokens, "draft": args.draft,
           "seed": args.seed, "temperature": args.temperature}
    if args.tp > 1 and args.reference and args.temperature == 0:
        job["reference"] = True            # --json then says matches_reference
    if args.repeat < 1:
        raise UserError("--repeat must be ≥ 1")
    if getattr(args, "requests", None) is not None:
        job["serving"] = serving_from_args(args)
        job["prompt"] = job["serving"]["requests"][0]["prompt"]
        job["reference"] = bool(args.reference)    # --json then says matches_reference, per request too
    elif getattr(args, "concurrency", None) is not None or getattr(args, "arrivals", None) is not None \
            or getattr(args, "prompts", None) is not None or getattr(args, "policy", None) is not None:
        raise UserError("--concurrency, --policy, --arrivals and --prompts need --requests K")
    jobs = [dict(job, seed=args.seed + i) for i in range(args.repeat)]
    return RunSpec(model=str(model), stages=args.stages, jobs=jobs, tp=args.tp, allreduce=args.allreduce,
                   device=args.device, transport=args.transport,
                   threads=args.threads, timeout=args.timeout, trace_dir=str(args.trace) if args.trace else None,
                   model_label=args.model, verbose=args.verbose)


def parse_arrivals(spec: str | None, k: int, seed: int) -> list[float]:
    """--arrivals poisson:R → K arrival times (s) drawn as the simulator draws them (spdsim.workload);
    none: every request arrives at once."""
    if spec is None:
        return [0.0] * k
    kind, _, arg = spec.partition(":")
    if kind != "poisson":
        raise UserError(f"--arrivals {spec!r}: expected poisson:RATE (requests per second)")
    try:
        rate = float(arg)
    except ValueError:
        raise UserError(f"--arrivals {spec!r}: RATE must be a number") from None
    if not math.isfinite(rate) or rate <= 0:
        raise UserError(f"--arrivals {spec!r}: RATE must be > 0")
    from spdsim.workload import Arrivals, Workload, draw_requests
    w = Workload(prompt_tokens=1, new_tokens=1, requests=k, arrivals=Arrivals("poisson", (rate,)))
    return [r.arrival_s for r in draw_requests(w, rate, seed)]


def serving_from_args(args) -> dict:
    """--requests K --concurrency C --policy P --arrivals poisson:R --prompts FILE → Job.serving."""
    from executor.prompts import file_prompts, heldout_prompts
    k = args.requests
    if k < 1:
        raise UserError(f"--requests must be ≥ 1, got {k}")
    c = 1 if args.concurrency is None else args.concurrency
    if c < 1:
        raise UserError(f"--concurrency must be ≥ 1, got {c}")
    prompts = file_prompts(args.prompts, k) if args.prompts else heldout_prompts(k)
    times = parse_arrivals(args.arrivals, k, args.seed)
    return {"policy": args.policy or "fcfs", "concurrency": c, "threshold": args.threshold,
            "arrivals": args.arrivals,
            "requests": [{"prompt": p, "new_tokens": args.new_tokens, "arrival_s": t} for p, t in zip(prompts, times)]}


def run_command(args) -> int:
    spec = spec_from_args(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:      # under torchrun: this is one rank
        from executor.transport import PeerLost
        validate(spec)
        rank = int(os.environ["RANK"])
        try:
            results = rank_main(spec, rank, int(os.environ["WORLD_SIZE"]))
        except PeerLost as e:
            _say(f"executor: error: [rank {rank}] {e}")
            return 3
        if results is None:
            return 0
    else:
        try:
            results = launch(spec)
        except RuntimeError as e:
            _say(f"executor: error: {e}")
            return 1
    print_results(results, args.json, args.trace)
    return 0


def print_results(results: list[dict], as_json: bool, trace_dir) -> None:
    out = dict(results[-1])
    serving = "requests" in out
    if len(results) > 1:            # --repeat: the figures are medians over the repeats
        for key in ("tokens_per_s", "ms_per_token", "bubble_ratio", "waste_ratio"):
            out[key] = statistics.median(r[key] for r in results)
        rates = [r["acceptance_rate"] for r in results if r["acceptance_rate"] is not None]
        out["acceptance_rate"] = statistics.median(rates) if rates else None
        shares = [r["allreduce_share"] for r in results if r.get("allreduce_share") is not None]
        out["allreduce_share"] = statistics.median(shares) if shares else None
        out["repeats"] = [{k: r[k] for k in ("tokens_per_s", "ms_per_token", "bubble_ratio", "waste_ratio",
                                              "acceptance_rate")} for r in results]
    if as_json:
        print(json.dumps(out))
        return
    if serving:
        from executor.serving_report import print_serving
        print_serving(out, trace_dir)
        return
    acc = "" if out["acceptance_rate"] is None else \
        f"  acceptance {out['acceptance_rate']:.3f} ({out['accepted']}/{out['accepted'] + out['rejected']})"
    print(f"{out['scheme']}  stages={out['stages']}  " + (f"tp={out['tp']}  " if out.get("tp", 1) > 1 else "")
          + f"transport={out['transport']}  "
          f"{out['new_tokens']} new tokens" + (f"  draft={out['draft']}" if out["draft"] else "")
          + (f"  temperature={out['temperature']:g}" if out.get("temperature") else "")
          + (f"  (median of {len(results)})" if len(results) > 1 else ""))
    print(f"tokens/s {out['tokens_per_s']:.1f}  ms/token {out['ms_per_token']:.2f}  "
          f"bubble {out['bubble_ratio']:.3f}  waste {out['waste_ratio']:.3f}" + acc
          + ("" if out.get("allreduce_share") is None else f"  all-reduce share {out['allreduce_share']:.3f}"))
    if "matches_reference" in out:
        print("lossless: " + ("tokens equal the AR greedy reference" if out["matches_reference"]
                              else "MISMATCH against the AR greedy reference"))
    text = bytes(t for t in out["tokens"] if t < 256).decode("utf-8", "replace")
    print("text: " + repr(text))
    if trace_dir:
        print(f"trace: {trace_dir}/rank<k>.jsonl, {trace_dir}/timeline.json (open in https://ui.perfetto.dev)")


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
