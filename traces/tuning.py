"""Cache tuning: simulate every policy at every size on a trace, find the smallest that fits.

The simulator applies the *same batch semantics* as
:class:`~tiermem.cache.cache.CachedTier`, without reading a single row:

1. the tables are split into slot pools, one per (dtype, dim) group, exactly
   as the cache does (:class:`CacheLayout`); each pool gets the capacity
   :meth:`CachedTier._capacity <tiermem.cache.cache.CachedTier._capacity>`
   would give it;
2. per batch and per pool, ids become global ids (``base of the table in the
   pool, in store order + row``), the tables in the batch's key order;
3. :func:`~tiermem.kernels.dedupe.dedupe_first` keeps the distinct ids in
   first-occurrence order with their counts;
4. one ``policy.access(uniq, counts)`` per batch per pool.

Steps 2-3 are done once per trace; every (policy, admission, size) then
replays the same arrays, so a policy costs one kernel call per batch.
Hit and miss counts are therefore *identical* to a replay through the real
cache with the same policy and capacity (no prefetch) - the tests check it.

Profile and warm-up
-------------------
``static`` and ``hybrid`` need a popularity profile. It is taken from the
first ``profile_batches`` batches (default: 10 % of the trace, at least one
batch when the trace has two or more). Those batches are a **warm-up for
every policy**: the static/hybrid hot set is pinned from their ids
(:func:`~tiermem.cache.policy.hot_keys`, budget = capacity for static,
``int(capacity * pinned_fraction)`` for hybrid, as ``CachedTier.pin_hot``),
then they run through the cache, then the counters are reset. Only the
batches after them are measured. :func:`traces.replay.replay` does the same.

OPT
---
The lower bound is Belady's OPT *with bypass* (:func:`traces.opt.belady`,
``bypass=True``) on each pool's distinct-key stream of the measured batches
(per-batch first-occurrence order), at the pool's capacity. Bypass makes it
a bound for admission filters and the static policy too (they may refuse a
key; plain demand-paging MIN is not a bound for them). After a warm-up the
simulated policies start with a full cache, so OPT gets the best possible
initial content a warm-up could leave: of the keys the warm-up batches
touched, the ``capacity`` ones the measured stream uses first (by the
exchange argument no initial content drawn from them does better) - computed
as OPT over those keys followed by the stream, minus their compulsory misses.
Every simulated policy starts from some subset of those keys, so OPT's miss
count is a true lower bound.

Sizes
-----
``"5%"``: that fraction of each pool's rows (``CacheConfig.capacity_fraction``;
for one pool, ``int(total rows * 0.05)``); ``"256MiB"``: bytes, split across
the pools by their share of the table bytes (``capacity_bytes``); an integer:
rows, split the same way (``capacity_rows``). The same strings size the cache
of ``tiermem replay --cache-size``.

Example::

    >>> res = simulate(trace, layout, ["lru", "s3fifo", "static"], ["1%", "5%"])
    >>> print(format_results(res, recommend(res, 0.8)))
    >>> plot_mrc(res, "mrc.png")
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tiermem.cache.cache import Admission, CacheConfig, CachedTier, parse_cache_size
from tiermem.cache.policy import Policy, hot_keys
from tiermem.errors import CapacityError, ConfigError, InvalidBatchError
from tiermem.kernels import kernel_census
from tiermem.kernels.dedupe import dedupe_first, offset_ids
from traces.formats import sparse_of

if TYPE_CHECKING:
    from tiermem.format import StoreInfo

__all__ = [
    "DEFAULT_PINNED_FRACTION",
    "CacheGroup",
    "CacheLayout",
    "Recommendation",
    "SimResult",
    "TuneResults",
    "cache_config",
    "default_profile_batches",
    "format_results",
    "parse_size",
    "plot_mrc",
    "recommend",
    "simulate",
    "table_mismatch",
]

DEFAULT_PINNED_FRACTION = 0.5
"""hybrid: share of each pool's capacity pinned from the profile (tune and replay)."""

OPT = "opt"

# the cache's own size syntax: "5%", rows, or bytes
parse_size = parse_cache_size


def cache_config(policy: str, size: str | int, *, admission: str | None = None,
                 pinned_fraction: float = DEFAULT_PINNED_FRACTION, dynamic: str = "lru",
                 lfu_aging_period: int = 0) -> CacheConfig:
    """The :class:`CacheConfig` that ``simulate`` models for one policy and size."""
    pol = _policy(policy)
    if pol is Policy.HYBRID and not 0 <= pinned_fraction < 1:
        raise ConfigError(f"hybrid: pinned_fraction must be in [0, 1) (one slot stays "
                          f"dynamic), got {pinned_fraction!r}")
    sized = parse_size(size)
    # parsed in CacheConfig's order (policy, dynamic, admission), after the size
    return CacheConfig(policy=pol, dynamic=Policy.parse(dynamic),
                       admission=None if admission is None else Admission.parse(admission),
                       pinned_fraction=pinned_fraction if pol is Policy.HYBRID else 0.0,
                       lfu_aging_period=lfu_aging_period, **sized)


def _policy(name: str) -> Policy:
    try:
        return Policy(str(name).strip().lower())
    except ValueError:
        raise ConfigError(f"unknown policy {name!r}; expected one of: "
                          f"{', '.join(p.value for p in Policy)}") from None


def _admission(a: str | None) -> str | None:
    if a is None or str(a).strip().lower() in ("", "none", "off"):
        return None
    if str(a).strip().lower() == "tinylfu":
        return "tinylfu"
    raise ConfigError(f"unknown admission {a!r}; expected none or tinylfu")


# -- layout --------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheGroup:
    """One slot pool: the tables that share a (dtype, dim), in store order."""

    tables: tuple[str, ...]
    rows: tuple[int, ...]
    row_bytes: int
    """Bytes per cached row (int8 tables: + 8 for scale and bias), as the cache counts."""

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


@dataclass(frozen=True)
class CacheLayout:
    """How a cache splits tables into slot pools; mirrors ``CachedTier.__init__``.

    Build it from a store (:meth:`from_store`, exact) or from row counts
    (:meth:`from_rows`: one pool, as for a store whose tables share dtype and dim).
    """

    groups: tuple[CacheGroup, ...]

    def __post_init__(self) -> None:
        names = [n for g in self.groups for n in g.tables]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"a cache layout needs distinct table names, got {names}")

    @classmethod
    def from_store(cls, store: StoreInfo | str | os.PathLike[str]) -> CacheLayout:
        from tiermem.format import StoreInfo, open_store

        info = store if isinstance(store, StoreInfo) else open_store(store)
        members: dict[tuple[Any, int], list[int]] = {}
        for i, t in enumerate(info.tables):
            members.setdefault((t.spec.dtype, t.spec.dim), []).append(i)
        groups = []
        for tids in members.values():
            spec0 = info.tables[tids[0]].spec
            rb = spec0.row_bytes + (8 if spec0.dtype.quantized else 0)
            groups.append(CacheGroup(tuple(info.tables[i].name for i in tids),
                                     tuple(info.tables[i].spec.rows for i in tids), rb))
        return cls(tuple(groups))

    @classmethod
    def from_rows(cls, table_rows: Mapping[str, int] | Sequence[tuple[str, int]], *,
                  row_bytes: int = 1) -> CacheLayout:
        items = list(table_rows.items()) if isinstance(table_rows, Mapping) else list(table_rows)
        for name, r in items:
            if int(r) < 1:
                raise ConfigError(f"table {name!r}: rows must be >= 1, got {r}")
        return cls((CacheGroup(tuple(str(n) for n, _ in items), tuple(int(r) for _, r in items),
                               int(row_bytes)),))

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.tables)

    @property
    def rows(self) -> dict[str, int]:
        return {n: r for g in self.groups for n, r in zip(g.tables, g.rows, strict=True)}

    @property
    def total_rows(self) -> int:
        return sum(g.total_rows for g in self.groups)

    @property
    def total_bytes(self) -> int:
        return sum(g.total_rows * g.row_bytes for g in self.groups)

    def capacities(self, cache: CacheConfig) -> list[int]:
        """Slots per pool for a cache config (``CachedTier._capacity`` per pool)."""
        total = self.total_bytes
        try:
            return [CachedTier._capacity(cache, g.total_rows, g.row_bytes, total)
                    for g in self.groups]
        except CapacityError as e:
            raise CapacityError(f"{e} (tables of {self.total_rows} rows in all)") from None


def _layout(table_rows: Any, trace: Any) -> CacheLayout:
    from tiermem.format import StoreInfo

    if isinstance(table_rows, CacheLayout):
        return table_rows
    if isinstance(table_rows, StoreInfo):
        return CacheLayout.from_store(table_rows)
    if isinstance(table_rows, (str, os.PathLike)):
        return CacheLayout.from_store(table_rows)
    if table_rows is None:
        rows = getattr(trace, "rows", None)
        keys = getattr(trace, "keys", None)
        if rows is None or keys is None:
            raise ConfigError("table_rows is needed: the trace does not know its table sizes")
        return CacheLayout.from_rows(list(zip(keys, rows, strict=True)))
    if isinstance(table_rows, Mapping):
        return CacheLayout.from_rows(table_rows)
    rows = [int(r) for r in table_rows]
    keys = getattr(trace, "keys", None)
    if keys is None:
        keys = [f"t{i}" for i in range(len(rows))]
    if len(keys) != len(rows):
        raise ConfigError(f"{len(rows)} row counts for {len(keys)} tables {list(keys)}")
    return CacheLayout.from_rows(list(zip(keys, rows, strict=True)))


def default_profile_batches(n_batches: int) -> int:
    """10 % of the trace's batches, at least 1 when there are 2 or more."""
    if n_batches < 2:
        return 0
    return max(1, n_batches // 10)


# -- the per-batch key streams -------------------------------------------------------

@dataclass
class _GroupStream:
    """Distinct keys per batch of one pool, concatenated; ``bounds[b]:bounds[b+1]`` is batch b."""

    keys: np.ndarray
    counts: np.ndarray
    bounds: np.ndarray
    profile: np.ndarray
    """every global id of the profile batches (repeats count; order irrelevant)."""


def _names(names: Sequence[str], head: int = 4, tail: int = 2) -> str:
    """``C1, C2, C3, C4, ..., C25, C26 (26)``: a long list of names, abbreviated."""
    names = [str(n) for n in names]
    if len(names) <= head + tail + 1:
        return ", ".join(names)
    rest = ", ".join(names[-tail:]) + f" ({len(names)})" if tail else f"({len(names)})"
    return ", ".join(names[:head]) + ", ..., " + rest


def table_mismatch(trace_keys: Sequence[str], store_names: Sequence[str],
                   missing: Sequence[str]) -> str:
    """The message for trace tables the store lacks: both name sets and the two ways out."""
    return (f"{len(missing)} of the trace's {len(trace_keys)} tables are not in the store "
            f"(first: {_names(missing, 3, 0)}); trace tables: {_names(trace_keys)}; store "
            f"tables: {_names(store_names)}. Rename them with --table-map "
            "TRACE=STORE,... (table_map=), or generate the trace for this store with "
            "`tiermem trace-generate OUT --for-store STORE`")


def _check_keys(keys: Sequence[str], layout: CacheLayout) -> None:
    missing = [k for k in keys if k not in layout.rows]
    if missing:
        raise ConfigError(table_mismatch(keys, layout.tables, missing))


def _streams(batches: Iterable[Any], layout: CacheLayout, max_batches: int | None,
             profile_batches: int | None, progress: bool
             ) -> tuple[list[_GroupStream], int, int, np.ndarray]:
    """Key streams per pool; returns ``(streams, n_batches, n_profile, lookups per batch)``."""
    rows = layout.rows
    where = {n: (gi, j) for gi, g in enumerate(layout.groups) for j, n in enumerate(g.tables)}
    bases = []
    for g in layout.groups:
        acc = np.concatenate([[0], np.cumsum(g.rows)[:-1]]).astype(np.int64)
        bases.append(dict(zip(g.tables, acc.tolist(), strict=True)))
    ng = len(layout.groups)
    keys_p: list[list[np.ndarray]] = [[] for _ in range(ng)]
    counts_p: list[list[np.ndarray]] = [[] for _ in range(ng)]
    sizes: list[list[int]] = [[] for _ in range(ng)]
    lookups: list[int] = []
    keys0: tuple[str, ...] | None = None
    plan: list[tuple[int, list[str], np.ndarray]] = []
    bar = _bar(progress, "simulate: reading trace")
    n = 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        sf = sparse_of(batch)
        if sf.keys != keys0:
            _check_keys(sf.keys, layout)
            keys0 = sf.keys
            plan = []
            for gi in range(ng):
                ks = [k for k in sf.keys if where[k][0] == gi]
                if ks:
                    plan.append((gi, ks, np.array([bases[gi][k] for k in ks], np.int64)))
        try:
            sf.validate_ids(rows)
        except InvalidBatchError as e:
            raise InvalidBatchError(f"batch {n}: {e}") from None
        for gi, ks, base in plan:
            sub = sf if len(ks) == len(sf.keys) else sf.select(ks)
            gids = offset_ids(sub.values, sub.offsets, sub.batch_size, base)
            uniq, _inv, cnt = dedupe_first(gids)
            keys_p[gi].append(uniq)
            counts_p[gi].append(cnt)
            sizes[gi].append(uniq.size)
        for gi in range(ng):
            if len(sizes[gi]) <= n:  # the pool has no table in this batch
                sizes[gi].append(0)
        lookups.append(int(sf.values.size))
        n += 1
        bar.update(1)
    bar.close()
    n_profile = default_profile_batches(n) if profile_batches is None else min(profile_batches, n)
    out = []
    for gi in range(ng):
        bounds = np.zeros(n + 1, np.int64)
        np.cumsum(np.asarray(sizes[gi], np.int64), out=bounds[1:])
        keys = np.concatenate(keys_p[gi]) if keys_p[gi] else np.zeros(0, np.int64)
        counts = np.concatenate(counts_p[gi]) if counts_p[gi] else np.zeros(0, np.int64)
        # the profile's multiset of ids: distinct ids repeated by their counts (hot_keys
        # only counts occurrences, so this ranks exactly like the raw ids)
        end = bounds[n_profile]
        out.append(_GroupStream(keys=keys, counts=counts, bounds=bounds,
                                profile=np.repeat(keys[:end], counts[:end])))
    return out, n, n_profile, np.asarray(lookups, np.int64)


def _bar(enabled: bool, desc: str, total: int | None = None, unit: str = "batch") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


# -- results -------------------------------------------------------------------------

@dataclass(frozen=True)
class SimResult:
    """One policy at one cache size (or OPT) over the measured batches."""

    policy: str
    """Policy name; ``"lru+tinylfu"`` with an admission filter; ``"opt"`` for Belady."""
    admission: str | None
    size: str
    """The size as given (``"5%"``, ``"100000"``, ``"256MiB"``)."""
    capacity_rows: int
    """Slots of all pools together."""
    accesses: int
    """Distinct keys per batch, summed over batches (``hits + misses``)."""
    hits: int
    misses: int
    lookups: int
    """Lookups of the measured batches (ids, repeats included)."""
    hit_lookups: int
    """Lookups whose row was resident."""
    seconds: float
    """Simulation time (excluding the shared trace pass)."""
    pinned_rows: int = 0
    """static/hybrid: rows pinned from the profile."""

    @property
    def hit_rate(self) -> float:
        """Share of the distinct rows per batch found in the cache (``TableStats.hit_rate``)."""
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.accesses if self.accesses else 0.0

    @property
    def lookup_hit_rate(self) -> float:
        return self.hit_lookups / self.lookups if self.lookups else 0.0

    @property
    def lookups_per_second(self) -> float:
        return self.lookups / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, miss_ratio=self.miss_ratio,
                 lookup_hit_rate=self.lookup_hit_rate)
        return d


@dataclass
class TuneResults:
    """Everything :func:`simulate` measured; ``results`` in (policy, size) order."""

    results: list[SimResult]
    sizes: list[str]
    capacities: dict[str, int]
    """size -> slots of all pools together."""
    policies: list[str]
    batches: int
    profile_batches: int
    """Warm-up/profile batches (not measured)."""
    lookups: int
    """Lookups of the measured batches."""
    total_rows: int
    prep_seconds: float = 0.0
    """The shared pass over the trace (reading, global ids, dedupe)."""
    params: dict[str, Any] = field(default_factory=dict)
    compile_seconds: float = 0.0
    """Compiling (or loading) every policy's kernels before the timed runs."""
    compiled_while_timed: int = 0
    """Kernel specialisations compiled inside the timed runs (0: none was)."""

    def get(self, policy: str, size: str) -> SimResult:
        for r in self.results:
            if r.policy == policy and r.size == str(size):
                return r
        raise KeyError(f"no result for policy {policy!r} at size {size!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "profile_batches": self.profile_batches,
                "measured_batches": self.batches - self.profile_batches,
                "lookups": self.lookups, "total_rows": self.total_rows,
                "sizes": self.sizes, "capacities": self.capacities, "policies": self.policies,
                "prep_seconds": self.prep_seconds, "compile_seconds": self.compile_seconds,
                "compiled_while_timed": self.compiled_while_timed,
                "params": self.params,
                "results": [r.to_dict() for r in self.results]}


# -- simulation ----------------------------------------------------------------------

def _run_policy(streams: list[_GroupStream], caps: list[int], cache: CacheConfig,
                warm: int, n: int) -> tuple[int, int, int, int]:
    """``(hits, misses, hit_lookups, pinned)`` of one policy over the measured batches."""
    hits = misses = hit_lookups = pinned = 0
    for st, cap in zip(streams, caps, strict=True):
        pol = CachedTier._make_policy(cache, cap)
        if cache.policy in ("static", "hybrid"):
            budget = int(cap * (cache.pinned_fraction if cache.policy == "hybrid" else 1.0))
            if budget >= 1 and st.profile.size:
                hot = hot_keys(st.profile, budget)
                pol.pin_static(hot)
                pinned += hot.size
        b, keys, counts = st.bounds, st.keys, st.counts
        for i in range(warm):
            if b[i + 1] > b[i]:
                pol.access(keys[b[i]:b[i + 1]], counts[b[i]:b[i + 1]])
        pol.reset_stats()
        for i in range(warm, n):
            s, e = b[i], b[i + 1]
            if e > s:
                res = pol.access(keys[s:e], counts[s:e])
                hit_lookups += int(counts[s:e][res.hit].sum())
        ps = pol.stats
        hits += ps.hits
        misses += ps.misses
    return hits, misses, hit_lookups, pinned


def _run_opt(streams: list[_GroupStream], caps: list[int], warm: int) -> tuple[int, int, int]:
    from traces.opt import belady

    hits = misses = hit_lookups = 0
    for st, cap in zip(streams, caps, strict=True):
        s0 = st.bounds[warm]
        k = st.keys[s0:]
        if not k.size:
            continue
        c = st.counts[s0:]
        prefix = np.zeros(0, np.int64)
        if warm:
            # the best initial content a warmed-up cache could hold: keys seen in the
            # warm-up, those used soonest in the measured stream first
            seen = np.unique(st.keys[:s0])
            _, first = np.unique(k, return_index=True)
            first = np.sort(first)
            prefix = k[first[np.isin(k[first], seen)][:cap]]
        res, mask = belady(np.concatenate([prefix, k]), cap, bypass=True, return_hits=True)
        m = mask[prefix.size:]
        h = int(m.sum())
        hits += h
        misses += k.size - h
        hit_lookups += int(c[m].sum())
    return hits, misses, hit_lookups


def _compile_kernels(streams: list[_GroupStream], configs: list[CacheConfig],
                     opt_caps: list[list[int]]) -> None:
    """Run every policy (and OPT) once over a few keys of the first batch, so that no
    timed run includes Numba compiling (or loading) its kernels: the same functions with
    the same argument types as the real runs, on slices of the real streams."""
    tiny = []
    for st in streams:
        k = int(min(64, st.bounds[1] if st.bounds.size > 1 else 0))
        tiny.append(_GroupStream(st.keys[:k], st.counts[:k], np.array([0, k], np.int64),
                                 st.profile[:k]))
    seen: set[tuple[Any, ...]] = set()
    for cfg in configs:
        sig = (cfg.policy, cfg.admission, cfg.dynamic, cfg.pinned_fraction > 0,
               cfg.lfu_aging_period > 0)
        if sig not in seen:
            seen.add(sig)
            _run_policy(tiny, [max(1, min(8, t.keys.size)) for t in tiny], cfg, 0, 1)
    if opt_caps:
        _run_opt(tiny, [max(1, min(8, t.keys.size)) for t in tiny], 0)


def simulate(trace_or_batches: Iterable[Any], table_rows: Any = None,
             policies: Sequence[str] = ("lru", "lfu", "clock", "s3fifo", "static", "hybrid"),
             sizes: Sequence[str | int] = ("1%", "2%", "5%", "10%", "20%"), *,
             admission: Sequence[str | None] | str | None = (None,),
             pinned_fraction: float = DEFAULT_PINNED_FRACTION, dynamic: str = "lru",
             lfu_aging_period: int = 0, profile_batches: int | None = None,
             max_batches: int | None = None, opt: bool = True,
             progress: bool = False, row_bytes: int | None = None) -> TuneResults:
    """Simulate each policy (and admission variant) at each size; OPT as the bound.

    Parameters
    ----------
    trace_or_batches : Trace or iterable of TraceBatch / SparseFeatures
        Read once.
    table_rows : CacheLayout, StoreInfo, store path, mapping name -> rows, sequence of rows
        (in the trace's key order), or None (the trace's ``rows``). A store gives
        the exact pools of the real cache; row counts give one pool.
    policies : sequence of str
        ``lru lfu fifo clock s3fifo static hybrid``.
    sizes : sequence of str or int
        ``"5%"``, rows, or bytes (``"256MiB"``); see the module docstring.
    admission : None, "tinylfu", or a sequence of them
        Admission variants; every dynamic policy runs once per variant
        (``static`` only without admission).
    pinned_fraction : float
        hybrid: share of each pool pinned from the profile, in [0, 1).
    dynamic : str
        hybrid: the dynamic policy.
    profile_batches : int, optional
        Warm-up/profile batches, not measured (default 10 % of the trace).
    max_batches : int, optional
        Use only the first batches of the trace (profile included).
    opt : bool
        Also compute Belady's OPT (with bypass) at each size.
    row_bytes : int, optional
        Bytes per cached row when ``table_rows`` gives row counts (a store
        or layout knows its own); byte sizes (``"256MiB"``) need it there.

    Returns
    -------
    TuneResults

    Raises
    ------
    ConfigError
        Unknown policy or admission, bad size or parameter, trace tables
        missing from ``table_rows``, no batch to measure.
    CapacityError
        A size larger than the tables.
    """
    if isinstance(policies, str):
        policies = [p for p in policies.split(",") if p.strip()]
    if isinstance(sizes, (str, int)):
        sizes = [s for s in str(sizes).split(",") if s.strip()]
    if not policies:
        raise ConfigError("no policies given")
    if not sizes:
        raise ConfigError("no cache sizes given")
    pols = [_policy(p) for p in policies]
    adm = [admission] if admission is None or isinstance(admission, str) else list(admission)
    adms = list(dict.fromkeys(_admission(a) for a in adm)) or [None]
    if profile_batches is not None and (isinstance(profile_batches, bool)
                                        or int(profile_batches) < 0):
        raise ConfigError(f"profile_batches must be >= 0, got {profile_batches!r}")
    if max_batches is not None and int(max_batches) < 1:
        raise ConfigError(f"max_batches must be >= 1, got {max_batches!r}")
    source: Iterable[Any] = trace_or_batches
    if (table_rows is not None and not isinstance(table_rows, (Mapping, str, os.PathLike))
            and not hasattr(table_rows, "groups") and not hasattr(table_rows, "tables")
            and getattr(trace_or_batches, "keys", None) is None):
        # row counts in key order, batches without a ``keys`` attribute: the first batch's
        it = iter(trace_or_batches)
        first = next(it, None)
        if first is not None:
            source = itertools.chain([first], it)
            keys = sparse_of(first).keys
            rows = [int(r) for r in table_rows]
            if len(keys) != len(rows):
                raise ConfigError(f"{len(rows)} row counts for {len(keys)} tables {list(keys)}")
            table_rows = dict(zip(keys, rows, strict=True))
    layout = _layout(table_rows, trace_or_batches)
    size_names = [str(s).strip() for s in sizes]
    from_counts = not isinstance(table_rows, (CacheLayout, str, os.PathLike)) and not hasattr(
        table_rows, "tables")
    if from_counts:
        if row_bytes is not None:
            if isinstance(row_bytes, bool) or int(row_bytes) < 1:
                raise ConfigError(f"row_bytes must be >= 1, got {row_bytes!r}")
            layout = CacheLayout(tuple(CacheGroup(g.tables, g.rows, int(row_bytes))
                                       for g in layout.groups))
        else:
            in_bytes = [s for s in size_names if "capacity_bytes" in parse_size(s)]
            if in_bytes:
                raise ConfigError(
                    f"cache size {in_bytes[0]!r} is in bytes, but the table sizes are row "
                    "counts: give a store (--store STORE) or the bytes per row (--row-bytes "
                    "N), or a size in rows or %")
    # every config first: bad sizes/policies fail before the trace is read
    configs: list[tuple[str, str | None, str, CacheConfig, list[int]]] = []
    for s in size_names:
        for p in pols:
            for a in adms:
                if p is Policy.STATIC and a is not None:
                    continue
                cfg = cache_config(p.value, s, admission=a, pinned_fraction=pinned_fraction,
                                   dynamic=dynamic, lfu_aging_period=lfu_aging_period)
                label = p.value if a is None else f"{p.value}+{a}"
                configs.append((label, a, s, cfg, layout.capacities(cfg)))
    t0 = time.perf_counter()
    streams, n, warm, lookups = _streams(source, layout, max_batches, profile_batches,
                                         progress)
    prep = time.perf_counter() - t0
    if n - warm < 1:
        raise ConfigError(f"nothing to measure: the trace has {n} batch(es) and "
                          f"{warm} are used as the profile/warm-up")
    measured_lookups = int(lookups[warm:].sum())
    t0 = time.perf_counter()
    _compile_kernels(streams, [c[3] for c in configs],
                     [layout.capacities(cache_config("lru", s)) for s in size_names] if opt
                     else [])
    compile_seconds = time.perf_counter() - t0
    census = kernel_census()
    results: list[SimResult] = []
    caps_by_size: dict[str, int] = {}
    bar = _bar(progress, "simulate policy x size", unit="run",
               total=len(configs) + (len(size_names) if opt else 0))
    for label, a, s, cfg, caps in configs:
        caps_by_size[s] = sum(caps)
        t1 = time.perf_counter()
        h, m, hl, pinned = _run_policy(streams, caps, cfg, warm, n)
        results.append(SimResult(label, a, s, sum(caps), h + m, h, m, measured_lookups, hl,
                                 time.perf_counter() - t1, pinned))
        bar.update(1)
    if opt:
        for s in size_names:
            caps = layout.capacities(cache_config("lru", s))
            caps_by_size[s] = sum(caps)
            t1 = time.perf_counter()
            h, m, hl = _run_opt(streams, caps, warm)
            results.append(SimResult(OPT, None, s, sum(caps), h + m, h, m, measured_lookups, hl,
                                     time.perf_counter() - t1))
            bar.update(1)
    bar.close()
    labels = list(dict.fromkeys(r.policy for r in results))
    return TuneResults(results=results, sizes=size_names, capacities=caps_by_size,
                       policies=labels, batches=n, profile_batches=warm,
                       lookups=measured_lookups, total_rows=layout.total_rows,
                       prep_seconds=prep, compile_seconds=compile_seconds,
                       compiled_while_timed=kernel_census().since(census).signatures,
                       params={"pinned_fraction": pinned_fraction, "dynamic": dynamic,
                               "admission": adms, "lfu_aging_period": lfu_aging_period,
                               "pools": len(layout.groups)})


# -- recommendation ------------------------------------------------------------------

@dataclass(frozen=True)
class Recommendation:
    """The smallest simulated size whose best policy meets the target."""

    target_hit_rate: float
    met: bool
    size: str | None
    capacity_rows: int | None
    policy: str | None
    hit_rate: float | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recommend(results: TuneResults, target_hit_rate: float, *,
              metric: str = "hit_rate") -> Recommendation:
    """Smallest size at which some policy reaches ``target_hit_rate``, and that policy.

    ``metric``: ``"hit_rate"`` (distinct rows per batch, what the cache
    counts) or ``"lookup_hit_rate"``. OPT is never recommended (it needs the
    future) but, when no policy meets the target, the answer says whether
    OPT would have at some size. Ties at a size go to the higher hit rate,
    then the earlier policy in ``results.policies``.
    """
    if not 0 < target_hit_rate <= 1:
        raise ConfigError(f"target hit rate must be in (0, 1], got {target_hit_rate!r}")
    if metric not in ("hit_rate", "lookup_hit_rate"):
        raise ConfigError(f"metric must be hit_rate or lookup_hit_rate, got {metric!r}")
    order = sorted(results.sizes, key=lambda s: results.capacities[s])
    real = [r for r in results.results if r.policy != OPT]
    rank = {p: i for i, p in enumerate(results.policies)}
    for s in order:
        cand = [r for r in real if r.size == s and getattr(r, metric) >= target_hit_rate]
        if cand:
            best = min(cand, key=lambda r: (-getattr(r, metric), rank[r.policy]))
            v = getattr(best, metric)
            return Recommendation(target_hit_rate, True, s, best.capacity_rows, best.policy, v,
                                  f"smallest size meeting {metric} >= {target_hit_rate:g}: "
                                  f"{s} ({best.capacity_rows} rows) with {best.policy} "
                                  f"({v:.4f})")
    best_all = max(real, key=lambda r: getattr(r, metric), default=None)
    opt_ok = [r for r in results.results if r.policy == OPT
              and getattr(r, metric) >= target_hit_rate]
    msg = f"no simulated policy and size meets {metric} >= {target_hit_rate:g}"
    if best_all is not None:
        msg += (f"; best: {best_all.policy} at {best_all.size} "
                f"({getattr(best_all, metric):.4f})")
    if opt_ok:
        o = min(opt_ok, key=lambda r: r.capacity_rows)
        msg += f"; OPT would meet it at {o.size} (a better policy could)"
    else:
        msg += "; not even OPT does at these sizes: try larger sizes"
    return Recommendation(target_hit_rate, False, None, None, None, None, msg)


# -- output --------------------------------------------------------------------------

def format_results(results: TuneResults, rec: Recommendation | None = None) -> str:
    """A text table: hit rate per policy (rows) and size (columns), plus the recommendation."""
    sizes = sorted(results.sizes, key=lambda s: results.capacities[s])
    lines = [f"{results.batches} batches ({results.profile_batches} profile/warm-up, "
             f"{results.batches - results.profile_batches} measured), {results.lookups} "
             f"measured lookups, {results.total_rows} rows",
             "hit rate (distinct rows per batch found in the cache):"]
    w = max(10, *(len(s) + 2 for s in sizes))
    pw = max(8, *(len(p) + 1 for p in results.policies))
    lines.append(f"{'policy':<{pw}}" + "".join(f"{s:>{w}}" for s in sizes))
    lines.append(f"{'rows':<{pw}}" + "".join(f"{results.capacities[s]:>{w}}" for s in sizes))
    for p in results.policies:
        cells = []
        for s in sizes:
            try:
                cells.append(f"{results.get(p, s).hit_rate:>{w}.4f}")
            except KeyError:
                cells.append(f"{'-':>{w}}")
        lines.append(f"{p:<{pw}}" + "".join(cells))
    sim = [r for r in results.results if r.policy != OPT]
    if sim:
        secs = sum(r.seconds for r in sim)
        acc = sum(r.lookups for r in sim)
        lines.append(f"simulated {len(sim)} runs in {secs:.2f} s "
                     f"({acc / secs / 1e6 if secs > 0 else float('inf'):.1f} M lookups/s); "
                     f"trace pass {results.prep_seconds:.2f} s; kernels compiled or loaded "
                     f"before the timed runs in {results.compile_seconds:.2f} s")
    if rec is not None:
        lines.append(("recommendation: " if rec.met else "") + rec.message)
    return "\n".join(lines)


def _size_axis(results: TuneResults) -> tuple[dict[str, float], str]:
    """x position of every size in the unit the sizes were given in, and the axis label."""
    kinds = {s: next(iter(parse_size(s))) for s in results.sizes}
    if set(kinds.values()) == {"capacity_fraction"}:
        return ({s: 100.0 * parse_size(s)["capacity_fraction"] for s in results.sizes},
                "cache size (% of the tables' rows)")
    if set(kinds.values()) == {"capacity_bytes"}:
        return ({s: parse_size(s)["capacity_bytes"] / 2**20 for s in results.sizes},
                "cache size (MiB)")
    return {s: float(results.capacities[s]) for s in results.sizes}, "cache size (rows)"


def _mrc_figure(results: TuneResults, target_hit_rate: float | None = None,
                name: str | None = None) -> Any:
    """The miss-ratio-curve figure (not saved: tests read its axes)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    xpos, xlabel = _size_axis(results)
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    # tab10 is a ListedColormap, its colors a tuple of RGB tuples: get_cmap is typed Colormap
    colors: Sequence[Any] = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    base = list(dict.fromkeys(p.split("+")[0] for p in results.policies if p != OPT))
    for p in results.policies:
        pts = sorted((xpos[r.size], r.miss_ratio) for r in results.results if r.policy == p)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        if p == OPT:
            style: dict[str, Any] = {"color": "black", "linestyle": "--", "linewidth": 2}
        else:  # one color per policy; admission variants dotted
            style = {"color": colors[base.index(p.split("+")[0]) % len(colors)],
                     "linestyle": ":" if "+" in p else "-"}
        ax.plot(xs, ys, marker="o", label="OPT (Belady, bypass)" if p == OPT else p, **style)
    if target_hit_rate is not None:
        ax.axhline(1 - target_hit_rate, color="red", linewidth=1, alpha=0.7,
                   label=f"target hit rate {target_hit_rate:g}\n"
                         f"(miss ratio {1 - target_hit_rate:.2g})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("miss ratio (distinct rows per batch)")
    xs_all = sorted(set(xpos.values()))
    if len(xs_all) > 1 and xs_all[-1] / max(xs_all[0], 1e-12) >= 10:
        ax.set_xscale("log")
    # one tick per simulated size, labelled as given: no crowded or unrelated ticks
    order = sorted(results.sizes, key=lambda s: xpos[s])
    ax.set_xticks([xpos[s] for s in order], order)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(0, None)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"miss-ratio curve{f' of {name}' if name else ''} "
                 f"({results.batches - results.profile_batches} measured batches, "
                 f"{results.lookups} lookups)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the data
    fig.tight_layout()
    return fig


def plot_mrc(results: TuneResults, path: str | os.PathLike[str], *,
             target_hit_rate: float | None = None, name: str | None = None) -> Path:
    """Miss-ratio curve PNG: miss ratio vs cache size, a line per policy, OPT dashed.

    The x axis is in the unit the sizes were given in (% of rows, MiB, rows);
    ``target_hit_rate`` draws the target as a line, ``name`` (the trace) goes
    in the title.
    """
    import matplotlib.pyplot as plt

    out = Path(path)
    if out.parent and not out.parent.exists():
        raise ConfigError(f"cannot write {out}: folder {out.parent} does not exist")
    fig = _mrc_figure(results, target_hit_rate, name)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
