"""SparseLengthsSum: tiermem's kernel against torch.nn.EmbeddingBag and FBGEMM's CPU TBE.

    python bench/bench_sls.py [--quick] [--reps N] [--rows N]

One run, ratios only between things timed in that run: the two sides of every
comparison alternate (A B / B A), each call gets a fresh batch of ids (a batch
one side just ran would be in cache for the other), and the figure reported is
the median of the per-repetition ratios (time of the anchor / time of ours, so
> 1 means ours is faster). "EB vs EB" runs the harness against itself: it
should read ~1.00x, and how far it strays is the noise of the run.

Anchors: float32 rows: ``torch.nn.EmbeddingBag(mode="sum")`` over the same
memory; float16 / int8 rows: FBGEMM's CPU TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``,
one table, HOST, FP32 output) holding the same values (asserted before timing).
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba  # noqa: E402
import torch  # noqa: E402

from tiermem.kernels.sls import PREFETCH_DISTANCE, gather_touch, pool_arena  # noqa: E402

B = 2048  # bags per batch
D = 64
POOLINGS = (1, 32, 100)
DISTS = ("uniform", "zipf")
THREADS = (1, 2)
PD = PREFETCH_DISTANCE  # prefetch distance of ours (the library default)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def huge_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Private anonymous mapping asking for transparent huge pages, 2 MiB aligned.

    Private, as tiermem's own arenas are: a shared anonymous mapping is shmem,
    which gets no huge pages here (shmem_enabled=never), and every random
    lookup would then pay a page-table walk on both sides of the comparison.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    m = mmap.mmap(-1, nbytes + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    buf = np.frombuffer(m, np.uint8)
    off = (-buf.ctypes.data) % (2 << 20)
    return buf[off:off + nbytes].view(dtype).reshape(shape)


def fill_normal(a: np.ndarray, rng: np.random.Generator, scale: float = 1.0) -> None:
    step = 1 << 20
    for i in range(0, a.shape[0], step):
        blk = a[i:i + step]
        blk[...] = (rng.standard_normal(blk.shape, dtype=np.float32) * scale).astype(a.dtype)


class Batches:
    """Fresh id batches: uniform, or Zipf(1.05) over a random permutation of the rows."""

    def __init__(self, n_rows: int, seed: int = 1) -> None:
        self.n = n_rows
        self.rng = np.random.default_rng(seed)
        self.perm = self.rng.permutation(n_rows).astype(np.int64)

    def __call__(self, dist: str, pooling: int) -> tuple[np.ndarray, np.ndarray]:
        nnz = B * pooling
        if dist == "uniform":
            ids = self.rng.integers(0, self.n, nnz, dtype=np.int64)
        else:
            ids = self.perm[(self.rng.zipf(1.05, nnz) - 1) % self.n]
        return ids, np.arange(0, nnz + 1, pooling, dtype=np.int64)


Prep = Callable[[np.ndarray, np.ndarray], object]
Run = Callable[[object], object]


def compare(a: tuple[Prep, Run], b: tuple[Prep, Run], batches: Batches, dist: str,
            pooling: int, reps: int) -> tuple[float, float, float]:
    """Interleaved timing of ``a`` and ``b`` on fresh batches.

    Returns (median seconds of a, median seconds of b, median of the ratios t_b / t_a).
    """
    for prep, run in (a, b):  # warm up (compiled already; this is caches and threads)
        run(prep(*batches(dist, pooling)))
    ta, tb, ratios = [], [], []
    for rep in range(reps):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        t = [0.0, 0.0]
        for k in order:
            prep, run = (a, b)[k]
            arg = prep(*batches(dist, pooling))
            t0 = time.perf_counter()
            run(arg)
            t[k] = time.perf_counter() - t0
        ta.append(t[0])
        tb.append(t[1])
        ratios.append(t[1] / t[0])
    return float(np.median(ta)), float(np.median(tb)), float(np.median(ratios))


def set_threads(n: int) -> None:
    numba.set_num_threads(n)
    torch.set_num_threads(n)


def ours_side(W: np.ndarray, Q: np.ndarray | None, pd: int = PD) -> tuple[Prep, Run]:
    out = np.empty((B, W.shape[1]), np.float32)
    zero = np.zeros(1, np.int64)

    def run(arg):  # type: ignore[no-untyped-def]
        ids, offsets = arg
        pool_arena(W, Q, ids, offsets, batch_size=B, row_base=zero, col_base=zero, out=out,
                   prefetch_distance=pd)

    return (lambda ids, offsets: (ids, offsets)), run


def eb_side(eb: torch.nn.EmbeddingBag) -> tuple[Prep, Run]:
    def prep(ids, offsets):  # type: ignore[no-untyped-def]
        return torch.from_numpy(ids), torch.from_numpy(offsets[:-1])

    def run(arg):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return eb(*arg)

    return prep, run


def tbe_side(tbe) -> tuple[Prep, Run]:  # type: ignore[no-untyped-def]
    def prep(ids, offsets):  # type: ignore[no-untyped-def]
        return (torch.from_numpy(ids.astype(np.int32)), torch.from_numpy(offsets.astype(np.int32)))

    def run(arg):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return tbe(*arg)

    return prep, run


def touch_side(W: np.ndarray) -> tuple[Prep, Run]:
    return (lambda ids, offsets: ids), (lambda ids: gather_touch(W, ids))


class Table:
    def __init__(self) -> None:
        self.rows: list[str] = []
        head = (f"{'case':<34} {'ours M/s':>9} {'anchor M/s':>10} {'ratio':>7}  goal")
        print(head)
        print("-" * len(head) + "-" * 12, flush=True)

    def add(self, case: str, nnz: int, t_ours: float, t_anchor: float, ratio: float,
            goal: float | None) -> None:
        verdict = "" if goal is None else (f">= {goal:.1f}x "
                                           + ("met" if ratio >= goal else "MISSED"))
        line = (f"{case:<34} {nnz / t_ours / 1e6:9.1f} {nnz / t_anchor / 1e6:10.1f} "
                f"{ratio:6.2f}x  {verdict}")
        self.rows.append(line)
        print(line, flush=True)


def check_equal(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    err = np.abs(ours - ref).max() if ours.size else 0.0
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    if not err <= 1e-4 * scale:
        raise SystemExit(f"{what}: outputs differ from the anchor (max err {err})")


def bench_fp32(n_rows: int, reps: int, misses: list[str]) -> None:
    rng = np.random.default_rng(0)
    W = huge_array((n_rows, D), np.float32)
    fill_normal(W, rng)
    eb = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(W), mode="sum", freeze=True)
    batches = Batches(n_rows)
    ours, anchor = ours_side(W, None), eb_side(eb)
    ids, offsets = batches("zipf", 32)
    out = np.empty((B, D), np.float32)
    pool_arena(W, None, ids, offsets, batch_size=B, row_base=np.zeros(1, np.int64),
               col_base=np.zeros(1, np.int64), out=out)
    check_equal(out, anchor[1](anchor[0](ids, offsets)).numpy(), "float32")

    print(f"\n== float32 rows: {n_rows:,} x {D} ({W.nbytes / 2**30:.2f} GiB), {B} bags; "
          "anchor torch.nn.EmbeddingBag(sum)")
    tab = Table()
    for th in THREADS:
        set_threads(th)
        for dist in DISTS:
            for pooling in POOLINGS:
                ta, tb, r = compare(ours, anchor, batches, dist, pooling, reps)
                goal = 1.2 if (dist == "uniform" and th == 2) else 1.0
                case = f"fp32 {dist:<7} pool {pooling:>3} thr {th}"
                tab.add(case, B * pooling, ta, tb, r, goal)
                if r < goal:
                    misses.append(f"{case}: {r:.2f}x (goal {goal:.1f}x)")

    print("\n-- harness self-check: EmbeddingBag against itself (should read ~1.00x)")
    tab = Table()
    for th in THREADS:
        set_threads(th)
        for dist in DISTS:
            ta, tb, r = compare(anchor, anchor, batches, dist, 32, reps)
            tab.add(f"EB vs EB {dist:<7} pool  32 thr {th}", B * 32, ta, tb, r, None)

    print(f"\n-- software prefetch: ours with prefetch_distance={PD} against 0 (anchor = pd 0)")
    tab = Table()
    off = ours_side(W, None, pd=0)
    for th in THREADS:
        set_threads(th)
        for dist in DISTS:
            for pooling in (1, 32):
                ta, tb, r = compare(ours, off, batches, dist, pooling, reps)
                tab.add(f"pd{PD}/pd0 {dist:<7} pool {pooling:>3} thr {th}", B * pooling, ta, tb, r,
                        None)

    print("\n-- gather_touch (the same rows summed into one vector: no bags, no stores) vs ours,"
          " same kind of ids")
    print("   (anchor column = gather_touch rows/s: what the memory allows)")
    tab = Table()
    touch = touch_side(W)
    for th in THREADS:
        set_threads(th)
        for dist in DISTS:
            ta, tb, r = compare(ours, touch, batches, dist, 32, reps)
            tab.add(f"ours/touch {dist:<7} pool  32 thr {th}", B * 32, ta, tb, r, None)
    del eb, anchor, W


def fbgemm_tbe(sparse_type_name: str, n_rows: int):  # type: ignore[no-untyped-def]
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    st = getattr(SparseType, sparse_type_name)
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [("t0", n_rows, D, st, EmbeddingLocation.HOST)], device="cpu",
        output_dtype=SparseType.FP32, pooling_mode=PoolingMode.SUM)
    tbe.initialize_weights()
    return tbe


def bench_low_precision(n_rows: int, reps: int, misses: list[str]) -> None:
    try:
        import fbgemm_gpu  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"\n== float16 / int8 rows: SKIPPED, fbgemm_gpu cannot be imported ({e})")
        return
    rng = np.random.default_rng(3)
    batches = Batches(n_rows, seed=4)
    WF = QF = None
    for name in ("FP16", "INT8"):
        tbe = fbgemm_tbe(name, n_rows)
        if name == "FP16":
            # ours reads the very bytes FBGEMM reads
            raw = tbe.split_embedding_weights()[0][0].numpy()
            W = raw.view(np.float16)
            assert W.shape == (n_rows, D)
            fill_normal(W, rng, 0.1)
            Q = None
            label = "fp16"
        else:
            w_u8, scale16, bias16 = tbe.split_embedding_weights_with_scale_bias(
                split_scale_bias_mode=2)[0]
            q_u8 = w_u8.numpy()
            sc = scale16.numpy()
            bi = bias16.numpy()
            W = huge_array((n_rows, D), np.int8)
            Q = huge_array((n_rows, 2), np.float32)
            # the same rows, each followed by its (scale, bias): one memory access a lookup
            fused = huge_array((n_rows, D + 8), np.uint8)
            WF = fused[:, :D].view(np.int8)
            QF = fused[:, D:].view(np.float32)
            step = 1 << 20
            for i in range(0, n_rows, step):
                k = min(step, n_rows - i)
                q = rng.integers(0, 256, (k, D), dtype=np.uint8)
                s16 = rng.uniform(1e-3, 1e-2, (k, 1)).astype(np.float16)
                b16 = rng.uniform(-1, 1, (k, 1)).astype(np.float16)
                q_u8[i:i + k] = q
                sc[i:i + k] = s16
                bi[i:i + k] = b16
                W[i:i + k] = (q.astype(np.int16) - 128).astype(np.int8)
                # scale * (q - 128) + (bias + 128 * scale) == scale * q + bias
                Q[i:i + k, 0] = s16[:, 0].astype(np.float32)
                Q[i:i + k, 1] = b16[:, 0].astype(np.float32) + 128 * s16[:, 0].astype(np.float32)
                WF[i:i + k] = W[i:i + k]
                QF[i:i + k] = Q[i:i + k]
            label = "int8"
        variants = [(label, W, Q)]
        if name == "INT8":
            variants.append(("int8-fused", WF, QF))
        anchor = tbe_side(tbe)
        for vlabel, Wv, Qv in variants:
            ours = ours_side(Wv, Qv)
            ids, offsets = batches("zipf", 32)
            out = np.empty((B, D), np.float32)
            pool_arena(Wv, Qv, ids, offsets, batch_size=B, row_base=np.zeros(1, np.int64),
                       col_base=np.zeros(1, np.int64), out=out)
            check_equal(out, anchor[1](anchor[0](ids, offsets)).numpy(), vlabel)
            layout = {"fp16": "", "int8": " (scale, bias) in a separate (n, 2) float32 array",
                      "int8-fused": " (scale, bias) stored right after each row (strided views)"}
            print(f"\n== {vlabel} rows{layout[vlabel]}: {n_rows:,} x {D}, {B} bags; anchor "
                  f"FBGEMM CPU TBE (IntNBit {name}, one table: FBGEMM runs it on one thread)")
            tab = Table()
            for th in THREADS:
                set_threads(th)
                for dist in DISTS:
                    for pooling in POOLINGS:
                        ta, tb, r = compare(ours, anchor, batches, dist, pooling, reps)
                        case = f"{vlabel} {dist:<7} pool {pooling:>3} thr {th}"
                        tab.add(case, B * pooling, ta, tb, r, 1.0)
                        if r < 1.0:
                            misses.append(f"{case}: {r:.2f}x (goal 1.0x)")
        del tbe, anchor, ours, W, Q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small table (1M rows), few repetitions: a smoke run")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per comparison")
    ap.add_argument("--rows", type=int, default=None, help="rows per table")
    ap.add_argument("--skip-low-precision", action="store_true",
                    help="float32 only (no FBGEMM comparison)")
    args = ap.parse_args()
    n_rows = args.rows or (1_000_000 if args.quick else 10_000_000)
    reps = args.reps or (5 if args.quick else 21)

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; numba {numba.__version__}, "
          f"torch {torch.__version__}, threading layer {numba.config.THREADING_LAYER}")
    try:
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
    except OSError:
        pass
    print(f"{B} bags, D = {D}, reps = {reps}, poolings {POOLINGS}; ratio = anchor time / our "
          "time (median over interleaved reps)")
    t0 = time.perf_counter()
    misses: list[str] = []
    bench_fp32(n_rows, reps, misses)
    if not args.skip_low_precision:
        bench_low_precision(n_rows, reps, misses)
    print(f"\ngoals missed: {len(misses)}" + "".join(f"\n  {m}" for m in misses))
    try:
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    except OSError:
        pass
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
