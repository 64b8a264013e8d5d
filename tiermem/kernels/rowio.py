"""Row I/O kernels: dedupe, extent planning and ``pread`` of rows from chunk files.

The SSD tier reads rows with libc ``pread`` called from Numba functions that
hold no GIL, so many Python I/O threads keep tens of reads in flight (one
blocking reader gets ~14K random 4 KiB reads/s here; ~64 in flight reach the
device's ~140K/s). Nearby rows of the same chunk file are merged into one
read (an *extent*) when the gap between them is small.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

from tiermem.kernels._flags import SERIAL

# libc's pread and memcpy, bound by symbol name at link time (not by a ctypes pointer
# baked into the code), so the kernels that call them are cached across processes like
# every other kernel. Buffers go in as integer addresses: Numba turns an int into a
# void* argument, and on x86-64/aarch64 a pointer and a size_t share one register.
_pread = types.ExternalFunction(
    "pread", types.intp(types.intc, types.voidptr, types.uintp, types.int64))
_memcpy = types.ExternalFunction(
    "memcpy", types.voidptr(types.voidptr, types.voidptr, types.uintp))


@njit(**SERIAL)
def dedupe_sorted(ids):  # type: ignore[no-untyped-def]
    """Unique ids (sorted) and, for each input id, its position in them."""
    n = ids.size
    order = np.argsort(ids, kind="quicksort")
    inverse = np.empty(n, np.int64)
    uniq = np.empty(n, np.int64)
    k = -1
    prev = 0
    for j in range(n):
        v = ids[order[j]]
        if k < 0 or v != prev:
            k += 1
            uniq[k] = v
            prev = v
        inverse[order[j]] = k
    return uniq[: k + 1].copy(), inverse


@njit(**SERIAL)
def plan_extents(rows, chunk_rows, row_bytes, gap_bytes, max_extent_bytes):  # type: ignore[no-untyped-def]
    """Group sorted unique ``rows`` into reads.

    Returns ``(chunk, first, nrows, u0)`` per extent: chunk file index, first
    row within the chunk, rows spanned, and the index in ``rows`` of the first
    wanted row (an extent covers ``rows[u0[e]:u0[e + 1]]``).
    """
    n = rows.size
    chunk = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    nrows = np.empty(n, np.int64)
    u0 = np.empty(n + 1, np.int64)
    max_rows = max(1, max_extent_bytes // row_bytes)
    gap_rows = gap_bytes // row_bytes
    e = -1
    cur_c = -1
    cur_end = 0  # chunk-local row after the current extent
    for u in range(n):
        c = rows[u] // chunk_rows
        r = rows[u] - c * chunk_rows
        if e >= 0 and c == cur_c and r - cur_end <= gap_rows and r + 1 - first[e] <= max_rows:
            nrows[e] = r + 1 - first[e]
            cur_end = r + 1
        else:
            e += 1
            chunk[e] = c
            first[e] = r
            nrows[e] = 1
            u0[e] = u
            cur_c = c
            cur_end = r + 1
    u0[e + 1] = n
    return chunk[: e + 1].copy(), first[: e + 1].copy(), nrows[: e + 1].copy(), u0[: e + 2].copy()


@njit(**SERIAL)
def _pread_full(fd, addr, nbytes, offset):  # type: ignore[no-untyped-def]
    got = 0
    while got < nbytes:
        r = _pread(fd, addr + got, nbytes - got, offset + got)
        if r <= 0:
            return -1 if r < 0 else got
        got += r
    return got


@njit(**SERIAL)
def pread_scatter(ext_fd, ext_off, ext_len, ext_u0, row_src, row_dst, row_nb, scratch,  # type: ignore[no-untyped-def]
                  e_start, e_stop, align):
    """Read extents ``[e_start, e_stop)`` of a whole batch's plan; rows land at their addresses.

    One plan covers every table and file of a batch: extent ``e`` reads
    ``ext_len[e]`` bytes at ``ext_off[e]`` of file ``ext_fd[e]`` and holds
    the wanted rows ``ext_u0[e] .. ext_u0[e + 1] - 1``; row ``u`` is the
    ``row_nb[u]`` bytes at ``row_src[u]`` within the extent and goes to
    address ``row_dst[u]`` (a cache slot, a staging row). A lone row that
    fills its extent is read straight to its address; otherwise the extent
    goes through ``scratch`` (``align``-aligned, at least the largest extent
    plus ``2 * align``). With ``align > 0`` (O_DIRECT) reads are widened to
    ``align`` boundaries. Returns -1, or the first extent that failed.
    """
    scr = scratch.ctypes.data
    for e in range(e_start, e_stop):
        fd = ext_fd[e]
        off = ext_off[e]
        nb = ext_len[e]
        a = ext_u0[e]
        b = ext_u0[e + 1]
        if align == 0 and b - a == 1 and row_nb[a] == nb:
            if _pread_full(fd, row_dst[a], nb, off) != nb:
                return e
            continue
        lead = 0
        if align > 0:
            lead = off % align
            span = ((lead + nb + align - 1) // align) * align
            got = _pread_full(fd, scr, span, off - lead)
        else:
            got = _pread_full(fd, scr, nb, off)
        if got < lead + nb:
            return e
        for u in range(a, b):
            _memcpy(row_dst[u], scr + lead + row_src[u], row_nb[u])
    return -1
