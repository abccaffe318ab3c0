"""Which process is which: the rank numbering of a run, defined once (DESIGN §2, tensor parallelism).

A run has `stages` pipeline stages, each on a TP group of `tp` ranks; a rank is (stage, tp_rank) and

    rank = offset + stage × tp + tp_rank

with offset 1 under `spd_dedicated` (rank 0 is the dedicated module's process, no stage) and 0 otherwise.
So without TP rank s runs stage s, as before; global rank 0 is always the controller (stage 0's TP rank
0, or the dedicated rank). Torch-free: the launcher uses it before any rank starts.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankLayout:
    stages: int
    tp: int = 1
    dedicated: bool = False        # spd_dedicated: rank 0 of its own, before the stage ranks

    def __post_init__(self) -> None:
        if self.stages < 1 or self.tp < 1:
            raise ValueError(f"stages and tp must be ≥ 1, got {self.stages}, {self.tp}")

    @property
    def offset(self) -> int:
        return int(self.dedicated)

    @property
    def world(self) -> int:
        return self.offset + self.stages * self.tp

    def rank(self, stage: int, tp_rank: int = 0) -> int:
        if not (0 <= stage < self.stages and 0 <= tp_rank < self.tp):
            raise ValueError(f"no rank for stage {stage}, tp rank {tp_rank} in {self}")
        return self.offset + stage * self.tp + tp_rank

    def stage_of(self, rank: int) -> int:
        """The stage `rank` runs; -1 for the dedicated rank."""
        return -1 if rank < self.offset else (rank - self.offset) // self.tp

    def tp_rank_of(self, rank: int) -> int:
        return 0 if rank < self.offset else (rank - self.offset) % self.tp

    def group(self, stage: int) -> list[int]:
        """The global ranks of `stage`'s TP group, in TP-rank order."""
        return [self.rank(stage, r) for r in range(self.tp)]

    def groups(self) -> list[list[int]]:
        return [self.group(s) for s in range(self.stages)]

    def upstream(self, rank: int) -> int:
        """Where `rank`'s inputs come from: TP rank r of the previous stage; for stage 0's other TP ranks
        its TP rank 0 (which runs the controller and forwards each issue); under spd_dedicated rank 0
        feeds every TP rank of stage 0."""
        s, r = self.stage_of(rank), self.tp_rank_of(rank)
        if s > 0:
            return self.rank(s - 1, r)
        return 0

    def downstream(self, rank: int) -> int | None:
        """TP rank r of the next stage; None on the last stage."""
        s, r = self.stage_of(rank), self.tp_rank_of(rank)
        return self.rank(s + 1, r) if 0 <= s < self.stages - 1 else None

    def leaders(self) -> list[int]:
        """TP rank 0 of every stage: where RESULT, READY and features leave from."""
        return [self.rank(s, 0) for s in range(self.stages)]
