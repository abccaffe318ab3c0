"""Messages between ranks — point-to-point and the TP groups' collectives — behind one small interface.

Two implementations:
  SocketTransport  ranks on one CPU host: a full mesh of local TCP sockets (TCP_NODELAY), non-blocking,
                   driven by one selector in the calling thread. No background threads, so nothing
                   competes with the stage forwards for the CPU (REFERENCE.md: gloo's isend/irecv cost
                   ≈ 1 ms of CPU per token per rank while both cores compute; a plain socket did not).
                   A small message goes out in one `send` call and comes in with two `recv_into` calls;
                   whenever a rank waits — in `recv`, in a `send` the kernel cannot take at once, in a
                   collective — it reads whatever any peer sent (parsed incrementally, message by
                   message, into per-peer inboxes) and writes what it has queued. So two ranks sending
                   each other large buffers at the same time cannot deadlock on full socket buffers.
  DistTransport    torch.distributed: point-to-point NCCL between GPUs, gloo between CPU hosts; the
                   collectives on one process group per TP group (new_group, created by every rank).

Collectives (tensor parallelism, DESIGN §2): `allreduce(tensor, group)` sums in place over `group` (a
list of global ranks, this one included, in TP-rank order); `allgather(tensor, group)` returns every
member's tensor stacked in group order. Every rank of the group ends with bit-identical values, so the
TP ranks of a stage hold the same activations and take the same greedy token: the direct algorithm adds
the members' tensors in group order on every rank; the ring computes each element's sum once (on the
rank that finishes its chunk) and copies it to the others. The socket transport implements both
(`ALLREDUCE_ALGORITHMS`; benchmarks/allreduce_local.py times them) and uses `direct` by default: at one
token's hidden state (≤ 64 KiB) a collective is latency-bound, and direct costs one message per peer
where the ring costs 2(t − 1) messages in a row (see docs/executor-tp.md for the figures).

Every message carries the request it belongs to (`Message.request`, in the header; −1 for a single
decode): serving runs several requests through one pipeline (executor/serving.py). `poll(sources,
timeout)` is a receive that returns None at its deadline instead of failing: the serving first rank waits
for a message or the next arrival, whichever comes first (gloo cannot: `can_poll` is False there).

Every receive has a timeout. A peer that dies is reported as `PeerLost(rank)`: the socket transport sees
the dead rank's connection close at once and tells every other rank (ABORT), so each survivor names the
rank that died; the dist transport names the rank it was waiting on.
"""
from __future__ import annotations

import os
import selectors
import socket
import struct
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import Tensor

# Message kinds (see the protocol in executor/pipeline.py). 10 is spd_dedicated's CONTROL. COLL carries
# one part of a collective (aux: the group's operation count, a check that both sides are at the same one);
# a collective takes it, `recv` never returns it.
ACT, RESULT, FEAT, PREFILL, READY, STOP, BLOB, ABORT, PING = range(1, 10)
COLL = 11
KIND_NAMES = {ACT: "ACT", RESULT: "RESULT", FEAT: "FEAT", PREFILL: "PREFILL", READY: "READY", STOP: "STOP",
              BLOB: "BLOB", ABORT: "ABORT", PING: "PING", COLL: "COLL"}
ALLREDUCE_ALGORITHMS = ("direct", "ring")

_DTYPES = {0: None, 1: torch.float32, 2: torch.bfloat16, 3: torch.float16, 4: torch.uint8, 5: torch.int64}
_CODES = {v: k for k, v in _DTYPES.items()}
# kind, epoch, position, token, aux, request, rows, cols, dtype, nbytes
_HEADER = struct.Struct("<10q")
HEADER_BYTES = _HEADER.size
HEADER_FIELDS = 10


@dataclass
class Message:
    kind: int
    epoch: int = 0
    position: int = 0
    token: int = 0
    aux: int = 0                    # FEAT: the depth; ABORT: the dead rank; PING: a clock reading
    tensor: Tensor | None = None    # 2-D [rows, cols]: activations, hidden states
    blob: bytes = b""               # BLOB: a JSON payload (trace events at the end of a run)
    request: int = -1               # serving: the request it belongs to (-1: a single decode)

    @property
    def nbytes(self) -> int:
        t = self.tensor
        return HEADER_BYTES + (t.numel() * t.element_size() if t is not None else 0) + len(self.blob)


class PeerLost(RuntimeError):
    """A rank died, hung, or reported that another one did."""

    def __init__(self, rank: int, why: str) -> None:
        super().__init__(f"rank {rank} {why}")
        self.rank = rank


class PeerClosed(PeerLost):
    """A peer's connection closed: fatal only if we wait on that peer (they close at the end, too)."""


class Transport(ABC):
    name = "?"
    rank: int
    world: int

    @abstractmethod
    def send(self, dst: int, msg: Message) -> None: ...

    @abstractmethod
    def recv(self, sources: list[int], timeout: float) -> tuple[int, Message]:
        """The next message from any of `sources` (FIFO per source); PeerLost on death or timeout."""

    def poll(self, sources: list[int], timeout: float = 0.0) -> tuple[int, Message] | None:
        """The next message from any of `sources` if one comes within `timeout` seconds (0: only what has
        arrived), else None — never PeerLost for silence; PeerLost when a peer died. A transport that
        cannot receive without blocking (`can_poll` False: gloo) returns only what it already holds."""
        return None

    can_poll = False

    @abstractmethod
    def allreduce(self, tensor: Tensor, group: list[int]) -> Tensor:
        """Sum `tensor` in place over the ranks of `group` (global ranks, this one included); returns it.
        Every member ends with bit-identical values."""

    @abstractmethod
    def allgather(self, tensor: Tensor, group: list[int]) -> Tensor:
        """[len(group), *tensor.shape]: every member's `tensor`, in group order."""

    def abort(self, dead: int) -> None:
        """Best effort: tell every other live rank that `dead` is gone, so they exit naming it."""

    def close(self, failed: bool = False) -> None: ...


def _header(msg: Message) -> tuple[bytes, bytes]:
    if msg.tensor is not None:
        t = msg.tensor.detach().contiguous()
        rows, cols = t.shape
        payload = t.view(-1).view(torch.uint8).cpu().numpy().tobytes()
        code = _CODES[t.dtype]
    else:
        rows = cols = code = 0
        payload = msg.blob
    head = _HEADER.pack(msg.kind, msg.epoch, msg.position, msg.token, msg.aux, msg.request, rows, cols, code,
                        len(payload))
    return head, payload


def _message(head: tuple, payload: bytes | bytearray) -> Message:
    kind, epoch, position, token, aux, request, rows, cols, code, _ = head
    msg = Message(kind, epoch, position, token, aux, request=request)
    if code:
        buf = payload if isinstance(payload, bytearray) else bytearray(payload)   # writable, ours alone
        msg.tensor = (torch.frombuffer(buf, dtype=_DTYPES[code]) if buf else
                      torch.empty(0, dtype=_DTYPES[code])).view(rows, cols)
    else:
        msg.blob = bytes(payload)
    return msg


# --- one CPU host: local sockets ---------------------------------------------------------------

class _Inflow:
    """One peer's incoming byte stream, parsed message by message from non-blocking reads."""

    def __init__(self) -> None:
        self.head = bytearray(HEADER_BYTES)
        self.fields: tuple | None = None       # the header, once complete
        self.body = bytearray()
        self.got = 0                           # bytes of the current part (header, then body) received

    def read(self, s: socket.socket) -> Message | None:
        """Read what has arrived, up to the end of one message; the message when it completes, else None.
        BlockingIOError when nothing (more) is there; 0 bytes read → ConnectionAbortedError (closed)."""
        if self.fields is None:
            k = s.recv_into(memoryview(self.head)[self.got:])
            if k == 0:
                raise ConnectionAbortedError
            self.got += k
            if self.got < HEADER_BYTES:
                return None
            self.fields, self.got = _HEADER.unpack(self.head), 0
            self.body = bytearray(self.fields[-1])
        while self.got < len(self.body):       # usually there already: one more call
            k = s.recv_into(memoryview(self.body)[self.got:])
            if k == 0:
                raise ConnectionAbortedError
            self.got += k
        msg = _message(self.fields, self.body)
        self.fields, self.got, self.body = None, 0, bytearray()
        return msg


class SocketTransport(Transport):
    name = "local"

    def __init__(self, rank: int, world: int, store, timeout: float = 60.0,
                 algorithm: str = "direct") -> None:
        if algorithm not in ALLREDUCE_ALGORITHMS:
            raise ValueError(f"unknown all-reduce algorithm {algorithm!r} (expected one of {ALLREDUCE_ALGORITHMS})")
        self.rank, self.world, self.timeout, self.algorithm = rank, world, timeout, algorithm
        self.store = store                         # rank 0 hosts it: keep it alive for the run
        self.peers: dict[int, socket.socket] = {}
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(world)
        store.set(f"spd/port/{rank}", str(listener.getsockname()[1]))
        for j in range(rank):                      # connect to lower ranks, accept higher ones
            port = int(store.get(f"spd/port/{j}"))
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            s.sendall(struct.pack("<q", rank))
            self.peers[j] = s
        listener.settimeout(timeout)
        for _ in range(rank + 1, world):
            s, _ = listener.accept()
            s.settimeout(timeout)
            (j,) = struct.unpack("<q", self._exact(s, 8, -1))
            self.peers[j] = s
        listener.close()
        self.selector = selectors.DefaultSelector()
        for j, s in self.peers.items():
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)                   # every wait goes through the selector
            self.selector.register(s, selectors.EVENT_READ, j)
        self.inflow = {j: _Inflow() for j in self.peers}
        self.inbox: dict[int, deque[Message]] = {j: deque() for j in self.peers}
        self.coll: dict[int, deque[Message]] = {j: deque() for j in self.peers}   # COLL parts
        self.outq: dict[int, deque[memoryview]] = {j: deque() for j in self.peers}
        self.closed: set[int] = set()
        self.ops: dict[tuple[int, ...], int] = {}  # collectives done per group (the COLL aux check)

    def _exact(self, s: socket.socket, n: int, peer: int) -> bytearray:
        """A blocking exact read: the connection handshake only."""
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = s.recv_into(view[got:])
            except (ConnectionError, socket.timeout, OSError) as e:
                raise PeerLost(peer, f"connection failed ({e.__class__.__name__})") from None
            if k == 0:
                raise PeerClosed(peer, "died (connection closed)")
            got += k
        return buf

    # --- the event loop: read what arrived, write what is queued -----------------------------------

    def _pump(self, timeout: float) -> None:
        for key, mask in self.selector.select(max(timeout, 0.0)):
            j = key.data
            if mask & selectors.EVENT_WRITE:
                self._flush(j)
            if mask & selectors.EVENT_READ and j not in self.closed:
                self._take(j)

    def _take(self, j: int) -> None:
        """Read from peer j up to one whole message (the selector says when more is there)."""
        try:
            msg = self.inflow[j].read(self.peers[j])
        except BlockingIOError:
            return
        except ConnectionAbortedError:                  # orderly close: fatal only to who waits on j
            self.selector.unregister(self.peers[j])
            self.closed.add(j)
            return
        except (ConnectionError, OSError) as e:
            raise PeerLost(j, f"connection failed ({e.__class__.__name__})") from None
        if msg is None:
            return
        if msg.kind == ABORT:
            raise PeerLost(msg.aux, f"died (reported by rank {j})")
        (self.coll if msg.kind == COLL else self.inbox)[j].append(msg)

    def _queue(self, dst: int, data: bytes) -> None:
        """Hand `data` to the kernel now if it takes it, else queue the rest for the event loop."""
        q, view = self.outq[dst], memoryview(data)
        if not q:
            try:
                view = view[self.peers[dst].send(view):]
            except BlockingIOError:
                pass
            except (ConnectionError, OSError):
                self._send_failed(dst)
            if not len(view):
                return
            if dst not in self.closed:
                self.selector.modify(self.peers[dst], selectors.EVENT_READ | selectors.EVENT_WRITE, dst)
        q.append(view)

    def _flush(self, j: int) -> None:
        q, s = self.outq[j], self.peers[j]
        try:
            while q:
                k = s.send(q[0])
                q[0] = q[0][k:]
                if len(q[0]):
                    return
                q.popleft()
        except BlockingIOError:
            return
        except (ConnectionError, OSError):
            self._send_failed(j)
        if j not in self.closed:            # all written: back to reading only
            self.selector.modify(s, selectors.EVENT_READ, j)

    def _send_failed(self, j: int) -> None:
        """A send to j failed: j is gone. Read what j wrote before it went first — an ABORT there names
        the rank that really died (j may have quit because of it), and every survivor should say so."""
        try:
            for _ in range(64):
                if j in self.closed:
                    break
                self._take(j)
        except PeerLost as e:
            if e.rank != j:
                raise
        raise PeerLost(j, "died (send failed)")

    def _wait_sent(self, dsts, deadline: float) -> None:
        while any(self.outq[j] for j in dsts):
            for j in dsts:
                if self.outq[j] and j in self.closed:
                    raise PeerClosed(j, "died (connection closed)")
            left = deadline - time.monotonic()
            if left <= 0:
                j = next(j for j in dsts if self.outq[j])
                raise PeerLost(j, f"took nothing for {self.timeout:.0f} s (hung or dead)")
            self._pump(left)

    # --- point to point ---------------------------------------------------------------------------

    def send(self, dst: int, msg: Message) -> None:
        head, payload = _header(msg)
        self._queue(dst, head + payload)
        if self.outq[dst]:                  # the kernel's buffer is full: read while the peer drains it
            self._wait_sent([dst], time.monotonic() + self.timeout)

    def _first_ready(self, sources: list[int]) -> tuple[int, Message] | None:
        """The first source (in order) with a message waiting; a closed one that has none is dead."""
        for j in sources:
            if self.inbox[j]:
                return j, self.inbox[j].popleft()
            if j in self.closed:
                raise PeerClosed(j, "died (connection closed)")
        return None

    def recv(self, sources: list[int], timeout: float) -> tuple[int, Message]:
        deadline = time.monotonic() + timeout
        while True:
            got = self._first_ready(sources)
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerLost(sources[-1], f"sent nothing for {timeout:.0f} s (hung or dead)")
            # Watch every peer, not just `sources`: an ABORT or a closed connection can come from anyone.
            self._pump(left)

    can_poll = True

    def poll(self, sources: list[int], timeout: float = 0.0) -> tuple[int, Message] | None:
        deadline = time.monotonic() + timeout
        while True:
            self._pump(0.0)
            got = self._first_ready(sources)
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._pump(left)

    # --- collectives ------------------------------------------------------------------------------

    def exchange(self, out: dict[int, Tensor], sources: list[int], op: int,
                 device: torch.device | None = None) -> dict[int, Tensor]:
        """Send out[j] to every j and take one COLL part from every source (onto `device`), all at once
        (no order between them, so no deadlock whatever the sizes)."""
        for j, t in out.items():
            head, payload = _header(Message(COLL, aux=op, tensor=t.reshape(1, -1)))
            self._queue(j, head + payload)
        deadline = time.monotonic() + self.timeout
        got: dict[int, Tensor] = {}
        while True:
            for j in sources:
                if j not in got and self.coll[j]:
                    msg = self.coll[j].popleft()
                    if msg.aux != op:
                        raise RuntimeError(f"rank {self.rank}: collective {op} got rank {j}'s part of {msg.aux}")
                    got[j] = msg.tensor.reshape(-1).to(device) if device is not None else msg.tensor.reshape(-1)
            missing = [j for j in sources if j not in got]
            if not missing and not any(self.outq[j] for j in out):
                return got
            for j in missing:
                if j in self.closed:
                    raise PeerClosed(j, "died (connection closed)")
            left = deadline - time.monotonic()
            if left <= 0:
                j = missing[0] if missing else next(j for j in out if self.outq[j])
                raise PeerLost(j, f"sent nothing for {self.timeout:.0f} s in a collective (hung or dead)")
            self._pump(left)

    def _op(self, group: list[int]) -> int:
        key = tuple(group)
        self.ops[key] = self.ops.get(key, 0) + 1
        return self.ops[key]

    def allreduce(self, tensor: Tensor, group: list[int]) -> Tensor:
        if len(group) == 1:
            return tensor
        flat = tensor.view(-1)                  # in place: the caller's tensor must be contiguous
        ALLREDUCE[self.algorithm](self, flat, group, self._op(group))
        return tensor

    def allgather(self, tensor: Tensor, group: list[int]) -> Tensor:
        flat = tensor.reshape(-1)
        if len(group) == 1:
            return flat.view(1, *tensor.shape)
        got = self.exchange({j: flat for j in group if j != self.rank},
                            [j for j in group if j != self.rank], self._op(group), flat.device)
        parts = [flat if j == self.rank else got[j] for j in group]
        return torch.stack(parts).view(len(group), *tensor.shape)

    def abort(self, dead: int) -> None:
        for j in self.peers:
            if j != dead and j not in self.closed and not self.outq[j]:   # never inside a queued message
                try:
                    head, payload = _header(Message(ABORT, aux=dead))
                    self.peers[j].send(head + payload)      # one try each: never wait on anyone now
                except OSError:
                    pass

    def close(self, failed: bool = False) -> None:
        if not failed:
            try:
                self._wait_sent(list(self.peers), time.monotonic() + 5.0)   # a last STOP may be queued
            except PeerLost:
                pass
        self.selector.close()
        for s in self.peers.values():
            s.close()


def allreduce_direct(tr, flat: Tensor, group: list[int], op: int) -> None:
    """Every rank sends its whole tensor to every other and adds all of them in group order: one message
    per peer, t − 1 of them at once; every rank does the same additions in the same order."""
    others = [j for j in group if j != tr.rank]
    got = tr.exchange({j: flat for j in others}, others, op, flat.device)
    parts = [flat if j == tr.rank else got[j] for j in group]
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    flat.copy_(total)


def allreduce_ring(tr, flat: Tensor, group: list[int], op: int) -> None:
    """Reduce-scatter then all-gather around the ring (2(t − 1) steps, 1/t of the tensor each): the
    bandwidth-optimal algorithm. Chunk c is summed once, in ring order from member c, then copied."""
    t, i = len(group), group.index(tr.rank)
    right, left = group[(i + 1) % t], group[(i - 1) % t]
    chunks = flat.tensor_split(t)
    for k in range(t - 1):                      # reduce-scatter: member i ends with chunk i+1 summed
        send, take = (i - k) % t, (i - k - 1) % t
        got = tr.exchange({right: chunks[send]}, [left], op * 4 * t + k, flat.device)
        chunks[take].add_(got[left])
    for k in range(t - 1):                      # all-gather the summed chunks
        send, take = (i + 1 - k) % t, (i - k) % t
        got = tr.exchange({right: chunks[send]}, [left], op * 4 * t + t + k, flat.device)
        chunks[take].copy_(got[left])


ALLREDUCE = {"direct": allreduce_direct, "ring": allreduce_ring}


# --- torch.distributed: NCCL between GPUs, gloo between CPU hosts -------------------------------

class DistTransport(Transport):
    name = "dist"

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float = 60.0,
                 groups: list[list[int]] = ()) -> None:
        import torch.distributed as dist
        self.dist, self.rank, self.world, self.device = dist, rank, world, device
        backend = self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.name = f"dist-{backend}"
        self.inbox: dict[int, deque[Message]] = {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        self._sends: deque = deque()                               # (work, tensors kept alive)
        self._pending: dict[int, tuple] = {}                       # src → (work, header buffer)
        # One process group per TP group; new_group is collective: every rank creates every group, in
        # the same order, members or not.
        self._groups = {tuple(g): dist.new_group(list(g)) for g in groups if len(g) > 1}
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._gather = gather

    def _group(self, group: list[int]):
        try:
            return self._groups[tuple(group)]
        except KeyError:
            raise ValueError(f"rank {self.rank}: TP group {group} was not created at connect()") from None

    def _collective_failed(self, group: list[int], e: RuntimeError) -> PeerLost:
        # torch.distributed does not say which member failed; with two members it can only be the other
        peer = next((j for j in group if j != self.rank), self.rank)
        who = "" if len(group) == 2 else f" (or another rank of TP group {group})"
        return PeerLost(peer, f"died or hung during a collective{who}: {str(e).splitlines()[0][:80]}")

    def allreduce(self, tensor: Tensor, group: list[int]) -> Tensor:
        if len(group) == 1:
            return tensor
        try:
            self.dist.all_reduce(tensor, group=self._group(group))
        except RuntimeError as e:
            raise self._collective_failed(group, e) from None
        return tensor

    def allgather(self, tensor: Tensor, group: list[int]) -> Tensor:
        if len(group) == 1:
            return tensor.reshape(1, *tensor.shape)
        flat = tensor.contiguous().view(-1)       # gathered along dim 0: flat in, [t · numel] out
        out = torch.empty(len(group) * flat.numel(), dtype=tensor.dtype, device=tensor.device)
        try:
            self._gather(out, flat, group=self._group(group))
        except RuntimeError as e:
            raise self._collective_failed(group, e) from None
        return out.view(len(group), *tensor.shape)

    def _reap(self, block: bool = False) -> None:
        while self._sends and (block or self._sends[0][0].is_completed()):
            self._sends.popleft()[0].wait()

    def send(self, dst: int, msg: Message) -> None:
        head, payload = _header(msg)
        h = torch.tensor(_HEADER.unpack(head), dtype=torch.int64, device=self.device)
        keep = [h]
        self._sends.append((self.dist.isend(h, dst), keep))
        if payload:
            body = (msg.tensor.detach().contiguous().view(-1).view(torch.uint8) if msg.tensor is not None
                    else torch.frombuffer(bytearray(payload), dtype=torch.uint8)).to(self.device)
            keep.append(body)
            self._sends.append((self.dist.isend(body, dst), [body]))
        self._reap()

    def _finish(self, j: int, buf: Tensor) -> Message:
        """The header from j has arrived: receive the payload (j sends it right after), build the message."""
        head = tuple(int(v) for v in buf.tolist())
        payload = b""
        if head[-1]:
            body = torch.empty(head[-1], dtype=torch.uint8, device=self.device)
            try:
                self.dist.recv(body, j)
            except RuntimeError as e:
                raise PeerLost(j, f"died ({str(e).splitlines()[0][:80]})") from None
            payload = body.cpu().numpy().tobytes()
        msg = _message(head, payload)
        if msg.tensor is not None:
            msg.tensor = msg.tensor.to(self.device)
        if msg.kind == ABORT:
            raise PeerLost(msg.aux, f"died (reported by rank {j})")
        return msg

    @property
    def can_poll(self) -> bool:          # gloo: a timed-out wait breaks the receive, is_completed never moves
        return self.backend != "gloo"

    def _post_headers(self, sources: list[int]) -> None:
        """One posted header receive per source that has none (NCCL has no any-source receive)."""
        for j in sources:
            if j not in self._pending:
                buf = torch.empty(HEADER_FIELDS, dtype=torch.int64, device=self.device)
                self._pending[j] = (self.dist.irecv(buf, j), buf)

    def poll(self, sources: list[int], timeout: float = 0.0) -> tuple[int, Message] | None:
        for j in sources:
            if self.inbox.get(j):
                return j, self.inbox[j].popleft()
        if not self.can_poll:
            return None
        deadline = time.monotonic() + timeout
        self._post_headers(sources)
        while True:
            for j in sources:
                work, buf = self._pending[j]
                try:
                    if not work.is_completed():
                        continue
                except RuntimeError as e:
                    raise PeerLost(j, f"died or hung ({str(e).splitlines()[0][:80]})") from None
                del self._pending[j]
                return j, self._finish(j, buf)
            if time.monotonic() >= deadline:
                return None
            time.sleep(20e-6)

    def recv(self, sources: list[int], timeout: float) -> tuple[int, Message]:
        if self.backend == "gloo":
            return self._recv_any(sources, timeout)
        # NCCL has no any-source receive: one posted header receive per source, polled.
        deadline = time.monotonic() + timeout
        self._post_headers(sources)
        while True:
            for j in sources:
                work, buf = self._pending[j]
                try:
                    if len(sources) == 1:
                        work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
                    elif not work.is_completed():
                        continue
                except RuntimeError as e:
                    raise PeerLost(j, f"died or hung ({str(e).splitlines()[0][:80]})") from None
                del self._pending[j]
                return j, self._finish(j, buf)
            if time.monotonic() > deadline:
                raise PeerLost(sources[-1], f"sent nothing for {timeout:.0f} s (hung or dead)")
            time.sleep(20e-6)

    def _recv_any(self, sources: list[int], timeout: float) -> tuple[int, Message]:
        # gloo: every message comes through one any-source header receive (gloo's is_completed() does
        # not progress a receive, so several posted receives cannot be polled); others wait in an inbox.
        deadline = time.monotonic() + timeout
        while True:
            for j in sources:
                if self.inbox.get(j):
                    return j, self.inbox[j].popleft()
            buf = torch.empty(HEADER_FIELDS, dtype=torch.int64)
            work = self.dist.irecv(buf)
            try:
                work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
            except RuntimeError:
                raise PeerLost(sources[-1], f"sent nothing for {timeout:.0f} s (hung or dead)") from None
            j = work._source_rank()
            self.inbox.setdefault(j, deque()).append(self._finish(j, buf))

    def abort(self, dead: int) -> None:
        if self.backend != "gloo":
            return      # NCCL ranks learn of a failure from the failing peer's exit (or torchrun)
        for j in range(self.world):
            if j not in (dead, self.rank):
                h = torch.tensor(_HEADER.unpack(_header(Message(ABORT, aux=dead))[0]), dtype=torch.int64)
                self._sends.append((self.dist.isend(h, j), [h]))
        time.sleep(0.2)  # let gloo's threads put them on the wire; never wait on a dead peer

    def close(self, failed: bool = False) -> None:
        if failed:          # a peer is gone: waiting for sends or a collective teardown could hang
            return
        try:
            self._reap(block=True)
            self.dist.destroy_process_group()
        except RuntimeError:
            pass


def make_store(rank: int, world: int, timeout: float = 60.0):
    """The rendezvous store at MASTER_ADDR:MASTER_PORT (ours, or torchrun's agent store)."""
    from torch.distributed import TCPStore
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]), world,
                    is_master=(rank == 0 and not agent), timeout=timedelta(seconds=timeout))


def connect(kind: str, rank: int, world: int, device: torch.device, timeout: float = 60.0,
            groups: list[list[int]] = (), algorithm: str = "direct") -> Transport:
    """kind: 'local' (sockets, one host) or 'dist' (torch.distributed). `groups`: every TP group of the
    run (the dist transport creates their process groups collectively); `algorithm`: the socket
    transport's all-reduce (ALLREDUCE_ALGORITHMS)."""
    if kind == "local":
        return SocketTransport(rank, world, make_store(rank, world, timeout), timeout, algorithm)
    if kind == "dist":
        return DistTransport(rank, world, device, timeout, groups)
    raise ValueError(f"unknown transport {kind!r}")


def connect_on_port(kind: str, rank: int, world: int, device: torch.device, port: int, timeout: float = 120.0,
                    groups: list[list[int]] = ()) -> Transport:
    """`connect` for a benchmark's own ranks on this host (profile's ping-pong, the collective benchmark):
    the rendezvous variables are set only while connecting, so none is left behind in this process."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return connect(kind, rank, world, device, timeout=timeout, groups=groups)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
