"""The cost interface the engine and the partitioners use, and its roofline implementation.

Everything the simulator charges time for comes from a `CostModel`:
  stage_s      one stage's forward for one token at a context length (its layers, plus the embedding on
               the first stage and the final norm + LM head on the last)
  layer_s      one decoder layer (partitioners use it to weigh layers)
  embed_s, lm_head_s, head_s   the embedding, final norm + LM head, the speculative module's draft
  hop_s        one link hop: (time the link is held = bytes / bandwidth, latency after it)
  tick_overhead_s  fixed host-side time per compute (the executor's Python per tick), not device-busy
  msg_overhead_s   fixed host-side time per message sent, added to its delivery
A calibrated model fitted from executor traces (the `calibration:` key, a later issue) implements the
same methods. All times are seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class CostModel(Protocol):
    """What the engine and the schemes ask of a cost model: `RooflineCosts` (here) or `CalibratedCosts`
    (spdsim/calibration_file.py), every figure in seconds."""
    tick_overhead_s: float
    msg_overhead_s: float
    send_block_s: float                # the first rank blocks this long after each ACT send under SPD
    jitter: "Jitter | None"            # forward-to-forward variability the engine draws (spdsim/jitter.py)

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
    def hop_s(self, u: str, v: str, nbytes: int) -> tuple[float, float]: ...
    def for_point(self, scheme: str, stages: int) -> "CostModel": ...   # the costs one point runs with


@dataclass
class RooflineCosts:
    """max(bytes / (HBM bandwidth · efficiency), FLOPs / (peak · efficiency)) + a fixed launch overhead."""
    model: ModelShape
    gpu: GPU
    topology: Topology
    overrides: CostOverrides = CostOverrides()
    head_layers: int = 1          # the speculative module: this many decoder layers + a vocab projection

    def __post_init__(self) -> None:
        o = self.overrides
        self.tick_overhead_s = o.tick_overhead_ms * 1e-3
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

    def _roof(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self._bw, flops / self._flops)

    def layer_s(self, layer: int, ctx: int) -> float:
        if self.overrides.layer_ms is not None:
            return self.overrides.layer_ms * 1e-3
        nbytes = self._layer_bytes + ctx * self._kv_bytes
        return self._roof(nbytes, self._flops0 + ctx * self._flops_per_ctx) + self._layer_overhead

    def embed_s(self) -> float:
        if self.overrides.embed_ms is not None:
            return self.overrides.embed_ms * 1e-3
        return self.model.activation_bytes / self._bw + KERNEL_OVERHEAD_US * 1e-6

    def lm_head_s(self) -> float:
        if self.overrides.lm_head_ms is not None:
            return self.overrides.lm_head_ms * 1e-3
        return self._roof(self.model.lm_head_bytes, self.model.lm_head_flops) + self._layer_overhead

    def head_s(self, ctx: int) -> float:
        if self.overrides.head_ms is not None:
            return self.overrides.head_ms * 1e-3
        return self.head_layers * self.layer_s(-1, ctx) + self.lm_head_s()

    def verify_s(self) -> float:
        if self.overrides.verify_ms is not None:
            return self.overrides.verify_ms * 1e-3
        return self.lm_head_s()

    def draft_s(self, ctx: int) -> float:
        if self.overrides.draft_ms is not None:
            return self.overrides.draft_ms * 1e-3
        return self.head_s(ctx)

    def control_s(self) -> float:
        return self.overrides.control_ms * 1e-3

    def sync_s(self) -> float:
        return self.overrides.sync_ms * 1e-3

    def for_point(self, scheme: str, stages: int) -> "RooflineCosts":
        return self                    # a roofline does not depend on what else runs on the host

    def stage_s(self, stage: int, first_layer: int, last_layer: int, ctx: int,
                first: bool, last: bool) -> float:
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


def activation_bytes(model: ModelShape, tokens: int, last: bool) -> int:
    """Peak transient memory of one layer's forward over `tokens` positions at once (the prefill chunk):
    residual, q / k / v / attention output, the MLP's gate / up / product, and eager attention scores
    (heads × tokens², fp32); the last stage adds fp32 logits for one position. Layers run one after
    another, so this does not grow with the stage's layer count."""
    if tokens <= 0:
        return 0
    m = model
    per_token = 2 * m.hidden + 2 * m.heads * m.hd + 2 * m.kv_heads * m.hd + 3 * m.ffn
    b = tokens * per_token * m.dtype_bytes + 4 * m.heads * tokens * tokens
    if last:
        b += 4 * m.vocab
    return b


def stage_memory(model: ModelShape, n_layers: int, first: bool, last: bool, max_ctx: int,
                 head_layers: int = 0, prefill_tokens: int = 0) -> StageMemory:
    """Weights + KV cache for max_ctx tokens on one stage's device (+ activations for a prefill of
    prefill_tokens; 0 leaves them out); head_layers > 0 when the speculative module (its layers and its
    own vocab projection) lives there too."""
    kv_layer = max_ctx * model.kv_bytes_per_token_layer()
    weights = n_layers * model.layer_bytes
    if first:
        weights += model.embed_bytes
    if last:
        weights += model.lm_head_bytes
    draft = head_layers * (model.layer_bytes + kv_layer) + model.lm_head_bytes if head_layers else 0
    return StageMemory(weights, n_layers * kv_layer, activation_bytes(model, prefill_tokens, last), draft)


def stage_memory_bytes(model: ModelShape, n_layers: int, first: bool, last: bool, max_ctx: int,
                       head_layers: int = 0) -> int:
    """Weights + KV cache (+ a co-located speculative module): `stage_memory(...).total` without
    activations, in plain arithmetic (the partitioners' DP calls it tens of thousands of times)."""
    per_layer = model.layer_bytes + max_ctx * model.kv_bytes_per_token_layer()
    b = n_layers * per_layer
    if first:
        b += model.embed_bytes
    if last:
        b += model.lm_head_bytes
    if head_layers:
        b += head_layers * per_layer + model.lm_head_bytes
    return b


# A device keeps this fraction of its memory for the CUDA context, allocator slack and workspaces.
MEMORY_RESERVE = 0.1


def usable_bytes(gpu: GPU, reserve: float = MEMORY_RESERVE) -> float:
    """What a device can give to weights, caches and activations after the headroom `reserve`."""
    return gpu.mem_gb * 1e9 * (1.0 - reserve)


def fits(nbytes: int, gpu: GPU, reserve: float = MEMORY_RESERVE) -> bool:
    return nbytes <= usable_bytes(gpu, reserve)
