"""The trace schema (DESIGN §6): one home for the events that the executor measures and the simulator predicts.

A trace is a JSON-lines file: the first line is a header (`{"type": "header", ...}` with the run's
configuration), every other line one event. The executor writes one file per rank
(`rank<k>.jsonl`) with clocks already aligned across ranks; the simulator can write one file for the
whole run. `read_trace` merges everything in a directory (or reads one file).

Event kinds:
  compute  a stage's forward for one token position (or the prefill chunk, phase="prefill")
  send     an activation / feature / control message on a link; `bytes` is set
  head     the speculative module drafting one token
  verify   the check of a drafted token against the true one; `accepted` is set
  flush    a rejection discarding every in-flight position > `position` (instant: start == end)
  commit   a token becoming final (instant); the N-th commit ends the decode window of DESIGN §3
  allreduce  a tensor-parallel all-reduce (or the LM head's all-gather, name="allgather") of one stage's
           TP group, inside that stage's compute event; `bytes` is the message, `tp_rank` the rank

Times are integer nanoseconds on one clock per trace (the simulator's clock starts at 0).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
EVENT_KINDS = ("compute", "send", "head", "verify", "flush", "commit", "allreduce")
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class TraceEvent:
    kind: str
    start_ns: int
    end_ns: int
    stage: int = -1            # 0-based pipeline stage; -1 where none applies (the head, a commit)
    device: str = ""           # the device (simulator) or rank (executor, "rank<k>") it ran on
    position: int = -1         # token position it concerns; -1 where none applies
    bytes: int = 0             # payload of a send
    discarded: bool = False    # compute/send whose result a flush threw away (DESIGN §3 waste)
    accepted: bool | None = None  # verify only
    phase: str = "decode"      # "prefill" events are excluded from decode metrics
    name: str = ""             # free label (link name, message type, ...)
    tp_rank: int = 0           # the rank's place in its stage's TP group (DESIGN §2); 0 without TP
    request: int = -1          # the request it serves (serving runs); -1 for a single decode

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown trace event kind {self.kind!r} (expected one of {EVENT_KINDS})")
        if self.phase not in PHASES:
            raise ValueError(f"unknown trace phase {self.phase!r}")
        if self.end_ns < self.start_ns:
            raise ValueError(f"trace event ends before it starts: {self}")

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @classmethod
    def trusted(cls, **values: Any) -> "TraceEvent":
        """An event from code that only ever makes valid ones (the simulator's event log): the same
        object, without the checks of __post_init__ (a sweep point builds thousands)."""
        ev = object.__new__(cls)
        d = ev.__dict__
        d.update(_DEFAULTS)
        d.update(values)
        return ev

    def to_json(self) -> dict[str, Any]:
        # Defaults are left out to keep traces small; from_json restores them.
        out: dict[str, Any] = {"kind": self.kind, "start_ns": self.start_ns, "end_ns": self.end_ns}
        for f in fields(self)[3:]:
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TraceEvent":
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known - {"type"}
        if unknown:
            raise ValueError(f"unknown trace event field(s) {sorted(unknown)}")
        return cls(**{k: v for k, v in obj.items() if k != "type"})


_DEFAULTS = {f.name: f.default for f in fields(TraceEvent)[3:]}


@dataclass
class TraceHeader:
    """The run's configuration, written as the first line of every trace file."""
    scheme: str
    stages: int
    new_tokens: int
    source: str = "simulator"                         # "simulator" | "executor"
    partition: list[list[int]] = field(default_factory=list)  # [first_layer, last_layer_exclusive] per stage
    placement: list[str] = field(default_factory=list)  # device of each stage
    prompt_tokens: int = 0
    model: str = ""
    device_kind: str = ""                             # "cpu", "cuda", a catalog GPU name, ...
    rank: int | None = None                           # executor: the rank that wrote this file
    tp: int = 1                                       # ranks (GPUs) per stage: its TP group
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"type": "header", **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TraceHeader":
        data = {k: v for k, v in obj.items() if k != "type"}
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"trace schema version {data.get('schema_version')} is not {SCHEMA_VERSION}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Trace:
    header: TraceHeader
    events: list[TraceEvent]


def write_trace(path: str | Path, header: TraceHeader, events: Iterable[TraceEvent]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(header.to_json()) + "\n")
        for ev in events:
            f.write(json.dumps(ev.to_json()) + "\n")
    return path


def _read_file(path: Path) -> Trace:
    header, events = None, []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if obj.get("type") == "header":
                header = TraceHeader.from_json(obj)
            else:
                try:
                    events.append(TraceEvent.from_json(obj))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
    if header is None:
        raise ValueError(f"{path}: no header line")
    return Trace(header, events)


def read_trace(path: str | Path) -> Trace:
    """Read one trace file, or merge every `*.jsonl` in a directory (one per rank) into one trace.

    The merged header is rank 0's (or the first file's), with `rank` cleared."""
    path = Path(path)
    if path.is_file():
        return _read_file(path)
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise ValueError(f"{path}: no trace files (*.jsonl)")
    parts = [_read_file(p) for p in files]
    headers = [t.header for t in parts]
    header = next((h for h in headers if h.rank == 0), headers[0])
    header.rank = None
    events = sorted((ev for t in parts for ev in t.events), key=lambda e: (e.start_ns, e.end_ns))
    return Trace(header, events)


# --- Chrome / Perfetto export ------------------------------------------------------------------
# One process per device, one thread (track) per stage / the speculative module on it; named links
# (the topology's hops) get one track each in an "interconnect" process, so every message that shares a
# link, whichever stage sent it, lands on the same track and contention shows.
# Useful and discarded compute get different names and colours; flush and verify are instant events.

INTERCONNECT = "interconnect"


def _track(ev: TraceEvent) -> tuple[str, int]:
    """(track name, sort index): stages in pipeline order, then the module, links, control."""
    if ev.kind == "compute":
        return f"stage {ev.stage}", ev.stage
    if ev.kind == "send":
        return (f"link {ev.name}" if ev.name else f"send from stage {ev.stage}"), 2000 + max(ev.stage, 0)
    if ev.kind == "head":
        return "speculative module", 1000
    return "control", 3000


def to_chrome_trace(trace: Trace) -> dict[str, Any]:
    """Chrome trace-event JSON (open in https://ui.perfetto.dev or chrome://tracing)."""
    pids: dict[str, int] = {}
    tids: dict[tuple[int, str], int] = {}
    out: list[dict[str, Any]] = []

    def ids(device: str, track: tuple[str, int]) -> tuple[int, int]:
        device = device or "host"
        if device not in pids:
            pids[device] = len(pids) + 1
            out.append({"ph": "M", "name": "process_name", "pid": pids[device], "tid": 0,
                        "args": {"name": device}})
            out.append({"ph": "M", "name": "process_sort_index", "pid": pids[device], "tid": 0,
                        "args": {"sort_index": 10_000 if device == INTERCONNECT else pids[device]}})
        pid, (name, order) = pids[device], track
        if (pid, name) not in tids:
            tids[(pid, name)] = len(tids) + 1
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tids[(pid, name)],
                        "args": {"name": name}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tids[(pid, name)],
                        "args": {"sort_index": order}})
        return pid, tids[(pid, name)]

    for ev in trace.events:
        pid, tid = ids(INTERCONNECT if ev.kind == "send" and ev.name else ev.device, _track(ev))
        args: dict[str, Any] = {"position": ev.position, "stage": ev.stage, "phase": ev.phase}
        if ev.request >= 0:
            args["request"] = ev.request
        if ev.bytes:
            args["bytes"] = ev.bytes
        if ev.accepted is not None:
            args["accepted"] = ev.accepted
        if ev.discarded:
            args["discarded"] = True
        ts_us = ev.start_ns / 1000.0
        if ev.kind in ("flush", "verify", "commit"):
            # Control decisions are points in time (the verdict is known at end_ns); a measured duration,
            # if any, is kept in args.
            if ev.duration_ns:
                args["dur_us"] = ev.duration_ns / 1000.0
            label = ev.kind if ev.accepted is None else f"{ev.kind} {'accept' if ev.accepted else 'reject'}"
            out.append({"ph": "i", "s": "t", "name": label, "pid": pid, "tid": tid, "ts": ev.end_ns / 1000.0,
                        "args": args})
            continue
        if ev.request >= 0:     # serving: one name per request, so the viewers colour slices by request
            name = f"{ev.kind} r{ev.request}" + (" prefill" if ev.phase == "prefill" else "")
        else:
            name = f"{ev.kind} p{ev.position}" if ev.position >= 0 else ev.kind
        event = {"ph": "X", "name": name + (" (discarded)" if ev.discarded else ""), "cat": ev.kind,
                 "pid": pid, "tid": tid, "ts": ts_us, "dur": ev.duration_ns / 1000.0, "args": args}
        if ev.discarded:
            event["cname"] = "terrible"   # a red in the trace viewers' palette
        out.append(event)
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {k: v for k, v in trace.header.to_json().items() if k != "type"}}


def write_chrome_trace(path: str | Path, trace: Trace) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_chrome_trace(trace)))
    return path
