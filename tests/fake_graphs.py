"""A stand-in for CUDA graphs on CPU, so the graph path's logic (capture once, replay many times over the
same buffers) runs in the tests: `capture_graph`'s warm-up calls run for real, the capture call records
nothing (a CUDA capture runs no kernel), and each replay calls the function again, which is what a replay
does to the captured buffers (the same kernels on the same addresses)."""
from __future__ import annotations


class ReplayByCall:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.fn()


def fake_capture_graph(fn, warmup: int = 2) -> ReplayByCall:
    for _ in range(warmup):
        fn()
    return ReplayByCall(fn)


def use_fake_graphs(monkeypatch) -> None:
    import executor.decode_step as ds
    monkeypatch.setattr(ds, "can_capture", lambda device: True)
    monkeypatch.setattr(ds, "capture_graph", fake_capture_graph)
