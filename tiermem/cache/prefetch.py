"""Lookahead prefetcher: read the rows future batches will miss before they run.

The caller (a trace replay, a service queue) hands over the batches it will
run next with :meth:`Prefetcher.submit`. A background thread admits their
distinct rows through the policy (never evicting a row that a running batch
has pinned), reserving slots, then reads the rows from the cold tier with its
parallel pread path (tens of reads in flight, no GIL held). A batch that
arrives while its rows are still being read waits for them rather than
reading them twice.

Memory is bounded: at most ``max_pending`` batches wait, and a batch's rows
are staged only while they are being read. When the queue is full the
oldest waiting batch is dropped (counted), so a slow disk never blocks the
caller.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

from tiermem.cache.cache import CachedTier
from tiermem.config import ConfigDict
from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures
from tiermem.kernels.dedupe import dedupe_first

__all__ = ["Prefetcher", "PrefetchConfig"]


@dataclass(frozen=True)
class PrefetchConfig(ConfigDict):
    """How far ahead and how much the prefetcher may hold."""

    lookahead: int = 2
    """batches ahead of the one running that the caller submits."""
    max_pending: int = 8
    """batches waiting to be prefetched; the oldest is dropped beyond this."""

    def __post_init__(self) -> None:
        for name in ("lookahead", "max_pending"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"PrefetchConfig.{name} must be an integer >= 1, got {v!r}")


class Prefetcher:
    """Background reader of the rows upcoming batches will miss."""

    def __init__(self, tier: CachedTier, config: PrefetchConfig | None = None) -> None:
        if not isinstance(tier, CachedTier):
            raise ConfigError("the prefetcher needs a cached tier (a cache in front of SSD/CXL)")
        self.tier = tier
        self.config = config or PrefetchConfig()
        self._queue: collections.deque[SparseFeatures] = collections.deque()
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self.dropped_batches = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="tiermem-prefetch", daemon=True)
        self._thread.start()

    def submit(self, features: SparseFeatures) -> None:
        """Queue a batch that will run soon (validated ids assumed); never blocks."""
        with self._cv:
            if self._closed:
                raise RuntimeError("prefetcher is closed")
            if len(self._queue) >= self.config.max_pending:
                self._queue.popleft()
                self.dropped_batches += 1
            self._queue.append(features)
            self._cv.notify()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted batch was prefetched; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._closed)
                if self._closed and not self._queue:
                    return
                features = self._queue.popleft()
                self._busy = True
            try:
                self._prefetch(features)
            except BaseException as e:  # keep serving; the demand path reads what is missing
                self.errors.append(e)
                del self.errors[:-10]
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _prefetch(self, features: SparseFeatures) -> None:
        tier = self.tier
        for key, gids in tier.global_ids(features).items():
            uniq, _, _ = dedupe_first(gids)
            tier.prefetch_rows(key, uniq)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
