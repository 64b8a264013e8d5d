"""Numba kernels. The only package of tiermem that imports numba."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba

__all__ = ["max_threads", "threads"]


def max_threads() -> int:
    """Most threads a parallel kernel can use (NUMBA_NUM_THREADS, the core count)."""
    return int(numba.config.NUMBA_NUM_THREADS)


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run parallel kernels of the calling thread on ``n`` threads (None: unchanged).

    Numba's thread count is per calling thread, so this is safe to use from
    several threads at once. ``n`` is capped at :func:`max_threads`.
    """
    if n is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), max_threads())))
    try:
        yield
    finally:
        numba.set_num_threads(old)
