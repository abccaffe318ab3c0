"""Partitioners: cut L layers into n contiguous stages and place the stages (and a dedicated
speculative module) on devices.

  uniform           equal layer counts (the first L mod n stages get one more), stage s on gpu<s>
  compute_balanced  minimise the slowest stage, counting the embedding on stage 1, the LM head on stage
                    n and a co-located speculative module on stage 1's device: an exact DP over linear
                    partitions; placement as uniform
  comm_aware        compute_balanced's layers, and the placement (on the topology) that minimises the
                    estimated time per token, counting activation sends, the RESULT back to stage 1 and
                    the per-tick feature sends to the module's device (`estimate_token_s`)
  draft_colocated   the reference layout on n GPUs: the speculative module (and rank 0's embedding, LM
                    head and verification) shares stage 1's device. Min-max DP with the draft time
                    counted on stage 1 and the LM head on no stage (rank 0 applies it after the last
                    stage, in every cycle, whatever the cut), so stage 1 gets fewer layers and the
                    cycle — the slowest of (embed + stage 1 + draft) and the other stages — is as short
                    as it can be; placement as uniform. Under scheme spd the last stage does hold the LM
                    head, so there this cut is close to, not exactly, the best.

All stage times are taken at a reference context (prompt + half the new tokens).

Tensor parallelism (tp > 1): each stage runs on a TP group of tp devices (`Plan.groups`; its first
device, TP rank 0, is `placement[s]`: the rank that sends RESULT and features, `spdsim.protocol`).
`default_groups` keeps every group inside one of the topology's domains — a node (multi-node), a PCIe
switch (pcie-tree) — where it fits, filling domains in order, so pipeline stages, not TP groups, cross
nodes; uniform, compute_balanced and draft_colocated use it. comm_aware starts from it and swaps
devices between groups (and with unused devices) while `estimate_token_s` — now counting every stage's
all-reduces on its group, the tp parallel activation messages and stage 1's issue to its TP peers —
improves. The memory check is per GPU of a group (`costs.stage_memory_bytes(..., tp)`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from spdsim.costs import CostModel, fits, stage_memory_bytes
from spdsim.errors import UserError
from spdsim.hardware import GPU, Topology
from spdsim.models import ModelShape

RESULT_BYTES = 16          # a token id + epoch + position
EXHAUSTIVE_LIMIT = 5040    # placements tried one by one up to this many (7!), local search beyond


@dataclass(frozen=True)
class Plan:
    partition: str
    layers: tuple[tuple[int, int], ...]      # [first, last) layer of each stage
    placement: tuple[str, ...]               # device of each stage (its TP rank 0)
    head_device: str | None                  # the speculative module's device; None when nothing drafts
    groups: tuple[tuple[str, ...], ...] = field(default=())   # each stage's TP group; () without TP

    @property
    def stages(self) -> int:
        return len(self.layers)

    @property
    def tp(self) -> int:
        return len(self.groups[0]) if self.groups else 1

    def group(self, s: int) -> tuple[str, ...]:
        return self.groups[s] if self.groups else (self.placement[s],)

    def placement_str(self) -> str:
        """The results' `placement` column: devices by stage; a TP group as gpu0+gpu1."""
        if not self.groups:
            return ",".join(self.placement)
        return ",".join("+".join(g) for g in self.groups)

    @property
    def gpus(self) -> int:
        """GPUs the plan occupies: every stage's group, and the module's device when it is apart."""
        used = {d for s in range(self.stages) for d in self.group(s)}
        if self.head_device is not None:
            used.add(self.head_device)
        return len(used)

    @property
    def head_colocated(self) -> bool:
        return self.head_device is not None and self.head_device == self.placement[0]

    def layers_str(self) -> str:
        return "|".join(f"{a}-{b}" for a, b in self.layers)


@dataclass(frozen=True)
class PlanInputs:
    """What a partitioner needs to know (a scenario, reduced)."""
    model: ModelShape
    costs: CostModel
    topology: Topology
    gpu: GPU
    n: int
    drafts: bool = False            # SPD is in the sweep: a speculative module exists
    dedicated_head: bool = False
    head_layers: int = 1
    features: bool = True
    checkpoints_per_stage: int = 1
    alpha: float = 0.8              # comm_aware's reference acceptance
    ctx: int = 512                  # reference context length for stage times
    max_ctx: int = 768              # for memory
    tp: int = 1                     # GPUs per stage; `costs` is bound to it (and to `groups`)
    groups: tuple[tuple[str, ...], ...] = ()   # tp > 1: the default TP groups (`default_groups`)

    @property
    def has_head(self) -> bool:
        return self.drafts and self.n > 1


def uniform_layers(L: int, n: int) -> tuple[tuple[int, int], ...]:
    base, rem = divmod(L, n)
    out, a = [], 0
    for s in range(n):
        b = a + base + (1 if s < rem else 0)
        out.append((a, b))
        a = b
    return tuple(out)


def default_groups(topology: Topology, n: int, tp: int, extra: int = 0) -> tuple[tuple[tuple[str, ...], ...],
                                                                                tuple[str, ...]]:
    """(n TP groups of tp devices, `extra` more single devices): each group inside one domain of the
    topology where one has room (domains filled in order), else on the first free devices (across
    domains, where the topology allows it); the extra devices (a dedicated module) after them."""
    free = [list(d) for d in topology.domains] or [list(topology.devices)]
    groups = []
    for s in range(n):
        dom = next((d for d in free if len(d) >= tp), None)
        if dom is None:
            if not topology.tp_across_nodes:
                raise UserError(f"sweep.tp: a TP group of {tp} GPUs does not fit inside one node "
                                f"({max(len(d) for d in topology.domains)} GPUs per node) and "
                                "hardware.topology.tp_across_nodes is false")
            left = [x for x in topology.devices if any(x in d for d in free)]
            if len(left) < tp:
                raise UserError(f"sweep.tp: {n} stages × tp {tp} need {n * tp} GPUs, "
                                f"hardware.count is {len(topology.devices)}")
            take = left[:tp]
        else:
            take = dom[:tp]
        for d in free:
            d[:] = [x for x in d if x not in take]
        groups.append(tuple(take))
    left = [x for x in topology.devices if any(x in d for d in free)]
    if len(left) < extra:
        raise UserError(f"sweep.tp: {n} stages × tp {tp} + {extra} need {n * tp + extra} GPUs, "
                        f"hardware.count is {len(topology.devices)}")
    return tuple(groups), tuple(left[:extra])


def stage_times(inp: PlanInputs, layers: Sequence[tuple[int, int]], costs: CostModel | None = None) -> list[float]:
    """Per-stage time on its device for one token: layers, embedding / LM head, a co-located module."""
    n = len(layers)
    costs = costs or inp.costs
    out = []
    for s, (a, b) in enumerate(layers):
        t = costs.stage_s(s, a, b, inp.ctx, s == 0, s == n - 1)
        if s == 0 and inp.has_head and not inp.dedicated_head:
            t += costs.head_s(inp.ctx)
        out.append(t)
    return out


def _fits(inp: PlanInputs, s: int, a: int, b: int) -> bool:
    head = inp.head_layers if (s == 0 and inp.has_head and not inp.dedicated_head) else 0
    return fits(stage_memory_bytes(inp.model, b - a, s == 0, s == inp.n - 1, inp.max_ctx, head, inp.tp), inp.gpu)


def balanced_layers(inp: PlanInputs, lm_head_last: bool = True) -> tuple[tuple[int, int], ...]:
    """Exact min-max linear partition by dynamic programming over (stage, layers covered).

    lm_head_last=False: the LM head is not on the last stage (the reference layout's rank 0 holds it)."""
    L, n = inp.model.layers, inp.n
    lt = [inp.costs.layer_s(i, inp.ctx) for i in range(L)]
    prefix = [0.0]
    for t in lt:
        prefix.append(prefix[-1] + t)
    draft = inp.costs.draft_s(inp.ctx)
    first_extra = inp.costs.embed_s() + (draft if inp.has_head and not inp.dedicated_head else 0.0)
    last_extra = inp.costs.lm_head_s() if lm_head_last else 0.0

    def cost(s: int, a: int, b: int) -> float:
        if not _fits(inp, s, a, b):
            return math.inf
        t = prefix[b] - prefix[a]
        if s == 0:
            t += first_extra
        if s == n - 1:
            t += last_extra
        return t

    INF = math.inf
    # best[s][j]: slowest stage when stages 0..s-1 cover layers [0, j)
    best = [[INF] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for s in range(1, n + 1):
        for j in range(s, L - (n - s) + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == INF:
                    continue
                v = max(best[s - 1][i], cost(s - 1, i, j))
                if v < best[s][j] - 1e-15:
                    best[s][j], cut[s][j] = v, i
    if best[n][L] == INF:
        raise UserError(f"sweep.stages: no {n}-stage partition of {inp.model.name} fits {inp.gpu.name} memory")
    bounds, j = [], L
    for s in range(n, 0, -1):
        i = cut[s][j]
        bounds.append((i, j))
        j = i
    return tuple(reversed(bounds))


# --- placement ----------------------------------------------------------------------------------

def estimate_token_s(inp: PlanInputs, layers: Sequence[tuple[int, int]], placement: Sequence[str],
                     head_device: str | None, groups: Sequence[tuple[str, ...]] | None = None) -> float:
    """Expected seconds per committed token under SPD at acceptance inp.alpha (PP when nothing drafts).

    period: the steady-state tick, the slowest of each stage, the first device (stage 1 + a co-located
    module, delayed by feature arrival) and the busiest link per tick; RT: one round trip through the
    pipeline and back. Accepted drafts cost max(period, RT/n), rejected ones RT. With TP groups: each
    stage's time on its own group (its all-reduces), the slowest of the tp parallel activation
    messages, and stage 1 waiting for its issue to reach its TP peers."""
    n = len(layers)
    topo = inp.topology
    act = inp.model.activation_bytes
    costs = inp.costs.with_tp(inp.tp, tuple(groups)) if groups else inp.costs
    issue = 0.0
    if groups:
        S = stage_times(inp, layers, costs)
        issue = max((topo.transfer_s(groups[0][0], d, RESULT_BYTES) for d in groups[0][1:]), default=0.0)
        S[0] += issue
        hops = [max(topo.transfer_s(a, b, act) for a, b in zip(groups[j], groups[j + 1])) for j in range(n - 1)]
    else:
        S = stage_times(inp, layers)
        hops = [topo.transfer_s(placement[j], placement[j + 1], act) for j in range(n - 1)]
    rt = sum(S) + sum(hops)
    rt += topo.transfer_s(placement[-1], placement[0], RESULT_BYTES)
    rt += (2 * n - 1) * inp.costs.msg_overhead_s
    if not inp.has_head:
        return rt
    busy: dict[tuple[str, str], float] = {}

    def load(src: str, dst: str, nbytes: int) -> None:
        for u, v in topo.path(src, dst):
            busy[(u, v)] = busy.get((u, v), 0.0) + nbytes / topo.edge(u, v)[1]

    for j in range(n - 1):
        for a, b in (zip(groups[j], groups[j + 1]) if groups else ((placement[j], placement[j + 1]),)):
            load(a, b, act)
    load(placement[-1], placement[0], RESULT_BYTES)
    lag = 0.0
    if inp.features:
        fb = act * inp.checkpoints_per_stage
        for j in range(n):
            if placement[j] != head_device:
                load(placement[j], head_device, fb)
                lag = max(lag, topo.transfer_s(placement[j], head_device, fb))
    h = inp.costs.head_s(inp.ctx)
    s0 = costs.stage_s(0, layers[0][0], layers[0][1], inp.ctx, True, n == 1) + issue
    first = max(s0, lag) + h if head_device == placement[0] else max(s0, lag + h)
    period = max([first, *S[1:], *busy.values()])
    a = inp.alpha
    return a * max(period, rt / n) + (1 - a) * rt


def _score(inp: PlanInputs, layers, devs: tuple[str, ...]) -> float:
    placement = devs[:inp.n]
    head = (devs[inp.n] if inp.dedicated_head else placement[0]) if inp.has_head else None
    return estimate_token_s(inp, layers, placement, head)


def best_placement(inp: PlanInputs, layers, exhaustive_limit: int = EXHAUSTIVE_LIMIT) -> tuple[str, ...]:
    """Devices for the n stages (+ the dedicated module last) minimising estimate_token_s.

    Exhaustive over ordered device choices when there are few; otherwise pairwise-swap local search
    (swaps among chosen devices and with unused ones) from the identity placement. Ties keep the
    earlier candidate, so symmetric topologies keep the identity placement."""
    devices = inp.topology.devices
    k = inp.n + (1 if inp.has_head and inp.dedicated_head else 0)
    if k > len(devices):
        raise UserError(f"sweep.stages: {inp.n} stages need {k} GPUs, hardware.count is {len(devices)}")
    total = math.perm(len(devices), k)
    identity = tuple(devices[:k])
    if total <= exhaustive_limit:
        best, best_v = identity, _score(inp, layers, identity)
        for devs in itertools.permutations(devices, k):
            v = _score(inp, layers, devs)
            if v < best_v - 1e-15:
                best, best_v = devs, v
        return best
    cur, cur_v = list(identity), _score(inp, layers, identity)
    improved = True
    while improved:
        improved = False
        unused = [d for d in devices if d not in cur]
        for i in range(k):
            for j in range(i + 1, k + len(unused)):
                cand = list(cur)
                if j < k:
                    cand[i], cand[j] = cand[j], cand[i]
                else:
                    cand[i] = unused[j - k]
                v = _score(inp, layers, tuple(cand))
                if v < cur_v - 1e-15:
                    cur, cur_v, improved = cand, v, True
                    break
            if improved:
                break
    return tuple(cur)


def _split(inp: PlanInputs, flat: Sequence[str]) -> tuple[tuple[tuple[str, ...], ...], str | None]:
    """A flat device list (group 0's devices, group 1's, ..., then the dedicated module's) as groups."""
    t, n = inp.tp, inp.n
    groups = tuple(tuple(flat[s * t:(s + 1) * t]) for s in range(n))
    head = None
    if inp.has_head:
        head = flat[n * t] if inp.dedicated_head else groups[0][0]
    return groups, head


def best_group_placement(inp: PlanInputs, layers) -> tuple[tuple[tuple[str, ...], ...], str | None]:
    """TP groups (and a dedicated module's device) minimising estimate_token_s: pairwise-swap local
    search from `default_groups`, swapping devices between different groups and with unused devices
    (a swap inside one group changes nothing but its rank 0). Ties keep the default. A group may not
    span nodes where the topology forbids it."""
    topo = inp.topology
    extra = 1 if inp.has_head and inp.dedicated_head else 0
    groups, more = default_groups(topo, inp.n, inp.tp, extra)
    t, k = inp.tp, inp.n * inp.tp + extra

    def score(flat: Sequence[str]) -> float:
        g, head = _split(inp, flat)
        if not topo.tp_across_nodes and any(len({topo.node_of.get(d, 0) for d in grp}) > 1 for grp in g):
            return math.inf
        return estimate_token_s(inp, layers, tuple(grp[0] for grp in g), head, g)

    cur = [d for grp in groups for d in grp] + list(more)
    cur_v = score(cur)
    improved = True
    while improved:
        improved = False
        unused = [d for d in topo.devices if d not in cur]
        for i in range(k):
            for j in range(i + 1, k + len(unused)):
                if j < k and i // t == j // t and j < inp.n * t:
                    continue                     # same group
                cand = list(cur)
                if j < k:
                    cand[i], cand[j] = cand[j], cand[i]
                else:
                    cand[i] = unused[j - k]
                v = score(cand)
                if v < cur_v - 1e-15:
                    cur, cur_v, improved = cand, v, True
                    break
            if improved:
                break
    return _split(inp, cur)


def _make_tp_plan(kind: str, inp: PlanInputs) -> Plan:
    """make_plan for tp > 1: the partitioners' layer cuts on TP-bound costs, TP groups for devices."""
    n = inp.n
    extra = 1 if inp.has_head and inp.dedicated_head else 0
    if kind == "draft_colocated":
        inp = replace(inp, drafts=True, dedicated_head=False)
        extra = 0
    groups, more = default_groups(inp.topology, n, inp.tp, extra)
    if kind == "uniform":
        layers = uniform_layers(inp.model.layers, n)
    elif kind in ("compute_balanced", "comm_aware"):
        layers = balanced_layers(inp)
    elif kind == "draft_colocated":
        layers = balanced_layers(inp, lm_head_last=False)
    else:
        raise UserError(f"sweep.partition: unknown {kind!r}")
    head = (more[0] if extra else groups[0][0]) if inp.has_head else None
    if kind == "comm_aware":
        groups, head = best_group_placement(inp, layers)
    for s, (a, b) in enumerate(layers):
        if not _fits(inp, s, a, b):
            need = stage_memory_bytes(inp.model, b - a, s == 0, s == n - 1, inp.max_ctx, 0, inp.tp)
            raise UserError(f"sweep.partition: {kind} stage {s + 1} ({b - a} layers, {need / 1e9:.1f} GB per GPU "
                            f"at tp {inp.tp}) does not fit {inp.gpu.name} memory")
    return Plan(kind, layers, tuple(g[0] for g in groups), head, groups)


def make_plan(kind: str, inp: PlanInputs) -> Plan:
    n = inp.n
    if n > inp.model.layers:
        raise UserError(f"sweep.stages: {n} > model.layers {inp.model.layers}")
    if inp.tp > 1:
        return _make_tp_plan(kind, inp)
    devices = inp.topology.devices
    if kind == "uniform":
        layers = uniform_layers(inp.model.layers, n)
        devs = tuple(devices[: n + (1 if inp.has_head and inp.dedicated_head else 0)])
    elif kind == "compute_balanced":
        layers = balanced_layers(inp)
        devs = tuple(devices[: n + (1 if inp.has_head and inp.dedicated_head else 0)])
    elif kind == "comm_aware":
        layers = balanced_layers(inp)
        devs = best_placement(inp, layers)
    elif kind == "draft_colocated":
        inp = replace(inp, drafts=True, dedicated_head=False)
        layers = balanced_layers(inp, lm_head_last=False)
        devs = tuple(devices[:n])
    else:
        raise UserError(f"sweep.partition: unknown {kind!r}")
    if len(devs) < n + (1 if inp.has_head and inp.dedicated_head else 0):
        raise UserError(f"sweep.stages: {n} stages do not fit on {len(devices)} GPUs")
    for s, (a, b) in enumerate(layers):
        if not _fits(inp, s, a, b):
            need = stage_memory_bytes(inp.model, b - a, s == 0, s == n - 1, inp.max_ctx)
            raise UserError(f"sweep.partition: {kind} stage {s + 1} ({b - a} layers, {need / 1e9:.1f} GB) "
                            f"does not fit {inp.gpu.name} memory")
    placement = devs[:n]
    head = None
    if inp.has_head:
        head = devs[n] if inp.dedicated_head else placement[0]
    return Plan(kind, layers, placement, head)
