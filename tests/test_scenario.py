"""Scenario parsing: catalogs, inline forms, acceptance forms, and bad input → one line naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spdsim.errors import UserError
from spdsim.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
IDEAL = yaml.safe_load((ROOT / "scenarios" / "ideal.yaml").read_text())


def with_(path, value, base=None):
    d = yaml.safe_load(yaml.safe_dump(base or IDEAL))
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return yaml.safe_dump(d)


@pytest.mark.parametrize("name", ["a100x8", "h100x8", "l40s-pcie", "ideal"])
def test_shipped_scenarios_load(name):
    s = load_scenario(ROOT / "scenarios" / f"{name}.yaml")
    assert s.points() and s.name == name


def test_catalog_figures():
    s = load_scenario(ROOT / "scenarios" / "a100x8.yaml")
    assert s.hardware.gpu.hbm_gbps == 2039 and s.hardware.gpu.bf16_tflops == 312
    assert s.model.layers == 32 and s.model.kv_heads == 8
    h = load_scenario(ROOT / "scenarios" / "h100x8.yaml")
    assert not h.ar_fits() and all(p.scheme != "ar" for p in h.points())   # 70B does not fit one H100


@pytest.mark.parametrize("path,value,key", [
    ("no_such_key", 1, "no_such_key"),
    ("sweep.stages", [16], "sweep.stages"),
    ("sweep.stages", [40], "sweep.stages"),
    ("model.layers", 0, "model.layers"),
    ("model.layers", -3, "model.layers"),
    ("sweep.acceptance", [0.5, 1.5], "sweep.acceptance"),
    ("sweep.acceptance", [-0.1], "sweep.acceptance"),
    ("sweep.schemes", ["spd", "medusa"], "sweep.schemes"),
    ("sweep.partition", ["random"], "sweep.partition"),
    ("hardware.count", 0, "hardware.count"),
    ("hardware.gpu", "tpu-v9", "hardware.gpu"),
    ("hardware.topology.kind", "torus", "hardware.topology.kind"),
    ("hardware.topology.gbps", -1, "hardware.topology.gbps"),
    ("hardware.topology.bogus", 1, "hardware.topology.bogus"),
    ("workload.new_tokens", 0, "workload.new_tokens"),
    ("workload.prompt_tokens", "many", "workload.prompt_tokens"),
    ("costs.layer_ms", -1.0, "costs.layer_ms"),
    ("costs.typo_ms", 1.0, "costs.typo_ms"),
    ("head.placement", "elsewhere", "head.placement"),
    ("model.kv_heads", 5, "model.kv_heads"),
    ("hardware.gpu.mem_gb", 0.001, "sweep.stages"),          # the model does not fit in memory
])
def test_bad_values_name_the_key(path, value, key):
    with pytest.raises(UserError) as e:
        parse_scenario(with_(path, value))
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_dedicated_head_needs_one_more_gpu():
    text = with_("head", {"placement": "dedicated"})
    with pytest.raises(UserError, match="sweep.stages: 8 stages \\+ a dedicated head > 8 GPUs"):
        parse_scenario(text)


def test_acceptance_forms(tmp_path):
    (tmp_path / "seq.txt").write_text("1 1 0 1\naccept reject\n")
    acc = [0.7, {"kind": "markov", "mean": [0.8], "run_length": 3},
           {"kind": "replay", "file": "seq.txt"}, {"kind": "replay", "sequence": [1, 0, 0, 1]}]
    p = tmp_path / "s.yaml"
    p.write_text(with_("sweep.acceptance", acc))
    s = load_scenario(p)
    kinds = [a.kind for a in s.sweep.acceptance]
    assert kinds == ["iid", "markov", "replay", "replay"]
    assert s.sweep.acceptance[2].sequence == (True, True, False, True, True, False)
    t = parse_scenario(with_("sweep.acceptance", {"kind": "table", "values": {1: 1.0, 2: 0.9, 4: 0.8, 8: 0.7}}))
    assert [t.sweep.acceptance_for(n)[0].alpha for n in (2, 4, 8)] == [0.9, 0.8, 0.7]
    with pytest.raises(UserError, match="sweep.acceptance.values"):
        parse_scenario(with_("sweep.acceptance", {"kind": "table", "values": {2: 0.9}}))
    with pytest.raises(UserError, match="run_length"):
        parse_scenario(with_("sweep.acceptance", [{"kind": "markov", "mean": 0.2, "run_length": 1}]))


def test_inline_topologies_build():
    for topo in ["full", "ring", "nvswitch", "pcie-tree", {"kind": "multi-node", "nodes": 2}]:
        s = parse_scenario(with_("hardware.topology", topo))
        g = s.hardware.graph
        assert g.transfer_s("gpu0", "gpu7", 8192) >= 0
        assert g.path("gpu3", "gpu3") == []


def test_multi_node_crosses_the_fabric():
    s = parse_scenario(with_("hardware.topology", {"kind": "multi-node", "nodes": 2, "latency_us": 2,
                                                   "gbps": 300, "inter_latency_us": 20, "inter_gbps": 10}))
    g = s.hardware.graph
    cross, local = g.transfer_s("gpu0", "gpu4", 1024), g.transfer_s("gpu0", "gpu1", 1024)
    assert cross >= 20e-6 and cross > 5 * local


@pytest.mark.parametrize("bad,key", [("no_such_key: 1\n", "no_such_key"),
                                     ("sweep: {stages: [16]}\n", "sweep.stages")])
def test_cli_exit_2_one_line(tmp_path, bad, key):
    base = {k: v for k, v in IDEAL.items() if k not in ("sweep",) or "sweep" not in bad}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(base) + bad)
    r = subprocess.run([sys.executable, "-m", "spdsim.cli", "run", str(p), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and key in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_not_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("hardware: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_scenario(p)
