"""SparseLengthsSum (EmbeddingBag pooling) over row arenas.

Layout: the rows of one or more tables live in one 2-D *arena* ``W``
(``(n_rows, D)``; float32, float16 bits as uint16, or int8 with a float32
``Q[:, 0:2] = (scale, bias)`` per row). Table ``t`` starts at arena row
``row_base[t]``. Lookups follow TorchRec's KeyedJaggedTensor: ``ids`` holds
the values of all tables key-major, ``offsets`` has ``T * B + 1`` entries and
bag ``j`` belongs to table ``j // B``, sample ``j % B``::

    table 0: bags [ [3, 1], [] ]      ids     = [3, 1, 0, 2, 2]
    table 1: bags [ [0], [2, 2] ]     offsets = [0, 2, 2, 3, 5]   (B = 2)

Pooled rows are written to ``out[b, col_base[t] : col_base[t] + D]``.

The same kernel serves every tier and the cache: the DRAM tier passes the
table arena and table-local ids, the SSD tier a staging arena of rows it read
and their positions, a cache its slot pool and the slots.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from tiermem.kernels._flags import PARALLEL, SERIAL
from tiermem.kernels._intrinsics import half_to_float, prefetch_row

_LINE = 64  # bytes per cache line


def _accumulate(acc, W, Q, r, w):  # type: ignore[no-untyped-def]  # pragma: no cover
    """acc += w * dequant(W[r]); specialised per arena dtype below."""
    raise NotImplementedError


@overload(_accumulate, jit_options=SERIAL)
def _accumulate_impl(acc, W, Q, r, w):  # type: ignore[no-untyped-def]
    dt = W.dtype
    if dt == np.float32 or str(dt) == "float32":

        def f32(acc, W, Q, r, w):  # type: ignore[no-untyped-def]
            row = W[r]
            for d in range(acc.size):
                acc[d] += w * row[d]

        return f32
    if str(dt) == "uint16":

        def f16(acc, W, Q, r, w):  # type: ignore[no-untyped-def]
            row = W[r]
            for d in range(acc.size):
                acc[d] += w * half_to_float(row[d])

        return f16
    if str(dt) == "int8":

        def i8(acc, W, Q, r, w):  # type: ignore[no-untyped-def]
            row = W[r]
            scale = Q[r, 0]
            bias = Q[r, 1]
            for d in range(acc.size):
                acc[d] += w * (scale * np.float32(row[d]) + bias)

        return i8
    return None


def _prefetch(W, Q, r):  # type: ignore[no-untyped-def]  # pragma: no cover
    raise NotImplementedError


@overload(_prefetch, jit_options=SERIAL)
def _prefetch_impl(W, Q, r):  # type: ignore[no-untyped-def]
    itemsize = W.dtype.bitwidth // 8
    step = _LINE // itemsize
    quantized = str(W.dtype) == "int8"

    def pf(W, Q, r):  # type: ignore[no-untyped-def]
        for c in range(0, W.shape[1], step):
            prefetch_row(W, r, c)
        if quantized:
            prefetch_row(Q, r, 0)

    return pf


@njit(**PARALLEL)
def _sls(W, Q, ids, offsets, row_base, batch_size, col_base, weights, mean, out, pf_dist,
         n_chunks):  # type: ignore[no-untyped-def]
    n_bags = offsets.size - 1
    D = W.shape[1]
    has_w = weights.size > 0
    nc = min(n_chunks, n_bags)
    for c in prange(nc):
        j0 = c * n_bags // nc
        j1 = (c + 1) * n_bags // nc
        end = offsets[j1]
        jp = j0  # bag of the lookup being prefetched
        acc = np.empty(D, np.float32)
        for j in range(j0, j1):
            t = j // batch_size
            b = j - t * batch_size
            base = row_base[t]
            s = offsets[j]
            e = offsets[j + 1]
            acc[:] = 0.0
            for i in range(s, e):
                if pf_dist > 0:
                    p = i + pf_dist
                    if p < end:
                        while offsets[jp + 1] <= p:
                            jp += 1
                        _prefetch(W, Q, row_base[jp // batch_size] + ids[p])
                w = weights[i] if has_w else np.float32(1.0)
                _accumulate(acc, W, Q, base + ids[i], w)
            if mean and e > s:
                inv = np.float32(1.0) / np.float32(e - s)
                for d in range(D):
                    acc[d] *= inv
            cb = col_base[t]
            for d in range(D):
                out[b, cb + d] = acc[d]


@njit(**PARALLEL)
def _gather_touch(W, ids, step, n_chunks):  # type: ignore[no-untyped-def]
    """Read one element per cache line of each row: what memory alone allows."""
    n = ids.size
    nc = min(n_chunks, max(n, 1))
    tot = np.zeros(nc, np.float64)
    for c in prange(nc):
        s = 0.0
        for i in range(c * n // nc, (c + 1) * n // nc):
            r = ids[i]
            for k in range(0, W.shape[1], step):
                s += W[r, k]
        tot[c] = s
    return tot.sum()
