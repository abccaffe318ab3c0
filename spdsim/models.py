"""Model shapes (Llama-style decoders) and the byte counts and FLOPs the cost model needs.

Tensor parallelism (DESIGN §2, the contract in `spdsim.protocol`): a TP group of t ranks splits q/k/v/o
and the MLP t ways (Megatron), the KV cache by KV heads (each rank keeps one KV head when kv_heads < t:
the replication Megatron and vLLM do) and the LM head over the vocabulary; the embedding and the norms
are replicated. The `*_rank(tp)` figures are what one rank of such a group holds and reads; tp = 1 gives
the whole-model figures, exactly.

Quantized weights: `weight_bytes` (bf16 2, fp8 / int8 1, int4 0.5) is the bytes per weight, apart from
`kv_bytes` (the KV cache's element size) and `dtype_bytes` (activations); 0 means `dtype_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    dtype_bytes: int = 2          # bf16 activations (and weights / KV unless set below)
    head_dim: int = 0             # 0 = hidden // heads
    weight_bytes: float = 0.0     # bytes per weight; 0 = dtype_bytes
    kv_bytes: float = 0.0         # bytes per KV-cache element; 0 = dtype_bytes

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def wb(self) -> float:
        return self.weight_bytes or self.dtype_bytes

    @property
    def kvb(self) -> float:
        return self.kv_bytes or self.dtype_bytes

    # --- tensor parallelism ---------------------------------------------------------------------
    def heads_rank(self, tp: int = 1) -> int:
        return -(-self.heads // tp)

    def kv_heads_rank(self, tp: int = 1) -> int:
        """KV heads one rank holds: kv_heads / tp, at least one (replicated when kv_heads < tp)."""
        return max(1, -(-self.kv_heads // tp))

    def layer_params_rank(self, tp: int = 1) -> int:
        """One rank's share of a decoder layer: q / o and the MLP split t ways, k / v by KV heads, the
        two norms replicated."""
        if tp == 1:
            return self.layer_params
        q_o = 2 * self.hidden * self.heads_rank(tp) * self.hd
        k_v = 2 * self.hidden * self.kv_heads_rank(tp) * self.hd
        return q_o + k_v + 3 * self.hidden * -(-self.ffn // tp) + 2 * self.hidden

    def layer_bytes_rank(self, tp: int = 1) -> int:
        return self.layer_bytes if tp == 1 else int(round(self.layer_params_rank(tp) * self.wb))

    def lm_head_bytes_rank(self, tp: int = 1) -> int:
        """Vocab-parallel LM head: vocab / t rows per rank, the final norm replicated."""
        if tp == 1:
            return self.lm_head_bytes
        return int(round(-(-self.vocab // tp) * self.hidden * self.wb + self.hidden * self.wb))

    # --- parameters and bytes -----------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o projections, a SwiGLU MLP (gate, up, down), two norms."""
        q_o = 2 * self.hidden * self.heads * self.hd
        k_v = 2 * self.hidden * self.kv_heads * self.hd
        return q_o + k_v + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def layer_bytes(self) -> int:
        return int(round(self.layer_params * self.wb))

    @property
    def embed_bytes(self) -> int:
        return int(round(self.vocab * self.hidden * self.wb))

    @property
    def lm_head_bytes(self) -> int:
        return int(round(self.vocab * self.hidden * self.wb + self.hidden * self.wb))  # + final norm

    def kv_bytes_per_token_layer(self, tp: int = 1) -> int:
        """K and V of one token in one layer, on one rank of a TP group of tp."""
        return int(round(2 * self.kv_heads_rank(tp) * self.hd * self.kvb))

    @property
    def activation_bytes(self) -> int:
        """One token's hidden state, the ACT message between stages (batch 1), and the message of each
        TP all-reduce."""
        return self.hidden * self.dtype_bytes

    @property
    def logits_bytes(self) -> int:
        """One position's logits row: what the last stage of a TP group all-gathers."""
        return self.vocab * self.dtype_bytes

    # --- FLOPs per decoded token ----------------------------------------------------------------
    def layer_flops(self, ctx: int, tp: int = 1) -> float:
        """2·params for the matmuls + attention scores and weighted sum over ctx cached positions (one
        rank's share under TP)."""
        return 2.0 * self.layer_params_rank(tp) + 4.0 * ctx * self.heads_rank(tp) * self.hd

    @property
    def lm_head_flops(self) -> float:
        return 2.0 * self.vocab * self.hidden


# Shapes from the models' published config.json files (Hugging Face model cards).
MODEL_CATALOG: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape("llama-2-7b", layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000),
    "llama-2-13b": ModelShape("llama-2-13b", layers=40, hidden=5120, ffn=13824, heads=40, kv_heads=40, vocab=32000),
    "llama-2-70b": ModelShape("llama-2-70b", layers=80, hidden=8192, ffn=28672, heads=64, kv_heads=8, vocab=32000),
    "llama-3-8b": ModelShape("llama-3-8b", layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256),
    # Approximation: Qwen3-4B's widths (d 2560, ffn 9728, 32 heads / 8 KV heads of 128, vocab 151,936) with
    # 32 layers, every layer modelled as full attention (Qwen3.5's linear-attention layers are not modelled).
    "qwen3.5-4b": ModelShape("qwen3.5-4b", layers=32, hidden=2560, ffn=9728, heads=32, kv_heads=8,
                             vocab=151936, head_dim=128),
    # The repository's byte-level decoder (executor/model.py ModelConfig defaults).
    "tiny": ModelShape("tiny", layers=8, hidden=256, ffn=688, heads=4, kv_heads=4, vocab=256),
}
