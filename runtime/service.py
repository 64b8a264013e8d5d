"""The embeddable serving runtime: dynamic batching, deadlines, readiness, metrics.

    runtime = ServingRuntime(session, ServingConfig(BatcherConfig(max_batch_size=2048,
                                                                  max_delay_ms=2)))
    preds = runtime.predict(dense, sparse)                  # blocking, thread-safe
    fut = runtime.submit(dense, sparse, deadline_ms=50)     # concurrent.futures.Future
    preds = await runtime.predict_async(dense, sparse)      # asyncio
    runtime.metrics()                                       # counters, histograms, tiers
    runtime.close()                                         # drain, then stop

Requests of any size are merged by a :class:`~runtime.batcher.DynamicBatcher`
(see there for the batching, backpressure, deadline and shutdown rules). The
runtime is *ready* once the session's warm-up has run (every Numba kernel
variant its batches use compiled or loaded from the on-disk cache, the MLPs
traced: see :meth:`~runtime.session.InferenceSession.warmup`) and, if a
popularity profile was given, the cache was filled.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.batcher import (
    MAX_DEADLINE_S,
    BatcherClosed,
    BatcherConfig,
    DeadlineExceeded,
    DynamicBatcher,
    Overloaded,
    OverloadMode,
    _Request,
)
from tiermem.config import ConfigDict
from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures

if TYPE_CHECKING:
    from runtime.protocol import Session

__all__ = [
    "BatcherClosed",
    "BatcherConfig",
    "DeadlineExceeded",
    "Histogram",
    "OverloadMode",
    "Overloaded",
    "ServingConfig",
    "ServingRuntime",
]

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
"""Upper bounds of the latency histogram (seconds)."""
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                         16384, 65536)
"""Upper bounds of the batch-size histogram (samples per predict)."""
BATCH_REQUEST_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Upper bounds of the requests-per-batch histogram."""


@dataclass(frozen=True)
class ServingConfig(ConfigDict):
    """How :class:`ServingRuntime` batches, queues and warms up."""

    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    """Batch size and delay, queue bounds, overload rule, per-request limits, workers
    (:class:`~runtime.batcher.BatcherConfig`; with ``workers=W`` give the session
    ``RuntimeConfig(num_threads=cores // W)``)."""
    default_deadline_ms: float | None = None
    """Deadline of requests that give none (None: no deadline)."""
    warmup: bool = True
    """Warm the session up at start (every kernel compiled or loaded) before reporting
    ready."""

    def __post_init__(self) -> None:
        if not isinstance(self.batcher, BatcherConfig):
            raise ConfigError(f"ServingConfig.batcher must be a BatcherConfig, got "
                              f"{self.batcher!r}")
        if self.default_deadline_ms is not None and (
                isinstance(self.default_deadline_ms, bool)
                or not isinstance(self.default_deadline_ms, (int, float))
                or not 0 < self.default_deadline_ms <= MAX_DEADLINE_S * 1e3):
            raise ConfigError(f"ServingConfig.default_deadline_ms must be None or a number > 0, "
                              f"got {self.default_deadline_ms!r}")
        if not isinstance(self.warmup, bool):
            raise ConfigError(f"ServingConfig.warmup must be a bool, got {self.warmup!r}")


class Histogram:
    """A fixed-bucket histogram (Prometheus semantics) plus a window of recent values.

    ``counts[i]`` counts observations ``<= bounds[i]`` (not cumulative; the last
    entry is +Inf). Quantiles come from the last ``window`` observations.
    """

    def __init__(self, bounds: Sequence[float], window: int = 20000) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._n = 0
        self._recent: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.bounds, v)
        with self._lock:
            self._counts[i] += 1
            self._sum += v
            self._n += 1
            self._recent.append(v)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            counts = list(self._counts)
            recent = np.asarray(self._recent, dtype=np.float64)
            s, n = self._sum, self._n
        q = (np.percentile(recent, [50, 90, 99, 99.9]).tolist() if recent.size
             else [float("nan")] * 4)
        return {"bounds": list(self.bounds), "counts": counts, "sum": s, "count": n,
                "p50": q[0], "p90": q[1], "p99": q[2], "p999": q[3]}


FAULT_KINDS = ("store", "shard", "internal", "nonfinite")
"""Server-side faults counted (and turning readiness off for ``FAULT_WINDOW_S``)."""
FAULT_WINDOW_S = 30.0
"""How long after a store/shard/internal fault ``/readyz`` reports the service degraded."""


class ServingRuntime:
    """A thread-safe, batching front of an :class:`InferenceSession`.

    Parameters
    ----------
    session : Session
        The model; the runtime does not close it unless ``owns_session``.
    config : ServingConfig, optional
    warm_profile : mapping of table -> ids, optional
        Popularity profile to fill the cache with during warm-up (``session.warm``).
    owns_session : bool
        Close the session in :meth:`close`.
    """

    def __init__(self, session: Session, config: ServingConfig | None = None, *,
                 warm_profile: Mapping[str, np.ndarray] | None = None,
                 owns_session: bool = False) -> None:
        self.session = session
        self.config = config or ServingConfig()
        self._owns_session = owns_session
        self._latency = Histogram(LATENCY_BUCKETS_S)
        self._batch_size = Histogram(BATCH_SIZE_BUCKETS)
        self._batch_requests = Histogram(BATCH_REQUEST_BUCKETS)
        self._batch_seconds = Histogram(LATENCY_BUCKETS_S)
        self.batcher = DynamicBatcher(session, self.config.batcher,
                                      on_batch=self._on_batch, on_done=self._on_done)
        self._ready = threading.Event()
        self.warmup_error: BaseException | None = None
        self.warmup_report: dict[str, Any] | None = None
        self._closed = False
        self._started = time.time()
        self._warm_thread: threading.Thread | None = None
        self._fault_lock = threading.Lock()
        self.fault_counts = dict.fromkeys(FAULT_KINDS, 0)
        self._last_fault: tuple[float, str, str] | None = None
        self._room_lock = threading.Lock()
        self._room_events: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}
        self.batcher.on_room = self._on_room
        if self.config.warmup or warm_profile is not None:
            self._warm_thread = threading.Thread(target=self._warm, args=(warm_profile,),
                                                 name="tiermem-warmup", daemon=True)
            self._warm_thread.start()
        else:
            self._ready.set()

    # -- warm-up ---------------------------------------------------------------------
    def _warm(self, profile: Mapping[str, np.ndarray] | None) -> None:
        try:
            if self.config.warmup:
                # every kernel variant the batches will run
                self.warmup_report = self.session.warmup()
                d, s = self.example_batch(2)
                self.session.predict(d, s)
                self.session.predict(d[:1], _head(s, 1))
            if profile is not None:
                self.session.warm(profile)
            self._ready.set()
        except BaseException as e:  # noqa: BLE001 - reported via warmup_error / readyz
            self.warmup_error = e

    def example_batch(self, batch_size: int = 2) -> tuple[np.ndarray, SparseFeatures]:
        """A valid batch (zeros; id 0 once per table and sample), e.g. for warm-up."""
        names = self.batcher.table_names
        dense = np.zeros((batch_size, self.batcher.num_dense), np.float32)
        T = len(names)
        sparse = SparseFeatures(names, np.zeros(T * batch_size, np.int64),
                                np.arange(T * batch_size + 1, dtype=np.int64))
        return dense, sparse

    @property
    def ready(self) -> bool:
        """True once warm-up finished, while open and not degraded (:attr:`degraded_reason`)."""
        return self._ready.is_set() and not self._closed and self.degraded_reason is None

    def record_fault(self, kind: str, message: str) -> None:
        """Count a server-side fault (one of :data:`FAULT_KINDS`); readiness turns off
        for ``FAULT_WINDOW_S`` after a store, shard or internal one."""
        with self._fault_lock:
            self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1
            self._last_fault = (time.monotonic(), kind, message)

    @property
    def degraded_reason(self) -> str | None:
        """Why the service should get no traffic now (None: healthy)."""
        if not self.batcher.reaper_alive:
            return f"the deadline thread stopped ({self.batcher.reaper_error!r})"
        last = self._last_fault
        if last is not None:
            age = time.monotonic() - last[0]
            if age < FAULT_WINDOW_S:
                return f"{last[1]} fault {age:.1f} s ago: {last[2]}"
        return None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until ready (or ``timeout``); re-raises a warm-up failure."""
        t_end = None if timeout is None else time.monotonic() + timeout
        while not self._ready.is_set():
            if self.warmup_error is not None:
                raise self.warmup_error
            left = None if t_end is None else t_end - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._ready.wait(0.05 if left is None else min(0.05, left))
        return self.ready

    # -- requests ------------------------------------------------------------------------
    def _deadline(self, deadline_ms: float | None) -> float | None:
        ms = self.config.default_deadline_ms if deadline_ms is None else deadline_ms
        if ms is None:
            return None
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) \
                or not 0 < ms <= MAX_DEADLINE_S * 1e3:
            raise ConfigError(f"deadline_ms must be a number > 0 and at most "
                              f"{MAX_DEADLINE_S * 1e3:.0f} (one hour), got {ms!r}")
        return time.monotonic() + float(ms) / 1e3

    def submit(self, dense: Any, sparse: SparseFeatures | Mapping[str, Any], *,
               deadline_ms: float | None = None) -> Future[np.ndarray]:
        """Queue a request; the Future resolves to its ``(B,)`` float32 predictions.

        Raises ``InvalidBatchError`` (malformed request), :class:`Overloaded`,
        :class:`DeadlineExceeded` or :class:`BatcherClosed` at once; the Future
        may fail with :class:`DeadlineExceeded` later.
        """
        return self.batcher.submit(dense, sparse, deadline=self._deadline(deadline_ms))

    def predict(self, dense: Any, sparse: SparseFeatures | Mapping[str, Any], *,
                deadline_ms: float | None = None) -> np.ndarray:
        """Predictions for one request, blocking until its batch ran."""
        return self.submit(dense, sparse, deadline_ms=deadline_ms).result()

    async def predict_async(self, dense: Any, sparse: SparseFeatures | Mapping[str, Any], *,
                            deadline_ms: float | None = None, t_start: float | None = None
                            ) -> np.ndarray:
        """:meth:`predict` for asyncio; cancelling the task drops a request not yet running.

        ``overload="wait"`` waits on the event loop for room, no thread and no
        executor queue: ``wait_timeout_s`` counts from ``t_start`` (monotonic
        seconds; default now), so time spent before (e.g. decoding) counts too.
        """
        req = self.batcher.prepare(dense, sparse, deadline=self._deadline(deadline_ms),
                                   t_start=t_start)
        if isinstance(req, Future):
            fut = req
        elif self.config.batcher.overload == "reject":
            fut = self.batcher.admit(req, wait=False)
        else:
            fut = await self._admit_waiting(req)
        return await asyncio.wrap_future(fut)

    async def _admit_waiting(self, req: _Request) -> Future[np.ndarray]:
        loop = asyncio.get_running_loop()
        limit = req.t_submit + self.config.batcher.wait_timeout_s
        if req.deadline is not None:
            limit = min(limit, req.deadline)
        while True:
            room = self._room_event(loop)  # before trying: a wake-up after it is not missed
            fut = self.batcher.try_admit(req)  # raises once the deadline passed
            if fut is not None:
                return fut
            left = limit - time.monotonic()
            if left <= 0:
                if req.deadline is not None and limit >= req.deadline:
                    continue  # try_admit raises DeadlineExceeded
                raise self.batcher.reject(
                    f"queue stayed full for {self.config.batcher.wait_timeout_s} s")
            try:
                await asyncio.wait_for(room.wait(), min(left, 0.05))
            except TimeoutError:
                pass

    def _room_event(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        with self._room_lock:
            ev = self._room_events.get(loop)
            if ev is None:
                ev = self._room_events[loop] = asyncio.Event()
            return ev

    def _on_room(self) -> None:
        """Batcher thread: wake the event loops whose requests wait for room."""
        with self._room_lock:
            events = list(self._room_events.items())
            self._room_events.clear()
        for loop, ev in events:
            if not loop.is_closed():
                loop.call_soon_threadsafe(ev.set)

    # -- metrics ---------------------------------------------------------------------------
    def _on_batch(self, samples: int, requests: int, seconds: float) -> None:
        self._batch_size.observe(samples)
        self._batch_requests.observe(requests)
        self._batch_seconds.observe(seconds)

    def _on_done(self, outcome: str, seconds: float) -> None:
        if outcome == "ok":
            self._latency.observe(seconds)

    def metrics(self) -> dict[str, Any]:
        """A snapshot: request outcomes, histograms, queue depth, tier and cache figures.

        ``requests``: ``submitted`` (accepted), ``completed``, ``failed``,
        ``invalid`` (refused on submit), ``rejected`` (overload; ``queue_expired`` of
        them waited past ``max_queue_delay_ms``),
        ``deadline_missed``, ``cancelled``. ``latency_seconds`` covers completed
        requests, submit to answer. ``tier`` reports the cold tier's reads and,
        with a cache, hit rates and the DRAM it holds.
        """
        snap = self.batcher.snapshot()
        req_keys = ("submitted", "completed", "failed", "invalid", "rejected",
                    "queue_expired", "deadline_missed", "cancelled")
        with self._fault_lock:
            faults = dict(self.fault_counts)
        return {
            "ready": self.ready,
            "degraded": self.degraded_reason,
            "faults": faults,
            "uptime_s": time.time() - self._started,
            "requests": {k: snap[k] for k in req_keys},
            "batches": snap["batches"],
            "samples": snap["samples"],
            "fallbacks": snap["fallbacks"],
            "prefetched_batches": snap["prefetched_batches"],
            "queue": {"requests": snap["queue_requests"], "samples": snap["queue_samples"]},
            "latency_seconds": self._latency.to_dict(),
            "batch_size": self._batch_size.to_dict(),
            "batch_requests": self._batch_requests.to_dict(),
            "batch_seconds": self._batch_seconds.to_dict(),
            "tier": self.session.tier_metrics().to_dict(),
        }

    # -- lifetime ----------------------------------------------------------------------------
    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting; answer (``drain``) or fail what is queued; stop the worker."""
        if self._closed:
            return
        self._closed = True
        self.batcher.close(drain=drain, timeout=timeout)
        if self._warm_thread is not None:
            self._warm_thread.join(timeout)
        if self._owns_session:
            self.session.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ServingRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _head(s: SparseFeatures, n: int) -> SparseFeatures:
    return SparseFeatures.from_tables([(k, ids[: off[n]], off[: n + 1])
                                       for k, (ids, off, _) in ((k, s.table(k)) for k in s.keys)])
