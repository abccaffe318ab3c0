"""The speculative module (DESIGN §2): drafts the token at q+1 in the tick in which position q enters
stage 1, from target features taken at several pipeline depths.

Depth rule. At that tick position j ≤ q has been through d = min(q - j, n) stages: d = 0 is the
embedding only (the newest position), d = s the output of stage s, d = n the final layer. Checkpoint c
of a position is the target's hidden state at the boundary of stage c (c = 0: the embedding). A position
at depth d contributes one input row: sum over c ≤ d of W_c · rms(checkpoint c), plus a learned depth
embedding e_d. One projection per checkpoint level (not per depth over the concatenated checkpoints, which
costs O(n²) per call): in steady decoding each checkpoint is projected once and added to its
position's running sum, so a call costs O(n) small products. With `proj="shared"` the row is instead
W · sum_{c<=d} g_c ⊙ rms(checkpoint c) + e_d (one map, per-level gains): a call then reads one matrix
whatever n is; with `proj="none"` the gated sum itself (+ e_d) is the row, no map at all. The module
may be narrower than the target (`width`) or attention-only (`ffn_dim=0`): the cost per call must stay
below the slowest stage's, and at n = 8 the tiny model's stage is one layer (`head_n8_lean`).

The module is a small causal transformer over those rows (the target's `Block`, RoPE, its own KV cache)
and an LM head initialised from the target's final norm and output. With `query_window` (the committed
modules) the query row also gets one linear map of a gated sum of the window's rows (position q-d at depth
d): a direct path that attention over the whole sequence otherwise has to learn. Positions at depth n never
change again and live in the KV cache; the n newest positions change depth every tick, so each call
recomputes their rows (n + 1 rows: the one reaching depth n this tick is then final). In the last layer
only the query's output is read, so the other rows only give keys and values. Rolling back is free: cache
entries ≤ the query position are the only ones read, and later writes overwrite discarded ones.

Training runs all positions in parallel and must see what inference sees. With more than one layer, a
position's hidden state in layer ℓ > 1 depends on *when* it is read (its keys were shallower earlier),
so each layer keeps n + 1 variants of every position, by time offset o = (reading time) - position:
variant o of position j attends to key i through key variant min(o + j - i, n). Variant n is the stable
one; the n others differ from it only on a band of n diagonals, so a layer costs one dense attention
per variant plus O(n²·T) band terms. The last layer needs only variant 0 (the drafted query itself),
so a one-layer module costs one dense attention. `tests/test_spec_head.py` checks the parallel forward
against the step-by-step drafter.

Kind "window" is this module restricted to the n + 1 newest rows (no sequence), a baseline of the
acceptance study; the study's other baselines are in `executor.head_baselines`, every kind is built,
saved and loaded by `executor.drafter_modules`, and the pipeline runs a module through
`executor.head_drafter.HeadDrafter`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from executor.model import Block, KVCache, ModelConfig, RMSNorm, Transformer, apply_rope, rope_tables, uniform_partition

KINDS = ("spd", "window", "k-ahead", "early-exit", "early-exit-raw")
PROJS = ("level", "shared", "none")


@dataclass(frozen=True)
class HeadConfig:
    kind: str                      # one of KINDS
    stages: int                    # n: pipeline depth the drafter is trained for
    checkpoints: tuple[int, ...]   # target layer index of checkpoint c = 0..n (0: embedding, n: last layer)
    dim: int                       # target hidden size
    vocab_size: int
    n_layers: int = 1
    query_window: bool = False     # the query row also gets a linear summary of the window's newest rows
    n_heads: int = 4
    ffn_dim: int = 688
    width: int = 0                 # the module's own width (0: the target's); narrower is cheaper per call
    proj: str = "level"            # input rows: "level" (a projection per checkpoint level) or "shared"
    max_seq_len: int = 1024
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown drafter kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.proj not in PROJS:
            raise ValueError(f"unknown input projection {self.proj!r} (one of {', '.join(PROJS)})")
        if self.width < 0 or (self.width or self.dim) % self.n_heads:
            raise ValueError(f"module width {self.width} must be ≥ 0 and divisible by {self.n_heads} heads")
        if self.proj == "none" and self.width not in (0, self.dim):
            raise ValueError(f"proj 'none' feeds the checkpoints in as they are: the module's width must be the "
                             f"target's ({self.dim}), got {self.width}")
        if len(self.checkpoints) != self.stages + 1:
            raise ValueError(f"{self.stages} stages need {self.stages + 1} checkpoints, got {self.checkpoints}")

    @classmethod
    def for_target(cls, target: ModelConfig, stages: int, kind: str = "spd", **kw) -> "HeadConfig":
        bounds = [0] + [last for _, last in uniform_partition(target.n_layers, stages)]
        return cls(kind=kind, stages=stages, checkpoints=tuple(bounds), dim=target.dim,
                   vocab_size=target.vocab_size, max_seq_len=target.max_seq_len, norm_eps=target.norm_eps, **kw)

    def block_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, n_layers=self.n_layers, dim=self.module_width, n_heads=self.n_heads,
                           n_kv_heads=self.n_heads, ffn_dim=self.ffn_dim, max_seq_len=self.max_seq_len,
                           norm_eps=self.norm_eps)

    @property
    def module_width(self) -> int:
        return self.width or self.dim

    def to_json(self) -> dict:
        d = asdict(self)
        d["checkpoints"] = list(self.checkpoints)
        return d

    @classmethod
    def from_json(cls, obj: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        obj = {k: v for k, v in obj.items() if k in known}
        obj["checkpoints"] = tuple(obj["checkpoints"])
        return cls(**obj)


def target_checkpoints(hidden: list[Tensor], cfg: HeadConfig) -> Tensor:
    """The target's `return_hidden` list → [batch, seq, n + 1, dim]: every position at every checkpoint."""
    return torch.stack([hidden[layer] for layer in cfg.checkpoints], dim=2)


def _rms(x: Tensor, eps: float = 1e-5) -> Tensor:
    """RMS normalisation without a weight (one operator call, as RMSNorm's)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def _lm_head(cfg: HeadConfig, target: Transformer | None) -> tuple[RMSNorm, nn.Linear]:
    norm, out = RMSNorm(cfg.dim, cfg.norm_eps), nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
    if target is not None:                      # initialised from the target's, then trained
        norm.load_state_dict(target.norm.state_dict())
        out.weight.data.copy_(target.output.weight.data)
    return norm, out


class SpecHead(nn.Module):
    """The SPD speculative module (kind "spd") and its depth-window ablation (kind "window")."""

    def __init__(self, cfg: HeadConfig, target: Transformer | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        n, dim, w = cfg.stages, cfg.dim, cfg.module_width
        g = torch.Generator().manual_seed(seed)
        # One projection per checkpoint level, shared by every depth that includes it, plus a learned
        # depth embedding: the row of a position at depth d is sum_{c<=d} W_c rms(checkpoint c) + e_d.
        # HeadDrafter projects each checkpoint once and keeps running sums: O(n) per call (a projection
        # per depth over the concatenated checkpoints cost O(n^2)). W_0 starts as the identity, deeper
        # ones near zero: the untrained module reads the embedding and learns what depth adds.
        # Stored [level, in, out]: a batch of row vectors times it is one fast bmm at decode time.
        eye = torch.eye(dim, w) if w == dim else torch.randn(dim, w, generator=g) / dim ** 0.5
        if cfg.proj == "level":
            init = torch.stack([eye if c == 0 else 0.1 * eye for c in range(n + 1)])
            self.proj = nn.Parameter(init + 0.01 * torch.randn(init.shape, generator=g))    # [n+1, dim, w]
            self.level_gain = None
        else:
            # "shared": one map for every level, applied to a gated sum of the checkpoints (g_c ⊙ rms(x_c)).
            # The residual stream keeps one basis across depths, and a call reads one matrix instead of
            # n + 1: at n = 8 the per-level matrices were most of the bytes a call moves. "none": the
            # gated sum itself is the row (the block's q/k/v maps follow anyway): one product fewer per
            # call, at n = 8 the margin between the module and a one-layer stage on a CPU.
            self.proj = nn.Parameter(eye + 0.01 * torch.randn(eye.shape, generator=g)) if cfg.proj == "shared" else None
            self.level_gain = nn.Parameter(torch.tensor([1.0] + [0.1] * n)[:, None].repeat(1, dim))  # [n+1, dim]
        self.depth_emb = nn.Parameter(torch.zeros(n + 1, w))
        # Optional direct path from the window to the query: a gated sum of the window's rows (position
        # q-d at depth d, d = 1..n) through one linear map, zero at init. Attention alone must otherwise
        # learn to find those few keys among the whole sequence; one map (not one per depth) keeps it O(1).
        if cfg.query_window:
            self.qwin_gate = nn.Parameter(torch.ones(n, w))
            self.qwin = nn.Linear(w, w, bias=False)
            nn.init.zeros_(self.qwin.weight)
        else:
            self.qwin_gate, self.qwin = None, None
        bc = cfg.block_config()
        self.layers = nn.ModuleList(Block(bc) for _ in range(cfg.n_layers))
        for name, p in self.layers.named_parameters():
            if p.dim() == 2:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        # A narrower module maps back to the target's width for the LM head it starts from.
        self.up = nn.Linear(w, dim, bias=False) if w != dim else nn.Identity()
        if w != dim:
            with torch.no_grad():
                self.up.weight.copy_(torch.linalg.pinv((self.proj if cfg.proj == "shared" else self.proj[0]).T))   # undo W_0
        self.norm, self.output = _lm_head(cfg, target)
        cos, sin = rope_tables(bc)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpoint = False
        self._rev: dict[str, Tensor] = {}      # decode-time derived weights (setup_cache)

    # --- input rows ----------------------------------------------------------------------------
    @property
    def sum_width(self) -> int:
        """Width of a position's running sum: the module's (level) or the target's (shared, mapped later)."""
        return self.cfg.module_width if self.level_gain is None else self.cfg.dim

    def contribution(self, x: Tensor, levels: list[int]) -> Tensor:
        """x [k, dim]: checkpoint levels[i] of some position → what it adds to that position's running
        sum [k, sum_width]: W_c rms(x) (level) or g_c ⊙ rms(x) (shared)."""
        r = _rms(x, self.cfg.norm_eps)
        m = len(levels)
        steady = levels == list(range(m - 1, -1, -1))   # steady decoding: levels m-1..0, no gather needed
        if self.level_gain is not None:
            return r * (self._reversed("level_gain")[-m:] if steady else self.level_gain[levels])
        if steady:
            return torch.bmm(r[:, None, :].flip(0), self.proj[:m]).flip(0)[:, 0]
        return torch.bmm(r[:, None, :], self.proj[torch.tensor(levels)])[:, 0]

    def rows(self, sums: Tensor, depth: list[int]) -> Tensor:
        """Running sums [k, sum_width] of positions at depths `depth` → their input rows [k, w]."""
        m = len(depth)
        emb = self._reversed("depth_emb")[-m:] if depth == list(range(m - 1, -1, -1)) else self.depth_emb[depth]
        return (sums if self.proj is None or self.level_gain is None else sums @ self.proj) + emb

    def _reversed(self, name: str) -> Tensor:
        """Parameter `name` [n+1, ...] in reverse level order: levels m-1..0 are its last m rows (a view:
        steady decoding needs no gather). Built once by setup_cache, when the weights are final."""
        rev = self._rev.get(name)
        return rev if rev is not None else getattr(self, name).flip(0)

    def window_summary(self, window: Tensor) -> Tensor:
        """window [..., k, w]: rows of positions q-1..q-k at depths 1..k → the query's extra input."""
        k = window.shape[-2]
        return self.qwin((self.qwin_gate[:k] * window).sum(-2))

    # --- training: all positions in parallel ----------------------------------------------------
    def forward(self, ckpts: Tensor, tokens: Tensor | None = None) -> Tensor:
        """ckpts [B, T, n+1, dim] (positions 0..T-1) → logits [B, T, vocab]; row q drafts the token at
        q+1 as seen in the tick in which q enters stage 1."""
        n, T = self.cfg.stages, ckpts.shape[1]
        r = _rms(ckpts, self.cfg.norm_eps)
        if self.level_gain is None:
            rows = torch.einsum("btci,cio->btco", r, self.proj).cumsum(2) + self.depth_emb
        else:
            rows = (r * self.level_gain).cumsum(2)
            rows = (rows if self.proj is None else rows @ self.proj) + self.depth_emb   # [B, T, n+1, w]: depth d
        # Lists, not stacked tensors: indexing a stack costs a full-size zero tensor in backward.
        h = list(rows.unbind(2))                                # variant o = depth o
        if self.qwin is not None:                               # variant 0 is read only by its own query
            shift = lambda t, d: F.pad(t[:, : T - d], (0, 0, d, 0))
            h[0] = h[0] + self.window_summary(torch.stack([shift(h[d], d) for d in range(1, n + 1)], -2))
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for i, layer in enumerate(self.layers):
            keep = [0] if i == len(self.layers) - 1 else list(range(n + 1))
            if self.grad_checkpoint and self.training:
                h = torch.utils.checkpoint.checkpoint(self._layer, layer, h, cos, sin, keep, use_reentrant=False)
            else:
                h = self._layer(layer, h, cos, sin, keep)
        return self.output(self.norm(self.up(h[0])))

    def _layer(self, layer: Block, h: list[Tensor], cos: Tensor, sin: Tensor, keep: list[int]) -> list[Tensor]:
        """One Block over the offset variants h[o] [B, T, dim] → the variants in `keep`."""
        n = self.cfg.stages
        att = layer.attention
        B, T, _ = h[0].shape
        nh, hd = att.cfg.n_heads, att.cfg.head_dim
        x = [layer.attention_norm(v) for v in h]
        heads = lambda w, t: w(t).view(B, T, nh, hd).transpose(1, 2)             # [B, nh, T, hd]
        k = [apply_rope(heads(att.wk, t), cos, sin) for t in x]
        v = [heads(att.wv, t) for t in x]
        scale = hd ** -0.5
        j = torch.arange(T)
        lag = j[:, None] - j[None, :]                                             # j - i (query j, key i)
        out = []
        shift = lambda t, delta: F.pad(t[..., : T - delta, :], (0, 0, delta, 0))   # row j ← row j - delta
        for o in keep:
            q = apply_rope(heads(att.wq, x[o]), cos, sin)
            band_max = min(n - o, T)          # keys at lag < n - o are read at depth o + lag < n…
            dense = (q @ k[n].transpose(-1, -2) * scale).masked_fill((lag < band_max) | (self._too_far(lag, o)), float("-inf"))
            band = torch.stack([(q * shift(k[o + d], d)).sum(-1) * scale for d in range(band_max)], -1) \
                if band_max else q.new_zeros(B, nh, T, 0)                          # …the rest at depth n
            band = band.masked_fill(j[:, None] < torch.arange(band_max)[None, :], float("-inf"))
            p_dense, p_band = torch.softmax(torch.cat([dense, band], -1), dim=-1).split([T, band_max], -1)
            y = p_dense @ v[n]
            for d, w in enumerate(p_band.unbind(-1)):
                y = y + w[..., None] * shift(v[o + d], d)
            y = att.wo(y.transpose(1, 2).reshape(B, T, nh * hd))
            res = h[o] + y
            out.append(layer.mlp(res))
        return out

    def _too_far(self, lag: Tensor, o: int) -> Tensor:
        """Keys a query of offset o never sees: future ones, and for the window kind those beyond it."""
        far = lag < 0
        return far | (lag > self.cfg.stages - o) if self.cfg.kind == "window" else far

    # --- inference: one tick ---------------------------------------------------------------------
    def setup_cache(self) -> None:
        """Before decoding: fresh KV caches, and the last layer's q/k/v weights fused into one matrix
        (built here, once the weights are final: one product per call instead of three)."""
        p = self.output.weight
        for layer in self.layers:     # the window kind keeps no sequence, so no cache
            layer.attention.kv_cache = (KVCache(self.cfg.block_config(), 1, p.dtype).to(p.device)
                                        if self.cfg.kind == "spd" else None)
        att = self.layers[-1].attention
        self._wqkv = torch.cat([att.wq.weight, att.wk.weight, att.wv.weight]).detach()
        self._rev = {k: getattr(self, k).detach().flip(0)
                     for k in ("depth_emb", "level_gain") if getattr(self, k) is not None}

    def step(self, rows: Tensor, first: int) -> Tensor:
        """rows [1, m, dim] for positions first..first+m-1 (the last one is the query) → logits [vocab].
        The spd kind reads cached keys for positions < first; the window kind sees only these rows."""
        m = rows.shape[1]
        cos, sin = self.rope_cos[first:first + m], self.rope_sin[first:first + m]
        spd = self.cfg.kind == "spd"
        x = rows
        if len(self.layers) > 1:
            pos = torch.arange(first, first + m, device=rows.device) if spd else None
            for layer in self.layers[:-1]:
                x = layer(x, cos, sin, pos)
        return self._query_through(self.layers[-1], x[0], cos, sin, first if spd else None)

    def _query_through(self, layer: Block, x: Tensor, cos: Tensor, sin: Tensor, first: int | None) -> Tensor:
        """The last layer for the query alone: every row x [m, w] gives its key and value, only the newest
        one is read (the other rows' outputs feed nothing), so their output and FFN are skipped. Written
        for few operator calls (on a CPU a call costs more than its arithmetic): one fused q/k/v product
        and one rotation for all rows, the heads as the batch dimension."""
        att, m = layer.attention, x.shape[0]
        nh, hd = att.cfg.n_heads, att.cfg.head_dim
        qkv = F.linear(layer.attention_norm(x), self._wqkv).view(m, 3 * nh, hd)
        qk = apply_rope(qkv[:, : 2 * nh], cos[:, None], sin[:, None])        # [m, 2 nh, hd]
        q = qk[None, -1:, :nh].transpose(1, 2)                                  # [1, nh, 1, hd]
        k, v = qk[None, :, nh:].transpose(1, 2), qkv[None, :, 2 * nh:].transpose(1, 2)   # [1, nh, m, hd]
        if first is not None:                 # keys of earlier positions come from the cache
            k, v = att.kv_cache.update_range(first, k, v)
        # [1, nh, 1, hd]: the newest position sees every key (4-D: the fused CPU kernel; 3-D took 2x as long)
        y = F.scaled_dot_product_attention(q, k, v)
        h = layer.mlp(x[-1] + F.linear(y.reshape(-1), att.wo.weight))
        return self.output(self.norm(self.up(h)))
