"""Belady's OPT (MIN) over a stream of dense keys, with an indexed max-heap.

The heap holds the resident keys, ordered by the position of their next use
(``n`` = never used again, which sorts above every real position). A hit
raises its key's priority to the next use of this access (sift up); a miss
with a full cache evicts the root. Every operation is O(log C).

Callers pass validated input: ``keys`` in ``[0, n_keys)``, ``next_use`` of the
same length with values in ``(i, n]``, ``capacity >= 1``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tiermem.kernels._flags import SERIAL


@njit(**SERIAL)
def _sift_up(heap_key, heap_pri, pos, i):
    k = heap_key[i]
    p = heap_pri[i]
    while i > 0:
        parent = (i - 1) >> 1
        if heap_pri[parent] >= p:
            break
        heap_key[i] = heap_key[parent]
        heap_pri[i] = heap_pri[parent]
        pos[heap_key[i]] = i
        i = parent
    heap_key[i] = k
    heap_pri[i] = p
    pos[k] = i


@njit(**SERIAL)
def _sift_down(heap_key, heap_pri, pos, i, size):
    k = heap_key[i]
    p = heap_pri[i]
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and heap_pri[c + 1] > heap_pri[c]:
            c += 1
        if heap_pri[c] <= p:
            break
        heap_key[i] = heap_key[c]
        heap_pri[i] = heap_pri[c]
        pos[heap_key[i]] = i
        i = c
    heap_key[i] = k
    heap_pri[i] = p
    pos[k] = i


@njit(**SERIAL)
def _belady(keys, next_use, n_keys, capacity, bypass, hit_out):
    """Simulate OPT; ``hit_out[i] = 1`` where access ``i`` hits. Returns hits.

    ``bypass``: on a miss with a full cache, keep the new key out when its own
    next use is at least as far as the farthest resident's (OPT for caches
    that may refuse admission); otherwise evict the farthest (demand MIN).
    """
    n = keys.size
    heap_key = np.empty(capacity, np.int64)
    heap_pri = np.empty(capacity, np.int64)
    pos = np.full(n_keys, -1, np.int64)
    size = 0
    hits = 0
    for i in range(n):
        k = keys[i]
        nu = next_use[i]
        j = pos[k]
        if j >= 0:
            hits += 1
            hit_out[i] = 1
            # the old priority was i (this access); the next use is later: sift up
            heap_pri[j] = nu
            _sift_up(heap_key, heap_pri, pos, j)
            continue
        hit_out[i] = 0
        if size < capacity:
            heap_key[size] = k
            heap_pri[size] = nu
            size += 1
            _sift_up(heap_key, heap_pri, pos, size - 1)
            continue
        if bypass and nu >= heap_pri[0]:
            continue
        # evict the root (farthest next use) and put k in its place
        pos[heap_key[0]] = -1
        heap_key[0] = k
        heap_pri[0] = nu
        _sift_down(heap_key, heap_pri, pos, 0, size)
    return hits


def belady_hits(keys: np.ndarray, next_use: np.ndarray, n_keys: int, capacity: int,
                bypass: bool = False) -> tuple[int, np.ndarray]:
    """Run the OPT kernel on validated dense keys; returns ``(hits, hit_mask)``."""
    hit = np.empty(keys.size, np.uint8)
    h = _belady(keys, next_use, np.int64(n_keys), np.int64(capacity), bool(bypass), hit)
    return int(h), hit.view(np.bool_)
