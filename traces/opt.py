"""Belady's OPT: the fewest misses any cache of a given capacity can have.

Keys are global row ids (``table offset + row``, see :func:`global_keys`);
the accesses of a batch count in order, batch after batch. OPT on a miss
with a full cache evicts the resident key whose next use is farthest
(a key never used again first). The next use of every access is computed
with one stable sort (:func:`next_use`); the simulation is a Numba kernel
with an indexed heap, exact and O(n log C).

Example::

    >>> keys = np.array([1, 2, 3, 1, 2, 4, 1])
    >>> next_use(keys)
    array([3, 4, 7, 6, 7, 7, 7])
    >>> belady(keys, capacity_rows=2).misses
    5
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np

from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.kernels.nextuse import belady_hits

__all__ = ["OptResult", "belady", "belady_curve", "global_keys", "next_use"]


@dataclass(frozen=True)
class OptResult:
    """Hits and misses of OPT on one key stream at one capacity."""

    capacity_rows: int
    """Cache capacity, rows."""
    accesses: int
    """Lookups in the stream."""
    hits: int
    misses: int
    unique_keys: int
    """Distinct keys: the compulsory misses."""
    bypass: bool = False
    """Whether the cache could refuse to admit a missed key."""

    def __post_init__(self) -> None:
        if self.capacity_rows < 1:
            raise ConfigError(f"Expected capacity_rows >= 1. Got {self.capacity_rows} instead.")
        if self.hits < 0 or self.misses < 0 or self.hits + self.misses != self.accesses:
            raise ConfigError(
                f"hits ({self.hits}) + misses ({self.misses}) != accesses ({self.accesses})")

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.accesses if self.accesses else 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"capacity_rows": self.capacity_rows, "accesses": self.accesses,
                "hits": self.hits, "misses": self.misses, "unique_keys": self.unique_keys,
                "miss_ratio": self.miss_ratio, "bypass": self.bypass}


def _as_keys(keys: np.ndarray | Sequence[int]) -> np.ndarray:
    k = np.asarray(keys)
    if k.ndim != 1:
        raise InvalidBatchError(f"keys must be 1-D, got shape {k.shape}")
    if k.size and k.dtype.kind not in "iu":
        raise InvalidBatchError(f"keys must hold integers, got dtype {k.dtype}")
    return np.ascontiguousarray(k, dtype=np.int64)


def _sorted_groups(k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, same, dense)``: stable order, "same key as the previous" flags, dense ids."""
    order = np.argsort(k, kind="stable")
    ks = k[order]
    same = ks[1:] == ks[:-1]
    dense = np.empty(k.size, np.int64)
    if k.size:
        gid = np.empty(k.size, np.int64)
        gid[0] = 0
        np.cumsum(~same, out=gid[1:])
        dense[order] = gid
    return order, same, dense


def _next_use_from(order: np.ndarray, same: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, n, np.int64)
    if n >= 2:
        out[order[:-1][same]] = order[1:][same]
    return out


def next_use(keys: np.ndarray | Sequence[int]) -> np.ndarray:
    """Position of the next access of the same key, ``len(keys)`` if none.

    Vectorized: a stable argsort groups each key's accesses in stream order,
    so the next use of an access is the following element of its group.
    """
    k = _as_keys(keys)
    order, same, _ = _sorted_groups(k)
    return _next_use_from(order, same, k.size)


def _prepare(k: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Dense keys, next use and the number of distinct keys, from one sort."""
    order, same, dense = _sorted_groups(k)
    u = int(k.size - np.count_nonzero(same)) if k.size else 0
    return dense, _next_use_from(order, same, k.size), u


@overload
def belady(keys: np.ndarray | Sequence[int], capacity_rows: int, *, bypass: bool = ...,
           return_hits: Literal[False] = ...) -> OptResult: ...
@overload
def belady(keys: np.ndarray | Sequence[int], capacity_rows: int, *, bypass: bool = ...,
           return_hits: Literal[True]) -> tuple[OptResult, np.ndarray]: ...
@overload
def belady(keys: np.ndarray | Sequence[int], capacity_rows: int, *, bypass: bool = ...,
           return_hits: bool) -> OptResult | tuple[OptResult, np.ndarray]: ...
def belady(keys: np.ndarray | Sequence[int], capacity_rows: int, *, bypass: bool = False,
           return_hits: bool = False) -> OptResult | tuple[OptResult, np.ndarray]:
    """Simulate OPT on ``keys`` with a cache of ``capacity_rows`` rows.

    Parameters
    ----------
    keys : array of int
        The access stream (global row ids), in order.
    capacity_rows : int
        Cache capacity in rows (>= 1).
    bypass : bool
        False (default): every missed key is inserted (demand paging, Belady's
        MIN). True: a missed key whose next use is no nearer than every
        resident's is not admitted - the bound for caches with admission
        control (never more misses than the demand bound).
    return_hits : bool
        Also return the boolean hit mask per access.

    Returns
    -------
    OptResult, or ``(OptResult, hit_mask)`` with ``return_hits``.
    """
    if int(capacity_rows) < 1:
        raise ConfigError(f"Expected capacity_rows >= 1. Got {capacity_rows} instead.")
    k = _as_keys(keys)
    dense, nu, u = _prepare(k)
    hits, mask = belady_hits(dense, nu, u, int(capacity_rows), bypass)
    res = OptResult(int(capacity_rows), int(k.size), hits, int(k.size) - hits, u, bool(bypass))
    return (res, mask) if return_hits else res


def belady_curve(keys: np.ndarray | Sequence[int], capacities: Iterable[int], *,
                 bypass: bool = False) -> list[OptResult]:
    """OPT at several capacities, sharing the next-use computation."""
    k = _as_keys(keys)
    dense, nu, u = _prepare(k)
    out = []
    for c in capacities:
        if int(c) < 1:
            raise ConfigError(f"Expected capacity_rows >= 1. Got {c} instead.")
        hits, _ = belady_hits(dense, nu, u, int(c), bypass)
        out.append(OptResult(int(c), int(k.size), hits, int(k.size) - hits, u, bool(bypass)))
    return out


def global_keys(batches: SparseFeatures | Iterable[SparseFeatures],
                table_rows: Sequence[int] | dict[str, int]) -> np.ndarray:
    """The key stream of one or more batches: ``offset of the table + row``.

    ``table_rows`` gives each table's row count, in key order of the first
    batch (or by name); table ``t``'s offset is the sum of the rows before it.
    Ids are checked against their table so that keys of two tables never
    collide.
    """
    if isinstance(batches, SparseFeatures):
        batches = [batches]
    parts = []
    base: np.ndarray | None = None
    keys0: tuple[str, ...] | None = None
    for sf in batches:
        if keys0 is None:
            keys0 = sf.keys
            rows = [int(table_rows[k]) for k in keys0] if isinstance(table_rows, dict) \
                else [int(r) for r in table_rows]
            if len(rows) != len(keys0):
                raise InvalidBatchError(
                    f"{len(rows)} table row counts for {len(keys0)} tables {list(keys0)}")
            base = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        elif sf.keys != keys0:
            raise InvalidBatchError(f"batch tables {list(sf.keys)} differ from {list(keys0)}")
        sf.validate_ids(rows)
        b = sf.batch_size
        per_table = np.diff(sf.offsets[:: b]) if b else np.zeros(len(sf.keys), np.int64)
        assert base is not None
        parts.append(sf.values + np.repeat(base, per_table))
    if not parts:
        return np.zeros(0, np.int64)
    return np.concatenate(parts)
