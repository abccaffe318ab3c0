"""spdsim.parallel: results in task order whatever the back end; errors surface; Dask gives the same
results as local processes (on a local Dask cluster this test starts)."""
from __future__ import annotations


import pytest

from spdsim.errors import UserError
from spdsim.parallel import InlineExecutor, make_executor, run_tasks


def _square_after(x: int, delay_ms: int) -> tuple[int, int]:
    import time
    time.sleep(delay_ms / 1000)
    return x, x * x


def _fail(x: int) -> int:
    raise ValueError(f"bad {x}")


def test_results_in_task_order_even_when_they_finish_out_of_order():
    # later tasks finish first (shorter sleeps): the result list must still follow the task list
    tasks = [(i, 40 - 10 * i) for i in range(4)]
    seen = []
    out = run_tasks(_square_after, tasks, jobs=2, progress=lambda d, t: seen.append((d, t)))
    assert out == [(i, i * i) for i in range(4)]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_inline_executor_matches_pool_and_raises_task_errors():
    tasks = [(i, 0) for i in range(5)]
    assert run_tasks(_square_after, tasks, jobs=1) == run_tasks(_square_after, tasks, jobs=2)
    with InlineExecutor() as ex:
        fut = ex.submit(_fail, 3)
    with pytest.raises(ValueError, match="bad 3"):
        fut.result()
    with pytest.raises(ValueError, match="bad [12]"):   # whichever finishes first
        run_tasks(_fail, [(1,), (2,)], jobs=2)


def test_bad_jobs_and_unreachable_dask_are_user_errors():
    with pytest.raises(UserError, match="--jobs"):
        with make_executor(0):
            pass
    pytest.importorskip("distributed")
    with pytest.raises(UserError, match="--dask"):
        with make_executor(1, dask="tcp://127.0.0.1:9"):   # nothing listens on the discard port
            pass


@pytest.fixture(scope="module")
def dask_address():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def test_sweep_on_dask_equals_local_processes(dask_address, tmp_path):
    from spdsim.scenario import parse_scenario
    from spdsim.sweep import run_sweep
    s = parse_scenario("""
hardware: {gpu: a100-80gb-sxm, count: 4, topology: pcie-tree}
model: llama-2-7b
workload: {prompt_tokens: 64, new_tokens: 24}
sweep: {stages: [1, 2, 4], partition: [uniform, comm_aware], acceptance: [0.6, 0.9], schemes: [ar, pp, spd]}
""")
    local = run_sweep(s, jobs=2)
    remote = run_sweep(s, dask=dask_address)
    assert len(local) > 5
    assert local.equals(remote)


def test_plan_on_dask_equals_local_processes(dask_address):
    from spdsim.acceptance import iid
    from spdsim.hardware import GPU_CATALOG
    from spdsim.models import MODEL_CATALOG
    from spdsim.plan import PlanRequest, evaluate
    from spdsim.scenario import Workload
    req = PlanRequest(model=MODEL_CATALOG["llama-2-13b"], gpus=(GPU_CATALOG["l40s"], GPU_CATALOG["a100-80gb-sxm"]),
                      max_gpus=3, target=30.0, acceptance=iid(0.7), acceptance_table=None,
                      workload=Workload(64, 24), partitions=("uniform", "comm_aware"), prices={"l40s": 1.0})
    local = evaluate(req, jobs=2)
    remote = evaluate(req, dask=dask_address)
    assert (local["status"] != "infeasible").sum() > 3
    assert local["tokens_per_s"].notna().sum() > 3
    assert local.equals(remote)


def test_progress_off_a_terminal_writes_lines_not_frames():
    import io
    from spdsim.parallel import Progress
    buf = io.StringIO()                       # not a TTY, like a log file or CI
    bar = Progress("simulating", stream=buf)
    run_tasks(_square_after, [(i, 0) for i in range(40)], jobs=1, progress=bar)
    text = buf.getvalue()
    assert "\r" not in text
    assert text.splitlines()[-1].startswith("simulating: 40/40")
    assert len(text.splitlines()) == 4        # one line per quarter


def test_progress_counts_on_across_batches():
    import io
    from spdsim.parallel import Progress
    buf = io.StringIO()
    bar = Progress("simulating", batches=True, stream=buf)
    for batch in ([(i, 0) for i in range(4)], [(i, 0) for i in range(4)]):
        run_tasks(_square_after, batch, jobs=1, progress=bar)
    bar.close()
    assert buf.getvalue().splitlines()[-1].startswith("simulating: 8/8")
