"""SparseLengthsSum kernels against torch.nn.EmbeddingBag."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiermem.errors import InvalidBatchError
from tiermem.kernels import sls, threads
from tiermem.kernels.sls import gather_touch, pool_arena, sparse_lengths_sum
from tiermem.quantize import dequantize_rows, quantize_rows

KERNELS_DIR = Path(sls.__file__).parent

# widths: not multiples of 8 (run-time width kernel) and a few compiled-width ones
ODD_DIMS = [1, 3, 5, 7, 13, 17, 33, 63]
FIXED_DIMS = [16, 64]
ALL_DIMS = ODD_DIMS + FIXED_DIMS

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _eb(table: np.ndarray, ids: np.ndarray, offsets: np.ndarray, mode: str,
        weights: np.ndarray | None = None) -> np.ndarray:
    """torch.nn.EmbeddingBag (functional) with include_last_offset=True."""
    B = offsets.size - 1
    if B == 0:
        return np.zeros((0, table.shape[1]), np.float32)
    with torch.no_grad():
        res = torch.nn.functional.embedding_bag(
            torch.from_numpy(np.ascontiguousarray(ids)), torch.from_numpy(table),
            torch.from_numpy(np.ascontiguousarray(offsets)), mode=mode,
            per_sample_weights=None if weights is None else torch.from_numpy(weights),
            include_last_offset=True)
    return res.numpy()


def _assert_close(ours: np.ndarray, ref: np.ndarray, mag: np.ndarray) -> None:
    """float32 sums in possibly different order: relative to the sum of magnitudes."""
    assert ours.shape == ref.shape
    bad = np.abs(ours - ref) > 1e-5 * mag + 1e-5
    assert not bad.any(), f"max err {np.abs(ours - ref).max()} at {np.argwhere(bad)[:3]}"


@st.composite
def batches(draw, max_rows=300, dims=ALL_DIMS, max_b=12, max_pool=200):  # type: ignore[no-untyped-def]
    n_rows = draw(st.integers(1, max_rows))
    D = draw(st.sampled_from(dims))
    B = draw(st.integers(0, max_b))
    lengths = draw(st.lists(st.integers(0, max_pool), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    offsets = np.zeros(B + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = rng.integers(0, n_rows, int(offsets[-1])).astype(np.int64)
    table = rng.standard_normal((n_rows, D)).astype(np.float32)
    weights = rng.uniform(-2, 2, ids.size).astype(np.float32)
    return table, ids, offsets, weights


MODES = st.sampled_from(["sum", "mean", "weighted"])
PDS = st.sampled_from([0, 16, 48])


def _run(table, ids, offsets, weights, mode, pd, **kw):  # type: ignore[no-untyped-def]
    if mode == "weighted":
        return sparse_lengths_sum(table, ids, offsets, weights, prefetch_distance=pd, **kw)
    return sparse_lengths_sum(table, ids, offsets, mode=mode, prefetch_distance=pd, **kw)


def _ref(table, ids, offsets, weights, mode):  # type: ignore[no-untyped-def]
    if mode == "weighted":
        return (_eb(table, ids, offsets, "sum", weights),
                _eb(np.abs(table), ids, offsets, "sum", np.abs(weights)))
    return _eb(table, ids, offsets, mode), _eb(np.abs(table), ids, offsets, mode)


@SETTINGS
@given(batches(), MODES, PDS)
def test_float32_matches_embedding_bag(batch, mode, pd):  # type: ignore[no-untyped-def]
    table, ids, offsets, weights = batch
    ref, mag = _ref(table, ids, offsets, weights, mode)
    _assert_close(_run(table, ids, offsets, weights, mode, pd), ref, mag)


@SETTINGS
@given(batches(max_pool=60), MODES, PDS)
def test_float16_matches_embedding_bag_of_the_halves(batch, mode, pd):  # type: ignore[no-untyped-def]
    table, ids, offsets, weights = batch
    half = table.astype(np.float16)
    wide = half.astype(np.float32)
    ref, mag = _ref(wide, ids, offsets, weights, mode)
    _assert_close(_run(half, ids, offsets, weights, mode, pd), ref, mag)


@SETTINGS
@given(batches(max_pool=60), MODES, PDS)
def test_int8_matches_dequantized_rows_within_quantization_bound(batch, mode, pd):  # type: ignore[no-untyped-def]
    table, ids, offsets, weights = batch
    q, qp = quantize_rows(table)
    deq = dequantize_rows(q, qp).astype(np.float32)
    ref, mag = _ref(deq, ids, offsets, weights, mode)
    ours = _run(q, ids, offsets, weights, mode, pd, qparams=qp)
    _assert_close(ours, ref, mag)
    # against the original float rows: per element |err| <= scale / 2, summed over the bag
    exact, mag0 = _ref(table, ids, offsets, weights, mode)
    half_scale = np.repeat(qp[:, :1] / 2, table.shape[1], axis=1).astype(np.float32)
    w_abs = np.abs(weights) if mode == "weighted" else None
    bound = _eb(half_scale, ids, offsets, "sum" if mode == "weighted" else mode, w_abs)
    assert (np.abs(ours - exact) <= bound * (1 + 1e-4) + 1e-5 * (mag + mag0) + 1e-6).all()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4), st.integers(0, 9), st.sampled_from(ALL_DIMS), st.sampled_from(
    ["sum", "mean", "weighted"]), PDS, st.integers(0, 2**32 - 1))
def test_multi_table_arena_with_row_and_col_bases(T, B, D, mode, pd, seed):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 50, T)
    row_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    W = rng.standard_normal((int(sizes.sum()), D)).astype(np.float32)
    gap = 3  # unused columns between tables stay untouched
    col_base = (np.arange(T) * (D + gap) + 1).astype(np.int64)
    C = int(col_base[-1]) + D + 2
    lengths = rng.integers(0, 40, T * B)
    offsets = np.zeros(T * B + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = np.empty(int(offsets[-1]), np.int64)
    for j in range(T * B):
        t = j // B
        ids[offsets[j]:offsets[j + 1]] = rng.integers(0, sizes[t], lengths[j])
    weights = rng.uniform(-1, 1, ids.size).astype(np.float32)
    out = np.full((B, C), 7.0, np.float32)
    pool_arena(W, None, ids, offsets, batch_size=B, row_base=row_base, col_base=col_base,
               out=out, weights=weights if mode == "weighted" else None,
               mode="sum" if mode == "weighted" else mode, prefetch_distance=pd)
    covered = np.zeros(C, bool)
    for t in range(T):
        sl = slice(offsets[t * B], offsets[(t + 1) * B])
        offs_t = offsets[t * B:(t + 1) * B + 1] - offsets[t * B]
        table_t = W[row_base[t]:row_base[t] + sizes[t]]
        ref, mag = _ref(table_t, ids[sl], offs_t, weights[sl], mode)
        cols = slice(col_base[t], col_base[t] + D)
        _assert_close(out[:, cols], ref, mag)
        covered[cols] = True
    assert (out[:, ~covered] == 7.0).all()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.sampled_from([600, 1500]), st.sampled_from([12, 64]),
       st.sampled_from(["float32", "float16", "int8"]), st.sampled_from(["sum", "weighted"]),
       st.sampled_from([1, 2]), st.integers(0, 2**32 - 1))
def test_parallel_path_matches_reference(T, B, D, dtype, mode, n_threads, seed):  # type: ignore[no-untyped-def]
    """Batches big enough for the parallel kernel (many chunks, chunk and table
    boundaries crossing, each chunk's first rows prefetched by the thread that claimed
    it), on 1 and 2 threads, against a per-table EmbeddingBag reference."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 3000, T)
    row_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rows = rng.standard_normal((int(sizes.sum()), D)).astype(np.float32)
    Q = None
    if dtype == "int8":
        W, Q = quantize_rows(rows)
        ref_rows = dequantize_rows(W, Q).astype(np.float32)
    else:
        W = rows.astype(dtype)
        ref_rows = W.astype(np.float32)
    lengths = rng.integers(0, 5, T * B)  # short bags, empty ones among them
    offsets = np.zeros(T * B + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = np.concatenate([rng.integers(0, sizes[j // B], lengths[j]) for j in range(T * B)]
                         ).astype(np.int64)
    weights = rng.uniform(-1, 1, ids.size).astype(np.float32) if mode == "weighted" else None
    col_base = (np.arange(T) * D).astype(np.int64)
    out = np.zeros((B, T * D), np.float32)
    with threads(n_threads):
        pool_arena(W, Q, ids, offsets, batch_size=B, row_base=row_base, col_base=col_base,
                   out=out, weights=weights)
    for t in range(T):
        sl = slice(offsets[t * B], offsets[(t + 1) * B])
        offs_t = offsets[t * B:(t + 1) * B + 1] - offsets[t * B]
        table_t = ref_rows[row_base[t]:row_base[t] + sizes[t]]
        ref, mag = _ref(table_t, ids[sl], offs_t, None if weights is None else weights[sl],
                        mode)
        _assert_close(out[:, t * D:(t + 1) * D], ref, mag)


@pytest.mark.parametrize("D", [5, 64])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_empty_batches_and_empty_bags(D, dtype):  # type: ignore[no-untyped-def]
    table = np.ones((4, D), np.float32)
    kw = {}
    if dtype == "int8":
        table, kw["qparams"] = quantize_rows(table)
    else:
        table = table.astype(dtype)
    # B = 0
    res = sparse_lengths_sum(table, np.zeros(0, np.int64), np.zeros(1, np.int64), **kw)
    assert res.shape == (0, D)
    # nnz = 0, every bag empty
    for mode in ("sum", "mean"):
        res = sparse_lengths_sum(table, np.zeros(0, np.int64), np.zeros(4, np.int64),
                                 mode=mode, **kw)
        assert res.shape == (3, D) and (res == 0).all()
    # pool_arena with B = 0 and T tables
    out = np.zeros((0, D), np.float32)
    pool_arena(table, kw.get("qparams"), np.zeros(0, np.int64), np.zeros(1, np.int64),
               batch_size=0, row_base=np.zeros(2, np.int64), col_base=np.zeros(2, np.int64),
               out=out)


@pytest.mark.parametrize("D", [1, 7, 16, 64, 128])
def test_single_row_table(D):  # type: ignore[no-untyped-def]
    table = np.arange(D, dtype=np.float32).reshape(1, D)
    res = sparse_lengths_sum(table, np.zeros(3, np.int64), np.array([0, 1, 3], np.int64))
    np.testing.assert_array_equal(res, np.stack([table[0], 2 * table[0]]))


@pytest.mark.parametrize("D", [13, 64])
def test_unaligned_arena_and_large_ids(D):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    buf = rng.standard_normal(5000 * D + 1).astype(np.float32)
    table = buf[1:].reshape(5000, D)  # rows not on 64-byte lines
    ids = rng.integers(0, 5000, 3000).astype(np.int64)
    offsets = np.arange(0, 3001, 30, dtype=np.int64)
    for pd in (0, 1, 16, 64):
        ref, mag = _ref(np.ascontiguousarray(table), ids, offsets, None, "sum")
        _assert_close(sparse_lengths_sum(table, ids, offsets, prefetch_distance=pd), ref, mag)


@pytest.mark.parametrize("D", [12, 64])
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
def test_int8_rows_fused_with_their_qparams(D, mode):  # type: ignore[no-untyped-def]
    """Row-strided views: each int8 row followed by its (scale, bias) in one buffer."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((3000, D)).astype(np.float32)
    q, qp = quantize_rows(table)
    buf = np.zeros((3000, D + 8), np.uint8)
    W = buf[:, :D].view(np.int8)
    Q = buf[:, D:].view(np.float32)
    W[:] = q
    Q[:] = qp
    ids = rng.integers(0, 3000, 2000).astype(np.int64)
    offsets = np.arange(0, 2001, 40, dtype=np.int64)
    weights = rng.uniform(-1, 1, ids.size).astype(np.float32)
    deq = dequantize_rows(q, qp).astype(np.float32)
    ref, mag = _ref(deq, ids, offsets, weights, mode)
    for pd in (0, 16):
        _assert_close(_run(W, ids, offsets, weights, mode, pd, qparams=Q), ref, mag)


def test_concurrent_calls_from_python_threads():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((20000, 64)).astype(np.float32)
    jobs = []
    for _ in range(8):
        ids = rng.integers(0, 20000, 64 * 50).astype(np.int64)
        offsets = np.arange(0, ids.size + 1, 50, dtype=np.int64)
        jobs.append((ids, offsets, _eb(table, ids, offsets, "sum")))
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(20):
                ids, offsets, ref = jobs[k]
                res = sparse_lengths_sum(table, ids, offsets)
                np.testing.assert_allclose(res, ref, rtol=1e-5, atol=1e-4)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


# -- bad input -------------------------------------------------------------------------

@pytest.fixture
def small():  # type: ignore[no-untyped-def]
    return np.ones((10, 4), np.float32)


@pytest.mark.parametrize("ids, offsets, field, value", [
    ([1, -3, 2], [0, 1, 3], "indices", "-3"),
    ([1, 10, 2], [0, 1, 3], "indices", "10"),
    ([1, 2, 3], [0, 2, 1, 3], "offsets", "1"),
    ([1, 2, 3], [0, 1, 2], "offsets", "2"),
    ([1, 2, 3], [0, 1, 4], "offsets", "4"),
    ([1, 2, 3], [1, 3], "offsets", "1"),
])
def test_bad_batches_raise_naming_the_field(small, ids, offsets, field, value):  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidBatchError, match=field) as e:
        sparse_lengths_sum(small, np.array(ids, np.int64), np.array(offsets, np.int64))
    assert value in str(e.value)
    assert isinstance(e.value, ValueError)


def test_wrong_dtypes_raise(small):  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidBatchError, match="indices"):
        sparse_lengths_sum(small, np.array([1.0, 2.0]), np.array([0, 2], np.int64))
    with pytest.raises(InvalidBatchError, match="offsets"):
        sparse_lengths_sum(small, np.array([1, 2]), np.array([0.0, 2.0]))
    with pytest.raises(InvalidBatchError, match="W must be"):
        sparse_lengths_sum(small.astype(np.float64), np.array([1]), np.array([0, 1]))
    with pytest.raises(InvalidBatchError, match="Q must be"):
        sparse_lengths_sum(small.astype(np.int8), np.array([1]), np.array([0, 1]))
    with pytest.raises(InvalidBatchError, match="mode"):
        sparse_lengths_sum(small, np.array([1]), np.array([0, 1]), mode="max")
    with pytest.raises(InvalidBatchError, match="weights"):
        sparse_lengths_sum(small, np.array([1]), np.array([0, 1]), np.ones(1, np.float32),
                           mode="mean")
    with pytest.raises(InvalidBatchError, match="weights"):
        sparse_lengths_sum(small, np.array([1]), np.array([0, 1]), np.ones(2, np.float32))
    # int32 ids are accepted (converted)
    res = sparse_lengths_sum(small, np.array([1, 2], np.int32), np.array([0, 2], np.int32))
    assert (res == 2).all()


def test_pool_arena_checks_shapes_and_dtypes(small):  # type: ignore[no-untyped-def]
    ids = np.array([1, 2], np.int64)
    offs = np.array([0, 2], np.int64)
    zero = np.zeros(1, np.int64)
    out = np.zeros((1, 4), np.float32)
    ok = dict(batch_size=1, row_base=zero, col_base=zero, out=out)
    pool_arena(small, None, ids, offs, **ok)
    assert (out == 2).all()
    cases = [
        (dict(ok, out=np.zeros((1, 4), np.float64)), "out"),
        (dict(ok, out=np.zeros((2, 4), np.float32)), "out has 2 rows"),
        (dict(ok, batch_size=2), "offsets has 2 entries"),
        (dict(ok, row_base=zero.astype(np.int32)), "row_base"),
        (dict(ok, col_base=np.zeros(2, np.int64)), "col_base"),
        (dict(ok, col_base=np.ones(1, np.int64)), "col_base must lie"),
        (dict(ok, col_base=-np.ones(1, np.int64)), "col_base must lie"),
        (dict(ok, mode="max"), "mode"),
        (dict(ok, prefetch_distance=-1), "prefetch_distance"),
    ]
    for kw, msg in cases:
        with pytest.raises(InvalidBatchError, match=msg):
            pool_arena(small, None, ids, offs, **kw)
    with pytest.raises(InvalidBatchError, match="ids"):
        pool_arena(small, None, ids.astype(np.int32), offs, **ok)
    with pytest.raises(InvalidBatchError, match="contiguous"):
        pool_arena(np.ones((10, 8), np.float32)[:, ::2], None, ids, offs, **ok)
    with pytest.raises(InvalidBatchError, match="offsets must start at 0 and end"):
        pool_arena(small, None, ids, np.array([0, 1], np.int64), **ok)


def test_gather_touch_reads_the_rows():
    W = np.ones((100, 64), np.float32)
    ids = np.arange(100, dtype=np.int64)
    assert gather_touch(W, ids) == 100 * 64
    assert gather_touch(W.astype(np.float16), ids) == 100 * 64
    assert gather_touch(W, np.zeros(0, np.int64)) == 0.0
    rng = np.random.default_rng(0)
    V = rng.standard_normal((1000, 12)).astype(np.float32)
    some = rng.integers(0, 1000, 5000)
    for pd in (0, 48):
        assert gather_touch(V, some, pd) == pytest.approx(float(V[some].sum(dtype=np.float64)),
                                                           rel=1e-5)
    with pytest.raises(InvalidBatchError, match="width 6"):
        gather_touch(np.ones((4, 6), np.float32), ids[:2])


# -- conventions ---------------------------------------------------------------------------

def test_every_njit_in_kernels_takes_its_flags_from_flags_module():
    """``@njit(**SERIAL)`` / ``@njit(**PARALLEL)`` (or another flag set of ``_flags.py``,
    imported from there); extra keywords may not override a compile flag."""
    from tiermem.kernels import _flags

    flag_sets = {k for k, v in vars(_flags).items() if k.isupper() and isinstance(v, dict)}
    assert {"SERIAL", "PARALLEL"} <= flag_sets
    flag_keys = set(_flags.SERIAL) | set(_flags.PARALLEL)
    found = 0
    for path in sorted(KERNELS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module == "tiermem.kernels._flags" for a in n.names}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for dec in node.decorator_list:
                name = dec.func if isinstance(dec, ast.Call) else dec
                ident = name.attr if isinstance(name, ast.Attribute) else getattr(name, "id", "")
                if ident not in ("njit", "jit"):
                    continue
                found += 1
                where = f"{path.name}:{node.lineno} {node.name}"
                assert isinstance(dec, ast.Call), f"{where}: bare @{ident}, use @njit(**SERIAL)"
                assert ident == "njit", f"{where}: use njit"
                assert not dec.args, f"{where}: positional arguments"
                stars = [kw for kw in dec.keywords if kw.arg is None]
                assert len(stars) == 1 and isinstance(stars[0].value, ast.Name), \
                    f"{where}: needs exactly one **FLAGS from _flags.py"
                flags = stars[0].value.id
                assert flags in flag_sets and flags in imported, \
                    f"{where}: **{flags} is not a flag set imported from _flags.py"
                overridden = {kw.arg for kw in dec.keywords if kw.arg} & flag_keys
                assert not overridden, f"{where}: overrides compile flags {overridden}"
    assert found >= 3
