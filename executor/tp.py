"""Tensor parallelism (DESIGN §2 ⚑, the contract in spdsim/protocol.py "Tensor-parallel stages"): one
pipeline stage on a TP group of t ranks, Megatron-style, in the spirit of gpt-fast's tp.py.

What TP rank r of t keeps of each weight (`shard_slice`, the one definition; loading and in-memory
sharding both use it):
  wq, wk, wv (+ biases)   column-parallel: the output rows of r's heads — n_heads/t query heads and
                          n_kv_heads/t KV heads; when n_kv_heads < t each KV head is replicated on the
                          t/n_kv_heads ranks whose query heads use it (Megatron / vLLM do the same)
  wo                      row-parallel: the input columns of r's query heads; an all-reduce follows
  w1, w3 (gate, up)       column-parallel: ffn_dim/t rows
  w2 (down)               row-parallel: ffn_dim/t columns; an all-reduce follows
  output (LM head)        vocab-parallel: vocab/t rows; the logits row is all-gathered (t × vocab/t
                          values), so every rank holds the whole row and takes the same greedy token
  tok_embeddings, norms   replicated (a lookup reads one row: splitting the table saves memory only)
So a layer costs two all-reduces of one token's hidden state (after attention, after the MLP), and the
KV cache of a rank holds only its KV heads. The attention of a shard sees a config of its own heads
(n_heads/t, its KV heads, their width): Attention.forward and KVCache read only those fields.

Weights are sharded when loaded: `load_tp_stage` builds the stage on the meta device (no memory) and
reads each tensor's slice straight from safetensors (`safe_open(...).get_slice`), for our checkpoints
and Hugging Face directories alike; a rank never holds another stage's layers or another rank's shard.

The collectives go through the run's transport (`TPComm`): `Attention.reduce` / `FeedForward.reduce`
(hooks in executor/model.py, None without TP) all-reduce in place; each collective is traced as an
`allreduce` event (name "attention" / "mlp", or "allgather" for the LM head) inside the stage's compute.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from executor.model import ModelConfig, Stage, Transformer, rope_tables

clock = time.perf_counter_ns


def tp_problem(n_heads: int, n_kv_heads: int, ffn_dim: int, vocab_size: int, tp: int) -> str | None:
    """Why a model cannot be split over `tp` ranks (None when it can)."""
    if tp < 1:
        return f"must be ≥ 1, got {tp}"
    if n_heads % tp:
        return f"{tp} does not divide the model's {n_heads} attention heads"
    if n_kv_heads % tp and not (n_kv_heads < tp and tp % n_kv_heads == 0):
        return (f"{tp} does not divide the model's {n_kv_heads} KV heads (nor is it a multiple of them, "
                f"which would replicate each KV head)")
    if ffn_dim % tp:
        return f"{tp} does not divide the model's feed-forward size {ffn_dim}"
    if vocab_size % tp:
        return f"{tp} does not divide the model's vocabulary {vocab_size} (the LM head is vocab-parallel)"
    return None


def kv_heads(cfg: ModelConfig, tp: int, rank: int) -> tuple[int, int]:
    """[first, last) of the KV heads TP rank `rank` holds: its own n_kv_heads/t, or, when n_kv_heads < t,
    the one its query heads share (query head j uses KV head j // (n_heads/n_kv_heads))."""
    kv = cfg.n_kv_heads
    if kv >= tp:
        per = kv // tp
        return rank * per, (rank + 1) * per
    g = rank * kv // tp
    return g, g + 1


def shard_config(cfg: ModelConfig, tp: int, rank: int) -> ModelConfig:
    """What a shard's Attention and KV cache see: its query heads, its KV heads, their width."""
    h = cfg.n_heads // tp
    first, last = kv_heads(cfg, tp, rank)
    return replace(cfg, n_heads=h, n_kv_heads=last - first, dim=h * cfg.head_dim)


@dataclass(frozen=True)
class Slice:
    dim: int
    start: int
    stop: int


def shard_slice(cfg: ModelConfig, tp: int, rank: int, name: str) -> Slice | None:
    """The part of tensor `name` (our names: layers.<i>.attention.wq.weight, output.weight, ...) that TP
    rank `rank` keeps; None: all of it (replicated)."""
    hd, module = cfg.head_dim, name.rsplit(".", 1)[0]
    if tp == 1:
        return None
    if module.endswith("attention.wq"):
        h = cfg.n_heads // tp
        return Slice(0, rank * h * hd, (rank + 1) * h * hd)
    if module.endswith(("attention.wk", "attention.wv")):
        first, last = kv_heads(cfg, tp, rank)
        return Slice(0, first * hd, last * hd)
    if module.endswith("attention.wo"):
        if name.endswith("bias"):
            raise ValueError(f"{name}: a row-parallel bias is not supported")
        h = cfg.n_heads // tp
        return Slice(1, rank * h * hd, (rank + 1) * h * hd)
    if module.endswith(("feed_forward.w1", "feed_forward.w3")):
        f = cfg.ffn_dim // tp
        return Slice(0, rank * f, (rank + 1) * f)
    if module.endswith("feed_forward.w2"):
        if name.endswith("bias"):
            raise ValueError(f"{name}: a row-parallel bias is not supported")
        f = cfg.ffn_dim // tp
        return Slice(1, rank * f, (rank + 1) * f)
    if name == "output.weight":
        v = cfg.vocab_size // tp
        return Slice(0, rank * v, (rank + 1) * v)
    return None


def _stage_tensors(stage: Stage) -> list[tuple[nn.Module, str, str]]:
    """(module, parameter attribute, checkpoint name) of every parameter of `stage`, a tied one twice
    (the embedding and the LM head then get their own tensors: the head's is a slice)."""
    out = []
    for path, module in stage.named_modules():
        for attr in list(module._parameters):
            if module._parameters[attr] is None:
                continue
            name = f"{path}.{attr}" if path else attr
            if name.startswith("layers."):              # a stage counts its layers from 0
                _, i, rest = name.split(".", 2)
                name = f"layers.{stage.first + int(i)}.{rest}"
            out.append((module, attr, name))
    return out


def shard_stage(stage: Stage, tp: int, rank: int, read: Callable[[str, Slice | None], Tensor]) -> Stage:
    """Turn `stage` (real or on the meta device) into TP rank `rank`'s shard, in place: every parameter
    becomes read(checkpoint name, its slice); each attention sees its shard's config."""
    cfg = stage.cfg
    for module, attr, name in _stage_tensors(stage):
        t = read(name, shard_slice(cfg, tp, rank, name))
        module._parameters[attr] = nn.Parameter(t, requires_grad=False)
        if isinstance(module, nn.Linear) and attr == "weight":
            module.out_features, module.in_features = t.shape
    if tp > 1:
        local = shard_config(cfg, tp, rank)
        for layer in stage.layers:
            layer.attention.cfg = local
    return stage


def narrow(t: Tensor, sl: Slice | None) -> Tensor:
    return t if sl is None else t.narrow(sl.dim, sl.start, sl.stop - sl.start)


def shard_in_memory(stage: Stage, tp: int, rank: int) -> Stage:
    """Shard an already loaded stage (tests; a rank of a real run loads its shard with load_tp_stage)."""
    full = {name: getattr(module, attr).detach() for module, attr, name in _stage_tensors(stage)}
    return shard_stage(stage, tp, rank, lambda name, sl: narrow(full[name], sl).clone())


def load_tp_stage(path: str | Path, first: int, last: int, tp: int, rank: int,
                  dtype: torch.dtype = torch.float32) -> Stage:
    """Layers [first, last) of the checkpoint at `path`, TP rank `rank` of `tp`'s shard: only its slices are
    read from disk (safetensors get_slice), and nothing else is ever allocated."""
    from safetensors import safe_open
    from executor.checkpoints import checkpoint_index
    cfg, index = checkpoint_index(path)
    with torch.device("meta"):
        skeleton = Transformer(cfg)
    # Qwen2 (a HF directory): q/k/v carry a bias; give the skeleton biased projections where the file has one
    for i, layer in enumerate(skeleton.layers):
        for proj in ("wq", "wk", "wv"):
            if f"layers.{i}.attention.{proj}.bias" in index:
                old = getattr(layer.attention, proj)
                with torch.device("meta"):
                    setattr(layer.attention, proj, nn.Linear(old.in_features, old.out_features, bias=True))
    stage = Stage(skeleton, first, last)
    handles: dict[str, object] = {}

    def read(name: str, sl: Slice | None) -> Tensor:
        if name not in index:
            raise ValueError(f"{path}: tensor {name} missing")
        file, key = index[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        part = handles[file].get_slice(key)
        if sl is None:
            t = part[:]
        else:
            idx = [slice(None)] * len(part.get_shape())
            idx[sl.dim] = slice(sl.start, sl.stop)
            t = part[tuple(idx)]
        return t.to(dtype).contiguous()

    try:
        shard_stage(stage, tp, rank, read)
    finally:
        handles.clear()
    cos, sin = rope_tables(cfg)
    stage.rope_cos, stage.rope_sin = cos, sin
    return stage.eval()


class TPComm:
    """One rank's side of its stage's TP group: the collectives its shard's forward calls, each timed and
    handed to `trace(name, start_ns, end_ns, nbytes)` (the rank's recorder, which knows the position)."""

    def __init__(self, transport, group: list[int], trace: Callable[[str, int, int, int], None] | None = None):
        self.transport, self.group, self.trace = transport, list(group), trace
        self.tp = len(group)

    def allreduce(self, y: Tensor, name: str) -> Tensor:
        t0 = clock()
        y = y.contiguous()
        self.transport.allreduce(y.view(-1), self.group)
        if self.trace:
            self.trace(name, t0, clock(), y.numel() * y.element_size())
        return y

    def gather_last(self, x: Tensor) -> Tensor:
        """Every rank's x, concatenated along the last dimension in TP-rank order (the logits row)."""
        t0 = clock()
        parts = self.transport.allgather(x.contiguous(), self.group)
        out = torch.cat(list(parts.unbind(0)), dim=-1)
        if self.trace:
            self.trace("allgather", t0, clock(), out.numel() * out.element_size())
        return out


class VocabParallelHead(nn.Module):
    """The LM head of one TP rank: its vocab/t rows, then the all-gather of the whole logits row."""

    def __init__(self, local: nn.Linear, comm: TPComm) -> None:
        super().__init__()
        self.local, self.comm = local, comm

    @property
    def weight(self) -> Tensor:          # the shard's rows (dtype / device lookups)
        return self.local.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.comm.gather_last(self.local(x))


def attach(stage: Stage, comm: TPComm) -> Stage:
    """Wire a shard's forward to its TP group: the all-reduce after each row-parallel product, the
    all-gather after the vocab-parallel LM head. Nothing to do for t = 1."""
    if comm.tp == 1:
        return stage
    for layer in stage.layers:
        layer.attention.reduce = lambda y: comm.allreduce(y, "attention")
        if layer.feed_forward is not None:
            layer.feed_forward.reduce = lambda y: comm.allreduce(y, "mlp")
    if stage.is_last:
        stage.output = VocabParallelHead(stage.output, comm)
    return stage
