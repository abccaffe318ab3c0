"""Serving in the executor: several requests through the real pipeline (DESIGN §2 "Several requests" ⚑).

Rank 0 drives `spdsim.serving_protocol.ServingController` — the very object the simulator's first
device drives (spdsim/serving.py) — as `Worker.lead` drives `SpdController` for one request. The
controller decides admission and what enters stage 1 each tick; this module gives it a clock, the
stage forwards, the drafters and the messages. The stage ranks run `Worker.serve` unchanged in shape.

Per request, everything the single-request protocol has (executor/pipeline.py, spdsim/protocol.py):
its positions, its epochs and restarts, its verification and rollback, its drafter (the oracle made
from its own greedy reference, or a trained module), its features. What is shared: the pipeline and
rank 0's one thread.

KV caches: one per admitted-request slot on every stage (`Worker.use_slot`), C slots for
`--concurrency C` (fcfs uses one). A request's PREFILL carries its slot (in `token`); each stage
remembers request → slot and computes every later message of the request against that slot's cache,
so rolling a request back is the single-request rollback on its own cache (free: the forward of q
overwrites entry q and attends to entries ≤ q). A finished request frees its slot; nothing of it is
in flight by then (its last result is its last issued position's; links are FIFO), so the next
request admitted may take the slot at once.

Messages: the single-request protocol's, each with the request id (transport.Message.request). Ticks
carry one request each (the controller's max_batch = 1: batched forwards of several requests are the
simulator's only, for now). Prefill chunks are the whole prompt but its last token (positions 0..P-2),
sent as PREFILL with the PREFILL_SERVING flag: no READY comes back (the first decode position of the
request follows its chunk through the same FIFO links, so no stage can see it first); with a
feature-using drafter every stage sends its prefill output to rank 0 (FEAT, epoch -1), and the
request's drafter starts when all depths are in.

Rank 0's loop, one thread, as the simulator's first device (spdsim/serving.py `first_device`) and as the
single-request first rank reads its sockets — messages only when nothing can be issued:
  1. a draft whose features are there is made (in queue order), else
  2. the tick the controller chooses enters stage 1 (a prefill chunk or one decode position); right
     after its forward, if the controller wants a draft for it, the draft is made when its features are
     there — else the request holds (`ServingController.hold`: it issues nothing until its draft is
     made, as one request waits for its draft's features), else
  3. ONE message is read: a request whose arrival time has come (admitted when a slot and the
     controller allow: at arrival and whenever a request finishes), else what a stage sent back (RESULT →
     the request's verdict, FEAT → its features), waiting for it — or until the next arrival.
Over gloo a receive cannot wait with a deadline (a timed-out wait breaks it), so while something is in
flight rank 0 waits for the message even when an arrival falls due meanwhile: that arrival is read next.

Timing: arrivals are scheduled on rank 0's clock from `origin` (the start of the timed loop, after
every reference decode and drafter load); a request's records (spdsim.serving_metrics.RequestRecord)
are in seconds from there: arrival (scheduled), start (its prefill enters stage 1), first token and
finish (its first and last commit on rank 0).
"""
from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from executor.drafters import OracleDrafter, parse_draft
from executor.pipeline import (PREFILL_FEATURES, PREFILL_SERVING, Worker, _act, _event, apply_verdict, clock,
                               stage_forward)
from executor.transport import ACT, BLOB, FEAT, PREFILL, RESULT, STOP, Message, PeerLost
from spdsim.serving_metrics import RequestRecord
from spdsim.serving_protocol import ServingController, Tick
from spdsim.trace import TraceEvent

POLICIES = ("fcfs", "interleave", "spd_first", "adaptive")


@dataclass
class ServingJob:
    """The `serving` part of a pipeline Job: K requests, up to `concurrency` in flight."""
    requests: list[dict]            # each {"prompt": [ids], "new_tokens": N, "arrival_s": t}
    policy: str = "fcfs"
    concurrency: int = 1
    threshold: float = 0.5          # adaptive: a draft enters when its confidence (top probability) ≥ this
    arrivals: str | None = None     # how the arrival times were made (poisson:R), for the report only


@dataclass
class ServingResult:
    tokens: dict[int, list[int]]
    accepts: dict[int, list[int]]                 # each request's verdicts, in order
    confidences: dict[int, list[float | None]]    # each request's drafts' confidences, in drafting order
    records: list[RequestRecord]                  # seconds from origin_ns
    origin_ns: int
    references: dict[int, list[int]] | None
    events: list[TraceEvent]
    epochs: int


def id_ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0-2, 5, 7-8'."""
    parts: list[list[int]] = []
    for i in sorted(ids):
        if parts and i == parts[-1][1] + 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def request_seed(seed: int, request: int) -> int:
    """Request r's oracle seed: its own draws, the same whatever else runs beside it."""
    return seed * 1_000_003 + request


@dataclass
class _Live:
    """One admitted request's state on rank 0."""
    rid: int
    slot: int
    prompt: list[int]
    new_tokens: int
    drafter: object | None
    seq: list = field(default_factory=list)
    drafts: dict[int, int] = field(default_factory=dict)        # position → drafted token
    restarts: list[int] = field(default_factory=list)           # restarts[e]: first position of epoch e
    accepts: list[int] = field(default_factory=list)
    confidences: list = field(default_factory=list)
    buffered: dict[tuple[int, int], Tensor] = field(default_factory=dict)   # (depth, position) → hidden
    given: set = field(default_factory=set)
    prompt_feats: dict[int, Tensor] = field(default_factory=dict)
    started: bool = False

    def __post_init__(self) -> None:
        P = len(self.prompt)
        self.seq = list(self.prompt) + [None] * self.new_tokens
        self.restarts = [P - 1]

    def valid(self, epoch: int, position: int) -> bool:
        r = self.restarts
        return all(position < r[e] for e in range(epoch + 1, len(r)))


class _Drafters:
    """Makes each admitted request's drafter: the oracle from the request's own reference, or a trained
    module — one per slot, loaded before timing and started afresh for each request it serves."""

    def __init__(self, worker: Worker, draft: str | None, seed: int, slots: int,
                 references: dict[int, list[int]] | None) -> None:
        self.parsed = parse_draft(draft)
        self.seed, self.references = seed, references
        self.modules: list = []
        if self.parsed and self.parsed[0] == "head":
            cache = worker.__dict__.setdefault("_serving_heads", {})    # reused by later jobs of the launch
            from executor.head_drafter import load_head_drafter
            for k in range(slots):
                key = (self.parsed[1], k)
                if key not in cache:
                    cache[key] = load_head_drafter(self.parsed[1], model=worker.model, stages=worker.layout.stages)
                self.modules.append(cache[key])
        self.vocab = worker.model.cfg.vocab_size

    @property
    def feats(self) -> bool:
        return bool(self.modules)

    @property
    def confident(self) -> bool:
        """Does the drafter give a confidence (the adaptive policy's input)?"""
        return bool(self.modules)

    def make(self, request: int, slot: int):
        if self.parsed is None:
            return None
        if self.modules:
            return self.modules[slot]
        return OracleDrafter(float(self.parsed[1]), self.references[request], request_seed(self.seed, request),
                             self.vocab)

    def draft(self, drafter, position: int, token: int) -> tuple[int, float | None]:
        if not self.modules:
            return drafter.draft(position, token), None
        logits = drafter.logits(position, token)
        probs = torch.softmax(logits.float().reshape(-1), -1)
        conf, tok = probs.max(-1)
        return int(tok), float(conf)


@torch.no_grad()
def lead_serving(worker: Worker, job, idle_timeout: float) -> ServingResult:
    """Run one serving job (job.serving: a ServingJob's fields) as rank 0."""
    sv = ServingJob(**job.serving)
    w, L, tr, rec = worker, worker.layout, worker.tr, worker.rec
    n = L.stages
    peers = L.group(0)[1:]
    down = L.rank(1, 0) if n > 1 else None
    leaders = L.leaders()[1:]
    sources = leaders if n > 1 else []
    K = len(sv.requests)
    prompts = [list(r["prompt"]) for r in sv.requests]
    news = [int(r["new_tokens"]) for r in sv.requests]
    arrivals = [float(r.get("arrival_s", 0.0)) for r in sv.requests]
    parsed = parse_draft(job.draft)
    spd = job.scheme == "spd" and n > 1
    references = None
    if (parsed and parsed[0] == "oracle") or job.reference:       # before timing
        references = dict(enumerate(w.references(list(zip(prompts, news)))))
    slots = 1 if sv.policy == "fcfs" else sv.concurrency
    drafters = _Drafters(w, job.draft if spd else None, job.seed, slots, references)
    feats = spd and drafters.feats
    if sv.policy == "adaptive" and spd and not drafters.confident:
        raise ValueError("the adaptive policy needs a drafter with a confidence (--draft head:PATH)")
    flags = PREFILL_SERVING | (PREFILL_FEATURES if feats else 0)
    ctl = ServingController(sv.policy, window=n if spd else 1, drafts=spd, max_batch=1,
                            max_running=sv.concurrency, threshold=sv.threshold)
    free = list(range(slots))
    live: dict[int, _Live] = {}
    done: dict[int, _Live] = {}
    records: dict[int, RequestRecord] = {}
    waiting = deque(sorted(range(K), key=lambda r: (arrivals[r], r)))
    draft_jobs: deque = deque()         # (request, q, epoch, token): draft q + 1 once its features are there
    expected = 0                        # messages still to come back to rank 0 (RESULTs and FEATs)
    state = {"heard": clock()}

    origin = clock()

    def seconds(t: int) -> float:
        return (t - origin) / 1e9

    def admit() -> None:
        for rid in ctl.admit():
            slot = free.pop(0)
            lv = live[rid] = _Live(rid, slot, prompts[rid], news[rid], drafters.make(rid, slot))
            if lv.drafter is not None and not feats:
                lv.drafter.start(list(lv.prompt), None)
                lv.started = True

    def maybe_start(lv: _Live) -> None:
        if not lv.started and all(d in lv.prompt_feats for d in range(n + 1)):
            lv.drafter.start(list(lv.prompt), lv.prompt_feats)
            lv.started = True

    def handle(msg: Message) -> None:
        nonlocal expected
        expected -= 1
        state["heard"] = clock()
        lv = live.get(msg.request)
        if msg.kind == FEAT:
            if lv is None:
                return
            if msg.epoch == -1:                         # the prompt's, from the prefill
                lv.prompt_feats[msg.aux] = msg.tensor
                maybe_start(lv)
            elif lv.valid(msg.epoch, msg.position):
                lv.buffered[(msg.aux, msg.position)] = msg.tensor[0]
            return
        assert msg.kind == RESULT, msg.kind
        r, p, token = msg.request, msg.position, msg.token
        if lv is None:                                  # a stale position of a finished request
            ctl.on_result(r, p, msg.epoch, lambda c: False)
            return
        if feats and msg.tensor is not None and lv.valid(msg.epoch, p):
            lv.buffered[(n, p)] = msg.tensor[0]
        sv_verdict = ctl.on_result(r, p, msg.epoch, lambda conf: lv.drafts.get(p + 1) == token)
        verdict = sv_verdict.verdict
        if verdict.stale:
            return
        now = clock()
        apply_verdict(rec, verdict, token, msg.epoch, lv.seq, lv.accepts, lv.restarts, lv.drafter, now, request=r)
        for k in [k for k in lv.drafts if k <= p + 1]:
            del lv.drafts[k]
        if verdict.accepted is False:
            for key in [k for k in lv.buffered if k[1] > p]:
                del lv.buffered[key]
            lv.given.difference_update({k for k in lv.given if k[1] > p})
        record = records[r]
        if sv_verdict.first_token:
            record.first_token_s = seconds(now)
        if sv_verdict.finished:
            record.finish_s = seconds(now)
            done[r] = live.pop(r)
            free.append(lv.slot)
            free.sort()
            admit()                                  # its slot (and its place) may go to a waiting one

    def features_ready(lv: _Live, q: int) -> bool:
        P = len(lv.prompt)
        return lv.started and all((d, q - d) in lv.buffered or (d, q - d) in lv.given
                                  for d in range(2, n + 1) if q - d >= P - 1)

    def ready_draft():
        """The oldest draft job that can run now; stale ones are dropped."""
        for _ in range(len(draft_jobs)):
            r, q, e, tok = job_ = draft_jobs[0]
            lv = live.get(r)
            if lv is None or ctl.epoch(r) != e:
                draft_jobs.popleft()
                continue
            if not feats or features_ready(lv, q):
                draft_jobs.popleft()
                return job_
            draft_jobs.rotate(-1)
        return None

    def do_draft(job_) -> None:
        r, q, e, tok = job_
        lv = live[r]
        t0 = clock()
        if feats:
            for key in sorted(k for k in lv.buffered if k[0] + k[1] <= q):     # depth ≤ q - j
                lv.drafter.add_features(key[0], key[1], lv.buffered.pop(key))
                lv.given.add(key)
        d, conf = drafters.draft(lv.drafter, q, tok)
        lv.drafts[q + 1] = d
        lv.confidences.append(conf)
        rec.add("head", t0, clock(), position=q + 1, epoch=e, request=r)
        ctl.on_draft(r, q + 1, e, conf)

    def run_tick(tick: Tick) -> None:
        nonlocal expected
        if tick.chunk is not None:
            c = tick.chunk
            lv = live[c.request]
            record = records[c.request]
            ids = torch.tensor([lv.prompt[c.start:c.start + c.tokens]], device=w.device)
            for peer in peers:
                w.send(peer, Message(PREFILL, position=c.start, token=lv.slot, aux=flags, tensor=ids.cpu(),
                                     request=c.request), 0, "prefill")
            w.use_slot(lv.slot)
            w.at(c.start, phase="prefill", request=c.request)
            t0 = clock()
            if math.isnan(record.start_s):
                record.start_s = seconds(t0)
            out, hidden, emb = stage_forward(w.stage, ids, torch.arange(c.start, c.start + c.tokens,
                                                                        device=w.device), logits=False)
            rec.add("compute", t0, clock(), stage=0, position=c.start, phase="prefill", request=c.request)
            if feats:
                lv.prompt_feats[0], lv.prompt_feats[1] = emb[0], hidden[0]
            if n > 1:
                w.send(down, _act(PREFILL, out, position=c.start, token=lv.slot, aux=flags, request=c.request), 0,
                       "prefill")
                if feats:
                    expected += n - 1
            return
        (e,) = tick.entries
        r, q = e.request, e.position
        lv = live[r]
        tok = lv.drafts[q] if e.speculative else lv.seq[q]
        for peer in peers:
            w.send(peer, Message(ACT, e.epoch, q, tok, request=r), 0)
        w.use_slot(lv.slot)
        w.at(q, e.epoch, request=r)
        t0 = clock()
        record = records[r]
        if math.isnan(record.start_s):
            record.start_s = seconds(t0)
        out, hidden, emb = stage_forward(w.stage, torch.tensor([[tok]], device=w.device),
                                         torch.tensor([q], device=w.device))
        rec.add("compute", t0, clock(), stage=0, position=q, epoch=e.epoch, request=r)
        if n == 1:                                  # AR: the only stage is also the last
            expected += 1
            handle(Message(RESULT, e.epoch, q, int(out[0, -1].argmax()), request=r))
            return
        w.send(down, _act(ACT, out, e.epoch, q, tok, request=r), 0)
        expected += 1 + (n - 2 if feats else 0)
        if feats:                                   # rank 0's own checkpoints of q: the embedding, stage 1's output
            lv.buffered[(0, q)], lv.buffered[(1, q)] = emb[0, -1], hidden[0, -1]
        if ctl.wants_draft(e):
            draft_jobs.append((r, q, e.epoch, tok))
            if not feats or features_ready(lv, q):      # as one request does: draft right after the forward
                do_draft(draft_jobs.pop())
            else:                                       # its features are on their way: r issues nothing
                ctl.hold(r, e.epoch)                    # until the draft is made (as one request waits)

    try:
        while len(done) < K:
            # as the simulator's first device (and the single-request first rank): draft what is ready,
            # else issue, else read ONE message — an arrival that is due, or what a stage sent back
            job_ = ready_draft()
            if job_ is not None:
                do_draft(job_)
                continue
            tick = ctl.next_tick()
            if tick is not None:
                run_tick(tick)
                continue
            wake = origin + arrivals[waiting[0]] * 1e9 if waiting else None
            if wake is not None and wake <= clock():
                r = waiting.popleft()
                records[r] = RequestRecord(r, arrivals[r], math.nan, math.nan, math.nan, len(prompts[r]), news[r])
                ctl.arrive(r, len(prompts[r]), news[r])
                admit()
            elif expected:
                if wake is None or not tr.can_poll:
                    handle(tr.recv(sources, w.timeout)[1])
                else:
                    got = tr.poll(sources, max(0.0, min(w.timeout, (wake - clock()) / 1e9)))
                    if got is not None:
                        handle(got[1])
                    elif clock() - state["heard"] > w.timeout * 1e9:
                        raise PeerLost(sources[-1], f"sent nothing for {w.timeout:.0f} s (hung or dead)")
            elif wake is not None:                       # nothing in flight: idle until the next arrival
                left = max(0.0, (wake - clock()) / 1e9)
                if tr is not None and tr.can_poll:
                    got = tr.poll(sources, left)         # (a peer's death still shows)
                    if got is not None:
                        handle(got[1])
                else:
                    time.sleep(left)
            else:
                state_of = {r.rid: (r.ctl.known, r.ctl.next_position, r.ctl.epoch, r.prefill_next)
                            for r in ctl.running}
                raise RuntimeError(f"serving stalled with nothing in flight and nothing to issue (a bug): "
                                   f"running (known, next, epoch, prefilled) {state_of}, {len(ctl.waiting)} "
                                   f"waiting, drafts pending {list(draft_jobs)}")
    except PeerLost as e:
        unfinished = [r for r in range(K) if r not in done]
        e.args = (f"{e.args[0]}; {len(unfinished)} of {K} requests unfinished: {id_ranges(unfinished)}",)
        raise

    # end of the job: what is still on its way (features of the last positions: they travel on other
    # links than the last RESULT), then STOP down the pipeline and every rank's events back here
    while expected:
        handle(tr.recv(sources, w.timeout)[1])
    rows = rec.take()
    if L.world > 1:
        for dst in peers + ([down] if down is not None else []):
            tr.send(dst, Message(STOP))
        others = list(range(1, L.world))
        blobs = set()
        while len(blobs) < len(others):
            src, msg = tr.recv([j for j in others if j not in blobs], idle_timeout)
            if msg.kind == BLOB:
                blobs.add(src)
                rows += json.loads(msg.blob)
    restarts = {r: lv.restarts for r, lv in done.items()}
    events = [_event(row, restarts) for row in rows]
    events.sort(key=lambda ev: (ev.start_ns, ev.end_ns))
    return ServingResult(
        tokens={r: [int(t) for t in lv.seq[len(lv.prompt):]] for r, lv in sorted(done.items())},
        accepts={r: lv.accepts for r, lv in sorted(done.items())},
        confidences={r: lv.confidences for r, lv in sorted(done.items())},
        records=[records[r] for r in range(K)], origin_ns=origin, references=references, events=events,
        epochs=sum(len(lv.restarts) - 1 for lv in done.values()))
