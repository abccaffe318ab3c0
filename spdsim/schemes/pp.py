"""PP: the pipeline without speculation. Window 1: position q+1 is issued only once the RESULT of q
(the true token) is back at stage 1, so every token pays the full round trip, RESULT link included,
and n - 1 stages idle at any time: bubble ratio (n-1)/n with free links."""
from __future__ import annotations

from spdsim.schemes.base import Scheme


def _one(n: int) -> int:
    return 1


PP = Scheme("pp", window=_one, drafts=False)
