"""Partitioners against brute force on small cases."""
import itertools
from dataclasses import dataclass

import pytest

from spdsim.costs import CostOverrides, RooflineCosts
from spdsim.hardware import GPU_CATALOG, TopologySpec, build_topology, default_topology_params
from spdsim.models import ModelShape
from spdsim.partition import (PlanInputs, balanced_layers, best_placement, estimate_token_s, make_plan,
                              stage_times, uniform_layers)
from spdsim.errors import UserError

GPU = GPU_CATALOG["a100-80gb-sxm"]
MODEL = ModelShape("m", layers=9, hidden=1024, ffn=2816, heads=8, kv_heads=8, vocab=32000)


@dataclass
class UnevenCosts:
    """Per-layer times that differ layer to layer (a calibrated model could do this)."""
    times: list
    embed: float = 0.3
    lm_head: float = 0.7
    head: float = 0.4
    tick_overhead_s: float = 0.0
    msg_overhead_s: float = 0.0

    def layer_s(self, layer, ctx):
        return self.times[layer] if layer >= 0 else 1.0

    def embed_s(self):
        return self.embed

    def lm_head_s(self):
        return self.lm_head

    def head_s(self, ctx):
        return self.head

    def draft_s(self, ctx):
        return self.head

    def stage_s(self, stage, a, b, ctx, first, last):
        return sum(self.times[a:b]) + (self.embed if first else 0) + (self.lm_head if last else 0)

    def hop_s(self, u, v, nbytes):
        return 0.0, 0.0


def compositions(L, n):
    for cuts in itertools.combinations(range(1, L), n - 1):
        bounds = (0, *cuts, L)
        yield tuple(zip(bounds[:-1], bounds[1:]))


def topo(kind="full", count=4, **params):
    p = default_topology_params(kind, GPU)
    p.update(params)
    return build_topology(TopologySpec(kind, p), count)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("drafts", [False, True])
def test_compute_balanced_is_optimal(seed, n, drafts):
    import random
    rnd = random.Random(seed)
    times = [rnd.uniform(0.1, 2.0) for _ in range(MODEL.layers)]
    inp = PlanInputs(MODEL, UnevenCosts(times), topo(count=4), GPU, n, drafts=drafts)
    got = max(stage_times(inp, balanced_layers(inp)))
    brute = min(max(stage_times(inp, c)) for c in compositions(MODEL.layers, n))
    assert got == pytest.approx(brute, rel=1e-12)
    assert got <= max(stage_times(inp, uniform_layers(MODEL.layers, n))) + 1e-12


def test_uniform_layers_cover_every_layer_once():
    for L in range(1, 13):
        for n in range(1, L + 1):
            parts = uniform_layers(L, n)
            assert parts[0][0] == 0 and parts[-1][1] == L
            assert all(a < b for a, b in parts) and all(parts[i][1] == parts[i + 1][0] for i in range(n - 1))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1


def test_colocated_head_gives_stage_one_fewer_layers():
    m = ModelShape("m32", layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000)
    t = topo("nvswitch", 8)
    costs = RooflineCosts(m, GPU, t, CostOverrides(), head_layers=2)
    inp = PlanInputs(m, costs, t, GPU, 4, drafts=True)
    layers = balanced_layers(inp)
    assert layers[0][1] - layers[0][0] < 8


def _pcie(count=6):
    return topo("pcie-tree", count, gpus_per_switch=2, switches_per_bridge=1, bridge_latency_us=50,
                bridge_gbps=1.0, latency_us=5, gbps=1.0)


@pytest.mark.parametrize("dedicated", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_comm_aware_local_search_matches_brute_force(dedicated, n):
    t = _pcie()
    costs = RooflineCosts(MODEL, GPU, t, CostOverrides(layer_ms=0.05))
    inp = PlanInputs(MODEL, costs, t, GPU, n, drafts=True, dedicated_head=dedicated, alpha=0.8)
    layers = uniform_layers(MODEL.layers, n)
    k = n + (1 if dedicated else 0)

    def score(devs):
        head = devs[n] if dedicated else devs[0]
        return estimate_token_s(inp, layers, devs[:n], head)
    brute = min(score(d) for d in itertools.permutations(t.devices, k))
    exhaustive = score(best_placement(inp, layers))
    local = score(best_placement(inp, layers, exhaustive_limit=0))
    assert exhaustive == pytest.approx(brute, rel=1e-12)
    assert local == pytest.approx(brute, rel=1e-9)


def test_comm_aware_avoids_the_slow_bridge():
    # GPUs 0,1 | 2,3 | 4,5 under three switches joined by a slow bridge chain; gpu0→gpu2 is costly
    t = _pcie()
    costs = RooflineCosts(MODEL, GPU, t, CostOverrides(layer_ms=0.05))
    inp = PlanInputs(MODEL, costs, t, GPU, 2, drafts=True, dedicated_head=False)
    plan = make_plan("comm_aware", inp)
    sw = {d: int(d[3:]) // 2 for d in t.devices}
    assert sw[plan.placement[0]] == sw[plan.placement[1]]


def test_model_too_big_for_memory():
    big = ModelShape("big", layers=4, hidden=16384, ffn=262144, heads=128, kv_heads=128, vocab=32000)
    t = topo("full", 4)
    costs = RooflineCosts(big, GPU_CATALOG["l40s"], t)
    inp = PlanInputs(big, costs, t, GPU_CATALOG["l40s"], 2)
    with pytest.raises(UserError, match="sweep"):
        make_plan("compute_balanced", inp)
