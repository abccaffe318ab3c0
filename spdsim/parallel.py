"""Where independent simulations run: one `concurrent.futures.Executor` interface over three back ends.

  jobs = 1, no address   in this process, one task after another (no pool to start)
  jobs = N               N local worker processes (`ProcessPoolExecutor`)
  dask = "tcp://…"       the workers of a Dask distributed cluster (the optional `dask` extra), through
                         `distributed.Client.get_executor`, which is itself a concurrent.futures Executor

`run_tasks(fn, tasks, ...)` is what the sweeps use: it submits `fn(*task)` for every task, reports
progress as results arrive (in any order) and returns the results in task order, so the output does not
depend on where or in which order the tasks ran. `fn` must be a module-level function (it is pickled).
"""
from __future__ import annotations

from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from spdsim.errors import UserError


class InlineExecutor(Executor):
    """Runs each task at submit time, in this process: jobs = 1 without a pool's start-up cost."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:   # the caller sees it from fut.result(), as with a pool
            fut.set_exception(e)
        return fut


def _dask_client(address: str):
    try:
        from distributed import Client
    except ModuleNotFoundError:
        raise UserError("--dask: Dask is not installed (pip install -e '.[dask]')") from None
    try:
        return Client(address, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise UserError(f"--dask: cannot reach a Dask scheduler at {address!r} ({e})") from None


@contextmanager
def make_executor(jobs: int = 1, dask: str | None = None) -> Iterator[Executor]:
    """The executor for `--jobs N` / `--dask ADDRESS`; closed (and the client disconnected) on exit."""
    if jobs < 1:
        raise UserError("--jobs: must be ≥ 1")
    if dask:
        client = _dask_client(dask)
        try:
            # pure=False: identical tasks are still separate tasks (no key collisions between sweeps)
            with client.get_executor(pure=False) as ex:
                yield ex
        finally:
            client.close()
    elif jobs == 1:
        yield InlineExecutor()
    else:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            yield ex


def run_tasks(fn: Callable, tasks: Sequence[tuple], jobs: int = 1, dask: str | None = None,
              progress: Callable[[int, int], None] | None = None,
              executor: Executor | None = None) -> list:
    """[fn(*t) for t in tasks], computed on the chosen back end (or on `executor`, kept open by the
    caller for several batches); progress(done, total) after each result."""
    if not tasks:
        return []
    if executor is None:
        with make_executor(jobs if len(tasks) > 1 else 1, dask) as ex:
            return run_tasks(fn, tasks, progress=progress, executor=ex)
    futures = {executor.submit(fn, *t): i for i, t in enumerate(tasks)}
    results: list = [None] * len(tasks)
    for done, fut in enumerate(as_completed(futures), 1):
        results[futures[fut]] = fut.result()
        if progress:
            progress(done, len(tasks))
    return results


def progress_bar(label: str, quiet: bool = False) -> Callable[[int, int], None] | None:
    """A one-line stderr bar for run_tasks' progress callback (None when quiet)."""
    if quiet:
        return None
    import sys
    import time
    t0 = time.time()

    def show(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / total)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                         f"({time.time() - t0:.1f} s)")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show
