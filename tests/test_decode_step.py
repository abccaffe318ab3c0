"""The capturable decode step (executor/decode_step.py) on CPU: the same code path CUDA graphs replay.
Greedy tokens equal `greedy_decode`, logits equal the full forward, stale cache entries are masked out,
and dynamo traces the step as one graph (the CPU stand-in for "capturable": no .item(), no branching on
tensor values, no shapes that depend on them)."""
import contextlib

import pytest

torch = pytest.importorskip("torch")

from executor.decode_step import StepState, decode_step, default_spans, make_decoder, step_logits
from executor.model import ModelConfig, Transformer, greedy_decode
from fake_graphs import use_fake_graphs

GQA = ModelConfig(vocab_size=256, n_layers=3, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
MHA = ModelConfig(vocab_size=97, n_layers=2, dim=32, n_heads=4, n_kv_heads=4, ffn_dim=48, max_seq_len=40)
# heads × head_dim ≠ dim, as Qwen3's 32 × 128 at d 2560
WIDE_HEADS = ModelConfig(vocab_size=128, n_layers=2, dim=48, n_heads=4, n_kv_heads=1, ffn_dim=64,
                         max_seq_len=48, head_dim=16)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).init_weights(seed).eval()


def _prompt(cfg, n, seed=1):
    return torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("cfg", [GQA, MHA, WIDE_HEADS], ids=["gqa", "mha", "wide-heads"])
@pytest.mark.parametrize("spans", [None, [8, 16, 24]], ids=["default-spans", "small-spans"])
def test_greedy_tokens_equal_greedy_decode(cfg, spans):
    model = _model(cfg, seed=3)
    prompt, n = _prompt(cfg, 5), 19                     # positions 5..22: crosses the small spans
    if spans:
        spans = spans + [cfg.max_seq_len]
    ref = greedy_decode(model, prompt, n)
    dec = make_decoder(model, "cpu", graphs=True, spans=spans)   # graphs ignored on CPU: eager, same step
    assert not dec.uses_graphs
    assert dec.generate(prompt, n) == ref
    assert dec.generate(prompt[:3], n) == greedy_decode(model, prompt[:3], n)   # a second prompt reuses it


@pytest.mark.parametrize("cfg", [GQA, WIDE_HEADS], ids=["gqa", "wide-heads"])
@torch.no_grad()
def test_step_logits_equal_full_forward(cfg):
    model = _model(cfg, seed=5)
    idx = torch.tensor([_prompt(cfg, 20, seed=2)])
    full = model(idx)[0]                                # plain causal attention, no cache
    model.setup_cache()
    st = StepState.new(cfg.max_seq_len, torch.device("cpu"))
    for p in range(idx.shape[1]):
        span = 16 if p < 16 else cfg.max_seq_len
        logits = step_logits(model, idx[:, p:p + 1], torch.tensor([p]), st.positions, span)
        assert torch.allclose(logits[0], full[p], atol=1e-5, rtol=1e-5), p


@torch.no_grad()
def test_stale_cache_entries_are_masked():
    """Entries after the position (a rollback's leftovers, a warm-up's junk) change nothing."""
    model = _model(GQA, seed=7)
    idx = torch.tensor([_prompt(GQA, 12, seed=4)])
    full = model(idx)[0]
    model.setup_cache()
    for layer in model.layers:
        layer.attention.kv_cache.k.normal_(0, 10.0)
        layer.attention.kv_cache.v.normal_(0, 10.0)
    st = StepState.new(GQA.max_seq_len, torch.device("cpu"))
    for p in range(12):
        logits = step_logits(model, idx[:, p:p + 1], torch.tensor([p]), st.positions, GQA.max_seq_len)
    assert torch.allclose(logits[0], full[11], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decode_step_advances_state_in_place():
    model = _model(MHA)
    model.setup_cache()
    st = StepState.new(MHA.max_seq_len, torch.device("cpu"))
    token, pos = st.token, st.pos
    st.token.fill_(7)
    st.pos.fill_(0)
    want = int(step_logits(model, torch.tensor([[7]]), torch.tensor([0]), st.positions, 8).argmax())
    out = decode_step(model, st, 8)
    assert out is token and st.token is token and st.pos is pos      # same storage: a graph holds it
    assert int(st.token) == want and int(st.pos) == 1


def test_graph_path_replays_to_the_same_tokens(monkeypatch):
    """The graph path's logic with replays standing in for CUDA graphs: one capture per span, warm-up
    junk in the cache and the state is harmless, replays chain through the state in place."""
    use_fake_graphs(monkeypatch)
    model = _model(GQA, seed=11)
    prompt, n = _prompt(GQA, 6, seed=5), 25
    dec = make_decoder(model, "cpu", graphs=True, spans=[8, 16, 64])
    assert dec.uses_graphs and sorted(dec.graphs) == [8, 16, 64]
    assert dec.generate(prompt, n) == greedy_decode(model, prompt, n)
    assert sum(g.replays for g in dec.graphs.values()) == n - 1 and dec.graphs[64].replays > 0
    # seek: a rollback to an earlier position, then the same continuation again
    dec.prefill(prompt)
    first = [int(dec.step()) for _ in range(5)]
    dec.seek(len(prompt))
    dec.state.token.fill_(greedy_decode(model, prompt, 1)[0])
    assert [int(dec.step()) for _ in range(5)] == first


def test_default_spans_and_past_the_cache():
    assert default_spans(1024) == [64, 128, 256, 512, 1024]
    assert default_spans(100) == [64, 100] and default_spans(16) == [16]
    dec = make_decoder(_model(MHA), "cpu", graphs=False)
    assert dec.span_for(0) == 40 and dec.span_for(39) == 40
    with pytest.raises(ValueError, match="past the KV cache"):
        dec.span_for(40)
    with pytest.raises(ValueError, match="prompt"):
        dec.prefill([])


def _graph_breaks(fn) -> tuple[int, int]:
    torch._dynamo.reset()
    exp = torch._dynamo.explain(fn)()
    return exp.graph_count, exp.graph_break_count


@torch.no_grad()
def test_dynamo_traces_the_step_whole():
    """The capturability proxy: dynamo (tracing only, no inductor) sees one graph, no break. Under torch
    2.13 `fullgraph=True` alone lets a `.item()` break through with a warning, so the test counts breaks
    with `explain` and compiles with `error_on_graph_break` as well."""
    model = _model(GQA)
    model.setup_cache()
    st = StepState.new(GQA.max_seq_len, torch.device("cpu"))
    st.pos.fill_(3)
    assert _graph_breaks(lambda: decode_step(model, st, 16)) == (1, 0)
    # the proxy can fail: the model's own cache path reads the position on the host
    graphs, breaks = _graph_breaks(lambda: model(torch.tensor([[1]]), torch.tensor([4])))
    assert breaks >= 1
    torch._dynamo.reset()
    st.pos.fill_(3)
    st.token.fill_(9)
    ref = decode_step(model, st, 16).clone()
    st.pos.fill_(3)
    st.token.fill_(9)
    compiled = torch.compile(lambda: decode_step(model, st, 16), fullgraph=True, backend="eager")
    strict = getattr(torch._dynamo, "error_on_graph_break", None)   # torch ≥ 2.9
    with strict(True) if strict else contextlib.nullcontext():
        assert torch.equal(compiled(), ref) and int(st.pos) == 4
    torch._dynamo.reset()
