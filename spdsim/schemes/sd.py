"""sd: classic draft-model speculative decoding (Leviathan et al. 2023), on one device or on the pipeline.

One *step*: a draft model (cost ratio c: each drafted token costs c × one full target forward at that
context) drafts γ tokens one after another on stage 1's device; the target then verifies the last known
token and the γ drafts in one pass through its n stages (n = 1: one device); drafts are checked in
order, the first rejection ends the step, and the target's own token at the first mismatch (or after
the last accepted draft) is committed too. Expected tokens per step `(1-α^(γ+1))/(1-α)` with i.i.d. α.

Assumptions, said once: a verification pass of γ + 1 tokens costs what one token's pass costs (batch-1
decode is memory-bound: the weights are read once; a few tokens add FLOPs far below the roofline ridge),
and its activations are γ + 1 times one token's on the links. Only one chunk is ever in flight (the next
step needs this one's verdicts), so nothing queues and a plain clock schedules the step exactly; the
events go through `spdsim.metrics.run_metrics` like every other scheme's. The LM head and the acceptance
test are part of the last stage's pass (no `costs.verify_ms` here: that is rank 0's phase of the
reference layout); `costs.tick_overhead_ms` / `msg_overhead_ms` apply as for the other schemes.

`chain` (EAGLE-style chain drafting, `spdsim.schemes.chain`) is the same step with a light head drafting
from the target's features and a per-position acceptance table.

On TP groups (what vLLM and SGLang serve): the bound cost model's stage times (TP layers, all-reduces,
the logits all-gather) and the draft c × that target pass (the draft model runs on the same TP group);
stage 1's TP rank 0 sends each pass's input to its TP peers first, activations pass as tp parallel
messages (the slowest one, with shared links queueing, sets the arrival), and each stage pass logs an
`allreduce` event like the pipeline schemes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from spdsim.acceptance import sampler
from spdsim.collectives import tp_stage_bytes
from spdsim.kernel import NS, RunConfig, point_rng
from spdsim.partition import RESULT_BYTES, Plan
from spdsim.schemes.base import Scheme
from spdsim.trace import TraceEvent


def _one(n: int) -> int:
    return 1


def draft_verify(plan: Plan, cfg: RunConfig, gamma: int, draft_ns: Callable[[int], float],
                 accept: Callable[[int], bool], keep_sends: bool = False) -> tuple[list[TraceEvent], dict]:
    """Run steps until N tokens are committed. draft_ns(ctx) is one drafted token's time; accept(k) the
    verdict on the k-th draft of a step (1-based), asked only while the drafts before it held."""
    costs, topo, n = cfg.costs, cfg.topology, plan.stages
    dev0 = plan.placement[0]
    tick, msg = costs.tick_overhead_s * NS, costs.msg_overhead_s * NS
    ev: list[TraceEvent] = []
    t = 0.0
    known, committed, N = cfg.prompt_tokens, 0, cfg.new_tokens
    steps = drafted_ns = pass_ns = 0.0
    by_depth = [0] * (gamma + 1)        # steps in which draft k was accepted

    def E(kind, t0, t1, stage, device, position, nbytes=0, discarded=False, accepted=None, name=""):
        ev.append(TraceEvent(kind=kind, start_ns=int(round(t0)), end_ns=int(round(t1)), stage=stage,
                             device=device, position=position, bytes=nbytes, discarded=discarded,
                             accepted=accepted, name=name))

    def transfer(src: str, dst: str, nbytes: int, stage: int, position: int) -> None:
        nonlocal t
        if src == dst:
            return
        t += msg
        for u, v in topo.path(src, dst):
            ser, lat = costs.hop_s(u, v, nbytes)
            if keep_sends:
                E("send", t, t + ser * NS, stage, src, position, nbytes, name=f"{u}->{v}")
            t += (ser + lat) * NS

    def transfer_group(pairs, nbytes: int, stage: int, position: int) -> None:
        """tp messages sent at once (TP): each link a FIFO server, arrival of the last one."""
        nonlocal t
        free: dict[tuple[str, str], float] = {}
        latest = t
        for src, dst in pairs:
            tt = t + msg if src != dst else t
            for u, v in topo.path(src, dst):
                ser, lat = costs.hop_s(u, v, nbytes)
                start = max(free.get((u, v), 0.0), tt)
                free[(u, v)] = start + ser * NS
                if keep_sends:
                    E("send", start, start + ser * NS, stage, src, position, nbytes, name=f"{u}->{v}")
                tt = start + (ser + lat) * NS
            latest = max(latest, tt)
        t = latest

    tp = plan.tp
    groups = [plan.group(s) for s in range(n)]

    while committed < N:
        g = min(gamma, N - committed - 1)          # no drafts past the last token asked for
        last = known - 1                            # the last known token: the pass's first input
        t_step = t
        heads = []
        for k in range(1, g + 1):                   # drafts one after another on stage 1's device
            d = draft_ns(last + k)
            heads.append((t, t + d, last + k))
            t += d
        drafted_ns += t - t_step
        slowest = 0.0
        for s, (a, b) in enumerate(plan.layers):    # one verification pass of g + 1 tokens
            t += tick
            t0 = t
            if tp > 1 and s == 0:                   # the pass's input to stage 1's TP peers
                transfer_group([(dev0, d) for d in groups[0][1:]], RESULT_BYTES * (g + 1), 0, last)
            t += costs.stage_s(s, a, b, last + g + 1, s == 0, s == n - 1) * NS
            slowest = max(slowest, t - t0)
            E("compute", t0, t, s, plan.placement[s], last)
            if tp > 1:
                ar = costs.stage_allreduce_s(s, a, b, s == n - 1) * NS
                nb = sum(tp_stage_bytes(cfg.activation_bytes * (g + 1), cfg.logits_bytes * (g + 1), b - a, s == n - 1))
                E("allreduce", max(t0, t - ar), t, s, plan.placement[s], last, nb, name="allreduce")
            nxt = plan.placement[s + 1] if s < n - 1 else dev0
            if tp > 1 and s < n - 1:
                transfer_group(list(zip(groups[s], groups[s + 1])), cfg.activation_bytes * (g + 1), s, last)
            else:
                transfer(plan.placement[s], nxt, (cfg.activation_bytes if s < n - 1 else RESULT_BYTES) * (g + 1),
                         s, last)
        pass_ns += slowest
        accepted = 0
        verdicts = []
        for k in range(1, g + 1):
            ok = bool(accept(k))
            verdicts.append((last + k, ok))
            if not ok:
                break
            accepted += 1
            by_depth[k] += 1
        for i, (t0, t1, q) in enumerate(heads):
            E("head", t0, t1, -1, dev0, q, discarded=i >= accepted)
        for q, ok in verdicts:
            E("verify", t, t, -1, dev0, q, accepted=ok)
        for j in range(min(accepted + 1, N - committed)):
            E("commit", t, t, -1, dev0, known + j)
        known += accepted + 1
        committed += accepted + 1
        steps += 1
    ev.sort(key=lambda e: (e.start_ns, e.end_ns))
    extra = {"cycle_ms": t / steps / 1e6, "draft_ms": drafted_ns / steps / 1e6,
             "slowest_stage_ms": pass_ns / steps / 1e6, "fixed_ms": 0.0,   # the acceptance test rides on the pass
             "tokens_per_cycle": N / steps,
             "acceptance_by_depth": "/".join(f"{by_depth[k] / steps:.3f}" for k in range(1, gamma + 1))}
    return ev, extra


def simulate(scenario, point, plan: Plan, cfg: RunConfig, env, keep_events: bool):
    sd = scenario.baselines.sd
    plan = replace(plan, head_device=plan.placement[0])
    L = scenario.model.layers
    costs = cfg.costs

    def draft_ns(q: int) -> float:
        if sd.draft_ms is not None:
            return sd.draft_ms * 1e-3 * NS
        return sd.cost_ratio * costs.stage_s(0, 0, L, q + 1, True, True) * NS

    # at most one verdict per committed token: the first N - 1 hold exactly round(α(N - 1)) accepts, so the
    # verdicts a run consumes realise α to within the finite-population spread (acceptance.sampler)
    verdict = sampler(point.acceptance, point_rng(scenario.seed, point), exact_over=scenario.workload.new_tokens - 1)
    events, extra = draft_verify(plan, cfg, sd.gamma, draft_ns, lambda k: verdict(), keep_events)
    return events, plan, extra


SD = Scheme("sd", window=_one, drafts=True, simulate=simulate)
