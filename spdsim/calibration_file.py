"""The calibrated cost model and its file: `CalibratedCosts`, the `spdsim.costs.CostModel` a scenario
gets when it names `calibration: CALIB.yaml` (written by `spdsim calibrate`, fitted in
`spdsim.calibrate`), how it is read and written, and the compute regimes it distinguishes.
This module must not import torch, and imports nothing that simulates.

Tensor parallelism: tp = 1 costs exactly as without TP. A point with tp > 1 needs the file's optional
`tp:` section (which `spdsim calibrate` will write from the executor's TP profile), else a UserError
naming `calibration`:

    tp:
      allreduce: {latency_us: 45.0, gbps: 0.4}   # one all-reduce of n bytes: latency + n / bandwidth
      allgather: {latency_us: 50.0, gbps: 0.4}   # the LM head's logits all-gather (n = the whole row)
      layer_scale: {2: 0.62, 4: 0.40}            # a layer's time at TP t ÷ at TP 1 on the profiled host

A TP stage forward then costs its layers × layer_scale[t] (the LM head scales the same way; the
embedding is replicated and does not), under the point's regime as at TP 1, plus two all-reduces of
the hidden state per layer and, on the last stage, the all-gather of the logits row (measured on the
host, so the topology does not enter). The message sizes come from the scenario's model shape
(`spdsim.cost_choice` sets `model`)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spdsim.errors import UserError
from spdsim.jitter import Jitter
from spdsim.models import ModelShape


CALIBRATION_KIND = "spdsim-calibration"
VERSION = 1


# --- the calibrated cost model ------------------------------------------------------------------------

@dataclass(frozen=True)
class TpCalibration:
    """The `tp:` section: collectives measured on the profiled host and the TP layer-time factors."""
    allreduce_latency_s: float
    allreduce_bandwidth: float            # bytes / s
    allgather_latency_s: float
    allgather_bandwidth: float
    layer_scale: dict[int, float]

    def to_yaml_dict(self) -> dict:
        return {"allreduce": {"latency_us": self.allreduce_latency_s * 1e6, "gbps": self.allreduce_bandwidth / 1e9},
                "allgather": {"latency_us": self.allgather_latency_s * 1e6, "gbps": self.allgather_bandwidth / 1e9},
                "layer_scale": {int(k): float(v) for k, v in self.layer_scale.items()}}

    @classmethod
    def from_yaml_dict(cls, d: dict, where: str) -> "TpCalibration":
        try:
            ar, ag = d["allreduce"], d.get("allgather") or d["allreduce"]
            tp = cls(allreduce_latency_s=float(ar["latency_us"]) * 1e-6, allreduce_bandwidth=float(ar["gbps"]) * 1e9,
                     allgather_latency_s=float(ag["latency_us"]) * 1e-6, allgather_bandwidth=float(ag["gbps"]) * 1e9,
                     layer_scale={int(k): float(v) for k, v in (d.get("layer_scale") or {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: malformed tp section ({e.__class__.__name__}: {e}; expected allreduce: "
                            "{latency_us, gbps}, allgather: {latency_us, gbps}, layer_scale: {T: factor})") from None
        if min(tp.allreduce_latency_s, tp.allgather_latency_s) < 0 or min(tp.allreduce_bandwidth, tp.allgather_bandwidth) <= 0 \
                or any(v <= 0 for v in tp.layer_scale.values()):
            raise UserError(f"{where}: tp section has a negative time, a non-positive bandwidth or layer_scale")
        return tp


@dataclass
class CalibratedCosts:
    """`spdsim.costs.CostModel` from a calibration file. Times in seconds."""
    layer_a_s: float
    layer_b_s: float                      # per token of context
    embed_s_: float
    lm_head_s_: float
    head_s_by_kind: dict[str, float]
    link_latency_s: float
    link_bandwidth: float                 # bytes / s
    tick_overhead_s: float = 0.0
    msg_overhead_s: float = 0.0
    send_block_s: float = 0.0             # the first rank's blocking ACT send (spdsim.kernel charges it)
    contention: float = 1.0               # κ, already folded into the figures above
    # Compute slowdown per regime relative to κ: 'single' (one rank), 'serial' (PP: one rank computes at a
    # time), 'overlapped' (SPD: ranks compute at once and share the cores), 'drafting' (SPD beside a trained
    # drafter on the first rank). for_point picks one.
    contention_by: dict[str, float] = field(default_factory=dict)
    scale: float = 1.0                    # the picked regime's factor (applies to every compute cost)
    role_scale: dict[str, float] = field(default_factory=dict)   # ... per stage role, where measured
    # tick_overhead_s per regime, where measured; '<regime>:first' is SPD's first rank (calibrate.first_rank_gaps)
    tick_by: dict[str, float] = field(default_factory=dict)
    first_tick_overhead_s: float | None = None   # the picked regime's first-rank tick (None: tick_overhead_s)
    msg_by: dict[str, float] = field(default_factory=dict)    # msg_overhead_s per regime, where measured
    jitter_by: dict[str, Jitter] = field(default_factory=dict)   # forward variability per regime
    jitter: Jitter | None = None          # the picked regime's (None: every forward costs its mean)
    head_kind: str = "oracle"             # which drafter head_s stands for
    source: dict = field(default_factory=dict)
    # serving: a prompt chunk of T tokens costs prefill_a_s + prefill_b_s · T per layer, plus
    # prefill_embed_a_s + prefill_embed_b_s · T on the first stage (`executor profile`'s prefill sweep);
    # None: not measured (an older file)
    prefill: tuple[float, float, float, float] | None = None
    tp_calibration: TpCalibration | None = None   # the file's `tp:` section (module docstring)
    model: ModelShape | None = None       # the scenario's shape: TP message sizes (set by cost_choice)
    tp: int = 1                           # the TP degree for_point bound (1: exactly as without TP)

    # --- TP ---
    def _layer_scale(self) -> float:
        return self.tp_calibration.layer_scale[self.tp] if self.tp > 1 else 1.0

    def _allreduce_s(self) -> float:
        c = self.tp_calibration
        return c.allreduce_latency_s + self.model.activation_bytes / c.allreduce_bandwidth

    def _allgather_s(self) -> float:
        c = self.tp_calibration
        return c.allgather_latency_s + self.model.logits_bytes / c.allgather_bandwidth

    def stage_allreduce_s(self, stage: int, first_layer: int, last_layer: int, last: bool) -> float:
        if self.tp == 1:
            return 0.0
        return 2 * (last_layer - first_layer) * self._allreduce_s() + (self._allgather_s() if last else 0.0)

    def with_tp(self, tp: int, groups=None) -> "CalibratedCosts":
        """Bound to TP tp (groups: unused, the collectives were measured on the host)."""
        from dataclasses import replace
        if tp == 1:
            return replace(self, tp=1)
        c = self.tp_calibration
        profiled = self.source.get("profile") or self.source.get("trace_dir") or "the profile"
        if c is None:
            raise UserError(f"calibration: tp = {tp} needs the file's tp section (all-reduce, all-gather and "
                            f"TP layer figures from a TP profile of this host); {profiled} has none")
        if tp not in c.layer_scale:
            raise UserError(f"calibration: tp section has no layer_scale for tp = {tp} "
                            f"(profiled: {', '.join(map(str, sorted(c.layer_scale))) or 'none'})")
        if self.model is None:
            raise UserError("calibration: a TP point needs the model shape (use spdsim.cost_choice.cost_model)")
        return replace(self, tp=tp)

    def layer_s(self, layer: int, ctx: int) -> float:
        if self.tp > 1:
            return self.scale * self._layer_scale() * (self.layer_a_s + self.layer_b_s * ctx) + 2 * self._allreduce_s()
        return self.scale * (self.layer_a_s + self.layer_b_s * ctx)

    def embed_s(self) -> float:
        return self.scale * self.embed_s_

    def lm_head_s(self) -> float:
        if self.tp > 1:
            return self.scale * self._layer_scale() * self.lm_head_s_ + self._allgather_s()
        return self.scale * self.lm_head_s_

    def head_s(self, ctx: int) -> float:
        by = self.head_s_by_kind
        return by.get(self.head_kind, by.get("oracle", 0.0))

    def verify_s(self) -> float:
        return self.lm_head_s_

    def draft_s(self, ctx: int) -> float:
        return self.head_s(ctx)

    def control_s(self) -> float:      # spd_dedicated's phases: not profiled (the executor runs it, validate does not)
        return 0.0

    def sync_s(self) -> float:
        return 0.0

    def stage_s(self, stage: int, first_layer: int, last_layer: int, ctx: int, first: bool, last: bool) -> float:
        if self.tp > 1:
            k = self._layer_scale()
            t = _micro_stage_s(k * self.layer_a_s, k * self.layer_b_s, self.embed_s_, k * self.lm_head_s_,
                               (first_layer, last_layer), ctx, first, last)
            return (t * self.role_scale.get(stage_role(first, last), self.scale)
                    + self.stage_allreduce_s(stage, first_layer, last_layer, last))
        t = _micro_stage_s(self.layer_a_s, self.layer_b_s, self.embed_s_, self.lm_head_s_, (first_layer, last_layer),
                           ctx, first, last)
        return t * self.role_scale.get(stage_role(first, last), self.scale)

    def hop_s(self, u: str, v: str, nbytes: int) -> tuple[float, float]:
        return nbytes / self.link_bandwidth, self.link_latency_s

    # serving (workload.arrivals): prefill chunks from `executor profile`'s prefill sweep; batched ticks
    # are not measured yet
    def prefill_s(self, stage: int, first_layer: int, last_layer: int, tokens: int, ctx: int,
                  first: bool, last: bool) -> float:
        """A chunk of `tokens` prompt positions through one stage (from position 0, as the executor
        prefills: a chunk at ctx > 0 would attend to ctx more cached positions, not modelled here)."""
        if tokens <= 0:
            return 0.0
        if self.prefill is None:
            raise UserError("calibration: this calibration file has no prefill measurements (written before "
                            "`executor profile` measured prefill): profile and calibrate again, or use the "
                            "roofline (calibration: null)")
        a, b, ea, eb = self.prefill
        nl = last_layer - first_layer
        t = nl * (a + b * tokens) * self._layer_scale() + ((ea + eb * tokens) if first else 0.0)
        t *= self.role_scale.get(stage_role(first, last), self.scale)
        if self.tp > 1:     # two all-reduces of the chunk's hidden states per layer
            c = self.tp_calibration
            t += 2 * nl * (c.allreduce_latency_s + tokens * self.model.activation_bytes / c.allreduce_bandwidth)
        return t

    def batch_stage_s(self, stage: int, first_layer: int, last_layer: int, ctxs, first: bool, last: bool) -> float:
        if len(ctxs) == 1:
            return self.stage_s(stage, first_layer, last_layer, ctxs[0], first, last)
        raise UserError("calibration: a calibration file has no batched measurements; serving.max_batch > 1 "
                        "needs the roofline (calibration: null)")

    def batch_head_s(self, ctxs) -> float:
        if len(ctxs) == 1:
            return self.head_s(ctxs[0])
        raise UserError("calibration: a calibration file has no batched measurements; serving.max_batch > 1 "
                        "needs the roofline (calibration: null)")

    def with_head(self, kind: str) -> "CalibratedCosts":
        from dataclasses import replace
        return replace(self, head_kind=kind)

    def for_point(self, scheme: str, stages: int, tp: int = 1, groups=None) -> "CalibratedCosts":
        """The costs of one simulated point: the compute regime its scheme runs in on the profiled host
        (and, for tp > 1, the file's TP figures)."""
        if tp > 1:
            return self.with_tp(tp).for_point(scheme, stages)
        from dataclasses import replace
        regime = regime_of(scheme, stages, self.head_kind)
        if regime == "drafting" and "drafting" not in self.contention_by:
            regime = "overlapped"           # calibrated without a trained drafter: the nearest regime
        roles = {r: self.contention_by[f"{regime}:{r}"] for r in ("only", "first", "middle", "last")
                 if f"{regime}:{r}" in self.contention_by}
        return replace(self, scale=self.contention_by.get(regime, 1.0), role_scale=roles,
                       jitter=self.jitter_by.get(regime),
                       tick_overhead_s=self.tick_by.get(regime, self.tick_overhead_s),
                       first_tick_overhead_s=self.tick_by.get(f"{regime}:first"),
                       msg_overhead_s=self.msg_by.get(regime, self.msg_overhead_s))

    # --- file form ---
    def to_yaml_dict(self, fit_error: dict | None = None) -> dict:
        return {"kind": CALIBRATION_KIND, "version": VERSION,
                "layer": {"a_ms": self.layer_a_s * 1e3, "b_us_per_ctx": self.layer_b_s * 1e6},
                "embed_ms": self.embed_s_ * 1e3, "lm_head_ms": self.lm_head_s_ * 1e3,
                "head_ms": {k: v * 1e3 for k, v in self.head_s_by_kind.items()},
                "link": {"latency_us": self.link_latency_s * 1e6, "gbps": self.link_bandwidth / 1e9},
                "tick_overhead_ms": self.tick_overhead_s * 1e3, "msg_overhead_ms": self.msg_overhead_s * 1e3,
                "send_block_ms": self.send_block_s * 1e3,
                "contention": self.contention, "contention_by": dict(self.contention_by),
                "tick_by_ms": {k: v * 1e3 for k, v in self.tick_by.items()},
                "jitter_by": {k: v.to_dict() for k, v in self.jitter_by.items()},
                "msg_by_ms": {k: v * 1e3 for k, v in self.msg_by.items()},
                **({"prefill": {"a_ms": self.prefill[0] * 1e3, "b_us_per_token": self.prefill[1] * 1e6,
                                "embed_a_ms": self.prefill[2] * 1e3, "embed_b_us_per_token": self.prefill[3] * 1e6}}
                   if self.prefill is not None else {}),
                "fit_error_pct": fit_error or {}, "source": self.source,
                **({"tp": self.tp_calibration.to_yaml_dict()} if self.tp_calibration is not None else {})}

    @classmethod
    def from_yaml_dict(cls, d: dict, where: str = "calibration") -> "CalibratedCosts":
        if not isinstance(d, dict) or d.get("kind") != CALIBRATION_KIND:
            raise UserError(f"{where}: not a `spdsim calibrate` file (kind: {CALIBRATION_KIND} missing)")
        try:
            link = d["link"]
            costs = cls(layer_a_s=float(d["layer"]["a_ms"]) * 1e-3,
                        layer_b_s=float(d["layer"].get("b_us_per_ctx", 0.0)) * 1e-6,
                        embed_s_=float(d.get("embed_ms", 0.0)) * 1e-3,
                        lm_head_s_=float(d.get("lm_head_ms", 0.0)) * 1e-3,
                        head_s_by_kind={str(k): float(v) * 1e-3 for k, v in (d.get("head_ms") or {}).items()},
                        link_latency_s=float(link["latency_us"]) * 1e-6,
                        link_bandwidth=float(link["gbps"]) * 1e9,
                        tick_overhead_s=float(d.get("tick_overhead_ms", 0.0)) * 1e-3,
                        msg_overhead_s=float(d.get("msg_overhead_ms", 0.0)) * 1e-3,
                        send_block_s=float(d.get("send_block_ms", 0.0)) * 1e-3,
                        contention=float(d.get("contention", 1.0)),
                        contention_by={str(k): float(v) for k, v in (d.get("contention_by") or {}).items()},
                        tick_by={str(k): float(v) * 1e-3 for k, v in (d.get("tick_by_ms") or {}).items()},
                        jitter_by={str(k): Jitter.from_dict(v) for k, v in (d.get("jitter_by") or {}).items()},
                        msg_by={str(k): float(v) * 1e-3 for k, v in (d.get("msg_by_ms") or {}).items()},
                        source=dict(d.get("source") or {}),
                        tp_calibration=(TpCalibration.from_yaml_dict(d["tp"], where) if d.get("tp") else None),
                        prefill=None if not d.get("prefill") else (
                            float(d["prefill"]["a_ms"]) * 1e-3, float(d["prefill"].get("b_us_per_token", 0.0)) * 1e-6,
                            float(d["prefill"].get("embed_a_ms", 0.0)) * 1e-3,
                            float(d["prefill"].get("embed_b_us_per_token", 0.0)) * 1e-6))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: malformed calibration ({e.__class__.__name__}: {e})") from None
        if costs.link_bandwidth <= 0 or min(costs.layer_a_s, costs.tick_overhead_s, costs.msg_overhead_s,
                                            costs.link_latency_s) < 0:
            raise UserError(f"{where}: negative time or non-positive bandwidth")
        return costs


def load_calibration(path: str | Path, head_kind: str = "oracle") -> CalibratedCosts:
    """The file's cost model, head_s standing for the `head_kind` drafter (oracle | head). Cached per
    file version: a sweep asks for the cost model once per point."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as e:
        raise UserError(f"calibration: cannot read {path} ({e.strerror})") from None
    return _load(str(path.resolve()), mtime).with_head(head_kind)


@functools.lru_cache(maxsize=16)
def _load(path_str: str, mtime: int) -> CalibratedCosts:
    path = Path(path_str)
    try:
        d = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"calibration: cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError:
        raise UserError(f"calibration: {path} is not valid YAML") from None
    return CalibratedCosts.from_yaml_dict(d, f"calibration {path}")


def _micro_stage_s(a: float, b: float, embed: float, lm_head: float, layers: tuple[int, int], ctx: int,
                   first: bool, last: bool) -> float:
    """A stage's forward from the microbenchmark fits alone (no contention factor): the one formula
    `CalibratedCosts.stage_s` scales and `calibrate` divides run forwards by."""
    return (layers[1] - layers[0]) * (a + b * ctx) + (embed if first else 0.0) + (lm_head if last else 0.0)


def stage_role(first: bool, last: bool) -> str:
    return "only" if first and last else "first" if first else "last" if last else "middle"


def regime_of(scheme: str, stages: int, drafter: str = "oracle") -> str:
    """How a scheme's ranks use the host's cores: one rank, one at a time, several at once, or several at
    once beside a trained drafter (SPD's first rank runs the module between its forwards; on shared cores
    that slows the ranks unevenly: rank 1's forward took 0.4-1.0 ms longer than rank 0's with the module,
    -0.1 to +0.3 ms without, so pooling the two put a false asymmetry into oracle points)."""
    if stages == 1:
        return "single"
    if scheme not in ("spd", "spd_dedicated"):
        return "serial"
    return "drafting" if scheme == "spd" and drafter not in ("", "oracle") else "overlapped"


def write_calibration(path: Path, costs: CalibratedCosts, err: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else round(float(v), 3)) for k, v in err.items()}
    path.write_text("# written by `spdsim calibrate`; name it under `calibration:` in a scenario\n"
                    + yaml.safe_dump(costs.to_yaml_dict(clean), sort_keys=False))
    return path
