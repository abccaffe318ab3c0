"""Acceptance processes: where the simulator's accept / reject verdicts come from.

  iid      each draft accepted with probability α, independently
  table    one α per stage count (deeper pipelines draft from staler features), i.i.d. within a run
  markov   two states, accept and reject, with stationary mean α and a mean run length of rejections
           (bursty: hard passages reject several drafts in a row)
  replay   a recorded 0/1 sequence (a list, or a file of 0/1 / accept/reject tokens), replayed in order
           and wrapped around when it runs out; `executor validate` replays what it measured
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from spdsim.errors import UserError


@dataclass(frozen=True)
class AcceptanceSpec:
    """One acceptance setting of the sweep: its kind, the mean α it stands for, its parameters."""
    kind: str                           # iid | table | markov | replay
    alpha: float | None                 # mean acceptance (None for replay until loaded)
    run_length: float = 1.0             # markov: mean length of a run of rejections
    sequence: tuple[bool, ...] = ()     # replay
    label: str = ""                     # what the results.csv `acceptance` column shows

    @property
    def value(self) -> float | str:
        return self.alpha if self.alpha is not None else self.label


def _check_alpha(a: object, key: str) -> float:
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        raise UserError(f"{key}: {a!r} is not a number in [0, 1]")
    if not 0.0 <= float(a) <= 1.0:
        raise UserError(f"{key}: {a} is outside [0, 1]")
    return float(a)


def iid(alpha: float) -> AcceptanceSpec:
    return AcceptanceSpec("iid", _check_alpha(alpha, "sweep.acceptance"), label=f"{alpha:g}")


def markov(alpha: float, run_length: float, key: str = "sweep.acceptance") -> AcceptanceSpec:
    alpha = _check_alpha(alpha, f"{key}.mean")
    if not isinstance(run_length, (int, float)) or run_length < 1:
        raise UserError(f"{key}.run_length: must be a number ≥ 1")
    if 0 < alpha < 1 and (1 - alpha) / alpha > run_length:
        # leaving the accept state would need probability > 1
        raise UserError(f"{key}.run_length: {run_length} too short for mean {alpha} "
                        f"(needs ≥ {(1 - alpha) / alpha:.3g})")
    return AcceptanceSpec("markov", alpha, run_length=float(run_length), label=f"{alpha:g}")


def parse_sequence(text: str, key: str) -> tuple[bool, ...]:
    """0/1 digits, or accept/reject (a/r, true/false) tokens, separated by anything."""
    tokens = re.findall(r"[A-Za-z]+|[01]", text)
    out = []
    for t in tokens:
        tl = t.lower()
        if tl in ("1", "a", "accept", "accepted", "true", "yes"):
            out.append(True)
        elif tl in ("0", "r", "reject", "rejected", "false", "no"):
            out.append(False)
        else:
            raise UserError(f"{key}: {t!r} is not an accept/reject mark (use 0/1)")
    if not out:
        raise UserError(f"{key}: empty accept/reject sequence")
    return tuple(out)


def replay(sequence: list | str | None = None, file: str | Path | None = None,
           key: str = "sweep.acceptance", base: Path | None = None) -> AcceptanceSpec:
    if file is not None:
        path = Path(file)
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            seq = parse_sequence(path.read_text(), f"{key}.file")
        except OSError as e:
            raise UserError(f"{key}.file: cannot read {path} ({e.strerror})") from None
        label = f"replay:{path.name}"
    elif sequence is not None:
        if isinstance(sequence, str):
            seq = parse_sequence(sequence, f"{key}.sequence")
        else:
            seq = parse_sequence(" ".join(str(int(bool(x))) if isinstance(x, (bool, int)) else str(x)
                                          for x in sequence), f"{key}.sequence")
        label = "replay"
    else:
        raise UserError(f"{key}: replay needs `file:` or `sequence:`")
    return AcceptanceSpec("replay", sum(seq) / len(seq), sequence=seq, label=label)


def exact_count(alpha: float, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` verdicts with exactly round(α·length) accepts, in random order."""
    k = int(round(alpha * length))
    return rng.permutation(np.arange(length) < k)


def sampler(spec: AcceptanceSpec, rng: np.random.Generator, exact_over: int | None = None) -> Callable[[], bool]:
    """A zero-argument callable returning the next verdict (what SpdController.on_result asks).

    `exact_over` = L (i.i.d. kinds): the first L verdicts hold exactly round(α·L) accepts in random
    order, later ones are i.i.d. Why: a run of N tokens verifies N − 1 drafts whatever n is, and N − 1
    i.i.d. draws realise α only to within ±1/√N (α = 0.6 came out 0.537 over 256 tokens, so the speedup
    plotted at "0.6" was that of 0.537). With the exact count the point is simulated at the α asked
    for, and every n and partitioner at one α still sees the same sequence (fair comparisons)."""
    if spec.kind in ("iid", "table"):
        alpha = float(spec.alpha)
        draw = rng.random
        if exact_over:
            head = exact_count(alpha, exact_over, rng).tolist()
            i = [0]

            def nxt_exact() -> bool:
                j = i[0]
                i[0] = j + 1
                return head[j] if j < len(head) else draw() < alpha
            return nxt_exact
        return lambda: draw() < alpha
    if spec.kind == "markov":
        alpha = float(spec.alpha)
        if alpha in (0.0, 1.0):
            return lambda: alpha == 1.0
        leave_reject = 1.0 / spec.run_length                 # reject → accept
        leave_accept = leave_reject * (1 - alpha) / alpha    # accept → reject; stationary mean α
        state = [rng.random() < alpha]                       # start in the stationary distribution

        def nxt() -> bool:
            current = state[0]
            flip = leave_accept if current else leave_reject
            if rng.random() < flip:
                state[0] = not current
            return current
        return nxt
    if spec.kind == "replay":
        seq = spec.sequence
        i = [0]

        def nxt_replay() -> bool:
            v = seq[i[0] % len(seq)]
            i[0] += 1
            return v
        return nxt_replay
    raise ValueError(f"unknown acceptance kind {spec.kind!r}")
