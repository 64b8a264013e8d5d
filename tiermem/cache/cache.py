"""A DRAM row cache in front of a cold tier (SSD or CXL-emulated).

One slot pool per (dtype, dim) group of tables, shared by those tables;
rows are keyed by a *global id* (``group_base[table] + row``). Per batch:

1. ids become global ids and are deduplicated (first-occurrence order);
2. under the lock, the policy resolves them to slots (hits are touched,
   misses admitted by evicting victims); every slot the batch uses is pinned
   so no concurrent batch or prefetch can evict it;
3. outside the lock, missed rows are read from the cold tier straight into
   their slots; batches that hit a slot still being filled wait for it;
4. the SLS kernel pools from the slot pool; the pins are released.

Keys the policy refuses (admission filter, or nothing evictable) are read
into a per-batch staging arena instead (bypass): results stay exact with any
capacity. All counting happens on vectors; nothing loops per id in Python.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from tiermem.cache.policy import BatchScratch, CachePolicy, Policy, make_policy
from tiermem.config import Choice, ConfigDict, PoolingMode, TierConfig, parse_share_or_bytes
from tiermem.errors import CapacityError, ConfigError, StoreError
from tiermem.features import SparseFeatures
from tiermem.kernels import current_threads as num_threads
from tiermem.kernels import threads as kernel_threads
from tiermem.kernels.dedupe import offset_ids
from tiermem.quantize import RowDtype
from tiermem.stats import TableStats
from tiermem.tiers.base import Tier

__all__ = ["Admission", "CacheConfig", "CacheIndex", "CachedTier", "PrefetchCounters",
           "parse_cache_size"]


def parse_cache_size(spec: str | int) -> dict[str, Any]:
    """A cache size as :class:`CacheConfig` keyword arguments.

    ``"5%"`` or ``"0.05"`` -> ``{"capacity_fraction": 0.05}``; ``1000`` or
    ``"1000"`` -> ``{"capacity_rows": 1000}``; ``"256MiB"`` / ``"2GB"`` ->
    ``{"capacity_bytes": ...}``. ConfigError names the bad value otherwise.
    """
    if isinstance(spec, bool) or isinstance(spec, float):
        raise ConfigError(f"cache size {spec!r}: give rows (an integer), 'N%' or bytes ('256MiB')")
    if isinstance(spec, (int, np.integer)):
        if spec < 1:
            raise ConfigError(f"cache size must be >= 1 row, got {spec}")
        return {"capacity_rows": int(spec)}
    s = str(spec).strip()
    if s.isdigit():
        return parse_cache_size(int(s))
    try:
        kind, value = parse_share_or_bytes(s)
    except (ValueError, ConfigError):
        raise ConfigError(f"bad cache size {spec!r}: expected rows ('100000'), a share of the "
                          "tables ('5%' or '0.05') or bytes ('256MiB', '2GB')") from None
    if kind == "share" and not 0 < value <= 1:
        raise ConfigError(f"cache size {spec!r} must be in (0%, 100%]")
    return {"capacity_fraction": value} if kind == "share" else {"capacity_bytes": int(value)}


class Admission(Choice):
    """An admission filter in front of a dynamic policy."""

    TINYLFU = "tinylfu"
    """A missed key enters only if a frequency sketch counts it hotter than the victim."""


class CacheIndex(Choice):
    """How the cache finds a key's slot."""

    AUTO = "auto"
    """dense when it costs at most half the slot pool's bytes, else hash."""
    DENSE = "dense"
    """8 bytes per cached table row; one memory line a probe."""
    HASH = "hash"
    """Open addressing, ~32 bytes per slot."""


@dataclass(frozen=True)
class CacheConfig(ConfigDict):
    """Size and policy of the DRAM cache.

    Exactly one of ``capacity_rows``, ``capacity_bytes`` or ``capacity_fraction``
    (of the cached tables' bytes) sets the size.
    """

    policy: Policy = Policy.LRU
    """lru, lfu, fifo, clock, s3fifo, static or hybrid."""
    capacity_rows: int | None = None
    capacity_bytes: int | None = None
    capacity_fraction: float | None = None
    admission: Admission | None = None
    """None, or tinylfu (frequency-sketch admission filter)."""
    dynamic: Policy = Policy.LRU
    """hybrid: the policy for the rows that are not pinned."""
    pinned_fraction: float = 0.0
    """hybrid/static: share of the capacity reserved for the hottest rows."""
    lfu_aging_period: int = 0
    index: CacheIndex = CacheIndex.AUTO
    """key -> slot index: dense (8 bytes per cached table row, one memory line a probe),
    hash (open addressing, ~32 bytes per slot) or auto: dense when it costs at most half
    the slot pool's bytes."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))
        object.__setattr__(self, "dynamic", Policy.parse(self.dynamic))
        if self.admission is not None:
            object.__setattr__(self, "admission", Admission.parse(self.admission))
        object.__setattr__(self, "index", CacheIndex.parse(self.index))
        given = [v for v in (self.capacity_rows, self.capacity_bytes, self.capacity_fraction)
                 if v is not None]
        if len(given) != 1:
            raise ConfigError("CacheConfig: give exactly one of capacity_rows, capacity_bytes, "
                              "capacity_fraction")
        if self.capacity_rows is not None and (
                isinstance(self.capacity_rows, bool) or not isinstance(self.capacity_rows, int)
                or self.capacity_rows < 1):
            raise ConfigError(f"CacheConfig.capacity_rows must be >= 1, got {self.capacity_rows!r}")
        if self.capacity_bytes is not None and (
                not isinstance(self.capacity_bytes, int) or self.capacity_bytes < 1):
            raise ConfigError(f"CacheConfig.capacity_bytes must be >= 1, got "
                              f"{self.capacity_bytes!r}")
        if self.capacity_fraction is not None and not 0 < self.capacity_fraction <= 1:
            raise ConfigError(f"CacheConfig.capacity_fraction must be in (0, 1], got "
                              f"{self.capacity_fraction!r}")
        if not 0 <= self.pinned_fraction <= 1:
            raise ConfigError(f"CacheConfig.pinned_fraction must be in [0, 1], got "
                              f"{self.pinned_fraction!r}")


#: rows a prefetch reserves and reads at a time (see CachedTier.prefetch_rows)
PREFETCH_CHUNK_ROWS = 1024


#: lookups from which a batch of hits is resolved on every thread (below, the same
#: pass on the calling thread costs less than waking the others)
PARALLEL_RESOLVE_MIN = 8192


@dataclass
class PrefetchCounters:
    """What the prefetcher did; see :mod:`tiermem.cache.prefetch`."""

    issued: int = 0
    """rows the prefetcher admitted and read."""
    useful: int = 0
    """prefetched rows hit by a batch before eviction."""
    late: int = 0
    """rows a batch needed while their prefetch was still reading (it waited)."""
    wasted: int = 0
    """prefetched rows evicted without ever being hit."""
    dropped: int = 0
    """rows the cache refused to prefetch (admission filter, or nothing evictable)."""
    bytes_read: int = 0
    """bytes the prefetcher's reads took from the cold tier's device."""
    read_ops: int = 0
    """read operations of the prefetcher (SSD: preads; CXL: modeled row accesses)."""


@dataclass
class _Group:
    """One slot pool: the tables of one (dtype, dim)."""

    dtype: RowDtype
    dim: int
    tables: list[int]
    base: np.ndarray  # global-id base per store table index (-1: not in group)
    policy: CachePolicy
    pool: np.ndarray
    qpool: np.ndarray | None
    ready: np.ndarray  # bool per slot: row present (False while being filled)
    prefetched: np.ndarray  # bool per slot: filled by the prefetcher, not yet hit
    prefetching: np.ndarray  # bool per slot: the prefetcher is reading it now
    key_table: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    filling: int = 0
    """slots not ready now (being read): 0 lets a batch skip the ready checks."""
    prefetch_seen: bool = False
    """the prefetcher has filled slots: batches check the prefetched flags."""
    parallel_hits: bool = False
    """the policy resolves a batch of hits on all threads (CLOCK, FIFO)."""
    last_resident: bool = True
    """the group's last batch found every row resident (try the parallel pass)."""


class CachedTier(Tier):
    """A cold tier behind a DRAM cache of rows; pools exactly like the cold tier."""

    def __init__(self, cold: Tier, cache: CacheConfig, *, config: TierConfig | None = None,
                 hot_profile: dict[str, np.ndarray] | None = None) -> None:
        self.kind = cold.kind  # type: ignore[misc]
        super().__init__(cold.store, config or cold.config)
        self.cold = cold
        self._owns_cold = True  # False for a scratch copy sharing another cache's tier
        self.cache_config = cache
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._tls = threading.local()
        self.prefetch_counters = PrefetchCounters()
        self._pools: dict[tuple[RowDtype, int], _Group] = {}
        self._group_of: list[tuple[RowDtype, int]] = []
        members: dict[tuple[RowDtype, int], list[int]] = {}
        for i in range(len(self.tables)):
            members.setdefault(self.group_key(i), []).append(i)
            self._group_of.append(self.group_key(i))
        total_bytes = sum(self._row_bytes(i) * t.spec.rows for i, t in enumerate(self.tables))
        for key, tids in members.items():
            rows = sum(self.tables[i].spec.rows for i in tids)
            row_bytes = self._row_bytes(tids[0])
            cap = self._capacity(cache, rows, row_bytes, total_bytes)
            base = np.full(len(self.tables), -1, np.int64)
            key_table = np.zeros(len(tids) + 1, np.int64)
            acc = 0
            for j, i in enumerate(tids):
                base[i] = acc
                acc += self.tables[i].spec.rows
                key_table[j + 1] = acc
            policy = self._make_policy(cache, cap)
            if self.dense_index(cache, rows, cap, row_bytes):
                policy.use_dense_index(rows)
            dtype, dim = key
            self._pools[key] = _Group(
                dtype=dtype, dim=dim, tables=tids, base=base, policy=policy,
                pool=np.zeros((cap, dim), dtype.numpy),
                qpool=np.zeros((cap, 2), np.float32) if dtype.quantized else None,
                ready=np.ones(cap, bool), prefetched=np.zeros(cap, bool),
                prefetching=np.zeros(cap, bool), key_table=key_table,
                parallel_hits=policy.parallel_hits)
        if hot_profile is not None:
            self.pin_hot(hot_profile)

    # -- construction helpers -------------------------------------------------
    def _row_bytes(self, i: int) -> int:
        s = self.tables[i].spec
        return s.row_bytes + (8 if s.dtype.quantized else 0)

    @staticmethod
    def _capacity(cache: CacheConfig, rows: int, row_bytes: int, total_bytes: int) -> int:
        share = rows * row_bytes / max(total_bytes, 1)  # this group's part of the cache
        if cache.capacity_rows is not None:
            cap = cache.capacity_rows if share >= 1 else max(1, round(cache.capacity_rows * share))
        elif cache.capacity_bytes is not None:
            cap = int(cache.capacity_bytes * share) // row_bytes
        else:
            assert cache.capacity_fraction is not None
            cap = max(1, int(rows * cache.capacity_fraction))
        if cap > rows:
            raise CapacityError(f"cache capacity {cap} rows exceeds the {rows} rows it caches; "
                                "use a smaller capacity (or the DRAM tier)")
        if cap < 1:
            raise CapacityError(f"cache capacity rounds to {cap} rows for tables of {row_bytes} "
                                "bytes per row: give a larger capacity")
        return int(cap)

    @staticmethod
    def dense_index(cache: CacheConfig, rows: int, cap: int, row_bytes: int) -> bool:
        """Whether a pool of ``cap`` slots over ``rows`` rows gets the dense index."""
        if cache.index == "auto":
            return 8 * rows <= cap * row_bytes // 2
        return cache.index == "dense"

    @staticmethod
    def _make_policy(cache: CacheConfig, cap: int) -> CachePolicy:
        kwargs: dict[str, Any] = {"admission": cache.admission,
                                  "lfu_aging_period": cache.lfu_aging_period}
        if cache.policy == "hybrid":
            kwargs["dynamic"] = cache.dynamic
        return make_policy(cache.policy, cap, **kwargs)

    # -- introspection ------------------------------------------------------
    @property
    def capacity_rows(self) -> int:
        return sum(g.policy.capacity for g in self._pools.values())

    @property
    def nbytes(self) -> int:
        """DRAM held by the slot pools."""
        return sum(g.pool.nbytes + (0 if g.qpool is None else g.qpool.nbytes)
                   for g in self._pools.values())

    def cache_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"capacity_rows": self.capacity_rows,
                               "prefetch": asdict(self.prefetch_counters)}
        for key, g in self._pools.items():
            out[f"{key[0].value}x{key[1]}"] = {"policy": g.policy.name.value,
                                               "resident": len(g.policy),
                                               **asdict(g.policy.stats)}
        return out

    # -- global ids ---------------------------------------------------------------
    def global_ids(self, features: SparseFeatures) -> dict[tuple[RowDtype, int], np.ndarray]:
        """The batch's ids as global ids per group (validated features assumed)."""
        out = {}
        for key, g in self._pools.items():
            keys = [k for k in features.keys if self.table_index(k) in g.tables]
            if not keys:
                continue
            sub = features if len(keys) == len(features.keys) else features.select(keys)
            base = g.base[[self.table_index(k) for k in sub.keys]]
            out[key] = offset_ids(sub.values, sub.offsets, sub.batch_size, base)
        return out

    def _split_by_table(self, g: _Group, gids: np.ndarray
                        ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(table index, positions in gids, table rows)`` for each table present."""
        which = np.searchsorted(g.key_table, gids, side="right") - 1
        out = []
        for j in np.unique(which):
            pos = np.flatnonzero(which == j)
            i = g.tables[int(j)]
            out.append((i, pos, gids[pos] - g.base[i]))
        return out

    def _read_into(self, g: _Group, gids: np.ndarray, w: np.ndarray, q: np.ndarray | None,
                   stats: dict[str, TableStats] | None, *, background: bool = False,
                   out_index: np.ndarray | None = None) -> None:
        """Read rows of distinct ``gids`` from the cold tier into ``w``/``q``.

        Row ``gids[k]`` goes to row ``out_index[k]`` (or ``k``): with the slot
        pool and the slots as ``w``/``out_index`` the rows land in place, no
        staging copy. All tables' rows go to the cold tier in one request,
        sorted per table, so the SSD tier plans and issues them together.
        """
        where = np.arange(gids.size) if out_index is None else np.asarray(out_index, np.int64)
        requests = []
        for i, pos, rows in self._split_by_table(g, gids):
            order = np.argsort(rows, kind="stable")
            requests.append((i, rows[order], w, q, where[pos[order]]))
            if stats is not None:
                stats[self.tables[i].name].rows_read += pos.size
        self.cold.read_many(requests, stats, background=background)

    # -- the batch path ---------------------------------------------------------
    def _scratch_for(self, n: int, tables: int) -> BatchScratch:
        sc = getattr(self._tls, "scratch", None)
        if sc is None:
            sc = self._tls.scratch = BatchScratch()
        sc.ensure(n, tables)
        return sc

    def _pool_group(self, features: SparseFeatures, tids: list[int], col_base: np.ndarray,
                    mode: PoolingMode, out: np.ndarray, stats: dict[str, TableStats]) -> None:
        g = self._pools[self._group_of[tids[0]]]
        n = features.values.size
        sc = self._scratch_for(n, len(tids))
        zero = np.zeros(len(tids), np.int64)
        ls = sc.lookup_slot[:n]
        with self._lock:
            fast = False
            if g.parallel_hits and g.last_resident:
                # the steady state, a batch of hits only (tried while the group's last
                # batch was one: after a miss, a failed pass would only add to resolve's):
                # resolved on every thread, or on this one for a small batch (the lean
                # pass beats resolve there too); a miss sends it down resolve below
                one = n < PARALLEL_RESOLVE_MIN or num_threads() <= 1
                with kernel_threads(1 if one else None):
                    fast, nu, useful = g.policy.resolve_resident(
                        features.values, features.offsets, features.batch_size, g.base[tids],
                        g.ready, g.prefetched, sc, check_ready=g.filling > 0,
                        check_prefetched=g.prefetch_seen)
                self.prefetch_counters.useful += useful
            if not fast:
                nu, nm, nev, nwait, useful = g.policy.resolve(
                    features.values, features.offsets, features.batch_size, g.base[tids],
                    g.ready, g.prefetched, sc, check_ready=g.filling > 0,
                    check_prefetched=g.prefetch_seen)
                self.prefetch_counters.useful += useful
                self._note_evictions(g, sc.ev_slots[:nev])
                hit_slots = sc.hit_slots()
            resident = fast or (nm == 0 and nwait == 0)
            g.last_resident = resident
            if resident:
                # Every row is in its slot: pool now, under the lock, so no other
                # batch can evict them meanwhile (no pins, no second pass).
                self._run_kernel(g.pool, g.qpool, ls, features, zero, col_base, mode, out)
            else:
                g.policy.pin(hit_slots)
                mslots = sc.miss_slots()
                admitted = mslots >= 0
                fill_slots = mslots[admitted]
                self._mark_filling(g, fill_slots)
                wslots = wkeys = None
                if nwait:
                    wslots = hit_slots[~g.ready[hit_slots]]
                    wkeys = g.policy.keys_of(wslots)
        for p, i in enumerate(tids):
            st = stats[self.tables[i].name]
            st.cache_hits += int(sc.tstats[p, 0])
            st.cache_misses += int(sc.tstats[p, 1])
            st.hit_lookups += int(sc.tstats[p, 2])
        if resident:
            return
        try:
            if fill_slots.size:
                fill_keys = sc.mkeys[:nm][admitted]
                try:
                    self._fill(g, fill_keys, fill_slots, stats)
                except BaseException:
                    with self._cond:
                        g.policy.remove(fill_keys)
                        self._mark_ready(g, fill_slots)
                    raise
            if wslots is not None and wslots.size:
                with self._cond:
                    self.prefetch_counters.late += int(g.prefetching[wslots].sum())
                    if not self._cond.wait_for(lambda: bool(g.ready[wslots].all()), timeout=60):
                        raise StoreError("timed out waiting for rows another batch is reading")
                    if (g.policy.keys_of(wslots) != wkeys).any():
                        raise StoreError("another batch failed to read rows this batch needs")
            if not admitted.all():
                self._pool_bypass(g, sc, ls, admitted, features, col_base, mode, out, stats,
                                  zero)
            else:
                self._run_kernel(g.pool, g.qpool, ls, features, zero, col_base, mode, out)
        finally:
            with self._lock:
                g.policy.unpin(hit_slots)
                g.policy.unpin(fill_slots)

    def _mark_filling(self, g: _Group, slots: np.ndarray) -> None:
        """Slots whose rows are being read (lock held): batches that hit them wait."""
        g.ready[slots] = False
        g.filling += int(slots.size)

    def _mark_ready(self, g: _Group, slots: np.ndarray) -> None:
        """The end of :meth:`_mark_filling` (lock held); wakes the waiting batches."""
        g.ready[slots] = True
        g.filling -= int(slots.size)
        self._cond.notify_all()

    def _pool_bypass(self, g: _Group, sc: BatchScratch, ls: np.ndarray, admitted: np.ndarray,
                     features: SparseFeatures, col_base: np.ndarray, mode: PoolingMode,
                     out: np.ndarray, stats: dict[str, TableStats], zero: np.ndarray) -> None:
        """Pool a batch some of whose misses found no slot (admission filter, all pinned).

        Their rows are read into a staging arena beside copies of the slots
        the batch uses; results stay exact at any capacity.
        """
        used, pos = np.unique(ls[ls >= 0], return_inverse=True)
        bypass = np.flatnonzero(~admitted)
        W = np.empty((used.size + bypass.size, g.dim), g.dtype.numpy)
        Q = np.empty((W.shape[0], 2), np.float32) if g.qpool is not None else None
        W[:used.size] = g.pool[used]
        if Q is not None and g.qpool is not None:
            Q[:used.size] = g.qpool[used]
        bq = None if Q is None else Q[used.size:]
        self._read_into(g, sc.mkeys[bypass], W[used.size:], bq, stats)
        where = np.empty(admitted.size, np.int64)
        where[bypass] = used.size + np.arange(bypass.size)
        ids = np.empty(ls.size, np.int64)
        hit = ls >= 0
        ids[hit] = pos
        ids[~hit] = where[-1 - ls[~hit]]
        self._run_kernel(W, Q, ids, features, zero, col_base, mode, out)

    def _fill(self, g: _Group, keys: np.ndarray, slots: np.ndarray,
              stats: dict[str, TableStats] | None) -> None:
        # The slots are pinned and not ready: no other batch reads or evicts them,
        # so the rows are read straight into the pool outside the lock.
        self._read_into(g, keys, g.pool, g.qpool, stats, out_index=slots)
        with self._cond:
            g.prefetched[slots] = False
            self._mark_ready(g, slots)

    def _note_evictions(self, g: _Group, evicted_slots: np.ndarray) -> None:
        if evicted_slots.size:
            wasted = int(g.prefetched[evicted_slots].sum())
            g.prefetched[evicted_slots] = False
            self.prefetch_counters.wasted += wasted

    # -- prefetch and warm-up -------------------------------------------------------
    def read_group_rows(self, key: tuple[RowDtype, int], gids: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray | None]:
        """Read rows of global ids from the cold tier (no cache change)."""
        g = self._pools[key]
        w = np.empty((gids.size, g.dim), g.dtype.numpy)
        q = np.empty((gids.size, 2), np.float32) if g.qpool is not None else None
        self._read_into(g, gids, w, q, None)
        return w, q

    def prefetch_rows(self, key: tuple[RowDtype, int], gids: np.ndarray, *,
                      chunk_rows: int = PREFETCH_CHUNK_ROWS) -> int:
        """Admit distinct global ids ahead of need and read their rows (prefetcher).

        Rows go in chunks of ``chunk_rows``: each chunk's slots are reserved
        under the lock (not ready, pinned), then filled outside it; a batch
        that needs one of them meanwhile waits for that chunk's read instead
        of issuing its own (counted as late). Chunks keep that wait short: a
        running batch often needs rows the prefetcher just reserved for a
        later batch, and must not wait for the whole later batch's reads.
        Keys already resident are left alone. Returns the rows read.
        """
        n = 0
        for a in range(0, gids.size, max(1, chunk_rows)):
            n += self._prefetch_chunk(key, gids[a:a + max(1, chunk_rows)])
        return n

    def _prefetch_chunk(self, key: tuple[RowDtype, int], gids: np.ndarray) -> int:
        g = self._pools[key]
        with self._cond:
            res = g.policy.insert(gids)
            self._note_evictions(g, res.evicted_slots)
            new = (~res.hit) & (res.slots >= 0)
            slots, keys = res.slots[new], gids[new]
            g.policy.pin(slots)
            self._mark_filling(g, slots)
            g.prefetching[slots] = True
            g.prefetch_seen = True
            c = self.prefetch_counters
            c.issued += int(keys.size)
            c.dropped += int((res.slots < 0).sum())
        try:
            if keys.size:  # reserved slots: read in place, as _fill does
                read: collections.defaultdict[str, TableStats] = \
                    collections.defaultdict(TableStats)
                self._read_into(g, keys, g.pool, g.qpool, read, background=True,
                                out_index=slots)
                tot = TableStats()
                for st in read.values():
                    tot.add(st)
            with self._cond:
                g.prefetched[slots] = True
                if keys.size:
                    c.bytes_read += tot.bytes_read
                    c.read_ops += tot.read_ops
        except BaseException:
            with self._cond:
                g.policy.remove(keys)
            raise
        finally:
            with self._cond:
                g.prefetching[slots] = False
                g.policy.unpin(slots)
                self._mark_ready(g, slots)
        return int(keys.size)

    def _offer(self, key: tuple[RowDtype, int], gids: np.ndarray, w: np.ndarray,
               q: np.ndarray | None) -> int:
        """Insert rows already read (warm-up); returns rows accepted."""
        g = self._pools[key]
        with self._cond:
            res = g.policy.insert(gids)
            self._note_evictions(g, res.evicted_slots)
            new = (~res.hit) & (res.slots >= 0)
            s = res.slots[new]
            g.pool[s] = w[new]
            if q is not None and g.qpool is not None:
                g.qpool[s] = q[new]
            g.ready[s] = True
            return int(new.sum())

    def warm(self, profile: dict[str, np.ndarray]) -> int:
        """Fill the cache with the most accessed rows of a profile (table -> ids seen).

        Rows are offered hottest first until the capacity is used; returns
        how many rows were loaded.
        """
        from tiermem.cache.policy import hot_keys

        loaded = 0
        for key, g in self._pools.items():
            streams = [np.asarray(profile[self.tables[i].name], np.int64) + g.base[i]
                       for i in g.tables if self.tables[i].name in profile]
            if not streams:
                continue
            hot = hot_keys(np.concatenate(streams), g.policy.capacity)
            w, q = self.read_group_rows(key, hot)
            loaded += self._offer(key, hot, w, q)
        return loaded

    def pin_hot(self, profile: dict[str, np.ndarray]) -> int:
        """Static popularity pinning: pin the hottest rows up to the pinned budget."""
        from tiermem.cache.policy import hot_keys

        pinned = 0
        for key, g in self._pools.items():
            budget = int(g.policy.capacity * (self.cache_config.pinned_fraction
                                              if self.cache_config.policy == "hybrid" else 1.0))
            streams = [np.asarray(profile[self.tables[i].name], np.int64) + g.base[i]
                       for i in g.tables if self.tables[i].name in profile]
            if budget < 1 or not streams:
                continue
            hot = hot_keys(np.concatenate(streams), budget)
            w, q = self.read_group_rows(key, hot)
            with self._cond:
                s = g.policy.pin_static(hot)
                g.pool[s] = w
                if q is not None and g.qpool is not None:
                    g.qpool[s] = q
                g.ready[s] = True
            pinned += hot.size
        return pinned

    def _read_rows(self, i: int, rows: np.ndarray, w_out: np.ndarray,
                   q_out: np.ndarray | None) -> None:
        self.cold._read_rows(i, rows, w_out, q_out)

    def scratch_copy(self, rows: int = 64) -> CachedTier:
        """A small empty cache like this one over the same cold tier (closing it leaves the
        cold tier open): a warm-up runs the very kernels, with the same argument types,
        through it, and this cache's content and counters stay as they are."""
        min_rows = min(sum(self.tables[i].spec.rows for i in g.tables)
                       for g in self._pools.values())
        cfg = replace(self.cache_config, capacity_rows=max(1, min(rows, min_rows)),
                      capacity_bytes=None, capacity_fraction=None)
        scratch = CachedTier(self.cold, cfg, config=self.config)
        scratch._owns_cold = False
        return scratch

    def close(self) -> None:
        super().close()
        if self._owns_cold:
            self.cold.close()
