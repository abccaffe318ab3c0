"""A GPU's roofline, fitted: the calibration file `benchmarks/gpu_check.py` writes (`kind: gpu-roofline`)
and what a scenario gets when it names one (`hardware.gpu: h200` + `calibration: calibrations/h200.yaml`).

The fit is the roofline's own parameters, so it applies to any model shape on that GPU:
    layer time = (layer bytes + ctx · KV bytes per token) / (HBM bandwidth · hbm_efficiency) + layer_overhead
fitted by least squares on relative error over the per-layer decode times the check measured across shapes
and contexts, once with CUDA graphs and once eager (`fits.graphs`, `fits.eager`; `mode` says which the
simulator uses). At batch 1 every decode layer is memory-bound (≈ 1 FLOP per byte against the hundreds
a GPU's ridge point sits at), so the FLOP term of `RooflineCosts` is left as it is. Measured
point-to-point (`link`) and all-reduce (`allreduce`) latency and bandwidth are stored when the check ran
on ≥ 2 GPUs; `link` replaces the catalog's link figures of `full`, `ring` and `nvswitch` topologies
(those the scenario did not set itself); `allreduce` is recorded for the tensor-parallel cost model.

    kind: gpu-roofline
    version: 1
    gpu: h200                          # the catalog entry the efficiency is relative to
    gpu_spec: {name: h200, mem_gb: 141, hbm_gbps: 4800, bf16_tflops: 989, ...}   # its numbers as fitted
    mode: graphs                       # graphs | eager
    fits:
      graphs: {hbm_efficiency: 0.83, layer_overhead_us: 6.1, fit_error_pct: 2.0, points: 18}
      eager:  {hbm_efficiency: 0.80, layer_overhead_us: 95.0, fit_error_pct: 9.0, points: 18}
    link: {latency_us: 4.1, gbps: 370.0}          # optional
    allreduce: {latency_us: 9.0, gbps: 300.0}     # optional
    source: {...}                      # device name, torch version, command, date

No torch here: the simulator reads this file without the executor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from spdsim.costs import CostOverrides, RooflineCosts
from spdsim.errors import UserError
from spdsim.hardware import GPU, GPU_CATALOG, Hardware, Topology, TopologySpec, build_topology, default_topology_params
from spdsim.models import ModelShape

KIND = "gpu-roofline"
VERSION = 1
MODES = ("graphs", "eager")
# topology kinds whose link figures a measured GPU→GPU link replaces: per hop (latency, bandwidth) as a
# function of the measured end-to-end (latency, bandwidth): a direct link, or two store-and-forward hops
# through a switch (spdsim/hardware.py: each holds the link bytes / bandwidth, then pays its latency).
LINK_HOPS = {"full": 1, "ring": 1, "nvswitch": 2}


def catalog_gpu_for(device_name: str) -> str | None:
    """The GPU_CATALOG entry for a CUDA device name (`torch.cuda.get_device_name`), None when there is none.
    The catalog's H100 and A100 are the SXM parts: a PCIe or NVL card has other memory bandwidth."""
    n = device_name.upper().replace("-", " ")
    if "H200" in n:
        return "h200"
    if "H100" in n and "PCIE" not in n and "NVL" not in n:
        return "h100-sxm"
    if "A100" in n and "80GB" in n.replace(" ", "") and "PCIE" not in n:
        return "a100-80gb-sxm"
    if "L40S" in n:
        return "l40s"
    return None


@dataclass(frozen=True)
class RooflineFit:
    hbm_efficiency: float
    layer_overhead_us: float
    fit_error_pct: float = float("nan")       # relative RMS of the fit against its points
    points: int = 0
    note: str = ""                            # how the fit fell back, if it did

    def to_dict(self) -> dict:
        d = {"hbm_efficiency": self.hbm_efficiency, "layer_overhead_us": self.layer_overhead_us,
             "fit_error_pct": self.fit_error_pct, "points": self.points}
        return d | ({"note": self.note} if self.note else {})


@dataclass(frozen=True)
class LinkFit:
    latency_us: float
    gbps: float
    fit_error_pct: float = float("nan")

    def to_dict(self) -> dict:
        return {"latency_us": self.latency_us, "gbps": self.gbps, "fit_error_pct": self.fit_error_pct}


def _rel_rms(pred: Sequence[float], meas: Sequence[float]) -> float:
    r = [(p - m) / m for p, m in zip(pred, meas) if m > 0]
    return 100.0 * math.sqrt(sum(x * x for x in r) / len(r)) if r else float("nan")


def _fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(a, b) ≥ 0 minimising Σ ((a + b·x − y) / y)²: least squares on relative error (the CSV's error_pct),
    so the small layers weigh as much as the large ones. A negative intercept is clamped to 0 (fit through
    the origin); a non-positive slope raises ValueError (the points do not grow with the bytes)."""
    if len(x) < 2 or len(set(x)) < 2:
        raise ValueError("need points at two or more distinct byte counts")
    w = [1.0 / (v * v) for v in y]
    s1 = sum(w)
    sx = sum(wi * xi for wi, xi in zip(w, x))
    sxx = sum(wi * xi * xi for wi, xi in zip(w, x))
    sy = sum(wi * yi for wi, yi in zip(w, y))
    sxy = sum(wi * xi * yi for wi, xi, yi in zip(w, x, y))
    det = s1 * sxx - sx * sx
    a, b = (sxx * sy - sx * sxy) / det, (s1 * sxy - sx * sy) / det
    if a < 0:
        a, b = 0.0, sxy / sxx
    if b <= 0:
        raise ValueError("time does not grow with bytes moved: no bandwidth to fit")
    return a, b


def fit_roofline(bytes_moved: Sequence[float], seconds: Sequence[float], hbm_gbps: float,
                 fallback_efficiency: float | None = None) -> RooflineFit:
    """hbm_efficiency and layer_overhead_us from per-layer decode times against the bytes each layer
    streams (weights + ctx · KV bytes), relative to the GPU's `hbm_gbps`. When the times do not grow with
    the bytes (one small shape, noise larger than the context's effect) and `fallback_efficiency` is
    given, the efficiency stays at it and only the overhead is fitted (the fit's `note` says so)."""
    try:
        a, b = _fit_line(bytes_moved, seconds)
        note = ""
    except ValueError:
        if fallback_efficiency is None:
            raise
        b = 1.0 / (hbm_gbps * 1e9 * fallback_efficiency)
        # the overhead minimising Σ ((a + b·x − y) / y)²  at that b, ≥ 0
        w = [1.0 / (y * y) for y in seconds]
        a = max(0.0, sum(wi * (y - b * x) for wi, x, y in zip(w, bytes_moved, seconds)) / sum(w))
        note = f"times do not grow with bytes: efficiency kept at {fallback_efficiency:g}, overhead fitted"
    pred = [a + b * x for x in bytes_moved]
    return RooflineFit(hbm_efficiency=1.0 / (b * hbm_gbps * 1e9), layer_overhead_us=a * 1e6,
                       fit_error_pct=_rel_rms(pred, seconds), points=len(seconds), note=note)


def fit_link(nbytes: Sequence[float], seconds: Sequence[float]) -> LinkFit:
    """Latency and bandwidth of time ≈ latency + bytes / bandwidth (send/recv one way, or an all-reduce)."""
    a, b = _fit_line(nbytes, seconds)
    return LinkFit(latency_us=a * 1e6, gbps=1.0 / b / 1e9,
                   fit_error_pct=_rel_rms([a + b * x for x in nbytes], seconds))


@dataclass(frozen=True)
class GpuCalibration:
    gpu: str                               # the GPU's name (a catalog entry, or the inline spec's name)
    gpu_spec: GPU                          # the numbers the efficiency is relative to
    mode: str
    fits: dict[str, RooflineFit]
    link: LinkFit | None = None
    allreduce: LinkFit | None = None
    source: dict = field(default_factory=dict)

    @property
    def fit(self) -> RooflineFit:
        return self.fits[self.mode]

    def to_yaml_dict(self) -> dict:
        d: dict[str, Any] = {"kind": KIND, "version": VERSION, "gpu": self.gpu,
                             "gpu_spec": {f.name: getattr(self.gpu_spec, f.name) for f in fields(GPU)},
                             "mode": self.mode, "fits": {k: v.to_dict() for k, v in self.fits.items()}}
        if self.link:
            d["link"] = self.link.to_dict()
        if self.allreduce:
            d["allreduce"] = self.allreduce.to_dict()
        d["source"] = dict(self.source)
        return d

    @classmethod
    def from_yaml_dict(cls, d: Any, where: str = "calibration") -> "GpuCalibration":
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise UserError(f"{where}: not a GPU calibration (kind: {KIND} missing)")
        try:
            spec_d = dict(d.get("gpu_spec") or {})
            name = str(d["gpu"])
            if not spec_d:
                if name not in GPU_CATALOG:
                    raise UserError(f"{where}: gpu {name!r} is not in the catalog and gpu_spec is missing")
                spec = GPU_CATALOG[name]
            else:
                known = {f.name for f in fields(GPU)}
                spec = GPU(**{k: (str(v) if k == "name" else float(v)) for k, v in spec_d.items() if k in known})
            fits = {}
            for mode, f in (d.get("fits") or {}).items():
                if mode not in MODES:
                    raise UserError(f"{where}: fits.{mode}: unknown mode (expected {' | '.join(MODES)})")
                fits[mode] = RooflineFit(float(f["hbm_efficiency"]), float(f["layer_overhead_us"]),
                                         float(f.get("fit_error_pct", float("nan"))), int(f.get("points", 0)),
                                         str(f.get("note", "")))
            mode = str(d.get("mode", "graphs"))
            link = LinkFit(**{k: float(v) for k, v in d["link"].items()}) if d.get("link") else None
            ar = LinkFit(**{k: float(v) for k, v in d["allreduce"].items()}) if d.get("allreduce") else None
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: malformed GPU calibration ({e.__class__.__name__}: {e})") from None
        if mode not in fits:
            raise UserError(f"{where}: mode: {mode!r} has no fit (fits: {', '.join(fits) or 'none'})")
        for m, f in fits.items():
            if not f.hbm_efficiency > 0 or not f.layer_overhead_us >= 0:
                raise UserError(f"{where}: fits.{m}: hbm_efficiency must be > 0 and layer_overhead_us ≥ 0")
        for key, lf in (("link", link), ("allreduce", ar)):
            if lf is not None and (not lf.gbps > 0 or not lf.latency_us >= 0):
                raise UserError(f"{where}: {key}: gbps must be > 0 and latency_us ≥ 0")
        return cls(gpu=name, gpu_spec=spec, mode=mode, fits=fits, link=link, allreduce=ar,
                   source=dict(d.get("source") or {}))

    # --- what a scenario gets ---
    def overrides(self, base: CostOverrides) -> CostOverrides:
        """The scenario's `costs:` with the fitted roofline parameters (explicit layer_ms etc. still win,
        as they do over the catalog roofline)."""
        f = self.fit
        return replace(base, hbm_efficiency=f.hbm_efficiency, layer_overhead_us=f.layer_overhead_us)

    def topology(self, hw: Hardware) -> Topology:
        """hw's topology, its catalog-default link figures replaced by the measured link where one was
        measured and the kind is a direct or one-switch fabric; figures the scenario set stay."""
        per_hop = LINK_HOPS.get(hw.topology.kind)
        if self.link is None or per_hop is None:
            return hw.graph
        defaults = default_topology_params(hw.topology.kind, hw.gpu)
        params = dict(hw.topology.params)
        measured = {"latency_us": self.link.latency_us / per_hop, "gbps": self.link.gbps * per_hop}
        for k, v in measured.items():
            if params.get(k) == defaults.get(k):
                params[k] = v
        return build_topology(TopologySpec(hw.topology.kind, params), hw.count)

    def check_gpu(self, gpu: GPU, where: str = "calibration") -> None:
        if gpu.name != self.gpu:
            raise UserError(f"{where}: fitted on GPU {self.gpu!r}, but hardware.gpu is {gpu.name!r} "
                            "(an efficiency is relative to one GPU's bandwidth)")

    def cost_model(self, model: ModelShape, hw: Hardware, costs: CostOverrides, head_layers: int,
                   where: str = "calibration") -> RooflineCosts:
        """The roofline of `model` on `hw` with this GPU's fitted parameters (spdsim.cost_choice joins it
        to a scenario)."""
        self.check_gpu(hw.gpu, where)
        return RooflineCosts(model, hw.gpu, self.topology(hw), self.overrides(costs), head_layers=head_layers)


def read_calibration_yaml(path: str | Path) -> dict:
    """A calibration file's contents (either kind), cached per file version."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as e:
        raise UserError(f"calibration: cannot read {path} ({e.strerror})") from None
    return _read(str(path.resolve()), mtime)


@functools.lru_cache(maxsize=16)
def _read(path_str: str, mtime: int) -> dict:
    try:
        d = yaml.safe_load(Path(path_str).read_text())
    except OSError as e:
        raise UserError(f"calibration: cannot read {path_str} ({e.strerror})") from None
    except yaml.YAMLError:
        raise UserError(f"calibration: {path_str} is not valid YAML") from None
    return d if isinstance(d, dict) else {}


def is_gpu_calibration(path: str | Path) -> bool:
    return read_calibration_yaml(path).get("kind") == KIND


def load_gpu_calibration(path: str | Path) -> GpuCalibration:
    return GpuCalibration.from_yaml_dict(read_calibration_yaml(path), f"calibration {path}")


def write_gpu_calibration(cal: GpuCalibration, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cal.to_yaml_dict(), sort_keys=False))
