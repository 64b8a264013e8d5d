"""A store's tier, the DRAM cache in front of it and the prefetcher feeding the cache: one
object that opens the three in order and closes them in reverse.

Whoever runs batches (the inference session, a shard, a trace replay) opens
one :class:`TierStack` instead of composing tier, cache and prefetcher and
getting the unwinding right each time::

    with open_stack(store, tier=TierConfig(kind="ssd"), cache=CacheConfig(...),
                    prefetch=PrefetchConfig(lookahead=2)) as stack:
        stack.prefetcher.submit(next_batch)
        pooled = stack.tier.pool(batch)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiermem.config import TierConfig
from tiermem.errors import ConfigError
from tiermem.format import StoreInfo, open_store
from tiermem.tiers import Tier, open_tier

if TYPE_CHECKING:
    from tiermem.cache.cache import CacheConfig, CachedTier
    from tiermem.cache.prefetch import PrefetchConfig, Prefetcher

__all__ = ["TierStack", "open_stack"]


@dataclass
class TierStack:
    """What :func:`open_stack` opened; it owns all of it."""

    tier: Tier
    """What batches are pooled through: the cache when there is one, else the cold tier."""
    cold: Tier
    """The tier that holds the tables (DRAM, SSD, CXL)."""
    cache: CachedTier | None = None
    """The cache (the same object as :attr:`tier`), or None."""
    prefetcher: Prefetcher | None = None
    """Reads ahead into the cache, or None."""

    def close(self) -> None:
        """The prefetcher (its thread stops reading), then the cache with the cold tier."""
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.tier.close()

    def __enter__(self) -> TierStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stack(store: StoreInfo | str | os.PathLike[str], *, tier: TierConfig | None = None,
               cache: CacheConfig | None = None,
               prefetch: PrefetchConfig | None = None) -> TierStack:
    """Open ``store``'s tier (``tier``), a cache in front (``cache``, or none) and a prefetcher
    (``prefetch``, or none; needs the cache). What a later step fails on, the earlier ones
    opened is closed before the error goes on."""
    if prefetch is not None and cache is None:
        raise ConfigError("prefetch needs a cache")
    info = store if isinstance(store, StoreInfo) else open_store(store)
    cold = open_tier(info, tier or TierConfig())
    top = cold
    try:
        cached = None
        if cache is not None:
            from tiermem.cache.cache import CachedTier

            top = cached = CachedTier(cold, cache)
        prefetcher = None
        if prefetch is not None:
            from tiermem.cache.prefetch import Prefetcher

            prefetcher = Prefetcher(cached, prefetch)  # type: ignore[arg-type]
    except BaseException:
        top.close()  # the cache closes the cold tier it holds
        raise
    return TierStack(top, cold, cached, prefetcher)
