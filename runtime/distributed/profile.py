"""What the placement planner knows of a workload: a trace profile.

A plan is only as good as its picture of the load. The planner needs, per
table, how many lookups a batch sends to it and - to split a table row-wise
with balanced ranges - how those lookups spread over the rows. A
:class:`TraceProfile` holds exactly that, measured from the first batches of
a trace:

``batch_size``
    mean samples per batch (the batches as the runtime will see them: re-cut
    the trace with ``batch_size=`` when serving uses another size);
per table (:class:`TableProfile`)
    mean lookups per batch, mean distinct ids per batch, mean pooling factor
    (lookups per sample), and the exact access histogram: the sorted distinct
    ids seen and their counts over all profiled batches (``np.unique`` of every
    profiled id). Range queries are two ``searchsorted`` on the cumulative
    counts, so the load of any row range ``[a, b)`` is exact and O(log n).

Expected lookups per batch in ``[a, b)`` are ``counts in [a, b) / batches``.
Expected *distinct* rows per batch in ``[a, b)`` (what a shard gathers from
memory) are estimated per id as ``1 - exp(-count / batches)`` (the chance a
Poisson stream with that rate touches the id in a batch), summed over the
range and scaled so that the whole table gives the measured distinct ids per
batch. That keeps the estimate additive over ranges (a split never invents
or loses distinct rows) and exact for the table as a whole.

Without a trace, :meth:`TraceProfile.uniform` assumes every row equally
likely (a plan then balances by size and by the pooling factors given).

Tables
------
``from_batches``/``from_trace`` profile the tables the trace names. Given
``table_rows`` (the store's tables), a trace table the store lacks is a
:class:`~tiermem.errors.ConfigError` naming it, and an id outside its table an
:class:`~tiermem.errors.InvalidBatchError` naming table, batch and id. A store
table the trace never names is **not looked up** by this workload: the
planner gives it zero load (:meth:`TraceProfile.align` adds it with an empty
histogram and lists it in ``to_dict()["unprofiled"]``), so it is placed by
size only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.format import TableSpec
from traces.formats import sparse_of

__all__ = ["TableProfile", "TraceProfile"]

#: distinct (id, count) pairs a table may hold unmerged before they are folded
#: into its histogram (bounds the profiler's memory on long traces).
_MERGE_AT = 4_000_000


def _merge(ids: Sequence[np.ndarray], counts: Sequence[np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Histograms ``(ids, counts)`` summed into one, ids sorted and distinct."""
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i = np.concatenate(ids)
    c = np.concatenate(counts)
    order = np.argsort(i, kind="stable")
    i, c = i[order], c[order]
    if i.size == 0:
        return i.astype(np.int64), c.astype(np.int64)
    starts = np.flatnonzero(np.concatenate(([True], i[1:] != i[:-1])))
    return i[starts].astype(np.int64), np.add.reduceat(c, starts).astype(np.int64)


@dataclass(frozen=True, eq=False)
class TableProfile:
    """The measured access of one table (see the module docstring).

    ``ids``/``counts`` is the access histogram over ``num_batches`` batches;
    both None means *uniform* access (every row equally likely) with the
    given mean ``lookups``/``unique`` per batch.
    """

    name: str
    rows: int
    """Rows of the table (every profiled id is below it)."""
    num_batches: int
    lookups: float
    """Mean lookups per batch."""
    unique: float
    """Mean distinct ids per batch."""
    pooling: float
    """Mean lookups per sample (the pooling factor)."""
    ids: np.ndarray | None = None
    """Sorted distinct ids seen (int64); None for uniform access."""
    counts: np.ndarray | None = None
    """Lookups of each id over all profiled batches (int64)."""
    _cum: np.ndarray = field(init=False, repr=False)
    _cum_presence: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"profile of table {self.name!r}"
        for fld in ("rows", "num_batches"):
            v = getattr(self, fld)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{where}: {fld} must be a positive integer, got {v!r}")
            object.__setattr__(self, fld, int(v))
        for fld in ("lookups", "unique", "pooling"):
            v = getattr(self, fld)
            if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v) \
                    or v < 0:
                raise ConfigError(f"{where}: {fld} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, fld, float(v))
        if (self.ids is None) != (self.counts is None):
            raise ConfigError(f"{where}: give both ids and counts, or neither (uniform)")
        if self.ids is None:
            object.__setattr__(self, "_cum", np.zeros(1, np.int64))
            object.__setattr__(self, "_cum_presence", np.zeros(1))
            return
        ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        counts = np.ascontiguousarray(self.counts, dtype=np.int64)
        if ids.ndim != 1 or ids.shape != counts.shape:
            raise ConfigError(f"{where}: ids and counts must be 1-D arrays of one length, got "
                              f"shapes {ids.shape} and {counts.shape}")
        if ids.size:
            if ids[0] < 0 or ids[-1] >= self.rows:
                bad = int(ids[0]) if ids[0] < 0 else int(ids[-1])
                raise ConfigError(f"{where}: id {bad} outside the table's rows [0, {self.rows})")
            if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
                raise ConfigError(f"{where}: ids must be sorted and distinct")
            if int(counts.min()) < 1:
                raise ConfigError(f"{where}: counts must be >= 1, got {int(counts.min())}")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "counts", counts)
        cum = np.zeros(ids.size + 1, np.int64)
        np.cumsum(counts, out=cum[1:])
        object.__setattr__(self, "_cum", cum)
        pres = -np.expm1(-counts / float(self.num_batches))
        tot = float(pres.sum())
        scale = self.unique / tot if tot > 0 else 0.0
        cp = np.zeros(ids.size + 1)
        np.cumsum(pres * scale, out=cp[1:])
        object.__setattr__(self, "_cum_presence", cp)

    @property
    def uniform(self) -> bool:
        """Whether access is modelled as uniform over the rows (no histogram)."""
        return self.ids is None

    @property
    def total_count(self) -> int:
        """Lookups over all profiled batches (0 for a uniform profile)."""
        return int(self._cum[-1])

    @property
    def max_count(self) -> int:
        """Lookups of the most frequent id over all profiled batches (0 when uniform)."""
        return int(self.counts.max()) if self.counts is not None and self.counts.size else 0

    def _check(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size and (int(a.min()) < 0 or int(b.max()) > self.rows or bool(np.any(b < a))):
            raise ConfigError(f"table {self.name!r}: row range outside [0, {self.rows}) or "
                              f"reversed (first: [{int(a.flat[0])}, {int(b.flat[0])}))")

    def range_counts(self, a: Any, b: Any) -> np.ndarray:
        """Profiled lookups (over all batches) of ids in ``[a, b)``; vectorized over a, b."""
        a = np.asarray(a, np.int64)
        b = np.asarray(b, np.int64)
        self._check(a, b)
        if self.ids is None:
            return np.zeros(np.broadcast(a, b).shape, np.int64)
        return self._cum[np.searchsorted(self.ids, b)] - self._cum[np.searchsorted(self.ids, a)]

    def range_lookups(self, a: Any, b: Any) -> Any:
        """Expected lookups per batch of ids in ``[a, b)`` (float, or array for arrays)."""
        a = np.asarray(a, np.int64)
        b = np.asarray(b, np.int64)
        if self.ids is None:
            self._check(a, b)
            out = self.lookups * (b - a) / self.rows
        else:
            out = self.range_counts(a, b) / float(self.num_batches)
        return float(out) if np.ndim(out) == 0 else out

    def range_unique(self, a: Any, b: Any) -> Any:
        """Expected distinct ids per batch in ``[a, b)`` (see the module docstring)."""
        a = np.asarray(a, np.int64)
        b = np.asarray(b, np.int64)
        self._check(a, b)
        if self.ids is None:
            out = self.unique * (b - a) / self.rows
        else:
            cp = self._cum_presence
            out = cp[np.searchsorted(self.ids, b)] - cp[np.searchsorted(self.ids, a)]
        return float(out) if np.ndim(out) == 0 else out

    def split_points(self, k: int, *, start: int = 0, stop: int | None = None,
                     max_rows: int | None = None) -> np.ndarray:
        """Cut rows ``[start, stop)`` into ``k`` contiguous ranges of balanced load.

        Returns ``k + 1`` increasing boundaries (int64) from ``start`` to
        ``stop``; range ``j`` is ``[p[j], p[j+1])``, never empty and, with
        ``max_rows``, never longer than it (a shard's capacity in rows).

        Cut ``j`` goes where the cumulative lookups are closest to ``j / k`` of
        the range's lookups, so each range's load is within one id's count of
        the ideal (when ``max_rows`` does not bind). Between two accessed ids
        the load is the same wherever the cut falls; there the cut goes as
        near the equal-rows position as it can, which balances bytes as a
        second criterion. A range without profiled lookups is cut by rows.
        """
        stop = self.rows if stop is None else int(stop)
        start = int(start)
        if not 0 <= start < stop <= self.rows:
            raise ConfigError(f"table {self.name!r}: cannot split rows [{start}, {stop}) of a "
                              f"table of {self.rows} rows")
        n = stop - start
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"table {self.name!r}: number of ranges must be >= 1, got {k!r}")
        k = int(k)
        if k > n:
            raise ConfigError(f"table {self.name!r}: cannot cut {n} rows into {k} non-empty ranges")
        if max_rows is not None:
            max_rows = int(max_rows)
            if max_rows < 1 or k * max_rows < n:
                raise ConfigError(f"table {self.name!r}: {n} rows do not fit in {k} ranges of at "
                                  f"most {max_rows} rows")
        j = np.arange(1, k, dtype=np.int64)
        even = start + (j * n) // k
        cuts = even
        if self.ids is not None:
            lo_i, hi_i = np.searchsorted(self.ids, [start, stop])
            ids = self.ids[lo_i:hi_i]
            cum = self._cum[lo_i:hi_i + 1] - self._cum[lo_i]  # cum[m]: lookups of ids[:m]
            total = int(cum[-1])
            if total > 0 and k > 1:
                target = j * (total / k)
                # the first m with cum[m] >= target, and the one before: take the closer
                m_hi = np.searchsorted(cum, target, side="left")
                m_lo = np.maximum(m_hi - 1, 0)
                m = np.where(np.abs(cum[m_hi] - target) < np.abs(target - cum[m_lo]), m_hi, m_lo)
                # ids[:m] left of the cut: the cut lies in (ids[m-1], ids[m]]
                lo = np.where(m > 0, ids[np.maximum(m - 1, 0)] + 1, start)
                hi = np.where(m < ids.size, ids[np.minimum(m, ids.size - 1)], stop)
                cuts = np.clip(even, lo, hi)
        return self._constrain(cuts, start, stop, k, max_rows)

    @staticmethod
    def _constrain(cuts: np.ndarray, start: int, stop: int, k: int,
                   max_rows: int | None) -> np.ndarray:
        """Move cuts the least needed so that every range is non-empty and <= max_rows."""
        mr = (stop - start) if max_rows is None else max_rows
        out = np.empty(k + 1, np.int64)
        out[0], out[k] = start, stop
        prev = start
        for i in range(1, k):  # k <= shards: a short loop over cuts, not ids
            left = k - i  # ranges after this cut
            lo = max(prev + 1, stop - left * mr)
            hi = min(prev + mr, stop - left)
            prev = min(max(int(cuts[i - 1]), lo), hi)
            out[i] = prev
        return out

    def renamed(self, name: str) -> TableProfile:
        return TableProfile(name, self.rows, self.num_batches, self.lookups, self.unique,
                            self.pooling, self.ids, self.counts)

    def to_dict(self) -> dict[str, Any]:
        """Summary (no arrays): sizes, means and skew."""
        d: dict[str, Any] = {"rows": self.rows, "lookups_per_batch": round(self.lookups, 3),
                             "unique_per_batch": round(self.unique, 3),
                             "pooling": round(self.pooling, 4), "uniform": self.uniform}
        if self.counts is not None:
            d["distinct_ids"] = int(self.counts.size)
            d["max_id_lookups_per_batch"] = round(self.max_count / self.num_batches, 4)
            # share of the lookups that go to the hottest 1% of the table's rows
            top = max(1, self.rows // 100)
            tot = self.total_count
            if tot and self.counts.size:
                k = min(top, self.counts.size)
                hot = np.partition(self.counts, self.counts.size - k)[self.counts.size - k:]
                d["hot1pct_share"] = round(float(hot.sum()) / tot, 4)
            else:
                d["hot1pct_share"] = 0.0
        return d


@dataclass(frozen=True, eq=False)
class TraceProfile:
    """Per-table access of a workload, as the planner sees it (module docstring)."""

    batch_size: int
    """Mean samples per batch (rounded; at least 1)."""
    num_batches: int
    tables: Mapping[str, TableProfile]
    source: str = "batches"
    """Where it came from: a trace path, ``"batches"`` or ``"uniform"``."""
    num_samples: int = 0
    unprofiled: tuple[str, ...] = ()
    """Tables added by :meth:`align` with zero load (the workload never looks them up)."""

    def __post_init__(self) -> None:
        for fld in ("batch_size", "num_batches"):
            v = getattr(self, fld)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"profile {fld} must be a positive integer, got {v!r}")
            object.__setattr__(self, fld, int(v))
        tables = dict(self.tables)
        for name, tp in tables.items():
            if not isinstance(tp, TableProfile) or tp.name != name:
                raise ConfigError(f"profile table {name!r}: expected its TableProfile, got "
                                  f"{type(tp).__name__} named {getattr(tp, 'name', None)!r}")
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "unprofiled", tuple(self.unprofiled))

    # -- constructors --------------------------------------------------------------
    @classmethod
    def from_batches(cls, batches: Iterable[Any], table_rows: Mapping[str, int] | None = None,
                     *, max_batches: int | None = None, source: str = "batches") -> TraceProfile:
        """Profile batches (:class:`~traces.formats.TraceBatch` or ``SparseFeatures``).

        ``table_rows`` (table -> rows, e.g. the store's) validates every id and
        sizes the tables; without it a table has ``max id + 1`` rows. Only the
        first ``max_batches`` batches are read. Per batch and table one
        ``np.unique``; the per-batch histograms are folded together as they
        grow, so memory stays near the size of the final histogram.
        """
        if max_batches is not None and (isinstance(max_batches, bool) or int(max_batches) < 1):
            raise ConfigError(f"max_batches must be >= 1, got {max_batches!r}")
        rows = None if table_rows is None else {str(k): int(v) for k, v in table_rows.items()}
        pend_ids: dict[str, list[np.ndarray]] = {}
        pend_counts: dict[str, list[np.ndarray]] = {}
        pend_size: dict[str, int] = {}
        hist_size: dict[str, int] = {}
        lookups: dict[str, int] = {}
        unique: dict[str, int] = {}
        max_id: dict[str, int] = {}
        n = samples = 0
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            sf = sparse_of(batch)
            b = sf.batch_size
            for t, key in enumerate(sf.keys):
                if key not in pend_ids:
                    if rows is not None and key not in rows:
                        raise ConfigError(f"trace table {key!r} is not in the store; store tables: "
                                          f"{sorted(rows)[:16]}")
                    pend_ids[key], pend_counts[key], pend_size[key] = [], [], 0
                    hist_size[key] = 0
                    lookups[key] = unique[key] = 0
                    max_id[key] = -1
                s, e = int(sf.offsets[t * b]), int(sf.offsets[(t + 1) * b])
                ids = sf.values[s:e]
                if ids.size == 0:
                    continue
                u, c = np.unique(ids, return_counts=True)
                if u[0] < 0:
                    raise InvalidBatchError(f"batch {n}: table {key!r} has negative id {int(u[0])}")
                if rows is not None and u[-1] >= rows[key]:
                    raise InvalidBatchError(f"batch {n}: table {key!r} has id {int(u[-1])}, "
                                            f"outside its {rows[key]} rows")
                max_id[key] = max(max_id[key], int(u[-1]))
                lookups[key] += int(ids.size)
                unique[key] += int(u.size)
                pend_ids[key].append(u)
                pend_counts[key].append(c)
                pend_size[key] += int(u.size)
                # fold when the unmerged part outgrows the histogram (and _MERGE_AT): each
                # fold at least doubles what it folds, so the total work stays O(n log n)
                if pend_size[key] - hist_size[key] > max(_MERGE_AT, hist_size[key]):
                    i, cc = _merge(pend_ids[key], pend_counts[key])
                    pend_ids[key], pend_counts[key] = [i], [cc]
                    pend_size[key] = hist_size[key] = int(i.size)
            n += 1
            samples += b
        if n == 0:
            raise ConfigError("no batches to profile: the trace is empty")
        tables: dict[str, TableProfile] = {}
        for key in pend_ids:
            ids, counts = _merge(pend_ids[key], pend_counts[key])
            r = rows[key] if rows is not None else max(1, max_id[key] + 1)
            tables[key] = TableProfile(key, r, n, lookups[key] / n, unique[key] / n,
                                       lookups[key] / samples if samples else 0.0, ids, counts)
        return cls(max(1, round(samples / n)), n, tables, source=source, num_samples=samples)

    @classmethod
    def from_trace(cls, trace: Any, table_rows: Mapping[str, int] | None = None, *,
                   batch_size: int | None = None, max_batches: int | None = None,
                   source: str | None = None) -> TraceProfile:
        """Profile a trace: a native trace directory, Meta ``.pt[.gz]`` or Criteo TSV file(s),
        or an already opened :class:`~traces.formats.Trace`.

        ``batch_size`` re-cuts the trace into batches of that many samples (the
        serving batch size matters: distinct ids per batch grow slower than
        it). Without ``table_rows``, a trace that declares its rows (native,
        Criteo) sizes the tables; otherwise ``max id + 1``. ``source`` names the
        trace in :meth:`to_dict` (default: its path).
        """
        from traces.formats import CriteoTrace, NativeTrace, open_source, rebatch

        name = "trace"
        if isinstance(trace, (str, os.PathLike)) or (
                isinstance(trace, (list, tuple)) and trace
                and all(isinstance(p, (str, os.PathLike)) for p in trace)):
            paths = [Path(trace)] if isinstance(trace, (str, os.PathLike)) else \
                [Path(p) for p in trace]
            for p in paths:
                if not p.exists():
                    raise ConfigError(f"trace {p} does not exist")
            name = ",".join(map(str, paths))
            opened: Any = open_source(paths, batch_size=batch_size)
            src: Any = opened
        else:
            opened = src = trace
            if getattr(trace, "path", None) is not None:
                name = str(trace.path)
            elif getattr(trace, "paths", None):
                name = ",".join(map(str, trace.paths))
            if batch_size is not None:
                src = rebatch(trace, int(batch_size))
        if table_rows is None and isinstance(opened, (NativeTrace, CriteoTrace)):
            # these declare their rows; a Meta trace would need a full pass (max id + 1 is
            # what from_batches finds anyway)
            table_rows = dict(zip(opened.keys, (int(r) for r in opened.rows), strict=True))
        return cls.from_batches(src, table_rows, max_batches=max_batches,
                                source=name if source is None else str(source))

    @classmethod
    def uniform(cls, specs: Iterable[TableSpec], batch_size: int,
                pooling: float | Mapping[str, float] = 1.0) -> TraceProfile:
        """No trace: every row equally likely, ``pooling`` lookups per sample (per table or one
        for all). Expected distinct rows per batch: ``rows * (1 - exp(-lookups / rows))``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        tables: dict[str, TableProfile] = {}
        for s in specs:
            pf = pooling.get(s.name, 1.0) if isinstance(pooling, Mapping) else pooling
            if not isinstance(pf, (int, float)) or not math.isfinite(pf) or pf < 0:
                raise ConfigError(f"pooling of table {s.name!r} must be a number >= 0, got {pf!r}")
            lk = float(batch_size) * float(pf)
            uq = s.rows * -math.expm1(-lk / s.rows)
            tables[s.name] = TableProfile(s.name, s.rows, 1, lk, uq, float(pf))
        if not tables:
            raise ConfigError("no tables to profile")
        return cls(int(batch_size), 1, tables, source="uniform", num_samples=int(batch_size))

    # -- views ---------------------------------------------------------------------
    def table(self, name: str) -> TableProfile:
        tp = self.tables.get(name)
        if tp is None:
            raise ConfigError(f"the profile has no table {name!r}; profiled tables: "
                              f"{sorted(self.tables)[:16]}")
        return tp

    def range_lookups(self, table: str, a: int, b: int) -> float:
        """Expected lookups per batch that table ``table`` gets in rows ``[a, b)``."""
        return self.table(table).range_lookups(a, b)

    def range_unique(self, table: str, a: int, b: int) -> float:
        """Expected distinct rows per batch of ``table`` in ``[a, b)``."""
        return self.table(table).range_unique(a, b)

    def split_points(self, table: str, k: int, *, start: int = 0, stop: int | None = None,
                     max_rows: int | None = None) -> np.ndarray:
        """See :meth:`TableProfile.split_points`."""
        return self.table(table).split_points(k, start=start, stop=stop, max_rows=max_rows)

    @property
    def lookups_per_batch(self) -> float:
        return float(sum(t.lookups for t in self.tables.values()))

    def renamed(self, mapping: Mapping[str, str]) -> TraceProfile:
        """The profile with tables renamed (trace name -> store name; others keep theirs)."""
        tables: dict[str, TableProfile] = {}
        for name, tp in self.tables.items():
            new = mapping.get(name, name)
            if new in tables:
                raise ConfigError(f"renaming the profile's tables maps two tables to {new!r}")
            tables[new] = tp.renamed(new) if new != name else tp
        return TraceProfile(self.batch_size, self.num_batches, tables, self.source,
                            self.num_samples, self.unprofiled)

    def align(self, specs: Iterable[TableSpec]) -> TraceProfile:
        """The profile over exactly the store's tables ``specs``.

        A profiled table the store lacks is a ConfigError naming it; one whose
        ids reach past the store's rows too. A store table the profile lacks
        gets zero load (an empty histogram) and is listed in ``unprofiled``.
        The tables then follow the store's order.
        """
        specs = list(specs)
        names = {s.name for s in specs}
        extra = [n for n in self.tables if n not in names]
        if extra:
            raise ConfigError(f"profiled table(s) {extra[:8]} are not in the store; store tables: "
                              f"{sorted(names)[:16]}")
        tables: dict[str, TableProfile] = {}
        unprof = list(self.unprofiled)
        for s in specs:
            tp = self.tables.get(s.name)
            if tp is None:
                tables[s.name] = TableProfile(s.name, s.rows, self.num_batches, 0.0, 0.0, 0.0,
                                              np.zeros(0, np.int64), np.zeros(0, np.int64))
                if s.name not in unprof:
                    unprof.append(s.name)
                continue
            if tp.ids is not None and tp.ids.size and int(tp.ids[-1]) >= s.rows:
                raise ConfigError(f"table {s.name!r}: the profile has id {int(tp.ids[-1])}, but "
                                  f"the store's table has {s.rows} rows")
            if tp.rows != s.rows:
                if tp.uniform:  # uniform access spreads over the store's rows
                    tp = TableProfile(s.name, s.rows, tp.num_batches, tp.lookups,
                                      s.rows * -math.expm1(-tp.lookups / s.rows), tp.pooling)
                else:
                    tp = TableProfile(s.name, s.rows, tp.num_batches, tp.lookups, tp.unique,
                                      tp.pooling, tp.ids, tp.counts)
            tables[s.name] = tp
        return TraceProfile(self.batch_size, self.num_batches, tables, self.source,
                            self.num_samples, tuple(unprof))

    def to_dict(self) -> dict[str, Any]:
        """Summary for the plan file's ``profile`` key (no id arrays)."""
        return {"source": self.source, "batch_size": self.batch_size,
                "num_batches": self.num_batches, "num_samples": self.num_samples,
                "lookups_per_batch": round(self.lookups_per_batch, 3),
                "unprofiled": list(self.unprofiled),
                "tables": {n: t.to_dict() for n, t in self.tables.items()}}
