"""Prompts for serving runs (`executor run --requests K`): held-out standard-library files, or a file of
one prompt per line. Token ids are UTF-8 bytes, as for `--prompt`.

The held-out files are executor/data.py's validation split (the tiny model and every drafter never
trained on them); prompt i is the first `PROMPT_BYTES` bytes of the i-th such file in path order (files
shorter than that are skipped), so the same K prompts come back on every machine with the same Python.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

from spdsim.errors import UserError

PROMPT_BYTES = 48


def heldout_prompts(k: int, prompt_bytes: int = PROMPT_BYTES, root: str | Path | None = None) -> list[list[int]]:
    """k prompts from the held-out standard-library files (cycled if there are fewer files than k)."""
    from executor.data import is_validation, stdlib_files
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out: list[list[int]] = []
    for p in stdlib_files(root):
        if not is_validation(p.relative_to(root).as_posix()):
            continue
        head = p.read_bytes()[:prompt_bytes]
        if len(head) == prompt_bytes:
            out.append(list(head))
        if len(out) >= k:
            break
    if not out:
        raise UserError(f"no held-out standard-library file of {prompt_bytes} bytes under {root}: give --prompts FILE")
    return [out[i % len(out)] for i in range(k)]


def file_prompts(path: Path, k: int) -> list[list[int]]:
    """k prompts from a file of one prompt per line (empty lines skipped; cycled if it has fewer than k)."""
    try:
        lines = [line for line in Path(path).read_bytes().split(b"\n") if line.strip()]
    except OSError as e:
        raise UserError(f"--prompts {path}: cannot read it ({e.strerror})") from None
    if not lines:
        raise UserError(f"--prompts {path}: no prompts (one per line)")
    return [list(lines[i % len(lines)]) for i in range(k)]
