"""Serving robustness figures (issue #17): npz bombs, and 503s under 2.5x overload.

    .venv/bin/python bench/bench_robustness.py [--seconds 3]

1. *Bomb*: a ~2 KB npz whose bzip2 member inflates to 256 MiB. "before" is what
   the server did until #17 (``ZipFile.read`` of the member; peak Python memory by
   tracemalloc, time = how long it held the event loop); "after" is the server
   now: the answer, its time, and the worst ``/healthz`` latency meanwhile, plus
   the same for a deflated 64 MiB bomb and a 16 MiB npz of the budget's size.
2. *Overload*: ``python -m runtime.server`` (a small DLRM, 1 worker, 1 thread)
   in a subprocess; a closed loop of 64 raw-socket clients measures saturation,
   then an open loop offers 2.5x that rate for ``--seconds`` (latency from each
   request's due time); p50/p99 of the 503s and of the 200s, per ``--overload``
   mode (``wait`` with ``--wait-timeout-s 0.2``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.checkpoint import save_dlrm_checkpoint  # noqa: E402
from runtime.convert import store_from_checkpoint  # noqa: E402
from runtime.model import DLRMConfig, random_dense  # noqa: E402
from runtime.wire import BINARY_TYPE, encode_request  # noqa: E402

ROWS = (100_000, 5_000, 50_000, 1_000, 20_000, 300, 10_000, 70)
NUM_DENSE, DIM = 13, 16


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def zip_of(members: dict[str, bytes], method: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a)
    return buf.getvalue()


def build_model(tmp: Path) -> tuple[Path, Path]:
    cfg = DLRMConfig(num_dense=NUM_DENSE, embedding_dim=DIM, num_tables=len(ROWS),
                     bottom_mlp=(64, DIM), top_mlp=(64, 1), interaction="dlrm")
    rng = np.random.default_rng(0)
    tables = [rng.standard_normal((r, DIM)).astype(np.float32) for r in ROWS]
    ckpt = tmp / "model.pt"
    save_dlrm_checkpoint(ckpt, cfg, tables, random_dense(cfg, seed=1))
    store = tmp / "store.zarr"
    store_from_checkpoint(ckpt, store)
    return ckpt, store


def start_server(ckpt: Path, store: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "runtime.server", "--model", str(ckpt), "--store", str(store),
           "--port", "0", "--threads", "1", *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    line = p.stdout.readline()
    url = line.split("listening on ")[1].split()[0]
    with httpx.Client(base_url=url, timeout=60) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.1)
    return p, url


def stop_server(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGINT)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()


def healthz_during(url: str, fn) -> tuple[object, float, float]:
    """``fn()``'s result, its seconds, and the worst /healthz latency meanwhile."""
    done = threading.Event()
    out = {}

    def run():
        t0 = time.perf_counter()
        out["r"] = fn()
        out["t"] = time.perf_counter() - t0
        done.set()

    worst = 0.0
    with httpx.Client(base_url=url, timeout=60) as probe:
        th = threading.Thread(target=run)
        th.start()
        while not done.is_set():
            t0 = time.perf_counter()
            probe.get("/healthz")
            worst = max(worst, time.perf_counter() - t0)
        th.join()
    return out["r"], out["t"], worst


def bombs(url: str) -> None:
    bz = zip_of({"dense.npy": npy(np.zeros(256 << 20, np.uint8))}, zipfile.ZIP_BZIP2)
    tracemalloc.start()
    t0 = time.perf_counter()
    with zipfile.ZipFile(io.BytesIO(bz)) as zf:
        n = len(zf.read("dense.npy"))
    before_t = time.perf_counter() - t0
    before_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"bomb: bzip2 npz of {len(bz)} bytes inflating to {n >> 20} MiB")
    print(f"  before (ZipFile.read on the event loop): peak {before_peak / 2**20:.0f} MiB, "
          f"event loop held {before_t:.2f} s")
    defl = zip_of({"dense.npy": npy(np.zeros(64 << 20, np.uint8))}, zipfile.ZIP_DEFLATED)
    rng = np.random.default_rng(2)
    big = zip_of({"dense.npy": npy(rng.integers(0, 255, 15 << 20, dtype=np.uint8)),
                  "pad.npy": npy(np.zeros(40 << 20, np.uint8))}, zipfile.ZIP_DEFLATED)
    with httpx.Client(base_url=url, timeout=60) as c:
        for name, body in (("bzip2 bomb", bz), ("deflate bomb (64 MiB)", defl),
                           ("16 MiB npz, 55 MiB inflated", big)):
            r, t, worst = healthz_during(url, lambda b=body: c.post(
                "/predict", content=b, headers={"Content-Type": "application/x-npz"}))
            print(f"  after, {name} ({len(body)} bytes): {r.status_code} in {t * 1e3:.0f} ms, "
                  f"worst /healthz meanwhile {worst * 1e3:.0f} ms; "
                  f"{r.json()['error'][:70]!r}")


def request_body(rng: np.random.Generator, b: int = 256) -> bytes:
    ids = np.stack([rng.integers(0, r, b) for r in ROWS], axis=1)
    return encode_request(rng.random((b, NUM_DENSE), dtype=np.float32), ids)


async def post_raw(host: str, port: int, body: bytes) -> int:
    """One POST on a fresh connection (a light client: httpx cannot offer 2.5x)."""
    r, w = await asyncio.open_connection(host, port)
    w.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: " + BINARY_TYPE.encode()
            + b"\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)
    try:
        line = await r.readline()
        await r.read()
        return int(line.split()[1]) if line else -1
    finally:
        w.close()


def _addr(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> float:
    host, port = _addr(url)
    n = 0
    t_end = time.perf_counter() + seconds

    async def worker(i):
        nonlocal n
        while time.perf_counter() < t_end:
            n += await post_raw(host, port, bodies[i % len(bodies)]) == 200
    await asyncio.gather(*(worker(i) for i in range(clients)))
    return n / seconds


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float
                    ) -> dict[int, list[float]]:
    host, port = _addr(url)
    out: dict[int, list[float]] = {}

    async def one(i, t0):
        try:
            code = await post_raw(host, port, bodies[i % len(bodies)])
        except OSError:
            code = -1
        out.setdefault(code, []).append(time.perf_counter() - t0)
    tasks = []
    t_start = time.perf_counter()
    for i in range(int(rate * seconds)):
        t_due = t_start + i / rate
        delay = t_due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, t_due)))
    await asyncio.gather(*tasks)
    return out


def pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q)) * 1e3 if v else float("nan")


def overload(ckpt: Path, store: Path, seconds: float) -> None:
    rng = np.random.default_rng(3)
    bodies = [request_body(rng) for _ in range(64)]
    for mode, extra in (("reject", ()), ("wait", ("--wait-timeout-s", "0.2"))):
        p, url = start_server(ckpt, store, "--overload", mode, "--max-queue", "64",
                              "--max-delay-ms", "1")
        try:
            asyncio.run(closed_loop(url, bodies, 4, 3.0))  # compiles the body's kernel variant
            sat = asyncio.run(closed_loop(url, bodies, 64, min(seconds, 2.0)))
            res = asyncio.run(open_loop(url, bodies, 2.5 * sat, seconds))
        finally:
            stop_server(p)
        parts = ", ".join(f"{code}: {len(v)} (p50 {pct(v, 50):.1f} ms, p99 {pct(v, 99):.1f} "
                          f"ms)" for code, v in sorted(res.items()))
        print(f"overload {mode}{' ' + ' '.join(extra) if extra else ''}: saturation "
              f"{sat:.0f} req/s (256 samples each), offered {2.5 * sat:.0f} req/s for "
              f"{seconds:g} s -> {parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, store = build_model(Path(tmp))
        p, url = start_server(ckpt, store)
        try:
            bombs(url)
        finally:
            stop_server(p)
        overload(ckpt, store, args.seconds)


if __name__ == "__main__":
    main()
