"""The cost interface the engine and the partitioners use, and its roofline implementation.

Everything the simulator charges time for comes from a `CostModel`:
  stage_s      one stage's forward for one token at a context length (its layers, plus the embedding on
               the first stage and the final norm + LM head on the last)
  layer_s      one decoder layer (partitioners use it to weigh layers)
  embed_s, lm_head_s, head_s   the embedding, final norm + LM head, the speculative module's draft
  hop_s        one link hop: (time the link is held = bytes / bandwidth, latency after it)
  tick_overhead_s  fixed host-side time per compute (the executor's Python per tick), not device-busy
  first_tick_overhead_s  the same on SPD's first rank, whose send and draft are charged apart (None: as above)
  msg_overhead_s   fixed host-side time per message sent, added to its delivery
  prefill_s        serving: one stage's forward over a chunk of prompt tokens (compute-bound)
  batch_stage_s, batch_head_s  serving: one decode tick of several requests' positions at once
A calibrated model fitted from executor traces (the `calibration:` key, spdsim/calibration_file.py)
implements the same methods. All times are seconds.

Tensor parallelism (DESIGN §2; the contract in `spdsim.protocol`). `for_point(scheme, stages, tp, groups)`
binds a model to a point's TP degree (and, where known, each stage's TP group of devices); a bound
model's `stage_s` is what one stage forward of a TP group costs: its layers at TP t (weights ÷ t, KV ÷ t
with KV heads replicated when kv_heads < t, FLOPs ÷ t, the same launch overhead per layer), two
all-reduces of one token's hidden state per layer, and on the last stage the vocab-parallel LM head
(÷ t) plus the all-gather of the logits row; the embedding is replicated. `stage_allreduce_s` is the
all-reduce + all-gather part of it (the engine's `allreduce` events). The speculative module, the
verification of spd_dedicated's rank 0 (`head_s`, `draft_s`, `verify_s`) run on one GPU (TP rank 0):
they keep their TP = 1 costs. Collectives are `spdsim.collectives` over the group's links
(`Topology.allreduce_s`); `costs.allreduce` pins the algorithm, `costs.allreduce_us` fixes every
collective's time (0: free collectives). `costs.layer_ms` / `lm_head_ms` are one GPU's figures: a TP
group of t divides them by t.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence

from spdsim.hardware import GPU, Topology
from spdsim.jitter import Jitter
from spdsim.models import ModelShape

# Roofline defaults. HBM efficiency 0.75 and 20 µs per layer reproduce two reference points of
# ../shared/REFERENCE.md: Vidur's 0.290 ms/layer for Llama-2-7B on A100 (we get 0.285) and gpt-fast's
# 104.9 tok/s ≈ 9.5 ms/token for Llama-2-7B on one A100 (we get ≈ 9.4 ms). 20 µs per layer is within
# REFERENCE.md's "5–20 µs per eager kernel", for a compiled / CUDA-graph layer of a few kernels.
HBM_EFFICIENCY = 0.75
FLOP_EFFICIENCY = 0.6
LAYER_OVERHEAD_US = 20.0
KERNEL_OVERHEAD_US = 5.0      # embedding lookup, one small kernel


@dataclass(frozen=True)
class CostOverrides:
    """The scenario's `costs:` section (DESIGN §5): any value set replaces the roofline's."""
    layer_ms: float | None = None
    embed_ms: float | None = None
    lm_head_ms: float | None = None
    head_ms: float | None = None
    tick_overhead_ms: float = 0.0
    msg_overhead_ms: float = 0.0
    hbm_efficiency: float = HBM_EFFICIENCY
    layer_overhead_us: float = LAYER_OVERHEAD_US
    # Per-cycle phases of the synchronous-cycle layout (scheme spd_dedicated); verify_ms also per SD step.
    verify_ms: float | None = None     # final norm + LM head + compare on rank 0 (default: lm_head_s)
    control_ms: float = 0.0            # build + broadcast the control message (links' latency on top)
    sync_ms: float = 0.0               # wait for outstanding point-to-point operations
    draft_ms: float | None = None      # one draft of the speculative module (default: head_s)
    # Tensor parallelism: the all-reduce algorithm (spdsim.collectives.ALGORITHMS), or a fixed time per
    # collective (each all-reduce and the LM head's all-gather) that replaces the model.
    allreduce: str = "auto"
    allreduce_us: float | None = None
    prefill_layer_ms: float | None = None   # serving: one layer's prefill time per prompt token (default: roofline)


class CostModel(Protocol):
    """What the engine and the schemes ask of a cost model: `RooflineCosts` (here) or `CalibratedCosts`
    (spdsim/calibration_file.py), every figure in seconds."""
    tick_overhead_s: float
    first_tick_overhead_s: float | None
    msg_overhead_s: float
    send_block_s: float                # the first rank blocks this long after each ACT send under SPD
    jitter: "Jitter | None"            # forward-to-forward variability the engine draws (spdsim/jitter.py)
    tp: int                            # the TP degree the model is bound to (1 unless for_point set it)

    def layer_s(self, layer: int, ctx: int) -> float: ...
    def embed_s(self) -> float: ...
    def lm_head_s(self) -> float: ...
    def head_s(self, ctx: int) -> float: ...
    def draft_s(self, ctx: int) -> float: ...
    def verify_s(self) -> float: ...
    def control_s(self) -> float: ...  # spd_dedicated: build + broadcast the control message
    def sync_s(self) -> float: ...     # spd_dedicated: wait for outstanding point-to-point operations
    def stage_s(self, stage: int, first_layer: int, last_layer: int, ctx: int,
                first: bool, last: bool) -> float: ...
    def stage_allreduce_s(self, stage: int, first_layer: int, last_layer: int, last: bool) -> float: ...
    def hop_s(self, u: str, v: str, nbytes: int) -> tuple[float, float]: ...
    # the costs one point runs with: its scheme's regime (calibrated), its TP degree and TP groups
    def for_point(self, scheme: str, stages: int, tp: int = 1,
                  groups: "tuple[tuple[str, ...], ...] | None" = None) -> "CostModel": ...
    def with_tp(self, tp: int, groups: "tuple[tuple[str, ...], ...] | None" = None) -> "CostModel": ...
    # serving (workload.arrivals): a prefill chunk of `tokens` prompt positions after `ctx` cached ones,
    # and one decode tick of several sequences at contexts `ctxs` (batch 1: exactly stage_s / head_s)
    def prefill_s(self, stage: int, first_layer: int, last_layer: int, tokens: int, ctx: int,
                  first: bool, last: bool) -> float: ...
    def batch_stage_s(self, stage: int, first_layer: int, last_layer: int, ctxs: "Sequence[int]",
                      first: bool, last: bool) -> float: ...
    def batch_head_s(self, ctxs: "Sequence[int]") -> float: ...


@dataclass
class RooflineCosts:
    """max(bytes / (HBM bandwidth · efficiency), FLOPs / (peak · efficiency)) + a fixed launch overhead."""
    model: ModelShape
    gpu: GPU
    topology: Topology
    overrides: CostOverrides = CostOverrides()
    head_layers: int = 1          # the speculative module: this many decoder layers + a vocab projection
    tp: int = 1                   # GPUs per stage (a TP group); see the module docstring
    groups: tuple[tuple[str, ...], ...] | None = None   # each stage's TP group (None: the first tp devices)

    def __post_init__(self) -> None:
        o = self.overrides
        self.tick_overhead_s = o.tick_overhead_ms * 1e-3
        self.first_tick_overhead_s = None
        self.msg_overhead_s = o.msg_overhead_ms * 1e-3
        self.send_block_s = 0.0
        self.jitter = None             # a roofline is deterministic
        self._bw = self.gpu.hbm_gbps * 1e9 * o.hbm_efficiency
        self._flops = self.gpu.bf16_tflops * 1e12 * FLOP_EFFICIENCY
        self._layer_overhead = o.layer_overhead_us * 1e-6
        m = self.model
        self._layer_bytes = m.layer_bytes
        self._kv_bytes = m.kv_bytes_per_token_layer()
        self._flops0 = m.layer_flops(0)
        self._flops_per_ctx = m.layer_flops(1) - self._flops0
        t = self.tp
        self._tp_layer_bytes = m.layer_bytes_rank(t)
        self._tp_kv_bytes = m.kv_bytes_per_token_layer(t)
        self._tp_flops0 = m.layer_flops(0, t)
        self._tp_flops_per_ctx = m.layer_flops(1, t) - self._tp_flops0
        self._collective: dict[int, tuple[float, float]] = {}   # stage → (one all-reduce, the all-gather)

    def _roof(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self._bw, flops / self._flops)

    def layer_s(self, layer: int, ctx: int) -> float:
        """One decoder layer; bound to TP t, one rank's share of it plus its two all-reduces (on the
        first stage's group: what the partitioners weigh layers by)."""
        if self.tp > 1:
            return self._tp_layer_s(ctx) + 2 * self._collectives(0)[0]
        return self._layer1_s(ctx)

    def _layer1_s(self, ctx: int) -> float:
        if self.overrides.layer_ms is not None:
            return self.overrides.layer_ms * 1e-3
        nbytes = self._layer_bytes + ctx * self._kv_bytes
        return self._roof(nbytes, self._flops0 + ctx * self._flops_per_ctx) + self._layer_overhead

    def _tp_layer_s(self, ctx: int) -> float:
        """One rank's share of a layer at TP t, no collectives."""
        if self.overrides.layer_ms is not None:
            return self.overrides.layer_ms * 1e-3 / self.tp
        nbytes = self._tp_layer_bytes + ctx * self._tp_kv_bytes
        return self._roof(nbytes, self._tp_flops0 + ctx * self._tp_flops_per_ctx) + self._layer_overhead

    def _tp_lm_head_s(self) -> float:
        if self.overrides.lm_head_ms is not None:
            return self.overrides.lm_head_ms * 1e-3 / self.tp
        m = self.model
        return self._roof(m.lm_head_bytes_rank(self.tp), m.lm_head_flops / self.tp) + self._layer_overhead

    def _group(self, stage: int) -> tuple[str, ...]:
        g = self.groups
        if g:
            return g[stage] if 0 <= stage < len(g) else g[0]
        return tuple(self.topology.devices[:self.tp])

    def _collectives(self, stage: int) -> tuple[float, float]:
        """(one all-reduce of the hidden state, the all-gather of the logits row) on stage's group."""
        got = self._collective.get(stage)
        if got is None:
            o = self.overrides
            if o.allreduce_us is not None:
                got = (o.allreduce_us * 1e-6, o.allreduce_us * 1e-6)
            else:
                group, m = self._group(stage), self.model
                got = (self.topology.allreduce_s(m.activation_bytes, group, o.allreduce),
                       self.topology.allgather_s(m.logits_bytes, group, o.allreduce))
            self._collective[stage] = got
        return got

    def stage_allreduce_s(self, stage: int, first_layer: int, last_layer: int, last: bool) -> float:
        """The collectives inside stage_s: 2 all-reduces per layer, the logits all-gather if last."""
        if self.tp == 1:
            return 0.0
        ar, ag = self._collectives(stage)
        return 2 * (last_layer - first_layer) * ar + (ag if last else 0.0)

    def embed_s(self) -> float:
        if self.overrides.embed_ms is not None:
            return self.overrides.embed_ms * 1e-3
        return self.model.activation_bytes / self._bw + KERNEL_OVERHEAD_US * 1e-6

    def lm_head_s(self) -> float:
        """Final norm + LM head; bound to TP t, vocab-parallel plus the logits all-gather."""
        if self.tp > 1:
            return self._tp_lm_head_s() + self._collectives(0)[1]
        return self._lm_head1_s()

    def _lm_head1_s(self) -> float:
        if self.overrides.lm_head_ms is not None:
            return self.overrides.lm_head_ms * 1e-3
        return self._roof(self.model.lm_head_bytes, self.model.lm_head_flops) + self._layer_overhead

    def head_s(self, ctx: int) -> float:
        """The speculative module, on one GPU (TP rank 0 of stage 1, or its own): TP = 1 costs."""
        if self.overrides.head_ms is not None:
            return self.overrides.head_ms * 1e-3
        return self.head_layers * self._layer1_s(ctx) + self._lm_head1_s()

    def verify_s(self) -> float:
        if self.overrides.verify_ms is not None:
            return self.overrides.verify_ms * 1e-3
        return self._lm_head1_s()

    def draft_s(self, ctx: int) -> float:
        if self.overrides.draft_ms is not None:
            return self.overrides.draft_ms * 1e-3
        return self.head_s(ctx)

    def control_s(self) -> float:
        return self.overrides.control_ms * 1e-3

    def sync_s(self) -> float:
        return self.overrides.sync_ms * 1e-3

    def for_point(self, scheme: str, stages: int, tp: int = 1,
                  groups: tuple[tuple[str, ...], ...] | None = None) -> "RooflineCosts":
        # a roofline does not depend on what else runs on the host; only the TP binding changes it
        return self if tp == self.tp == 1 else self.with_tp(tp, groups)

    def with_tp(self, tp: int, groups: tuple[tuple[str, ...], ...] | None = None) -> "RooflineCosts":
        return replace(self, tp=tp, groups=tuple(tuple(g) for g in groups) if groups else None)

    def stage_s(self, stage: int, first_layer: int, last_layer: int, ctx: int,
                first: bool, last: bool) -> float:
        if self.tp > 1:
            ar, ag = self._collectives(stage)
            t = (last_layer - first_layer) * (self._tp_layer_s(ctx) + 2 * ar)
            if first:
                t += self.embed_s()          # replicated: every rank looks its row up
            if last:
                t += self._tp_lm_head_s() + ag
            return t
        if self.overrides.layer_ms is not None:       # every layer alike: no per-layer loop
            t = (last_layer - first_layer) * self.overrides.layer_ms * 1e-3
        else:
            t = (last_layer - first_layer) * self.layer_s(first_layer, ctx)
        if first:
            t += self.embed_s()
        if last:
            t += self.lm_head_s()
        return t

    def hop_s(self, u: str, v: str, nbytes: int) -> tuple[float, float]:
        latency, bandwidth = self.topology.edge(u, v)
        return nbytes / bandwidth, latency

    # --- serving: prefill chunks and batched decode ticks ------------------------------------------
    def _collective_k(self, stage: int, k: int) -> tuple[float, float]:
        """(one all-reduce of k tokens' hidden states, the all-gather of k logits rows) on stage's
        group; k = 1 is `_collectives`."""
        if k == 1:
            return self._collectives(stage)
        o = self.overrides
        if o.allreduce_us is not None:
            return o.allreduce_us * 1e-6, o.allreduce_us * 1e-6
        group, m = self._group(stage), self.model
        return (self.topology.allreduce_s(k * m.activation_bytes, group, o.allreduce),
                self.topology.allgather_s(k * m.logits_bytes, group, o.allreduce))

    def prefill_s(self, stage: int, first_layer: int, last_layer: int, tokens: int, ctx: int,
                  first: bool, last: bool) -> float:
        """A chunk of prompt positions ctx .. ctx+tokens-1 through one stage's layers, the embedding
        on the first stage (position ctx+i attends to ctx+i+1 positions). Weights are read once, so a
        chunk of hundreds of tokens is compute-bound: FLOPs over peak. No LM head: the chunk ends
        before the prompt's last token, whose logits its first decode tick makes (spdsim.protocol's
        positions). At TP t one rank's share (weights, KV, FLOPs ÷ t) plus two all-reduces of the
        chunk's hidden states per layer. Without overrides one token at ctx costs what stage_s at
        ctx + 1 costs less the LM head. `costs.prefill_layer_ms` fixes one layer's time per token."""
        if tokens <= 0:
            return 0.0
        o, t = self.overrides, self.tp
        nl = last_layer - first_layer
        if o.prefill_layer_ms is not None:
            layer = tokens * o.prefill_layer_ms * 1e-3 / t
        else:
            lb, kv = (self._layer_bytes, self._kv_bytes) if t == 1 else (self._tp_layer_bytes, self._tp_kv_bytes)
            f0, fc = (self._flops0, self._flops_per_ctx) if t == 1 else (self._tp_flops0, self._tp_flops_per_ctx)
            nbytes = lb + (ctx + tokens) * kv
            flops = tokens * f0 + fc * (tokens * ctx + tokens * (tokens + 1) / 2)
            layer = self._roof(nbytes, flops) + self._layer_overhead
        if t > 1:
            layer += 2 * self._collective_k(stage, tokens)[0]
        s = nl * layer
        if first:
            s += (self.embed_s() if tokens == 1 or o.embed_ms is not None
                  else tokens * self.model.activation_bytes / self._bw + KERNEL_OVERHEAD_US * 1e-6)
        return s

    def batch_stage_s(self, stage: int, first_layer: int, last_layer: int, ctxs: Sequence[int],
                      first: bool, last: bool) -> float:
        """One decode tick of len(ctxs) sequences (different requests) through one stage: per layer the
        weights are streamed once, every sequence reads its own KV cache and adds its own FLOPs; the
        embedding reads one row per sequence; the LM head's weights once, its FLOPs per sequence. At TP
        t one rank's share, the all-reduces and the logits all-gather carrying every sequence. A fixed
        `layer_ms` (or lm_head_ms) stands for the whole batched forward."""
        k = len(ctxs)
        if k == 1:
            return self.stage_s(stage, first_layer, last_layer, ctxs[0], first, last)
        o, t = self.overrides, self.tp
        total_ctx = sum(ctxs)
        if o.layer_ms is not None:
            layer = o.layer_ms * 1e-3 / t
        else:
            lb, kv = (self._layer_bytes, self._kv_bytes) if t == 1 else (self._tp_layer_bytes, self._tp_kv_bytes)
            f0, fc = (self._flops0, self._flops_per_ctx) if t == 1 else (self._tp_flops0, self._tp_flops_per_ctx)
            layer = self._roof(lb + total_ctx * kv, k * f0 + total_ctx * fc) + self._layer_overhead
        ar, ag = self._collective_k(stage, k) if t > 1 else (0.0, 0.0)
        s = (last_layer - first_layer) * (layer + 2 * ar)
        if first:
            s += (o.embed_ms * 1e-3 if o.embed_ms is not None
                  else k * self.model.activation_bytes / self._bw + KERNEL_OVERHEAD_US * 1e-6)
        if last:
            s += self._batch_lm_head_s(k, t) + ag
        return s

    def _batch_lm_head_s(self, k: int, t: int = 1) -> float:
        if self.overrides.lm_head_ms is not None:
            return self.overrides.lm_head_ms * 1e-3 / t
        m = self.model
        return self._roof(m.lm_head_bytes_rank(t), k * m.lm_head_flops / t) + self._layer_overhead

    def batch_head_s(self, ctxs: Sequence[int]) -> float:
        """The speculative module drafting for len(ctxs) sequences at once, on one GPU: its layers and
        its vocab projection batched as in batch_stage_s (a fixed head_ms stands for the whole batch)."""
        k = len(ctxs)
        if k == 1:
            return self.head_s(ctxs[0])
        if self.overrides.head_ms is not None:
            return self.overrides.head_ms * 1e-3
        one = self if self.tp == 1 else replace(self, tp=1, groups=None)
        return self.head_layers * one.batch_stage_s(-1, 0, 1, ctxs, False, False) + one._batch_lm_head_s(k)


@dataclass(frozen=True)
class StageMemory:
    """One device's memory, by what it holds (bytes)."""
    weights: int          # the stage's layers, plus the embedding / final norm + LM head where it has them
    kv_cache: int         # its layers' K and V for max_ctx tokens
    activations: int      # transient buffers of one layer's forward over the prefill chunk (+ logits)
    draft: int            # the speculative module's layers, its KV cache and its vocab projection

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.draft


def activation_bytes(model: ModelShape, tokens: int, last: bool, tp: int = 1) -> int:
    """Peak transient memory of one layer's forward over `tokens` positions at once (the prefill chunk):
    residual, q / k / v / attention output, the MLP's gate / up / product, and eager attention scores
    (heads × tokens², fp32); the last stage adds fp32 logits for one position (the whole row: TP ranks
    all-gather it). Layers run one after another, so this does not grow with the stage's layer count.
    Under TP one rank holds its heads' and its MLP slice's share; the residual is replicated."""
    if tokens <= 0:
        return 0
    m = model
    per_token = (2 * m.hidden + 2 * m.heads_rank(tp) * m.hd + 2 * m.kv_heads_rank(tp) * m.hd
                 + 3 * -(-m.ffn // tp))
    b = tokens * per_token * m.dtype_bytes + 4 * m.heads_rank(tp) * tokens * tokens
    if last:
        b += 4 * m.vocab
    return b


def stage_memory(model: ModelShape, n_layers: int, first: bool, last: bool, max_ctx: int,
                 head_layers: int = 0, prefill_tokens: int = 0, tp: int = 1) -> StageMemory:
    """Weights + KV cache for max_ctx tokens on one stage's device (+ activations for a prefill of
    prefill_tokens; 0 leaves them out); head_layers > 0 when the speculative module (its layers and its
    own vocab projection) lives there too. With tp > 1: one GPU of the stage's TP group (its rank 0,
    which also holds a co-located module): layer weights ÷ t, KV ÷ t (one KV head per rank when
    kv_heads < t), the LM head's vocab slice, the embedding and the norms whole."""
    kv_layer = max_ctx * model.kv_bytes_per_token_layer(tp)
    weights = n_layers * model.layer_bytes_rank(tp)
    if first:
        weights += model.embed_bytes
    if last:
        weights += model.lm_head_bytes_rank(tp)
    draft = 0
    if head_layers:      # the module is one GPU's (TP = 1)
        draft = head_layers * (model.layer_bytes + max_ctx * model.kv_bytes_per_token_layer()) + model.lm_head_bytes
    return StageMemory(weights, n_layers * kv_layer, activation_bytes(model, prefill_tokens, last, tp), draft)


def stage_memory_bytes(model: ModelShape, n_layers: int, first: bool, last: bool, max_ctx: int,
                       head_layers: int = 0, tp: int = 1) -> int:
    """Weights + KV cache (+ a co-located speculative module): `stage_memory(...).total` without
    activations, in plain arithmetic (the partitioners' DP calls it tens of thousands of times)."""
    per_layer = model.layer_bytes_rank(tp) + max_ctx * model.kv_bytes_per_token_layer(tp)
    b = n_layers * per_layer
    if first:
        b += model.embed_bytes
    if last:
        b += model.lm_head_bytes_rank(tp)
    if head_layers:
        b += head_layers * (model.layer_bytes + max_ctx * model.kv_bytes_per_token_layer()) + model.lm_head_bytes
    return b


# A device keeps this fraction of its memory for the CUDA context, allocator slack and workspaces.
MEMORY_RESERVE = 0.1


def usable_bytes(gpu: GPU, reserve: float = MEMORY_RESERVE) -> float:
    """What a device can give to weights, caches and activations after the headroom `reserve`."""
    return gpu.mem_gb * 1e9 * (1.0 - reserve)


def fits(nbytes: int, gpu: GPU, reserve: float = MEMORY_RESERVE) -> bool:
    return nbytes <= usable_bytes(gpu, reserve)
