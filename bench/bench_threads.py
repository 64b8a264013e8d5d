"""Batch latency at each thread setting, alone and next to a busy neighbour process.

A parallel region waits for its slowest thread; next to a process that keeps a
core busy, a thread on that core runs only in time slices. This bench runs the
demo's model (26 Criteo-shaped tables capped at 200K rows, dim 16, DRAM tier)
at batch sizes 4 .. 2048 with ``num_threads`` = every core (the libraries'
default), 1, and ``"auto"`` (tiermem's default: the cores other processes
leave idle, re-read every 100 ms), all three interleaved round by round, first
on an idle machine, then with a neighbour process spinning on one core. It
prints the median and p99 latency and each setting's ratio to the best one in
the same condition.

    python bench/bench_threads.py [--rounds 5] [--batches 20] [--out bench-out/threads]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import (  # noqa: E402
    DLRMConfig,
    InferenceSession,
    RuntimeConfig,
    random_dense,
    save_dlrm_checkpoint,
    store_from_checkpoint,
)
from runtime.demo import KAGGLE_ROWS  # noqa: E402
from tiermem import SparseFeatures, TierConfig  # noqa: E402
from tiermem.cpu import free_cores, usable_cores  # noqa: E402

SIZES = (4, 64, 512, 2048)


def build(out: Path) -> tuple[Path, Path]:
    model, store = out / "model.pt", out / "store.zarr"
    if not (store / "zarr.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        rows = [min(r, 200_000) for r in KAGGLE_ROWS]
        cfg = DLRMConfig(num_dense=13, embedding_dim=16, num_tables=len(rows),
                         bottom_mlp=(128, 64, 16), top_mlp=(256, 128, 1))
        rng = np.random.default_rng(0)
        tables = [(rng.uniform(-1, 1, (r, 16)) / np.sqrt(r)).astype(np.float32) for r in rows]
        save_dlrm_checkpoint(model, cfg, tables, random_dense(cfg, seed=0))
        store_from_checkpoint(model, store, overwrite=True)
    return model, store


def spin(stop: mp.synchronize.Event) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(200_000):
            x += 1


def batch(rows: list[int], names: list[str], B: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, SparseFeatures]:
    ids = np.concatenate([rng.zipf(1.05, B) % r for r in rows]).astype(np.int64)
    return (np.log1p(rng.exponential(3.0, (B, 13))).astype(np.float32),
            SparseFeatures.from_offsets(names, ids, np.arange(ids.size + 1, dtype=np.int64)))


def measure(sessions: dict[str, InferenceSession], rounds: int, n: int,
            rng: np.random.Generator) -> dict[tuple[str, int], list[float]]:
    any_sess = next(iter(sessions.values()))
    rows, names = list(any_sess.table_rows.values()), list(any_sess.table_names)
    lat: dict[tuple[str, int], list[float]] = {(m, B): [] for m in sessions for B in SIZES}
    for _ in range(rounds):
        for B in SIZES:
            work = [batch(rows, names, B, rng) for _ in range(n)]
            for mode, sess in sessions.items():  # interleaved: same batches, same moment
                sess.predict(*work[0])
                for d, f in work:
                    t = time.perf_counter()
                    sess.predict(d, f)
                    lat[(mode, B)].append(time.perf_counter() - t)
    return lat


def report(title: str, lat: dict[tuple[str, int], list[float]], modes: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'batch':>6} " + " ".join(f"{m + ' p50':>12} {'p99':>7}" for m in modes)
          + "   " + " ".join(f"{m + '/best':>10}" for m in modes))
    for B in SIZES:
        p50 = {m: float(np.median(lat[(m, B)])) * 1e3 for m in modes}
        p99 = {m: float(np.percentile(lat[(m, B)], 99)) * 1e3 for m in modes}
        best = min(p50.values())
        print(f"{B:>6} " + " ".join(f"{p50[m]:>9.2f} ms {p99[m]:>7.2f}" for m in modes)
              + "   " + " ".join(f"{p50[m] / best:>10.2f}" for m in modes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=20, help="batches per size per round")
    ap.add_argument("--out", default="bench-out/threads")
    args = ap.parse_args()
    cores = usable_cores()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {cores} cores; DRAM tier, demo model (26 tables, dim 16)")
    model, store = build(Path(args.out))
    modes = {f"all({cores})": cores, "1": 1, "auto": "auto"}
    sessions = {m: InferenceSession.open(model, store, RuntimeConfig(
        tier=TierConfig(kind="dram"), num_threads=n)) for m, n in modes.items()}
    try:
        for s in sessions.values():
            s.warmup()
        rng = np.random.default_rng(0)
        free_cores().free()
        time.sleep(0.5)
        free = free_cores().free()
        note = "" if free >= cores - 0.5 else " -- NOT idle: other processes are running"
        report(f"idle machine (auto saw {free:.1f} cores free{note})",
               measure(sessions, args.rounds, args.batches, rng), list(modes))
        stop = mp.Event()
        nb = mp.Process(target=spin, args=(stop,), daemon=True)
        nb.start()
        try:
            time.sleep(0.5)
            free = free_cores().free()
            lat = measure(sessions, args.rounds, args.batches, rng)
            report(f"a neighbour process spinning on one core (auto saw {free:.1f} cores free)",
                   lat, list(modes))
        finally:
            stop.set()
            nb.join(5)
    finally:
        for s in sessions.values():
            s.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
