"""The demo: build a Criteo-shaped DLRM and its store, serve a workload from each tier.

Steps: a DLRM with the 26 Criteo Kaggle tables (row counts capped so the demo
fits anywhere) is saved as a facebookresearch/dlrm checkpoint; its tables are
streamed into a tiermem store; a Zipf workload is then run through the DRAM,
SSD (page cache dropped first) and CXL-emulated tiers, and the report shows
throughput, batch latency, what each tier read, and that all tiers return
the same predictions. Real preprocessed Criteo samples are scored too when
``../shared/data`` is present.
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
from runtime.model import DLRMConfig, random_dense
from runtime.session import InferenceSession, RuntimeConfig
from tiermem.config import TierConfig, TierKind
from tiermem.features import SparseFeatures
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
    threads: int | None = None
    seed: int = 0


def _find_shared_samples() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    for base in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        p = base.joinpath(*SHARED_SAMPLES)
        if p.exists():
            return p
    return None


def _run_tier(model: Path, store: Path, kind: TierKind, dense: list[np.ndarray],
              batches: list[SparseFeatures], threads: int | None) -> dict[str, Any]:
    cfg = RuntimeConfig(tier=TierConfig(kind=kind), num_threads=threads)
    t_open = time.perf_counter()
    with InferenceSession.open(model, store, cfg) as sess:
        t_open = time.perf_counter() - t_open
        # warm-up: compile kernels on a tiny batch (not on the measured ones)
        sess.predict(dense[0][:2], _head(batches[0], 2))
        if kind is TierKind.SSD:
            sess.tier.drop_page_cache()  # type: ignore[attr-defined]
        sess.tier.stats.reset()
        preds, lat = [], []
        t0 = time.perf_counter()
        for d, s in zip(dense, batches, strict=True):
            t = time.perf_counter()
            preds.append(sess.predict(d, s))
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        tot = sess.tier.stats.total()
    n = sum(len(p) for p in preds)
    return {
        "tier": kind.value,
        "open_s": t_open,
        "samples_per_s": n / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "lookups": tot.lookups,
        "rows_read": tot.rows_read,
        "bytes_read": tot.bytes_read,
        "read_ops": tot.read_ops,
        "modeled_delay_s": tot.modeled_delay_seconds,
        "preds": np.concatenate(preds),
    }


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
                      bottom_mlp=(128, 64, cfg.dim), top_mlp=(256, 128, 1), interaction="dlrm")
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
    results = [_run_tier(model_path, store_path, k, dense, batches, cfg.threads)
               for k in (TierKind.DRAM, TierKind.SSD, TierKind.CXL)]
    ref = results[0]["preds"]
    log(f"{'tier':<5} {'samples/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'rows read':>11} "
        f"{'MiB read':>9} {'read ops':>9} {'model s':>8} {'max |dp|':>9}")
    for r in results:
        r["max_abs_diff_vs_dram"] = float(np.abs(r["preds"] - ref).max())
        log(f"{r['tier']:<5} {r['samples_per_s']:>11,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['rows_read']:>11,} {r['bytes_read'] / 2**20:>9.1f} {r['read_ops']:>9,} "
            f"{r['modeled_delay_s']:>8.3f} {r['max_abs_diff_vs_dram']:>9.1e}")
    log("\n(SSD: page cache dropped before the run, rows deduplicated per batch and read with "
        "parallel pread; CXL: 'model s' is the emulated latency/bandwidth cost added)")

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
    else:
        log("\n(../shared/data not found: skipped scoring the real Criteo samples)")
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out / "report.json")
    log(f"report: {out / 'report.json'}")
    return report
