"""Tensor parallelism in the executor (executor/tp.py, the contract in spdsim/protocol.py): TP shards give
the one-device logits within an fp32 bound (in process, a thread per rank); a rank's shard read from disk
is exactly its slice of our checkpoints and of HF directories; across real processes TP = 2 × stages
∈ {1, 2} decodes exactly the one-device AR greedy tokens under ar, pp, spd with oracle α ∈ {0, 0.5, 1}
and spd with a speculative module; the traces nest each all-reduce in its compute and the metrics count
a TP group as one stage; bad --tp exits 2 naming --tp."""
import copy
import json
import subprocess
import sys
import threading

import pytest

torch = pytest.importorskip("torch")

from executor.checkpoints import load_checkpoint
from executor.cli import main
from executor.hf_loader import save_hf_checkpoint
from executor.model import ModelConfig, Stage, Transformer
from executor.ranks import RankLayout
from executor.runner import RunSpec, launch
from executor.tp import TPComm, attach, load_tp_stage, narrow, shard_in_memory, shard_slice, tp_problem
from spdsim.metrics import busy_per_stage, decode_window, run_metrics
from spdsim.trace import read_trace
from executor_helpers import PROMPT

N = 10                       # new tokens in the multi-process runs (the ref fixture's first N)


# --- in process: a fake TP group, one thread per rank ------------------------------------------------

class ThreadGroup:
    """The collectives of the transport interface between threads: each member adds every member's
    tensor in rank order (as the socket transport's direct algorithm does)."""

    def __init__(self, t: int) -> None:
        self.bufs, self.barrier = [None] * t, threading.Barrier(t, timeout=30)

    def member(self, rank: int):
        group = self

        class Member:
            def allreduce(self, x, ranks):
                group.bufs[rank] = x.clone()
                group.barrier.wait()
                total = group.bufs[0].clone()
                for b in group.bufs[1:]:
                    total += b
                group.barrier.wait()
                return x.copy_(total)

            def allgather(self, x, ranks):
                group.bufs[rank] = x.clone()
                group.barrier.wait()
                out = torch.stack(group.bufs)
                group.barrier.wait()
                return out
        return Member()


def _in_threads(t: int, fn):
    out, errors = {}, []

    def run(r):
        try:
            out[r] = fn(r)
        except Exception as e:          # surface any rank's failure in the test
            errors.append(repr(e))
            raise

    threads = [threading.Thread(target=run, args=(r,)) for r in range(t)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    return [out[r] for r in range(t)]


def _model(kv_heads=2, tie=False, bias=False, seed=3):
    cfg = ModelConfig(vocab_size=96, n_layers=3, dim=64, n_heads=4, n_kv_heads=kv_heads, ffn_dim=96,
                      max_seq_len=64, tie_embeddings=tie)
    model = Transformer(cfg).init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():           # norms are ones after init: make them matter
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        if bias:                                # Qwen2: biased q/k/v (column-parallel: sliced with the rows)
            for layer in model.layers:
                for proj in ("wq", "wk", "wv"):
                    old = getattr(layer.attention, proj)
                    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
                    new.weight.copy_(old.weight)
                    new.bias.copy_(0.5 * torch.randn(new.bias.shape, generator=g))
                    setattr(layer.attention, proj, new)
    return model.eval()


def _decode_logits(stage: Stage, idx: torch.Tensor) -> torch.Tensor:
    """Prefill all but the last token, then one decode step: the logits of both, [1, T, vocab]."""
    T = idx.shape[1]
    stage.setup_cache()
    with torch.no_grad():
        a = stage(idx[:, :-1], torch.arange(T - 1))
        b = stage(idx[:, -1:], torch.tensor([T - 1]))
    return torch.cat([a, b], 1)


def _tp_logits(t: int, make_shard, idx):
    group = ThreadGroup(t)

    def rank(r):
        stage = attach(make_shard(r), TPComm(group.member(r), list(range(t))))
        return _decode_logits(stage, idx)
    return _in_threads(t, rank)


def _bound(ref: torch.Tensor) -> float:
    # fp32 with another summation order (the row-parallel products add t partial sums): a few ulps of the
    # logits' scale per layer; 1e-5 relative is ~100 ulps, far below any real difference (a wrong slice
    # or a missing all-reduce moves the logits by O(1))
    return 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("t,kv_heads", [(2, 2), (4, 2), (2, 4), (4, 1)])
def test_tp_logits_equal_one_device(t, kv_heads):
    """t = 4 over 2 or 1 KV heads replicates each KV head on the ranks whose query heads use it."""
    torch.manual_seed(0)
    model = _model(kv_heads)
    idx = torch.randint(0, 96, (1, 14), generator=torch.Generator().manual_seed(5))
    ref = _decode_logits(Stage(model, 0, 3), idx)
    outs = _tp_logits(t, lambda r: shard_in_memory(Stage(copy.deepcopy(model), 0, 3), t, r), idx)
    assert (outs[0] - ref).abs().max() <= _bound(ref)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])          # every rank holds the very same logits row
    # and the bound has teeth: without the all-reduces the shards' logits are far off
    lone = _decode_logits(shard_in_memory(Stage(copy.deepcopy(model), 0, 3), t, 0), idx)[..., :96 // t]
    assert (lone - ref[..., :96 // t]).abs().max() > 100 * _bound(ref)


def _params(stage: Stage) -> dict[str, torch.Tensor]:
    return {name: p for name, p in stage.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("fmt,tie,bias", [("ours", False, False), ("llama", True, False), ("qwen2", False, True)])
def test_loaded_shards_are_exactly_their_slices(tmp_path, fmt, tie, bias):
    from executor.checkpoints import save_checkpoint
    model = _model(tie=tie, bias=bias)
    if fmt == "ours":
        path = tmp_path / "m.safetensors"
        save_checkpoint(model, path)
    else:
        path = save_hf_checkpoint(model, tmp_path / "hf", fmt)
    full = load_checkpoint(path)
    cfg, t = full.cfg, 2
    idx = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(6))
    for first, last in [(0, 2), (2, 3)]:           # a first and a last stage
        whole = _params(Stage(full, first, last))
        shards = [load_tp_stage(path, first, last, t, r) for r in range(t)]
        for r, shard in enumerate(shards):
            got = _params(shard)
            assert got.keys() == whole.keys()
            for name, p in got.items():
                ckpt_name = name if not name.startswith("layers.") else \
                    f"layers.{first + int(name.split('.')[1])}.{name.split('.', 2)[2]}"
                assert torch.equal(p, narrow(whole[name], shard_slice(cfg, t, r, ckpt_name))), name
        # a shard holds its slices only: split tensors add up to the whole, replicated ones are whole
        for name, p in whole.items():
            sizes = [_params(s)[name].numel() for s in shards]
            split = shard_slice(cfg, t, 0, "layers.0." + name.split(".", 2)[2] if name.startswith("layers.")
                                else name) is not None
            assert sum(sizes) == p.numel() if split else sizes == [p.numel()] * t, name
    # the loaded shards of the whole model decode with the one-device logits
    ref = _decode_logits(Stage(full, 0, 3), idx)
    outs = _tp_logits(t, lambda r: load_tp_stage(path, 0, 3, t, r), idx)
    assert (outs[0] - ref).abs().max() <= _bound(ref)


def test_tp_problem_names_what_does_not_split():
    assert tp_problem(4, 2, 96, 96, 2) is None
    assert tp_problem(4, 2, 96, 96, 4) is None            # KV heads replicated
    assert "attention heads" in tp_problem(4, 2, 96, 96, 3)
    assert "KV heads" in tp_problem(8, 6, 96, 96, 4)      # 4 ∤ 6 and 6 ∤ 4
    assert "feed-forward" in tp_problem(4, 4, 90, 96, 4)
    assert "vocabulary" in tp_problem(4, 4, 96, 97, 2)


def test_rank_numbering():
    L = RankLayout(stages=3, tp=2)
    assert [L.rank(s, r) for s in range(3) for r in range(2)] == list(range(6)) and L.world == 6
    assert all((L.stage_of(k), L.tp_rank_of(k)) == divmod(k, 2) for k in range(6))
    assert L.upstream(5) == 3 and L.downstream(3) == 5 and L.downstream(5) is None and L.upstream(1) == 0
    D = RankLayout(stages=2, tp=2, dedicated=True)
    assert D.world == 5 and D.group(0) == [1, 2] and D.stage_of(0) == -1 and D.upstream(2) == 0


@pytest.mark.parametrize("argv,words", [
    (["--tp", "3"], "--tp 3: 3 does not divide the model's 4 attention heads"),
    (["--tp", "0"], "--tp must be ≥ 1"),
    (["--tp", "8"], "--tp 8"),
    (["--tp", "2", "--stages", "3", "--scheme", "pp"], "--tp 2 × --stages 3 = 6 ranks: more than 4 per core"),
    (["--tp", "2", "--allreduce", "tree"], "--allreduce"),
])
def test_bad_tp_exits_2_naming_it(ckpt, capsys, monkeypatch, argv, words):
    monkeypatch.setattr("os.cpu_count", lambda: 1)      # the rank limit is 4 per core
    code = None
    try:
        code = main(["run", "--model", str(ckpt), *argv])
    except SystemExit as e:                              # argparse's choices= check exits 2 itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and words in err[-1], err


# --- across processes ---------------------------------------------------------------------------------

def test_cli_tp2_ar_prints_the_one_device_tokens(ckpt, ref, tmp_path):
    cmd = [sys.executable, "-m", "executor.cli", "run", "--tp", "2", "--scheme", "ar", "--model", str(ckpt),
           "--new-tokens", str(N), "--prompt", bytes(PROMPT).decode(), "--trace", str(tmp_path), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["tokens"] == ref[:N] and obj["matches_reference"] is True
    assert obj["tp"] == 2 and obj["gpus"] == 2 and obj["stages"] == 1 and 0 < obj["allreduce_share"] < 1
    trace = read_trace(tmp_path)
    assert trace.header.tp == 2
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    _check_trace(trace, stages=1, tp=2, dim=64, vocab=256, layers=[8])
    m = run_metrics(trace.events, "ar", 1, N, placement=trace.header.placement)
    assert m.allreduce_share == pytest.approx(obj["allreduce_share"])


def _check_trace(trace, stages, tp, dim, vocab, layers):
    """Every decode compute of a rank holds exactly its forward's collectives, nested inside it: two
    all-reduces of one hidden state per layer, and on the last stage the all-gather of the logits row."""
    ev = [e for e in trace.events if e.phase == "decode"]
    assert {e.tp_rank for e in ev if e.kind == "compute"} == set(range(tp))
    for rank in {e.device for e in ev if e.kind == "compute"}:
        mine = [e for e in ev if e.device == rank]
        computes = [e for e in mine if e.kind == "compute"]
        colls = [e for e in mine if e.kind == "allreduce"]
        stage = computes[0].stage
        want = 2 * layers[stage] + (1 if stage == stages - 1 else 0)
        assert len(colls) == want * len(computes), rank
        for c in computes:
            inside = [a for a in colls if c.start_ns <= a.start_ns and a.end_ns <= c.end_ns]
            assert len(inside) == want and all(a.position == c.position and a.stage == c.stage for a in inside)
            assert sorted(a.bytes for a in inside) == sorted([dim * 4] * 2 * layers[stage]
                                                            + ([vocab * 4] if stage == stages - 1 else []))
        assert {a.name for a in colls} == {"attention", "mlp"} | ({"allgather"} if stage == stages - 1 else set())


def test_tp2_two_stages_every_scheme_equals_ar(ckpt, ref, tmp_path):
    from executor.drafter_modules import save_drafter
    from executor.spec_head import HeadConfig, SpecHead
    target = load_checkpoint(ckpt)
    head = SpecHead(HeadConfig.for_target(target.cfg, 2, ffn_dim=64), target, seed=1).eval()
    hpath = tmp_path / "head.safetensors"
    save_drafter(head, hpath)
    jobs = [dict(scheme="pp", prompt=PROMPT, new_tokens=N, reference=True)]
    jobs += [dict(scheme="spd", prompt=PROMPT, new_tokens=N, draft=f"oracle:{a}", seed=3) for a in (0.0, 1.0, 0.5)]
    jobs += [dict(scheme="spd", prompt=PROMPT, new_tokens=N, draft=f"head:{hpath}", reference=True)]
    results = launch(RunSpec(model=str(ckpt), stages=2, tp=2, jobs=jobs, trace_dir=str(tmp_path / "tr"),
                             trace_each=True, timeout=60.0))
    assert len(set(ref[:N])) > 3, "the reference should not be one repeated token"
    for r in results:
        assert r["tokens"] == ref[:N] and r["matches_reference"], (r["scheme"], r["draft"])
        assert r["tp"] == 2 and r["gpus"] == 4 and r["stages"] == 2
    pp, spd0, spd1, spd5, spdh = results
    assert set(spd0["accepts"]) == {0} and set(spd1["accepts"]) == {1} and set(spd5["accepts"]) == {0, 1}
    assert len(spdh["accepts"]) == N - 1
    # the metrics of the merged trace count each TP group as one stage
    for i, r in enumerate(results):
        trace = read_trace(tmp_path / "tr" / f"job{i}")
        assert trace.header.tp == 2 and len(list((tmp_path / "tr" / f"job{i}").glob("rank*.jsonl"))) == 4
        m = run_metrics(trace.events, r["scheme"], 2, N, placement=trace.header.placement)
        assert m.bubble_ratio == pytest.approx(r["bubble_ratio"]) and 0 <= m.bubble_ratio <= 1
        assert all(0 < u <= 1 for u in m.utilization)
        # the busy time is the union over the group's ranks, not their sum (which would exceed T)
        t0, t1, _ = decode_window(trace.events, N)
        for s in range(2):
            per_rank = [busy_per_stage([e for e in trace.events if e.tp_rank == k], 2, t0, t1,
                                       trace.header.placement)[s] for k in range(2)]
            assert max(per_rank) <= m.utilization[s] * (t1 - t0) + 1 <= sum(per_rank) + 1
    _check_trace(read_trace(tmp_path / "tr" / "job3"), stages=2, tp=2, dim=64, vocab=256, layers=[4, 4])


def test_tp2_dedicated_over_torch_distributed(ckpt, ref):
    """spd_dedicated on TP stages (rank 0 feeds every TP rank of stage 0), its all-reduces and all-gather
    on gloo's process groups, one per TP group (one launch for both: process start is the slow part)."""
    (r,) = launch(RunSpec(model=str(ckpt), stages=2, tp=2, transport="dist", timeout=60.0,
                          jobs=[dict(scheme="spd_dedicated", prompt=PROMPT, new_tokens=N, draft="oracle:0.5",
                                     seed=3)]))
    assert r["tokens"] == ref[:N] and r["matches_reference"]
    assert r["transport"] == "dist-gloo" and r["gpus"] == 5 and r["allreduce_share"] > 0
