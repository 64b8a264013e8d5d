"""What a tier has done, as one frozen value: :class:`TierMetrics`.

The serving layers (``/metrics``, Prometheus, ``predict --stats``) read this
one type whether the session runs one local tier or many shards: a shard
sends its own and the driver adds them up (``sum(parts, TierMetrics.empty())``).
Rates are derived from the counts, so a sum has the right rates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tiermem.stats import TableStats

__all__ = ["CacheMetrics", "TierMetrics"]


@dataclass(frozen=True)
class CacheMetrics:
    """The DRAM cache in front of a tier: its size and the prefetcher's counters."""

    nbytes: int = 0
    capacity_rows: int = 0
    resident_rows: int = 0
    prefetch: Mapping[str, int] = field(default_factory=dict)

    def __add__(self, other: CacheMetrics) -> CacheMetrics:
        pf: Counter[str] = Counter(self.prefetch)
        pf.update(other.prefetch)
        return CacheMetrics(self.nbytes + other.nbytes, self.capacity_rows + other.capacity_rows,
                            self.resident_rows + other.resident_rows, dict(pf))


@dataclass(frozen=True)
class TierMetrics:
    """Counters of a tier (or of the shards of one), per table and in total."""

    kind: str
    batches: int = 0
    """Batches pooled. Summed over shards it is the most any shard saw (a batch runs on
    every shard that holds one of its rows)."""
    tables: Mapping[str, TableStats] = field(default_factory=dict)
    """Per table (the pieces of a row-split table added up)."""
    cache: CacheMetrics | None = None
    shards: int = 1

    @classmethod
    def from_tier(cls, tier: Any, *, table_of: Callable[[str], str] | None = None
                  ) -> TierMetrics:
        """The metrics of ``tier`` now (a :class:`~tiermem.tiers.Tier`, cached or not);
        ``table_of`` maps the tier's table names to the model's (a shard's pieces)."""
        from tiermem.cache.cache import CachedTier

        cached = tier if isinstance(tier, CachedTier) else None
        kind = (cached.cold if cached is not None else tier).config.kind.value
        snap = tier.stats.to_dict()
        tables: dict[str, TableStats] = {}
        for name, counts in snap["tables"].items():
            key = table_of(name) if table_of is not None else name
            tables.setdefault(key, TableStats()).add(TableStats(**counts))
        cache = None
        if cached is not None:
            cs = cached.cache_stats()
            cache = CacheMetrics(
                nbytes=int(cached.nbytes),
                capacity_rows=int(cs.get("capacity_rows", 0)),
                resident_rows=int(sum(v.get("resident", 0) for v in cs.values()
                                      if isinstance(v, dict) and "resident" in v)),
                prefetch={k: int(v) for k, v in cs.get("prefetch", {}).items()})
        return cls(kind=kind, batches=int(snap["batches"]), tables=tables, cache=cache)

    @classmethod
    def empty(cls, kind: str = "") -> TierMetrics:
        """The zero of ``+`` (``shards=0``)."""
        return cls(kind=kind, shards=0)

    def __add__(self, other: TierMetrics) -> TierMetrics:
        if not isinstance(other, TierMetrics):
            return NotImplemented
        tables: dict[str, TableStats] = {}
        for part in (self.tables, other.tables):
            for k, v in part.items():
                tables.setdefault(k, TableStats()).add(v)
        kinds = {k for k in (self.kind, other.kind) if k}
        cache = self.cache if other.cache is None else (
            other.cache if self.cache is None else self.cache + other.cache)
        return TierMetrics(kind="+".join(sorted(kinds)), batches=max(self.batches, other.batches),
                           tables=tables, cache=cache, shards=self.shards + other.shards)

    def total(self) -> TableStats:
        tot = TableStats()
        for v in self.tables.values():
            tot.add(v)
        return tot

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``/metrics``'s ``tier`` (hit rates included)."""
        tot = self.total()
        out: dict[str, Any] = {
            "kind": self.kind, "batches": self.batches, "shards": self.shards,
            "lookups": tot.lookups, "rows_read": tot.rows_read, "bytes_read": tot.bytes_read,
            "read_ops": tot.read_ops, "read_seconds": tot.read_seconds,
            "bytes_read_per_table": {k: v.bytes_read for k, v in self.tables.items()},
            "tables": {k: asdict(v) for k, v in self.tables.items()},
            "cache": None,
        }
        if self.cache is not None:
            out["cache"] = {
                "hits": tot.cache_hits, "misses": tot.cache_misses, "hit_rate": tot.hit_rate,
                "lookup_hit_rate": tot.hit_lookups / tot.lookups if tot.lookups else 0.0,
                "nbytes": self.cache.nbytes, "capacity_rows": self.cache.capacity_rows,
                "resident_rows": self.cache.resident_rows, "prefetch": dict(self.cache.prefetch),
                "hit_rate_per_table": {k: v.hit_rate for k, v in self.tables.items()},
            }
        return out
