"""Checkpoints on disk: our own format (safetensors + a JSON config) and, through `executor.hf_loader`,
Hugging Face directories. A loader imports the model; the model never imports a loader."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from executor.hf_loader import hf_config, load_hf_checkpoint, our_name
from executor.model import ModelConfig, Transformer


def save_checkpoint(model: Transformer, path: str | Path, meta: dict | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Our own format: `<path>` (safetensors) + `<path>.json` (config and training metadata).
    `dtype` stores the tensors in another precision (bf16 halves the shipped file); loading upcasts."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("output.weight", None)
    save_file(state, str(path))
    Path(str(path) + ".json").write_text(json.dumps({"config": model.cfg.to_json(), **(meta or {})}, indent=2))


def load_checkpoint(path: str | Path) -> Transformer:
    """Loads a checkpoint written by `save_checkpoint`, or a Hugging Face directory (config.json +
    *.safetensors, Llama / Qwen2 / Mistral names). Never unpickles anything."""
    path = Path(path)
    if path.is_dir():
        return load_hf_checkpoint(path)
    from safetensors.torch import load_file
    meta_path = Path(str(path) + ".json")
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (expected {path} and {meta_path})")
    cfg = ModelConfig.from_json(json.loads(meta_path.read_text())["config"])
    model = Transformer(cfg)
    state = {k: v.float() for k, v in load_file(str(path)).items()}   # shipped weights may be bf16
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    return model.eval()



def checkpoint_index(path: str | Path, max_seq_len: int = 2048) -> tuple[ModelConfig, dict[str, tuple[str, str]]]:
    """The config of a checkpoint (ours or a HF directory) and where each of our tensor names lives:
    name → (safetensors file, key in it). Reads headers only, no tensor: a TP rank then reads its own
    slices (executor/tp.py). With tied embeddings output.weight points at the embedding."""
    from safetensors import safe_open
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not (path / "config.json").exists() or not files:
            raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint (needs config.json and *.safetensors)")
        cfg = hf_config(json.loads((path / "config.json").read_text()), max_seq_len)
        index = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    name = our_name(key)
                    if name is not None:
                        index[name] = (str(f), key)
    else:
        meta_path = Path(str(path) + ".json")
        if not path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint (expected {path} and {meta_path})")
        cfg = ModelConfig.from_json(json.loads(meta_path.read_text())["config"])
        with safe_open(str(path), framework="pt") as st:
            index = {key: (str(path), key) for key in st.keys()}
    if cfg.tie_embeddings and "tok_embeddings.weight" in index:
        index["output.weight"] = index["tok_embeddings.weight"]
    return cfg, index
