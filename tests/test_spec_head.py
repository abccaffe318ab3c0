"""The speculative module: the parallel (training) forward is exactly what the step-by-step drafter
computes under the pipeline's depth rule; baselines read only what the pipeline has; the sampling rule
is lossless in distribution; online acceptance equals the offline figure."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from executor.model import ModelConfig, Transformer, greedy_decode
from executor.checkpoints import save_checkpoint
from executor.drafter_modules import build_drafter, load_drafter, save_drafter
from executor.head_drafter import HeadDrafter, load_head_drafter
from executor.spec_head import HeadConfig, SpecHead, target_checkpoints
from executor.speculative_sampling import speculative_accept
from spdsim.errors import UserError

torch.set_num_threads(1)
TCFG = ModelConfig(vocab_size=64, n_layers=4, dim=64, n_heads=4, n_kv_heads=4, ffn_dim=128, max_seq_len=128)


@pytest.fixture(scope="module")
def target() -> Transformer:
    return Transformer(TCFG).init_weights(0).eval()


def _features(target: Transformer, cfg: HeadConfig, T: int, seed: int):
    toks = torch.randint(0, TCFG.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, hidden = target(toks, return_hidden=True)
    return toks, hidden, target_checkpoints(hidden, cfg)


def _head(target, n, kind="spd", layers=1, seed=1, query_window=False, width=0, proj="level", ffn=96):
    cfg = HeadConfig.for_target(TCFG, n, kind=kind, n_layers=layers, ffn_dim=ffn, query_window=query_window,
                                width=width, proj=proj)
    head = SpecHead(cfg, target, seed=seed).eval()
    with torch.no_grad():      # move every weight off its init so nothing is accidentally symmetric
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return head


@pytest.mark.parametrize("kind,query_window", [("spd", False), ("window", False), ("spd", True), ("window", True)])
@pytest.mark.parametrize("n,layers,width,proj,ffn", [
    (1, 1, 0, "level", 96), (2, 1, 0, "level", 96), (2, 2, 32, "level", 96), (4, 1, 32, "level", 96),
    (4, 3, 0, "level", 96), (1, 1, 0, "shared", 0), (2, 2, 32, "shared", 0), (4, 1, 0, "shared", 96),
    (4, 3, 32, "shared", 0), (1, 1, 0, "none", 0), (4, 1, 0, "none", 0), (4, 2, 0, "none", 96)])
def test_parallel_forward_equals_step_by_step_drafter(target, kind, query_window, n, layers, width, proj, ffn):
    head = _head(target, n, kind, layers, query_window=query_window, width=width, proj=proj, ffn=ffn)
    T, P = 26, 6
    toks, hidden, ck = _features(target, head.cfg, T, seed=n + 10 * layers)
    with torch.no_grad():
        ref = head(ck)[0]
    dr = HeadDrafter(head, target)
    # the pipeline's prefill: every depth of prompt positions 0..P-2 (deeper than the rule shows)
    dr.start(toks[0, :P].tolist(), {d: ck[0, : P - 1, d] for d in range(n + 1)})
    give = lambda q: [dr.add_features(d, q - d, ck[0, q - d, d]) for d in range(1, n + 1) if q - d >= P - 1]
    worst = 0.0
    for q in range(P - 1, T):
        give(q)
        if q == 14:   # a stale epoch: wrong tokens and garbage features past 13, then a flush to 14
            for qq in range(14, 14 + n):
                for d in range(1, n + 1):
                    if qq - d >= P - 1:
                        dr.add_features(d, qq - d, torch.randn(TCFG.dim) if qq - d >= 14 else ck[0, qq - d, d])
                dr.draft(qq, 7)
            dr.rollback(14)
            give(q)
        out = dr.logits(q, int(toks[0, q]))
        worst = max(worst, (out - ref[q]).abs().max().item())
        assert int(out.argmax()) == int(ref[q].argmax())
    assert worst < 1e-4


@pytest.mark.parametrize("query_window,proj", [(False, "level"), (True, "level"), (True, "shared"), (False, "none")])
def test_training_mask_shows_each_position_at_its_depth(target, query_window, proj):
    n, q = 3, 12
    head = _head(target, n, layers=2, query_window=query_window, proj=proj)
    toks, hidden, ck = _features(target, head.cfg, 16, seed=3)
    with torch.no_grad():
        base = head(ck)[0, q]

        def moved(pos, depths):
            c = ck.clone()
            c[0, pos, depths] += torch.randn(len(depths), TCFG.dim)
            return (head(c)[0, q] - base).abs().max().item()

        assert moved(q - 1, [2, 3]) < 1e-6          # q-1 has only been through stage 1
        assert moved(q - 1, [1]) > 1e-3
        assert moved(q, [1, 2, 3]) < 1e-6           # the newest position: embedding only
        assert moved(q, [0]) > 1e-3
        assert moved(q - 2, [3]) < 1e-6 and moved(q - 2, [2]) > 1e-3
        assert moved(q - 3, [3]) > 1e-3             # left the pipeline: final features
        assert moved(q + 1, [0, 1, 2, 3]) < 1e-6    # causal


def test_window_head_ignores_positions_beyond_the_window(target):
    n, q = 2, 12
    head = _head(target, n, "window", layers=2)
    _, _, ck = _features(target, head.cfg, 16, seed=4)
    with torch.no_grad():
        base = head(ck)[0, q]
        c = ck.clone()
        c[0, : q - n] += 1.0
        assert (head(c)[0, q] - base).abs().max().item() < 1e-6
        c[0, q - n, n] += 1.0
        assert (head(c)[0, q] - base).abs().max().item() > 1e-3


def test_baselines_read_only_what_the_pipeline_has(target):
    n, q = 3, 10
    for kind, pos, depth in [("k-ahead", q - n, n), ("early-exit", q, 0)]:
        m = build_drafter(HeadConfig.for_target(TCFG, n, kind=kind), target).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape))
            _, _, ck = _features(target, m.cfg, 14, seed=5)
            base = m(ck)[0, q]
            c = ck.clone()
            c[0, pos, depth] += 1.0
            assert (m(c)[0, q] - base).abs().max().item() > 1e-3
            c = ck.clone()
            mask = torch.ones(14, n + 1, dtype=torch.bool)
            mask[pos, depth] = False
            c[0][mask] += 1.0                      # everything else moves: the draft does not
            assert (m(c)[0, q] - base).abs().max().item() < 1e-6


def test_missing_feature_is_an_error_not_a_silent_guess(target):
    head = _head(target, 2)
    toks, _, ck = _features(target, head.cfg, 12, seed=6)
    dr = HeadDrafter(head, target)
    dr.start(toks[0, :4].tolist(), {d: ck[0, :3, d] for d in range(3)})
    dr.draft(3, int(toks[0, 3]))
    with pytest.raises(RuntimeError, match="not delivered"):
        dr.draft(4, int(toks[0, 4]))               # stage 1's output of position 3 never came


def test_save_load_and_the_run_entry_point(target, tmp_path):
    head = _head(target, 2)
    path = tmp_path / "h.safetensors"
    save_drafter(head, path, {"seed": 0})
    loaded = load_drafter(path)
    _, _, ck = _features(target, head.cfg, 10, seed=7)
    with torch.no_grad():
        assert (loaded(ck) - head(ck)).abs().max().item() < 0.05    # stored as fp16
    assert isinstance(load_head_drafter(path, target, 2), HeadDrafter)
    with pytest.raises(UserError, match="trained for 2 stages"):
        load_head_drafter(path, target, 4)


def _train(target, kinds, steps=40):
    from executor import train_head as th
    rng = np.random.default_rng(0)
    fake = type("C", (), {"train": rng.integers(0, 64, 20_000).astype(np.uint8)})
    real, th.load_corpus = th.load_corpus, lambda: fake
    try:
        cfgs = [HeadConfig.for_target(TCFG, 2, kind=k, ffn_dim=96, query_window=k == "spd") for k in kinds]
        tc = th.TrainHeadConfig(stages=2, steps=steps, batch=4, seq=32, lr=3e-3, warmup=5)
        return th.train_drafters(target, cfgs, tc, log=lambda *_: None)
    finally:
        th.load_corpus = real


@pytest.fixture(scope="module")
def trained(target):
    return _train(target, ["spd"])[0]


@pytest.mark.parametrize("layers", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(target, layers):
    head = _head(target, 3, layers=layers, query_window=True).train()
    _, _, ck = _features(target, head.cfg, 20, seed=8)

    def grads(flag: bool) -> list[torch.Tensor]:
        head.grad_checkpoint = flag
        head.zero_grad(set_to_none=True)
        head(ck).logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in head.parameters()]

    plain, recomputed = grads(False), grads(True)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(plain, recomputed))
    assert any(float(g.abs().max()) > 0 for g in plain)


def test_distillation_lowers_the_kl(target, trained):
    assert np.mean(trained.losses[-5:]) < 0.8 * np.mean(trained.losses[:5])
    # alone or in lockstep with another drafter: the same weights (the committed heads are reproducible)
    run2, _ = _train(target, ["spd", "k-ahead"])
    for a, b in zip(trained.module.parameters(), run2.module.parameters()):
        assert torch.equal(a, b)


# --- speculative sampling --------------------------------------------------------------------------

def _chi2_pvalue(samples: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=len(p)).double()
    expected = p.double() * len(samples)
    stat = float(((counts - expected) ** 2 / expected).sum())
    # chi-square survival function = regularised upper incomplete gamma Q(df/2, stat/2)
    df = len(p) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(float(stat) / 2, dtype=torch.float64)))


def test_speculative_sampling_is_lossless_in_distribution():
    g = torch.Generator().manual_seed(0)
    V, N = 12, 200_000
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    draft = torch.multinomial(q, N, replacement=True, generator=g)
    accepted, out = speculative_accept(p.expand(N, V), q.expand(N, V), draft, g)
    assert _chi2_pvalue(out, p) > 1e-3
    # the acceptance rate is Σ min(p, q) (Leviathan et al., Theorem 3.5)
    assert abs(accepted.double().mean().item() - torch.minimum(p, q).sum().item()) < 0.005
    # power: the draft distribution itself, and a rule that resamples from p instead of the residual,
    # are both rejected by the same test
    assert _chi2_pvalue(draft, p) < 1e-6
    wrong = torch.where(accepted, draft, torch.multinomial(p, N, replacement=True, generator=g))
    assert _chi2_pvalue(wrong, p) < 1e-6


def test_speculative_sampling_when_the_draft_is_exact_never_rejects():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(8, generator=g), -1).expand(1000, 8)
    draft = torch.multinomial(p, 1, generator=g)[:, 0]
    accepted, out = speculative_accept(p, p, draft, g)
    assert bool(accepted.all()) and torch.equal(out, draft)


# --- online: the pipeline with --draft head:PATH ------------------------------------------------------

def test_online_acceptance_matches_offline_and_output_is_lossless(target, trained, tmp_path):
    runner = pytest.importorskip("executor.runner")
    n, N = 2, 40
    tpath = tmp_path / "target.safetensors"
    save_checkpoint(target, tpath)
    hpath = tmp_path / "head.safetensors"
    save_drafter(trained.module, hpath)
    prompt = [5, 9, 11, 3, 7, 2, 8, 1]
    spec = runner.RunSpec(model=str(tpath), stages=n, timeout=60.0,
                          jobs=[{"scheme": "spd", "prompt": prompt, "new_tokens": N, "draft": f"head:{hpath}"}])
    (res,) = runner.launch(spec)
    assert res["tokens"] == greedy_decode(target, prompt, N)
    # offline: the same text through the target, the module's parallel forward at every drafted position
    loaded = load_drafter(hpath)
    seq = torch.tensor([prompt + res["tokens"]])
    with torch.no_grad():
        t_logits, hidden = target(seq, return_hidden=True)
        d_logits = loaded(target_checkpoints(hidden, loaded.cfg))
    P = len(prompt)
    qs = range(P - 1, P + N - 2)                   # drafts for positions P..P+N-2 get verified
    offline = float(np.mean([int(d_logits[0, q].argmax() == t_logits[0, q].argmax()) for q in qs]))
    online = float(np.mean(res["accepts"]))
    assert 0.0 < offline < 1.0                     # both outcomes occur, so the comparison means something
    assert abs(online - offline) <= 0.02


def test_bad_module_shapes_are_refused():
    """A module shape that cannot be built says why (proj 'none' feeds the checkpoints in as they are)."""
    with pytest.raises(ValueError, match="width must be the target's"):
        HeadConfig.for_target(TCFG, 2, proj="none", width=32)
    with pytest.raises(ValueError, match="unknown input projection"):
        HeadConfig.for_target(TCFG, 2, proj="diagonal")
