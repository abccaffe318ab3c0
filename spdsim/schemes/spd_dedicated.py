"""spd_dedicated: the authors' reference layout — n + 1 ranks in synchronous cycles.

Rank 0 (the speculative module's device) holds the draft module, the embedding, the final norm + LM head
and the verification; ranks 1..n hold one stage of decoder layers each (so stage 1 has no embedding and
stage n no LM head here). The protocol is `spdsim.protocol.CycleController` (the documented
synchronous-cycle variant of the SPD protocol); one cycle, as the reference implementation runs it:

  rank 0   control ─► embed + send ─► draft ───────────────► [wait last stage] ─► verify ─► update ─► sync
  stage s            [control] ─► forward its slot ─► send on (stage n: its hidden state to rank 0)

  - control (`costs.control_ms`) and sync (`costs.sync_ms`) and verify (`costs.verify_ms`, default the
    LM head's time) are rank 0's fixed phases: they do not shrink with stage depth;
  - the draft (`costs.draft_ms`, default `head_s`) overlaps the stage forwards: it only costs time when
    it is slower than the path through the stages;
  - the control message crosses the links to every stage rank; activations and the last hidden state
    are link transfers too (queued on shared links, like every other scheme).

With the `draft_colocated` partitioner the module shares stage 1's device (n GPUs): rank 0's phases and
stage 1's forward then run one after the other on that device, and the partitioner gives stage 1 fewer
layers to compensate. Any other partitioner puts rank 0 on a device of its own (n + 1 GPUs).

TP (stages on TP groups, `spdsim.protocol`): rank 0 stays one GPU; its control message and stage 1's
input reach every TP rank of their stage, activations pass rank r → rank r, the last stage's rank 0
returns the hidden state; with draft_colocated rank 0 is stage 1's TP rank 0 and sends the input to its
TP peers before the forward.

Extra columns: `cycle_ms`, `draft_ms`, `slowest_stage_ms`, `fixed_ms` (means per cycle, over the cycles
up to the N-th commit), `tokens_per_cycle` and `theoretical_speedup` = n × committed tokens per cycle
(the reference implementation's "theoretical speedup": what SPD would give over PP if every cycle were
as short as one stage).
"""
from __future__ import annotations

from dataclasses import replace

from spdsim.acceptance import sampler
from spdsim.kernel import ACT, NS, RESULT, Mailbox, RunConfig, Sim, point_rng
from spdsim.errors import UserError
from spdsim.partition import Plan
from spdsim.protocol import CycleController
from spdsim.schemes.base import Scheme

CONTROL = "control"
CONTROL_BYTES = 64 * 4     # a slot table of a few ints per stage: latency-bound whatever its size


def _window(n: int) -> int:
    return n


def dedicated_plan(scenario, plan: Plan) -> Plan:
    """The plan with rank 0's device: stage 1's under draft_colocated, else the first free device."""
    if plan.partition == "draft_colocated":
        return replace(plan, head_device=plan.placement[0])
    if plan.head_device is not None and not plan.head_colocated:
        return plan
    used = {d for s in range(plan.stages) for d in plan.group(s)}
    free = [d for d in scenario.hardware.graph.devices if d not in used]
    if not free:
        raise UserError(f"sweep.schemes: spd_dedicated with {plan.stages} stages needs {len(used) + 1} GPUs "
                        f"(hardware.count is {len(used)}); or use partition draft_colocated")
    return replace(plan, head_device=free[0])


class CycleSim(Sim):
    """The engine's devices, links and log, with rank 0 and the stages running the cycle protocol."""

    def __init__(self, plan: Plan, cfg: RunConfig, accept, env=None, log_sends: bool = True) -> None:
        super().__init__(plan, cfg, env, log_sends)
        self.rank0 = plan.head_device
        self.colocated = plan.head_colocated
        self.accept = accept
        self.control_boxes = [Mailbox(self.env) for _ in range(self.n)]
        c = cfg.costs
        self._control = c.control_s() * NS
        self._sync = c.sync_s() * NS
        self._verify = c.verify_s() * NS
        self._embed = c.embed_s() * NS
        self.cycles: list[tuple[float, float, float, int, float]] = []  # start, end, draft, cycle, fixed
        self._slowest: dict[int, float] = {}     # cycle → longest stage forward in it
        self._taken: dict[int, object] = {}      # cycle → event: stage 1 has taken that cycle's input

    def layers_ns(self, s: int, position: int) -> float:
        """Stage s's decoder layers only: rank 0 holds the embedding and the LM head."""
        a, b = self.plan.layers[s]
        return self.cfg.costs.stage_s(s, a, b, position + 1, False, False) * NS

    def to_group(self, s: int) -> list[tuple[str, str]]:
        """Rank 0's messages to every TP rank of stage s (one pair without TP)."""
        return [(self.rank0, d) for d in self.plan.group(s)]

    def _forward(self, s: int, cycle: int, slot):
        """Stage s forwards its slot's position, then sends it on (stage n: to rank 0)."""
        env, dev = self.env, self.plan.placement[s]
        q, e = slot.position, slot.epoch
        if self._tick:
            yield env.timeout(self._tick)
        t0 = env.now
        # co-located with TP: rank 0 is stage 1's TP rank 0 and first sends the input to its TP peers
        wait = self.issue_wait_ns(q, e) if s == 0 and self.colocated else 0.0
        yield env.timeout(wait + self.layers_ns(s, q))
        self.log_compute(t0, s, dev, q, e, lm_head=False)
        self._slowest[cycle] = max(self._slowest.get(cycle, 0.0), env.now - t0)
        if self.cfg.features and dev != self.rank0 and s < self.n - 1:
            self.send(dev, self.rank0, self.cfg.feature_bytes, Mailbox(env), ("feature", e, q), s)
        if s == self.n - 1:
            self.send(dev, self.rank0, self.cfg.activation_bytes, self.first_box, (RESULT, e, q), s)
        else:
            self.send_act(s, self.stage_boxes[s + 1], (ACT, e, q))

    def stage_rank(self, s: int):
        """Ranks 1..n: per cycle, a control message; forward the slot's position once its input is here."""
        cbox, abox = self.control_boxes[s], self.stage_boxes[s]
        while True:
            if not cbox.items:
                yield cbox.wait()
            _, _, _, cycle, slot = cbox.items.popleft()
            if slot is None:
                continue
            while True:                  # inputs of cleared slots are still in the box: drop them
                if not abox.items:
                    yield abox.wait()
                _, e, q = abox.items.popleft()
                if (q, e) == (slot.position, slot.epoch):
                    break
            if s == 0 and cycle in self._taken:
                self._taken.pop(cycle).succeed()
            yield from self._forward(s, cycle, slot)

    def rank_zero(self):
        env, n, log, dev = self.env, self.n, self.log, self.rank0
        cc = CycleController(self.cfg.prompt_tokens, self.cfg.new_tokens, n)
        box = self.first_box
        while True:
            c = cc.begin()
            t_start = env.now
            if self._control:
                yield env.timeout(self._control)
            for s in range(n):
                if s == 0 and self.colocated:
                    continue
                slot = c.slots[s]
                msg = (CONTROL, cc.ctl.epoch, slot.position if slot else -1, c.cycle, slot)
                if self.tp > 1:      # the slot table reaches every TP rank of the stage
                    self.burst(self.to_group(s), CONTROL_BYTES, self.control_boxes[s], msg, -1)
                else:
                    self.send(dev, self.plan.placement[s], CONTROL_BYTES, self.control_boxes[s], msg, -1)
            new = c.slots[0]
            if new is not None:
                if self._embed:
                    yield env.timeout(self._embed)
                if self.colocated:       # stage 1 shares this device: its forward runs here, in turn
                    yield from self._forward(0, c.cycle, new)
                else:
                    self._taken[c.cycle] = env.event()
                    msg = (ACT, new.epoch, new.position)
                    if self.tp > 1:  # the embedded token goes to every TP rank of stage 1
                        self.burst(self.to_group(0), self.cfg.activation_bytes, self.stage_boxes[0], msg, -1)
                    else:
                        self.send(dev, self.plan.placement[0], self.cfg.activation_bytes, self.stage_boxes[0],
                                  msg, -1)
            draft = 0.0
            if c.draft_for is not None:
                t0 = env.now
                yield env.timeout(self.draft_ns(c.draft_for))
                draft = env.now - t0
                log.append(("head", t0, env.now, -1, dev, c.draft_for, new.epoch, 0, "", None))
            out = c.slots[-1]
            fixed = self._control + self._sync
            if out is not None:
                while True:              # the last stage's hidden state for `out`
                    if not box.items:
                        yield box.wait()
                    _, e, q = box.items.popleft()
                    if (q, e) == (out.position, out.epoch):
                        break
                if self._verify:
                    yield env.timeout(self._verify)
                fixed += self._verify
            v = cc.end(self.accept)
            if v is not None:
                t, p, e = env.now, v.position, out.epoch
                self.committed.add((p, e))
                for kind, pos, acc in v.marks():
                    log.append((kind, t, t, -1, dev, pos, e, 0, "", acc))
            if cc.done:
                self.cycles.append((t_start, env.now, draft, c.cycle, fixed))
                self.done.succeed()
                return
            # sync: the send to stage 1 completes once stage 1 has posted its receive, i.e. taken the
            # input (a rendezvous): rank 0 runs at most one cycle ahead of stage 1, never more
            taken = self._taken.get(c.cycle)
            if taken is not None and not taken.triggered:
                yield taken
            if self._sync:
                yield env.timeout(self._sync)
            self.cycles.append((t_start, env.now, draft, c.cycle, fixed))

    def draft_ns(self, position: int) -> float:
        return self.cfg.costs.draft_s(position) * NS

    def breakdown(self, committed: int) -> dict:
        k = len(self.cycles)
        mean = lambda i: sum(c[i] for c in self.cycles) / k / 1e6   # noqa: E731  ns → ms
        slowest = sum(self._slowest.get(c[3], 0.0) for c in self.cycles) / k / 1e6
        return {"cycle_ms": sum(c[1] - c[0] for c in self.cycles) / k / 1e6, "draft_ms": mean(2),
                "slowest_stage_ms": slowest, "fixed_ms": mean(4), "tokens_per_cycle": committed / k,
                "theoretical_speedup": self.n * committed / k}


def simulate(scenario, point, plan: Plan, cfg: RunConfig, env, keep_events: bool):
    plan = dedicated_plan(scenario, plan)
    cfg.drafts = True
    accept = (sampler(point.acceptance, point_rng(scenario.seed, point), exact_over=scenario.workload.new_tokens - 1)
              if point.acceptance is not None else (lambda: True))
    sim = CycleSim(plan, cfg, accept, env, log_sends=keep_events)
    for s in range(sim.n):
        if not (s == 0 and sim.colocated):
            sim.env.process(sim.stage_rank(s))
    sim.env.process(sim.rank_zero())
    sim.env.run(until=sim.done)
    return sim.trace_events(sends=keep_events), plan, sim.breakdown(cfg.new_tokens)


SPD_DEDICATED = Scheme("spd_dedicated", window=_window, drafts=True, simulate=simulate)
