"""Faults and bad input: a dead rank (of a pipeline, or of a TP group) makes the others exit within 30 s
naming it; Ctrl-C stops every process; bad arguments exit 2 with one line and no traceback."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("torch")

from executor.cli import main


@pytest.mark.parametrize("argv,words", [
    (["--scheme", "nonsense", "--stages", "2"], "scheme"),
    (["--scheme", "pp", "--stages", "9"], "layers"),
    (["--scheme", "spd", "--stages", "2", "--draft", "oracle"], "draft"),
    (["--scheme", "spd", "--stages", "2", "--draft", "oracle:1.5"], "[0, 1]"),
    (["--scheme", "spd", "--stages", "2", "--draft", "oracle:abc"], "number"),
    (["--scheme", "spd", "--stages", "2", "--draft", "magic:3"], "unknown drafter"),
    (["--scheme", "spd", "--stages", "2", "--draft", "head:/no/such/file"], "no such file"),
    (["--scheme", "spd", "--stages", "2"], "needs --draft"),
    (["--scheme", "ar", "--stages", "2"], "one process"),
    (["--scheme", "pp", "--stages", "2", "--draft", "oracle:0.5"], "spd only"),
    (["--scheme", "pp", "--stages", "2", "--new-tokens", "300"], "context"),
    (["--scheme", "pp", "--stages", "2", "--prompt", "x"], "2 tokens"),
    (["--scheme", "pp", "--stages", "2", "--transport", "carrier-pigeon"], "transport"),
    (["--scheme", "pp", "--stages", "2", "--tp", "3"], "--tp 3"),
])
def test_bad_arguments_exit_2_with_one_line(ckpt, capsys, argv, words):
    assert main(["run", "--model", str(ckpt), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("executor: error:") and words in err[0], err


def test_missing_model_and_no_traceback_from_the_command():
    out = subprocess.run([sys.executable, "-m", "executor.cli", "run", "--model", "/no/such/model", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "/no/such/model" in out.stderr


def _start(ckpt, stages, extra=(), tp=1):
    cmd = [sys.executable, "-m", "executor.cli", "run", "--model", str(ckpt), "--stages", str(stages), "--scheme",
           "pp", "--new-tokens", "150", "--repeat", "1000", "--verbose", "--tp", str(tp), *extra]
    world = stages * tp
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 120
    while sum("ready (" in l for l in lines) < world:      # every rank loaded its stage and connected
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the ranks did not all start: {lines}")
        time.sleep(0.1)
    time.sleep(1.0)                              # well into decoding
    ranks = {}
    for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
        ranks[rank] = int(pid)
    assert sorted(ranks) == list(range(world))
    return proc, ranks, lines


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("dead,stages,tp", [(1, 3, 1), (0, 3, 1), (3, 2, 2)])
def test_dead_rank_stops_the_others_naming_it(ckpt, dead, stages, tp):
    """(3, 2, 2): TP rank 1 of the last stage, whose only partners are its TP peer and TP rank 1 of stage 0."""
    proc, ranks, lines = _start(ckpt, stages, tp=tp)
    os.kill(ranks[dead], signal.SIGKILL)
    t0 = time.monotonic()
    proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    err = "".join(lines)
    assert elapsed < 30, elapsed
    assert proc.returncode not in (0, None) and "Traceback" not in err
    lines = [l for l in err.splitlines() if "error" in l]
    for pid in ranks.values():                   # never leave a rank behind, even when the test fails
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    # every survivor and the launcher each say, in one line, which rank died
    assert len(lines) == stages * tp and all(f"rank {dead}" in l for l in lines), err
    assert not any(_alive(p) for p in ranks.values())


def test_ctrl_c_stops_every_process(ckpt):
    proc, ranks, lines = _start(ckpt, 2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    time.sleep(0.5)
    err = "".join(lines)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    time.sleep(0.2)
    assert not any(_alive(p) for p in ranks.values())
