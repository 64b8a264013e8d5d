"""A server no request can take down (issue #17, serving half), on a real uvicorn on loopback.

Bombs, huge counts, deep nesting, bad deadlines, stalled raw-socket clients,
overload in both modes, server-side faults and auth: each answered with the
status that tells the truth, in bounded time, while /healthz keeps answering.
The fuzz suite mutates valid bodies of every codec and asserts "4xx (or a
valid 200) within a time bound".
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import zipfile

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.batcher import BatcherConfig, DynamicBatcher, Overloaded
from runtime.service import ServingConfig, ServingRuntime
from runtime.session import InferenceSession, RuntimeConfig
from runtime.wire import BINARY_TYPE, MAGIC, encode_request
from tests.test_service import (  # noqa: F401 - model_fixture is the fixture `model`
    NAMES,
    NUM_DENSE,
    ROWS,
    Gated,
    json_kjt,
    make_request,
    model_fixture,
    npz_body,
    serve,
    wait_until,
)
from tiermem.errors import InvalidBatchError, StoreError

pytestmark = pytest.mark.timeout(60)

NPZ = {"Content-Type": "application/x-npz"}
BIN = {"Content-Type": BINARY_TYPE}


@pytest.fixture(scope="module")
def session(model):
    s = InferenceSession.open(*model, RuntimeConfig(num_threads=1))
    yield s
    s.close()


@pytest.fixture(scope="module")
def hard(session):
    """One server for the module: small limits, short timeouts."""
    rt = ServingRuntime(session, ServingConfig(BatcherConfig(max_batch_size=256, max_delay_ms=1,
                                                             max_request_samples=1000,
                                                             max_request_ids=20_000)))
    assert rt.wait_ready(30)
    with serve(rt, server_kw={"header_timeout_s": 0.5, "limit_concurrency": 64},
               max_body_bytes=256 << 10, max_json_bytes=128 << 10, body_timeout_s=0.5) as url, \
            httpx.Client(base_url=url, timeout=10) as client:
        for body, headers in SEEDS.values():  # compile every kernel variant the seeds use
            assert client.post("/predict", content=body, headers=headers,
                               timeout=60).status_code == 200
        yield client, rt, url
    rt.close()


def _zip(members: dict[str, bytes], method: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a)
    return buf.getvalue()


def _valid_members(rng, b=3):
    d, s = make_request(rng, b)
    return {"dense.npy": _npy(d), "values.npy": _npy(s.values),
            "offsets.npy": _npy(s.offsets)}


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _timed_post(client, body, headers, bound=2.0):
    t0 = time.monotonic()
    r = client.post("/predict", content=body, headers=headers)
    dt = time.monotonic() - t0
    assert dt < bound, (dt, r.status_code, r.text[:200])
    return r


# -- bounded decoding -------------------------------------------------------------------------

@pytest.mark.parametrize("method,name", [(zipfile.ZIP_BZIP2, "bzip2"),
                                         (zipfile.ZIP_LZMA, "LZMA")])
def test_npz_bzip2_lzma_members_refused(hard, method, name):
    client, _, _ = hard
    body = _zip(_valid_members(np.random.default_rng(1)), method)
    r = _timed_post(client, body, NPZ, 1.0)
    assert r.status_code == 415 and name in r.json()["error"], r.text


def test_npz_bombs_bounded(hard):
    """A deflated member inflating to 64 MiB (declared honestly, or as 100 bytes) is
    refused at the budget (4 x max_body_bytes = 1 MiB), fast, without the memory."""
    client, _, _ = hard
    zeros = np.zeros(16 << 20, np.float32)  # 64 MiB of npy data, ~64 KiB deflated
    honest = _zip({"dense.npy": _npy(zeros)}, zipfile.ZIP_DEFLATED)
    assert len(honest) < 256 << 10
    lying = bytearray(honest)
    cd = lying.rfind(b"PK\x01\x02")  # central directory entry: uncompressed size at +24
    struct.pack_into("<I", lying, cd + 24, 100)
    lh = lying.find(b"PK\x03\x04")  # local header: at +22
    struct.pack_into("<I", lying, lh + 22, 100)
    hwm = _vm_hwm_kib()
    r = _timed_post(client, honest, NPZ, 1.0)
    assert r.status_code == 413 and "unpacks to more than" in r.json()["error"], r.text
    r = _timed_post(client, bytes(lying), NPZ, 1.0)  # the declared size is not trusted
    assert r.status_code == 413 and "unpacks to more than" in r.json()["error"], r.text
    assert _vm_hwm_kib() - hwm < 40 << 10  # < 40 MiB more at peak, not 64+ MiB
    # many small members
    many = _zip({f"m{i}.npy": b"x" for i in range(100)}, zipfile.ZIP_STORED)
    r = _timed_post(client, many, NPZ, 1.0)
    assert r.status_code == 400 and "members" in r.json()["error"]


def test_huge_counts_refused_before_allocation(hard):
    client, _, _ = hard
    # a binary header claiming 2^31 - 1 samples, in 24 bytes
    head = struct.pack("<4sIIIBBBBI", MAGIC, (1 << 31) - 1, NUM_DENSE, len(ROWS), 0, 4, 0, 0,
                       0)
    r = _timed_post(client, head, BIN, 1.0)
    assert r.status_code in (400, 413), r.text
    head = struct.pack("<4sIIIBBBBI", MAGIC, 5000, NUM_DENSE, len(ROWS), 0, 4, 0, 0,
                       5000 * len(ROWS))
    r = _timed_post(client, head, BIN, 1.0)
    assert r.status_code == 413 and "5000 samples" in r.json()["error"], r.text
    # one-id-per-table int8 npz: 50000 samples in a few KiB, refused before widening
    buf = io.BytesIO()
    np.savez_compressed(buf, dense=np.zeros((50_000, NUM_DENSE), np.int8),
                        sparse=np.zeros((50_000, len(ROWS)), np.int8))
    r = _timed_post(client, buf.getvalue(), NPZ, 1.0)
    assert r.status_code == 413 and "50000 samples" in r.json()["error"], r.text
    # ids over the limit in a valid KJT binary body
    d = np.zeros((1, NUM_DENSE), np.float32)
    from tiermem.features import SparseFeatures

    lengths = np.array([30_000, 0, 0, 0])
    s = SparseFeatures.from_lengths(NAMES, np.zeros(30_000, np.int64), lengths)
    r = _timed_post(client, encode_request(d, s), BIN, 1.0)
    assert r.status_code == 413 and "30000 ids" in r.json()["error"], r.text


def test_json_nesting_and_size(hard):
    client, _, _ = hard
    r = _timed_post(client, b"[" * 100_000, {"Content-Type": "application/json"}, 1.0)
    assert r.status_code == 400 and "nested" in r.json()["error"], r.text
    r = _timed_post(client, b'{"dense": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                    {"Content-Type": "application/json"}, 1.0)
    assert r.status_code == 400 and "nested" in r.json()["error"], r.text
    big = b'{"dense": [' + b"0," * (100 << 10) + b'0]}'  # over the 128 KiB JSON limit
    r = _timed_post(client, big, {"Content-Type": "application/json"}, 1.0)
    assert r.status_code == 413 and "JSON limit" in r.json()["error"], r.text


def test_non_finite_weights_refused(hard):
    client, _, _ = hard
    d, s = make_request(np.random.default_rng(3), 2, weighted=True)
    body = json_kjt(d, s)
    body["weights"] = [float("nan")] * len(body["values"]) or [float("nan")]
    if not body["values"]:
        return
    r = client.post("/predict", content=json.dumps(body), headers={"Content-Type":
                                                                  "application/json"})
    assert r.status_code == 422 and "weights" in r.json()["error"], r.text


def test_healthz_answers_while_a_large_body_decodes(session):
    """A max-size npz (16 MiB, deflated members inflating to the 64 MiB budget) decodes on
    a decode thread: /healthz keeps answering within 100 ms (in one of three tries: the
    CPU is shared; decoding on the event loop would stall every try by ~0.2-0.4 s)."""
    rt = ServingRuntime(session, ServingConfig(BatcherConfig(max_delay_ms=1)))
    assert rt.wait_ready(30)
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 255, 15 << 20, dtype=np.uint8)  # incompressible: 15 MiB body
    body = _zip({"dense.npy": _npy(noise), "pad.npy": _npy(np.zeros(40 << 20, np.uint8))},
                zipfile.ZIP_DEFLATED)
    with serve(rt) as url, httpx.Client(base_url=url, timeout=20) as client:
        client.get("/healthz")
        worst = []
        for _ in range(3):
            done = threading.Event()
            out = {}

            def post(out=out, done=done):
                out["r"] = client.post("/predict", content=body, headers=NPZ)
                done.set()

            lat = []
            with httpx.Client(base_url=url, timeout=20) as probe:
                th = threading.Thread(target=post)
                th.start()
                while not done.is_set():
                    t0 = time.monotonic()
                    assert probe.get("/healthz").status_code == 200
                    lat.append(time.monotonic() - t0)
                th.join()
            assert out["r"].status_code == 422, out["r"].text  # uint8 dense: 1-D, not (B, 5)
            worst.append(max(lat))
            if worst[-1] < 0.1:
                break
        assert min(worst) < 0.1, worst
    rt.close()


# -- deadlines ------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["header", "json", "query"])
@pytest.mark.parametrize("value", ["1e308", "inf", "nan", "-5", "0", "3600001"])
def test_bad_deadlines_400(hard, where, value):
    client, rt, _ = hard
    d, s = make_request(np.random.default_rng(4), 2)
    body = json_kjt(d, s)
    headers, url = {"Content-Type": "application/json"}, "/predict"
    if where == "header":
        headers["X-Deadline-Ms"] = value
    elif where == "query":
        url += f"?deadline_ms={value}"
    else:
        body["deadline_ms"] = float(value)
    r = client.post(url, content=json.dumps(body), headers=headers)
    assert r.status_code == 400 and "deadline" in r.json()["error"].lower(), r.text
    assert rt.batcher.reaper_alive


def test_deadline_thread_survives_a_bug(session):
    """A broken heap entry (a bug in the deadline thread's loop) is logged, and later
    deadlines still fail on time; a deadline past one hour is refused on submit."""
    b = DynamicBatcher(Gated(session), BatcherConfig(max_delay_ms=0))
    try:
        gate = b.session
        d, s = make_request(np.random.default_rng(6), 1)
        held = b.submit(d, s)  # occupies the worker
        assert gate.entered.wait(10)
        with b._cv:
            b._deadlines.append((0.0, -1, None))  # AttributeError inside the reaper
            b._cv.notify_all()
        time.sleep(0.05)
        assert b.reaper_alive
        t0 = time.monotonic()
        fut = b.submit(d, s, deadline=time.monotonic() + 0.05)
        with pytest.raises(TimeoutError):
            fut.result(5)
        assert time.monotonic() - t0 < 0.5
        with pytest.raises(InvalidBatchError, match="deadline"):
            b.submit(d, s, deadline=time.monotonic() + 1e300)
        with pytest.raises(InvalidBatchError, match="deadline"):
            b.submit(d, s, deadline=float("nan"))
        gate.gate.set()
        held.result(10)
    finally:
        b.session.gate.set()
        b.close()


# -- overload -------------------------------------------------------------------------------

def test_overload_wait_is_bounded_end_to_end(session):
    """60 waiters on a stuck batcher: every one is refused by wait_timeout_s (+ slack),
    none queued behind an executor (the old default executor ran 6 at a time)."""
    gated = Gated(session)
    rt = ServingRuntime(gated, ServingConfig(BatcherConfig(max_queue_requests=1, max_delay_ms=0,
                                                           overload="wait", wait_timeout_s=0.3),
                                             warmup=False))
    d, s = make_request(np.random.default_rng(7), 1)

    async def one():
        t0 = time.monotonic()
        try:
            await rt.predict_async(d, s)
            return "ok", time.monotonic() - t0
        except Overloaded:
            return "503", time.monotonic() - t0

    async def main():
        first = asyncio.ensure_future(rt.predict_async(d, s))
        await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 10)
        second = asyncio.ensure_future(rt.predict_async(d, s))  # fills the queue
        await asyncio.sleep(0.02)
        res = await asyncio.gather(*(one() for _ in range(60)))
        gated.gate.set()
        await first
        await second
        return res

    try:
        res = asyncio.run(main())
    finally:
        gated.gate.set()
        rt.close()
    assert all(k == "503" for k, _ in res), res
    lat = [t for _, t in res]
    assert min(lat) >= 0.29 and max(lat) < 0.6, (min(lat), max(lat))
    assert rt.batcher.counters.rejected == 60


def test_overload_wait_admits_when_room_frees(session):
    gated = Gated(session)
    rt = ServingRuntime(gated, ServingConfig(BatcherConfig(max_queue_requests=1, max_delay_ms=0,
                                                           overload="wait", wait_timeout_s=5),
                                             warmup=False))
    d, s = make_request(np.random.default_rng(8), 1)

    async def main():
        tasks = [asyncio.ensure_future(rt.predict_async(d, s)) for _ in range(6)]
        await asyncio.sleep(0.1)
        gated.gate.set()
        return await asyncio.gather(*tasks)

    try:
        t0 = time.monotonic()
        res = asyncio.run(main())
        assert time.monotonic() - t0 < 3
    finally:
        gated.gate.set()
        rt.close()
    exp = session.predict(d, s)
    for p in res:
        np.testing.assert_allclose(p, exp, rtol=1e-5, atol=1e-6)


def test_overload_reject_fast_over_http(session):
    gated = Gated(session)
    rt = ServingRuntime(gated, ServingConfig(BatcherConfig(max_queue_requests=2, max_delay_ms=0),
                                             warmup=False))
    d, s = make_request(np.random.default_rng(9), 2)
    body = encode_request(d, s)
    with serve(rt) as url:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=20) as ac:
                async def one():
                    t0 = time.monotonic()
                    r = await ac.post("/predict", content=body, headers=BIN)
                    return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")
                first = asyncio.ensure_future(one())
                await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 10)
                queued = [asyncio.ensure_future(one()) for _ in range(2)]
                await asyncio.sleep(0.1)
                res = await asyncio.gather(*(one() for _ in range(40)))
                gated.gate.set()
                return [await first, *[await q for q in queued]], res
        admitted, res = asyncio.run(main())
    gated.gate.set()
    rt.close()
    assert [a[0] for a in admitted] == [200, 200, 200]
    assert all(c == 503 and ra == "1" for c, _, ra in res), res
    assert max(t for _, t, _ in res) < 1.0


# -- connection hygiene -----------------------------------------------------------------------

def _connect(url):
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def _read_all(sock, bound):
    t_end = time.monotonic() + bound
    data = b""
    while time.monotonic() < t_end:
        sock.settimeout(max(0.01, t_end - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            return data, True  # closed by the server
        data += chunk
    return data, False


def test_stalled_body_gets_408_and_close(hard):
    client, _, url = hard
    socks = []
    try:
        for short in (500, 100):  # half a body; a body 100 bytes short of its length
            sock = _connect(url)
            socks.append(sock)
            head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n")
            sock.sendall(head + b" " * (1000 - short))
        t0 = time.monotonic()
        for sock in socks:
            data, closed = _read_all(sock, 3.0)
            assert data.startswith(b"HTTP/1.1 408"), data[:200]
            assert closed
        assert time.monotonic() - t0 < 3.0
        assert client.get("/healthz").status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_stalled_headers_closed_and_connections_capped(hard):
    """Connections that never finish their headers are closed after the header timeout;
    while they are open, the connection cap (64) answers 503 to new requests, and once
    they are gone the server answers again."""
    client, _, url = hard
    socks = [_connect(url) for _ in range(64)]
    try:
        for sock in socks:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le")
        time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=5) as fresh:
            assert fresh.get("/healthz").status_code == 503
        t0 = time.monotonic()
        for sock in socks:
            data, closed = _read_all(sock, 3.0)
            assert closed, data[:100]
        assert time.monotonic() - t0 < 3.0
        wait_until(lambda: client.get("/healthz").status_code == 200, 3)
    finally:
        for sock in socks:
            sock.close()


# -- status codes that tell the truth ------------------------------------------------------------

class Faulty:
    """A real session whose predict fails (or returns NaN) the way a fault would."""

    def __init__(self, session):
        self._s = session
        self.fault = None

    def __getattr__(self, name):
        return getattr(self._s, name)

    def predict(self, dense, sparse):
        if self.fault == "nan":
            out = self._s.predict(dense, sparse)
            out[0] = np.nan
            return out
        if self.fault is not None:
            raise self.fault
        return self._s.predict(dense, sparse)


def test_faults_are_5xx_with_request_id_and_degrade_readiness(session):
    faulty = Faulty(session)
    rt = ServingRuntime(faulty, ServingConfig(BatcherConfig(max_delay_ms=0), warmup=False))
    d, s = make_request(np.random.default_rng(10), 2)
    body = encode_request(d, s)
    with serve(rt) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/predict", content=body, headers=BIN).status_code == 200
        assert client.get("/readyz").status_code == 200
        faulty.fault = StoreError("chunk /secret/path/0.1 truncated")
        r = client.post("/predict", content=body, headers=BIN)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        j = r.json()
        assert "storage fault" in j["error"] and j["request_id"] in j["error"]
        assert "secret" not in r.text
        r = client.get("/readyz")
        assert r.status_code == 503 and "store fault" in r.json()["reason"], r.text
        faulty.fault = RuntimeError("internal secret")
        r = client.post("/predict", content=body, headers=BIN)
        assert r.status_code == 500 and "secret" not in r.text and r.json()["request_id"]
        faulty.fault = "nan"
        r = client.post("/predict", content=body, headers=BIN)
        assert r.status_code == 500 and "NaN" in r.json()["error"], r.text
        assert "NaN" not in r.text.replace("NaN or", "")  # no NaN literal in the body
        try:
            from runtime.distributed.sharded import ShardUnavailableError
        except Exception:  # noqa: BLE001
            ShardUnavailableError = None
        if ShardUnavailableError is not None:
            faulty.fault = ShardUnavailableError("shard 1 died")
            r = client.post("/predict", content=body, headers=BIN)
            assert r.status_code == 503 and "shard" in r.json()["error"], r.text
            assert r.headers["retry-after"] == "1"
        text = client.get("/metrics").text
        faults = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("tiermem_faults_total")}
        assert faults["store"] == 1 and faults["internal"] == 1 and faults["nonfinite"] == 1
    rt.close()


def test_auth_token(session):
    rt = ServingRuntime(session, ServingConfig(BatcherConfig(max_delay_ms=0), warmup=False))
    d, s = make_request(np.random.default_rng(11), 2)
    body = encode_request(d, s)
    with serve(rt, auth_token="s3cret") as url, httpx.Client(base_url=url, timeout=10) as c:
        assert c.post("/predict", content=body, headers=BIN).status_code == 401
        r = c.post("/predict", content=body, headers={**BIN, "Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        ok = {**BIN, "Authorization": "Bearer s3cret"}
        assert c.post("/predict", content=body, headers=ok).status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    rt.close()


# -- fuzz: every codec ------------------------------------------------------------------------

def _seed_bodies():
    rng = np.random.default_rng(12)
    d, s = make_request(rng, 3, weighted=True)
    return {
        "json": (json.dumps(json_kjt(d, s)).encode(), {"Content-Type": "application/json"}),
        "npz": (npz_body(d, s), NPZ),
        "npz_deflated": (_zip(_valid_members(rng), zipfile.ZIP_DEFLATED), NPZ),
        "binary": (encode_request(d, s), BIN),
    }


SEEDS = _seed_bodies()


@st.composite
def mutated(draw):
    codec = draw(st.sampled_from(sorted(SEEDS)))
    body, headers = SEEDS[codec]
    body = bytearray(body)
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "nest", "count"]))
    if kind == "truncate":
        body = body[:draw(st.integers(0, len(body)))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(body) - 1))
            body[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "splice":
        i = draw(st.integers(0, len(body)))
        body[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "nest":
        depth = draw(st.integers(100, 20_000))
        body = bytearray(b'{"dense": ' + b"[" * depth + b"]" * depth + b', "sparse": {}}')
        headers = {"Content-Type": "application/json"}
    else:  # a count field of the binary header set huge
        body = bytearray(SEEDS["binary"][0])
        off = draw(st.sampled_from([4, 8, 12, 20]))
        struct.pack_into("<I", body, off, draw(st.integers(0, (1 << 32) - 1)))
        headers = BIN
    return bytes(body), headers


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _reset_peak_rss() -> bool:
    """Make VmHWM the current RSS (Linux >= 4.0: ``5`` to clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


FUZZ_PEAK_MIB = 32
"""Most the server's process may grow at peak over the whole fuzz run (bodies <= 256 KiB,
npz unpacked <= 1 MiB, counts refused before allocation; a bomb would take GiB)."""


def test_fuzz_every_codec_4xx_in_bounded_time(hard):
    """Every mutated body: 4xx (or a strict-JSON 200) within 1 s, and the process (the
    server runs in it) peaks at most FUZZ_PEAK_MIB above where the run started."""
    base = _rss_kib() if _reset_peak_rss() else _rss_kib("VmHWM")
    cases = []
    _fuzz_every_codec(hard, cases)
    grew = (_rss_kib("VmHWM") - base) / 1024
    assert len(cases) >= 50, len(cases)
    assert grew < FUZZ_PEAK_MIB, f"peak memory grew {grew:.0f} MiB over the fuzz run"


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=mutated())
def _fuzz_every_codec(hard, cases, case):
    client, _, _ = hard
    body, headers = case
    cases.append(len(body))
    r = _timed_post(client, body, headers, 1.0)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 200:  # a mutation may stay valid: then the answer is strict JSON
        preds = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
        assert np.isfinite(preds["predictions"]).all()
    else:
        assert r.status_code >= 400 and r.json()["error"]


# -- tiermem serve as a real process: auth token, TLS ------------------------------------------

def _serve_process(model, python, env, *extra):
    """``tiermem serve`` (python -m runtime.cli serve) on a free port; (process, base URL)."""
    ckpt, store = model
    cmd = [python, "-m", "runtime.cli", "serve", "--model", str(ckpt), "--store", str(store),
           "--port", "0", "--threads", "1", "--max-delay-ms", "0", "--no-warmup", *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    line = p.stdout.readline()
    if "listening on " not in line:
        p.kill()
        pytest.fail(f"serve did not start: {line!r} {p.communicate(timeout=10)[1][-2000:]}")
    return p, line.split("listening on ")[1].split()[0]


def _stop(p):
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert p.returncode == 0, err[-2000:]


def test_serve_process_auth_token(model, session, python, subprocess_env):
    d, s = make_request(np.random.default_rng(13), 3)
    body = encode_request(d, s)
    env = {**subprocess_env, "TIERMEM_AUTH_TOKEN": "not-this-one"}  # the flag wins
    p, url = _serve_process(model, python, env, "--auth-token", "T0k3n")
    try:
        with httpx.Client(base_url=url, timeout=20) as c:
            assert c.get("/healthz").status_code == 200  # open, no token
            assert c.get("/readyz").status_code == 200
            r = c.post("/predict", content=body, headers=BIN)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            for wrong in ("Bearer not-this-one", "Bearer T0k3", "T0k3n", "Basic T0k3n"):
                assert c.post("/predict", content=body,
                              headers={**BIN, "Authorization": wrong}).status_code == 401
            assert c.get("/metrics").status_code == 401
            ok = {"Authorization": "Bearer T0k3n"}
            r = c.post("/predict", json=json_kjt(d, s), headers=ok)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["predictions"], session.predict(d, s),
                                       rtol=1e-5, atol=1e-6)
            assert "tiermem_requests" in c.get("/metrics", headers=ok).text
    finally:
        _stop(p)


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key, made by the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:  # the cryptography package is not a dependency either
        pytest.skip("no openssl CLI to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return cert, key


def test_serve_process_tls(model, session, python, subprocess_env, tmp_path):
    cert, key = _self_signed(tmp_path)
    d, s = make_request(np.random.default_rng(14), 2)
    p, url = _serve_process(model, python, subprocess_env, "--ssl-certfile", str(cert),
                            "--ssl-keyfile", str(key))
    try:
        assert url.startswith("https://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=20, verify=ssl.create_default_context(
                cafile=str(cert))) as c:
            assert c.get("/healthz").status_code == 200
            r = c.post("/predict", content=encode_request(d, s), headers=BIN)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["predictions"], session.predict(d, s),
                                       rtol=1e-5, atol=1e-6)
        with httpx.Client(base_url=url, timeout=20) as c, pytest.raises(httpx.ConnectError,
                                                                         match="CERTIFICATE"):
            c.get("/healthz")  # not trusted without the certificate
        with httpx.Client(base_url=url.replace("https", "http"), timeout=5) as c, \
                pytest.raises(httpx.HTTPError):
            c.get("/healthz")  # plain HTTP gets no answer
    finally:
        _stop(p)
