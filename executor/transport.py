"""Point-to-point messages between pipeline ranks, behind one small interface.

Two implementations:
  SocketTransport  ranks on one CPU host: a full mesh of local TCP sockets (TCP_NODELAY), one blocking
                   `sendall` per message and exact `recv_into` reads. No background threads, so nothing
                   competes with the stage forwards for the CPU (REFERENCE.md: gloo's isend/irecv cost
                   ≈ 1 ms of CPU per token per rank while both cores compute; a plain socket did not).
  DistTransport    torch.distributed point-to-point: NCCL between GPUs, gloo between CPU hosts.

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

# Message kinds (see the protocol in executor/pipeline.py).
ACT, RESULT, FEAT, PREFILL, READY, STOP, BLOB, ABORT, PING = range(1, 10)
KIND_NAMES = {ACT: "ACT", RESULT: "RESULT", FEAT: "FEAT", PREFILL: "PREFILL", READY: "READY", STOP: "STOP",
              BLOB: "BLOB", ABORT: "ABORT", PING: "PING"}

_DTYPES = {0: None, 1: torch.float32, 2: torch.bfloat16, 3: torch.float16, 4: torch.uint8}
_CODES = {v: k for k, v in _DTYPES.items()}
_HEADER = struct.Struct("<9q")      # kind, epoch, position, token, aux, rows, cols, dtype, nbytes
HEADER_BYTES = _HEADER.size


@dataclass
class Message:
    kind: int
    epoch: int = 0
    position: int = 0
    token: int = 0
    aux: int = 0                    # FEAT: the depth; ABORT: the dead rank; PING: a clock reading
    tensor: Tensor | None = None    # 2-D [rows, cols]: activations, hidden states
    blob: bytes = b""               # BLOB: a JSON payload (trace events at the end of a run)

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
    head = _HEADER.pack(msg.kind, msg.epoch, msg.position, msg.token, msg.aux, rows, cols, code, len(payload))
    return head, payload


def _message(head: tuple, payload: bytes | bytearray) -> Message:
    kind, epoch, position, token, aux, rows, cols, code, _ = head
    msg = Message(kind, epoch, position, token, aux)
    if code:
        msg.tensor = torch.frombuffer(bytearray(payload), dtype=_DTYPES[code]).view(rows, cols)
    else:
        msg.blob = bytes(payload)
    return msg


# --- one CPU host: local sockets ---------------------------------------------------------------

class SocketTransport(Transport):
    name = "local"

    def __init__(self, rank: int, world: int, store, timeout: float = 60.0) -> None:
        self.rank, self.world = rank, world
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
            s.settimeout(timeout)                  # bounds a read once a message has started arriving
            self.selector.register(s, selectors.EVENT_READ, j)
        self.inbox: dict[int, deque[Message]] = {j: deque() for j in self.peers}
        self.closed: set[int] = set()

    def _exact(self, s: socket.socket, n: int, peer: int) -> bytearray:
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

    def send(self, dst: int, msg: Message) -> None:
        head, payload = _header(msg)
        try:
            self.peers[dst].sendall(head + payload)
        except (ConnectionError, OSError):
            raise PeerLost(dst, "died (send failed)") from None

    def _read(self, peer: int) -> Message:
        s = self.peers[peer]
        head = _HEADER.unpack(self._exact(s, HEADER_BYTES, peer))
        payload = self._exact(s, head[-1], peer) if head[-1] else b""
        msg = _message(head, payload)
        if msg.kind == ABORT:
            raise PeerLost(msg.aux, f"died (reported by rank {peer})")
        return msg

    def recv(self, sources: list[int], timeout: float) -> tuple[int, Message]:
        deadline = time.monotonic() + timeout
        while True:
            for j in sources:
                if self.inbox[j]:
                    return j, self.inbox[j].popleft()
                if j in self.closed:
                    raise PeerClosed(j, "died (connection closed)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerLost(sources[-1], f"sent nothing for {timeout:.0f} s (hung or dead)")
            # Watch every peer, not just `sources`: an ABORT or a closed connection can come from anyone.
            for key, _ in self.selector.select(left):
                try:
                    self.inbox[key.data].append(self._read(key.data))
                except PeerClosed:
                    self.selector.unregister(key.fileobj)
                    self.closed.add(key.data)

    def abort(self, dead: int) -> None:
        for j in self.peers:
            if j != dead:
                try:
                    self.send(j, Message(ABORT, aux=dead))
                except PeerLost:
                    pass

    def close(self, failed: bool = False) -> None:
        self.selector.close()
        for s in self.peers.values():
            s.close()


# --- torch.distributed: NCCL between GPUs, gloo between CPU hosts -------------------------------

class DistTransport(Transport):
    name = "dist"

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float = 60.0) -> None:
        import torch.distributed as dist
        self.dist, self.rank, self.world, self.device = dist, rank, world, device
        backend = self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.name = f"dist-{backend}"
        self.inbox: dict[int, deque[Message]] = {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        self._sends: deque = deque()                               # (work, tensors kept alive)
        self._pending: dict[int, tuple] = {}                       # src → (work, header buffer)

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

    def recv(self, sources: list[int], timeout: float) -> tuple[int, Message]:
        if self.backend == "gloo":
            return self._recv_any(sources, timeout)
        # NCCL has no any-source receive: one posted header receive per source, polled.
        deadline = time.monotonic() + timeout
        for j in sources:
            if j not in self._pending:
                buf = torch.empty(9, dtype=torch.int64, device=self.device)
                self._pending[j] = (self.dist.irecv(buf, j), buf)
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
            buf = torch.empty(9, dtype=torch.int64)
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


def connect(kind: str, rank: int, world: int, device: torch.device, timeout: float = 60.0) -> Transport:
    """kind: 'local' (sockets, one host) or 'dist' (torch.distributed)."""
    if kind == "local":
        return SocketTransport(rank, world, make_store(rank, world, timeout), timeout)
    if kind == "dist":
        return DistTransport(rank, world, device, timeout)
    raise ValueError(f"unknown transport {kind!r}")
