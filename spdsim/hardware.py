"""GPUs and interconnects: a catalog with sourced figures, and topologies as networkx graphs.

Every edge of a topology graph is one *directed* link with `latency_s` and `bandwidth` (bytes/s). A
transfer follows the lowest-latency path and is store-and-forward: on each hop it holds that link for
bytes / bandwidth (so concurrent transfers on one link queue), then pays the hop's latency. GPU nodes
are named "gpu0", "gpu1", ...; switches, host bridges and NICs get their own node names. Every edge also
has a `kind` (`spdsim.collectives.LINK_KINDS`: nvlink, pcie-switch, host-bridge, inter-node, or link for
the what-if graphs), which the all-reduce model of a TP group reads (`Topology.group_links`).

TP groups (DESIGN §2): `Topology.domains` are the device sets a group should stay inside — a node
(multi-node), a PCIe switch (pcie-tree), all devices otherwise — and `Topology.node_of` the node of a
device; on multi-node a group may span nodes only with `tp_across_nodes: true`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import networkx as nx

from spdsim.collectives import LINK_KINDS, GroupLinks, allgather_s, allreduce_s
from spdsim.errors import UserError

GB = 1e9


@dataclass(frozen=True)
class GPU:
    name: str
    mem_gb: float            # HBM capacity
    hbm_gbps: float          # memory bandwidth, GB/s
    bf16_tflops: float       # dense bf16 peak
    nvlink_gbps: float = 0.0   # per direction, 0 = no NVLink
    pcie_gbps: float = 32.0    # per direction, PCIe x16
    link_latency_us: float = 10.0  # small-message GPU→GPU send latency on its usual fabric


# Figures: ../shared/REFERENCE.md "GPUs" (NVIDIA datasheets via glennklockwood.com/garden/processors).
# Latencies: REFERENCE.md "Point-to-point latency": Vidur's measured send/recv, A100 NVLink 8 µs,
# H100 NVLink 5 µs (2 KiB messages). PCIe GPU→GPU small-message latency is not in REFERENCE.md: the
# 10 µs used for L40S is an estimate (same order as NVLink kernel launch + PCIe P2P round trip).
GPU_CATALOG: dict[str, GPU] = {
    "a100-80gb-sxm": GPU("a100-80gb-sxm", mem_gb=80, hbm_gbps=2039, bf16_tflops=312,
                         nvlink_gbps=300, pcie_gbps=32, link_latency_us=8.0),
    "h100-sxm": GPU("h100-sxm", mem_gb=80, hbm_gbps=3350, bf16_tflops=989,
                    nvlink_gbps=450, pcie_gbps=64, link_latency_us=5.0),
    "h200": GPU("h200", mem_gb=141, hbm_gbps=4800, bf16_tflops=989,
                nvlink_gbps=450, pcie_gbps=64, link_latency_us=5.0),
    "l40s": GPU("l40s", mem_gb=48, hbm_gbps=864, bf16_tflops=362,
                nvlink_gbps=0, pcie_gbps=32, link_latency_us=10.0),
}

# Hourly on-demand price per GPU (USD), for `spdsim plan`'s cost ranking; `--price GPU=USD` overrides.
# ASSUMED figures, not quotes: the middle of the "specialty cloud" on-demand ranges of a May-2026 survey
# (mercatus-ai.com/blog/cloud-gpu-pricing: A100 80GB $1.10–1.50, H100 SXM $2.50–3.50, H200 $3.50–4.50).
# L40S is not in that survey: $1.00 is a guess (below A100, as rental guides place it). Prices move weekly.
GPU_HOURLY_USD: dict[str, float] = {
    "a100-80gb-sxm": 1.30,
    "h100-sxm": 3.00,
    "h200": 4.00,
    "l40s": 1.00,
}

TOPOLOGY_KINDS = ("full", "nvswitch", "pcie-tree", "ring", "multi-node")

# Keys each topology kind accepts (besides `kind`); see `build_topology` for their meaning.
TOPOLOGY_KEYS: dict[str, set[str]] = {
    "full": {"latency_us", "gbps"},
    "nvswitch": {"latency_us", "gbps"},
    "ring": {"latency_us", "gbps"},
    "pcie-tree": {"latency_us", "gbps", "gpus_per_switch", "switches_per_bridge",
                  "bridge_latency_us", "bridge_gbps"},
    "multi-node": {"latency_us", "gbps", "nodes", "gpus_per_node", "inter_latency_us", "inter_gbps",
                   "tp_across_nodes"},
}
BOOL_TOPOLOGY_KEYS = {"tp_across_nodes"}


@dataclass(frozen=True)
class TopologySpec:
    kind: str
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class Topology:
    """A directed graph of links; `path(a, b)` is the lowest-latency route (fewest hops on ties)."""
    graph: nx.DiGraph
    devices: list[str]
    kind: str
    domains: list[list[str]] = field(default_factory=list)   # where a TP group should stay (see above)
    node_of: dict[str, int] = field(default_factory=dict)     # device → node (multi-node); else 0
    tp_across_nodes: bool = True        # may a TP group span nodes (multi-node: only when allowed)

    @cached_property
    def _paths(self) -> dict[str, dict[str, list[str]]]:
        # A tiny per-hop epsilon breaks latency ties toward fewer hops (free links in the ideal scenario).
        def weight(u: str, v: str, d: dict[str, Any]) -> float:
            return d["latency_s"] + 1e-12
        return {a: nx.single_source_dijkstra_path(self.graph, a, weight=weight) for a in self.devices}

    def path(self, src: str, dst: str) -> list[tuple[str, str]]:
        """The hops (directed edges) a message from src to dst crosses; [] when src == dst."""
        if src == dst:
            return []
        try:
            nodes = self._paths[src][dst]
        except KeyError:
            raise UserError(f"hardware.topology: no route from {src} to {dst}") from None
        return list(zip(nodes[:-1], nodes[1:]))

    def edge(self, u: str, v: str) -> tuple[float, float]:
        d = self.graph.edges[u, v]
        return d["latency_s"], d["bandwidth"]

    def transfer_s(self, src: str, dst: str, nbytes: int) -> float:
        """Unloaded transfer time: Σ over hops of latency + bytes / bandwidth."""
        return sum(lat + nbytes / bw for lat, bw in (self.edge(u, v) for u, v in self.path(src, dst)))

    # --- TP groups -----------------------------------------------------------------------------
    @cached_property
    def _group_cache(self) -> dict[tuple[str, ...], GroupLinks]:
        return {}

    def group_links(self, group: tuple[str, ...] | list[str]) -> GroupLinks:
        """What a collective over these devices crosses: the slowest link kind between two members in
        one node, the nodes spanned, the slowest link bandwidth on any member-to-member path."""
        key = tuple(sorted(group))
        got = self._group_cache.get(key)
        if got is not None:
            return got
        rank = {k: i for i, k in enumerate(LINK_KINDS)}
        kind, bw, step = "nvlink", math.inf, 0.0
        for i, a in enumerate(key):
            for b in key[i + 1:]:
                for u, v in (*self.path(a, b), *self.path(b, a)):
                    d = self.graph.edges[u, v]
                    bw = min(bw, d["bandwidth"])
                    k = d.get("kind", "link")
                    if k != "inter-node" and rank[k] > rank[kind]:
                        kind = k
                step = max(step, sum(self.graph.edges[u, v]["latency_s"] for u, v in self.path(a, b)))
        nodes = len({self.node_of.get(d, 0) for d in key})
        got = GroupLinks(size=len(key), nodes=nodes, kind=kind, bandwidth=bw, step_s=step)
        self._group_cache[key] = got
        return got

    def allreduce_s(self, nbytes: float, group: tuple[str, ...] | list[str], algorithm: str = "auto") -> float:
        """One all-reduce of nbytes over the TP group `group` (`spdsim.collectives`)."""
        return allreduce_s(nbytes, self.group_links(group), algorithm)

    def allgather_s(self, nbytes: float, group: tuple[str, ...] | list[str], algorithm: str = "auto") -> float:
        return allgather_s(nbytes, self.group_links(group), algorithm)


def _link(g: nx.DiGraph, a: str, b: str, latency_us: float, gbps: float, kind: str = "link") -> None:
    for u, v in ((a, b), (b, a)):
        g.add_edge(u, v, latency_s=latency_us * 1e-6, bandwidth=gbps * GB, kind=kind)


def default_topology_params(kind: str, gpu: GPU) -> dict[str, float]:
    """Catalog defaults, so that `topology: nvswitch` alone is enough."""
    fast = gpu.nvlink_gbps or gpu.pcie_gbps
    lat = gpu.link_latency_us
    if kind in ("full", "ring"):
        return {"latency_us": lat, "gbps": fast}
    if kind == "nvswitch":
        # GPU → switch → GPU: each hop gets half the end-to-end latency.
        return {"latency_us": lat / 2, "gbps": gpu.nvlink_gbps or gpu.pcie_gbps}
    if kind == "pcie-tree":
        # PCIe switch hops, then the host bridge (root complex / socket interconnect) between switches.
        return {"latency_us": lat / 2, "gbps": gpu.pcie_gbps, "gpus_per_switch": 4,
                "switches_per_bridge": 2, "bridge_latency_us": lat, "bridge_gbps": gpu.pcie_gbps}
    if kind == "multi-node":
        # Inter-node: REFERENCE.md, Vidur A100 inter-node ≈ 24 µs small, ≈ 7.8 GB/s large (H100: 17 µs, 36 GB/s).
        inter = (17.0, 36.0) if gpu.bf16_tflops > 500 else (24.0, 7.8)
        return {"latency_us": lat / 2, "gbps": fast, "nodes": 2,
                "inter_latency_us": inter[0], "inter_gbps": inter[1], "tp_across_nodes": 0.0}
    raise UserError(f"hardware.topology.kind: unknown {kind!r} (expected one of {', '.join(TOPOLOGY_KINDS)})")


def build_topology(spec: TopologySpec, count: int) -> Topology:
    p = spec.params
    g = nx.DiGraph()
    devices = [f"gpu{i}" for i in range(count)]
    g.add_nodes_from(devices)
    lat, gbps = p["latency_us"], p["gbps"]
    domains: list[list[str]] = [list(devices)]
    node_of: dict[str, int] = {}
    across = True
    if spec.kind == "full":
        for i in range(count):
            for j in range(i + 1, count):
                _link(g, devices[i], devices[j], lat, gbps)
    elif spec.kind == "ring":
        for i in range(count if count > 2 else count - 1):
            _link(g, devices[i], devices[(i + 1) % count], lat, gbps)
    elif spec.kind == "nvswitch":
        for d in devices:
            _link(g, d, "nvswitch", lat, gbps, "nvlink")
    elif spec.kind == "pcie-tree":
        per_sw, per_br = int(p["gpus_per_switch"]), int(p["switches_per_bridge"])
        n_sw = -(-count // per_sw)
        n_br = -(-n_sw // per_br)
        for i, d in enumerate(devices):
            _link(g, d, f"pcie-sw{i // per_sw}", lat, gbps, "pcie-switch")
        for s in range(n_sw):   # a path through here crosses the CPU root complex
            _link(g, f"pcie-sw{s}", f"bridge{s // per_br}", lat, gbps, "host-bridge")
        for b in range(1, n_br):   # sockets joined in a chain (UPI / Infinity Fabric)
            _link(g, f"bridge{b - 1}", f"bridge{b}", p["bridge_latency_us"], p["bridge_gbps"], "host-bridge")
        domains = [devices[i:i + per_sw] for i in range(0, count, per_sw)]
    elif spec.kind == "multi-node":
        nodes = int(p["nodes"])
        # gpus_per_node (optional): nodes of that size, the last one partly used; else count spread evenly
        per_node = int(p["gpus_per_node"]) if p.get("gpus_per_node") else -(-count // nodes)
        for i, d in enumerate(devices):
            _link(g, d, f"node{i // per_node}-switch", lat, gbps, "nvlink")   # an HGX node
            node_of[d] = i // per_node
        for k in range(-(-count // per_node)):
            _link(g, f"node{k}-switch", f"node{k}-nic", p["inter_latency_us"] / 2, p["inter_gbps"], "inter-node")
            _link(g, f"node{k}-nic", "fabric", 0.0, p["inter_gbps"], "inter-node")
        domains = [devices[i:i + per_node] for i in range(0, count, per_node)]
        across = bool(p.get("tp_across_nodes", 0.0))
    else:
        raise UserError(f"hardware.topology.kind: unknown {spec.kind!r} (expected one of {', '.join(TOPOLOGY_KINDS)})")
    return Topology(graph=g, devices=devices, kind=spec.kind, domains=domains, node_of=node_of,
                    tp_across_nodes=across)


@dataclass(frozen=True)
class Hardware:
    gpu: GPU
    count: int
    topology: TopologySpec

    @cached_property
    def graph(self) -> Topology:
        return build_topology(self.topology, self.count)

    @property
    def devices(self) -> list[str]:
        return [f"gpu{i}" for i in range(self.count)]

