"""The feature window a feature-using drafter sees (the contract the trained head relies on): before
drafting for q+1 it has exactly the hidden states at depth min(q-j, n) of each position j ≤ q, each
equal to the model's own hidden state there, with rejected positions rolled back. Runs the real
pipeline code with its socket transport, one thread per rank, in this process."""
import threading
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")

from executor.drafters import Drafter
from executor.model import Stage, greedy_decode, uniform_partition
from executor.checkpoints import load_checkpoint
from executor.pipeline import Job, Worker
from executor.transport import SocketTransport
from executor_helpers import PROMPT, small_model


class CheckingDrafter(Drafter):
    """Drafts the true token except every third draft; checks the feature window on every draft."""
    needs_features = True

    def __init__(self, reference, n):
        self.reference, self.n, self.calls, self.errors = reference, n, 0, []
        self.feats: dict[tuple[int, int], torch.Tensor] = {}
        self.fresh: list[tuple[int, int]] = []

    def start(self, prompt_tokens, features):
        self.P = len(prompt_tokens)
        assert sorted(features) == list(range(self.n + 1))
        for d, h in features.items():
            assert h.shape[0] == self.P - 1
            for j in range(self.P - 1):
                self.feats[(d, j)] = h[j]

    def add_features(self, depth, position, hidden):
        if (depth, position) in self.feats:
            self.errors.append(f"feature {(depth, position)} given twice")
        self.feats[(depth, position)] = hidden
        self.fresh.append((depth, position))

    def draft(self, position, token):
        q = position
        # nothing given early: depth d of position j arrives only for a draft with q ≥ j + d ...
        early = [(d, j) for d, j in self.fresh if j >= self.P - 1 and d + j > q]
        if early:
            self.errors.append(f"draft for {q + 1}: given too early {early}")
        self.fresh = []
        # ... and nothing missing: at least depth min(q-j, n) of every decode position j ≤ q (deeper
        # ones stay after a flush: a re-issue does not take back features of committed positions)
        deepest = {}
        for d, j in self.feats:
            deepest[j] = max(deepest.get(j, -1), d)
        short = [j for j in range(self.P - 1, q + 1) if deepest.get(j, -1) < min(q - j, self.n)]
        if short or max(deepest) != q:
            self.errors.append(f"draft for {q + 1}: positions {short} lack features (have up to {max(deepest)})")
        self.calls += 1
        true = self.reference[q + 1 - self.P]
        return true if self.calls % 3 else (true + 1) % 256

    def rollback(self, position):
        self.feats = {k: v for k, v in self.feats.items() if k[1] < position}


@pytest.mark.parametrize("n", [2, 3])
def test_feature_window_and_values(tmp_path, n):
    ckpt = small_model(tmp_path)
    N = 14
    reference = greedy_decode(load_checkpoint(ckpt), PROMPT, N)
    store = torch.distributed.TCPStore("127.0.0.1", 0, n, is_master=True, timeout=timedelta(seconds=30),
                                      wait_for_workers=False)
    port = store.port
    drafter = CheckingDrafter(reference, n)
    parts = uniform_partition(8, n)
    out, errors = {}, []

    def rank(r):
        try:
            st = store if r == 0 else torch.distributed.TCPStore("127.0.0.1", port, n, is_master=False)
            model = load_checkpoint(ckpt)
            tr = SocketTransport(r, n, st, timeout=30)
            w = Worker(r, n, model, Stage(model, *parts[r]), tr, 30.0, torch.device("cpu"))
            if r == 0:
                out["res"] = w.lead(Job("spd", PROMPT, N), 30.0, drafter=drafter)
                w.shutdown()
            else:
                w.serve(30.0)
            tr.close()
        except Exception as e:        # surface failures of any rank in the test
            errors.append(repr(e))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    res = out["res"]
    assert res.tokens == reference
    assert 0 in res.accepts and 1 in res.accepts
    assert not drafter.errors, drafter.errors[:3]
    # every feature the drafter holds at the end is the model's own hidden state at that depth
    model = load_checkpoint(ckpt)
    with torch.no_grad():
        _, hidden = model(torch.tensor([PROMPT + reference]), return_hidden=True)
    layer_of_depth = [0] + [b for _, b in parts]
    assert len(drafter.feats) > 3 * N
    for (d, j), h in drafter.feats.items():
        assert torch.allclose(h, hidden[layer_of_depth[d]][0, j], atol=1e-4), (d, j)
