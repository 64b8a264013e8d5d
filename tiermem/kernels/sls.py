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

How the kernels are built (see bench/bench_sls.py for the figures):

- widths ``D % 4 == 0`` up to 512 get a kernel compiled for that width (passed as a
  width token, one cached specialisation per width): the pooled row is an
  LLVM ``<D x float>`` value kept in registers, each lookup is D/8 AVX2 adds (fp16:
  ``vcvtph2ps``; int8: sign-extend, convert, one FMA by the row's scale, the biases
  summed apart); other widths use a run-time-width loop over a scratch row;
- every 64-byte line of the row ``prefetch_distance`` (default 48) lookups ahead is
  prefetched (plus the (scale, bias) line for int8), across bag boundaries, into L2
  (``prefetcht1``): a prefetch into L1 holds one of the core's ~16 line-fill buffers
  until the line arrives from DRAM, which capped the lines in flight; into L2 it
  frees the buffer once the request is handed on, and the demand load later hits L2.
  On a 2-core Xeon (10M x 64 float32, 2048 bags) this took the kernel from 1.00-1.07x
  to 1.2-1.9x of EmbeddingBag. The prefetches are written inline (a helper taking the
  arrays costs NRT incref/decref per lookup). (An earlier mode that prefetched short
  bags by blocks of rows measured slower than this one everywhere and is gone.);
- bags are cut into ``8 x threads`` chunks of equal work (lookups + bags), which the
  threads take from an atomic counter; a thread claims its next chunk as it starts
  one and prefetches that chunk's first rows, so a chunk does not start with an empty
  pipeline; each chunk runs table by table, so the row base of a table is a loop
  constant; batches under 2048 lookups + bags, and every
  batch when Numba has one thread, run on the calling thread through a serial
  entry point (no parallel region to launch);
- float32 sums in id order (bit-equal to torch.nn.EmbeddingBag(sum) for float32
  rows); weighted sums and int8 rows use FMA (within float32 rounding of it).
"""

from __future__ import annotations

__all__ = ["PREFETCH_DISTANCE", "gather_touch", "parallel_min_work", "pool_arena",
           "sparse_lengths_sum"]

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload
from numba.np.ufunc import parallel as _npar

from tiermem.errors import InvalidBatchError
from tiermem.kernels._flags import PARALLEL, SERIAL
from tiermem.kernels._intrinsics import (
    atomic_fetch_add,
    data_address,
    half_to_float,
    load_pair,
    prefetch_bytes,
    token_width,
    vadd,
    vadd_scalar,
    vfma,
    vload_row,
    vload_row_i8,
    vscale,
    vstore_row,
    vzero,
    width_token,
)
from tiermem.kernels.validate import check_ids, check_offsets

_LINE = 64  # bytes per cache line
#: default software prefetch distance, in lookups (16-64 compared: 48-64 best)
PREFETCH_DISTANCE = 48
#: bag chunks per thread (handed out dynamically)
_CHUNKS_PER_THREAD = 8
#: below this many lookups + bags a call runs on the calling thread alone
_PARALLEL_MIN_WORK = 2048


def _as_python(typer, *args):
    """With the JIT off, run an ``@overload``: the implementation ``typer`` picks for the
    arguments' Numba types, called in plain Python."""
    return typer(*(numba.typeof(a) for a in args))(*args)


# (numba's stubs type jit_options as njit's options but cache and boundscheck, which
# overload passes on to njit as well)
def _prefetch_rows(W, Q, ids, i0, i1, base, aligned):
    return _as_python(_prefetch_rows_impl, W, Q, ids, i0, i1, base, aligned)


@overload(_prefetch_rows, jit_options=SERIAL)  # type: ignore[arg-type]
def _prefetch_rows_impl(W, Q, ids, i0, i1, base, aligned):
    """Prefetch (into L2) the rows ``base + ids[i0:i1]`` (and their (scale, bias))."""
    quant = str(W.dtype) == "int8"

    def impl(W, Q, ids, i0, i1, base, aligned):
        row_bytes = W.shape[1] * W.itemsize
        for p in range(i0, i1):
            rp = base + ids[p]
            for k in range(0, row_bytes, _LINE):
                prefetch_bytes(W, rp, k)
            if not aligned:
                prefetch_bytes(W, rp, row_bytes - 1)
            if quant:
                prefetch_bytes(Q, rp, 0)

    return impl


def _pool_segment(W, Q, ids, offsets, ja, jb, base, out, b0, cb, weights, mean, pd, aligned,
                  acc, D):
    return _as_python(_pool_segment_impl, W, Q, ids, offsets, ja, jb, base, out, b0, cb,
                      weights, mean, pd, aligned, acc, D)


@overload(_pool_segment, jit_options=SERIAL)  # type: ignore[arg-type]
def _pool_segment_impl(W, Q, ids, offsets, ja, jb, base, out, b0, cb, weights, mean, pd, aligned,
                       acc, D):
    """Pool bags ``ja:jb`` of one table (arena rows ``base + ids``) into ``out[b0:, cb:]``."""
    kind = str(W.dtype)
    quant = kind == "int8"
    weighted = not isinstance(weights, (types.NoneType, types.Omitted))

    itemsize = W.dtype.bitwidth // 8
    # (The per-lookup prefetches are written out inline below: a helper function taking
    # the arrays would cost NRT incref/decref calls per lookup.)
    fixed = token_width(D)
    if fixed is not None:
        # width known at compile time (D is a width token): the pooled row is an
        # <D x float> value held in registers
        row_bytes = fixed * itemsize
        n_lines = (row_bytes + _LINE - 1) // _LINE

        def seg_const(W, Q, ids, offsets, ja, jb, base, out, b0, cb, weights, mean, pd, aligned,
                      acc, D):
            i_end = offsets[jb]
            if pd > 0:  # the first pd rows; then one row pd lookups ahead per lookup
                i0 = offsets[ja]
                _prefetch_rows(W, Q, ids, i0, min(i0 + pd, i_end), base, aligned)
            b = b0
            for j in range(ja, jb):
                s = offsets[j]
                e = offsets[j + 1]
                v = vzero(D)
                bsum = np.float32(0.0)  # int8: the biases, added to every lane at the end
                for i in range(s, e):
                    if pd > 0:
                        # the row pd lookups ahead (across bag boundaries)
                        p = i + pd
                        if p < i_end:
                            rp = base + ids[p]
                            for k in range(n_lines):
                                prefetch_bytes(W, rp, k * _LINE)
                            if not aligned:
                                prefetch_bytes(W, rp, row_bytes - 1)
                            if quant:
                                prefetch_bytes(Q, rp, 0)
                    r = base + ids[i]
                    if quant:
                        # sum(scale * q + bias) = sum(scale * q) + sum(bias): one FMA a lane
                        sc, bi = load_pair(Q, r)
                        if weighted:
                            w = weights[i]
                            sc = sc * w
                            bi = bi * w
                        v = vfma(v, vload_row_i8(W, r, D), sc)
                        bsum += bi
                    elif weighted:
                        v = vfma(v, vload_row(W, r, D), weights[i])
                    else:
                        v = vadd(v, vload_row(W, r, D))
                if quant:
                    v = vadd_scalar(v, bsum)
                if mean and e > s:
                    v = vscale(v, np.float32(1.0) / np.float32(e - s))
                vstore_row(out, b, cb, v)
                b += 1

        return seg_const

    def seg_var(W, Q, ids, offsets, ja, jb, base, out, b0, cb, weights, mean, pd, aligned,
                acc, D):
        n = W.shape[1]
        nb = n * itemsize
        i_end = offsets[jb]
        if pd > 0:
            i0 = offsets[ja]
            _prefetch_rows(W, Q, ids, i0, min(i0 + pd, i_end), base, aligned)
        b = b0
        for j in range(ja, jb):
            s = offsets[j]
            e = offsets[j + 1]
            for d in range(n):
                acc[d] = 0.0
            for i in range(s, e):
                if pd > 0:
                    p = i + pd
                    if p < i_end:
                        rp = base + ids[p]
                        for k in range(0, nb, _LINE):
                            prefetch_bytes(W, rp, k)
                        if not aligned:
                            prefetch_bytes(W, rp, nb - 1)
                        if quant:
                            prefetch_bytes(Q, rp, 0)
                r = base + ids[i]
                w = weights[i] if weighted else np.float32(1.0)
                if quant:
                    sc, bi = load_pair(Q, r)
                    if weighted:
                        for d in range(n):
                            acc[d] += w * (sc * np.float32(W[r, d]) + bi)
                    else:
                        for d in range(n):
                            acc[d] += sc * np.float32(W[r, d]) + bi
                elif kind == "uint16":
                    if weighted:
                        for d in range(n):
                            acc[d] += w * half_to_float(W[r, d])
                    else:
                        for d in range(n):
                            acc[d] += half_to_float(W[r, d])
                else:
                    if weighted:
                        for d in range(n):
                            acc[d] += w * W[r, d]
                    else:
                        for d in range(n):
                            acc[d] += W[r, d]
            if mean and e > s:
                inv = np.float32(1.0) / np.float32(e - s)
                for d in range(n):
                    out[b, cb + d] = acc[d] * inv
            else:
                for d in range(n):
                    out[b, cb + d] = acc[d]
            b += 1

    return seg_var


@njit(**SERIAL)
def _chunk_start(offsets, c, nc):
    """First bag of chunk ``c`` of ``nc``, balancing lookups + bags (work ~ both)."""
    n_bags = offsets.size - 1
    if c <= 0:
        return 0
    if c >= nc:
        return n_bags
    total = offsets[n_bags] + n_bags
    target = (total * c) // nc
    lo = 0
    hi = n_bags
    while lo < hi:  # smallest j with offsets[j] + j >= target
        mid = (lo + hi) // 2
        if offsets[mid] + mid >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(**SERIAL)
def _pool_chunks(W, Q, ids, offsets, row_base, batch_size, col_base, weights, mean, out, pd,
                 counter, nc, D):
    """One thread's share: take chunks of bags from ``counter`` until none is left.

    A thread claims its next chunk as it starts one and prefetches that chunk's first
    ``pd`` rows right away: the first lookups of a chunk would otherwise wait for DRAM
    with nothing in flight (~0.5 us a chunk measured), which made fine chunks costly.
    """
    # rows start on a cache line: prefetching the lines 0, 64, ... of a row is enough
    aligned = data_address(W) % _LINE == 0 and W.strides[0] % _LINE == 0
    acc = np.empty(W.shape[1], np.float32)  # scratch row of the run-time-width kernel
    c = atomic_fetch_add(counter, 0, 1)
    while c < nc:
        j0 = _chunk_start(offsets, c, nc)
        j1 = _chunk_start(offsets, c + 1, nc)
        c_next = atomic_fetch_add(counter, 0, 1)
        if pd > 0 and c_next < nc:
            jn = _chunk_start(offsets, c_next, nc)
            if jn < offsets.size - 1:
                t = jn // batch_size
                i0 = offsets[jn]
                _prefetch_rows(W, Q, ids, i0, min(i0 + pd, offsets[(t + 1) * batch_size]),
                               row_base[t], aligned)
        j = j0
        while j < j1:
            t = j // batch_size
            jb = min(j1, (t + 1) * batch_size)
            _pool_segment(W, Q, ids, offsets, j, jb, row_base[t], out, j - t * batch_size,
                          col_base[t], weights, mean, pd, aligned, acc, D)
            j = jb
        c = c_next


#: what the entry points return for a batch they refused (the wrapper words the message)
_OK, _BAD_OFFSET_ENDS, _BAD_COL_BASE, _BAD_N_COL_BASE, _BAD_N_OFFSETS, _BAD_OUT_ROWS, \
    _BAD_N_WEIGHTS = range(7)


@njit(**SERIAL)
def _check_batch(W, ids, offsets, row_base, batch_size, col_base, weights,
                 out):
    """The value checks numpy would make one call each (sizes, offsets' ends, column
    ranges), done inside the kernel's own call: each numpy call from Python costs a
    microsecond or more, a sizeable share of a 2048-lookup batch."""
    nnz = ids.size
    n_tables = row_base.size
    if col_base.size != n_tables:
        return _BAD_N_COL_BASE
    if offsets.size != n_tables * batch_size + 1:
        return _BAD_N_OFFSETS
    if out.shape[0] != batch_size:
        return _BAD_OUT_ROWS
    if weights is not None and weights.size != nnz:
        return _BAD_N_WEIGHTS
    if offsets[0] != 0 or offsets[offsets.size - 1] != nnz:
        return _BAD_OFFSET_ENDS
    for t in range(n_tables):
        if col_base[t] < 0 or col_base[t] + W.shape[1] > out.shape[1]:
            return _BAD_COL_BASE
    return _OK


@njit(**PARALLEL)
def _pool_parallel(W, Q, ids, offsets, row_base, batch_size, col_base, weights, mean, out, pd,
                   n_threads, n_chunks, D):
    """Check the batch (:func:`_check_batch`), then pool it on ``n_threads`` threads.

    ``D``: a width token (compile-time constant) or an int (run-time width).
    """
    status = _check_batch(W, ids, offsets, row_base, batch_size, col_base, weights, out)
    n_bags = offsets.size - 1
    if status != _OK or n_bags == 0 or W.shape[1] == 0:
        return status
    nc = max(1, min(n_chunks, n_bags))
    nt = max(1, min(n_threads, nc))
    # one prange step per thread; the threads take chunks of bags from a shared counter,
    # so one slowed down (by another process) does not hold the batch up
    counter = np.zeros(1, np.int64)
    for _ in prange(nt):
        _pool_chunks(W, Q, ids, offsets, row_base, batch_size, col_base, weights, mean, out, pd,
                     counter, nc, D)
    return _OK


@njit(**SERIAL)
def _pool_serial(W, Q, ids, offsets, row_base, batch_size, col_base, weights, mean, out, pd,
                 D):
    """Check the batch, then pool it on the calling thread (no parallel region to
    launch). A separate entry from :func:`_pool_parallel` so that a process that only
    runs small batches never compiles the parallel kernel."""
    status = _check_batch(W, ids, offsets, row_base, batch_size, col_base, weights, out)
    if status != _OK or offsets.size == 1 or W.shape[1] == 0:
        return status
    counter = np.zeros(1, np.int64)
    _pool_chunks(W, Q, ids, offsets, row_base, batch_size, col_base, weights, mean, out, pd,
                 counter, 1, D)
    return _OK


@njit(**SERIAL)
def _gather_chunk(W, ids, i0, i1, pd, scratch, D):
    """Sum of the rows ``W[ids[i0:i1]]`` (float32 or float16 bits), prefetched as the
    pooling kernels prefetch, and nothing else: no bags, no stores."""
    row_bytes = W.shape[1] * W.itemsize
    _prefetch_rows(W, None, ids, i0, min(i0 + pd, i1), 0, True)
    v = vzero(D)
    for i in range(i0, i1):
        p = i + pd
        if pd > 0 and p < i1:
            rp = ids[p]
            for k in range(0, row_bytes, _LINE):
                prefetch_bytes(W, rp, k)
        v = vadd(v, vload_row(W, ids[i], D))
    vstore_row(scratch, 0, 0, v)
    return scratch.astype(np.float64).sum()


@njit(**PARALLEL)
def _gather_parallel(W, ids, pd, n_threads, n_chunks, D):
    """Chunks of ids handed out from an atomic counter (as in :func:`_pool_parallel`)."""
    n = ids.size
    nc = max(1, min(n_chunks, n))
    nt = max(1, min(n_threads, nc))
    counter = np.zeros(1, np.int64)
    tot = np.zeros(nt, np.float64)
    for t in prange(nt):
        scratch = np.empty((1, W.shape[1]), np.float32)
        s = 0.0
        c = atomic_fetch_add(counter, 0, 1)
        while c < nc:
            s += _gather_chunk(W, ids, c * n // nc, (c + 1) * n // nc, pd, scratch, D)
            c = atomic_fetch_add(counter, 0, 1)
        tot[t] = s
    return tot.sum()


# --- public API -------------------------------------------------------------------------

_MODES = ("sum", "mean")
_ARENA_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int8))
_F32 = np.dtype(np.float32)
_I64 = np.dtype(np.int64)


_WIDTHS: dict[int, tuple[float | int, ...]] = {}


def parallel_min_work() -> int:
    """Lookups + bags from which a batch runs on the parallel kernel (when more than one
    thread is allowed); smaller batches run serially on the calling thread."""
    return _PARALLEL_MIN_WORK


def _num_threads() -> int:
    """``numba.get_num_threads()`` without its per-call lock once the pool is up (the
    same thread-local value, read by Numba's own accessor; ~1 us -> ~0.2 us)."""
    if getattr(_npar, "_is_initialized", False):
        n = _npar._get_num_threads()  # type: ignore[attr-defined]  # internal, not in stubs
        if n > 0:
            return int(n)
    return numba.get_num_threads()  # first call, or a Numba without these internals


def _width_arg(D: int) -> tuple[float | int, ...] | int:
    """What the kernels take as ``D``: the width's token (a kernel compiled for that
    width) for widths :func:`_fixed_width` accepts, else the width itself."""
    token = _WIDTHS.get(D)
    if token is None:
        if not _fixed_width(D):
            return D
        token = _WIDTHS.setdefault(D, width_token(D))
    return token


def _fixed_width(D: int) -> bool:
    """Widths with a kernel specialised at compile time (compiled on first use, cached)."""
    return D % 4 == 0 and 4 <= D <= 512


def _rows_contiguous(a: np.ndarray) -> bool:
    """Rows stored whole at a positive row stride (e.g. int8 rows fused with their
    (scale, bias): ``W = buf[:, :D]``, ``Q = buf[:, D:D + 8].view(np.float32)``)."""
    s0, s1 = a.strides
    return s1 == a.itemsize and s0 >= a.shape[1] * a.itemsize and s0 % a.itemsize == 0


def _bad(msg: str) -> InvalidBatchError:
    return InvalidBatchError(msg)


def _check_vec(name: str, a: object, dtype: np.dtype) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != dtype:
        what = (f"a {a.ndim}-D {a.dtype} array" if isinstance(a, np.ndarray)
                else type(a).__name__)
        raise _bad(f"{name} must be a 1-D {dtype} array, got {what}")
    if not a.flags.c_contiguous:
        raise _bad(f"{name} must be contiguous")
    return a


def pool_arena(W: np.ndarray, Q: np.ndarray | None, ids: np.ndarray, offsets: np.ndarray, *,
               batch_size: int, row_base: np.ndarray, col_base: np.ndarray, out: np.ndarray,
               weights: np.ndarray | None = None, mode: str = "sum",
               prefetch_distance: int = PREFETCH_DISTANCE) -> None:
    """Pool the bags of a KeyedJaggedTensor batch over an arena into ``out``.

    ``W``: ``(n_rows, D)`` float32, float16 or int8 arena; int8 needs ``Q`` float32
    ``(n_rows, 2)`` = per-row ``(scale, bias)`` (value ``scale * q + bias``); ``Q`` is
    ignored (may be None) otherwise. Both C-contiguous, or row-strided views with
    contiguous rows: an int8 arena that keeps each row's (scale, bias) right after the
    row (``buf = (n_rows, D + 8)`` uint8, ``W = buf[:, :D].view(int8)``,
    ``Q = buf[:, D:].view(float32)``) costs one memory access per lookup instead of two.
    ``ids`` int64 table-local row ids,
    key-major; ``offsets`` int64 with ``T * B + 1`` entries (``T = len(row_base)``,
    ``B = batch_size``): bag ``j`` is table ``j // B``, sample ``j % B``, its rows are
    ``W[row_base[t] + ids[offsets[j]:offsets[j + 1]]]``; its pooled row goes to
    ``out[j % B, col_base[t] : col_base[t] + D]`` (``out`` float32 ``(B, C)``,
    C-contiguous; columns no table covers are left untouched).

    ``mode``: ``"sum"`` or ``"mean"`` (sum / bag length; an empty bag gives zeros).
    ``weights``: optional float32 per id (only with ``"sum"``): ``sum(w_i * row_i)``.
    Accumulation is float32 in id order (as ``torch.nn.EmbeddingBag``).
    ``prefetch_distance``: software prefetch of the rows that many lookups ahead
    (``0`` disables it).

    Not validated (callers must, e.g. with :mod:`tiermem.kernels.validate`): that
    ``0 <= row_base[t] + id < n_rows`` for every id and that ``offsets`` is
    non-decreasing: a bad id reads out of bounds. Only dtypes, shapes, contiguity,
    ``offsets[0] == 0``, ``offsets[-1] == len(ids)`` and the column ranges are checked
    (InvalidBatchError). Thread-safe; releases the GIL; runs on
    ``numba.get_num_threads()`` threads of the calling thread.
    """
    if not (type(W) is np.ndarray and W.dtype is _F32 and W.ndim == 2 and W.flags.c_contiguous
            and _vec_ok(ids, _I64) and _vec_ok(offsets, _I64) and _vec_ok(row_base, _I64)
            and _vec_ok(col_base, _I64) and type(out) is np.ndarray and out.dtype is _F32
            and out.ndim == 2 and out.flags.c_contiguous and out.flags.writeable
            and weights is None and mode == "sum"):
        # anything but the common case (float32 arena, no weights, sum): every check
        W, Q = _check_arena(W, Q)
        _check_vec("ids", ids, _I64)
        _check_vec("offsets", offsets, _I64)
        _check_vec("row_base", row_base, _I64)
        _check_vec("col_base", col_base, _I64)
        if (not isinstance(out, np.ndarray) or out.ndim != 2 or out.dtype != _F32
                or not out.flags.c_contiguous or not out.flags.writeable):
            what = (f"{out.ndim}-D {out.dtype}" if isinstance(out, np.ndarray)
                    else type(out).__name__)
            raise _bad(f"out must be a writeable C-contiguous 2-D float32 array, got {what}")
        if mode not in _MODES:
            raise _bad(f"mode must be 'sum' or 'mean', got {mode!r}")
        if weights is not None:
            _check_vec("weights", weights, _F32)
            if mode != "sum":
                raise _bad("per-sample weights need mode='sum'")
    else:
        Q = None
    B = int(batch_size)
    if B < 0:
        raise _bad(f"batch_size must be >= 0, got {B}")
    pd = int(prefetch_distance)
    if pd < 0:
        raise _bad(f"prefetch_distance must be >= 0, got {pd}")
    D = W.shape[1]
    width = _width_arg(D)
    n_threads = _num_threads()
    if n_threads > 1 and ids.shape[0] + offsets.shape[0] > _PARALLEL_MIN_WORK:
        status = _pool_parallel(W, Q, ids, offsets, row_base, B, col_base, weights,
                                mode == "mean", out, pd, n_threads,
                                n_threads * _CHUNKS_PER_THREAD, width)
    else:  # waking the other threads would cost more than it saves
        status = _pool_serial(W, Q, ids, offsets, row_base, B, col_base, weights,
                              mode == "mean", out, pd, width)
    if status != _OK:
        raise _bad(_refusal(status, ids, offsets, row_base, B, col_base, weights, out, D))


def _vec_ok(a: object, dtype: np.dtype) -> bool:
    """The fast test of what :func:`_check_vec` checks (``is``: numpy's own dtypes of
    native byte order are singletons; any other passes through the full check)."""
    return (type(a) is np.ndarray and a.dtype is dtype and a.ndim == 1
            and a.flags.c_contiguous)


def _check_arena(W: object, Q: object) -> tuple[np.ndarray, np.ndarray | None]:
    """Check an arena (and its (scale, bias) for int8); float16 comes back as its bits."""
    if not isinstance(W, np.ndarray) or W.ndim != 2 or W.dtype not in _ARENA_DTYPES:
        what = f"{W.ndim}-D {W.dtype}" if isinstance(W, np.ndarray) else type(W).__name__
        raise _bad(f"W must be a 2-D float32, float16 or int8 arena, got {what}")
    if not W.flags.c_contiguous and not _rows_contiguous(W):
        raise _bad("W must be C-contiguous (or have contiguous rows at a positive row stride)")
    n_rows = W.shape[0]
    if W.dtype == np.int8:
        if not isinstance(Q, np.ndarray) or Q.dtype != _F32 or Q.shape != (n_rows, 2):
            what = (f"{Q.dtype} {Q.shape}" if isinstance(Q, np.ndarray) else type(Q).__name__)
            raise _bad(f"Q must be float32 ({n_rows}, 2) (scale, bias) for an int8 arena, "
                       f"got {what}")
        if not Q.flags.c_contiguous and not _rows_contiguous(Q):
            raise _bad("Q must be C-contiguous (or have contiguous rows)")
        return W, Q
    return (W.view(np.uint16) if W.dtype == np.float16 else W), None


def _refusal(status: int, ids: np.ndarray, offsets: np.ndarray, row_base: np.ndarray, B: int,
             col_base: np.ndarray, weights: np.ndarray | None, out: np.ndarray, D: int) -> str:
    """The message for a batch :func:`_check_batch` refused."""
    T = row_base.shape[0]
    if status == _BAD_N_COL_BASE:
        return f"col_base has {col_base.shape[0]} entries, row_base {T}: one per table"
    if status == _BAD_N_OFFSETS:
        return (f"offsets has {offsets.shape[0]} entries; {T} tables x batch_size {B} "
                f"needs {T * B + 1}")
    if status == _BAD_OUT_ROWS:
        return f"out has {out.shape[0]} rows, batch_size is {B}"
    if status == _BAD_N_WEIGHTS:
        assert weights is not None
        return f"weights has {weights.shape[0]} entries, ids {ids.shape[0]}: one per id"
    if status == _BAD_OFFSET_ENDS:
        return (f"offsets must start at 0 and end at len(ids) = {ids.shape[0]}, got "
                f"[{offsets[0]}, ..., {offsets[-1]}]")
    assert status == _BAD_COL_BASE, status
    return (f"col_base must lie in [0, {out.shape[1] - D}] (out has {out.shape[1]} "
            f"columns, rows are {D} wide), got [{col_base.min()}, {col_base.max()}]")


def sparse_lengths_sum(table: np.ndarray, indices: np.ndarray, offsets: np.ndarray,
                       weights: np.ndarray | None = None, *, mode: str = "sum",
                       qparams: np.ndarray | None = None,
                       prefetch_distance: int = PREFETCH_DISTANCE) -> np.ndarray:
    """One-table EmbeddingBag: ``offsets`` has ``B + 1`` entries (include_last_offset).

    ``table``: float32, float16 or int8 ``(n_rows, D)`` (int8 with ``qparams``
    float32 ``(n_rows, 2)`` = (scale, bias)). Ids and offsets are validated
    (InvalidBatchError naming the field and the first bad value). Returns the
    pooled ``(B, D)`` float32 rows.
    """
    if not isinstance(table, np.ndarray) or table.ndim != 2:
        raise _bad("table must be a 2-D array")
    for name, a in (("indices", indices), ("offsets", offsets)):
        if not isinstance(a, np.ndarray) or a.ndim != 1:
            raise _bad(f"{name} must be a 1-D integer array")
        if a.dtype.kind not in "iu":
            raise _bad(f"{name} must hold integers, got dtype {a.dtype}")
    ids = np.ascontiguousarray(indices, dtype=np.int64)
    offs = np.ascontiguousarray(offsets, dtype=np.int64)
    if indices.dtype.kind == "u" and indices.size and int(indices.max()) > np.iinfo(np.int64).max:
        raise _bad("indices: value out of the int64 range")
    msg = check_offsets(offs, ids.shape[0])
    if msg is not None:
        raise _bad(f"offsets: {msg}")
    msg = check_ids(ids, 0, ids.shape[0], table.shape[0])
    if msg is not None:
        raise _bad(f"indices: {msg}")
    if weights is not None:
        if not isinstance(weights, np.ndarray) or weights.ndim != 1 or weights.dtype.kind != "f":
            raise _bad("weights must be a 1-D float array (one weight per index)")
        weights = np.ascontiguousarray(weights, dtype=np.float32)
    B = offs.shape[0] - 1
    out = np.zeros((B, table.shape[1]), np.float32)
    if not table.flags.c_contiguous and not _rows_contiguous(table):
        table = np.ascontiguousarray(table)
    pool_arena(table, qparams, ids, offs, batch_size=B,
               row_base=np.zeros(1, np.int64), col_base=np.zeros(1, np.int64), out=out,
               weights=weights, mode=mode, prefetch_distance=prefetch_distance)
    return out


def gather_touch(W: np.ndarray, ids: np.ndarray,
                 prefetch_distance: int = PREFETCH_DISTANCE) -> float:
    """Sum the rows ``W[ids]`` and nothing else (parallel, chunked and prefetched as the
    pooling kernels are, no bags, no output rows): what the memory allows a gather of
    these rows, the bound of :func:`pool_arena` on the same ids. ``W`` float32 or
    float16, C-contiguous, a width with a compiled kernel (``D % 4 == 0``, ``D <= 512``).
    ``ids`` are not bounds-checked. Returns the sum of the gathered values (float64)."""
    if (not isinstance(W, np.ndarray) or W.ndim != 2 or not W.flags.c_contiguous
            or W.dtype not in (_F32, np.dtype(np.float16))):
        raise _bad("W must be a C-contiguous 2-D float32 or float16 array")
    if not _fixed_width(W.shape[1]):
        raise _bad(f"W's width {W.shape[1]} has no compiled kernel (D % 4 == 0, 4 <= D <= 512)")
    if W.dtype == np.float16:
        W = W.view(np.uint16)
    _check_vec("ids", ids, _I64)
    D = W.shape[1]
    width = _width_arg(D)
    n_threads = numba.get_num_threads()
    return float(_gather_parallel(W, ids, max(0, int(prefetch_distance)), n_threads,
                                  n_threads * _CHUNKS_PER_THREAD, width))
