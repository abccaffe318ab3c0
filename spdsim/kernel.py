"""The engine's shared kernel: devices, links and pipeline stages as SimPy processes.

Every scheme builds on these pieces and this module imports no scheme (the schemes import it; the
engine, `spdsim.engine`, imports the schemes):
  - `RunConfig`, everything one run needs besides the plan;
  - a `Mailbox` per stage (ACT messages), one for the first device (RESULT, FEATURE, DRAFT messages) and
    one for a dedicated speculative module (ISSUE, FEATURE), and the message kinds;
  - `Sim`: every directed link of the topology as a single server (`Sim.book`: a message holds each
    hop for bytes / bandwidth — concurrent messages on a link queue — and then pays the hop's latency),
    the `stage` process for stages 2..n (stage 1 and the protocol live in `spdsim.schemes.spd`), and
    the event log, turned into `spdsim.trace.TraceEvent`s at the end (compute of a position in an epoch
    that never committed is marked discarded: the waste of DESIGN §3);
  - `point_rng` / `jitter_rng`: each point's random streams.
Simulated time is in nanoseconds (floats inside SimPy, rounded in the trace).

Tensor-parallel stages (the contract in `spdsim.protocol`): a TP group is one stage process. Its
forward costs the bound cost model's `stage_s` (TP layers + all-reduces + the last stage's logits
all-gather); one `allreduce` event per stage forward aggregates that forward's collectives (bytes = their
sum, span = their total time, at the end of the compute event: inside it, as the contract asks). The
tp parallel ACT messages (TP rank r → TP rank r of the next stage) and stage 1's issue to its TP peers
cross the topology's links as one *burst* (`Sim.burst` / `Sim.book`): every message of it is booked on
every hop of its path at send time and the burst is delivered as one event when its last message
arrives (a stage starts when all its ranks have their input: the first all-reduce waits for the last).
Booking a whole path at send time reserves later hops in send order rather than arrival order; exact
whenever a hop is not contended, as for activations that hold a link for nanoseconds.
"""
from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import simpy

from spdsim.collectives import tp_stage_bytes
from spdsim.costs import CostModel
from spdsim.hardware import Topology
from spdsim.jitter import JitterProcess
from spdsim.partition import RESULT_BYTES, Plan
from spdsim.trace import TraceEvent

NS = 1e9

# message kinds
ACT, RESULT, FEATURE, ISSUE, DRAFT = "act", "result", "feature", "issue", "draft"


class Mailbox:
    """A FIFO of messages with one waiter: cheaper than simpy.Store for the one-reader case."""
    __slots__ = ("env", "items", "_waiter")

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self.items: deque = deque()
        self._waiter: simpy.Event | None = None

    def put(self, msg: tuple) -> None:
        self.items.append(msg)
        w = self._waiter
        if w is not None:
            self._waiter = None
            w.succeed()

    def wait(self) -> simpy.Event:
        """An event that fires once a message is (or already was) in the box."""
        ev = self.env.event()
        if self.items:
            ev.succeed()
        else:
            self._waiter = ev
        return ev


@dataclass
class RunConfig:
    """Everything one run needs besides the plan."""
    costs: CostModel
    topology: Topology
    prompt_tokens: int
    new_tokens: int
    window: int                     # W of the protocol: n for SPD, 1 for PP and AR
    drafts: bool                    # SPD with n > 1: the speculative module drafts every issue
    features: bool = True           # the module waits for pipeline features (a trained drafter)
    activation_bytes: int = 8192
    feature_bytes: int = 8192
    accept: Callable[[], bool] = lambda: True
    rng: np.random.Generator | None = None   # draws of the costs' jitter (None: seed 0)
    logits_bytes: int = 0           # one logits row (a TP last stage all-gathers it)


class Sim:
    def __init__(self, plan: Plan, cfg: RunConfig, env: simpy.Environment | None = None,
                 log_sends: bool = True) -> None:
        self.env = env or simpy.Environment()
        self.log_sends = log_sends        # link events are for timelines only; no metric uses them
        self.plan = plan
        self.cfg = cfg
        self.n = plan.stages
        self.link_free: dict[tuple[str, str], float] = {}   # directed link → time it is next free
        self.first_box = Mailbox(self.env)
        self.stage_boxes = [Mailbox(self.env) for _ in range(self.n)]
        self.head_device = plan.head_device if cfg.drafts else None
        self.head_box = Mailbox(self.env) if self.head_device and not plan.head_colocated else None
        self.log: list[tuple] = []        # (kind, start, end, stage, device, position, epoch, bytes, name, accepted)
        self.committed: set[tuple[int, int]] = set()    # (position, epoch) whose RESULT committed a token
        self.done = self.env.event()
        self._tick = cfg.costs.tick_overhead_s * NS
        first = cfg.costs.first_tick_overhead_s      # SPD's first rank (spdsim.costs)
        self._first_tick = self._tick if first is None else first * NS
        self._msg = cfg.costs.msg_overhead_s * NS
        # the first rank's blocking send of an ACT (a calibrated cost; the executor sends synchronously and
        # on shared cores the woken receiver can take the sender's core); 0 for the roofline
        self._send_block = cfg.costs.send_block_s * NS
        jitter = cfg.costs.jitter       # a calibrated host's forward-to-forward variability (spdsim/jitter.py)
        self._jitter = (JitterProcess(jitter, self.n, cfg.rng or np.random.default_rng(0))
                        if jitter is not None and jitter.sd > 0 else None)
        self._paths: dict[tuple[str, str], list[tuple[str, str, float, float]]] = {}
        self._stage_cost: dict[tuple[int, int], float] = {}     # (stage, position) → forward ns
        self.tp = plan.tp
        self._issue_pairs = [(plan.placement[0], d) for d in plan.group(0)[1:]]

    def group_pairs(self, s: int) -> list[tuple[str, str]]:
        """TP rank r of stage s → TP rank r of stage s+1."""
        return list(zip(self.plan.group(s), self.plan.group(s + 1)))

    def send_act(self, s: int, box: Mailbox, msg: tuple) -> None:
        """Stage s's activation to stage s+1: one message, or tp in parallel (a burst)."""
        if self.tp == 1:
            self.send(self.plan.placement[s], self.plan.placement[s + 1], self.cfg.activation_bytes, box, msg, s)
        else:
            self.burst(self.group_pairs(s), self.cfg.activation_bytes, box, msg, s)

    def issue_wait_ns(self, position: int, epoch: int) -> float:
        """TP: stage 1's rank 0 sends the issue to its TP peers; its group's forward can only end once
        the last of them has it. The wait before the forward's own time (0 without TP)."""
        if not self._issue_pairs:
            return 0.0
        return max(0.0, self.book(self._issue_pairs, RESULT_BYTES, 0, position, epoch) - self.env.now)

    def log_compute(self, t0: float, s: int, dev: str, q: int, e: int, lm_head: bool | None = None) -> None:
        """The compute event of stage s's forward (now ends it) and, under TP, its allreduce event
        (lm_head: does this forward end with the LM head's all-gather; default: s is the last stage)."""
        now = self.env.now
        self.log.append(("compute", t0, now, s, dev, q, e, 0, "", None))
        if self.tp > 1:
            a, b = self.plan.layers[s]
            last = s == self.n - 1 if lm_head is None else lm_head
            ar = self.cfg.costs.stage_allreduce_s(s, a, b, last) * NS
            nbytes = sum(tp_stage_bytes(self.cfg.activation_bytes, self.cfg.logits_bytes, b - a, last))
            self.log.append(("allreduce", max(t0, now - ar), now, s, dev, q, e, nbytes, "allreduce", None))

    # --- costs ------------------------------------------------------------------------------------
    def stage_ns(self, s: int, position: int) -> float:
        t = self._stage_cost.get((s, position))
        if t is None:
            a, b = self.plan.layers[s]
            # position q attends to positions 0..q: context length q + 1 (a pure cost: computed once)
            t = self._stage_cost[(s, position)] = self.cfg.costs.stage_s(s, a, b, position + 1, s == 0,
                                                                          s == self.n - 1) * NS
        return t * self._jitter.factor(s) if self._jitter is not None else t

    def head_ns(self, position: int) -> float:
        return self.cfg.costs.head_s(position + 1) * NS

    # --- links ------------------------------------------------------------------------------------
    def _path(self, src: str, dst: str, nbytes: int) -> list[tuple[str, str, float, float]]:
        key = (src, dst, nbytes)
        p = self._paths.get(key)
        if p is None:
            p = []
            for u, v in self.cfg.topology.path(src, dst):
                ser, lat = self.cfg.costs.hop_s(u, v, nbytes)
                p.append(((u, v), f"{u}->{v}", ser * NS, lat * NS))
            self._paths[key] = p
        return p

    def send(self, src: str, dst: str, nbytes: int, box: Mailbox, msg: tuple, stage: int) -> None:
        """Deliver msg to box over the topology (non-blocking for the sender): a burst of one.

        Every hop is booked now (`book`): a hop's link is held for bytes / bandwidth from when the
        message reaches it or the link frees, then the hop's latency; the message is delivered by one
        event. On switched topologies a later hop is reserved in send order rather than arrival order,
        which differs from a per-hop FIFO only when two messages from different senders reach a shared
        link within a serialization time of each other (ns)."""
        self.burst([(src, dst)], nbytes, box, msg, stage)

    def book(self, pairs: list[tuple[str, str]], nbytes: int, stage: int, position: int, epoch: int) -> float:
        """Book one message per (src, dst) pair, all sent now, on every hop of its path (see the module
        docstring); returns the time the last one arrives."""
        now = self.env.now
        latest = now
        for src, dst in pairs:
            t = now + self._msg
            for link, name, ser, lat in self._path(src, dst, nbytes):
                start = self.link_free.get(link, 0.0)
                if start < t:
                    start = t
                end = start + ser
                self.link_free[link] = end
                if self.log_sends:
                    self.log.append(("send", start, end, stage, src, position, epoch, nbytes, name, None))
                t = end + lat
            if t > latest:
                latest = t
        return latest

    def burst(self, pairs: list[tuple[str, str]], nbytes: int, box: Mailbox, msg: tuple, stage: int) -> None:
        """Deliver msg to box once every message of the burst has arrived."""
        delay = self.book(pairs, nbytes, stage, msg[2], msg[1]) - self.env.now
        if delay > 0.5:
            ev = self.env.timeout(delay)
            ev.callbacks.append(lambda _e: box.put(msg))
        else:
            box.put(msg)

    # --- stages 2..n ---------------------------------------------------------------------------------
    def stage(self, s: int):
        """Stage s ≥ 1: take ACTs in order, adopt newer epochs, drop older ones, compute, pass on."""
        env, box, plan, cfg = self.env, self.stage_boxes[s], self.plan, self.cfg
        dev = plan.placement[s]
        last = s == self.n - 1
        nxt = None if last else plan.placement[s + 1]
        first_dev = plan.placement[0]
        epoch = 0
        log = self.log
        feature_to = self.head_device if (cfg.features and self.head_device and self.head_device != dev) else None
        feature_box = self.first_box if self.head_box is None else self.head_box
        tp = self.tp > 1
        while True:
            if not box.items:
                yield box.wait()
            _, e, q = box.items.popleft()
            if e < epoch:            # an older epoch after a newer one: cannot happen on FIFO links
                continue
            epoch = e                # a newer epoch: roll back to q (the KV cache is not modelled further)
            if self._tick:
                yield env.timeout(self._tick)
            t0 = env.now
            yield env.timeout(self.stage_ns(s, q))
            if tp:
                self.log_compute(t0, s, dev, q, e)
            else:
                log.append(("compute", t0, env.now, s, dev, q, e, 0, "", None))
            if feature_to is not None:
                self.send(dev, feature_to, cfg.feature_bytes, feature_box, (FEATURE, e, q, s), s)
            if last:
                self.send(dev, first_dev, RESULT_BYTES, self.first_box, (RESULT, e, q), s)
            elif tp:
                self.send_act(s, self.stage_boxes[s + 1], (ACT, e, q))
            else:
                self.send(dev, nxt, cfg.activation_bytes, self.stage_boxes[s + 1], (ACT, e, q), s)

    # --- the event log → trace events -------------------------------------------------------------
    def trace_events(self, sends: bool = True) -> list[TraceEvent]:
        """The log as trace events, in time order; sends=False leaves out link events (no metric uses them)."""
        out = []
        committed = self.committed
        for kind, t0, t1, s, dev, q, e, nbytes, name, accepted in self.log:
            if kind == "send" and not sends:
                continue
            if kind in ("compute", "send"):
                discarded = (q, e) not in committed
            elif kind == "head":
                discarded = (q - 1, e) not in committed    # drafted on behalf of issue q-1
            else:
                discarded = False
            out.append(TraceEvent.trusted(kind=kind, start_ns=int(round(t0)), end_ns=int(round(t1)), stage=s,
                                          device=dev, position=q, bytes=nbytes, discarded=discarded,
                                          accepted=accepted, name=name))
        if sends:
            out.sort(key=lambda ev: (ev.start_ns, ev.end_ns))
        return out


def point_rng(seed: int, point) -> np.random.Generator:
    """Each point's RNG from (seed, point): the same seed gives the same verdicts, in any process order.

    Only the point's acceptance setting enters the key, so every stage count and partitioner at one α
    sees the same verdict sequence (common random numbers: their differences are not sampling noise)."""
    a = point.acceptance
    key = f"{a.kind}:{a.label}:{a.run_length}" if a is not None else "none"
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(key.encode())]))


def jitter_rng(seed: int) -> np.random.Generator:
    """The jitter draws of a run: one stream per seed for every point (common random numbers again:
    PP and SPD at one seed see the same forward-to-forward draws)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0x6A17]))
