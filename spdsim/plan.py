"""Capacity planning: `spdsim plan` — which GPUs, how many, how many stages, which partition, which
scheme, and what it costs, for a model and a tokens/s target.

    spdsim plan --model llama-2-70b --gpu a100,h100 --max-gpus 16 --target-tokens-per-s 40 \
                [--acceptance 0.8 | 2:0.9,4:0.85,8:0.8] [--topology KIND] [--out DIR] [--jobs N | --dask ADDR]

How (every reported tokens/s figure is simulated; the bound only decides what needs simulating):
  1. enumerate configurations: GPU type × TP degree × scheme × stage count × speculative-module
     placement (co-located: tp × n GPUs, dedicated: tp × n + 1) × partitioner; the GPU count is what the
     configuration uses. tp (`--tp`, default every power of two up to a node's 8 GPUs that the model's
     heads allow) makes `ar` plain tensor-parallel decoding, and sd / chain run at one stage on a TP
     group (SD on TP, as vLLM and SGLang serve; sd drafts at the --acceptance α, chain with the EAGLE
     table); TP groups stay inside a node (8 GPUs each beyond 8);
  2. assess each (on the executor): the partitioner's plan (`engine.plan_point`), the per-device memory
     (`costs.stage_memory`: weights, KV cache for prompt + new tokens, prefill activations, the draft
     module; per GPU of a TP group) against the usable memory after headroom, and an upper bound on
     tokens/s — every committed token passes through every stage, one position at a time per stage, so
     tokens/s ≤ 1 / slowest stage (SPD) or 1 / Σ stages (window 1: AR, PP), stage times with their
     all-reduces; sd / chain commit at most γ + 1 tokens per step of γ drafts and one pass, so
     tokens/s ≤ max((γ+1) / (γ·draft + pass), 1 / pass);
  3. simulate (`engine.simulate_point`) every feasible configuration whose bound reaches the target, then,
     branch-and-bound, the others in decreasing bound order until no bound beats the fastest simulated
     figure: the fastest and best-achievable figures are therefore exact, and the rest are "pruned";
  4. rank: meeting the target first, then $/hour, GPUs, tokens/s. Write DIR/plan.csv (every configuration,
     with its status and reason), DIR/pareto.png, and print the cheapest and the fastest. A configuration
     that another simulated one matches or beats on both tokens/s and $/hour (GPUs where unpriced) is
     never the recommendation.
Exit 0 when a configuration meets the target, 1 when none does (the best achievable is printed), 2 on
bad input. With `--qps R --slo …` or `--max-qps --slo …` it plans by latency SLO instead, under
arrivals (spdsim/plan_serving.py).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from spdsim import acceptance as acc
from spdsim.acceptance import AcceptanceSpec
from spdsim.costs import MEMORY_RESERVE, CostOverrides, StageMemory, stage_memory, usable_bytes
from spdsim.cost_choice import cost_model
from spdsim.engine import plan_point, simulate_point
from spdsim.errors import UserError
from spdsim.hardware import GPU, GPU_CATALOG, GPU_HOURLY_USD, TOPOLOGY_KINDS, Hardware, TopologySpec, \
    default_topology_params
from spdsim.metrics import RunMetrics
from spdsim.models import MODEL_CATALOG, ModelShape
from spdsim.parallel import make_executor, progress_bar, run_tasks
from spdsim.partition import Plan, uniform_layers
from spdsim.scenario import PARTITIONERS, Baselines, HeadSpec, Point, Scenario, Sweep, Workload

DEFAULT_SCHEMES = ("ar", "pp", "spd", "sd", "chain")
PLANNED_SCHEMES = DEFAULT_SCHEMES
NODE_GPUS = 8          # GPUs behind one NVSwitch (an HGX node); more NVLink GPUs span nodes by default
BOUND_MARGIN = 1.001   # float rounding of simulated nanoseconds must never beat the bound


# --- the request and its configurations ---------------------------------------------------------------

@dataclass(frozen=True)
class PlanRequest:
    model: ModelShape
    gpus: tuple[GPU, ...]
    max_gpus: int
    target: float                                   # tokens/s
    acceptance: AcceptanceSpec | None               # i.i.d. α for every stage count, or
    acceptance_table: dict[int, AcceptanceSpec] | None
    workload: Workload
    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    partitions: tuple[str, ...] = PARTITIONERS
    topology: str | None = None                     # None: NVSwitch per node of 8 / PCIe tree
    head_layers: int = 1
    prices: dict[str, float] = field(default_factory=dict)
    reserve: float = MEMORY_RESERVE
    seed: int = 0
    tps: tuple[int, ...] | None = None              # TP degrees; None: every valid power of two ≤ a node

    def tp_values(self) -> tuple[int, ...]:
        if self.tps is not None:
            return self.tps
        m, out, t = self.model, [], 1
        while t <= min(self.max_gpus, NODE_GPUS):
            if tp_problem(m, t) == "":
                out.append(t)
            t *= 2
        return tuple(out)

    def alpha_for(self, n: int) -> AcceptanceSpec | None:
        if self.acceptance_table is not None:
            return self.acceptance_table.get(n)
        return self.acceptance


@dataclass(frozen=True)
class Config:
    gpu: str
    gpus: int              # GPUs the configuration uses (tp × n, + 1 with a dedicated module)
    scheme: str
    stages: int
    head: str              # colocated | dedicated | "" (nothing drafts)
    partition: str
    tp: int = 1            # GPUs per stage (a TP group)


def tp_problem(model: ModelShape, tp: int) -> str:
    """Why a model cannot be split tp ways ('' when it can): the heads (and KV heads) must divide."""
    if model.heads % tp:
        return f"{tp} does not divide the model's {model.heads} heads"
    if model.kv_heads >= tp and model.kv_heads % tp:
        return f"{tp} does not divide the model's {model.kv_heads} KV heads"
    if model.kv_heads < tp and tp % model.kv_heads:
        return f"{tp} is not a multiple of the model's {model.kv_heads} KV heads"
    return ""


def topology_for(req: PlanRequest, gpu: GPU, count: int) -> TopologySpec:
    kind = req.topology or ("pcie-tree" if not gpu.nvlink_gbps else
                            "nvswitch" if count <= NODE_GPUS else "multi-node")
    params = default_topology_params(kind, gpu)
    if kind == "multi-node":
        params["nodes"] = max(2, -(-count // NODE_GPUS))
        params["gpus_per_node"] = NODE_GPUS        # HGX nodes of 8; the last one partly used
    return TopologySpec(kind, params)


def configurations(req: PlanRequest) -> list[Config]:
    from spdsim.schemes import SCHEMES
    out = []
    K = req.max_gpus
    for gpu in req.gpus:
        for tp in req.tp_values():
            for scheme in req.schemes:
                sch = SCHEMES[scheme]
                if scheme in ("ar", "sd") or sch.single_device:   # one stage on one TP group
                    out.append(Config(gpu.name, tp, scheme, 1, "", "uniform", tp))
                    continue
                for n in range(2, min(K // tp, req.model.layers) + 1):
                    heads = ("colocated", "dedicated") if scheme == "spd" else ("",)
                    for head in heads:
                        gpus = tp * n + (head == "dedicated")
                        if gpus > K:
                            continue
                        for part in req.partitions:
                            out.append(Config(gpu.name, gpus, scheme, n, head, part, tp))
    return out


def scenario_for(req: PlanRequest, c: Config) -> tuple[Scenario, Point]:
    """The one-point scenario a configuration is: what `plan_point` and `simulate_point` take."""
    from spdsim.schemes import SCHEMES
    gpu = next(g for g in req.gpus if g.name == c.gpu)
    a = req.alpha_for(c.stages) if SCHEMES[c.scheme].drafts and c.stages > 1 else None
    if c.scheme == "chain":
        a = Baselines().chain_point_acceptance()
    elif c.scheme == "sd":
        a = req.alpha_for(1) or req.acceptance
    s = Scenario(name=f"plan-{req.model.name}", hardware=Hardware(gpu, c.gpus, topology_for(req, gpu, c.gpus)),
                 model=req.model, workload=req.workload,
                 head=HeadSpec(placement=c.head or "colocated", layers=req.head_layers),
                 sweep=Sweep([c.stages], [c.partition], [c.scheme], [a] if a else [], tp=[c.tp]),
                 costs=CostOverrides(), seed=req.seed)
    return s, Point(c.scheme, c.stages, c.partition, a, c.tp)


# --- step 2: assess (plan, memory, bound) -------------------------------------------------------------

@dataclass
class Assessment:
    plan: Plan | None
    memory: list[tuple[str, StageMemory]]     # (device label, its memory)
    reason: str                                # "" when the configuration fits
    bound: float                               # upper bound on tokens/s (inf: none known)


def memory_report(req: PlanRequest, c: Config, layers, drafts: bool) -> list[tuple[str, StageMemory]]:
    m, n = req.model, len(layers)
    ctx, prefill = req.workload.prompt_tokens + req.workload.new_tokens, req.workload.prompt_tokens
    out = []
    for s, (a, b) in enumerate(layers):
        head = req.head_layers if (drafts and c.head == "colocated" and s == 0) else 0
        out.append((f"s{s + 1}", stage_memory(m, b - a, s == 0, s == n - 1, ctx, head, prefill, c.tp)))
    if drafts and c.head == "dedicated":   # the module drafts from token embeddings of its own
        mem = stage_memory(m, 0, False, False, ctx, req.head_layers)
        out.append(("head", StageMemory(m.embed_bytes, 0, 0, mem.draft)))
    return out


def over_memory(req: PlanRequest, gpu: GPU, memory: list[tuple[str, StageMemory]]) -> str:
    usable = usable_bytes(gpu, req.reserve)
    over = [(mem.total - usable, label, mem) for label, mem in memory if mem.total > usable]
    if not over:
        return ""
    excess, label, mem = max(over, key=lambda t: t[0])
    where = "the speculative module's device" if label == "head" else f"stage {label[1:]} of {len(memory)}"
    more = f" ({len(over)} devices over)" if len(over) > 1 else ""
    return (f"{where} needs {mem.total / 1e9:.1f} GB (weights {mem.weights / 1e9:.1f}, KV {mem.kv_cache / 1e9:.1f}, "
            f"activations {mem.activations / 1e9:.2f}, draft {mem.draft / 1e9:.1f}): {excess / 1e9:.1f} GB over "
            f"the {usable / 1e9:.1f} GB usable on {gpu.name}{more}")


def rate_bound(scenario: Scenario, plan: Plan, scheme: str) -> float:
    """Tokens/s no simulation of this plan can exceed (see the module docstring); inf if unknown."""
    if scheme not in ("ar", "pp", "spd", "sd", "chain"):
        return math.inf
    costs = cost_model(scenario).for_point(scheme, plan.stages, plan.tp, plan.groups or None)
    ctx = max(1, scenario.workload.prompt_tokens - 1)     # stage time grows with context: take the least
    n = plan.stages
    times = [costs.stage_s(s, a, b, ctx, s == 0, s == n - 1) for s, (a, b) in enumerate(plan.layers)]
    per_token = max(times) if scheme == "spd" and n > 1 else sum(times)
    if per_token <= 0:
        return math.inf
    if scheme in ("sd", "chain"):
        # ≤ γ + 1 tokens per step of γ drafts (sequential, before the pass) and one pass
        b = scenario.baselines
        if scheme == "sd":
            gamma = b.sd.gamma
            draft = (b.sd.draft_ms * 1e-3 if b.sd.draft_ms is not None
                     else b.sd.cost_ratio * costs.stage_s(0, 0, scenario.model.layers, ctx, True, True))
        else:
            gamma = len(b.chain.acceptance)
            draft = (b.chain.draft_ms * 1e-3 if b.chain.draft_ms is not None
                     else b.chain.head_layers * costs.layer_s(-1, ctx) + costs.lm_head_s())
        return BOUND_MARGIN * max((gamma + 1) / (gamma * draft + per_token), 1 / per_token)
    return BOUND_MARGIN / per_token


def assess(req: PlanRequest, c: Config) -> Assessment:
    from spdsim.schemes import SCHEMES
    gpu = next(g for g in req.gpus if g.name == c.gpu)
    drafts = SCHEMES[c.scheme].drafts and c.stages > 1
    if drafts and req.alpha_for(c.stages) is None:
        return Assessment(None, [], f"no acceptance given for {c.stages} stages (--acceptance table)", math.inf)
    if c.scheme == "sd" and req.alpha_for(1) is None and req.acceptance is None:
        return Assessment(None, [], "sd needs one α (--acceptance ALPHA or a table entry 1:ALPHA)", math.inf)
    scenario, point = scenario_for(req, c)
    try:
        plan = plan_point(scenario, point)
    except UserError as e:
        # the partitioner found no partition that fits: report memory on the uniform split
        memory = memory_report(req, c, uniform_layers(req.model.layers, c.stages), drafts)
        return Assessment(None, memory, over_memory(req, gpu, memory) or str(e), math.inf)
    memory = memory_report(req, c, plan.layers, drafts)
    reason = over_memory(req, gpu, memory)
    return Assessment(plan, memory, reason, rate_bound(scenario, plan, c.scheme) if not reason else math.inf)


def _assess_task(req: PlanRequest, c: Config) -> Assessment:
    return assess(req, c)


def _simulate_task(req: PlanRequest, c: Config, plan: Plan) -> RunMetrics:
    scenario, point = scenario_for(req, c)
    return simulate_point(scenario, point, plan=plan).metrics


# --- step 3: choose what to simulate, and simulate it -------------------------------------------------

def _sim_key(c: Config, plan: Plan) -> tuple:
    """Configurations with the same key run the same simulation (e.g. comm_aware keeping the identity
    placement on a symmetric switch gives compute_balanced's plan): simulate it once."""
    return (c.gpu, c.gpus, c.scheme, c.head, plan.layers, plan.placement, plan.head_device, c.tp, plan.groups)


def evaluate(req: PlanRequest, jobs: int = 1, dask: str | None = None, quiet: bool = True) -> pd.DataFrame:
    """Every configuration, assessed, and simulated where it matters; one row each (see `plan.csv`)."""
    configs = configurations(req)
    with make_executor(jobs, dask) as ex:
        assessed: list[Assessment] = run_tasks(_assess_task, [(req, c) for c in configs],
                                               progress=progress_bar("planning  ", quiet), executor=ex)
        groups: dict[tuple, list[int]] = {}
        for i, (c, a) in enumerate(zip(configs, assessed)):
            if a.plan is not None and not a.reason:
                groups.setdefault(_sim_key(c, a.plan), []).append(i)
        order = sorted(groups, key=lambda k: -assessed[groups[k][0]].bound)
        metrics: dict[tuple, RunMetrics] = {}
        must = [k for k in order if assessed[groups[k][0]].bound >= req.target]
        bar = progress_bar("simulating", quiet, batches=True)
        batch_size = max(2 * jobs, 4)
        batch = must or order[:batch_size]     # nothing can reach the target: start from the best bounds
        while batch:
            tasks = [(req, configs[groups[k][0]], assessed[groups[k][0]].plan) for k in batch]
            for k, m in zip(batch, run_tasks(_simulate_task, tasks, progress=bar, executor=ex)):
                metrics[k] = m
            best = max((m.tokens_per_s for m in metrics.values()), default=0.0)
            # branch and bound: only a configuration whose bound beats the best figure can be faster
            batch = [k for k in order if k not in metrics and assessed[groups[k][0]].bound > best][:batch_size]
        if bar is not None:
            bar.close()
    best = max((m.tokens_per_s for m in metrics.values()), default=0.0)
    rows = []
    for i, (c, a) in enumerate(zip(configs, assessed)):
        key = _sim_key(c, a.plan) if a.plan is not None else None
        m = metrics.get(key) if key is not None and not a.reason else None
        price = req.prices.get(c.gpu, math.nan)
        if a.reason:
            status, reason = "infeasible", a.reason
        elif m is None:
            status = "pruned"
            reason = (f"bound {a.bound:.1f} tok/s < target {req.target:g} and ≤ best simulated {best:.1f}")
        else:
            status = "ok" if m.tokens_per_s >= req.target else "below target"
            reason = "" if groups[key][0] == i else f"same plan as {configs[groups[key][0]].partition}"
        tps = m.tokens_per_s if m else math.nan
        rows.append({
            "gpu": c.gpu, "gpus": c.gpus, "scheme": c.scheme, "stages": c.stages, "tp": c.tp, "head": c.head,
            "partition": c.partition,
            "acceptance": (req.alpha_for(c.stages).value if c.head and req.alpha_for(c.stages) else
                           req.acceptance.value if c.scheme == "sd" and req.acceptance else None),
            "topology": topology_for(req, next(g for g in req.gpus if g.name == c.gpu), c.gpus).kind,
            "status": status, "meets_target": bool(m is not None and m.tokens_per_s >= req.target),
            "tokens_per_s": tps, "ms_per_token": m.ms_per_token if m else math.nan,
            "bound_tokens_per_s": a.bound if math.isfinite(a.bound) else math.nan,
            "usd_per_hour": c.gpus * price,
            "usd_per_mtok": c.gpus * price / 3600 / tps * 1e6 if m and tps > 0 else math.nan,
            "bubble_ratio": m.bubble_ratio if m else math.nan,
            "acceptance_rate": m.acceptance_rate if m else None,
            "layers": a.plan.layers_str() if a.plan else "",
            "placement": a.plan.placement_str() if a.plan else "",
            "head_device": (a.plan.head_device or "") if a.plan else "",
            "memory_gb": memory_str(a.memory, usable_bytes(next(g for g in req.gpus if g.name == c.gpu), req.reserve)),
            "reason": reason,
        })
    return rank(pd.DataFrame(rows))


def memory_str(memory: list[tuple[str, StageMemory]], usable: float) -> str:
    if not memory:
        return ""
    return " ".join(f"{label}={mem.total / 1e9:.1f}" for label, mem in memory) + f" (of {usable / 1e9:.1f})"


def rank(df: pd.DataFrame) -> pd.DataFrame:
    """Meeting the target first, then simulated, then cheapest per hour, fewest GPUs, fastest."""
    status_order = {"ok": 0, "below target": 1, "pruned": 2, "infeasible": 3}
    df = df.assign(_s=df["status"].map(status_order), _t=-df["tokens_per_s"].fillna(-1))
    df = df.sort_values(["_s", "usd_per_hour", "gpus", "_t"], kind="stable", na_position="last")
    return df.drop(columns=["_s", "_t"]).reset_index(drop=True)


def dominated(df: pd.DataFrame) -> pd.Series:
    """Rows that another simulated row matches or beats on tokens/s and on $/hour (GPUs where a price is
    missing), strictly on one of them."""
    sim = df["tokens_per_s"].notna()
    cost = df["usd_per_hour"].where(df["usd_per_hour"].notna(), df["gpus"].astype(float))
    tps = df["tokens_per_s"]
    out = pd.Series(False, index=df.index)
    idx = list(df.index[sim])
    for i in idx:
        better = [(tps[j] >= tps[i] and cost[j] <= cost[i] and (tps[j] > tps[i] or cost[j] < cost[i]))
                  for j in idx if j != i]
        out[i] = any(better)
    return out


def recommendations(df: pd.DataFrame) -> tuple[pd.Series | None, pd.Series | None]:
    """(cheapest configuration meeting the target or None, fastest simulated configuration or None);
    neither is ever dominated by another simulated configuration."""
    beaten = dominated(df)
    ok = df[(df["status"] == "ok") & ~beaten]
    cheapest = ok.iloc[0] if len(ok) else None          # `rank` put the cheapest first
    sim = df[df["tokens_per_s"].notna() & ~beaten]
    if len(sim):
        fastest = sim.sort_values(["tokens_per_s", "usd_per_hour", "gpus"], ascending=[False, True, True],
                                  kind="stable").iloc[0]
    else:
        fastest = None
    return cheapest, fastest


# --- output --------------------------------------------------------------------------------------------

def describe(r: pd.Series) -> str:
    tp = int(r["tp"]) if "tp" in r.index else 1
    if r["scheme"] == "ar":
        what = f"TP = {tp} (plain tensor parallel)" if tp > 1 else "AR on 1 GPU"
    elif r["stages"] == 1:
        what = f"{r['scheme'].upper()} on {'TP ' + str(tp) if tp > 1 else '1 GPU'}"
    else:
        what = {"pp": f"PP over {r['stages']} stages"}.get(
            r["scheme"], f"{r['scheme'].upper()} over {r['stages']} stages") + (f" of TP {tp}" if tp > 1 else "")
    if r["head"]:
        what += f", module {r['head']}"
    cost = f", ${r['usd_per_hour']:.2f}/h" if not math.isnan(r["usd_per_hour"]) else ""
    part = f", {r['partition']} [{r['layers']}]" if r["stages"] > 1 else ""
    return (f"{r['gpus']} × {r['gpu']}: {what}{part}: {r['tokens_per_s']:.1f} tok/s "
            f"({r['ms_per_token']:.2f} ms/token){cost}")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (x smaller-or-equal and y larger-or-equal, one strictly)."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in idx:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def write_pareto(df: pd.DataFrame, path: Path, target: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sim = df[df["tokens_per_s"].notna()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xcol, xlabel in ((axes[0], "gpus", "GPUs"), (axes[1], "usd_per_hour", "USD per hour")):
        data = sim[sim[xcol].notna()]
        for gpu, g in data.groupby("gpu"):
            ax.scatter(g[xcol], g["tokens_per_s"], s=14, alpha=0.5, label=gpu)
        pts = list(zip(data[xcol], data["tokens_per_s"]))
        front = [pts[i] for i in pareto_front(pts)]
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1.2,
                    label="Pareto front")
        ax.axhline(target, ls="--", color="tab:red", lw=1, label=f"target {target:g} tok/s")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens/s (simulated)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("spdsim plan: feasible configurations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command ----------------------------------------------------------------------------------------

def resolve_gpu(name: str) -> GPU:
    """A catalog name, or an unambiguous prefix of one ("a100" → a100-80gb-sxm)."""
    name = name.strip()
    if name in GPU_CATALOG:
        return GPU_CATALOG[name]
    hits = [k for k in GPU_CATALOG if k.startswith(name)] if name else []
    if len(hits) != 1:
        why = "ambiguous" if hits else "unknown"
        raise UserError(f"--gpu: {why} GPU {name!r} (catalog: {', '.join(GPU_CATALOG)})")
    return GPU_CATALOG[hits[0]]


def parse_acceptance(text: str) -> tuple[AcceptanceSpec | None, dict[int, AcceptanceSpec] | None]:
    """'0.8' (every stage count) or '2:0.9,4:0.85' (one α per stage count)."""
    def alpha(v: str) -> float:
        try:
            return acc._check_alpha(float(v), "--acceptance")
        except ValueError:
            raise UserError(f"--acceptance: {v!r} is not a number in [0, 1]") from None
    if ":" not in text:
        return acc.iid(alpha(text)), None
    table = {}
    for part in text.split(","):
        n, _, a = part.partition(":")
        if not n.strip().isdigit() or int(n) < 1:
            raise UserError(f"--acceptance: {part!r} is not STAGES:ALPHA")
        spec = acc.iid(alpha(a))
        table[int(n)] = AcceptanceSpec("table", spec.alpha, label=spec.label)
    return None, table


def parse_prices(text: str | None, gpus: tuple[GPU, ...]) -> dict[str, float]:
    prices = {g.name: GPU_HOURLY_USD[g.name] for g in gpus if g.name in GPU_HOURLY_USD}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, usd = part.partition("=")
        gpu = resolve_gpu(name)
        try:
            value = float(usd)
        except ValueError:
            raise UserError(f"--price: {part!r} is not GPU=USD_PER_HOUR") from None
        if not value >= 0:
            raise UserError(f"--price: {part!r}: the price must be ≥ 0")
        prices[gpu.name] = value
    return prices


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    from spdsim.schemes import SCHEMES
    if args.model not in MODEL_CATALOG:
        raise UserError(f"--model: unknown model {args.model!r} (catalog: {', '.join(MODEL_CATALOG)})")
    gpus = tuple(dict.fromkeys(resolve_gpu(g) for g in args.gpu.split(",")))
    if args.max_gpus < 1:
        raise UserError("--max-gpus: must be ≥ 1")
    serving = getattr(args, "qps", None) is not None or getattr(args, "max_qps", False)
    if serving == (args.target_tokens_per_s is not None):
        raise UserError("--target-tokens-per-s: give one of --target-tokens-per-s T, --qps R or --max-qps")
    if not serving and not args.target_tokens_per_s > 0:
        raise UserError("--target-tokens-per-s: must be > 0")
    if args.topology is not None and args.topology not in TOPOLOGY_KINDS:
        raise UserError(f"--topology: unknown {args.topology!r} (expected one of {', '.join(TOPOLOGY_KINDS)})")
    schemes = tuple(s.strip() for s in args.schemes.split(",") if s.strip())
    for s in schemes:
        if s not in SCHEMES:
            raise UserError(f"--schemes: unknown {s!r} (expected some of {', '.join(PLANNED_SCHEMES)})")
        if s not in PLANNED_SCHEMES:   # their device counts and bounds are not modelled here yet
            raise UserError(f"--schemes: {s!r} is not planned yet (plan knows {', '.join(PLANNED_SCHEMES)})")
    model = MODEL_CATALOG[args.model]
    tps = None
    if getattr(args, "tp", None):
        try:
            tps = tuple(dict.fromkeys(int(t) for t in args.tp.split(",") if t.strip()))
        except ValueError:
            raise UserError(f"--tp: {args.tp!r} is not a list of whole numbers") from None
        for t in tps:
            if t < 1 or t > args.max_gpus:
                raise UserError(f"--tp: {t} must be in 1..--max-gpus ({args.max_gpus})")
            why = tp_problem(model, t)
            if why:
                raise UserError(f"--tp: {why}")
        if not tps:
            raise UserError("--tp: must not be empty")
    partition = args.partition or ("compute_balanced" if serving else "uniform,compute_balanced,comm_aware")
    parts = tuple(p.strip() for p in partition.split(",") if p.strip())
    for p in parts:
        if p not in PARTITIONERS:
            raise UserError(f"--partition: unknown {p!r} (expected some of {', '.join(PARTITIONERS)})")
    if not schemes or not parts:
        raise UserError("--schemes / --partition: must not be empty")
    if not 0 <= args.headroom < 1:
        raise UserError("--headroom: must be in [0, 1)")
    for k in ("prompt_tokens", "new_tokens"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')}: must be ≥ 1")
    a, table = parse_acceptance(args.acceptance)
    return PlanRequest(model=MODEL_CATALOG[args.model], gpus=gpus, max_gpus=args.max_gpus,
                       target=args.target_tokens_per_s or 0.0, acceptance=a, acceptance_table=table,
                       workload=Workload(args.prompt_tokens, args.new_tokens), schemes=schemes,
                       partitions=parts, topology=args.topology, prices=parse_prices(args.price, gpus),
                       reserve=args.headroom, seed=args.seed, tps=tps)


def plan_command(args: argparse.Namespace) -> int:
    req = request_from_args(args)
    out = Path(args.out) if args.out else Path("reports") / f"plan-{req.model.name}"
    df = evaluate(req, jobs=args.jobs, dask=args.dask, quiet=args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "plan.csv", index=False)
    write_pareto(df, out / "pareto.png", req.target)
    cheapest, fastest = recommendations(df)
    counts = df["status"].value_counts()
    print(f"{req.model.name}, target {req.target:g} tok/s: {len(df)} configurations "
          f"({', '.join(f'{v} {k}' for k, v in counts.items())})")
    unpriced = [g.name for g in req.gpus if g.name not in req.prices]
    if unpriced:
        print(f"note: no hourly price for {', '.join(unpriced)}: ranked by GPU count")
    if cheapest is not None:
        print(f"cheapest meeting the target: {describe(cheapest)}")
    if fastest is not None:
        print(f"fastest:                     {describe(fastest)}")
    print(f"wrote {out / 'plan.csv'} and {out / 'pareto.png'}")
    if cheapest is None:
        if fastest is None:
            why = df.iloc[0]["reason"] if len(df) else "no configuration"
            print(f"no configuration fits in memory (e.g. {why})")
        else:
            print(f"no configuration reaches {req.target:g} tok/s; best achievable: {fastest['tokens_per_s']:.1f} tok/s")
        return 1
    return 0
