"""Baselines of the acceptance study (`executor acceptance`), with the speculative module's interface
(`forward(ckpts, tokens) -> logits`): a k-ahead head (Medusa-style, from the last fully computed
position only) and early exit (the LM head on the newest position's only feature, its embedding; raw or
through a trained projection). Trained beside `SpecHead` on the same batches; the pipeline never runs them."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from executor.model import Transformer
from executor.spec_head import HeadConfig, _lm_head


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
