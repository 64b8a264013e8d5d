"""Cache replacement policies over slots, batch-vectorized.

A cache has ``capacity`` slots ``0 .. capacity - 1``; keys are int64 ids
``>= 0`` (global row ids). A :class:`CachePolicy` owns the key -> slot index
and the policy state, all NumPy arrays changed only inside the Numba kernels
of :mod:`tiermem.kernels.policies` (one kernel call per public method call,
about 10-100 ns per key). It decides *which* slot holds which key; the caller
moves the rows.

Batch semantics of :meth:`CachePolicy.access` (``keys`` unique, in first
occurrence order, ``counts`` occurrences each)::

    keys   = [7, 3, 9, 4]        resident before: {3, 4, 5}, capacity 3, LRU 5 < 3 < 4
    phase 1: hits 3, 4 are touched            -> LRU order 5 < 3 < 4, {3, 4} protected
    phase 2: 7 misses, evicts 5 (slot of 5)   -> 7 protected
             9 misses, every slot protected   -> bypass, slot -1
    result   slots   [s5, s3, -1, s4]
             hit     [F,  T,  F,  T]
             evicted [5], evicted_slots [s5]

With one key per call every policy makes the decisions of its scalar model
(``cachetools.LRUCache``/``LFUCache``/``FIFOCache`` used get-or-set for LRU,
LFU and FIFO; the tests hold the CLOCK and S3-FIFO models).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tiermem.config import Choice
from tiermem.errors import CapacityError, ConfigError, InvalidBatchError
from tiermem.kernels import policies as _k

_access = _k.FastCall(_k.policy_access)
_insert = _k.FastCall(_k.policy_insert)
_lookup = _k.FastCall(_k.policy_lookup)
_remove = _k.FastCall(_k.policy_remove)
_pin = _k.FastCall(_k.policy_pin)
_unpin = _k.FastCall(_k.policy_unpin)
_pin_static = _k.FastCall(_k.policy_pin_static)
_resolve = _k.FastCall(_k.cache_resolve)
_resolve_resident = _k.FastCall(_k.cache_resolve_resident)

__all__ = [
    "AccessResult",
    "BatchScratch",
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


class Policy(Choice):
    """Names of the replacement policies (``make_policy`` accepts the values)."""

    LRU = "lru"
    LFU = "lfu"
    FIFO = "fifo"
    CLOCK = "clock"
    S3FIFO = "s3fifo"
    STATIC = "static"
    """Only statically pinned keys are cached; every other key bypasses."""
    HYBRID = "hybrid"
    """A statically pinned hot set plus a dynamic policy for the rest."""


_DYNAMIC = (Policy.LRU, Policy.LFU, Policy.FIFO, Policy.CLOCK, Policy.S3FIFO)


@dataclass(frozen=True, slots=True)
class AccessResult:
    """What one :meth:`CachePolicy.access` / :meth:`CachePolicy.insert` did."""

    slots: np.ndarray
    """int32 per key: slot holding the key after the call, -1 = not cached (bypass)."""
    hit: np.ndarray
    """bool per key: the key was resident before the call."""
    evicted: np.ndarray
    """int64 keys evicted by the call, in eviction order."""
    evicted_slots: np.ndarray
    """int32 slots of ``evicted`` (now holding new keys of the call, or free)."""

    @property
    def miss_mask(self) -> np.ndarray:
        """Keys that were not resident before the call."""
        return ~self.hit

    @property
    def fill_mask(self) -> np.ndarray:
        """Keys whose row must be written into their slot: admitted by this call."""
        return (~self.hit) & (self.slots >= 0)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of a policy since creation or the last ``reset_stats()``.

    ``hits``/``misses`` count keys of :meth:`CachePolicy.access` calls (each
    key once per call, whatever its count); :meth:`CachePolicy.insert`
    counts only admissions, evictions, rejections and bypasses. For
    access-only use ``misses == admissions + rejected + bypassed``.
    """

    hits: int = 0
    misses: int = 0
    admissions: int = 0
    """keys given a slot (access misses and inserts)."""
    evictions: int = 0
    rejected: int = 0
    """misses refused by the admission filter (TinyLFU)."""
    bypassed: int = 0
    """misses with no evictable slot (all protected or pinned; static policy)."""

    @property
    def accesses(self) -> int:
        """``hits + misses``."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """``hits / accesses`` (0 when nothing was accessed)."""
        n = self.accesses
        return self.hits / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Counters as a plain dict."""
        return asdict(self)


def _pow2_at_least(n: int) -> int:
    return 1 << max(1, (int(n) - 1).bit_length())


def _as_keys(keys: Any, what: str = "keys") -> np.ndarray:
    arr = np.asarray(keys)
    if arr.ndim != 1:
        raise InvalidBatchError(f"Expected 1-D {what}. Got shape {arr.shape} instead.")
    if arr.dtype != np.int64:
        if arr.size and arr.dtype.kind not in "iu":
            raise InvalidBatchError(f"Expected integer {what}. Got dtype {arr.dtype} instead.")
        arr = arr.astype(np.int64)
    arr = np.ascontiguousarray(arr)
    if arr.size and arr.min() < 0:
        raise InvalidBatchError(
            f"Expected {what} >= 0. Got {int(arr.min())} at index {int(arr.argmin())}.")
    return arr


class BatchScratch:
    """Per-thread arrays of :meth:`CachePolicy.resolve`, grown to the largest batch.

    Reused from batch to batch so the hot path allocates nothing in
    proportion to the batch; the miss hash is reset by a stamp, not cleared.
    """

    def __init__(self) -> None:
        self.n = -1
        self.t = -1
        self.stamp = 0
        self.nu = self.nm = self.nev = 0
        self.ensure(1024, 1)

    def ensure(self, n: int, tables: int) -> None:
        """Room for ``n`` lookups over ``tables`` tables; zeroes the table counters."""
        if n > self.n:
            n = max(n, 2 * self.n)
            self.n = n
            self.lookup_slot = np.empty(n, np.int64)
            self.uslots = np.empty(n, np.int32)
            self.ucounts = np.empty(n, np.int64)
            self.mkeys = np.empty(n, np.int64)
            self.mcounts = np.empty(n, np.int64)
            self.mslots = np.empty(n, np.int32)
            self.order = np.empty(n, np.int64)
            self.ev_keys = np.empty(n, np.int64)
            self.ev_slots = np.empty(n, np.int32)
            h = _pow2_at_least(2 * n)
            self.hkey = np.empty(h, np.int64)
            self.hval = np.empty(h, np.int64)
            self.hstamp = np.zeros(h, np.int64)
            self.stamp = 0
        if tables != self.t:
            self.t = tables
            self.tstats = np.zeros((tables, 3), np.int64)
        else:
            self.tstats[:] = 0

    def hit_slots(self) -> np.ndarray:
        return self.uslots[:self.nu]

    def miss_slots(self) -> np.ndarray:
        return self.mslots[:self.nm]


class CachePolicy:
    """Replacement policy over ``capacity`` slots (base of every policy).

    Do not instantiate directly: use :func:`make_policy` or a subclass.

    Parameters
    ----------
    capacity : int
        Number of slots (>= 1).
    admission : {None, "tinylfu"}
        Admission filter. ``"tinylfu"``: a count-min sketch (4 rows of
        ``next_pow2(8 * capacity)`` 4-bit saturating counters, all halved
        every ``10 * capacity`` additions) counts every key of every
        :meth:`access` (``counts`` times); when the cache is full a missing
        key is admitted only if its estimate is greater than the victim's.
        A free slot always admits. :meth:`insert` does not count its keys
        (prefetch guesses are not accesses) but is filtered.
    seed : int
        Seed of the sketch's hashes.

    Notes
    -----
    Protection, within one call: a slot hit or filled by the call is never
    evicted by the same call; nor a slot with a pin count > 0 (:meth:`pin`),
    nor a statically pinned slot (:meth:`pin_static`). A miss that finds no
    evictable slot bypasses (slot -1); it is never an error. Protected
    entries keep their place in the policy's order.

    Every method holds a per-policy lock for the duration of its single
    kernel call, so concurrent batches may share one policy.

    Data layout: see :mod:`tiermem.kernels.policies`.
    """

    name: Policy
    dynamic: Policy | None = None
    """The dynamic policy (None for the static one); differs from ``name`` for hybrid."""
    _code: int = _k.P_NONE
    _static_only: bool = False

    def __init__(self, capacity: int, *, admission: str | None = None, seed: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise ConfigError(f"Expected an integer capacity. Got {capacity!r} instead.")
        capacity = int(capacity)
        if capacity < 1:
            raise ConfigError(f"Expected capacity >= 1. Got {capacity} instead.")
        if capacity >= 2**31 - 2:
            raise ConfigError(f"Expected capacity < 2**31 - 2 (int32 slots). Got {capacity}.")
        if admission not in (None, "tinylfu"):
            raise ConfigError(
                f"Expected admission None or 'tinylfu'. Got {admission!r} instead.")
        if admission is not None and self._static_only:
            raise ConfigError("The static policy admits nothing: admission must be None.")
        self.capacity = capacity
        self.admission = admission
        self._lock = threading.Lock()
        c = capacity
        bits = _pow2_at_least(2 * c).bit_length() - 1
        sc = np.zeros(_k.SC_SIZE, np.int64)
        sc[_k.Q_POLICY] = self._code
        sc[_k.Q_BITS] = bits
        sc[_k.Q_DYNAMIC] = 0 if self._static_only else 1
        sc[_k.Q_SEED] = int(seed) & 0x7FFF_FFFF_FFFF_FFFF
        sc[_k.M_NFREE] = c
        sc[_k.M_EXHAUSTED] = -1
        sketch = np.zeros(1, np.uint8)
        if admission == "tinylfu":
            skbits = _pow2_at_least(8 * c).bit_length() - 1
            sketch = np.zeros(4 << skbits, np.uint8)
            sc[_k.Q_TINYLFU] = 1
            sc[_k.Q_SKBITS] = skbits
            sc[_k.Q_SKRESET] = 10 * c
        node = np.zeros((c + 2, _k.N_COLS), np.int64)
        node[:, _k.N_KEY] = -1
        node[:, _k.N_PREV] = -1  # also N_HPOS: not in the LFU heap
        # empty lists: the sentinels point at themselves
        node[c, _k.N_PREV] = node[c, _k.N_NEXT] = c
        node[c + 1, _k.N_PREV] = node[c + 1, _k.N_NEXT] = c + 1
        work = np.zeros((_k.W_ROWS, c), np.int32)
        # popped from the end: slot 0 is handed out first
        work[_k.W_FREE] = np.arange(c - 1, -1, -1, dtype=np.int32)
        ghost, gidx = np.full(1, -1, np.int64), np.full((2, 2), -1, np.int64)
        if self._code == _k.P_S3FIFO:
            gcap = max(1, c - self._small_target(c))
            gbits = _pow2_at_least(2 * gcap).bit_length() - 1
            ghost = np.full(2 * gcap + 2, -1, np.int64)
            gidx = np.full((1 << gbits, 2), -1, np.int64)
            sc[_k.Q_GCAP] = gcap
            sc[_k.Q_GBITS] = gbits
        self.key_space: int | None = None
        self._upos = np.zeros(c, np.int32)  # resolve(): slot -> distinct-hit index
        self._st = _k.PolicyState(
            idx=np.full((1 << bits, 2), -1, np.int64), node=node, work=work,
            ghost=ghost, gidx=gidx, sketch=sketch, sc=sc)
        self._update_targets()

    def use_dense_index(self, key_space: int) -> None:
        """Index keys ``0 .. key_space - 1`` by a dense array instead of the hash.

        8 bytes per possible key, one memory line per probe and no probe
        chains: the cheaper index when the cache holds a sizeable share of
        the key space (a cache over a store's tables). Keys at or beyond
        ``key_space`` are then refused. Only while the policy is empty.
        """
        if len(self) or self.n_static:
            raise ConfigError("use_dense_index: the policy must be empty")
        if isinstance(key_space, bool) or not isinstance(key_space, (int, np.integer)) \
                or key_space < 1:
            raise ConfigError(f"Expected a key space >= 1. Got {key_space!r} instead.")
        self.key_space = int(key_space)
        self._st = self._st._replace(idx=np.full((self.key_space, 1), -1, np.int64))

    def _keys(self, keys: Any) -> np.ndarray:
        k = _as_keys(keys)
        if self.key_space is not None and k.size and k.max() >= self.key_space:
            raise InvalidBatchError(
                f"Expected keys < {self.key_space} (the dense index's key space). Got "
                f"{int(k.max())} at index {int(k.argmax())}.")
        return k

    # -- hooks -------------------------------------------------------------

    def _small_target(self, dynamic_slots: int) -> int:
        return 0

    def _update_targets(self) -> None:
        sc = self._st.sc
        sc[_k.M_STARGET] = self._small_target(self.capacity - int(sc[_k.M_NSTATIC]))

    # -- public API ----------------------------------------------------------

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(capacity={self.capacity}, len={len(self)}, "
                f"static={self.n_static}, admission={self.admission!r})")

    def __len__(self) -> int:
        """Resident keys (statically pinned ones included)."""
        return self.capacity - int(self._st.sc[_k.M_NFREE])

    @property
    def n_static(self) -> int:
        """Statically pinned keys."""
        return int(self._st.sc[_k.M_NSTATIC])

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slots of ``keys`` (int32, -1 = not resident); no state change.

        Parameters
        ----------
        keys : ndarray of int
            Keys >= 0, any order, repeats allowed.
        """
        k = self._keys(keys)
        out = np.empty(k.size, np.int32)
        with self._lock:
            _lookup(self._st, k, out)
        return out

    def access(self, keys: np.ndarray, counts: np.ndarray | None = None) -> AccessResult:
        """Get-or-set a batch of unique keys.

        Parameters
        ----------
        keys : ndarray of int
            Unique keys >= 0 in first-occurrence order of the batch.
        counts : ndarray of int, optional
            Occurrences of each key in the batch (>= 1; default 1). LFU adds
            them to the count (new keys start at ``counts[i]``); S3-FIFO adds
            them to the frequency (capped at 3; a new key starts at
            ``min(counts[i] - 1, 3)``); CLOCK gives a new key with
            ``counts[i] > 1`` its reference bit; TinyLFU counts them.

        Returns
        -------
        AccessResult

        Raises
        ------
        InvalidBatchError
            Keys negative, not integer or not 1-D; counts of another length
            or < 1; a key repeated. Repeats are detected by the kernel while
            it runs (no extra pass): the call completes, the repeat acting
            as a hit of its first occurrence, so the state stays valid, and
            the error names the first repeated key. A repeated key whose
            first occurrence bypassed is not detected.
        """
        k = self._keys(keys)
        n = k.size
        if counts is None:
            c = np.empty(0, np.int64)
        else:
            c = np.ascontiguousarray(counts, dtype=np.int64)
            if c.shape != (n,):
                raise InvalidBatchError(
                    f"Expected counts of shape ({n},). Got {c.shape} instead.")
            if n and c.min() < 1:
                raise InvalidBatchError(f"Expected counts >= 1. Got {int(c.min())}.")
        slots = np.empty(n, np.int32)
        hit = np.empty(n, np.bool_)
        ev_keys = np.empty(n, np.int64)
        ev_slots = np.empty(n, np.int32)
        with self._lock:
            nev, dup = _access(self._st, k, c, slots, hit, ev_keys, ev_slots)
        if dup >= 0:
            raise InvalidBatchError(
                f"Expected unique keys per call. Key {int(k[dup])} repeats (index {dup}); "
                "the call was applied with the repeat as a hit.")
        return AccessResult(slots, hit, ev_keys[:nev], ev_slots[:nev])

    def resolve(self, values: np.ndarray, offsets: np.ndarray, batch_size: int,
                base: np.ndarray, ready: np.ndarray, prefetched: np.ndarray,
                scratch: BatchScratch, *, check_ready: bool = True,
                check_prefetched: bool = True) -> tuple[int, int, int, int, int]:
        """:meth:`access` of a whole key-major batch, straight from its ids.

        The key of lookup ``i`` of table ``t`` is ``base[t] + values[i]``;
        the state changes exactly as ``access(uniq, counts)`` of the
        batch's distinct keys in first-occurrence order, and every slot the
        batch uses is pinned once (the caller unpins ``scratch.used()``).
        ``ready``/``prefetched`` are the caller's per-slot flags (prefetched
        hits are cleared). Results land in ``scratch``; returns ``(distinct
        hits, distinct misses, evictions, hits not ready, prefetched hits)``.
        Inputs are trusted (the cache validated the batch): int64 values
        with ``base[t] + values[i]`` inside the key space.
        """
        sc = scratch
        with self._lock:
            sc.stamp += 1
            if sc.stamp >= 2**62:
                sc.hstamp[:] = 0
                sc.stamp = 1
            out = _resolve(self._st, values, offsets, np.int64(batch_size), base, ready,
                           prefetched, bool(check_ready), bool(check_prefetched), self._upos,
                           sc.lookup_slot, sc.uslots, sc.ucounts,
                           sc.mkeys, sc.mcounts, sc.mslots, sc.hkey, sc.hval, sc.hstamp,
                           np.int64(sc.stamp), sc.order, sc.ev_keys, sc.ev_slots, sc.tstats)
        nu, nm, nev, nwait, nuseful = (int(x) for x in out)
        sc.nu, sc.nm, sc.nev = nu, nm, nev
        return nu, nm, nev, nwait, nuseful

    @property
    def parallel_hits(self) -> bool:
        """Whether a batch of hits only can be resolved on all threads
        (:meth:`resolve_resident`): CLOCK and FIFO without TinyLFU, whose hit touches
        do not depend on order."""
        sc = self._st.sc
        return int(sc[_k.Q_POLICY]) in (_k.P_CLOCK, _k.P_FIFO) and int(sc[_k.Q_TINYLFU]) == 0

    def resolve_resident(self, values: np.ndarray, offsets: np.ndarray, batch_size: int,
                         base: np.ndarray, ready: np.ndarray, prefetched: np.ndarray,
                         scratch: BatchScratch, *, check_ready: bool = True,
                         check_prefetched: bool = True) -> tuple[bool, int, int]:
        """:meth:`resolve` of a batch whose rows are all resident, in parallel
        (:attr:`parallel_hits` policies only; the caller holds the batch's rows by its
        own lock, not by pins). Returns ``(ok, distinct hits, prefetched hits)``; when
        not ``ok`` a row was missing and the caller runs :meth:`resolve` (the
        prefetched hits returned are counted either way). Same arguments and
        ``scratch`` results (``lookup_slot``, ``tstats``) as :meth:`resolve`."""
        if not self.parallel_hits:
            raise ConfigError(f"{self.name}: hits are order-dependent; use resolve()")
        with self._lock:
            ok, nu, nuseful = _resolve_resident(
                self._st, values, offsets, np.int64(batch_size), base, ready, prefetched,
                bool(check_ready), bool(check_prefetched), scratch.lookup_slot,
                scratch.tstats)
        if ok:
            scratch.nu, scratch.nm, scratch.nev = int(nu), 0, 0
        return bool(ok), int(nu), int(nuseful)

    def keys_of(self, slots: np.ndarray) -> np.ndarray:
        """The key held by each of ``slots`` (-1 = free)."""
        return self._st.node[self._as_slots(slots), _k.N_KEY]

    def insert(self, keys: np.ndarray) -> AccessResult:
        """Admit ``keys`` as if missed, without counting hits or misses (prefetch).

        Resident keys are left alone (their slot is returned, ``hit`` True,
        no touch) and protected for the call. The protection rules and the
        admission filter apply; a new key enters as after one access.

        Raises
        ------
        InvalidBatchError
            As :meth:`access`.
        """
        k = self._keys(keys)
        n = k.size
        slots = np.empty(n, np.int32)
        hit = np.empty(n, np.bool_)
        ev_keys = np.empty(n, np.int64)
        ev_slots = np.empty(n, np.int32)
        with self._lock:
            nev, dup = _insert(self._st, k, slots, hit, ev_keys, ev_slots)
        if dup >= 0:
            raise InvalidBatchError(
                f"Expected unique keys per call. Key {int(k[dup])} repeats (index {dup}).")
        return AccessResult(slots, hit, ev_keys[:nev], ev_slots[:nev])

    def _as_slots(self, slots: np.ndarray) -> np.ndarray:
        s = np.ascontiguousarray(np.asarray(slots), dtype=np.int32)
        if s.ndim != 1:
            raise InvalidBatchError(f"Expected 1-D slots. Got shape {s.shape} instead.")
        if s.size and s.max() >= self.capacity:
            raise InvalidBatchError(
                f"Expected slots < capacity {self.capacity}. Got {int(s.max())}.")
        return s

    def pin(self, slots: np.ndarray) -> None:
        """Add one in-flight pin to each slot (-1 entries are ignored).

        A pinned slot is never evicted until unpinned. Pins stay with the
        slot, not the key: :meth:`remove` frees a pinned slot all the same.
        """
        s = self._as_slots(slots)
        with self._lock:
            _pin(self._st, s)

    def unpin(self, slots: np.ndarray) -> None:
        """Remove one pin from each slot (-1 entries are ignored).

        Raises
        ------
        InvalidBatchError
            A slot's count would go below 0 (nothing is changed then).
        """
        s = self._as_slots(slots)
        with self._lock:
            bad = _unpin(self._st, s)
        if bad >= 0:
            raise InvalidBatchError(
                f"Slot {int(s[bad])} (index {bad}) is not pinned: unpin without pin.")

    def pin_static(self, keys: np.ndarray) -> np.ndarray:
        """Reserve slots permanently for ``keys`` (static popularity pinning).

        Statically pinned keys are hits on access, never evicted, and take
        no part in the dynamic policy. A resident key keeps its slot; the
        others take a free slot or evict the policy's victims. Repeats in
        ``keys`` are dropped.

        Returns
        -------
        ndarray of int32
            The slot of each key (in the order given).

        Raises
        ------
        CapacityError
            The static keys would exceed ``capacity - 1`` (``capacity`` for
            the static policy): at least one slot stays dynamic. Checked
            before anything changes. Also raised (after pinning the keys
            before it) if a key finds every dynamic slot pinned in flight.
        """
        k = self._keys(keys)
        _uk, first = np.unique(k, return_index=True)
        k_u = k[np.sort(first)]
        st = self._st
        with self._lock:
            cur = np.empty(k_u.size, np.int32)
            _lookup(st, k_u, cur)
            res = cur >= 0
            already = np.zeros(k_u.size, np.bool_)
            already[res] = (st.node[cur[res], _k.N_FLAGS] & _k.F_STATIC) != 0
            limit = self.capacity if self._static_only else self.capacity - 1
            total = self.n_static + int((~already).sum())
            if total > limit:
                raise CapacityError(
                    f"Expected at most {limit} statically pinned keys for capacity "
                    f"{self.capacity} "
                    f"({'all slots' if self._static_only else 'one slot stays dynamic'}). "
                    f"Got {total} ({self.n_static} already pinned + {int((~already).sum())} new).")
            slots = np.empty(k_u.size, np.int32)
            ev_keys = np.empty(k_u.size, np.int64)
            ev_slots = np.empty(k_u.size, np.int32)
            _nev, failed = _pin_static(st, k_u, slots, ev_keys, ev_slots)
            self._update_targets()
        if failed >= 0:
            raise CapacityError(
                f"No evictable slot for static key {int(k_u[failed])}: every dynamic slot is "
                f"pinned in flight ({failed} of {k_u.size} keys were pinned).")
        # back to the caller's order (repeats get their key's slot)
        return self._slots_in_order(k, k_u, slots)

    @staticmethod
    def _slots_in_order(k: np.ndarray, k_u: np.ndarray, slots: np.ndarray) -> np.ndarray:
        if k.size == k_u.size:
            return slots
        pos = np.argsort(k_u, kind="stable")
        return slots[pos[np.searchsorted(k_u[pos], k)]]

    def remove(self, keys: np.ndarray) -> None:
        """Invalidate ``keys``: free their slots (absent keys are ignored).

        Statically pinned keys are released too. Pin counts stay with the
        slot (a freed slot may be reused while pinned; it then stays
        protected until unpinned).
        """
        k = self._keys(keys)
        with self._lock:
            _remove(self._st, k)
            self._update_targets()

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        s = self._st.sc
        return CacheStats(
            hits=int(s[_k.S_HITS]), misses=int(s[_k.S_MISSES]),
            admissions=int(s[_k.S_ADMISSIONS]), evictions=int(s[_k.S_EVICTIONS]),
            rejected=int(s[_k.S_REJECTED]), bypassed=int(s[_k.S_BYPASSED]))

    def reset_stats(self) -> None:
        """Zero the counters."""
        with self._lock:
            self._st.sc[_k.S_HITS:_k.S_BYPASSED + 1] = 0

    def keys(self) -> np.ndarray:
        """Resident keys (int64), in slot order."""
        sk = self._st.node[: self.capacity, _k.N_KEY]
        return sk[sk >= 0]

    def slot_keys(self) -> np.ndarray:
        """The key held by each slot (int64, -1 = free); a copy."""
        return self._st.node[: self.capacity, _k.N_KEY].copy()

    def static_mask(self) -> np.ndarray:
        """Bool per slot: statically pinned."""
        return (self._st.node[: self.capacity, _k.N_FLAGS] & _k.F_STATIC) != 0

    def pin_counts(self) -> np.ndarray:
        """In-flight pin count per slot (int32); a copy."""
        return self._st.node[: self.capacity, _k.N_PINS].astype(np.int32)


class LRUPolicy(CachePolicy):
    """Least recently used: exactly ``cachetools.LRUCache`` under get-or-set.

    Layout: a doubly linked list of slots in ``prev``/``nxt`` (int32), oldest
    first; a hit moves the slot to the newest end, a miss evicts the oldest
    evictable slot. O(1) per key.
    """

    name = Policy.LRU
    dynamic = Policy.LRU
    _code = _k.P_LRU


class FIFOPolicy(CachePolicy):
    """First in, first out: exactly ``cachetools.FIFOCache`` under get-or-set.

    Same list as :class:`LRUPolicy`; hits change nothing.
    """

    name = Policy.FIFO
    dynamic = Policy.FIFO
    _code = _k.P_FIFO


class LFUPolicy(CachePolicy):
    """Least frequently used: exactly ``cachetools.LFUCache`` under get-or-set.

    cachetools keeps frequency buckets and evicts the key that entered the
    lowest bucket first. Here an indexed binary min-heap of slots keyed by
    ``(count, seq)``, where ``seq`` is a global counter stamped each time a
    key enters a count (admission or touch), gives the same victim in
    O(log n).

    Parameters
    ----------
    aging_period : int
        Halve every count each ``aging_period`` accesses (occurrences: the
        sum of ``counts``), applied at the end of the call in which the
        period elapses; the heap is then rebuilt. 0 (default): never, the
        exact cachetools semantics.
    """

    name = Policy.LFU
    dynamic = Policy.LFU
    _code = _k.P_LFU

    def __init__(self, capacity: int, *, aging_period: int = 0, admission: str | None = None,
                 seed: int = 0) -> None:
        if int(aging_period) < 0:
            raise ConfigError(f"Expected lfu_aging_period >= 0. Got {aging_period} instead.")
        super().__init__(capacity, admission=admission, seed=seed)
        self.aging_period = int(aging_period)
        self._st.sc[_k.Q_AGING] = self.aging_period


class ClockPolicy(CachePolicy):
    """CLOCK (second chance) over the slots in slot order.

    A hit sets the slot's reference bit. To evict, the hand sweeps from
    where it stopped: a set bit is cleared and passed, the first clear bit
    is the victim (the new key takes that slot, so it is the last one the
    hand reaches again). Protected, pinned and static slots are passed
    without touching their bit. New keys enter with the bit clear (one
    access earns no second chance), unless the admitting batch held the key
    more than once (``counts > 1``).
    """

    name = Policy.CLOCK
    dynamic = Policy.CLOCK
    _code = _k.P_CLOCK


class S3FIFOPolicy(CachePolicy):
    """S3-FIFO (Yang et al., SOSP 2023), Algorithm 1 of the paper.

    Queues (linked lists of slots): small S (target ``small_fraction`` of
    the dynamic slots, at least 1), main M, and a ghost G of evicted keys
    only (a ring of ``capacity - |S| target`` keys with a hash index). A hit
    does ``freq = min(freq + counts, 3)``. A new key goes to M if it is in
    G (and leaves G), else to S, with freq 0.

    Eviction: from S if ``|S| >= target`` (or M is empty), else from M.
    EVICTS takes S's oldest entry: ``freq > 1`` moves it to M's head
    (freq kept, as in Algorithm 1) and goes on, otherwise it is evicted into
    G. EVICTM takes M's oldest: ``freq > 0`` reinserts it at the head with
    ``freq - 1``, otherwise it is evicted. If the chosen queue yields no
    victim (all protected) the other one is tried.

    Choice where the paper's pseudo-code assumes sized objects: moving an
    entry from S to M never triggers an extra eviction from M (slots are
    the only budget; |S| vs. target picks the queue for the next eviction),
    so each admission evicts at most one key.
    """

    name = Policy.S3FIFO
    dynamic = Policy.S3FIFO
    _code = _k.P_S3FIFO

    def __init__(self, capacity: int, *, small_fraction: float = 0.1,
                 admission: str | None = None, seed: int = 0) -> None:
        f = float(small_fraction)
        if not 0.0 < f < 1.0:
            raise ConfigError(
                f"Expected 0 < s3fifo_small_fraction < 1. Got {small_fraction!r} instead.")
        self.small_fraction = f
        super().__init__(capacity, admission=admission, seed=seed)

    def _small_target(self, dynamic_slots: int) -> int:
        return max(1, round(self.small_fraction * dynamic_slots))


class StaticPolicy(CachePolicy):
    """Static popularity pinning only: the keys given to :meth:`pin_static`
    (up to ``capacity``) are cached; every other key bypasses (slot -1,
    counted as a miss and a bypass)."""

    name = Policy.STATIC
    _code = _k.P_NONE
    _static_only = True


def hot_keys(keys_stream: np.ndarray, budget: int) -> np.ndarray:
    """The ``budget`` most accessed keys of a profile, most accessed first.

    Parameters
    ----------
    keys_stream : ndarray of int
        Every access of the profile (repeats count).
    budget : int
        How many keys to return (fewer if the stream has fewer distinct keys).

    Returns
    -------
    ndarray of int64
        Keys by decreasing count; ties by increasing key.
    """
    if int(budget) < 0:
        raise ConfigError(f"Expected budget >= 0. Got {budget} instead.")
    budget = int(budget)
    k = _as_keys(np.ravel(np.asarray(keys_stream)), "keys_stream")
    if budget == 0 or k.size == 0:
        return np.empty(0, np.int64)
    uk, cnt = np.unique(k, return_counts=True)
    if budget < uk.size:
        top = np.argpartition(-cnt, budget - 1)[:budget]
        # keep every key tied with the cut-off out of order-dependence: take
        # the top ``budget`` by (count desc, key asc)
        thresh = cnt[top].min()
        cand = np.flatnonzero(cnt >= thresh)
    else:
        cand = np.arange(uk.size)
    order = np.lexsort((uk[cand], -cnt[cand]))[:budget]
    return uk[cand[order]].astype(np.int64)


def make_policy(name: str | Policy, capacity: int, *, admission: str | None = None,
                lfu_aging_period: int = 0, s3fifo_small_fraction: float = 0.1,
                seed: int = 0, dynamic: str | Policy = Policy.LRU,
                pinned: np.ndarray | None = None) -> CachePolicy:
    """Build a policy by name.

    Parameters
    ----------
    name : str or Policy
        ``lru``, ``lfu``, ``fifo``, ``clock``, ``s3fifo``, ``static`` or
        ``hybrid`` (a statically pinned hot set plus the ``dynamic`` policy).
    capacity : int
        Slots (>= 1).
    admission : {None, "tinylfu"}
        Admission filter of the dynamic policy.
    lfu_aging_period : int
        LFU only (ignored by the others): halve counts every N accesses (0: never).
    s3fifo_small_fraction : float
        S3-FIFO only (validated for all): small queue share, in (0, 1).
    seed : int
        Hash seed of the admission sketch.
    dynamic : str or Policy
        ``hybrid`` only: the dynamic policy (default LRU).
    pinned : ndarray of int, optional
        ``static``/``hybrid``: keys to :meth:`~CachePolicy.pin_static` at once
        (e.g. from :func:`hot_keys`).

    Raises
    ------
    ConfigError
        Unknown name, bad capacity or parameter.
    CapacityError
        More pinned keys than the policy can hold.
    """
    pol = _policy_name(name, "policy")
    if int(lfu_aging_period) < 0:
        raise ConfigError(f"Expected lfu_aging_period >= 0. Got {lfu_aging_period} instead.")
    if not 0.0 < float(s3fifo_small_fraction) < 1.0:
        raise ConfigError(
            f"Expected 0 < s3fifo_small_fraction < 1. Got {s3fifo_small_fraction!r} instead.")
    if pol is Policy.STATIC:
        if admission is not None:
            raise ConfigError("The static policy admits nothing: admission must be None.")
        p: CachePolicy = StaticPolicy(capacity, seed=seed)
    else:
        dyn: Policy = pol
        if pol is Policy.HYBRID:
            dyn = _policy_name(dynamic, "dynamic policy")
            if dyn not in _DYNAMIC:
                raise ConfigError(
                    "Expected a dynamic policy for hybrid "
                    f"({', '.join(d.value for d in _DYNAMIC)}). Got {dyn.value!r} instead.")
        if dyn is Policy.LFU:
            p = LFUPolicy(capacity, aging_period=lfu_aging_period, admission=admission, seed=seed)
        elif dyn is Policy.S3FIFO:
            p = S3FIFOPolicy(capacity, small_fraction=s3fifo_small_fraction,
                             admission=admission, seed=seed)
        else:
            cls = {Policy.LRU: LRUPolicy, Policy.FIFO: FIFOPolicy, Policy.CLOCK: ClockPolicy}[dyn]
            p = cls(capacity, admission=admission, seed=seed)
        if pol is Policy.HYBRID:
            p.name = Policy.HYBRID
            p.dynamic = dyn
    if pinned is not None:
        if pol not in (Policy.STATIC, Policy.HYBRID):
            raise ConfigError(f"pinned= applies to static and hybrid policies, not {pol.value!r}.")
        p.pin_static(pinned)
    return p


def _policy_name(name: str | Policy, what: str) -> Policy:
    try:
        return Policy(name.lower() if isinstance(name, str) else name)
    except ValueError:
        raise ConfigError(
            f"Unknown {what} {name!r}. Expected one of: "
            f"{', '.join(p.value for p in Policy)}.") from None
