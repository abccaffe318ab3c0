"""Drafters (DESIGN §2): the oracle, `--draft` parsing and the registry that builds a drafter on the
first rank. The interface they implement is `executor.drafter_base.Drafter`."""
from __future__ import annotations

import random
from pathlib import Path

from torch import Tensor

from spdsim.errors import UserError

from executor.drafter_base import Drafter


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
        from executor.head_drafter import load_head_drafter   # the speculative module (next issue)
    except ImportError:
        raise UserError("--draft head:PATH needs the speculative module (executor/spec_head.py, run by executor/head_drafter.py), "
                        "which is not built yet") from None
    return load_head_drafter(arg, model=model, stages=stages)
