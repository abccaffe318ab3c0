"""The training corpus: the Python standard library's own `.py` sources on this machine, as bytes.

Nothing is downloaded. Files are split into train / validation by a hash of their path relative to
the standard library, so the split is the same on every machine with the same Python version."""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3", "turtledemo"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS)]
    return sorted(files)


def is_validation(rel_path: str, fraction: float = 0.05) -> bool:
    h = int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16)
    return (h % 10_000) < fraction * 10_000


@dataclass
class Corpus:
    train: np.ndarray          # uint8 bytes, files joined by a NUL separator
    val: np.ndarray
    train_files: list[str]
    val_files: list[str]


def load_corpus(root: str | Path | None = None, val_fraction: float = 0.05) -> Corpus:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, val, tf, vf = [], [], [], []
    for p in stdlib_files(root):
        rel = p.relative_to(root).as_posix()
        data = p.read_bytes() + b"\0"
        if is_validation(rel, val_fraction):
            val.append(data); vf.append(rel)
        else:
            train.append(data); tf.append(rel)
    if not train or not val:
        raise FileNotFoundError(f"no standard-library sources under {root}")
    as_array = lambda chunks: np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    return Corpus(as_array(train), as_array(val), tf, vf)


def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    """Endless random windows: (inputs, targets) int64 arrays of shape [batch, seq]."""
    while True:
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        x = np.stack([data[s:s + seq] for s in starts]).astype(np.int64)
        y = np.stack([data[s + 1:s + seq + 1] for s in starts]).astype(np.int64)
        yield x, y
