"""The multi-request protocol object (spdsim.serving_protocol.ServingController), driven by hand as
the executor's first rank will drive it, and the batched / prefill cost functions against their
closed forms."""
from __future__ import annotations

import pytest

from spdsim.costs import FLOP_EFFICIENCY, CostOverrides, RooflineCosts
from spdsim.hardware import GPU_CATALOG, Hardware, TopologySpec
from spdsim.models import MODEL_CATALOG
from spdsim.serving_protocol import ServingController


def drive(ctl: ServingController, ticks: int, stages: int, accept=lambda c: True, conf=None):
    """A toy pipeline of `stages` equal stages, one tick per step, results back after `stages` steps;
    every speculated position's draft is ready one step after its predecessor issued."""
    flight, log = [], []
    for t in range(ticks):
        while flight and flight[0][0] <= t:
            _, tick = flight.pop(0)
            for e in tick.entries:
                v = ctl.on_result(e.request, e.position, e.epoch, accept)
                if v.finished:
                    ctl.admit()
        tick = ctl.next_tick()
        log.append(tick)
        if tick is None:
            continue
        flight.append((t + stages, tick))
        for e in tick.entries:
            if ctl.wants_draft(e):
                ctl.on_draft(e.request, e.position + 1, e.epoch, conf(e) if conf else None)
    return log


def test_fcfs_admits_one_request_at_a_time():
    ctl = ServingController("fcfs", window=4, drafts=True, max_batch=8)
    for r in range(3):
        ctl.arrive(r, prompt_len=1, new_tokens=5)
    assert ctl.admit() == [0] and ctl.admit() == []
    log = drive(ctl, 60, 4)
    seen = [e.request for t in log if t for e in t.entries]
    assert seen == sorted(seen) and set(seen) == {0, 1, 2}        # request after request
    assert ctl.finished == 3 and ctl.idle


def test_interleave_pp_round_robin_fills_the_stages():
    ctl = ServingController("interleave", window=1, drafts=False)
    for r in range(4):
        ctl.arrive(r, prompt_len=1, new_tokens=6)
    ctl.admit()
    log = drive(ctl, 40, 4)
    first = [t.entries[0].request for t in log[:12]]
    assert first == [0, 1, 2, 3] * 3                               # one position each, in turn, no gap
    assert all(not e.speculative for t in log if t for e in t.entries)


def test_spd_first_only_the_oldest_speculates():
    ctl = ServingController("spd_first", window=4, drafts=True)
    for r in range(3):
        ctl.arrive(r, prompt_len=1, new_tokens=12)
    ctl.admit()
    oldest, spec, seen, flight = [], [], set(), []
    for t in range(80):                       # drive() by hand, noting the oldest request at each tick
        while flight and flight[0][0] <= t:
            for e in flight.pop(0)[1].entries:
                ctl.on_result(e.request, e.position, e.epoch, lambda c: True)
        tick = ctl.next_tick()
        if tick is None:
            continue
        for e in tick.entries:
            seen.add(e.request)
            if e.speculative:
                spec.append((e.request, ctl.running[0].rid))
            if ctl.wants_draft(e) and t % 3:  # the oldest's draft is sometimes late: a slot for the others
                ctl.on_draft(e.request, e.position + 1, e.epoch)
        flight.append((t + 4, tick))
    assert spec and all(r == o for r, o in spec) and seen == {0, 1, 2}


def test_adaptive_enters_a_draft_only_above_the_threshold():
    ctl = ServingController("adaptive", window=4, drafts=True, threshold=0.5)
    for r in range(2):
        ctl.arrive(r, prompt_len=1, new_tokens=12)
    ctl.admit()
    verified = []

    def accept(c):
        verified.append(c)
        return True
    # request 0 always drafts with low confidence, request 1 with high
    log = drive(ctl, 40, 4, accept=accept, conf=lambda e: 0.2 if e.request == 0 else 0.9)
    spec = [e for t in log if t for e in t.entries if e.speculative]
    assert spec and {e.request for e in spec} == {1}
    assert verified and set(verified) == {0.9}                    # accept() sees the verified draft's confidence


def test_admission_waits_for_memory_head_of_line():
    ctl = ServingController("interleave", window=1, drafts=False, capacity=(100.0, 100.0))
    ctl.arrive(0, 1, 3, need=(60.0, 10.0))
    ctl.arrive(1, 1, 3, need=(50.0, 10.0))      # does not fit beside 0
    ctl.arrive(2, 1, 3, need=(10.0, 10.0))      # would fit, but waits behind 1 (FIFO)
    assert ctl.admit() == [0]
    drive(ctl, 30, 2)
    assert ctl.finished == 3 and ctl.used == [0.0, 0.0]
    with pytest.raises(ValueError, match="request 3 needs"):
        ctl.arrive(3, 1, 3, need=(101.0, 0.0))


def test_prefill_chunks_come_first_and_alone():
    ctl = ServingController("interleave", window=1, drafts=False, max_batch=4, prefill_chunk=4)
    ctl.arrive(0, prompt_len=11, new_tokens=2)   # positions 0..9 to prefill: chunks of 4, 4, 2
    ctl.admit()
    ticks = [ctl.next_tick() for _ in range(4)]
    assert [(t.chunk.start, t.chunk.tokens) for t in ticks[:3]] == [(0, 4), (4, 4), (8, 2)]
    assert ticks[3].entries[0].position == 10 and ticks[3].chunk is None


def test_stale_results_of_a_finished_request_are_dropped():
    ctl = ServingController("fcfs", window=2, drafts=True)
    ctl.arrive(0, 1, 2)
    ctl.admit()
    t0 = ctl.next_tick()
    ctl.on_draft(0, 1, 0)
    t1 = ctl.next_tick()                      # position 1, speculated
    assert t1.entries[0].speculative
    v = ctl.on_result(0, 0, 0, lambda c: False)   # rejected: epoch 1, position 1 again
    assert v.verdict.accepted is False and ctl.epoch(0) == 1
    t2 = ctl.next_tick()
    assert (t2.entries[0].position, t2.entries[0].epoch, t2.entries[0].speculative) == (1, 1, False)
    assert ctl.on_result(0, 1, 0, lambda c: True).verdict.stale          # the flushed one
    assert ctl.on_result(0, 1, 1, lambda c: True).finished
    assert ctl.on_result(0, 1, 0, lambda c: True).verdict.stale          # after the finish: dropped
    assert t0.entries[0].position == 0


# --- cost functions ------------------------------------------------------------------------------------

def roofline(model="llama-3-8b", gpu="h100-sxm"):
    g = GPU_CATALOG[gpu]
    hw = Hardware(g, 2, TopologySpec("nvswitch", {"latency_us": 5, "gbps": 450}))
    return RooflineCosts(MODEL_CATALOG[model], g, hw.graph, CostOverrides()), MODEL_CATALOG[model], g


@pytest.mark.parametrize("ctxs", [[100], [100, 600], [1, 2, 3, 4, 5, 6, 7, 8], [4000] * 16])
def test_batched_tick_closed_form(ctxs):
    """max(weights once + every KV cache over bandwidth, every sequence's FLOPs over peak) + overhead,
    per layer; the LM head's weights once, its FLOPs per sequence."""
    c, m, g = roofline()
    bw = g.hbm_gbps * 1e9 * 0.75
    peak = g.bf16_tflops * 1e12 * FLOP_EFFICIENCY
    kv = m.kv_bytes_per_token_layer()
    layer = max((m.layer_bytes + sum(ctxs) * kv) / bw, sum(m.layer_flops(x) for x in ctxs) / peak) + 20e-6
    head = max(m.lm_head_bytes / bw, len(ctxs) * m.lm_head_flops / peak) + 20e-6
    want = 4 * layer + head
    assert c.batch_stage_s(1, 10, 14, ctxs, False, True) == pytest.approx(want, rel=1e-12)
    if len(ctxs) == 1:
        assert c.batch_stage_s(1, 10, 14, ctxs, False, True) == c.stage_s(1, 10, 14, ctxs[0], False, True)
    else:    # batching pays: cheaper than one tick per sequence, dearer than one alone
        singles = sum(c.stage_s(1, 10, 14, x, False, True) for x in ctxs)
        assert max(c.stage_s(1, 10, 14, x, False, True) for x in ctxs) < want < singles


def test_prefill_closed_form_and_one_token():
    """A chunk of T tokens after ctx cached ones: weights once, KV of ctx + T positions; FLOPs
    T·2·params + 4·heads·hd·Σ (ctx+i+1) — compute-bound for hundreds of tokens."""
    c, m, g = roofline()
    bw = g.hbm_gbps * 1e9 * 0.75
    peak = g.bf16_tflops * 1e12 * FLOP_EFFICIENCY
    T, ctx = 512, 100
    flops = T * 2 * m.layer_params + 4 * m.heads * m.hd * sum(ctx + i + 1 for i in range(T))
    layer = max((m.layer_bytes + (ctx + T) * m.kv_bytes_per_token_layer()) / bw, flops / peak) + 20e-6
    assert c.prefill_s(2, 0, 8, T, ctx, False, False) == pytest.approx(8 * layer, rel=1e-12)
    assert flops / peak > (m.layer_bytes + (ctx + T) * m.kv_bytes_per_token_layer()) / bw    # compute-bound
    # one token at ctx costs a decode tick at ctx + 1, less the LM head
    assert c.prefill_s(0, 0, 8, 1, ctx, True, False) == pytest.approx(c.stage_s(0, 0, 8, ctx + 1, True, False))
    assert c.prefill_s(0, 0, 8, 1, ctx, True, True) == pytest.approx(
        c.stage_s(0, 0, 8, ctx + 1, True, True) - c.lm_head_s())


def test_a_held_request_waits_for_its_draft():
    """hold: the request's draft waits for features; it issues nothing, not even a known token,
    until the draft is made or a flush starts a newer epoch (as the single-request first rank)."""
    ctl = ServingController("interleave", window=4, drafts=True)
    ctl.arrive(0, 1, 8)
    ctl.admit()
    t = ctl.next_tick()                        # position 0 (known)
    ctl.hold(0, 0)
    ctl.on_result(0, 0, 0, lambda c: True)     # position 1 is known now, but the draft is pending
    assert ctl.next_tick() is None
    ctl.on_draft(0, 1, 0)                      # the (late) draft arrives: the hold ends
    t = ctl.next_tick()
    assert t.entries[0].position == 1
    ctl.hold(0, 0)
    ctl.on_draft(0, 2, 0)
    ctl.next_tick()                            # position 2, speculated
    ctl.hold(0, 0)
    v = ctl.on_result(0, 1, 0, lambda c: False)   # rejected: epoch 1, the hold of epoch 0 is void
    assert v.verdict.accepted is False and ctl.next_tick().entries[0].epoch == 1
