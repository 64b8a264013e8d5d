"""InferenceSession.warmup: after it, no batch compiles a kernel, and the session is as it was."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from runtime import (
    DLRMConfig,
    InferenceSession,
    RuntimeConfig,
    random_dense,
    save_dlrm_checkpoint,
    store_from_checkpoint,
)
from tiermem import SparseFeatures, TierConfig
from tiermem.cache.cache import CacheConfig
from tiermem.cache.prefetch import PrefetchConfig
from tiermem.kernels import kernel_census

ROWS = (300, 41, 1000, 7)
DIM = 8


@pytest.fixture(scope="module", params=["float32", "int8"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"warm-{request.param}")
    cfg = DLRMConfig(num_dense=5, embedding_dim=DIM, num_tables=len(ROWS), bottom_mlp=(11, DIM),
                     top_mlp=(9, 1), interaction="dlrm")
    rng = np.random.default_rng(3)
    tables = [rng.standard_normal((r, DIM)).astype(np.float32) for r in ROWS]
    save_dlrm_checkpoint(d / "m.pt", cfg, tables, random_dense(cfg, seed=5))
    store_from_checkpoint(d / "m.pt", d / "s.zarr", dtype=request.param)
    return d / "m.pt", d / "s.zarr"


def _batch(names, B, rng, weighted):
    lengths = rng.integers(0, 4, len(ROWS) * B)
    ids = np.concatenate([rng.integers(0, r, int(lengths[t * B:(t + 1) * B].sum()))
                          for t, r in enumerate(ROWS)]).astype(np.int64)
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    w = rng.random(ids.size, dtype=np.float32) if weighted else None
    return rng.standard_normal((B, 5)).astype(np.float32), SparseFeatures.from_offsets(
        names, ids, off, w)


CONFIGS = {
    "dram": RuntimeConfig(tier=TierConfig(kind="dram")),
    "ssd": RuntimeConfig(tier=TierConfig(kind="ssd")),
    "cxl": RuntimeConfig(tier=TierConfig(kind="cxl", cxl_latency_ns=0.0)),
    "ssd+cache+prefetch": RuntimeConfig(
        tier=TierConfig(kind="ssd"), cache=CacheConfig(policy="clock", capacity_fraction=0.2),
        prefetch=PrefetchConfig(lookahead=1)),
    "cxl+lru": RuntimeConfig(tier=TierConfig(kind="cxl", cxl_latency_ns=0.0),
                             cache=CacheConfig(capacity_fraction=0.5)),
}


def check_no_batch_compiles(path, store, name):
    """Warm a session up, then run batches of every shape it serves: none may compile."""
    rng = np.random.default_rng(0)
    with InferenceSession.open(path, store, CONFIGS[name]) as sess:
        cache = getattr(sess.tier, "cache_stats", None)
        before_cache = cache() if cache else None
        stats_before = sess.stats
        sess.warmup()
        # the session is left as it was: counters, cache content and counters
        assert sess.stats == stats_before
        if cache:
            assert cache() == before_cache
        census = kernel_census()
        got, want = [], []
        # 3000 samples: past the cache's parallel pass over hits (8192 lookups) too
        for B, weighted in ((1, False), (3, True), (700, False), (700, True), (3000, False)):
            dense, f = _batch(list(sess.table_names), B, rng, weighted)
            if sess.prefetch_enabled:
                sess.prefetch(f)
            got.append(sess.predict(dense, f))
            want.append((dense, f))
        list(sess.predict_stream(want))
        added = kernel_census().since(census).signatures
        assert added == 0, f"{added} kernel(s) compiled by batches after warmup()"
    # and the answers are those of a session that never warmed up
    with InferenceSession.open(path, store, CONFIGS["dram"]) as ref:
        for g, (dense, f) in zip(got, want, strict=True):
            np.testing.assert_allclose(g, ref.predict(dense, f), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_warmup_leaves_the_session_as_it_was(model, name):
    check_no_batch_compiles(*model, name)


@pytest.mark.parametrize("name", ["dram", "ssd+cache+prefetch", "cxl+lru"])
def test_no_batch_compiles_after_warmup_in_a_fresh_process(model, name, python,
                                                           subprocess_env):
    """In a fresh process no kernel exists yet, so every one a batch needs must come from
    warmup() (in this process, earlier tests may have compiled them already)."""
    code = ("import sys; from tests.test_warmup import check_no_batch_compiles as c; "
            "c(sys.argv[1], sys.argv[2], sys.argv[3]); print('ok')")
    r = subprocess.run([python, "-c", code, str(model[0]), str(model[1]), name],
                       env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_warmup_keeps_a_warmed_cache(model):
    path, store = model
    conf = RuntimeConfig(tier=TierConfig(kind="ssd"), cache=CacheConfig(capacity_rows=200))
    with InferenceSession.open(path, store, conf) as sess:
        dense, f = _batch(list(sess.table_names), 20, np.random.default_rng(1), False)
        sess.predict(dense, f)
        keys = {k: g.policy.keys().copy() for k, g in sess.tier._pools.items()}
        stats, cache = sess.stats, sess.tier.cache_stats()
        sess.warmup()
        assert sess.stats == stats and sess.tier.cache_stats() == cache
        for k, g in sess.tier._pools.items():
            np.testing.assert_array_equal(np.sort(g.policy.keys()), np.sort(keys[k]))
        sess.tier.cold.stats.reset()
        sess.predict(dense, f)  # the same batch again: every row is still resident
        assert sess.tier.cold.stats.total().rows_read == 0


def _warmup_then_fresh_process(model, python, env):
    """`tiermem warmup --store S --model M` in one process; a second process then loads
    every kernel its batches need from the on-disk cache and compiles none."""
    path, store = model
    r = subprocess.run([python, "-m", "runtime.cli", "warmup", "--store", str(store),
                        "--model", str(path), "--tiers", "dram,ssd", "--json"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["compiled"] + rep["loaded_from_cache"] > 0
    assert {x["setup"] for x in rep["runs"]} == {"dram", "ssd", "ssd+cache"}
    code = ("import sys; from tiermem.kernels import kernel_census as k; "
            "from tests.test_warmup import check_no_batch_compiles as c; "
            "c(sys.argv[1], sys.argv[2], 'ssd+cache+prefetch'); "
            "n = k(); print(n.compiled, n.loaded)")
    r = subprocess.run([python, "-c", code, str(path), str(store)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    compiled, loaded = map(int, r.stdout.split()[-2:])
    assert compiled == 0 and loaded > 0
    return rep


def test_warmup_command_then_a_fresh_process_compiles_nothing(model, python, subprocess_env):
    if "int8" in str(model[1].parent):
        pytest.skip("one dtype is enough in the default run (all: -m slow)")
    _warmup_then_fresh_process(model, python, subprocess_env)


@pytest.mark.slow
def test_warmup_command_fills_an_empty_kernel_cache(model, python, subprocess_env, tmp_path):
    """From an empty cache folder (a fresh install): warmup compiles, then nothing does."""
    cache = tmp_path / "nbcache"
    rep = _warmup_then_fresh_process(model, python,
                                     {**subprocess_env, "NUMBA_CACHE_DIR": str(cache)})
    assert rep["compiled"] > 0 and rep["kernel_cache"] == str(cache)


def test_warmup_command_errors(python, subprocess_env):
    r = subprocess.run([python, "-m", "runtime.cli", "warmup", "--model", "m.pt"],
                       env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--model needs --store" in r.stderr
    r = subprocess.run([python, "-m", "runtime.cli", "warmup", "--tiers", "dram,nvme"],
                       env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'nvme' is not one of" in r.stderr


def check_mixed_groups_compile_nothing(store):
    """Tables of three widths (three slot pools): the parallel thresholds hold per pool."""
    from tiermem.cache.cache import CachedTier
    from tiermem.format import open_store
    from tiermem.tiers import open_tier
    from tiermem.warmup import warm_tier

    info = open_store(store)
    tier = CachedTier(open_tier(info, TierConfig(kind="ssd")),
                      CacheConfig(policy="clock", capacity_fraction=1.0))
    with tier:
        warm_tier(tier)
        tier.warm({t.name: np.arange(t.spec.rows) for t in info.tables})  # all resident
        census = kernel_census()
        rng = np.random.default_rng(0)
        for B, weighted in ((1, False), (9000, False), (9000, True)):
            ids = np.concatenate([rng.integers(0, t.spec.rows, B) for t in info.tables])
            w = rng.random(ids.size, dtype=np.float32) if weighted else None
            tier.pool(SparseFeatures.from_offsets(info.names, ids, np.arange(
                ids.size + 1, dtype=np.int64), w))
        added = kernel_census().since(census).signatures
        assert added == 0, f"{added} kernel(s) compiled after warm_tier()"


def test_warmup_covers_each_slot_pool(tmp_path, python, subprocess_env):
    from tiermem.format import create_random_store, table_specs

    store = tmp_path / "mixed.zarr"
    create_random_store(store, table_specs([("a", 3000, 8), ("b", 2000, 16), ("c", 1000, 32)],
                                           "float32"))
    code = ("import sys; from tests.test_warmup import check_mixed_groups_compile_nothing as c; "
            "c(sys.argv[1]); print('ok')")
    r = subprocess.run([python, "-c", code, str(store)], env=subprocess_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("name", ["dram", "ssd+cache+prefetch"])
def test_batches_served_during_a_warmup_are_counted(model, name):
    """A service warms up on a thread of its own while it may already serve: the warm-up's
    batches are not counted, the served ones are (none lost to a restore)."""
    import threading

    path, store = model
    rng = np.random.default_rng(2)
    with InferenceSession.open(path, store, CONFIGS[name]) as sess:
        work = [_batch(list(sess.table_names), 5, rng, False) for _ in range(30)]
        t = threading.Thread(target=sess.warmup)
        t.start()
        for dense, f in work:
            sess.predict(dense, f)
        t.join()
        st = sess.tier.stats
        assert st.batches == len(work)
        assert st.total().lookups == sum(int(f.values.size) for _, f in work)
