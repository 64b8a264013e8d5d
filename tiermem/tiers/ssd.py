"""SSD tier: rows read from the store's chunk files with ``pread``, per batch.

Per batch and table the ids are deduplicated, sorted rows are merged into
extents (nearby rows of one file become one read), and a pool of I/O threads
reads the extents in parallel: each thread runs a Numba function that holds
no GIL, so tens of reads are in flight. The rows land in a staging arena and
the SLS kernel pools from there. The table is never loaded.

Files are opened once and advised ``POSIX_FADV_RANDOM``: with the default
read-ahead, every random 4 KiB read would pull in more pages than it needs.
With ``TierConfig.direct_io`` they are opened ``O_DIRECT``: reads bypass the
page cache (widened to 4 KiB blocks), so DRAM use stays what the runtime
allocates, the honest setting for a table larger than memory.

With checksums (``TierConfig.verify``, the default) every row is checked in
the read kernel right after its ``pread``: on a version-3 store against its
own 32-bit row checksum (held in DRAM, 4 bytes per row and per qparams row,
loaded and checked at open), so a read stays row-sized; on a version-2 store
the read is widened to whole 4 KiB blocks and each block is hashed. A
mismatch fails the batch with a :class:`~tiermem.errors.CorruptBlockError`
naming table, rows and file: its rows are never pooled.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tiermem.config import PoolingMode, TierConfig, TierKind
from tiermem.errors import CorruptBlockError, InvalidBatchError, StoreError
from tiermem.features import SparseFeatures
from tiermem.format import StoreInfo, TableInfo
from tiermem.integrity import BLOCK_BYTES, bad_block, corrupt_error
from tiermem.kernels.rowio import dedupe_sorted, plan_extents, pread_scatter
from tiermem.stats import TableStats
from tiermem.tiers.base import ReadRequest, Tier

__all__ = ["SsdTier"]

_ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers
#: extents per I/O slice at least: a future costs ~20-50 us, a page-cached read ~1-2 us
_MIN_EXTENTS_PER_SLICE = 16


def _raise_nofile_limit(need: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            new = hard if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ImportError, ValueError, OSError):
        pass


class _TableFiles:
    """Open file descriptors of one table's chunk files (weights, qparams)."""

    def __init__(self, t: TableInfo, direct: bool = False) -> None:
        self.info = t
        self.direct = direct
        self.weight = np.full(t.n_chunks, -1, np.int32)
        self.qparams = np.full(t.n_chunks, -1, np.int32) if t.qparams_dir is not None else None
        try:
            for c in range(t.first_chunk, t.n_chunks):
                self.weight[c] = self._open(str(t.weight_chunk(c)), direct)
                if self.qparams is not None:
                    self.qparams[c] = self._open(str(t.qparams_chunk(c)), direct)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(path: str, direct: bool) -> int:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if direct:
            if not hasattr(os, "O_DIRECT"):
                raise StoreError("direct_io needs O_DIRECT, which this platform lacks")
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise StoreError(f"cannot open chunk file {path}: {e.strerror}"
                             + (" (the file system may not support O_DIRECT)" if direct else "")
                             ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder opens O_RDONLY, then reads fail
            os.close(fd)
            raise StoreError(f"cannot open chunk file {path}: not a regular file")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def all_fds(self) -> list[int]:
        fds = [int(f) for f in self.weight if f >= 0]
        if self.qparams is not None:
            fds += [int(f) for f in self.qparams if f >= 0]
        return fds

    def close(self) -> None:
        for fd in self.all_fds():
            try:
                os.close(fd)
            except OSError:
                pass
        self.weight[:] = -1
        if self.qparams is not None:
            self.qparams[:] = -1


class SsdTier(Tier):
    """Rows served from disk through parallel ``pread``; nothing is preloaded."""

    kind = TierKind.SSD

    def __init__(self, store: StoreInfo, config: TierConfig | None = None) -> None:
        super().__init__(store, config)
        need = sum((t.n_chunks - t.first_chunk) * (2 if t.qparams_dir else 1)
                   for t in self.tables) + 256
        _raise_nofile_limit(need)
        self._files: list[_TableFiles] = []
        try:
            for t in self.tables:
                self._files.append(_TableFiles(t, self.config.direct_io))
        except BaseException:
            for f in self._files:
                f.close()
            raise
        self._sum0: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._rsum0: list[tuple[int, int]] = []
        self._rsums = self._gather_row_sums()
        self._sums = self._gather_sums()
        self._pool = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="tiermem-io")
        self._bg_pool = ThreadPoolExecutor(self.config.background_io_threads,
                                           thread_name_prefix="tiermem-io-bg")
        self._scratch = threading.local()

    def _gather_sums(self) -> np.ndarray:
        """All tables' block checksums in one array; per table and file, where its sums start
        (-1: not verified, ``verify=False`` or a store without checksums)."""
        parts = []
        n = 0
        for t, f in zip(self.tables, self._files, strict=True):
            w0 = np.full(t.n_chunks, -1, np.int64)
            q0 = np.full(t.n_chunks, -1, np.int64) if f.qparams is not None else None
            if self.config.verify and t.verified and not t.row_checked:
                for sums, base in ((t.weight_sums, w0), (t.qparams_sums, q0)):
                    if base is None or sums is None:
                        continue
                    base[:] = n + np.arange(t.n_chunks) * sums.shape[1]
                    parts.append(sums.reshape(-1))
                    n += sums.size
            self._sum0.append((w0, q0))
        return np.concatenate(parts) if parts else np.zeros(1, np.uint64)

    def _gather_row_sums(self) -> np.ndarray:
        """All tables' row checksums in one array (each file checked as it is loaded);
        per table, where its weights' and qparams' start (-1: none, blocks are checked)."""
        from tiermem.integrity import load_row_sums

        parts = []
        n = 0
        for t in self.tables:
            bases = [-1, -1]
            if self.config.verify and t.row_checked:
                for k, what in enumerate(("weights", "qparams") if t.qparams_dir else ("weights",)):
                    rs = load_row_sums(t, what)
                    assert rs is not None
                    bases[k] = n
                    parts.append(rs)
                    n += rs.size
            self._rsum0.append((bases[0], bases[1]))
        return np.concatenate(parts) if parts else np.zeros(1, np.uint32)

    @property
    def row_sums_nbytes(self) -> int:
        """DRAM held by the row checksums (4 bytes per row and per qparams row)."""
        return int(self._rsums.nbytes) if any(b >= 0 for p in self._rsum0 for b in p) else 0

    # -- reading rows ----------------------------------------------------------
    def _rowbuf(self) -> np.ndarray:
        """A per-thread 8-byte aligned row, where a row that is not aligned is hashed."""
        buf = getattr(self._scratch, "row", None)
        if buf is None:
            widest = max(max(t.spec.row_bytes for t in self.tables), 8)
            buf = self._scratch.row = np.empty(-(-widest // 8), np.uint64)
        return buf
    def _scratch_buf(self) -> np.ndarray:
        """A per-thread read buffer, 4 KiB aligned (O_DIRECT needs it)."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None:
            raw = np.empty(self.config.max_read_bytes + 3 * _ALIGN, np.uint8)
            skip = (-raw.ctypes.data) % _ALIGN
            buf = raw[skip:skip + self.config.max_read_bytes + 2 * _ALIGN]
            self._scratch.buf = buf
        return buf

    def _read_job(self, plan: tuple[np.ndarray, ...], e0: int, e1: int) -> int:
        """Read extents ``[e0, e1)`` of a batch plan (one nogil call); -1 or the failed extent."""
        fd, off, ln, u0, src, dst, nb, sum0, rsum = plan
        scratch = self._scratch_buf()
        row = self._rowbuf()
        return int(pread_scatter(fd, off, ln, u0, src, dst, nb, scratch, e0, e1,
                                 _ALIGN if self.config.direct_io else 0, sum0, self._sums,
                                 scratch.view(np.uint64), rsum, self._rsums, row.view(np.uint8),
                                 row))

    def _plan(self, jobs: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray | None,
                                        np.ndarray | None]]
              ) -> tuple[tuple[np.ndarray, ...], list[tuple[int, int, int, int]]]:
        """One read plan for the rows of every table of a batch.

        Per target (a table's weights, its qparams) the sorted rows are
        merged into extents (:func:`plan_extents`); the plan concatenates
        them all, with each wanted row's place in its extent and the address
        it goes to (``out_index`` rows of the destination, else rows in
        order). Returns the plan and, per target, ``(table index, extents,
        bytes, first extent)`` for the counters and the error message.
        """
        c = self.config
        parts: list[list[np.ndarray]] = [[] for _ in range(9)]
        meta = []
        e_total = 0
        u_total = 0
        for i, rows, w_dst, q_dst, out_index in jobs:
            if rows.size == 0:
                continue
            t = self.tables[i]
            if t.row_offset:  # a window over a larger table: file rows are shifted
                rows = rows + t.row_offset
            files = self._files[i]
            w_sum0, q_sum0 = self._sum0[i]
            w_rs0, q_rs0 = self._rsum0[i]
            targets = [(files.weight, t.spec.row_bytes, w_dst, w_sum0, w_rs0)]
            if files.qparams is not None and q_dst is not None and q_sum0 is not None:
                targets.append((files.qparams, 8, q_dst, q_sum0, q_rs0))
            for fds, rb, dst, sum0, rs0 in targets:
                chunk, first, nrows, u0 = plan_extents(rows, t.chunk_rows, rb,
                                                       c.coalesce_gap_bytes, c.max_read_bytes)
                n_ext = chunk.size
                ext_of_row = np.repeat(np.arange(n_ext), np.diff(u0))
                src = (rows - chunk[ext_of_row] * t.chunk_rows - first[ext_of_row]) * rb
                where = np.arange(rows.size) if out_index is None else out_index
                # the plan writes through raw addresses: check every destination row first
                if (dst.ndim != 2 or not dst.flags.c_contiguous or dst.strides[0] != rb
                        or where.size != rows.size
                        or (where.size and not 0 <= where.min() <= where.max() < dst.shape[0])):
                    raise InvalidBatchError(
                        f"table {t.name!r}: read destination must be C-contiguous rows of {rb} "
                        f"bytes, with one row index in [0, {dst.shape[0]}) per row read")
                parts[0].append(fds[chunk].astype(np.int64))
                parts[1].append(first * rb)
                parts[2].append(nrows * rb)
                parts[3].append(u0[:-1] + u_total)
                parts[4].append(src)
                parts[5].append(dst.ctypes.data + where.astype(np.int64) * dst.strides[0])
                parts[6].append(np.full(rows.size, rb, np.int64))
                parts[7].append(sum0[chunk])
                parts[8].append(rows + (rs0 - t.first_chunk * t.chunk_rows) if rs0 >= 0
                                else np.full(rows.size, -1, np.int64))
                meta.append((i, n_ext, int(nrows.sum()) * rb, e_total))
                e_total += n_ext
                u_total += rows.size
        if not meta:
            return tuple(np.zeros(0, np.int64) for _ in range(9)), []
        fd, off, ln, u0, src, dst, nb, sum0, rsum = (np.concatenate(p) for p in parts)
        u0 = np.append(u0, u_total)
        return (fd, off, ln, u0, src, dst, nb, sum0, rsum), meta

    def _read_sorted(self, jobs: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray | None,
                                                np.ndarray | None]],
                     stats: dict[str, TableStats] | None, background: bool = False) -> None:
        """Read sorted unique rows of several tables at once.

        ``jobs`` holds ``(table index, rows, w_dst, q_dst, out_index)``: row
        ``k`` goes to row ``out_index[k]`` (or ``k``) of the C-contiguous
        ``w_dst`` (``(n, dim)``) / ``q_dst`` (``(n, 2)``), e.g. straight into
        a cache's slots. The whole batch is one plan, cut into at most
        ``io_threads`` slices (a slice is one GIL-free call that issues its
        reads back to back), so a batch costs a handful of futures, not one
        per table and extent. ``background`` reads (prefetch) go through
        their own, smaller pool of ``background_io_threads``, so they never
        take more than that share of the device's queue from the reads a
        running batch waits for.
        """
        c = self.config
        pool = self._bg_pool if background else self._pool
        depth = c.background_io_threads if background else c.io_threads
        t0 = time.perf_counter()
        plan, meta = self._plan(jobs)
        n_ext = plan[0].size
        if n_ext:
            # slices big enough that a future costs little next to its reads
            n_jobs = max(1, min(depth, n_ext // _MIN_EXTENTS_PER_SLICE))
            bounds = np.linspace(0, n_ext, n_jobs + 1).astype(np.int64)
            if n_jobs == 1:
                bad = [self._read_job(plan, 0, n_ext)]
            else:
                futures = [pool.submit(self._read_job, plan, int(a), int(b))
                           for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
                bad = [f.result() for f in futures]
            corrupt = [-2 - x for x in bad if x <= -2]
            if corrupt:
                raise self._corrupt(plan, meta, min(corrupt))
            failed = [x for x in bad if x >= 0]
            if failed:
                e = min(failed)
                i = max((m for m in meta if m[3] <= e), key=lambda m: m[3])[0]
                t = self.tables[i]
                f = self._files[i]
                fd = int(plan[0][e])
                w_chunk = np.flatnonzero(f.weight == fd)
                what = (f"chunk file {int(w_chunk[0])}" if w_chunk.size else
                        f"qparams chunk file {int(np.flatnonzero(f.qparams == fd)[0])}"
                        if f.qparams is not None else "a chunk file")
                raise StoreError(
                    f"table {t.name!r}: reading {int(plan[2][e])} bytes at byte "
                    f"{int(plan[1][e])} of {what} failed (short read or I/O error: was the "
                    "store modified or truncated after it was opened?)")
        if stats is not None:
            dt = time.perf_counter() - t0
            total_ops = n_ext or 1
            for i, n, nbytes, _ in meta:
                st = stats[self.tables[i].name]
                st.read_ops += n
                st.bytes_read += nbytes
                st.read_seconds += dt * n / total_ops

    def _corrupt(self, plan: tuple[np.ndarray, ...], meta: list[tuple[int, int, int, int]],
                 e: int) -> StoreError:
        """The error for extent ``e`` of a plan, which holds a block failing its checksum:
        the blocks are hashed again here (rare path) to name the bad one."""
        from tiermem.integrity import chunk_sums

        i = max((m for m in meta if m[3] <= e), key=lambda m: m[3])[0]
        t, f = self.tables[i], self._files[i]
        fd = int(plan[0][e])
        is_w = bool((f.weight == fd).any())
        chunk = int(np.flatnonzero((f.weight if is_w else f.qparams) == fd)[0])
        sums = t.weight_sums if is_w else t.qparams_sums
        assert sums is not None  # an extent checked by blocks has its file's block sums
        path = t.weight_chunk(chunk) if is_w else t.qparams_chunk(chunk)
        what = "weights" if is_w else "qparams"
        if int(plan[8][int(plan[3][e])]) >= 0:  # checked row by row
            return self._corrupt_rows(t, what, chunk, path, plan, e)
        k0 = int(plan[1][e]) // BLOCK_BYTES
        k1 = -(-(int(plan[1][e]) + int(plan[2][e])) // BLOCK_BYTES)
        with open(path, "rb") as fh:
            fh.seek(k0 * BLOCK_BYTES)
            data = np.frombuffer(fh.read((k1 - k0) * BLOCK_BYTES), np.uint8)
        got = chunk_sums(data)
        bad_k = [k0 + int(k) for k in np.flatnonzero(got != sums[chunk, k0:k0 + got.size])]
        bad = [bad_block(t, what, chunk, k) for k in bad_k or [k0]]
        return corrupt_error(bad)

    def _corrupt_rows(self, t: TableInfo, what: str, chunk: int, path: object,
                      plan: tuple[np.ndarray, ...], e: int) -> StoreError:
        """The error for extent ``e`` holding a row that fails its row checksum: the
        extent's wanted rows are read and hashed again here (rare path) to name them."""
        from tiermem.integrity import BadBlock, row_sums

        rb = t.spec.row_bytes if what == "weights" else 8
        a, b = int(plan[3][e]), int(plan[3][e + 1])
        at = plan[8][a:b]
        with open(str(path), "rb") as fh:
            fh.seek(int(plan[1][e]))
            data = np.frombuffer(fh.read(int(plan[2][e])), np.uint8)
        pos = plan[4][a:b]  # each wanted row's byte in the extent
        got = [row_sums(data[p:p + rb].copy(), rb)[0] if p + rb <= data.size else None
               for p in pos.tolist()]
        bad = [k for k, g in enumerate(got) if g is None or g != self._rsums[at[k]]] or [0]
        first_row = chunk * t.chunk_rows + int(plan[1][e]) // rb
        rows = [first_row + int(pos[k]) // rb for k in bad]
        blocks = [BadBlock(t.name, what, path, chunk, (r - chunk * t.chunk_rows) * rb  # type: ignore[arg-type]
                           // BLOCK_BYTES, (r, r)) for r in rows]
        more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
        return CorruptBlockError(
            f"table {t.name!r} {what}: rows {rows[0]}-{rows[0]} of {path} fail their row "
            f"checksum{more}: "
            "the store is corrupt (disk, copy or an edit after creation); its rows are not "
            "served. Run `tiermem verify STORE` for every bad block", blocks)

    def _read_rows(self, i: int, rows: np.ndarray, w_out: np.ndarray,
                   q_out: np.ndarray | None) -> None:
        uniq, inverse = dedupe_sorted(rows)
        if uniq.size == rows.size and (rows.size < 2 or np.all(rows[1:] > rows[:-1])):
            self._read_sorted([(i, rows, w_out, q_out, None)], None)
            return
        spec = self.tables[i].spec
        w = np.empty((uniq.size, spec.dim), spec.dtype.numpy)
        q = np.empty((uniq.size, 2), np.float32) if q_out is not None else None
        self._read_sorted([(i, uniq, w, q, None)], None)
        np.take(w, inverse, axis=0, out=w_out)
        if q is not None and q_out is not None:
            np.take(q, inverse, axis=0, out=q_out)

    def read_many(self, requests: Sequence[ReadRequest],
                  stats: dict[str, TableStats] | None = None, *, background: bool = False) -> None:
        self._read_sorted([(r[0], np.ascontiguousarray(r[1], np.int64), r[2], r[3],
                            r[4] if len(r) > 4 else None) for r in requests], stats, background)

    # -- pooling -----------------------------------------------------------------
    def _pool_group(self, features: SparseFeatures, tids: list[int], col_base: np.ndarray,
                    mode: PoolingMode, out: np.ndarray, stats: dict[str, TableStats]) -> None:
        spec = self.tables[tids[0]].spec
        T = len(tids)
        uniqs, positions = [], np.empty(features.values.size, np.int64)
        stage_base = np.zeros(T, np.int64)
        n = 0
        for p in range(T):
            s, e = features.table_range(p)
            u, inv = dedupe_sorted(features.values[s:e])
            uniqs.append(u)
            positions[s:e] = inv
            stage_base[p] = n
            n += u.size
        W = np.empty((n, spec.dim), spec.dtype.numpy)
        Q = np.empty((n, 2), np.float32) if spec.dtype.quantized else None
        jobs = []
        for p, i in enumerate(tids):
            a, b = int(stage_base[p]), int(stage_base[p]) + uniqs[p].size
            jobs.append((i, uniqs[p], W[a:b], None if Q is None else Q[a:b], None))
            stats[self.tables[i].name].rows_read += uniqs[p].size
        self._read_sorted(jobs, stats)
        self._run_kernel(W, Q, positions, features, stage_base, col_base, mode, out)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._pool.shutdown(wait=True)
        self._bg_pool.shutdown(wait=True)
        for f in self._files:
            f.close()

    def drop_page_cache(self) -> None:
        """Ask the kernel to drop this store's cached pages (for cold measurements)."""
        for f in self._files:
            for fd in f.all_fds():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
