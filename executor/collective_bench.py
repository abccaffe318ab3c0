"""All-reduce and all-gather time against size on one TP group of `tp` ranks, over a run's transport:
what `executor profile --tp T` records (profile.json "allreduce" / "allgather") and what
benchmarks/allreduce_local.py prints for the socket transport's two algorithms.

Every rank runs the same sequence of collectives (a collective cannot finish before its slowest member
starts it, so the ranks stay in step); rank 0 times each call and reports, per size, the median of the
timed calls after the untimed warm-up ones. A size is the bytes of the tensor all-reduced (fp32), or of
the gathered row for the all-gather (each rank contributes size / tp); message headers come on top.
"""
from __future__ import annotations

import multiprocessing as mp
import statistics
import time

SIZES = (256, 1024, 4096, 16384, 65536, 262144, 1048576)


def _rank(rank: int, tp: int, port: int, kind: str, device: str, sizes: tuple[int, ...], repeats: int,
          warmup: int, algorithms: tuple[str, ...]) -> dict | None:
    """One member of the group; rank 0 returns {op: {algorithm: {"sizes", "seconds", "samples_s"}}}."""
    import torch
    from executor.transport import connect_on_port
    torch.set_num_threads(1)
    group = list(range(tp))
    dev = torch.device(device)
    tr = connect_on_port(kind, rank, tp, dev, port, groups=[group])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out: dict = {"allreduce": {}, "allgather": {}}
    try:
        for algorithm in algorithms:
            if hasattr(tr, "algorithm"):
                tr.algorithm = algorithm         # the socket transport's; dist picks its own
            for op in ("allreduce", "allgather"):
                if op == "allgather" and algorithm != algorithms[0]:
                    continue                     # one all-gather algorithm (direct)
                rows = {"sizes": [], "seconds": [], "samples_s": []}
                for size in sizes:
                    n = max(size // 4 // (tp if op == "allgather" else 1), 1)
                    x = torch.ones(n, device=dev)
                    samples = []
                    for i in range(warmup + repeats):
                        x.fill_(1.0)             # sums stay finite whatever the repeats
                        sync()
                        t0 = time.perf_counter_ns()
                        if op == "allreduce":
                            tr.allreduce(x, group)
                        else:
                            tr.allgather(x, group)
                        sync()
                        if i >= warmup:
                            samples.append((time.perf_counter_ns() - t0) * 1e-9)
                    rows["sizes"].append(size)
                    rows["seconds"].append(statistics.median(samples))
                    rows["samples_s"].append(samples)
                out[op][algorithm if op == "allreduce" else "direct"] = rows
    finally:
        tr.close()
    return out if rank == 0 else None


def collective_benchmarks(tp: int, transport: str, device: str = "cpu", sizes: tuple[int, ...] = SIZES,
                          repeats: int = 21, warmup: int = 3, algorithms: tuple[str, ...] = ("direct",)) -> dict:
    """Run the group: rank 0 in this process, ranks 1..tp-1 spawned. Returns rank 0's medians."""
    from executor.runner import _free_port
    port = _free_port()
    args = (tp, port, transport, device, tuple(sizes), repeats, warmup, tuple(algorithms))
    ctx = mp.get_context("spawn")
    peers = [ctx.Process(target=_rank, args=(r, *args)) for r in range(1, tp)]
    for p in peers:
        p.start()
    try:
        return _rank(0, *args)
    finally:
        for p in peers:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
