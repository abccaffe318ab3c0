"""The SPD control protocol (DESIGN §2), defined once.

The executor's first rank and the simulator's stage-1 process both drive this state machine, so the
simulator models exactly the protocol the real pipeline runs. AR is n = 1, PP is SPD with window 1.

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
