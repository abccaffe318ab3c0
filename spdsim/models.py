"""Model shapes (Llama-style decoders) and the byte counts and FLOPs the cost model needs."""
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
    dtype_bytes: int = 2          # bf16
    head_dim: int = 0             # 0 = hidden // heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    # --- parameters and bytes -----------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o projections, a SwiGLU MLP (gate, up, down), two norms."""
        q_o = 2 * self.hidden * self.heads * self.hd
        k_v = 2 * self.hidden * self.kv_heads * self.hd
        return q_o + k_v + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def layer_bytes(self) -> int:
        return self.layer_params * self.dtype_bytes

    @property
    def embed_bytes(self) -> int:
        return self.vocab * self.hidden * self.dtype_bytes

    @property
    def lm_head_bytes(self) -> int:
        return self.vocab * self.hidden * self.dtype_bytes + self.hidden * self.dtype_bytes  # + final norm

    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.hd * self.dtype_bytes

    @property
    def activation_bytes(self) -> int:
        """One token's hidden state, the ACT message between stages (batch 1)."""
        return self.hidden * self.dtype_bytes

    # --- FLOPs per decoded token ----------------------------------------------------------------
    def layer_flops(self, ctx: int) -> float:
        """2·params for the matmuls + attention scores and weighted sum over ctx cached positions."""
        return 2.0 * self.layer_params + 4.0 * ctx * self.heads * self.hd

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
