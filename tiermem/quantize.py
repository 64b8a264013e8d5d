"""Row storage types: float32, float16 and int8 row-wise quantized.

int8 rows carry a float32 ``(scale, bias)`` per row; the dequantized value is
``scale * q + bias`` with ``q`` in ``[-128, 127]``. Rounding to the nearest
level bounds the error of every element by ``scale / 2``.
"""

from __future__ import annotations

import numpy as np

from tiermem.config import Choice

__all__ = ["RowDtype", "dequantize_rows", "quantize_rows"]


class RowDtype(Choice):
    """How the rows of a table are stored (on disk and in DRAM)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"

    @property
    def numpy(self) -> np.dtype:
        """numpy dtype of the stored row elements."""
        return np.dtype(self.value)

    @property
    def quantized(self) -> bool:
        return self is RowDtype.INT8

    def row_bytes(self, dim: int) -> int:
        """Bytes of one row in the weight array (int8 scale/bias live apart)."""
        return dim * self.numpy.itemsize


def quantize_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise int8 quantization of a float block.

    Returns ``(q, qparams)``: ``q`` int8 ``(n, D)``, ``qparams`` float32 ``(n, 2)``
    holding ``(scale, bias)`` such that ``scale * q + bias`` approximates the
    row within ``scale / 2`` per element.
    """
    x = np.asarray(block, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize_rows expects a 2-D block, got shape {x.shape}")
    lo = x.min(axis=1, initial=np.inf) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    hi = x.max(axis=1, initial=-np.inf) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    lo = lo.astype(np.float32)
    hi = hi.astype(np.float32)
    scale = ((hi - lo) / np.float32(255.0)).astype(np.float32)
    flat = scale == 0
    safe = np.where(flat, np.float32(1.0), scale)
    levels = np.rint((x - lo[:, None]) / safe[:, None])
    np.clip(levels, 0, 255, out=levels)
    q = (levels - 128).astype(np.int8)
    # value = scale * (q + 128) + lo = scale * q + (lo + 128 * scale)
    bias = (lo + np.float32(128.0) * scale).astype(np.float32)
    bias[flat] = lo[flat]
    qparams = np.empty((x.shape[0], 2), np.float32)
    qparams[:, 0] = scale
    qparams[:, 1] = bias
    return q, qparams


def dequantize_rows(q: np.ndarray, qparams: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_rows`: float32 ``scale * q + bias``."""
    q = np.asarray(q)
    qp = np.asarray(qparams, dtype=np.float32)
    return (qp[:, 0:1] * q.astype(np.float32) + qp[:, 1:2]).astype(np.float32)


def encode_rows(block: np.ndarray, dtype: RowDtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Convert a float block to the stored representation of ``dtype``."""
    if dtype is RowDtype.INT8:
        return quantize_rows(block)
    return np.ascontiguousarray(block, dtype=dtype.numpy), None
