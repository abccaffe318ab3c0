"""Simulating one scenario point: plan (partition + placement), run the scheme's processes on the
shared kernel (`spdsim.kernel`), measure with `spdsim.metrics.run_metrics`.

`simulate_point(scenario, point)` is the public entry. Data flows one way: scenario → plan → engine
(kernel + schemes) → trace events → metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import simpy

from spdsim.acceptance import sampler
from spdsim.cost_choice import cost_model
from spdsim.costs import CostModel
from spdsim.kernel import RunConfig, Sim, jitter_rng, point_rng
from spdsim.metrics import RunMetrics, run_metrics
from spdsim.partition import Plan, PlanInputs, default_groups, make_plan
from spdsim.schemes import SCHEMES
from spdsim.schemes.spd import first_device, speculative_module
from spdsim.serving import run_serving
from spdsim.serving_metrics import serving_metrics
from spdsim.trace import TraceEvent, TraceHeader

__all__ = ["PointResult", "plan_inputs", "plan_point", "point_rng", "run", "simulate_point"]


def run(plan: Plan, cfg: RunConfig, env: simpy.Environment | None = None, log_sends: bool = True) -> Sim:
    """Run one decode to the N-th commit; returns the Sim (its log, its env)."""
    sim = Sim(plan, cfg, env, log_sends)
    for s in range(1, sim.n):
        sim.env.process(sim.stage(s))
    if sim.head_box is not None:
        sim.env.process(speculative_module(sim))
    sim.env.process(first_device(sim))
    sim.env.run(until=sim.done)
    return sim


# --- scenario points ---------------------------------------------------------------------------------

@dataclass
class PointResult:
    point: Any                       # spdsim.scenario.Point
    plan: Plan
    metrics: RunMetrics
    header: TraceHeader
    events: list[TraceEvent] | None = None
    extra: dict = field(default_factory=dict)   # scheme-specific columns (per-cycle breakdown, ...)
    requests: list | None = None     # serving: one spdsim.serving_metrics.RequestRecord per request


def plan_inputs(scenario, n: int, tp: int = 1) -> PlanInputs:
    """What the partitioners see for n stages (of TP groups of tp: costs bound to the default groups)."""
    alphas = [a.alpha for a in scenario.sweep.acceptance_for(n) if a.alpha is not None] if n > 1 else []
    w = scenario.workload
    costs, groups = cost_model(scenario), ()
    dedicated = scenario.head.placement == "dedicated"
    drafts = "spd" in scenario.sweep.schemes
    if tp > 1:
        groups = default_groups(scenario.hardware.graph, n, tp)[0]
        costs = costs.with_tp(tp, groups)
    return PlanInputs(
        model=scenario.model, costs=costs, topology=scenario.hardware.graph,
        gpu=scenario.hardware.gpu, n=n, drafts=drafts,
        dedicated_head=dedicated, head_layers=scenario.head.layers,
        features=scenario.head.features, checkpoints_per_stage=scenario.head.checkpoints_per_stage,
        alpha=float(np.mean(alphas)) if alphas else 0.8,
        ctx=w.prompt_tokens + w.new_tokens // 2, max_ctx=w.prompt_tokens + w.new_tokens, tp=tp, groups=groups)


def plan_point(scenario, point) -> Plan:
    return make_plan(point.partition, plan_inputs(scenario, point.stages, point.tp))


def simulate_point(scenario, point, keep_events: bool = False, plan: Plan | None = None,
                   env: simpy.Environment | None = None, costs: CostModel | None = None) -> PointResult:
    """Simulate one sweep point of a scenario: (scheme, stages, partition, acceptance). `costs` replaces
    the scenario's cost model for the run (calibrate tries candidate models on the traced runs)."""
    scheme = SCHEMES[point.scheme]
    plan = plan or plan_point(scenario, point)
    n = plan.stages
    m = scenario.model
    drafts = scheme.drafts and n > 1
    # a run of N tokens verifies N - 1 drafts: exactly round(α(N-1)) of them accept (acceptance.sampler)
    accept = (sampler(point.acceptance, point_rng(scenario.seed, point), exact_over=scenario.workload.new_tokens - 1)
              if drafts and point.acceptance is not None else (lambda: True))
    # a calibration differs per scheme; TP binds the costs to the plan's groups
    costs = (costs or cost_model(scenario)).for_point(point.scheme, n, plan.tp, plan.groups or None)
    cfg = RunConfig(costs=costs, topology=scenario.hardware.graph,
                    prompt_tokens=scenario.workload.prompt_tokens, new_tokens=scenario.workload.new_tokens,
                    window=scheme.window(n), drafts=drafts, features=scenario.head.features,
                    activation_bytes=m.activation_bytes,
                    feature_bytes=m.activation_bytes * scenario.head.checkpoints_per_stage,
                    accept=accept, rng=jitter_rng(scenario.seed), logits_bytes=m.logits_bytes)
    extra: dict = {}
    requests = None
    if scenario.workload.serving:        # several requests share the pipeline (spdsim.serving)
        if not drafts:
            plan = replace(plan, head_device=None)
        out = run_serving(scenario, point, plan, cfg, env, keep_events)
        events, metrics, requests = out.events, out.metrics, out.records
        extra = {**out.extra, **serving_metrics(requests, scenario.serving.slo).columns()}
    elif scheme.simulate is not None:      # schemes with their own process (spd_dedicated, sd, chain)
        events, plan, extra = scheme.simulate(scenario, point, plan, cfg, env, keep_events)
    else:
        if not drafts:
            plan = replace(plan, head_device=None)
        sim = run(plan, cfg, env, log_sends=keep_events)
        events = sim.trace_events(sends=keep_events)
    if requests is None:
        metrics = run_metrics(events, point.scheme, n, scenario.workload.new_tokens, list(plan.placement))
    header = TraceHeader(
        scheme=point.scheme, stages=n, new_tokens=scenario.workload.new_tokens, source="simulator",
        partition=[list(r) for r in plan.layers], placement=list(plan.placement),
        prompt_tokens=scenario.workload.prompt_tokens, model=m.name, device_kind=scenario.hardware.gpu.name,
        tp=plan.tp,
        extra={"scenario": scenario.name, "point_id": point.point_id, "partition_kind": plan.partition,
               "acceptance": None if point.acceptance is None else point.acceptance.value,
               "head_device": plan.head_device, "seed": scenario.seed,
               **({"groups": [list(g) for g in plan.groups]} if plan.groups else {}),
               **({"policy": point.policy, "load": point.load} if requests is not None else {})})
    return PointResult(point, plan, metrics, header, events if keep_events else None, extra, requests)
