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
     acceptance error), the same spdsim.metrics over its event log;
  4. compare medians over repeats: tokens_per_s and speedup_vs_pp (relative error), bubble_ratio (absolute).
Writes OUT/validation.csv (with each figure's measured spread over repeats: an error below it cannot be told
from noise), OUT/parity.png, OUT/measured.json; prints a table; exits 1 when an error exceeds the tolerance,
naming the worst points.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

from spdsim.errors import UserError
from spdsim.textable import align

# Measured on this prompt; `executor profile` calibrates on executor.profile.CALIBRATION_PROMPT.
VALIDATION_PROMPT = "def parse(line):\n    key, _, value = line.partition('=')\n    return "
METRICS = ("tokens_per_s", "speedup_vs_pp", "bubble_ratio")
COLUMNS = ["scheme", "stages", "partition", "acceptance", "metric", "predicted", "measured", "error_pct",
           "measured_spread"]   # half the range over repeats, in error_pct's unit: the measurement's own noise


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurable configuration: a scenario point as the executor runs it (`runnable_cases` makes spd
    cases for n > 1 only, and measures any one-rank point as ar)."""
    scheme: str
    stages: int
    draft: str | None          # oracle:ALPHA | head:PATH | None
    acceptance: str            # the validation.csv `acceptance` column ('' for AR / PP)

    @property
    def label(self) -> str:
        return f"{self.scheme} n={self.stages}" + (f" α={self.acceptance}" if self.acceptance else "")


def runnable_cases(scenario, max_stages: int, head: str | None) -> tuple[list[Case], list[str]]:
    """The scenario's points this machine runs, and a note for each kind it skips."""
    cases: list[Case] = []
    notes: list[str] = []
    seen = set()
    for p in scenario.points():
        why = None
        if p.scheme not in ("ar", "pp", "spd"):
            why = f"scheme {p.scheme}: the executor runs ar / pp / spd only"
        elif p.partition != "uniform":
            why = f"partition {p.partition}: the executor runs the uniform partition only"
        elif p.stages > max_stages:
            why = f"{p.stages} stages > {max_stages} cores/devices here (oversubscribed: not validated)"
        elif p.acceptance is not None and p.stages > 1 and p.acceptance.kind not in ("iid", "table"):
            why = f"acceptance {p.acceptance.kind}: only an oracle α can be run"
        if why:
            if why not in notes:
                notes.append(why)
            continue
        if p.scheme == "spd" and p.stages > 1:
            alpha = float(p.acceptance.alpha)
            case = Case("spd", p.stages, f"oracle:{alpha:g}", f"{alpha:g}")
        elif p.stages == 1:         # AR, PP and SPD on one rank are the same decode: measured once, as AR
            case = Case("ar", 1, None, "")
            if p.scheme != "ar":
                why = "pp / spd on 1 stage: the same one-rank decode as ar (measured once, as ar)"
                if why not in notes:
                    notes.append(why)
        else:
            case = Case(p.scheme, p.stages, None, "")
        if case not in seen:
            seen.add(case)
            cases.append(case)
    if head:
        for n in sorted({c.stages for c in cases if c.scheme == "spd" and c.stages > 1}):
            cases.append(Case("spd", n, f"head:{head}", "head"))
    return cases, notes


# --- measuring -----------------------------------------------------------------------------------------

def measure(cases: list[Case], model: str, prompt: list[int], new_tokens: int, repeats: int, device: str,
            threads: int, calib_out: Path | None = None, calib_prompt: list[int] | None = None,
            calib_alpha: float = 0.6, head: str | None = None, log=print) -> dict[Case, list[dict]]:
    """`repeats` decodes per case, one launch (one set of processes) per stage count.

    With `calib_out`, calibration runs (AR / PP / SPD at `calib_alpha`, on `calib_prompt`) are interleaved
    with the measured ones in the same processes, their traces written to calib_out/runs/<run>-r<i>/:
    calibration and measurement then see the same machine load, yet never the same runs or prompt."""
    import shutil
    import tempfile
    from executor.runner import RunSpec, launch
    out: dict[Case, list[dict]] = {}
    for n in sorted({c.stages for c in cases}):
        group = [c for c in cases if c.stages == n]
        calib: list[tuple[str, str, str | None]] = []
        if calib_out is not None:
            calib = [("ar-n1", "ar", None)] if n == 1 else [(f"pp-n{n}", "pp", None),
                                                            (f"spd-n{n}-a{calib_alpha:g}", "spd", f"oracle:{calib_alpha:g}")]
            if head and n > 1:
                calib.append((f"spd-n{n}-head", "spd", f"head:{head}"))
        # Round-robin over the cases (case 1, case 2, …, case 1, case 2, …): a slow spell of a shared
        # machine then hits every case alike instead of one case's repeats.
        jobs, kinds = [], []
        for i in range(repeats):
            for name, scheme, draft in calib:
                jobs.append({"scheme": scheme, "prompt": calib_prompt, "new_tokens": new_tokens, "draft": draft,
                             "seed": 100 + i})
                kinds.append(("calib", f"{name}-r{i}"))
            for c in group:
                jobs.append({"scheme": c.scheme, "prompt": prompt, "new_tokens": new_tokens, "draft": c.draft,
                             "seed": 1000 + i})
                kinds.append(("case", c))
        tmp = Path(tempfile.mkdtemp(prefix="spd-validate.")) if calib else None
        t0 = time.time()
        try:
            res = launch(RunSpec(model=model, stages=n, jobs=jobs, device=device, threads=threads,
                                 model_label=Path(model).name, trace_dir=str(tmp) if tmp else None,
                                 trace_each=bool(tmp)))
            for j, (kind, what) in enumerate(kinds):
                if kind == "calib":
                    dst = calib_out / "runs" / what
                    shutil.rmtree(dst, ignore_errors=True)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(tmp / f"job{j}"), dst)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"validate: measured {len(jobs) - len(calib) * repeats} decodes on {n} rank(s)"
            + (f", {len(calib) * repeats} calibration decodes interleaved" if calib else "")
            + f" ({time.time() - t0:.0f} s)")
        results = [(what, r) for (kind, what), r in zip(kinds, res) if kind == "case"]
        for c in group:
            out[c] = [r for what, r in results if what == c]
    return out


# --- predicting ----------------------------------------------------------------------------------------

def predict(scenario, case: Case, calibration: Path, prompt_tokens: int, new_tokens: int,
            accepts: list[int], seed: int = 0) -> dict:
    """One simulated decode of `case` with the calibrated costs, replaying `accepts`; `seed` picks the
    forward-to-forward jitter draws (validate passes the repeat's index: round i of every case shares
    them, as the measured round shares the machine's state)."""
    from spdsim.replay import replay_point
    features = bool(case.draft and case.draft.startswith("head:"))
    sc = dataclasses.replace(scenario, calibration=str(calibration), path=None)
    r = replay_point(sc, case.scheme, case.stages, prompt_tokens, new_tokens, accepts, features, seed=seed)
    m = r.metrics
    return {"tokens_per_s": m.tokens_per_s, "bubble_ratio": m.bubble_ratio, "acceptance_rate": m.acceptance_rate,
            "accepted": m.accepted, "rejected": m.rejected}


# --- comparing -----------------------------------------------------------------------------------------

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _paired_ratios(runs: list[dict], base: list[dict]) -> list[float]:
    """tokens/s of each repeat over the base case's in the same round (measure() runs the cases round-
    robin in one launch): a slow spell hits both sides of a ratio alike."""
    return [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, base, strict=True)]


def compare(cases: list[Case], measured: dict[Case, list[dict]], predicted: dict[Case, list[dict]]) -> list[dict]:
    """validation.csv rows: medians over repeats; speedup_vs_pp against PP of the same stage count, as the
    median of per-round ratios."""
    med = {c: {k: (_median([r[k] for r in measured[c]]), _median([r[k] for r in predicted[c]]))
               for k in ("tokens_per_s", "bubble_ratio")} for c in cases}

    def half_range(c: Case, k: str, relative: bool) -> float:
        xs = [r[k] for r in measured[c] if r[k] is not None]
        if len(xs) < 2:
            return 0.0
        h = (max(xs) - min(xs)) / 2
        return 100.0 * (h / statistics.median(xs) if relative else h)
    pp_case = {c.stages: c for c in cases if c.scheme == "pp"}
    rows = []
    for c in cases:
        vals = dict(med[c])
        ratios = None
        if c.stages in pp_case:
            base = pp_case[c.stages]
            ratios = _paired_ratios(measured[c], measured[base])
            vals["speedup_vs_pp"] = (statistics.median(ratios),
                                     statistics.median(_paired_ratios(predicted[c], predicted[base])))
        for metric in METRICS:
            if metric not in vals:
                continue
            meas, pred = vals[metric]
            if metric == "bubble_ratio":
                err = 100.0 * (pred - meas)                 # percentage points (absolute)
            else:
                err = 100.0 * (pred - meas) / meas
            if metric == "speedup_vs_pp":
                spread = 100.0 * (max(ratios) - min(ratios)) / 2 / meas
            else:
                spread = half_range(c, metric, metric != "bubble_ratio")
            rows.append({"scheme": c.scheme, "stages": c.stages, "partition": "uniform", "acceptance": c.acceptance,
                         "metric": metric, "predicted": pred, "measured": meas, "error_pct": err,
                         "measured_spread": spread})
    return rows


def failures(rows: list[dict], tolerance: float, bubble_tolerance: float) -> list[dict]:
    """Rows over tolerance, worst first (relative for tokens_per_s / speedup_vs_pp, absolute for bubble)."""
    bad = []
    for r in rows:
        limit = 100.0 * (bubble_tolerance if r["metric"] == "bubble_ratio" else tolerance)
        if not abs(r["error_pct"]) <= limit:
            bad.append((abs(r["error_pct"]) / limit, r))
    return [r for _, r in sorted(bad, key=lambda t: -t[0])]


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for metric in METRICS:
        errs = [abs(r["error_pct"]) for r in rows if r["metric"] == metric]
        if errs:
            spreads = [r.get("measured_spread", 0.0) for r in rows if r["metric"] == metric]
            out[metric] = {"median_abs": statistics.median(errs), "max_abs": max(errs), "points": len(errs),
                           "median_spread": statistics.median(spreads)}
    return out


def format_table(rows: list[dict]) -> str:
    head = ("scheme", "n", "α", "metric", "predicted", "measured", "error", "spread")
    lines = [head]
    for r in rows:
        unit = " pp" if r["metric"] == "bubble_ratio" else "%"
        fmt = ".3f" if r["metric"] != "tokens_per_s" else ".2f"
        lines.append((r["scheme"], str(r["stages"]), r["acceptance"], r["metric"], format(r["predicted"], fmt),
                      format(r["measured"], fmt), f"{r['error_pct']:+.1f}{unit}",
                      f"±{r.get('measured_spread', 0.0):.1f}{unit}"))
    return align(lines, left=(0, 3))


def parity_plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS):
        rs = [r for r in rows if r["metric"] == metric]
        for scheme, marker in (("ar", "s"), ("pp", "^"), ("spd", "o")):
            pts = [r for r in rs if r["scheme"] == scheme]
            if pts:
                ax.scatter([r["measured"] for r in pts], [r["predicted"] for r in pts], marker=marker, label=scheme)
        if rs:
            vals = [r["measured"] for r in rs] + [r["predicted"] for r in rs]
            lo, hi = min(vals), max(vals)
            pad = 0.05 * (hi - lo or abs(hi) or 1)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
        ax.set_xlabel(f"measured {metric}")
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
    from spdsim.scenario import load_scenario
    scenario = load_scenario(args.scenario)
    if args.tolerance <= 0 or args.bubble_tolerance <= 0:
        raise UserError("--tolerance and --bubble-tolerance must be > 0")
    if args.repeats < 1:
        raise UserError("--repeats must be ≥ 1")
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
    cases, notes = runnable_cases(scenario, max_stages, head)
    for note in notes:
        print(f"executor: note: skipped {note}", file=sys.stderr)
    if not cases:
        raise UserError(f"{args.scenario}: no point of this scenario can run here")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    calib = args.calibration or scenario.calibration_path()
    if calib is not None:
        calib = Path(calib)
        load_calibration(calib)                       # a bad file fails now, not after the measurements
        print(f"validate: calibration {calib} (given)")
    else:                                             # microbenchmarks now, run traces interleaved below
        stages = max(c.stages for c in cases)
        pcfg = ProfileConfig(model=str(model), stages=stages, device=args.device, threads=args.threads,
                             head=head, contexts=None, repeats=9, runs=False)
        profile(pcfg, out / "profile", log=print)
        shutil.rmtree(out / "profile" / "runs", ignore_errors=True)

    measured = measure(cases, str(model), prompt, N, args.repeats, args.device, args.threads,
                       calib_out=None if calib is not None else out / "profile",
                       calib_prompt=list(CALIBRATION_PROMPT.encode()), head=head)
    if calib is None:
        costs, err, lines = calibrate(out / "profile")
        for line in lines:
            print("  " + line)
        calib = write_calibration(out / "calibration.yaml", costs, err)
        print(f"validate: calibrated on the calibration prompt's runs (interleaved, never the measured ones) -> {calib}")
    predicted = {c: [predict(scenario, c, calib, len(prompt), N, r["accepts"], seed=i) for i, r in enumerate(measured[c])]
                 for c in cases}
    for c in cases:                                   # the replay must reproduce the measured verdicts
        for m, p in zip(measured[c], predicted[c]):
            if c.scheme == "spd" and (m["accepted"], m["rejected"]) != (p["accepted"], p["rejected"]):
                print(f"executor: warning: {c.label}: replayed verdicts {p['accepted']}/{p['rejected']} differ from "
                      f"the measured {m['accepted']}/{m['rejected']}", file=sys.stderr)
    rows = compare(cases, measured, predicted)

    import csv
    with open(out / "validation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "measured.json").write_text(json.dumps({
        "scenario": str(args.scenario), "calibration": str(calib), "prompt": VALIDATION_PROMPT,
        "new_tokens": N, "repeats": args.repeats, "device": args.device, "load_avg": os.getloadavg(),
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
    if bad:
        worst = "; ".join(f"{r['scheme']} n={r['stages']}{' α=' + r['acceptance'] if r['acceptance'] else ''} "
                          f"{r['metric']} {r['error_pct']:+.1f}{' pp' if r['metric'] == 'bubble_ratio' else '%'}"
                          for r in bad[:3])
        print(f"executor: validation failed: {len(bad)} of {len(rows)} errors over tolerance; worst: {worst}",
              file=sys.stderr)
        return 1
    return 0
