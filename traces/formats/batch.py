"""A batch of a trace, and cutting and joining batches.

:class:`TraceBatch` is what every reader yields; :func:`rebatch` re-cuts any
stream of them to a fixed batch size (holding one output batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures

__all__ = ["TraceBatch", "concat_batches", "rebatch", "slice_batch", "sparse_of"]


class TraceBatch(NamedTuple):
    """One batch of a trace; unpacks as ``dense, sparse, labels``."""

    dense: np.ndarray | None
    sparse: SparseFeatures
    labels: np.ndarray | None

    @property
    def batch_size(self) -> int:
        return self.sparse.batch_size



def sparse_of(batch: Any) -> SparseFeatures:
    """The sparse part of a :class:`TraceBatch`, or the batch itself if it is sparse already."""
    if isinstance(batch, SparseFeatures):
        return batch
    sp = getattr(batch, "sparse", None)
    if isinstance(sp, SparseFeatures):
        return sp
    raise InvalidBatchError(f"expected TraceBatch or SparseFeatures batches, got "
                            f"{type(batch).__name__}")


def slice_batch(batch: TraceBatch, start: int, stop: int) -> TraceBatch:
    """Samples ``[start, stop)`` of a batch (copies only those samples' ids)."""
    sf = batch.sparse
    b = sf.batch_size
    if not 0 <= start <= stop <= b:
        raise InvalidBatchError(f"sample range [{start}, {stop}) outside a batch of {b}")
    if start == 0 and stop == b:
        return batch
    vals, lens, ws = [], [], []
    for t in range(sf.num_tables):
        o = sf.offsets[t * b + start:t * b + stop + 1]
        vals.append(sf.values[o[0]:o[-1]])
        lens.append(np.diff(o))
        if sf.weights is not None:
            ws.append(sf.weights[o[0]:o[-1]])
    new = SparseFeatures.from_lengths(sf.keys, np.concatenate(vals), np.concatenate(lens),
                                      np.concatenate(ws) if ws else None)
    return TraceBatch(None if batch.dense is None else batch.dense[start:stop], new,
                      None if batch.labels is None else batch.labels[start:stop])


def concat_batches(batches: Sequence[TraceBatch]) -> TraceBatch:
    """Samples of several batches (same tables) as one batch."""
    if not batches:
        raise InvalidBatchError("no batches to concatenate")
    if len(batches) == 1:
        return batches[0]
    keys = batches[0].sparse.keys
    for x in batches[1:]:
        if x.sparse.keys != keys:
            raise InvalidBatchError(f"tables {list(x.sparse.keys)} differ from {list(keys)}")
    weighted = batches[0].sparse.weights is not None
    vals, lens, ws = [], [], []
    for t in range(len(keys)):
        for x in batches:
            sf = x.sparse
            b = sf.batch_size
            o = sf.offsets[t * b:(t + 1) * b + 1]
            vals.append(sf.values[o[0]:o[-1]])
            lens.append(np.diff(o))
            if weighted:
                if sf.weights is None:
                    raise InvalidBatchError("some batches have weights and others not")
                ws.append(sf.weights[o[0]:o[-1]])
    sf = SparseFeatures.from_lengths(keys, np.concatenate(vals), np.concatenate(lens),
                                     np.concatenate(ws) if weighted else None)

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(x, name) for x in batches]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise InvalidBatchError(f"some batches have {name} and others not")
        return np.concatenate(parts)

    return TraceBatch(cat("dense"), sf, cat("labels"))


def rebatch(batches: Iterable[TraceBatch], batch_size: int, *,
            drop_last: bool = False) -> Iterator[TraceBatch]:
    """Re-cut a stream of batches into batches of exactly ``batch_size`` samples.

    Holds at most one output batch of pending samples; the last batch may be
    smaller unless ``drop_last``.
    """
    if batch_size < 1:
        raise ConfigError(f"Expected batch_size >= 1. Got {batch_size} instead.")
    pending: list[TraceBatch] = []
    have = 0
    for x in batches:
        b = x.batch_size
        pos = 0
        while pos < b:
            take = min(batch_size - have, b - pos)
            if take == b == batch_size and not pending:  # whole batch, exact size: no copy
                yield x
                pos = b
                break
            pending.append(slice_batch(x, pos, pos + take))
            have += take
            pos += take
            if have == batch_size:
                yield concat_batches(pending)
                pending, have = [], 0
    if pending and not drop_last:
        yield concat_batches(pending)

