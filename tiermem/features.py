"""Sparse features of a batch, with TorchRec KeyedJaggedTensor semantics.

``keys`` name the tables in order; ``values`` holds all ids key-major;
``lengths`` (``T * B``) or ``offsets`` (``T * B + 1``) delimit the bags;
``weights`` (optional, one float per id) weights each lookup::

    keys    = ["t0", "t1"], B = 2
    t0: [[3, 1], []]    t1: [[0], [2, 2]]
    values  = [3, 1, 0, 2, 2]
    lengths = [2, 0, 1, 2]
    offsets = [0, 2, 2, 3, 5]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tiermem.errors import InvalidBatchError
from tiermem.kernels.validate import check_offsets, check_table_ids

__all__ = ["SparseFeatures"]


def _as_int64(name: str, a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise InvalidBatchError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidBatchError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise InvalidBatchError(f"{name} holds values beyond int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


_F32_MAX = float(np.finfo(np.float32).max)


def _table_parts(key: str, spec: Any) -> tuple[Any, Any, Any]:
    """``(ids, offsets, weights or None)`` of one table given as a pair or a JaggedTensor."""
    if callable(getattr(spec, "values", None)) and callable(getattr(spec, "offsets", None)):
        weights_or_none = getattr(spec, "weights_or_none", None)
        return (_as_int64(f"table {key!r} ids", spec.values()),
                _as_int64(f"table {key!r} offsets", spec.offsets()),
                weights_or_none() if callable(weights_or_none) else None)
    if isinstance(spec, (str, bytes)) or not hasattr(spec, "__len__") or len(spec) != 2:
        raise InvalidBatchError(
            f"table {key!r}: expected a pair (ids, offsets) or a JaggedTensor-like object "
            f"(values(), offsets(), weights_or_none()), got {type(spec).__name__}")
    ids, off = spec
    return _as_int64(f"table {key!r} ids", ids), _as_int64(f"table {key!r} offsets", off), None


def _check_weights(w: np.ndarray, keys: tuple[str, ...], offsets: np.ndarray) -> None:
    """Refuse NaN, infinite and beyond-float32 weights (the cast would make them inf):
    any of them turns a pooled sum, hence a prediction, into NaN."""
    if w.dtype.itemsize <= 4:  # float16/float32: every finite value fits
        ok = np.isfinite(w)
    else:
        with np.errstate(invalid="ignore"):
            ok = np.abs(w) <= _F32_MAX  # False for NaN and inf too
    if ok.all():
        return
    i = int(np.argmin(ok))
    batch = (offsets.size - 1) // len(keys)
    starts = offsets[::batch] if batch else np.zeros(len(keys) + 1, np.int64)
    t = int(np.searchsorted(starts[1:], i, side="right"))
    v = w[i]
    why = "is not finite" if not np.isfinite(v) else "is outside the float32 range"
    raise InvalidBatchError(f"weights[{i}] = {v!r} {why}: table {keys[t]!r}, weight "
                            f"{i - int(starts[t])} of the table")


@dataclass(frozen=True, eq=False)
class SparseFeatures:
    """The sparse part of a batch: ids of every table, CSR over ``T * B`` bags."""

    keys: tuple[str, ...]
    values: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keys, str):
            raise InvalidBatchError(f"keys must be a sequence of table names, got the string "
                                    f"{self.keys!r}")
        keys = tuple(self.keys)
        if not keys:
            raise InvalidBatchError("keys is empty: a batch needs at least one table")
        if len(set(keys)) != len(keys):
            raise InvalidBatchError(f"keys has duplicates: {list(keys)}")
        object.__setattr__(self, "keys", keys)
        values = _as_int64("values", self.values)
        offsets = _as_int64("offsets", self.offsets)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "offsets", offsets)
        if (offsets.size - 1) % len(keys) != 0 or offsets.size < 1:
            raise InvalidBatchError(
                f"offsets has {offsets.size} entries; expected T * B + 1 with "
                f"T = {len(keys)} tables"
            )
        msg = check_offsets(offsets, values.size)
        if msg:
            raise InvalidBatchError(msg)
        if self.weights is not None:
            w = self.weights
            if hasattr(w, "detach"):
                w = w.detach().cpu().numpy()
            w = np.asarray(w)
            if w.dtype.kind != "f":
                raise InvalidBatchError(f"weights must be floating point, got dtype {w.dtype}")
            if w.shape != values.shape:
                raise InvalidBatchError(
                    f"weights has shape {w.shape} but values has {values.shape}: one weight per id"
                )
            _check_weights(w, keys, offsets)
            object.__setattr__(self, "weights", np.ascontiguousarray(w, dtype=np.float32))

    # -- constructors ------------------------------------------------------
    @classmethod
    def trusted(cls, keys: tuple[str, ...], values: np.ndarray, offsets: np.ndarray,
                weights: np.ndarray | None = None) -> SparseFeatures:
        """Wrap arrays known to be valid without checking them again.

        For code that builds a batch from validated batches (merging requests):
        ``values``/``offsets`` contiguous int64, ``weights`` float32 or None,
        offsets consistent with ``len(keys)`` tables. Anything else must use
        the checked constructors.
        """
        obj = object.__new__(cls)
        object.__setattr__(obj, "keys", tuple(keys))
        object.__setattr__(obj, "values", values)
        object.__setattr__(obj, "offsets", offsets)
        object.__setattr__(obj, "weights", weights)
        return obj

    @classmethod
    def from_lengths(cls, keys: Sequence[str], values: Any, lengths: Any,
                     weights: Any = None) -> SparseFeatures:
        """Build from per-bag lengths (``T * B`` of them, key-major)."""
        lengths = _as_int64("lengths", lengths)
        if lengths.size and lengths.min() < 0:
            i = int(np.argmax(lengths < 0))
            raise InvalidBatchError(f"lengths[{i}] = {lengths[i]} is negative")
        offsets = np.zeros(lengths.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        vals = _as_int64("values", values)
        if offsets[-1] != vals.size:
            raise InvalidBatchError(
                f"lengths sum to {offsets[-1]} but values has {vals.size} ids"
            )
        return cls(tuple(keys), vals, offsets, weights)

    @classmethod
    def from_offsets(cls, keys: Sequence[str], values: Any, offsets: Any,
                     weights: Any = None) -> SparseFeatures:
        """Build from CSR offsets (``T * B + 1`` of them)."""
        return cls(tuple(keys), values, offsets, weights)

    @classmethod
    def from_tables(cls, tables: Mapping[str, tuple[Any, Any]] | Sequence[tuple[str, Any, Any]],
                    weights: Mapping[str, Any] | None = None) -> SparseFeatures:
        """Build from per-table ``(ids, offsets)`` with ``B + 1`` offsets each.

        A value may also be JaggedTensor-like (``values()``, ``offsets()``,
        optionally ``weights_or_none()``), so TorchRec's ``kjt.to_dict()`` is a
        valid input; its weights are used when ``weights`` is not given
        (tables without any weigh 1).
        """
        items = list(tables.items()) if isinstance(tables, Mapping) else [
            (k, (i, o)) for k, i, o in tables]
        if not items:
            raise InvalidBatchError("no tables given")
        parts = [(k, *_table_parts(k, spec)) for k, spec in items]
        if weights is None and any(w is not None for *_, w in parts):
            weights = {k: w if w is not None else np.ones(ids.size, np.float32)
                       for k, ids, _, w in parts}
        keys, vals, offs, ws = [], [], [], []
        base = 0
        batch = None
        for k, ids, off, _ in parts:
            msg = check_offsets(off, ids.size)
            if msg:
                raise InvalidBatchError(f"table {k!r}: {msg}")
            if batch is None:
                batch = off.size - 1
            elif off.size - 1 != batch:
                raise InvalidBatchError(
                    f"table {k!r} has {off.size - 1} bags but the first table has {batch}"
                )
            keys.append(k)
            vals.append(ids)
            offs.append(off[1:] + base)
            base += ids.size
            if weights is not None:
                if k not in weights:
                    raise InvalidBatchError(f"weights given but not for table {k!r}")
                wk = weights[k]
                if hasattr(wk, "detach"):
                    wk = wk.detach().cpu().numpy()
                wk = np.asarray(wk).reshape(-1)  # cast to float32 once range-checked
                if wk.dtype.kind in "iub":
                    wk = wk.astype(np.float64)
                if wk.dtype.kind != "f":
                    raise InvalidBatchError(
                        f"table {k!r}: weights must be floating point, got dtype {wk.dtype}")
                if wk.size != ids.size:
                    raise InvalidBatchError(
                        f"table {k!r}: {wk.size} weights for {ids.size} ids: one weight per id")
                ws.append(wk)
        if len(set(keys)) != len(keys):
            raise InvalidBatchError(f"keys has duplicates: {keys}")
        values = np.concatenate(vals)
        offsets = np.concatenate([np.zeros(1, np.int64), *offs])
        w = None
        if ws:
            w = np.concatenate(ws)
            _check_weights(w, tuple(keys), offsets)
            w = np.ascontiguousarray(w, dtype=np.float32)
        # every part's offsets were checked above: no second pass over them
        return cls.trusted(tuple(keys), values, offsets, w)

    # -- derived -----------------------------------------------------------
    @property
    def num_tables(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return (self.offsets.size - 1) // len(self.keys)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def table_range(self, t: int) -> tuple[int, int]:
        """``[start, stop)`` of table ``t``'s ids in ``values``."""
        b = self.batch_size
        return int(self.offsets[t * b]), int(self.offsets[(t + 1) * b])

    def table(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(ids, offsets (B + 1, from 0), weights)`` of one table."""
        t = self.keys.index(key)
        s, e = self.table_range(t)
        b = self.batch_size
        off = self.offsets[t * b:(t + 1) * b + 1] - s
        w = None if self.weights is None else self.weights[s:e]
        return self.values[s:e], off, w

    def validate_ids(self, rows: Mapping[str, int] | Sequence[int]) -> None:
        """Check every id of table ``keys[t]`` lies in ``[0, rows)``.

        ``rows`` maps key -> row count, or lists counts in key order.
        """
        counts = np.fromiter((rows[k] if isinstance(rows, Mapping) else rows[t]
                              for t, k in enumerate(self.keys)), np.int64, len(self.keys))
        bad = check_table_ids(self.values, self.offsets, self.batch_size, counts)
        if bad is not None:
            t, _ = bad
            # name it as the caller wrote it: the sample and the position in its bag
            s, e = self.table_range(t)
            vals = self.values[s:e]
            i = int(np.flatnonzero((vals < 0) | (vals >= counts[t]))[0]) + s
            b = self.batch_size
            bag = int(np.searchsorted(self.offsets[t * b:(t + 1) * b + 1], i, side="right")) - 1
            v = int(self.values[i])
            what = "is negative" if v < 0 else f"is out of range for a table of {counts[t]} rows"
            raise InvalidBatchError(
                f"table {self.keys[t]!r}: id {v} (sample {bag}, position "
                f"{i - int(self.offsets[t * b + bag])} in its bag) {what}")

    def select(self, keys: Sequence[str]) -> SparseFeatures:
        """The same batch restricted/reordered to ``keys``.

        Built from this batch's arrays without checking them again (a part of a
        valid batch is valid); a checked batch stays checked.
        """
        missing = [k for k in keys if k not in self.keys]
        if missing:
            raise InvalidBatchError(f"batch has no table(s) {missing}; it has {list(self.keys)}")
        keys = tuple(keys)
        if keys == self.keys:
            return self
        if not keys or len(set(keys)) != len(keys):
            raise InvalidBatchError(f"select: keys must be distinct and non-empty, got "
                                    f"{list(keys)}")
        picked = [self.keys.index(k) for k in keys]
        b = self.batch_size
        spans = [self.table_range(t) for t in picked]
        values = np.concatenate([self.values[s:e] for s, e in spans])
        offsets = np.empty(len(keys) * b + 1, np.int64)
        offsets[0] = 0
        base = 0
        for j, (t, (s, e)) in enumerate(zip(picked, spans, strict=True)):
            offsets[j * b + 1:(j + 1) * b + 1] = self.offsets[t * b + 1:(t + 1) * b + 1] - s + base
            base += e - s
        weights = None if self.weights is None else np.concatenate(
            [self.weights[s:e] for s, e in spans])
        return self._derived(keys, values, offsets, weights, picked)

    def _derived(self, keys: tuple[str, ...], values: np.ndarray, offsets: np.ndarray,
                 weights: np.ndarray | None, picked: Sequence[int]) -> SparseFeatures:
        """A batch made of this one's tables ``picked`` (subclasses keep what they know)."""
        return SparseFeatures.trusted(keys, values, offsets, weights)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"keys": list(self.keys), "values": self.values,
                             "offsets": self.offsets}
        if self.weights is not None:
            d["weights"] = self.weights
        return d
