"""`python benchmarks/gpu_check.py --device cpu --out DIR` end to end (the CI form of the GPU check): the
CSV's columns and numbers, and the calibration it writes loads into the simulator and moves its
prediction toward what was measured."""
import csv
import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

from spdsim.cost_choice import cost_model
from spdsim.costs import RooflineCosts
from spdsim.engine import simulate_point
from spdsim.gpu_calibration import load_gpu_calibration
from spdsim.hardware import GPU
from spdsim.models import MODEL_CATALOG
from spdsim.scenario import Point, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
COLUMNS = ["shape", "metric", "context", "predicted", "measured", "error_pct"]


def _run(*args, timeout=170):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run("--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "gpu_check.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames
    return out, header, rows, proc.stdout


def test_csv_columns_and_numbers(check):
    out, header, rows, stdout = check
    assert header == COLUMNS
    metrics = {r["metric"] for r in rows}
    assert {"layer_ms_eager", "embed_ms_eager", "lm_head_ms_eager", "ar_tokens_per_s_eager", "copy_gbps"} <= metrics
    assert not any("graphs" in m for m in metrics)              # CUDA graphs are CUDA only
    contexts = sorted(int(r["context"]) for r in rows if r["metric"] == "layer_ms_eager")
    assert contexts == [1, 128, 512, 1024]
    for r in rows:
        p, m, e = float(r["predicted"]), float(r["measured"]), float(r["error_pct"])
        assert p > 0 and m > 0 and math.isfinite(p) and math.isfinite(m), r
        assert e == pytest.approx(100 * (p - m) / m, abs=0.02 + 1e-3 * abs(e)), r
    assert "| shape | metric | context | predicted | measured | error % |" in stdout   # the printed table


def _scenario(cal_path, spec: GPU, calibration=True):
    tiny = {"name": "tiny", "dtype_bytes": 4}       # the check runs fp32 on CPU
    d = {"hardware": {"gpu": {k: getattr(spec, k) for k in GPU.__dataclass_fields__}, "count": 1},
         "model": tiny, "workload": {"prompt_tokens": 32, "new_tokens": 24},
         "sweep": {"stages": [1], "partition": ["uniform"], "acceptance": [0.5], "schemes": ["ar"]},
         "calibration": str(cal_path) if calibration else None}
    return parse_scenario(yaml.safe_dump(d))


def test_calibration_loads_and_moves_the_prediction(check):
    out, _, rows, _ = check
    cal = load_gpu_calibration(out / "cpu.yaml")
    assert cal.gpu == "cpu" and cal.mode == "eager" and set(cal.fits) == {"eager"}
    fit = cal.fit
    assert fit.hbm_efficiency > 0 and fit.layer_overhead_us >= 0 and fit.points == 4

    with_cal, without = _scenario(out / "cpu.yaml", cal.gpu_spec), _scenario(None, cal.gpu_spec, calibration=False)
    costs = cost_model(with_cal)
    assert isinstance(costs, RooflineCosts)
    assert costs.overrides.hbm_efficiency == fit.hbm_efficiency
    assert costs.overrides.layer_overhead_us == fit.layer_overhead_us

    # in sample, the fitted roofline is no worse than the catalog's on the layer rows (least squares)
    shape = dataclasses.replace(MODEL_CATALOG["tiny"], dtype_bytes=4)
    layer = [(int(r["context"]), float(r["measured"]) * 1e-3) for r in rows if r["metric"] == "layer_ms_eager"]
    default = cost_model(without)

    def rms(c):
        return math.sqrt(sum(((c.layer_s(0, x) - m) / m) ** 2 for x, m in layer) / len(layer))

    assert rms(costs) <= rms(default) + 1e-12
    assert shape.layer_bytes == default.model.layer_bytes      # the scenario's shape is the one measured

    # the simulator's tokens/s moves the way the fitted layer time does (the roofline's closed form)...
    tps_cal = simulate_point(with_cal, Point("ar", 1, "uniform", None)).metrics.tokens_per_s
    tps_def = simulate_point(without, Point("ar", 1, "uniform", None)).metrics.tokens_per_s
    def decode_s(c):           # AR's closed form: one whole-model forward per token, contexts 32..55
        L = shape.layers
        return sum(c.stage_s(0, 0, L, q + 1, True, True) for q in range(31, 31 + 24))
    slower = decode_s(costs) > decode_s(default)
    assert (tps_cal < tps_def) == slower and tps_cal != tps_def
    # ... and from the catalog's prediction toward what the check measured: the catalog's 20 µs per layer
    # is a GPU's launch overhead, a CPU's eager layer pays hundreds of µs of operator calls
    measured = next(float(r["measured"]) for r in rows if r["metric"] == "ar_tokens_per_s_eager")
    assert (tps_cal < tps_def) == (measured < tps_def)
    fitted_row = next(float(r["predicted"]) for r in rows if r["metric"] == "ar_tokens_per_s_eager_fitted")
    assert fitted_row == pytest.approx(tps_cal, rel=1e-4)       # the check's own row is the same prediction


def test_bad_options_exit_2(tmp_path):
    proc = _run("--device", "cpu", "--out", str(tmp_path), "--contexts", "1,x", timeout=60)
    assert proc.returncode == 2 and "--contexts" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("--device", "cpu", "--out", str(tmp_path), "--shapes", "llama-9", timeout=60)
    assert proc.returncode == 2 and "--shapes" in proc.stderr and "Traceback" not in proc.stderr


def _gpu_check_module():
    """benchmarks/gpu_check.py as a module (registered first: dataclasses look their module up)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["gpu_check"]


def test_ar_prediction_without_simpy_is_the_simulators(monkeypatch):
    """A bare GPU image may lack SimPy: the closed form (one full forward per token) stands in, equal."""
    from spdsim.hardware import GPU_CATALOG
    g = _gpu_check_module()
    shape = MODEL_CATALOG["llama-3-8b"]
    sim, how = g.predict_ar(shape, "h200", GPU_CATALOG["h200"], True, 128, 128)
    assert how == "simulator"
    monkeypatch.setitem(sys.modules, "simpy", None)
    monkeypatch.delitem(sys.modules, "spdsim.engine", raising=False)
    closed, how = g.predict_ar(shape, "h200", GPU_CATALOG["h200"], True, 128, 128)
    assert how.startswith("closed form") and closed == pytest.approx(sim, rel=1e-6)


def test_shapes_option():
    g = _gpu_check_module()
    specs = g.parse_shapes("llama-3-8b,llama-2-70b:1", 2)
    assert [(s.label, s.layers, s.shape.dtype_bytes) for s in specs] == [
        ("llama-3-8b", 32, 2), ("llama-2-70b/1-layer", 1, 2)]


def test_graph_rows_with_replays_standing_in(tmp_path, monkeypatch):
    """The check's graph path on CPU (replays by call in place of CUDA graphs): both modes' rows and fits,
    and the graph decoder's tokens equal the model's own cache path."""
    import json

    import torch
    from fake_graphs import use_fake_graphs
    use_fake_graphs(monkeypatch)
    g = _gpu_check_module()
    threads = torch.get_num_threads()
    try:
        rc = g.main(["--device", "cpu", "--out", str(tmp_path), "--contexts", "1,64", "--prompt-tokens", "8",
                     "--new-tokens", "6", "--repeats", "3"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(tmp_path / "gpu_check.csv") as f:
        metrics = {r["metric"] for r in csv.DictReader(f)}
    for mode in ("graphs", "eager"):
        assert {f"layer_ms_{mode}", f"embed_ms_{mode}", f"lm_head_ms_{mode}", f"ar_tokens_per_s_{mode}",
                f"ar_tokens_per_s_{mode}_fitted"} <= metrics
    cal = load_gpu_calibration(tmp_path / "cpu.yaml")
    assert cal.mode == "graphs" and set(cal.fits) == {"graphs", "eager"}
    notes = json.loads((tmp_path / "gpu_check.json").read_text())["notes"]
    for mode in ("graphs", "eager"):
        assert any(f"static step ({mode}) agrees with model.forward's cache path on 6/6" in n for n in notes), notes


def test_a_failed_capture_leaves_the_eager_rows(tmp_path, monkeypatch):
    """If CUDA graph capture fails on a GPU, the check notes it and measures eager only."""
    import json

    import torch
    import executor.decode_step as ds
    from fake_graphs import use_fake_graphs
    use_fake_graphs(monkeypatch)

    def broken(fn, warmup=2):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ds, "capture_graph", broken)
    g = _gpu_check_module()
    threads = torch.get_num_threads()
    try:
        rc = g.main(["--device", "cpu", "--out", str(tmp_path), "--contexts", "1,64", "--prompt-tokens", "8",
                     "--new-tokens", "4", "--repeats", "3"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(tmp_path / "gpu_check.csv") as f:
        metrics = {r["metric"] for r in csv.DictReader(f)}
    assert "layer_ms_eager" in metrics and "ar_tokens_per_s_eager" in metrics
    assert not any("graphs" in m for m in metrics)
    assert load_gpu_calibration(tmp_path / "cpu.yaml").mode == "eager"
    notes = json.loads((tmp_path / "gpu_check.json").read_text())["notes"]
    assert any(n.startswith("CUDA graphs failed at tiny layers") for n in notes), notes
