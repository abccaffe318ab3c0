"""Speculative sampling at temperature > 0: the one acceptance rule rank 0 applies to every draft."""
from __future__ import annotations

import torch
from torch import Tensor


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
