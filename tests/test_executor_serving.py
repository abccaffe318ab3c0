"""Serving in the executor (issue 19): several requests through the real pipeline, each request's tokens
equal to its own AR greedy decode for every policy, n ∈ {2, 3} and C ∈ {1, 2, 3}; traces carry request ids
and the figures come from spdsim's definitions; TP stages serve too; bad options exit 2; a dead rank
names the unfinished requests. One launch per configuration of ranks runs many jobs (process start is the
slow part); few tokens."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("torch")

from executor.checkpoints import load_checkpoint
from executor.cli import main
from executor.runner import RunSpec, launch
from spdsim.serving_metrics import read_requests_csv, serving_metrics
from spdsim.trace import read_trace
from executor_helpers import PROMPT

N = 6                      # new tokens per request
PROMPTS = [PROMPT, list(b"class A:\n    def __init__(self):\n        self."), list(b"for i in range(10):\n    "),
           list(b"x = [1, 2, 3]\nprint("), list(b"def g():\n    return g")]


def requests(k=4, gaps=None):
    """k requests over PROMPTS; `gaps` (s) between arrivals, or all at once."""
    t, out = 0.0, []
    for i in range(k):
        out.append({"prompt": PROMPTS[i % len(PROMPTS)], "new_tokens": N + i % 2, "arrival_s": t})
        t += gaps[i % len(gaps)] if gaps else 0.0
    return out


def job(policy, c, draft="oracle:0.5", scheme="spd", threshold=0.5, k=4, gaps=None, seed=3):
    reqs = requests(k, gaps)
    return {"scheme": scheme, "prompt": reqs[0]["prompt"], "new_tokens": N, "draft": draft, "seed": seed,
            "reference": True,
            "serving": {"policy": policy, "concurrency": c, "threshold": threshold, "requests": reqs}}


def head_file(ckpt, tmp_path, n):
    from executor.drafter_modules import save_drafter
    from executor.spec_head import HeadConfig, SpecHead
    target = load_checkpoint(ckpt)
    head = SpecHead(HeadConfig.for_target(target.cfg, n, ffn_dim=64), target, seed=1).eval()
    path = tmp_path / f"head_n{n}.safetensors"
    save_drafter(head, path)
    return path


def check_lossless(r):
    assert r["matches_reference"], [(q["request"], q["matches_reference"]) for q in r["requests"]]
    for q in r["requests"]:
        assert len(q["tokens"]) == q["new_tokens"] and q["matches_reference"]
        assert q["first_token_s"] >= q["start_s"] >= q["arrival_s"] and q["finish_s"] >= q["first_token_s"]


@pytest.mark.parametrize("n", [2, 3])
def test_every_policy_and_concurrency_equals_each_requests_greedy_decode(ckpt, tmp_path, n):
    from executor_helpers import reference
    head = head_file(ckpt, tmp_path, n)
    jobs, what = [], []
    for c in (1, 2, 3):
        for policy in ("fcfs", "interleave", "spd_first"):
            jobs.append(job(policy, c, gaps=[0.0, 0.02] if c == 2 else None))
            what.append((policy, c, "oracle"))
        jobs.append(job("adaptive", c, draft=f"head:{head}", threshold=0.0))
        what.append(("adaptive", c, "head 0"))
    jobs.append(job("adaptive", 2, draft=f"head:{head}", threshold=1.0))       # no draft ever enters
    what.append(("adaptive", 2, "head 1"))
    jobs.append(job("interleave", 2, draft=None, scheme="pp"))
    what.append(("interleave", 2, "pp"))
    results = launch(RunSpec(model=str(ckpt), stages=n, jobs=jobs, timeout=60.0))
    refs = [reference(ckpt, PROMPTS[i % len(PROMPTS)], N + i % 2) for i in range(4)]
    assert len({tuple(r) for r in refs}) > 1
    for r, w in zip(results, what):
        assert r["tokens"] == refs, w
        check_lossless(r)
        assert r["stages"] == n and r["policy"] == w[0] and 0 <= r["bubble_ratio"] < 1 and r["tokens_per_s"] > 0
    by = dict(zip(what, results))
    # verdicts happen where drafts entered, and only there
    assert any(q["accepts"] for q in by[("interleave", 2, "oracle")]["requests"])
    assert all(not q["accepts"] for q in by[("adaptive", 2, "head 1")]["requests"])
    assert by[("adaptive", 2, "head 1")]["acceptance_rate"] is None
    assert any(q["accepts"] for q in by[("adaptive", 3, "head 0")]["requests"])
    assert all(c is not None and 0 < c <= 1 for q in by[("adaptive", 3, "head 0")]["requests"] for c in q["confidences"])
    assert by[("interleave", 2, "pp")]["waste_ratio"] == 0
    for r in results:
        stats = serving_metrics([_record(q) for q in r["requests"]])
        assert r["tpot_p50_ms"] == pytest.approx(stats.latency["tpot"]["p50"])
        assert r["throughput_tokens_per_s"] == pytest.approx(stats.throughput_tokens_per_s)
    # fcfs: one request at a time, in arrival order
    for c in (1, 3):
        qs = by[("fcfs", c, "oracle")]["requests"]
        assert all(b["start_s"] >= a["finish_s"] for a, b in zip(qs, qs[1:]))
    inter = by[("interleave", 3, "oracle")]["requests"]
    assert inter[1]["start_s"] < inter[0]["finish_s"]           # C = 3: the second starts before the first ends


def _record(q):
    from spdsim.serving_metrics import RequestRecord
    return RequestRecord(q["request"], *(q[k] for k in ("arrival_s", "start_s", "first_token_s", "finish_s",
                                                         "prompt_tokens", "new_tokens")))


def test_cli_json_trace_requests_csv_and_metrics_agree(ckpt, tmp_path):
    from executor.serving_report import serving_window
    from spdsim.metrics import window_metrics
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\nclass B(A):\n\nwhile True:\n")
    cmd = [sys.executable, "-m", "executor.cli", "run", "--model", str(ckpt), "--stages", "2", "--scheme", "spd",
           "--draft", "oracle:0.6", "--requests", "4", "--concurrency", "2", "--policy", "interleave",
           "--arrivals", "poisson:200", "--prompts", str(prompts), "--new-tokens", str(N),
           "--trace", str(tmp_path / "tr"), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["matches_reference"] and len(obj["requests"]) == 4 and obj["arrivals"] == "poisson:200"
    for q in obj["requests"]:
        assert {"request", "prompt", "tokens", "ttft_ms", "tpot_ms"} <= set(q)
    assert [q["prompt"] for q in obj["requests"]] == ["import os", "class B(A):", "while True:", "import os"]
    assert obj["requests"][3]["arrival_s"] > obj["requests"][0]["arrival_s"]      # Poisson: spread out
    trace = read_trace(tmp_path / "tr")
    assert all(e.request in range(4) for e in trace.events)            # every event names its request
    assert {e.request for e in trace.events if e.kind == "compute" and e.device == "rank1"} == set(range(4))
    df = read_requests_csv(tmp_path / "tr" / "requests.csv")
    assert list(df["request"]) == [0, 1, 2, 3]
    assert list(df["tpot_ms"]) == pytest.approx([q["tpot_ms"] for q in obj["requests"]])
    origin = trace.header.extra["serving"]["origin_ns"]
    recs = [_record(q) for q in obj["requests"]]
    t0, t1 = serving_window(recs, origin)
    m = window_metrics(trace.events, "spd", 2, t0, t1, sum(r.new_tokens for r in recs), trace.header.placement,
                       phases=("prefill", "decode"))
    assert m.bubble_ratio == pytest.approx(obj["bubble_ratio"]) and m.tokens_per_s == pytest.approx(obj["tokens_per_s"])
    assert obj["tokens_per_s"] == pytest.approx(obj["throughput_tokens_per_s"])
    assert sum(len(q["accepts"]) for q in obj["requests"]) == m.accepted + m.rejected


def test_tp2_two_stages_serve_losslessly(ckpt):
    from executor_helpers import reference
    jobs = [job("interleave", 2, k=3, gaps=[0.0, 0.01])]
    results = launch(RunSpec(model=str(ckpt), stages=2, tp=2, jobs=jobs, timeout=60.0))
    refs = [reference(ckpt, PROMPTS[i], N + i % 2) for i in range(3)]
    for r in results:
        assert r["tokens"] == refs and r["gpus"] == 4 and r["tp"] == 2
        check_lossless(r)


@pytest.mark.parametrize("argv,words", [
    (["--requests", "0"], "--requests"),
    (["--requests", "2", "--concurrency", "0"], "--concurrency"),
    (["--concurrency", "2"], "need --requests"),
    (["--requests", "2", "--policy", "lifo"], "--policy"),
    (["--requests", "2", "--policy", "adaptive", "--scheme", "spd", "--draft", "oracle:0.5"], "oracle"),
    (["--requests", "2", "--arrivals", "uniform:3"], "--arrivals"),
    (["--requests", "2", "--arrivals", "poisson:-1"], "--arrivals"),
    (["--requests", "2", "--threshold", "2"], "--threshold"),
    (["--requests", "2", "--scheme", "spd_dedicated", "--draft", "oracle:0.5"], "spd_dedicated"),
])
def test_bad_serving_options_exit_2_with_one_line(ckpt, capsys, tmp_path, argv, words):
    prompts = tmp_path / "p.txt"
    prompts.write_text("import os\n")
    base = ["run", "--model", str(ckpt), "--stages", "2", "--scheme", "pp", "--prompts", str(prompts)]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("executor: error:") and words in err[0], err


def test_dead_rank_mid_run_names_it_and_the_unfinished_requests(ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("import os\n")
    cmd = [sys.executable, "-m", "executor.cli", "run", "--model", str(ckpt), "--stages", "3", "--scheme", "spd",
           "--draft", "oracle:0.5", "--requests", "40", "--concurrency", "2", "--policy", "interleave",
           "--new-tokens", "150", "--prompts", str(prompts), "--verbose", "--no-reference"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 120
    while sum("ready (" in line for line in lines) < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the ranks did not all start: {lines}")
        time.sleep(0.1)
    time.sleep(2.0)                                  # well into serving (40 × 150 tokens take far longer)
    ranks = {}
    for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        ranks[next(int(e[5:]) for e in env if e.startswith(b"RANK="))] = int(pid)
    os.kill(ranks[2], signal.SIGKILL)
    t0 = time.monotonic()
    proc.wait(timeout=60)
    assert time.monotonic() - t0 < 30
    time.sleep(0.3)
    err = [line for line in "".join(lines).splitlines() if "error" in line]
    for pid in ranks.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode not in (0, None) and "Traceback" not in "".join(lines)
    assert len(err) == 3 and all("rank 2" in line for line in err), err
    lead = next(line for line in err if "[rank 0]" in line)
    assert "of 40 requests unfinished: " in lead
    unfinished = []
    for part in lead.split("unfinished: ")[1].split(", "):
        a, _, b = part.partition("-")
        unfinished += list(range(int(a), int(b or a) + 1))
    count = int(lead.split(" of 40 requests")[0].split("; ")[-1])
    assert len(unfinished) == count and unfinished == sorted(unfinished) and unfinished[-1] == 39
