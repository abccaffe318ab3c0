"""The drafter interface: what speculates the token that enters stage 1 next (DESIGN §2).

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

from abc import ABC, abstractmethod

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
