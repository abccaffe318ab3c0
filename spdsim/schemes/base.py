"""What a scheme is (the registry in `spdsim.schemes` lists them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Scheme:
    name: str
    window: Callable[[int], int]     # W for n stages
    drafts: bool
    single_device: bool = False
    # (scenario, point, plan, cfg, env, keep_events) -> (events, plan, extra columns); None = first_device
    simulate: Callable[..., Any] | None = None
