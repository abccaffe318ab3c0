"""A per-token decode step fit for CUDA graphs, and the decoder that replays it (`make_decoder`).

Why not `Transformer.forward`: its cache path slices the cache to `int(input_pos[-1]) + 1` positions, a
host sync and a shape that changes every token; a CUDA graph holds neither. The step here keeps every
shape fixed and every input on the device:
  - the input token and its position are device tensors (`StepState`), updated in place by the step
    itself (token ← argmax, pos ← pos + 1), so replays chain with no host work between them;
  - the KV cache is the model's preallocated one, written with `index_copy_` at `pos`;
  - attention reads a fixed `span` of cached positions and masks those after `pos` (stale entries a
    rollback left, or never-written zeros: a masked score gets weight exactly 0, as in model.py, so the
    result is the attention over positions 0..pos);
  - the query heads are grouped by the KV head they share (at one token they are `rep` queries of one
    position), so grouped-query attention reads the cache in place instead of copying it rep times;
  - argmax runs on the device; nothing reads a value on the host (no `.item()`, no branching on tensors).
The span is a Python int, one captured graph per span: the host knows the position it is decoding (it
counts the steps), so it picks the smallest span that covers it with no device read. A span of the whole
cache would read max_seq_len cached positions for every token; the buckets keep the read within 2× of
the context.

Why `torch.cuda.CUDAGraph` directly and not `torch.compile(mode="reduce-overhead")`: no inductor / Triton
compile inside a GPU lease of minutes (compile time counts against it), and dynamo broke the graph at
the model's cache position in a quick try (README: the `int(input_pos[-1])` above). A graph replays the
eager kernels as captured: the same arithmetic as the eager step, minus the launch gaps.

On CPU (or graphs=False) the same `decode_step` runs eagerly: the tests cover its logic there, and a
dynamo trace of it (tests/test_decode_step.py) stands in for capturability.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from executor.model import Attention, Transformer, apply_rope

SMALLEST_SPAN = 64


@dataclass
class StepState:
    """The step's inputs, on the device: overwritten in place, never reallocated (a graph holds their
    addresses)."""
    token: Tensor       # [1, 1] int64: the token the next step consumes
    pos: Tensor         # [1] int64: its position
    positions: Tensor   # [max_seq_len] int64: 0, 1, ... (the mask compares it with pos)

    @classmethod
    def new(cls, max_seq_len: int, device: torch.device) -> "StepState":
        return cls(token=torch.zeros(1, 1, dtype=torch.long, device=device),
                   pos=torch.zeros(1, dtype=torch.long, device=device),
                   positions=torch.arange(max_seq_len, device=device))


def default_spans(max_seq_len: int) -> list[int]:
    """Powers of two from SMALLEST_SPAN, and the whole cache."""
    spans, s = {max_seq_len}, SMALLEST_SPAN
    while s < max_seq_len:
        spans.add(s)
        s *= 2
    return sorted(spans)


def attend(att: Attention, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, positions: Tensor,
           span: int) -> Tensor:
    """Attention of one token x [b, 1, dim] at position `pos` against cache positions 0..span-1, those
    after pos masked. Writes the token's K and V into the cache at pos."""
    b = x.shape[0]
    hd = att.cfg.head_dim
    nh, nkv = att.wq.out_features // hd, att.wk.out_features // hd   # from the weights: a shard holds fewer
    q = apply_rope(att.wq(x).view(b, nkv, nh // nkv, hd), cos, sin)   # [b, kv head, its query heads, hd]
    k = apply_rope(att.wk(x).view(b, nkv, 1, hd), cos, sin)
    v = att.wv(x).view(b, nkv, 1, hd)
    cache = att.kv_cache
    assert cache is not None, "setup_cache() before decoding"
    cache.k.index_copy_(2, pos, k)
    cache.v.index_copy_(2, pos, v)
    mask = (positions[:span] <= pos).view(1, 1, 1, span)
    y = F.scaled_dot_product_attention(q, cache.k[:, :, :span], cache.v[:, :, :span], attn_mask=mask)
    y = att.wo(y.reshape(b, 1, nh * hd))        # head h = kv head · rep + r: model.py's order
    reduce = getattr(att, "reduce", None)       # a tensor-parallel shard's all-reduce, where one is set
    return y if reduce is None else reduce(y)


def run_layers(layers: nn.ModuleList, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, positions: Tensor,
               span: int) -> Tensor:
    """Decoder layers (model.py `Block`s) on one token, attention through `attend`."""
    for layer in layers:
        x = layer.mlp(x + attend(layer.attention, layer.attention_norm(x), cos, sin, pos, positions, span))
    return x


def step_logits(model: Transformer, token: Tensor, pos: Tensor, positions: Tensor, span: int) -> Tensor:
    """Logits [1, vocab] of the token [1, 1] at position pos [1]; writes every layer's cache at pos."""
    cos, sin = model.rope_cos.index_select(0, pos), model.rope_sin.index_select(0, pos)
    x = run_layers(model.layers, model.tok_embeddings(token), cos, sin, pos, positions, span)
    return model.output(model.norm(x))[:, -1]


def decode_step(model: Transformer, state: StepState, span: int) -> Tensor:
    """One greedy token: consumes state.token at state.pos, leaves the next token and position in state
    (the returned tensor is state.token, overwritten by the next step)."""
    nxt = step_logits(model, state.token, state.pos, state.positions, span).argmax(-1)
    state.token.copy_(nxt.view(1, 1))
    state.pos.add_(1)
    return state.token


def can_capture(device: torch.device) -> bool:
    """CUDA graphs exist on CUDA only. (The tests replace this and `capture_graph` with a stand-in that
    replays by calling, to run the graph path's logic on CPU.)"""
    return device.type == "cuda"


def capture_graph(fn: Callable[[], object], warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of fn, which must write its results into tensors allocated outside it (what fn
    allocates lives in the graph's private pool and is overwritten by each replay). Warm-up runs on a
    side stream first (PyTorch's recipe: lazy initialisation, cuBLAS workspaces and autotuning stay out of
    the capture). fn runs `warmup` times for real: its side effects must be harmless."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class Decoder:
    """Greedy decoding of one sequence with the static step: `prefill(prompt)` then `step()` per token
    (both return the next token as a [1, 1] device tensor, overwritten by the next call); `generate`
    does both and reads the tokens back once at the end."""

    def __init__(self, model: Transformer, device: torch.device, graphs: bool,
                 spans: list[int] | None = None) -> None:
        self.model = model
        self.device = device
        cfg = model.cfg
        self.spans = sorted(spans or default_spans(cfg.max_seq_len))
        if self.spans[-1] > cfg.max_seq_len or self.spans[0] < 1:
            raise ValueError(f"spans must lie in [1, max_seq_len={cfg.max_seq_len}], got {self.spans}")
        model.setup_cache()          # the buffers every graph reads and writes: never reallocated after this
        self.state = StepState.new(cfg.max_seq_len, device)
        self.pos = 0                 # the host's count of state.pos (never read back from the device)
        self.graphs: dict[int, "torch.cuda.CUDAGraph"] = {}
        if graphs and can_capture(device):
            with torch.no_grad():
                for span in self.spans:
                    # the warm-up decodes at positions 0, 1: junk in the cache that prefill overwrites
                    self.state.pos.zero_()
                    self.graphs[span] = capture_graph(lambda s=span: decode_step(self.model, self.state, s))

    @property
    def uses_graphs(self) -> bool:
        return bool(self.graphs)

    def span_for(self, pos: int) -> int:
        """The smallest span covering positions 0..pos."""
        i = bisect.bisect_left(self.spans, pos + 1)
        if i == len(self.spans):
            raise ValueError(f"position {pos} is past the KV cache ({self.spans[-1]} positions)")
        return self.spans[i]

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> Tensor:
        """Runs the prompt through the model's own cache path (one eager call, shapes vary per prompt)
        and leaves its greedy next token and position in the step state."""
        n = len(prompt)
        if not 0 < n < self.model.cfg.max_seq_len:
            raise ValueError(f"prompt of {n} tokens: need 1..{self.model.cfg.max_seq_len - 1}")
        idx = torch.tensor([prompt], device=self.device)
        logits = self.model(idx, torch.arange(n, device=self.device))
        self.state.token.copy_(logits[:, -1].argmax(-1).view(1, 1))
        self.state.pos.fill_(n)
        self.pos = n
        return self.state.token

    def seek(self, pos: int) -> None:
        """Continue decoding at `pos` with the token in state (a rollback: the cache after pos is masked
        until rewritten). Benchmarks use it to time steps without a prefill each time."""
        if not 0 < pos < self.model.cfg.max_seq_len:
            raise ValueError(f"position {pos} outside 1..{self.model.cfg.max_seq_len - 1}")
        self.state.pos.fill_(pos)
        self.pos = pos

    @torch.no_grad()
    def step(self) -> Tensor:
        span = self.span_for(self.pos)
        graph = self.graphs.get(span)
        if graph is not None:
            graph.replay()
        else:
            decode_step(self.model, self.state, span)
        self.pos += 1
        return self.state.token

    @torch.no_grad()
    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """`executor.model.greedy_decode`'s tokens: the prefill's, then new_tokens - 1 steps."""
        out = torch.empty(new_tokens, dtype=torch.long, device=self.device)
        out[:1].copy_(self.prefill(prompt).view(1))
        for i in range(1, new_tokens):
            out[i:i + 1].copy_(self.step().view(1))
        return out.tolist()


def make_decoder(model: Transformer, device: str | torch.device, graphs: bool,
                 spans: list[int] | None = None) -> Decoder:
    """model on `device` in eval mode, its cache set up; graphs=True captures one CUDA graph per span on
    CUDA and is ignored elsewhere (`Decoder.uses_graphs` says which)."""
    device = torch.device(device)
    return Decoder(model.to(device).eval(), device, graphs, spans)
