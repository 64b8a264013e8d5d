"""The DRAM row cache: policies over slots, the cached tier, the prefetcher."""

from __future__ import annotations

from tiermem.cache.cache import CacheConfig, CachedTier, PrefetchCounters
from tiermem.cache.policy import (
    AccessResult,
    CachePolicy,
    CacheStats,
    ClockPolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    Policy,
    S3FIFOPolicy,
    StaticPolicy,
    hot_keys,
    make_policy,
)
from tiermem.cache.prefetch import PrefetchConfig, Prefetcher

__all__ = [
    "AccessResult",
    "CacheConfig",
    "CachedTier",
    "PrefetchConfig",
    "PrefetchCounters",
    "Prefetcher",
    "CachePolicy",
    "CacheStats",
    "ClockPolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "Policy",
    "S3FIFOPolicy",
    "StaticPolicy",
    "hot_keys",
    "make_policy",
]
