"""Tiered serving against the DRAM tier: hit path, miss path, cold SSD, prefetch, a peer.

Every figure is a ratio to an anchor measured in the same run on the same
batches (the DRAM tier, the device roofline, the peer), with the two sides
interleaved round by round; kernels are compiled before any timing.

    python bench/bench_tiered.py [--quick] [--parts 1,2,3,4,5,6]

Parts, on bench_cache's store (8 tables x 1M x 64 float32) and traces
(Zipf 1.05 and the Meta-2021 fit), batches of 1024 x pooling 16:
1. every row resident (cache = 100%), over the SSD tier and over the CXL
   tier, vs the DRAM tier -- goal >= 0.8x;
2. 2/5/10% caches over page-cached files (a device with no latency: the
   software path alone), vs DRAM, with misses/s -- goals: 10% on Meta-fit
   >= 0.5x; >= 1M misses/s where misses dominate;
3. 2/5/10% over the CXL-emulated tier (default model) -- goal: 10% on
   Meta-fit >= 0.7x;
4. 5/10% over the cold O_DIRECT SSD against the device roofline
   max(DRAM time, device reads / raw random-read rate), both measured in
   this run -- goal >= 0.9;
5. prefetch on vs off, back to back and paced (bench_cache part 2) --
   goals: >= 0.95x back to back, paced p99 >= 3x lower;
6. the peer a user builds without tiermem: np.memmap (MADV_RANDOM) +
   torch.nn.functional.embedding_bag, its page cache bounded to the cache's
   DRAM budget by a memory cgroup (v1 at /sys/fs/cgroup/memory), vs a 10%
   cache over the cold SSD -- goal >= 10x on Meta-fit. Skipped, with the
   reason printed, where the cgroup is not writable.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cache import add_store_args, build_store, machine, profile, traces  # noqa: E402
from bench_ssd import raw_random_reads  # noqa: E402

from tiermem.cache.cache import CacheConfig, CachedTier  # noqa: E402
from tiermem.config import TierConfig, TierKind  # noqa: E402
from tiermem.tiers import CxlTier, DramTier, SsdTier  # noqa: E402

CGROUP = Path("/sys/fs/cgroup/memory")


def timed(tier, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        tier.pool(b)
    return time.perf_counter() - t0


def interleaved(a, b, batches, rounds: int) -> tuple[float, float, float]:
    """Median seconds of ``a`` and ``b`` over ``batches`` and the median ratio t_a / t_b.

    Rounds alternate which side goes first; each side sees the same batches.
    """
    ta, tb, r = [], [], []
    for k in range(rounds):
        if k % 2 == 0:
            x, y = timed(a, batches), timed(b, batches)
        else:
            y, x = timed(b, batches), timed(a, batches)
        ta.append(x)
        tb.append(y)
        r.append(x / y)
    return float(np.median(ta)), float(np.median(tb)), float(np.median(r))


def cold_ssd(info, args, direct: bool) -> SsdTier:
    return SsdTier(info, TierConfig(kind=TierKind.SSD, io_threads=args.io_threads,
                                    direct_io=direct))


def cached(cold, fraction: float, policy: str) -> CachedTier:
    return CachedTier(cold, CacheConfig(policy=policy, capacity_fraction=fraction))


def goal(ok: bool, text: str) -> str:
    return "ok" if ok else f"MISSED ({text})"


def warm_all(tier: CachedTier, info) -> None:
    tier.warm({t.name: np.arange(t.spec.rows) for t in info.tables})


def part1(info, dram, trs, args) -> None:
    print(f"\n## 1. every row resident (cache = 100%, {args.policy}) vs the DRAM tier")
    print(f"{'trace':<14} {'cold tier':<9} {'DRAM ms':>8} {'cached ms':>9} {'ratio':>6}  goal"
          f"{'':<18} {'serial resolve: ms':>18} {'ratio':>6}")
    for cold_kind in ("ssd", "cxl"):
        cold = cold_ssd(info, args, False) if cold_kind == "ssd" else CxlTier(
            info, TierConfig(kind=TierKind.CXL))
        with cached(cold, 1.0, args.policy) as tier:
            warm_all(tier, info)
            groups = list(tier._pools.values())
            parallel = [g.parallel_hits for g in groups]
            for name, batches in trs.items():
                run = batches[args.warm_batches:]
                timed(tier, run[:2])
                td, tc, r = interleaved(dram, tier, run, args.rounds)
                # the same cache with its batches of hits resolved serially (as before the
                # parallel pass; CLOCK/FIFO only have it)
                for g in groups:
                    g.parallel_hits = False
                td2, ts, r2 = interleaved(dram, tier, run, args.rounds)
                for g, p in zip(groups, parallel, strict=True):
                    g.parallel_hits = p
                n = len(run)
                print(f"{name:<14} {cold_kind:<9} {td / n * 1e3:>8.2f} {tc / n * 1e3:>9.2f} "
                      f"{r:>6.2f}  {goal(r >= 0.8, '>= 0.8x'):<18} {ts / n * 1e3:>18.2f} "
                      f"{r2:>6.2f}")


def sweep(info, dram, trs, args, make_cold, label: str, goal_at: float, goal_text: str) -> None:
    """2/5/10% caches vs DRAM; each round a fresh segment of the trace (a cache has memory)."""
    print(f"{'trace':<14} {'cache':>6} {'hit%':>6} {'DRAM ms':>8} {'cached ms':>9} "
          f"{'misses/s':>10} {'ratio':>6}  goal")
    for name, batches in trs.items():
        warm, run = batches[:args.warm_batches], batches[args.warm_batches:]
        segs = np.array_split(np.arange(len(run)), args.rounds)
        for frac in (0.02, 0.05, 0.10):
            with cached(make_cold(), frac, args.policy) as tier:
                tier.warm(profile(warm))
                timed(tier, warm[-2:])
                tier.stats.reset()
                ratios, ts, tds = [], [], []
                for k, seg in enumerate(segs):
                    part = [run[i] for i in seg]
                    if k % 2 == 0:
                        td, tc = timed(dram, part), timed(tier, part)
                    else:
                        tc, td = timed(tier, part), timed(dram, part)
                    ratios.append(td / tc)
                    ts.append(tc)
                    tds.append(td)
                tot = tier.stats.total()
            r = float(np.median(ratios))
            tc, td = float(np.sum(ts)), float(np.sum(tds))
            g = goal(r >= goal_at, goal_text) if (frac == 0.10 and "meta" in name) else ""
            print(f"{name:<14} {frac:>6.0%} {tot.hit_rate:>6.1%} {td / len(run) * 1e3:>8.2f} "
                  f"{tc / len(run) * 1e3:>9.2f} {tot.cache_misses / tc:>10,.0f} {r:>6.2f}  {g}")
    print(f"({label}: hit% over distinct rows per batch; misses/s = distinct missed rows read "
          "per second of the cached run; ratio = median over the rounds of DRAM time / cached "
          "time on the same segment)")


def part2(info, dram, trs, args) -> None:
    print(f"\n## 2. 2/5/10% {args.policy} caches over page-cached files (no device latency) "
          "vs DRAM")
    for t in info.tables:  # bring the files into the page cache
        for c in range(t.n_chunks):
            Path(t.weight_chunk(c)).read_bytes()
    sweep(info, dram, trs, args, lambda: cold_ssd(info, args, False), "page cache", 0.5,
          ">= 0.5x")


def part3(info, dram, trs, args) -> None:
    print(f"\n## 3. 2/5/10% {args.policy} caches over the CXL-emulated tier (default model) "
          "vs DRAM")
    sweep(info, dram, trs, args, lambda: CxlTier(info, TierConfig(kind=TierKind.CXL)),
          "CXL model", 0.7, ">= 0.7x")


def part4(info, dram, trs, args, raw: float) -> None:
    print(f"\n## 4. 5/10% {args.policy} caches over the cold O_DIRECT SSD vs the device roofline")
    print(f"raw device: {raw:,.0f} random 4 KiB reads/s ({args.io_threads} readers, this run)")
    print(f"{'trace':<14} {'cache':>6} {'hit%':>6} {'reads':>8} {'DRAM s':>7} {'roof s':>7} "
          f"{'ours s':>7} {'of roof':>7}  goal")
    for name, batches in trs.items():
        warm, run = batches[:args.warm_batches], batches[args.warm_batches:]
        t_dram = timed(dram, run)
        for frac in (0.05, 0.10):
            with cached(cold_ssd(info, args, True), frac, args.policy) as tier:
                tier.warm(profile(warm))
                tier.cold.drop_page_cache()
                tier.stats.reset()
                t = timed(tier, run)
                tot = tier.stats.total()
            roof = max(t_dram, tot.read_ops / raw)
            r = roof / t
            print(f"{name:<14} {frac:>6.0%} {tot.hit_rate:>6.1%} {tot.read_ops:>8,} "
                  f"{t_dram:>7.2f} {roof:>7.2f} {t:>7.2f} {r:>7.2f}  {goal(r >= 0.9, '>= 0.9')}")


def part5(info, trs, args, raw: float) -> None:
    from bench_cache import part2 as prefetch_part

    sub = argparse.Namespace(**{**vars(args), "page_cache": False, "lookahead": 2,
                                "background_io_threads": args.background_io_threads})
    print("\n## 5. prefetch on vs off (bench_cache part 2: cold SSD, 5% LRU cache)")
    prefetch_part(info, {"zipf1.05": trs["zipf1.05"]}, sub, raw)


# -- part 6: the peer ------------------------------------------------------------

def peer_files(info, out_dir: Path) -> list[Path]:
    """One flat float32 file per table, as a user's own memmap would use."""
    paths = []
    for t in info.tables:
        p = out_dir / f"peer-{t.name}.f32"
        nbytes = t.spec.rows * t.spec.row_bytes
        if not p.exists() or p.stat().st_size != nbytes:
            tmp = p.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                left = nbytes
                for c in range(t.n_chunks):
                    data = Path(t.weight_chunk(c)).read_bytes()[:left]
                    f.write(data)
                    left -= len(data)
            os.replace(tmp, p)
        paths.append(p)
    return paths


def peer_child(spec_path: str) -> None:
    """Run in a child process placed in a memory cgroup: memmap + embedding_bag."""
    import torch
    import torch.nn.functional as F

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    cg = Path(spec["cgroup"])
    with np.load(spec["batches"]) as z:
        data = {k: z[k] for k in z.files}
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    # what the process holds before it touches a table, plus the cache's DRAM budget
    usage = int((cg / "memory.usage_in_bytes").read_text())
    (cg / "memory.limit_in_bytes").write_text(str(usage + spec["budget"]))
    weights = []
    for p in spec["files"]:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        m = np.memmap(p, np.float32, "r", shape=(spec["rows"], spec["dim"]))
        m._mmap.madvise(mmap.MADV_RANDOM)
        weights.append(torch.from_numpy(m))
    n_batches, n_tables, bsz = spec["n_batches"], len(weights), spec["batch_size"]
    lookups = 0
    t0 = time.perf_counter()
    for i in range(n_batches):
        vals, offs = data[f"v{i}"], data[f"o{i}"]
        for t in range(n_tables):
            s, e = offs[t * bsz], offs[(t + 1) * bsz]
            ids = torch.from_numpy(vals[s:e])
            o = torch.from_numpy(offs[t * bsz:(t + 1) * bsz] - s)
            F.embedding_bag(ids, weights[t], o, mode="sum")
            lookups += e - s
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "lookups": int(lookups)}))


def part6(info, trs, args) -> None:
    print("\n## 6. the peer: np.memmap (MADV_RANDOM) + F.embedding_bag, page cache bounded "
          "by a memory cgroup to the cache's DRAM budget, vs a 10% cache over the cold SSD")
    cg = CGROUP / f"tiermem-peer-{os.getpid()}"
    try:
        cg.mkdir()
    except OSError as e:
        print(f"skipped: cannot create a memory cgroup at {cg} ({e.strerror}); run as root on "
              "a machine with the cgroup v1 memory controller")
        return
    out_dir = Path(args.dir)
    try:
        files = peer_files(info, out_dir)
        first = info.tables[0]
        for name, batches in trs.items():
            warm, run = batches[:args.warm_batches], batches[args.warm_batches:]
            with cached(cold_ssd(info, args, True), 0.10, args.policy) as tier:
                tier.warm(profile(warm))
                budget = tier.nbytes
                tier.cold.drop_page_cache()
                ours = [timed(tier, run)]
                bpath = out_dir / "peer-batches.npz"
                np.savez(bpath, **{f"v{i}": b.values for i, b in enumerate(run)},
                         **{f"o{i}": b.offsets for i, b in enumerate(run)})
                spec = {"cgroup": str(cg), "budget": budget, "files": [str(f) for f in files],
                        "rows": first.spec.rows, "dim": first.spec.dim, "batches": str(bpath),
                        "n_batches": len(run), "batch_size": run[0].batch_size,
                        "threads": os.cpu_count() or 1}
                sp = out_dir / "peer-spec.json"
                sp.write_text(json.dumps(spec))
                res = subprocess.run([sys.executable, __file__, "--peer-child", str(sp)],
                                     capture_output=True, text=True, timeout=3600)
                if res.returncode != 0:
                    print(f"{name}: peer failed: {res.stderr.strip()[-400:]}")
                    continue
                peer = json.loads(res.stdout.strip().splitlines()[-1])
                tier.cold.drop_page_cache()
                # a second pass of ours after the peer: A B A
                tier.stats.reset()
                ours.append(timed(tier, run))
            n = sum(b.values.size for b in run)
            # the first pass is the fair one: both sides start with their DRAM cold
            # (ours: a profile-warmed cache, the peer: an empty page cache); the second
            # pass of ours, after the peer, re-reads batches its cache has seen
            r = peer["seconds"] / ours[0]
            print(f"{name:<14} budget {budget / 2**20:.0f} MiB: peer {n / peer['seconds']:>10,.0f}"
                  f" lookups/s, tiermem {n / ours[0]:>10,.0f} lookups/s: {r:.1f}x  "
                  f"{goal(r >= 10, '>= 10x') if 'meta' in name else ''}  (tiermem again "
                  f"after the peer, same batches: {n / ours[1]:,.0f} lookups/s)")
    finally:
        try:
            for pid in (cg / "cgroup.procs").read_text().split():
                (CGROUP / "cgroup.procs").write_text(pid)
            cg.rmdir()
        except OSError:
            pass


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--peer-child":
        peer_child(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_args(ap)
    ap.add_argument("--rounds", type=int, default=4,
                    help="interleaved rounds (parts 2-3: the trace cut into this many segments)")
    ap.add_argument("--policy", default="clock", help="cache policy (lru, clock, s3fifo, ...)")
    ap.add_argument("--parts", default="1,2,3,4,5,6")
    ap.add_argument("--dir", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.tables, args.batches, args.warm_batches = 50_000, 2, 6, 3
        args.batch_size, args.pooling, args.rounds = 128, 4, 2
    parts = {int(p) for p in args.parts.split(",")}
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    info = build_store(args)
    print(f"store: {args.tables} x {args.rows:,} x {args.dim} float32 = "
          f"{info.nbytes / 2**30:.2f} GiB; batch {args.batch_size} x pooling {args.pooling}; "
          f"policy {args.policy}")
    trs = traces(args, [t.name for t in info.tables])
    dram = DramTier(info, TierConfig())
    for batches in trs.values():  # compile every kernel the run uses
        dram.pool(batches[0])
        with cached(cold_ssd(info, args, False), 0.02, args.policy) as tier:
            tier.pool(batches[0])
            tier.pool(batches[1])
    raw = 0.0
    if parts & {4, 5}:
        files = [t.weight_chunk(c) for t in info.tables for c in range(t.n_chunks)]
        raw = raw_random_reads(files, 20_000 if not args.quick else 3_000, args.io_threads, 1,
                               True)
    if 1 in parts:
        part1(info, dram, trs, args)
    if 2 in parts:
        part2(info, dram, trs, args)
    if 3 in parts:
        part3(info, dram, trs, args)
    if 4 in parts:
        part4(info, dram, trs, args, raw)
    if 5 in parts:
        part5(info, trs, args, raw)
    if 6 in parts:
        part6(info, trs, args)
    dram.close()


if __name__ == "__main__":
    main()
