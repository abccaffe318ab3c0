"""The all-reduce (and all-gather) model of a tensor-parallel group: pure α–β functions.

A TP stage (DESIGN §2, `spdsim.protocol`) all-reduces one token's hidden state twice per layer and, on
the last stage, all-gathers the logits row. What such a collective costs depends on the group's size t,
the nodes it spans, the slowest kind of link between its members and the slowest link bandwidth on
their paths (`GroupLinks`, which `spdsim.hardware.Topology.group_links` reads off the topology graph).

Algorithms (the structure of NCCL's own tuning model, NVIDIA/nccl src/graph/tuning.cc: a base latency,
a per-step latency by link kind, a bandwidth term):
  ring     2(t−1) steps, 2(nodes−1) of them across the network; bytes term 2(t−1)/t · n / bw
  tree     NCCL's tree: a chain inside each node and a binary tree between nodes,
           2((t/nodes − 1) + ⌈log2 nodes⌉) steps; bytes term 2n / bw. Inside one node its latency
           equals the ring's (so it only wins across nodes)
  oneshot  every GPU reads every peer's buffer and reduces locally (vLLM's / TensorRT-LLM's custom
           all-reduce for small messages): one step, bytes term (t−1) · n / bw. Only on NVLink /
           NVSwitch groups inside one node: vLLM's custom all-reduce runs on PCIe for two GPUs only
           and launches nothing for 4 or 8 PCIe GPUs (flashinfer PR #4393 quotes its dispatch), and
           we have no PCIe one-shot measurement, so a PCIe group uses NCCL's ring
  auto     the fastest of those available for that size (NCCL picks per size; vLLM picks one-shot
           below 256–512 KiB, REFERENCE.md "Collectives": so every decode all-reduce on NVSwitch is
           one-shot)
All-gather (the LM head's logits row, n = the whole row): ring (t−1) steps, bytes (t−1)/t · n / bw, or
one-shot (each GPU reads the t−1 peer slices), same constants.

Constants: from collective microbenchmarks only, never from end-to-end tokens/s (those are acceptance
checks, benchmarks/tp_table.py). They are kernel times without CUDA graphs (graphs can be far lower,
REFERENCE.md "Collectives", NVIDIA/nccl #1984).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("auto", "ring", "tree", "oneshot")
# Link kinds, fastest first. "link" is an inline what-if graph (`full`, `ring` topologies): there a step
# costs the links' own latency and there is no base latency, so free links give free collectives.
LINK_KINDS = ("nvlink", "pcie-switch", "host-bridge", "inter-node", "link")

# REFERENCE.md "Collectives", nccl-tests in NVIDIA/nccl-tests #123 (DGX-A100, ring, 1 channel, 8–128 B):
# 2 GPUs 10 µs, 4 GPUs 16.9 µs, 8 GPUs 33.7 µs over 2, 6, 14 ring steps. A least-squares line through
# the three: 5.6 µs + 2.0 µs per step (it gives 9.6, 17.6, 33.6 µs).
BASE_US = 5.6
STEP_US = {
    "nvlink": 2.0,
    # No measurement of a group under one PCIe switch found: the host-bridge figure is used (a switch
    # hop is not modelled faster per step; the bytes term still uses each path's bandwidth).
    "pcie-switch": 2.6,
    # NCCL on PCIe GPUs whose transfers cross the CPU root complex: flashinfer PR #5023's NCCL all-gather
    # of one 4096-wide bf16 row, TP2 8.31 µs and TP4 13.61 µs over 1 and 3 ring steps, is 5.66 µs +
    # 2.65 µs per step; NVIDIA/nccl #1530 (8 × RTX 4090 on PCIe, two sockets, 8 B all-reduce 42.1 µs
    # over 14 steps) gives (42.1 − 5.6) / 14 = 2.6 µs per step, the same.
    "host-bridge": 2.6,
    # REFERENCE.md "Collectives": 2 × DGX-A100 over RDMA, ring, 8 B: 93 µs (NVIDIA/nccl #812) = 5.6 +
    # 28 NVLink steps × 2.0 + 2 network steps → 15.7 µs each; Vidur's 2 nodes × 1 GPU 41–56 µs = 5.6 + 2
    # network steps → 18–25 µs each. 18 µs per network step.
    "inter-node": 18.0,
}
# REFERENCE.md "Collectives": vLLM's custom one-shot all-reduce on H100, no CUDA graph, ~16 KiB: 8.5–9.3
# µs at TP 2/4/8 (sglang PR #2904). 8.5 µs is the TP-2 figure; the rise with t comes from the bytes term
# ((t−1)·16 KiB / 450 GB/s ≈ 0.25 µs at TP 8, against 0.8 µs measured). Used for A100 too (no A100
# figure; NVLink3 per-direction bandwidth enters the bytes term).
ONESHOT_BASE_US = 8.5


@dataclass(frozen=True)
class GroupLinks:
    """What a collective over one TP group crosses."""
    size: int                  # t, GPUs in the group
    nodes: int = 1             # nodes the group spans
    kind: str = "nvlink"       # the slowest link kind between two members inside a node
    bandwidth: float = math.inf   # bytes/s: the slowest link on any member-to-member path
    step_s: float = 0.0        # "link" kind only: the slowest member-to-member path's latency


def _step_s(g: GroupLinks) -> float:
    return g.step_s if g.kind == "link" else STEP_US[g.kind] * 1e-6


def _base_s(g: GroupLinks) -> float:
    return 0.0 if g.kind == "link" else BASE_US * 1e-6


def available(g: GroupLinks) -> tuple[str, ...]:
    """The all-reduce algorithms this group can run."""
    if g.nodes == 1 and g.kind in ("nvlink", "link"):
        return ("ring", "tree", "oneshot")
    return ("ring", "tree")


def ring_allreduce_s(nbytes: float, g: GroupLinks) -> float:
    t = g.size
    if t <= 1:
        return 0.0
    steps, inter = 2 * (t - 1), 2 * (g.nodes - 1)
    lat = _base_s(g) + (steps - inter) * _step_s(g) + inter * STEP_US["inter-node"] * 1e-6
    return lat + 2 * (t - 1) / t * nbytes / g.bandwidth


def tree_allreduce_s(nbytes: float, g: GroupLinks) -> float:
    t = g.size
    if t <= 1:
        return 0.0
    local = -(-t // g.nodes)
    up = math.ceil(math.log2(g.nodes)) if g.nodes > 1 else 0
    lat = _base_s(g) + 2 * ((local - 1) * _step_s(g) + up * STEP_US["inter-node"] * 1e-6)
    return lat + 2 * nbytes / g.bandwidth


def oneshot_allreduce_s(nbytes: float, g: GroupLinks) -> float:
    t = g.size
    if t <= 1:
        return 0.0
    base = _step_s(g) if g.kind == "link" else ONESHOT_BASE_US * 1e-6
    return base + (t - 1) * nbytes / g.bandwidth


ALLREDUCE = {"ring": ring_allreduce_s, "tree": tree_allreduce_s, "oneshot": oneshot_allreduce_s}


def allreduce_s(nbytes: float, g: GroupLinks, algorithm: str = "auto") -> float:
    """One all-reduce of nbytes over the group: the pinned algorithm, or the fastest available one (a
    pinned algorithm the group cannot run, one-shot on PCIe, falls back to the fastest available)."""
    if g.size <= 1:
        return 0.0
    algos = available(g)
    if algorithm != "auto" and algorithm in algos:
        return ALLREDUCE[algorithm](nbytes, g)
    return min(ALLREDUCE[a](nbytes, g) for a in algos)


def allgather_s(nbytes: float, g: GroupLinks, algorithm: str = "auto") -> float:
    """All-gather of a row of nbytes in all (each rank holds nbytes / t): ring or one-shot."""
    t = g.size
    if t <= 1:
        return 0.0
    inter = g.nodes - 1
    ring = (_base_s(g) + (t - 1 - inter) * _step_s(g) + inter * STEP_US["inter-node"] * 1e-6
            + (t - 1) / t * nbytes / g.bandwidth)
    if "oneshot" not in available(g) or algorithm in ("ring", "tree"):
        return ring
    base = _step_s(g) if g.kind == "link" else ONESHOT_BASE_US * 1e-6
    oneshot = base + (t - 1) / t * nbytes / g.bandwidth
    return oneshot if algorithm == "oneshot" else min(ring, oneshot)


def tp_stage_bytes(activation_bytes: int, logits_bytes: int, n_layers: int, last: bool) -> tuple[int, int]:
    """(bytes all-reduced, bytes all-gathered) by one TP stage forward of one token: two all-reduces of
    the hidden state per layer, and the logits row on the last stage."""
    return 2 * n_layers * activation_bytes, (logits_bytes if last else 0)
