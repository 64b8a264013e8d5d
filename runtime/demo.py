"""The demo: build a Criteo-shaped DLRM and its store, serve a workload from each tier.

Steps: a DLRM with the 26 Criteo Kaggle tables (row counts capped so the demo
fits anywhere) is saved as a facebookresearch/dlrm checkpoint; its tables are
streamed into a tiermem store; every kernel is compiled (or loaded from the
cache) before anything is measured; a Zipf workload is then run through the
DRAM tier, the SSD tier (page cache dropped first), the SSD tier behind a 10%
DRAM cache with the lookahead prefetcher, and the CXL-emulated tier. The
report shows throughput, batch latency, the cache's hit rate, what each tier
read from its device, and that all tiers return the same predictions. Real
preprocessed Criteo samples are scored too when the project's shared data
folder is present (a developer checkout).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.checkpoint import save_dlrm_checkpoint
from runtime.convert import store_from_checkpoint
from runtime.model import DLRMConfig, Interaction, random_dense
from runtime.session import InferenceSession, RuntimeConfig
from tiermem.cache.cache import CachedTier
from tiermem.config import TierConfig, TierKind
from tiermem.features import SparseFeatures
from tiermem.kernels import kernel_census
from traces.synth import synthetic_batches

__all__ = ["DemoConfig", "run_demo"]

KAGGLE_ROWS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
               27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
SHARED_SAMPLES = ("criteo_kaggle_dlrm_processed_100", "kaggle_dlrm_processed_100.npz")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    max_rows: int = 200_000
    dim: int = 16
    batch_size: int = 2048
    batches: int = 20
    alpha: float = 1.05
    dtype: str = "float32"
    threads: int | str | None = "auto"
    seed: int = 0
    cache_share: float = 0.1


def _find_shared_samples() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    for base in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        p = base.joinpath(*SHARED_SAMPLES)
        if p.exists():
            return p
    return None


@dataclass(frozen=True)
class _Setup:
    """One line of the demo's table: a tier, optionally behind the cache + prefetcher."""

    label: str
    kind: TierKind
    cache: bool = False


SETUPS = (_Setup("dram", TierKind.DRAM), _Setup("ssd", TierKind.SSD),
          _Setup("ssd+cache", TierKind.SSD, cache=True), _Setup("cxl", TierKind.CXL))


def _run_tier(model: Path, store: Path, setup: _Setup, dense: list[np.ndarray],
              batches: list[SparseFeatures], threads: int | str | None,
              cache_share: float) -> dict[str, Any]:
    from tiermem.cache.cache import CacheConfig
    from tiermem.cache.policy import Policy
    from tiermem.cache.prefetch import PrefetchConfig
    from tiermem.tiers.ssd import SsdTier

    cfg = RuntimeConfig(tier=TierConfig(kind=setup.kind), num_threads=threads,
                        cache=CacheConfig(policy=Policy.CLOCK, capacity_fraction=cache_share)
                        if setup.cache else None,
                        prefetch=PrefetchConfig(lookahead=2) if setup.cache else None)
    t_open = time.perf_counter()
    with InferenceSession.open(model, store, cfg) as sess:
        t_open = time.perf_counter() - t_open
        warm = sess.warmup()  # every kernel compiled or loaded now, not in a measured batch
        if setup.kind is TierKind.SSD:
            cold = sess.tier.cold if isinstance(sess.tier, CachedTier) else sess.tier
            assert isinstance(cold, SsdTier)  # an ssd setup's tier
            cold.drop_page_cache()
        census = kernel_census()
        preds, lat = [], []
        t0 = time.perf_counter()
        t = t0
        # one stream, pipelined: the embedding stage of batch i+1 overlaps the MLPs of
        # batch i, and the prefetcher (with the cache) reads ahead for batches i+2, i+3
        for p in sess.predict_stream(zip(dense, batches, strict=True)):
            preds.append(p)
            now = time.perf_counter()
            lat.append(now - t)
            t = now
        wall = time.perf_counter() - t0
        compiled_measuring = kernel_census().since(census).signatures
        tot = sess.tier.stats.total()  # a cache records its cold reads here too
        pf = sess.tier.prefetch_counters if isinstance(sess.tier, CachedTier) else None
    n = sum(len(p) for p in preds)
    modeled = tot.modeled_delay_seconds
    rows_read, bytes_read, read_ops = tot.rows_read, tot.bytes_read, tot.read_ops
    if pf is not None:  # the prefetcher's reads count as the tier's too
        rows_read += pf.issued
        bytes_read += pf.bytes_read
        read_ops += pf.read_ops
    hits, misses = tot.cache_hits, tot.cache_misses
    return {
        "tier": setup.label,
        "open_s": t_open,
        "warmup_s": warm["seconds"],
        "kernels_compiled_in_warmup": warm["compiled"],
        "kernels_compiled_while_measuring": compiled_measuring,
        "wall_s": wall,
        "modeled_s": modeled,
        "samples_per_s": n / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "lookups": tot.lookups,
        "hit_rate": hits / (hits + misses) if setup.cache and hits + misses else None,
        "rows_read": None if setup.kind is TierKind.DRAM else rows_read,
        "bytes_read": None if setup.kind is TierKind.DRAM else bytes_read,
        "read_ops": None if setup.kind is TierKind.DRAM else read_ops,
        "prefetched_rows": None if pf is None else pf.issued,
        "preds": np.concatenate(preds),
    }


LEGEND = """\
  samples/s   samples scored per second of wall time
  p50/p99 ms  time between consecutive batch results (pipelined stream)
  hit rate    distinct rows per batch found in the DRAM cache (ssd+cache only)
  device      rows / MiB / read operations the tier took from its device, prefetches
              included (SSD: a batch's distinct rows, neighbours merged into one read, so
              the bytes include the gaps between them, and without a cache a row that a
              later batch needs again is read again; CXL: modeled row accesses; DRAM:
              none, the rows are in memory)
  wall(model) seconds measured, and of them the time the CXL model waited (latency,
              bandwidth): the CXL tier serves from DRAM and waits what an expander would add
  max |dp|    largest difference from the DRAM tier's click probabilities (0: identical)"""


def _head(s: SparseFeatures, n: int) -> SparseFeatures:
    tables = [(k, *s.table(k)[:2]) for k in s.keys]
    return SparseFeatures.from_tables(
        [(k, ids[: off[n]], off[: n + 1]) for k, ids, off in tables])


def run_demo(cfg: DemoConfig = DemoConfig(), *, log: Any = print) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [min(r, cfg.max_rows) for r in KAGGLE_ROWS]
    names = [f"emb_l.{i}" for i in range(len(rows))]
    mcfg = DLRMConfig(num_dense=13, embedding_dim=cfg.dim, num_tables=len(rows),
                      bottom_mlp=(128, 64, cfg.dim), top_mlp=(256, 128, 1),
                      interaction=Interaction.DLRM)
    model_path = out / "model.pt"
    store_path = out / "store.zarr"
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    # the scale as a float32 scalar: NumPy 2 would promote float32 / float64 to float64 tables
    tables = [rng.uniform(-1, 1, (r, cfg.dim)).astype(np.float32) / np.float32(np.sqrt(r))
              for r in rows]
    save_dlrm_checkpoint(model_path, mcfg, tables, random_dense(mcfg, seed=cfg.seed))
    del tables
    info = store_from_checkpoint(model_path, store_path, dtype=cfg.dtype, overwrite=True)
    log(f"model  {model_path}  ({mcfg.num_tables} tables, dim {cfg.dim}, "
        f"{sum(rows):,} rows; bottom {mcfg.bottom_mlp}, top {mcfg.top_mlp})")
    log(f"store  {store_path}  ({info.nbytes / 2**20:.1f} MiB, {cfg.dtype}), built in "
        f"{time.perf_counter() - t0:.1f} s")

    batches = list(synthetic_batches(rows, batch_size=cfg.batch_size, n_batches=cfg.batches,
                                     alpha=cfg.alpha, keys=names, seed=cfg.seed))
    dense = [np.log1p(rng.exponential(3.0, (cfg.batch_size, 13))).astype(np.float32)
             for _ in batches]
    log(f"workload: {cfg.batches} batches x {cfg.batch_size} samples, one id per table, "
        f"Zipf({cfg.alpha}) ids\n")
    log("warming up: every kernel is compiled (the first run on a machine: about a "
        "minute) or loaded from Numba's cache, before anything is measured ...")
    results = [_run_tier(model_path, store_path, st, dense, batches, cfg.threads,
                         cfg.cache_share) for st in SETUPS]
    ref = results[0]["preds"]
    log(f"{'tier':<10} {'samples/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'hit rate':>8} "
        f"{'device rows':>11} {'MiB':>6} {'ops':>7} {'wall(model) s':>13} {'max |dp|':>8}")
    for r in results:
        r["max_abs_diff_vs_dram"] = float(np.abs(r["preds"] - ref).max())
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}"
        wall_model = f"{r['wall_s']:.2f} ({r['modeled_s']:.2f})"
        dev = ("-", "-", "-") if r["rows_read"] is None else (
            f"{r['rows_read']:,}", f"{r['bytes_read'] / 2**20:.1f}", f"{r['read_ops']:,}")
        log(f"{r['tier']:<10} {r['samples_per_s']:>10,.0f} {r['p50_ms']:>7.2f} "
            f"{r['p99_ms']:>7.2f} {hit:>8} {dev[0]:>11} {dev[1]:>6} {dev[2]:>7} "
            f"{wall_model:>13} {r['max_abs_diff_vs_dram']:>8.1e}")
    log("\n" + LEGEND)
    log(f"\n(SSD: the page cache is dropped before each SSD run; ssd+cache: a "
        f"{cfg.cache_share:.0%} CLOCK cache with the lookahead prefetcher, starting empty: "
        f"over {cfg.batches} batches it saves device reads more than time. Kernels were "
        f"compiled or loaded before any measured batch: "
        f"{sum(r['warmup_s'] for r in results):.1f} s of warm-up in all.)")

    report: dict[str, Any] = {"config": cfg.__dict__, "model": mcfg.to_dict(),
                              "tiers": [{k: v for k, v in r.items() if k != "preds"}
                                        for r in results]}
    samples = _find_shared_samples()
    if samples is not None:
        with np.load(samples) as d:
            ids = d["sparse"] % np.asarray(rows)  # hash into the capped tables
            sparse = SparseFeatures.from_offsets(names, ids.T.reshape(-1),
                                                 np.arange(ids.size + 1, dtype=np.int64))
            with InferenceSession.open(model_path, store_path) as sess:
                p = sess.predict(d["dense"], sparse)
        log(f"\nreal Criteo Kaggle samples ({samples.name}): {len(p)} scored, mean p = "
            f"{p.mean():.4f} (random weights: the scores only show the path works)")
        report["criteo_samples"] = {"n": len(p), "mean": float(p.mean())}
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out / "report.json")
    log(f"report: {out / 'report.json'}")
    return report
