"""tiermem.stack: tier + cache + prefetcher opened as one, closed in order, unwound on failure."""

from __future__ import annotations

import numpy as np
import pytest

from tiermem.cache import CacheConfig, CachedTier, PrefetchConfig
from tiermem.config import TierConfig
from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures
from tiermem.format import TableSpec, create_random_store, open_store
from tiermem.stack import TierStack, open_stack
from tiermem.tiers import open_tier


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stack") / "s.zarr"
    create_random_store(path, [TableSpec("a", 300, 8), TableSpec("b", 50, 8)], seed=1)
    return path


def _batch(seed: int) -> SparseFeatures:
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 4, 2 * 16)
    vals = np.concatenate([rng.integers(0, 300, int(lens[:16].sum())),
                           rng.integers(0, 50, int(lens[16:].sum()))])
    return SparseFeatures.from_lengths(("a", "b"), vals, lens)


def test_cold_tier_alone(store):
    with open_stack(store, tier=TierConfig(kind="dram")) as st:
        assert st.tier is st.cold and st.cache is None and st.prefetcher is None
        with open_tier(open_store(store), TierConfig(kind="dram")) as ref:
            np.testing.assert_array_equal(st.tier.pool(_batch(0)), ref.pool(_batch(0)))
    assert st.cold._closed


def test_cache_and_prefetcher_closed_in_order(store):
    st = open_stack(open_store(store), tier=TierConfig(kind="ssd", io_threads=2),
                    cache=CacheConfig(policy="lru", capacity_fraction=0.2),
                    prefetch=PrefetchConfig(lookahead=1))
    assert isinstance(st, TierStack) and isinstance(st.tier, CachedTier)
    assert st.cache is st.tier and st.tier.cold is st.cold and st.prefetcher.tier is st.tier
    st.prefetcher.submit(_batch(1))
    st.prefetcher.drain()
    with open_tier(open_store(store), TierConfig(kind="dram")) as ref:
        np.testing.assert_array_equal(st.tier.pool(_batch(1)), ref.pool(_batch(1)))
    assert st.tier.prefetch_counters.issued > 0
    order = []
    for name, obj in (("prefetcher", st.prefetcher), ("cache", st.cache), ("cold", st.cold)):
        close = obj.close
        obj.close = lambda close=close, name=name: (order.append(name), close())[1]
    st.close()
    assert order == ["prefetcher", "cache", "cold"]
    assert not st.prefetcher._thread.is_alive()


def test_a_failing_step_closes_what_was_opened(store, monkeypatch):
    import tiermem.cache.prefetch as prefetch_mod

    opened = []
    real_init = CachedTier.__init__

    def spy(self, cold, cache, **kw):
        real_init(self, cold, cache, **kw)
        opened.append(self)

    monkeypatch.setattr(CachedTier, "__init__", spy)

    class Broken(prefetch_mod.Prefetcher):
        def __init__(self, *a, **kw):
            raise RuntimeError("no thread today")

    monkeypatch.setattr(prefetch_mod, "Prefetcher", Broken)
    with pytest.raises(RuntimeError, match="no thread today"):
        open_stack(store, tier=TierConfig(kind="dram"),
                   cache=CacheConfig(policy="lru", capacity_fraction=0.2),
                   prefetch=PrefetchConfig(lookahead=1))
    (cached,) = opened
    assert cached._closed and cached.cold._closed


def test_prefetch_needs_a_cache(store):
    with pytest.raises(ConfigError, match="prefetch needs a cache"):
        open_stack(store, prefetch=PrefetchConfig(lookahead=1))
