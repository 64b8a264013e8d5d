"""Numba kernels. The only package of tiermem that imports numba."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numba

__all__ = ["KernelCensus", "current_threads", "kernel_cache_dir", "kernel_census", "max_threads",
           "resolve_threads", "threads"]

#: the modules whose ``@njit`` functions make up tiermem's kernels
_MODULES = ("dedupe", "jagged", "nextuse", "policies", "rowio", "sls", "validate")


@dataclass(frozen=True)
class KernelCensus:
    """How many kernel specialisations exist in this process, and where they came from."""

    signatures: int
    """compiled specialisations (one per kernel and argument types)."""
    compiled: int
    """of those, compiled in this process (not found in Numba's on-disk cache)."""
    loaded: int
    """of those, loaded from the on-disk cache."""

    def since(self, before: KernelCensus) -> KernelCensus:
        return KernelCensus(self.signatures - before.signatures,
                            self.compiled - before.compiled, self.loaded - before.loaded)


def kernel_cache_dir() -> str:
    """Where Numba keeps the compiled kernels: the folder its cache locator chose
    (``NUMBA_CACHE_DIR``, ``__pycache__`` beside the sources, or a per-user folder when
    that one is not writable)."""
    from tiermem.kernels._flags import JIT_DISABLED
    from tiermem.kernels.rowio import dedupe_sorted

    if JIT_DISABLED:  # a plain function, no dispatcher: ask the locator for it directly
        from numba.core.caching import FunctionCache

        return str(FunctionCache(dedupe_sorted).cache_path)
    return str(dedupe_sorted.stats.cache_path)


def kernel_census() -> KernelCensus:
    """Count the specialisations of every kernel (a warm-up is complete when a run adds none)."""
    import importlib

    from numba.core.registry import CPUDispatcher

    sigs = compiled = loaded = 0
    for name in _MODULES:
        mod = importlib.import_module(f"{__name__}.{name}")
        for obj in vars(mod).values():
            if isinstance(obj, CPUDispatcher) and obj.__module__ == mod.__name__:
                sigs += len(obj.signatures)
                compiled += sum(obj.stats.cache_misses.values())
                loaded += sum(obj.stats.cache_hits.values())
    return KernelCensus(sigs, compiled, loaded)


def max_threads() -> int:
    """Most threads a parallel kernel can use (NUMBA_NUM_THREADS, the core count)."""
    # (set from the environment at import: numba.config's stubs do not list it)
    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


def current_threads() -> int:
    """Threads a parallel kernel started by the calling thread would use now."""
    from tiermem.kernels.sls import _num_threads

    return _num_threads()


def resolve_threads(n: int | str | None) -> int | None:
    """``n`` itself, or for ``"auto"`` the cores other processes leave idle now (at least
    one, at most :func:`max_threads`; see :mod:`tiermem.cpu`)."""
    if n == "auto":
        from tiermem.cpu import free_cores

        return free_cores().threads(cap=max_threads())
    return n  # type: ignore[return-value]


@contextmanager
def threads(n: int | str | None) -> Iterator[None]:
    """Run parallel kernels of the calling thread on ``n`` threads (None: unchanged;
    ``"auto"``: :func:`resolve_threads`).

    Numba's thread count is per calling thread, so this is safe to use from
    several threads at once. ``n`` is capped at :func:`max_threads`.
    """
    n = resolve_threads(n)
    if n is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), max_threads())))
    try:
        yield
    finally:
        numba.set_num_threads(old)
