"""spd_dedicated in the executor (n + 1 ranks, synchronous cycles, executor/dedicated.py): exactly the AR
greedy tokens for n ∈ {2, 3} and oracle α ∈ {0, 0.5, 1}; the trace puts the stages on ranks 1..n and
rank 0's work (embed, draft, LM head) in head events. One launch per n runs every α (process start is
the slow part)."""
import json
import subprocess
import sys
from collections import Counter

import pytest

pytest.importorskip("torch")

from executor.runner import RunSpec, launch, validate
from spdsim.errors import UserError
from spdsim.metrics import run_metrics
from spdsim.trace import read_trace
from executor_helpers import PROMPT, REFERENCE_TOKENS

N = REFERENCE_TOKENS


@pytest.mark.parametrize("n", [2, 3])
def test_dedicated_equals_ar(ckpt, ref, n, tmp_path):
    transport = "dist" if n == 3 else "local"        # gloo once: the CONTROL kind crosses both transports
    jobs = [dict(scheme="spd_dedicated", prompt=PROMPT, new_tokens=N, draft=f"oracle:{a}", seed=3)
            for a in (0.0, 0.5, 1.0)]
    results = launch(RunSpec(model=str(ckpt), stages=n, jobs=jobs, transport=transport,
                             trace_dir=str(tmp_path), trace_each=True))
    assert len(set(ref)) > 3, "the reference should not be one repeated token"
    spd0, spd5, spd1 = results
    for r in results:
        assert r["tokens"] == ref and r["matches_reference"], r["draft"]
        assert r["stages"] == n and len(r["partition"]) == n and r["partition"][-1][1] == 8
        assert len(r["accepts"]) == N - 1 and r["epochs"] == 1 + r["accepts"].count(0)
        assert 0 <= r["bubble_ratio"] < 1 and r["tokens_per_s"] > 0 and len(r["utilization"]) == n
    assert set(spd0["accepts"]) == {0} and spd0["waste_ratio"] > 0
    assert set(spd1["accepts"]) == {1} and spd1["waste_ratio"] == 0
    assert set(spd5["accepts"]) == {0, 1}

    for i, r in enumerate(results):
        trace = read_trace(tmp_path / f"job{i}")
        assert trace.header.placement == [f"rank{s + 1}" for s in range(n)]
        dec = [e for e in trace.events if e.phase == "decode"]
        computes = [e for e in dec if e.kind == "compute"]
        # stages run on ranks 1..n, layers only; rank 0 computes nothing but head work
        assert {e.device for e in computes} == {f"rank{s + 1}" for s in range(n)}
        assert all(e.device == f"rank{e.stage + 1}" for e in computes)
        heads = Counter(e.name for e in dec if e.kind == "head")
        assert all(e.device == "rank0" for e in dec if e.kind == "head")
        # slots clear on a rejection, so nothing stale reaches the LM head: one per committed token
        assert heads["lm_head"] == N and sum(e.kind == "commit" for e in dec) == N
        assert heads["draft"] >= N - 1 and heads["embed"] >= N
        # every stage computes each decode position usefully exactly once; under α = 1 nothing else
        useful = sorted((e.stage, e.position) for e in computes if not e.discarded)
        assert useful == [(s, q) for s in range(n) for q in range(len(PROMPT) - 1, len(PROMPT) + N - 1)]
        if r["draft"] == "oracle:1.0":
            assert len(computes) == n * N
        m = run_metrics(trace.events, "spd_dedicated", n, N, placement=trace.header.placement)
        assert m.tokens_per_s == pytest.approx(r["tokens_per_s"]) and m.bubble_ratio == pytest.approx(r["bubble_ratio"])


def test_cli_json_and_trace_files(ckpt, ref, tmp_path):
    cmd = [sys.executable, "-m", "executor.cli", "run", "--stages", "2", "--scheme", "spd_dedicated",
           "--draft", "oracle:0.6", "--model", str(ckpt), "--new-tokens", str(N), "--prompt", bytes(PROMPT).decode(),
           "--trace", str(tmp_path / "tr"), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["scheme"] == "spd_dedicated" and obj["tokens"] == ref and obj["stages"] == 2
    assert sorted(p.name for p in (tmp_path / "tr").iterdir()) == ["rank0.jsonl", "rank1.jsonl", "rank2.jsonl",
                                                                   "timeline.json"]
    kinds = {e.kind for e in read_trace(tmp_path / "tr").events}
    assert {"compute", "send", "head", "verify", "commit"} <= kinds


@pytest.mark.parametrize("draft,message", [(None, "oracle"), ("head:{ckpt}", "oracle drafter only")])
def test_rejects_what_it_cannot_run(ckpt, draft, message):
    job = dict(scheme="spd_dedicated", prompt=PROMPT, new_tokens=4, draft=draft and draft.format(ckpt=ckpt))
    with pytest.raises(UserError, match=message):
        validate(RunSpec(model=str(ckpt), stages=2, jobs=[job]))
    with pytest.raises(UserError, match="share a run"):
        validate(RunSpec(model=str(ckpt), stages=2, jobs=[dict(job, draft="oracle:1"),
                                                         dict(scheme="pp", prompt=PROMPT, new_tokens=4)]))
