"""chain: EAGLE-style chain drafting on one device.

A light head (its own `head_layers` decoder layers + a vocab projection, drafting from the target's
last hidden state) drafts γ tokens in a chain, and the target verifies them in one pass: the step of
`spdsim.schemes.sd`, with two differences — the draft cost is the head's (not c × the target's), and
acceptance depends on the draft's position in the chain.

`baselines.chain.acceptance` is the per-position table as such heads are usually reported: entry k is
the fraction of steps in which the k-th draft is accepted (so it can only be accepted when drafts
1..k-1 were), e.g. 0.70, 0.37, 0.21, 0.13, 0.08 (REFERENCE.md, an EAGLE head by position). Expected
tokens per step = 1 + Σ_k table[k]. The simulator draws draft k's verdict with the conditional
probability table[k] / table[k-1], so the measured `acceptance_by_depth` column reproduces the table.
"""
from __future__ import annotations

from dataclasses import replace

from spdsim.kernel import NS, RunConfig, point_rng
from spdsim.partition import Plan
from spdsim.schemes.base import Scheme
from spdsim.schemes.sd import _one, draft_verify


def conditional(table: list[float]) -> list[float]:
    """P(draft k accepted | drafts 1..k-1 accepted) from the per-position table (non-increasing)."""
    out, prev = [], 1.0
    for m in table:
        out.append(m / prev if prev > 0 else 0.0)
        prev = m
    return out


def simulate(scenario, point, plan: Plan, cfg: RunConfig, env, keep_events: bool):
    spec = scenario.baselines.chain
    plan = replace(plan, head_device=plan.placement[0])
    costs = cfg.costs
    cond = conditional(list(spec.acceptance))
    rng = point_rng(scenario.seed, point)

    def draft_ns(q: int) -> float:
        if spec.draft_ms is not None:
            return spec.draft_ms * 1e-3 * NS
        return (spec.head_layers * costs.layer_s(-1, q + 1) + costs.lm_head_s()) * NS

    events, extra = draft_verify(plan, cfg, len(cond), draft_ns, lambda k: rng.random() < cond[k - 1],
                                 keep_events)
    return events, plan, extra


CHAIN = Scheme("chain", window=_one, drafts=True, single_device=True, simulate=simulate)
