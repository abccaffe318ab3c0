"""Drafters: what speculates the token that enters stage 1 next (DESIGN §2).

The pipeline's first rank drives a drafter through this interface (see executor/pipeline.py):

  start(prompt_tokens, features)   once, after the prefill. `features` is None unless `needs_features`;
                                   then it maps depth d → a [P-1, dim] tensor for prompt positions 0..P-2.
  add_features(depth, position, h) a hidden state [dim] of `position` at `depth` (needs_features only).
                                   Depth 0 is the embedding output, depth s+1 the output of stage s
                                   (0-based), depth n the last stage's final hidden state (before the norm).
  draft(position, token) -> int    the token at position+1, called right after `position` went into
                                   stage 1 with `token`.
  sample(position, token, T, gen)  the same at temperature T > 0: (a token drawn from the drafter's
    -> (int, q)                    distribution q at T, q [vocab]); rank 0 verifies it by speculative
                                   sampling against the target's p at T. Only drafters that have a
                                   distribution implement it (the oracle has none).
  rollback(position)               positions ≥ `position` are void (a rejection); their features too.

Feature timing (the seed's multi-depth window). When drafting for q+1 the first rank has given the
drafter exactly the features at depth min(q-j, n) of every position j ≤ q: the embedding of q, stage
1's output of q-1, …, the final hidden state of positions ≤ q-n (and anything older it already had).
The first rank waits for those before it issues q.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor

from spdsim.errors import UserError


class Drafter(ABC):
    needs_features: bool = False

    def start(self, prompt_tokens: list[int], features: dict[int, Tensor] | None) -> None:
        pass

    def add_features(self, depth: int, position: int, hidden: Tensor) -> None:
        pass

    @abstractmethod
    def draft(self, position: int, token: int) -> int: ...

    def sample(self, position: int, token: int, temperature: float,
               generator: torch.Generator | None = None) -> tuple[int, Tensor]:
        raise UserError(f"the {type(self).__name__} cannot draft at temperature > 0 (it has no draft "
                        f"distribution to sample from): use --temperature 0 or --draft head:PATH")

    def rollback(self, position: int) -> None:
        pass


class OracleDrafter(Drafter):
    """Knows the greedy continuation (from an AR run done before timing) and speculates the true token
    with probability alpha, else a wrong one (true + 1 mod vocab): acceptance under control."""

    def __init__(self, alpha: float, reference_tokens: list[int], seed: int = 0, vocab_size: int = 256) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"oracle alpha must be in [0, 1], got {alpha}")
        self.alpha, self.reference, self.vocab = alpha, list(reference_tokens), vocab_size
        self.rng = random.Random(seed)
        self.prompt_len = 0

    def start(self, prompt_tokens: list[int], features: dict[int, Tensor] | None) -> None:
        self.prompt_len = len(prompt_tokens)

    def draft(self, position: int, token: int) -> int:
        true = self.reference[position + 1 - self.prompt_len]
        return true if self.rng.random() < self.alpha else (true + 1) % self.vocab


def parse_draft(spec: str | None) -> tuple[str, float | str] | None:
    """'oracle:ALPHA' → ('oracle', alpha); 'head:PATH' → ('head', path). UserError when malformed."""
    if spec is None:
        return None
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise UserError(f"--draft {spec!r}: expected oracle:ALPHA or head:PATH")
    if kind == "oracle":
        try:
            alpha = float(arg)
        except ValueError:
            raise UserError(f"--draft {spec!r}: ALPHA must be a number in [0, 1]") from None
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"--draft {spec!r}: ALPHA must be in [0, 1]")
        return "oracle", alpha
    if kind == "head":
        if not Path(arg).exists():
            raise UserError(f"--draft {spec!r}: no such file {arg}")
        return "head", arg
    raise UserError(f"--draft {spec!r}: unknown drafter {kind!r} (expected oracle:ALPHA or head:PATH)")


def make_drafter(parsed: tuple[str, float | str], reference: list[int] | None, seed: int, model, stages: int) -> Drafter:
    """Build the drafter on the first rank. `model` is the full Transformer (the head may share its
    embedding / LM head); `stages` is n, the deepest feature depth."""
    kind, arg = parsed
    if kind == "oracle":
        assert reference is not None, "the oracle needs the reference continuation"
        return OracleDrafter(float(arg), reference, seed, model.cfg.vocab_size)
    try:
        from executor.spec_head import load_head_drafter   # the speculative module (next issue)
    except ImportError:
        raise UserError("--draft head:PATH needs the speculative module (executor/spec_head.py), "
                        "which is not built yet") from None
    return load_head_drafter(arg, model=model, stages=stages)
