"""The decoding schemes of DESIGN §2. All three run the same protocol (`spdsim.protocol.SpdController`)
through the same first-device process (`spdsim.schemes.spd`); they differ in the window and in drafting:

  ar   one stage on one device, window 1: plain autoregressive decoding
  pp   n stages, window 1: one token in flight, stage 1 waits a full round trip per token
  spd  n stages, window n, the speculative module drafts each next token (n = 1 is AR)

Schemes with their own process (`simulate` set) run outside that first-device process:
  spd_dedicated  the authors' layout: n + 1 ranks in synchronous cycles (`spdsim.protocol.CycleController`)
  sd             classic draft-model speculative decoding, on one device or on the pipeline
  chain          EAGLE-style chain drafting on one device, per-position acceptance table
"""
from __future__ import annotations

from spdsim.schemes.ar import AR
from spdsim.schemes.base import Scheme
from spdsim.schemes.pp import PP
from spdsim.schemes.spd import SPD
from spdsim.schemes.spd_dedicated import SPD_DEDICATED
from spdsim.schemes.sd import SD
from spdsim.schemes.chain import CHAIN

SCHEMES: dict[str, Scheme] = {s.name: s for s in (AR, PP, SPD, SPD_DEDICATED, SD, CHAIN)}
