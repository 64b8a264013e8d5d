"""Row I/O kernels: dedupe, extent planning and ``pread`` of rows from chunk files.

The SSD tier reads rows with libc ``pread`` called from Numba functions that
hold no GIL, so many Python I/O threads keep tens of reads in flight (one
blocking reader gets ~14K random 4 KiB reads/s here; ~64 in flight reach the
device's ~140K/s). Nearby rows of the same chunk file are merged into one
read (an *extent*) when the gap between them is small.

Integrity: every 4 KiB block of a chunk file has a 64-bit checksum
(:func:`block_hash`, "tmh64": 8 lanes of a multiply-rotate round over 64-bit
words, folded and finalized; any change confined to one 8-byte word is always
detected, others with probability 1 - 2**-64). Version-3 stores also hold a
32-bit checksum per row (:func:`row_hash`, the low half of the row's tmh64):
the SSD tier reads just the rows and checks each inside the same GIL-free
call, right after its ``pread`` (:func:`pread_scatter`); on a version-2 store
its reads are widened to whole blocks and each block is checked there.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar, cast

import numpy as np
from numba import njit, types
from numba.core.typing import Signature

from tiermem.kernels._flags import JIT_DISABLED, SERIAL

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: bytes covered by one checksum
BLOCK_BYTES = 4096
_P1 = np.uint64(0xC2B2AE3D27D4EB4F)
_P2 = np.uint64(0x9E3779B97F4A7C15)
_P3 = np.uint64(0xFF51AFD7ED558CCD)
_P4 = np.uint64(0xC4CEB9FE1A85EC53)

# libc's pread and memcpy, bound by symbol name at link time (not by a ctypes pointer
# baked into the code), so the kernels that call them are cached across processes like
# every other kernel. Buffers go in as integer addresses: Numba turns an int into a
# void* argument, and on x86-64/aarch64 a pointer and a size_t share one register.
def _libc(name: str, sig: Signature, python: Callable[_P, _R]) -> Callable[_P, _R]:
    """libc's ``name`` as the kernels call it; with the JIT off, ``python`` (the same call)."""
    if JIT_DISABLED:
        return python
    return cast(Callable[_P, _R], types.ExternalFunction(name, sig))


def _py_pread(fd: int, addr: int, nbytes: int, offset: int) -> int:
    """(The kernels pass numpy integers: ctypes takes Python ints only.)"""
    try:
        buf = (ctypes.c_char * int(nbytes)).from_address(int(addr))
        return os.preadv(int(fd), [buf], int(offset))
    except OSError:
        return -1


def _py_memcpy(dst: int, src: int, nbytes: int) -> int:
    ctypes.memmove(int(dst), int(src), int(nbytes))
    return dst


_pread = _libc("pread", types.intp(types.intc, types.voidptr, types.uintp, types.int64),
               _py_pread)
_memcpy = _libc("memcpy", types.voidptr(types.voidptr, types.voidptr, types.uintp), _py_memcpy)


@njit(**SERIAL)
def dedupe_sorted(ids):
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
def plan_extents(rows, chunk_rows, row_bytes, gap_bytes, max_extent_bytes):
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
def _pread_full(fd, addr, nbytes, offset):
    got = 0
    while got < nbytes:
        r = _pread(fd, addr + got, nbytes - got, offset + got)
        if r <= 0:
            return -1 if r < 0 else got
        got += r
    return got


@njit(**SERIAL)
def pread_scatter(ext_fd, ext_off, ext_len, ext_u0, row_src, row_dst, row_nb, scratch,
                  e_start, e_stop, align, ext_sum0, sums, scratch64, row_sum_at, row_sums,
                  rowbuf, rowbuf64):
    """Read extents ``[e_start, e_stop)`` of a whole batch's plan; rows land at their addresses.

    One plan covers every table and file of a batch: extent ``e`` reads
    ``ext_len[e]`` bytes at ``ext_off[e]`` of file ``ext_fd[e]`` and holds
    the wanted rows ``ext_u0[e] .. ext_u0[e + 1] - 1``; row ``u`` is the
    ``row_nb[u]`` bytes at ``row_src[u]`` within the extent and goes to
    address ``row_dst[u]`` (a cache slot, a staging row). A lone row that
    fills its extent is read straight to its address; otherwise the extent
    goes through ``scratch`` (``align``-aligned, at least the largest extent
    plus ``2 * align``). With ``align > 0`` (O_DIRECT) reads are widened to
    ``align`` boundaries. An extent with ``ext_sum0[e] >= 0`` is verified:
    widened to whole :data:`BLOCK_BYTES` blocks (like O_DIRECT), and block
    ``k`` of its file must hash to ``sums[ext_sum0[e] + k]`` (``scratch64``
    is ``scratch`` as uint64). An extent whose rows have row checksums
    (``row_sum_at[u] >= 0``, a version-3 store) is read as it is, through
    ``scratch``, and each wanted row ``u`` must hash to
    ``row_sums[row_sum_at[u]]`` (:func:`row_hash`; ``rowbuf``/``rowbuf64``
    hold a row that is not 8-byte aligned in ``scratch``) before it is
    copied out: no widening. Returns -1, the first extent whose read
    failed, or ``-2 - e`` for the first extent holding a corrupt block or row.
    """
    scr = scratch.ctypes.data
    for e in range(e_start, e_stop):
        fd = ext_fd[e]
        off = ext_off[e]
        nb = ext_len[e]
        a = ext_u0[e]
        b = ext_u0[e + 1]
        rows_checked = row_sum_at[a] >= 0
        blocks_checked = not rows_checked and ext_sum0[e] >= 0
        if align == 0 and not rows_checked and not blocks_checked and b - a == 1 \
                and row_nb[a] == nb:
            if _pread_full(fd, row_dst[a], nb, off) != nb:
                return e
            continue
        # widened to whole blocks for a block check, to ``align`` for O_DIRECT
        w = BLOCK_BYTES if blocks_checked else align
        lead = off % w if w > 0 else 0
        span = ((lead + nb + w - 1) // w) * w if w > 0 else nb
        got = _pread_full(fd, scr, span, off - lead)
        if got < lead + nb:
            return e
        if rows_checked:
            for u in range(a, b):
                h = row_hash(scratch, scratch64, lead + row_src[u], row_nb[u], rowbuf, rowbuf64)
                if h != row_sums[row_sum_at[u]]:
                    return -2 - e
        elif blocks_checked:
            # a short read ends at the end of the file: its last block is short
            if first_bad_block(scratch64, scratch, got, sums,
                               ext_sum0[e] + (off - lead) // BLOCK_BYTES) >= 0:
                return -2 - e
        for u in range(a, b):
            _memcpy(row_dst[u], scr + lead + row_src[u], row_nb[u])
    return -1


@njit(**SERIAL, inline="always")
def _round(acc, word):
    x = (acc ^ word) * _P1
    return (x << np.uint64(31)) | (x >> np.uint64(33))


@njit(**SERIAL)
def block_hash(b64, b8, off, nbytes):
    """The "tmh64" checksum of the ``nbytes`` bytes at byte ``off`` of a buffer.

    ``b8`` is the buffer as uint8 and ``b64`` the same memory as uint64
    (``off`` a multiple of 8). Eight lanes make the rounds independent
    (~10 GB/s); every round and the fold are bijective in the word and in the
    lane, so one changed word always changes the sum. The length is mixed in, so a
    block cut short never matches.
    """
    a0 = _P2
    a1 = np.uint64(2) * _P2
    a2 = np.uint64(3) * _P2
    a3 = np.uint64(4) * _P2
    a4 = np.uint64(5) * _P2
    a5 = np.uint64(6) * _P2
    a6 = np.uint64(7) * _P2
    a7 = np.uint64(8) * _P2
    w0 = off // 8
    n_words = nbytes // 8
    n_stripes = n_words // 8
    one = np.uint64(1)
    for j in range(n_stripes):
        # unsigned indices: no negative-index wraparound test per load (1.6x faster)
        p = np.uint64(w0 + j * 8)
        a0 = _round(a0, b64[p])
        a1 = _round(a1, b64[p + one])
        a2 = _round(a2, b64[p + np.uint64(2)])
        a3 = _round(a3, b64[p + np.uint64(3)])
        a4 = _round(a4, b64[p + np.uint64(4)])
        a5 = _round(a5, b64[p + np.uint64(5)])
        a6 = _round(a6, b64[p + np.uint64(6)])
        a7 = _round(a7, b64[p + np.uint64(7)])
    h = np.uint64(nbytes) * _P2
    h = (h ^ a0) * _P2
    h = (h ^ a1) * _P2
    h = (h ^ a2) * _P2
    h = (h ^ a3) * _P2
    h = (h ^ a4) * _P2
    h = (h ^ a5) * _P2
    h = (h ^ a6) * _P2
    h = (h ^ a7) * _P2
    for k in range(n_stripes * 8, n_words):  # words after the last full stripe
        h = _round(h, b64[w0 + k])
    rest = nbytes - n_words * 8
    if rest:  # the last 1..7 bytes, as one little-endian word
        t = np.uint64(0)
        q = off + n_words * 8
        for k in range(rest):
            t |= np.uint64(b8[q + k]) << np.uint64(8 * k)
        h = _round(h, t)
    h ^= h >> np.uint64(33)
    h *= _P3
    h ^= h >> np.uint64(33)
    h *= _P4
    h ^= h >> np.uint64(33)
    return h


@njit(**SERIAL)
def block_hashes(b64, b8, nbytes, out):
    """Checksums of the blocks of the first ``nbytes`` bytes (the last block may be short)."""
    n = (nbytes + BLOCK_BYTES - 1) // BLOCK_BYTES
    for k in range(n):
        out[k] = block_hash(b64, b8, k * BLOCK_BYTES, min(BLOCK_BYTES, nbytes - k * BLOCK_BYTES))
    return n


@njit(**SERIAL)
def first_bad_block(b64, b8, nbytes, sums, s0):
    """The first block of the buffer whose checksum is not ``sums[s0 + k]``, or -1."""
    n = (nbytes + BLOCK_BYTES - 1) // BLOCK_BYTES
    for k in range(n):
        h = block_hash(b64, b8, k * BLOCK_BYTES, min(BLOCK_BYTES, nbytes - k * BLOCK_BYTES))
        if s0 + k >= sums.size or h != sums[s0 + k]:
            return k
    return -1


@njit(**SERIAL)
def row_hash(b8, b64, off, nbytes, tmp8, tmp64):
    """The row checksum of the ``nbytes`` bytes at byte ``off``: the low 32 bits of their
    tmh64 (copied to ``tmp8``, 8-byte aligned, when ``off`` is not)."""
    if off % 8 == 0:
        h = block_hash(b64, b8, off, nbytes)
    else:
        for k in range(nbytes):
            tmp8[k] = b8[off + k]
        h = block_hash(tmp64, tmp8, 0, nbytes)
    return np.uint32(h & np.uint64(0xFFFFFFFF))


@njit(**SERIAL)
def row_hashes(b8, b64, row_bytes, n_rows, tmp8, tmp64, out):
    """Row checksums of ``n_rows`` consecutive rows of ``row_bytes`` bytes from byte 0."""
    for r in range(n_rows):
        out[r] = row_hash(b8, b64, r * row_bytes, row_bytes, tmp8, tmp64)
