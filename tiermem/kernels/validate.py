"""Validation of CSR lookups before any kernel reads memory.

One pass in Numba finds the first bad entry; Python then raises an error that
names the table, the field and the value. Kernels downstream assume valid
input and never check bounds themselves.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tiermem.kernels._flags import HOLD_GIL

# Codes returned by _check_csr: (code, position, value)
OK = 0
BAD_FIRST_OFFSET = 1
DECREASING_OFFSET = 2
BAD_LAST_OFFSET = 3
NEGATIVE_ID = 4
ID_OUT_OF_RANGE = 5


@njit(**HOLD_GIL)
def _check_offsets(offsets, nnz):
    if offsets.size == 0:
        return BAD_LAST_OFFSET, 0, 0
    if offsets[0] != 0:
        return BAD_FIRST_OFFSET, 0, offsets[0]
    for j in range(1, offsets.size):
        if offsets[j] < offsets[j - 1]:
            return DECREASING_OFFSET, j, offsets[j]
    last = offsets[offsets.size - 1]
    if last != nnz:
        return BAD_LAST_OFFSET, offsets.size - 1, last
    return OK, 0, 0


@njit(**HOLD_GIL)
def _check_ids(ids, start, stop, n_rows):
    for i in range(start, stop):
        v = ids[i]
        if v < 0:
            return NEGATIVE_ID, i, v
        if v >= n_rows:
            return ID_OUT_OF_RANGE, i, v
    return OK, 0, 0


@njit(**HOLD_GIL)
def _check_table_ids(ids, offsets, batch, rows):
    for t in range(rows.size):
        n = rows[t]
        for i in range(offsets[t * batch], offsets[(t + 1) * batch]):
            v = ids[i]
            if v < 0:
                return NEGATIVE_ID, t, i, v
            if v >= n:
                return ID_OUT_OF_RANGE, t, i, v
    return OK, 0, 0, 0


def offsets_error(code: int, pos: int, value: int, nnz: int) -> str | None:
    """Human text for a ``_check_offsets`` result (None when fine)."""
    if code == OK:
        return None
    if code == BAD_FIRST_OFFSET:
        return f"offsets[0] must be 0, got {value}"
    if code == DECREASING_OFFSET:
        return (f"offsets must be non-decreasing; offsets[{pos}] = {value} is below "
                f"offsets[{pos - 1}]")
    if pos == 0:
        return "offsets is empty: it needs at least one entry (0)"
    return f"offsets[-1] = {value} must equal the number of ids ({nnz})"


def check_offsets(offsets: np.ndarray, nnz: int) -> str | None:
    """Return a message describing the first problem of ``offsets``, else None."""
    code, pos, value = _check_offsets(offsets, nnz)
    return offsets_error(int(code), int(pos), int(value), nnz)


def ids_error(code: int, pos: int, value: int, n_rows: int) -> str | None:
    """Human text for a ``_check_ids`` / ``_check_table_ids`` result (None when fine)."""
    if code == OK:
        return None
    if code == NEGATIVE_ID:
        return f"ids[{pos}] = {value} is negative"
    return f"ids[{pos}] = {value} is out of range for a table of {n_rows} rows"


def check_ids(ids: np.ndarray, start: int, stop: int, n_rows: int) -> str | None:
    """Return a message for the first id of ``ids[start:stop]`` outside ``[0, n_rows)``."""
    code, pos, value = _check_ids(ids, start, stop, n_rows)
    return ids_error(int(code), int(pos), int(value), n_rows)


def check_table_ids(ids: np.ndarray, offsets: np.ndarray, batch_size: int,
                    rows: np.ndarray) -> tuple[int, str] | None:
    """First id outside its table in a key-major batch, in one pass over all tables.

    Table ``t``'s ids are ``ids[offsets[t * B] : offsets[(t + 1) * B]]`` and must
    lie in ``[0, rows[t])``. Returns ``(t, message)`` or None.
    """
    code, t, pos, value = _check_table_ids(ids, offsets, int(batch_size),
                                           np.ascontiguousarray(rows, dtype=np.int64))
    msg = ids_error(int(code), int(pos), int(value), int(rows[t]))
    return None if msg is None else (int(t), msg)
