"""`spdsim report DIR`: (re)draw every plot, timeline and the HTML summary from DIR/results.csv.

`spdsim run` calls `write_report` at the end of a sweep (unless --no-plots). Inputs in DIR:
  results.csv               one row per simulated point (DESIGN §4 columns, optional utilization_<s>)
  scenario.yaml             optional: shown verbatim in the page
  timelines/<point>.jsonl   optional: event logs in the trace schema → timeline_<point>.json
                            (Chrome/Perfetto) and gantt_<point>.png
Outputs: the PNGs of `spdsim.plots`, the timelines, and index.html (self-contained: images by relative
path, no scripts, no network).
"""
from __future__ import annotations

import argparse
import html
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from spdsim.errors import UserError
from spdsim.summary import best_per_alpha, speculative

REQUIRED_COLUMNS = ("scenario", "scheme", "stages", "partition", "acceptance", "tokens_per_s", "ms_per_token",
                    "speedup_vs_pp", "speedup_vs_ar", "bubble_ratio", "waste_ratio", "acceptance_rate")
NUMERIC_COLUMNS = ("stages", "acceptance", "tokens_per_s", "ms_per_token", "speedup_vs_pp", "speedup_vs_ar",
                   "bubble_ratio", "waste_ratio", "acceptance_rate", "accepted", "rejected")
TEXT_COLUMNS = ("scenario", "scheme", "partition", "placement", "point_id")
INTEGER_COLUMNS = ("stages", "accepted", "rejected", "new_tokens", "window_ns", "prompt_tokens")
GANTT_TICKS = 36


# --- input -------------------------------------------------------------------------------------

def load_results(path: Path) -> pd.DataFrame:
    """Read and check results.csv; every problem is a UserError naming the file, column and row."""
    if not path.is_file():
        raise UserError(f"{path}: no such file (run `spdsim run SCENARIO.yaml --out {path.parent}` first)")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    if raw.empty:
        raise UserError(f"{path}: no rows")
    df = raw.copy()
    for col in [c for c in df.columns if c not in TEXT_COLUMNS]:
        text = raw[col].str.strip()
        values = pd.to_numeric(text.where(text != ""), errors="coerce")
        bad = values.isna() & (text != "") & ~text.str.lower().isin(("nan", "none", "null"))
        if not bad.any():
            if values.notna().any() or col in NUMERIC_COLUMNS or col.startswith("utilization_"):
                df[col] = values.astype(float)   # an extra column is numeric when all its values are
        elif col in NUMERIC_COLUMNS or col.startswith("utilization_"):
            row = int(bad.idxmax())
            raise UserError(f"{path}: column {col}, row {row + 2}: {raw[col][row]!r} is not a number")
    for col in ("stages", "tokens_per_s"):
        if df[col].isna().any():
            raise UserError(f"{path}: column {col}, row {int(df[col].isna().idxmax()) + 2}: empty")
    if (df["stages"] < 1).any() or (df["stages"] % 1 != 0).any():
        raise UserError(f"{path}: column stages must hold whole numbers ≥ 1")
    if (df["scheme"].str.strip() == "").any():
        raise UserError(f"{path}: column scheme, row {int((df['scheme'].str.strip() == '').idxmax()) + 2}: empty")
    df["stages"] = df["stages"].astype(int)
    df["scheme"] = df["scheme"].str.strip()
    df["partition"] = df["partition"].replace("", "-")
    if "meets_slo" in df.columns:   # serving: True / False / empty (no SLO)
        df["meets_slo"] = df["meets_slo"].map(lambda v: {"True": True, "False": False, 1.0: True, 0.0: False}.get(v))
    return df


# --- outputs -----------------------------------------------------------------------------------

@dataclass
class Timeline:
    point: str
    gantt: Path | None = None
    chrome: Path | None = None
    error: str = ""


@dataclass
class Report:
    out_dir: Path
    images: list[Path] = field(default_factory=list)
    timelines: list[Timeline] = field(default_factory=list)


def draw_plots(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    from spdsim.plots import PLOTS
    from spdsim.plots_serving import draw_serving_plots, is_serving
    if is_serving(df):              # serving points: latency against load, CDFs (spdsim.plots_serving)
        return draw_serving_plots(df, out_dir)
    drawn = []
    for name, plot in PLOTS:
        target = out_dir / name
        if plot(df, target) is not None:
            drawn.append(target)
        elif target.exists():
            target.unlink()   # a stale plot from an earlier table would contradict this one
    return drawn


def draw_timelines(out_dir: Path, ticks: int = GANTT_TICKS) -> list[Timeline]:
    """Perfetto JSON + Gantt PNG for every timelines/*.jsonl. A broken file is reported, not fatal."""
    from spdsim.gantt import draw_gantt
    from spdsim.trace import read_trace, write_chrome_trace

    done = []
    for src in sorted((out_dir / "timelines").glob("*.jsonl")):
        tl = Timeline(src.stem)
        try:
            trace = read_trace(src)
            tl.chrome = write_chrome_trace(out_dir / f"timeline_{src.stem}.json", trace)
            tl.gantt = draw_gantt(trace, out_dir / f"gantt_{src.stem}.png", ticks=ticks,
                                  label=src.stem)
        except (OSError, ValueError) as e:
            tl.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"spdsim: warning: timeline {src}: {tl.error}", file=sys.stderr)
        done.append(tl)
    return done


def write_report(out_dir: Path) -> Path:
    """Draw everything for out_dir/results.csv and write out_dir/index.html; return its path."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: no such directory")
    df = load_results(out_dir / "results.csv")
    report = Report(out_dir, draw_plots(df, out_dir), draw_timelines(out_dir))
    scenario = out_dir / "scenario.yaml"
    page = render_html(df, report, scenario.read_text(errors="replace") if scenario.is_file() else None)
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def report_command(args: argparse.Namespace) -> int:
    index = write_report(Path(args.dir))
    print(f"wrote {index}")
    return 0


# --- HTML --------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; position: sticky; top: 0; }
td.t, th.t { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; } .err { color: #b00; }
"""

CAPTIONS = {
    "speedup_vs_n.png": "Speedup of each speculative scheme over PP (same stages, partition, placement) and over "
                        "AR on one device, against the stage count n; one line per acceptance rate α, one panel "
                        "per partitioner. Dashed: the ideal n/(1+(1−α)(n−1)) (equal stages, free links and head).",
    "bubble_vs_n.png": "Bubble ratio (1 − busy/(n·T), wasted compute counts as busy) and waste ratio (discarded "
                       "compute/(n·T)) against n, for the fastest partition of each point.",
    "tokens_per_s.png": "Absolute decode speed (tokens/s at batch 1) per scheme against n.",
    "serving_vs_load.png": "Serving against load: TPOT (p99 thick, p50 thin), TTFT p99 and throughput per "
                           "scheme/policy, each at its best stage count and partition for that load. Where the "
                           "lines cross is where speculation stops paying and plain pipelining's throughput wins.",
    "serving_latency_cdf.png": "Per-request TTFT, TPOT and end-to-end latency CDFs (from requests.csv) at a light, "
                               "a middle and the heaviest load, for the same configurations.",
    "utilization.png": "Busy share of the decode window per stage, for the fastest configuration of each "
                       "(scheme, n, α).",
    "where_spd_pays.png": "Where SPD pays: the best SPD or TP×SPD point on g GPUs ÷ the fastest plain tensor "
                          "parallelism (scheme ar, one stage) on at most g GPUs, against g; one line per α, one "
                          "panel per scenario. Above the dashed line SPD beats TP.",
}


def _fmt(value, col: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if col in INTEGER_COLUMNS and value.is_integer():
            return str(int(value))
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.3f}".rstrip("0").rstrip(".") if col in ("acceptance", "α") else f"{value:.3f}"
    return str(value)


def _table(df: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f'<th class="{"" if pd.api.types.is_numeric_dtype(df[c]) else "t"}">{html.escape(c)}</th>'
                   for c in columns)
    body = []
    for _, row in df.iterrows():
        cells = "".join(f'<td class="{"" if pd.api.types.is_numeric_dtype(df[c]) else "t"}">'
                        f"{html.escape(_fmt(row[c], c))}</td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(rel: str, caption: str) -> str:
    return (f'<figure><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" alt="{html.escape(rel)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(df: pd.DataFrame, report: Report, scenario_text: str | None) -> str:
    names = sorted({str(s) for s in df["scenario"].unique() if str(s)})
    title = f"spdsim report — {', '.join(names) or report.out_dir.name}"
    alphas = sorted(speculative(df)["acceptance"].unique())
    summary = (f"{len(df)} simulated points; schemes {', '.join(sorted(df['scheme'].unique()))}; "
               f"stages {', '.join(str(n) for n in sorted(df['stages'].unique()))}; "
               f"partitions {', '.join(sorted(df['partition'].unique()))}; "
               f"α {', '.join(f'{a:g}' for a in alphas) or '—'}.")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(summary)}</p>",
             f"<p class='note'>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by "
             f"<code>spdsim report</code> from <code>results.csv</code>.</p>"]

    from spdsim.plots_serving import is_serving
    if is_serving(df):
        from spdsim.serving_results import format_serving_summary
        parts += ["<h2>Serving</h2>",
                  "<p class='note'>What <code>spdsim run</code> printed: latency percentiles against load per "
                  "scheme/policy (best stages × partition), the crossover, and the best configuration per load. "
                  "Per-request figures are in <code>requests.csv</code>.</p>",
                  f"<pre>{html.escape(format_serving_summary(df))}</pre>"]
    elif alphas:
        best = best_per_alpha(df)
        cols = ["α"] + [c for c in ("acceptance_kind", "scheme", "stages", "partition", "placement", "head_device", "tokens_per_s", "ms_per_token",
                                    "speedup_vs_pp", "speedup_vs_ar", "bubble_ratio", "waste_ratio")
                        if c in best.columns]
        parts += ["<h2>Best configuration per acceptance rate α</h2>",
                  "<p class='note'>Fastest point (tokens/s) over every scheme, stage count, partition and "
                  "placement swept; AR and PP do not depend on α and compete at every α.</p>",
                  _table(best, cols)]

    from spdsim.where import FAMILIES, where_spd_pays
    where = where_spd_pays(df)
    if not where.empty:
        where = where.rename(columns={"acceptance": "α", "spd_vs_tp": "SPD÷TP"})
        parts += ["<h2>Where SPD pays (against tensor parallelism)</h2>",
                  "<p class='note'>For each GPU count, the best tokens/s of each way to use exactly that many "
                  "GPUs: AR (one GPU), TP (plain tensor parallelism), PP, SPD, TP×SPD (SPD over TP groups) and "
                  "SD on TP (sd / chain at one stage); SPD÷TP = the best SPD or TP×SPD point ÷ the fastest "
                  "plain TP on at most that many GPUs (above 1: SPD pays). AR, TP, PP and chain do not depend "
                  "on α.</p>",
                  _table(where, ["scenario", "α", "gpus", *FAMILIES, "SPD÷TP", "fastest"])]

    parts.append("<h2>Plots</h2>")
    for img in report.images:
        parts.append(_figure(img.name, CAPTIONS.get(img.name, img.name)))
    if not report.images:
        parts.append("<p class='note'>Nothing to plot.</p>")

    if report.timelines:
        parts += ["<h2>Timelines</h2>",
                  "<p class='note'>Gantt charts of the first ticks. The full timelines are Chrome trace JSON: "
                  "open them in Perfetto (ui.perfetto.dev → Open trace file) or chrome://tracing; one process "
                  "per device (a track per stage and the speculative module) and an interconnect process "
                  "with a track per link.</p>"]
        for tl in report.timelines:
            if tl.error:
                parts.append(f"<p class='err'>{html.escape(tl.point)}: {html.escape(tl.error)}</p>")
                continue
            link = f' — <a href="{html.escape(tl.chrome.name)}">{html.escape(tl.chrome.name)}</a>' if tl.chrome else ""
            parts.append(f"<h3>{html.escape(tl.point)}{link}</h3>")
            if tl.gantt:
                parts.append(_figure(tl.gantt.name, f"Gantt chart of {tl.point}"))

    if scenario_text is not None:
        parts += ["<h2>Scenario</h2>", f"<pre>{html.escape(scenario_text)}</pre>"]

    ordered = df.sort_values(["scheme", "stages", "partition", "acceptance"], kind="stable", na_position="first")
    parts += ["<h2>All results</h2>", _table(ordered, list(df.columns)), "</body></html>"]
    return "\n".join(parts)
