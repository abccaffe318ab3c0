"""`executor acceptance`: how often each drafter's greedy draft equals the target's greedy token, at
each pipeline depth n, on held-out standard-library files — the simulator's main input.

Offline and exact: each drafter's parallel forward shows every position at the depth the pipeline
would show it (tests/test_spec_head.py checks the speculative module against its step-by-step
drafter), so the figure is what `executor run --draft head:PATH` should measure on the same text.
Writes `acceptance.csv` (drafter, stages, acceptance, top5, n_tokens), `acceptance_vs_n.png`,
`head_timing.csv` and a per-n table scenarios can name (`scenarios/acceptance/<model>_head.yaml`).
For the serving policy `adaptive` (docs/serving.md) also `confidence.csv`: for the trained module, the
share of drafts and their acceptance per confidence bin (confidence = the draft's softmax probability),
and the same as a table `serving.adaptive.table` can name (`scenarios/acceptance/<model>_confidence.yaml`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from executor.data import load_corpus
from executor.model import Stage, Transformer, uniform_partition
from executor.drafter_modules import build_drafter, load_drafter, save_drafter
from executor.head_drafter import HeadDrafter
from executor.spec_head import HeadConfig, SpecHead, target_checkpoints
from executor.train_head import (TrainHeadConfig, resolve_target, shown, target_id, train_drafters,
                                 train_head_command)

DRAFTERS = ("spd", "k-ahead", "window", "early-exit", "early-exit-raw")


@dataclass
class Row:
    drafter: str
    stages: int
    acceptance: float
    top5: float
    n_tokens: int


def eval_windows(data: np.ndarray, n_windows: int, seq: int, seed: int = 1234) -> np.ndarray:
    """Fixed random windows [n_windows, seq] of held-out bytes."""
    starts = np.random.default_rng(seed).integers(0, len(data) - seq, size=n_windows)
    return np.stack([data[s:s + seq] for s in starts]).astype(np.int64)


CONFIDENCE_BINS = 10


def confidence_counts(logits: torch.Tensor, truth: torch.Tensor, bins: int = CONFIDENCE_BINS) -> np.ndarray:
    """[bins, 2]: per equal-width bin of the draft's confidence (its softmax probability), how many
    drafts fell there and how many of them were the target's greedy token."""
    conf, top = torch.softmax(logits.float(), -1).max(-1)
    b = torch.clamp((conf * bins).long(), max=bins - 1).flatten()
    hit = (top == truth).flatten().long()
    out = np.zeros((bins, 2), dtype=np.int64)
    out[:, 0] = torch.bincount(b, minlength=bins).numpy()
    out[:, 1] = torch.bincount(b, weights=hit.double(), minlength=bins).round().long().numpy()
    return out


@torch.no_grad()
def evaluate(target: Transformer, drafters: dict[tuple[str, int], torch.nn.Module], windows: np.ndarray,
             skip: int = 8, batch: int = 8, confidence: dict[int, np.ndarray] | None = None) -> list[Row]:
    """Greedy agreement with the target (and target token in the drafter's top 5) at positions ≥ skip of
    each window (the same tokens for every n: skip ≥ the largest n, so the k-ahead head has its input).
    `confidence` (a dict): filled with the trained module's confidence_counts per stage count."""
    hits = {k: [0, 0, 0] for k in drafters}
    for b in range(0, len(windows), batch):
        x = torch.from_numpy(windows[b:b + batch])
        t_logits, hidden = target(x, return_hidden=True)
        truth = t_logits[:, skip:].argmax(-1)
        for key, m in drafters.items():
            logits = m(target_checkpoints(hidden, m.cfg))[:, skip:]
            top5 = logits.topk(5, -1).indices
            if confidence is not None and key[0] == "spd":
                confidence[key[1]] = confidence.get(key[1], 0) + confidence_counts(logits, truth)
            hits[key][0] += int((top5[..., 0] == truth).sum())
            hits[key][1] += int((top5 == truth[..., None]).any(-1).sum())
            hits[key][2] += truth.numel()
    return [Row(kind, n, h[0] / h[2], h[1] / h[2], h[2]) for (kind, n), h in hits.items()]


def _drafter_path(kind: str, n: int, out: Path, heads: Path) -> Path:
    return heads / f"head_n{n}.safetensors" if kind == "spd" else out / "drafters" / f"{kind}_n{n}.safetensors"


def obtain_drafters(target: Transformer, target_path: Path, stages: list[int], out: Path, heads: Path,
                    tc: TrainHeadConfig, log=print, model_arg: str = "",
                    widths: dict[int, int] | None = None) -> dict[tuple[str, int], torch.nn.Module]:
    """Loads each drafter from its file when it was trained against this target with the same budget and
    shape; trains the missing ones in lockstep (same batches, same steps) and saves them. `widths`: the
    module width per n (default tc.width for all)."""
    found, missing = {}, []
    tid = target_id(target_path)
    for n in stages:
        for kind in DRAFTERS:
            hc = dataclasses.replace(tc, width=(widths or {}).get(n, tc.width)).head_config(target.cfg, kind, n)
            if kind == "early-exit-raw":                         # nothing to train
                found[(kind, n)] = build_drafter(hc, target).eval()
                continue
            path = _drafter_path(kind, n, out, heads)
            meta = json.loads(Path(str(path) + ".json").read_text()) if Path(str(path) + ".json").exists() else {}
            same = (meta.get("steps"), meta.get("seed"), meta.get("batch"), meta.get("seq")) == (tc.steps, tc.seed, tc.batch, tc.seq)
            # fields added since a file was written read as their defaults, which is what it was trained with
            if same and meta.get("target_id") == tid and "head" in meta and HeadConfig.from_json(meta["head"]) == hc:
                found[(kind, n)] = load_drafter(path)
                log(f"{kind} n={n}: {path}")
            else:
                missing.append(hc)
    if missing:
        log(f"training {len(missing)} drafters in lockstep, {tc.steps} steps of {tc.batch}×{tc.seq} bytes")
        for run in train_drafters(target, missing, tc, log):
            path = shown(_drafter_path(run.cfg.kind, run.cfg.stages, out, heads))
            save_drafter(run.module, path, {
                "target": str(target_path), "target_id": tid, "seed": tc.seed, "steps": tc.steps, "batch": tc.batch, "seq": tc.seq,
                "lr": tc.lr, "train_minutes": round(run.seconds / 60, 2),
                "final_train_kl": round(float(np.mean(run.losses[-25:])), 4),
                "command": train_head_command(dataclasses.replace(tc, stages=run.cfg.stages, width=run.cfg.width),
                                              run.cfg.kind, model_arg, path)})
            found[(run.cfg.kind, run.cfg.stages)] = load_drafter(path)     # evaluate what was saved (fp16)
    return found


@torch.no_grad()
def time_head(head: SpecHead, target: Transformer, context: int = 128, calls: int = 60) -> tuple[float, float]:
    """(median ms per drafter call, median ms of the slowest stage's forward of one token) at `context`,
    one thread. DESIGN §2: the module stays off the critical path while it is no slower than the slowest
    stage, the first (embedding + layers) or the last (layers + norm + LM head) of a uniform partition.
    The calls alternate (module, first stage, last stage, module, ...): on a noisy host timing one after
    the other put a slow spell on one side of the ratio (n = 8 ratios moved by ±0.3 between rounds)."""
    n = head.cfg.stages
    toks = torch.randint(0, target.cfg.vocab_size, (1, context + calls + 1), generator=torch.Generator().manual_seed(0))
    _, hidden = target(toks, return_hidden=True)
    ck = target_checkpoints(hidden, head.cfg)[0]
    dr = HeadDrafter(head, target)
    dr.start(toks[0, :context].tolist(), {c: ck[: context - 1, c] for c in range(n + 1)})
    parts = uniform_partition(target.cfg.n_layers, n)
    stages = []
    for first, last in dict.fromkeys([parts[0], parts[-1]]):
        stage = Stage(target, first, last)        # disjoint layers for n ≥ 2: each keeps its own cache
        inputs = toks if first == 0 else hidden[first]      # token ids, or the hidden state entering it
        stage.setup_cache()
        stage(inputs[:, :context], torch.arange(context))
        stages.append((stage, inputs, []))
    head_s = []
    for q in range(context - 1, context - 1 + calls):
        for d in range(1, n + 1):
            dr.add_features(d, q - d, ck[q - d, d])
        t = time.perf_counter()
        dr.draft(q, int(toks[0, q]))
        head_s.append(time.perf_counter() - t)
        for stage, inputs, st in stages:
            t = time.perf_counter()
            stage(inputs[:, q + 1:q + 2], torch.tensor([q + 1]))
            st.append(time.perf_counter() - t)
    target.setup_cache()          # the stages wrote into the shared layers' caches; leave them fresh
    return 1000 * float(np.median(head_s)), max(1000 * float(np.median(st)) for _, _, st in stages)


def confidence_bins(counts: np.ndarray) -> list[list[float]]:
    """[[low, high, share, acceptance], ...] per bin (empty bins: acceptance at the bin's middle)."""
    k, total = len(counts), max(1, int(counts[:, 0].sum()))
    return [[round(i / k, 4), round((i + 1) / k, 4), round(int(c) / total, 6),
             round(int(h) / int(c), 4) if c else round((i + 0.5) / k, 4)] for i, (c, h) in enumerate(counts)]


def write_confidence(confidence: dict[int, np.ndarray], out: Path, table: Path | None, model_label: str,
                     command: str) -> None:
    """confidence.csv, and the table `serving.adaptive.table` reads (kind spdsim-confidence)."""
    with open(out / "confidence.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["drafter", "stages", "low", "high", "share", "acceptance", "n_drafts"])
        for n in sorted(confidence):
            for (low, high, share, acc), (c, _) in zip(confidence_bins(confidence[n]), confidence[n]):
                w.writerow(["spd", n, low, high, share, acc, int(c)])
    if table is None:
        return
    path = table.with_name(f"{model_label}_confidence.yaml")
    lines = [f"# Acceptance of the trained SPD module for the {model_label} model by its confidence (the draft's",
             "# softmax probability): [low, high, share of drafts, acceptance] per bin, by stage count. Name it",
             "# under serving.adaptive.table (docs/serving.md).",
             f"# Written by `{command}`.",
             "kind: spdsim-confidence", f"model: {model_label}", "by_stages:"]
    for n in sorted(confidence):
        lines.append(f"  {n}:")
        lines += [f"    - [{low}, {high}, {share}, {acc}]" for low, high, share, acc in confidence_bins(confidence[n])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_outputs(rows: list[Row], timing: list[dict], out: Path, table: Path | None, model_label: str,
                  command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "acceptance.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["drafter", "stages", "acceptance", "top5", "n_tokens"])
        for r in rows:
            w.writerow([r.drafter, r.stages, f"{r.acceptance:.4f}", f"{r.top5:.4f}", r.n_tokens])
    if timing:
        with open(out / "head_timing.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(timing[0]))
            w.writeheader()
            w.writerows(timing)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r.drafter for r in rows):
        pts = sorted((r.stages, r.acceptance) for r in rows if r.drafter == kind)
        ax.plot(*zip(*pts), marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r.stages for r in rows}), [str(s) for s in sorted({r.stages for r in rows})])
    ax.set_xlabel("pipeline stages n")
    ax.set_ylabel("acceptance (greedy agreement)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{model_label}: acceptance vs pipeline depth (held-out files)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "acceptance_vs_n.png", dpi=120)
    plt.close(fig)
    if table is not None:
        spd = {r.stages: round(r.acceptance, 4) for r in rows if r.drafter == "spd"}
        table.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# Acceptance of the trained SPD speculative module (executor/weights/head_n*.safetensors) for",
                 f"# the {model_label} model: greedy agreement with the target on held-out files, by stage count.",
                 f"# Written by `{command}`; other drafters are in reports/acceptance/acceptance.csv.",
                 f"name: {model_label}_head", f"model: {model_label}", "drafter: spd", "by_stages:"]
        lines += [f"  {n}: {a}" for n, a in sorted(spd.items())]
        baselines = {}
        for r in rows:
            if r.drafter != "spd":
                baselines.setdefault(r.drafter, {})[r.stages] = round(r.acceptance, 4)
        lines.append("baselines:")
        for kind, by_n in baselines.items():
            lines.append(f"  {kind}: {{{', '.join(f'{n}: {a}' for n, a in sorted(by_n.items()))}}}")
        table.write_text("\n".join(lines) + "\n")


def acceptance_study(model: str, stages: list[int], out: Path, heads: Path, table: str | None, tc: TrainHeadConfig,
                     n_windows: int = 48, seq: int = 512, timing: bool = True, log=print,
                     widths: dict[int, int] | None = None) -> list[Row]:
    torch.set_num_threads(tc.threads)
    target, tpath = resolve_target(model)
    for n in stages:
        uniform_partition(target.cfg.n_layers, n)          # a ValueError for an impossible n, before training
    drafters = obtain_drafters(target, tpath, stages, out, heads, tc, log, model_arg=model or str(tpath), widths=widths)
    windows = eval_windows(load_corpus().val, n_windows, seq)
    confidence: dict[int, np.ndarray] = {}
    rows = evaluate(target, drafters, windows, skip=max(8, max(stages)), confidence=confidence)
    rows.sort(key=lambda r: (DRAFTERS.index(r.drafter), r.stages))
    times = []
    if timing:
        for n in stages:
            head_ms, stage_ms = time_head(drafters[("spd", n)], target)
            times.append({"stages": n, "head_ms_per_call": round(head_ms, 3), "stage_ms": round(stage_ms, 3),
                          "head_over_stage": round(head_ms / stage_ms, 3)})
            log(f"n={n}: module {head_ms:.3f} ms/call, slowest stage {stage_ms:.3f} ms")
    label = "tiny" if model == "tiny" else Path(model).stem
    width_arg = " ".join(str((widths or {}).get(n, tc.width)) for n in stages)
    command = (f"executor acceptance --model {model} --stages {' '.join(map(str, stages))} --steps {tc.steps} "
               f"--batch {tc.batch}" + (f" --width {width_arg}" if any((widths or {}).values()) or tc.width else "")
               + tc.shape_flags(with_width=False))
    table_path = None if table == "none" else Path(table or f"scenarios/acceptance/{label}_head.yaml")
    write_outputs(rows, times, out, table_path, label, command)
    write_confidence(confidence, out, table_path, label, command)
    log(f"{'drafter':<16}{'n':>3}{'acceptance':>12}{'top5':>8}{'tokens':>8}")
    for r in rows:
        log(f"{r.drafter:<16}{r.stages:>3}{r.acceptance:>12.4f}{r.top5:>8.4f}{r.n_tokens:>8}")
    return rows
