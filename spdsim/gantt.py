"""A Gantt chart of the first few dozen ticks of one run's trace (simulated or measured).

One row per pipeline stage (its compute), one for the speculative module (head), one for link transfers
(sends) and a control row with verifications. Useful compute is coloured by token position, so a token can be
followed down the pipeline (in a serving trace, where events carry a request, by request, prefill chunks
included); discarded compute (a flush threw it away) is red and hatched; a flush is a
red dashed line across every row.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from statistics import median
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from spdsim.trace import Trace, TraceEvent

DPI = 100
WIDTH_IN = 14.0
DISCARD_FACE, DISCARD_EDGE = "#f6b2b2", "#c0392b"


@dataclass(frozen=True)
class Window:
    start_ns: int
    end_ns: int

    def overlaps(self, ev: TraceEvent) -> bool:
        return ev.end_ns >= self.start_ns and ev.start_ns <= self.end_ns


def first_ticks(events: list[TraceEvent], ticks: int) -> Window:
    """From the first decode compute to the end of stage 0's `ticks`-th decode compute, or `ticks`
    typical ticks (median compute + median send) if sooner: under PP stage 0 computes only once per
    round trip, and a window of its computes would span n times as many ticks."""
    decode = [e for e in events if e.phase == "decode"]
    computes = [e for e in decode if e.kind == "compute"]
    if not computes:
        raise ValueError("trace has no decode compute events")
    start = min(e.start_ns for e in computes)
    first_stage = min(e.stage for e in computes)
    ends = sorted(e.end_ns for e in computes if e.stage == first_stage)
    end = ends[ticks - 1] if len(ends) >= ticks else max(e.end_ns for e in decode)
    sends = [e.duration_ns for e in decode if e.kind == "send"]
    tick = median([e.duration_ns for e in computes]) + (median(sends) if sends else 0)
    if tick > 0:
        end = min(end, start + int(ticks * tick))
    return Window(start, max(end, start + 1))


def _time_unit(span_ns: int) -> tuple[str, float]:
    if span_ns >= 10_000_000:
        return "ms", 1e6
    if span_ns >= 10_000:
        return "µs", 1e3
    return "ns", 1.0


def _rows(trace: Trace, events: list[TraceEvent]) -> list[tuple[str, str]]:
    """(key, label) of every row, top to bottom: stages, module, links, control."""
    placement = trace.header.placement
    stages = sorted({e.stage for e in events if e.kind == "compute" and e.stage >= 0}
                    | set(range(trace.header.stages)))
    rows = []
    for s in stages:
        dev = placement[s] if s < len(placement) else ""
        rows.append((f"stage {s}", f"stage {s}" + (f"\n{dev}" if dev else "")))
    if any(e.kind == "head" for e in events):
        dev = next((e.device for e in events if e.kind == "head" and e.device), "")
        rows.append(("module", "spec. module" + (f"\n{dev}" if dev else "")))
    if any(e.kind == "send" for e in events):
        # One row for every transfer: a topology with a switch has 2n hops, and a row per hop would
        # drown the stages. The Perfetto timeline keeps one track per link.
        rows.append(("links", "link transfers"))
    if any(e.kind in ("verify", "flush") for e in trace.events):
        rows.append(("control", "verify"))
    return rows


def _row_of(ev: TraceEvent) -> str:
    if ev.kind == "compute":
        return f"stage {ev.stage}"
    if ev.kind == "head":
        return "module"
    if ev.kind == "send":
        return "links"
    return "control"


def draw_gantt(trace: Trace, path: str | Path, ticks: int = 36, label: str = "") -> Path:
    """Draw the first `ticks` ticks (see `first_ticks`) and everything that overlaps them to a PNG."""
    from matplotlib import colormaps

    path = Path(path)
    win = first_ticks(trace.events, ticks)
    by_request = any(e.request >= 0 for e in trace.events)      # a serving trace: colour by request
    events = [e for e in trace.events if (e.phase == "decode" or by_request) and win.overlaps(e)]
    rows = _rows(trace, events)
    y_of = {key: i for i, (key, _) in enumerate(rows)}
    unit, scale = _time_unit(win.end_ns - win.start_ns)
    span = (win.end_ns - win.start_ns) / scale
    palette = colormaps["tab20"]

    fig = Figure(figsize=(WIDTH_IN, 1.6 + 0.55 * len(rows)), layout="constrained")
    ax = fig.subplots()

    def x(t_ns: int) -> float:
        return (min(max(t_ns, win.start_ns), win.end_ns) - win.start_ns) / scale

    # Bars are gathered per (row, style) and drawn as one collection each: one artist per bar is slow.
    bars: dict[tuple[int, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    accepts, rejects = [], []
    for ev in events:
        y = y_of.get(_row_of(ev))
        if y is None:
            continue
        x0, x1 = x(ev.start_ns), x(ev.end_ns)
        if ev.kind in ("compute", "head", "send") and x1 > x0:
            cls = "discarded" if ev.discarded else ("send" if ev.kind == "send" else ev.kind)
            if cls in ("compute", "head"):
                key = ev.request if by_request else ev.position
                color = palette((key % 20) / 20 + 0.025) if key >= 0 else (0.3, 0.45, 0.69, 1.0)
                color = color[:3] + ((0.6,) if cls == "head" else (1.0,))
            else:
                color = DISCARD_FACE if cls == "discarded" else "#b0b0b0"
            spans, colors = bars[(y, cls)]
            spans.append((x0, x1 - x0))
            colors.append(color)
            if ev.position >= 0 and ev.kind != "send" and (x1 - x0) > span / 60:
                text = (f"P{ev.request}" if ev.phase == "prefill" else f"{ev.request}:{ev.position}") \
                    if by_request else str(ev.position)
                ax.text((x0 + x1) / 2, y, text, ha="center", va="center", fontsize=6.5, clip_on=True)
        elif ev.kind == "verify":
            (accepts if ev.accepted else rejects).append((x1, y))
        elif ev.kind == "flush":
            ax.axvline(x1, color=DISCARD_EDGE, ls="--", lw=1.0, alpha=0.8)
    for (y, cls), (spans, colors) in bars.items():
        h = 0.4 if cls == "send" else 0.7
        style = {"discarded": dict(edgecolor=DISCARD_EDGE, hatch="////", lw=0.6),
                 "send": dict(edgecolor="#707070", lw=0.4)}.get(cls, dict(edgecolor="black", lw=0.4))
        ax.broken_barh(spans, (y - h / 2, h), facecolors=colors, **style)
    for points, style in ((accepts, dict(marker="^", color="tab:green", ms=6)),
                          (rejects, dict(marker="x", color="tab:red", ms=8, mew=2))):
        if points:
            ax.plot(*zip(*points), ls="none", **style)

    ax.set_yticks(range(len(rows)), [text for _, text in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.4, -0.6)   # stage 0 on top
    ax.set_xlim(0, span)
    ax.set_xlabel(f"time since the first decode tick ({unit})")
    ax.grid(True, axis="x", alpha=0.3)
    h = trace.header
    ax.set_title(f"{label + ': ' if label else ''}{h.scheme}, {h.stages} stages — the first {ticks} ticks "
                 f"(cells: {'request:position, P = prefill' if by_request else 'token position'})", fontsize=10)
    what = "request" if by_request else "position"
    legend = [Patch(facecolor=palette(0.025), edgecolor="black", label=f"useful compute (colour = {what})"),
              Patch(facecolor=DISCARD_FACE, edgecolor=DISCARD_EDGE, hatch="////", label="discarded compute"),
              Patch(facecolor="#b0b0b0", edgecolor="#707070", label="link transfer")]
    if "control" in y_of:
        legend += [Line2D([], [], marker="^", color="tab:green", ls="none", label="draft accepted"),
                   Line2D([], [], marker="x", color="tab:red", ls="none", mew=2, label="draft rejected"),
                   Line2D([], [], color=DISCARD_EDGE, ls="--", label="flush")]
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
