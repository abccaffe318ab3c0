"""Scenario YAML (DESIGN §5) → typed dataclasses, with every problem reported as one `UserError` line
that names the offending key.

    name: a100x8
    hardware: {gpu: a100-80gb-sxm, count: 8, topology: nvswitch}     # or inline numbers
    model: {name: llama-3-8b}                                         # or an inline shape
    workload: {prompt_tokens: 512, new_tokens: 256}
    head: {placement: colocated, layers: 1, features: true}           # the speculative module
    sweep: {stages: [1, 2, 4, 8], tp: [1, 2], partition: [uniform], acceptance: [0.8, 0.9], schemes: [ar, pp, spd]}
    costs: {layer_ms: 1.0}                                            # overrides of the roofline
    calibration: null                                                 # a `spdsim calibrate` file (later)
    seed: 0

Serving (several requests, DESIGN §5 ⚑): `workload.arrivals` / `requests` / length distributions are read
by `spdsim.workload`, the `serving:` section by `spdsim.serving_config`; each decode point then runs once
per policy × load (`serving_points`).

`sweep.acceptance` forms: a number or a list of numbers (i.i.d.); a list may also hold the mapping forms;
`{kind: table, values: {2: 0.9, 4: 0.85}}` (one α per stage count); `{kind: markov, mean: 0.8 | [..],
run_length: 3}`; `{kind: replay, file: seq.txt}` or `{kind: replay, sequence: [1, 0, 1]}`.

`sweep.tp` (default [1]): GPUs per stage, a TP group (DESIGN §2). Every scheme runs at every tp; `ar` at
tp t is plain tensor-parallel decoding. tp must divide model.heads (and model.kv_heads when kv_heads ≥
tp; when kv_heads < tp, tp must be a multiple of kv_heads: each rank keeps one replicated KV head).
With one tp value a stage count that does not fit the GPUs or their memory is an error, as without
TP; with several, such (tp, stages) combinations are skipped (a note says how many) and only a tp or a
stage count that fits in no combination is an error.

A file may hold several scenarios as YAML documents separated by `---` (`load_scenarios`; `spdsim run`
and `spdsim compare` take such files): each later document is merged over the first (mappings key by
key, anything else replaced), so it states only what differs, and needs its own `name`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from spdsim import acceptance as acc
from spdsim.acceptance import AcceptanceSpec
from spdsim.collectives import ALGORITHMS
from spdsim.costs import CostOverrides, fits, stage_memory_bytes
from spdsim.errors import UserError
from spdsim.hardware import (BOOL_TOPOLOGY_KEYS, GPU, GPU_CATALOG, TOPOLOGY_KEYS, TOPOLOGY_KINDS, Hardware,
                             TopologySpec, default_topology_params)
from spdsim.models import MODEL_CATALOG, ModelShape
from spdsim.serving_config import ServingSpec, parse_serving
from spdsim.workload import Workload, parse_workload
from spdsim.yamlkeys import as_list as _list, mapping as _mapping, num as _num, only as _only

SCHEMES = ("ar", "pp", "spd", "spd_dedicated", "sd", "chain")
PARTITIONERS = ("uniform", "compute_balanced", "comm_aware", "draft_colocated")
HEAD_PLACEMENTS = ("colocated", "dedicated")
TOP_KEYS = {"name", "description", "hardware", "model", "workload", "head", "sweep", "costs",
            "calibration", "seed", "baselines", "serving"}
SERVING_SCHEMES = ("ar", "pp", "spd")     # what the multi-request pipeline (spdsim.serving) runs
# An EAGLE head trained by a user, acceptance by position (REFERENCE.md: SafeAILab/EAGLE #191).
EAGLE_TABLE = (0.701, 0.370, 0.206, 0.125, 0.081)


@dataclass(frozen=True)
class HeadSpec:
    """The speculative module: where it runs, its size, whether it drafts from pipeline features."""
    placement: str = "colocated"   # colocated with stage 1 (n devices) | dedicated (n + 1 devices)
    layers: int = 1
    features: bool = True          # each stage sends its checkpoint features to the module every tick
    checkpoints_per_stage: int = 1


@dataclass(frozen=True)
class SdSpec:
    """Classic draft-model speculative decoding (scheme sd): γ drafts per step, draft cost ratio c."""
    gamma: int = 4
    cost_ratio: float = 0.05          # one drafted token = c × one full target forward
    draft_ms: float | None = None     # or a fixed time per drafted token


@dataclass(frozen=True)
class ChainSpec:
    """EAGLE-style chain drafting (scheme chain): per-position acceptance table, γ = its length."""
    acceptance: tuple[float, ...] = EAGLE_TABLE
    head_layers: int = 1
    draft_ms: float | None = None


@dataclass(frozen=True)
class Baselines:
    """The `baselines:` section: parameters of the sd and chain schemes."""
    sd: SdSpec = SdSpec()
    chain: ChainSpec = ChainSpec()

    def chain_point_acceptance(self) -> AcceptanceSpec:
        t = self.chain.acceptance
        return AcceptanceSpec("chain", t[0], label="chain:" + "/".join(f"{a:g}" for a in t))


@dataclass(frozen=True)
class Point:
    """One simulated configuration of the sweep."""
    scheme: str
    stages: int
    partition: str
    acceptance: AcceptanceSpec | None   # None for AR / PP
    tp: int = 1                         # GPUs per stage (a TP group)
    policy: str | None = None           # serving (workload.arrivals): serving.policy
    load: float | None = None           # serving: the arrival rate (poisson) or users (closed); None: trace

    @property
    def point_id(self) -> str:
        tp = f"-t{self.tp}" if self.tp > 1 else ""
        pid = f"{self.scheme}-n{self.stages}{tp}-{self.partition}"
        if self.acceptance is not None:
            label = self.acceptance.label.replace(":", "_").replace("/", "_")
            pid += f"-a{label}" if self.acceptance.kind != "markov" else f"-markov{label}"
        if self.policy is not None:
            pid += f"-{self.policy}"
        if self.load is not None:
            pid += f"-load{self.load:g}"
        return pid


@dataclass
class Sweep:
    stages: list[int]
    partitions: list[str]
    schemes: list[str]
    acceptance: list[AcceptanceSpec] = field(default_factory=list)
    acceptance_table: dict[int, AcceptanceSpec] | None = None   # kind: table
    tp: list[int] = field(default_factory=lambda: [1])

    def acceptance_for(self, n: int) -> list[AcceptanceSpec]:
        if self.acceptance_table is not None:
            return [self.acceptance_table[n]]
        return self.acceptance


@dataclass
class Scenario:
    name: str
    hardware: Hardware
    model: ModelShape
    workload: Workload
    head: HeadSpec
    sweep: Sweep
    costs: CostOverrides
    calibration: str | None = None
    seed: int = 0
    text: str = ""                  # the YAML as given (copied next to results)
    path: Path | None = None
    notes: list[str] = field(default_factory=list)   # things skipped, said once on stderr
    baselines: Baselines = Baselines()
    combos: list[tuple[int, int]] | None = None      # (tp, stages) that fit (set by the checks; None: all)
    serving: ServingSpec | None = None   # set exactly when workload.arrivals is

    def calibration_path(self) -> Path | None:
        """The `calibration:` file: as written when it exists from here, else next to the scenario file."""
        if not self.calibration:
            return None
        path = Path(self.calibration)
        if not path.is_absolute() and self.path is not None and not path.exists():
            path = self.path.parent / path
        return path

    @property
    def max_ctx(self) -> int:
        return self.workload.prompt_tokens + self.workload.new_tokens

    def ar_fits(self, tp: int = 1) -> bool:
        """The whole model on one GPU (tp = 1) or on one TP group of tp GPUs that the hardware has."""
        m = self.model
        if tp > 1 and group_problem(self, tp, 1):
            return False
        return fits(stage_memory_bytes(m, m.layers, True, True, self.max_ctx, 0, tp), self.hardware.gpu)

    def points(self) -> list[Point]:
        """Every point of the sweep: for each tp, the one-group baselines (ar, chain, sd at one stage),
        then per stage count and partition pp, spd, spd_dedicated, sd. tp = 1 first (as without TP)."""
        out: list[Point] = []
        schemes = self.sweep.schemes
        for tp in self.sweep.tp:
            if "ar" in schemes and self.ar_fits(tp):
                out.append(Point("ar", 1, "uniform", None, tp))
            if self.ar_fits(tp):          # the one-device (one-group) baselines
                if "chain" in schemes:
                    out.append(Point("chain", 1, "uniform", self.baselines.chain_point_acceptance(), tp))
                if "sd" in schemes and (self.sweep.acceptance_table is None or 1 in self.sweep.acceptance_table):
                    out += [Point("sd", 1, "uniform", a, tp) for a in self.sweep.acceptance_for(1)]
            for n in self.sweep.stages:
                if self.combos is not None and (tp, n) not in self.combos:
                    continue
                for part in self.sweep.partitions:
                    if "pp" in schemes:
                        out.append(Point("pp", n, part, None, tp))
                    for scheme in ("spd", "spd_dedicated", "sd"):
                        if scheme not in schemes or (scheme != "spd" and n == 1):
                            continue
                        out += [Point(scheme, n, part, a, tp) for a in self.sweep.acceptance_for(n)]
        if self.serving is not None:
            out = serving_points(out, self.serving, self.workload)
        return out


def serving_points(base: list[Point], serving: ServingSpec, workload: Workload) -> list[Point]:
    """Each decode point × policy × load. spd_first and adaptive differ from interleave only in how
    drafts enter, so points that draft nothing (AR, PP, SPD on one stage) run fcfs and interleave; PP
    and SPD on one stage are AR, and are left out where the AR point is there."""
    loads = list(workload.arrivals.loads) or [None]
    ar_tps = {p.tp for p in base if p.scheme == "ar"}
    out = []
    for p in base:
        if p.scheme in ("pp", "spd") and p.stages == 1 and p.tp in ar_tps:
            continue
        drafts = p.scheme == "spd" and p.stages > 1
        for policy in serving.policies:
            if not drafts and policy in ("spd_first", "adaptive"):
                continue
            out += [replace(p, policy=policy, load=load) for load in loads]
    return out


# --- parsing helpers --------------------------------------------------------------------------------

def _gpu(obj: Any) -> GPU:
    if isinstance(obj, str):
        if obj not in GPU_CATALOG:
            raise UserError(f"hardware.gpu: unknown GPU {obj!r} (catalog: {', '.join(GPU_CATALOG)})")
        return GPU_CATALOG[obj]
    d = _mapping(obj, "hardware.gpu")
    allowed = {f.name for f in fields(GPU)}
    _only(d, allowed, "hardware.gpu")
    base = GPU_CATALOG.get(d.get("name", ""))
    vals: dict[str, Any] = dict(base.__dict__) if base else {"name": str(d.get("name", "custom"))}
    for k, v in d.items():
        if k == "name":
            vals[k] = str(v)
        else:
            vals[k] = _num(v, f"hardware.gpu.{k}", nonneg=True)
    for k in ("mem_gb", "hbm_gbps", "bf16_tflops"):
        if k not in vals:
            raise UserError(f"hardware.gpu.{k}: missing (an inline GPU needs mem_gb, hbm_gbps, bf16_tflops)")
        _num(vals[k], f"hardware.gpu.{k}", positive=True)
    return GPU(**vals)


def _topology(obj: Any, gpu: GPU) -> TopologySpec:
    if obj is None:
        obj = "nvswitch" if gpu.nvlink_gbps else "pcie-tree"
    if isinstance(obj, str):
        obj = {"kind": obj}
    d = _mapping(obj, "hardware.topology")
    kind = d.get("kind")
    if kind not in TOPOLOGY_KINDS:
        raise UserError(f"hardware.topology.kind: unknown {kind!r} (expected one of {', '.join(TOPOLOGY_KINDS)})")
    _only(d, TOPOLOGY_KEYS[kind] | {"kind"}, "hardware.topology")
    params = default_topology_params(kind, gpu)
    for k, v in d.items():
        if k == "kind":
            continue
        if k in BOOL_TOPOLOGY_KEYS:
            if not isinstance(v, bool):
                raise UserError(f"hardware.topology.{k}: expected true or false")
            params[k] = 1.0 if v else 0.0
            continue
        integer = k in ("gpus_per_switch", "switches_per_bridge", "nodes", "gpus_per_node")
        positive = integer or k.endswith("gbps")
        params[k] = _num(v, f"hardware.topology.{k}", positive=positive, nonneg=True, integer=integer)
    return TopologySpec(kind, params)


def _hardware(obj: Any) -> Hardware:
    d = _mapping(obj, "hardware")
    _only(d, {"gpu", "count", "topology"}, "hardware")
    if "gpu" not in d:
        raise UserError("hardware.gpu: missing")
    gpu = _gpu(d["gpu"])
    count = _num(d.get("count", 1), "hardware.count", positive=True, integer=True)
    return Hardware(gpu, count, _topology(d.get("topology"), gpu))


def _model(obj: Any) -> ModelShape:
    if isinstance(obj, str):
        obj = {"name": obj}
    d = _mapping(obj, "model")
    allowed = {f.name for f in fields(ModelShape)}
    _only(d, allowed, "model")
    name = d.get("name")
    base = MODEL_CATALOG.get(name) if isinstance(name, str) else None
    if base is None and set(d) <= {"name"}:
        raise UserError(f"model.name: unknown model {name!r} (catalog: {', '.join(MODEL_CATALOG)}; "
                        "or give an inline shape)")
    vals: dict[str, Any] = dict(base.__dict__) if base else {"name": str(name or "custom")}
    for k, v in d.items():
        if k in ("weight_bytes", "kv_bytes"):      # bf16 2, fp8 / int8 1, int4 0.5
            vals[k] = _num(v, f"model.{k}", nonneg=True)
        elif k != "name":
            vals[k] = _num(v, f"model.{k}", integer=True)
    for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab"):
        if k not in vals:
            raise UserError(f"model.{k}: missing (an inline model needs layers, hidden, ffn, heads, kv_heads, vocab)")
        if vals[k] <= 0:
            raise UserError(f"model.{k}: must be > 0")
    vals.setdefault("dtype_bytes", 2)
    if vals["dtype_bytes"] <= 0:
        raise UserError("model.dtype_bytes: must be > 0")
    if vals.get("head_dim", 0) < 0:
        raise UserError("model.head_dim: must be ≥ 0")
    if not vals.get("head_dim") and vals["hidden"] % vals["heads"]:
        raise UserError(f"model.heads: {vals['heads']} does not divide model.hidden {vals['hidden']}")
    if vals["heads"] % vals["kv_heads"]:
        raise UserError(f"model.kv_heads: {vals['kv_heads']} does not divide model.heads {vals['heads']}")
    return ModelShape(**vals)


def _head(obj: Any) -> HeadSpec:
    d = _mapping(obj or {}, "head")
    _only(d, {f.name for f in fields(HeadSpec)}, "head")
    h = HeadSpec()
    placement = d.get("placement", h.placement)
    if placement not in HEAD_PLACEMENTS:
        raise UserError(f"head.placement: {placement!r} (expected one of {', '.join(HEAD_PLACEMENTS)})")
    features = d.get("features", h.features)
    if not isinstance(features, bool):
        raise UserError("head.features: expected true or false")
    return HeadSpec(placement=placement,
                    layers=_num(d.get("layers", h.layers), "head.layers", nonneg=True, integer=True),
                    features=features,
                    checkpoints_per_stage=_num(d.get("checkpoints_per_stage", h.checkpoints_per_stage),
                                               "head.checkpoints_per_stage", positive=True, integer=True))


def _acceptance(obj: Any, base: Path | None) -> tuple[list[AcceptanceSpec], dict[int, AcceptanceSpec] | None]:
    key = "sweep.acceptance"
    if isinstance(obj, dict) and obj.get("kind") == "table":
        _only(obj, {"kind", "values"}, key)
        values = _mapping(obj.get("values"), f"{key}.values")
        table = {}
        for n, a in values.items():
            n = _num(n, f"{key}.values", positive=True, integer=True)
            spec = acc.iid(acc._check_alpha(a, f"{key}.values.{n}"))
            table[n] = AcceptanceSpec("table", spec.alpha, label=spec.label)
        return [], table
    out: list[AcceptanceSpec] = []
    for item in _list(obj):
        if isinstance(item, dict):
            kind = item.get("kind")
            if kind == "iid":
                _only(item, {"kind", "values"}, key)
                out += [acc.iid(acc._check_alpha(a, key)) for a in _list(item.get("values"))]
            elif kind == "markov":
                _only(item, {"kind", "mean", "run_length"}, key)
                if "mean" not in item:
                    raise UserError(f"{key}.mean: missing (markov needs mean and run_length)")
                out += [acc.markov(m, item.get("run_length", 1.0), key) for m in _list(item["mean"])]
            elif kind == "replay":
                _only(item, {"kind", "file", "sequence"}, key)
                out.append(acc.replay(item.get("sequence"), item.get("file"), key, base))
            else:
                raise UserError(f"{key}.kind: {kind!r} (expected iid, table, markov or replay)")
        else:
            out.append(acc.iid(acc._check_alpha(item, key)))
    if not out:
        raise UserError(f"{key}: empty")
    return out, None


def _sweep(obj: Any, base: Path | None) -> Sweep:
    d = _mapping(obj or {}, "sweep")
    _only(d, {"stages", "partition", "acceptance", "schemes", "tp"}, "sweep")
    stages = [_num(s, "sweep.stages", positive=True, integer=True) for s in _list(d.get("stages", [1, 2, 4]))]
    tps = [_num(t, "sweep.tp", positive=True, integer=True) for t in _list(d.get("tp", [1]))]
    parts = [str(p) for p in _list(d.get("partition", ["uniform"]))]
    for p in parts:
        if p not in PARTITIONERS:
            raise UserError(f"sweep.partition: unknown {p!r} (expected one of {', '.join(PARTITIONERS)})")
    schemes = [str(s) for s in _list(d.get("schemes", list(SCHEMES)))]
    for s in schemes:
        if s not in SCHEMES:
            raise UserError(f"sweep.schemes: unknown {s!r} (expected one of {', '.join(SCHEMES)})")
    accs, table = _acceptance(d.get("acceptance", [0.8]), base)
    if table is not None:
        missing = [n for n in stages if n not in table and (n > 1 or "spd" in schemes)]
        if missing and {"spd", "spd_dedicated", "sd"} & set(schemes):
            raise UserError(f"sweep.acceptance.values: no α for {missing[0]} stages")
    if not stages or not parts or not schemes or not tps:
        raise UserError("sweep: stages, tp, partition and schemes must not be empty")
    return Sweep(sorted(dict.fromkeys(stages)), list(dict.fromkeys(parts)), list(dict.fromkeys(schemes)),
                 accs, table, sorted(dict.fromkeys(tps)))


def _costs(obj: Any) -> CostOverrides:
    d = _mapping(obj or {}, "costs")
    allowed = {f.name for f in fields(CostOverrides)}
    _only(d, allowed, "costs")
    vals = {}
    for k, v in d.items():
        if v is None:
            continue
        if k == "allreduce":
            if v not in ALGORITHMS:
                raise UserError(f"costs.allreduce: {v!r} (expected one of {', '.join(ALGORITHMS)})")
            vals[k] = str(v)
            continue
        vals[k] = _num(v, f"costs.{k}", nonneg=True)
        if k == "hbm_efficiency" and not 0 < vals[k] <= 1:
            raise UserError(f"costs.hbm_efficiency: must be in (0, 1] (got {v})")
    return CostOverrides(**vals)


def _baselines(obj: Any) -> Baselines:
    d = _mapping(obj or {}, "baselines")
    _only(d, {"sd", "chain"}, "baselines")
    sd = _mapping(d.get("sd") or {}, "baselines.sd")
    _only(sd, {"gamma", "cost_ratio", "draft_ms"}, "baselines.sd")
    ch = _mapping(d.get("chain") or {}, "baselines.chain")
    _only(ch, {"acceptance", "head_layers", "draft_ms"}, "baselines.chain")
    s0, c0 = SdSpec(), ChainSpec()
    table = tuple(acc._check_alpha(a, "baselines.chain.acceptance") for a in _list(ch.get("acceptance", list(c0.acceptance))))
    if not table:
        raise UserError("baselines.chain.acceptance: empty")
    if any(b > a for a, b in zip(table, table[1:])):
        raise UserError("baselines.chain.acceptance: must not increase with position (draft k is accepted "
                        "only when drafts 1..k-1 were)")
    opt = lambda v, key: None if v is None else _num(v, key, nonneg=True)   # noqa: E731
    return Baselines(
        sd=SdSpec(gamma=_num(sd.get("gamma", s0.gamma), "baselines.sd.gamma", positive=True, integer=True),
                  cost_ratio=_num(sd.get("cost_ratio", s0.cost_ratio), "baselines.sd.cost_ratio", nonneg=True),
                  draft_ms=opt(sd.get("draft_ms"), "baselines.sd.draft_ms")),
        chain=ChainSpec(acceptance=table,
                        head_layers=_num(ch.get("head_layers", c0.head_layers), "baselines.chain.head_layers",
                                         nonneg=True, integer=True),
                        draft_ms=opt(ch.get("draft_ms"), "baselines.chain.draft_ms")))


def _extra_gpus(s: Scenario) -> int:
    """A dedicated device beside the stages (the module, or spd_dedicated's rank 0) for n > 1."""
    extra = 1 if s.head.placement == "dedicated" and "spd" in s.sweep.schemes else 0
    if "spd_dedicated" in s.sweep.schemes and any(p != "draft_colocated" for p in s.sweep.partitions):
        extra = 1       # rank 0 of the reference layout on a device of its own
    return extra


def _check_tp(s: Scenario) -> None:
    """Every tp divides the heads (and the KV heads, or is a multiple of them)."""
    m = s.model
    for tp in s.sweep.tp:
        if m.heads % tp:
            raise UserError(f"sweep.tp: {tp} does not divide model.heads {m.heads}")
        if m.kv_heads >= tp and m.kv_heads % tp:
            raise UserError(f"sweep.tp: {tp} does not divide model.kv_heads {m.kv_heads}")
        if m.kv_heads < tp and tp % m.kv_heads:
            raise UserError(f"sweep.tp: {tp} is not a multiple of model.kv_heads {m.kv_heads} (each rank "
                            "keeps one replicated KV head)")


def group_problem(s: Scenario, tp: int, n: int, extra: int = 0) -> str:
    """Why n stages of TP groups of tp (+ extra devices) cannot be placed ('' when they can)."""
    hw = s.hardware
    need = tp * n + extra
    if need > hw.count:
        what = f"{n} stage(s) × tp {tp}" + (" + a dedicated module" if extra else "")
        return f"{what} need {need} GPUs > {hw.count} (hardware.count)"
    topo = hw.graph
    if tp > 1 and not topo.tp_across_nodes and tp > max(len(d) for d in topo.domains):
        return (f"a TP group of {tp} GPUs would span nodes ({max(len(d) for d in topo.domains)} GPUs per node; "
                "set hardware.topology.tp_across_nodes: true to allow it)")
    return ""


def _stage_problem(s: Scenario, tp: int, n: int, extra: int) -> str:
    """Why n stages at tp do not fit the hardware ('' when they do): GPUs, nodes, memory per GPU."""
    m, hw = s.model, s.hardware
    why = group_problem(s, tp, n, extra if n > 1 else 0)
    if why:
        return why
    base, rem = divmod(m.layers, n)
    for i in range(n):
        nl = base + (1 if i < rem else 0)
        head_here = s.head.layers if (i == 0 and n > 1 and extra == 0 and "spd" in s.sweep.schemes) else 0
        need = stage_memory_bytes(m, nl, i == 0, i == n - 1, s.max_ctx, head_here, tp)
        if not fits(need, hw.gpu) and (n > 1 or "pp" in s.sweep.schemes or "spd" in s.sweep.schemes):
            per = f" per GPU at tp {tp}" if tp > 1 else " on one device"
            return (f"{n} stage(s) of {m.name} need {need / 1e9:.1f} GB{per}, more than {hw.gpu.name}'s "
                    f"{hw.gpu.mem_gb:g} GB allows")
    return ""


def _check_serving(s: Scenario) -> None:
    """What the multi-request pipeline models (spdsim.serving): AR, PP and SPD, a co-located module."""
    if not s.workload.serving:
        return
    other = [x for x in s.sweep.schemes if x not in SERVING_SCHEMES]
    if other:
        raise UserError(f"sweep.schemes: {other[0]} is not modelled with workload.arrivals "
                        f"(serving runs {', '.join(SERVING_SCHEMES)})")
    if s.head.placement != "colocated" and "spd" in s.sweep.schemes:
        raise UserError("head.placement: serving (workload.arrivals) models the co-located module only")


def _check_fit(s: Scenario) -> None:
    """n ≤ layers, tp × n (+1 for a dedicated head) ≤ GPUs, and the uniform partition fits in memory."""
    m, hw = s.model, s.hardware
    _check_tp(s)
    extra = _extra_gpus(s)
    for n in s.sweep.stages:
        if n > m.layers:
            raise UserError(f"sweep.stages: {n} > model.layers {m.layers}")
    if len(s.sweep.tp) == 1:
        # one TP degree: every stage count must fit, as without TP
        tp = s.sweep.tp[0]
        key = "sweep.stages" if tp == 1 else "sweep.tp"
        for n in s.sweep.stages:
            if tp == 1 and n + (extra if n > 1 else 0) > hw.count:
                what = f"{n} stages + a dedicated head" if extra and n > 1 else f"{n}"
                raise UserError(f"sweep.stages: {what} > {hw.count} GPUs (hardware.count)")
            why = _stage_problem(s, tp, n, extra)
            if why:
                raise UserError(f"{key}: {why}")
    else:
        # several: skip the (tp, n) that do not fit; a tp or a stage count that never fits is an error
        ok, skipped = [], []
        for tp in s.sweep.tp:
            for n in s.sweep.stages:
                why = _stage_problem(s, tp, n, extra)
                (skipped if why else ok).append((tp, n, why))
        for tp in s.sweep.tp:
            if not any(t == tp for t, _, _ in ok):
                raise UserError(f"sweep.tp: {tp} fits with no stage count: "
                                + next(w for t, _, w in skipped if t == tp))
        for n in s.sweep.stages:
            if not any(k == n for _, k, _ in ok):
                raise UserError(f"sweep.stages: {n} fits at no tp: " + next(w for _, k, w in skipped if k == n))
        s.combos = [(t, n) for t, n, _ in ok]
        if skipped:
            s.notes.append(f"skipped {len(skipped)} (tp, stages) combination(s) the hardware cannot hold, e.g. "
                           f"tp {skipped[0][0]} × {skipped[0][1]} stage(s): {skipped[0][2]}")
    if "ar" in s.sweep.schemes and not s.ar_fits():
        if s.sweep.schemes == ["ar"] and s.sweep.tp == [1]:
            raise UserError(f"sweep.schemes: ar needs {m.name} on one {hw.gpu.name}, and it does not fit")
        if 1 in s.sweep.tp:
            s.notes.append(f"{m.name} does not fit one {hw.gpu.name}: no AR point, speedup_vs_ar left empty")


def parse_scenario(text: str, name: str = "scenario", path: Path | None = None) -> Scenario:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path or name}: not valid YAML{where}") from None
    d = _mapping(data if data is not None else {}, "scenario")
    _only(d, TOP_KEYS, "")
    for k in ("hardware", "model"):
        if k not in d:
            raise UserError(f"{k}: missing")
    base = path.parent if path else None
    calibration = d.get("calibration")
    if calibration is not None and not isinstance(calibration, str):
        raise UserError("calibration: expected a file name or null")
    seed = _num(d.get("seed", 0), "seed", nonneg=True, integer=True)
    workload = parse_workload(d.get("workload"), base)
    if "serving" in d and not workload.serving:
        raise UserError("serving: needs workload.arrivals (without them one request is decoded alone)")
    s = Scenario(name=str(d.get("name", name)), hardware=_hardware(d["hardware"]), model=_model(d["model"]),
                 workload=workload, head=_head(d.get("head")),
                 sweep=_sweep(d.get("sweep"), base), costs=_costs(d.get("costs")),
                 calibration=calibration, seed=seed, text=text, path=path,
                 baselines=_baselines(d.get("baselines")),
                 serving=parse_serving(d.get("serving"), base) if workload.serving else None)
    _check_serving(s)
    _check_fit(s)
    return s


def _merged(base: Any, over: Any) -> Any:
    """over merged onto base: mappings key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merged(base.get(k), v) if k in base else v
        return out
    return over


def parse_scenarios(text: str, name: str = "scenario", path: Path | None = None) -> list[Scenario]:
    """Every scenario of a file: one per YAML document, each later one merged over the first."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path or name}: not valid YAML{where}") from None
    if len(docs) <= 1:
        return [parse_scenario(text, name, path)]
    first = _mapping(docs[0], "scenario")
    out, names = [], set()
    for i, doc in enumerate(docs):
        d = first if i == 0 else _merged(first, _mapping(doc, f"scenario document {i + 1}"))
        if i > 0 and "name" not in doc:
            raise UserError(f"{path or name}: document {i + 1}: name: missing (each scenario of a file needs its own)")
        try:
            sc = parse_scenario(yaml.safe_dump(d, sort_keys=False), name, path)
        except UserError as e:
            raise UserError(f"{path or name}: document {i + 1}: {e}") from None
        if sc.name in names:
            raise UserError(f"{path or name}: document {i + 1}: name: {sc.name!r} is used twice")
        names.add(sc.name)
        sc.text = text
        out.append(sc)
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read scenario ({e.strerror})") from None


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Every scenario of a file (several YAML documents: several scenarios; see the module docstring)."""
    path = Path(path)
    return parse_scenarios(_read(path), name=path.stem, path=path)


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    text = _read(path)
    if text.lstrip().startswith("---") or "\n---" in text:
        found = parse_scenarios(text, name=path.stem, path=path)
        if len(found) > 1:
            raise UserError(f"{path}: holds {len(found)} scenarios ({', '.join(s.name for s in found)}); "
                            "this command takes a file with one")
        return found[0]
    return parse_scenario(text, name=path.stem, path=path)
