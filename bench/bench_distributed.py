"""Sharded inference on a local Ray cluster against the single-process runtime.

One DLRM (26 Criteo-shaped tables capped at ``--max-rows``, DLRM-v2 multi-hot
pooling, so tables differ in size *and* in load) and one Zipf trace; the
single-process :class:`InferenceSession` is the anchor, measured in the same
run. For 2 and 4 shard actors and every planner strategy:

- p50 / p99 batch latency (``predict``, one batch at a time) and their
  overhead over the anchor;
- throughput (``predict_stream``: shards pool batch i+1 while the MLPs of
  batch i run here);
- total CPU time per batch: this process plus every shard process
  (getrusage), and the whole machine (/proc/stat), against the anchor's --
  the paper's compute overhead;
- the per-shard load balance actually measured (max / mean lookups over the
  shards) and the cost model's predicted slowest shard.

Then the cost model alone (simulated, nothing run) for 8 and 16 shards.

On this 2-core machine the shard processes, the driver and Ray's own
daemons share the same two cores, so measured overheads include that
contention; the simulated figures model a cluster of separate machines.

    python bench/bench_distributed.py [--quick] [--shards 2,4] [--batches 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.distributed.cluster import connect, import_ray, shutdown  # noqa: E402
from runtime.distributed.planner import STRATEGIES, CostModel, make_plan  # noqa: E402
from runtime.distributed.profile import TraceProfile  # noqa: E402
from runtime.distributed.sharded import ShardedSession, ShardOptions  # noqa: E402
from runtime.model import DLRMConfig, random_dense  # noqa: E402
from runtime.session import InferenceSession, RuntimeConfig  # noqa: E402
from tiermem.config import TierConfig  # noqa: E402
from tiermem.format import create_random_store, open_store, table_specs  # noqa: E402
from tiermem.tiers import open_tier  # noqa: E402
from traces.presets import DLRMV2_MULTI_HOT, table_preset  # noqa: E402
from traces.synth import GeneratorConfig, Pooling, PoolingKind, generate  # noqa: E402


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores"


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def pct(a: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(a), q)) if a else float("nan")


# -- model, store, trace ----------------------------------------------------------------------

def build(args: argparse.Namespace) -> tuple[Path, DLRMConfig, list[str], list]:
    rows = [min(r, args.max_rows) for r in table_preset("criteo_kaggle")]
    names = [f"C{i + 1}" for i in range(len(rows))]
    path = Path(args.dir) / f"dist-{args.max_rows}x{args.dim}.zarr"
    specs = table_specs(zip(names, rows, [args.dim] * len(rows), strict=True), "float32")
    try:
        open_store(path)
    except Exception:  # noqa: BLE001 - (re)build it
        print(f"creating {path} ({sum(s.nbytes for s in specs) / 2**20:.0f} MiB) ...", flush=True)
        create_random_store(path, specs, overwrite=True)
    cfg = DLRMConfig(num_dense=13, embedding_dim=args.dim, num_tables=len(rows),
                     bottom_mlp=(256, 128, args.dim), top_mlp=(256, 128, 1))
    gen = GeneratorConfig(tuple(rows), batch_size=args.batch_size,
                          n_batches=args.batches + args.warm_batches + args.profile_batches,
                          alpha=args.alpha,
                          pooling=tuple(Pooling(PoolingKind.FIXED, float(m))
                                        for m in DLRMV2_MULTI_HOT),
                          keys=tuple(names), seed=1)
    rng = np.random.default_rng(2)
    batches = []
    for tb in generate(gen):
        dense = np.log1p(rng.exponential(3.0, (args.batch_size, 13))).astype(np.float32)
        batches.append((dense, tb.sparse))
    return path, cfg, names, batches


# -- measurement -----------------------------------------------------------------------------

def measure(sess: Any, batches: list, warm: int, cpu_of: Any) -> dict[str, Any]:
    """Latency (one batch at a time), then pipelined throughput, and CPU per batch."""
    for d, s in batches[:warm]:
        sess.predict(d, s)
    run = batches[warm:]
    cpu0, mach0 = cpu_of(), machine_cpu_seconds()
    lat = []
    for d, s in run:
        t = time.perf_counter()
        sess.predict(d, s)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    n = sum(1 for _ in sess.predict_stream(run))
    wall = time.perf_counter() - t
    cpu1, mach1 = cpu_of(), machine_cpu_seconds()
    samples = sum(len(d) for d, _ in run)
    return {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "throughput": samples / wall, "batches_per_s": n / wall,
            "cpu_ms_per_batch": (cpu1 - cpu0) / (2 * len(run)) * 1e3,
            "machine_cpu_ms_per_batch": (mach1 - mach0) / (2 * len(run)) * 1e3}


def ray_rtt_us(actor_cls: Any, ray: Any, n: int = 200) -> float:
    a = ray.remote(actor_cls).options(num_cpus=0).remote()
    ray.get(a.ping.remote())
    t = time.perf_counter()
    for _ in range(n):
        ray.get(a.ping.remote())
    rtt = (time.perf_counter() - t) / n * 1e6
    ray.kill(a)
    return rtt


class _Pinger:
    def ping(self) -> int:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-rows", type=int, default=400_000, help="cap on rows per table")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--alpha", type=float, default=1.05)
    ap.add_argument("--batches", type=int, default=60, help="measured batches")
    ap.add_argument("--warm-batches", type=int, default=5)
    ap.add_argument("--profile-batches", type=int, default=20,
                    help="batches the planner profiles (not measured)")
    ap.add_argument("--shards", default="2,4")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--capacity-factor", type=float, default=1.25,
                    help="shard capacity = factor x store bytes / shards")
    ap.add_argument("--simulate", default="8,16", help="shard counts for the cost model alone")
    ap.add_argument("--threads", type=int, default=1, help="kernel threads per shard")
    ap.add_argument("--transport", choices=["compiled", "tasks"], default="compiled",
                    help="ShardOptions.transport: Ray compiled graph, or one task per shard")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default="bench-out")
    args = ap.parse_args()
    if args.quick:
        args.max_rows, args.batches, args.profile_batches = 50_000, 20, 8
    shard_counts = [int(x) for x in args.shards.split(",") if x]
    strategies = [s for s in args.strategies.split(",") if s]
    print(f"machine: {machine()}")
    store, cfg, names, batches = build(args)
    info = open_store(store)
    specs = [info.table(n).spec for n in names]
    prof_b = batches[:args.profile_batches]
    work = batches[args.profile_batches:]
    profile = TraceProfile.from_batches((s for _, s in prof_b),
                                        {s.name: s.rows for s in specs})
    total = sum(s.nbytes for s in specs)
    print(f"model: 26 tables, {total / 2**20:.0f} MiB fp32 dim {args.dim}, batch "
          f"{args.batch_size}, {profile.lookups_per_batch:,.0f} lookups/batch "
          f"(DLRM-v2 multi-hot), Zipf {args.alpha}; {len(work) - args.warm_batches} measured "
          f"batches", flush=True)
    dense = random_dense(cfg, seed=0)
    conf = RuntimeConfig(tier=TierConfig(kind="dram"), num_threads=args.threads)

    # anchor: the single-process runtime, kernels on the same thread count as one shard
    single = InferenceSession(dense, open_tier(info, conf.tier), names, conf)
    import resource

    def own_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    base = measure(single, work, args.warm_batches, own_cpu)
    t = time.perf_counter()
    lookups = 0
    for _, s in work[:10]:
        single.embed(s)
        lookups += s.values.size
    ns_per_lookup = (time.perf_counter() - t) / lookups * 1e9
    single.close()
    print(f"\nsingle process: p50 {base['p50_ms']:.2f} ms  p99 {base['p99_ms']:.2f} ms  "
          f"{base['throughput']:,.0f} samples/s  CPU {base['cpu_ms_per_batch']:.2f} ms/batch "
          f"(machine {base['machine_cpu_ms_per_batch']:.2f}); SLS {ns_per_lookup:.1f} ns/lookup",
          flush=True)

    root = tempfile.mkdtemp(prefix="tmray")
    os.environ["HOME"] = root  # Ray's auth token goes here, removed at the end
    results: list[dict[str, Any]] = []
    try:
        connect(num_cpus=max(4, max(shard_counts)), temp_dir=os.path.join(root, "r"))
        ray = import_ray()
        rtt = ray_rtt_us(_Pinger, ray)
        # calibrated here: the round trip, and the SLS time per lookup of these rows
        per_byte = CostModel().ns_per_lookup_byte
        cost = CostModel(rtt_us=rtt, ns_per_lookup=max(
            0.1, ns_per_lookup - per_byte * specs[0].row_bytes))
        print(f"Ray actor round trip here: {rtt:.0f} us; cost model {cost}", flush=True)
        for n in shard_counts:
            cap = int(args.capacity_factor * total / n)
            print(f"\n== {n} shards, capacity {cap / 2**20:.0f} MiB each (measured, "
                  f"{args.transport} transport) ==")
            print(f"{'strategy':<10} {'p50 ms':>7} {'p99 ms':>7} {'p99 ovh':>8} {'samples/s':>10} "
                  f"{'thr ratio':>9} {'CPU ms/b':>9} {'CPU ovh':>8} {'balance':>8} "
                  f"{'pred us':>8} {'split':>5}  shard busy ms/batch", flush=True)
            for strat in strategies:
                # singular is the paper's baseline: one shard holds everything, whatever
                # the capacity the others are given
                plan = make_plan(specs, n, None if strat == "singular" else cap, strat,
                                 profile, cost)
                pred = cost.predict(plan, profile)
                with ShardedSession(dense, store, plan, names, conf,
                                    ShardOptions(num_cpus=0.5, timeout_s=120,
                                                 transport=args.transport)) as sh:
                    sh.reset_stats()

                    def all_cpu(sh: ShardedSession = sh) -> float:
                        return float(sh.cpu_seconds()["total"])

                    r = measure(sh, work, args.warm_batches, all_cpu)
                    st = sh.stats
                    lk = np.asarray(st["shard_lookups"], np.float64)
                    busy = [x["busy_seconds"] / max(1, x["requests"]) * 1e3
                            for x in st["shards"]]
                r.update(strategy=strat, shards=n, balance=float(lk.max() / lk.mean()),
                         shard_busy_ms=busy,
                         predicted_us=pred["slowest_us"], split=len(plan.split_tables),
                         p99_overhead=r["p99_ms"] / base["p99_ms"] - 1,
                         p50_overhead=r["p50_ms"] / base["p50_ms"] - 1,
                         cpu_overhead=r["cpu_ms_per_batch"] / base["cpu_ms_per_batch"] - 1,
                         throughput_ratio=r["throughput"] / base["throughput"])
                results.append(r)
                print(f"{strat:<10} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
                      f"{r['p99_overhead']:+8.0%} {r['throughput']:10,.0f} "
                      f"{r['throughput_ratio']:9.2f} {r['cpu_ms_per_batch']:9.2f} "
                      f"{r['cpu_overhead']:+8.0%} {r['balance']:8.2f} "
                      f"{r['predicted_us']:8.0f} {r['split']:5d}  "
                      f"{' '.join(f'{b:.1f}' for b in busy)}", flush=True)
    finally:
        shutdown()
        shutil.rmtree(root, ignore_errors=True)

    single = InferenceSession(dense, open_tier(info, conf.tier), names, conf)
    again = measure(single, work, args.warm_batches, own_cpu)
    single.close()
    print(f"\nsingle process again (noise check): p50 {again['p50_ms']:.2f} ms  p99 "
          f"{again['p99_ms']:.2f} ms  {again['throughput']:,.0f} samples/s  CPU "
          f"{again['cpu_ms_per_batch']:.2f} ms/batch (the overheads above use the first run)")
    for n in shard_counts:
        rows = [r for r in results if r["shards"] == n and r["strategy"] != "singular"]
        if rows:
            best = min(rows, key=lambda r: r["p99_ms"])
            print(f"\nbest measured strategy at {n} shards: {best['strategy']} -- p99 overhead "
                  f"{best['p99_overhead']:+.0%} over the single process, CPU overhead "
                  f"{best['cpu_overhead']:+.0%}, balance {best['balance']:.2f}")

    print("\n== cost model alone (SIMULATED cluster: one machine per shard) ==")
    single_us = cost.predict(make_plan(specs, 1, None, "singular", profile, cost),
                             profile)["slowest_us"]
    print(f"predicted single shard (all tables, one round trip): {single_us:.0f} us/batch")
    print(f"{'shards':>6} {'strategy':<10} {'slowest us':>10} {'vs 1 shard':>10} "
          f"{'lookup bal':>10} {'bytes bal':>9} {'split':>5}")
    for n in [int(x) for x in args.simulate.split(",") if x]:
        cap = int(args.capacity_factor * total / n)
        for strat in strategies:
            plan = make_plan(specs, n, None if strat == "singular" else cap, strat, profile,
                             cost)
            p = cost.predict(plan, profile)
            b = np.asarray(plan.shard_bytes(), np.float64)
            print(f"{n:>6} {strat:<10} {p['slowest_us']:10.0f} "
                  f"{p['slowest_us'] / single_us:10.2f} {p['lookup_balance']:10.2f} "
                  f"{b.max() / b.mean():9.2f} {len(plan.split_tables):5d}")


if __name__ == "__main__":
    main()
