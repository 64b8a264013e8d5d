"""A batch checked once: :class:`CheckedFeatures` and the :class:`BoundsCheck` mode.

A request's ids are checked against the row counts of its tables once, at
the edge (the HTTP body decoder's caller, the batcher, a session's
``predict``/``embed``); what comes out is a :class:`CheckedFeatures`, and the
layers below (the session, the tier, the cache, the kernels) trust it by
type. A plain :class:`~tiermem.features.SparseFeatures` reaching a tier is
checked there, so no kernel reads memory for an id nobody checked.

``BoundsCheck`` says what an out-of-range id does, like FBGEMM's
``BoundsCheckMode``: ``fatal`` fails the batch with an error that names the
table, the sample and the position; ``warn`` drops the id from its bag (it
contributes nothing, as if the client had not sent it), logs one warning per
batch and counts it in :attr:`CheckedFeatures.dropped`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tiermem.config import Choice
from tiermem.features import SparseFeatures
from tiermem.kernels.validate import check_table_ids

__all__ = ["BoundsCheck", "CheckedFeatures", "check_batch"]

_log = logging.getLogger("tiermem.batch")


class BoundsCheck(Choice):
    """What an id outside ``[0, rows)`` of its table does to a batch."""

    FATAL = "fatal"
    """The batch fails with InvalidBatchError naming the table, sample and position."""
    WARN = "warn"
    """The id is dropped from its bag (pools as absent); one warning per batch."""


@dataclass(frozen=True, eq=False)
class CheckedFeatures(SparseFeatures):
    """Sparse features whose every id of ``keys[t]`` lies in ``[0, bounds[t])``.

    Made only by :func:`check_batch`, or derived from checked batches
    (:meth:`select`, :meth:`derive` for a merge of requests); never construct
    it directly.
    """

    bounds: tuple[int, ...] = ()
    """Row counts the ids were checked against, in ``keys`` order."""
    dropped: int = 0
    """Ids removed by ``BoundsCheck.WARN``."""

    @classmethod
    def _wrap(cls, f: SparseFeatures, bounds: Sequence[int], dropped: int = 0
              ) -> CheckedFeatures:
        obj = object.__new__(cls)
        for name, v in (("keys", f.keys), ("values", f.values), ("offsets", f.offsets),
                        ("weights", f.weights), ("bounds", tuple(int(b) for b in bounds)),
                        ("dropped", int(dropped))):
            object.__setattr__(obj, name, v)
        return obj

    def _derived(self, keys: tuple[str, ...], values: np.ndarray, offsets: np.ndarray,
                 weights: np.ndarray | None, picked: Sequence[int]) -> SparseFeatures:
        return CheckedFeatures._wrap(SparseFeatures.trusted(keys, values, offsets, weights),
                                     [self.bounds[p] for p in picked], self.dropped)

    @classmethod
    def routed(cls, part: SparseFeatures, bounds: Sequence[int]) -> CheckedFeatures:
        """A shard's part of a checked batch, cut by the driver's router (its ids were
        checked as global ids and mapped into ``[0, bounds[t])`` by the router)."""
        return cls._wrap(part, bounds)

    def derive(self, merged: SparseFeatures, dropped: int = 0) -> CheckedFeatures:
        """``merged`` (same keys as this batch, ids taken from checked batches of the
        same bounds) as checked."""
        if merged.keys != self.keys:
            raise ValueError(f"derive: keys {list(merged.keys)} differ from {list(self.keys)}")
        return CheckedFeatures._wrap(merged, self.bounds, dropped)

    def covers(self, rows: Sequence[int]) -> bool:
        """True when the ids are known to lie within tables of ``rows`` rows (key order)."""
        return len(rows) == len(self.bounds) and all(
            b <= r for b, r in zip(self.bounds, rows, strict=True))


def check_batch(features: SparseFeatures, rows: Mapping[str, int] | Sequence[int],
                mode: BoundsCheck | str = BoundsCheck.FATAL) -> CheckedFeatures:
    """Check every id of ``features`` against its table's row count, once.

    ``rows`` maps key -> row count, or lists the counts in key order. A batch
    that is already a :class:`CheckedFeatures` within these bounds is
    returned as it is (no second pass).
    """
    mode = BoundsCheck.parse(mode)
    counts = [int(rows[k]) if isinstance(rows, Mapping) else int(rows[t])
              for t, k in enumerate(features.keys)]
    if isinstance(features, CheckedFeatures) and features.covers(counts):
        return features
    if mode is BoundsCheck.FATAL:
        features.validate_ids(counts)  # raises, naming the first bad id
        return CheckedFeatures._wrap(features, counts)
    return _drop_out_of_range(features, counts)


def _drop_out_of_range(f: SparseFeatures, counts: list[int]) -> CheckedFeatures:
    """``BoundsCheck.WARN``: the batch without its out-of-range ids (numpy, no per-id
    Python: one Numba pass when the batch is clean, which is the common case)."""
    n = np.asarray(counts, np.int64)
    if check_table_ids(f.values, f.offsets, f.batch_size, n) is None:
        return CheckedFeatures._wrap(f, counts)
    bad = np.zeros(f.values.size, bool)
    for t in range(len(f.keys)):
        s, e = f.table_range(t)
        v = f.values[s:e]
        bad[s:e] = (v < 0) | (v >= n[t])
    lengths = np.diff(f.offsets)
    bag = np.repeat(np.arange(lengths.size), lengths)
    lengths = lengths - np.bincount(bag[bad], minlength=lengths.size)
    offsets = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    keep = ~bad
    i = int(np.argmax(bad))
    t = int(np.searchsorted(f.offsets[::f.batch_size][1:], i, side="right"))
    dropped = int(bad.sum())
    _log.warning("dropped %d out-of-range id(s) of a batch of %d samples (first: table %r, "
                 "id %d, %d rows)", dropped, f.batch_size, f.keys[t], int(f.values[i]), counts[t])
    out = SparseFeatures.trusted(f.keys, np.ascontiguousarray(f.values[keep]), offsets,
                                 None if f.weights is None
                                 else np.ascontiguousarray(f.weights[keep]))
    return CheckedFeatures._wrap(out, counts, dropped)
