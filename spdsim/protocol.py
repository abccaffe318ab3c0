"""The SPD control protocol (DESIGN §2), defined once.

The executor's first rank and the simulator's stage-1 process both drive this state machine, so the
simulator models exactly the protocol the real pipeline runs. AR is n = 1, PP is SPD with window 1.
Several requests in one pipeline (serving, DESIGN §2 ⚑): `spdsim.serving_protocol.ServingController`,
one SpdController per request plus admission and the policy choosing what enters stage 1.

Positions. The prompt fills positions 0..P-1 (prefill writes the KV cache of 0..P-2). Decoding starts
by feeding the last prompt token, position P-1, to stage 1. The output of position q leaving the last
stage is the true token at q+1. N new tokens are the tokens at positions P..P+N-1.

Messages (every one carries the epoch in which its position was issued):
  ACT(epoch, position, token)    stage s → stage s+1: the activation of `position`.
  RESULT(epoch, position, token) last stage → first rank: the true token at position+1.
  FEATURES                       each stage → the speculative module's device (trained drafters only).

Rules.
  1. Window. The first rank issues position q into stage 1 only when q < K - 1 + W, where K is the first
     position whose token is not yet known and W = n for SPD, 1 for PP and AR. At most W positions are
     in flight, and under PP stage 1 waits a full round trip for every token.
  2. Drafting. When it issues position q (SPD), the speculative module drafts the token at q+1,
     overlapped with the stage forwards (on stage 1's device or on a dedicated one).
  3. Epochs instead of a flush broadcast. A stage that receives a message with a newer epoch rolls its
     KV cache back to that message's position and adopts the epoch; one with an older epoch is dropped.
     Links are FIFO, so a stage sees every stale message before the first new-epoch one, and processes
     it: that compute is the waste of DESIGN §3. A flush broadcast would save that compute but not time
     (the restarted token reaches stage s only s ticks later, after the stale work is done) and would
     cost a message per stage per rejection.
  4. Verification, at the first rank, on RESULT(e, p, t): if e is not the current epoch the result is
     stale and dropped. Otherwise t is committed as the token at p+1; if position p+1 was issued with a
     drafted token, that draft is verified: accepted → go on; rejected → epoch += 1, every in-flight
     position > p is void, and position p+1 is issued next with the true token t.
  5. Nothing past the last useful position (P+N-2) is issued; the run ends at the N-th commit.

Tensor-parallel stages (DESIGN §2 ⚑, both halves do exactly this). A stage may be a TP group of t ranks
(stage s, TP rank r = 0..t-1), Megatron-style: q/k/v and gate/up column-parallel, o and down
row-parallel, each followed by an all-reduce of one token's hidden state (two per layer); the KV cache
split by KV heads (replicated when kv_heads < t). The embedding is replicated (a lookup reads one row;
splitting it would save memory only); the LM head is vocab-parallel and the last stage all-gathers the
logits row (t × vocab/t values) so every rank of the group has the true token (and the logits at T > 0).
  - ACT: every TP rank r of stage s sends its copy of the activation (identical on every rank after the
    all-reduce) to TP rank r of stage s+1: t messages in parallel, no broadcast inside the next group.
  - The protocol above (SpdController, the drafter, verification) runs on stage 1's TP rank 0, which
    sends each issue (epoch, position, token) to the other TP ranks of stage 1 before its own forward.
  - RESULT and the drafter's features leave from TP rank 0 of their stage.
  - A stage's `compute` event spans its whole forward, all-reduces included; each all-reduce is also an
    `allreduce` event (bytes set) inside it, so the all-reduce share can be read off either trace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Issue:
    position: int
    epoch: int
    speculative: bool      # the input token at `position` is a draft, not yet verified


@dataclass(frozen=True)
class Verdict:
    position: int          # p: the position whose output arrived; the committed token is at p+1
    stale: bool            # from an older epoch: dropped, nothing committed
    accepted: bool | None  # the draft at p+1 verified; None when no draft at p+1 was in flight
    committed: int         # tokens committed so far, this one included

    def marks(self) -> list[tuple[str, int, bool | None]]:
        """The instant trace events this verdict produces, in order, as (kind, position, accepted):
        verify (when a draft was checked), flush (on a rejection), commit. Nothing for a stale result.
        Both halves log a verdict through this, so their traces agree event for event."""
        if self.stale:
            return []
        p = self.position
        out: list[tuple[str, int, bool | None]] = []
        if self.accepted is not None:
            out.append(("verify", p + 1, self.accepted))
            if not self.accepted:
                out.append(("flush", p, None))
        out.append(("commit", p + 1, None))
        return out


class SpdController:
    """The first rank's bookkeeping: what to issue next, which results count, when to flush."""

    def __init__(self, prompt_len: int, new_tokens: int, window: int) -> None:
        if prompt_len < 1:
            raise ValueError("the prompt needs at least one token")
        if new_tokens < 1:
            raise ValueError("new_tokens must be ≥ 1")
        if window < 1:
            raise ValueError("window must be ≥ 1")
        self.prompt_len = prompt_len
        self.new_tokens = new_tokens
        self.window = window
        self.epoch = 0
        self.known = prompt_len               # K: tokens at positions < K are known
        self.next_position = prompt_len - 1   # the next position to issue into stage 1
        self.last_useful = prompt_len + new_tokens - 2

    @property
    def committed(self) -> int:
        return self.known - self.prompt_len

    @property
    def done(self) -> bool:
        return self.committed >= self.new_tokens

    def can_issue(self) -> bool:
        return (not self.done and self.next_position <= self.last_useful
                and self.next_position < self.known - 1 + self.window)

    def issue(self) -> Issue:
        if not self.can_issue():
            raise RuntimeError("issue() outside the window")
        q = self.next_position
        self.next_position += 1
        return Issue(position=q, epoch=self.epoch, speculative=q >= self.known)

    def on_result(self, position: int, epoch: int, accept: Callable[[], bool]) -> Verdict:
        """A RESULT for `position` arrived. `accept()` is asked only when a draft at position+1 was in
        flight: the executor compares tokens, the simulator draws from its acceptance process."""
        if epoch != self.epoch:
            return Verdict(position, stale=True, accepted=None, committed=self.committed)
        if position != self.known - 1:
            raise RuntimeError(f"result for position {position} out of order (expected {self.known - 1})")
        self.known += 1
        accepted: bool | None = None
        if self.next_position > position + 1:      # position+1 went in with a drafted token
            accepted = bool(accept())
            if not accepted:
                self.epoch += 1
                self.next_position = position + 1
        return Verdict(position, stale=False, accepted=accepted, committed=self.committed)


# --- the reference implementation's variant: synchronous cycles and a slot table -------------------
#
# The authors' implementation (REFERENCE.md, "The authors' reference implementation") runs n + 1 ranks:
# rank 0 holds the speculative module, the embedding, the final norm + LM head and the verification;
# ranks 1..n one stage each. It moves in lockstep *cycles* driven by rank 0:
#   1. control: rank 0 builds and broadcasts a control message, the slot table — which (position,
#      epoch) each stage processes in this cycle, or none — and posts its receives;
#   2. rank 0 embeds the token entering stage 1 and sends it; every stage with a slot forwards it (stage
#      s > 1 received its input in the previous cycle) and sends the result on; meanwhile rank 0 drafts
#      the token that will enter in the next cycle (the draft overlaps the stage forwards);
#   3. rank 0 waits for the last stage's hidden state, applies the norm + LM head and verifies;
#   4. it updates the slot table: accepted (or nothing to verify) → every slot moves one stage deeper and
#      the next position enters stage 1; rejected → every slot is cleared, and the pipeline refills from
#      the corrected token alone;
#   5. sync: it waits for its outstanding point-to-point operations before the next cycle.
# The differences from the protocol above: a flush is carried by the slot table (a cleared slot is
# simply not computed, so there is no stale work downstream, and no epochs on the wire), and a cycle
# lasts as long as its slowest participant plus rank 0's fixed phases. Issue order, windows and verdicts
# are the same, so `CycleController` keeps them in an `SpdController` with window n.

@dataclass(frozen=True)
class Control:
    """One cycle's control message: the (position, epoch) each stage processes, None for an empty slot."""
    cycle: int
    slots: tuple[Issue | None, ...]
    draft_for: int | None       # position whose token rank 0 drafts this cycle (entering next cycle)


class CycleController:
    """Rank 0's bookkeeping for the synchronous-cycle layout: `begin()` gives the control message of a
    cycle, `end(accept)` verifies what left the last stage and updates the slot table."""

    def __init__(self, prompt_len: int, new_tokens: int, stages: int) -> None:
        if stages < 1:
            raise ValueError("stages must be ≥ 1")
        self.ctl = SpdController(prompt_len, new_tokens, window=stages)
        self.stages = stages
        self.slots: list[Issue | None] = [None] * stages
        self.cycle = 0

    @property
    def done(self) -> bool:
        return self.ctl.done

    @property
    def committed(self) -> int:
        return self.ctl.committed

    def begin(self) -> Control:
        if self.done:
            raise RuntimeError("begin() after the last commit")
        if self.slots[0] is not None:
            raise RuntimeError("begin() twice without end()")
        new = self.ctl.issue() if self.ctl.can_issue() else None
        self.slots[0] = new
        draft_for = None
        if new is not None and self.stages > 1 and new.position + 1 <= self.ctl.last_useful:
            draft_for = new.position + 1
        return Control(self.cycle, tuple(self.slots), draft_for)

    def end(self, accept: Callable[[], bool]) -> Verdict | None:
        """The cycle's last-stage output (if any) is verified; slots advance, or clear on a rejection."""
        out = self.slots[-1]
        verdict = None
        if out is not None:
            verdict = self.ctl.on_result(out.position, out.epoch, accept)
        if verdict is not None and verdict.accepted is False:
            self.slots = [None] * self.stages
        else:
            self.slots = [None] + self.slots[:-1]
        self.cycle += 1
        return verdict
