"""The pipeline's drafter for a trained speculative module (`executor run --draft head:PATH`)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from spdsim.errors import UserError

from executor.drafter_base import Drafter
from executor.drafter_modules import load_drafter
from executor.model import Transformer
from executor.spec_head import SpecHead


class HeadDrafter(Drafter):
    """A trained `SpecHead` behind the pipeline's drafter interface (executor/drafters.py). It keeps
    every checkpoint of every position as the stages report them, and each call reads position j at
    exactly depth min(q - j, n), what training saw (`SpecHead.forward`), even when deeper features
    already exist (after the prefill or a flush).

    Cost per call: each window position j keeps a running sum of its projected checkpoints
    (`sums[j]`, summed up to depth `summed[j]`). In steady decoding every window position goes one level
    deeper per call, so a call projects n + 1 new checkpoints and adds them; after a start or a flush
    the window's sums are rebuilt from the stored checkpoints. Bookkeeping is plain Python: on this
    scale a tensor op costs more than the arithmetic it does."""

    needs_features = True

    def __init__(self, head: SpecHead, target: Transformer) -> None:
        if head.cfg.kind not in ("spd", "window"):
            raise ValueError(f"HeadDrafter runs spd/window modules, not {head.cfg.kind!r}")
        if head.cfg.dim != target.cfg.dim or head.cfg.vocab_size != target.cfg.vocab_size:
            raise ValueError("the speculative module was trained for a different target model")
        self.head = head.eval()
        self.n = head.cfg.stages
        self.embed = target.tok_embeddings.weight.detach().float()      # a view when already fp32
        self.feats: dict[tuple[int, int], Tensor] = {}      # (position, level) → hidden state, as delivered
        self.sums = torch.zeros(head.cfg.max_seq_len, head.sum_width)
        self.summed: list[int] = [-1] * head.cfg.max_seq_len  # deepest level in sums[j] (-1: none)
        self.top = -1             # the highest position holding anything
        self.stable = 0           # the module's KV cache holds final (depth-n) rows for positions < stable

    @torch.no_grad()
    def start(self, prompt_tokens: list[int], features: dict[int, Tensor] | None = None) -> None:
        """features: depth → [P', dim] hidden states of prompt positions 0..P'-1 (the prefill; P' ≤ P)."""
        self.feats.clear()
        self.summed = [-1] * len(self.summed)
        self.stable = 0
        self.head.setup_cache()
        for depth, h in (features or {}).items():
            for j, row in enumerate(h.reshape(-1, self.head.cfg.dim).detach().float()):
                self.feats[(j, depth)] = row
        emb = self.embed[torch.tensor(prompt_tokens, dtype=torch.long)]
        for j, row in enumerate(emb):
            self.feats[(j, 0)] = row
        self.top = len(prompt_tokens) - 1

    def add_features(self, depth: int, position: int, hidden: Tensor) -> None:
        """`position`'s hidden state at `depth` (0: embedding, s: stage s's output, n: the final hidden
        state before the norm)."""
        self.feats[(position, depth)] = hidden.reshape(-1)
        if self.summed[position] >= depth:      # replaces a summed checkpoint: rebuild that sum
            self.summed[position] = -1
        self.top = max(self.top, position)

    def rollback(self, position: int) -> None:
        """Positions ≥ `position` are void (a rejection)."""
        for j in range(position, self.top + 1):
            self.summed[j] = -1
            for c in range(self.n + 1):
                self.feats.pop((j, c), None)
        self.top = min(self.top, position - 1)
        self.stable = min(self.stable, max(0, position - self.n))

    @torch.no_grad()
    def logits(self, position: int, token: int) -> Tensor:
        """The module's logits for the token at position+1, drafted as `position` enters stage 1."""
        q, n, feats = position, self.n, self.feats
        self.add_features(0, q, self.embed[token])
        spd = self.head.cfg.kind == "spd"
        # spd: recompute from the first position not yet final in the cache; window: the n + 1 newest.
        first = max(0, min(self.stable, q - n) if spd else q - n)
        window = range(first, q + 1)
        depth = [min(q - j, n) for j in window]                  # position j is read at depth min(q - j, n)
        if any((j, c) not in feats for j, d in zip(window, depth) for c in range(d + 1)):
            raise RuntimeError(f"drafting at position {q}: the features at depth min({q} - j, {n}) of some "
                               f"position j in [{first}, {q}] were not delivered")
        if all(self.summed[j] == d - 1 for j, d in zip(window, depth)):     # steady: one level each
            self.sums[q].zero_()
            self.sums[first:q + 1] += self.head.contribution(torch.stack([feats[(j, d)] for j, d in zip(window, depth)]), depth)
        else:                                                    # rebuild the window's sums
            pairs = [(i, c) for i, d in enumerate(depth) for c in range(d + 1)]
            contrib = self.head.contribution(torch.stack([feats[(first + i, c)] for i, c in pairs]), [c for _, c in pairs])
            self.sums[first:q + 1] = torch.zeros(len(depth), contrib.shape[1]).index_add_(
                0, torch.tensor([i for i, _ in pairs]), contrib)
        for j, d in zip(window, depth):
            self.summed[j] = d
        rows = self.head.rows(self.sums[first:q + 1], depth)
        if self.head.qwin is not None:      # rows[-1 - d] is position q - d at depth d, d = 1..k
            k = min(n, len(rows) - 1)
            if k:
                rows[-1] += self.head.window_summary(rows[-1 - k:-1].flip(0))
        out = self.head.step(rows[None], first)
        if spd:   # positions ≤ q - n were written at depth n; later ones are transient
            self.stable = max(0, q - n + 1)
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
