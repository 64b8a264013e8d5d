"""The DRAM cache in front of SSD/CXL tiers: exact results, capacity, pins, prefetch, pipeline."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiermem import (
    CapacityError,
    ConfigError,
    SparseFeatures,
    StoreError,
    TableSpec,
    TierConfig,
    create_random_store,
    open_tier,
)
from tiermem.cache.cache import CacheConfig, CachedTier
from tiermem.cache.prefetch import PrefetchConfig, Prefetcher
from tiermem.quantize import RowDtype
from traces.synth import synthetic_batches

SPECS = [TableSpec("a", 3000, 8), TableSpec("b", 500, 8), TableSpec("c", 1200, 8),
         TableSpec("q", 800, 8, "int8"), TableSpec("h", 700, 4, "float16")]
POLICIES = ["lru", "lfu", "fifo", "clock", "s3fifo", "hybrid", "static"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "s.zarr"
    return create_random_store(path, SPECS, seed=3, chunk_rows=256)


@pytest.fixture(scope="module")
def dram(store):
    tier = open_tier(store, TierConfig(kind="dram"))
    yield tier
    tier.close()


def _batches(n, batch_size=64, pooling=3, alpha=1.1, seed=0):
    return list(synthetic_batches([s.rows for s in SPECS], batch_size=batch_size, n_batches=n,
                                  alpha=alpha, pooling=pooling, keys=[s.name for s in SPECS],
                                  seed=seed))


def _profile(batches):
    return {k: np.concatenate([b.table(k)[0] for b in batches]) for k in batches[0].keys}


def _cached(store, policy, kind="ssd", **kw):
    if not any(k.startswith("capacity") for k in kw):
        kw["capacity_fraction"] = 0.05
    cfg = CacheConfig(policy=policy, **kw)
    cold = open_tier(store, TierConfig(kind=kind, io_threads=8))
    return CachedTier(cold, cfg)


@pytest.mark.parametrize("policy", POLICIES)
def test_cached_ssd_equals_dram(store, dram, policy):
    batches = _batches(12)
    extra = {"pinned_fraction": 0.5} if policy == "hybrid" else {}
    with _cached(store, policy, **extra) as tier:
        if policy in ("hybrid", "static"):
            tier.pin_hot(_profile(batches[:4]))
        tier.cold.drop_page_cache()
        for b in batches:
            np.testing.assert_array_equal(tier.pool(b), dram.pool(b))
        tot = tier.stats.total()
        assert tot.cache_hits > 0 and tot.cache_misses > 0
        assert tot.rows_read <= tot.cache_misses + tot.lookups
        st = tier.cache_stats()
        assert sum(v["resident"] for k, v in st.items() if isinstance(v, dict)
                   and "resident" in v) <= tier.capacity_rows


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_cxl_behind_cache_equals_dram_and_charges_misses(store, dram, policy):
    batches = _batches(5)
    with _cached(store, policy, kind="cxl") as tier:
        for b in batches:
            np.testing.assert_array_equal(tier.pool(b), dram.pool(b))
        assert tier.stats.total().modeled_delay_seconds > 0


def test_tiny_cache_and_batch_larger_than_cache_stay_exact(store, dram):
    # 8-row capacity for the fp32 tables: every batch needs far more rows than fit
    batches = _batches(4, batch_size=128, pooling=5, alpha=0.3)
    with _cached(store, "lru", capacity_rows=8) as tier:
        tier.cold.drop_page_cache()
        for b in batches:
            np.testing.assert_array_equal(tier.pool(b), dram.pool(b))
        assert tier.cache_stats()["float32x8"]["bypassed"] > 0


def test_capacity_and_pins_hold_under_churn(store):
    batches = _batches(30, alpha=0.6)
    with _cached(store, "hybrid", pinned_fraction=0.5, capacity_rows=120) as tier:
        tier.pin_hot(_profile(batches[:5]))
        g = tier._pools[next(iter(tier._pools))]
        pinned_keys = g.policy.slot_keys()[g.policy.slot_keys() >= 0].copy()
        assert pinned_keys.size > 0
        for b in batches:
            tier.pool(b)
            keys = g.policy.slot_keys()
            assert (keys >= 0).sum() <= g.policy.capacity
            assert np.isin(pinned_keys, keys).all()


def test_concurrent_batches_equal_sequential(store, dram):
    batches = _batches(24, alpha=0.9)
    expected = [dram.pool(b) for b in batches]
    with _cached(store, "lru", capacity_rows=200) as tier:
        results = [None] * len(batches)
        errors = []

        def work(i):
            try:
                results[i] = tier.pool(batches[i])
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        for e, r in zip(expected, results, strict=True):
            np.testing.assert_array_equal(e, r)


def test_prefetch_gives_same_results_and_counts(store, dram):
    batches = _batches(16, alpha=1.0)
    with _cached(store, "lru", capacity_fraction=0.2) as tier, \
            Prefetcher(tier, PrefetchConfig(lookahead=2)) as pf:
        tier.cold.drop_page_cache()
        for i, b in enumerate(batches):
            for nxt in batches[i + 1:i + 3]:
                pf.submit(nxt)
            pf.drain(timeout=30)
            np.testing.assert_array_equal(tier.pool(b), dram.pool(b))
        c = tier.prefetch_counters
        assert c.issued > 0 and c.useful > 0
        assert not pf.errors


def test_warm_from_profile_fills_cache(store):
    batches = _batches(6)
    with _cached(store, "lfu", capacity_rows=100) as tier:
        loaded = tier.warm(_profile(batches))
        assert 0 < loaded <= tier.capacity_rows
        tier.pool(batches[0])
        assert tier.stats.total().cache_hits > 0


def test_bad_cache_configuration_is_clear(store):
    with pytest.raises(ConfigError, match="exactly one"):
        CacheConfig(policy="lru")
    with pytest.raises(ConfigError, match="capacity_rows"):
        CacheConfig(policy="lru", capacity_rows=0)
    with pytest.raises(ConfigError, match="capacity_fraction"):
        CacheConfig(policy="lru", capacity_fraction=1.5)
    cold = open_tier(store, TierConfig(kind="ssd"))
    try:
        with pytest.raises(ConfigError, match="nosuch"):
            CachedTier(cold, CacheConfig(policy="nosuch", capacity_rows=10))
        with pytest.raises(CapacityError, match="exceeds"):
            CachedTier(cold, CacheConfig(policy="lru", capacity_rows=10**9))
    finally:
        cold.close()
    with pytest.raises(ConfigError, match="cached tier"):
        Prefetcher(open_tier(store, TierConfig(kind="dram")))


def test_pipeline_and_prefetch_equal_serial_predict(tmp_path):
    from runtime import (
        DLRMConfig,
        InferenceSession,
        RuntimeConfig,
        random_dense,
        save_dlrm_checkpoint,
        store_from_checkpoint,
    )

    rows = [400, 90, 1500]
    cfg = DLRMConfig(num_dense=3, embedding_dim=8, num_tables=3, bottom_mlp=(8,),
                     top_mlp=(8, 1))
    rng = np.random.default_rng(0)
    save_dlrm_checkpoint(tmp_path / "m.pt", cfg,
                         [rng.standard_normal((r, 8)).astype(np.float32) for r in rows],
                         random_dense(cfg, seed=1))
    store_from_checkpoint(tmp_path / "m.pt", tmp_path / "m.zarr")
    names = [f"emb_l.{i}" for i in range(3)]
    batches = list(synthetic_batches(rows, batch_size=32, n_batches=12, pooling=2, keys=names))
    dense = [rng.standard_normal((32, 3)).astype(np.float32) for _ in batches]
    with InferenceSession.open(tmp_path / "m.pt", tmp_path / "m.zarr") as plain:
        expected = [plain.predict(d, s) for d, s in zip(dense, batches, strict=True)]
    conf = RuntimeConfig(tier=TierConfig(kind="ssd", io_threads=4),
                         cache=CacheConfig(policy="s3fifo", capacity_fraction=0.1),
                         prefetch=PrefetchConfig(lookahead=3))
    for pipeline in (False, True):
        with InferenceSession.open(tmp_path / "m.pt", tmp_path / "m.zarr", conf) as sess:
            got = list(sess.predict_stream(zip(dense, batches, strict=True), pipeline=pipeline))
            assert sess.tier.prefetch_counters.issued > 0
        assert len(got) == len(expected)
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_array_equal(e, g)
    with pytest.raises(ConfigError, match="prefetch needs a cache"):
        RuntimeConfig(prefetch=PrefetchConfig())


@pytest.mark.parametrize("spec,want", [
    ("5%", {"capacity_fraction": 0.05}), ("0.25", {"capacity_fraction": 0.25}),
    ("1.0", {"capacity_fraction": 1.0}), ("256MiB", {"capacity_bytes": 256 << 20}),
    ("2GB", {"capacity_bytes": 2_000_000_000}), ("1000", {"capacity_rows": 1000}),
    (1000, {"capacity_rows": 1000}),
])
def test_parse_cache_size(spec, want) -> None:
    from tiermem.cache.cache import parse_cache_size

    assert parse_cache_size(spec) == want


@pytest.mark.parametrize("spec,msg", [
    ("150%", "must be in"), ("0%", "must be in"), ("lots", "bad cache size"), ("-5MiB", "bad"),
    (0, ">= 1 row"), (0.5, "give rows"),
])
def test_parse_cache_size_errors(spec, msg) -> None:
    from tiermem.cache.cache import parse_cache_size

    with pytest.raises(ConfigError, match=msg):
        parse_cache_size(spec)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_prefetch_in_chunks_equals_one_read(store, dram, chunk):
    """Prefetch reserves and reads rows chunk by chunk (so a batch waits only for the chunk
    holding its row): any chunk size admits the same rows and gives exact results."""
    batches = _batches(4, alpha=1.0)
    with _cached(store, "lru", capacity_fraction=0.5) as tier:
        groups = {k: np.unique(g) for k, g in tier.global_ids(batches[1]).items()}
        n = sum(u.size for u in groups.values())
        assert len(groups) > 1  # several (dtype, dim) pools
        assert sum(tier.prefetch_rows(k, u, chunk_rows=chunk) for k, u in groups.items()) == n
        assert tier.prefetch_counters.issued == n
        # everything announced is resident and ready: the batch reads nothing from disk
        tier.stats.reset()
        np.testing.assert_array_equal(tier.pool(batches[1]), dram.pool(batches[1]))
        assert tier.stats.total().cache_misses == 0
        assert tier.prefetch_counters.useful == n
        # already resident rows are not read again
        assert sum(tier.prefetch_rows(k, u, chunk_rows=chunk) for k, u in groups.items()) == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(policy=st.sampled_from(["lru", "lfu", "clock", "s3fifo", "fifo"]),
       index=st.sampled_from(["dense", "hash"]), cap=st.integers(1, 400),
       admission=st.sampled_from([None, "tinylfu"]), seed=st.integers(0, 10_000),
       pooling=st.integers(1, 12))
def test_batch_path_equals_dram_at_any_capacity(store, dram, policy, index, cap, admission, seed,
                                                pooling):
    """The one-pass batch step, both key->slot indexes, any capacity (batches often hold
    more distinct rows than the cache: bypass), admission on or off: DRAM bit for bit."""
    batches = _batches(4, batch_size=48, pooling=pooling, seed=seed)
    with _cached(store, policy, capacity_rows=cap, index=index, admission=admission) as tier:
        for b in batches:
            np.testing.assert_array_equal(tier.pool(b), dram.pool(b))
        assert all((g.policy.pin_counts() == 0).all() for g in tier._pools.values())
        assert all(g.filling == 0 for g in tier._pools.values())
        tot = tier.stats.total()
        assert tot.cache_hits + tot.cache_misses > 0


def test_fill_error_is_clear_and_the_next_batch_is_served(tmp_path, dram):
    """A chunk file cut short while serving: that batch fails naming the table, its slots
    are released, and once the file is back the same batch is served exactly."""
    path = tmp_path / "s.zarr"
    info = create_random_store(path, SPECS, seed=3, chunk_rows=256)
    ref = open_tier(info, TierConfig(kind="dram"))
    chunk = info.table("a").weight_chunk(1)
    saved = chunk.read_bytes()
    with _cached(info, "lru", capacity_rows=200) as tier:
        b = SparseFeatures.from_lengths(["a"], [260, 300, 301, 5], [2, 2])
        want = ref.pool(b)
        with open(chunk, "r+b") as f:
            f.truncate(0)
        with pytest.raises(StoreError, match="'a'.*(truncated|short read)"):
            tier.pool(b)
        assert all((g.policy.pin_counts() == 0).all() for g in tier._pools.values())
        chunk.write_bytes(saved)
        np.testing.assert_array_equal(tier.pool(b), want)
    ref.close()


def test_dense_index_choice(store):
    f32 = (RowDtype.FLOAT32, 8)  # tables a, b, c: 32-byte rows
    with _cached(store, "lru", capacity_fraction=0.5) as tier:
        assert tier._pools[f32].policy.key_space == 4700
    with _cached(store, "lru", capacity_fraction=0.01) as tier:
        assert tier._pools[f32].policy.key_space is None
    with _cached(store, "lru", capacity_fraction=0.01, index="dense") as tier:
        assert all(g.policy.key_space is not None for g in tier._pools.values())
    with _cached(store, "lru", capacity_fraction=0.5, index="hash") as tier:
        assert all(g.policy.key_space is None for g in tier._pools.values())
    with pytest.raises(ConfigError, match="index"):
        CacheConfig(capacity_rows=4, index="btree")


def test_empty_batch_through_the_cache(store):
    with _cached(store, "clock") as tier:
        e = np.zeros(0, np.int64)
        out = tier.pool(SparseFeatures.from_lengths(["a", "q"], e, e))
        assert out.shape == (0, 16)
