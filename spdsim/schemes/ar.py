"""AR: the whole model on one device, one token at a time (window 1, no drafting).

The sweep gives AR a one-stage plan (every layer, embedding and LM head on gpu0); its RESULT stays on
the device, so each token costs exactly one full forward."""
from __future__ import annotations

from spdsim.schemes.base import Scheme


def _one(n: int) -> int:
    return 1


AR = Scheme("ar", window=_one, drafts=False, single_device=True)
