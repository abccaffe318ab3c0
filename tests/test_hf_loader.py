"""The HF loader: tiny random checkpoints written in the HF layout load into a model whose logits equal
the directly built one's (Llama, Mistral, Qwen2 with q/k/v biases, tied embeddings, GQA)."""
import json

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn

from executor.hf_loader import hf_config, load_hf_checkpoint, our_name, save_hf_checkpoint
from executor.model import ModelConfig, Transformer
from executor.checkpoints import load_checkpoint


def _model(tie=False, bias=False, seed=0):
    cfg = ModelConfig(vocab_size=97, n_layers=3, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      max_seq_len=64, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=tie)
    model = Transformer(cfg).init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():     # norms are ones after init: make them matter
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        if bias:
            for layer in model.layers:
                for proj in ("wq", "wk", "wv"):
                    old = getattr(layer.attention, proj)
                    new = nn.Linear(old.in_features, old.out_features, bias=True)
                    new.weight.copy_(old.weight)
                    new.bias.copy_(0.5 * torch.randn(new.bias.shape, generator=g))
                    setattr(layer.attention, proj, new)
    return model.eval()


@pytest.mark.parametrize("kind,tie,bias", [("llama", False, False), ("mistral", False, False),
                                           ("qwen2", True, True), ("llama", True, False)])
def test_logits_equal_directly_built_model(tmp_path, kind, tie, bias):
    model = _model(tie=tie, bias=bias)
    save_hf_checkpoint(model, tmp_path, kind)
    if kind == "qwen2":
        names = json.loads((tmp_path / "config.json").read_text())
        assert names["model_type"] == "qwen2"
    loaded = load_checkpoint(tmp_path)          # a directory goes through the HF loader
    idx = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    assert loaded.cfg.n_kv_heads == 2 and loaded.cfg.tie_embeddings == tie
    if bias:
        assert loaded.layers[0].attention.wq.bias is not None
        assert torch.equal(loaded.layers[1].attention.wk.bias, model.layers[1].attention.wk.bias)


def test_biases_matter(tmp_path):
    """Guard against a loader that silently drops Qwen2's biases."""
    model = _model(bias=True)
    idx = torch.arange(10)[None]
    with torch.no_grad():
        plain = _model(bias=False)(idx)
        assert not torch.allclose(model(idx), plain)


def test_name_mapping_and_bad_configs():
    assert our_name("model.layers.7.mlp.gate_proj.weight") == "layers.7.feed_forward.w1.weight"
    assert our_name("model.layers.0.self_attn.q_proj.bias") == "layers.0.attention.wq.bias"
    assert our_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ValueError, match="unexpected"):
        our_name("model.layers.0.block_sparse_moe.gate.weight")
    base = {"model_type": "llama", "vocab_size": 10, "num_hidden_layers": 2, "hidden_size": 16,
            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 100000}
    assert hf_config(base).max_seq_len == 2048            # the preallocated cache is capped
    assert hf_config(base).n_kv_heads == 2
    with pytest.raises(ValueError, match="model_type"):
        hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_scaling"):
        hf_config({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert hf_config({**base, "model_type": "mistral", "sliding_window": 512}).max_seq_len == 512


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_hf_checkpoint(tmp_path)
