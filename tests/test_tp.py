"""Tensor parallelism in the simulator (issue 16, item 7): tp = 1 is today's simulator, the TP cost
model's closed form, the all-reduce model's monotonicity, slower links never help, memory per GPU, TP
groups inside nodes / switches, the closed form of SPD on TP groups, bad input exits 2 naming the key."""
from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import yaml
from hypothesis import given, settings, strategies as st

from spdsim import acceptance as acc
from spdsim.cli import main
from spdsim.collectives import (ALGORITHMS, LINK_KINDS, GroupLinks, allgather_s, allreduce_s, available,
                                tp_stage_bytes)
from spdsim.costs import CostOverrides, RooflineCosts, stage_memory
from spdsim.engine import simulate_point
from spdsim.errors import UserError
from spdsim.hardware import GPU_CATALOG, Hardware, TopologySpec, build_topology, default_topology_params
from spdsim.metrics import ideal_spd_speedup
from spdsim.models import MODEL_CATALOG
from spdsim.partition import default_groups
from spdsim.scenario import Point, parse_scenario, parse_scenarios
from spdsim.sweep import run_sweep

IDEAL = {
    "hardware": {"gpu": {"name": "ideal", "mem_gb": 1000, "hbm_gbps": 1000, "bf16_tflops": 1000},
                 "count": 8, "topology": {"kind": "full", "latency_us": 0, "gbps": 1.0e9}},
    "model": {"name": "toy", "layers": 32, "hidden": 4096, "ffn": 11008, "heads": 32, "kv_heads": 32,
              "vocab": 32000},
    "workload": {"prompt_tokens": 16, "new_tokens": 256},
    "sweep": {"stages": [1, 2, 4], "tp": [1, 2], "partition": ["uniform"], "acceptance": [0.5],
              "schemes": ["ar", "pp", "spd"]},
}


def scenario(base: dict = IDEAL, **over) -> "object":
    d = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    return parse_scenario(yaml.safe_dump(d))


def bad(d: dict) -> str:
    with pytest.raises(UserError) as e:
        parse_scenario(yaml.safe_dump(d))
    return str(e.value)


# --- tp = 1 is the simulator without TP ----------------------------------------------------------

def test_tp1_rows_are_the_sweep_without_tp():
    h100 = {"hardware": {"gpu": "h100-sxm", "count": 8, "topology": "nvswitch"}, "model": "llama-3-8b",
            "workload": {"prompt_tokens": 64, "new_tokens": 32},
            "sweep": {"stages": [1, 2, 4], "partition": ["uniform", "comm_aware"], "acceptance": [0.8],
                      "schemes": ["ar", "pp", "spd", "sd"]}}
    plain = run_sweep(scenario(h100))
    with_tp = run_sweep(scenario(h100, sweep={"tp": [1, 2]}))
    one = with_tp[with_tp["tp"] == 1].reset_index(drop=True)
    cols = [c for c in plain.columns if c not in ("speedup_vs_tp", "allreduce_share")]
    pd.testing.assert_frame_equal(plain[cols], one[cols], check_dtype=False)
    assert (plain["point_id"] == one["point_id"]).all() and not plain["point_id"].str.contains("-t").any()
    assert with_tp[with_tp["tp"] == 2]["point_id"].str.contains("-t2-").all()
    assert plain["allreduce_share"].isna().all() and with_tp[with_tp["tp"] == 2]["allreduce_share"].gt(0).all()


# --- the TP cost model -----------------------------------------------------------------------------

@pytest.mark.parametrize("t", [2, 4, 8])
def test_free_collectives_and_bandwidth_bound_layers_divide_by_t(t):
    """Closed form: no launch overhead, free all-reduces, weight + KV streaming only (kv_heads ≥ t) →
    a TP stage forward takes 1/t of one GPU's (within 1%: the replicated norms are ~0.01%)."""
    m = MODEL_CATALOG["llama-2-7b"]
    gpu = GPU_CATALOG["a100-80gb-sxm"]
    topo = build_topology(TopologySpec("nvswitch", default_topology_params("nvswitch", gpu)), 8)
    o = CostOverrides(layer_overhead_us=0.0, allreduce_us=0.0, embed_ms=0.0)
    one = RooflineCosts(m, gpu, topo, o)
    tpc = one.for_point("ar", 1, t)
    for ctx in (1, 512, 4096):
        assert tpc.stage_s(0, 0, m.layers, ctx, True, True) == pytest.approx(
            one.stage_s(0, 0, m.layers, ctx, True, True) / t, rel=0.01)
    assert tpc.stage_allreduce_s(0, 0, m.layers, True) == 0.0


def test_collectives_are_two_allreduces_per_layer_and_the_logits_gather():
    m = MODEL_CATALOG["llama-3-8b"]
    gpu = GPU_CATALOG["h100-sxm"]
    topo = build_topology(TopologySpec("nvswitch", default_topology_params("nvswitch", gpu)), 8)
    c = RooflineCosts(m, gpu, topo).for_point("spd", 2, 4, (("gpu0", "gpu1", "gpu2", "gpu3"),
                                                            ("gpu4", "gpu5", "gpu6", "gpu7")))
    group = ("gpu0", "gpu1", "gpu2", "gpu3")
    ar, ag = topo.allreduce_s(m.activation_bytes, group), topo.allgather_s(m.logits_bytes, group)
    assert c.stage_allreduce_s(0, 0, 16, False) == pytest.approx(32 * ar)
    assert c.stage_allreduce_s(1, 16, 32, True) == pytest.approx(32 * ar + ag)
    assert tp_stage_bytes(m.activation_bytes, m.logits_bytes, 16, True) == (32 * m.activation_bytes, m.logits_bytes)
    # the speculative module stays on one GPU
    assert c.head_s(512) == RooflineCosts(m, gpu, topo).head_s(512)


kinds = st.sampled_from([k for k in LINK_KINDS if k != "link"])


@settings(max_examples=150, deadline=None)
@given(kind=kinds, nodes=st.sampled_from([1, 2]), algo=st.sampled_from(ALGORITHMS),
       nbytes=st.integers(64, 1 << 22), bw=st.floats(1e9, 1e12))
def test_allreduce_latency_monotone_in_group_size_and_message(kind, nodes, algo, nbytes, bw):
    def g(t):
        return GroupLinks(size=t, nodes=min(nodes, t), kind=kind, bandwidth=bw)
    sizes = [2, 4, 8, 16]
    times = [allreduce_s(nbytes, g(t), algo) for t in sizes]
    assert all(a <= b + 1e-15 for a, b in zip(times, times[1:]))
    assert allreduce_s(nbytes, g(4), algo) <= allreduce_s(2 * nbytes, g(4), algo)
    assert allgather_s(nbytes, g(4), algo) <= allgather_s(nbytes, g(8), algo)
    assert allreduce_s(nbytes, g(1), algo) == 0.0
    # auto never loses to a pinned algorithm the group can run
    assert allreduce_s(nbytes, g(8), "auto") <= min(allreduce_s(nbytes, g(8), a) for a in available(g(8))) + 1e-15


def test_pcie_groups_get_no_one_shot_and_slower_link_kinds_cost_more():
    n = 16384
    nv, pcie = GroupLinks(8, 1, "nvlink", 450e9), GroupLinks(8, 1, "host-bridge", 32e9)
    assert "oneshot" in available(nv) and "oneshot" not in available(pcie)
    assert allreduce_s(n, pcie) > allreduce_s(n, nv)
    assert allreduce_s(n, GroupLinks(8, 2, "nvlink", 36e9)) > allreduce_s(n, GroupLinks(8, 1, "nvlink", 36e9))


def _ar_tp_rate(hw: dict, tp: int) -> float:
    d = {"hardware": hw, "model": "llama-3-8b", "workload": {"prompt_tokens": 64, "new_tokens": 16},
         "sweep": {"stages": [1], "tp": [tp], "partition": ["uniform"], "schemes": ["ar"]}}
    s = scenario(d)
    return simulate_point(s, Point("ar", 1, "uniform", None, tp)).metrics.tokens_per_s


@pytest.mark.parametrize("tp", [2, 4])
def test_a_slower_link_never_makes_tp_faster(tp):
    fast = _ar_tp_rate({"gpu": "h100-sxm", "count": 8, "topology": {"kind": "nvswitch"}}, tp)
    thin = _ar_tp_rate({"gpu": "h100-sxm", "count": 8, "topology": {"kind": "nvswitch", "gbps": 5}}, tp)
    slow = _ar_tp_rate({"gpu": "h100-sxm", "count": 8, "topology": {"kind": "nvswitch", "latency_us": 50}}, tp)
    pcie = _ar_tp_rate({"gpu": "h100-sxm", "count": 8, "topology": {"kind": "pcie-tree"}}, tp)
    assert thin < fast and slow < fast and pcie < fast
    full_fast = _ar_tp_rate({"gpu": "h100-sxm", "count": 8, "topology": {"kind": "full", "latency_us": 1}}, tp)
    full_slow = _ar_tp_rate({"gpu": "h100-sxm", "count": 8, "topology": {"kind": "full", "latency_us": 20}}, tp)
    assert full_slow < full_fast


# --- memory ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-70b", "llama-3-8b"])
@pytest.mark.parametrize("t", [2, 4, 8])
def test_memory_per_gpu_falls_as_one_over_t_for_the_split_parts(name, t):
    m = MODEL_CATALOG[name]
    norms = 2 * m.hidden * m.wb
    assert (m.layer_bytes_rank(t) - norms) * t == pytest.approx(m.layer_bytes - norms, rel=1e-9)
    assert (m.lm_head_bytes_rank(t) - m.hidden * m.wb) * t == pytest.approx(m.lm_head_bytes - m.hidden * m.wb)
    kv1, kvt = m.kv_bytes_per_token_layer(), m.kv_bytes_per_token_layer(t)
    if m.kv_heads >= t:
        assert kvt * t == kv1
    else:                                   # one replicated KV head per rank: counted, more than 1/t
        assert kvt == 2 * m.hd * m.kvb and kvt * t > kv1
    one, split = stage_memory(m, m.layers, True, True, 768), stage_memory(m, m.layers, True, True, 768, tp=t)
    assert split.weights < one.weights / t + m.embed_bytes + 1e6      # embedding replicated
    assert split.weights > one.weights / t


def test_quantized_weights_shrink_weights_not_the_kv_cache():
    base = MODEL_CATALOG["llama-2-70b"]
    int4 = type(base)(**{**base.__dict__, "weight_bytes": 0.5})
    assert int4.layer_bytes == pytest.approx(base.layer_bytes / 4, rel=1e-6)
    assert int4.kv_bytes_per_token_layer() == base.kv_bytes_per_token_layer()
    s = scenario({"hardware": {"gpu": "h100-sxm", "count": 1}, "model": {"name": "llama-2-70b", "weight_bytes": 0.5},
                  "workload": {"prompt_tokens": 64, "new_tokens": 16},
                  "sweep": {"stages": [1], "schemes": ["ar"]}})
    assert s.ar_fits() and s.points()[0].scheme == "ar"       # 35 GB of int4 weights fit one H100


# --- placement ------------------------------------------------------------------------------------

def test_groups_stay_inside_a_node_and_under_one_pcie_switch():
    l40s = GPU_CATALOG["l40s"]
    pcie = build_topology(TopologySpec("pcie-tree", default_topology_params("pcie-tree", l40s)), 8)
    groups, _ = default_groups(pcie, 2, 4)
    assert [pcie.group_links(g).kind for g in groups] == ["pcie-switch", "pcie-switch"]
    assert pcie.group_links(("gpu0", "gpu4")).kind == "host-bridge"
    h100 = GPU_CATALOG["h100-sxm"]
    mn = build_topology(TopologySpec("multi-node", {**default_topology_params("multi-node", h100), "nodes": 2}), 16)
    groups, extra = default_groups(mn, 2, 8, 0)
    assert all(len({mn.node_of[d] for d in g}) == 1 for g in groups)
    groups, extra = default_groups(mn, 3, 4, 1)
    assert all(mn.group_links(g).nodes == 1 for g in groups) and extra == ("gpu12",)
    with pytest.raises(UserError, match="sweep.tp"):
        default_groups(mn, 1, 16)


def test_comm_aware_groups_are_never_estimated_slower_than_the_default():
    d = {"hardware": {"gpu": "l40s", "count": 8, "topology": {"kind": "pcie-tree", "bridge_latency_us": 200}},
         "model": "llama-3-8b", "workload": {"prompt_tokens": 64, "new_tokens": 16}, "head": {"placement": "dedicated"},
         "sweep": {"stages": [3], "tp": [2], "partition": ["uniform", "comm_aware"], "acceptance": [0.8],
                   "schemes": ["spd"]}}
    df = run_sweep(scenario(d))
    u, c = (df[df["partition"] == p].iloc[0] for p in ("uniform", "comm_aware"))
    assert "+" in u["placement"] and c["tokens_per_s"] >= 0.99 * u["tokens_per_s"]
    assert u["gpus"] == 7 and c["gpus"] == 7


# --- the engine on TP groups -----------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_spd_on_tp_groups_meets_the_closed_form(n, alpha):
    """Equal stages, free links and collectives: SPD on TP groups of 2 is SPD (DESIGN §2 closed form)."""
    s = scenario(costs={"layer_ms": 1.0, "embed_ms": 0, "lm_head_ms": 0, "head_ms": 0, "allreduce_us": 0},
                 workload={"prompt_tokens": 16, "new_tokens": 512})
    seq = [int((i + 1) * alpha) - int(i * alpha) for i in range(1000)]
    spd = simulate_point(s, Point("spd", n, "uniform", acc.replay(sequence=seq), 2)).metrics
    pp = simulate_point(s, Point("pp", n, "uniform", None, 2)).metrics
    assert spd.tokens_per_s / pp.tokens_per_s == pytest.approx(ideal_spd_speedup(n, alpha), rel=0.01)
    ar = simulate_point(s, Point("ar", 1, "uniform", None, 2)).metrics
    one = simulate_point(s, Point("ar", 1, "uniform", None, 1)).metrics
    assert ar.tokens_per_s == pytest.approx(2 * one.tokens_per_s, rel=1e-6)    # layer_ms ÷ t, free collectives


def test_allreduce_events_nest_in_compute_and_bursts_cross_the_links():
    s = scenario({"hardware": {"gpu": "h100-sxm", "count": 8, "topology": "nvswitch"}, "model": "llama-3-8b",
                  "workload": {"prompt_tokens": 64, "new_tokens": 24},
                  "sweep": {"stages": [2], "tp": [2], "partition": ["uniform"], "acceptance": [0.8],
                            "schemes": ["spd"]}})
    r = simulate_point(s, Point("spd", 2, "uniform", acc.iid(0.8), 2), keep_events=True)
    comp = {(e.stage, e.position, e.start_ns): e for e in r.events if e.kind == "compute"}
    ars = [e for e in r.events if e.kind == "allreduce"]
    assert len(ars) == len(comp) and all(e.bytes > 0 for e in ars)
    spans = [(e.start_ns, e.end_ns) for e in comp.values()]
    assert all(any(a <= x.start_ns and x.end_ns <= b for a, b in spans) for x in ars)
    acts = [e for e in r.events if e.kind == "send" and e.bytes == s.model.activation_bytes]
    assert {"gpu0", "gpu1"} <= {e.device for e in acts}            # both TP ranks of stage 1 send
    assert r.header.tp == 2 and r.plan.placement_str() == "gpu0+gpu1,gpu2+gpu3"
    assert 0 < r.metrics.allreduce_share < 1


@pytest.mark.parametrize("scheme", ["spd_dedicated", "sd", "chain"])
def test_every_scheme_runs_on_tp_groups_and_is_no_slower_than_on_one_gpu(scheme):
    s = scenario({"hardware": {"gpu": "h100-sxm", "count": 8, "topology": "nvswitch"}, "model": "llama-3-8b",
                  "workload": {"prompt_tokens": 64, "new_tokens": 24},
                  "sweep": {"stages": [1, 2], "tp": [1, 2], "partition": ["uniform"], "acceptance": [0.8],
                            "schemes": ["ar", scheme]}})
    df = run_sweep(s)
    rows = df[df["scheme"] == scheme]
    for n in sorted(rows["stages"].unique()):
        one, two = (rows[(rows["stages"] == n) & (rows["tp"] == t)]["tokens_per_s"].iloc[0] for t in (1, 2))
        assert two > one
    assert rows[rows["tp"] == 2]["gpus"].min() >= 2
    assert df["speedup_vs_tp"].notna().all()


def test_speedup_vs_tp_divides_by_the_fastest_plain_tp_on_at_most_as_many_gpus():
    s = scenario({"hardware": {"gpu": "h100-sxm", "count": 8, "topology": "nvswitch"}, "model": "llama-3-8b",
                  "workload": {"prompt_tokens": 64, "new_tokens": 16},
                  "sweep": {"stages": [1, 2, 4], "tp": [1, 2, 4], "partition": ["uniform"], "acceptance": [0.8],
                            "schemes": ["ar", "spd"]}})
    df = run_sweep(s)
    tp = df[df["scheme"] == "ar"].set_index("gpus")["tokens_per_s"]
    for _, r in df.iterrows():
        want = r["tokens_per_s"] / tp[tp.index <= r["gpus"]].max()
        assert r["speedup_vs_tp"] == pytest.approx(want)
        assert r["gpus"] == r["tp"] * r["stages"]


# --- scenarios: several per file, bad input ---------------------------------------------------------

def test_a_file_of_documents_merges_each_over_the_first():
    text = yaml.safe_dump(IDEAL) + "---\nname: second\nhardware: {count: 4}\n"
    first, second = parse_scenarios(text, "f")
    assert second.name == "second" and second.hardware.count == 4 and second.model == first.model
    with pytest.raises(UserError, match="name"):
        parse_scenarios(text.replace("name: second\n", ""), "f")


KV8 = {"heads": 24, "kv_heads": 8, "hidden": 24 * 128}


@pytest.mark.parametrize("change, key, words", [
    ({"sweep": {"tp": [3]}}, "sweep.tp", "model.heads"),                   # 3 does not divide 32 heads
    ({"sweep": {"tp": [4], "stages": [4]}}, "sweep.tp", "hardware.count"),  # 4 × 4 stages > 8 GPUs
    ({"sweep": {"tp": [1, 2], "stages": [4, 16]}}, "sweep.stages", "hardware.count"),  # 16 stages fit no tp
    ({"model": KV8, "sweep": {"tp": [6]}}, "sweep.tp", "model.kv_heads"),   # 6 does not divide 8 KV heads
    ({"model": KV8, "sweep": {"tp": [12]}}, "sweep.tp", "model.kv_heads"),  # nor is 12 a multiple of 8
    ({"costs": {"allreduce": "butterfly"}}, "costs.allreduce", "ring"),
])
def test_bad_tp_input_names_the_key(change, key, words):
    d = copy.deepcopy(IDEAL)
    for k, v in change.items():
        d[k] = {**d.get(k, {}), **v}
    msg = bad(d)
    assert msg.startswith(key) and words in msg


def test_tp_across_nodes_is_refused_unless_the_topology_allows_it():
    d = copy.deepcopy(IDEAL)
    d["hardware"] = {"gpu": "h100-sxm", "count": 16, "topology": {"kind": "multi-node", "nodes": 2}}
    d["model"] = "llama-3-8b"
    d["sweep"] = {"stages": [1], "tp": [16], "partition": ["uniform"], "schemes": ["ar"]}
    msg = bad(d)
    assert msg.startswith("sweep.tp") and "tp_across_nodes" in msg
    d["hardware"]["topology"]["tp_across_nodes"] = True
    s = parse_scenario(yaml.safe_dump(d))
    r = simulate_point(s, s.points()[0])
    assert r.plan.tp == 16 and r.metrics.tokens_per_s > 0


def test_cli_exits_2_naming_the_key(tmp_path, capsys):
    d = copy.deepcopy(IDEAL)
    d["sweep"]["tp"] = [5]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spdsim: error: sweep.tp:") and "\n" not in err


# --- calibrated TP ----------------------------------------------------------------------------------

def test_calibrated_tp_needs_the_tp_section(tmp_path):
    from spdsim.calibration_file import CALIBRATION_KIND, CalibratedCosts
    base = {"kind": CALIBRATION_KIND, "version": 1, "layer": {"a_ms": 1.0, "b_us_per_ctx": 0.0},
            "link": {"latency_us": 50, "gbps": 1.0}}
    plain = CalibratedCosts.from_yaml_dict(base)
    with pytest.raises(UserError, match="^calibration"):
        plain.for_point("ar", 1, 2)
    assert plain.for_point("ar", 1, 1).stage_s(0, 0, 8, 10, True, True) == plain.stage_s(0, 0, 8, 10, True, True)
    tp = CalibratedCosts.from_yaml_dict({**base, "tp": {"allreduce": {"latency_us": 40, "gbps": 0.5},
                                                        "allgather": {"latency_us": 60, "gbps": 0.5},
                                                        "layer_scale": {2: 0.6}}})
    from dataclasses import replace
    tp = replace(tp, model=MODEL_CATALOG["tiny"])
    two = tp.for_point("ar", 1, 2)
    ar = 40e-6 + 256 * 2 / 0.5e9
    ag = 60e-6 + 256 * 2 / 0.5e9
    assert two.stage_s(0, 0, 8, 10, False, False) == pytest.approx(8 * (0.6e-3 + 2 * ar))
    assert two.stage_allreduce_s(0, 0, 8, True) == pytest.approx(16 * ar + ag)
    with pytest.raises(UserError, match="layer_scale"):
        tp.for_point("ar", 1, 4)
    assert "tp" in tp.to_yaml_dict() and "tp" not in plain.to_yaml_dict()


# --- the planner ------------------------------------------------------------------------------------

def test_plan_searches_tp_never_recommends_a_dominated_configuration_and_bounds_hold(tmp_path, capsys):
    from spdsim.plan import dominated
    rc = main(["plan", "--quiet", "--out", str(tmp_path), "--model", "llama-2-7b", "--gpu", "a100,h100",
               "--max-gpus", "4", "--target-tokens-per-s", "150", "--new-tokens", "16", "--prompt-tokens", "64",
               "--partition", "uniform", "--schemes", "ar,pp,spd,sd,chain"])
    out = capsys.readouterr().out
    df = pd.read_csv(tmp_path / "plan.csv", keep_default_na=False, na_values=[""])
    assert rc == 0 and set(df["tp"]) == {1, 2, 4}
    sim = df[df["tokens_per_s"].notna()]
    assert (sim["tokens_per_s"] <= sim["bound_tokens_per_s"]).all()
    assert {"ar", "sd", "chain"} <= set(sim[sim["tp"] > 1]["scheme"])
    rec = df.iloc[0]
    assert rec["status"] == "ok" and not dominated(df).iloc[0]
    better = sim[(sim["tokens_per_s"] >= rec["tokens_per_s"]) & (sim["usd_per_hour"] <= rec["usd_per_hour"])]
    assert ((better["tokens_per_s"] == rec["tokens_per_s"]) & (better["usd_per_hour"] == rec["usd_per_hour"])).all()
    assert "cheapest meeting the target" in out


# --- where SPD pays ----------------------------------------------------------------------------------

def test_run_of_a_file_of_scenarios_prints_where_spd_pays_and_the_report_draws_it(tmp_path, capsys):
    import argparse
    from spdsim.plots import plot_where_spd_pays
    from spdsim.sweep import run_command
    from spdsim.where import where_spd_pays
    base = {"name": "h100", "hardware": {"gpu": "h100-sxm", "count": 4, "topology": "nvswitch"},
            "model": "llama-3-8b", "workload": {"prompt_tokens": 64, "new_tokens": 16},
            "sweep": {"stages": [1, 2], "tp": [1, 2], "partition": ["uniform"], "acceptance": [0.8, 0.9],
                      "schemes": ["ar", "pp", "spd", "sd"]}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(base) + "---\nname: l40s\nhardware: {gpu: l40s, topology: pcie-tree}\n")
    ns = argparse.Namespace(scenario=path, out=tmp_path / "out", jobs=1, quiet=False, no_plots=True, trace=None,
                            dask=None, full=False)
    assert run_command(ns) == 0
    out = capsys.readouterr().out
    assert out.count("where SPD pays") == 2 and "l40s: llama-3-8b on 4 × l40s" in out
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(df["scenario"]) == {"h100", "l40s"}
    table = where_spd_pays(df)
    for _, r in table.dropna(subset=["spd_vs_tp"]).iterrows():
        spd = df[(df["scenario"] == r["scenario"]) & df["scheme"].isin(["spd", "spd_dedicated"])
                 & (df["stages"] > 1) & (df["gpus"] == r["gpus"]) & (df["acceptance"] == r["acceptance"])]
        assert r["spd_vs_tp"] == pytest.approx(spd["speedup_vs_tp"].max())
        assert r["tp_best"] >= r["TP"] if not math.isnan(r["TP"]) else True
    assert plot_where_spd_pays(df, tmp_path / "w.png") is not None and (tmp_path / "w.png").stat().st_size > 1000
