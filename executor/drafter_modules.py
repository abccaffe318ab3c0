"""Every trainable drafter module by kind — the speculative module (`spd`, and its `window` variant) and
the study's baselines (`k-ahead`, `early-exit`, `early-exit-raw`) — and their files: `<path>`
(safetensors, fp16) + `<path>.json` (config and the command that trained it)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from executor.head_baselines import EarlyExitHead, KAheadHead
from executor.model import Transformer
from executor.spec_head import HeadConfig, SpecHead


def build_drafter(cfg: HeadConfig, target: Transformer | None = None, seed: int = 0) -> nn.Module:
    cls = {"spd": SpecHead, "window": SpecHead, "k-ahead": KAheadHead,
           "early-exit": EarlyExitHead, "early-exit-raw": EarlyExitHead}[cfg.kind]
    return cls(cfg, target, seed)


def save_drafter(module: nn.Module, path: str | Path, meta: dict | None = None) -> None:
    """`<path>` (safetensors, fp16: the committed heads stay small) + `<path>.json` (config, metadata)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    Path(str(path) + ".json").write_text(json.dumps({"head": module.cfg.to_json(), **(meta or {})}, indent=2))


def load_drafter(path: str | Path) -> nn.Module:
    from safetensors.torch import load_file
    path = Path(path)
    meta_path = Path(str(path) + ".json")
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"{path}: no such speculative module (expected {path} and {meta_path})")
    cfg = HeadConfig.from_json(json.loads(meta_path.read_text())["head"])
    module = build_drafter(cfg)
    try:
        module.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    except RuntimeError as e:      # a module saved by another version of this code
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ValueError(f"{path}: its weights do not fit this version of the {cfg.kind} module ({first}); "
                         f"retrain it with the command in {meta_path.name}") from None
    return module.eval()
