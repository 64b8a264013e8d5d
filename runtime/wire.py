"""The compact binary body of ``POST /predict``: arrays back to back, no parsing.

JSON costs the server ~0.5 µs per number and npz a zip walk per request;
both run on the event loop, which shares the GIL with the batcher. This
format is read with ``np.frombuffer`` views: a few microseconds whatever
the batch size.

Request (``Content-Type: application/x-tiermem``), all little-endian::

    offset  bytes  field
    0       4      magic  b"TMB1"
    4       4      uint32 B          samples
    8       4      uint32 num_dense  dense features per sample (the model's)
    12      4      uint32 T          tables, in the model's table order
    16      1      uint8  layout     0: one id per table and sample
                                     1: KeyedJaggedTensor (lengths + values)
    17      1      uint8  id_bytes   4 (int32 ids) or 8 (int64 ids)
    18      1      uint8  flags      bit 0: per-id float32 weights follow
    19      1      uint8  reserved   0
    20      4      uint32 nnz        ids in all (B * T for layout 0)
    24      ...    dense    float32 (B, num_dense), row-major
            ...    lengths  int32 (T * B), key-major         (layout 1 only)
            ...    values   int32/int64 (nnz): layout 0 sample-major (B, T),
                            layout 1 key-major like a KeyedJaggedTensor
            ...    weights  float32 (nnz)                    (flag bit 0 only)

The body must be exactly that long. Response (``Accept:
application/octet-stream``): the ``B`` float32 predictions, little-endian;
other ``Accept`` values get the JSON answer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tiermem.errors import InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.kernels.jagged import key_major_ids

__all__ = ["BINARY_TYPE", "MAGIC", "PREDICTIONS_TYPE", "WireFormatError", "decode_predictions",
           "decode_request", "encode_predictions", "encode_request"]

BINARY_TYPE = "application/x-tiermem"
PREDICTIONS_TYPE = "application/octet-stream"
MAGIC = b"TMB1"
_HEADER = struct.Struct("<4sIIIBBBBI")
LAYOUT_ONE_HOT, LAYOUT_KJT = 0, 1
_FLAG_WEIGHTS = 1
_MAX_COUNT = 1 << 31  # no field may claim more entries than an int32 holds


class WireFormatError(InvalidBatchError):
    """A binary body that does not follow the format (``status`` 400) or does not fit
    the model (422); the message names the field."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def encode_request(dense: Any, sparse: SparseFeatures | np.ndarray, *,
                   id_dtype: Any = np.int32) -> bytes:
    """A request body from ``dense`` ``(B, num_dense)`` and the sparse features.

    ``sparse`` is either :class:`SparseFeatures` in the model's table order
    (layout 1, or layout 0 when every bag holds exactly one id and there are
    no weights) or an integer array ``(B, T)`` of one id per sample and table
    (layout 0).
    """
    d = np.ascontiguousarray(dense, dtype="<f4")
    if d.ndim != 2:
        raise ValueError(f"dense must be 2-D (B, num_dense), got shape {d.shape}")
    B, nd = d.shape
    idt = np.dtype(id_dtype).newbyteorder("<")
    if idt.kind not in "iu" or idt.itemsize not in (4, 8):
        raise ValueError(f"id_dtype must be int32 or int64, got {idt}")
    idt = np.dtype("<i4") if idt.itemsize == 4 else np.dtype("<i8")
    weights = None
    if isinstance(sparse, SparseFeatures):
        T = sparse.num_tables
        if sparse.batch_size != B:
            raise ValueError(f"dense has {B} rows but the sparse features have batch size "
                             f"{sparse.batch_size}")
        lengths = sparse.lengths
        if sparse.weights is None and lengths.size and (lengths == 1).all():
            layout, lens = LAYOUT_ONE_HOT, None
            values = sparse.values.reshape(T, B).T
        else:
            layout, lens = LAYOUT_KJT, lengths.astype("<i4")
            values = sparse.values
            weights = sparse.weights
    else:
        ids = np.asarray(sparse)
        if ids.ndim != 2 or ids.shape[0] != B or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"sparse ids must be an integer array (B={B}, T), got "
                             f"{ids.dtype} {ids.shape}")
        T = ids.shape[1]
        layout, lens, values = LAYOUT_ONE_HOT, None, ids
    if values.size and idt.itemsize == 4 and (values.min() < -(1 << 31)
                                              or values.max() >= 1 << 31):
        raise ValueError("ids do not fit int32: pass id_dtype=np.int64")
    vals = np.ascontiguousarray(values, dtype=idt)
    head = _HEADER.pack(MAGIC, B, nd, T, layout, idt.itemsize,
                        _FLAG_WEIGHTS if weights is not None else 0, 0, vals.size)
    parts = [head, d.tobytes()]
    if lens is not None:
        parts.append(lens.tobytes())
    parts.append(vals.tobytes())
    if weights is not None:
        parts.append(np.ascontiguousarray(weights, dtype="<f4").tobytes())
    return b"".join(parts)


def _section(raw: bytes | memoryview, pos: int, dtype: str, count: int, what: str
             ) -> tuple[np.ndarray, int]:
    dt = np.dtype(dtype)
    end = pos + count * dt.itemsize
    if end > len(raw):
        raise WireFormatError(f"binary body ends inside '{what}': {len(raw)} bytes, the header "
                              f"needs at least {end}")
    arr = np.frombuffer(raw, dt, count=count, offset=pos)
    return arr, end


def decode_request(raw: bytes | memoryview, table_names: Sequence[str], num_dense: int, *,
                   check_size: Callable[[int, int | None], None] | None = None
                   ) -> tuple[np.ndarray, SparseFeatures]:
    """``(dense, sparse)`` from a binary request body (format in the module docstring).

    Raises :class:`WireFormatError` naming the field when the body does not
    follow the format or does not fit the model (table count, dense width).
    ``check_size(B, nnz)`` (e.g. the batcher's per-request limits) runs on the
    header's counts before anything proportional to them is allocated.
    Ids are checked against the tables later, by the batcher.
    """
    if len(raw) < _HEADER.size:
        raise WireFormatError(f"binary body of {len(raw)} bytes is shorter than its "
                              f"{_HEADER.size}-byte header")
    magic, B, nd, T, layout, id_bytes, flags, reserved, nnz = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise WireFormatError(f"binary body starts with {magic!r}, not the magic {MAGIC!r}")
    if nd != num_dense:
        raise WireFormatError(f"header field num_dense = {nd}; the model expects {num_dense}",
                             422)
    if T != len(table_names):
        raise WireFormatError(f"header field T = {T}; the model has {len(table_names)} tables "
                              "(give every table, in the model's order)", 422)
    if layout not in (LAYOUT_ONE_HOT, LAYOUT_KJT):
        raise WireFormatError(f"header field layout = {layout}; expected 0 (one id per table "
                              "and sample) or 1 (lengths + values)")
    if id_bytes not in (4, 8):
        raise WireFormatError(f"header field id_bytes = {id_bytes}; expected 4 or 8")
    if flags & ~_FLAG_WEIGHTS or reserved:
        raise WireFormatError(f"header flags = {flags}, reserved = {reserved}: unknown bits set")
    if layout == LAYOUT_ONE_HOT and flags & _FLAG_WEIGHTS:
        raise WireFormatError("weights need layout 1 (lengths + values)")
    if B >= _MAX_COUNT or nnz >= _MAX_COUNT:
        raise WireFormatError(f"header fields B = {B}, nnz = {nnz} are too large")
    if layout == LAYOUT_ONE_HOT and nnz != B * T:
        raise WireFormatError(f"header field nnz = {nnz}; layout 0 needs B * T = {B * T}")
    if check_size is not None:
        check_size(B, nnz)
    pos = _HEADER.size
    dense, pos = _section(raw, pos, "<f4", B * nd, "dense")
    lengths = None
    if layout == LAYOUT_KJT:
        lengths, pos = _section(raw, pos, "<i4", T * B, "lengths")
    ids, pos = _section(raw, pos, "<i4" if id_bytes == 4 else "<i8", nnz, "values")
    weights = None
    if flags & _FLAG_WEIGHTS:
        weights, pos = _section(raw, pos, "<f4", nnz, "weights")
    if pos != len(raw):
        raise WireFormatError(f"binary body has {len(raw) - pos} bytes after its last section "
                              f"(expected exactly {pos} bytes)")
    dense = dense.reshape(B, nd)
    if lengths is None:  # valid by construction: one id per bag
        return dense, SparseFeatures.trusted(tuple(table_names), key_major_ids(ids.reshape(B, T)),
                                             np.arange(T * B + 1, dtype=np.int64))
    else:
        if lengths.size and lengths.min() < 0:
            i = int(np.argmax(lengths < 0))
            raise WireFormatError(f"lengths[{i}] = {lengths[i]} is negative")
        offsets = np.zeros(T * B + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] != nnz:
            raise WireFormatError(f"lengths sum to {offsets[-1]} but header field nnz = {nnz}")
        values = ids
    return dense, SparseFeatures(tuple(table_names), values, offsets, weights)


def encode_predictions(preds: np.ndarray) -> bytes:
    """The binary response: ``B`` float32, little-endian."""
    return np.ascontiguousarray(preds, dtype="<f4").tobytes()


def decode_predictions(raw: bytes) -> np.ndarray:
    """Predictions from a binary response body."""
    if len(raw) % 4:
        raise ValueError(f"binary predictions must be a multiple of 4 bytes, got {len(raw)}")
    return np.frombuffer(raw, "<f4").astype(np.float32)
