"""`executor validate SCENARIO [--tolerance 0.05] [--out DIR]`: measure, predict, compare (issue 6).

For every point of the scenario this hardware can run (AR / PP / SPD, the uniform partition the executor
uses, stage counts up to the number of cores or GPUs, oracle acceptance α or a trained head):
  1. calibration: the one given (--calibration, or the scenario's `calibration:`), else microbenchmarks
     (`executor profile`) into OUT/profile/ plus AR / PP / SPD runs on the *calibration prompt*,
     interleaved with the measured runs (same processes, same load), fitted by `spdsim calibrate` into
     OUT/calibration.yaml;
  2. measure: `repeats` decodes of the point on the *validation prompt* (another prompt, other runs: the
     calibration never saw these measurements), each reduced by spdsim.metrics inside the executor;
  3. predict: the simulator with the calibrated cost model, the measured prompt length and token count,
     replaying each measured decode's accept/reject sequence (so timing error is not mixed with
     acceptance error), at the host speed of the calibration decodes run next to it, the same
     spdsim.metrics over its event log;
  4. compare over repeats: tokens_per_s as throughput and speedup_vs_pp as a ratio of throughputs
     (relative error), bubble_ratio as a mean (absolute), each with a bootstrap confidence interval of
     its error (spdsim.verdict): pass when the whole interval is within the tolerance, fail when it is
     wholly outside, undetermined otherwise.
Steps 2-4 repeat in rounds of `--repeats` decodes per point (all points of a round in the same processes;
the calibration refitted on every calibration run so far) until no point is undetermined or
`--max-minutes` is spent. Writes OUT/validation.csv (with the intervals, the verdicts and each figure's
measured spread), OUT/parity.png (error bars: the measured figure's interval), OUT/measured.json; prints a
table. Exit 0: every point passes; 1: some point fails (the worst are named); 3: none fails but some are
undetermined (how many more minutes would likely decide them is printed).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from spdsim.errors import UserError
from spdsim.textable import align
from spdsim.verdict import FAIL, PASS, UNDETERMINED, Interval, overall, paired_error, repeats_to_decide, \
    statistic_interval, throughput, verdict

# Measured on this prompt; `executor profile` calibrates on executor.profile.CALIBRATION_PROMPT.
VALIDATION_PROMPT = "def parse(line):\n    key, _, value = line.partition('=')\n    return "
METRICS = ("tokens_per_s", "speedup_vs_pp", "bubble_ratio")
# serving points (a scenario with workload.arrivals): throughput over all requests, TPOT p50 / p90, bubble
SERVING_METRICS = ("tokens_per_s", "tpot_p50_ms", "tpot_p90_ms", "bubble_ratio")
ALL_METRICS = tuple(dict.fromkeys(METRICS + SERVING_METRICS))
COLUMNS = ["scheme", "stages", "tp", "partition", "acceptance", "metric", "predicted", "measured", "error_pct",
           "measured_spread",   # half the range over repeats, in error_pct's unit: the measurement's own noise
           "ci_low", "ci_high",  # 95% bootstrap interval of the measured figure (the metric's unit)
           "error_ci_low", "error_ci_high",   # ... of the error, in error_pct's unit (spdsim.verdict)
           "repeats", "rounds", "verdict",  # pass | fail | undetermined
           "policy", "concurrency", "rate_per_s"]   # serving points ('' otherwise)
DEFAULT_CONCURRENCY = (2, 3)
# The oracle α of the SPD calibration runs validate interleaves.
CALIB_ALPHA = 0.6
# Below 8 repeats even the sign test's 95% interval of a median is the whole range of the repeats (and a
# percentile bootstrap's is too): such a point stays undetermined.
MIN_REPEATS = 8
# Repeats of one round share the host's state (spdsim.verdict): intervals resample whole rounds, and a
# point is decided on 3 rounds at least (with 1 the interval would be one round's, with 2 the range of two).
MIN_ROUNDS = 3


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurable configuration: a scenario point as the executor runs it (`runnable_cases` makes spd
    cases for n > 1 only, and measures any one-rank point as ar). A serving point (the scenario has
    workload.arrivals) also has its policy, the concurrency C it runs at and its Poisson rate."""
    scheme: str
    stages: int
    draft: str | None          # oracle:ALPHA | head:PATH | None
    acceptance: str            # the validation.csv `acceptance` column ('' for AR / PP)
    tp: int = 1                # ranks per stage (tensor parallel)
    policy: str | None = None  # serving only
    concurrency: int = 0
    rate: float | None = None  # requests per second

    @property
    def serving(self) -> bool:
        return self.policy is not None

    @property
    def label(self) -> str:
        return (f"{self.scheme} n={self.stages}" + (f" tp={self.tp}" if self.tp > 1 else "")
                + (f" α={self.acceptance}" if self.acceptance else "")
                + (f" {self.policy} C={self.concurrency} λ={self.rate:g}/s" if self.serving else ""))

    @property
    def metrics(self) -> tuple[str, ...]:
        return SERVING_METRICS if self.serving else METRICS


def runnable_cases(scenario, max_stages: int, head: str | None,
                   concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY) -> tuple[list[Case], list[str]]:
    """The scenario's points this machine runs, and a note for each kind it skips."""
    if scenario.workload.serving:
        return serving_cases(scenario, max_stages, head, concurrency)
    cases: list[Case] = []
    notes: list[str] = []
    seen = set()
    for p in scenario.points():
        why = None
        if p.scheme not in ("ar", "pp", "spd"):
            why = f"scheme {p.scheme}: the executor runs ar / pp / spd only"
        elif p.partition != "uniform":
            why = f"partition {p.partition}: the executor runs the uniform partition only"
        elif p.stages * p.tp > max_stages:
            why = (f"{p.stages} stages × tp {p.tp} > {max_stages} cores/devices here (oversubscribed: not validated)"
                   if p.tp > 1 else f"{p.stages} stages > {max_stages} cores/devices here (oversubscribed: not validated)")
        elif p.acceptance is not None and p.stages > 1 and p.acceptance.kind not in ("iid", "table"):
            why = f"acceptance {p.acceptance.kind}: only an oracle α can be run"
        if why:
            if why not in notes:
                notes.append(why)
            continue
        if p.scheme == "spd" and p.stages > 1:
            alpha = float(p.acceptance.alpha)
            case = Case("spd", p.stages, f"oracle:{alpha:g}", f"{alpha:g}", p.tp)
        elif p.stages == 1:         # AR, PP and SPD on one stage are the same decode: measured once, as AR
            case = Case("ar", 1, None, "", p.tp)
            if p.scheme != "ar":
                why = "pp / spd on 1 stage: the same one-rank decode as ar (measured once, as ar)"
                if why not in notes:
                    notes.append(why)
        else:
            case = Case(p.scheme, p.stages, None, "", p.tp)
        if case not in seen:
            seen.add(case)
            cases.append(case)
    if head:
        for n in sorted({c.stages for c in cases if c.scheme == "spd" and c.stages > 1 and c.tp == 1}):
            cases.append(Case("spd", n, f"head:{head}", "head"))
    return cases, notes


def serving_cases(scenario, max_stages: int, head: str | None,
                  concurrency: tuple[int, ...]) -> tuple[list[Case], list[str]]:
    """A serving scenario's points as executor serving runs: each (scheme, stages, α, policy, Poisson
    rate) at every concurrency C (fcfs once, at C = 1: it runs one request at a time whatever C is)."""
    cases: list[Case] = []
    notes: list[str] = []

    def note(why: str) -> None:
        if why not in notes:
            notes.append(why)
    if scenario.workload.arrivals.kind != "poisson":
        return [], [f"arrivals {scenario.workload.arrivals.kind}: the executor validates Poisson arrivals only"]
    for p in scenario.points():
        why = None
        if p.scheme not in ("ar", "pp", "spd"):
            why = f"scheme {p.scheme}: the executor serves with ar / pp / spd only"
        elif p.partition != "uniform":
            why = f"partition {p.partition}: the executor runs the uniform partition only"
        elif p.tp > 1:
            why = f"tp {p.tp}: serving points are validated on TP = 1 (the executor serves on TP groups untimed)"
        elif p.stages > max_stages:
            why = f"{p.stages} stages > {max_stages} cores/devices here (oversubscribed: not validated)"
        elif p.acceptance is not None and p.stages > 1 and p.acceptance.kind not in ("iid", "table"):
            why = f"acceptance {p.acceptance.kind}: only an oracle α can be run"
        elif p.policy == "adaptive" and not (head and p.scheme == "spd" and p.stages > 1):
            why = "policy adaptive: needs the trained module's confidence (--head PATH); the oracle has none"
        if why:
            note(why)
            continue
        if p.stages == 1:
            scheme, draft, acc = "ar", None, ""
        elif p.scheme == "spd":
            alpha = float(p.acceptance.alpha)
            scheme, draft, acc = "spd", f"oracle:{alpha:g}", f"{alpha:g}"
            if p.policy == "adaptive":
                draft, acc = f"head:{head}", "head"
        else:
            scheme, draft, acc = p.scheme, None, ""
        for c in ((1,) if p.policy == "fcfs" else concurrency):
            case = Case(scheme, p.stages, draft, acc, policy=p.policy, concurrency=c, rate=float(p.load))
            if case not in cases:
                cases.append(case)
    if any(p.policy == "fcfs" for p in scenario.points()):
        note("policy fcfs: one request at a time whatever C is (measured once, at C = 1)")
    return cases, notes


def serving_job(case: Case, prompts: list[list[int]], new_tokens: int, seed: int, threshold: float = 0.5) -> dict:
    """One measured serving run of `case`: its requests' Poisson arrivals drawn from `seed` (each repeat
    its own, the simulator replays each)."""
    from executor.runner import parse_arrivals
    times = parse_arrivals(f"poisson:{case.rate:g}", len(prompts), seed)
    return {"scheme": case.scheme, "prompt": prompts[0], "new_tokens": new_tokens, "draft": case.draft,
            "seed": seed, "serving": {"policy": case.policy, "concurrency": case.concurrency, "threshold": threshold,
                                      "arrivals": f"poisson:{case.rate:g}",
                                      "requests": [{"prompt": p, "new_tokens": new_tokens, "arrival_s": t}
                                                   for p, t in zip(prompts, times)]}}


# --- measuring -----------------------------------------------------------------------------------------

def measure(cases: list[Case], model: str, prompt: list[int], new_tokens: int, repeats: int, device: str,
            threads: int, calib_out: Path | None = None, calib_prompt: list[int] | None = None,
            calib_alpha: float = CALIB_ALPHA, head: str | None = None, log=print, first: int = 0,
            warmup: int = 1, pin: bool = False, serving_prompts: list[list[int]] | None = None,
            threshold: float = 0.5) -> dict[Case, list[dict]]:
    """`repeats` decodes per case (repeats first .. first + repeats - 1 of the validation: their seeds and
    calibration run names), one launch (one set of processes) per stage count, after `warmup` untimed
    decodes of the first case in the same processes (the first decode of a launch pays for cold caches
    and lazy initialisation; no user cares about it, and it widened every interval).

    With `calib_out`, calibration runs (AR / PP / SPD at `calib_alpha`, on `calib_prompt`) are interleaved
    with the measured ones in the same processes, their traces written to calib_out/runs/<run>-r<i>/:
    calibration and measurement then see the same machine load, yet never the same runs or prompt.
    A serving case's decode is a serving run of `serving_prompts` (held-out files) with its own arrivals."""
    import shutil
    import tempfile
    from executor.runner import RunSpec, launch
    out: dict[Case, list[dict]] = {}
    for n, tp in sorted({(c.stages, c.tp) for c in cases}):
        group = [c for c in cases if (c.stages, c.tp) == (n, tp)]
        calib = calibration_jobs(n, tp, calib_alpha, head) if calib_out is not None else []
        # Round-robin over the cases (case 1, case 2, …, case 1, case 2, …): a slow spell of a shared
        # machine then hits every case alike instead of one case's repeats.
        jobs, kinds = [], []

        def case_job(c: Case, seed: int) -> dict:
            if c.serving:
                return serving_job(c, serving_prompts, new_tokens, seed, threshold)
            return {"scheme": c.scheme, "prompt": prompt, "new_tokens": new_tokens, "draft": c.draft, "seed": seed}
        for _ in range(warmup):
            jobs.append(case_job(group[0], 999))
            kinds.append(("warmup", None))
        for i in range(first, first + repeats):
            calib_jobs = [(("calib", f"{name}-r{i}"), {"scheme": scheme, "prompt": calib_prompt,
                                                       "new_tokens": new_tokens, "draft": draft, "seed": 100 + i})
                          for name, scheme, draft in calib]
            for kind, job in interleave(calib_jobs, [(("case", c), case_job(c, 1000 + i)) for c in group]):
                kinds.append(kind)
                jobs.append(job)
        tmp = Path(tempfile.mkdtemp(prefix="spd-validate.")) if calib else None
        t0 = time.time()
        try:
            res = launch(RunSpec(model=model, stages=n, tp=tp, jobs=jobs, device=device, threads=threads, pin=pin,
                                 model_label=Path(model).name, trace_dir=str(tmp) if tmp else None,
                                 trace_each=bool(tmp)))
            for j, (kind, what) in enumerate(kinds):
                if kind == "calib":
                    dst = calib_out / ("runs_tp" if tp > 1 else "runs") / what   # as `executor profile --tp` lays them
                    shutil.rmtree(dst, ignore_errors=True)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(tmp / f"job{j}"), dst)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"validate: measured {len(group) * repeats} decodes on {n * tp} rank(s)"
            + (f", {len(calib) * repeats} calibration decodes interleaved" if calib else "")
            + f" ({time.time() - t0:.0f} s)")
        results = [(what, {**r, "calibration_neighbours": neighbours(kinds, j)})
                   for j, ((kind, what), r) in enumerate(zip(kinds, res)) if kind == "case"]
        for c in group:
            out[c] = [r for what, r in results if what == c]
    return out


def calibration_jobs(n: int, tp: int, alpha: float, head: str | None) -> list[tuple[str, str, str | None]]:
    """(run name, scheme, draft) of the calibration decodes one repeat of an (n, tp) launch interleaves,
    in job order; run i of each is traced to `<run name>-r<i>`."""
    t = f"-tp{tp}" if tp > 1 else ""
    if n == 1:
        return [(f"ar-n1{t}", "ar", None)]
    out = [(f"pp-n{n}{t}", "pp", None), (f"spd-n{n}{t}-a{alpha:g}", "spd", f"oracle:{alpha:g}")]
    if head and tp == 1:
        out.append((f"spd-n{n}-head", "spd", f"head:{head}"))
    return out


def interleave(calib: list, cases: list) -> list:
    """One repeat's jobs: the calibration decodes spread among the cases (cal, case, case, cal, case, …),
    so that every measured decode has a calibration decode next to it, a second or so away."""
    if not calib:
        return list(cases)
    out, k = [], len(calib)
    bounds = [round(j * len(cases) / k) for j in range(k + 1)]
    for j, cal in enumerate(calib):
        out += [cal, *cases[bounds[j]:bounds[j + 1]]]
    return out


def neighbours(kinds: list[tuple[str, object]], j: int) -> list[str]:
    """The calibration runs on either side of job j in one launch: the nearest before and the nearest
    after (one at the ends of the launch, none without calibration runs)."""
    before = next((what for kind, what in reversed(kinds[:j]) if kind == "calib"), None)
    after = next((what for kind, what in kinds[j + 1:] if kind == "calib"), None)
    return [w for w in (before, after) if w is not None]


# --- predicting ----------------------------------------------------------------------------------------

def predict_serving(scenario, case: Case, calibration: Path, run: dict, seed: int = 0,
                    threshold: float = 0.5) -> dict:
    """One simulated serving run of `case` with the calibrated costs, replaying the measured run's
    arrivals, lengths and each request's verdicts (spdsim.replay_serving)."""
    from spdsim.replay_serving import MeasuredRequest, replay_serving
    features = bool(case.draft and case.draft.startswith("head:"))
    sc = dataclasses.replace(scenario, calibration=str(calibration), path=None)
    reqs = [MeasuredRequest(q["arrival_s"], q["prompt_tokens"], q["new_tokens"], tuple(q["accepts"]),
                            tuple(q["confidences"])) for q in run["requests"]]
    out = replay_serving(sc, case.scheme, case.stages, case.policy, case.concurrency, reqs, features, threshold,
                         seed=seed)
    m = out.metrics
    return {"tokens_per_s": m.tokens_per_s, "bubble_ratio": m.bubble_ratio, "acceptance_rate": m.acceptance_rate,
            "accepted": m.accepted, "rejected": m.rejected, "tpot_p50_ms": out.extra["tpot_p50_ms"],
            "tpot_p90_ms": out.extra["tpot_p90_ms"], "ttft_p50_ms": out.extra["ttft_p50_ms"]}


def predict(scenario, case: Case, calibration: Path, prompt_tokens: int, new_tokens: int,
            accepts: list[int], seed: int = 0) -> dict:
    """One simulated decode of `case` with the calibrated costs, replaying `accepts`; `seed` picks the
    forward-to-forward jitter draws (validate passes the repeat's index: round i of every case shares
    them, as the measured round shares the machine's state)."""
    from spdsim.replay import replay_point
    features = bool(case.draft and case.draft.startswith("head:"))
    sc = dataclasses.replace(scenario, calibration=str(calibration), path=None)
    r = replay_point(sc, case.scheme, case.stages, prompt_tokens, new_tokens, accepts, features, seed=seed, tp=case.tp)
    m = r.metrics
    return {"tokens_per_s": m.tokens_per_s, "bubble_ratio": m.bubble_ratio, "acceptance_rate": m.acceptance_rate,
            "accepted": m.accepted, "rejected": m.rejected}


# --- comparing -----------------------------------------------------------------------------------------

def statistic(metric: str):
    """How repeats are combined for `metric`: tokens/s as throughput (total tokens over total decode time:
    what the calibration's mean costs predict, and steady where the median of a host jumping between two
    speeds is not), the bubble as a mean (what calibrate's spread fit matches), latency percentiles as
    medians."""
    return {"tokens_per_s": throughput, "bubble_ratio": np.mean}.get(metric, np.median)


def at_host_speed(pred: dict, speed: float) -> dict:
    """A non-serving prediction at `speed` × the calibration's host speed: every simulated duration
    divided by it, so tokens/s scales by it and ratios of durations (the bubble) stay."""
    return {**pred, "tokens_per_s": pred["tokens_per_s"] * speed}


def neighbour_speed(run: dict, speeds: dict[str, float]) -> float:
    """The host speed while a measured decode ran: `host_speed` of the calibration decodes on either side
    of it, combined as throughput (1 when validating against a given calibration: no such runs)."""
    near = [speeds[n] for n in run.get("calibration_neighbours", ()) if n in speeds]
    return throughput(near) if near else 1.0


def tolerance_pct(metric: str, tolerance: float, bubble_tolerance: float) -> float:
    """In error_pct's unit: percent for tokens/s and speedup, percentage points for the bubble."""
    return 100.0 * (bubble_tolerance if metric == "bubble_ratio" else tolerance)


def round_groups(runs: list[dict]) -> list[np.ndarray]:
    """The indices of `runs` measured in each round (their `round` tag), in round order; a run without
    one (an older measured.json, a test) is a round of its own."""
    by: dict[object, list[int]] = {}
    for i, r in enumerate(runs):
        by.setdefault(r.get("round", ("repeat", i)), []).append(i)
    return [np.array(ix) for ix in by.values()]


def compare(cases: list[Case], measured: dict[Case, list[dict]], predicted: dict[Case, list[dict]],
            tolerance: float = 0.05, bubble_tolerance: float = 0.03) -> list[dict]:
    """validation.csv rows: each metric's `statistic` over repeats (speedup_vs_pp: the case's throughput
    over PP's of the same stage count, in the same rounds), with the bootstrap interval of the measured
    figure (ci_low, ci_high), of the error (error_ci_low, error_ci_high; repeats resampled in pairs, a
    round's case and PP decodes together, and whole rounds at a time: spdsim.verdict) and the verdict that
    interval gives against the tolerance (undetermined before MIN_REPEATS repeats in MIN_ROUNDS rounds)."""
    pp_case = {(c.stages, c.tp): c for c in cases if c.scheme == "pp" and not c.serving}
    rows = []
    for k, c in enumerate(cases):
        for metric in c.metrics:
            if metric == "speedup_vs_pp":
                if (c.stages, c.tp) not in pp_case:
                    continue
                base = pp_case[(c.stages, c.tp)]      # the same rounds: measure() runs both in one launch
                m, mb, p, pb = (np.array([r["tokens_per_s"] for r in rs], float)
                                for rs in (measured[c], measured[base], predicted[c], predicted[base]))
                meas_stat = lambda idx, m=m, mb=mb: throughput(m[idx]) / throughput(mb[idx])   # noqa: E731
                pred_stat = lambda idx, p=p, pb=pb: throughput(p[idx]) / throughput(pb[idx])   # noqa: E731
                meas_xs = list(m / mb)
                runs = measured[c]
            else:
                kept = [(r, q) for r, q in zip(measured[c], predicted[c])
                        if r.get(metric) is not None and q.get(metric) is not None]
                if not kept:
                    continue
                runs = [r for r, _ in kept]
                m, p = (np.array(xs, float) for xs in zip(*((r[metric], q[metric]) for r, q in kept)))
                stat = statistic(metric)
                meas_stat = lambda idx, m=m, stat=stat: float(stat(m[idx]))   # noqa: E731
                pred_stat = lambda idx, p=p, stat=stat: float(stat(p[idx]))   # noqa: E731
                meas_xs = list(m)
            n = len(meas_xs)
            relative = metric != "bubble_ratio"
            seed = 7919 * k + ALL_METRICS.index(metric)    # reproducible intervals
            groups = round_groups(runs)
            med = statistic_interval(meas_stat, n, seed=seed, groups=groups)
            err = paired_error(meas_stat, pred_stat, n, relative, seed=seed, groups=groups)
            scale = 100.0 / med.estimate if relative else 100.0
            spread = (max(meas_xs) - min(meas_xs)) / 2 * scale if n > 1 else 0.0
            tol = tolerance_pct(metric, tolerance, bubble_tolerance)
            rows.append({"scheme": c.scheme, "stages": c.stages, "tp": c.tp, "partition": "uniform", "acceptance": c.acceptance,
                         "metric": metric, "predicted": pred_stat(np.arange(n)), "measured": med.estimate,
                         "error_pct": err.estimate, "measured_spread": spread,
                         "ci_low": med.low, "ci_high": med.high,
                         "error_ci_low": err.low, "error_ci_high": err.high, "repeats": n, "rounds": len(groups),
                         "verdict": (verdict(err, tol) if n >= MIN_REPEATS and len(groups) >= MIN_ROUNDS
                                     else UNDETERMINED),
                         "policy": c.policy or "", "concurrency": c.concurrency if c.serving else "",
                         "rate_per_s": c.rate if c.serving else ""})
    return rows


def failures(rows: list[dict], tolerance: float, bubble_tolerance: float) -> list[dict]:
    """Rows whose verdict is fail, worst first (by how far the error's interval lies past the tolerance)."""
    bad = []
    for r in rows:
        if r["verdict"] == FAIL:
            tol = tolerance_pct(r["metric"], tolerance, bubble_tolerance)
            bad.append((abs(r["error_pct"]) / tol, r))
    return [r for _, r in sorted(bad, key=lambda t: -t[0])]


def more_repeats(rows: list[dict], tolerance: float, bubble_tolerance: float) -> dict[tuple[int, int], int] | None:
    """More repeats each launch would likely need to decide its undetermined rows (None: some sit on the
    tolerance, and more repeats may never decide them)."""
    need: dict[tuple[int, int], int] = {}
    for r in rows:
        if r["verdict"] != UNDETERMINED:
            continue
        rounds = int(r.get("rounds", r["repeats"]))
        if r["repeats"] < MIN_REPEATS or rounds < MIN_ROUNDS:     # as many again per missing round
            k = max(MIN_REPEATS, math.ceil(r["repeats"] * MIN_ROUNDS / max(rounds, 1)))
        else:
            k = repeats_to_decide(Interval(r["error_pct"], r["error_ci_low"], r["error_ci_high"]),
                                  tolerance_pct(r["metric"], tolerance, bubble_tolerance), r["repeats"])
            if k is None:
                return None
        launch = (int(r["stages"]), int(r["tp"]))
        need[launch] = max(need.get(launch, 0), k - r["repeats"])
    return need


def fit_in(shares: dict[tuple[int, int], int], per_repeat_s: dict[tuple[int, int], float], seconds: float,
           fewest: int = 2) -> dict[tuple[int, int], int]:
    """`shares` cut down in proportion to fit in `seconds` of measuring; {} when not even `fewest`
    repeats of every launch would (a round that small is not worth its refit)."""
    need = sum(n * per_repeat_s.get(k, 0.0) for k, n in shares.items())
    if need <= seconds:
        return shares
    cut = {k: int(n * seconds / need) for k, n in shares.items()}
    return cut if min(cut.values(), default=0) >= fewest else {}


def open_launches(rows: list[dict]) -> dict[tuple[int, int], int]:
    """The (stages, tp) launches with undetermined rows, and how many: only these get another round (a
    launch runs its points together, so a PP base and its SPD ratios stay in the same rounds)."""
    out: dict[tuple[int, int], int] = {}
    for r in rows:
        if r["verdict"] == UNDETERMINED:
            k = (int(r["stages"]), int(r["tp"]))
            out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def round_repeats(open_rows: dict[tuple[int, int], int], repeats: int, per_repeat_s: dict[tuple[int, int], float],
                  most: int = 8) -> dict[tuple[int, int], int]:
    """Repeats each open launch gets this round, for about the same measuring time per undetermined row:
    the round is as long as `repeats` of the slowest launch measured so far, split over the open rows,
    and a launch gets at least `repeats` and at most `most` × repeats. So a cheap one-rank point left
    open after the two-rank points are decided gets the time they no longer need. Without timings yet
    (the first round), `repeats` each."""
    if not per_repeat_s:
        return {k: repeats for k in open_rows}
    per_row_s = repeats * max(per_repeat_s.values()) / max(open_rows.values())
    return {k: repeats if per_repeat_s.get(k, 0) <= 0 else
            min(most * repeats, max(repeats, int(per_row_s * n / per_repeat_s[k]))) for k, n in open_rows.items()}


def repeats_label(measured: dict[Case, list[dict]]) -> str:
    """'56', or '24-56' once decided launches have stopped getting rounds."""
    ks = sorted({len(v) for v in measured.values()})
    return str(ks[0]) if len(ks) == 1 else f"{ks[0]}-{ks[-1]}"


EXIT_STATUS = {PASS: 0, FAIL: 1, UNDETERMINED: 3}


def exit_status(rows: list[dict]) -> int:
    """0 when every row passes, 1 when any fails, 3 when none fails but some are undetermined."""
    return EXIT_STATUS[overall([r["verdict"] for r in rows])]


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for metric in ALL_METRICS:
        errs = [abs(r["error_pct"]) for r in rows if r["metric"] == metric]
        if errs:
            spreads = [r.get("measured_spread", 0.0) for r in rows if r["metric"] == metric]
            out[metric] = {"median_abs": statistics.median(errs), "max_abs": max(errs), "points": len(errs),
                           "median_spread": statistics.median(spreads)}
    return out


def format_table(rows: list[dict]) -> str:
    serving = any(r.get("policy") for r in rows)
    head = (("scheme", "n", "α") + (("policy", "C", "rate/s") if serving else ())
            + ("metric", "predicted", "measured", "95% CI of measured", "error", "95% CI of error", "verdict"))
    lines = [head]
    for r in rows:
        unit = " pp" if r["metric"] == "bubble_ratio" else "%"
        fmt = ".3f" if r["metric"] not in ("tokens_per_s", "tpot_p50_ms", "tpot_p90_ms") else ".2f"
        lines.append((r["scheme"], str(r["stages"]) + (f"×tp{r['tp']}" if r.get("tp", 1) > 1 else ""),
                      r["acceptance"])
                     + ((r["policy"], str(r["concurrency"]), f"{r['rate_per_s']:g}" if r["rate_per_s"] != "" else "")
                        if serving else ())
                     + (r["metric"], format(r["predicted"], fmt),
                        format(r["measured"], fmt), f"[{r['ci_low']:{fmt}}, {r['ci_high']:{fmt}}]",
                        f"{r['error_pct']:+.1f}{unit}", f"[{r['error_ci_low']:+.1f}, {r['error_ci_high']:+.1f}]{unit}",
                        r["verdict"]))
    return align(lines, left=(0, 3, 6, 12) if serving else (0, 3, 9))


def parity_plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [m for m in ALL_METRICS if any(r["metric"] == m for r in rows)] or list(METRICS)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rs = [r for r in rows if r["metric"] == metric]
        for scheme, marker in (("ar", "s"), ("pp", "^"), ("spd", "o")):
            pts = [r for r in rs if r["scheme"] == scheme]
            if pts:
                xs = [r["measured"] for r in pts]
                xerr = [[x - r["ci_low"] for x, r in zip(xs, pts)], [r["ci_high"] - x for x, r in zip(xs, pts)]]
                ax.errorbar(xs, [r["predicted"] for r in pts], xerr=xerr, fmt=marker, capsize=3, label=scheme)
        if rs:
            vals = [r["measured"] for r in rs] + [r["predicted"] for r in rs]
            lo, hi = min(vals), max(vals)
            pad = 0.05 * (hi - lo or abs(hi) or 1)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
        ax.set_xlabel(f"measured {metric} (95% CI)")
        ax.set_ylabel(f"predicted {metric}")
        ax.set_title(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the command ---------------------------------------------------------------------------------------

def _check_model(scenario, model_path: Path) -> dict:
    from executor.runner import model_shape
    shape = model_shape(model_path)
    if shape["n_layers"] != scenario.model.layers or shape["vocab_size"] != scenario.model.vocab:
        raise UserError(f"--model {model_path}: {shape['n_layers']} layers / vocab {shape['vocab_size']}, but the "
                        f"scenario's model has {scenario.model.layers} / {scenario.model.vocab}")
    return shape


def validate_command(args) -> int:
    import shutil
    from executor.profile import CALIBRATION_PROMPT, ProfileConfig, profile
    from executor.runner import resolve_model
    from spdsim.calibrate import calibrate
    from spdsim.calibration_file import load_calibration, write_calibration
    from spdsim.replay import host_speed
    from spdsim.scenario import load_scenario
    scenario = load_scenario(args.scenario)
    if args.tolerance <= 0 or args.bubble_tolerance <= 0:
        raise UserError("--tolerance and --bubble-tolerance must be > 0")
    if args.repeats < 1:
        raise UserError("--repeats must be ≥ 1")
    if args.max_minutes < 0 or args.warmup < 0:
        raise UserError("--max-minutes and --warmup must be ≥ 0")
    model = resolve_model(args.model or scenario.model.name)
    shape = _check_model(scenario, model)
    prompt = list(VALIDATION_PROMPT.encode())
    N = args.new_tokens or scenario.workload.new_tokens
    if len(prompt) + N > shape["max_seq_len"]:
        raise UserError(f"{len(prompt)} prompt + {N} new tokens exceed the model's context ({shape['max_seq_len']})")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device here")
        max_stages = torch.cuda.device_count()
    elif args.device == "cpu":
        max_stages = os.cpu_count() or 1
    else:
        raise UserError(f"--device {args.device!r}: expected cpu or cuda")
    head = args.head
    if head is None:
        default_head = Path(__file__).parent / "weights" / "head_n2.safetensors"
        head = str(default_head) if default_head.exists() and model.name == "tiny.safetensors" else None
    elif not Path(head).exists():
        raise UserError(f"--head {head}: no such file")
    serving = scenario.workload.serving
    concurrency = tuple(getattr(args, "concurrency", None) or DEFAULT_CONCURRENCY)
    if min(concurrency) < 1:
        raise UserError("--concurrency must be ≥ 1")
    serving_prompts, threshold = None, 0.5
    if serving:
        from executor.prompts import heldout_prompts
        from executor.runner import check_prompt
        k = getattr(args, "requests", None) or scenario.workload.requests
        if k < 1:
            raise UserError("--requests must be ≥ 1")
        serving_prompts = heldout_prompts(k)
        for p in serving_prompts:
            check_prompt(p, N, shape, what="a held-out prompt")
        threshold = scenario.serving.adaptive.threshold
    cases, notes = runnable_cases(scenario, max_stages, head, concurrency)
    for note in notes:
        print(f"executor: note: skipped {note}", file=sys.stderr)
    if not cases:
        raise UserError(f"{args.scenario}: no point of this scenario can run here")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    calib = args.calibration or scenario.calibration_path()
    if calib is not None:
        calib = Path(calib)
        given = load_calibration(calib)               # a bad file fails now, not after the measurements
        if serving and given.prefill is None:
            given.prefill_s(0, 0, 1, 1, 0, True, False)      # says why (no prefill measurements)
        print(f"validate: calibration {calib} (given)")
    else:                                             # microbenchmarks now, run traces interleaved below
        stages = max(c.stages for c in cases)
        pcfg = ProfileConfig(model=str(model), stages=stages, device=args.device, threads=args.threads,
                             head=head, contexts=None, repeats=9, runs=False, tp=max(c.tp for c in cases))
        profile(pcfg, out / "profile", log=print)
        for runs in ("runs", "runs_tp"):           # a fresh set of calibration runs, interleaved below
            shutil.rmtree(out / "profile" / runs, ignore_errors=True)

    own_calibration = calib is None
    t_start = time.time()
    deadline = t_start + 60.0 * args.max_minutes
    measured: dict[Case, list[dict]] = {c: [] for c in cases}
    round_s: list[float] = []
    calib_lines: list[str] = []
    launches = {(c.stages, c.tp): 1 for c in sorted(cases, key=lambda c: (c.stages, c.tp))}   # one launch each per round
    per_repeat_s: dict[tuple[int, int], float] = {}
    refit_s = 0.0                   # the refit and predictions after a round's measurements
    while True:                 # rounds of --repeats more decodes per point, until every verdict is known
        shares = round_repeats(launches, args.repeats, per_repeat_s)
        if len(round_s) >= MIN_ROUNDS:  # the last round is cut to the time left rather than skipped
            shares = fit_in(shares, per_repeat_s, deadline - time.time() - refit_s)
            if not shares:
                break
        t_round = time.time()
        for launch, k in shares.items():
            group = [c for c in cases if (c.stages, c.tp) == launch]
            t_launch = time.time()
            new = measure(group, str(model), prompt, N, k, args.device, args.threads,
                          calib_out=out / "profile" if own_calibration else None,
                          calib_prompt=list(CALIBRATION_PROMPT.encode()), head=head, first=len(measured[group[0]]),
                          warmup=args.warmup, pin=args.pin, serving_prompts=serving_prompts, threshold=threshold)
            per_repeat_s[launch] = (time.time() - t_launch) / k
            for c in group:           # the round each repeat was measured in: intervals resample rounds
                measured[c] += [{**r, "round": len(round_s)} for r in new[c]]
        t_refit = time.time()
        speeds: dict[str, float] = {}
        if own_calibration:     # refitted on every calibration run so far (never on the measured ones)
            costs, err, calib_lines = calibrate(out / "profile")
            calib = write_calibration(out / "calibration.yaml", costs, err)
            speeds = host_speed(out / "profile", costs)
        predicted = {c: [predict_serving(scenario, c, calib, r, seed=i, threshold=threshold) if c.serving
                         else at_host_speed(predict(scenario, c, calib, len(prompt), N, r["accepts"], seed=i),
                                            neighbour_speed(r, speeds))
                         for i, r in enumerate(measured[c])] for c in cases}
        rows = compare(cases, measured, predicted, args.tolerance, args.bubble_tolerance)
        refit_s = time.time() - t_refit
        round_s.append(time.time() - t_round)
        counts = {v: sum(r["verdict"] == v for r in rows) for v in (PASS, FAIL, UNDETERMINED)}
        launches = open_launches(rows)
        print(f"validate: round {len(round_s)}: {repeats_label(measured)} repeats per point, "
              f"{counts[PASS]} pass / {counts[FAIL]} fail / {counts[UNDETERMINED]} undetermined "
              f"({time.time() - t_start:.0f} s)", flush=True)
        if not launches:
            break
    if own_calibration:
        for line in calib_lines:
            print("  " + line)
        print(f"validate: calibrated on the calibration prompt's runs (interleaved, never the measured ones) -> {calib}")
    for c in cases:                                   # the replay must reproduce the measured verdicts
        for m, p in zip(measured[c], predicted[c]):
            if c.scheme == "spd" and not c.serving and (m["accepted"], m["rejected"]) != (p["accepted"], p["rejected"]):
                print(f"executor: warning: {c.label}: replayed verdicts {p['accepted']}/{p['rejected']} differ from "
                      f"the measured {m['accepted']}/{m['rejected']}", file=sys.stderr)

    import csv
    with open(out / "validation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "measured.json").write_text(json.dumps({
        "scenario": str(args.scenario), "calibration": str(calib), "prompt": VALIDATION_PROMPT,
        "new_tokens": N, "repeats": max(len(v) for v in measured.values()), "round_repeats": args.repeats,
        "rounds": len(round_s), "round_s": round_s,
        "minutes": (time.time() - t_start) / 60, "device": args.device, "load_avg": os.getloadavg(),
        "cases": [{**dataclasses.asdict(c), "measured": measured[c], "predicted": predicted[c]} for c in cases]},
        default=str, indent=1))
    parity_plot(rows, out / "parity.png")
    print(format_table(rows))
    for metric, s in summary(rows).items():
        unit = " pp" if metric == "bubble_ratio" else "%"
        print(f"{metric}: median |error| {s['median_abs']:.1f}{unit}, max {s['max_abs']:.1f}{unit} over {s['points']} "
              f"points; the measurements' own spread (half-range over repeats): median ±{s['median_spread']:.1f}{unit}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; wrote {out / 'validation.csv'}, "
          f"{out / 'parity.png'}")
    bad = failures(rows, args.tolerance, args.bubble_tolerance)
    verdict_all = overall([r["verdict"] for r in rows])
    print(f"validate: {repeats_label(measured)} repeats per point in {len(round_s)} round(s), {(time.time() - t_start) / 60:.1f} "
          f"minutes; verdict: {verdict_all}")
    if bad:
        worst = "; ".join(f"{r['scheme']} n={r['stages']}{' α=' + r['acceptance'] if r['acceptance'] else ''} "
                          f"{r['metric']} {r['error_pct']:+.1f}{' pp' if r['metric'] == 'bubble_ratio' else '%'} "
                          f"[{r['error_ci_low']:+.1f}, {r['error_ci_high']:+.1f}]"
                          for r in bad[:3])
        print(f"executor: validation failed: {len(bad)} of {len(rows)} errors over tolerance (their whole "
              f"confidence interval); worst: {worst}", file=sys.stderr)
    elif verdict_all == UNDETERMINED:
        open_rows = [r for r in rows if r["verdict"] == UNDETERMINED]
        need = more_repeats(rows, args.tolerance, args.bubble_tolerance)
        extra_min = None if need is None else sum(k * per_repeat_s.get(l, 0.0) for l, k in need.items()) / 60
        more = ("some error sits on its tolerance: more repeats may never decide it" if extra_min is None else
                f"about {extra_min:.0f} more minutes (--max-minutes {args.max_minutes + extra_min:.0f}) would "
                f"likely decide them")
        print(f"executor: validation undetermined: {len(open_rows)} of {len(rows)} errors have a confidence "
              f"interval across the tolerance; {more}", file=sys.stderr)
    return exit_status(rows)
