"""Belady OPT: next use, the kernel against a brute-force optimum, key streams."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures
from traces.opt import belady, belady_curve, global_keys, next_use


def naive_next_use(keys):
    n = len(keys)
    out = []
    for i, k in enumerate(keys):
        j = next((j for j in range(i + 1, n) if keys[j] == k), n)
        out.append(j)
    return np.array(out, np.int64)


def brute_force_misses(keys, cap, bypass):
    """Fewest misses over every eviction (and, with bypass, admission) choice."""
    keys = tuple(int(k) for k in keys)

    @functools.cache
    def best(i, cache):
        if i == len(keys):
            return 0
        k = keys[i]
        if k in cache:
            return best(i + 1, cache)
        options = []
        if len(cache) < cap:
            options.append(cache | {k})
        else:
            options += [(cache - {v}) | {k} for v in cache]
        if bypass:
            options.append(cache)
        return 1 + min(best(i + 1, frozenset(c)) for c in options)

    return best(0, frozenset())


def test_doc_example():
    keys = np.array([1, 2, 3, 1, 2, 4, 1])
    assert next_use(keys).tolist() == [3, 4, 7, 6, 7, 7, 7]
    r = belady(keys, 2)
    assert (r.hits, r.misses, r.accesses, r.unique_keys) == (2, 5, 7, 4)
    assert r.miss_ratio == pytest.approx(5 / 7)


@given(st.lists(st.integers(0, 30), max_size=60))
def test_next_use_matches_naive(keys):
    assert next_use(np.array(keys, np.int64)).tolist() == naive_next_use(keys).tolist()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=11), st.integers(1, 3), st.booleans())
def test_belady_is_optimal(keys, cap, bypass):
    r = belady(np.array(keys, np.int64), cap, bypass=bypass)
    assert r.misses == brute_force_misses(keys, cap, bypass)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=200), st.integers(1, 12))
def test_belady_bounds(keys, cap):
    k = np.array(keys, np.int64)
    demand = belady(k, cap)
    bypass = belady(k, cap, bypass=True)
    u = len(set(keys))
    assert u <= bypass.misses <= demand.misses <= len(keys)
    if cap >= u:
        assert demand.misses == u
    # the hit mask agrees with the counts, and a hit is a re-access
    res, mask = belady(k, cap, return_hits=True)
    assert int(mask.sum()) == res.hits
    first = np.zeros(len(keys), bool)
    first[np.unique(k, return_index=True)[1]] = True
    assert not (mask & first).any()


def test_large_keys_and_monotone_curve():
    rng = np.random.default_rng(0)
    keys = rng.zipf(1.3, 20000).astype(np.int64) * (1 << 40)  # sparse, huge ids
    curve = belady_curve(keys, [1, 10, 100, 1000, 10000])
    misses = [r.misses for r in curve]
    assert misses == sorted(misses, reverse=True)
    assert curve[0].misses == belady(keys, 1).misses


def test_bad_input():
    with pytest.raises(ConfigError):
        belady([1, 2], 0)
    with pytest.raises(InvalidBatchError):
        belady(np.array([[1, 2]]), 1)
    with pytest.raises(InvalidBatchError):
        belady(np.array([1.5]), 1)
    assert belady([], 3).accesses == 0


def test_global_keys():
    sf = SparseFeatures.from_tables({"a": ([0, 2, 1], [0, 2, 3]), "b": ([4], [0, 0, 1])})
    k = global_keys([sf, sf], {"a": 3, "b": 5})
    assert k.tolist() == [0, 2, 1, 7, 0, 2, 1, 7]
    with pytest.raises(InvalidBatchError):
        global_keys(sf, [2, 5])  # id 2 of table a is out of range


def test_speed_smoke():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 50000, 500_000)
    belady(keys[:100], 4)  # compile
    t = time.perf_counter()
    r = belady(keys, 5000)
    assert r.misses > 0
    assert time.perf_counter() - t < 5.0
