"""`executor acceptance`'s confidence table (for the serving policy `adaptive`): counted per bin of the
draft's softmax probability, and read back by the simulator's `serving.adaptive.table`."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from executor.acceptance import confidence_bins, confidence_counts, write_confidence  # noqa: E402
from spdsim.serving_config import load_confidence_file, mean_acceptance  # noqa: E402


def test_counts_per_confidence_bin(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, 16, generator=g) * 3
    truth = torch.randint(0, 16, (4, 50), generator=g)
    counts = confidence_counts(logits, truth)
    conf, top = torch.softmax(logits, -1).max(-1)
    assert counts[:, 0].sum() == truth.numel() and counts[:, 1].sum() == int((top == truth).sum())
    for i in range(10):            # by hand, bin by bin
        sel = (conf >= i / 10) & ((conf < (i + 1) / 10) if i < 9 else (conf <= 1))
        assert counts[i, 0] == int(sel.sum()) and counts[i, 1] == int(((top == truth) & sel).sum())
    bins = confidence_bins(counts)
    overall = float((top == truth).float().mean())
    assert sum(b[2] * b[3] for b in bins if b[2]) == pytest.approx(overall, abs=1e-3)
    table = tmp_path / "scenarios" / "acceptance" / "toy_head.yaml"
    write_confidence({2: counts, 4: counts}, tmp_path, table, "toy", "executor acceptance --model toy")
    assert (tmp_path / "confidence.csv").read_text().count("\n") == 1 + 2 * 10
    bins_all, by = load_confidence_file(table.with_name("toy_confidence.yaml"), "serving.adaptive.table")
    assert bins_all is None and set(by) == {2, 4}
    assert mean_acceptance(by[2]) == pytest.approx(overall, abs=2e-3)
    assert np.isclose(sum(b.share for b in by[4]), 1.0)
