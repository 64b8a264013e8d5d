"""Cache replacement kernels: the key -> slot hash index and every policy.

One state, many policies
------------------------
A policy's whole state is a :class:`PolicyState` of seven NumPy arrays.
Every public method of :class:`tiermem.cache.CachePolicy` makes exactly one
kernel call below; the policy is chosen inside the kernel by the integer code
``sc[Q_POLICY]`` (kernel-internal only: the public API uses the
:class:`tiermem.cache.Policy` enum). Arrays a policy does not use are tiny
placeholders.

::

    idx    int64[H, 2]     open-addressing index, H = 2**bits >= 2 * capacity:
                           idx[h] = (key, slot), key -1 = empty. Linear probing,
                           backward-shift deletion (no tombstones).
           or int64[K, 1]  dense index over a known key space 0..K-1 (a cache
                           over a store: K = the rows it caches): idx[key, 0] =
                           slot or -1. One line per probe and no probing chain:
                           chosen when it costs at most a few times the hash.
    node   int64[C + 2, 8] one 64-byte line per slot (rows C, C + 1: list sentinels)
             N_KEY    key held (-1 = free)
             N_MARK   epoch of the last call that hit/filled the slot
                      (== current epoch: protected for the rest of the call)
             N_PREV   list links (LRU, FIFO, S3-FIFO); nxt[sentinel] = oldest
             N_NEXT   (eviction end), prev[sentinel] = newest. Sentinel C: the
                      LRU/FIFO list or S3 small queue; C + 1: the S3 main queue.
             N_HPOS   LFU (= N_PREV): position in the heap, -1 = not in it
             N_SEQ    LFU (= N_NEXT): stamp of the moment the key entered its count
             N_PINS   in-flight pin count (never evicted while > 0)
             N_FLAGS  F_STATIC (statically pinned), F_INM (S3: in main queue)
             N_REF    S3-FIFO frequency (0..3); CLOCK's reference bit is work[W_REF]
             N_CNT    LFU use count
    work   int32[3, C]     row W_FREE: stack of free slots (sc[M_NFREE] of them);
                           row W_ASIDE: entries lifted out of a queue during a call;
                           row W_HEAP: LFU binary min-heap of slots keyed (cnt, seq)
    ghost  int64[2 * G]    S3-FIFO ghost FIFO of at most G keys, a ring (-1 = hole)
    gidx   int64[GH, 2]    S3-FIFO ghost membership index (key -> ring position)
    sketch uint8[4 * W]    TinyLFU count-min sketch: 4 rows of W = 2**skbits counters
    sc     int64[48]       scalars: mutable M_* (0..15), constants Q_* (16..31),
                           counters S_* (32..39)

Keeping a slot's fields on one cache line matters here: the victim and the
touched slots are random memory, and a dependent DRAM load costs ~300 ns on
the machines this runs on. Helpers take arrays, never the state tuple:
every attribute read of a tuple of arrays inside a loop costs Numba a
reference count increment and decrement.

Protection during a call
------------------------
Every mutating call bumps ``sc[M_EPOCH]``; a slot hit or filled by the call
gets ``mark = epoch`` and cannot be evicted until the call ends, nor can a
slot with ``pins > 0``. When a victim search meets such a slot at the
eviction end of a queue (or the top of the LFU heap) it lifts it aside and
goes on; at the end of the call the lifted entries are put back exactly where
they were (queues) or re-pushed (heap, whose order depends only on
``(cnt, seq)``). So each protected entry costs O(1) (O(log n) for LFU) per
call, and the policy's order is the one it would have had without
protection. If no victim is found the call notes it (``sc[M_EXHAUSTED]``)
and every later miss of the call bypasses at once: protection only grows
within a call.

Kernels hold no hidden state and never raise: errors come back as codes that
the Python wrappers in :mod:`tiermem.cache.policy` turn into exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from numba import njit, prange, typeof

from tiermem.kernels._flags import PARALLEL, SERIAL
from tiermem.kernels._intrinsics import atomic_exchange_2d, prefetch_row

__all__ = [
    "F_INM",
    "F_STATIC",
    "M_EPOCH",
    "M_EXHAUSTED",
    "M_NFREE",
    "M_NSTATIC",
    "M_STARGET",
    "N_COLS",
    "N_KEY",
    "N_PINS",
    "N_FLAGS",
    "N_NEXT",
    "N_PREV",
    "N_HPOS",
    "P_CLOCK",
    "P_FIFO",
    "P_LFU",
    "P_LRU",
    "P_NONE",
    "P_S3FIFO",
    "Q_AGING",
    "Q_BITS",
    "Q_DYNAMIC",
    "Q_GBITS",
    "Q_GCAP",
    "Q_POLICY",
    "Q_SEED",
    "Q_SKBITS",
    "Q_SKRESET",
    "Q_TINYLFU",
    "SC_SIZE",
    "S_ADMISSIONS",
    "S_BYPASSED",
    "S_EVICTIONS",
    "S_HITS",
    "S_MISSES",
    "S_REJECTED",
    "W_FREE",
    "FastCall",
    "PolicyState",
    "cache_resolve",
    "policy_access",
    "policy_insert",
    "policy_lookup",
    "policy_pin",
    "policy_pin_static",
    "policy_remove",
    "policy_unpin",
]

# Policy codes (kernel-internal).
P_NONE = 0  # static-only: no dynamic admission
P_LRU = 1
P_FIFO = 2
P_LFU = 3
P_CLOCK = 4
P_S3FIFO = 5

# node columns
N_KEY = 0
N_MARK = 1
N_PREV = 2
N_NEXT = 3
N_HPOS = 2  # LFU has no list: reuses N_PREV
N_SEQ = 3  # LFU: reuses N_NEXT
N_PINS = 4
N_FLAGS = 5
N_REF = 6
N_CNT = 7
N_COLS = 8

# work rows
W_FREE = 0
W_ASIDE = 1
W_HEAP = 2
W_REF = 3  # CLOCK reference bit, 4 bytes a slot (not in the slot's 64-byte line)
W_RMARK = 4  # cache_resolve_resident's batch mark (the low 31 bits of the epoch)
W_ROWS = 5

# sc[]: mutable scalars
M_EPOCH = 0
M_NFREE = 1
M_HAND = 2  # CLOCK hand
M_SEQ = 3  # LFU stamp counter
M_SSIZE = 4  # S3-FIFO small queue length (entries in the list)
M_MSIZE = 5  # S3-FIFO main queue length
M_HSIZE = 6  # LFU heap size
M_GHEAD = 7  # S3-FIFO ghost ring head (next write)
M_AGE = 8  # LFU: accesses since the last halving
M_SKADD = 9  # TinyLFU: additions since the last halving
M_NSTATIC = 10
M_STARGET = 11  # S3-FIFO small queue target length
M_NASIDE = 12
M_EXHAUSTED = 13  # epoch of the call that found no evictable slot
M_GTAIL = 14  # S3-FIFO ghost ring tail (oldest)
M_GLIVE = 15  # S3-FIFO live ghost keys
# sc[]: constants
Q_POLICY = 16
Q_BITS = 17  # index bits: H = 2**bits
Q_AGING = 18  # LFU aging period (0 = never)
Q_TINYLFU = 19
Q_SKBITS = 20
Q_SKRESET = 21  # TinyLFU sample size: halve every so many additions
Q_GBITS = 22
Q_GCAP = 23  # ghost ring length
Q_DYNAMIC = 24  # 0: static-only (every non-pinned key bypasses)
Q_SEED = 25
# sc[]: counters
S_HITS = 32
S_MISSES = 33
S_ADMISSIONS = 34
S_EVICTIONS = 35
S_REJECTED = 36
S_BYPASSED = 37
SC_SIZE = 48

F_STATIC = 1
F_INM = 2

_SK_MAX = 15  # 4-bit saturating counters, as in Caffeine's FrequencySketch
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_PF = 16  # prefetch distance (keys ahead)

# _place() outcomes
_ADMITTED = 0
_REJECTED = 1
_BYPASSED = 2


class PolicyState(NamedTuple):
    """All arrays of one policy (see the module docstring for the layout)."""

    idx: np.ndarray
    node: np.ndarray
    work: np.ndarray
    ghost: np.ndarray
    gidx: np.ndarray
    sketch: np.ndarray
    sc: np.ndarray


# --------------------------------------------------------------------------
# hash index: linear probing, backward-shift deletion
# --------------------------------------------------------------------------


@njit(**SERIAL, inline="always")
def _home(key, bits):
    # Fibonacci hashing: consecutive row ids spread over the whole table.
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(64 - bits))


@njit(**SERIAL, inline="always")
def _line(idx, bits, key):
    """The index row ``key`` is found at first: to prefetch it."""
    if idx.shape[1] == 1:
        return np.int64(key)
    return _home(key, bits)


@njit(**SERIAL, inline="always")
def _idx_find(idx, bits, key):
    if idx.shape[1] == 1:  # dense: idx[key, 0] = slot
        return idx[key, 0]
    mask = (np.int64(1) << bits) - 1
    i = _home(key, bits)
    while True:
        k = idx[i, 0]
        if k == key:
            return idx[i, 1]
        if k == -1:
            return np.int64(-1)
        i = (i + 1) & mask


@njit(**SERIAL, inline="always")
def _idx_insert(idx, bits, key, val):
    # ``key`` must be absent.
    if idx.shape[1] == 1:
        idx[key, 0] = val
        return
    mask = (np.int64(1) << bits) - 1
    i = _home(key, bits)
    while idx[i, 0] != -1:
        i = (i + 1) & mask
    idx[i, 0] = key
    idx[i, 1] = val


@njit(**SERIAL, inline="always")
def _idx_delete(idx, bits, key):
    if idx.shape[1] == 1:
        if idx[key, 0] == -1:
            return False
        idx[key, 0] = -1
        return True
    mask = (np.int64(1) << bits) - 1
    i = _home(key, bits)
    while True:
        k = idx[i, 0]
        if k == key:
            break
        if k == -1:
            return False
        i = (i + 1) & mask
    # Backward shift: pull later entries of the cluster into the hole when
    # the hole lies on their probe path (their home is at or before it).
    j = i
    while True:
        j = (j + 1) & mask
        k = idx[j, 0]
        if k == -1:
            break
        h = _home(k, bits)
        if ((j - h) & mask) >= ((j - i) & mask):
            idx[i, 0] = k
            idx[i, 1] = idx[j, 1]
            i = j
    idx[i, 0] = -1
    return True


# --------------------------------------------------------------------------
# TinyLFU count-min sketch
# --------------------------------------------------------------------------


@njit(**SERIAL, inline="always")
def _mix(x):
    # splitmix64 finalizer
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(**SERIAL, inline="always")
def _sk_add(sketch, sc, key, c):
    w = np.int64(1) << sc[Q_SKBITS]
    mask = np.uint64(w - 1)
    h1 = _mix(np.uint64(key) ^ np.uint64(sc[Q_SEED]))
    h2 = _mix(h1) | np.uint64(1)
    for r in range(4):
        j = r * w + np.int64((h1 + np.uint64(r) * h2) & mask)
        v = np.int64(sketch[j]) + c
        sketch[j] = _SK_MAX if v > _SK_MAX else v
    sc[M_SKADD] += c
    if sc[M_SKADD] >= sc[Q_SKRESET]:
        # TinyLFU reset: halve every counter.
        for j in range(sketch.size):
            sketch[j] = sketch[j] >> 1
        sc[M_SKADD] //= 2


@njit(**SERIAL, inline="always")
def _sk_est(sketch, sc, key):
    w = np.int64(1) << sc[Q_SKBITS]
    mask = np.uint64(w - 1)
    h1 = _mix(np.uint64(key) ^ np.uint64(sc[Q_SEED]))
    h2 = _mix(h1) | np.uint64(1)
    est = np.int64(_SK_MAX)
    for r in range(4):
        v = np.int64(sketch[r * w + np.int64((h1 + np.uint64(r) * h2) & mask)])
        if v < est:
            est = v
    return est


# --------------------------------------------------------------------------
# linked lists and the LFU heap (all in ``node`` / ``work``)
# --------------------------------------------------------------------------


@njit(**SERIAL, inline="always")
def _l_unlink(node, s):
    p = node[s, N_PREV]
    n = node[s, N_NEXT]
    node[p, N_NEXT] = n
    node[n, N_PREV] = p


@njit(**SERIAL, inline="always")
def _l_push_back(node, sent, s):
    # newest end
    p = node[sent, N_PREV]
    node[p, N_NEXT] = s
    node[s, N_PREV] = p
    node[s, N_NEXT] = sent
    node[sent, N_PREV] = s


@njit(**SERIAL, inline="always")
def _l_push_front(node, sent, s):
    # oldest (eviction) end
    n = node[sent, N_NEXT]
    node[n, N_PREV] = s
    node[s, N_NEXT] = n
    node[s, N_PREV] = sent
    node[sent, N_NEXT] = s


@njit(**SERIAL, inline="always")
def _h_less(node, a, b):
    ca = node[a, N_CNT]
    cb = node[b, N_CNT]
    return ca < cb or (ca == cb and node[a, N_SEQ] < node[b, N_SEQ])


@njit(**SERIAL, inline="always")
def _h_up(node, work, p):
    s = work[W_HEAP, p]
    while p > 0:
        q = (p - 1) >> 1
        t = work[W_HEAP, q]
        if _h_less(node, s, t):
            work[W_HEAP, p] = t
            node[t, N_HPOS] = p
            p = q
        else:
            break
    work[W_HEAP, p] = s
    node[s, N_HPOS] = p


@njit(**SERIAL, inline="always")
def _h_down(node, work, n, p):
    s = work[W_HEAP, p]
    while True:
        c = 2 * p + 1
        if c >= n:
            break
        if c + 1 < n and _h_less(node, work[W_HEAP, c + 1], work[W_HEAP, c]):
            c += 1
        t = work[W_HEAP, c]
        if _h_less(node, t, s):
            work[W_HEAP, p] = t
            node[t, N_HPOS] = p
            p = c
        else:
            break
    work[W_HEAP, p] = s
    node[s, N_HPOS] = p


@njit(**SERIAL, inline="always")
def _h_push(node, work, sc, s):
    n = sc[M_HSIZE]
    work[W_HEAP, n] = s
    node[s, N_HPOS] = n
    sc[M_HSIZE] = n + 1
    _h_up(node, work, n)


@njit(**SERIAL, inline="always")
def _h_remove(node, work, sc, s):
    p = node[s, N_HPOS]
    if p < 0:
        return
    n = sc[M_HSIZE] - 1
    sc[M_HSIZE] = n
    node[s, N_HPOS] = -1
    if p != n:
        last = work[W_HEAP, n]
        work[W_HEAP, p] = last
        node[last, N_HPOS] = p
        _h_down(node, work, n, p)
        _h_up(node, work, node[last, N_HPOS])


# --------------------------------------------------------------------------
# S3-FIFO ghost queue
# --------------------------------------------------------------------------


@njit(**SERIAL, inline="always")
def _idx_update(idx, bits, key, val):
    # ``key`` must be present.
    if idx.shape[1] == 1:
        idx[key, 0] = val
        return
    mask = (np.int64(1) << bits) - 1
    i = _home(key, bits)
    while idx[i, 0] != key:
        i = (i + 1) & mask
    idx[i, 1] = val


@njit(**SERIAL, inline="always")
def _ghost_add(ghost, gidx, sc, key):
    # The ghost is a FIFO of at most Q_GCAP live keys in a ring of 2 * Q_GCAP
    # entries between M_GTAIL (oldest) and M_GHEAD; keys taken out by a
    # re-admission leave holes (-1), squeezed out when the ring fills up.
    gbits = sc[Q_GBITS]
    r = ghost.size
    tail = sc[M_GTAIL]
    head = sc[M_GHEAD]
    while sc[M_GLIVE] >= sc[Q_GCAP]:
        old = ghost[tail]
        ghost[tail] = -1
        tail = tail + 1 if tail + 1 < r else 0
        if old >= 0:
            _idx_delete(gidx, gbits, old)
            sc[M_GLIVE] -= 1
    used = head - tail if head >= tail else head + r - tail
    if used == r - 1:  # compact the holes away, keeping the order
        w = tail
        j = tail
        for _ in range(used):
            k = ghost[j]
            if k >= 0:
                if w != j:
                    ghost[w] = k
                    ghost[j] = -1
                    _idx_update(gidx, gbits, k, w)
                w = w + 1 if w + 1 < r else 0
            j = j + 1 if j + 1 < r else 0
        head = w
    ghost[head] = key
    _idx_insert(gidx, gbits, key, head)
    sc[M_GHEAD] = head + 1 if head + 1 < r else 0
    sc[M_GTAIL] = tail
    sc[M_GLIVE] += 1


@njit(**SERIAL, inline="always")
def _ghost_take(ghost, gidx, sc, key):
    """Remove ``key`` from the ghost queue; True if it was there."""
    gbits = sc[Q_GBITS]
    g = _idx_find(gidx, gbits, key)
    if g < 0:
        return False
    ghost[g] = -1
    _idx_delete(gidx, gbits, key)
    sc[M_GLIVE] -= 1
    return True


# --------------------------------------------------------------------------
# policy dispatch: attach / detach / touch / victim / evict
# --------------------------------------------------------------------------


@njit(**SERIAL, inline="always")
def _protected(node, s, epoch):
    return node[s, N_MARK] == epoch or node[s, N_PINS] > 0


@njit(**SERIAL, inline="always")
def _attach(node, work, ghost, gidx, sc, s, key, c):
    """Enter a newly admitted key (slot ``s``, ``c`` occurrences) into the policy."""
    pol = sc[Q_POLICY]
    cap = work.shape[1]
    if pol == P_LRU or pol == P_FIFO:
        _l_push_back(node, cap, s)
    elif pol == P_LFU:
        node[s, N_CNT] = c
        node[s, N_SEQ] = sc[M_SEQ]
        sc[M_SEQ] += 1
        _h_push(node, work, sc, s)
    elif pol == P_CLOCK:
        # New keys enter with ref 0 (one access earns no second chance); a key
        # seen more than once in its admitting batch already earned one.
        work[W_REF, s] = 1 if c > 1 else 0
    elif pol == P_S3FIFO:
        # Occurrences after the first in the admitting batch count as reads.
        f = c - 1
        node[s, N_REF] = 3 if f > 3 else f
        if _ghost_take(ghost, gidx, sc, key):
            node[s, N_FLAGS] |= F_INM
            _l_push_back(node, cap + 1, s)
            sc[M_MSIZE] += 1
        else:
            node[s, N_FLAGS] &= ~F_INM
            _l_push_back(node, cap, s)
            sc[M_SSIZE] += 1


@njit(**SERIAL, inline="always")
def _detach(node, work, sc, s):
    """Take slot ``s`` out of the policy's structures (it must be in them)."""
    pol = sc[Q_POLICY]
    if pol == P_LRU or pol == P_FIFO:
        _l_unlink(node, s)
    elif pol == P_LFU:
        _h_remove(node, work, sc, s)
    elif pol == P_S3FIFO:
        _l_unlink(node, s)
        if node[s, N_FLAGS] & F_INM:
            sc[M_MSIZE] -= 1
        else:
            sc[M_SSIZE] -= 1
        node[s, N_FLAGS] &= ~F_INM
    elif pol == P_CLOCK:
        work[W_REF, s] = 0
    node[s, N_REF] = 0


@njit(**SERIAL, inline="always")
def _touch(node, work, sc, pol, s, c):
    if pol == P_LRU:
        cap = work.shape[1]
        # unlink + push_back, skipped when already the newest
        if node[cap, N_PREV] != s:
            _l_unlink(node, s)
            _l_push_back(node, cap, s)
    elif pol == P_LFU:
        # cachetools: the key moves to the end of bucket count + 1.
        node[s, N_CNT] += c
        node[s, N_SEQ] = sc[M_SEQ]
        sc[M_SEQ] += 1
        _h_down(node, work, sc[M_HSIZE], node[s, N_HPOS])
    elif pol == P_CLOCK:
        work[W_REF, s] = 1
    elif pol == P_S3FIFO:
        f = node[s, N_REF] + c
        node[s, N_REF] = 3 if f > 3 else f


@njit(**SERIAL, inline="always")
def _aside(work, sc, s):
    n = sc[M_NASIDE]
    work[W_ASIDE, n] = s
    sc[M_NASIDE] = n + 1


@njit(**SERIAL, inline="always")
def _restore(node, work, sc):
    """Put back the entries lifted aside during the call, where they were."""
    n = sc[M_NASIDE]
    if n == 0:
        return
    pol = sc[Q_POLICY]
    cap = work.shape[1]
    for j in range(n - 1, -1, -1):
        s = work[W_ASIDE, j]
        if pol == P_LRU or pol == P_FIFO:
            _l_push_front(node, cap, s)
        elif pol == P_LFU:
            _h_push(node, work, sc, s)
        elif pol == P_S3FIFO:
            if node[s, N_FLAGS] & F_INM:
                _l_push_front(node, cap + 1, s)
                sc[M_MSIZE] += 1
            else:
                _l_push_front(node, cap, s)
                sc[M_SSIZE] += 1
    sc[M_NASIDE] = 0


@njit(**SERIAL, inline="always")
def _s3_scan_small(node, work, sc, epoch):
    # Algorithm 1 EVICTS: the oldest small-queue entry moves to the main
    # queue if it was read more than once (freq > 1), else it is the victim.
    cap = work.shape[1]
    while True:
        t = node[cap, N_NEXT]
        if t == cap:
            return np.int64(-1)
        if _protected(node, t, epoch):
            _l_unlink(node, t)
            sc[M_SSIZE] -= 1
            _aside(work, sc, t)
        elif node[t, N_REF] > 1:
            _l_unlink(node, t)
            sc[M_SSIZE] -= 1
            node[t, N_FLAGS] |= F_INM
            _l_push_back(node, cap + 1, t)
            sc[M_MSIZE] += 1
        else:
            return t


@njit(**SERIAL, inline="always")
def _s3_scan_main(node, work, sc, epoch):
    # Algorithm 1 EVICTM: reinsert read entries at the head with freq - 1.
    sent = work.shape[1] + 1
    while True:
        t = node[sent, N_NEXT]
        if t == sent:
            return np.int64(-1)
        if _protected(node, t, epoch):
            _l_unlink(node, t)
            sc[M_MSIZE] -= 1
            _aside(work, sc, t)
        elif node[t, N_REF] > 0:
            node[t, N_REF] -= 1
            _l_unlink(node, t)
            _l_push_back(node, sent, t)
        else:
            return t


@njit(**SERIAL, inline="always")
def _victim(node, work, sc, epoch):
    """The next slot the policy would evict (left in place), or -1."""
    pol = sc[Q_POLICY]
    cap = work.shape[1]
    if pol == P_LRU or pol == P_FIFO:
        while True:
            s = node[cap, N_NEXT]
            if s == cap:
                return np.int64(-1)
            if _protected(node, s, epoch):
                _l_unlink(node, s)
                _aside(work, sc, s)
            else:
                return s
    elif pol == P_LFU:
        while sc[M_HSIZE] > 0:
            s = np.int64(work[W_HEAP, 0])
            if _protected(node, s, epoch):
                _h_remove(node, work, sc, s)
                _aside(work, sc, s)
            else:
                return s
        return np.int64(-1)
    elif pol == P_CLOCK:
        hand = sc[M_HAND]
        # Two sweeps: the first may only clear reference bits.
        for _ in range(2 * cap + 1):
            s = hand
            if (
                node[s, N_KEY] >= 0
                and (node[s, N_FLAGS] & F_STATIC) == 0
                and not _protected(node, s, epoch)
            ):
                if work[W_REF, s] != 0:
                    work[W_REF, s] = 0
                else:
                    sc[M_HAND] = hand
                    return s
            hand += 1
            if hand == cap:
                hand = 0
        sc[M_HAND] = hand
        return np.int64(-1)
    elif pol == P_S3FIFO:
        ss = sc[M_SSIZE]
        if ss > 0 and (ss >= sc[M_STARGET] or sc[M_MSIZE] == 0):
            v = _s3_scan_small(node, work, sc, epoch)
            if v >= 0:
                return v
            return _s3_scan_main(node, work, sc, epoch)
        v = _s3_scan_main(node, work, sc, epoch)
        if v >= 0:
            return v
        return _s3_scan_small(node, work, sc, epoch)
    return np.int64(-1)


@njit(**SERIAL, inline="always")
def _evict(idx, node, work, ghost, gidx, sc, s):
    """Evict the victim in slot ``s``: out of the policy and the index."""
    key = node[s, N_KEY]
    pol = sc[Q_POLICY]
    to_ghost = pol == P_S3FIFO and (node[s, N_FLAGS] & F_INM) == 0
    _detach(node, work, sc, s)
    if to_ghost:
        _ghost_add(ghost, gidx, sc, key)
    if pol == P_CLOCK:
        sc[M_HAND] = s + 1 if s + 1 < work.shape[1] else 0
    _idx_delete(idx, sc[Q_BITS], key)
    node[s, N_KEY] = -1
    return key


@njit(**SERIAL, inline="always")
def _take_free(work, sc):
    nfree = sc[M_NFREE]
    if nfree == 0:
        return np.int64(-1)
    sc[M_NFREE] = nfree - 1
    return np.int64(work[W_FREE, nfree - 1])


@njit(**SERIAL, inline="always")
def _place(idx, node, work, ghost, gidx, sketch, sc, key, c, epoch, use_filter,
           ev_keys, ev_slots, nev):
    """Admit a missing key: free slot, or evict the victim. Returns (slot, nev, outcome)."""
    s = _take_free(work, sc)
    if s < 0:
        if sc[M_EXHAUSTED] == epoch:
            return np.int64(-1), nev, _BYPASSED
        v = _victim(node, work, sc, epoch)
        if v < 0:
            sc[M_EXHAUSTED] = epoch
            return np.int64(-1), nev, _BYPASSED
        if use_filter and sc[Q_TINYLFU] != 0:
            if _sk_est(sketch, sc, key) <= _sk_est(sketch, sc, node[v, N_KEY]):
                return np.int64(-1), nev, _REJECTED
        ev_keys[nev] = _evict(idx, node, work, ghost, gidx, sc, v)
        ev_slots[nev] = v
        nev += 1
        sc[S_EVICTIONS] += 1
        s = v
    node[s, N_KEY] = key
    _idx_insert(idx, sc[Q_BITS], key, s)
    node[s, N_MARK] = epoch
    _attach(node, work, ghost, gidx, sc, s, key, c)
    sc[S_ADMISSIONS] += 1
    return s, nev, _ADMITTED


@njit(**SERIAL, inline="always")
def _lfu_age(node, work, sc, added):
    period = sc[Q_AGING]
    if period <= 0:
        return
    sc[M_AGE] += added
    halvings = 0
    while sc[M_AGE] >= period:
        sc[M_AGE] -= period
        halvings += 1
    if halvings == 0:
        return
    sh = 63 if halvings > 63 else halvings
    n = sc[M_HSIZE]
    for j in range(n):
        s = work[W_HEAP, j]
        node[s, N_CNT] >>= sh
    for p in range(n // 2 - 1, -1, -1):  # re-heapify (Floyd)
        _h_down(node, work, n, p)


@njit(**SERIAL, inline="always")
def _find_all(idx, bits, keys, slots):
    # Independent probes: prefetch the index line _PF keys ahead.
    n = keys.size
    for i in range(n):
        if i + _PF < n:
            prefetch_row(idx, _line(idx, bits, keys[i + _PF]), np.int64(0))
        slots[i] = _idx_find(idx, bits, keys[i])


@njit(**SERIAL, inline="always")
def _prefetch_victims(idx, node, bits, pol, cap, hand):
    """Prefetch what the next evictions will touch (a hint: stale is harmless).

    Queue policies evict from the oldest end: the second-oldest entry's
    line was prefetched by the previous miss, so read its key and prefetch
    its index line, and prefetch the third-oldest line. CLOCK: the slots
    after the hand.
    """
    if pol == P_LRU or pol == P_FIFO or pol == P_S3FIFO:
        a = node[cap, N_NEXT]
        if a == cap:
            return
        b = node[a, N_NEXT]
        if b >= cap:
            return
        prefetch_row(idx, _line(idx, bits, node[b, N_KEY]), np.int64(0))
        prefetch_row(node, np.int64(node[b, N_NEXT]), np.int64(0))
    elif pol == P_CLOCK:
        h = hand + 1 if hand + 1 < cap else 0
        k = node[h, N_KEY]
        if k >= 0:
            prefetch_row(idx, _line(idx, bits, k), np.int64(0))
        h = hand + 4 if hand + 4 < cap else 0
        prefetch_row(node, np.int64(h), np.int64(0))


# --------------------------------------------------------------------------
# public kernels (one call per CachePolicy method)
# --------------------------------------------------------------------------


@njit(**SERIAL)
def policy_lookup(st, keys, slots):
    """Peek: ``slots[i]`` = slot of ``keys[i]`` or -1. No state change."""
    idx = st.idx
    _find_all(idx, st.sc[Q_BITS], keys, slots)


@njit(**SERIAL)
def policy_access(st, keys, counts, slots, hit, ev_keys, ev_slots):
    """Batch get-or-set of unique ``keys``; returns ``(n_evicted, first_duplicate)``.

    ``counts`` of size 0 means one occurrence per key. ``first_duplicate`` is
    the index of the first repeated key found (-1 if none); a repeated key is
    treated as a hit of its earlier occurrence, so the state stays valid.
    """
    idx, node, work, ghost, gidx, sketch, sc = st
    bits = sc[Q_BITS]
    pol = sc[Q_POLICY]
    cap = work.shape[1]
    epoch = sc[M_EPOCH] + 1
    sc[M_EPOCH] = epoch
    n = keys.size
    has_counts = counts.size > 0
    total = np.int64(n)
    if has_counts:
        total = np.int64(0)
        for i in range(n):
            total += counts[i]
    if sc[Q_TINYLFU] != 0:
        for i in range(n):
            _sk_add(sketch, sc, keys[i], counts[i] if has_counts else 1)
    _find_all(idx, bits, keys, slots)
    # Phase 1: hits are touched (and protected for the rest of the call).
    dup = -1
    nhit = 0
    for i in range(n):
        if i + _PF < n:
            s2 = slots[i + _PF]
            if s2 >= 0:
                prefetch_row(node, np.int64(s2), np.int64(0))
        if pol == P_LRU and i + _PF // 2 < n:
            s2 = slots[i + _PF // 2]
            if s2 >= 0:  # the list neighbours an LRU touch rewrites
                prefetch_row(node, np.int64(node[s2, N_PREV]), np.int64(0))
                prefetch_row(node, np.int64(node[s2, N_NEXT]), np.int64(0))
        s = slots[i]
        if s >= 0:
            hit[i] = True
            if node[s, N_MARK] == epoch:
                if dup < 0:
                    dup = i
                continue
            node[s, N_MARK] = epoch
            nhit += 1
            if (node[s, N_FLAGS] & F_STATIC) == 0:
                _touch(node, work, sc, pol, s, counts[i] if has_counts else 1)
        else:
            hit[i] = False
    # Phase 2: misses, in order.
    nev = 0
    nmiss = 0
    dynamic = sc[Q_DYNAMIC] != 0
    for i in range(n):
        if hit[i]:
            continue
        nmiss += 1
        if not dynamic:
            sc[S_BYPASSED] += 1
            continue
        if i + _PF < n and not hit[i + _PF]:
            prefetch_row(idx, _line(idx, bits, keys[i + _PF]), np.int64(0))
        key = keys[i]
        s = _idx_find(idx, bits, key)
        if s >= 0:  # repeated key, admitted by its earlier occurrence
            if dup < 0:
                dup = i
            nmiss -= 1
            slots[i] = s
            continue
        if sc[M_NFREE] == 0:
            _prefetch_victims(idx, node, bits, pol, cap, sc[M_HAND])
        s, nev, outcome = _place(idx, node, work, ghost, gidx, sketch, sc, key,
                                 counts[i] if has_counts else 1, epoch, True,
                                 ev_keys, ev_slots, nev)
        slots[i] = s
        if outcome == _REJECTED:
            sc[S_REJECTED] += 1
        elif outcome == _BYPASSED:
            sc[S_BYPASSED] += 1
    _restore(node, work, sc)
    if pol == P_LFU:
        _lfu_age(node, work, sc, total)
    sc[S_HITS] += nhit
    sc[S_MISSES] += nmiss
    return nev, dup


@njit(**SERIAL)
def policy_insert(st, keys, slots, hit, ev_keys, ev_slots):
    """Admit ``keys`` as misses without counting hits/misses (prefetch).

    Resident keys are left untouched (``hit`` True) but protected for the
    call. Returns ``(n_evicted, first_duplicate)``.
    """
    idx, node, work, ghost, gidx, sketch, sc = st
    bits = sc[Q_BITS]
    epoch = sc[M_EPOCH] + 1
    sc[M_EPOCH] = epoch
    n = keys.size
    _find_all(idx, bits, keys, slots)
    dup = -1
    for i in range(n):
        s = slots[i]
        hit[i] = s >= 0
        if s >= 0:
            if node[s, N_MARK] == epoch and dup < 0:
                dup = i
            node[s, N_MARK] = epoch
    nev = 0
    dynamic = sc[Q_DYNAMIC] != 0
    for i in range(n):
        if hit[i]:
            continue
        if not dynamic:
            sc[S_BYPASSED] += 1
            continue
        key = keys[i]
        s = _idx_find(idx, bits, key)
        if s >= 0:
            if dup < 0:
                dup = i
            slots[i] = s
            continue
        s, nev, outcome = _place(idx, node, work, ghost, gidx, sketch, sc, key, 1, epoch,
                                 True, ev_keys, ev_slots, nev)
        slots[i] = s
        if outcome == _REJECTED:
            sc[S_REJECTED] += 1
        elif outcome == _BYPASSED:
            sc[S_BYPASSED] += 1
    _restore(node, work, sc)
    return nev, dup


@njit(**SERIAL)
def policy_remove(st, keys):
    """Invalidate ``keys`` (absent ones are ignored); returns how many were resident."""
    idx, node, work, ghost, gidx, sketch, sc = st
    bits = sc[Q_BITS]
    removed = 0
    for i in range(keys.size):
        key = keys[i]
        s = _idx_find(idx, bits, key)
        if s < 0:
            continue
        if node[s, N_FLAGS] & F_STATIC:
            node[s, N_FLAGS] &= ~F_STATIC
            sc[M_NSTATIC] -= 1
        else:
            _detach(node, work, sc, s)
        _idx_delete(idx, bits, key)
        node[s, N_KEY] = -1
        work[W_FREE, sc[M_NFREE]] = s
        sc[M_NFREE] += 1
        removed += 1
    return removed


@njit(**SERIAL)
def policy_pin(st, slots):
    """pins[s] += 1 for every slot >= 0."""
    node = st.node
    for j in range(slots.size):
        s = slots[j]
        if s >= 0:
            node[s, N_PINS] += 1


@njit(**SERIAL)
def policy_unpin(st, slots):
    """pins[s] -= 1 for every slot >= 0; all or nothing.

    Returns -1, or the index of the first slot whose count would go below 0
    (nothing is changed then).
    """
    node = st.node
    for j in range(slots.size):
        s = slots[j]
        if s >= 0:
            if node[s, N_PINS] <= 0:
                for k in range(j - 1, -1, -1):  # roll back
                    if slots[k] >= 0:
                        node[slots[k], N_PINS] += 1
                return j
            node[s, N_PINS] -= 1
    return -1


@njit(**SERIAL)
def policy_pin_static(st, keys, slots, ev_keys, ev_slots):
    """Pin unique ``keys`` permanently; returns ``(n_evicted, first_failed)``.

    Resident keys keep their slot and leave the dynamic policy; the others
    take a free slot or evict the policy's victim (never a protected or
    pinned slot). ``first_failed`` is the index of the first key that found
    no slot (-1: all pinned); keys before it are pinned.
    """
    idx, node, work, ghost, gidx, sketch, sc = st
    bits = sc[Q_BITS]
    epoch = sc[M_EPOCH] + 1
    sc[M_EPOCH] = epoch
    for i in range(keys.size):
        s = _idx_find(idx, bits, keys[i])
        slots[i] = s
        if s >= 0:
            node[s, N_MARK] = epoch
            if (node[s, N_FLAGS] & F_STATIC) == 0:
                _detach(node, work, sc, s)
                node[s, N_FLAGS] |= F_STATIC
                sc[M_NSTATIC] += 1
    nev = 0
    failed = -1
    for i in range(keys.size):
        if slots[i] >= 0:
            continue
        key = keys[i]
        s = _idx_find(idx, bits, key)
        if s >= 0:  # repeated key
            slots[i] = s
            continue
        s = _take_free(work, sc)
        if s < 0:
            v = _victim(node, work, sc, epoch)
            if v < 0:
                failed = i
                break
            ev_keys[nev] = _evict(idx, node, work, ghost, gidx, sc, v)
            ev_slots[nev] = v
            nev += 1
            sc[S_EVICTIONS] += 1
            s = v
        if sc[Q_POLICY] == P_S3FIFO:
            _ghost_take(ghost, gidx, sc, key)
        node[s, N_KEY] = key
        _idx_insert(idx, bits, key, s)
        node[s, N_MARK] = epoch
        node[s, N_FLAGS] = F_STATIC
        node[s, N_REF] = 0
        work[W_REF, s] = 0
        sc[M_NSTATIC] += 1
        slots[i] = s
    _restore(node, work, sc)
    return nev, failed


@njit(**SERIAL)
def cache_resolve(st, values, offsets, batch_size, base, ready, prefetched, check_ready,
                  check_prefetched, upos, lookup_slot, uslots, ucounts, mkeys, mcounts, mslots,
                  hkey, hval, hstamp, stamp, order, ev_keys, ev_slots, tstats):
    """The cache's whole batch step in one call: ``policy_access`` of the batch's ids.

    ``values``/``offsets`` are a key-major batch of ``len(base)`` tables;
    the key of lookup ``i`` of table ``t`` is ``base[t] + values[i]``. The
    state changes exactly as ``policy_access(uniq, counts)`` of the distinct
    keys in first-occurrence order would change it, without building that
    list: a hit is recognised as a repeat by its slot's mark (the line its
    touch needs anyway) and only misses go through a per-call hash
    (``hkey``/``hval``, entries live while ``hstamp == stamp``). LRU, FIFO,
    CLOCK and S3-FIFO touch a hit at its first occurrence, in the same pass
    (their hit touches commute with every later occurrence's); LFU, whose
    touch needs the whole count, touches after the pass.

    Admitted misses get one pin (hits are protected by their mark for the
    call; the caller pins them if it releases the lock before pooling).
    Writes ``lookup_slot[i]`` (the slot, or ``-1 - m`` for miss ``m`` that
    bypassed), ``uslots[:nu]`` (distinct hits), ``mkeys[:nm]``/``mcounts``/
    ``mslots`` (distinct misses; slot -1 = bypass), evictions in
    ``ev_keys``/``ev_slots``, and per table ``tstats[t] = (distinct hits,
    distinct misses, hit lookups)``; ``upos``/``ucounts`` are scratch.
    ``ready``/``prefetched`` are read only when ``check_*`` (the caller knows
    when no slot is being filled or holds an unhit prefetch). Returns
    ``(nu, nm, n_evicted, n_hits_not_ready, n_prefetched_hits)``; prefetched
    flags of hit slots are cleared.
    """
    idx, node, work, ghost, gidx, sketch, sc = st
    bits = sc[Q_BITS]
    pol = sc[Q_POLICY]
    cap = work.shape[1]
    epoch = sc[M_EPOCH] + 1
    sc[M_EPOCH] = epoch
    hmask = hkey.size - 1
    hbits = 1
    while (np.int64(1) << hbits) < hkey.size:
        hbits += 1
    tiny = sc[Q_TINYLFU] != 0
    lfu = pol == P_LFU
    lru = pol == P_LRU
    counted = lfu or tiny  # hits' occurrence counts are needed
    nu = 0
    nm = 0
    nk = 0
    nwait = 0
    nuseful = 0
    for t in range(base.size):
        s0 = offsets[t * batch_size]
        e0 = offsets[(t + 1) * batch_size]
        b = base[t]
        for i in range(s0, e0):
            # staged prefetch: the index line 2 * _PF ahead, the slot's line _PF ahead
            # (and for LRU the list neighbours its touch rewrites, _PF / 2 ahead)
            if i + 2 * _PF < e0:
                prefetch_row(idx, _line(idx, bits, b + values[i + 2 * _PF]), np.int64(0))
            if i + _PF < e0:
                s2 = _idx_find(idx, bits, b + values[i + _PF])
                if s2 >= 0:
                    prefetch_row(node, np.int64(s2), np.int64(0))
            if lru and i + _PF // 2 < e0:
                s2 = _idx_find(idx, bits, b + values[i + _PF // 2])
                if s2 >= 0 and node[s2, N_MARK] != epoch:
                    prefetch_row(node, np.int64(node[s2, N_PREV]), np.int64(0))
                    prefetch_row(node, np.int64(node[s2, N_NEXT]), np.int64(0))
            key = b + values[i]
            s = _idx_find(idx, bits, key)
            if s >= 0:
                if node[s, N_MARK] == epoch:
                    if counted:
                        ucounts[upos[s]] += 1
                    if pol == P_S3FIFO and (node[s, N_FLAGS] & F_STATIC) == 0:
                        _touch(node, work, sc, pol, s, 1)
                else:
                    node[s, N_MARK] = epoch
                    if counted:
                        upos[s] = nu
                        ucounts[nu] = 1
                    if not lfu and (node[s, N_FLAGS] & F_STATIC) == 0:
                        _touch(node, work, sc, pol, s, 1)
                    uslots[nu] = s
                    if tiny:
                        order[nk] = nu
                        nk += 1
                    nu += 1
                    tstats[t, 0] += 1
                    if check_ready and not ready[s]:
                        nwait += 1
                    if check_prefetched and prefetched[s]:
                        prefetched[s] = False
                        nuseful += 1
                tstats[t, 2] += 1
                lookup_slot[i] = s
            else:
                h = _home(key, hbits) & hmask
                while True:
                    if hstamp[h] != stamp:
                        hstamp[h] = stamp
                        hkey[h] = key
                        hval[h] = nm
                        mkeys[nm] = key
                        mcounts[nm] = 1
                        if tiny:
                            order[nk] = -1 - nm
                            nk += 1
                        m = nm
                        nm += 1
                        tstats[t, 1] += 1
                        break
                    if hkey[h] == key:
                        m = hval[h]
                        mcounts[m] += 1
                        break
                    h = (h + 1) & hmask
                lookup_slot[i] = -1 - m
    if tiny:  # the sketch counts every distinct key, in first-occurrence order
        for k in range(nk):
            r = order[k]
            if r >= 0:
                _sk_add(sketch, sc, node[uslots[r], N_KEY], ucounts[r])
            else:
                _sk_add(sketch, sc, mkeys[-1 - r], mcounts[-1 - r])
    if lfu:  # phase 1 of policy_access: hits touched in first-occurrence order
        for u in range(nu):
            if u + _PF < nu:
                prefetch_row(node, np.int64(uslots[u + _PF]), np.int64(0))
            s = uslots[u]
            if (node[s, N_FLAGS] & F_STATIC) == 0:
                _touch(node, work, sc, pol, s, ucounts[u])
    # Phase 2: misses admitted in first-occurrence order.
    nev = 0
    dynamic = sc[Q_DYNAMIC] != 0
    for m in range(nm):
        if not dynamic:
            sc[S_BYPASSED] += 1
            mslots[m] = -1
            continue
        if m + _PF < nm:
            prefetch_row(idx, _line(idx, bits, mkeys[m + _PF]), np.int64(0))
        if sc[M_NFREE] == 0:
            _prefetch_victims(idx, node, bits, pol, cap, sc[M_HAND])
        s, nev, outcome = _place(idx, node, work, ghost, gidx, sketch, sc, mkeys[m],
                                 mcounts[m], epoch, True, ev_keys, ev_slots, nev)
        mslots[m] = s
        if s >= 0:
            node[s, N_PINS] += 1
        elif outcome == _REJECTED:
            sc[S_REJECTED] += 1
        else:
            sc[S_BYPASSED] += 1
    _restore(node, work, sc)
    if lfu:
        _lfu_age(node, work, sc, np.int64(values.size))
    sc[S_HITS] += nu
    sc[S_MISSES] += nm
    if nm:
        for i in range(values.size):
            v = lookup_slot[i]
            if v < 0:
                s = mslots[-1 - v]
                if s >= 0:
                    lookup_slot[i] = s
    return nu, nm, nev, nwait, nuseful


#: lookups per chunk of :func:`cache_resolve_resident`'s parallel pass
_RESIDENT_CHUNK = 4096


@njit(**PARALLEL)
def cache_resolve_resident(st, values, offsets, batch_size, base, ready, prefetched,
                           check_ready, check_prefetched, lookup_slot, tstats):
    """:func:`cache_resolve` of a batch whose every row is resident, on all threads.

    For CLOCK and FIFO (no TinyLFU) a hit's whole effect is order-free: CLOCK
    sets the slot's reference bit (idempotent), FIFO nothing, and a repeat
    within the batch is told by the slot's mark, swapped in atomically so
    that exactly one thread sees a key's first occurrence. Chunks of the
    batch run in parallel; each writes ``lookup_slot`` of its lookups.
    Returns ``(ok, distinct hits, prefetched hits)``: with ``ok == 0`` some
    lookup missed (or was not ready) and nothing but what :func:`cache_resolve`
    would do anyway was done (reference bits of hits set, their prefetched
    flags cleared: the caller counts the returned prefetched hits, then
    runs :func:`cache_resolve`); with ``ok == 1`` the state and the policy's
    counters are those of :func:`cache_resolve` and ``tstats`` holds the
    per-table counts.
    """
    idx, node, work, ghost, gidx, sketch, sc = st
    bits = sc[Q_BITS]
    clock = sc[Q_POLICY] == P_CLOCK
    epoch = sc[M_EPOCH] + 1
    sc[M_EPOCH] = epoch
    T = base.size
    # chunks of at most _RESIDENT_CHUNK lookups, never across a table boundary
    nchunks = 0
    for t in range(T):
        n = offsets[(t + 1) * batch_size] - offsets[t * batch_size]
        nchunks += (n + _RESIDENT_CHUNK - 1) // _RESIDENT_CHUNK
    ct = np.empty(nchunks, np.int64)
    ca = np.empty(nchunks, np.int64)
    c = 0
    for t in range(T):
        s0 = offsets[t * batch_size]
        e0 = offsets[(t + 1) * batch_size]
        for a in range(s0, e0, _RESIDENT_CHUNK):
            ct[c] = t
            ca[c] = a
            c += 1
    res = np.zeros((nchunks, 4), np.int64)  # failed, distinct hits, hit lookups, useful
    ep32 = np.int32(epoch & 0x7FFFFFFF)
    statics = sc[M_NSTATIC] > 0
    for c in prange(nchunks):
        t = ct[c]
        a = ca[c]
        e = min(a + _RESIDENT_CHUNK, offsets[(t + 1) * batch_size])
        b = base[t]
        distinct = 0
        useful = 0
        for i in range(a, e):
            # staged prefetch: the index line 2 * _PF ahead, the slot's 4-byte mark and
            # reference bit _PF ahead (compact rows: a hot set shares their lines)
            if i + 2 * _PF < e:
                prefetch_row(idx, _line(idx, bits, b + values[i + 2 * _PF]), np.int64(0))
            if i + _PF < e:
                s2 = _idx_find(idx, bits, b + values[i + _PF])
                if s2 >= 0:
                    prefetch_row(work, np.int64(W_RMARK), np.int64(s2))
                    if clock:
                        prefetch_row(work, np.int64(W_REF), np.int64(s2))
            s = _idx_find(idx, bits, b + values[i])
            if s < 0 or (check_ready and not ready[s]):
                res[c, 0] = 1
                break
            lookup_slot[i] = s
            # a plain read first: a repeat (the common case of a hot row) needs no locked
            # instruction; a first occurrence is claimed by the one thread whose swap sees
            # another mark
            if work[W_RMARK, s] != ep32 and \
                    atomic_exchange_2d(work, W_RMARK, s, ep32) != ep32:
                distinct += 1
                if clock and (not statics or (node[s, N_FLAGS] & F_STATIC) == 0):
                    work[W_REF, s] = 1
                if check_prefetched and prefetched[s]:
                    prefetched[s] = False
                    useful += 1
        res[c, 1] = distinct
        res[c, 2] = e - a
        res[c, 3] = useful
    ok = 1
    nu = 0
    nuseful = 0
    for c in range(nchunks):
        if res[c, 0] != 0:
            ok = 0
        nu += res[c, 1]
        nuseful += res[c, 3]
    if ok == 1:
        for c in range(nchunks):
            tstats[ct[c], 0] += res[c, 1]
            tstats[ct[c], 2] += res[c, 2]
        sc[S_HITS] += nu
    return ok, nu, nuseful


class FastCall:
    """Call a kernel while skipping Numba's per-call type dispatch.

    Numba's dispatcher types every argument on each call (a ``PolicyState``
    costs ~15 us); the compiled entry point of the matching overload is a
    few us. The first call goes through the dispatcher and remembers the
    entry point for the argument types it saw; callers must then pass
    arguments of those same types (:mod:`tiermem.cache.policy` builds every
    array itself, with fixed dtypes).
    """

    __slots__ = ("_disp", "_ep")

    def __init__(self, dispatcher: Callable[..., Any]) -> None:
        self._disp = dispatcher
        self._ep: Callable[..., Any] | None = None

    def __call__(self, *args: object) -> Any:
        """The kernel's result (untyped: what the Numba function returns)."""
        ep = self._ep
        if ep is not None:
            return ep(*args)
        out = self._disp(*args)
        overloads = getattr(self._disp, "overloads", None)
        if overloads is None:  # NUMBA_DISABLE_JIT: a plain function
            self._ep = self._disp
        else:
            sig = tuple(typeof(a) for a in args)
            self._ep = overloads[sig].entry_point if sig in overloads else self._disp
        return out
