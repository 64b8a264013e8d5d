"""The tier interface: pool a batch of lookups; read rows for a cache.

A tier serves every table of one store. ``pool`` runs the SLS kernel over
rows the tier holds or fetches; ``read_rows`` copies given rows out, which is
what a cache in front of a tier needs to fill its slots.

Tables whose rows share a dtype and a width are pooled by one kernel call:
the tier keeps them in one *arena* and passes where each table starts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from tiermem.batch import BoundsCheck, check_batch
from tiermem.config import PoolingMode, TierConfig, TierKind
from tiermem.errors import InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.format import StoreInfo, TableInfo
from tiermem.kernels.sls import pool_arena
from tiermem.kernels.validate import check_ids
from tiermem.quantize import RowDtype
from tiermem.stats import TableStats, TierStats

__all__ = ["ReadRequest", "Tier"]

#: ``(table index, sorted unique rows, w_out, q_out[, out_index])``: row ``k`` goes to
#: row ``out_index[k]`` of ``w_out``/``q_out`` (or row ``k`` without it): a cache
#: passes its slot pool and the slots, so rows land in place.
ReadRequest = tuple


class Tier(ABC):
    """Serves the tables of a store; subclasses decide where rows come from."""

    kind: ClassVar[TierKind]

    def __init__(self, store: StoreInfo, config: TierConfig | None = None) -> None:
        self.store = store
        self.config = config or TierConfig(kind=self.kind)
        self.tables: tuple[TableInfo, ...] = store.tables
        self._index = {t.name: i for i, t in enumerate(self.tables)}
        self.stats = TierStats()
        self._closed = False

    # -- metadata ------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tables]

    def table_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise InvalidBatchError(
                f"unknown table {name!r}: the store has {self.names}") from None

    def group_key(self, i: int) -> tuple[RowDtype, int]:
        s = self.tables[i].spec
        return s.dtype, s.dim

    # -- pooling -------------------------------------------------------------
    def pool(self, features: SparseFeatures, *, mode: PoolingMode | str = PoolingMode.SUM,
             out: np.ndarray | None = None,
             bounds: BoundsCheck | str = BoundsCheck.FATAL) -> np.ndarray:
        """Pool every bag of ``features``: returns float32 ``(B, sum of dims)``.

        Columns follow ``features.keys``: table ``keys[t]`` fills
        ``out[:, c_t : c_t + dim_t]``. A :class:`~tiermem.batch.CheckedFeatures`
        within this tier's row counts is trusted; any other batch is checked
        here, ``bounds`` saying what an out-of-range id does.
        """
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        pooling = PoolingMode.parse(mode)
        if not isinstance(features, SparseFeatures):
            raise InvalidBatchError(
                f"features must be a SparseFeatures, got {type(features).__name__}")
        tids = [self.table_index(k) for k in features.keys]
        features = check_batch(features, [self.tables[i].spec.rows for i in tids], bounds)
        if pooling is PoolingMode.MEAN and features.weights is not None:
            raise InvalidBatchError("per-sample weights are only supported with mode='sum'")
        dims = [self.tables[i].spec.dim for i in tids]
        col = np.zeros(len(dims) + 1, np.int64)
        np.cumsum(dims, out=col[1:])
        b = features.batch_size
        if out is None:
            out = np.empty((b, int(col[-1])), np.float32)
        elif out.shape != (b, col[-1]) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise InvalidBatchError(
                f"out must be a C-contiguous float32 array of shape {(b, int(col[-1]))}")
        batch_stats = {self.tables[i].name: TableStats() for i in tids}
        for pos, sub in self._groups(features, tids):
            self._pool_group(sub, [tids[p] for p in pos], col[pos], pooling, out, batch_stats)
        for k in features.keys:
            s, e = features.table_range(features.keys.index(k))
            batch_stats[self.tables[self._index[k]].name].lookups += e - s
        self.stats.record(batch_stats)
        return out

    def _groups(self, features: SparseFeatures, tids: Sequence[int]
                ) -> list[tuple[np.ndarray, SparseFeatures]]:
        """Split the batch's keys by (dtype, dim): one kernel call per group."""
        groups: dict[tuple[RowDtype, int], list[int]] = {}
        for p, i in enumerate(tids):
            groups.setdefault(self.group_key(i), []).append(p)
        if len(groups) == 1:
            return [(np.arange(len(tids)), features)]
        return [(np.asarray(pos), features.select([features.keys[p] for p in pos]))
                for pos in groups.values()]

    @abstractmethod
    def _pool_group(self, features: SparseFeatures, tids: list[int], col_base: np.ndarray,
                    mode: PoolingMode, out: np.ndarray, stats: dict[str, TableStats]) -> None:
        """Pool a batch whose tables all share one dtype and dim."""

    def _run_kernel(self, W: np.ndarray, Q: np.ndarray | None, ids: np.ndarray,
                    features: SparseFeatures, row_base: np.ndarray, col_base: np.ndarray,
                    mode: PoolingMode, out: np.ndarray) -> None:
        pool_arena(W, Q, ids, features.offsets, batch_size=features.batch_size,
                   row_base=row_base, col_base=np.ascontiguousarray(col_base, np.int64),
                   out=out, weights=features.weights, mode=mode.value,
                   prefetch_distance=self.config.prefetch_distance)

    # -- rows for a cache ----------------------------------------------------
    def read_rows(self, table: str, rows: np.ndarray, w_out: np.ndarray,
                  q_out: np.ndarray | None = None) -> None:
        """Copy rows ``rows`` (table-local ids, any order) of ``table`` into ``w_out``/``q_out``.

        ``w_out`` is ``(len(rows), dim)`` of the table's dtype; ``q_out``
        ``(len(rows), 2)`` float32 receives int8 tables' (scale, bias).
        """
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        i = self.table_index(table)
        spec = self.tables[i].spec
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise InvalidBatchError(f"table {table!r}: rows must be a 1-D integer array")
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        msg = check_ids(rows, 0, rows.size, spec.rows)
        if msg:
            raise InvalidBatchError(f"table {table!r}: {msg.replace('ids[', 'rows[')}")
        if w_out.shape != (rows.size, spec.dim) or w_out.dtype != spec.dtype.numpy:
            raise InvalidBatchError(f"table {table!r}: w_out must be {spec.dtype.value} of shape "
                                    f"{(rows.size, spec.dim)}")
        if q_out is not None and (q_out.shape != (rows.size, 2) or q_out.dtype != np.float32):
            raise InvalidBatchError(f"table {table!r}: q_out must be float32 of shape "
                                    f"{(rows.size, 2)}")
        self._read_rows(i, rows, w_out, q_out)

    @abstractmethod
    def _read_rows(self, i: int, rows: np.ndarray, w_out: np.ndarray,
                   q_out: np.ndarray | None) -> None:
        """read_rows after validation; ``i`` is the table index."""

    def read_many(self, requests: Sequence[ReadRequest],
                  stats: dict[str, TableStats] | None = None, *, background: bool = False) -> None:
        """Several reads at once, each a :data:`ReadRequest`.

        Tiers that can overlap reads (SSD) issue them all together. ``stats``
        (table name -> counters) receives the bytes and operations spent.
        ``background`` marks reads nobody waits for yet (prefetch).
        """
        for req in requests:
            i, rows, w_out, q_out = req[:4]
            out_index = req[4] if len(req) > 4 else None
            if out_index is None:
                self._read_rows(i, rows, w_out, q_out)
            else:
                spec = self.tables[i].spec
                w = np.empty((rows.size, spec.dim), spec.dtype.numpy)
                q = None if q_out is None else np.empty((rows.size, 2), np.float32)
                self._read_rows(i, rows, w, q)
                w_out[out_index] = w
                if q_out is not None and q is not None:
                    q_out[out_index] = q
            if stats is not None:
                spec = self.tables[i].spec
                st = stats[spec.name]
                st.read_ops += rows.size
                st.bytes_read += rows.size * (spec.row_bytes + (8 if spec.dtype.quantized else 0))

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.store.path)!r}, tables={len(self.tables)})"
