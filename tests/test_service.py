"""The serving stack: dynamic batcher, ServingRuntime, and the HTTP server over loopback.

Merged batches must give the answers of sequential ``session.predict`` calls
on the same requests. The pooled embeddings are bit-identical; the MLP output
may differ in the last float32 bit because torch's GEMM blocking depends on
the number of rows, so predictions are compared with a 1e-6 tolerance.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from runtime.batcher import (
    BatcherClosed,
    BatcherConfig,
    DeadlineExceeded,
    Overloaded,
    concat_features,
)
from runtime.checkpoint import save_dlrm_checkpoint
from runtime.convert import store_from_checkpoint
from runtime.model import DLRMConfig, random_dense
from runtime.server import create_app, server_config
from runtime.service import ServingConfig, ServingRuntime
from runtime.session import InferenceSession, RuntimeConfig
from runtime.wire import BINARY_TYPE, PREDICTIONS_TYPE, decode_predictions, encode_request
from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures

pytestmark = pytest.mark.timeout(60)

ROWS = (300, 41, 1000, 7)
NAMES = tuple(f"emb_l.{i}" for i in range(len(ROWS)))
DIM = 6
NUM_DENSE = 5
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module", name="model")
def model_fixture(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = DLRMConfig(num_dense=NUM_DENSE, embedding_dim=DIM, num_tables=len(ROWS),
                     bottom_mlp=(11, DIM), top_mlp=(9, 4, 1), interaction="dlrm")
    rng = np.random.default_rng(3)
    tables = [rng.standard_normal((r, DIM)).astype(np.float32) for r in ROWS]
    ckpt = tmp / "model.pt"
    save_dlrm_checkpoint(ckpt, cfg, tables, random_dense(cfg, seed=5))
    store = tmp / "store.zarr"
    store_from_checkpoint(ckpt, store)
    return ckpt, store


@pytest.fixture(scope="module")
def session(model):
    s = InferenceSession.open(*model, RuntimeConfig(num_threads=1))
    yield s
    s.close()


def make_request(rng, b, max_pool=3, weighted=False):
    lengths = rng.integers(0, max_pool + 1, len(ROWS) * b)
    lens = lengths.reshape(len(ROWS), b)
    values = np.concatenate([rng.integers(0, r, int(lens[t].sum()))
                             for t, r in enumerate(ROWS)])
    w = rng.random(values.size).astype(np.float32) if weighted else None
    sparse = SparseFeatures.from_lengths(NAMES, values, lengths, w)
    dense = rng.random((b, NUM_DENSE)).astype(np.float32)
    return dense, sparse


def requests(n, seed=0, max_b=40):
    rng = np.random.default_rng(seed)
    return [make_request(rng, int(rng.integers(1, max_b + 1))) for _ in range(n)]


class Gated:
    """A session whose predict waits for ``gate`` (and can be told to fail)."""

    def __init__(self, session):
        self._s = session
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []
        self.poison = None  # a dense value that makes predict raise

    def __getattr__(self, name):
        return getattr(self._s, name)

    def predict(self, dense, sparse):
        self.entered.set()
        assert self.gate.wait(20), "test gate never opened"
        self.sizes.append(len(dense))
        if self.poison is not None and np.any(np.asarray(dense) == self.poison):
            raise RuntimeError("poisoned batch")
        return self._s.predict(dense, sparse)


def wait_until(cond, timeout=10.0):
    t_end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t_end, "condition not reached in time"
        time.sleep(0.002)


# -- batcher / runtime ----------------------------------------------------------------------

def test_concat_features_matches_tables():
    rng = np.random.default_rng(1)
    parts = [make_request(rng, b, weighted=(i == 1))[1] for i, b in enumerate((3, 1, 5))]
    merged = concat_features(parts)
    assert merged.batch_size == 9 and merged.keys == NAMES
    for k in NAMES:
        ids, off, w = merged.table(k)
        exp_ids = np.concatenate([p.table(k)[0] for p in parts])
        np.testing.assert_array_equal(ids, exp_ids)
        exp_len = np.concatenate([np.diff(p.table(k)[1]) for p in parts])
        np.testing.assert_array_equal(np.diff(off), exp_len)
        exp_w = np.concatenate([p.table(k)[2] if p.weights is not None
                                else np.ones(p.table(k)[0].size, np.float32) for p in parts])
        np.testing.assert_array_equal(w, exp_w)


def test_config_validation():
    with pytest.raises(ConfigError, match="overload"):
        ServingConfig(BatcherConfig(overload="drop"))
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServingConfig(BatcherConfig(max_batch_size=0))
    with pytest.raises(ConfigError, match="default_deadline_ms"):
        ServingConfig(default_deadline_ms=-1)
    with pytest.raises(ConfigError, match="max_delay_ms"):
        BatcherConfig(max_delay_ms=float("nan"))
    cfg = ServingConfig(BatcherConfig(max_batch_size=7))
    assert ServingConfig.from_dict(cfg.to_dict()).batcher.max_batch_size == 7


def test_threads_match_sequential(session):
    reqs = requests(48, seed=2)
    expected = [session.predict(d, s) for d, s in reqs]
    cfg = ServingConfig(BatcherConfig(max_batch_size=128, max_delay_ms=5))
    with ServingRuntime(session, cfg) as rt:
        assert rt.wait_ready(30)
        with ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda r: rt.predict(*r), reqs, timeout=30))
        m = rt.metrics()
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, e, **TOL)
    assert m["requests"]["completed"] == 48
    assert m["batches"] < 48, "concurrent requests should have been merged"
    assert m["batch_size"]["count"] == m["batches"]
    assert m["latency_seconds"]["count"] == 48


def test_asyncio_tasks_match_sequential(session):
    reqs = requests(40, seed=3)
    expected = [session.predict(d, s) for d, s in reqs]

    async def main(rt):
        return await asyncio.wait_for(
            asyncio.gather(*(rt.predict_async(d, s) for d, s in reqs)), 30)

    for overload in ("reject", "wait"):
        with ServingRuntime(session, ServingConfig(BatcherConfig(max_batch_size=64, max_delay_ms=3,
                                                                 overload=overload))) as rt:
            got = asyncio.run(main(rt))
            assert rt.metrics()["batches"] < 40
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, **TOL)


def test_large_request_runs_alone_and_empty_request(session):
    rng = np.random.default_rng(4)
    big = make_request(rng, 50)
    gated = Gated(session)
    with ServingRuntime(gated, ServingConfig(BatcherConfig(max_batch_size=16), warmup=False)) as rt:
        small = [rt.submit(*make_request(rng, 3)) for _ in range(2)]
        fut = rt.submit(*big)
        gated.gate.set()
        np.testing.assert_allclose(fut.result(10), session.predict(*big), **TOL)
        for f in small:
            f.result(10)
        d, s = make_request(rng, 0)
        assert rt.predict(d, s).shape == (0,)
    assert 50 in gated.sizes and max(gated.sizes) == 50


def test_overload_reject_is_immediate(session):
    gated = Gated(session)
    reqs = requests(5, seed=5, max_b=4)
    cfg = ServingConfig(BatcherConfig(max_queue_requests=3, max_delay_ms=0), warmup=False)
    with ServingRuntime(gated, cfg) as rt:
        first = rt.submit(*reqs[0])
        assert gated.entered.wait(10)  # the worker holds it: the queue is empty again
        queued = [rt.submit(*r) for r in reqs[1:4]]
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="queue full"):
            rt.submit(*reqs[4])
        assert time.monotonic() - t0 < 0.5
        gated.gate.set()
        for f, r in zip([first, *queued], reqs, strict=False):
            np.testing.assert_allclose(f.result(10), session.predict(*r), **TOL)
        assert rt.metrics()["requests"]["rejected"] == 1


def test_overload_wait_times_out_then_succeeds(session):
    gated = Gated(session)
    reqs = requests(3, seed=6, max_b=4)
    cfg = ServingConfig(BatcherConfig(max_queue_requests=1, max_delay_ms=0, overload="wait",
                                      wait_timeout_s=0.2), warmup=False)
    with ServingRuntime(gated, cfg) as rt:
        rt.submit(*reqs[0])
        assert gated.entered.wait(10)
        rt.submit(*reqs[1])
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="stayed full"):
            rt.submit(*reqs[2])
        assert 0.15 < time.monotonic() - t0 < 2
        # room appears while waiting: the submit goes through
        threading.Timer(0.05, gated.gate.set).start()
        np.testing.assert_allclose(rt.submit(*reqs[2]).result(10), session.predict(*reqs[2]),
                                   **TOL)


def test_queue_bound_in_time(session):
    """max_queue_delay_ms: a request stuck in the queue behind a slow batch is refused
    (Overloaded, HTTP 503) when the bound passes, not run late; one that waited less runs."""
    gated = Gated(session)
    reqs = requests(4, seed=7, max_b=4)
    cfg = ServingConfig(BatcherConfig(max_delay_ms=0, max_queue_delay_ms=150), warmup=False)
    with ServingRuntime(gated, cfg) as rt, serve(rt) as url, \
            httpx.Client(base_url=url, timeout=20) as client:
        first = rt.submit(*reqs[0])
        assert gated.entered.wait(10)  # the worker is stuck in the first batch
        t0 = time.monotonic()
        stale = rt.submit(*reqs[1])
        with pytest.raises(Overloaded, match="max_queue_delay_ms"):
            stale.result(5)
        waited = time.monotonic() - t0
        assert 0.14 < waited < 0.6, waited  # refused at the bound, while the gate is shut
        r = client.post("/predict", content=encode_request(*reqs[2]),
                        headers={"Content-Type": BINARY_TYPE})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "max_queue_delay_ms" in r.json()["error"]
        assert gated.sizes == []  # neither ever reached the session
        gated.gate.set()
        np.testing.assert_allclose(first.result(10), session.predict(*reqs[0]), **TOL)
        np.testing.assert_allclose(rt.predict(*reqs[3]), session.predict(*reqs[3]), **TOL)
        m = rt.metrics()["requests"]
        assert (m["rejected"], m["queue_expired"], m["completed"]) == (2, 2, 2), m
        fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        got = {s.labels["outcome"]: s.value for s in fams["tiermem_requests"].samples}
        assert got["queue_expired"] == 2
    with pytest.raises(ConfigError, match="max_queue_delay_ms"):
        ServingConfig(BatcherConfig(max_queue_delay_ms=0))


def test_deadlines_fail_fast(session):
    gated = Gated(session)
    reqs = requests(3, seed=7, max_b=4)
    with ServingRuntime(gated, ServingConfig(BatcherConfig(max_delay_ms=0), warmup=False)) as rt:
        running = rt.submit(*reqs[0])
        assert gated.entered.wait(10)
        t0 = time.monotonic()
        late = rt.submit(*reqs[1], deadline_ms=30)  # the worker is busy: it cannot start
        with pytest.raises(DeadlineExceeded):
            late.result(5)
        assert time.monotonic() - t0 < 1.0, "a missed deadline must fail fast"
        with pytest.raises(DeadlineExceeded):
            rt.predict(*reqs[2], deadline_ms=1e-6)
        gated.gate.set()
        running.result(10)
        assert rt.metrics()["requests"]["deadline_missed"] == 2
    assert len(gated.sizes) == 1, "an expired request must never run"
    # default deadline from the config
    with ServingRuntime(session, ServingConfig(default_deadline_ms=10_000)) as rt:
        np.testing.assert_allclose(rt.predict(*reqs[1]), session.predict(*reqs[1]), **TOL)


def test_deadline_covers_the_whole_request(session):
    """A deadline bounds the answer, not the start: late answers fail, hopeless ones are refused."""
    big = make_request(np.random.default_rng(40), 8192)
    # no estimate yet (nothing ran): a 0.5 ms deadline on 8192 samples starts, then ends late
    with ServingRuntime(session, ServingConfig(warmup=False)) as rt:
        assert rt.batcher.service_time.estimate(1) is None
        with pytest.raises(DeadlineExceeded, match="deadline"):
            rt.predict(*big, deadline_ms=0.5)
        assert rt.metrics()["requests"]["deadline_missed"] == 1
        assert rt.metrics()["requests"]["completed"] == 0
        # a generous deadline is met, with the answer of a plain predict
        np.testing.assert_allclose(rt.predict(*big, deadline_ms=60_000), session.predict(*big),
                                   **TOL)
        est = rt.batcher.service_time.estimate(8192)
        assert est is not None and est > 0
        # now the estimate refuses, at submit, a request that cannot finish in time
        batches = rt.metrics()["batches"]
        with pytest.raises(DeadlineExceeded, match="cannot finish before its deadline"):
            rt.submit(*big, deadline_ms=est * 1e3 / 4)
        m = rt.metrics()
        assert m["batches"] == batches and m["requests"]["deadline_missed"] == 2
        assert m["requests"]["completed"] == 1


def test_answer_after_the_deadline_is_discarded(session):
    gated = Gated(session)
    req = requests(1, seed=41)[0]
    with ServingRuntime(gated, ServingConfig(BatcherConfig(max_delay_ms=0), warmup=False)) as rt:
        fut = rt.submit(*req, deadline_ms=300)
        assert gated.entered.wait(10)  # it started well in time...
        time.sleep(0.4)
        gated.gate.set()  # ...and ends after its deadline
        with pytest.raises(DeadlineExceeded, match="after its deadline"):
            fut.result(10)
        m = rt.metrics()["requests"]
        assert (m["deadline_missed"], m["completed"], m["failed"]) == (1, 0, 0)
        assert rt.metrics()["latency_seconds"]["count"] == 0  # not a success


def test_service_time_fit_recovers_a_line():
    from runtime.batcher import ServiceTime

    st_ = ServiceTime()
    assert st_.estimate(10) is None
    for n in (10, 200, 50, 1000, 10, 400):
        st_.observe(n, 0.002 + 1e-5 * n)
    fixed, per_sample = st_.fit()
    assert fixed == pytest.approx(0.002) and per_sample == pytest.approx(1e-5)
    one = ServiceTime()
    one.observe(100, 0.01)
    assert one.estimate(300) == pytest.approx(0.03)  # one size only: proportional


def test_workers_match_sequential(model):
    """Two workers run batches side by side: the answers are those of sequential calls."""
    with InferenceSession.open(*model, RuntimeConfig(num_threads=1)) as sess:
        reqs = requests(60, seed=31)
        expected = [sess.predict(d, s) for d, s in reqs]
        cfg = ServingConfig(BatcherConfig(max_batch_size=64, max_delay_ms=1, workers=2))
        with ServingRuntime(sess, cfg) as rt:
            assert rt.wait_ready(30)
            assert len(rt.batcher._workers) == 2
            with ThreadPoolExecutor(12) as ex:
                got = list(ex.map(lambda r: rt.predict(*r), reqs, timeout=30))
            m = rt.metrics()
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, **TOL)
        assert m["requests"]["completed"] == 60
    with pytest.raises(ConfigError, match="workers"):
        ServingConfig(BatcherConfig(workers=0))


@pytest.mark.parametrize("workers", [1, 2])
def test_shutdown_drains_every_accepted_request(session, workers):
    gated = Gated(session)
    reqs = requests(12, seed=8, max_b=10)
    rt = ServingRuntime(gated, ServingConfig(BatcherConfig(max_batch_size=32, max_delay_ms=1,
                                                           workers=workers), warmup=False))
    futs = [rt.submit(*r) for r in reqs]
    closer = threading.Thread(target=rt.close, kwargs={"drain": True})
    closer.start()
    wait_until(lambda: rt.batcher.closed)
    with pytest.raises(BatcherClosed):
        rt.submit(*reqs[0])
    assert not rt.ready
    gated.gate.set()
    closer.join(20)
    assert not closer.is_alive()
    for f, r in zip(futs, reqs, strict=True):
        np.testing.assert_allclose(f.result(0), session.predict(*r), **TOL)


def test_shutdown_without_drain_fails_queued(session):
    gated = Gated(session)
    reqs = requests(5, seed=9, max_b=4)
    rt = ServingRuntime(gated, ServingConfig(BatcherConfig(max_delay_ms=0), warmup=False))
    first = rt.submit(*reqs[0])
    assert gated.entered.wait(10)
    queued = [rt.submit(*r) for r in reqs[1:]]
    threading.Timer(0.1, gated.gate.set).start()
    rt.close(drain=False)
    first.result(5)  # started before close: it finishes
    for f in queued:
        with pytest.raises(BatcherClosed):
            f.result(5)


@pytest.mark.parametrize("bad", ["ids", "negative", "dense", "table", "batch"])
def test_bad_request_fails_alone(session, bad):
    reqs = requests(24, seed=10)
    rng = np.random.default_rng(11)
    d, s = make_request(rng, 4)
    if bad == "ids":
        v = s.values.copy()
        v[s.table_range(2)[0]] = ROWS[2]  # one past the end of table 2
        s = SparseFeatures(s.keys, v, s.offsets)
    elif bad == "negative":
        v = s.values.copy()
        v[0] = -1
        s = SparseFeatures(s.keys, v, s.offsets)
    elif bad == "dense":
        d = d[:, :-1]
    elif bad == "table":
        s = SparseFeatures(("nope", *s.keys[1:]), s.values, s.offsets)
    else:
        d = d[:-1]
    with ServingRuntime(session, ServingConfig(BatcherConfig(max_batch_size=256,
                                                             max_delay_ms=5))) as rt:
        def call(i):
            if i == 7:
                with pytest.raises(InvalidBatchError):
                    rt.predict(d, s)
                return None
            return rt.predict(*reqs[i])

        with ThreadPoolExecutor(6) as ex:
            got = list(ex.map(call, range(len(reqs)), timeout=30))
        assert rt.metrics()["requests"]["invalid"] == 1
    for i, g in enumerate(got):
        if i != 7:
            np.testing.assert_allclose(g, session.predict(*reqs[i]), **TOL)


def test_failing_merged_batch_fails_only_culprit(session):
    gated = Gated(session)
    gated.poison = 777.0
    reqs = requests(6, seed=12, max_b=5)
    bad_dense = reqs[3][0].copy()
    bad_dense[0, 0] = 777.0
    with ServingRuntime(gated, ServingConfig(BatcherConfig(max_delay_ms=0), warmup=False)) as rt:
        rt.submit(*reqs[0])
        assert gated.entered.wait(10)
        futs = [rt.submit(bad_dense if i == 3 else d, s) for i, (d, s) in enumerate(reqs)]
        gated.gate.set()
        for i, f in enumerate(futs):
            if i == 3:
                with pytest.raises(RuntimeError, match="poisoned"):
                    f.result(10)
            else:
                np.testing.assert_allclose(f.result(10), session.predict(*reqs[i]), **TOL)
        assert rt.metrics()["fallbacks"] == 1


def test_queue_feeds_the_prefetcher(model):
    from tiermem.cache.cache import CacheConfig
    from tiermem.cache.prefetch import PrefetchConfig

    cfg = RuntimeConfig(tier={"kind": "ssd", "io_threads": 2}, num_threads=1,
                        cache=CacheConfig(capacity_rows=400), prefetch=PrefetchConfig())
    with InferenceSession.open(*model, cfg) as sess:
        gated = Gated(sess)
        reqs = requests(8, seed=13, max_b=8)
        with ServingRuntime(gated, ServingConfig(BatcherConfig(max_batch_size=8, max_delay_ms=0),
                                                 warmup=False)) as rt:
            first = rt.submit(*reqs[0])
            assert gated.entered.wait(10)
            futs = [rt.submit(*r) for r in reqs[1:]]
            gated.gate.set()
            got = [f.result(10) for f in [first, *futs]]
            m = rt.metrics()
        assert m["prefetched_batches"] >= 1
        assert m["tier"]["kind"] == "ssd" and m["tier"]["cache"] is not None
        assert sess.tier.prefetch_counters.issued + sess.tier.prefetch_counters.dropped > 0
        for g, r in zip(got, reqs, strict=True):
            np.testing.assert_allclose(g, sess.predict(*r), **TOL)


# -- the HTTP server ---------------------------------------------------------------------

@contextlib.contextmanager
def serve(runtime, server_kw=None, **kw):
    """uvicorn in a background thread on a free loopback port, configured as ``tiermem
    serve`` configures it (``server_config``); yields the base URL."""
    app = create_app(runtime, **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, log_level="error", **(server_kw or {})))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    wait_until(lambda: server.started)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
        sock.close()


def json_per_table(d, s):
    return {"dense": d.tolist(),
            "sparse": {k: {"ids": s.table(k)[0].tolist(), "lengths": np.diff(s.table(k)[1])
                           .tolist()} for k in s.keys}}


def json_kjt(d, s):
    return {"dense": d.tolist(), "keys": list(s.keys), "values": s.values.tolist(),
            "offsets": s.offsets.tolist()}


def npz_body(d, s):
    """The ``application/x-npz`` body of a request (KJT layout, as a client would send it)."""
    buf = io.BytesIO()
    arrays = {"dense": np.asarray(d, np.float32), "keys": np.array(s.keys), "values": s.values,
              "offsets": s.offsets}
    if s.weights is not None:
        arrays["weights"] = s.weights
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(session):
    rt = ServingRuntime(session, ServingConfig(BatcherConfig(max_batch_size=256, max_delay_ms=2)))
    assert rt.wait_ready(30)
    with serve(rt, max_body_bytes=64 * 1024) as url, httpx.Client(base_url=url,
                                                                  timeout=20) as client:
        yield client, rt
    rt.close()


def test_http_formats_match_session(session, server):
    client, _ = server
    reqs = requests(6, seed=20)
    for i, (d, s) in enumerate(reqs):
        exp = session.predict(d, s)
        if i % 3 == 0:
            r = client.post("/predict", json=json_per_table(d, s))
        elif i % 3 == 1:
            r = client.post("/predict", json=json_kjt(d, s))
        else:
            r = client.post("/predict", content=npz_body(d, s),
                            headers={"Content-Type": "application/x-npz"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["predictions"], np.float32), exp, **TOL)
    # per-sample id lists, lengths instead of offsets, and the one-id-per-table npz layout
    d, s = reqs[0]
    body = {"dense": d.tolist(), "sparse": {k: [s.values[s.offsets[t * len(d) + b]:
                                                         s.offsets[t * len(d) + b + 1]].tolist()
                                                for b in range(len(d))]
                                            for t, k in enumerate(s.keys)}}
    r = client.post("/predict", json=body)
    np.testing.assert_allclose(r.json()["predictions"], session.predict(d, s), **TOL)
    onehot = np.stack([np.arange(5) % r_ for r_ in ROWS], axis=1)
    dense = np.ones((5, NUM_DENSE), np.float32)
    buf = io.BytesIO()
    np.savez(buf, dense=dense, sparse=onehot)
    r = client.post("/predict", content=buf.getvalue(),
                    headers={"Content-Type": "application/x-npz"})
    exp = session.predict(dense, SparseFeatures.from_offsets(
        NAMES, onehot.T.reshape(-1), np.arange(onehot.size + 1)))
    np.testing.assert_allclose(r.json()["predictions"], exp, **TOL)


def test_http_binary_body(session, server):
    client, _ = server
    reqs = requests(4, seed=23)
    for i, (d, s) in enumerate(reqs):
        exp = session.predict(d, s)
        body = encode_request(d, s, id_dtype=np.int64 if i % 2 else np.int32)
        r = client.post("/predict", content=body, headers={
            "Content-Type": BINARY_TYPE, "Accept": PREDICTIONS_TYPE})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == PREDICTIONS_TYPE
        np.testing.assert_allclose(decode_predictions(r.content), exp, **TOL)
        # without Accept: the JSON answer
        r = client.post("/predict", content=body, headers={"Content-Type": BINARY_TYPE})
        np.testing.assert_allclose(r.json()["predictions"], exp, **TOL)
    # one id per table and sample (layout 0)
    ids = np.stack([np.arange(5) % r_ for r_ in ROWS], axis=1)
    dense = np.ones((5, NUM_DENSE), np.float32)
    r = client.post("/predict", content=encode_request(dense, ids),
                    headers={"Content-Type": BINARY_TYPE, "Accept": PREDICTIONS_TYPE})
    exp = session.predict(dense, SparseFeatures.from_offsets(NAMES, ids.T.reshape(-1),
                                                             np.arange(ids.size + 1)))
    np.testing.assert_allclose(decode_predictions(r.content), exp, **TOL)
    # malformed: 400; does not fit the model: 422; ids out of range: 422 naming the table
    d, s = reqs[0]
    body = encode_request(d, s)
    r = client.post("/predict", content=body[:30], headers={"Content-Type": BINARY_TYPE})
    assert r.status_code == 400 and "ends inside" in r.json()["error"]
    r = client.post("/predict", content=encode_request(d[:, :2], s),
                    headers={"Content-Type": BINARY_TYPE})
    assert r.status_code == 422 and "num_dense = 2" in r.json()["error"]
    bad = ids.copy()
    bad[2, 1] = ROWS[1]
    r = client.post("/predict", content=encode_request(dense, bad),
                    headers={"Content-Type": BINARY_TYPE})
    assert r.status_code == 422 and "emb_l.1" in r.json()["error"]
    r = client.get("/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_http_concurrent_clients(session, server):
    client, _ = server
    reqs = requests(24, seed=21)

    async def main():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=20) as ac:
            return await asyncio.gather(*(
                ac.post("/predict", content=npz_body(d, s),
                        headers={"Content-Type": "application/x-npz"}) for d, s in reqs))

    for r, (d, s) in zip(asyncio.run(main()), reqs, strict=True):
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["predictions"], session.predict(d, s), **TOL)


def test_http_bad_requests(server):
    client, _ = server
    d, s = requests(1, seed=22)[0]
    good = json_per_table(d, s)

    def post_json(obj):
        return client.post("/predict", json=obj)

    cases = []
    cases.append((client.post("/predict", content=b"{not json",
                              headers={"Content-Type": "application/json"}), 400, "JSON"))
    cases.append((client.post("/predict", content=b"PK\x03\x04garbage",
                              headers={"Content-Type": "application/x-npz"}), 400, "npz"))
    cases.append((post_json([1, 2]), 422, "JSON object"))
    cases.append((post_json({"sparse": good["sparse"]}), 422, "dense"))
    cases.append((post_json({**good, "dense": [r[:-1] for r in good["dense"]]}), 422, "dense"))
    cases.append((post_json({**good, "dense": [["a"] * NUM_DENSE] * len(d)}), 422, "dense"))
    cases.append((post_json({**good, "dense": good["dense"][:-1] or [[0.0] * NUM_DENSE] * 9}),
                  422, "batch size"))
    oob = json.loads(json.dumps(good))
    oob["sparse"][NAMES[1]]["ids"][0] = ROWS[1] + 5
    if not oob["sparse"][NAMES[1]]["ids"]:
        oob["sparse"][NAMES[1]] = {"ids": [ROWS[1]], "lengths": [1] + [0] * (len(d) - 1)}
    cases.append((post_json(oob), 422, "out of range"))
    unk = json.loads(json.dumps(good))
    unk["sparse"]["mystery"] = unk["sparse"].pop(NAMES[0])
    cases.append((post_json(unk), 422, "mystery"))
    missing = json.loads(json.dumps(good))
    missing["sparse"].pop(NAMES[2])
    cases.append((post_json(missing), 422, NAMES[2]))
    frac = json.loads(json.dumps(good))
    frac["sparse"][NAMES[0]]["ids"] = [0.5] * len(frac["sparse"][NAMES[0]]["ids"]) or [0.5]
    cases.append((post_json(frac), 422, "integers"))
    cases.append((client.post("/predict", content=b"x", headers={"Content-Type": "text/csv"}),
                  415, "Content-Type"))
    cases.append((client.post("/predict", json=good, headers={"X-Deadline-Ms": "soon"}), 400,
                  "X-Deadline-Ms"))
    for r, status, needle in cases:
        assert r.status_code == status, (status, needle, r.text)
        assert needle.lower() in r.json()["error"].lower(), (needle, r.json())
    # the server still answers good requests
    assert client.post("/predict", json=good).status_code == 200


def test_http_body_limit(server):
    client, _ = server
    d, s = make_request(np.random.default_rng(23), 900)  # well over 64 KiB as JSON
    r = client.post("/predict", json=json_kjt(d, s))
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit applies while streaming
        body = json.dumps(json_kjt(d, s)).encode()
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # a zip bomb in a small body is refused before it is unpacked
    buf = io.BytesIO()
    np.savez_compressed(buf, dense=np.zeros((70_000, 5), np.float32))
    r = client.post("/predict", content=buf.getvalue(),
                    headers={"Content-Type": "application/x-npz"})
    assert r.status_code == 413 and "unpacks" in r.json()["error"]


def test_http_health_ready_metrics(server):
    client, rt = server
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    d, s = requests(1, seed=24)[0]
    assert client.post("/predict", json=json_kjt(d, s)).status_code == 200
    text = client.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("tiermem_requests", "tiermem_request_latency_seconds",
                 "tiermem_batch_size_samples", "tiermem_queue_requests",
                 "tiermem_tier_bytes_read", "tiermem_http_requests",
                 "tiermem_http_request_duration_seconds", "tiermem_ready"):
        assert name in fams, (name, sorted(fams))
    done = {s.labels["outcome"]: s.value for s in fams["tiermem_requests"].samples
            if s.name == "tiermem_requests_total"}
    assert done["completed"] >= 1
    lat = {s.name: s.value for s in fams["tiermem_request_latency_seconds"].samples
           if s.labels.get("le") in (None, "+Inf")}
    assert lat["tiermem_request_latency_seconds_count"] == done["completed"]
    ok = [s for s in fams["tiermem_http_requests"].samples
          if s.labels.get("endpoint") == "/predict" and s.labels.get("code") == "200"]
    assert ok and ok[0].value >= 1
    assert next(s.value for s in fams["tiermem_ready"].samples) == 1.0


def test_http_readiness_overload_deadline(session):
    gated = Gated(session)
    rt = ServingRuntime(gated, ServingConfig(BatcherConfig(max_queue_requests=1, max_delay_ms=0)))
    reqs = requests(4, seed=25, max_b=3)
    with serve(rt) as url, httpx.Client(base_url=url, timeout=20) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")  # warm-up is stuck behind the gate
        assert r.status_code == 503 and r.json()["reason"] == "warming up"
        gated.gate.set()
        wait_until(lambda: rt.ready)
        assert client.get("/readyz").status_code == 200
        gated.gate.clear()
        gated.entered.clear()
        with ThreadPoolExecutor(2) as ex:
            held = ex.submit(client.post, "/predict", json=json_kjt(*reqs[0]))
            assert gated.entered.wait(10)
            queued = ex.submit(client.post, "/predict", json=json_kjt(*reqs[1]))
            wait_until(lambda: rt.batcher.queue_depth[0] == 1)
            t0 = time.monotonic()
            r = client.post("/predict", json=json_kjt(*reqs[2]))
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert "overloaded" in r.json()["error"]
            assert time.monotonic() - t0 < 1.0
            gated.gate.set()
            assert held.result(10).status_code == 200
            assert queued.result(10).status_code == 200
        gated.gate.clear()
        gated.entered.clear()
        with ThreadPoolExecutor(1) as ex:
            held = ex.submit(client.post, "/predict", json=json_kjt(*reqs[0]))
            assert gated.entered.wait(10)
            t0 = time.monotonic()
            r = client.post("/predict?deadline_ms=40", json=json_kjt(*reqs[3]))
            assert r.status_code == 504 and "deadline" in r.json()["error"]
            assert time.monotonic() - t0 < 1.0
            gated.gate.set()
            assert held.result(10).status_code == 200
    rt.close()


def test_serve_command_subprocess(model, python, subprocess_env):
    ckpt, store = model
    cmd = [python, "-m", "runtime.cli", "serve", "--model", str(ckpt), "--store", str(store),
           "--port", "0", "--threads", "1", "--max-delay-ms", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=subprocess_env)
    try:
        line = p.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, p.poll())
        url = line.split("listening on ")[1].split()[0]
        with httpx.Client(base_url=url, timeout=20) as client:
            t_end = time.monotonic() + 45
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < t_end
                time.sleep(0.1)
            d, s = requests(1, seed=26)[0]
            r = client.post("/predict", json=json_kjt(d, s))
            assert r.status_code == 200 and len(r.json()["predictions"]) == len(d)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "stopped" in out
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)


def test_serve_parser_and_commands():
    from runtime.cli.app import build_parser
    from runtime.cli.serve import cmd_serve

    ap = build_parser()
    a = ap.parse_args(["serve", "--model", "m.pt", "--store", "s.zarr", "--cache-size", "10%",
                       "--max-body-bytes", "1MiB", "--tier", "ssd"])
    assert a.host == "127.0.0.1" and a.port == 8000
    assert a.cache_size == {"capacity_fraction": 0.1} and a.max_body_bytes == 1 << 20
    assert a.handler is cmd_serve
    a = ap.parse_args(["serve", "--model", "m", "--store", "s", "--auth-token", "t",
                       "--body-timeout-s", "2", "--limit-concurrency", "9",
                       "--max-request-samples", "10", "--max-json-bytes", "1KiB"])
    assert (a.auth_token, a.body_timeout_s, a.limit_concurrency, a.max_request_samples,
            a.max_json_bytes) == ("t", 2.0, 9, 10, 1024)
    assert ap.parse_args(["serve", "--model", "m", "--store", "s", "--max-queue-delay-ms",
                          "50"]).max_queue_delay_ms == 50.0
    for bad in (["--body-timeout-s", "0"], ["--max-request-samples", "0"],
                ["--max-queue-delay-ms", "0"]):
        with pytest.raises(SystemExit):
            ap.parse_args(["serve", "--model", "m", "--store", "s", *bad])
    with pytest.raises(SystemExit):
        ap.parse_args(["serve", "--model", "m", "--store", "s", "--cache-size", "lots"])
