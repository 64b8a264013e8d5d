"""The DRAM cache over a cold SSD: throughput, prefetch, pipeline, policies vs OPT.

Everything is measured in one run against our own all-DRAM tier on the same
trace; the SSD tier reads with O_DIRECT by default (no OS page cache behind
the cache, so DRAM use is what the cache holds) and its files are dropped
from the page cache before every run.

    python bench/bench_cache.py [--rows 1000000] [--tables 8] [--quick]

Parts (``--parts 1,2,3,4``):
1. embedding-stage throughput with caches of 2/5/10% of the table bytes, on a
   Zipf(1.05) trace and on a trace calibrated to Meta's published reuse
   statistics; ratio to all-DRAM (goal at 10%: >= 0.8x);
2. prefetch on vs off: p50/p99 batch latency (goal: p99 >= 3x lower with
   prefetch) and the device read rate while misses are served, against the
   raw parallel 4 KiB random-read rate measured in the same run (goal >= 80%);
3. pipeline on vs off: end-to-end DLRM throughput against 1/max(stage time)
   (goal >= 0.9);
4. hit rate of every policy against Belady's OPT at 5% capacity (goal: best
   within 5 points).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ssd import raw_random_reads  # noqa: E402

from runtime.model import DLRMConfig, random_dense  # noqa: E402
from tiermem.cache.cache import CacheConfig, CachedTier  # noqa: E402
from tiermem.cache.prefetch import PrefetchConfig, Prefetcher  # noqa: E402
from tiermem.config import TierConfig, TierKind  # noqa: E402
from tiermem.features import SparseFeatures  # noqa: E402
from tiermem.format import TableSpec, create_random_store, open_store  # noqa: E402
from tiermem.tiers import DramTier, SsdTier  # noqa: E402
from traces.synth import GeneratorConfig, Pooling, generate, synthetic_batches  # noqa: E402
from traces.tuning import simulate  # noqa: E402

# Meta 2021 calibration found by `tiermem trace-generate --calibrate-to meta2021`
META_FIT = {"alpha": 0.88, "alpha_spread": 0.15, "active_fraction": 0.06}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores"


def build_store(args: argparse.Namespace):
    path = Path(args.dir) / f"cache-{args.tables}x{args.rows}x{args.dim}.zarr"
    try:
        return open_store(path)
    except Exception:
        specs = [TableSpec(f"t{i}", args.rows, args.dim) for i in range(args.tables)]
        t0 = time.perf_counter()
        info = create_random_store(path, specs, overwrite=True, progress=True)
        print(f"built {path} ({info.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
        return info


def traces(args: argparse.Namespace, keys: list[str]) -> dict[str, list[SparseFeatures]]:
    rows = [args.rows] * args.tables
    n = args.warm_batches + args.batches
    zipf = list(synthetic_batches(rows, batch_size=args.batch_size, n_batches=n, alpha=1.05,
                                  pooling=args.pooling, keys=keys, seed=1))
    cfg = GeneratorConfig(table_rows=tuple(rows), batch_size=args.batch_size, n_batches=n,
                          pooling=Pooling(kind="fixed", mean=args.pooling), keys=tuple(keys),
                          seed=2, **META_FIT)
    meta = [b.sparse for b in generate(cfg)]
    return {"zipf1.05": zipf, "meta2021-fit": meta}


def profile(batches: list[SparseFeatures]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b.table(k)[0] for b in batches]) for k in batches[0].keys}


def run_stage(tier, batches, prefetcher=None, lookahead=2, interval=None):
    """Pool every batch; returns per-batch latencies (s) and the total wall time.

    With ``interval`` (s), batch i arrives at ``i * interval`` (paced, as in a
    service) and its latency runs from arrival to completion. The prefetcher
    is told about batch i + lookahead when batch i starts.
    """
    lat = []
    t0 = time.perf_counter()
    if prefetcher is not None:
        for nxt in batches[1:lookahead]:
            prefetcher.submit(nxt)
    for i, b in enumerate(batches):
        arrival = t0 + i * interval if interval else time.perf_counter()
        if interval:
            delay = arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        if prefetcher is not None and i + lookahead < len(batches):
            prefetcher.submit(batches[i + lookahead])
        tier.pool(b)
        lat.append(time.perf_counter() - arrival)
    return lat, time.perf_counter() - t0


def cached_ssd(info, args, fraction, policy="lru"):
    cold = SsdTier(info, TierConfig(kind=TierKind.SSD, io_threads=args.io_threads,
                                    background_io_threads=args.background_io_threads,
                                    direct_io=not args.page_cache))
    return CachedTier(cold, CacheConfig(policy=policy, capacity_fraction=fraction))


def part1(info, dram, trs, args) -> None:
    print("\n## 1. embedding-stage throughput, cache over cold SSD vs all-DRAM")
    print(f"{'trace':<14} {'cache':>6} {'hit%':>6} {'DRAM lk/s':>12} {'cached lk/s':>12} "
          f"{'ratio':>6}  goal")
    for name, batches in trs.items():
        warm, run = batches[:args.warm_batches], batches[args.warm_batches:]
        nlook = sum(b.values.size for b in run)
        _, t_dram = run_stage(dram, run)
        for frac in (0.02, 0.05, 0.10):
            with cached_ssd(info, args, frac) as tier:
                tier.warm(profile(warm))
                tier.cold.drop_page_cache()
                tier.stats.reset()
                with Prefetcher(tier, PrefetchConfig(lookahead=2)) as pf:
                    _, t = run_stage(tier, run, pf)
                hr = tier.stats.total().hit_rate
            ratio = t_dram / t
            goal = ("ok" if ratio >= 0.8 else "MISSED (>= 0.8x)") if frac == 0.10 else ""
            print(f"{name:<14} {frac:>6.0%} {hr:>6.1%} {nlook / t_dram:>12,.0f} "
                  f"{nlook / t:>12,.0f} {ratio:>6.2f}  {goal}")


def part2(info, trs, args, raw_rate) -> None:
    print(f"\n## 2. prefetch on vs off (cold SSD, 5% cache, LRU, lookahead {args.lookahead} "
          f"batches, {args.background_io_threads} prefetch I/O threads)")
    batches = trs["zipf1.05"]
    warm, run = batches[:args.warm_batches], batches[args.warm_batches:]

    def one(on: bool, interval: float | None):
        with cached_ssd(info, args, 0.05) as tier:
            tier.warm(profile(warm))
            tier.cold.drop_page_cache()
            tier.stats.reset()
            if on:
                with Prefetcher(tier, PrefetchConfig(lookahead=args.lookahead)) as pf:
                    lat, _ = run_stage(tier, run, pf, lookahead=args.lookahead,
                                       interval=interval)
                c = tier.prefetch_counters
            else:
                lat, _ = run_stage(tier, run, interval=interval)
                c = None
            return lat, tier.stats.total(), c

    def show(label, lat, tot, c):
        rate = tot.read_ops / tot.read_seconds if tot.read_seconds else 0.0
        extra = (f"; prefetch issued {c.issued:,} useful {c.useful:,} late {c.late:,} "
                 f"wasted {c.wasted:,}") if c else ""
        print(f"{label}: p50 {np.percentile(lat, 50) * 1e3:7.2f} ms  p99 "
              f"{np.percentile(lat, 99) * 1e3:7.2f} ms  demand reads {tot.read_ops:,} at "
              f"{rate:,.0f}/s ({rate / raw_rate:.0%} of raw){extra}")

    # back to back: the device is the bottleneck, nothing to overlap with
    lat0, tot0, _ = one(False, None)
    show("back-to-back, prefetch off", lat0, tot0, None)
    lat1, tot1, c1 = one(True, None)
    show("back-to-back, prefetch on ", lat1, tot1, c1)
    # paced arrivals, as batches reach a service: one every 2x the mean service time
    interval = 2 * float(np.mean(lat0))
    print(f"paced: a batch every {interval * 1e3:.0f} ms (2x the mean back-to-back time)")
    res = {}
    for on in (False, True):
        lat, tot, c = one(on, interval)
        res[on] = lat
        show(f"paced, prefetch {'on ' if on else 'off'}", lat, tot, c)
    # the first `lookahead` batches arrive before anything could announce them: they are
    # cold either way; the steady state is every batch after them (the same for both sides)
    k = args.lookahead
    steady = {on: np.asarray(v[k:]) for on, v in res.items()}
    for on in (False, True):
        slowest = ', '.join(f'#{k + i} {steady[on][i] * 1e3:.0f}'
                            for i in np.argsort(-steady[on])[:4])
        print(f"paced, prefetch {'on ' if on else 'off'}, batches {k}..: p50 "
              f"{np.percentile(steady[on], 50) * 1e3:7.2f} ms  p99 "
              f"{np.percentile(steady[on], 99) * 1e3:7.2f} ms  (first {k}: "
              f"{', '.join(f'{x * 1e3:.0f}' for x in res[on][:k])} ms; slowest after them: "
              f"{slowest} ms)")
    p99 = np.percentile(steady[False], 99) / np.percentile(steady[True], 99)
    p99_all = np.percentile(res[False], 99) / np.percentile(res[True], 99)
    print(f"paced p99 off/on = {p99:.2f}x after the first {k} batches "
          f"({'ok' if p99 >= 3 else 'MISSED (>= 3x)'}), {p99_all:.2f}x over all; back-to-back "
          f"{np.percentile(lat0, 99) / np.percentile(lat1, 99):.2f}x")


def part3(info, trs, args) -> None:
    print("\n## 3. pipeline on vs off: end-to-end DLRM (cold SSD, 10% cache, prefetch)")
    from runtime.session import InferenceSession

    batches = trs["zipf1.05"]
    warm, run = batches[:args.warm_batches], batches[args.warm_batches:]
    cfg = DLRMConfig(num_dense=13, embedding_dim=args.dim, num_tables=args.tables,
                     bottom_mlp=(512, 256, args.dim), top_mlp=(1024, 512, 256, 1))
    dense_model = random_dense(cfg, seed=0)
    rng = np.random.default_rng(0)
    dense = [rng.random((args.batch_size, 13), dtype=np.float32) for _ in run]
    out = {}
    for mode in ("embed-only", "mlp-only", "serial", "pipelined"):
        with cached_ssd(info, args, 0.10) as tier:
            tier.warm(profile(warm))
            tier.cold.drop_page_cache()
            sess = InferenceSession(dense_model, tier, [f"t{i}" for i in range(args.tables)])
            sess.prefetcher = Prefetcher(tier, PrefetchConfig(lookahead=2))
            t0 = time.perf_counter()
            if mode == "embed-only":
                for i, b in enumerate(run):
                    for nxt in run[i + 2:i + 4]:
                        sess.prefetcher.submit(nxt)
                    sess.embed(b)
            elif mode == "mlp-only":
                pooled = [np.zeros((args.batch_size, args.tables, args.dim), np.float32)
                          for _ in run]
                for d, p in zip(dense, pooled, strict=True):
                    sess._mlp(sess._dense(d), p)
            else:
                for _ in sess.predict_stream(zip(dense, run, strict=True),
                                             pipeline=mode == "pipelined"):
                    pass
            out[mode] = time.perf_counter() - t0
            sess.close()
    n = len(run) * args.batch_size
    bound = n / max(out["embed-only"], out["mlp-only"])
    for k, v in out.items():
        print(f"{k:<11} {n / v:>10,.0f} samples/s")
    r = (n / out["pipelined"]) / bound
    print(f"pipelined / (1 / max(stage time)) = {r:.2f} "
          f"({'ok' if r >= 0.9 else 'MISSED (>= 0.9)'});"
          f" pipelined / serial = {out['serial'] / out['pipelined']:.2f}x")


def part4(info, trs, args) -> None:
    print("\n## 4. hit rate of each policy vs Belady OPT at 5% capacity (distinct rows per batch)")
    print(f"   (traces.tuning.simulate: the cache's own kernels; the first {args.warm_batches} "
          "batches are the static/hybrid profile and everyone's warm-up; OPT with bypass)")
    policies = ["lru", "lfu", "fifo", "clock", "s3fifo", "static", "hybrid"]
    for name, batches in trs.items():
        best, best_label, line = 0.0, "", []
        opt_rate = None
        for adm in (None, "tinylfu"):
            res = simulate(batches, info, policies if adm is None else policies[:5], ["5%"],
                           admission=[adm], profile_batches=args.warm_batches,
                           pinned_fraction=0.9, opt=adm is None)
            for r in res.results:
                label = (r.policy if r.admission is None or "+" in r.policy
                         else f"{r.policy}+{r.admission}")
                if r.policy == "opt":
                    opt_rate = r.hit_rate
                    continue
                line.append(f"{label} {r.hit_rate:.1%}")
                if r.hit_rate > best:
                    best, best_label = r.hit_rate, label
        assert opt_rate is not None
        gap = (opt_rate - best) * 100
        print(f"{name}: OPT {opt_rate:.1%}; " + ", ".join(line))
        print(f"  best ({best_label}) is {gap:.1f} points below OPT "
              f"({'ok' if gap <= 5 else 'MISSED (<= 5)'})")


def part5(args: argparse.Namespace) -> None:
    """A store larger than this machine's memory, served with bounded RSS."""
    import resource

    print("\n## 5. larger than RAM: O_DIRECT SSD + cache, bounded RSS")
    rows = int(args.huge_gib * 2**30 / (args.dim * 4) / args.tables)
    sub = argparse.Namespace(**{**vars(args), "rows": rows})
    info = build_store(sub)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"store {info.nbytes / 2**30:.1f} GiB on a machine with {mem / 2**30:.1f} GiB of RAM")
    keys = [t.name for t in info.tables]
    batches = list(synthetic_batches([rows] * args.tables, batch_size=args.batch_size,
                                     n_batches=args.warm_batches + args.batches, alpha=1.05,
                                     pooling=args.pooling, keys=keys, seed=5))
    warm, run = batches[:args.warm_batches], batches[args.warm_batches:]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with cached_ssd(info, sub, args.huge_cache) as tier:
        tier.warm(profile(warm))
        with Prefetcher(tier, PrefetchConfig(lookahead=2)) as pf:
            lat, wall = run_stage(tier, run, pf)
        hr = tier.stats.total().hit_rate
        cache_bytes = tier.nbytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(b.values.size for b in run)
    print(f"cache {args.huge_cache:.0%} = {cache_bytes / 2**30:.2f} GiB, hit rate {hr:.1%}: "
          f"{n / wall:,.0f} lookups/s, p50 {np.percentile(lat, 50) * 1e3:.1f} ms, "
          f"p99 {np.percentile(lat, 99) * 1e3:.1f} ms")
    print(f"peak RSS {rss / 2**30:.2f} GiB = cache {cache_bytes / 2**30:.2f} GiB + "
          f"{(rss - cache_bytes) / 2**30:.2f} GiB overhead (RSS before the store: "
          f"{rss0 / 2**30:.2f} GiB; the trace itself is held in memory)")


def add_store_args(ap: argparse.ArgumentParser) -> None:
    """The store, trace and I/O options this bench shares with bench_tiered."""
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows per table")
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--pooling", type=int, default=16)
    ap.add_argument("--batches", type=int, default=40, help="measured batches")
    ap.add_argument("--warm-batches", type=int, default=10, help="profile batches (not measured)")
    ap.add_argument("--io-threads", type=int, default=64)
    ap.add_argument("--background-io-threads", type=int, default=16,
                    help="I/O threads of prefetch reads (TierConfig.background_io_threads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_args(ap)
    ap.add_argument("--lookahead", type=int, default=2, help="part 2: prefetch lookahead")
    ap.add_argument("--page-cache", action="store_true",
                    help="read through the OS page cache instead of O_DIRECT")
    ap.add_argument("--parts", default="1,2,3,4", help="comma list of 1-5 (5: larger than RAM)")
    ap.add_argument("--huge-gib", type=float, default=32.0, help="part 5: store size")
    ap.add_argument("--huge-cache", type=float, default=0.05, help="part 5: cache fraction")
    ap.add_argument("--dir", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.tables, args.batches, args.warm_batches = 50_000, 2, 6, 3
        args.batch_size, args.pooling = 128, 4
    parts = {int(p) for p in args.parts.split(",")}
    print(f"machine: {machine()}")
    if parts == {5}:
        part5(args)
        return
    info = build_store(args)
    print(f"store: {args.tables} tables x {args.rows:,} rows x {args.dim} float32 = "
          f"{info.nbytes / 2**30:.2f} GiB; batch {args.batch_size} x pooling {args.pooling}; "
          f"{'page cache' if args.page_cache else 'O_DIRECT'} reads")
    keys = [t.name for t in info.tables]
    trs = traces(args, keys)
    files = [t.weight_chunk(c) for t in info.tables for c in range(t.n_chunks)]
    raw = raw_random_reads(files, 20_000 if not args.quick else 3_000, args.io_threads, 1,
                           not args.page_cache)
    print(f"raw device: {raw:,.0f} random 4 KiB reads/s with {args.io_threads} readers")
    dram = DramTier(info, TierConfig())
    for batches in trs.values():  # compile
        dram.pool(batches[0])
    if 1 in parts:
        part1(info, dram, trs, args)
    dram.close()
    if 2 in parts:
        part2(info, trs, args, raw)
    if 3 in parts:
        part3(info, trs, args)
    if 4 in parts:
        part4(info, trs, args)
    if 5 in parts:
        part5(args)


if __name__ == "__main__":
    main()
