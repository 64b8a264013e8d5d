"""DRAM tier: every table loaded into memory, one arena per (dtype, dim)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tiermem.config import PoolingMode, TierConfig, TierKind
from tiermem.errors import CapacityError, CorruptBlockError
from tiermem.features import SparseFeatures
from tiermem.format import StoreInfo, read_rows_into
from tiermem.integrity import hash_threads, read_verified
from tiermem.quantize import RowDtype
from tiermem.stats import TableStats
from tiermem.tiers.base import Tier

__all__ = ["DramTier", "check_finite"]


def _mem_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_fits(store: StoreInfo, need: int) -> None:
    """Refuse tables larger than the machine's memory in one line (not numpy's traceback)."""
    total = _mem_total()
    if total and need > total:
        raise CapacityError(f"the tables of {store.path} need {need / 2**30:,.2f} GiB of DRAM, "
                            f"more than this machine has ({total / 2**30:,.2f} GiB): serve them "
                            "from the SSD tier (--tier ssd)")


def check_finite(name: str, w: np.ndarray, q: np.ndarray | None, block_rows: int = 1 << 16) -> None:
    """Refuse a table holding a NaN or infinite row (stores without checksums only)."""
    for arr in (w, q):
        if arr is None or arr.dtype.kind != "f":
            continue
        for r0 in range(0, arr.shape[0], block_rows):
            part = arr[r0:r0 + block_rows]
            if not np.isfinite(part).all():
                bad = r0 + int(np.flatnonzero(~np.isfinite(part).all(axis=1))[0])
                what = "qparams" if arr is q else "row"
                raise CorruptBlockError(f"table {name!r}: {what} {bad} holds NaN or infinity "
                                        "(a store without checksums, written by an older "
                                        "tiermem or edited): refused")


class DramTier(Tier):
    """Tables in DRAM. Loading reads the chunk files sequentially.

    Tables that share a dtype and width are concatenated into one arena
    (``arena[row_base[t] + r]`` is row ``r`` of table ``t``), so one kernel
    call pools them all.
    """

    kind = TierKind.DRAM

    def __init__(self, store: StoreInfo, config: TierConfig | None = None, *,
                 progress: bool = False) -> None:
        super().__init__(store, config)
        self._arena_of: list[tuple[RowDtype, int]] = []
        self.row_base = np.zeros(len(self.tables), np.int64)
        sizes: dict[tuple[RowDtype, int], int] = {}
        for i, t in enumerate(self.tables):
            key = self.group_key(i)
            self.row_base[i] = sizes.get(key, 0)
            sizes[key] = sizes.get(key, 0) + t.spec.rows
            self._arena_of.append(key)
        need = sum(n * k[0].row_bytes(k[1]) + (8 * n if k[0].quantized else 0)
                   for k, n in sizes.items())
        _check_fits(store, need)
        try:
            self.arenas: dict[tuple[RowDtype, int], np.ndarray] = {
                k: np.empty((n, k[1]), k[0].numpy) for k, n in sizes.items()}
            self.qparams: dict[tuple[RowDtype, int], np.ndarray] = {
                k: np.empty((n, 2), np.float32) for k, n in sizes.items() if k[0].quantized}
        except MemoryError:
            raise CapacityError(f"the DRAM tier cannot allocate {need / 2**30:,.2f} GiB for the "
                                f"tables of {store.path}") from None
        from tqdm.auto import tqdm

        hashers = ThreadPoolExecutor(hash_threads(), thread_name_prefix="tiermem-hash")
        with tqdm(total=store.nbytes, unit="B", unit_scale=True, desc="load tables",
                  disable=not progress, leave=False) as bar, hashers:
            for i, t in enumerate(self.tables):
                key = self._arena_of[i]
                r0 = int(self.row_base[i])
                w = self.arenas[key][r0:r0 + t.spec.rows]
                q = self.qparams[key][r0:r0 + t.spec.rows] if key in self.qparams else None
                if t.verified and self.config.verify:  # hashed piece by piece as it lands
                    read_verified(t, 0, t.spec.rows, w, q, hashers, on_bytes=bar.update)
                    continue
                read_rows_into(t, 0, t.spec.rows, w, q, on_bytes=bar.update)
                if not t.verified:  # a version-1 store: no checksums, but never a non-finite row
                    check_finite(t.name, w, q)

    @property
    def nbytes(self) -> int:
        """DRAM held by the arenas."""
        return sum(a.nbytes for a in self.arenas.values()) + sum(
            q.nbytes for q in self.qparams.values())

    def table_rows(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Views of one table's rows (and qparams) inside its arena."""
        i = self.table_index(name)
        key = self._arena_of[i]
        r0 = int(self.row_base[i])
        n = self.tables[i].spec.rows
        q = self.qparams.get(key)
        return self.arenas[key][r0:r0 + n], None if q is None else q[r0:r0 + n]

    def _pool_group(self, features: SparseFeatures, tids: list[int], col_base: np.ndarray,
                    mode: PoolingMode, out: np.ndarray, stats: dict[str, TableStats]) -> None:
        key = self._arena_of[tids[0]]
        self._run_kernel(self.arenas[key], self.qparams.get(key), features.values, features,
                         self.row_base[tids], col_base, mode, out)
        for p, i in enumerate(tids):
            t = self.tables[i]
            s, e = features.table_range(p)
            st = stats[t.name]
            st.rows_read += e - s
            st.bytes_read += (e - s) * (t.spec.row_bytes + (8 if t.spec.dtype.quantized else 0))

    def _read_rows(self, i: int, rows: np.ndarray, w_out: np.ndarray,
                   q_out: np.ndarray | None) -> None:
        w, q = self.table_rows(self.tables[i].name)
        np.take(w, rows, axis=0, out=w_out)
        if q is not None and q_out is not None:
            np.take(q, rows, axis=0, out=q_out)

    def close(self) -> None:
        super().close()
        self.arenas = {}
        self.qparams = {}
