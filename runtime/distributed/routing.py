"""Routing a batch through a plan: split its lookups per shard, merge the pooled parts.

A whole table goes to its shard untouched. A row-split table's ids are cut
by row range (one stable pass, so each bag keeps its ids in order) and made
local to their piece (``id - row_start``); every piece's bag then holds the
ids of that bag that fall in its range, possibly none. The shards return
per-piece sums, and :meth:`Router.merge` adds the pieces of a table back
together (dividing by the bag length afterwards for mean pooling).

Everything is vectorized numpy over the whole batch: no step per id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.distributed.plan import Piece, ShardPlan
from tiermem.config import PoolingMode
from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures

__all__ = ["Router", "ShardRequest"]


@dataclass(frozen=True)
class ShardRequest:
    """The lookups of one batch for one shard, keyed like the shard's pieces."""

    shard: int
    values: np.ndarray
    """int64 local ids, piece-major then bag-major (KJT layout)."""
    lengths: np.ndarray
    """int64, ``len(pieces) * B``: ids per (piece, bag)."""
    weights: np.ndarray | None
    batch_size: int

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.lengths.nbytes + (
            0 if self.weights is None else self.weights.nbytes)


class Router:
    """Splits batches of a model's tables over the shards of a plan."""

    def __init__(self, plan: ShardPlan, table_names: tuple[str, ...] | list[str]) -> None:
        self.plan = plan
        self.table_names = tuple(table_names)
        self._position = {n: t for t, n in enumerate(self.table_names)}
        unknown = [t for t in self.table_names if t not in plan.tables]
        if unknown:
            raise ConfigError(f"the plan places no table(s) {unknown[:5]}; it has "
                              f"{sorted(plan.tables)[:8]}")
        self.shard_pieces: list[list[Piece]] = [plan.shard_pieces(s)
                                                for s in range(plan.num_shards)]
        # shards that hold nothing the model uses are never called
        used = set(self.table_names)
        self.shard_pieces = [[p for p in ps if p.table in used] for ps in self.shard_pieces]
        self.active_shards = [s for s, ps in enumerate(self.shard_pieces) if ps]
        # per table: its pieces in row order and their (shard, position in shard)
        self._where: dict[str, list[tuple[Piece, int, int]]] = {}
        for s, ps in enumerate(self.shard_pieces):
            for j, p in enumerate(ps):
                self._where.setdefault(p.table, []).append((p, s, j))
        for t in self._where:
            self._where[t].sort(key=lambda x: x[0].row_start)
        self.split = {t for t, w in self._where.items() if len(w) > 1}

    def pieces_of(self, shard: int) -> list[Piece]:
        return self.shard_pieces[shard]

    def split_batch(self, features: SparseFeatures) -> list[ShardRequest]:
        """One request per active shard (in ``active_shards`` order)."""
        feats = features.select(self.table_names)
        return [self.request_for(feats, s) for s in self.active_shards]

    def request_for(self, features: SparseFeatures, shard: int) -> ShardRequest:
        """The lookups of ``shard``'s pieces in a batch (the shard can cut its own part).

        A whole table's ids are passed as they are; for a piece of a row-split
        table, the ids in its range are kept in order (so every bag keeps its
        order) and made local (``id - row_start``).
        """
        feats = features.select(self.table_names)
        b = feats.batch_size
        lengths_all = feats.lengths
        vals, lens, ws = [], [], []
        bags: dict[int, np.ndarray] = {}
        for p in self.shard_pieces[shard]:
            t = self._position[p.table]
            s0, e0 = feats.table_range(t)
            ids = feats.values[s0:e0]
            ln = lengths_all[t * b:(t + 1) * b]
            w = None if feats.weights is None else feats.weights[s0:e0]
            if p.table not in self.split:
                vals.append(ids)
                lens.append(ln)
                ws.append(w)
                continue
            if t not in bags:
                bags[t] = np.repeat(np.arange(b, dtype=np.int64), ln)
            keep = (ids >= p.row_start) & (ids < p.row_stop)
            vals.append(ids[keep] - p.row_start)
            lens.append(np.bincount(bags[t][keep], minlength=b).astype(np.int64, copy=False))
            ws.append(None if w is None else w[keep])
        return ShardRequest(
            shard,
            np.concatenate(vals) if len(vals) > 1 else np.ascontiguousarray(vals[0]),
            np.concatenate(lens).astype(np.int64, copy=False),
            None if feats.weights is None else np.concatenate(ws),  # type: ignore[arg-type]
            b)

    def merge(self, features: SparseFeatures, shard_outputs: dict[int, np.ndarray],
              mode: PoolingMode, dim: int) -> np.ndarray:
        """``(B, T, D)`` pooled embeddings from the shards' ``(B, pieces * D)`` outputs.

        Row-split tables arrive as partial sums; for ``mean`` pooling they are
        divided by the whole bag's length here (empty bags stay zero).
        """
        feats = features.select(self.table_names)
        b = feats.batch_size
        out = np.zeros((b, len(self.table_names), dim), np.float32)
        for t, name in enumerate(self.table_names):
            where = self._where[name]
            for _p, s, j in where:
                part = shard_outputs[s][:, j * dim:(j + 1) * dim]
                if len(where) == 1:
                    out[:, t, :] = part
                else:
                    out[:, t, :] += part
            if name in self.split and mode is PoolingMode.MEAN:
                lens = feats.lengths[t * b:(t + 1) * b].astype(np.float32)
                np.divide(out[:, t, :], np.maximum(lens, 1)[:, None], out=out[:, t, :])
        return out
