"""The speculative module (DESIGN §2): drafts the token at q+1 in the tick in which position q enters
stage 1, from target features taken at several pipeline depths.

Depth rule. At that tick position j ≤ q has been through d = min(q - j, n) stages: d = 0 is the
embedding only (the newest position), d = s the output of stage s, d = n the final layer. Checkpoint c
of a position is the target's hidden state at the boundary of stage c (c = 0: the embedding). A position
at depth d contributes one input row: a per-depth projection of its d + 1 checkpoints, each RMS-normed
(hidden magnitudes grow with depth).

The module is a small causal transformer over those rows (the target's `Block`, RoPE, its own KV cache)
and an LM head initialised from the target's final norm and output. With `query_window` (the committed
modules) the query row also gets a linear map of each window row (position q-d at depth d): a direct
path that attention over the whole sequence otherwise has to learn (+6 points at the same budget). Positions at depth n never change
again and live in the KV cache; the n newest positions change depth every tick, so each call recomputes
their rows (n + 1 rows: the one reaching depth n this tick is then final). Rolling back is free: cache
entries ≤ the query position are the only ones read, and later writes overwrite discarded ones.

Training runs all positions in parallel and must see what inference sees. With more than one layer, a
position's hidden state in layer ℓ > 1 depends on *when* it is read (its keys were shallower earlier),
so each layer keeps n + 1 variants of every position, by time offset o = (reading time) - position:
variant o of position j attends to key i through key variant min(o + j - i, n). Variant n is the stable
one; the n others differ from it only on a band of n diagonals, so a layer costs one dense attention
per variant plus O(n²·T) band terms. The last layer needs only variant 0 (the drafted query itself),
so a one-layer module costs one dense attention. `tests/test_spec_head.py` checks the parallel forward
against the step-by-step drafter.

Baselines with the same interface (`forward(ckpts, tokens) -> logits`): a k-ahead head (Medusa-style,
from the last fully computed position only), early exit (LM head on the newest position's only feature,
its embedding; raw or through a trained projection) and a depth-window head (this module restricted to
the n + 1 newest rows, no sequence).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from spdsim.errors import UserError

from executor.drafters import Drafter
from executor.model import Block, KVCache, ModelConfig, RMSNorm, Transformer, apply_rope, rope_tables, uniform_partition

KINDS = ("spd", "window", "k-ahead", "early-exit", "early-exit-raw")


@dataclass(frozen=True)
class HeadConfig:
    kind: str                      # one of KINDS
    stages: int                    # n: pipeline depth the drafter is trained for
    checkpoints: tuple[int, ...]   # target layer index of checkpoint c = 0..n (0: embedding, n: last layer)
    dim: int                       # target hidden size (the module works at the same width)
    vocab_size: int
    n_layers: int = 1
    query_window: bool = False     # the query row also gets a linear summary of the window's newest rows
    n_heads: int = 4
    ffn_dim: int = 688
    max_seq_len: int = 1024
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown drafter kind {self.kind!r} (one of {', '.join(KINDS)})")
        if len(self.checkpoints) != self.stages + 1:
            raise ValueError(f"{self.stages} stages need {self.stages + 1} checkpoints, got {self.checkpoints}")

    @classmethod
    def for_target(cls, target: ModelConfig, stages: int, kind: str = "spd", **kw) -> "HeadConfig":
        bounds = [0] + [last for _, last in uniform_partition(target.n_layers, stages)]
        return cls(kind=kind, stages=stages, checkpoints=tuple(bounds), dim=target.dim,
                   vocab_size=target.vocab_size, max_seq_len=target.max_seq_len, norm_eps=target.norm_eps, **kw)

    def block_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, n_layers=self.n_layers, dim=self.dim, n_heads=self.n_heads,
                           n_kv_heads=self.n_heads, ffn_dim=self.ffn_dim, max_seq_len=self.max_seq_len,
                           norm_eps=self.norm_eps)

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
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


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
        n, dim = cfg.stages, cfg.dim
        g = torch.Generator().manual_seed(seed)
        # One projection per depth level: depth d sees checkpoints 0..d. Initialised to average them,
        # so the untrained module starts from the features themselves.
        self.proj = nn.ModuleList(nn.Linear((d + 1) * dim, dim, bias=False) for d in range(n + 1))
        for d, p in enumerate(self.proj):
            with torch.no_grad():
                p.weight.copy_(torch.eye(dim).repeat(1, d + 1) / (d + 1) + 0.01 * torch.randn(p.weight.shape, generator=g))
        # Optional direct path from the window to the query (position q-d at depth d, d = 1..n), zero at
        # init; attention alone must otherwise learn to find those few keys among the whole sequence.
        self.qwin = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(n if cfg.query_window else 0))
        for w in self.qwin:
            nn.init.zeros_(w.weight)
        bc = cfg.block_config()
        self.layers = nn.ModuleList(Block(bc) for _ in range(cfg.n_layers))
        for name, p in self.layers.named_parameters():
            if p.dim() == 2:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        self.norm, self.output = _lm_head(cfg, target)
        cos, sin = rope_tables(bc)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpoint = False

    # --- input rows ----------------------------------------------------------------------------
    def row(self, ckpts: Tensor, depth: int, normed: bool = False) -> Tensor:
        """ckpts [..., ≥ depth+1, dim] → the input row of a position at `depth`: [..., dim]."""
        x = ckpts[..., : depth + 1, :]
        return self.proj[depth]((x if normed else _rms(x, self.cfg.norm_eps)).flatten(-2))

    # --- training: all positions in parallel ----------------------------------------------------
    def forward(self, ckpts: Tensor, tokens: Tensor | None = None) -> Tensor:
        """ckpts [B, T, n+1, dim] (positions 0..T-1) → logits [B, T, vocab]; row q drafts the token at
        q+1 as seen in the tick in which q enters stage 1."""
        n, T = self.cfg.stages, ckpts.shape[1]
        # Lists, not stacked tensors: indexing a stack costs a full-size zero tensor in backward.
        r = [_rms(c, self.cfg.norm_eps) for c in ckpts.unbind(2)]
        h = [self.proj[d](torch.cat(r[: d + 1], -1)) for d in range(n + 1)]     # variant o = depth o
        for d, w in enumerate(self.qwin, start=1):     # variant 0 is read only by its own query
            h[0] = h[0] + w(F.pad(h[d][:, : T - d], (0, 0, d, 0)))
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for i, layer in enumerate(self.layers):
            keep = [0] if i == len(self.layers) - 1 else list(range(n + 1))
            if self.grad_checkpoint and self.training:
                h = torch.utils.checkpoint.checkpoint(self._layer, layer, h, cos, sin, keep, use_reentrant=False)
            else:
                h = self._layer(layer, h, cos, sin, keep)
        return self.output(self.norm(h[0]))

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
            out.append(res + layer.feed_forward(layer.ffn_norm(res)))
        return out

    def _too_far(self, lag: Tensor, o: int) -> Tensor:
        """Keys a query of offset o never sees: future ones, and for the window kind those beyond it."""
        far = lag < 0
        return far | (lag > self.cfg.stages - o) if self.cfg.kind == "window" else far

    # --- inference: one tick ---------------------------------------------------------------------
    def setup_cache(self) -> None:
        p = self.output.weight
        for layer in self.layers:     # the window kind keeps no sequence, so no cache
            layer.attention.kv_cache = (KVCache(self.cfg.block_config(), 1, p.dtype).to(p.device)
                                        if self.cfg.kind == "spd" else None)

    def step(self, rows: Tensor, first: int) -> Tensor:
        """rows [1, m, dim] for positions first..first+m-1 (the last one is the query) → logits [vocab].
        The spd kind reads cached keys for positions < first; the window kind sees only these rows."""
        pos = torch.arange(first, first + rows.shape[1], device=rows.device)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = rows
        for layer in self.layers:
            x = layer(x, cos, sin, pos if self.cfg.kind == "spd" else None)
        return self.output(self.norm(x[0, -1]))


class KAheadHead(nn.Module):
    """Medusa-style: drafts the token at q+1 from the final hidden state of the last fully computed
    position, q - n, alone (Medusa's head k = n: n + 1 tokens after the position it reads)."""

    def __init__(self, cfg: HeadConfig, target: Transformer | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.res = nn.Linear(cfg.dim, cfg.dim)
        nn.init.zeros_(self.res.weight)          # Medusa's init: starts as the target's own LM head
        nn.init.zeros_(self.res.bias)
        self.norm, self.output = _lm_head(cfg, target)

    def forward(self, ckpts: Tensor, tokens: Tensor | None = None) -> Tensor:
        n = self.cfg.stages
        src = F.pad(ckpts[:, :, n, :], (0, 0, n, 0))[:, : ckpts.shape[1]]     # row q ← final hidden of q - n
        h = src + F.silu(self.res(src))
        return self.output(self.norm(h))


class EarlyExitHead(nn.Module):
    """Early exit: the LM head on the deepest feature the newest position has — its embedding (depth 0).
    Kind "early-exit-raw" is the untrained target head; "early-exit" trains a projection in front of it."""

    def __init__(self, cfg: HeadConfig, target: Transformer | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        nn.init.eye_(self.proj.weight)
        self.norm, self.output = _lm_head(cfg, target)
        for p in [*self.norm.parameters(), *self.output.parameters()]:
            p.requires_grad_(False)              # only the projection is trained
        if cfg.kind == "early-exit-raw":
            self.proj.weight.requires_grad_(False)

    def forward(self, ckpts: Tensor, tokens: Tensor | None = None) -> Tensor:
        return self.output(self.norm(self.proj(ckpts[:, :, 0, :])))


def build_drafter(cfg: HeadConfig, target: Transformer | None = None, seed: int = 0) -> nn.Module:
    cls = {"spd": SpecHead, "window": SpecHead, "k-ahead": KAheadHead,
           "early-exit": EarlyExitHead, "early-exit-raw": EarlyExitHead}[cfg.kind]
    return cls(cfg, target, seed)


# --- files ---------------------------------------------------------------------------------------

def save_drafter(module: nn.Module, path: str | Path, meta: dict | None = None) -> None:
    """`<path>` (safetensors, fp16: the committed heads stay small) + `<path>.json` (config, metadata)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    Path(str(path) + ".json").write_text(json.dumps({"head": module.cfg.to_json(), **(meta or {})}, indent=2))


def load_drafter(path: str | Path) -> nn.Module:
    from safetensors.torch import load_file
    path = Path(path)
    meta_path = Path(str(path) + ".json")
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"{path}: no such speculative module (expected {path} and {meta_path})")
    cfg = HeadConfig.from_json(json.loads(meta_path.read_text())["head"])
    module = build_drafter(cfg)
    module.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return module.eval()


# --- the pipeline's drafter ----------------------------------------------------------------------

class HeadDrafter(Drafter):
    """A trained `SpecHead` behind the pipeline's drafter interface (executor/drafters.py). It keeps
    every checkpoint of every position as the stages report them, and each call reads position j at
    exactly depth min(q - j, n), what training saw (`SpecHead.forward`), even when deeper features
    already exist (after the prefill or a flush)."""

    needs_features = True

    def __init__(self, head: SpecHead, target: Transformer) -> None:
        if head.cfg.kind not in ("spd", "window"):
            raise ValueError(f"HeadDrafter runs spd/window modules, not {head.cfg.kind!r}")
        if head.cfg.dim != target.cfg.dim or head.cfg.vocab_size != target.cfg.vocab_size:
            raise ValueError("the speculative module was trained for a different target model")
        self.head = head.eval()
        self.n = head.cfg.stages
        self.embed = target.tok_embeddings
        L = head.cfg.max_seq_len
        self.feats = torch.zeros(L, self.n + 1, head.cfg.dim)     # RMS-normed on arrival, as in training
        self.have = torch.zeros(L, self.n + 1, dtype=torch.bool)
        self.stable = 0           # the module's KV cache holds final (depth-n) rows for positions < stable
        self.last_logits: Tensor | None = None

    @torch.no_grad()
    def start(self, prompt_tokens: list[int], features: dict[int, Tensor] | None = None) -> None:
        """features: depth → [P', dim] hidden states of prompt positions 0..P'-1 (the prefill; P' ≤ P)."""
        self.feats.zero_()
        self.have.zero_()
        self.stable = 0
        self.head.setup_cache()
        for depth, h in (features or {}).items():
            h = h.reshape(-1, self.head.cfg.dim)
            self.feats[: len(h), depth] = self._norm(h)
            self.have[: len(h), depth] = True
        toks = torch.tensor(prompt_tokens, dtype=torch.long)
        self.feats[: len(toks), 0] = self._norm(self.embed.weight[toks])
        self.have[: len(toks), 0] = True

    def add_features(self, depth: int, position: int, hidden: Tensor) -> None:
        """`position`'s hidden state at `depth` (0: embedding, s: stage s's output, n: the final hidden
        state before the norm)."""
        self.feats[position, depth] = self._norm(hidden.reshape(-1))
        self.have[position, depth] = True

    def _norm(self, h: Tensor) -> Tensor:
        return _rms(h.detach().float(), self.head.cfg.norm_eps)

    def rollback(self, position: int) -> None:
        """Positions ≥ `position` are void (a rejection)."""
        self.have[position:] = False
        self.stable = min(self.stable, max(0, position - self.n))

    @torch.no_grad()
    def logits(self, position: int, token: int) -> Tensor:
        """The module's logits for the token at position+1, drafted as `position` enters stage 1."""
        q, n = position, self.n
        self.feats[q, 0] = self._norm(self.embed.weight[token])
        self.have[q, 0] = True
        spd = self.head.cfg.kind == "spd"
        # spd: recompute from the first position not yet final in the cache; window: the n + 1 newest.
        first = max(0, min(self.stable, q - n) if spd else q - n)
        # rows in position order: depth n for first..q-n (final), then one row each at depth n-1..0
        stable_end = max(first, q - n + 1)
        if not (bool(self.have[first:stable_end, n].all())
                and all(bool(self.have[q - d, d]) for d in range(min(n, q - first + 1)))):
            raise RuntimeError(f"drafting at position {q}: the features at depth min({q} - j, {n}) of some "
                               f"position j in [{first}, {q}] were not delivered")
        parts = [self.head.row(self.feats[first:stable_end], n, normed=True)] if stable_end > first else []
        parts += [self.head.row(self.feats[q - d], d, normed=True)[None] for d in range(min(n, q - first + 1) - 1, -1, -1)]
        rows = torch.cat(parts)
        for d, w in enumerate(self.head.qwin, start=1):    # rows[-1 - d] is position q - d at depth d
            if q - d >= first:
                rows[-1] = rows[-1] + w(rows[-1 - d])
        out = self.head.step(rows[None], first)
        if spd:   # positions ≤ q - n were written at depth n; later ones are transient
            self.stable = max(0, q - n + 1)
        self.last_logits = out
        return out

    def draft(self, position: int, token: int) -> int:
        return int(self.logits(position, token).argmax())

    def sample(self, position: int, token: int, temperature: float,
               generator: torch.Generator | None = None) -> tuple[int, Tensor]:
        """For temperature > 0: (a draft sampled from the module's distribution q, q itself); the verifier
        then applies `speculative_accept` with the target's distribution p at the same temperature."""
        q = torch.softmax(self.logits(position, token).float() / temperature, -1)
        return int(torch.multinomial(q, 1, generator=generator)), q


def load_head_drafter(path: str | Path, model: Transformer, stages: int) -> HeadDrafter:
    """`executor run --draft head:PATH`: the module must have been trained for this target and n."""
    try:
        head = load_drafter(path)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"--draft head:{path}: {e}") from None
    if head.cfg.stages != stages:
        raise UserError(f"--draft head:{path}: trained for {head.cfg.stages} stages, the run has {stages} "
                        f"(train one with `executor train-head --stages {stages}`)")
    if not isinstance(head, SpecHead):
        raise UserError(f"--draft head:{path}: a {head.cfg.kind} baseline, not a speculative module")
    try:
        return HeadDrafter(head, model)
    except ValueError as e:
        raise UserError(f"--draft head:{path}: {e}") from None


# --- sampling (temperature > 0) ------------------------------------------------------------------

def speculative_accept(p: Tensor, q: Tensor, draft: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023), batched over leading dims.

    p, q: [..., vocab] the target's and the drafter's distributions at the drafted position; draft [...]:
    the token sampled from q. Accept it with probability min(1, p/q); otherwise return a token drawn from
    the normalised residual max(p - q, 0). Either way the returned token is distributed exactly as p,
    so SPD stays lossless in distribution. Returns (accepted [...] bool, token [...])."""
    pd = p.gather(-1, draft[..., None])[..., 0]
    qd = q.gather(-1, draft[..., None])[..., 0]
    u = torch.rand(pd.shape, generator=generator)
    accepted = u * qd < pd                          # u < p/q without dividing by a zero q
    residual = (p - q).clamp(min=0)
    norm = residual.sum(-1, keepdim=True)
    residual = torch.where(norm > 0, residual / norm.clamp(min=1e-30), p)   # p == q: never rejected anyway
    resampled = torch.multinomial(residual.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(pd.shape)
    return accepted, torch.where(accepted, draft, resampled)
