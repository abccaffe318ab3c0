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

import sys
import time

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
    if isinstance(executor, InlineExecutor):     # one at a time, so that progress moves as they finish
        results = []
        for done, t in enumerate(tasks, 1):
            results.append(fn(*t))
            if progress:
                progress(done, len(tasks))
        return results
    futures = {executor.submit(fn, *t): i for i, t in enumerate(tasks)}
    results: list = [None] * len(tasks)
    for done, fut in enumerate(as_completed(futures), 1):
        results[futures[fut]] = fut.result()
        if progress:
            progress(done, len(tasks))
    return results


class Progress:
    """run_tasks' progress callback `(done, total)`, on stderr. On a terminal a tqdm bar with rate and
    ETA; elsewhere (a log file, CI) no carriage-return frames: one plain line at each quarter.
    Work that calls run_tasks in several batches (the planner's branch and bound) passes
    `batches=True`: the count then runs on across batches and `close()` ends the bar."""

    def __init__(self, label: str, batches: bool = False, stream=None) -> None:
        self.label, self.batches = label.strip(), batches
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.offset = self.last = self.total = 0
        self.bar = None
        self.t0 = time.monotonic()
        self.printed = 0

    def __call__(self, done: int, total: int) -> None:
        if done < self.last or (done == self.last == 0):     # a new batch: count on from the last one
            self.offset += self.last
        self.last = done
        self.total = max(self.total, self.offset + total)
        n = self.offset + done
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm
                self.bar = tqdm(total=self.total, desc=self.label, unit="pt", file=self.stream,
                                dynamic_ncols=True, leave=True)
            self.bar.total = self.total
            self.bar.update(n - self.bar.n)
        else:
            if 4 * n // self.total > 4 * self.printed // self.total:     # a new quarter of the (growing) total
                self.printed = n
                self.stream.write(f"{self.label}: {n}/{self.total} ({time.monotonic() - self.t0:.1f} s)\n")
                self.stream.flush()
        if not self.batches and done == total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_bar(label: str, quiet: bool = False, batches: bool = False) -> Progress | None:
    """A `Progress` for run_tasks (None when quiet)."""
    return None if quiet else Progress(label, batches)
