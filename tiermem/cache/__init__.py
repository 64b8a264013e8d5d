"""Cache replacement policies over slots (key -> slot index and eviction order)."""

from __future__ import annotations

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

__all__ = [
    "AccessResult",
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
