"""Compilation flags shared by every Numba kernel.

Only ``tiermem.kernels`` imports numba; every ``@njit`` there takes its flags
from here so that a test can check they are used consistently.
"""

from __future__ import annotations

import os
from typing import TypedDict

import numba

#: fastmath stays off: sums must match torch's EmbeddingBag order-for-order.
FASTMATH = False
#: on-disk cache of compiled kernels (``__pycache__`` next to the module).
CACHE = os.environ.get("TIERMEM_NUMBA_CACHE", "1") != "0"

# The default workqueue layer aborts when two Python threads launch parallel
# kernels at once; the runtime does exactly that (pipeline, service threads).
# (numba.config's settings are module globals set from the environment at import: its
# stubs do not list them)
if numba.config.THREADING_LAYER == "default":  # type: ignore[attr-defined]
    numba.config.THREADING_LAYER = "threadsafe"  # type: ignore[attr-defined]

#: NUMBA_DISABLE_JIT=1: every ``@njit`` function runs as plain Python (the kernels' logic
#: under a Python debugger and coverage); the intrinsics use their Python stand-ins
JIT_DISABLED = bool(numba.config.DISABLE_JIT)  # type: ignore[attr-defined]


class JitFlags(TypedDict, total=False):
    """The ``njit`` keywords a flag set holds (typed, so mypy checks them against njit's)."""

    nogil: bool
    cache: bool
    fastmath: bool
    boundscheck: bool
    parallel: bool


SERIAL: JitFlags = {"nogil": True, "cache": CACHE, "fastmath": FASTMATH, "boundscheck": False}
PARALLEL: JitFlags = {**SERIAL, "parallel": True}
#: for short request-sized checks that run on a serving event loop: a nogil call gives
#: the GIL away, and taking it back waits behind the batch workers (measured: a 22 us
#: decode took 530 us on the loop of a busy server). Holding it for microseconds is cheaper.
HOLD_GIL: JitFlags = {**SERIAL, "nogil": False}
