"""`executor train-head`: self-distillation of speculative modules (and the baselines) from a frozen target.

Every drafter sees the same batches: random windows of the standard-library training files, run through
the target once per step (`return_hidden`), and each drafter learns KL(target ‖ drafter) of the
next-token distribution at every position in parallel, under the depth rule of `executor.spec_head`.
Several drafters can train in lockstep on one target forward (`train_drafters`): the same data and the
same step budget for each by construction. Reproducible from a seed: a fixed step count, no time budget.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from executor.data import batches, load_corpus
from executor.model import Transformer
from executor.checkpoints import load_checkpoint
from executor.drafter_modules import build_drafter, save_drafter
from executor.spec_head import HeadConfig, target_checkpoints

DEFAULT_TINY = Path(__file__).parent / "weights" / "tiny.safetensors"


@dataclass
class TrainHeadConfig:
    stages: int
    kind: str = "spd"
    steps: int = 600
    batch: int = 4
    seq: int = 256
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1
    n_layers: int = 1
    width: int = 0                    # spd/window module width (0: the target's); narrower is cheaper per call
    query_window: bool = True         # spd/window modules: the query row also sums the window's rows
    proj: str = "level"               # spd/window input rows: "level" or "shared" (executor.spec_head)
    ffn_dim: int = -1                 # spd/window feed-forward size (-1: the target's ratio; 0: attention only)
    grad_checkpoint: bool = False     # recompute the variant attention in backward (multi-layer, long seq)

    def shape_flags(self, with_width: bool = True) -> str:
        """This budget's module-shape options as `train-head` flags (those off their defaults)."""
        d = TrainHeadConfig(stages=self.stages)
        flags = [f"--layers {self.n_layers}" if self.n_layers != d.n_layers else "",
                 f"--width {self.width}" if with_width and self.width else "",
                 f"--proj {self.proj}" if self.proj != d.proj else "",
                 f"--ffn-dim {self.ffn_dim}" if self.ffn_dim != d.ffn_dim else "",
                 ("--query-window" if self.query_window else "--no-query-window") if self.query_window != d.query_window else ""]
        return "".join(f" {f}" for f in flags if f)

    def head_config(self, target_cfg, kind: str, stages: int | None = None) -> HeadConfig:
        """The drafter this budget trains for `kind` (the size options apply to spd/window modules only)."""
        module = kind in ("spd", "window")
        width = (self.width or target_cfg.dim) if module else target_cfg.dim
        # by default the feed-forward keeps the target's width ratio (688 / 256 for the tiny model)
        ffn = round(width * target_cfg.ffn_dim / target_cfg.dim) if self.ffn_dim < 0 or not module else self.ffn_dim
        return HeadConfig.for_target(target_cfg, stages or self.stages, kind=kind, n_layers=self.n_layers,
                                     query_window=self.query_window and module, ffn_dim=ffn,
                                     proj=self.proj if module else "level",
                                     width=width if width != target_cfg.dim else 0)


def train_head_command(tc: TrainHeadConfig, kind: str, model: str | Path, out: str | Path) -> str:
    """The `executor train-head` command that retrains a drafter of `kind` with budget `tc` (recorded in
    its .json; tests/test_acceptance_study.py checks it rebuilds the same module)."""
    return (f"executor train-head --stages {tc.stages} --kind {kind} --model {model} --out {out} "
            f"--steps {tc.steps} --batch {tc.batch} --seed {tc.seed}" + tc.shape_flags())


def resolve_target(model: str | Path) -> tuple[Transformer, Path]:
    """`tiny` → the committed checkpoint; anything else is a checkpoint path."""
    path = DEFAULT_TINY if str(model) == "tiny" else Path(model)
    return load_checkpoint(path).eval(), shown(path)


def shown(path: Path) -> Path:
    """Relative to the working directory when inside it: metadata that does not name this machine."""
    try:
        return Path(path).resolve().relative_to(Path.cwd())
    except ValueError:
        return Path(path)


def target_id(path: Path) -> str:
    """A fingerprint of the target's weights: a drafter is only valid for the exact target it learned."""
    import hashlib
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def first_valid(cfg: HeadConfig) -> int:
    """Rows before this have no input for the drafter (k-ahead reads position q - n)."""
    return cfg.stages if cfg.kind == "k-ahead" else 0


def distill_loss(logits: torch.Tensor, target_logits: torch.Tensor, skip: int) -> torch.Tensor:
    """KL(target ‖ drafter), mean over positions ≥ skip."""
    lp = F.log_softmax(logits[:, skip:].float(), -1)
    lt = F.log_softmax(target_logits[:, skip:].float(), -1)
    return (lt.exp() * (lt - lp)).sum(-1).mean()


@dataclass
class _Run:
    cfg: HeadConfig
    module: torch.nn.Module
    opt: torch.optim.Optimizer | None
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)


def train_drafters(target: Transformer, heads: list[HeadConfig], tc: TrainHeadConfig, log=print) -> list[_Run]:
    """Trains each drafter in `heads` for tc.steps on the same batches; returns them with their stats."""
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    corpus = load_corpus()
    runs = []
    for hc in heads:
        m = build_drafter(hc, target, seed=tc.seed)   # alone or in lockstep: the same weights
        m.grad_checkpoint = tc.grad_checkpoint
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay) if params else None
        runs.append(_Run(hc, m.train(), opt))
    for p in target.parameters():
        p.requires_grad_(False)
    it = batches(corpus.train, tc.batch, tc.seq, np.random.default_rng(tc.seed))
    t0 = time.perf_counter()
    for step in range(tc.steps):
        lr = tc.lr * min(1.0, (step + 1) / tc.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / tc.steps)))
        x, _ = next(it)
        with torch.no_grad():
            t_logits, hidden = target(torch.from_numpy(x), return_hidden=True)
        for r in runs:
            if r.opt is None:
                continue
            t = time.perf_counter()
            skip = first_valid(r.cfg)
            logits = r.module(target_checkpoints(hidden, r.cfg))
            loss = distill_loss(logits, t_logits, skip)
            for g in r.opt.param_groups:
                g["lr"] = lr
            r.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(r.module.parameters(), 1.0)
            r.opt.step()
            r.seconds += time.perf_counter() - t
            r.losses.append(loss.item())
            r.accs.append((logits[:, skip:].argmax(-1) == t_logits[:, skip:].argmax(-1)).float().mean().item())
        if (step + 1) % 25 == 0 or step + 1 == tc.steps:
            stats = "  ".join(f"{r.cfg.kind}/n{r.cfg.stages} kl {np.mean(r.losses[-25:]):.3f} acc {np.mean(r.accs[-25:]):.3f}"
                              for r in runs if r.losses)
            log(f"step {step + 1}/{tc.steps}  {stats}  {(time.perf_counter() - t0) / 60:.1f} min")
    for r in runs:
        r.module.eval()
    return runs


def train_head(model: str | Path, out: Path, tc: TrainHeadConfig, log=print) -> dict:
    """`executor train-head`: one drafter, saved to `out` (+ .json with the command that made it)."""
    target, tpath = resolve_target(model)
    hc = tc.head_config(target.cfg, tc.kind)
    (run,) = train_drafters(target, [hc], tc, log)
    meta = {"target": str(tpath), "target_id": target_id(tpath), "seed": tc.seed, "steps": tc.steps, "batch": tc.batch, "seq": tc.seq, "lr": tc.lr,
            "train_minutes": round(run.seconds / 60, 2),
            "final_train_kl": round(float(np.mean(run.losses[-25:])), 4) if run.losses else None,
            "final_train_greedy_acc": round(float(np.mean(run.accs[-25:])), 4) if run.accs else None,
            "command": train_head_command(tc, tc.kind, model, out)}
    save_drafter(run.module, out, meta)
    log(f"saved {out}: {meta}")
    return meta
