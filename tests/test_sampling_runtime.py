"""`executor run --temperature T`: greedy at T = 0 exactly as before; at T > 0 the pipeline samples, and
SPD's speculative sampling keeps the output distributed as AR's (DESIGN §2, lossless in distribution).

The distribution check: teacher-force each generated sequence through the model to get every
position's p_T, map each token t_i to a randomized PIT value u_i ~ U(F_i(t_i - 1), F_i(t_i)) (F_i: the
CDF of p_T over the vocabulary in decreasing order of p_T); the u_i are i.i.d. U(0, 1) iff each token
was drawn from p_T given its prefix. A Kolmogorov-Smirnov test of uniformity must pass for the
pipeline's tokens and fail for tokens drawn from a wrong distribution. T is low because the small random model's logits are nearly flat: at T = 1 every p_T is close to uniform
and no test could tell right from wrong (T ≠ 1 also checks that both sides divide by T)."""
import math

import pytest

torch = pytest.importorskip("torch")

from executor.cli import main
from executor.checkpoints import load_checkpoint
from executor.runner import RunSpec, launch
from executor.transport import HEADER_BYTES
from spdsim.trace import read_trace
from executor_helpers import PROMPT, REFERENCE_TOKENS

T = 0.03
SEEDS = (11, 12, 13, 14)
LONG = 200                      # the small model's context is 256 (PROMPT is 29 tokens)
VOCAB = 256


def ks_uniform_pvalue(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov test of U(0, 1): the asymptotic Kolmogorov p-value of sqrt(n)·D (with
    Stephens' small-sample correction), P(K > x) = 2 Σ_k (-1)^(k-1) exp(-2 k² x²)."""
    u, _ = torch.sort(u.double())
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((i / n - u).max()), float((u - (i - 1) / n).max()))
    x = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if x < 0.2:
        return 1.0
    return min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))))


def forced_logits(model, tokens: list[int]) -> torch.Tensor:
    """The target's logits for each generated token, teacher-forced in one fp32 forward: [len(tokens), vocab]."""
    with torch.no_grad():
        return model(torch.tensor([PROMPT + tokens])).float()[0, len(PROMPT) - 1: -1]


def pit(p: torch.Tensor, tokens: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Randomized probability integral transform of tokens[i] under p[i], the vocabulary taken in order
    of decreasing p[i] (any order fixed by p alone keeps u uniform under the null; this one sends a
    too-sharp or too-flat distribution, or a drafter's errors, to one side, where KS sees them)."""
    p, order = p.double().sort(-1, descending=True)
    rank = order.argsort(-1).gather(-1, tokens[:, None])
    hi = p.cumsum(-1).gather(-1, rank)[:, 0]
    lo = hi - p.gather(-1, rank)[:, 0]
    return lo + torch.rand(len(tokens), generator=gen, dtype=torch.float64) * (hi - lo)


@pytest.fixture(scope="module")
def head(ckpt, tmp_path_factory):
    """An untrained speculative module for the small model (n = 2), made too flat (its LM head, a copy
    of the target's, halved): about half its drafts are rejected, and a verifier that kept them all would
    emit tokens from q ≈ p at 2T, which the KS check catches by far (p ~ 1e-110 when tried)."""
    from executor.drafter_modules import save_drafter
    from executor.spec_head import HeadConfig, SpecHead
    model = load_checkpoint(ckpt)
    module = SpecHead(HeadConfig.for_target(model.cfg, 2), model)
    with torch.no_grad():
        module.output.weight.mul_(0.5)
    path = tmp_path_factory.mktemp("head") / "h.safetensors"
    save_drafter(module, path)
    return path


@pytest.fixture(scope="module")
def runs(ckpt, head, tmp_path_factory):
    """Every n = 2 job in one launch: T = 0 (explicit) PP and SPD, then SPD with the head and PP at T."""
    short = dict(prompt=PROMPT, new_tokens=REFERENCE_TOKENS)
    jobs = [dict(short, scheme="pp", temperature=0.0),
            dict(short, scheme="spd", draft="oracle:0.5", seed=3, temperature=0.0)]
    jobs += [dict(scheme="spd", prompt=PROMPT, new_tokens=LONG, draft=f"head:{head}", seed=s, temperature=T)
             for s in SEEDS]
    jobs += [dict(scheme="pp", prompt=PROMPT, new_tokens=LONG // 2, seed=21, temperature=T),
             dict(scheme="spd", prompt=PROMPT, new_tokens=LONG // 4, draft=f"head:{head}", seed=SEEDS[0],
                  temperature=T)]
    trace = tmp_path_factory.mktemp("traces")
    results = launch(RunSpec(model=str(ckpt), stages=2, jobs=jobs, trace_dir=str(trace), trace_each=True))
    model = load_checkpoint(ckpt)
    spd, pp = results[2:2 + len(SEEDS)], results[-2]
    return {"greedy": results[:2], "spd": spd, "pp": pp, "again": results[-1],
            "traces": [read_trace(trace / f"job{i}") for i in range(len(jobs))],
            "spd_logits": [forced_logits(model, r["tokens"]) for r in spd],
            "pp_logits": forced_logits(model, pp["tokens"])}


def _result_bytes(trace) -> set[int]:
    return {e.bytes for e in trace.events if e.kind == "send" and e.name.startswith("result")}


def test_temperature_zero_is_greedy_with_no_extra_bytes(runs, ref):
    for r in runs["greedy"]:
        assert r["tokens"] == ref and r["temperature"] == 0.0
    assert runs["greedy"][1]["matches_reference"] and 0 in runs["greedy"][1]["accepts"]
    # T = 0: RESULT is the header alone; T > 0: one logits row follows (after the hidden state with the head)
    assert _result_bytes(runs["traces"][0]) == _result_bytes(runs["traces"][1]) == {HEADER_BYTES}
    assert _result_bytes(runs["traces"][-2]) == {HEADER_BYTES + 4 * VOCAB}
    assert _result_bytes(runs["traces"][2]) == {HEADER_BYTES + 4 * (VOCAB + 64)}


def test_spd_sampling_is_lossless_in_distribution(runs):
    gen = torch.Generator().manual_seed(0)
    accepts = [a for r in runs["spd"] for a in r["accepts"]]
    assert 0 in accepts and 1 in accepts, "the check says nothing about the rule unless both happen"
    u = torch.cat([pit(torch.softmax(lg / T, -1), torch.tensor(r["tokens"]), gen)
                   for r, lg in zip(runs["spd"], runs["spd_logits"])])
    assert u.numel() == LONG * len(SEEDS)
    p_spd = ks_uniform_pvalue(u)
    assert p_spd > 1e-3, (p_spd, sum(accepts), len(accepts))
    # the draft-free path (PP, a token drawn from p_T) passes the same test
    pp = runs["pp"]["tokens"]
    assert runs["pp"]["acceptance_rate"] is None
    assert ks_uniform_pvalue(pit(torch.softmax(runs["pp_logits"] / T, -1), torch.tensor(pp), gen)) > 1e-3
    # the tokens depend on the seed alone, not on the order in which messages happened to arrive (the
    # shorter run's last token is drawn from p, not verified: nothing drafts past the last position)
    assert runs["again"]["tokens"][:-1] == runs["spd"][0]["tokens"][:LONG // 4 - 1]


@pytest.mark.parametrize("wrong_t", [T / 2, 2 * T])
def test_ks_check_rejects_a_wrong_distribution(runs, wrong_t):
    """Power: at the same positions, tokens drawn from p at T/2 (too sharp) or 2T (too flat) fail the
    same test of the same size (over 14 trial sets of 800 tokens: p < 1e-10 for T/2, < 1e-70 for 2T;
    with the vocabulary in id order instead of p order, T/2 went unnoticed in some)."""
    gen = torch.Generator().manual_seed(0)
    us = []
    for lg in runs["spd_logits"]:
        wrong = torch.multinomial(torch.softmax(lg / wrong_t, -1), 1, generator=gen)[:, 0]
        us.append(pit(torch.softmax(lg / T, -1), wrong, gen))
    p_wrong = ks_uniform_pvalue(torch.cat(us))
    assert p_wrong < 1e-3, p_wrong


def test_ar_samples_in_process(ckpt):
    job = dict(scheme="ar", prompt=PROMPT, new_tokens=24, seed=5, temperature=T)
    a, b, c = launch(RunSpec(model=str(ckpt), stages=1, jobs=[job, job, dict(job, seed=6)]))
    assert a["tokens"] == b["tokens"] != c["tokens"] and a["transport"] == "none"


@pytest.mark.parametrize("argv,words", [
    (["--scheme", "pp", "--stages", "2", "--temperature", "-0.5"], "--temperature"),
    (["--scheme", "pp", "--stages", "2", "--temperature", "nan"], "--temperature"),
    (["--scheme", "ar", "--temperature", "inf"], "--temperature"),
    (["--scheme", "spd", "--stages", "2", "--draft", "oracle:0.5", "--temperature", "1"], "head:PATH"),
    (["--scheme", "spd_dedicated", "--stages", "2", "--draft", "oracle:0.5", "--temperature", "1"], "greedily"),
])
def test_bad_temperature_exits_2_with_one_line(ckpt, capsys, argv, words):
    assert main(["run", "--model", str(ckpt), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("executor: error:") and words in err[0], err
