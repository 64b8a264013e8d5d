"""Replay a trace through the real runtime: a tier, a DRAM cache, a prefetcher, a model.

:func:`replay` opens a store's tier (DRAM, SSD via pread, CXL-emulated),
optionally puts a :class:`~tiermem.cache.cache.CachedTier` in front of it
(and a :class:`~tiermem.cache.prefetch.Prefetcher`), then runs every batch of
a trace through it and reports what that cost::

    trace batches ──► [rename keys to store tables] ──► warm-up (first N batches)
                                                   └──► measured batches ──► report

The tier, cache and prefetcher are one :class:`~tiermem.stack.TierStack`.
Without a model, each batch is pooled (``tier.pool``: the embedding stage
alone). With a model (a :class:`ReplayModel` the caller builds, e.g.
``runtime.CheckpointModel(path)``: this module knows no runtime) the model
is opened over the same tier, cache and prefetcher and the batches go
through its ``predict_stream`` with the pipeline on (embedding of batch i+1
overlaps the MLPs of batch i); the predictions can be saved.
A trace without dense features is fed zeros for the dense input (the report
says ``"dense": "zeros"``), which exercises the same code path.

Profile and warm-up
-------------------
The first ``profile_batches`` batches (default: 10 % of the trace, as in
:mod:`traces.tuning`) are the popularity profile of ``static``/``hybrid``
(pinned before anything runs) and a **warm-up** for every policy: they are
pooled through the cache (no model, no prefetch), then the counters are
snapshotted and the report covers only the batches after them. The tuner
(:func:`traces.tuning.simulate`) uses the same convention, so its hit and
miss counts equal this replay's without prefetch. (With a model, the
session orders each batch's tables as the model does; the per-batch
first-occurrence order then follows the model's table order instead of the
trace's, which can shift counts slightly when the two orders differ.)
A trace that cannot be iterated twice (a generator) has its warm-up batches
held in memory for the static/hybrid profile.

Batch latency
-------------
Without a model: the wall time of each batch's ``pool`` (including waits for
prefetched rows still being read). With a model (pipelined): the time between
consecutive completed batches, i.e. the per-batch service time of the
pipeline. Percentiles are over the measured batches.

Device reads
------------
``reads.cold`` counts the rows, bytes and operations the *demand path* read
from the cold tier (misses and bypasses); rows read by the prefetcher show up
in ``prefetch.issued`` (and their bytes in ``prefetch.bytes``), not in
``reads.cold``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tiermem.atomicio import chmod_default
from tiermem.config import TierConfig, TierKind
from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.kernels import kernel_census
from tiermem.stack import open_stack
from tiermem.stats import TableStats
from traces.tuning import (
    DEFAULT_PINNED_FRACTION,
    cache_config,
    default_profile_batches,
    table_mismatch,
)

if TYPE_CHECKING:
    from tiermem.cache.cache import CacheConfig
    from tiermem.cache.prefetch import PrefetchConfig
    from tiermem.format import StoreInfo

__all__ = ["ReplayModel", "check_trace_rows", "replay", "write_json_atomic"]

UNKNOWN_LENGTH_PROFILE_BATCHES = 1
"""Warm-up batches of a trace whose length is unknown up front (a re-batched Meta trace,
Criteo TSV): 10 % of an unknown count cannot be taken, so one batch warms up."""


class ReplayModel(Protocol):
    """A model :func:`replay` runs predictions with, opened over the replay's tier, cache and
    prefetcher (``runtime.CheckpointModel``: a DLRM checkpoint as an ``InferenceSession``).

    ``open`` returns a session that owns what it opened (``close()``) and has
    ``table_names`` (the model's tables, as store names), ``tier`` and
    ``prefetcher`` (what batches go through: their counters are the report),
    ``dense.config.num_dense``, ``warmup()`` (compile every kernel, returns
    its report) and ``predict_stream(batches, pipeline=True)`` (``(dense,
    sparse)`` pairs in, predictions out, in order).
    """

    @property
    def name(self) -> str:
        """What the report's ``model`` says (the checkpoint's path)."""
        ...

    def open(self, store: StoreInfo, *, tier: TierConfig, cache: CacheConfig | None,
             prefetch: PrefetchConfig | None) -> Any: ...


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON into a temporary file next to ``path`` and rename it into place."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {out}: folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=parent)
    try:
        chmod_default(fd)  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _save_npy_atomic(path: str | os.PathLike[str], arr: np.ndarray) -> Path:
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {out}: folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp.npy", dir=parent)
    try:
        chmod_default(fd)
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# -- trace handling --------------------------------------------------------------------

def _open(trace: Any) -> Any:
    if isinstance(trace, (str, os.PathLike)):
        from traces.formats import open_trace

        return open_trace(trace)
    return trace


def _reiterable(trace: Any) -> bool:
    """Whether ``iter(trace)`` starts over (a Trace, a list) rather than resuming."""
    try:
        return iter(trace) is not trace
    except TypeError:
        raise ConfigError(f"the trace must be iterable, got {type(trace).__name__}") from None


def _length(trace: Any) -> int | None:
    try:
        return len(trace)
    except TypeError:
        return None


def _unpack(batch: Any) -> tuple[np.ndarray | None, SparseFeatures]:
    if isinstance(batch, SparseFeatures):
        return None, batch
    sp = getattr(batch, "sparse", None)
    if isinstance(sp, SparseFeatures):
        return getattr(batch, "dense", None), sp
    if isinstance(batch, tuple) and len(batch) >= 2 and isinstance(batch[1], SparseFeatures):
        return batch[0], batch[1]
    raise InvalidBatchError(f"expected TraceBatch, (dense, sparse) or SparseFeatures batches, "
                            f"got {type(batch).__name__}")


class _Renamer:
    """Trace keys -> store table names (by name, or through ``table_map``), checked once."""

    def __init__(self, store_names: list[str], table_map: Mapping[str, str] | None) -> None:
        self.store = store_names
        self.map = dict(table_map or {})
        self._last: tuple[str, ...] | None = None
        self._new: tuple[str, ...] = ()

    def check(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        if keys == self._last:
            return self._new
        bad_map = [k for k in self.map if k not in keys]
        if bad_map:
            raise ConfigError(f"--table-map names trace table(s) {bad_map[:8]} that the trace "
                              f"lacks; trace tables: {list(keys)[:16]}")
        new = tuple(self.map.get(k, k) for k in keys)
        missing = [f"{k}" + (f" (-> {n})" if n != k else "")
                   for k, n in zip(keys, new, strict=True) if n not in self.store]
        if missing:
            raise ConfigError(table_mismatch(keys, self.store, missing))
        if len(set(new)) != len(new):
            raise ConfigError(f"the table map sends two trace tables to one store table: {new}")
        self._last, self._new = keys, new
        return new

    def __call__(self, sf: SparseFeatures) -> SparseFeatures:
        new = self.check(sf.keys)
        if new == sf.keys:
            return sf
        return SparseFeatures(new, sf.values, sf.offsets, sf.weights)


def check_trace_rows(trace: Any, rename: Any, store_rows: Mapping[str, int]) -> None:
    """Ids of the trace beyond the store's tables, found before anything runs.

    The trace's metadata (``rows``: declared, or max id + 1) settles it when it
    fits the store; otherwise (larger, or unknown) one vectorized pass over a
    re-readable trace finds the first table whose max id the store lacks.
    ``rename``: trace keys -> store names (a ``_Renamer``, or a mapping).
    A one-shot stream is left to the per-batch check.
    """
    keys = getattr(trace, "keys", None)
    if keys is None:
        return
    keys = tuple(keys)
    names = rename.check(keys) if hasattr(rename, "check") else tuple(
        dict(rename or {}).get(k, k) for k in keys)
    try:
        rows = getattr(trace, "rows", None)
    except Exception:  # a reader that cannot know its rows cheaply
        rows = None
    if rows is not None and all(int(r) <= store_rows[n] for r, n in zip(rows, names,
                                                                          strict=True)):
        return
    if not _reiterable(trace):
        return
    cap = np.asarray([store_rows[n] for n in names], np.int64)
    for i, b in enumerate(trace):
        sf = _unpack(b)[1]
        if sf.keys != keys:
            return  # the per-batch check names this
        ends = sf.offsets[np.arange(sf.num_tables + 1) * sf.batch_size]
        nz = np.flatnonzero(ends[1:] > ends[:-1])
        if not nz.size:
            continue
        mx = np.maximum.reduceat(sf.values, ends[:-1][nz])
        bad = np.flatnonzero(mx >= cap[nz])
        if bad.size:
            t = int(nz[bad[0]])
            raise ConfigError(
                f"trace table {keys[t]}" + (f" (-> {names[t]})" if names[t] != keys[t] else "")
                + f" has ids up to {int(mx[bad[0]])} (batch {i}), but the store's table "
                f"{names[t]} has {int(cap[t])} rows; generate the trace for this store "
                "(`tiermem trace-generate OUT --for-store STORE`) or replay on a store with "
                "those rows")


def _percentiles(lat_s: list[float]) -> dict[str, float]:
    if not lat_s:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    a = np.asarray(lat_s) * 1e3
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(a.max()),
            "mean": float(a.mean())}


def _snapshot(tier: Any) -> dict[str, TableStats]:
    with tier.stats._lock:
        return {k: TableStats(**asdict(v)) for k, v in tier.stats.tables.items()}


def _delta(after: dict[str, TableStats], before: dict[str, TableStats]) -> dict[str, TableStats]:
    out = {}
    for k, a in after.items():
        b = before.get(k, TableStats())
        out[k] = TableStats(**{f: getattr(a, f) - getattr(b, f) for f in asdict(a)})
    return out


def _cache_delta(tier: Any, before: dict[str, Any]) -> dict[str, Any]:
    now = tier.cache_stats()
    out: dict[str, Any] = {}
    for k, v in now.items():
        if isinstance(v, dict) and "hits" in v:
            b = before.get(k, {})
            out[k] = {f: (x - b.get(f, 0) if f in ("hits", "misses", "admissions", "evictions",
                                                     "rejected", "bypassed") else x)
                      for f, x in v.items()}
    return out


# -- replay ------------------------------------------------------------------------------

def replay(store: Any, trace: Any, *, tier: str = "ssd", policy: str | None = None,
           cache_size: str | int | None = None, admission: str | None = None,
           pinned_fraction: float = DEFAULT_PINNED_FRACTION, dynamic: str = "lru",
           prefetch_lookahead: int = 0, io_threads: int = 64, direct_io: bool = False,
           model: ReplayModel | None = None, profile_batches: int | None = None,
           max_batches: int | None = None, table_map: Mapping[str, str] | None = None,
           progress: bool = True, predictions_out: str | os.PathLike[str] | None = None,
           report_out: str | os.PathLike[str] | None = None,
           tier_options: Mapping[str, Any] | None = None,
           prefetch_async: bool = False) -> dict[str, Any]:
    """Run a trace through a tier (+ cache, prefetcher, model) and report the cost.

    Parameters
    ----------
    store : path or StoreInfo
        The embedding tables.
    trace : path of a native trace, a Trace, or an iterable of TraceBatch
        Its keys are matched to the store's tables by name (``table_map``
        renames trace names to store names).
    tier : {"ssd", "cxl", "dram"}
        The tier that holds the tables.
    policy : str, optional
        Cache policy (``lru lfu fifo clock s3fifo static hybrid``); None with
        no ``cache_size``: no cache. Given a ``cache_size`` alone: ``lru``.
    cache_size : int or str, optional
        Rows (``100000``), a share of each pool's rows = of the tables' bytes
        (``"5%"``), or bytes (``"256MiB"``); see :func:`traces.tuning.parse_size`.
    admission : {None, "tinylfu"}
    pinned_fraction : float
        hybrid: share of the capacity pinned from the profile (default 0.5).
    dynamic : str
        hybrid: the dynamic policy.
    prefetch_lookahead : int
        Batches read ahead by the prefetcher (0: none; needs a cache).
    prefetch_async : bool
        Let the prefetcher's thread race the batches, as a server would. By
        default (without a model) each batch waits until the prefetches
        submitted before it are done, so hit rates are the same on every run;
        racing, they vary with thread timing. With a model the pipeline's
        threads race anyway (the report's ``prefetch.mode`` says which).
    io_threads, direct_io : SSD tier knobs.
    model : ReplayModel, optional
        Run full predictions (pipelined) instead of pooling only, e.g.
        ``runtime.CheckpointModel("model.pt")`` (a DLRM checkpoint).
    profile_batches : int, optional
        Profile/warm-up batches, not measured (default 10 % of the trace;
        of a trace of unknown length, :data:`UNKNOWN_LENGTH_PROFILE_BATCHES`).
    max_batches : int, optional
        Batches of the trace to use, warm-up included.
    progress : bool
        A progress bar on stderr.
    predictions_out : path, optional
        Save the measured batches' predictions (``.npy``; needs ``model``).
    report_out : path, optional
        Also write the report as JSON (atomically).
    tier_options : mapping, optional
        Extra :class:`TierConfig` fields (e.g. ``cxl_latency_ns``).

    Returns
    -------
    dict
        The report (see the module docstring and the README for the fields).
    """
    from tiermem.format import StoreInfo, open_store

    kind = TierKind.parse(tier)
    if prefetch_lookahead < 0:
        raise ConfigError(f"prefetch lookahead must be >= 0, got {prefetch_lookahead}")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1, got {max_batches}")
    if profile_batches is not None and profile_batches < 0:
        raise ConfigError(f"profile_batches must be >= 0, got {profile_batches}")
    if predictions_out is not None and model is None:
        raise ConfigError("predictions need a model (--model CKPT)")
    if policy is None and cache_size is not None:
        policy = "lru"
    cache = None
    if policy is not None:
        if cache_size is None:
            raise ConfigError(f"policy {policy!r} needs a cache size (e.g. '5%', 100000 rows, "
                              "'256MiB')")
        cache = cache_config(policy, cache_size, admission=admission,
                             pinned_fraction=pinned_fraction, dynamic=dynamic)
    elif admission is not None:
        raise ConfigError("admission needs a cache (policy and cache size)")
    if prefetch_lookahead and cache is None:
        raise ConfigError("prefetch needs a cache (policy and cache size)")
    if model is not None and not callable(getattr(model, "open", None)):
        raise ConfigError(f"model must be a model to open (runtime.CheckpointModel(path) for a "
                          f"checkpoint), got {type(model).__name__} {model!r}")
    info = store if isinstance(store, StoreInfo) else open_store(store)
    trace_path = str(trace) if isinstance(trace, (str, os.PathLike)) else None
    trace = _open(trace)
    if trace_path is None and getattr(trace, "path", None) is not None:
        trace_path = str(trace.path)
    rename = _Renamer(info.names, table_map)
    tkeys = getattr(trace, "keys", None)
    if tkeys is not None:
        rename.check(tuple(tkeys))
        check_trace_rows(trace, rename, {t.name: t.spec.rows for t in info.tables})

    # how many batches, and how many of them profile/warm up
    n_total = _length(trace)
    if max_batches is not None:
        n_total = max_batches if n_total is None else min(n_total, max_batches)
    if profile_batches is None:
        profile_batches = (UNKNOWN_LENGTH_PROFILE_BATCHES if n_total is None
                           else default_profile_batches(n_total))
    n_warm = profile_batches if n_total is None else min(profile_batches, n_total)
    if n_total is not None and n_total - n_warm < 1:
        raise ConfigError(f"nothing to measure: {n_total} batch(es), {n_warm} of them "
                          "profile/warm-up")

    tcfg = TierConfig(kind=kind, io_threads=io_threads, direct_io=direct_io,
                      **dict(tier_options or {}))
    prefetch_cfg = None
    if prefetch_lookahead:
        from tiermem.cache.prefetch import PrefetchConfig

        prefetch_cfg = PrefetchConfig(lookahead=prefetch_lookahead,
                                      max_pending=max(8, 2 * prefetch_lookahead))

    # the batches: materialize the warm-up prefix when the trace cannot be read twice
    head: list[Any] | None = None
    source: Iterable[Any] = trace
    if cache is not None and cache.policy in ("static", "hybrid") and not _reiterable(trace):
        it = iter(trace)
        head = []
        for b in it:
            head.append(b)
            if len(head) >= n_warm:
                break
        source = _chain(head, it)

    sess = None
    t_open = time.perf_counter()
    if model is not None:
        sess = owner = model.open(info, tier=tcfg, cache=cache, prefetch=prefetch_cfg)
        missing = [n for n in sess.table_names if tkeys is not None
                   and n not in rename.check(tuple(tkeys))]
        if missing:
            sess.close()
            raise ConfigError(f"the model's table(s) {missing[:8]} are not in the trace; "
                              f"trace tables (as store names): {list(rename._new)[:16]}")
    else:
        owner = open_stack(info, tier=tcfg, cache=cache, prefetch=prefetch_cfg)
    the_tier, prefetcher = owner.tier, owner.prefetcher
    open_seconds = time.perf_counter() - t_open

    try:
        pinned = 0
        if cache is not None and cache.policy in ("static", "hybrid") and n_warm:
            prof_src = head if head is not None else trace
            pinned = the_tier.pin_hot(_profile(prof_src, n_warm, rename))
        return _run(info, trace, trace_path, source, the_tier, sess, prefetcher, rename,
                    n_warm=n_warm, max_batches=max_batches, pinned=pinned, cache=cache,
                    kind=kind, tcfg=tcfg, model=None if model is None else model.name,
                    prefetch_lookahead=prefetch_lookahead,
                    progress=progress, predictions_out=predictions_out, report_out=report_out,
                    n_total=n_total, open_seconds=open_seconds,
                    prefetch_sync=not prefetch_async)
    finally:
        owner.close()


def _chain(head: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from head
    yield from rest


def _profile(batches: Iterable[Any], n: int, rename: _Renamer) -> dict[str, np.ndarray]:
    """table -> every id of the first ``n`` batches (what ``CachedTier.pin_hot`` takes)."""
    parts: dict[str, list[np.ndarray]] = {}
    for i, b in enumerate(batches):
        if i >= n:
            break
        _, sf = _unpack(b)
        sf = rename(sf)
        for t, k in enumerate(sf.keys):
            s, e = sf.table_range(t)
            parts.setdefault(k, []).append(sf.values[s:e])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _run(info: Any, trace: Any, trace_path: str | None, source: Iterable[Any], tier: Any,
         sess: Any, prefetcher: Any, rename: _Renamer, *, n_warm: int, max_batches: int | None,
         pinned: int, cache: Any, kind: TierKind, tcfg: TierConfig, model: str | None,
         prefetch_lookahead: int, progress: bool, predictions_out: Any, report_out: Any,
         n_total: int | None, open_seconds: float, prefetch_sync: bool = True
         ) -> dict[str, Any]:
    from tqdm.auto import tqdm

    it = iter(source)
    count = [0]

    def pull() -> tuple[np.ndarray | None, SparseFeatures] | None:
        if max_batches is not None and count[0] >= max_batches:
            return None
        try:
            b = next(it)
        except StopIteration:
            return None
        dense, sf = _unpack(b)
        count[0] += 1
        return dense, rename(sf)

    # every kernel the run uses compiled (or loaded from Numba's cache) first: no
    # compilation inside the warm-up batches' or the measured batches' times
    if sess is not None:
        compile_rep = sess.warmup()
    else:
        from tiermem.warmup import warm_tier

        compile_rep = warm_tier(tier, prefetch=getattr(prefetcher, "config", None))
    bar = tqdm(total=n_total, desc="replay", unit="batch", disable=not progress, leave=False)
    # warm-up: pool through the cache, no model, no prefetch, not measured
    t0 = time.perf_counter()
    for _ in range(n_warm):
        x = pull()
        if x is None:
            break
        tier.pool(x[1])
        bar.update(1)
    warm_seconds = time.perf_counter() - t0
    before = _snapshot(tier)
    cache_before = tier.cache_stats() if cache is not None else {}
    pf_before = asdict(tier.prefetch_counters) if cache is not None else {}

    census = kernel_census()
    lat: list[float] = []
    samples = lookups = 0
    preds: list[np.ndarray] = []
    dense_kind: str | None = None
    t_start = time.perf_counter()
    interrupted = False
    sync = prefetch_sync and sess is None
    try:
        if sess is None:
            window: deque[SparseFeatures] = deque()
            ahead = prefetch_lookahead

            def fill() -> None:
                while len(window) < 1 + ahead:
                    x = pull()
                    if x is None:
                        return
                    if prefetcher is not None and window:  # not the batch about to run
                        prefetcher.submit(x[1])
                    window.append(x[1])

            fill()
            while window:
                sf = window.popleft()
                fill()
                if sync and prefetcher is not None:
                    # deterministic: what was submitted is in the cache before this batch
                    prefetcher.drain()
                t1 = time.perf_counter()
                tier.pool(sf)
                lat.append(time.perf_counter() - t1)
                samples += sf.batch_size
                lookups += int(sf.values.size)
                bar.update(1)
        else:
            num_dense = sess.dense.config.num_dense
            sizes: deque[tuple[int, int]] = deque()

            def feed() -> Iterator[tuple[Any, SparseFeatures]]:
                nonlocal dense_kind
                while True:
                    x = pull()
                    if x is None:
                        return
                    dense, sf = x
                    if dense is None:
                        dense = np.zeros((sf.batch_size, num_dense), np.float32)
                        dense_kind = "zeros" if dense_kind in (None, "zeros") else "mixed"
                    else:
                        dense_kind = "trace" if dense_kind in (None, "trace") else "mixed"
                    sizes.append((sf.batch_size, int(sf.values.size)))
                    yield dense, sf

            t1 = time.perf_counter()
            for p in sess.predict_stream(feed(), pipeline=True):
                now = time.perf_counter()
                lat.append(now - t1)
                t1 = now
                b, n = sizes.popleft()
                samples += b
                lookups += n
                if predictions_out is not None:
                    preds.append(p)
                bar.update(1)
    except KeyboardInterrupt:  # Ctrl-C: report the batches done so far
        interrupted = True
    if prefetcher is not None:
        prefetcher.drain(timeout=60)
    seconds = time.perf_counter() - t_start
    bar.close()
    batches = len(lat)
    if batches == 0 and not interrupted:
        raise ConfigError(f"nothing to measure: the trace has {count[0]} batch(es) and "
                          f"{n_warm} are used as the profile/warm-up")

    per = _delta(_snapshot(tier), before)
    rep = _report(info, trace, trace_path, tier, per, cache, kind, tcfg, model, batches, samples,
                  lookups, seconds, lat, n_warm, warm_seconds, open_seconds, pinned,
                  prefetch_lookahead, prefetcher, cache_before, pf_before, dense_kind)
    rep["interrupted"] = interrupted
    rep["kernel_warmup"] = {**compile_rep,
                            "compiled_while_measuring": kernel_census().since(census).signatures}
    if prefetcher is not None:
        rep["prefetch"]["mode"] = "sync" if sync else "async"
    if predictions_out is not None:
        arr = np.concatenate(preds) if preds else np.zeros(0, np.float32)
        _save_npy_atomic(predictions_out, arr)
        rep["predictions"] = {"path": str(predictions_out), "count": int(arr.size)}
    if report_out is not None:
        write_json_atomic(report_out, rep)
    return rep


def _rate(n: float, s: float) -> float:
    return n / s if s > 0 else 0.0


def _report(info: Any, trace: Any, trace_path: str | None, tier: Any,
            per: dict[str, TableStats], cache: Any, kind: TierKind, tcfg: TierConfig,
            model: str | None, batches: int, samples: int, lookups: int, seconds: float,
            lat: list[float], n_warm: int, warm_seconds: float, open_seconds: float,
            pinned: int, prefetch_lookahead: int, prefetcher: Any,
            cache_before: dict[str, Any], pf_before: dict[str, int],
            dense_kind: str | None) -> dict[str, Any]:
    row_bytes = {t.name: t.spec.row_bytes + (8 if t.spec.dtype.quantized else 0)
                 for t in info.tables}
    tot = TableStats()
    tables: dict[str, Any] = {}
    for name, s in per.items():
        tot.add(s)
        d = asdict(s)
        if cache is not None:
            d["hit_rate"] = s.hit_rate
            d["lookup_hit_rate"] = _rate(s.hit_lookups, s.lookups)
        tables[name] = d
    rep: dict[str, Any] = {
        "store": str(info.path), "trace": trace_path,
        "tier": kind.value, "io_threads": tcfg.io_threads, "direct_io": tcfg.direct_io,
        "model": model,
        "dense": dense_kind if model is not None else None,
        "batches": batches, "samples": samples, "lookups": lookups,
        "seconds": seconds,
        "profile_batches": n_warm,
        "warmup_seconds": warm_seconds, "open_seconds": open_seconds,
        "throughput": {"batches_per_s": _rate(batches, seconds),
                       "samples_per_s": _rate(samples, seconds),
                       "lookups_per_s": _rate(lookups, seconds)},
        "latency_ms": _percentiles(lat),
    }
    cold: dict[str, Any] = {
        "kind": kind.value, "rows": tot.rows_read, "bytes": tot.bytes_read,
        "read_ops": tot.read_ops, "read_seconds": tot.read_seconds,
        "modeled_delay_seconds": tot.modeled_delay_seconds,
        "device_read_MBps": _rate(tot.bytes_read / 1e6, tot.read_seconds),
        "device_read_ops_per_s": _rate(tot.read_ops, tot.read_seconds),
        "read_MBps_wall": _rate(tot.bytes_read / 1e6, seconds)}
    if cache is None:
        rep["cache"] = None
        rep["reads"] = {"cold": cold}
    else:
        hit_bytes = sum(per[n].cache_hits * row_bytes[n] for n in per)
        hit_lookup_bytes = sum(per[n].hit_lookups * row_bytes[n] for n in per)
        hit_rows = sum(per[n].cache_hits for n in per)
        rep["cache"] = {
            **cache.to_dict(), "capacity_rows": tier.capacity_rows, "capacity_bytes": tier.nbytes,
            "pinned_rows": pinned,
            "hits": tot.cache_hits, "misses": tot.cache_misses,
            "accesses": tot.cache_hits + tot.cache_misses,
            "hit_rate": tot.hit_rate, "hit_lookups": tot.hit_lookups,
            "lookup_hit_rate": _rate(tot.hit_lookups, tot.lookups),
            "pools": _cache_delta(tier, cache_before)}
        rep["reads"] = {"cache": {"kind": "dram", "rows": hit_rows, "bytes": int(hit_bytes),
                                  "lookups": tot.hit_lookups,
                                  "lookup_bytes": int(hit_lookup_bytes)},
                        "cold": cold}
        pf = asdict(tier.prefetch_counters)
        pfd = {k: v - pf_before.get(k, 0) for k, v in pf.items()}
        if prefetcher is not None:
            # prefetch reads are one pool wide; all pools' rows cost row_bytes of their pool
            rb = max(row_bytes.values()) if row_bytes else 0
            pfd["bytes"] = pfd["issued"] * rb if len(set(row_bytes.values())) == 1 else None
            pfd["dropped_batches"] = prefetcher.dropped_batches
            pfd["errors"] = [repr(e) for e in prefetcher.errors]
        rep["prefetch"] = {"lookahead": prefetch_lookahead, **pfd}
    rep["tables"] = tables
    rep["total"] = {k: v for k, v in asdict(tot).items()}
    if cache is not None:
        rep["total"]["hit_rate"] = tot.hit_rate
    for k, v in list(rep["latency_ms"].items()):
        if not math.isfinite(v):
            rep["latency_ms"][k] = None
    return rep
