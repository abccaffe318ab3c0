"""Reading YAML mappings key by key: every problem is one `UserError` line that names the key.

Shared by the scenario parser (`spdsim.scenario`) and the serving keys (`spdsim.workload`,
`spdsim.serving_config`), so they all report bad input the same way."""
from __future__ import annotations

from typing import Any

from spdsim.errors import UserError


def mapping(obj: Any, key: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{key}: expected a mapping, got {type(obj).__name__}")
    return obj


def only(d: dict, allowed: set[str], where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(f"{prefix}{unknown[0]}: unknown key (expected one of {', '.join(sorted(allowed))})")


def num(v: Any, key: str, *, positive: bool = False, nonneg: bool = False, integer: bool = False) -> Any:
    if isinstance(v, str):          # YAML 1.1 reads 1.0e9 (no exponent sign) as a string
        try:
            v = float(v) if not v.strip().lstrip("+-").isdigit() else int(v)
        except ValueError:
            raise UserError(f"{key}: {v!r} is not a number") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{key}: {v!r} is not a number")
    if integer and (not isinstance(v, int) and not float(v).is_integer()):
        raise UserError(f"{key}: {v!r} is not a whole number")
    if positive and not v > 0:
        raise UserError(f"{key}: must be > 0 (got {v})")
    if nonneg and not v >= 0:
        raise UserError(f"{key}: must be ≥ 0 (got {v})")
    return int(v) if integer else float(v)


def as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]
