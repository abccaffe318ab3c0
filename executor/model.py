"""A Llama-style decoder in one file (RMSNorm, RoPE, SwiGLU, grouped-query attention), gpt-fast style.

The KV cache is preallocated; rolling back to a position is free: attention only looks at cache
entries ≤ the query's position, and a later write overwrites what a rollback discarded. A pipeline
stage is a slice of the layers (`Stage`): the embedding lives on the first, the final norm and the LM
head on the last.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    n_layers: int = 8
    dim: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 688          # SwiGLU hidden size (≈ 8/3 · dim, rounded)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim: int = 0           # 0 = dim // n_heads; set when heads × head_dim ≠ dim (Qwen3: 32 × 128, d 2560)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads or (not self.head_dim and self.dim % self.n_heads):
            raise ValueError(f"dim {self.dim}, heads {self.n_heads}, kv_heads {self.n_kv_heads} do not divide")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})


# The built-in byte-level model (vocab = 256 bytes) that the repository trains and ships.
CONFIGS = {"tiny": ModelConfig()}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:     # normalised in fp32 whatever x's dtype
        if x.dtype == self.weight.dtype == torch.float32:           # one operator call
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """[max_seq_len, head_dim] tables for `apply_rope`: (cos, cos) and (-sin, sin) over the two halves."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq)
    return torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [..., seq, head_dim]; cos/sin: [seq, head_dim] from `rope_tables`. Rotates halves (the HF Llama
    layout): (x1, x2) → (x1 cos - x2 sin, x2 cos + x1 sin), written as x·cos + roll(x)·sin: four
    operator calls instead of nine, the same arithmetic bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class KVCache(nn.Module):
    def __init__(self, cfg: ModelConfig, batch: int = 1, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        shape = (batch, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v

    def update_range(self, first: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [batch, heads, m, head_dim] for the contiguous positions first..first+m-1 (slice writes, no
        index tensor) → the cached keys and values of positions 0..first+m-1."""
        end = first + k.shape[2]
        self.k[:, :, first:end] = k
        self.v[:, :, first:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.reduce: Callable[[Tensor], Tensor] | None = None   # TP: the all-reduce after wo (executor/tp.py)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is None:           # training / a whole sequence: plain causal attention
            mask, is_causal = None, True
        else:                           # decoding against the cache: see every entry ≤ the query's position
            assert self.kv_cache is not None, "call setup_cache() before decoding with input_pos"
            k, v = self.kv_cache.update(input_pos, k, v)
            last = int(input_pos[-1]) + 1
            k, v = k[:, :, :last], v[:, :, :last]
            mask = input_pos[:, None] >= torch.arange(last, device=x.device)[None, :]
            is_causal = False
        rep = cfg.n_heads // cfg.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = self.wo(y.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim))
        return y if self.reduce is None else self.reduce(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)   # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)   # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)   # down
        self.reduce: Callable[[Tensor], Tensor] | None = None   # TP: the all-reduce after w2 (executor/tp.py)

    def forward(self, x: Tensor) -> Tensor:
        y = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return y if self.reduce is None else self.reduce(y)


class Block(nn.Module):
    """A decoder layer. cfg.ffn_dim == 0 makes it attention-only (the speculative module's option)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.ffn_dim else None
        self.feed_forward = FeedForward(cfg) if cfg.ffn_dim else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None) -> Tensor:
        return self.mlp(x + self.attention(self.attention_norm(x), cos, sin, input_pos))

    def mlp(self, x: Tensor) -> Tensor:
        """The residual feed-forward (identity in an attention-only layer)."""
        return x if self.feed_forward is None else x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int) -> "Transformer":
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def setup_cache(self, batch: int = 1) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(layer.attention.cfg, batch, self.output.weight.dtype).to(self.output.weight.device)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rope_cos[positions], self.rope_sin[positions]

    def forward(self, idx: Tensor, input_pos: Tensor | None = None, return_hidden: bool = False):
        """idx: [batch, seq] token ids. input_pos: [seq] positions when decoding against the cache,
        None for a whole sequence from position 0 (training). With return_hidden, also returns the
        hidden state after the embedding and after every layer ([n_layers + 1] tensors)."""
        positions = input_pos if input_pos is not None else torch.arange(idx.shape[1], device=idx.device)
        cos, sin = self.rope(positions)
        x = self.tok_embeddings(idx)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos)
            hidden.append(x)
        logits = self.output(self.norm(x))
        return (logits, hidden) if return_hidden else logits


class Stage(nn.Module):
    """Layers [first, last) of a model: one pipeline stage. Takes token ids on the first stage and a
    hidden state elsewhere; returns a hidden state, or logits on the last stage."""

    def __init__(self, model: Transformer, first: int, last: int) -> None:
        super().__init__()
        n = model.cfg.n_layers
        if not 0 <= first < last <= n:
            raise ValueError(f"bad stage layer range [{first}, {last}) for {n} layers")
        self.cfg = model.cfg
        self.first, self.last = first, last
        self.is_first, self.is_last = first == 0, last == n
        self.tok_embeddings = model.tok_embeddings if self.is_first else None
        self.layers = nn.ModuleList(model.layers[first:last])
        self.norm = model.norm if self.is_last else None
        self.output = model.output if self.is_last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def setup_cache(self, batch: int = 1) -> None:
        dtype = self.layers[0].attention.wq.weight.dtype
        device = self.layers[0].attention.wq.weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(layer.attention.cfg, batch, dtype).to(device)   # a TP shard's own heads

    def forward(self, x: Tensor, input_pos: Tensor) -> Tensor:
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        if self.is_first:
            x = self.tok_embeddings(x)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos)
        if self.is_last:
            x = self.output(self.norm(x))
        return x


def uniform_partition(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, the earlier stages one layer larger when it does not divide: the
    simulator's `uniform` partition (one definition, so validation compares like with like)."""
    from spdsim.partition import uniform_layers
    if not 1 <= stages <= n_layers:
        raise ValueError(f"stages must be between 1 and the number of layers ({n_layers}), got {stages}")
    return list(uniform_layers(n_layers, stages))


@torch.no_grad()
def greedy_decode(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    """Reference greedy decoding on one device (the AR ground truth for losslessness)."""
    model.setup_cache()
    idx = torch.tensor([prompt])
    logits = model(idx, torch.arange(len(prompt)))
    out = []
    pos = len(prompt)
    for _ in range(new_tokens):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if len(out) == new_tokens:
            break
        logits = model(torch.tensor([[tok]]), torch.tensor([pos]))
        pos += 1
    return out
