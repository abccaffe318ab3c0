"""The multi-request protocol (DESIGN §2 "Several requests" ⚑), defined once.

`ServingController` is the first rank's bookkeeping when several requests share one pipeline: the
executor's first rank (issue 19) and the simulator's stage-1 process (`spdsim.serving`) drive this same
object, as both drive `spdsim.protocol.SpdController` for one request. Pure Python: no SimPy, no torch,
no clock — the driver says what happened, the controller says what to do next.

Each running request has its own `SpdController` (its positions, its window W — n for SPD, 1 for PP
and AR —, its own epoch, verification and rollback exactly as spdsim.protocol's rules 1-5), plus its
prefill progress and its drafts. The controller adds admission and the choice of what enters stage 1.

Driving it (the first rank, one thread):
  arrive(request, prompt_len, new_tokens, need)   a request arrived (need: KV bytes on each device)
  admit() -> [request]                            admit waiting requests, FIFO, while memory allows
  next_tick() -> Tick | None                      what enters stage 1 now (None: nothing can)
  wants_draft(entry) -> bool                      after issuing `entry`, should the module draft
                                                  entry.position + 1 for its request now?
  on_draft(request, position, epoch, confidence)  a draft of `position` is ready (its confidence, if any)
  on_result(request, position, epoch, accept)     a RESULT arrived -> ServingVerdict; accept(confidence)
                                                  is asked when a draft at position + 1 is verified
  hold(request, epoch)                            its draft waits for features: the request issues
                                                  nothing (not even a known token) until on_draft or a
                                                  newer epoch — as the single-request first rank waits
A finished request frees its memory: call admit() again after a verdict with `finished` set.

What enters stage 1, each tick (a `Tick`): one prefill chunk of one request, or the next positions of
up to `max_batch` different requests (each a known token, or a speculated one whose draft is ready).
A request is first prefilled: positions 0 .. P-2 in chunks of `prefill_chunk` tokens (the whole
prompt at once by default), then decoded from position P-1 (spdsim.protocol's positions). Candidates
are ordered by the policy; when the first one is a prefill chunk, the tick is that chunk alone,
otherwise it batches the decode candidates in that order:
  fcfs        one request at a time: the next is admitted when the previous has finished (exactly the
              single-request schemes, request after request)
  interleave  every admitted request in round-robin order; each may speculate within its own window
              (SPD) or waits for its round trip (PP), so n requests fill n stages without speculation
  spd_first   the oldest request speculates; the others issue known tokens only, in age order, into
              the slots the oldest leaves free (and only the oldest's drafts are computed)
  adaptive    age order; a speculated position enters only when its draft's confidence is at or
              above the threshold, otherwise that request waits for its true token and the slot goes
              to the next candidate
Admission: FIFO, head of line — a request is admitted when its KV cache for prompt + new tokens fits
on every device beside those already admitted (and fewer than `max_running` are running); it holds
that memory until its last token (no preemption).

Messages (the single-request protocol's, with a request id; every stage keeps one KV cache and one
epoch per request):
  ACT(tick)                        stage s → s+1: the tick, i.e. a prefill chunk (request, start,
                                   tokens) or entries (request, epoch, position) — all computed in
                                   one forward, the batch staying together through the pipeline
  RESULT(request, epoch, position, token)   last stage → first rank, one per entry (prefill chunks
                                   send none: the prompt's last token is decoded like any position)
  FEATURES                         each stage → the module's device, per entry (trained drafters)
A stage that sees a newer epoch for request r rolls r's cache back to that position (rule 3 of
spdsim.protocol, per request); stale entries are computed and wasted, as for one request.
"""
from __future__ import annotations

from bisect import bisect_right, insort
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from spdsim.protocol import SpdController, Verdict

POLICIES = ("fcfs", "interleave", "spd_first", "adaptive")


@dataclass(frozen=True)
class Entry:
    """One request's position in a decode tick."""
    request: int
    position: int
    epoch: int
    speculative: bool


@dataclass(frozen=True)
class Chunk:
    """Prompt positions start .. start + tokens - 1 of one request, prefilled in one tick."""
    request: int
    start: int
    tokens: int


@dataclass(frozen=True)
class Tick:
    entries: tuple[Entry, ...] = ()
    chunk: Chunk | None = None


@dataclass(frozen=True)
class ServingVerdict:
    request: int
    verdict: Verdict
    first_token: bool      # this verdict committed the request's first new token
    finished: bool         # ... its last one: the request left the system, its memory is free


class _Request:
    __slots__ = ("rid", "prompt_len", "new_tokens", "need", "ctl", "prefill_next", "drafts", "issued_conf", "seq",
                 "held")

    def __init__(self, rid: int, prompt_len: int, new_tokens: int, need: tuple[float, ...], window: int) -> None:
        self.rid = rid
        self.prompt_len = prompt_len
        self.new_tokens = new_tokens
        self.need = need
        self.ctl = SpdController(prompt_len, new_tokens, window)
        self.prefill_next = 0                 # next prompt position to prefill; done at prompt_len - 1
        self.drafts: dict[int, tuple[int, float | None]] = {}    # position → (epoch, confidence)
        self.issued_conf: dict[int, float | None] = {}           # speculated position → its draft's confidence
        self.seq = -1                         # admission order
        self.held = -1                        # the epoch in which it waits for a draft (hold); -1: none

    @property
    def prefilling(self) -> bool:
        return self.prefill_next < self.prompt_len - 1


class ServingController:
    def __init__(self, policy: str, window: int, drafts: bool, max_batch: int = 1,
                 max_running: int | None = None, prefill_chunk: int | None = None, threshold: float = 0.0,
                 capacity: Sequence[float] = ()) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        if max_batch < 1 or window < 1:
            raise ValueError("max_batch and window must be ≥ 1")
        self.policy = policy
        self.window = window
        self.drafts = drafts
        self.max_batch = 1 if policy == "fcfs" else max_batch
        self.max_running = 1 if policy == "fcfs" else max_running
        self.prefill_chunk = prefill_chunk
        self.threshold = threshold if policy == "adaptive" else None
        self.capacity = tuple(capacity)
        self.used = [0.0] * len(self.capacity)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []     # in admission order: oldest first
        self.by_id: dict[int, _Request] = {}
        self._rr = -1                          # interleave: admission number of the last request served
        self.finished = 0
        self._seq = 0
        # Requests that may be able to enter stage 1, by admission number: one that cannot is dropped
        # when next_tick looks at it, and comes back when something that could change that happens to
        # it (admission, a verdict, a draft; under spd_first, becoming the oldest). next_tick then costs
        # what it looks at, not the number of requests running.
        self._cand: list[int] = []
        self._cand_req: dict[int, _Request] = {}

    # --- requests in and out ---------------------------------------------------------------------
    def arrive(self, request: int, prompt_len: int, new_tokens: int, need: Sequence[float] = ()) -> None:
        need = tuple(need) or (0.0,) * len(self.capacity)
        if len(need) != len(self.capacity):
            raise ValueError("need: one figure per device in capacity")
        too_big = [d for d, (x, c) in enumerate(zip(need, self.capacity)) if x > c]
        if too_big:
            raise ValueError(f"request {request} needs {need[too_big[0]]:.3g} bytes on device {too_big[0]}, "
                             f"more than its {self.capacity[too_big[0]]:.3g} for KV caches")
        self.waiting.append(_Request(request, prompt_len, new_tokens, need, self.window))

    def admit(self) -> list[int]:
        out = []
        while self.waiting:
            if self.max_running is not None and len(self.running) >= self.max_running:
                break
            r = self.waiting[0]
            if any(u + x > c for u, x, c in zip(self.used, r.need, self.capacity)):
                break                              # head of line: FIFO, no overtaking
            self.waiting.popleft()
            for d, x in enumerate(r.need):
                self.used[d] += x
            self.running.append(r)
            self.by_id[r.rid] = r
            r.seq = self._seq
            self._seq += 1
            self._wake(r)
            out.append(r.rid)
        return out

    def _wake(self, r: _Request) -> None:
        if r.seq not in self._cand_req:
            insort(self._cand, r.seq)
            self._cand_req[r.seq] = r

    def _finish(self, r: _Request) -> None:
        self.running.remove(r)
        if r.seq in self._cand_req:
            del self._cand_req[r.seq]
            self._cand.remove(r.seq)
        if self.policy == "spd_first" and self.running:
            self._wake(self.running[0])           # the new oldest may speculate now
        del self.by_id[r.rid]
        for d, x in enumerate(r.need):
            self.used[d] -= x
        self.finished += 1

    @property
    def idle(self) -> bool:
        """Nothing admitted and nothing waiting."""
        return not self.running and not self.waiting

    def epoch(self, request: int) -> int:
        r = self.by_id.get(request)
        return -1 if r is None else r.ctl.epoch

    def controller(self, request: int) -> SpdController | None:
        r = self.by_id.get(request)
        return None if r is None else r.ctl

    # --- what enters stage 1 ---------------------------------------------------------------------
    def _speculates(self, r: _Request) -> bool:
        """May r's speculated positions enter (and its drafts be computed)?"""
        if not self.drafts:
            return False
        if self.policy == "spd_first":
            return r is self.running[0]
        return True

    def _ready(self, r: _Request) -> bool:
        """Can r's next decode position enter now?"""
        ctl = r.ctl
        if r.held == ctl.epoch or not ctl.can_issue():
            return False
        q = ctl.next_position
        if q < ctl.known:
            return True
        d = r.drafts.get(q)
        if d is None or d[0] != ctl.epoch or not self._speculates(r):
            return False
        return self.threshold is None or (d[1] is not None and d[1] >= self.threshold)

    def next_tick(self) -> Tick | None:
        entries: list[Entry] = []
        last = None
        cand, reqs = self._cand, self._cand_req
        k = len(cand)
        start = bisect_right(cand, self._rr) % k if (self.policy == "interleave" and k) else 0
        dropped = []
        for i in range(k):
            seq = cand[(start + i) % k]
            r = reqs[seq]
            if r.prefilling:
                if entries:
                    continue                      # a chunk rides alone; it waits for its own tick
                begin = r.prefill_next
                tokens = r.prompt_len - 1 - begin
                if self.prefill_chunk:
                    tokens = min(tokens, self.prefill_chunk)
                r.prefill_next += tokens
                self._rr = seq
                self._forget(dropped)
                return Tick(chunk=Chunk(r.rid, begin, tokens))
            if not self._ready(r):
                dropped.append(seq)
                continue
            issue = r.ctl.issue()
            if issue.speculative:
                r.issued_conf[issue.position] = r.drafts.pop(issue.position)[1]
            entries.append(Entry(r.rid, issue.position, issue.epoch, issue.speculative))
            last = r
            if len(entries) >= self.max_batch:
                break
        self._forget(dropped)
        if not entries:
            return None
        self._rr = last.seq
        return Tick(entries=tuple(entries))

    def _forget(self, seqs: list[int]) -> None:
        for seq in seqs:
            del self._cand_req[seq]
            del self._cand[bisect_right(self._cand, seq) - 1]

    def wants_draft(self, entry: Entry) -> bool:
        r = self.by_id.get(entry.request)
        return (r is not None and self._speculates(r) and entry.epoch == r.ctl.epoch
                and entry.position + 1 <= r.ctl.last_useful)

    def hold(self, request: int, epoch: int) -> None:
        r = self.by_id.get(request)
        if r is not None and epoch == r.ctl.epoch:
            r.held = epoch

    def on_draft(self, request: int, position: int, epoch: int, confidence: float | None = None) -> None:
        r = self.by_id.get(request)
        if r is not None and epoch == r.ctl.epoch:
            r.drafts[position] = (epoch, confidence)
            r.held = -1
            self._wake(r)

    def on_result(self, request: int, position: int, epoch: int,
                  accept: Callable[[float | None], bool]) -> ServingVerdict:
        r = self.by_id.get(request)
        if r is None:                             # a stale position of a finished request
            return ServingVerdict(request, Verdict(position, True, None, -1), False, False)
        ctl = r.ctl
        v = ctl.on_result(position, epoch, lambda: accept(r.issued_conf.pop(position + 1, None)))
        if v.stale:
            return ServingVerdict(request, v, False, False)
        self._wake(r)
        if v.accepted is False:                  # flushed: the drafts of this epoch are void
            r.drafts.clear()
            r.issued_conf.clear()
        r.drafts.pop(position + 1, None)
        done = ctl.done
        if done:
            self._finish(r)
        return ServingVerdict(request, v, v.committed == 1, done)
