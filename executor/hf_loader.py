"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into `executor.model.Transformer`.

Llama, Qwen2 and Mistral share one tensor layout; Qwen2 adds biases on the q/k/v projections. Both
use the "rotate halves" RoPE layout that `executor.model.apply_rope` implements, so the q/k weights load
as they are (no permutation). Only safetensors are read: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from executor.model import ModelConfig, Transformer

SUPPORTED = ("llama", "qwen2", "mistral")

# HF name (layer index as {i}) → our name. Biases appear only in Qwen2 (q/k/v).
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_config(obj: dict, max_seq_len: int = 2048) -> ModelConfig:
    """Our ModelConfig from a HF config.json dict; refuses what the decoder cannot reproduce exactly."""
    kind = obj.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"model_type {kind!r} is not supported (expected one of {SUPPORTED})")
    heads = obj["num_attention_heads"]
    dim = obj["hidden_size"]
    if obj.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"head_dim {obj['head_dim']} != hidden_size / heads: not supported")
    scaling = obj.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope_scaling {scaling} is not supported")
    if obj.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {obj['hidden_act']!r} is not supported (SwiGLU with silu only)")
    # The KV cache is preallocated: cap the context. A sliding window longer than the context is exact.
    seq = min(obj.get("max_position_embeddings", max_seq_len), max_seq_len)
    window = obj.get("sliding_window") if obj.get("use_sliding_window", kind == "mistral") else None
    if window:
        seq = min(seq, window)
    return ModelConfig(
        vocab_size=obj["vocab_size"], n_layers=obj["num_hidden_layers"], dim=dim, n_heads=heads,
        n_kv_heads=obj.get("num_key_value_heads") or heads, ffn_dim=obj["intermediate_size"],
        max_seq_len=seq, rope_theta=float(obj.get("rope_theta", 10000.0)),
        norm_eps=float(obj.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(obj.get("tie_word_embeddings", False)))


def our_name(hf_name: str) -> str | None:
    """Map one HF tensor name to ours; None for tensors we do not need (rotary inv_freq buffers)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"unexpected tensor {hf_name!r}")


def load_hf_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, max_seq_len: int = 2048) -> Transformer:
    from safetensors import safe_open
    path = Path(path)
    cfg_path = path / "config.json"
    files = sorted(path.glob("*.safetensors"))
    if not cfg_path.exists() or not files:
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint (needs config.json and *.safetensors)")
    cfg = hf_config(json.loads(cfg_path.read_text()), max_seq_len)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                name = our_name(key)
                if name is not None:
                    state[name] = st.get_tensor(key).to(dtype)
    model = Transformer(cfg)
    # Qwen2: q/k/v carry a bias. Swap in biased projections for the layers that have one.
    for i, layer in enumerate(model.layers):
        for proj in ("wq", "wk", "wv"):
            if f"layers.{i}.attention.{proj}.bias" in state:
                old = getattr(layer.attention, proj)
                setattr(layer.attention, proj, nn.Linear(old.in_features, old.out_features, bias=True))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(dtype).eval()


def save_hf_checkpoint(model: Transformer, path: str | Path, model_type: str = "llama") -> Path:
    """Write `model` in the HF layout (used by tests, and to hand our tiny model to HF tools)."""
    from safetensors.torch import save_file
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type {model_type!r} is not supported")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    inverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    state = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        if name in inverse_top:
            state[inverse_top[name]] = t.detach().contiguous()
            continue
        parts = name.split(".")            # layers.<i>.<module path>.<weight|bias>
        i, mod, kind = parts[1], ".".join(parts[2:-1]), parts[-1]
        state[f"model.layers.{i}.{inverse_layer[mod]}.{kind}"] = t.detach().contiguous()
    save_file(state, str(path / "model.safetensors"))
    config = {"model_type": model_type, "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                          "mistral": "MistralForCausalLM"}[model_type]],
              "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.dim,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
              "intermediate_size": cfg.ffn_dim, "max_position_embeddings": cfg.max_seq_len,
              "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
              "tie_word_embeddings": cfg.tie_embeddings}
    if model_type == "mistral":
        config["sliding_window"] = None
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
