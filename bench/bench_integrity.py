"""The cost of block checksums: verified reads vs ``TierConfig(verify=False)``, interleaved.

    python bench/bench_integrity.py [--rows 2000000 --dim 32 --reps 5]

Two figures (the goals of issue 17): DRAM-tier load (each 1 MiB piece
hashed on another thread right after it is read; goal <= 10%), from the cold
disk (a service starting) and from the page cache, and the cold
SSD path (page cache dropped before each batch with POSIX_FADV_DONTNEED;
each row checked against its 32-bit row checksum in the read kernel; goal
<= 5%), plus the warm (page-cached) SSD path (goal ~10%). Runs alternate
verified / unverified, so drift hits both; the ratio is of medians. Prints the CPU model.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiermem.config import TierConfig  # noqa: E402
from tiermem.features import SparseFeatures  # noqa: E402
from tiermem.format import TableSpec, create_random_store  # noqa: E402
from tiermem.tiers import DramTier, SsdTier  # noqa: E402


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def drop_page_cache(root: Path) -> None:
    """POSIX_FADV_DONTNEED on every file of a store: its next read comes from the disk."""
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4096, help="ids per SSD batch")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--dir", default=None, help="where the store goes (default: a temp folder)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        info = create_random_store(Path(d) / "s.zarr", [TableSpec("t", a.rows, a.dim)])
        print(f"cpu: {cpu_model()}; store {info.nbytes / 2**20:.0f} MiB, rows {a.rows:,} x "
              f"{a.dim} float32")
        DramTier(info).close()  # compile, and bring the files into the page cache
        load = {(v, cold): [] for v in (True, False) for cold in (True, False)}
        for _ in range(a.reps):
            for cold in (True, False):
                for v in (True, False):
                    if cold:  # a service starting: the tables come from the disk
                        drop_page_cache(Path(d) / "s.zarr")
                    t0 = time.perf_counter()
                    DramTier(info, TierConfig(verify=v)).close()
                    load[(v, cold)].append(time.perf_counter() - t0)
                if cold:
                    DramTier(info).close()  # back into the page cache for the warm runs
        rng = np.random.default_rng(0)
        batches = [SparseFeatures.from_lengths(["t"], rng.integers(0, a.rows, a.batch),
                                               [a.batch]) for _ in range(a.batches)]
        ssd = {(v, cold): [] for v in (True, False) for cold in (True, False)}
        tiers = {v: SsdTier(info, TierConfig(kind="ssd", verify=v)) for v in (True, False)}
        for v in (True, False):
            tiers[v].pool(batches[0])  # compile
        for _ in range(a.reps):
            for cold in (True, False):
                for v in (True, False):
                    if not cold:  # the cold runs left only their last batch's pages cached
                        for b in batches:
                            tiers[v].pool(b)
                    t0 = 0.0
                    for b in batches:
                        if cold:
                            tiers[v].drop_page_cache()
                        s = time.perf_counter()
                        tiers[v].pool(b)
                        t0 += time.perf_counter() - s
                    ssd[(v, cold)].append(t0 / len(batches))
        for t in tiers.values():
            t.close()

    def ratio(on: list[float], off: list[float]) -> str:
        m1, m0 = statistics.median(on), statistics.median(off)
        return f"{m1 * 1e3:8.2f} ms vs {m0 * 1e3:8.2f} ms  ratio {m1 / m0:.3f}"

    print(f"DRAM-tier load, cold disk   verified vs off: "
          f"{ratio(load[(True, True)], load[(False, True)])}")
    print(f"DRAM-tier load, page cache  verified vs off: "
          f"{ratio(load[(True, False)], load[(False, False)])}")
    print(f"SSD batch, cold     verified vs off: {ratio(ssd[(True, True)], ssd[(False, True)])}")
    print(f"SSD batch, cached   verified vs off: {ratio(ssd[(True, False)], ssd[(False, False)])}")


if __name__ == "__main__":
    main()
