"""Replaying traced runs in the simulator: each measured decode predicted with its own scheme, lengths
and accept/reject verdicts (`replay_point`). `executor validate`, calibrate's in-sample check and its
spread fit (`fit_jitter_scale`) all predict through here."""
from __future__ import annotations

import json
import statistics
from dataclasses import replace as dc_replace
from pathlib import Path

import yaml

from spdsim.acceptance import replay
from spdsim.calibration_file import CalibratedCosts, load_calibration, regime_of
from spdsim.engine import simulate_point
from spdsim.errors import UserError
from spdsim.jitter import Jitter
from spdsim.metrics import run_metrics
from spdsim.scenario import Point, Workload, parse_scenario
from spdsim.trace import Trace, read_trace
from spdsim.verdict import throughput


def draft_kind(trace: Trace) -> str:
    """'oracle', 'head', ... from a run's header ('' for schemes that do not draft)."""
    return str(trace.header.extra.get("draft") or "").split(":")[0]


def load_runs(trace_dir: Path, sub: str = "runs") -> list[Trace]:
    """The traced runs under trace_dir/sub (runs/: TP = 1; runs_tp/: `executor profile --tp T`)."""
    runs_dir = trace_dir / sub
    if not runs_dir.is_dir():
        return []
    out = []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        try:
            out.append(read_trace(d))
        except ValueError as e:
            raise UserError(f"{d}: {e}") from None
    return out


def _replay_scenario(model: dict, stages: int, tp: int = 1):
    """A scenario to replay traced runs of the profiled model on: one device per rank (the costs come
    from the calibration given to `_replay`, not from this scenario's made-up hardware)."""
    return parse_scenario(yaml.safe_dump({
        "name": "in-sample", "hardware": {"gpu": {"name": "host", "mem_gb": 1000, "hbm_gbps": 100, "bf16_tflops": 1},
                                          "count": stages * tp, "topology": {"kind": "full"}},
        "model": {"name": "profiled", "layers": model["layers"], "hidden": model["dim"], "ffn": model["ffn"],
                  "heads": model["heads"], "kv_heads": model["kv_heads"], "vocab": model["vocab"],
                  "dtype_bytes": model.get("dtype_bytes", 4)},
        # spd in the sweep: the plan places the drafter only for sweeps that draft (engine.plan_inputs)
        "sweep": {"stages": [1], "tp": [tp], "schemes": ["ar", "pp", "spd"]}}))


def replay_point(scenario, scheme: str, stages: int, prompt_tokens: int, new_tokens: int, accepts: list[int],
                 features: bool, seed: int = 0, costs: CalibratedCosts | None = None, keep_events: bool = False,
                 tp: int = 1):
    """One simulated decode replaying a measured one (an engine.PointResult): the same scheme, stages,
    lengths and accept/reject verdicts, the module co-located with stage 1 as the executor runs it, and
    jitter draws `seed`. `costs` replaces the scenario's cost model (the calibration being fitted);
    `executor validate`, calibrate's in-sample check and its spread fit all predict through here."""
    acc = replay(sequence=accepts or [1]) if scheme == "spd" and stages > 1 else None
    sc = dc_replace(scenario, seed=seed, workload=Workload(prompt_tokens, new_tokens),
                    head=dc_replace(scenario.head, features=features, placement="colocated"))
    if costs is not None:       # the calibration being fitted, with this scenario's shape (TP message sizes)
        costs = dc_replace(costs.with_head("head" if features else "oracle"), model=scenario.model)
    return simulate_point(sc, Point(scheme, stages, "uniform", acc, tp=tp), keep_events=keep_events, costs=costs)


def _replay(base, tr: Trace, costs: CalibratedCosts, seed: int = 0, keep_events: bool = False):
    """`replay_point` for a traced run."""
    h = tr.header
    return replay_point(base, h.scheme, h.stages, h.prompt_tokens, h.new_tokens, list(h.extra.get("accepts") or []),
                        draft_kind(tr) not in ("", "oracle"), seed=seed, costs=costs, keep_events=keep_events,
                        tp=h.tp)


def replay_seeds(runs: list[Trace]) -> list[int]:
    """The jitter seed each traced run is replayed with: its index among the runs of the same scheme,
    stages and drafter (validate draws repeat i of every case with seed i), shared by the spread fit
    and the in-sample check so that both see the same draws."""
    seen: dict[tuple, int] = {}
    out = []
    for t in runs:
        key = (t.header.scheme, t.header.stages, draft_kind(t))
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out


def fit_jitter_scale(base, runs: list[Trace], costs: CalibratedCosts, regime: str) -> float | None:
    """The factor on the measured forward spread at which the simulated runs of `regime` idle as much as
    the traced ones did (mean bubble ratio; seeds from `replay_seeds`). Why: the simulator draws each
    rank's forwards independently of what the other rank is doing, but on shared cores a rank left alone
    speeds up, so the traced spread overstates the wait for the slower rank (replaying one validation's
    oracle calibration runs: at the full spread 2.3% slow and 1.7 pp too idle, with none 2.7% fast and
    2.6 pp too busy).
    Bisection on [0, 2]; None without runs of the regime or a spread to scale."""
    mine = [(t, seed) for t, seed in zip(runs, replay_seeds(runs))
            if t.header.scheme == "spd"                                # the engine's SPD: what the draws reach
            and regime_of(t.header.scheme, t.header.stages, draft_kind(t)) == regime]
    j = costs.jitter_by.get(regime)
    if not mine or j is None or j.sd == 0:
        return None
    measured = statistics.fmean(run_metrics(t.events, t.header.scheme, t.header.stages, t.header.new_tokens,
                                            t.header.placement).bubble_ratio for t, _ in mine)

    def bubble(k: float) -> float:
        c = dc_replace(costs, jitter_by={**costs.jitter_by, regime: Jitter(j.sd * k, j.lag1, j.cross)})
        return statistics.fmean(_replay(base, t, c, seed=seed).metrics.bubble_ratio for t, seed in mine)

    lo, hi = 0.0, 2.0
    if bubble(lo) >= measured:
        return lo
    if bubble(hi) <= measured:
        return hi
    for _ in range(10):           # to 0.002 of the spread: well below run-to-run noise
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bubble(mid) < measured else (lo, mid)
    return (lo + hi) / 2


def replayed_runs(trace_dir: Path, costs: CalibratedCosts):
    """Every calibration run under trace_dir (runs/ and runs_tp/) with its own replay: yields
    (run directory name, trace, measured metrics, predicted metrics), seeds from `replay_seeds`."""
    prof = json.loads((trace_dir / "profile.json").read_text())
    if not prof.get("model"):
        return
    for sub in ("runs", "runs_tp"):
        runs = load_runs(trace_dir, sub)
        if not runs:
            continue
        names = sorted(p.name for p in (trace_dir / sub).iterdir() if p.is_dir())   # load_runs' order
        stages = max(t.header.stages for t in runs)
        bases = {tp: _replay_scenario(prof["model"], stages, tp) for tp in {t.header.tp for t in runs}}
        for name, tr, seed in zip(names, runs, replay_seeds(runs)):
            h = tr.header
            meas = run_metrics(tr.events, h.scheme, h.stages, h.new_tokens, h.placement)
            yield name, tr, meas, _replay(bases[h.tp], tr, costs, seed=seed).metrics


def host_speed(trace_dir: Path, costs: CalibratedCosts) -> dict[str, float]:
    """How fast the host ran while each calibration run decoded, by run name: its measured ÷ predicted
    tokens/s over the same ratio of all runs of its kind (scheme, stages, TP, drafter) combined as
    throughput. Relative to its kind, so that a kind the model predicts a few percent off does not pass
    that off as host speed; around 1 on average, so the level stays the calibration's. `executor
    validate` predicts each measured decode at the speed of the calibration decodes run next to it."""
    ratios: dict[str, tuple[tuple, float]] = {}
    for name, tr, meas, pred in replayed_runs(trace_dir, costs):
        h = tr.header
        ratios[name] = ((h.scheme, h.stages, h.tp, draft_kind(tr)), meas.tokens_per_s / pred.tokens_per_s)
    by_kind: dict[tuple, list[float]] = {}
    for kind, r in ratios.values():
        by_kind.setdefault(kind, []).append(r)
    typical = {kind: throughput(rs) for kind, rs in by_kind.items()}
    return {name: r / typical[kind] for name, (kind, r) in ratios.items()}


def in_sample(trace_dir: Path, calib: Path) -> list[str]:
    """Predict every calibration run itself (its own verdicts replayed): how much of the error is the
    model's structure rather than drift between calibration and validation. Not a validation."""
    prof = json.loads((trace_dir / "profile.json").read_text())
    out = []
    for _, tr, meas, pred in replayed_runs(trace_dir, load_calibration(calib)):
        h = tr.header
        tp = f"-tp{h.tp}" if h.tp > 1 else ""
        cores = prof.get("cpu_count") if prof.get("device", "cpu") == "cpu" else None
        over = " (oversubscribed: more ranks than cores, not modelled)" if cores and h.tp * h.stages > cores else ""
        out.append(f"in-sample {h.scheme}-n{h.stages}{tp} {h.extra.get('draft') or ''}{over}: tokens/s predicted "
                   f"{pred.tokens_per_s:.2f} vs traced {meas.tokens_per_s:.2f} "
                   f"({100 * (pred.tokens_per_s / meas.tokens_per_s - 1):+.1f}%), "
                   f"bubble {pred.bubble_ratio:.3f} vs {meas.bubble_ratio:.3f}")
    return out
