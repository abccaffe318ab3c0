"""Predicting a measured serving run (`executor run --requests K`, `executor validate`'s serving points):
the simulator's serving pipeline (spdsim.serving.ServingSim, driving the same ServingController as the
executor's first rank) replaying the run's arrivals, prompt and output lengths and each request's
accept/reject verdicts — and, under the adaptive policy, its drafts' confidences — so that a timing error
is not mixed with an acceptance error (as `spdsim.replay.replay_point` does for one decode).

Replayed in order, per request: request r's k-th verification in the simulation gets the k-th verdict
measured for r (an accept once the measured ones run out), its k-th draft the k-th measured confidence
(cycled). Which positions get verified can differ between the two runs when timing differs (a result
that comes back before the next position was issued makes that position known, not speculated), so
under load the count of verifications is itself a prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, replace as dc_replace
from typing import Sequence

from spdsim.acceptance import replay
from spdsim.cost_choice import cost_model
from spdsim.costs import CostModel
from spdsim.engine import plan_point
from spdsim.kernel import RunConfig, jitter_rng
from spdsim.scenario import Point, Workload
from spdsim.schemes import SCHEMES
from spdsim.serving import ServingOutcome, ServingRun, ServingSim
from spdsim.serving_metrics import serving_metrics
from spdsim.workload import Request


@dataclass(frozen=True)
class MeasuredRequest:
    arrival_s: float
    prompt_tokens: int
    new_tokens: int
    accepts: tuple[int, ...] = ()                     # its verdicts in order (1 accept, 0 reject)
    confidences: tuple[float | None, ...] = ()        # its drafts' confidences in drafting order (adaptive)


def _replayer(values: Sequence, default, cycle: bool = False):
    it = {"i": 0}

    def next_value(*_):
        i = it["i"]
        it["i"] += 1
        if i < len(values):
            return values[i]
        return values[i % len(values)] if cycle and values else default
    return next_value


def replay_serving(scenario, scheme: str, stages: int, policy: str, concurrency: int,
                   requests: Sequence[MeasuredRequest], features: bool = False, threshold: float = 0.5,
                   seed: int = 0, costs: CostModel | None = None, keep_events: bool = False) -> ServingOutcome:
    """One simulated serving run of `requests` (arrival times in seconds from the run's start), the
    module co-located with stage 1 as the executor runs it, up to `concurrency` requests admitted (the
    executor's one KV cache per slot: no memory model), one request per tick; jitter draws `seed`;
    `costs` replaces the scenario's cost model. ServingOutcome.extra holds the serving figures."""
    if not requests:
        raise ValueError("replay_serving: no requests")
    n = stages
    spec = SCHEMES[scheme]
    drafts = spec.drafts and n > 1
    prompt = max(1, round(sum(r.prompt_tokens for r in requests) / len(requests)))
    new = max(1, round(sum(r.new_tokens for r in requests) / len(requests)))
    sc = dc_replace(scenario, seed=seed, workload=Workload(prompt, new),
                    head=dc_replace(scenario.head, features=features, placement="colocated"))
    point = Point(scheme, n, "uniform", replay(sequence=[1]) if drafts else None)
    plan = plan_point(sc, point)
    if not drafts:
        plan = dc_replace(plan, head_device=None)
    base = costs.with_head("head" if features else "oracle") if costs is not None else cost_model(sc)
    # the compute regime a calibration picks by scheme: PP serving several requests at once keeps its ranks
    # computing together, as SPD does (spdsim.calibration_file.regime_of), not one at a time
    together = n > 1 and policy != "fcfs" and concurrency > 1
    regime_scheme = "spd" if together and scheme == "pp" else scheme
    m = sc.model
    # the RunConfig spdsim.engine.simulate_point builds for a point, with the measured lengths
    cfg = RunConfig(costs=base.for_point(regime_scheme, n, plan.tp, plan.groups or None), topology=sc.hardware.graph,
                    prompt_tokens=prompt, new_tokens=new, window=spec.window(n), drafts=drafts, features=features,
                    activation_bytes=m.activation_bytes,
                    feature_bytes=m.activation_bytes * sc.head.checkpoints_per_stage, rng=jitter_rng(seed),
                    logits_bytes=m.logits_bytes)
    adaptive = policy == "adaptive" and drafts
    run = ServingRun(
        policy=policy, requests=[Request(i, r.arrival_s, r.prompt_tokens, r.new_tokens) for i, r in enumerate(requests)],
        max_batch=1, max_running=concurrency, threshold=threshold if adaptive else 0.0,
        accept_for=lambda rid: (lambda f: (lambda conf: bool(f())))(_replayer(requests[rid].accepts, 1)),
        confidence_for=(lambda rid: _replayer(requests[rid].confidences, 0.0, cycle=True)) if adaptive else None)
    sim = ServingSim(plan, cfg, run, keep_events=keep_events)
    sim.start()
    sim.env.run(until=sim.done)
    records = [sim.records[i] for i in range(len(requests))]
    extra = {"mean_in_system": sim.mean_in_system, "peak_running": sim.peak_running,
             **serving_metrics(records).columns()}
    return ServingOutcome(sim.metrics(scheme), records, sim.trace_events(sends=False) if keep_events else None, extra)
