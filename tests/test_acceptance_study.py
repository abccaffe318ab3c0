"""`executor acceptance` reuses a drafter file only when it was trained for this target, budget and shape."""
from __future__ import annotations

import json
import shlex

import pytest
import torch

from executor.acceptance import obtain_drafters
from executor.cli import build_parser, train_head_config
from executor.model import ModelConfig, Transformer
from executor.checkpoints import save_checkpoint
from executor.spec_head import HeadConfig
from executor.train_head import TrainHeadConfig

TCFG = ModelConfig(vocab_size=256, n_layers=4, dim=32, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=64)


@pytest.fixture()
def target(tmp_path):
    model = Transformer(TCFG).init_weights(0).eval()
    path = tmp_path / "target.safetensors"
    save_checkpoint(model, path)
    return model, path


def test_drafters_are_reused_only_when_budget_and_shape_match(target, tmp_path):
    torch.set_num_threads(1)
    model, path = target
    tc = TrainHeadConfig(stages=2, steps=1, batch=1, seq=32)
    logs: list[str] = []
    first = obtain_drafters(model, path, [2], tmp_path / "out", tmp_path / "heads", tc, log=logs.append)
    assert any("training 4 drafters" in m for m in logs)                 # spd, k-ahead, window, early-exit
    meta = json.loads((tmp_path / "heads" / "head_n2.safetensors.json").read_text())
    assert meta["head"]["kind"] == "spd" and meta["steps"] == 1
    logs.clear()
    again = obtain_drafters(model, path, [2], tmp_path / "out", tmp_path / "heads", tc, log=logs.append)
    assert not any("training" in m for m in logs)
    assert set(again) == set(first)
    logs.clear()                                                          # a narrower module: spd and window only
    obtain_drafters(model, path, [2], tmp_path / "out", tmp_path / "heads", tc, log=logs.append, widths={2: 16})
    assert any("training 2 drafters" in m for m in logs)
    assert json.loads((tmp_path / "heads" / "head_n2.safetensors.json").read_text())["head"]["width"] == 16
    logs.clear()                                                          # another budget: everything again
    obtain_drafters(model, path, [2], tmp_path / "out", tmp_path / "heads",
                    TrainHeadConfig(stages=2, steps=2, batch=1, seq=32), log=logs.append, widths={2: 16})
    assert any("training 4 drafters" in m for m in logs)


def test_the_recorded_command_reproduces_the_module_and_older_files_still_match(target, tmp_path):
    torch.set_num_threads(1)
    model, path = target
    tc = TrainHeadConfig(stages=2, steps=1, batch=1, seq=32, proj="shared", ffn_dim=0, query_window=False)
    heads = tmp_path / "heads"
    obtain_drafters(model, path, [2], tmp_path / "out", heads, tc, log=lambda m: None, model_arg=str(path),
                    widths={2: 16})
    meta_path = heads / "head_n2.safetensors.json"
    meta = json.loads(meta_path.read_text())
    argv = shlex.split(meta["command"])
    assert argv[:2] == ["executor", "train-head"]
    args = build_parser().parse_args(argv[1:])
    assert train_head_config(args).head_config(model.cfg, args.kind) == HeadConfig.from_json(meta["head"])
    assert HeadConfig.from_json(meta["head"]).proj == "shared" and meta["head"]["ffn_dim"] == 0
    # a file written before a field existed was trained with that field's default: still reused
    plain = TrainHeadConfig(stages=2, steps=1, batch=1, seq=32)
    obtain_drafters(model, path, [2], tmp_path / "out", heads, plain, log=lambda m: None)
    meta = json.loads(meta_path.read_text())
    del meta["head"]["proj"]
    meta_path.write_text(json.dumps(meta))
    logs: list[str] = []
    obtain_drafters(model, path, [2], tmp_path / "out", heads, plain, log=logs.append)
    assert not any("training" in m for m in logs)


@pytest.mark.parametrize("name", ["head_n2", "head_n4", "head_n8", "head_n8_lean"])
def test_committed_modules_load_and_their_recorded_command_rebuilds_them(name):
    """Each committed module loads, and the command in its .json (how to retrain it) parses back to the
    shape it was trained with."""
    from pathlib import Path
    from executor.checkpoints import load_checkpoint
    from executor.drafter_modules import load_drafter
    weights = Path(__file__).resolve().parents[1] / "executor" / "weights"
    meta = json.loads((weights / f"{name}.safetensors.json").read_text())
    head = load_drafter(weights / f"{name}.safetensors")
    args = build_parser().parse_args(shlex.split(meta["command"])[1:])
    target = load_checkpoint(weights / "tiny.safetensors")
    assert train_head_config(args).head_config(target.cfg, args.kind) == head.cfg == HeadConfig.from_json(meta["head"])
    assert head.cfg.stages == args.stages
