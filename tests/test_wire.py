"""The binary /predict body (runtime.wire), the request-merge kernel and the one-pass id check.

References: the arrays the body was built from; a per-table Python merge
(numpy slices, the semantics of KeyedJaggedTensor concatenation); a plain
per-id range check.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.batcher import concat_features
from runtime.wire import (
    MAGIC,
    WireFormatError,
    decode_predictions,
    decode_request,
    encode_predictions,
    encode_request,
)
from tiermem.errors import InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.kernels.jagged import merge_key_major
from tiermem.kernels.validate import check_table_ids

NAMES = ("a", "b", "c")
ROWS = (50, 7, 1000)
ND = 4


@st.composite
def batches(draw, weighted=None, max_b=12, max_len=4):
    b = draw(st.integers(0, max_b))
    T = len(NAMES)
    lengths = np.asarray(draw(st.lists(st.integers(0, max_len), min_size=T * b,
                                       max_size=T * b)), np.int64)
    lens = lengths.reshape(T, b)
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.integers(0, r, int(lens[t].sum())) for t, r in enumerate(ROWS)]
                            ) if b else np.zeros(0, np.int64)
    w = draw(st.booleans()) if weighted is None else weighted
    weights = rng.random(values.size).astype(np.float32) if w else None
    dense = rng.standard_normal((b, ND)).astype(np.float32)
    return dense, SparseFeatures.from_lengths(NAMES, values, lengths, weights)


def assert_same(a: SparseFeatures, b: SparseFeatures) -> None:
    assert a.keys == b.keys
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    if a.weights is None:
        assert b.weights is None
    else:
        np.testing.assert_array_equal(a.weights, b.weights)


# -- the binary body ------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from([np.int32, np.int64]))
def test_binary_round_trip(batch, id_dtype):
    dense, sparse = batch
    raw = encode_request(dense, sparse, id_dtype=id_dtype)
    d, s = decode_request(raw, NAMES, ND)
    np.testing.assert_array_equal(d, dense)
    assert d.dtype == np.float32 and d.shape == dense.shape
    assert_same(s, sparse)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 9), st.integers(0, 2**31))
def test_binary_one_id_per_table(b, seed):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, r, b) for r in ROWS], axis=1)  # (B, T)
    dense = rng.standard_normal((b, ND)).astype(np.float32)
    raw = encode_request(dense, ids)
    assert raw[16] == 0  # layout 0
    assert len(raw) == 24 + 4 * b * ND + 4 * b * len(NAMES)
    _, s = decode_request(raw, NAMES, ND)
    exp = SparseFeatures.from_offsets(NAMES, ids.T.reshape(-1), np.arange(ids.size + 1))
    assert_same(s, exp)


def test_binary_errors_name_the_field():
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((3, ND)).astype(np.float32)
    sparse = SparseFeatures.from_lengths(NAMES, [1, 2, 3, 4, 5, 6], [1, 0, 1, 2, 0, 0, 1, 1, 0],
                                         np.ones(6, np.float32))
    raw = encode_request(dense, sparse)
    decode_request(raw, NAMES, ND)
    # every truncation is a clear 400, never a crash
    for n in (0, 10, 23, 24, 40, len(raw) - 1):
        with pytest.raises(WireFormatError) as e:
            decode_request(raw[:n], NAMES, ND)
        assert e.value.status == 400
        assert "bytes" in str(e.value)
    with pytest.raises(WireFormatError, match="after its last section"):
        decode_request(raw + b"\0", NAMES, ND)
    with pytest.raises(WireFormatError, match="magic"):
        decode_request(b"XXXX" + raw[4:], NAMES, ND)

    def patched(field_offset, fmt, value):
        b = bytearray(raw)
        struct.pack_into(fmt, b, field_offset, value)
        return bytes(b)

    for off, fmt, val, status, pattern in [
            (8, "<I", ND + 1, 422, "num_dense = 5; the model expects 4"),
            (12, "<I", 2, 422, "T = 2; the model has 3 tables"),
            (16, "<B", 7, 400, "layout = 7"),
            (17, "<B", 2, 400, "id_bytes = 2"),
            (18, "<B", 6, 400, "flags = 6"),
            (19, "<B", 1, 400, "reserved = 1"),
            (24 + 4 * 3 * ND + 4, "<i", 1, 400, "lengths sum to 7 but header field nnz = 6"),
            (4, "<I", 1 << 31, 400, "too large")]:
        with pytest.raises(WireFormatError, match=pattern) as e:
            decode_request(patched(off, fmt, val), NAMES, ND)
        assert e.value.status == status
    # a negative length
    b = bytearray(raw)
    struct.pack_into("<i", b, 24 + 4 * 3 * ND, -1)
    with pytest.raises(WireFormatError, match=r"lengths\[0\] = -1 is negative"):
        decode_request(bytes(b), NAMES, ND)
    # layout 0 with the wrong id count
    ids = np.zeros((3, len(NAMES)), np.int64)
    one = bytearray(encode_request(dense, ids))
    struct.pack_into("<I", one, 20, 8)
    with pytest.raises(WireFormatError, match="layout 0 needs B \\* T = 9"):
        decode_request(bytes(one), NAMES, ND)
    assert isinstance(WireFormatError("x"), InvalidBatchError)
    assert MAGIC == raw[:4]


def test_binary_encoder_rejects_bad_input():
    d = np.zeros((2, ND), np.float32)
    with pytest.raises(ValueError, match="int32"):
        encode_request(d, np.full((2, 3), 1 << 40))
    with pytest.raises(ValueError, match="batch size"):
        encode_request(d, SparseFeatures.from_offsets(NAMES, [0, 0, 0], [0, 1, 2, 3]))
    with pytest.raises(ValueError, match="2-D"):
        encode_request(np.zeros(3), np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="int32 or int64"):
        encode_request(d, np.zeros((2, 3), np.int64), id_dtype=np.int16)
    big = encode_request(d, np.full((2, 3), 1 << 40), id_dtype=np.int64)
    _, s = decode_request(big, NAMES, ND)
    assert (s.values == 1 << 40).all()


def test_predictions_round_trip():
    p = np.array([0.25, 0.5, 1e-7], np.float32)
    raw = encode_predictions(p)
    assert len(raw) == 12
    np.testing.assert_array_equal(decode_predictions(raw), p)
    with pytest.raises(ValueError, match="multiple of 4"):
        decode_predictions(raw[:5])


# -- merging requests into one batch --------------------------------------------------------

def merge_reference(parts):
    """Per table, the bags of part 0, part 1, ...: numpy slices, one per (table, part)."""
    T = len(NAMES)
    weighted = any(p.weights is not None for p in parts)
    tables, weights = [], {}
    for k in NAMES:
        ids, lens, ws = [], [], []
        for p in parts:
            i, off, w = p.table(k)
            ids.append(i)
            lens.append(np.diff(off))
            ws.append(w if w is not None else np.ones(i.size, np.float32))
        off = np.concatenate([[0], np.cumsum(np.concatenate(lens))]).astype(np.int64)
        tables.append((k, np.concatenate(ids), off))
        weights[k] = np.concatenate(ws)
    assert len(tables) == T
    return SparseFeatures.from_tables(tables, weights if weighted else None)


@settings(max_examples=80, deadline=None)
@given(st.lists(batches(weighted=None, max_b=6), min_size=2, max_size=6))
def test_merge_matches_per_table_reference(reqs):
    parts = [s for _, s in reqs]
    got = concat_features(parts)
    assert_same(got, merge_reference(parts))
    # the trusted result is a valid batch
    SparseFeatures(got.keys, got.values, got.offsets, got.weights)


def test_merge_kernel_handles_empty_parts():
    a = SparseFeatures.from_lengths(NAMES, np.zeros(0, np.int64), np.zeros(0, np.int64))
    b = SparseFeatures.from_lengths(NAMES, [3, 4], [1, 0, 1])
    v, o, w = merge_key_major([a.values, b.values, a.values], [a.offsets, b.offsets, a.offsets],
                              [None, None, None], len(NAMES))
    np.testing.assert_array_equal(v, [3, 4])
    np.testing.assert_array_equal(o, [0, 1, 1, 2])
    assert w is None


# -- the one-pass id check ------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(batches(weighted=False), st.integers(0, 2**31))
def test_table_id_check_finds_the_first_bad_id(batch, seed):
    _, sparse = batch
    rng = np.random.default_rng(seed)
    values = sparse.values.copy()
    if values.size:
        for _ in range(int(rng.integers(0, 3))):
            values[rng.integers(0, values.size)] = rng.choice([-1, 1 << 20])
    s = SparseFeatures(NAMES, values, sparse.offsets)
    # reference: per table, per id, in order
    expect = None
    for t, n in enumerate(ROWS):
        lo, hi = s.table_range(t)
        bad = [i for i in range(lo, hi) if not 0 <= values[i] < n]
        if bad:
            expect = (t, bad[0])
            break
    got = check_table_ids(values, s.offsets, s.batch_size, np.asarray(ROWS))
    if expect is None:
        assert got is None
        s.validate_ids(dict(zip(NAMES, ROWS, strict=True)))
    else:
        assert got is not None and got[0] == expect[0]
        assert f"ids[{expect[1]}] = {values[expect[1]]}" in got[1]
        with pytest.raises(InvalidBatchError, match=f"table '{NAMES[expect[0]]}'"):
            s.validate_ids(list(ROWS))
