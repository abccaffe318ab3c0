"""Shared by the executor tests: a small random model saved to a temp dir (tests never need the
trained checkpoint), and the AR greedy reference."""
from __future__ import annotations

from pathlib import Path

PROMPT = list(b"import os\ndef f(x):\n    return ")
REFERENCE_TOKENS = 16


def small_model(path: Path, layers: int = 8, seed: int = 1) -> Path:
    from executor.model import ModelConfig, Transformer
    from executor.checkpoints import save_checkpoint
    cfg = ModelConfig(vocab_size=256, n_layers=layers, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)
    ckpt = path / "small.safetensors"
    if not ckpt.exists():
        save_checkpoint(Transformer(cfg).init_weights(seed), ckpt)
    return ckpt


def reference(ckpt: Path, prompt: list[int], new_tokens: int) -> list[int]:
    from executor.model import greedy_decode
    from executor.checkpoints import load_checkpoint
    return greedy_decode(load_checkpoint(ckpt), prompt, new_tokens)
