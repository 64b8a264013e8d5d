"""Merging jagged (KeyedJaggedTensor-layout) batches into one, in a single pass.

The serving batcher merges a dozen requests per batch; doing it with numpy
slices costs a Python step per table and request (~1 ms for 26 tables x 14
requests). This kernel copies ids, weights and re-based offsets in one pass.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tiermem.kernels._flags import HOLD_GIL, SERIAL

__all__ = ["finite_copy", "key_major_ids", "merge_key_major"]


@njit(**HOLD_GIL)
def key_major_ids(ids):
    """``(B, T)`` ids (one per sample and table) -> ``T * B`` int64, key-major.

    Holds the GIL: it runs on the HTTP event loop for one request (see HOLD_GIL).
    """
    B, T = ids.shape
    out = np.empty(B * T, np.int64)
    for t in range(T):
        for b in range(B):
            out[t * B + b] = ids[b, t]
    return out


@njit(**HOLD_GIL)
def finite_copy(x):
    """A writable float32 copy of a 2-D float32 array, and whether every value is finite.

    Holds the GIL: it runs on the HTTP event loop for one request (see HOLD_GIL).
    """
    out = np.empty(x.shape, np.float32)
    ok = True
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j]
            if not np.isfinite(v):
                ok = False
            out[i, j] = v
    return out, ok


@njit(**SERIAL)
def _merge(values, weights, offsets, vbase, obase, bsizes, T, out_values, out_weights,
           out_offsets):
    P = bsizes.size
    weighted = out_weights.size > 0  # empty when no part has weights
    pos = 0
    k = 0
    out_offsets[0] = 0
    for t in range(T):
        for p in range(P):
            B = bsizes[p]
            ob = obase[p] + t * B
            s = offsets[ob]
            e = offsets[ob + B]
            for b in range(B):
                k += 1
                out_offsets[k] = pos + offsets[ob + b + 1] - s
            src = vbase[p] + s
            for i in range(e - s):
                out_values[pos + i] = values[src + i]
            if weighted:
                for i in range(e - s):
                    out_weights[pos + i] = weights[src + i]
            pos += e - s


def merge_key_major(values: list[np.ndarray], offsets: list[np.ndarray],
                    weights: list[np.ndarray | None], num_tables: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Merge batches along the batch dimension: ``(values, offsets, weights)``.

    Each part ``p`` is key-major CSR over ``T * B_p`` bags (``offsets`` of
    ``T * B_p + 1`` entries, already valid); the result holds, per table, the
    bags of part 0, part 1, ... Weights are merged when any part has them
    (a part without weights weighs 1). The caller has validated every part.
    """
    T = int(num_tables)
    sizes = np.fromiter((v.size for v in values), np.int64, len(values))
    osizes = np.fromiter((o.size for o in offsets), np.int64, len(offsets))
    bsizes = (osizes - 1) // T
    vbase = np.cumsum(sizes) - sizes
    obase = np.cumsum(osizes) - osizes
    allv = np.concatenate(values).astype(np.int64, copy=False)
    allo = np.concatenate(offsets).astype(np.int64, copy=False)
    weighted = any(w is not None for w in weights)
    if weighted:
        allw = np.concatenate([np.ones(v.size, np.float32) if w is None else w
                               for v, w in zip(values, weights, strict=True)]
                              ).astype(np.float32, copy=False)
        out_w = np.empty(allv.size, np.float32)
    else:
        allw = out_w = np.empty(0, np.float32)
    out_v = np.empty(allv.size, np.int64)
    out_o = np.empty(int(T * bsizes.sum()) + 1, np.int64)
    _merge(allv, allw, allo, vbase, obase, bsizes, T, out_v, out_w, out_o)
    return out_v, out_o, (out_w if weighted else None)
