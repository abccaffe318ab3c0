"""`executor train-lm`: trains the built-in byte-level `tiny` model on the standard library's sources.

Reproducible from a seed: a fixed step count (not a time budget), so the same seed, corpus and thread
count give the same weights. fp32: bf16 autocast was ~15× slower than fp32 on this machine's CPU. Writes a
checkpoint every `--save-every` steps, so an interrupted run keeps what it learned."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from executor.data import batches, load_corpus
from executor.model import CONFIGS, Transformer
from executor.checkpoints import save_checkpoint


@dataclass
class TrainLMConfig:
    out: Path
    steps: int = 500
    schedule_steps: int | None = None   # length of the LR schedule; default `steps` (stop early on a longer one)
    seed: int = 0
    batch: int = 16
    seq: int = 256
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_batches: int = 40
    save_every: int = 200
    threads: int = 2


@torch.no_grad()
def evaluate(model: Transformer, data: np.ndarray, n_batches: int, batch: int, seq: int, seed: int = 1234) -> tuple[float, float]:
    """(loss in nats/byte, greedy next-byte accuracy) on fixed random windows of `data`."""
    model.eval()
    it = batches(data, batch, seq, np.random.default_rng(seed))
    losses, correct, total = [], 0, 0
    for _ in range(n_batches):
        x, y = (torch.from_numpy(a) for a in next(it))
        logits = model(x)
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
        correct += (logits.argmax(-1) == y).sum().item()
        total += y.numel()
    model.train()
    return float(np.mean(losses)), correct / total


def train_lm(cfg: TrainLMConfig, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    corpus = load_corpus()
    model = Transformer(CONFIGS["tiny"]).init_weights(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    it = batches(corpus.train, cfg.batch, cfg.seq, np.random.default_rng(cfg.seed))
    t_start = time.perf_counter()
    step, tokens = 0, 0
    meta: dict = {}

    def save() -> dict:
        # Shipped in bf16 (half the file); the figures recorded are those of the bf16-rounded weights.
        rounded = Transformer(model.cfg)
        rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
        val_loss, val_acc = evaluate(rounded, corpus.val, cfg.eval_batches, cfg.batch, cfg.seq)
        info = {"model": "tiny", "seed": cfg.seed, "steps": step, "train_tokens": tokens,
                "train_minutes": round((time.perf_counter() - t_start) / 60, 2),
                "val_loss_nats_per_byte": round(val_loss, 4), "val_greedy_next_byte_accuracy": round(val_acc, 4),
                "corpus": f"stdlib .py, {len(corpus.train_files)} train / {len(corpus.val_files)} validation files",
                "command": f"executor train-lm --steps {cfg.steps}"
                           + (f" --schedule-steps {cfg.schedule_steps}" if cfg.schedule_steps else "")
                           + f" --seed {cfg.seed} --threads {cfg.threads} --out {cfg.out}"}
        save_checkpoint(model, cfg.out, info, dtype=torch.bfloat16)
        log(f"step {step}: val loss {val_loss:.3f} nats/byte, greedy acc {val_acc:.3f} → saved {cfg.out}")
        return info

    model.train()
    while step < cfg.steps:
        # Warm-up, then cosine decay to a tenth of the peak.
        frac = step / (cfg.schedule_steps or cfg.steps)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = (torch.from_numpy(a) for a in next(it))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 25 == 0:
            elapsed = time.perf_counter() - t_start
            log(f"step {step}/{cfg.steps}  loss {loss.item():.3f}  lr {lr:.2e}  {tokens / elapsed:.0f} tok/s  "
                f"{elapsed / 60:.1f} min")
        if step % cfg.save_every == 0:
            meta = save()
    meta = save()
    return meta
