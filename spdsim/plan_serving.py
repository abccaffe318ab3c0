"""Planning by SLO: `spdsim plan … --qps R --slo tpot_p99=40ms,ttft_p99=1s` and `--max-qps`.

    spdsim plan --model llama-3-8b --gpu h100,a100 --max-gpus 8 --qps 2 --slo tpot_p99=40ms,ttft_p99=1s
    spdsim plan --model llama-3-8b --gpu h100 --max-gpus 8 --max-qps --slo tpot_p99=40ms

A configuration is GPU × count × tp × stages × scheme × partition (the `spdsim plan` ones: schemes ar,
pp and spd, module co-located — what serving models) × serving policy; every figure is a simulated serving run of
`--requests` Poisson requests (spdsim.serving), prompt + new tokens as given.

  --qps R     the cheapest configuration whose TTFT p99 and TPOT p99 meet the SLO at R requests/s.
              Configurations are simulated cheapest first ($/hour, then GPUs); once one meets the SLO,
              the dearer ones are not simulated ("pruned"). A configuration whose capacity bound is
              below R is not simulated either ("over capacity").
  --max-qps   the highest rate each configuration sustains within the SLO, and QPS per dollar.

How --max-qps stays fast (Vidur-Search bisects on the rate too; REFERENCE.md):
  1. an upper bound: every request's prefill and every committed token pass through every stage, so
     no policy sustains more than 1 / max over stages of (prefill + new tokens × a decode tick at
     batch max_batch, ÷ max_batch) requests/s — the search never looks above it;
  2. one light-load run at 1/64 of that bound: a configuration that misses the SLO with requests
     nearly alone misses it at any rate (sustains 0), and is not searched further;
  3. between the two, a bisection on log(rate), `--search-steps` runs (default 6: within 7% of
     the answer), on the same requests at every rate (lengths and verdicts are drawn per request
     and arrival gaps scale with 1/rate), so that more load only makes latencies worse (tests/
     test_serving.py) and the bisection's answer is the crossing point;
  4. configurations search in parallel (--jobs / --dask), one task each.
Writes DIR/plan_serving.csv (every configuration and policy: status, QPS, latencies, $/hour, QPS per
$/hour, reason) and DIR/pareto_serving.png (QPS per $ against TPOT p99). Exit 0 when some configuration
meets the SLO (at R, or at any rate > 0 with --max-qps), 1 when none does, 2 on bad input.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from spdsim.engine import simulate_point
from spdsim.errors import UserError
from spdsim.parallel import make_executor, progress_bar, run_tasks
from spdsim.plan import Config, PlanRequest, assess, configurations, scenario_for
from spdsim.scenario import SERVING_SCHEMES, Point, Scenario
from spdsim.serving_config import POLICIES, ServingSpec, Slo
from spdsim.workload import Arrivals, Workload

DEFAULT_POLICIES = ("fcfs", "interleave", "spd_first", "adaptive")
DRAFT_POLICIES = ("spd_first", "adaptive")      # only differ from interleave where something drafts
LIGHT = 1 / 64                                   # the light-load run, as a fraction of the capacity bound


@dataclass(frozen=True)
class ServingPlan:
    base: PlanRequest                # model, GPUs, max GPUs, schemes, partitions, acceptance, prices, lengths
    slo: Slo
    qps: float | None                # --qps R; None with --max-qps
    policies: tuple[str, ...] = DEFAULT_POLICIES
    requests: int = 200
    max_batch: int = 1
    search_steps: int = 6


def parse_slo(text: str) -> Slo:
    """'tpot_p99=40ms,ttft_p99=1s' → Slo(ttft_p99_ms=1000, tpot_p99_ms=40)."""
    values: dict[str, float] = {}
    for part in (p.strip() for p in (text or "").split(",") if p.strip()):
        m = re.fullmatch(r"(ttft_p99|tpot_p99)\s*=\s*([0-9.eE+-]+)\s*(ms|s)?", part)
        if not m:
            raise UserError(f"--slo: {part!r} is not ttft_p99=VALUE[ms|s] or tpot_p99=VALUE[ms|s]")
        try:
            v = float(m.group(2)) * (1000.0 if m.group(3) == "s" else 1.0)
        except ValueError:
            raise UserError(f"--slo: {part!r}: {m.group(2)!r} is not a number") from None
        if not v > 0:
            raise UserError(f"--slo: {part!r}: the bound must be > 0")
        values[f"{m.group(1)}_ms"] = v
    if not values:
        raise UserError("--slo: give ttft_p99=…, tpot_p99=… or both (e.g. tpot_p99=40ms,ttft_p99=1s)")
    return Slo(**values)


def serving_scenario(sp: ServingPlan, c: Config, policy: str, rate: float) -> tuple[Scenario, Point]:
    """The one-point serving scenario of a configuration and policy at a rate."""
    s, p = scenario_for(sp.base, c)
    w = sp.base.workload
    s = replace(s, workload=Workload(w.prompt_tokens, w.new_tokens, sp.requests, Arrivals("poisson", (rate,))),
                serving=ServingSpec(policies=(policy,), max_batch=sp.max_batch, slo=sp.slo))
    return s, replace(p, policy=policy, load=rate)


def capacity_bound(sp: ServingPlan, c: Config, plan) -> float:
    """Requests/s no policy can sustain more than (step 1 of the module docstring)."""
    from spdsim.cost_choice import cost_model
    s, _ = scenario_for(sp.base, c)
    costs = cost_model(s).for_point(c.scheme, plan.stages, plan.tp, plan.groups or None)
    w, n, B = sp.base.workload, plan.stages, sp.max_batch
    ctx = w.prompt_tokens + w.new_tokens // 2
    worst = 0.0
    for st, (a, b) in enumerate(plan.layers):
        first, last = st == 0, st == n - 1
        tick = costs.batch_stage_s(st, a, b, [ctx] * B, first, last) / B
        if first and plan.head_device is not None:
            tick += costs.batch_head_s([ctx] * B) / B
        per_request = costs.prefill_s(st, a, b, w.prompt_tokens - 1, 0, first, last) + w.new_tokens * tick
        worst = max(worst, per_request)
    return 1.0 / worst if worst > 0 else math.inf


def _run(sp: ServingPlan, c: Config, policy: str, rate: float, plan) -> dict:
    s, p = serving_scenario(sp, c, policy, rate)
    r = simulate_point(s, p, plan=plan)
    return {"rate": rate, "meets": bool(r.extra["meets_slo"]), **{k: r.extra[k] for k in (
        "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "throughput_tokens_per_s", "goodput_requests_per_s")}}


def search_max_qps(sp: ServingPlan, c: Config, policy: str, plan, bound: float) -> tuple[dict | None, int]:
    """(the best run within the SLO or None, runs made): steps 2 and 3 of the module docstring."""
    lo = bound * LIGHT
    best = _run(sp, c, policy, lo, plan)
    runs = 1
    if not best["meets"]:
        return None, runs
    hi = bound
    for _ in range(sp.search_steps):
        mid = math.sqrt(lo * hi)
        r = _run(sp, c, policy, mid, plan)
        runs += 1
        if r["meets"]:
            lo, best = mid, r
        else:
            hi = mid
    return best, runs


def _task(sp: ServingPlan, c: Config, policy: str) -> dict:
    """Assess one configuration + policy (memory, capacity) and simulate what the mode asks for."""
    a = assess(sp.base, c)
    row = {"plan": a.plan, "reason": a.reason, "bound": math.nan, "runs": 0, "result": None}
    if a.reason or a.plan is None:
        return row
    bound = capacity_bound(sp, c, a.plan)
    row["bound"] = bound
    if sp.qps is not None:
        if bound < sp.qps:
            row["reason"] = f"over capacity: at most {bound:.2f} requests/s through this pipeline"
            return row
        row["result"], row["runs"] = _run(sp, c, policy, sp.qps, a.plan), 1
    else:
        row["result"], row["runs"] = search_max_qps(sp, c, policy, a.plan, bound)
    return row


def serving_configurations(sp: ServingPlan) -> list[tuple[Config, str]]:
    out = []
    for c in configurations(sp.base):
        # serving models AR, PP and SPD (on TP groups too) with the co-located module
        if c.head == "dedicated" or c.scheme not in SERVING_SCHEMES:
            continue
        drafts = c.scheme == "spd" and c.stages > 1
        for policy in sp.policies:
            if policy in DRAFT_POLICIES and not drafts:
                continue
            out.append((c, policy))
    return out


def evaluate_serving(sp: ServingPlan, jobs: int = 1, dask: str | None = None, quiet: bool = True) -> pd.DataFrame:
    pairs = serving_configurations(sp)
    price = {g.name: sp.base.prices.get(g.name, math.nan) for g in sp.base.gpus}

    def cost(cp: tuple[Config, str]) -> tuple:
        c = cp[0]
        usd = c.gpus * price[c.gpu]
        return (usd if not math.isnan(usd) else math.inf, c.gpus)
    pairs.sort(key=cost)
    results: list[dict | None] = [None] * len(pairs)
    with make_executor(jobs, dask) as ex:
        bar = progress_bar("planning  ", quiet, batches=True)
        if sp.qps is None:
            rows = run_tasks(_task, [(sp, c, p) for c, p in pairs], progress=bar, executor=ex)
            results = list(rows)
        else:
            # cheapest first, one price level at a time: stop once a level meets the SLO
            levels: dict[tuple, list[int]] = {}
            for i, cp in enumerate(pairs):
                levels.setdefault(cost(cp), []).append(i)
            for level in sorted(levels):
                idx = levels[level]
                for i, row in zip(idx, run_tasks(_task, [(sp, *pairs[i]) for i in idx], progress=bar, executor=ex)):
                    results[i] = row
                if any(results[i]["result"] and results[i]["result"]["meets"] for i in idx):
                    break
        if bar is not None:
            bar.close()
    out = []
    for (c, policy), row in zip(pairs, results):
        usd = c.gpus * price[c.gpu]
        res = row["result"] if row else None
        if row is None:
            status, reason = "pruned", "costs more than the cheapest configuration meeting the SLO"
        elif row["reason"]:
            status, reason = ("infeasible" if not row["reason"].startswith("over capacity") else "over capacity",
                              row["reason"])
        elif res is None:
            status, reason = "misses SLO", f"misses the SLO even at light load ({row['bound'] * LIGHT:.3g} requests/s)"
        elif sp.qps is not None:
            status, reason = ("meets SLO" if res["meets"] else "misses SLO"), ""
        else:
            status, reason = "meets SLO", ""
        qps = (sp.qps if sp.qps is not None else res["rate"]) if res else (0.0 if row and not row["reason"] else math.nan)
        if sp.qps is not None and res is not None and not res["meets"]:
            qps = math.nan
        plan = row["plan"] if row else None
        out.append({
            "gpu": c.gpu, "gpus": c.gpus, "tp": c.tp, "scheme": c.scheme, "stages": c.stages, "partition": c.partition,
            "policy": policy, "acceptance": (sp.base.alpha_for(c.stages).value
                                             if c.scheme == "spd" and c.stages > 1 and sp.base.alpha_for(c.stages) else None),
            "status": status, "qps": qps,
            "ttft_p99_ms": res["ttft_p99_ms"] if res else math.nan,
            "tpot_p50_ms": res["tpot_p50_ms"] if res else math.nan,
            "tpot_p99_ms": res["tpot_p99_ms"] if res else math.nan,
            "throughput_tokens_per_s": res["throughput_tokens_per_s"] if res else math.nan,
            "usd_per_hour": usd, "qps_per_usd_hour": qps / usd if res and usd and not math.isnan(qps) else math.nan,
            "capacity_bound_qps": row["bound"] if row else math.nan, "simulated_runs": row["runs"] if row else 0,
            "layers": plan.layers_str() if plan else "", "placement": ",".join(plan.placement) if plan else "",
            "reason": reason,
        })
    return rank_serving(pd.DataFrame(out), sp.qps is None)


def rank_serving(df: pd.DataFrame, max_qps: bool) -> pd.DataFrame:
    """--qps: meeting the SLO first, then cheapest, fewest GPUs, lowest TPOT p99; --max-qps: QPS per
    $/hour (QPS where there is no price), highest first."""
    order = {"meets SLO": 0, "misses SLO": 1, "over capacity": 2, "pruned": 3, "infeasible": 4}
    df = df.assign(_s=df["status"].map(order))
    if max_qps:
        key = df["qps_per_usd_hour"].where(df["qps_per_usd_hour"].notna(), df["qps"])
        df = df.assign(_k=-key.fillna(-1)).sort_values(["_s", "_k", "gpus"], kind="stable")
        return df.drop(columns=["_s", "_k"]).reset_index(drop=True)
    df = df.sort_values(["_s", "usd_per_hour", "gpus", "tpot_p99_ms"], kind="stable", na_position="last")
    return df.drop(columns=["_s"]).reset_index(drop=True)


def describe_serving(r: pd.Series, max_qps: bool) -> str:
    tp = int(r.get("tp", 1) or 1)
    what = ({"ar": "AR on 1 GPU" if tp == 1 else f"TP over {tp} GPUs"}.get(r["scheme"])
            or f"{r['scheme'].upper()} over {r['stages']} stages" + (f" of TP {tp}" if tp > 1 else ""))
    cost = f", ${r['usd_per_hour']:.2f}/h" if not math.isnan(r["usd_per_hour"]) else ""
    part = f" {r['partition']}" if r["stages"] > 1 else ""
    rate = (f"{r['qps']:.2f} req/s" + (f" ({r['qps_per_usd_hour']:.2f} per $/h)" if not math.isnan(r['qps_per_usd_hour']) else "")
            if max_qps else "")
    return (f"{r['gpus']} × {r['gpu']}: {what}{part}, {r['policy']}{cost}: {rate + ', ' if rate else ''}"
            f"TTFT p99 {r['ttft_p99_ms']:.0f} ms, TPOT p99 {r['tpot_p99_ms']:.1f} ms")


def write_pareto_serving(df: pd.DataFrame, path: Path) -> Path | None:
    """QPS per $/hour against TPOT p99 for every simulated configuration within the SLO."""
    from matplotlib.figure import Figure
    from spdsim.plan import pareto_front
    ok = df[df["qps_per_usd_hour"].notna() & df["tpot_p99_ms"].notna()]
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for (scheme, policy), g in ok.groupby(["scheme", "policy"]):
        ax.scatter(g["tpot_p99_ms"], g["qps_per_usd_hour"], s=18, alpha=0.7, label=f"{scheme}/{policy}")
    pts = list(zip(ok["tpot_p99_ms"], ok["qps_per_usd_hour"]))
    front = [pts[i] for i in pareto_front(pts)]
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1.0, label="Pareto front")
    ax.set_xlabel("TPOT p99 (ms)")
    ax.set_ylabel("requests/s per $/hour")
    ax.grid(alpha=0.3)
    if len(ok):
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no configuration within the SLO", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("spdsim plan: QPS per dollar against TPOT p99 (within the SLO)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def request_from_args(args: argparse.Namespace, base: PlanRequest) -> ServingPlan:
    slo = parse_slo(args.slo) if args.slo else None
    if slo is None:
        raise UserError("--slo: needed with --qps / --max-qps (e.g. --slo tpot_p99=40ms,ttft_p99=1s)")
    if args.qps is not None and args.max_qps:
        raise UserError("--qps: give --qps R or --max-qps, not both")
    if args.qps is not None and not args.qps > 0:
        raise UserError("--qps: must be > 0")
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    for p in policies:
        if p not in POLICIES:
            raise UserError(f"--policies: unknown {p!r} (expected some of {', '.join(POLICIES)})")
    if not policies:
        raise UserError("--policies: must not be empty")
    for k in ("requests", "max_batch", "search_steps"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')}: must be ≥ 1")
    return ServingPlan(base=base, slo=slo, qps=args.qps, policies=policies, requests=args.requests,
                       max_batch=args.max_batch, search_steps=args.search_steps)


def plan_serving_command(args: argparse.Namespace) -> int:
    from spdsim.plan import request_from_args as plan_request
    base = plan_request(args)
    sp = request_from_args(args, base)
    out = Path(args.out) if args.out else Path("reports") / f"plan-{base.model.name}"
    df = evaluate_serving(sp, jobs=args.jobs, dask=args.dask, quiet=args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "plan_serving.csv", index=False)
    write_pareto_serving(df, out / "pareto_serving.png")
    slo = ", ".join(f"{k} ≤ {v:g} ms" for k, v in (("TTFT p99", sp.slo.ttft_p99_ms), ("TPOT p99", sp.slo.tpot_p99_ms))
                    if v is not None)
    counts = df["status"].value_counts()
    at = f"at {sp.qps:g} requests/s" if sp.qps is not None else "at the highest rate each sustains"
    print(f"{base.model.name} {at}, SLO {slo}, {sp.requests} requests per run: {len(df)} configurations × policies "
          f"({', '.join(f'{v} {k}' for k, v in counts.items())}; {int(df['simulated_runs'].sum())} serving runs)")
    ok = df[df["status"] == "meets SLO"]
    max_qps = sp.qps is None
    if max_qps:
        ok = ok[ok["qps"] > 0]
        if len(ok):
            print(f"most requests/s per dollar: {describe_serving(ok.iloc[0], True)}")
            top = ok.loc[ok["qps"].idxmax()]
            print(f"highest requests/s:         {describe_serving(top, True)}")
    elif len(ok):
        print(f"cheapest meeting the SLO: {describe_serving(ok.iloc[0], False)}")
        print(f"lowest TPOT p99 there:    {describe_serving(ok.loc[ok['tpot_p99_ms'].idxmin()], False)}")
    print(f"wrote {out / 'plan_serving.csv'} and {out / 'pareto_serving.png'}")
    if not len(ok):
        print("no configuration meets the SLO" + (f" at {sp.qps:g} requests/s" if sp.qps is not None else ""))
        return 1
    return 0
