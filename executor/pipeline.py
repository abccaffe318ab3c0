"""The pipeline runtime: one process (rank) per stage, decoding with AR, PP or SPD (DESIGN §2).

(`spd_dedicated`, the reference implementation's n + 1-rank layout in synchronous cycles driven by
spdsim.protocol.CycleController, reuses Worker, Recorder and _event from here; its loops and protocol are
in executor/dedicated.py.)

Control protocol (the simulator models the same one; the state machine is spdsim.protocol.SpdController):

  Ranks. Rank r runs stage r (layers of the uniform partition). Rank 0 also holds the embedding, the
  drafter (co-located with stage 1) and the controller: it decides what enters the pipeline, verifies,
  commits and flushes. The last rank holds the final norm + LM head and picks the greedy token.
  With --tp T (spdsim/protocol.py, "Tensor-parallel stages") stage s runs on ranks s·T .. s·T+T-1
  (executor/ranks.py), each holding its shard (executor/tp.py); "rank s" below then means TP rank 0
  of stage s, and TP rank t of every stage does the same work on its shard: it takes its input from TP
  rank t of the stage before and passes its output to TP rank t of the next. Rank 0 sends every
  PREFILL (the prompt's token ids) and every issue (ACT without a tensor: epoch, position, token) to
  stage 0's other TP ranks before its own forward; only TP rank 0 of a stage sends RESULT, READY and
  features; STOP goes down every TP rank's chain and every rank sends its BLOB to rank 0.

  Prefill. Rank 0 sends the prompt positions 0..P-2 through the pipeline as one PREFILL chunk; every
  stage fills its KV cache; the last stage answers READY and rank 0 waits for it before decoding, so
  decode timing starts on an empty pipeline. (With a feature-using drafter every stage also sends its
  prefill output to rank 0.) PREFILL's aux holds the job's flags for the stages: bit 0 = send features,
  bit 1 = put the logits on RESULT (temperature > 0).

  Decode, rank 0, per issued position q (window W = n for SPD, 1 for PP):
      wait until controller.can_issue(), handling each message that arrives → stage-1 forward of q with
      its token (the true one, or the draft made for q) → send ACT(epoch, q) to rank 1 → if SPD: (a
      feature-using drafter first waits for the features the draft needs; a flush meanwhile voids the
      draft) draft the token for q+1 → loop. spdsim/schemes/spd.py models the same order.
  Stage s > 0: receive ACT(e, q) from s-1; a newer epoch e means a flush happened: adopt it (rolling
  the KV cache back to q is free, see executor/model.py: the forward of q overwrites entry q and
  attends to entries ≤ q only) → forward → send ACT(e, q) on, or, on the last stage, RESULT(e, q,
  greedy token at q+1) to rank 0, for every position it computes, stale ones included. At temperature
  0 that token is the true one. At temperature T > 0 the last stage stays as dumb: RESULT also carries
  the target's logits row for q+1 (after the final hidden state when features are on: one tensor
  [hidden | logits], split on rank 0), and rank 0 does all the sampling.
  Rank 0 on RESULT: controller.on_result (rule 4 of spdsim/protocol.py): stale epoch → dropped;
  else commit; if a draft for q+1 was in flight, verify it; a rejection bumps the epoch, voids every
  in-flight position > q and re-issues q+1 with the true token. No flush message travels: the new
  epoch rides on the next ACT, and stages compute the stale positions queued before it (that is the
  waste of DESIGN §3; rank 0 marks those compute events `discarded` when it merges the traces).
  At T > 0 the true token is drawn on rank 0 from p = softmax(logits / T): with a draft x for q+1 in
  flight (drawn from the drafter's q at the same T), it is speculative_sampling.speculative_accept(p, q, x),
  which keeps x with probability min(1, p/q) and else draws from the residual max(p - q, 0), so the
  token is distributed as p either way (lossless in distribution, not token for token); "accepted"
  means token == x, and a rejection's resampled token is the restart token. Without a draft in flight
  for q+1 (PP, AR, the last token, q+1 not issued yet) it is drawn from p. Every draw re-seeds one
  generator from (job seed, epoch, position, purpose) (class Sampler), so the tokens depend on the seed
  only, not on the order in which messages from different ranks arrive.

  Features (feature-using drafters only). Stage s sends FEAT(e, q, depth s+1, its output) to rank 0
  after each forward; the last stage puts its final hidden state (before the norm) on the RESULT.
  Rank 0 hands the drafter, before it drafts for q+1, exactly the features at depth min(q-j, n) of each
  position j ≤ q (depth 0 = embedding, which rank 0 computes itself), and waits for the missing ones.
  A feature (e, j) counts unless a later epoch restarted at a position ≤ j.

  Serving (several requests, executor/serving.py): the same protocol per request — each message names
  its request, each stage computes a request against its own KV-cache slot (the slot rides on the
  request's PREFILL), and rank 0 drives spdsim.serving_protocol.ServingController instead of one
  SpdController.

  End. After the N-th commit nothing is in flight (nothing past P+N-2 is issued, links are FIFO).
  Rank 0 sends STOP down the pipeline; each rank sends its trace events to rank 0 (BLOB). A final
  STOP(aux=1) ends the processes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from executor.drafters import Drafter, make_drafter, parse_draft
from executor.model import Stage, Transformer, greedy_decode
from executor.ranks import RankLayout
from executor.transport import ACT, BLOB, FEAT, KIND_NAMES, PREFILL, READY, RESULT, STOP, Message, Transport
from spdsim.protocol import SpdController
from spdsim.trace import TraceEvent

clock = time.perf_counter_ns      # CLOCK_MONOTONIC: one clock for every process on a host


@dataclass
class Job:
    scheme: str                     # ar | pp | spd
    prompt: list[int]
    new_tokens: int
    draft: str | None = None        # oracle:ALPHA | head:PATH (spd only)
    seed: int = 0
    temperature: float = 0.0        # 0: greedy; T > 0: sample from softmax(logits / T), drafts verified
                                    # by speculative sampling (lossless in distribution)
    reference: bool = False         # also decode the one-device AR reference before timing (the oracle
                                    # always does; --tp runs do by default: JobResult.reference)
    serving: dict | None = None     # several requests (executor/serving.py ServingJob's fields); then
                                    # `prompt` and `new_tokens` are the first request's


@dataclass
class JobResult:
    tokens: list[int]
    accepts: list[int]
    reference: list[int] | None
    events: list[TraceEvent]
    epochs: int


@dataclass
class Recorder:
    """Raw events of one rank, with the epoch each belongs to (rank 0 decides later what was wasted)."""
    rank: int
    rows: list[dict] = field(default_factory=list)
    tp_rank: int = 0                # the rank's place in its stage's TP group, on every event

    def add(self, kind: str, start: int, end: int, stage: int = -1, position: int = -1, epoch: int = 0,
            nbytes: int = 0, accepted: bool | None = None, phase: str = "decode", name: str = "",
            request: int = -1) -> None:
        self.rows.append({"kind": kind, "start_ns": start, "end_ns": end, "stage": stage, "position": position,
                          "epoch": epoch, "bytes": nbytes, "accepted": accepted, "phase": phase, "name": name,
                          "device": f"rank{self.rank}", "tp_rank": self.tp_rank, "request": request})

    def take(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows


def apply_verdict(rec: Recorder, verdict, token: int, epoch: int, seq: list, accepts: list[int],
                  restarts: list[int], drafter: Drafter | None, now: int, request: int = -1) -> None:
    """Rank 0's bookkeeping for a result that counts (every layout, and each request of a serving run):
    commit the true token at p+1, log the verdict's verify / flush / commit marks, and on a rejection open
    a new epoch at p+1 and roll the drafter back."""
    p = verdict.position
    seq[p + 1] = token
    for kind, pos, acc in verdict.marks():
        rec.add(kind, now, now, position=pos, epoch=epoch, accepted=acc, request=request)
    if verdict.accepted is not None:
        accepts.append(int(verdict.accepted))
    if verdict.accepted is False:
        restarts.append(p + 1)
        if drafter:
            drafter.rollback(p + 1)


# Purposes of a draw (part of its seed).
DRAW_DRAFT, DRAW_VERIFY = 1, 2
_MASK64 = (1 << 64) - 1


def _seed_of(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 steps), for Sampler's per-draw re-seeding."""
    h = 0x9E3779B97F4A7C15
    for k in key:
        h = ((h ^ (k & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 31)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h >> 1


class Sampler:
    """Rank 0's randomness at temperature > 0. One generator seeded from the job's seed, re-seeded for
    each draw from (seed, epoch, position, purpose): every draw has a key of its own (a position is
    drafted at most once and committed once per epoch), so draws are independent, and the tokens do not
    depend on the order in which RESULTs and FEATs from different ranks happen to be handled."""

    def __init__(self, seed: int, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"Sampler needs a temperature > 0, got {temperature}")
        from executor.speculative_sampling import speculative_accept     # the one rule; needed at T > 0 only
        self.seed, self.temperature, self._accept = seed, temperature, speculative_accept
        self._gens: dict[str, torch.Generator] = {}

    def generator(self, epoch: int, position: int, purpose: int, device: torch.device | str = "cpu") -> torch.Generator:
        # speculative_accept draws on the CPU; a drafter draws on its own device (a CUDA tensor needs a
        # CUDA generator): one generator per device, the same key → the same seed on each
        dev = torch.device(device)
        gen = self._gens.get(str(dev))
        if gen is None:
            gen = self._gens[str(dev)] = torch.Generator(device=dev)
        return gen.manual_seed(_seed_of(self.seed, epoch, position, purpose))

    def probs(self, logits: Tensor) -> Tensor:
        """The target's distribution at the temperature, fp32 on the CPU: [vocab]."""
        return torch.softmax(logits.detach().float().cpu().reshape(-1) / self.temperature, -1)

    def token(self, logits: Tensor, epoch: int, position: int, draft: int | None = None,
              q: Tensor | None = None) -> int:
        """The true token at `position`: speculative sampling against (draft, q) when a draft is being
        verified, else a plain draw from p."""
        p, gen = self.probs(logits), self.generator(epoch, position, DRAW_VERIFY)
        if draft is None:
            return int(torch.multinomial(p, 1, generator=gen))
        _, tok = self._accept(p, q.detach().float().cpu().reshape(-1), torch.tensor(draft), gen)
        return int(tok)


@torch.no_grad()
def stage_forward(stage: Stage, x: Tensor, positions: Tensor, logits: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """(output, pre-norm hidden, embedding) of a stage: the output is logits on the last stage (when
    asked), else the hidden state. The same maths as Stage.forward, keeping the pieces drafters use."""
    cos, sin = stage.rope_cos[positions], stage.rope_sin[positions]
    emb = None
    if stage.is_first:
        x = emb = stage.tok_embeddings(x)
    for layer in stage.layers:
        x = layer(x, cos, sin, positions)
    out = stage.output(stage.norm(x)) if stage.is_last and logits else x
    return out, x, emb


# PREFILL aux bits: the job's flags for the stage ranks. PREFILL_SERVING: a serving job's request
# (executor/serving.py): no READY after it, prefill features marked epoch -1, and the stage ranks wait up
# to the idle timeout for their next message (requests arrive when they arrive).
PREFILL_FEATURES, PREFILL_LOGITS, PREFILL_SERVING = 1, 2, 4


def _result_tensor(hidden: Tensor, logits: Tensor, feats: bool, with_logits: bool) -> Tensor | None:
    """What RESULT carries besides the greedy token: the final hidden state for a feature-using drafter,
    the logits row at T > 0, both as one row [hidden | logits] (a Message has one tensor)."""
    parts = ([hidden.reshape(1, -1)] if feats else []) + ([logits.reshape(1, -1)] if with_logits else [])
    return None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _act(msg_kind: int, h: Tensor, epoch: int = 0, position: int = 0, token: int = 0, aux: int = 0,
         request: int = -1) -> Message:
    return Message(msg_kind, epoch, position, token, aux, tensor=h.reshape(-1, h.shape[-1]), request=request)


class Worker:
    """One rank: its stage (or its TP shard of it), its transport, its recorder.

    `model` is what rank 0's drafter reads (the config and the embedding: a whole Transformer, or under
    TP stage 0's shard, whose embedding is replicated); `full_model`, when given, loads the whole model
    for the oracle's AR reference (TP ranks hold shards only). `comm` is the rank's TP group (tp.TPComm)."""

    def __init__(self, rank: int, world: int, model: Transformer | Stage, stage: Stage, transport: Transport | None,
                 timeout: float, device: torch.device, layout: RankLayout | None = None,
                 full_model: Callable[[], Transformer] | None = None, comm=None) -> None:
        self.rank, self.n, self.model, self.stage = rank, world, model, stage
        self.tr, self.timeout, self.device = transport, timeout, device
        self.layout = layout or RankLayout(stages=world)
        self.full_model = full_model
        self._references: dict[tuple, list[int]] = {}
        self.stage_index = max(self.layout.stage_of(rank), 0)
        self.rec = Recorder(rank, tp_rank=self.layout.tp_rank_of(rank))
        self._at: tuple[int, int, str, int] = (-1, 0, "decode", -1)   # position, epoch, phase, request of the forward running
        if comm is not None:
            comm.trace = self._trace_collective
        self.stage.setup_cache()
        # serving: one KV cache per admitted-request slot (executor/serving.py); slot 0 is the stage's own
        self._slot = 0
        self._caches: dict[int, list] = {}
        self.slot_of: dict[int, int] = {}        # request → its slot, as its PREFILL said

    def use_slot(self, slot: int) -> None:
        """Point every layer of the stage at the KV cache of `slot` (made on first use)."""
        if slot == self._slot:
            return
        layers = self.stage.layers
        self._caches[self._slot] = [layer.attention.kv_cache for layer in layers]
        caches = self._caches.get(slot)
        if caches is None:
            self.stage.setup_cache()
            caches = [layer.attention.kv_cache for layer in layers]
        for layer, cache in zip(layers, caches):
            layer.attention.kv_cache = cache
        self._slot = slot

    def at(self, position: int, epoch: int = 0, phase: str = "decode", request: int = -1) -> None:
        """Say which forward runs next, so its TP collectives are traced with its position."""
        self._at = (position, epoch, phase, request)

    def _trace_collective(self, name: str, start: int, end: int, nbytes: int) -> None:
        position, epoch, phase, request = self._at
        self.rec.add("allreduce", start, end, stage=self.stage_index, position=position, epoch=epoch,
                     nbytes=nbytes, phase=phase, name=name, request=request)

    def reference(self, prompt: list[int], new_tokens: int) -> list[int]:
        """The one-device AR greedy continuation (the oracle's), before timing; once per prompt (--repeat)."""
        return self.references([(prompt, new_tokens)])[0]

    def references(self, wanted: list[tuple[list[int], int]]) -> list[list[int]]:
        """`reference` for several (prompt, new tokens) at once (serving): the whole model loaded once."""
        missing = list(dict.fromkeys((tuple(p), k) for p, k in wanted if (tuple(p), k) not in self._references))
        if missing:
            if self.full_model is not None:          # loaded for this and dropped: TP ranks keep shards only
                model = self.full_model()
                for key in missing:
                    self._references[key] = greedy_decode(model, list(key[0]), key[1])
                del model
            else:
                for key in missing:
                    self._references[key] = greedy_decode(self.model, list(key[0]), key[1])
                self.stage.setup_cache()             # greedy_decode clobbered the shared layers' caches
        return [list(self._references[(tuple(p), k)]) for p, k in wanted]

    def send(self, dst: int, msg: Message, stage: int, phase: str = "decode") -> None:
        t0 = clock()
        self.tr.send(dst, msg)
        self.rec.add("send", t0, clock(), stage=stage, position=msg.position, epoch=msg.epoch, nbytes=msg.nbytes,
                     phase=phase, name=f"{_NAMES[msg.kind]} {self.rank}->{dst}", request=msg.request)

    # --- ranks 1..n-1 ------------------------------------------------------------------------

    def serve(self, idle_timeout: float) -> None:
        """A stage rank's loop over every job until the final STOP (every rank but 0: stage s's TP rank t
        takes its inputs from TP rank t of stage s-1 — stage 0's other TP ranks from rank 0, which
        forwards them each issue — and passes its output to TP rank t of stage s+1; only TP rank 0 of a
        stage sends RESULT, READY and features, see spdsim/protocol.py). Serving (executor/serving.py):
        every message names its request; a request's PREFILL names its KV-cache slot (in `token`) and
        every later message of that request computes against that slot's cache."""
        r, L = self.rank, self.layout
        s, up, down = self.stage_index, L.upstream(r), L.downstream(r)
        last, leader = down is None, L.tp_rank_of(r) == 0
        feats, logits, in_job, serving = False, False, False, False
        while True:
            _, msg = self.tr.recv([up], self.timeout if in_job and not serving else idle_timeout)
            if msg.kind == STOP:
                if not last:
                    self.tr.send(down, msg)
                if msg.aux == 1:
                    return
                self.tr.send(0, Message(BLOB, blob=json.dumps(self.rec.take()).encode()))
                in_job = False
                continue
            rq = msg.request
            if msg.kind == PREFILL:
                self.slot_of[rq] = msg.token
            self.use_slot(self.slot_of.get(rq, 0))
            if s == 0:               # a TP peer of rank 0: token ids (the prompt, or the issued token)
                x = (msg.tensor.to(self.device) if msg.kind == PREFILL
                     else torch.tensor([[msg.token]], device=self.device))
            else:
                x = msg.tensor.to(self.device).unsqueeze(0)
            positions = torch.arange(msg.position, msg.position + x.shape[1], device=self.device)
            if msg.kind == PREFILL:
                in_job, feats, logits = True, bool(msg.aux & PREFILL_FEATURES), bool(msg.aux & PREFILL_LOGITS)
                serving = bool(msg.aux & PREFILL_SERVING)
                self.at(msg.position, phase="prefill", request=rq)
                t0 = clock()
                out, hidden, _ = stage_forward(self.stage, x, positions, logits=False)
                self.rec.add("compute", t0, clock(), stage=s, position=msg.position, phase="prefill", request=rq)
                if feats and leader:
                    self.send(0, _act(FEAT, hidden, epoch=-1 if serving else 0, position=msg.position, aux=s + 1,
                                      request=rq), s, "prefill")
                if last:
                    if leader and not serving:
                        self.tr.send(0, Message(READY))
                else:
                    self.send(down, _act(PREFILL, out, position=msg.position, token=msg.token, aux=msg.aux,
                                         request=rq), s, "prefill")
                continue
            assert msg.kind == ACT, msg.kind
            self.at(msg.position, msg.epoch, request=rq)
            t0 = clock()
            out, hidden, _ = stage_forward(self.stage, x, positions)
            self.rec.add("compute", t0, clock(), stage=s, position=msg.position, epoch=msg.epoch, request=rq)
            if last:
                if leader:
                    tok = int(out[0, -1].argmax())
                    self.send(0, Message(RESULT, msg.epoch, msg.position, tok,
                                         tensor=_result_tensor(hidden, out, feats, logits), request=rq), s)
            else:
                self.send(down, _act(ACT, out, msg.epoch, msg.position, msg.token, request=rq), s)
                if feats and leader:
                    self.send(0, _act(FEAT, hidden, msg.epoch, msg.position, aux=s + 1, request=rq), s)

    # --- rank 0 ---------------------------------------------------------------------------------

    @torch.no_grad()
    def lead(self, job: Job, idle_timeout: float, drafter: Drafter | None = None) -> JobResult:
        """Run one job as rank 0. `drafter` overrides the one `job.draft` names (tests use it)."""
        L = self.layout
        n, P, N = L.stages, len(job.prompt), job.new_tokens
        self.use_slot(0)
        peers = L.group(0)[1:]                       # stage 0's other TP ranks: each issue goes to them too
        down = L.rank(1, 0) if n > 1 else None
        leaders = L.leaders()[1:]                    # RESULT (the last), READY and features come from these
        parsed = parse_draft(job.draft)
        spd = job.scheme == "spd" and n > 1
        reference = None
        if (parsed and parsed[0] == "oracle") or job.reference:
            reference = self.reference(job.prompt, N)      # before timing
        if not spd:
            drafter = None
        elif drafter is None:
            if parsed is None:
                raise ValueError("spd needs a drafter")
            drafter = make_drafter(parsed, reference, job.seed, self.model, n)
        feats = bool(drafter and drafter.needs_features)
        sampler = Sampler(job.seed, job.temperature) if job.temperature > 0 else None
        vocab = self.model.cfg.vocab_size
        seq: list[int | None] = list(job.prompt) + [None] * N
        ctl = SpdController(P, N, window=n if spd else 1)
        restarts = [P - 1]                 # restarts[e]: first position issued in epoch e
        drafts: dict[int, int] = {}
        qdists: dict[int, Tensor] = {}     # T > 0: the drafter's distribution each draft came from
        accepts: list[int] = []
        buffered: dict[tuple[int, int], Tensor] = {}    # (depth, position) → hidden, not yet given
        given: set[tuple[int, int]] = set()

        def valid(epoch: int, position: int) -> bool:
            return all(position < restarts[e] for e in range(epoch + 1, len(restarts)))

        # prefill: positions 0..P-2 through the whole pipeline, then READY from the last stage
        prefill = torch.tensor([job.prompt[:-1]], device=self.device)
        flags = (PREFILL_FEATURES if feats else 0) | (PREFILL_LOGITS if sampler else 0)
        for peer in peers:
            self.send(peer, Message(PREFILL, position=0, aux=flags, tensor=prefill.cpu()), 0, "prefill")
        self.at(0, phase="prefill")
        t0 = clock()
        out, hidden, emb = stage_forward(self.stage, prefill, torch.arange(P - 1, device=self.device), logits=False)
        self.rec.add("compute", t0, clock(), stage=0, position=0, phase="prefill")
        prompt_feats: dict[int, Tensor] = {}
        if feats:
            prompt_feats = {0: emb[0], 1: hidden[0]}
        if n > 1:
            self.send(down, _act(PREFILL, out, position=0, aux=flags), 0, "prefill")
            while True:
                src, msg = self.tr.recv(leaders, idle_timeout)
                if msg.kind == FEAT:
                    prompt_feats[msg.aux] = msg.tensor
                elif msg.kind == READY:
                    break
        if drafter:
            drafter.start(list(job.prompt), prompt_feats if feats else None)

        def on_message(msg: Message) -> None:
            if msg.kind == FEAT:
                if valid(msg.epoch, msg.position):
                    buffered[(msg.aux, msg.position)] = msg.tensor[0]
                return
            assert msg.kind == RESULT, msg.kind
            p, row = msg.position, msg.tensor
            logits = row[0, row.shape[1] - vocab:] if sampler else None
            if feats and row is not None and valid(msg.epoch, p):
                buffered[(n, p)] = row[0, :row.shape[1] - vocab] if sampler else row[0]
            token = msg.token                # greedy; at T > 0 drawn below, once the result counts

            def check() -> bool:             # asked only when a draft for p+1 is in flight
                nonlocal token
                if sampler:
                    token = sampler.token(logits, msg.epoch, p + 1, drafts[p + 1], qdists[p + 1])
                return drafts.get(p + 1) == token

            verdict = ctl.on_result(p, msg.epoch, check)
            now = clock()
            if verdict.stale:
                return
            if sampler and verdict.accepted is None:
                token = sampler.token(logits, msg.epoch, p + 1)
            apply_verdict(self.rec, verdict, token, msg.epoch, seq, accepts, restarts, drafter, now)
            for k in [k for k in drafts if k <= p + 1]:  # the token at p+1 is known now: drafts up to it are done
                del drafts[k]
                qdists.pop(k, None)
            if verdict.accepted is False:                # features of the voided positions go too
                for key in [k for k in buffered if k[1] > p]:
                    del buffered[key]
                given.difference_update({k for k in given if k[1] > p})

        def features_ready(q: int) -> bool:
            # the draft for q+1 needs depth d of position q-d (d = 1..n) for decode positions
            return all((d, q - d) in buffered or (d, q - d) in given
                       for d in range(2, n + 1) if q - d >= P - 1)

        while not ctl.done:
            q = ctl.next_position
            will_draft = spd and q + 1 <= ctl.last_useful
            if not ctl.can_issue():
                if n == 1:
                    raise RuntimeError("single-stage pipeline stalled")   # cannot happen: results are local
                _, msg = self.tr.recv(leaders[-1:] if not feats else leaders, self.timeout)
                on_message(msg)
                continue
            issue = ctl.issue()
            tok = seq[q] if q < ctl.known else drafts[q]
            for peer in peers:
                self.send(peer, Message(ACT, issue.epoch, q, tok), 0)
            self.at(q, issue.epoch)
            t0 = clock()
            out, hidden, emb = stage_forward(self.stage, torch.tensor([[tok]], device=self.device),
                                             torch.tensor([q], device=self.device))
            self.rec.add("compute", t0, clock(), stage=0, position=q, epoch=issue.epoch)
            if n == 1:                                   # AR: the only stage is also the last
                on_message(Message(RESULT, issue.epoch, q, int(out[0, -1].argmax()),
                                   tensor=out[0, -1:] if sampler else None))
                continue
            self.send(down, _act(ACT, out, issue.epoch, q, tok), 0)
            if will_draft:
                if feats:
                    # Wait for the draft's features only now, after stage 1's forward went out, so the
                    # wait overlaps the downstream stages; a flush meanwhile voids this draft.
                    while not features_ready(q) and ctl.epoch == issue.epoch:
                        _, msg = self.tr.recv(leaders, self.timeout)
                        on_message(msg)
                    if ctl.epoch != issue.epoch:
                        continue
                t0 = clock()
                if feats:
                    buffered[(0, q)] = emb[0, -1]
                    for key in sorted(k for k in buffered if k[0] + k[1] <= q):   # depth ≤ q - j
                        drafter.add_features(key[0], key[1], buffered.pop(key))
                        given.add(key)
                if sampler:
                    gen = sampler.generator(issue.epoch, q + 1, DRAW_DRAFT, self.device)
                    drafts[q + 1], qdists[q + 1] = drafter.sample(q, tok, job.temperature, gen)
                else:
                    drafts[q + 1] = drafter.draft(q, tok)
                self.rec.add("head", t0, clock(), position=q + 1, epoch=issue.epoch)
                if feats:
                    buffered[(1, q)] = hidden[0, -1]

        # end of the job: STOP down the pipeline, every rank's events back here
        rows = self.rec.take()
        if L.world > 1:
            for dst in peers + ([down] if down is not None else []):
                self.tr.send(dst, Message(STOP))
            others = list(range(1, L.world))
            for _ in others:
                _, msg = self.tr.recv(others, idle_timeout)
                if msg.kind == BLOB:
                    rows += json.loads(msg.blob)
        events = [_event(row, restarts) for row in rows]
        events.sort(key=lambda e: (e.start_ns, e.end_ns))
        return JobResult(tokens=[int(t) for t in seq[P:]], accepts=accepts, reference=reference, events=events,
                         epochs=len(restarts))

    def shutdown(self) -> None:
        L = self.layout
        for dst in L.group(0)[1:] + ([L.rank(1, 0)] if L.stages > 1 else []):
            self.tr.send(dst, Message(STOP, aux=1))


# Trace names of sends: the transport's kind names; layouts with kinds of their own (spd_dedicated's
# CONTROL) add them here.
_NAMES = {k: v.lower() for k, v in KIND_NAMES.items()}


def _event(row: dict, restarts: list[int] | dict[int, list[int]]) -> TraceEvent:
    """A raw row → TraceEvent; compute and sends of a position that a later epoch restarted are waste.
    `restarts`: the first position of each epoch — of the one request, or per request (serving)."""
    epoch, pos = row.pop("epoch"), row["position"]
    if isinstance(restarts, dict):
        restarts = restarts.get(row.get("request", -1), [])
    if row["kind"] in ("compute", "send") and row["phase"] == "decode":
        row["discarded"] = any(pos >= restarts[e] for e in range(epoch + 1, len(restarts)))
    return TraceEvent(**row)
