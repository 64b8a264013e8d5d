"""Warm-up: compile (or load from Numba's on-disk cache) every kernel a tier's batches run.

Numba compiles a kernel on its first call with new argument types, which
takes seconds (the cache's batch kernel: ~30 s cold). A warm-up runs
synthetic batches of every shape a run will use through the real path
before anything is measured or served: one sample (the serial kernels), one
batch large enough for the parallel kernels, unweighted and weighted (a
separate specialisation), the cache's miss path and the prefetcher. A cache
is warmed through a small scratch copy of itself (the same kernels with the
same argument types) and the warm-up's own batches are not counted (batches
other threads serve meanwhile are), so the tier is left as it was: same
cache content, same statistics.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tiermem.batch import BoundsCheck
from tiermem.config import PoolingMode
from tiermem.errors import StoreError
from tiermem.features import SparseFeatures
from tiermem.kernels import kernel_census
from tiermem.kernels import threads as kernel_threads
from tiermem.kernels.sls import parallel_min_work
from tiermem.tiers.base import Tier

__all__ = ["default_batch_sizes", "synthetic_batch", "warm_tier"]


def default_batch_sizes(num_tables: int) -> tuple[int, int]:
    """One sample, and a batch of one id per bag past every parallel kernel's threshold
    (the SLS kernels' and the cache's parallel pass over a batch of hits)."""
    from tiermem.cache.cache import PARALLEL_RESOLVE_MIN

    most = 2 * max(parallel_min_work(), PARALLEL_RESOLVE_MIN)
    return 1, max(8, -(-most // max(num_tables, 1)))


def synthetic_batch(names: Sequence[str], rows: Sequence[int], batch_size: int, *,
                    weighted: bool, shift: int = 0) -> SparseFeatures:
    """One id per bag, distinct within each table where it has the rows (so a cache
    misses and evicts)."""
    ids = np.concatenate([(np.arange(batch_size, dtype=np.int64) + shift) % r for r in rows])
    offsets = np.arange(ids.size + 1, dtype=np.int64)
    w = np.ones(ids.size, np.float32) if weighted else None
    return SparseFeatures.from_offsets(list(names), ids, offsets, w)


def warm_tier(tier: Tier, *, names: Sequence[str] | None = None,
              pooling: PoolingMode | str = PoolingMode.SUM,
              bounds: BoundsCheck | str = BoundsCheck.FATAL,
              num_threads: int | None = None, weighted: bool = True,
              batch_sizes: Sequence[int] | None = None, prefetch: Any = None,
              on_pooled: Any = None) -> dict[str, Any]:
    """Run the warm-up batches through ``tier`` (the tables ``names``, default all).

    ``prefetch``: a :class:`~tiermem.cache.prefetch.PrefetchConfig` when a
    prefetcher will feed the cache. ``on_pooled(batch_size, pooled)`` is called
    with each batch's pooled rows (a session warms its MLPs there). Returns
    seconds taken and the kernel specialisations added (compiled now / loaded
    from the on-disk cache).
    """
    t0 = time.perf_counter()
    before = kernel_census()
    names = list(names) if names is not None else tier.names
    rows = [tier.tables[tier.table_index(n)].spec.rows for n in names]
    mode = PoolingMode.parse(pooling)
    sizes = tuple(batch_sizes) if batch_sizes is not None else default_batch_sizes(len(names))
    weight_modes = [False, True] if weighted and mode is PoolingMode.SUM else [False]
    from tiermem.cache.cache import CachedTier

    cold = tier.cold if isinstance(tier, CachedTier) else None
    scratch = tier.scratch_copy() if isinstance(tier, CachedTier) else None
    run_on = scratch if scratch is not None else tier
    # not counted: this thread's batches only (a service may serve others meanwhile)
    quiet = contextlib.ExitStack()
    for t in (tier, *([cold] if cold is not None else [])):
        quiet.enter_context(t.stats.not_recorded())
    try:
        for B in sizes:
            for w in weight_modes:
                f = synthetic_batch(names, rows, int(B), weighted=w)
                with kernel_threads(num_threads):
                    pooled = run_on.pool(f, mode=mode, bounds=bounds)
                if on_pooled is not None:
                    on_pooled(int(B), pooled)
        # the parallel thresholds hold per (dtype, width) group of tables: a group with
        # few of the tables gets a batch of its own past them
        groups: dict[Any, list[int]] = {}
        for j, n in enumerate(names):
            groups.setdefault(tier.group_key(tier.table_index(n)), []).append(j)
        if batch_sizes is None and len(groups) > 1:
            for members in groups.values():
                gb = default_batch_sizes(len(members))[1]
                if gb <= sizes[-1]:
                    continue
                for w in weight_modes:
                    f = synthetic_batch([names[j] for j in members],
                                        [rows[j] for j in members], gb, weighted=w)
                    with kernel_threads(num_threads):
                        run_on.pool(f, mode=mode, bounds=bounds)
        if scratch is not None and prefetch is not None:
            from tiermem.cache.prefetch import Prefetcher

            with Prefetcher(scratch, prefetch) as pf:
                pf.submit(synthetic_batch(names, rows, int(sizes[-1]), weighted=False,
                                          shift=1))
                if not pf.drain(timeout=600):
                    raise StoreError("warm-up: the prefetcher did not finish reading its "
                                     "batch within 600 s")
                if pf.errors:
                    raise pf.errors[-1]
    finally:
        quiet.close()
        if scratch is not None:
            scratch.close()
    added = kernel_census().since(before)
    return {"seconds": time.perf_counter() - t0, "kernels_added": added.signatures,
            "compiled": added.compiled, "loaded_from_cache": added.loaded}
