"""One shard: the pieces a plan gives it, served by its own tier, cache and prefetcher.

:class:`EmbeddingShard` is a plain class so it can be run and tested in one
process; the sharded runtime starts it as a Ray actor (``ray.remote``), one
process per shard. The shard sees its pieces as tables of a store *view*
(row windows over the store's files, :meth:`tiermem.format.StoreInfo.view`),
so a row range is served exactly like a whole table and nothing is copied.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.distributed.plan import ShardPlan
from runtime.distributed.routing import Router
from tiermem.batch import CheckedFeatures
from tiermem.config import PoolingMode
from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures
from tiermem.format import open_store
from tiermem.kernels import threads as kernel_threads
from tiermem.metrics import TierMetrics
from tiermem.stack import open_stack

__all__ = ["EmbeddingShard"]


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class EmbeddingShard:
    """Serves the pooled embeddings of one shard's pieces.

    ``plan`` is a :class:`ShardPlan` or its dict; ``config`` a
    :class:`runtime.session.RuntimeConfig` or its dict (tier, cache, prefetch,
    threads). Pieces are named as in :attr:`Piece.name`; requests list their
    ids piece by piece in the plan's order for this shard.
    """

    def __init__(self, store: str | os.PathLike[str], plan: ShardPlan | Mapping[str, Any],
                 shard: int, config: Any = None, table_names: Sequence[str] | None = None
                 ) -> None:
        from runtime.session import RuntimeConfig

        t0 = time.perf_counter()
        self.plan = plan if isinstance(plan, ShardPlan) else ShardPlan.from_dict(plan)
        if not 0 <= shard < self.plan.num_shards:
            raise ConfigError(f"shard {shard} is not in the plan's 0..{self.plan.num_shards - 1}")
        self.shard = shard
        if config is None:
            config = RuntimeConfig()
        elif isinstance(config, Mapping):
            config = RuntimeConfig.from_dict(config)
        self.config = config
        info = open_store(store)
        self.plan.check_store(info)
        # with the model's table order the shard can cut its own part of a whole batch;
        # it then serves only the model's tables (the plan may place more), as the
        # driver's router, which lists pieces the same way, expects
        self.router = Router(self.plan, list(table_names)) if table_names is not None else None
        self.pieces = (self.router.pieces_of(shard) if self.router is not None
                       else self.plan.shard_pieces(shard))
        self.keys = tuple(p.name for p in self.pieces)
        self._split = np.array([p.name != p.table for p in self.pieces])
        self.tier = None
        self.prefetcher = None
        if self.pieces:
            view = info.view([(p.name, p.table, p.row_start, p.row_stop) for p in self.pieces])
            stack = open_stack(view, tier=config.tier, cache=config.cache,
                               prefetch=config.prefetch)
            tier = stack.tier
            self.prefetcher = stack.prefetcher
            self.tier = tier
            self._piece_rows = [tier.tables[tier.table_index(k)].spec.rows for k in self.keys]
            # compile the batch path here, inside the start-up timeout, not in the first
            # request's (an empty batch changes no state)
            empty = np.zeros(0, np.int64)
            tier.pool(SparseFeatures.from_lengths(self.keys, empty, empty))
        self.started = time.time()
        self.open_seconds = time.perf_counter() - t0
        self.requests = 0
        self.lookups = 0
        self.busy_seconds = 0.0
        """Wall time spent pooling (from the request's arrival in the actor to its result)."""
        self._in_flight: dict[int, float] = {}
        self._count_lock = threading.Lock()
        self.last_request_seconds = 0.0

    # -- serving -----------------------------------------------------------
    def _features(self, values: np.ndarray, lengths: np.ndarray,
                  weights: np.ndarray | None) -> CheckedFeatures:
        """The shard's part of a batch, trusted: the driver checked every id once
        (``ShardedSession.check``) and its router cut the part, so ids lie within the
        pieces by construction; no second pass here."""
        offsets = np.zeros(lengths.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        f = SparseFeatures.trusted(self.keys, np.ascontiguousarray(values, np.int64), offsets,
                                   None if weights is None
                                   else np.ascontiguousarray(weights, np.float32))
        return CheckedFeatures.routed(f, self._piece_rows)

    def pool(self, values: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None,
             mode: str = "sum") -> np.ndarray:
        """``(B, pieces * dim)`` float32: per piece, the bag sums (or means of whole tables).

        Row-split pieces are always summed: the router divides a split table's
        mean by the whole bag's length after adding its pieces.
        """
        if self.tier is None:
            raise ConfigError(f"shard {self.shard} holds no pieces")
        t0 = time.perf_counter()
        key = threading.get_ident()
        self._in_flight[key] = t0
        try:
            return self._pool(values, lengths, weights, mode, t0)
        finally:
            self._in_flight.pop(key, None)

    def _pool(self, values: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None,
              mode: str, t0: float) -> np.ndarray:
        assert self.tier is not None
        mode = PoolingMode.parse(mode)
        f = self._features(values, lengths, weights)
        with kernel_threads(self.config.num_threads):
            if mode is PoolingMode.MEAN and self._split.any():
                out = self._pool_mixed(f)
            else:
                out = self.tier.pool(f, mode=mode)
        with self._count_lock:
            self.requests += 1
            self.lookups += int(f.values.size)
            self.last_request_seconds = time.perf_counter() - t0
            self.busy_seconds += self.last_request_seconds
        return out

    def pool_batch(self, batch: tuple[Any, ...]) -> np.ndarray:
        """Pool this shard's part of a whole batch (the broadcast transport).

        ``batch`` = ``(values, offsets, weights, mode, hints)`` of the model's
        tables in order, ids already validated by the driver; ``hints`` lists
        ``(values, offsets)`` of batches coming next, handed to the prefetcher.
        """
        if self.router is None:
            raise ConfigError(f"shard {self.shard} was started without the model's table "
                              "names: it cannot cut its part of a batch")
        values, offsets, weights, mode, hints = batch
        keys = self.router.table_names
        if self.prefetcher is not None:
            for hv, ho in hints:
                r = self.router.request_for(SparseFeatures(keys, hv, ho), self.shard)
                self.prefetcher.submit(self._features(r.values, r.lengths, None))
        r = self.router.request_for(SparseFeatures(keys, values, offsets, weights), self.shard)
        return self.pool(r.values, r.lengths, r.weights, mode)

    def _pool_mixed(self, f: SparseFeatures) -> np.ndarray:
        assert self.tier is not None
        dims = [self.plan.tables[p.table].dim for p in self.pieces]
        col = np.concatenate([[0], np.cumsum(dims)])
        out = np.empty((f.batch_size, int(col[-1])), np.float32)
        for split, mode in ((True, PoolingMode.SUM), (False, PoolingMode.MEAN)):
            pos = np.flatnonzero(self._split == split)
            if pos.size == 0:
                continue
            part = self.tier.pool(f.select([self.keys[p] for p in pos]), mode=mode)
            c = 0
            for p in pos:
                out[:, col[p]:col[p + 1]] = part[:, c:c + dims[p]]
                c += dims[p]
        return out

    def prefetch(self, values: np.ndarray, lengths: np.ndarray) -> bool:
        """Announce a batch that will come soon (lookahead): its misses are read ahead."""
        if self.prefetcher is None:
            return False
        self.prefetcher.submit(self._features(values, lengths, None))
        return True

    def warm(self, profile: Mapping[str, np.ndarray]) -> int:
        """Fill the cache from ids seen per piece name; rows loaded (0 without a cache)."""
        from tiermem.cache.cache import CachedTier

        return int(self.tier.warm(dict(profile))) if isinstance(self.tier, CachedTier) else 0

    # -- introspection -------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Who and what this shard is (answers once the store is open)."""
        now = time.perf_counter()
        return {"shard": self.shard, "pid": os.getpid(), "host": os.uname().nodename,
                "pieces": list(self.keys), "open_seconds": self.open_seconds,
                "started": self.started,
                "busy_seconds_now": max((now - t for t in list(self._in_flight.values())),
                                        default=0.0),
                "last_request_seconds": self.last_request_seconds}

    def cpu_seconds(self) -> float:
        return _cpu_seconds()

    def stats(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shard": self.shard, "pid": os.getpid(),
                             "requests": self.requests, "lookups": self.lookups,
                             "busy_seconds": self.busy_seconds,
                             "cpu_seconds": _cpu_seconds()}
        if self.tier is not None:
            d["tier"] = self.tier.stats.to_dict()
        from tiermem.cache.cache import CachedTier

        if isinstance(self.tier, CachedTier):
            d["cache"] = self.tier.cache_stats()
            d["cache_nbytes"] = int(self.tier.nbytes)
        if self.prefetcher is not None:
            d["prefetch_dropped_batches"] = self.prefetcher.dropped_batches
        return d

    def tier_metrics(self) -> TierMetrics:
        """This shard's tier figures, its pieces named by their tables (the driver adds
        the shards up)."""
        if self.tier is None:
            return TierMetrics.empty(self.config.tier.kind.value)
        table_of = {p.name: p.table for p in self.pieces}
        return TierMetrics.from_tier(self.tier, table_of=lambda n: table_of.get(n, n))

    def reset_stats(self) -> None:
        self.requests = 0
        self.lookups = 0
        self.busy_seconds = 0.0
        if self.tier is not None:
            self.tier.stats.reset()

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self.tier is not None:
            self.tier.close()
            self.tier = None
