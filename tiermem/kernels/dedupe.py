"""Per-batch deduplication of ids, keeping first-occurrence order.

A cache touches each distinct row of a batch once, in the order the batch
first uses it; a hash table sized to the batch does that in one pass.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tiermem.kernels._flags import SERIAL

_EMPTY = -1


@njit(**SERIAL)
def dedupe_first(ids):
    """``(uniq, inverse, counts)``: distinct ids in first-occurrence order.

    ``uniq[inverse[i]] == ids[i]``; ``counts[k]`` is how often ``uniq[k]``
    occurs. ``ids`` must be non-negative.
    """
    n = ids.size
    size = 16
    while size < 2 * n:
        size *= 2
    mask = size - 1
    table_key = np.full(size, _EMPTY, np.int64)
    table_val = np.empty(size, np.int64)
    uniq = np.empty(n, np.int64)
    counts = np.zeros(n, np.int64)
    inverse = np.empty(n, np.int64)
    k = 0
    for i in range(n):
        v = ids[i]
        h = (v * np.int64(-7046029254386353131)) >> 20
        p = h & mask
        while True:
            tk = table_key[p]
            if tk == v:
                j = table_val[p]
                break
            if tk == _EMPTY:
                table_key[p] = v
                table_val[p] = k
                uniq[k] = v
                j = k
                k += 1
                break
            p = (p + 1) & mask
        inverse[i] = j
        counts[j] += 1
    return uniq[:k].copy(), inverse, counts[:k].copy()


@njit(**SERIAL)
def offset_ids(values, offsets, batch_size, base):
    """Global ids ``base[t] + values[i]`` for a key-major batch of ``len(base)`` tables."""
    out = np.empty(values.size, np.int64)
    for t in range(base.size):
        s = offsets[t * batch_size]
        e = offsets[(t + 1) * batch_size]
        b = base[t]
        for i in range(s, e):
            out[i] = b + values[i]
    return out
