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

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiermem.errors import CorruptBlockError, StoreFormatError

__all__ = ["BLOCK_BYTES", "SCHEME", "BadBlock", "blocks_per_chunk", "chunk_sums",
           "bad_block", "corrupt_error", "load_sums", "scrub", "verify_loaded"]

BLOCK_BYTES = 4096
#: the checksum scheme named in a store's metadata
SCHEME = "tmh64"
#: bytes read per call while scrubbing (a multiple of BLOCK_BYTES)
_SCRUB_PIECE = 16 << 20


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


def verify_loaded(t, start: int, stop: int, w: np.ndarray,  # type: ignore[no-untyped-def]
                  q: np.ndarray | None) -> None:
    """Check rows ``[start, stop)`` of table ``t`` just read into ``w`` (and ``q``).

    Whole blocks are hashed where they lie in ``w``; a block only partly in
    ``w`` (a window's edges, a chunk's zero padding) is completed from its
    file. ``start``/``stop`` are the table's rows (``row_offset`` added here).
    """
    from tiermem.kernels.rowio import first_bad_block

    start, stop = start + t.row_offset, stop + t.row_offset
    cr = t.chunk_rows
    for what, chunk_path, rb, sums in _targets(t):
        mem = (w if what == "weights" else q)
        if mem is None or sums is None:
            continue
        mem8 = mem.reshape(-1).view(np.uint8)
        chunk_bytes = cr * rb
        for c in range(start // cr, -(-stop // cr)):
            r0, r1 = max(start, c * cr), min(stop, (c + 1) * cr)
            a, b = (r0 - c * cr) * rb, (r1 - c * cr) * rb  # file bytes of chunk c held in mem
            m0 = (r0 - start) * rb  # where byte a of the file is in mem
            head, tail = a // BLOCK_BYTES, -(-b // BLOCK_BYTES)
            full0 = -(-a // BLOCK_BYTES)
            full1 = b // BLOCK_BYTES if b < chunk_bytes else tail  # the file's last block is short
            bad = -1
            if full1 > full0:  # blocks wholly in memory: hashed in place
                lo = m0 + full0 * BLOCK_BYTES - a
                n = min(full1 * BLOCK_BYTES, chunk_bytes) - full0 * BLOCK_BYTES
                region = mem8[lo:lo + n]
                k = first_bad_block(*_views(region, n), n, sums[c], full0)
                bad = -1 if k < 0 else full0 + k
            edges = {head, tail - 1} - set(range(full0, max(full1, full0)))
            for k in sorted(edges) if bad < 0 else ():
                blk0, blk1 = k * BLOCK_BYTES, min((k + 1) * BLOCK_BYTES, chunk_bytes)
                buf = np.empty(BLOCK_BYTES, np.uint8)
                with open(chunk_path(c), "rb") as f:
                    f.seek(blk0)
                    got = f.readinto(memoryview(buf)[: blk1 - blk0])
                lo, hi = max(a, blk0), min(b, blk1)  # the part held in memory wins
                buf[lo - blk0:hi - blk0] = mem8[m0 + lo - a:m0 + hi - a]
                n = blk1 - blk0 if got == blk1 - blk0 else got
                if first_bad_block(*_views(buf, n), n, sums[c], k) >= 0:
                    bad = k
                    break
            if bad >= 0:
                raise corrupt_error([bad_block(t, what, c, bad)])


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
                        got = f.readinto(memoryview(buf))
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

