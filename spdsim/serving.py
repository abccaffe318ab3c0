"""Serving in the simulator: several requests through one pipeline (DESIGN §2 "Several requests" ⚑).

The protocol is `spdsim.serving_protocol.ServingController` — the object the executor's first rank
drives too; this module only gives it a clock and costs, on the engine's kernel (`spdsim.kernel.Sim`:
its topology paths, its costs, its RunConfig):

  first device  one SimPy process, like the executor's first rank and `spdsim.schemes.spd`'s: it drafts
                what is ready (the co-located module, batched), else issues the tick the controller
                chooses (a prefill chunk, or up to max_batch decode positions), else reads ONE message —
                a RESULT, a stage's features, an arrival — in arrival order, or waits for the next.
                It reads messages only when it cannot issue, exactly as the single-request first device
                does (and the executor's first rank reads its sockets), and a request whose draft waits
                for features issues nothing until the draft is made (`ServingController.hold`). With
                max_batch > 1 it reads every message that has arrived by then, so that a tick can batch
                every request they made ready.
  stages 2..n   booked when a tick leaves stage 1 (`ServingSim.traverse`: the tandem-queue recursion);
                what they send back — RESULTs and features — goes into the first device's inbox, a
                heap of (arrival time, message), with no SimPy event: only the first device reads it,
                and nothing else can put a message there while it waits.
  arrivals      open loop (poisson, trace): in the inbox from the start, at their arrival times;
                closed loop: a user's next request goes in a think time after its previous one finished.
With one request at a time (policy fcfs) every request is decoded exactly as the single-request
schemes decode it (tests/test_serving.py checks the decode windows against `engine.simulate_point`).

Accounting runs as the simulation goes (a 10,000-request run keeps no event list unless asked):
busy time per stage (its forwards, and the module's drafts on stage 1's device), compute of positions
that never committed (waste), verdicts, and one `RequestRecord` per request.
Memory: a request is admitted when its KV cache for prompt + new tokens fits on every stage's device
next to the stage's weights, the module, the prefill activations and the requests already admitted.
TP (a stage on a TP group, `spdsim.protocol`): the costs are the bound model's; stage 1's issue goes to
its TP peers before the forward, activations cross as tp parallel messages (a tick arrives with the
last), RESULTs and features leave from TP rank 0.
"""
from __future__ import annotations

import heapq
import zlib
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from spdsim.acceptance import sampler
from spdsim.costs import stage_memory, usable_bytes
from spdsim.errors import UserError
from spdsim.kernel import FEATURE, NS, RESULT, RunConfig, Sim
from spdsim.metrics import RunMetrics
from spdsim.partition import RESULT_BYTES, Plan
from spdsim.serving_config import ConfidenceBin
from spdsim.serving_metrics import RequestRecord, in_system_area
from spdsim.serving_protocol import Entry, ServingController, Tick
from spdsim.trace import TraceEvent
from spdsim.workload import Request, draw_requests, think_times

ARRIVE = "arrive"
READY_NS = 0.5          # a message due within this of now is readable now (the kernel's delivery rule)


def _through(path, tt: float, now: float) -> float:
    """A message entering `path` (hops of (LinkBook, name, ser, lat)) at tt: each hop booked in its first
    free gap (appended when it is the latest, the common case), then its latency; the arrival time."""
    for book, _name, ser, lat in path:
        ends = book.ends
        if not ends or tt >= ends[-1]:
            book.starts.append(tt)
            ends.append(tt + ser)
            if len(ends) > book.limit:
                book._prune(now)
        else:
            tt = book.reserve(tt, ser, now)
        tt += ser + lat
    return tt


@dataclass
class ServingRun:
    """Everything a serving run needs besides the plan and the RunConfig."""
    policy: str
    requests: list[Request]
    max_batch: int = 1
    max_running: int | None = None
    prefill_chunk: int | None = None
    threshold: float = 0.0
    users: int | None = None                     # closed loop: this many users
    think: np.ndarray | None = None              # closed loop: think times, in the order they are used
    capacity: tuple[float, ...] = ()             # KV bytes each stage's device can give to requests
    kv_per_token: tuple[float, ...] = ()         # KV bytes per token of context on each stage's device
    accept_for: Callable[[int], Callable[[float | None], bool]] = lambda r: (lambda c: True)
    confidence_for: Callable[[int], Callable[[], float]] | None = None


@dataclass
class ServingOutcome:
    metrics: RunMetrics
    records: list[RequestRecord]
    events: list[TraceEvent] | None
    extra: dict = field(default_factory=dict)


class LinkBook:
    """When one directed link is busy: sorted, disjoint [start, end) intervals, so that a message can be
    booked into the first gap at or after it reaches the link even when messages are booked out of
    time order (see `ServingSim.traverse`). Booked in time order, it is the kernel's FIFO single
    server (`Sim.book`): start = max(arrival, link free)."""
    __slots__ = ("starts", "ends", "limit")

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.limit = 64                      # prune past intervals once there are this many

    def reserve(self, arrival: float, ser: float, now: float) -> float:
        starts, ends = self.starts, self.ends
        if not ends or arrival >= ends[-1]:  # after everything booked: the in-order case
            starts.append(arrival)
            ends.append(arrival + ser)
            if len(ends) > self.limit:
                self._prune(now)
            return arrival
        if len(ends) > self.limit:
            self._prune(now)
        i = bisect_right(ends, arrival)      # the first interval still busy at the arrival
        t = arrival
        k = len(starts)
        while i < k and t + ser > starts[i]:
            if ends[i] > t:
                t = ends[i]
            i += 1
        if i == k:
            starts.append(t)
            ends.append(t + ser)
        else:
            starts.insert(i, t)
            ends.insert(i, t + ser)
        return t

    def _prune(self, now: float) -> None:
        """Intervals over before now can never matter again (nothing is booked in the past)."""
        k = bisect_right(self.ends, now)
        if k:
            del self.starts[:k], self.ends[:k]
        self.limit = max(64, 2 * len(self.ends))    # amortized: future bookings are kept


def _tag(tick: Tick) -> tuple[tuple[int, int], int]:
    """(request, epoch) and position of a tick's first item: what the link log shows."""
    if tick.chunk is not None:
        return (tick.chunk.request, -1), tick.chunk.start
    e = tick.entries[0]
    return (e.request, e.epoch), e.position


class ServingSim(Sim):
    def __init__(self, plan: Plan, cfg: RunConfig, run: ServingRun, env: simpy.Environment | None = None,
                 keep_events: bool = False) -> None:
        super().__init__(plan, cfg, env, log_sends=keep_events)
        self.run = run
        self.keep = keep_events
        self.first_dev = plan.placement[0]
        self.free = [0.0] * self.n          # when each stage's last booked forward ends
        self.links: dict[tuple[str, str], LinkBook] = {}
        self._booked_paths: dict[tuple[str, str, int], list] = {}
        hd = self.head_device
        self.feature_to = [hd if (cfg.features and hd is not None and hd != d) else None for d in plan.placement]
        pl, ab = plan.placement, cfg.activation_bytes
        # a tick's ACT into each stage (tp parallel messages under TP), features from each stage, its RESULT back
        self._act_pairs = [None] + [list(zip(plan.group(s - 1), plan.group(s))) for s in range(1, self.n)]
        self._act_paths = [None] + [[self._hops(u, v, ab) for u, v in self._act_pairs[s]] for s in range(1, self.n)]
        self._feature_paths = [None if f is None else self._hops(pl[s], f, cfg.feature_bytes)
                               for s, f in enumerate(self.feature_to)]
        self._result_path = self._hops(pl[-1], pl[0], RESULT_BYTES)
        self._issue_paths = [self._hops(pl[0], d, RESULT_BYTES) for d in plan.group(0)[1:]]
        self.ctl = ServingController(run.policy, cfg.window, cfg.drafts, run.max_batch, run.max_running,
                                     run.prefill_chunk, run.threshold, run.capacity)
        self.records = {r.request: RequestRecord(r.request, r.arrival_s, np.nan, np.nan, np.nan,
                                                 r.prompt_tokens, r.new_tokens) for r in run.requests}
        self.by_id = {r.request: r for r in run.requests}
        self.remaining = len(run.requests)
        self.inbox: list[tuple[float, int, tuple]] = []    # (arrival ns, order, message): the first device's
        self._order = 0
        self._cost: list[dict[int, float]] = [{} for _ in range(self.n)]
        self.busy = [0.0] * self.n
        self.decode_ns = 0.0             # compute of decode positions, useful or wasted
        self.useful_ns = 0.0
        self._pending: dict[int, dict[tuple[int, int], float]] = {}   # request → (position, epoch) → compute
        self.accepted = self.rejected = 0
        self.slog: list[tuple] = []      # keep_events: (kind, t0, t1, stage, device, position, epoch, request, accepted, phase, name, bytes)
        self.committed_keys: set[tuple[int, int, int]] = set()
        self._accept: dict[int, Callable] = {}
        self._confidence: dict[int, Callable] = {}
        self._feats: dict[int, dict[tuple[int, int], int]] = {}       # read features: (stage, pos) → epoch
        self._issue_epoch: dict[int, dict[int, int]] = {}
        # drafts to make, as (request, q, epoch): draft q + 1. Ready ones (their features have been read)
        # wait in order; the others wait on the one feature (request, stage, position) they lack.
        self._drafts: deque[tuple[int, int, int]] = deque()
        self._blocked: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
        self._sent = 0                   # closed loop: requests sent so far
        self.peak_running = 0

    # --- costs ------------------------------------------------------------------------------------
    def tick_ns(self, s: int, tick: Tick) -> float:
        a, b = self.plan.layers[s]
        first, last = s == 0, s == self.n - 1
        costs = self.cfg.costs
        if tick.chunk is not None:
            c = tick.chunk
            return costs.prefill_s(s, a, b, c.tokens, c.start, first, last) * NS
        es = tick.entries
        if len(es) == 1:
            q = es[0].position
            cache = self._cost[s]
            t = cache.get(q)
            if t is None:
                t = cache[q] = costs.stage_s(s, a, b, q + 1, first, last) * NS
            return t * self._jitter.factor(s) if self._jitter is not None else t
        return costs.batch_stage_s(s, a, b, [e.position + 1 for e in es], first, last) * NS

    def act_bytes(self, tick: Tick) -> int:
        k = tick.chunk.tokens if tick.chunk is not None else len(tick.entries)
        return self.cfg.activation_bytes * k

    # --- the inbox ---------------------------------------------------------------------------------
    def post(self, at: float, msg: tuple) -> None:
        """A message for the first device, readable from `at` on (in arrival order, ties as posted)."""
        now = self.env.now
        heapq.heappush(self.inbox, (at if at - now > READY_NS else now, self._order, msg))
        self._order += 1

    # --- links: whole paths booked at once ----------------------------------------------------------
    def _hops(self, src: str, dst: str, nbytes: int) -> list:
        """src → dst's hops as (LinkBook, name, serialization ns, latency ns), cached."""
        key = (src, dst, nbytes)
        path = self._booked_paths.get(key)
        if path is None:
            path = self._booked_paths[key] = [(self.links.setdefault(link, LinkBook()), name, ser, lat)
                                              for link, name, ser, lat in self._path(src, dst, nbytes)]
        return path

    def _book(self, path: list, src: str, nbytes: int, tag, position: int, stage: int, at: float) -> float:
        """Book a message sent at `at` on every hop of `path`; returns its arrival. Each hop's link is
        held for bytes / bandwidth from when the message reaches it, in the first gap there (LinkBook),
        then the hop's latency."""
        t = at + self._msg
        now = self.env.now
        for book, name, ser, lat in path:
            start = book.reserve(t, ser, now)
            if self.log_sends:
                self.log.append(("send", start, start + ser, stage, src, position, tag, nbytes, name, None))
            t = start + ser + lat
        return t

    def traverse(self, msg: tuple) -> None:
        """Stage 1 sends a tick now: book its way through stages 2..n and back, at once.

        Stage s ≥ 2 only ever receives from stage s − 1, in the order stage 1 sent, over FIFO links, and
        computes everything it receives (stale work included, as the kernel's stages do), so its
        forwards follow the tandem-queue recursion: start = max(arrival, end of its previous forward)
        (+ tick overhead), end = start + cost. Booking the tick through every stage when it enters is
        therefore the schedule event-by-event simulation gives. What comes back (features from each
        stage, the RESULT from the last) goes into the inbox at its arrival time. Links shared by
        several stages (a switch's port towards stage 1's device) are booked out of time order this
        way: LinkBook fills the first gap, so two messages that reach such a link within a
        serialization time of each other (a few ns for 8 KiB at NVLink speed) may be served in the
        other order than the kernel would."""
        tick = msg[3]
        if len(tick.entries) == 1 and not self.keep and self._jitter is None and self.tp == 1:
            return self._traverse_one(msg, tick.entries[0])
        placement, n = self.plan.placement, self.n
        nbytes = self.act_bytes(tick)
        tag, pos = msg[1], msg[2]
        t = self.env.now
        k = len(tick.entries)
        for s in range(1, n):
            dev = placement[s]
            paths = (self._act_paths[s] if nbytes == self.cfg.activation_bytes
                     else [self._hops(u, v, nbytes) for u, v in self._act_pairs[s]])
            arrival = max(self._book(p, u, nbytes, tag, pos, s - 1, t) for p, (u, _v) in zip(paths, self._act_pairs[s]))
            free = self.free[s]
            start = (arrival if arrival > free else free) + self._tick
            end = start + self.tick_ns(s, tick)
            self.free[s] = end
            self.account(s, dev, start, end, tick)
            fdev = self.feature_to[s]
            if fdev is not None and k:
                fb = self.cfg.feature_bytes * k
                at = self._book(self._hops(dev, fdev, fb), dev, fb, tag, pos, s, end)
                self.post(at, (FEATURE, s, tick))
            t = end
        if k:
            rb = RESULT_BYTES * k
            at = self._book(self._hops(placement[-1], placement[0], rb), placement[-1], rb, tag, pos, n - 1, t)
            self.post(at, (RESULT, tag, pos, tick))

    def _traverse_one(self, msg: tuple, e: Entry) -> None:
        """`traverse` for one decode position, no TP, no event log: the same bookings, inlined (this
        loop runs once per stage per tick: it is what a 10,000-request run spends its time on)."""
        now = self.env.now
        n, tick_over, msg_over = self.n, self._tick, self._msg
        free, busy, costs = self.free, self.busy, self._cost
        pending = self._pending.get(e.request)
        q = e.position
        tick = msg[3]
        t = now
        total = 0.0
        inbox, push = self.inbox, heapq.heappush
        for s in range(1, n):
            tt = _through(self._act_paths[s][0], t + msg_over, now)
            f = free[s]
            start = (tt if tt > f else f) + tick_over
            dur = costs[s].get(q)
            if dur is None:
                dur = self.tick_ns(s, tick)
            end = start + dur
            free[s] = end
            busy[s] += dur
            total += dur
            fpath = self._feature_paths[s]
            if fpath is not None:
                tt = _through(fpath, end + msg_over, now)
                push(inbox, (tt if tt - now > READY_NS else now, self._order, (FEATURE, s, tick)))
                self._order += 1
            t = end
        self.decode_ns += total
        if pending is not None:
            key = (q, e.epoch)
            pending[key] = pending.get(key, 0.0) + total
        tt = t + msg_over
        for book, _name, ser, lat in self._result_path:
            tt = book.reserve(tt, ser, now) + ser + lat
        push(inbox, (tt if tt - now > READY_NS else now, self._order, (RESULT, msg[1], msg[2], tick)))
        self._order += 1

    def issue_wait_ns(self, position: int, epoch: int) -> float:
        """TP: stage 1's rank 0 sends the issue to its TP peers before the forward; the group's forward
        ends only once the last of them has it (the kernel's Sim.issue_wait_ns)."""
        if not self._issue_paths:
            return 0.0
        now = self.env.now
        return max(0.0, max(self._book(p, self.first_dev, RESULT_BYTES, (-1, epoch), position, 0, now)
                            for p in self._issue_paths) - now)

    # --- accounting -------------------------------------------------------------------------------
    def account(self, s: int, dev: str, t0: float, t1: float, tick: Tick) -> None:
        dur = t1 - t0
        self.busy[s] += dur
        keep = self.keep
        if keep and self.tp > 1:
            a, b = self.plan.layers[s]
            ar = self.cfg.costs.stage_allreduce_s(s, a, b, s == self.n - 1) * NS
            self.slog.append(("allreduce", max(t0, t1 - ar), t1, s, dev, _tag(tick)[1], -1, _tag(tick)[0][0],
                              None, "prefill" if tick.chunk is not None else "decode", "allreduce", 0))
        if tick.chunk is not None:
            if keep:
                c = tick.chunk
                self.slog.append(("compute", t0, t1, s, dev, c.start, -1, c.request, None, "prefill",
                                  f"prefill {c.tokens}", 0))
            return
        es = tick.entries
        share = dur / len(es)
        self.decode_ns += dur
        pending = self._pending
        for e in es:
            p = pending.get(e.request)
            if p is not None:             # None: the request has finished, this is stale work
                key = (e.position, e.epoch)
                p[key] = p.get(key, 0.0) + share
            if keep:
                self.slog.append(("compute", t0, t1, s, dev, e.position, e.epoch, e.request, None, "decode",
                                  f"batch {len(es)}" if len(es) > 1 else "", 0))

    # --- requests in ------------------------------------------------------------------------------
    def _arrive(self, rid: int) -> None:
        """An arrival read: the request joins the controller's queue (its arrival time was set when it
        arrived; `arrival_s` is when it reached the system, not when the first device read it)."""
        req = self.by_id[rid]
        need = tuple(x * (req.prompt_tokens + req.new_tokens) for x in self.run.kv_per_token)
        self.ctl.arrive(rid, req.prompt_tokens, req.new_tokens, need)
        self._admit()

    def _admit(self) -> None:
        for rid in self.ctl.admit():
            self._pending[rid] = {}
            self._feats[rid] = {}
            self._issue_epoch[rid] = {}
            self._accept[rid] = self.run.accept_for(rid)
            if self.run.confidence_for is not None:
                self._confidence[rid] = self.run.confidence_for(rid)
        if len(self.ctl.running) > self.peak_running:
            self.peak_running = len(self.ctl.running)

    def _send_next(self, at_ns: float) -> None:
        """Closed loop: the next request arrives a think time after at_ns."""
        if self._sent >= len(self.run.requests):
            return
        k = self._sent
        self._sent += 1
        rid = self.run.requests[k].request
        t = at_ns + float(self.run.think[k]) * NS
        self.records[rid].arrival_s = t / NS
        self.post(t, (ARRIVE, rid))

    # --- verdicts ---------------------------------------------------------------------------------
    def _results(self, tick: Tick) -> None:
        now = self.env.now
        ctl = self.ctl
        for e in tick.entries:
            r = e.request
            acc = self._accept.get(r)
            v = ctl.on_result(r, e.position, e.epoch, acc if acc is not None else (lambda c: True))
            verdict = v.verdict
            if verdict.stale:
                continue
            p = self._pending[r]
            self.useful_ns += p.pop((e.position, e.epoch), 0.0)
            if verdict.accepted is True:
                self.accepted += 1
            elif verdict.accepted is False:
                self.rejected += 1
            if self.keep:
                self.committed_keys.add((r, e.position, e.epoch))
                for kind, pos, a in verdict.marks():
                    self.slog.append((kind, now, now, -1, self.first_dev, pos, e.epoch, r, a, "decode", "", 0))
            rec = self.records[r]
            if v.first_token:
                rec.first_token_s = now / NS
            if v.finished:
                rec.finish_s = now / NS
                for d in (self._pending, self._feats, self._issue_epoch, self._accept, self._confidence):
                    d.pop(r, None)
                self.remaining -= 1
                if self.run.users is not None:
                    self._send_next(now)
                self._admit()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == RESULT:
            self._results(msg[3])
        elif kind == FEATURE:
            s = msg[1]
            for e in msg[2].entries:
                f = self._feats.get(e.request)
                if f is None:
                    continue
                f[(s, e.position)] = e.epoch
                waiting = self._blocked.pop((e.request, s, e.position), None)
                if waiting:
                    for job in waiting:
                        self._queue_draft(job)
        elif kind == ARRIVE:
            self._arrive(msg[1])

    # --- the co-located module --------------------------------------------------------------------
    def _missing_feature(self, r: int, q: int) -> tuple[int, int] | None:
        """The draft of q+1 needs stage j's output of position q-1-j (for j < n), in the epoch that
        position was last issued in, as spdsim.schemes.spd's draft waits for: the first (j, position)
        not read yet, or None."""
        feats, issue_epoch = self._feats[r], self._issue_epoch[r]
        first_decode = self.by_id[r].prompt_tokens - 1
        for j in range(self.n):
            pos = q - 1 - j
            if pos < first_decode:
                return None
            if feats.get((j, pos)) != issue_epoch[pos]:
                return j, pos
        return None

    def _queue_draft(self, job: tuple[int, int, int]) -> None:
        """Ready, stale (dropped when taken), or waiting on the feature it lacks: the request holds
        its issues until then (as the single-request first device waits for that draft)."""
        r, q, e = job
        if self.cfg.features and self.ctl.epoch(r) == e:
            missing = self._missing_feature(r, q)
            if missing is not None:
                self._blocked.setdefault((r, *missing), []).append(job)
                self.ctl.hold(r, e)
                return
        self._drafts.append(job)

    def _ready_drafts(self) -> list[tuple[int, int, int]]:
        """Drafts whose features are there, in the order they became ready, at most max_batch; stale
        ones (their request flushed or finished since) dropped."""
        ctl, ready, drafts = self.ctl, [], self._drafts
        while drafts and len(ready) < self.run.max_batch:
            job = drafts.popleft()
            if ctl.epoch(job[0]) == job[2]:
                ready.append(job)
        return ready

    def _draft(self, job: list[tuple[int, int, int]]):
        """The co-located module drafts position q + 1 for every (request, q, epoch) of the job."""
        env, ctl, dev = self.env, self.ctl, self.first_dev
        costs = self.cfg.costs
        t0 = env.now
        ctxs = [q + 2 for _, q, _ in job]
        yield env.timeout((costs.head_s(ctxs[0]) if len(job) == 1 else costs.batch_head_s(ctxs)) * NS)
        self.busy[0] += env.now - t0
        for r, q, e in job:
            if self.keep:
                self.slog.append(("head", t0, env.now, -1, dev, q + 1, e, r, None, "decode", "", 0))
            conf = self._confidence.get(r)
            ctl.on_draft(r, q + 1, e, conf() if conf is not None else None)

    # --- the first device -------------------------------------------------------------------------
    def first_device(self):
        env, ctl, dev, n = self.env, self.ctl, self.first_dev, self.n
        records, inbox = self.records, self.inbox
        wait_features = self.cfg.features and self.head_device is not None
        batched = ctl.max_batch > 1
        while True:
            if self.remaining == 0:
                self.done.succeed()
                return
            if self._drafts:
                job = self._ready_drafts()
                if job:
                    yield from self._draft(job)
                    continue
            tick = ctl.next_tick()
            if tick is None:
                # as the single-request first device: read ONE message when nothing can be issued;
                # with batched ticks, every message that has arrived, so that the next tick can take
                # every request they made ready (one at a time, each would go alone)
                if not inbox:
                    raise RuntimeError("serving: nothing to issue and nothing in flight")
                if inbox[0][0] - env.now > READY_NS:
                    yield env.timeout(inbox[0][0] - env.now)
                self._handle(heapq.heappop(inbox)[2])
                if batched:
                    while inbox and inbox[0][0] - env.now <= READY_NS:
                        self._handle(heapq.heappop(inbox)[2])
                continue
            if tick.entries:
                for e in tick.entries:
                    self._issue_epoch[e.request][e.position] = e.epoch
            if self._first_tick:       # the first rank's own tick (SPD's differs: spdsim.costs)
                yield env.timeout(self._first_tick)
            t0 = env.now
            for r in ([tick.chunk.request] if tick.chunk is not None else [e.request for e in tick.entries]):
                rec = records[r]
                if rec.start_s != rec.start_s:         # NaN: its first tick (prefill, or decode)
                    rec.start_s = max(t0 / NS, rec.arrival_s)     # not before it, by a float rounding
            tag, pos = _tag(tick)
            wait = self.issue_wait_ns(pos, tag[1]) if self.tp > 1 else 0.0
            yield env.timeout(wait + self.tick_ns(0, tick))
            self.account(0, dev, t0, env.now, tick)
            if n == 1:
                if tick.entries:
                    self.post(env.now, (RESULT, tag, pos, tick))
            else:
                self.traverse(("act", tag, pos, tick))
                if self._send_block:
                    yield env.timeout(self._send_block)
            if tick.entries:
                if wait_features:
                    for e in tick.entries:
                        f = self._feats.get(e.request)
                        if f is not None:
                            f[(0, e.position)] = e.epoch
                if self.head_device is not None:
                    new = [(e.request, e.position, e.epoch) for e in tick.entries if ctl.wants_draft(e)]
                    if new:
                        # as the single-request first device does: draft right after the forward, before
                        # reading anything, when the features it needs have been read
                        for job in new:
                            self._queue_draft(job)
                        job = self._ready_drafts()
                        if job:
                            yield from self._draft(job)

    def start(self) -> None:
        """Arrivals into the inbox and the first device's process."""
        if self.run.users is not None:
            for _ in range(min(self.run.users, len(self.run.requests))):
                self._send_next(0.0)
        else:
            for r in self.run.requests:
                self.post(r.arrival_s * NS, (ARRIVE, r.request))
        self.env.process(self.first_device())

    # --- results ----------------------------------------------------------------------------------
    def metrics(self, scheme: str) -> RunMetrics:
        recs = list(self.records.values())
        t_first = min(r.arrival_s for r in recs) * NS
        t_last = max(r.finish_s for r in recs) * NS
        window = max(t_last - t_first, 1.0)
        tokens = sum(r.new_tokens for r in recs)
        seconds = window / NS
        verdicts = self.accepted + self.rejected
        busy = [min(b, window) for b in self.busy]
        return RunMetrics(
            scheme=scheme, stages=self.n, new_tokens=tokens, window_ns=int(round(window)),
            tokens_per_s=tokens / seconds, ms_per_token=1000.0 * seconds / tokens,
            bubble_ratio=1.0 - sum(busy) / (self.n * window),
            waste_ratio=(self.decode_ns - self.useful_ns) / (self.n * window),
            acceptance_rate=self.accepted / verdicts if verdicts else None,
            accepted=self.accepted, rejected=self.rejected,
            utilization=tuple(b / window for b in busy))

    @property
    def mean_in_system(self) -> float:
        """Time-average number of requests in the system (arrived, not finished), from the first
        arrival to the last finish."""
        recs = list(self.records.values())
        t0, t1 = min(r.arrival_s for r in recs), max(r.finish_s for r in recs)
        return in_system_area(recs, t0, t1) / (t1 - t0) if t1 > t0 else float("nan")

    def trace_events(self, sends: bool = True) -> list[TraceEvent]:
        out = []
        committed = self.committed_keys
        for kind, t0, t1, s, dev, q, e, r, accepted, phase, name, nbytes in self.slog:
            if kind == "compute":
                discarded = phase == "decode" and (r, q, e) not in committed
            elif kind == "head":
                discarded = (r, q - 1, e) not in committed
            else:
                discarded = False
            out.append(TraceEvent(kind=kind, start_ns=int(round(t0)), end_ns=int(round(t1)), stage=s, device=dev,
                                  position=q, discarded=discarded, accepted=accepted, phase=phase, name=name,
                                  request=r, bytes=nbytes))
        if sends:
            for kind, t0, t1, s, dev, q, tag, nbytes, name, _ in self.log:
                r, e = tag
                out.append(TraceEvent(kind="send", start_ns=int(round(t0)), end_ns=int(round(t1)), stage=s,
                                      device=dev, position=q, bytes=nbytes, name=name, request=r,
                                      discarded=e >= 0 and (r, q, e) not in committed))
        out.sort(key=lambda ev: (ev.start_ns, ev.end_ns))
        return out


# --- one serving point ----------------------------------------------------------------------------

def _acceptance_key(point) -> str:
    a = point.acceptance
    return f"{a.kind}:{a.label}:{a.run_length}" if a is not None else "none"


def request_rng(seed: int, point, request: int, stream: int = 0) -> np.random.Generator:
    """Request r's verdict draws: request 0 draws exactly what a single decode of the point draws
    (`kernel.point_rng`); every request's stream depends only on (seed, α, request), so every stage
    count, partition, policy and load sees the same verdicts per request."""
    from spdsim.kernel import point_rng
    if request == 0 and stream == 0:
        return point_rng(seed, point)
    return np.random.default_rng(np.random.SeedSequence(
        [seed, zlib.crc32(_acceptance_key(point).encode()), request, stream]))


def confidence_sources(bins: tuple[ConfidenceBin, ...], seed: int, point):
    """(confidence_for, accept_for) of the adaptive policy: a draft's confidence falls in bin i with
    probability share_i (uniform inside it); a draft of bin i is accepted with probability acceptance_i."""
    cum = np.cumsum([b.share for b in bins]).tolist()
    cum[-1] = 1.0 + 1e-12
    lows = [b.low for b in bins]

    def confidence_for(rid: int) -> Callable[[], float]:
        rng = request_rng(seed, point, rid, stream=1)

        def draw() -> float:
            i = bisect_right(cum, rng.random())
            b = bins[min(i, len(bins) - 1)]
            return b.low + (b.high - b.low) * rng.random()
        return draw

    def accept_for(rid: int) -> Callable[[float | None], bool]:
        rng = request_rng(seed, point, rid, stream=2)

        def accept(conf: float | None) -> bool:
            i = max(0, bisect_right(lows, conf if conf is not None else 0.0) - 1)
            return rng.random() < bins[i].acceptance
        return accept

    return confidence_for, accept_for


def kv_budget(scenario, plan: Plan, drafts: bool, chunk_tokens: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(capacity, kv_per_token) per stage device: what is left for requests' KV caches after the
    stage's weights, the module (weights and vocab projection) and the prefill activations."""
    m, gpu = scenario.model, scenario.hardware.gpu
    n = plan.stages
    cap, per_token = [], []
    for s, (a, b) in enumerate(plan.layers):
        head = scenario.head.layers if (drafts and s == 0) else 0
        fixed = stage_memory(m, b - a, s == 0, s == n - 1, 0, head, chunk_tokens, plan.tp)
        cap.append(usable_bytes(gpu) - fixed.total)
        # one rank's share of the stage's KV cache (TP splits KV heads), the module's on one GPU
        per_token.append((b - a) * m.kv_bytes_per_token_layer(plan.tp) + head * m.kv_bytes_per_token_layer())
        if cap[-1] <= 0:
            raise UserError(f"sweep.stages: stage {s + 1} of {n} leaves no memory for KV caches on {gpu.name}")
    return tuple(cap), tuple(per_token)


def run_serving(scenario, point, plan: Plan, cfg: RunConfig, env: simpy.Environment | None = None,
                keep_events: bool = False) -> ServingOutcome:
    """Simulate one serving point: its requests through the plan under its policy."""
    w, sv = scenario.workload, scenario.serving
    requests = draw_requests(w, point.load, scenario.seed)
    drafts = cfg.drafts
    longest = max(r.prompt_tokens for r in requests)
    chunk = min(sv.prefill_chunk or longest, longest)
    if longest > 1:
        cfg.costs.prefill_s(0, 0, 1, 1, 0, True, False)    # a calibration cannot: fail before simulating
    capacity, per_token = kv_budget(scenario, plan, drafts, chunk)
    for r in requests:
        for s, (c, x) in enumerate(zip(capacity, per_token)):
            if x * (r.prompt_tokens + r.new_tokens) > c:
                raise UserError(f"workload.prompt_tokens: request {r.request} ({r.prompt_tokens} + {r.new_tokens} "
                                f"tokens) needs {x * (r.prompt_tokens + r.new_tokens) / 1e9:.1f} GB of KV cache on "
                                f"stage {s + 1}, more than the {c / 1e9:.1f} GB left there")
    by_id = {r.request: r for r in requests}
    threshold = 0.0
    confidence_for = None
    if point.policy == "adaptive" and drafts:
        bins = sv.adaptive.table(point.stages, point.acceptance.alpha if point.acceptance else None)
        confidence_for, accept_for = confidence_sources(bins, scenario.seed, point)
        threshold = sv.adaptive.threshold
    elif drafts and point.acceptance is not None:
        spec = point.acceptance

        def accept_for(rid: int):
            draw = sampler(spec, request_rng(scenario.seed, point, rid), exact_over=by_id[rid].new_tokens - 1)
            return lambda conf: draw()
    else:
        def accept_for(rid: int):
            return lambda conf: True
    arr = w.arrivals
    users = int(point.load) if arr.kind == "closed" else None
    run = ServingRun(policy=point.policy, requests=requests, max_batch=sv.max_batch, max_running=sv.max_running,
                     prefill_chunk=sv.prefill_chunk, threshold=threshold, users=users,
                     think=think_times(scenario.seed, arr.think_s, len(requests)) if users else None,
                     capacity=capacity, kv_per_token=per_token, accept_for=accept_for,
                     confidence_for=confidence_for)
    sim = ServingSim(plan, cfg, run, env, keep_events)
    sim.start()
    sim.env.run(until=sim.done)
    records = [sim.records[r.request] for r in requests]
    metrics = sim.metrics(point.scheme)
    extra = {"mean_in_system": sim.mean_in_system, "peak_running": sim.peak_running}
    return ServingOutcome(metrics, records, sim.trace_events(sends=keep_events) if keep_events else None, extra)
