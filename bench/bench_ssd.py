"""SSD tier with a cold page cache vs the device's own random-read rate.

In one run:
1. the raw rate: random 4 KiB ``pread`` s over the store's files from the same
   number of I/O threads the tier uses (GIL-free Numba calls), cache dropped;
2. the SSD tier pooling batches of uniform random ids (so nearly every row
   is a cold miss), cache dropped before each repetition;
and prints rows/s, read ops/s and their ratio to the raw rate.

    python bench/bench_ssd.py [--rows 4000000] [--dim 64] [--io-threads 64]

The store is built once under ``bench-out/`` (about rows x dim x 4 bytes).
``posix_fadvise(DONTNEED)`` empties this guest's page cache for the files;
the host below a virtual disk may still cache, which would flatter both
figures alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiermem.config import TierConfig, TierKind  # noqa: E402
from tiermem.features import SparseFeatures  # noqa: E402
from tiermem.format import TableSpec, create_random_store, open_store  # noqa: E402
from tiermem.kernels.rowio import pread_scatter  # noqa: E402
from tiermem.tiers import SsdTier  # noqa: E402


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_pages(paths: list[Path]) -> str:
    if not shutil.which("fincore"):
        return "fincore not available"
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *map(str, paths)],
                         capture_output=True, text=True, check=False).stdout.split()
    return f"{sum(int(x) for x in out if x.isdigit()) / 2**20:.1f} MiB resident"


def aligned_empty(n: int, align: int = 4096) -> np.ndarray:
    raw = np.empty(n + align, np.uint8)
    skip = (-raw.ctypes.data) % align
    return raw[skip:skip + n]


def raw_random_reads(paths: list[Path], n_reads: int, threads: int, seed: int,
                     direct: bool) -> float:
    """Random 4 KiB reads/s over the files, ``threads`` GIL-free readers."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = np.array([os.open(p, flags) for p in paths], np.int32)
    for fd in fds:
        os.posix_fadvise(int(fd), 0, 0, os.POSIX_FADV_RANDOM)
    try:
        blocks = os.path.getsize(paths[0]) // 4096
        rng = np.random.default_rng(seed)
        chunk = rng.integers(0, len(paths), n_reads)
        first = rng.integers(0, blocks, n_reads)
        order = np.lexsort((first, chunk))
        chunk, first = chunk[order].astype(np.int64), first[order].astype(np.int64)
        u0 = np.arange(n_reads + 1, dtype=np.int64)
        dst = np.empty((n_reads, 4096), np.uint8)
        ext_fd = fds[chunk].astype(np.int64)
        ext_off = first * 4096
        size = np.full(n_reads, 4096, np.int64)
        src = np.zeros(n_reads, np.int64)
        addr = dst.ctypes.data + np.arange(n_reads, dtype=np.int64) * 4096
        bounds = np.linspace(0, n_reads, threads + 1).astype(np.int64)
        no_verify, no_sums = np.full(n_reads, -1, np.int64), np.zeros(1, np.uint64)
        no_rows = np.zeros(1, np.uint32)

        def job(a: int, b: int) -> int:
            scratch = aligned_empty(3 * 4096)
            return int(pread_scatter(ext_fd, ext_off, size, u0, src, addr, size, scratch, a, b,
                                     4096 if direct else 0, no_verify, no_sums,
                                     scratch.view(np.uint64), no_verify, no_rows,
                                     scratch, scratch.view(np.uint64)))

        job(0, 1)  # compile
        drop_cache(paths)
        with ThreadPoolExecutor(threads) as ex:
            t0 = time.perf_counter()
            res = list(ex.map(job, bounds[:-1], bounds[1:]))
            dt = time.perf_counter() - t0
        if any(r >= 0 for r in res):
            raise RuntimeError("raw pread failed")
        return n_reads / dt
    finally:
        for fd in fds:
            os.close(int(fd))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--pooling", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--io-threads", type=int, default=64)
    ap.add_argument("--dir", default="bench-out")
    ap.add_argument("--direct", action="store_true",
                    help="O_DIRECT for both the raw reads and the tier (no page cache)")
    ap.add_argument("--quick", action="store_true", help="small store, few reps (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.reps, args.batch_size, args.pooling = 200_000, 2, 256, 8

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.machine())
    print(f"machine: {cpu}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    path = Path(args.dir) / f"ssd-{args.rows}x{args.dim}.zarr"
    try:
        info = open_store(path)
    except Exception:
        t0 = time.perf_counter()
        info = create_random_store(path, [TableSpec("t0", args.rows, args.dim)], overwrite=True,
                                   progress=True)
        print(f"built {path} ({info.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    t = info.tables[0]
    files = [t.weight_chunk(c) for c in range(t.n_chunks)]
    print(f"store: {args.rows:,} x {args.dim} float32 = {info.nbytes / 2**30:.2f} GiB in "
          f"{len(files)} chunk files; io threads {args.io_threads}")

    raw = raw_random_reads(files, 40_000 if not args.quick else 5_000, args.io_threads, 1,
                           args.direct)
    mode = "O_DIRECT" if args.direct else "page cache dropped"
    print(f"raw device: {raw:,.0f} random 4 KiB reads/s ({args.io_threads} GIL-free readers, "
          f"{mode})")

    tier = SsdTier(info, TierConfig(kind=TierKind.SSD, io_threads=args.io_threads,
                                    direct_io=args.direct))
    rng = np.random.default_rng(2)
    nnz = args.batch_size * args.pooling
    offsets = np.arange(0, nnz + 1, args.pooling, dtype=np.int64)
    tier.pool(SparseFeatures(("t0",), rng.integers(0, args.rows, 64), np.arange(0, 65, 64)))
    rows_s, ops_s, look_s = [], [], []
    for _ in range(args.reps):
        feats = SparseFeatures(("t0",), rng.integers(0, args.rows, nnz), offsets)
        tier.drop_page_cache()
        tier.stats.reset()
        t0 = time.perf_counter()
        tier.pool(feats)
        dt = time.perf_counter() - t0
        s = tier.stats.total()
        rows_s.append(s.rows_read / dt)
        ops_s.append(s.read_ops / dt)
        look_s.append(nnz / dt)
    print(resident_pages(files[:4]) + " (first 4 chunk files, after the last run)")
    tier.close()
    r, o, lk = (statistics.median(x) for x in (rows_s, ops_s, look_s))
    print(f"SSD tier, cold: {lk:,.0f} lookups/s, {r:,.0f} rows/s, {o:,.0f} read ops/s "
          f"(batch {args.batch_size} x pooling {args.pooling}, uniform ids, median of {args.reps})")
    print(f"ratio of tier read ops/s to raw 4 KiB reads/s: {o / raw:.2f}")


if __name__ == "__main__":
    main()
