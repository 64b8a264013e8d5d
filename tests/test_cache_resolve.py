"""The cache's one-pass batch step (``CachePolicy.resolve``) against ``access``.

``resolve`` takes a key-major batch straight from its ids and must leave
every policy in exactly the state ``access(uniq, counts)`` of the batch's
distinct keys (first-occurrence order) leaves it, with the same hits,
slots, evictions and counters: the tuner simulates with ``access``, the
cache serves with ``resolve``, and their hit counts must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiermem.cache import make_policy
from tiermem.cache.policy import BatchScratch
from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.kernels import policies as kernels
from tiermem.kernels.dedupe import dedupe_first, offset_ids

POLICIES = ["lru", "lfu", "fifo", "clock", "s3fifo", "static", "hybrid"]
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _pair(name: str, cap: int, admission: str | None, dense: bool, key_space: int):
    kw = {"admission": admission} if name != "static" else {}
    a, b = make_policy(name, cap, **kw), make_policy(name, cap, **kw)
    if dense:
        a.use_dense_index(key_space)
        b.use_dense_index(key_space)
    return a, b


def _state(p) -> list[np.ndarray]:
    st_ = p._st
    return [st_.idx, st_.node, st_.work[kernels.W_FREE], st_.work[kernels.W_REF], st_.ghost,
            st_.gidx, st_.sketch,
            st_.sc]


@st.composite
def scenarios(draw):
    tables = draw(st.integers(1, 3))
    rows = draw(st.lists(st.integers(1, 40), min_size=tables, max_size=tables))
    cap = draw(st.integers(1, max(1, sum(rows) - 1)))
    batches = []
    for _ in range(draw(st.integers(1, 6))):
        bsz = draw(st.integers(0, 6))
        vals, lens = [], []
        for r in rows:
            for _ in range(bsz):
                n = draw(st.integers(0, 5))
                lens.append(n)
                vals += draw(st.lists(st.integers(0, r - 1), min_size=n, max_size=n))
        batches.append((bsz, np.asarray(vals, np.int64), np.asarray(lens, np.int64)))
    return rows, cap, batches


@SETTINGS
@given(scenarios(), st.sampled_from(POLICIES), st.sampled_from([None, "tinylfu"]),
       st.booleans(), st.booleans())
def test_resolve_equals_access(scn, name, admission, dense, pin_some):
    rows, cap, batches = scn
    if name == "static" and admission is not None:
        admission = None
    base = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    key_space = int(sum(rows))
    ref, fast = _pair(name, cap, admission, dense, key_space)
    if pin_some and name in ("static", "hybrid") and cap > 1:
        hot = np.arange(min(cap - 1, key_space) if name == "hybrid" else min(cap, key_space))
        ref.pin_static(hot)
        fast.pin_static(hot)
    sc = BatchScratch()
    for bsz, vals, lens in batches:
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        gids = offset_ids(vals, offsets, bsz, base)
        uniq, inverse, counts = dedupe_first(gids)
        want = ref.access(uniq, counts)
        cap_slots = fast.capacity
        ready = np.ones(cap_slots, bool)
        pre = np.zeros(cap_slots, bool)
        sc.ensure(vals.size, len(rows))
        nu, nm, nev, nwait, _ = fast.resolve(vals, offsets, bsz, base, ready, pre, sc)
        assert nwait == 0
        assert nu == int(want.hit.sum()) and nm == int((~want.hit).sum())
        # the slot of every lookup, misses that bypassed excepted
        ls = sc.lookup_slot[:vals.size]
        want_ls = want.slots[inverse].astype(np.int64)
        kept = want_ls >= 0
        np.testing.assert_array_equal(ls[kept], want_ls[kept])
        assert (ls[~kept] < 0).all()
        np.testing.assert_array_equal(sc.ev_keys[:nev], want.evicted)
        np.testing.assert_array_equal(sc.ev_slots[:nev], want.evicted_slots)
        # per-table counters: distinct hits, distinct misses, hit lookups
        table_of = np.searchsorted(np.cumsum(rows), uniq, side="right")
        for t in range(len(rows)):
            m = table_of == t
            assert sc.tstats[t, 0] == int(want.hit[m].sum())
            assert sc.tstats[t, 1] == int((~want.hit[m]).sum())
            assert sc.tstats[t, 2] == int(counts[m & want.hit].sum())
        # admitted misses come back pinned once; the rest of the state is equal
        fast.unpin(sc.miss_slots())
        for x, y in zip(_state(ref), _state(fast), strict=True):
            np.testing.assert_array_equal(x, y)
        assert ref.stats == fast.stats


def test_resolve_reports_not_ready_and_prefetched_hits():
    p = make_policy("lru", 8)
    p.access(np.arange(4))
    ready = np.ones(8, bool)
    pre = np.zeros(8, bool)
    slots = p.lookup(np.arange(4))
    ready[slots[1]] = False
    pre[slots[2]] = True
    sc = BatchScratch()
    vals = np.array([0, 1, 2, 2, 9], np.int64)
    offsets = np.array([0, 5], np.int64)
    sc.ensure(5, 1)
    nu, nm, nev, nwait, useful = p.resolve(vals, offsets, 1, np.zeros(1, np.int64), ready, pre,
                                           sc)
    assert (nu, nm, nev, nwait, useful) == (3, 1, 0, 1, 1)
    assert not pre.any()
    # with the checks off the flags are not read
    sc.ensure(5, 1)
    pre[slots[2]] = True
    out = p.resolve(vals, offsets, 1, np.zeros(1, np.int64), ready, pre, sc,
                    check_ready=False, check_prefetched=False)
    assert out[3] == 0 and out[4] == 0 and pre[slots[2]]


def test_dense_index_refuses_keys_outside_its_space():
    p = make_policy("clock", 4)
    p.use_dense_index(10)
    p.access(np.array([1, 9]))
    with pytest.raises(InvalidBatchError, match="keys < 10"):
        p.access(np.array([10]))
    with pytest.raises(ConfigError, match="must be empty"):
        p.use_dense_index(20)
    with pytest.raises(ConfigError, match="key space"):
        make_policy("lru", 4).use_dense_index(0)


def _replay(name, cap, dense, key_space, warm_batches):
    p = make_policy(name, cap, **({"dynamic": "clock"} if name == "hybrid" else {}))
    if dense:
        p.use_dense_index(key_space)
    if name == "hybrid" and cap > 2:
        p.pin_static(np.arange(min(2, key_space)))
    for keys in warm_batches:
        uniq, _, counts = dedupe_first(keys)
        p.access(uniq, counts)
    return p


@SETTINGS
@given(scenarios(), st.sampled_from(["clock", "fifo", "hybrid"]), st.booleans(),
       st.integers(0, 2**32 - 1), st.booleans())
def test_parallel_resolve_of_hits_equals_resolve(scn, name, dense, seed, with_miss):
    """The parallel pass for batches of hits leaves the state of ``resolve`` exactly; when
    a lookup misses it gives up, and ``resolve`` after it lands in the same state."""
    rows, cap, batches = scn
    rng = np.random.default_rng(seed)
    base = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    key_space = int(sum(rows))
    warm = [offset_ids(v, np.concatenate([[0], np.cumsum(ln)]).astype(np.int64), b, base)
            for b, v, ln in batches]
    ref = _replay(name, cap, dense, key_space, warm)
    fast = _replay(name, cap, dense, key_space, warm)
    resident = ref.keys()
    if resident.size == 0:
        return
    # a batch of resident keys (repeats included), maybe one key that is not
    bsz = int(rng.integers(1, 5))
    table_of = np.searchsorted(np.cumsum(rows), resident, side="right")
    vals, lens = [], []
    for t in range(len(rows)):
        mine = resident[table_of == t] - base[t]
        for _ in range(bsz):
            n = int(rng.integers(0, 4)) if mine.size else 0
            lens.append(n)
            vals += list(rng.choice(mine, n)) if n else []
    if with_miss and resident.size < key_space:
        absent = np.setdiff1d(np.arange(key_space), resident)
        k = int(rng.choice(absent))
        t = int(np.searchsorted(np.cumsum(rows), k, side="right"))
        pos = int(sum(lens[:(t + 1) * bsz]))
        vals.insert(pos, k - int(base[t]))
        lens[(t + 1) * bsz - 1] += 1
    vals = np.asarray(vals, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ready = np.ones(cap, bool)
    pre_ref = rng.random(cap) < 0.3
    pre_fast = pre_ref.copy()
    sr, sf = BatchScratch(), BatchScratch()
    sr.ensure(vals.size, len(rows))
    sf.ensure(vals.size, len(rows))
    want = ref.resolve(vals, offsets, bsz, base, ready, pre_ref, sr)
    ok, nu, useful = fast.resolve_resident(vals, offsets, bsz, base, ready, pre_fast, sf)
    if ok:
        assert want[1] == 0 and nu == want[0] and useful == want[4]
        np.testing.assert_array_equal(sf.lookup_slot[:vals.size], sr.lookup_slot[:vals.size])
        np.testing.assert_array_equal(sf.tstats, sr.tstats)
        # the parallel pass marks its batch in a compact row of its own, not in the slot
        # lines; a call's marks mean nothing once the next call's epoch begins
        for p in (ref, fast):
            p._st.node[:, kernels.N_MARK] = 0
    else:
        assert want[1] > 0
        again = fast.resolve(vals, offsets, bsz, base, ready, pre_fast, sf)
        assert again[:4] == want[:4] and useful + again[4] == want[4]
        np.testing.assert_array_equal(sf.tstats, sr.tstats)
        fast.unpin(sf.miss_slots())
        ref.unpin(sr.miss_slots())
        # the pass that gave up used an epoch of its own: equal up to the epoch's value
        # (the same slots carry the latest call's mark)
        for p in (ref, fast):
            node, sc = p._st.node, p._st.sc
            node[:, kernels.N_MARK] = node[:, kernels.N_MARK] == sc[kernels.M_EPOCH]
            sc[kernels.M_EXHAUSTED] = sc[kernels.M_EXHAUSTED] == sc[kernels.M_EPOCH]
            sc[kernels.M_EPOCH] = 0
    np.testing.assert_array_equal(pre_fast, pre_ref)
    for x, y in zip(_state(ref), _state(fast), strict=True):
        np.testing.assert_array_equal(x, y)
    assert ref.stats == fast.stats


@pytest.mark.parametrize("name", ["clock", "fifo"])
def test_parallel_resolve_of_a_large_batch_across_chunks(name):
    rows = (30_000, 5)
    base = np.array([0, rows[0]], np.int64)
    ref, fast = (make_policy(name, sum(rows)) for _ in range(2))
    keys = np.arange(sum(rows), dtype=np.int64)
    ref.access(keys)
    fast.access(keys)
    rng = np.random.default_rng(0)
    B = 9000  # table 0 spans three chunks of the parallel pass
    vals = np.concatenate([rng.integers(0, r, B * 2) for r in rows]).astype(np.int64)
    offsets = np.arange(0, vals.size + 1, 2, dtype=np.int64)
    sr, sf = BatchScratch(), BatchScratch()
    sr.ensure(vals.size, 2)
    sf.ensure(vals.size, 2)
    flags = np.ones(ref.capacity, bool), np.zeros(ref.capacity, bool)
    want = ref.resolve(vals, offsets, B, base, *flags, sr)
    ok, nu, _ = fast.resolve_resident(vals, offsets, B, base, *flags, sf)
    assert ok and nu == want[0] and want[1] == 0
    np.testing.assert_array_equal(sf.lookup_slot[:vals.size], sr.lookup_slot[:vals.size])
    np.testing.assert_array_equal(sf.tstats, sr.tstats)
    for p in (ref, fast):
        p._st.node[:, kernels.N_MARK] = 0
    for x, y in zip(_state(ref), _state(fast), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ConfigError, match="order-dependent"):
        make_policy("lru", 4).resolve_resident(vals, offsets, B, base, *flags, sf)
