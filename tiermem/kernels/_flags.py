"""Compilation flags shared by every Numba kernel.

Only ``tiermem.kernels`` imports numba; every ``@njit`` there takes its flags
from here so that a test can check they are used consistently.
"""

from __future__ import annotations

import os

import numba

#: fastmath stays off: sums must match torch's EmbeddingBag order-for-order.
FASTMATH = False
#: on-disk cache of compiled kernels (``__pycache__`` next to the module).
CACHE = os.environ.get("TIERMEM_NUMBA_CACHE", "1") != "0"

# The default workqueue layer aborts when two Python threads launch parallel
# kernels at once; the runtime does exactly that (pipeline, service threads).
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "threadsafe"

SERIAL = {"nogil": True, "cache": CACHE, "fastmath": FASTMATH, "boundscheck": False}
PARALLEL = {**SERIAL, "parallel": True}
#: for short request-sized checks that run on a serving event loop: a nogil call gives
#: the GIL away, and taking it back waits behind the batch workers (measured: a 22 us
#: decode took 530 us on the loop of a busy server). Holding it for microseconds is cheaper.
HOLD_GIL = {**SERIAL, "nogil": False}
