"""Cache replacement policies: scalar-model equivalence, batch invariants, config errors."""

from __future__ import annotations

import inspect
import re
from collections import OrderedDict, deque

import cachetools
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiermem.cache import (
    CachePolicy,
    Policy,
    StaticPolicy,
    hot_keys,
    make_policy,
)
from tiermem.errors import CapacityError, ConfigError, InvalidBatchError
from tiermem.kernels import policies as kernels

DYNAMIC = ["lru", "lfu", "fifo", "clock", "s3fifo"]
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# scalar models
# --------------------------------------------------------------------------


def cachetools_step(cache: cachetools.Cache, key: int) -> tuple[bool, list[int]]:
    """get-or-set on a cachetools cache; returns (hit, evicted keys)."""
    if key in cache:
        cache[key]  # touch (LRU, LFU)
        return True, []
    evicted = []
    while len(cache) >= cache.maxsize:  # what Cache.__setitem__ does
        evicted.append(cache.popitem()[0])
    cache[key] = None
    return False, evicted


class ClockModel:
    """Second chance over slots 0..C-1 filled in order; new keys enter with ref 0."""

    def __init__(self, capacity: int) -> None:
        self.keys: list[int | None] = [None] * capacity
        self.ref = [0] * capacity
        self.hand = 0
        self.where: dict[int, int] = {}

    def step(self, key: int) -> tuple[bool, list[int]]:
        if key in self.where:
            self.ref[self.where[key]] = 1
            return True, []
        if None in self.keys:
            s = self.keys.index(None)
            self.keys[s] = key
            self.where[key] = s
            return False, []
        while self.ref[self.hand]:
            self.ref[self.hand] = 0
            self.hand = (self.hand + 1) % len(self.keys)
        s = self.hand
        old = self.keys[s]
        assert old is not None
        del self.where[old]
        self.keys[s] = key
        self.ref[s] = 0
        self.where[key] = s
        self.hand = (s + 1) % len(self.keys)
        return False, [old]


class S3FIFOModel:
    """S3-FIFO, Algorithm 1 of Yang et al. (SOSP 2023), one object per slot.

    S target = max(1, round(0.1 * C)); ghost holds C - target keys; moving
    S -> M triggers no extra eviction (the slot budget is shared).
    """

    def __init__(self, capacity: int, small_fraction: float = 0.1) -> None:
        self.c = capacity
        self.s_target = max(1, round(small_fraction * capacity))
        self.small: OrderedDict[int, None] = OrderedDict()  # first = oldest
        self.main: OrderedDict[int, None] = OrderedDict()
        self.ghost: deque[int] = deque(maxlen=max(1, capacity - self.s_target))
        self.freq: dict[int, int] = {}

    def _evict_small(self) -> int | None:
        while self.small:
            t = next(iter(self.small))
            del self.small[t]
            if self.freq[t] > 1:
                self.main[t] = None
            else:
                self.ghost.append(t)
                del self.freq[t]
                return t
        return None

    def _evict_main(self) -> int | None:
        while self.main:
            t = next(iter(self.main))
            del self.main[t]
            if self.freq[t] > 0:
                self.freq[t] -= 1
                self.main[t] = None
            else:
                del self.freq[t]
                return t
        return None

    def step(self, key: int) -> tuple[bool, list[int]]:
        if key in self.freq:
            self.freq[key] = min(self.freq[key] + 1, 3)
            return True, []
        evicted = []
        if len(self.small) + len(self.main) >= self.c:
            if self.small and (len(self.small) >= self.s_target or not self.main):
                v = self._evict_small()
                if v is None:
                    v = self._evict_main()
            else:
                v = self._evict_main()
            assert v is not None
            evicted.append(v)
        if key in self.ghost:
            self.ghost.remove(key)
            self.main[key] = None
        else:
            self.small[key] = None
        self.freq[key] = 0
        return False, evicted


def make_model(name: str, capacity: int):  # type: ignore[no-untyped-def]
    if name == "lru":
        return cachetools.LRUCache(capacity)
    if name == "lfu":
        return cachetools.LFUCache(capacity)
    if name == "fifo":
        return cachetools.FIFOCache(capacity)
    if name == "clock":
        return ClockModel(capacity)
    return S3FIFOModel(capacity)


def model_step(model, key: int):  # type: ignore[no-untyped-def]
    if isinstance(model, cachetools.Cache):
        return cachetools_step(model, key)
    return model.step(key)


# --------------------------------------------------------------------------
# invariants
# --------------------------------------------------------------------------


def check_state(p: CachePolicy) -> None:
    sk = p.slot_keys()
    res = sk[sk >= 0]
    assert len(p) == res.size <= p.capacity
    assert np.unique(res).size == res.size
    if res.size:
        np.testing.assert_array_equal(p.lookup(res), np.flatnonzero(sk >= 0))
    assert p.stats.misses >= 0


def check_result(p: CachePolicy, keys: np.ndarray, before: np.ndarray, r, protected_slots) -> None:  # type: ignore[no-untyped-def]
    """``before``: slot_keys() before the call; ``protected_slots``: pinned/static slots."""
    sk = p.slot_keys()
    resident_before = set(before[before >= 0].tolist())
    np.testing.assert_array_equal(r.hit, np.isin(keys, list(resident_before)))
    ok = r.slots >= 0
    np.testing.assert_array_equal(sk[r.slots[ok]], keys[ok])
    assert np.unique(r.slots[ok]).size == ok.sum()
    # hits keep their slot; a call's own keys are never evicted
    np.testing.assert_array_equal(before[r.slots[r.hit]], keys[r.hit])
    assert not np.isin(r.evicted, keys).any()
    assert not np.isin(r.evicted, sk).any()
    np.testing.assert_array_equal(before[r.evicted_slots], r.evicted)
    assert not np.isin(r.evicted_slots, list(protected_slots)).any()
    # every evicted slot is either reused by this call or free
    for s in r.evicted_slots:
        assert sk[s] == -1 or sk[s] in set(keys.tolist())
    check_state(p)


# --------------------------------------------------------------------------
# scalar-model equivalence, one key per call
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DYNAMIC)
@SETTINGS
@given(data=st.data(), capacity=st.integers(1, 16))
def test_matches_scalar_model(name: str, data: st.DataObject, capacity: int) -> None:
    space = capacity * 2 + 3
    seq = data.draw(st.lists(st.integers(0, space), min_size=1, max_size=200))
    p = make_policy(name, capacity)
    model = make_model(name, capacity)
    for step, key in enumerate(seq):
        r = p.access(np.array([key], np.int64))
        hit, evicted = model_step(model, key)
        assert bool(r.hit[0]) == hit, (step, key)
        assert r.evicted.tolist() == evicted, (step, key)
        assert r.slots[0] >= 0
    assert sorted(p.keys().tolist()) == sorted(
        model.keys() if isinstance(model, cachetools.Cache) else
        (model.where if isinstance(model, ClockModel) else model.freq))
    s = p.stats
    assert s.hits + s.misses == len(seq)
    assert s.misses == s.admissions and s.evictions == s.misses - len(p)


@pytest.mark.parametrize("name", DYNAMIC)
def test_long_zipf_run_matches_model(name: str) -> None:
    rng = np.random.default_rng(1)
    capacity = 64
    seq = np.minimum(rng.zipf(1.2, 20_000), 500)
    p = make_policy(name, capacity)
    model = make_model(name, capacity)
    for key in seq.tolist():
        r = p.access(np.array([key]))
        hit, evicted = model_step(model, key)
        assert bool(r.hit[0]) == hit
        assert r.evicted.tolist() == evicted


def test_lfu_counts_equal_repeated_touches() -> None:
    """LFU: a hit with counts=c equals c touches; a new key starts at c."""
    rng = np.random.default_rng(2)
    cap = 8
    p = make_policy("lfu", cap)
    model = cachetools.LFUCache(cap)
    for _ in range(3000):
        key = int(rng.integers(0, 20))
        c = int(rng.integers(1, 4))
        r = p.access(np.array([key]), np.array([c]))
        hit, evicted = cachetools_step(model, key)
        for _ in range(c - 1):
            model[key]
        assert bool(r.hit[0]) == hit and r.evicted.tolist() == evicted


# --------------------------------------------------------------------------
# batch invariants, pins, static pins
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DYNAMIC)
@pytest.mark.parametrize("admission", [None, "tinylfu"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), capacity=st.integers(1, 24))
def test_random_operations_keep_invariants(name: str, admission: str | None,
                                           data: st.DataObject, capacity: int) -> None:
    p = make_policy(name, capacity, admission=admission)
    pins: dict[int, int] = {}
    space = 3 * capacity + 5
    static_keys = data.draw(st.lists(st.integers(0, space), max_size=capacity - 1, unique=True))
    static_slots = p.pin_static(np.array(static_keys, np.int64))
    static = {int(s): k for s, k in zip(static_slots.tolist(), static_keys, strict=True)}
    accesses = 0
    for _ in range(data.draw(st.integers(1, 25))):
        op = data.draw(st.sampled_from(["access", "access", "insert", "pin", "unpin", "remove"]))
        before = p.slot_keys()
        protected = {s for s, c in pins.items() if c > 0} | set(static)
        if op in ("access", "insert"):
            keys = np.array(data.draw(st.lists(st.integers(0, space), unique=True, max_size=40)),
                            np.int64)
            if op == "access":
                counts = np.array(data.draw(st.lists(st.integers(1, 4), min_size=keys.size,
                                                     max_size=keys.size)), np.int64)
                r = p.access(keys, counts)
                accesses += keys.size
            else:
                r = p.insert(keys)
            check_result(p, keys, before, r, protected)
        elif op == "pin":
            res = np.flatnonzero(before >= 0)
            if res.size:
                chosen = data.draw(st.lists(st.sampled_from(res.tolist()), max_size=5))
                p.pin(np.array(chosen, np.int32))
                for s in chosen:
                    pins[s] = pins.get(s, 0) + 1
        elif op == "unpin":
            held = [s for s, c in pins.items() if c > 0]
            if held:
                s = data.draw(st.sampled_from(held))
                p.unpin(np.array([s], np.int32))
                pins[s] -= 1
        else:
            keys = np.array(data.draw(st.lists(st.integers(0, space), max_size=5)), np.int64)
            keys = keys[~np.isin(keys, list(static.values()))]
            p.remove(keys)
            assert (p.lookup(keys) == -1).all()
        # static keys never move
        sk = p.slot_keys()
        for s, k in static.items():
            assert sk[s] == k
        np.testing.assert_array_equal(p.pin_counts()[list(pins)], list(pins.values()))
        check_state(p)
    s = p.stats
    assert s.hits + s.misses == accesses


@pytest.mark.parametrize("name", DYNAMIC)
def test_own_keys_never_evicted_and_bypass(name: str) -> None:
    p = make_policy(name, 8)
    r = p.access(np.arange(20, dtype=np.int64))
    assert (r.slots[:8] >= 0).all() and (r.slots[8:] == -1).all()
    assert r.evicted.size == 0
    assert p.stats.bypassed == 12 and p.stats.admissions == 8
    # half hits, many misses: hits survive, 4 slots free up for misses
    keys = np.r_[np.arange(4), np.arange(100, 120)]
    before = p.slot_keys()
    r = p.access(keys)
    check_result(p, keys, before, r, set())
    assert r.hit[:4].all() and (r.slots[:4] >= 0).all()
    assert (r.slots[4:8] >= 0).all() and (r.slots[8:] == -1).all()
    assert sorted(r.evicted.tolist()) == [4, 5, 6, 7]


@pytest.mark.parametrize("name", DYNAMIC)
def test_pinned_slots_are_never_evicted(name: str) -> None:
    p = make_policy(name, 6)
    r = p.access(np.arange(6, dtype=np.int64))
    p.pin(r.slots[[0, 2, 4]])
    for start in range(100, 400, 10):
        out = p.access(np.arange(start, start + 10, dtype=np.int64))
        assert not np.isin(out.evicted, [0, 2, 4]).any()
        assert (out.slots >= 0).sum() == 3  # only the 3 unpinned slots turn over
    assert (p.lookup(np.array([0, 2, 4])) == r.slots[[0, 2, 4]]).all()
    p.pin(r.slots[[1, 3, 5]])
    # every slot pinned: every miss bypasses, no error
    out = p.access(np.arange(1000, 1005, dtype=np.int64))
    assert (out.slots == -1).all() and out.evicted.size == 0
    out = p.insert(np.arange(2000, 2003, dtype=np.int64))
    assert (out.slots == -1).all()
    p.unpin(p.lookup(np.arange(1000, 1005)))  # -1 entries are ignored
    p.unpin(r.slots)
    with pytest.raises(InvalidBatchError, match="not pinned"):
        p.unpin(r.slots[[0]])
    assert (p.pin_counts() == 0).all()


@pytest.mark.parametrize("name", DYNAMIC)
def test_hybrid_static_keys_survive_churn(name: str) -> None:
    rng = np.random.default_rng(3)
    hot = np.array([5, 17, 99], np.int64)
    p = make_policy("hybrid", 16, dynamic=name, pinned=hot)
    assert p.name is Policy.HYBRID and p.dynamic is Policy(name) and p.n_static == 3
    slots = p.lookup(hot)
    for _ in range(200):
        keys = np.unique(rng.integers(0, 500, 30))
        rng.shuffle(keys)
        r = p.access(keys)
        check_state(p)
        assert not np.isin(r.evicted, hot).any()
    np.testing.assert_array_equal(p.lookup(hot), slots)
    r = p.access(hot)
    assert r.hit.all()
    # pinning a resident dynamic key keeps its slot
    dyn = p.keys()[~np.isin(p.keys(), hot)][:2]
    np.testing.assert_array_equal(p.pin_static(dyn), p.lookup(dyn))
    assert p.n_static == 5
    p.remove(hot[:1])
    assert p.n_static == 4 and p.lookup(hot[:1])[0] == -1


def test_static_policy() -> None:
    p = make_policy("static", 4, pinned=np.array([1, 2, 3, 4]))
    assert isinstance(p, StaticPolicy) and p.name is Policy.STATIC
    r = p.access(np.array([1, 9, 4, 10]))
    np.testing.assert_array_equal(r.hit, [True, False, True, False])
    assert (r.slots[[1, 3]] == -1).all() and r.evicted.size == 0
    assert p.stats.hits == 2 and p.stats.misses == 2 and p.stats.bypassed == 2
    assert len(p) == 4
    with pytest.raises(CapacityError, match="at most 4"):
        p.pin_static(np.array([11]))


def test_pin_static_budget() -> None:
    p = make_policy("lru", 4)
    with pytest.raises(CapacityError, match="one slot stays dynamic"):
        p.pin_static(np.arange(4))
    assert p.n_static == 0 and len(p) == 0  # checked before any change
    slots = p.pin_static(np.array([7, 8, 7, 9]))  # repeats share a slot
    assert slots[0] == slots[2] and p.n_static == 3
    with pytest.raises(CapacityError):
        make_policy("hybrid", 2, pinned=np.array([1, 2]))


# --------------------------------------------------------------------------
# admission
# --------------------------------------------------------------------------


def _zipf_scan_trace(rng: np.random.Generator, n_batches: int) -> list[np.ndarray]:
    batches = []
    scan_next = 1_000_000
    for b in range(n_batches):
        hot = np.minimum(rng.zipf(1.1, 200), 2000)
        if b % 2:  # a scan of one-hit wonders
            hot = np.r_[hot, np.arange(scan_next, scan_next + 300)]
            scan_next += 300
        u, first = np.unique(hot, return_index=True)
        batches.append(u[np.argsort(first)].astype(np.int64))
    return batches


@pytest.mark.parametrize("name", ["lru", "fifo", "clock", "s3fifo"])
def test_tinylfu_resists_scans(name: str) -> None:
    batches = _zipf_scan_trace(np.random.default_rng(4), 400)
    rates = {}
    for admission in (None, "tinylfu"):
        p = make_policy(name, 200, admission=admission)
        for keys in batches:
            p.access(keys)
        check_state(p)
        rates[admission] = p.stats.hit_rate
        if admission:
            assert p.stats.rejected > 0
            s = p.stats
            assert s.misses == s.admissions + s.rejected + s.bypassed
    assert rates["tinylfu"] > rates[None] + 0.02, rates


def test_tinylfu_admits_into_free_slots() -> None:
    p = make_policy("lru", 8, admission="tinylfu")
    r = p.access(np.arange(8))
    assert (r.slots >= 0).all() and p.stats.rejected == 0


# --------------------------------------------------------------------------
# LFU aging, insert, stats, lookup
# --------------------------------------------------------------------------


def test_lfu_aging_lets_old_favourites_go() -> None:
    # with aging the old favourite ages out; without, it stays
    p0 = make_policy("lfu", 4)
    p1 = make_policy("lfu", 4, lfu_aging_period=40)
    for p in (p0, p1):
        p.access(np.array([0]), np.array([64]))
        for i in range(1, 60):
            p.access(np.array([i, i + 1000, i + 2000]), np.array([2, 2, 2]))
    assert 0 in p0.keys().tolist()
    assert 0 not in p1.keys().tolist()


@pytest.mark.parametrize("name", DYNAMIC)
def test_insert_is_prefetch(name: str) -> None:
    p = make_policy(name, 4)
    p.access(np.array([1, 2]))
    r = p.insert(np.array([2, 3, 4]))
    np.testing.assert_array_equal(r.hit, [True, False, False])
    assert (r.slots >= 0).all()
    s = p.stats
    assert (s.hits, s.misses, s.admissions) == (0, 2, 4)
    r = p.insert(np.array([5, 6, 7, 8, 9]))  # 4 slots, own keys protected
    assert (r.slots >= 0).sum() == 4 and r.slots[-1] == -1
    np.testing.assert_array_equal(np.sort(p.keys()), [5, 6, 7, 8])


def test_lookup_is_a_peek() -> None:
    p = make_policy("lru", 2)
    p.access(np.array([1]))
    p.access(np.array([2]))
    assert p.lookup(np.array([1, 1, 3]))[2] == -1  # repeats allowed, no touch
    r = p.access(np.array([3]))
    assert r.evicted.tolist() == [1]  # 1 stayed least recent


def test_stats_and_reset() -> None:
    p = make_policy("clock", 3)
    p.access(np.array([1, 2, 3, 4]))
    p.access(np.array([1, 5]))
    s = p.stats
    assert s.accesses == 6 and s.hits == 1 and s.bypassed == 1
    assert s.misses == s.admissions + s.rejected + s.bypassed
    assert s.to_dict()["evictions"] == s.evictions == 1
    p.reset_stats()
    assert p.stats.accesses == 0 and len(p) == 3


# --------------------------------------------------------------------------
# validation and configuration
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DYNAMIC)
def test_repeated_keys_are_rejected(name: str) -> None:
    p = make_policy(name, 4)
    p.access(np.array([1]))
    with pytest.raises(InvalidBatchError, match="Key 1 repeats"):
        p.access(np.array([1, 2, 1]))
    with pytest.raises(InvalidBatchError, match="Key 3 repeats"):
        p.access(np.array([3, 2, 3]))
    check_state(p)
    assert sorted(p.keys().tolist()) == [1, 2, 3]


def test_bad_batches() -> None:
    p = make_policy("lru", 4)
    with pytest.raises(InvalidBatchError, match=">= 0"):
        p.access(np.array([1, -2]))
    with pytest.raises(InvalidBatchError, match="integer"):
        p.access(np.array([1.5]))
    with pytest.raises(InvalidBatchError, match="1-D"):
        p.access(np.zeros((2, 2), np.int64))
    with pytest.raises(InvalidBatchError, match="counts"):
        p.access(np.array([1, 2]), np.array([1]))
    with pytest.raises(InvalidBatchError, match="counts >= 1"):
        p.access(np.array([1, 2]), np.array([1, 0]))
    with pytest.raises(InvalidBatchError, match="capacity"):
        p.pin(np.array([4]))
    r = p.access(np.array([], np.int64))
    assert r.slots.size == 0 and r.evicted.size == 0
    assert isinstance(InvalidBatchError("x"), ValueError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "lru", "capacity": 0}, "capacity >= 1"),
        ({"name": "lru", "capacity": -3}, "capacity >= 1"),
        ({"name": "lru", "capacity": 2.5}, "integer capacity"),
        ({"name": "arc", "capacity": 4}, "Unknown policy 'arc'"),
        ({"name": "s3fifo", "capacity": 4, "s3fifo_small_fraction": 0.0}, "small_fraction"),
        ({"name": "s3fifo", "capacity": 4, "s3fifo_small_fraction": 1.5}, "small_fraction"),
        ({"name": "lfu", "capacity": 4, "lfu_aging_period": -1}, "aging_period"),
        ({"name": "lru", "capacity": 4, "admission": "bloom"}, "admission"),
        ({"name": "static", "capacity": 4, "admission": "tinylfu"}, "admission"),
        ({"name": "hybrid", "capacity": 4, "dynamic": "static"}, "dynamic policy"),
        ({"name": "hybrid", "capacity": 4, "dynamic": "nope"}, "Unknown dynamic policy"),
        ({"name": "lru", "capacity": 4, "pinned": np.array([1])}, "pinned="),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=match):
        make_policy(**kwargs)


def test_make_policy_names() -> None:
    for name in Policy:
        p = make_policy(name, 8)
        assert p.name is name and p.capacity == 8
    assert make_policy("LRU", 3).name is Policy.LRU
    assert make_policy("hybrid", 3).dynamic is Policy.LRU


def test_hot_keys() -> None:
    stream = np.array([5, 1, 5, 2, 5, 1, 9, 9, 9, 9, 3])
    np.testing.assert_array_equal(hot_keys(stream, 2), [9, 5])
    np.testing.assert_array_equal(hot_keys(stream, 3), [9, 5, 1])
    np.testing.assert_array_equal(hot_keys(stream, 100), [9, 5, 1, 2, 3])
    assert hot_keys(stream, 0).size == 0
    with pytest.raises(ConfigError):
        hot_keys(stream, -1)
    # ties at the cut-off go to the smaller key, whatever argpartition does
    np.testing.assert_array_equal(hot_keys(np.array([4, 3, 2, 1]), 2), [1, 2])


def test_kernels_take_flags_from_flags_module() -> None:
    src = inspect.getsource(kernels)
    decorators = re.findall(r"^@njit.*$", src, flags=re.M)
    assert decorators
    assert all(d.startswith("@njit(**SERIAL") or d == "@njit(**PARALLEL)"
               for d in decorators), decorators
    # the one parallel kernel: a batch of hits under order-free policies
    assert re.findall(r"^@njit\(\*\*PARALLEL\)\ndef (\w+)", src, flags=re.M) == [
        "cache_resolve_resident"]
    assert "import numba\n" not in src
