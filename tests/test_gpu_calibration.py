"""`kind: gpu-roofline` calibrations (spdsim/gpu_calibration.py): the fit recovers the roofline's
parameters, and a scenario naming such a file simulates with them, as the roofline's closed form says."""
import math

import pytest
import yaml

from spdsim.cost_choice import cost_model
from spdsim.costs import KERNEL_OVERHEAD_US, RooflineCosts
from spdsim.engine import simulate_point
from spdsim.errors import UserError
from spdsim.gpu_calibration import (GpuCalibration, LinkFit, RooflineFit, catalog_gpu_for, fit_link,
                                    fit_roofline, load_gpu_calibration, write_gpu_calibration)
from spdsim.hardware import GPU_CATALOG
from spdsim.models import MODEL_CATALOG
from spdsim.scenario import Point, parse_scenario

# memory-bound everywhere: FLOPs ~free, so every cost is bytes / (bw · eff) + overheads
FAST_FLOPS_GPU = {"name": "membound", "mem_gb": 1000, "hbm_gbps": 1000, "bf16_tflops": 1.0e6}


@pytest.mark.parametrize("name, want", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", None),
    ("NVIDIA H100 NVL", None), ("NVIDIA A100-SXM4-80GB", "a100-80gb-sxm"), ("NVIDIA A100-PCIE-40GB", None),
    ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA L40S", "l40s"), ("Tesla T4", None)])
def test_device_names_map_to_the_catalog(name, want):
    assert catalog_gpu_for(name) == want
    assert want is None or want in GPU_CATALOG


def test_fit_recovers_the_roofline_parameters():
    gpu = GPU_CATALOG["h200"]
    eff, ovh_us = 0.83, 6.5
    x = [m.layer_bytes + c * m.kv_bytes_per_token_layer() for m in (MODEL_CATALOG["llama-3-8b"],
         MODEL_CATALOG["qwen3.5-4b"], MODEL_CATALOG["llama-2-70b"]) for c in (1, 512, 4096)]
    y = [b / (gpu.hbm_gbps * 1e9 * eff) + ovh_us * 1e-6 for b in x]
    f = fit_roofline(x, y, gpu.hbm_gbps)
    assert f.hbm_efficiency == pytest.approx(eff, rel=1e-9)
    assert f.layer_overhead_us == pytest.approx(ovh_us, rel=1e-6)
    assert f.fit_error_pct < 1e-6 and f.points == 9
    # noise around the line: the fit is no worse than the true parameters on relative error
    noisy = [v * (1 + 0.05 * math.sin(7 * i)) for i, v in enumerate(y)]
    g = fit_roofline(x, noisy, gpu.hbm_gbps)
    true_err = math.sqrt(sum(((t - n) / n) ** 2 for t, n in zip(y, noisy)) / len(y)) * 100
    assert g.fit_error_pct <= true_err + 1e-9
    # an intercept below zero is clamped: time through the origin
    assert fit_roofline([1e9, 2e9], [0.9e-3, 2.0e-3], 1000.0).layer_overhead_us == 0.0
    with pytest.raises(ValueError):
        fit_roofline([1e9, 2e9], [2e-3, 1e-3], 1000.0)
    # ... unless a fallback efficiency is given: then the overhead alone is fitted
    flat = fit_roofline([1e9, 2e9], [3.2e-3, 3.0e-3], 1000.0, fallback_efficiency=0.5)
    assert flat.hbm_efficiency == pytest.approx(0.5) and flat.note
    assert 0 < flat.layer_overhead_us < 1.2e3     # between the two residuals 1.2 ms and -1.0 ms


def test_fit_link():
    f = fit_link([1024, 65536, 1 << 20], [5e-6 + b / 300e9 for b in (1024, 65536, 1 << 20)])
    assert f.latency_us == pytest.approx(5.0) and f.gbps == pytest.approx(300.0)


def _cal(gpu="membound", spec=FAST_FLOPS_GPU, eff=0.75, ovh=20.0, link=None, mode="graphs"):
    from spdsim.hardware import GPU
    return GpuCalibration(gpu=gpu, gpu_spec=GPU(**spec) if spec else GPU_CATALOG[gpu], mode=mode,
                          fits={"graphs": RooflineFit(eff, ovh, 2.0, 9), "eager": RooflineFit(eff / 2, ovh * 5, 8.0, 9)},
                          link=link, source={"test": True})


def _scenario(calib=None, gpu=None, count=1, topology=None, schemes=("ar",), stages=(1,)):
    d = {"hardware": {"gpu": gpu or FAST_FLOPS_GPU, "count": count, **({"topology": topology} if topology else {})},
         "model": {"name": "llama-3-8b"},
         "workload": {"prompt_tokens": 64, "new_tokens": 32},
         "sweep": {"stages": list(stages), "partition": ["uniform"], "acceptance": [0.8], "schemes": list(schemes)},
         "calibration": str(calib) if calib else None}
    return parse_scenario(yaml.safe_dump(d))


def _ms(s, scheme="ar", n=1):
    return simulate_point(s, Point(scheme, n, "uniform", None)).metrics.ms_per_token


def test_scenario_uses_the_fitted_parameters(tmp_path):
    def with_file(name, **kw):
        write_gpu_calibration(_cal(**kw), tmp_path / name)
        return _scenario(tmp_path / name)

    plain = _ms(_scenario())
    # the catalog's own parameters, fitted: the same prediction as no calibration
    assert _ms(with_file("same.yaml")) == pytest.approx(plain, rel=1e-12)
    # overhead: each forward of AR pays it per layer and once for the LM head
    layers = MODEL_CATALOG["llama-3-8b"].layers
    t20, t5 = _ms(with_file("o0.yaml", eff=0.75, ovh=0.0)), _ms(with_file("o5.yaml", eff=0.75, ovh=5.0))
    assert t5 - t20 == pytest.approx((layers + 1) * 5e-3, rel=1e-6)
    # efficiency: memory-bound, no overheads: time ∝ 1 / eff, but for the embedding's fixed kernel launch
    k = KERNEL_OVERHEAD_US * 1e-3
    t_half, t_full = _ms(with_file("e5.yaml", eff=0.5, ovh=0.0)), _ms(with_file("e10.yaml", eff=1.0, ovh=0.0))
    assert t_half - k == pytest.approx(2 * (t_full - k), rel=1e-7)   # the trace rounds to ns
    assert t_half > plain > t_full
    # mode picks the fit: eager's (half the efficiency, five times the overhead) is slower
    assert _ms(with_file("eager.yaml", mode="eager")) > plain
    assert isinstance(cost_model(with_file("any.yaml")), RooflineCosts)


def test_measured_link_replaces_the_catalog_link(tmp_path):
    gpu = "h200"
    link = LinkFit(latency_us=3.0, gbps=200.0)
    write_gpu_calibration(_cal(gpu, None, link=link), tmp_path / "h200.yaml")
    nbytes = 8192
    for kind in ("nvswitch", "full"):
        s = _scenario(tmp_path / "h200.yaml", gpu=gpu, count=2, topology=kind)
        topo = cost_model(s).topology
        assert topo.transfer_s("gpu0", "gpu1", nbytes) == pytest.approx(3e-6 + nbytes / 200e9, rel=1e-9)
    # a latency the scenario sets itself stays; the bandwidth it left to the catalog is replaced
    s = _scenario(tmp_path / "h200.yaml", gpu=gpu, count=2, topology={"kind": "full", "latency_us": 7.0})
    assert cost_model(s).topology.transfer_s("gpu0", "gpu1", nbytes) == pytest.approx(7e-6 + nbytes / 200e9)
    # kinds with more hops keep the catalog's figures
    s = _scenario(tmp_path / "h200.yaml", gpu=gpu, count=2, topology="pcie-tree")
    assert cost_model(s).topology.transfer_s("gpu0", "gpu1", nbytes) == s.hardware.graph.transfer_s("gpu0", "gpu1", nbytes)


def test_round_trip_and_bad_files(tmp_path):
    cal = _cal("h200", None, link=LinkFit(3.0, 200.0, 1.5))
    write_gpu_calibration(cal, tmp_path / "c.yaml")
    again = load_gpu_calibration(tmp_path / "c.yaml")
    assert again.fits == cal.fits and again.link == cal.link and again.gpu_spec == GPU_CATALOG["h200"]
    # a calibration for another GPU than the scenario's
    with pytest.raises(UserError, match="fitted on GPU 'h200'"):
        cost_model(_scenario(tmp_path / "c.yaml", gpu="a100-80gb-sxm"))
    bad = {"no-mode-fit": {"kind": "gpu-roofline", "gpu": "h200", "mode": "eager",
                           "fits": {"graphs": {"hbm_efficiency": 0.8, "layer_overhead_us": 5}}},
           "negative": {"kind": "gpu-roofline", "gpu": "h200",
                        "fits": {"graphs": {"hbm_efficiency": -0.8, "layer_overhead_us": 5}}},
           "missing-key": {"kind": "gpu-roofline", "gpu": "h200", "fits": {"graphs": {"hbm_efficiency": 0.8}}},
           "unknown-gpu": {"kind": "gpu-roofline", "gpu": "b200",
                           "fits": {"graphs": {"hbm_efficiency": 0.8, "layer_overhead_us": 5}}}}
    for name, d in bad.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(d))
        with pytest.raises(UserError, match="calibration"):
            cost_model(_scenario(tmp_path / f"{name}.yaml", gpu="h200"))
