"""Synthetic lookup workloads: bounded Zipf popularity per table.

Ranks follow a Zipf law truncated to the table (``P(rank k) ~ k^-alpha``, k in
1..rows, sampled by inverting the continuous CDF); ranks map to rows through
a fixed per-table affine bijection so that hot rows are scattered over the
table, as hashed ids are in production, rather than adjacent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures

__all__ = ["synthetic_batches", "zipf_ids"]


def _coprime_multiplier(n: int, seed: int) -> int:
    rng = np.random.default_rng([seed, n])
    while True:
        a = int(rng.integers(1, max(2, n))) | 1
        if math.gcd(a, n) == 1:
            return a


def zipf_ids(rng: np.random.Generator, rows: int, size: int, alpha: float,
             *, seed: int = 0) -> np.ndarray:
    """``size`` ids in ``[0, rows)`` with Zipf(alpha) popularity (alpha=0: uniform)."""
    if rows < 1:
        raise ConfigError(f"rows must be >= 1, got {rows}")
    if alpha < 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    if alpha == 0:
        return rng.integers(0, rows, size, dtype=np.int64)
    u = rng.random(size)
    if abs(alpha - 1.0) < 1e-9:
        k = np.exp(u * math.log(rows + 1.0))
    else:
        e = 1.0 - alpha
        k = (1.0 + u * ((rows + 1.0) ** e - 1.0)) ** (1.0 / e)
    rank = np.minimum(k.astype(np.int64) - 1, rows - 1)
    rank = np.maximum(rank, 0)
    a = _coprime_multiplier(rows, seed)
    c = int(np.random.default_rng([seed, rows, 1]).integers(0, rows))
    return (rank * a + c) % rows


def synthetic_batches(table_rows: Sequence[int], *, batch_size: int, n_batches: int,
                      alpha: float = 1.05, pooling: int = 1, keys: Sequence[str] | None = None,
                      seed: int = 0) -> Iterator[SparseFeatures]:
    """Batches of fixed pooling factor over tables of ``table_rows`` rows."""
    if batch_size < 1 or n_batches < 0 or pooling < 0:
        raise ConfigError("batch_size must be >= 1, n_batches and pooling >= 0")
    keys = list(keys) if keys is not None else [f"t{i}" for i in range(len(table_rows))]
    rng = np.random.default_rng(seed)
    T = len(table_rows)
    offsets = np.arange(0, T * batch_size * pooling + 1, pooling, dtype=np.int64)
    for _ in range(n_batches):
        values = np.concatenate([zipf_ids(rng, int(r), batch_size * pooling, alpha, seed=seed + t)
                                 for t, r in enumerate(table_rows)])
        yield SparseFeatures(tuple(keys), values, offsets)
