"""Dynamic batching of inference requests in front of an :class:`InferenceSession`.

Callers submit requests of any size; one worker thread merges what is queued
into batches and runs one ``session.predict`` per batch::

    submit(dense_i, sparse_i) ─► validate ─► bounded FIFO ─► worker: merge up to
        max_batch_size samples, or until max_delay_ms after the oldest request
        ─► session.predict(merged) ─► split rows back ─► Future_i.set_result

Rules
-----
- **Validation on submit.** Shapes, dtypes, table names and every id (against
  its table's row count) are checked before a request is queued, so a bad
  request fails alone (its ``submit`` raises :class:`InvalidBatchError`) and
  can never poison a merged batch. Should a merged batch still fail, each of
  its requests is rerun alone, so only the offending one fails.
- **Large requests.** A request of more than ``max_batch_size`` samples is
  never split: it runs as a batch of its own (splitting would only add
  passes over the MLPs; the session pipelines a large batch well already).
- **Backpressure.** The queue holds at most ``max_queue_requests`` requests
  and ``max_queue_samples`` samples (a request larger than the sample bound is
  admitted only into an empty queue, so it is never refused forever). When
  full, ``overload="reject"`` raises :class:`Overloaded` at once;
  ``overload="wait"`` blocks up to ``wait_timeout_s`` (and never past the
  request's deadline), then raises :class:`Overloaded`. The queue may also be
  bounded in time (``max_queue_delay_ms``): a request still queued that long
  after it arrived fails with :class:`Overloaded` (at that moment, or when its
  batch is about to start) instead of running late.
- **Deadlines.** A deadline is the time by which the answer must be there.
  A request fails with :class:`DeadlineExceeded` (counted in
  ``deadline_missed``) when: its ``submit`` comes after the deadline, or the
  service-time estimate (batch seconds fitted as ``fixed + per_sample *
  samples`` over recent batches) says it cannot finish in the time left, even
  starting at once (``submit`` raises; nothing is queued); the deadline passes
  while it waits (at that moment: a reaper thread watches the earliest
  deadline, so it fails even while the workers are busy); its batch is about
  to start and the estimate for that batch says it would end too late; or its
  batch ends after the deadline (the result is discarded). Until a batch has
  run there is no estimate, and only the other rules apply.
- **Prefetch.** Before each batch runs, the requests queued behind it are
  announced to ``session.prefetch`` (merged into batches of up to
  ``max_batch_size`` samples, at most ``prefetch_batches`` of them, each
  request once), so a session with a prefetcher reads their missing rows
  while the current batch computes. Without a prefetcher nothing is done.
- **Shutdown.** :meth:`DynamicBatcher.close` stops accepting (``submit``
  raises :class:`BatcherClosed`), then with ``drain=True`` answers everything
  already accepted before the worker stops; with ``drain=False`` queued
  requests fail with :class:`BatcherClosed`.

Results: merged batches go through the same kernels as single requests;
the pooled embeddings are bit-identical, the MLP outputs may differ in the
last bit (torch's GEMM blocking depends on the number of rows).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tiermem.batch import CheckedFeatures
from tiermem.config import Choice, ConfigDict
from tiermem.errors import ConfigError, InvalidBatchError, TierMemError
from tiermem.features import SparseFeatures
from tiermem.kernels.jagged import finite_copy, merge_key_major

if TYPE_CHECKING:
    from runtime.protocol import Session

__all__ = [
    "BatcherClosed",
    "BatcherConfig",
    "BatcherCounters",
    "DeadlineExceeded",
    "DynamicBatcher",
    "OverloadMode",
    "Overloaded",
    "RequestTooLarge",
    "ServiceTime",
    "concat_features",
]

MAX_DEADLINE_S = 3600.0
"""The furthest deadline a request may set (later ones are a client bug, and a wait
that long overflows the clock)."""
_log = logging.getLogger("tiermem.batcher")


class Overloaded(TierMemError):
    """The request queue is full (or stayed full for ``wait_timeout_s``): retry later."""


class DeadlineExceeded(TierMemError, TimeoutError):
    """The request could not be answered by its deadline (refused, expired or finished late)."""


class BatcherClosed(TierMemError):
    """The batcher is shutting down or closed: it accepts no new requests."""


class OverloadMode(Choice):
    """What a submit does when the queue is full."""

    REJECT = "reject"
    """Raise :class:`Overloaded` at once."""
    WAIT = "wait"
    """Block up to ``wait_timeout_s`` for room, then :class:`Overloaded`."""


class RequestTooLarge(InvalidBatchError):
    """A request holds more samples or ids than one request may (HTTP 413)."""


@dataclass(frozen=True)
class BatcherConfig(ConfigDict):
    """Knobs of :class:`DynamicBatcher`."""

    max_batch_size: int = 2048
    """Most samples merged into one ``predict``; a larger request runs alone."""
    max_delay_ms: float = 2.0
    """Longest a batch waits for more requests, from the arrival of its oldest."""
    max_queue_requests: int = 1024
    """Most requests waiting."""
    max_queue_samples: int = 65536
    """Most samples waiting (an oversized request is admitted into an empty queue)."""
    max_request_samples: int = 65536
    """Most samples in one request; more is refused (:class:`RequestTooLarge`)."""
    max_request_ids: int = 1 << 24
    """Most ids (all tables) in one request; more is refused (:class:`RequestTooLarge`)."""
    overload: OverloadMode = OverloadMode.REJECT
    """When the queue is full: ``reject`` (raise :class:`Overloaded` at once) or ``wait``."""
    wait_timeout_s: float = 1.0
    """``overload="wait"``: longest a submit blocks for room before :class:`Overloaded`."""
    max_queue_delay_ms: float | None = None
    """A bound on the queue in time: a request that has waited longer than this since it
    arrived, its batch not yet started, fails with :class:`Overloaded` (counted in
    ``rejected`` and ``queue_expired``) instead of running late. None: no bound."""
    prefetch_batches: int = 2
    """Upcoming batches announced to the session's prefetcher (0 = none)."""
    workers: int = 1
    """Batches run at once, each on a thread of its own. With few cores, two workers
    whose session runs on ``cores // 2`` threads each keep every core busy with no
    barrier waits (the MLPs of one batch overlap the other's Python steps and
    embedding lookups); one worker on all cores has the lowest latency when idle."""

    def __post_init__(self) -> None:
        for name, lo in (("max_batch_size", 1), ("max_queue_requests", 1),
                         ("max_queue_samples", 1), ("max_request_samples", 1),
                         ("max_request_ids", 1), ("prefetch_batches", 0), ("workers", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{type(self).__name__}.{name} must be an integer >= {lo}, "
                                  f"got {v!r}")
        for name in ("max_delay_ms", "wait_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e6:
                raise ConfigError(f"{type(self).__name__}.{name} must be a number in [0, 1e6), "
                                  f"got {v!r}")
        object.__setattr__(self, "overload", OverloadMode.parse(self.overload))
        v = self.max_queue_delay_ms
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not 0 < v <= MAX_DEADLINE_S * 1e3):
            raise ConfigError(f"{type(self).__name__}.max_queue_delay_ms must be None or a "
                              f"number in (0, {MAX_DEADLINE_S * 1e3:.0f}], got {v!r}")


def concat_features(parts: list[SparseFeatures]) -> SparseFeatures:
    """Concatenate batches with the same keys along the batch dimension.

    Per table ``t``, the ids of part 0, part 1, ... follow each other and the
    bag offsets of each part are shifted by the ids before it::

        a: t0 [[1], [2, 3]]  t1 [[4], []]     b: t0 [[5]]  t1 [[6, 7]]
        ->  t0 [[1], [2, 3], [5]]   t1 [[4], [], [6, 7]]

    Weights are concatenated the same way; parts without weights get 1.0
    (the same sum) when another part has some.
    """
    if len(parts) == 1:
        return parts[0]
    keys = parts[0].keys
    for p in parts[1:]:
        if p.keys != keys:
            raise InvalidBatchError(f"cannot merge batches with keys {list(p.keys)} and "
                                    f"{list(keys)}")
    values, offsets, weights = merge_key_major([p.values for p in parts],
                                               [p.offsets for p in parts],
                                               [p.weights for p in parts], len(keys))
    merged = SparseFeatures.trusted(keys, values, offsets, weights)
    first = parts[0]
    checked = [p for p in parts if isinstance(p, CheckedFeatures)]
    if isinstance(first, CheckedFeatures) and len(checked) == len(parts) and all(
            p.bounds == first.bounds for p in checked):
        return first.derive(merged, sum(p.dropped for p in checked))  # still checked
    return merged


_QUEUED, _RUNNING, _DONE = 0, 1, 2
_DEADLINE, _QUEUE_DELAY = 0, 1


class ServiceTime:
    """Seconds a batch of ``n`` samples takes, as ``fixed + per_sample * n``.

    Fitted by least squares over the batches run, each older batch weighing
    ``decay`` times less, so the estimate follows load and cache changes.
    Not thread-safe: the batcher calls it under its lock.
    """

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def observe(self, samples: int, seconds: float) -> None:
        d = self.decay
        self._w = self._w * d + 1.0
        self._n = self._n * d + samples
        self._t = self._t * d + seconds
        self._nn = self._nn * d + samples * samples
        self._nt = self._nt * d + samples * seconds

    def fit(self) -> tuple[float, float] | None:
        """``(fixed, per_sample)`` seconds, or None before the first batch."""
        if self._w == 0.0 or self._n == 0.0:
            return None
        var = self._nn - self._n * self._n / self._w
        if var <= 1e-9 * self._nn:  # every batch had the same size: proportional
            return 0.0, self._t / self._n
        per_sample = max(0.0, (self._nt - self._n * self._t / self._w) / var)
        return max(0.0, (self._t - per_sample * self._n) / self._w), per_sample

    def estimate(self, samples: int) -> float | None:
        """Seconds for a batch of ``samples``, or None before the first batch."""
        f = self.fit()
        return None if f is None else f[0] + f[1] * samples


@dataclass(eq=False)
class _Request:
    dense: np.ndarray
    sparse: SparseFeatures
    deadline: float | None  # time.monotonic() seconds
    future: Future[np.ndarray]
    t_submit: float
    seq: int
    state: int = _QUEUED
    announced: bool = False

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])


@dataclass
class BatcherCounters:
    """What the batcher did since it started (read under its lock)."""

    submitted: int = 0
    """requests accepted into the queue."""
    completed: int = 0
    """requests answered with predictions."""
    failed: int = 0
    """accepted requests that failed while running."""
    invalid: int = 0
    """requests refused on submit (bad shape, ids, tables)."""
    rejected: int = 0
    """requests refused because the queue was full (:class:`Overloaded`), or failed
    with it after waiting longer than ``max_queue_delay_ms``."""
    queue_expired: int = 0
    """of ``rejected``: requests that waited longer than ``max_queue_delay_ms``."""
    deadline_missed: int = 0
    """requests failed with :class:`DeadlineExceeded`: refused by the service-time
    estimate, expired while queued, or finished after their deadline."""
    cancelled: int = 0
    """requests cancelled by their caller, or failed by ``close(drain=False)``."""
    batches: int = 0
    samples: int = 0
    fallbacks: int = 0
    """merged batches that failed and were rerun request by request."""
    prefetched_batches: int = 0
    """upcoming batches announced to the session's prefetcher."""


class DynamicBatcher:
    """Merge concurrent requests into batches for one :class:`InferenceSession`.

    Parameters
    ----------
    session : Session
        Runs the batches (``predict`` and, if it has a prefetcher, ``prefetch``).
    config : BatcherConfig
        Batch size, delay, queue bounds and overload behaviour.
    on_batch : callable, optional
        ``on_batch(samples, requests, seconds)`` after each batch ran.
    on_done : callable, optional
        ``on_done(outcome, latency_seconds)`` when a request is answered;
        ``outcome`` is ``"ok"``, ``"error"``, ``"deadline"``, ``"overload"`` (waited past
        ``max_queue_delay_ms``) or ``"cancelled"``.

    Notes
    -----
    :meth:`submit` is thread-safe and returns a :class:`concurrent.futures.Future`
    resolving to the request's ``(B,)`` float32 predictions.
    """

    def __init__(self, session: Session, config: BatcherConfig | None = None, *,
                 on_batch: Callable[[int, int, float], None] | None = None,
                 on_done: Callable[[str, float], None] | None = None) -> None:
        self.session = session
        self.config = config or BatcherConfig()
        self._on_batch = on_batch
        self._on_done = on_done
        self.table_names = tuple(session.table_names)
        self.num_dense = int(session.num_dense)
        rows = session.table_rows
        self._rows = {n: int(rows[n]) for n in self.table_names}
        self._has_prefetcher = bool(session.prefetch_enabled)
        self._queue: deque[_Request] = deque()
        self._queued_requests = 0
        self._queued_samples = 0
        self._deadlines: list[tuple[float, int, int, _Request]] = []
        """(time, seq, _DEADLINE | _QUEUE_DELAY, request): what the reaper watches."""
        self._max_queue_delay = (None if self.config.max_queue_delay_ms is None
                                 else self.config.max_queue_delay_ms / 1e3)
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._stopped = False
        self._drain = True
        self.counters = BatcherCounters()
        self.service_time = ServiceTime()
        self.on_room: Callable[[], None] | None = None
        """Called (on a batcher thread, no lock held) when queued requests left the queue:
        room for callers that :meth:`try_admit` found none for."""
        self.reaper_error: BaseException | None = None
        """What stopped the deadline thread, should anything ever (the service reports
        not-ready then)."""
        self._workers = [threading.Thread(target=self._run, name=f"tiermem-batcher-{i}",
                                          daemon=True) for i in range(self.config.workers)]
        self._reaper = threading.Thread(target=self._reap, name="tiermem-deadlines", daemon=True)
        for w in self._workers:
            w.start()
        self._reaper.start()

    # -- submit ----------------------------------------------------------------
    def validate(self, dense: Any, sparse: SparseFeatures | Mapping[str, Any]
                 ) -> tuple[np.ndarray, SparseFeatures]:
        """Check and normalize one request: ``(B, num_dense)`` float32 and features
        restricted to the model's tables, every id within its table."""
        if hasattr(dense, "detach"):  # a torch tensor
            dense = dense.detach().cpu().numpy()
        try:
            arr = np.asarray(dense)
        except (ValueError, TypeError) as e:
            raise InvalidBatchError(f"dense: not a rectangular numeric array ({e})") from None
        if arr.dtype.kind not in "fiub":
            raise InvalidBatchError(f"dense must be numeric, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != self.num_dense:
            raise InvalidBatchError(f"dense must have shape (B, {self.num_dense}), got "
                                    f"{arr.shape}")
        self.check_size(arr.shape[0], None)
        if arr.dtype == np.float32 and arr.flags.c_contiguous:
            # one GIL-holding pass (this runs on the caller's thread, often an event loop):
            # a writable copy (torch.from_numpy warns on read-only arrays) and the check
            arr, finite = finite_copy(arr)
        else:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if not arr.flags.writeable:
                arr = arr.copy()
            finite = bool(np.isfinite(arr).all())
        if not finite:
            raise InvalidBatchError("dense features contain NaN or infinity")
        if isinstance(sparse, Mapping):
            sparse = SparseFeatures.from_tables(dict(sparse))
        if not isinstance(sparse, SparseFeatures):
            raise InvalidBatchError(f"sparse must be SparseFeatures or a mapping of table -> "
                                    f"(ids, offsets), got {type(sparse).__name__}")
        unknown = [k for k in sparse.keys if k not in self._rows]
        if unknown:
            raise InvalidBatchError(f"unknown table(s) {unknown[:5]}; the model's tables are "
                                    f"{list(self.table_names[:8])}"
                                    f"{' ...' if len(self.table_names) > 8 else ''}")
        if sparse.batch_size != arr.shape[0]:
            raise InvalidBatchError(f"dense has {arr.shape[0]} rows but the sparse features "
                                    f"have batch size {sparse.batch_size}")
        self.check_size(arr.shape[0], int(sparse.values.size))
        # the one check of the request's ids: the session and the tier trust the result
        return arr, self.session.check(sparse)

    def check_size(self, samples: int, ids: int | None) -> None:
        """Raise :class:`RequestTooLarge` past the per-request limits (call it before
        allocating anything proportional to the counts)."""
        cfg = self.config
        if samples > cfg.max_request_samples:
            raise RequestTooLarge(f"the request has {samples} samples; one request may have "
                                  f"at most {cfg.max_request_samples}: split it")
        if ids is not None and ids > cfg.max_request_ids:
            raise RequestTooLarge(f"the request has {ids} ids; one request may have at most "
                                  f"{cfg.max_request_ids}: split it")

    def submit(self, dense: Any, sparse: SparseFeatures | Mapping[str, Any], *,
               deadline: float | None = None) -> Future[np.ndarray]:
        """Queue one request; its predictions arrive on the returned Future.

        Parameters
        ----------
        dense, sparse
            ``(B, num_dense)`` dense features and the request's sparse features.
        deadline : float, optional
            ``time.monotonic()`` time by which the predictions must be there.

        Raises
        ------
        InvalidBatchError
            The request is malformed (nothing was queued).
        Overloaded
            The queue is full (``reject``) or stayed full (``wait``).
        DeadlineExceeded
            The deadline already passed (or passed while waiting for room), or
            the service-time estimate says the request cannot finish by then.
        BatcherClosed
            The batcher no longer accepts requests.
        """
        req = self.prepare(dense, sparse, deadline=deadline)
        if isinstance(req, Future):
            return req
        return self.admit(req, wait=self.config.overload == "wait")

    def prepare(self, dense: Any, sparse: SparseFeatures | Mapping[str, Any], *,
                deadline: float | None = None, t_start: float | None = None
                ) -> _Request | Future[np.ndarray]:
        """Validate one request, queue nothing: :meth:`try_admit` / :meth:`admit` queue it.

        An empty request comes back as an answered Future. ``t_start`` (monotonic
        seconds, default now) is when the request arrived: ``wait_timeout_s`` counts
        from there.
        """
        if self._closed:
            raise BatcherClosed("the batcher is closed: it accepts no new requests")
        if deadline is not None and (isinstance(deadline, bool)
                                     or not isinstance(deadline, (int, float))
                                     or not math.isfinite(deadline)
                                     or deadline > time.monotonic() + MAX_DEADLINE_S):
            with self._cv:
                self.counters.invalid += 1
            raise InvalidBatchError(f"deadline must be a finite time.monotonic() value at most "
                                    f"{MAX_DEADLINE_S:g} s ahead, got {deadline!r}")
        try:
            arr, feats = self.validate(dense, sparse)
        except InvalidBatchError:
            with self._cv:
                self.counters.invalid += 1
            raise
        now = time.monotonic()
        fut: Future[np.ndarray] = Future()
        if arr.shape[0] == 0:  # nothing to compute
            fut.set_running_or_notify_cancel()
            fut.set_result(np.zeros(0, np.float32))
            return fut
        return _Request(arr, feats, deadline, fut, now if t_start is None else t_start,
                        next(self._seq))

    def _check_deadline_locked(self, req: _Request, now: float) -> None:
        deadline = req.deadline
        if deadline is None:
            return
        if now >= deadline:
            self.counters.deadline_missed += 1
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        est = self.service_time.estimate(req.size)
        if est is not None and now + est > deadline:
            self.counters.deadline_missed += 1
            raise DeadlineExceeded(
                f"the request cannot finish before its deadline: {req.size} samples "
                f"take about {est * 1e3:.3g} ms, {(deadline - now) * 1e3:.3g} ms are left")

    def _fits_locked(self, req: _Request) -> bool:
        cfg = self.config
        return self._queued_requests < cfg.max_queue_requests and (
            self._queued_samples + req.size <= cfg.max_queue_samples
            or self._queued_requests == 0)

    def _enqueue_locked(self, req: _Request) -> Future[np.ndarray]:
        self._queue.append(req)
        self._queued_requests += 1
        self._queued_samples += req.size
        self.counters.submitted += 1
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, req.seq, _DEADLINE, req))
        if self._max_queue_delay is not None:
            heapq.heappush(self._deadlines,
                           (req.t_submit + self._max_queue_delay, req.seq, _QUEUE_DELAY, req))
        self._cv.notify_all()
        return req.future

    def _overloaded_message(self) -> str:
        cfg = self.config
        return (f"queue full ({self._queued_requests} requests, {self._queued_samples} "
                f"samples waiting; limits {cfg.max_queue_requests} requests, "
                f"{cfg.max_queue_samples} samples)")

    def try_admit(self, req: _Request) -> Future[np.ndarray] | None:
        """Queue a prepared request if there is room now; None (nothing counted) if not.

        Never blocks on room (an asyncio caller waits for :attr:`on_room` instead).
        """
        with self._cv:
            if self._closed:
                raise BatcherClosed("the batcher is closed: it accepts no new requests")
            self._check_deadline_locked(req, time.monotonic())
            if not self._fits_locked(req):
                return None
            return self._enqueue_locked(req)

    def reject(self, message: str) -> Overloaded:
        """Count a rejection (after :meth:`try_admit` found no room) and return the error."""
        with self._cv:
            self.counters.rejected += 1
        return Overloaded(message)

    def admit(self, req: _Request, *, wait: bool) -> Future[np.ndarray]:
        """Queue a prepared request: reject at once when full, or (``wait``) block until
        room, ``wait_timeout_s`` after ``req``'s arrival or its deadline."""
        cfg = self.config
        with self._cv:
            while True:
                if self._closed:
                    raise BatcherClosed("the batcher is closed: it accepts no new requests")
                now = time.monotonic()
                self._check_deadline_locked(req, now)
                if self._fits_locked(req):
                    return self._enqueue_locked(req)
                if not wait:
                    self.counters.rejected += 1
                    raise Overloaded(self._overloaded_message())
                limit = req.t_submit + cfg.wait_timeout_s
                if req.deadline is not None:
                    limit = min(limit, req.deadline)
                if now >= limit:
                    if req.deadline is not None and now >= req.deadline:
                        self.counters.deadline_missed += 1
                        raise DeadlineExceeded("the request's deadline passed while it waited "
                                               "for room in the queue")
                    self.counters.rejected += 1
                    raise Overloaded(f"queue stayed full for {cfg.wait_timeout_s} s")
                self._cv.wait(limit - now)

    # -- introspection -----------------------------------------------------------
    @property
    def queue_depth(self) -> tuple[int, int]:
        """``(requests, samples)`` waiting."""
        with self._cv:
            return self._queued_requests, self._queued_samples

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def reaper_alive(self) -> bool:
        """False once the deadline thread stopped while the batcher is open."""
        return self._reaper.is_alive() or self._stopped

    def queue_full(self) -> bool:
        """True when the queue holds ``max_queue_requests`` (no lock: a hint to refuse a
        request before its body is decoded)."""
        return self._queued_requests >= self.config.max_queue_requests

    def _room(self) -> None:
        cb = self.on_room
        if cb is not None:
            try:
                cb()
            except Exception:  # noqa: BLE001 - a notification must not stop a batcher thread
                _log.exception("on_room callback failed")

    def snapshot(self) -> dict[str, int]:
        with self._cv:
            d = dict(vars(self.counters))
            d["queue_requests"] = self._queued_requests
            d["queue_samples"] = self._queued_samples
            return d

    # -- worker ------------------------------------------------------------------
    def _take(self, req: _Request) -> None:
        """Remove ``req`` from the queue's counts (lock held)."""
        self._queued_requests -= 1
        self._queued_samples -= req.size

    def _expire_locked(self, now: float) -> tuple[list[_Request], list[_Request]]:
        """Queued requests past their deadline, and past ``max_queue_delay_ms``."""
        late: list[_Request] = []
        stale: list[_Request] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, kind, req = heapq.heappop(self._deadlines)
            if req.state == _QUEUED:
                req.state = _DONE
                self._take(req)
                if kind == _DEADLINE:
                    self.counters.deadline_missed += 1
                    late.append(req)
                else:
                    self.counters.rejected += 1
                    self.counters.queue_expired += 1
                    stale.append(req)
        if late or stale:
            self._cv.notify_all()
        return late, stale

    def _queue_delay_message(self) -> str:
        return (f"overloaded: the request waited over {self.config.max_queue_delay_ms:g} ms "
                "in the queue (max_queue_delay_ms) before its batch could start")

    def _fail(self, reqs: list[_Request], exc_type: type[Exception], msg: str,
              outcome: str) -> None:
        now = time.monotonic()
        for r in reqs:
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(exc_type(msg))
            if self._on_done is not None:
                self._on_done(outcome, now - r.t_submit)

    def _reap(self) -> None:
        """Fail queued requests as their deadlines pass. A bug here must not stop the
        deadlines: log it and go on (after a short pause, so a loop cannot spin)."""
        while True:
            try:
                if self._reap_until_stopped():
                    return
            except Exception:  # noqa: BLE001
                _log.exception("the deadline thread hit an error; it goes on")
                time.sleep(0.01)
            except BaseException as e:  # noqa: BLE001 - recorded: readiness reports it
                self.reaper_error = e
                raise

    def _reap_until_stopped(self) -> bool:
        with self._cv:
            while not self._stopped:
                now = time.monotonic()
                expired, stale = self._expire_locked(now)
                if expired or stale:
                    self._cv.release()
                    try:
                        self._fail(expired, DeadlineExceeded,
                                   "the request's deadline passed while it waited in the queue",
                                   "deadline")
                        self._fail(stale, Overloaded, self._queue_delay_message(), "overload")
                        self._room()
                    finally:
                        self._cv.acquire()
                    continue
                # bounded waits: no deadline can overflow the clock's timeout
                timeout = (min(self._deadlines[0][0] - now, 60.0) if self._deadlines
                           else 60.0)
                self._cv.wait(max(timeout, 0.0))
        return True

    def _next_batch(self) -> list[_Request] | None:
        """Block until a batch is due; pop it (lock held by the caller). None: stop."""
        cfg = self.config
        delay = cfg.max_delay_ms / 1e3
        while True:
            while self._queue and self._queue[0].state != _QUEUED:
                self._queue.popleft()  # expired or cancelled entries, already uncounted
            if not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
                continue
            oldest = self._queue[0]
            due = oldest.t_submit + delay
            now = time.monotonic()
            if self._closed or self._queued_samples >= cfg.max_batch_size or now >= due:
                break
            self._cv.wait(due - now)
        batch: list[_Request] = []
        n = 0
        while self._queue:
            r = self._queue[0]
            if r.state != _QUEUED:
                self._queue.popleft()
                continue
            if batch and n + r.size > cfg.max_batch_size:
                break
            self._queue.popleft()
            self._take(r)
            r.state = _RUNNING
            batch.append(r)
            n += r.size
            if n >= cfg.max_batch_size:
                break
        self._cv.notify_all()  # room for waiting submitters
        return batch

    def _upcoming_locked(self) -> list[list[_Request]]:
        """Queued requests not yet announced, grouped as they will likely run."""
        cfg = self.config
        groups: list[list[_Request]] = []
        cur: list[_Request] = []
        n = 0
        for r in self._queue:
            if len(groups) >= cfg.prefetch_batches:
                break
            if r.state != _QUEUED:
                continue
            if cur and n + r.size > cfg.max_batch_size:
                groups.append(cur)
                cur, n = [], 0
                if len(groups) >= cfg.prefetch_batches:
                    break
            cur.append(r)
            n += r.size
        if cur and len(groups) < cfg.prefetch_batches:
            groups.append(cur)
        out = []
        for g in groups:
            fresh = [r for r in g if not r.announced]
            for r in fresh:
                r.announced = True
            if fresh:
                out.append(fresh)
        return out

    def _run(self) -> None:
        while True:
            with self._cv:
                batch = self._next_batch()
                if batch is None:
                    break
                upcoming = (self._upcoming_locked()
                            if self._has_prefetcher and self.config.prefetch_batches else [])
            self._room()
            now = time.monotonic()
            live: list[_Request] = []
            late: list[_Request] = []
            stale: list[_Request] = []
            with self._cv:
                est = self.service_time.estimate(sum(r.size for r in batch))
            end = now + (est or 0.0)  # when the batch would end, by the estimate
            oldest_ok = -math.inf if self._max_queue_delay is None else now - self._max_queue_delay
            for r in batch:
                if r.t_submit < oldest_ok:  # waited too long (the reaper had not got to it)
                    stale.append(r)
                elif r.deadline is not None and end >= r.deadline:
                    late.append(r)
                elif r.future.set_running_or_notify_cancel():
                    live.append(r)
                else:
                    with self._cv:
                        self.counters.cancelled += 1
                    if self._on_done is not None:
                        self._on_done("cancelled", now - r.t_submit)
            if late:
                with self._cv:
                    self.counters.deadline_missed += len(late)
                self._fail(late, DeadlineExceeded,
                           "the request's deadline passed, or would by the end of its batch "
                           "(service-time estimate), before it could run", "deadline")
            if stale:
                with self._cv:
                    self.counters.rejected += len(stale)
                    self.counters.queue_expired += len(stale)
                self._fail(stale, Overloaded, self._queue_delay_message(), "overload")
            for group in upcoming:
                try:
                    self.session.prefetch(concat_features([r.sparse for r in group]))
                    with self._cv:
                        self.counters.prefetched_batches += 1
                except Exception:  # a hint only: never fail requests over it
                    pass
            if live:
                self._execute(live)
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def _execute(self, batch: list[_Request]) -> None:
        t0 = time.monotonic()
        try:
            if len(batch) == 1:
                preds = self.session.predict(batch[0].dense, batch[0].sparse)
            else:
                dense = np.concatenate([r.dense for r in batch])
                preds = self.session.predict(dense, concat_features([r.sparse for r in batch]))
        except Exception as e:
            if len(batch) == 1:
                self._finish(batch[0], None, e)
                return
            # validated requests should not fail together; if they do, find the culprit
            with self._cv:
                self.counters.fallbacks += 1
            for r in batch:
                try:
                    self._finish(r, self.session.predict(r.dense, r.sparse), None)
                except Exception as e1:
                    self._finish(r, None, e1)
            return
        t1 = time.monotonic()
        n = int(preds.shape[0])
        with self._cv:
            self.service_time.observe(n, t1 - t0)
            self.counters.batches += 1
            self.counters.samples += n
        if self._on_batch is not None:
            self._on_batch(n, len(batch), t1 - t0)
        start = 0
        for r in batch:
            self._finish(r, preds[start:start + r.size].copy(), None)
            start += r.size

    def _finish(self, r: _Request, preds: np.ndarray | None, exc: BaseException | None) -> None:
        r.state = _DONE
        now = time.monotonic()
        late = False
        if exc is None and r.deadline is not None and now > r.deadline:
            late = True  # an answer after the deadline is an error, not a success
            exc = DeadlineExceeded(
                f"the request finished {(now - r.deadline) * 1e3:.3g} ms after its deadline "
                f"(its result was discarded)")
        if exc is None:
            r.future.set_result(preds)  # type: ignore[arg-type]
        else:
            r.future.set_exception(exc)
        with self._cv:
            if exc is None:
                self.counters.completed += 1
            elif late:
                self.counters.deadline_missed += 1
            else:
                self.counters.failed += 1
        if self._on_done is not None:
            self._on_done("ok" if exc is None else "deadline" if late else "error",
                          now - r.t_submit)

    # -- shutdown -----------------------------------------------------------------
    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting; answer (``drain``) or fail the queued requests; stop the threads.

        Returns True when the worker stopped within ``timeout``.
        """
        dropped: list[_Request] = []
        with self._cv:
            self._closed = True
            if not drain:
                for r in self._queue:
                    if r.state == _QUEUED:
                        r.state = _DONE
                        self._take(r)
                        dropped.append(r)
                self._queue.clear()
                self.counters.cancelled += len(dropped)
            self._cv.notify_all()
        if dropped:
            self._fail(dropped, BatcherClosed, "the batcher was closed without draining",
                       "cancelled")
        self._room()  # waiting callers see the batcher closed
        if threading.current_thread() in self._workers:
            return False
        end = None if timeout is None else time.monotonic() + timeout
        for w in self._workers:
            w.join(None if end is None else max(0.0, end - time.monotonic()))
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._reaper.join(timeout)
        return not any(w.is_alive() for w in self._workers)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
