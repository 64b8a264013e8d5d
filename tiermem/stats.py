"""Counters that every tier reports into, per table."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TableStats", "TierStats"]


@dataclass
class TableStats:
    """What one table's lookups cost."""

    lookups: int = 0
    """ids pooled."""
    rows_read: int = 0
    """rows fetched from the tier (after per-batch dedupe where the tier dedupes)."""
    bytes_read: int = 0
    """bytes fetched from the tier (whole merged reads for the SSD tier)."""
    read_ops: int = 0
    """I/O operations (SSD) or row accesses (CXL model)."""
    read_seconds: float = 0.0
    """wall time spent reading rows (SSD)."""
    modeled_delay_seconds: float = 0.0
    """CXL tier: time added by the latency/bandwidth model."""
    cache_hits: int = 0
    """cache: distinct rows of a batch found resident."""
    cache_misses: int = 0
    """cache: distinct rows of a batch not resident (read from the cold tier)."""
    hit_lookups: int = 0
    """cache: lookups whose row was resident."""

    @property
    def hit_rate(self) -> float:
        """Share of distinct rows per batch served from the cache."""
        n = self.cache_hits + self.cache_misses
        return self.cache_hits / n if n else 0.0

    def add(self, other: TableStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class TierStats:
    """Per-table counters of a tier, safe to update from several threads."""

    tables: dict[str, TableStats] = field(default_factory=dict)
    batches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _quiet: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    def record(self, batch: dict[str, TableStats]) -> None:
        if getattr(self._quiet, "on", False):  # a warm-up batch on this thread
            return
        with self._lock:
            self.batches += 1
            for name, s in batch.items():
                self.tables.setdefault(name, TableStats()).add(s)

    def total(self) -> TableStats:
        tot = TableStats()
        with self._lock:
            for s in self.tables.values():
                tot.add(s)
        return tot

    def reset(self) -> None:
        with self._lock:
            self.tables.clear()
            self.batches = 0

    @contextmanager
    def not_recorded(self) -> Iterator[None]:
        """Batches pooled by the calling thread meanwhile are not counted (a warm-up's);
        other threads' batches are."""
        prev = getattr(self._quiet, "on", False)
        self._quiet.on = True
        try:
            yield
        finally:
            self._quiet.on = prev

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"batches": self.batches,
                    "tables": {k: asdict(v) for k, v in self.tables.items()}}
