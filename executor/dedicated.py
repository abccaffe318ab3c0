"""`spd_dedicated` in the executor: the authors' reference layout, n + 1 ranks in synchronous cycles.

Rank 0 holds the embedding, the final norm + LM head, the drafter and the verification (no decoder
layers); rank s = 1..n holds stage s-1 of the uniform partition, decoder layers only. Rank 0 drives
`spdsim.protocol.CycleController`, in the order spdsim/schemes/spd_dedicated.py models:

  rank 0, per cycle: begin() → CONTROL(slot) to every stage rank → embed the token entering stage 1 and
      send it (ACT) to rank 1 → draft the token entering next cycle (overlaps the stage forwards) → wait
      for the last stage's hidden state (RESULT), norm + LM head, verify → end(): slots advance, or clear
      on a rejection (epoch += 1, as in SpdController).
  rank s: for each CONTROL in order: an empty slot is skipped; else take the input whose (position,
      epoch) is the slot's (inputs of cleared slots are dropped, never computed), forward the layers,
      send ACT to rank s+1, or the final hidden state (RESULT) to rank 0 from the last stage.

No stale work downstream: a cleared slot is not computed. What was computed for a position a rejection
voided is still marked `discarded` (the same rule as pipeline._event). There is no explicit sync phase:
our sends complete into the transport's buffers. Prefill, STOP and the trace BLOBs work as in
executor/pipeline.py; STOP carries the job's cycle count so a stage rank drains every CONTROL first,
and the final STOP goes from rank 0 to every stage rank.
"""
from __future__ import annotations

import json
from collections import deque

import torch
from torch import Tensor

from executor.drafters import make_drafter, parse_draft
from executor.model import Stage, greedy_decode
from executor.pipeline import _NAMES, Job, JobResult, Worker, _act, _event, apply_verdict, clock
from executor.transport import ACT, BLOB, PREFILL, READY, RESULT, STOP, Message
from spdsim.errors import UserError
from spdsim.protocol import CycleController

SCHEME = "spd_dedicated"
# The slot table's entry for one stage rank: epoch, position, aux = 1 when the slot is filled, token =
# the cycle. A kind of its own, outside the transport's list (which passes unknown kinds through).
CONTROL = 10
_NAMES[CONTROL] = "control"


@torch.no_grad()
def layers_forward(stage: Stage, x: Tensor, positions: Tensor) -> Tensor:
    """Decoder layers only (stage 1 here gets embedded input; the last stage returns the pre-norm hidden)."""
    cos, sin = stage.rope_cos[positions], stage.rope_sin[positions]
    for layer in stage.layers:
        x = layer(x, cos, sin, positions)
    return x


# --- ranks 1..n -------------------------------------------------------------------------------------

def serve_dedicated(w: Worker, idle_timeout: float) -> None:
    """A stage rank's loop over every job until the final STOP. `w.n` is the world size (n·T + 1). With
    --tp T, TP rank t of stage s takes its inputs from TP rank t of stage s-1 (stage 0's from rank 0,
    which sends each of them the embedded token) and every stage rank gets every CONTROL; only TP rank 0
    of the last stage sends RESULT and READY."""
    r, L = w.rank, w.layout
    stage, up, down = L.stage_of(r), L.upstream(r), L.downstream(r)
    last, leader = down is None, L.tp_rank_of(r) == 0
    sources = sorted({0, up})
    controls: deque = deque()      # filled slots and None (empty), in cycle order
    inputs: deque = deque()        # ACTs from rank r-1 not yet taken
    seen, in_job = 0, False

    def step() -> None:
        while controls:
            slot = controls[0]
            if slot is None:
                controls.popleft()
                continue
            while inputs and (inputs[0].position, inputs[0].epoch) != slot:
                inputs.popleft()           # the input of a slot a rejection cleared: never computed
            if not inputs:
                return
            msg = inputs.popleft()
            controls.popleft()
            x = msg.tensor.to(w.device).unsqueeze(0)
            w.at(msg.position, msg.epoch)
            t0 = clock()
            h = layers_forward(w.stage, x, torch.tensor([msg.position], device=w.device))
            w.rec.add("compute", t0, clock(), stage=stage, position=msg.position, epoch=msg.epoch)
            if last:
                if leader:
                    w.send(0, _act(RESULT, h, msg.epoch, msg.position), stage)
            else:
                w.send(down, _act(ACT, h, msg.epoch, msg.position, msg.token), stage)

    while True:
        _, msg = w.tr.recv(sources, w.timeout if in_job else idle_timeout)
        if msg.kind == CONTROL:
            seen += 1
            controls.append((msg.position, msg.epoch) if msg.aux else None)
            step()
        elif msg.kind == ACT:
            inputs.append(msg)
            step()
        elif msg.kind == PREFILL:
            in_job, seen = True, 0
            x = msg.tensor.to(w.device).unsqueeze(0)
            w.at(msg.position, phase="prefill")
            t0 = clock()
            h = layers_forward(w.stage, x, torch.arange(msg.position, msg.position + x.shape[1], device=w.device))
            w.rec.add("compute", t0, clock(), stage=stage, position=msg.position, phase="prefill")
            if last:
                if leader:
                    w.tr.send(0, Message(READY))
            else:
                w.send(down, _act(PREFILL, h, position=msg.position), stage, "prefill")
        elif msg.kind == STOP:
            while msg.aux != 1 and seen < msg.position:     # every CONTROL of the job, before the STOP
                _, extra = w.tr.recv([0], w.timeout)
                assert extra.kind == CONTROL, extra.kind
                seen += 1
                controls.append((extra.position, extra.epoch) if extra.aux else None)
            step()
            assert all(c is None for c in controls), "a filled slot was never computed"
            controls.clear()
            inputs.clear()
            if msg.aux == 1:              # the final STOP comes from rank 0 to every rank (shutdown below)
                return
            if not last:
                w.tr.send(down, msg)
            w.tr.send(0, Message(BLOB, blob=json.dumps(w.rec.take()).encode()))
            in_job = False
        else:
            raise RuntimeError(f"stage rank {r}: unexpected message kind {msg.kind}")


# --- rank 0 ----------------------------------------------------------------------------------------

@torch.no_grad()
def lead_dedicated(w: Worker, job: Job, idle_timeout: float) -> JobResult:
    """Run one job as rank 0 of the n + 1-rank layout (`w.stage` is unused: rank 0 has no layers)."""
    L = w.layout
    n, P, N = L.stages, len(job.prompt), job.new_tokens
    first, last = L.group(0), L.rank(n - 1, 0)      # stage 0's TP ranks get every input; RESULT from `last`
    model, dev = w.model, w.device
    if job.temperature > 0:            # its only drafter, the oracle, has no distribution to sample
        raise UserError(f"--scheme {SCHEME} decodes greedily only: use --temperature 0, or --scheme spd")
    parsed = parse_draft(job.draft)
    reference = None
    if (parsed and parsed[0] == "oracle") or job.reference:
        reference = greedy_decode(model, job.prompt, N)     # before timing
    drafter = None
    if n > 1:
        if parsed is None:
            raise UserError(f"--scheme {SCHEME} needs --draft oracle:ALPHA")
        drafter = make_drafter(parsed, reference, job.seed, model, n)
        if drafter.needs_features:
            raise UserError(f"--scheme {SCHEME} runs the oracle drafter only (head:PATH needs features)")

    def head(name: str, t0: int, position: int, epoch: int = 0, phase: str = "decode") -> None:
        w.rec.add("head", t0, clock(), position=position, epoch=epoch, phase=phase, name=name)

    # prefill: embed 0..P-2 here, through the stage ranks, READY from the last
    t0 = clock()
    x = model.tok_embeddings(torch.tensor([job.prompt[:-1]], device=dev))
    head("embed", t0, 0, phase="prefill")
    for dst in first:
        w.send(dst, _act(PREFILL, x, position=0), -1, "prefill")
    _, msg = w.tr.recv([last], idle_timeout)
    assert msg.kind == READY, msg.kind
    if drafter:
        drafter.start(list(job.prompt), None)

    cc = CycleController(P, N, n)
    seq: list[int | None] = list(job.prompt) + [None] * N
    drafts: dict[int, int] = {}
    accepts: list[int] = []
    restarts = [P - 1]
    while not cc.done:
        c = cc.begin()
        for s, slot in enumerate(c.slots):
            for dst in L.group(s):
                w.send(dst, Message(CONTROL, slot.epoch if slot else 0, slot.position if slot else -1, c.cycle,
                                    aux=int(slot is not None)), -1)
        new = c.slots[0]
        if new is not None:
            q = new.position
            tok = seq[q] if q < cc.ctl.known else drafts[q]
            t0 = clock()
            x = model.tok_embeddings(torch.tensor([[tok]], device=dev))
            head("embed", t0, q, new.epoch)
            for dst in first:
                w.send(dst, _act(ACT, x, new.epoch, q, tok), -1)
            if c.draft_for is not None:
                t0 = clock()
                drafts[q + 1] = drafter.draft(q, tok)
                head("draft", t0, q + 1, new.epoch)
        out = c.slots[-1]
        token = None
        if out is not None:
            _, msg = w.tr.recv([last], w.timeout)
            assert msg.kind == RESULT and (msg.position, msg.epoch) == (out.position, out.epoch), \
                (msg.kind, msg.position, msg.epoch, out)
            t0 = clock()
            token = int(model.output(model.norm(msg.tensor.to(dev)))[-1].argmax())
            head("lm_head", t0, out.position + 1, out.epoch)
        v = cc.end(lambda: drafts.get(out.position + 1) == token)
        if v is None or v.stale:
            continue
        apply_verdict(w.rec, v, token, out.epoch, seq, accepts, restarts, drafter, clock())

    rows = w.rec.take()
    for dst in first:
        w.tr.send(dst, Message(STOP, position=cc.cycle))
    others = list(range(1, L.world))
    for _ in others:
        _, msg = w.tr.recv(others, idle_timeout)
        if msg.kind == BLOB:
            rows += json.loads(msg.blob)
    events = sorted((_event(row, restarts) for row in rows), key=lambda e: (e.start_ns, e.end_ns))
    return JobResult(tokens=[int(t) for t in seq[P:]], accepts=accepts, reference=reference, events=events,
                     epochs=len(restarts))


def shutdown_dedicated(w: Worker) -> None:
    """The final STOP straight to every stage rank, the last first: rank s listens to ranks 0 and s-1 and
    fails on seeing either close, so its STOP must be on the wire before rank s-1 (or 0) can exit."""
    for r in range(w.n - 1, 0, -1):
        w.tr.send(r, Message(STOP, aux=1))
