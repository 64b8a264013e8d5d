"""Block checksums of a store: computed when chunks are written, checked when they are read.

Every chunk file (weights, and qparams of int8 tables) is cut into 4 KiB
blocks (the last one of a file may be shorter); each block has a 64-bit
"tmh64" checksum (:func:`tiermem.kernels.rowio.block_hash`). The sums of a
chunk file are one row of a zarr array beside the data (``weight_sums``,
``qparams_sums``: ``(n_chunks, blocks per chunk)`` uint64, one chunk file per
row), so a plain ``zarr.open`` still reads every array.

Who checks what: the DRAM and CXL tiers every block of what they load
(:func:`verify_loaded`), the SSD tier every block a ``pread`` covers (in its
read kernel), ``tiermem verify`` every block of the store (:func:`scrub`).
A mismatch is a :class:`~tiermem.errors.CorruptBlockError` naming the table,
the rows and the file; the rows are never served.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiermem.chunkio import pread_exact
from tiermem.errors import CorruptBlockError, StoreFormatError

__all__ = ["BLOCK_BYTES", "SCHEME", "BadBlock", "blocks_per_chunk", "chunk_sums",
           "bad_block", "corrupt_error", "file_sum", "hash_threads", "load_row_sums", "load_sums",
           "read_verified", "row_sums", "scrub", "verify_loaded"]

BLOCK_BYTES = 4096
#: the checksum scheme named in a store's metadata
SCHEME = "tmh64"
#: bytes read per call while scrubbing (a multiple of BLOCK_BYTES)
_SCRUB_PIECE = 16 << 20
#: bytes a load reads before handing them to a hashing thread: small enough to be still in
#: the caches when hashed, large enough that a future costs nothing next to it
LOAD_PIECE = 1 << 20


def blocks_per_chunk(chunk_bytes: int) -> int:
    return max(1, -(-chunk_bytes // BLOCK_BYTES))


def _views(buf: np.ndarray, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``nbytes`` of a buffer as uint8 and its whole words as uint64 (same memory)."""
    b8 = buf.reshape(-1).view(np.uint8)[:nbytes]
    return b8[: nbytes // 8 * 8].view(np.uint64), b8


def chunk_sums(data: np.ndarray) -> np.ndarray:
    """Checksums of the blocks of a chunk's bytes (a C-contiguous array)."""
    from tiermem.kernels.rowio import block_hashes

    data = np.ascontiguousarray(data)
    out = np.empty(blocks_per_chunk(data.nbytes), np.uint64)
    if data.nbytes:
        b64, b8 = _views(data, data.nbytes)
        block_hashes(b64, b8, data.nbytes, out)
    else:
        out[:] = 0
    return out


def load_sums(sums_dir: Path, n_chunks: int, bpc: int, first_chunk: int = 0) -> np.ndarray:
    """The ``(n_chunks, bpc)`` checksums of a data array (rows before ``first_chunk`` zero)."""
    out = np.zeros((n_chunks, bpc), np.uint64)
    for c in range(first_chunk, n_chunks):
        p = sums_dir / "c" / str(c) / "0"
        with open(p, "rb") as f:
            got = f.readinto(memoryview(out[c]).cast("B"))
        if got != bpc * 8:
            raise StoreFormatError(f"checksum file {p} has {got} bytes, expected {bpc * 8}")
    return out


@dataclass(frozen=True)
class BadBlock:
    """One block whose bytes do not match their checksum."""

    table: str
    what: str  # "weights" or "qparams"
    path: Path
    chunk: int
    block: int
    rows: tuple[int, int]  # first and last stored row the block holds (may be padding)

    def __str__(self) -> str:
        a = self.block * BLOCK_BYTES
        return (f"table {self.table!r} {self.what}: rows {self.rows[0]}-{self.rows[1]}, "
                f"block {self.block} (bytes {a}-{a + BLOCK_BYTES - 1}) of {self.path}")


def bad_block(t, what: str, chunk: int, block: int) -> BadBlock:  # type: ignore[no-untyped-def]
    rb = t.spec.row_bytes if what == "weights" else 8
    a = block * BLOCK_BYTES
    first = chunk * t.chunk_rows + a // rb
    last = chunk * t.chunk_rows + (min(a + BLOCK_BYTES, t.chunk_rows * rb) - 1) // rb
    path = t.weight_chunk(chunk) if what == "weights" else t.qparams_chunk(chunk)
    return BadBlock(t.name, what, path, chunk, block, (int(first), int(last)))


def corrupt_error(bad: list[BadBlock]) -> CorruptBlockError:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return CorruptBlockError(
        f"{bad[0]} fails its checksum{more}: the store is corrupt (disk, copy or an edit "
        "after creation); its rows are not served. Run `tiermem verify STORE` for every bad "
        "block", bad)


def _targets(t):  # type: ignore[no-untyped-def]
    """``(what, data chunk path function, row bytes, sums)`` of a table's checked arrays."""
    yield "weights", t.weight_chunk, t.spec.row_bytes, t.weight_sums
    if t.qparams_dir is not None and t.qparams_sums is not None:
        yield "qparams", t.qparams_chunk, 8, t.qparams_sums


def _check_range(t, what: str, chunk_path, rb: int, sums: np.ndarray,  # type: ignore[no-untyped-def]
                 c: int, a: int, b: int, region8: np.ndarray) -> BadBlock | None:
    """Check bytes ``[a, b)`` of chunk file ``c``, held in ``region8`` (uint8).

    Whole blocks are hashed where they lie; a block only partly held (a
    window's edges) is completed from its file. Runs on the hashing threads.
    """
    from tiermem.kernels.rowio import first_bad_block

    chunk_bytes = t.chunk_rows * rb
    head, tail = a // BLOCK_BYTES, -(-b // BLOCK_BYTES)
    full0 = -(-a // BLOCK_BYTES)
    full1 = b // BLOCK_BYTES if b < chunk_bytes else tail  # the file's last block is short
    if full1 > full0:  # blocks wholly in memory: hashed in place
        lo = full0 * BLOCK_BYTES - a
        n = min(full1 * BLOCK_BYTES, chunk_bytes) - full0 * BLOCK_BYTES
        region = region8[lo:lo + n]
        k = first_bad_block(*_views(region, n), n, sums[c], full0)
        if k >= 0:
            return bad_block(t, what, c, full0 + k)
    for k in sorted({head, tail - 1} - set(range(full0, max(full1, full0)))):
        blk0, blk1 = k * BLOCK_BYTES, min((k + 1) * BLOCK_BYTES, chunk_bytes)
        buf = np.empty(BLOCK_BYTES, np.uint8)
        with open(chunk_path(c), "rb") as f:
            f.seek(blk0)
            got = f.readinto(buf.data[: blk1 - blk0])
        lo, hi = max(a, blk0), min(b, blk1)  # the part held in memory wins
        buf[lo - blk0:hi - blk0] = region8[lo - a:hi - a]
        n = blk1 - blk0 if got == blk1 - blk0 else got
        if first_bad_block(*_views(buf, n), n, sums[c], k) >= 0:
            return bad_block(t, what, c, k)
    return None


def _pieces(t, start: int, stop: int, w: np.ndarray, q: np.ndarray | None,  # type: ignore[no-untyped-def]
            piece: int):
    """``(what, path fn, row bytes, sums, chunk, a, b, region8)`` per piece of rows
    ``[start, stop)`` (table rows): file bytes ``[a, b)`` of a chunk, cut at multiples of
    ``piece`` bytes of the file (so only the window's edges split a block)."""
    start, stop = start + t.row_offset, stop + t.row_offset
    cr = t.chunk_rows
    for what, chunk_path, rb, sums in _targets(t):
        mem = w if what == "weights" else q
        if mem is None or sums is None:
            continue
        mem8 = mem.reshape(-1).view(np.uint8)
        for c in range(start // cr, -(-stop // cr)):
            r0, r1 = max(start, c * cr), min(stop, (c + 1) * cr)
            a, b = (r0 - c * cr) * rb, (r1 - c * cr) * rb  # file bytes of chunk c held in mem
            m0 = (r0 - start) * rb  # where byte a of the file is in mem
            pa = a
            while pa < b:
                pb = min(b, (pa // piece + 1) * piece)
                yield what, chunk_path, rb, sums, c, pa, pb, mem8[m0 + pa - a:m0 + pb - a]
                pa = pb


def verify_loaded(t, start: int, stop: int, w: np.ndarray,  # type: ignore[no-untyped-def]
                  q: np.ndarray | None) -> None:
    """Check rows ``[start, stop)`` of table ``t`` already read into ``w`` (and ``q``).

    ``start``/``stop`` are the table's rows (``row_offset`` added here).
    """
    for what, path, rb, sums, c, a, b, region in _pieces(t, start, stop, w, q, 1 << 62):
        bad = _check_range(t, what, path, rb, sums, c, a, b, region)
        if bad is not None:
            raise corrupt_error([bad])


def hash_threads() -> int:
    """Threads that hash a load while the loading thread reads on: the other cores (1-4)."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def read_verified(t, start: int, stop: int, w: np.ndarray,  # type: ignore[no-untyped-def]
                  q: np.ndarray | None, pool: Executor,
                  on_bytes: Callable[[int], None] | None = None) -> None:
    """Read rows ``[start, stop)`` of ``t`` into ``w`` (and ``q``) and check every block.

    The calling thread reads :data:`LOAD_PIECE` bytes at a time; each piece
    is hashed on ``pool`` right after it lands, while it is still in the
    caches and while the next piece is read, so the hashing overlaps the
    reading instead of being a second pass over the whole table.
    """
    futures = []
    try:
        for what, path, rb, sums, c, a, b, region in _pieces(t, start, stop, w, q, LOAD_PIECE):
            pread_exact(path(c), a, memoryview(region))
            futures.append(pool.submit(_check_range, t, what, path, rb, sums, c, a, b, region))
            if on_bytes is not None:
                on_bytes(b - a)
        bad = [x for x in (f.result() for f in futures) if x is not None]
    finally:
        for f in futures:
            f.cancel()
    if bad:
        raise corrupt_error(bad)


def row_sums(data: np.ndarray, row_bytes: int) -> np.ndarray:
    """Row checksums (uint32) of a chunk's consecutive rows of ``row_bytes`` bytes."""
    from tiermem.kernels.rowio import row_hashes

    data = np.ascontiguousarray(data)
    n = data.nbytes // row_bytes
    out = np.empty(n, np.uint32)
    tmp = np.empty(-(-row_bytes // 8), np.uint64)
    b64, b8 = _views(data, data.nbytes)
    row_hashes(b8, b64, row_bytes, n, tmp.view(np.uint8), tmp, out)
    return out


def file_sum(data: np.ndarray) -> str:
    """The tmh64 of a whole (small) file's bytes, as 16 hex digits (a row-sum file's check)."""
    from tiermem.kernels.rowio import block_hash

    data = np.ascontiguousarray(data)
    b64, b8 = _views(data, data.nbytes)
    return f"{int(block_hash(b64, b8, 0, data.nbytes)):016x}"


def load_row_sums(t, what: str) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    """A table's row checksums (``what``: "weights" or "qparams") for its chunks
    ``first_chunk..n_chunks-1``, each file checked against its own checksum (None: the
    store has none, version 2 or older)."""
    d = t.weight_rowsums_dir if what == "weights" else t.qparams_rowsums_dir
    if d is None:
        return None
    cr = t.chunk_rows
    out = np.empty((t.n_chunks - t.first_chunk) * cr, np.uint32)
    want = t.rowsum_file_sums(what)
    for c in range(t.first_chunk, t.n_chunks):
        p = d / "c" / str(c) / "0"
        part = out[(c - t.first_chunk) * cr:(c - t.first_chunk + 1) * cr]
        with open(p, "rb") as f:
            got = f.readinto(part.data.cast("B"))
        if got != cr * 4 or c >= len(want) or file_sum(part) != want[c]:
            raise CorruptBlockError(
                f"table {t.name!r} {what}: the row checksums of rows {c * cr}-{(c + 1) * cr - 1}"
                f" ({p}) fail their own checksum: the store is corrupt; no row of this table "
                "is served. Run `tiermem verify STORE`", [])
    return out


def scrub(store, on_bytes: Callable[[int], None] | None = None  # type: ignore[no-untyped-def]
          ) -> Iterator[BadBlock]:
    """Every bad block of a store, reading each chunk file once, in order."""
    from tiermem.kernels.rowio import block_hashes

    buf = np.empty(_SCRUB_PIECE, np.uint8)
    b64_all = buf.view(np.uint64)
    sums_piece = np.empty(_SCRUB_PIECE // BLOCK_BYTES, np.uint64)
    for t in store.tables:
        for what, chunk_path, _, sums in _targets(t):
            for c in range(t.first_chunk, t.n_chunks):
                path = chunk_path(c)
                with open(path, "rb", buffering=0) as f:
                    pos = 0
                    while True:
                        got = f.readinto(buf.data)
                        if not got:
                            break
                        n_blk = block_hashes(b64_all, buf, got, sums_piece)
                        k0 = pos // BLOCK_BYTES
                        want = sums[c, k0:k0 + n_blk]
                        for k in np.flatnonzero(sums_piece[:want.size] != want):
                            yield bad_block(t, what, c, k0 + int(k))
                        if want.size < n_blk:  # a file longer than its checksums
                            yield bad_block(t, what, c, k0 + want.size)
                        pos += got
                        if on_bytes is not None:
                            on_bytes(got)
        for what in ("weights", "qparams"):  # each row-checksum file against its own sum
            d = t.weight_rowsums_dir if what == "weights" else t.qparams_rowsums_dir
            if d is None:
                continue
            want = t.rowsum_file_sums(what)
            for c in range(t.first_chunk, t.n_chunks):
                p = d / "c" / str(c) / "0"
                data = np.fromfile(p, np.uint8)
                if c >= len(want) or file_sum(data) != want[c]:
                    cr = t.chunk_rows
                    yield BadBlock(t.name, f"{what} row sums", p, c, 0,
                                   (c * cr, (c + 1) * cr - 1))

