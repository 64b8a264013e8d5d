"""The tiers (DRAM, SSD, CXL-emulated) against torch.nn.EmbeddingBag, and SparseFeatures.

The reference decodes every table with plain ``zarr.open`` (float16 -> float32 cast,
int8 -> ``scale * q + bias``) and pools with ``torch.nn.EmbeddingBag``; nothing of
tiermem is used to build the expected values.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.config import TierConfig
from tiermem.errors import InvalidBatchError, StoreError, TierMemError
from tiermem.features import SparseFeatures
from tiermem.format import TableSpec, create_store, open_store
from tiermem.tiers import CxlTier, DramTier, SsdTier, open_tier

RTOL = 1e-5
ATOL = 1e-5
TIERS = ["dram", "ssd", "cxl"]
DTYPES = ["float32", "float16", "int8"]
MODES = ["sum", "mean", "weighted"]

# name: (rows, dim, dtype). Several tables per (dtype, dim) group, several groups per
# dtype, widths that take the fixed-width kernels (4, 8, 16) and the any-width one (3, 5).
TABLES = {
    "f32_a": (50, 4, "float32"),
    "f32_b": (33, 4, "float32"),
    "f32_c": (20, 3, "float32"),
    "f16_a": (40, 8, "float16"),
    "f16_b": (25, 8, "float16"),
    "f16_c": (9, 5, "float16"),
    "i8_a": (60, 4, "int8"),
    "i8_b": (17, 16, "int8"),
    "i8_c": (30, 4, "int8"),
}
BY_DTYPE = {d: [k for k, v in TABLES.items() if v[2] == d] for d in DTYPES}


# ---------------------------------------------------------------------------
# fixtures and independent references


def _make_store(path: Path, chunk_rows: int | None, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    specs = [TableSpec(n, r, d, dt) for n, (r, d, dt) in TABLES.items()]
    with create_store(path, specs, chunk_rows=chunk_rows) as w:
        for s in specs:
            a = rng.uniform(-1, 1, (s.rows, s.dim)).astype(np.float32)
            a *= rng.uniform(0.1, 3.0, (s.rows, 1)).astype(np.float32)  # rows of varied scale
            for start in range(0, s.rows, 7):
                w.write(s.name, a[start:start + 7])


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tiers") / "mixed.zarr"
    _make_store(p, chunk_rows=None)
    return p


@pytest.fixture(scope="module")
def small_chunk_store_path(tmp_path_factory) -> Path:
    """Same rows as ``store_path`` but 3 rows per chunk file (many files, padded last chunk)."""
    p = tmp_path_factory.mktemp("tiers_small") / "mixed.zarr"
    _make_store(p, chunk_rows=3)
    return p


def _decoded(path: Path) -> dict[str, np.ndarray]:
    """float32 rows of every table, decoded from a plain zarr read."""
    g = zarr.open(str(path), mode="r")
    out = {}
    for name, (_, _, dtype) in TABLES.items():
        w = np.asarray(g[f"tables/{name}/weight"][:])
        if dtype == "int8":
            qp = np.asarray(g[f"tables/{name}/qparams"][:])
            out[name] = (qp[:, 0:1] * w.astype(np.float32) + qp[:, 1:2]).astype(np.float32)
        else:
            out[name] = w.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def decoded(store_path: Path) -> dict[str, np.ndarray]:
    return _decoded(store_path)


@pytest.fixture(scope="module")
def tiers(store_path: Path):
    info = open_store(store_path)
    opened = {
        "dram": open_tier(info, TierConfig(kind="dram")),
        "ssd": open_tier(info, TierConfig(kind="ssd", io_threads=8)),
        "cxl": open_tier(info, TierConfig(kind="cxl")),
    }
    yield opened
    for t in opened.values():
        t.close()


def _random_batch(rng: np.random.Generator, keys: list[str], batch: int, *,
                  max_len: int = 5, weighted: bool = False) -> SparseFeatures:
    lengths = rng.integers(0, max_len + 1, len(keys) * batch)
    if lengths.size:
        lengths[rng.random(lengths.size) < 0.2] = 0  # plenty of empty bags
    values = []
    for t, k in enumerate(keys):
        n = int(lengths[t * batch:(t + 1) * batch].sum())
        rows = TABLES[k][0]
        ids = rng.integers(0, rows, n)
        if n > 2:
            ids[: n // 3] = rng.integers(0, 3, n // 3)  # duplicates within the batch
            ids[-1] = rows - 1  # the last row of the table
        values.append(ids)
    v = np.concatenate(values) if values else np.zeros(0, np.int64)
    w = rng.uniform(-2, 2, v.size).astype(np.float32) if weighted else None
    return SparseFeatures.from_lengths(keys, v, lengths, w)


def _reference(decoded: dict[str, np.ndarray], sf: SparseFeatures, mode: str) -> np.ndarray:
    """torch.nn.EmbeddingBag per table, concatenated in key order."""
    cols = []
    for k in sf.keys:
        ids, off, w = sf.table(k)
        bag = torch.nn.EmbeddingBag.from_pretrained(
            torch.from_numpy(decoded[k]), mode=mode, freeze=True, include_last_offset=True)
        with torch.no_grad():
            r = bag(torch.from_numpy(ids.copy()), torch.from_numpy(off.copy()),
                    per_sample_weights=None if w is None else torch.from_numpy(w.copy()))
        cols.append(r.numpy())
    return np.concatenate(cols, axis=1) if cols else np.zeros((sf.batch_size, 0), np.float32)


def _mode_args(mode: str) -> tuple[str, bool]:
    return ("sum", True) if mode == "weighted" else (mode, False)


# ---------------------------------------------------------------------------
# pooling vs EmbeddingBag


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", TIERS)
def test_pool_single_dtype(tiers, decoded, kind: str, dtype: str, mode: str) -> None:
    tier = tiers[kind]
    pool_mode, weighted = _mode_args(mode)
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{dtype}-{mode}".encode()))
    for batch in (1, 7, 32):
        keys = list(rng.permutation(BY_DTYPE[dtype]))
        sf = _random_batch(rng, keys, batch, weighted=weighted)
        got = tier.pool(sf, mode=pool_mode)
        assert got.shape == (batch, sum(TABLES[k][1] for k in keys)) and got.dtype == np.float32
        np.testing.assert_allclose(got, _reference(decoded, sf, pool_mode), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", TIERS)
def test_pool_mixed_dtypes_and_dims(tiers, decoded, kind: str, mode: str) -> None:
    """All tables of the store in one batch, in a shuffled order: one kernel call per group."""
    tier = tiers[kind]
    pool_mode, weighted = _mode_args(mode)
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{mode}-mixed".encode()))
    for batch in (3, 64):
        keys = list(rng.permutation(list(TABLES)))
        sf = _random_batch(rng, keys, batch, weighted=weighted, max_len=8)
        got = tier.pool(sf, mode=pool_mode)
        np.testing.assert_allclose(got, _reference(decoded, sf, pool_mode), rtol=RTOL, atol=ATOL)
        # a subset of the tables
        sub = keys[::3]
        sf2 = sf.select(sub)
        np.testing.assert_allclose(tier.pool(sf2, mode=pool_mode),
                                   _reference(decoded, sf2, pool_mode), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", TIERS)
def test_pool_empty_bags_and_no_ids(tiers, decoded, kind: str) -> None:
    tier = tiers[kind]
    keys = ["f32_a", "f16_a", "i8_b"]
    # every bag empty: zeros, for every mode
    sf = SparseFeatures.from_lengths(keys, np.zeros(0, np.int64), np.zeros(3 * 5, np.int64))
    for mode in ("sum", "mean"):
        got = tier.pool(sf, mode=mode)
        assert got.shape == (5, 4 + 8 + 16)
        np.testing.assert_array_equal(got, 0.0)
    # one non-empty bag among empties, in the middle table
    sf = SparseFeatures.from_lengths(keys, [7, 7, 3], [0, 0, 0, 0, 0, 0, 3, 0, 0, 0,
                                                       0, 0, 0, 0, 0])
    for mode in ("sum", "mean"):
        got = tier.pool(sf, mode=mode)
        np.testing.assert_allclose(got, _reference(decoded, sf, mode), rtol=RTOL, atol=ATOL)
        assert np.count_nonzero(np.abs(got).sum(axis=1)) == 1


@pytest.mark.parametrize("kind", TIERS)
def test_pool_batch_size_zero(tiers, kind: str) -> None:
    sf = SparseFeatures.from_lengths(["f32_a", "i8_a", "f16_c"], np.zeros(0, np.int64),
                                     np.zeros(0, np.int64))
    assert sf.batch_size == 0
    got = tiers[kind].pool(sf)
    assert got.shape == (0, 4 + 4 + 5) and got.dtype == np.float32


@pytest.mark.parametrize("kind", TIERS)
def test_pool_into_out(tiers, decoded, kind: str) -> None:
    rng = np.random.default_rng(3)
    sf = _random_batch(rng, ["i8_a", "f32_c"], 6)
    out = np.full((6, 7), np.nan, np.float32)
    res = tiers[kind].pool(sf, out=out)
    assert res is out
    np.testing.assert_allclose(out, _reference(decoded, sf, "sum"), rtol=RTOL, atol=ATOL)
    with pytest.raises(InvalidBatchError, match="out must be"):
        tiers[kind].pool(sf, out=np.zeros((6, 8), np.float32))
    with pytest.raises(InvalidBatchError, match="out must be"):
        tiers[kind].pool(sf, out=np.zeros((6, 7), np.float64))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(0, 12),
       n_keys=st.integers(1, len(TABLES)), mode=st.sampled_from(MODES),
       kind=st.sampled_from(TIERS))
def test_pool_property(tiers, decoded, seed: int, batch: int, n_keys: int, mode: str,
                       kind: str) -> None:
    rng = np.random.default_rng(seed)
    keys = list(rng.choice(list(TABLES), n_keys, replace=False))
    pool_mode, weighted = _mode_args(mode)
    sf = _random_batch(rng, keys, batch, weighted=weighted, max_len=int(rng.integers(0, 9)))
    got = tiers[kind].pool(sf, mode=pool_mode)
    np.testing.assert_allclose(got, _reference(decoded, sf, pool_mode), rtol=RTOL, atol=ATOL)


def test_tiers_agree_exactly(tiers) -> None:
    """Every tier runs the same kernel on the same rows: results are bit-identical."""
    rng = np.random.default_rng(17)
    sf = _random_batch(rng, list(TABLES), 40, weighted=True, max_len=10)
    res = {k: t.pool(sf) for k, t in tiers.items()}
    np.testing.assert_array_equal(res["dram"], res["ssd"])
    np.testing.assert_array_equal(res["dram"], res["cxl"])


# ---------------------------------------------------------------------------
# SSD specifics


def test_ssd_small_chunks_and_coalescing(small_chunk_store_path: Path, decoded) -> None:
    info = open_store(small_chunk_store_path)
    assert info.table("f32_a").chunk_rows == 3 and info.table("f32_a").n_chunks == 17
    # the small-chunk store holds the same rows as the default one
    small = _decoded(small_chunk_store_path)
    for k in TABLES:
        np.testing.assert_array_equal(small[k], decoded[k])
    rng = np.random.default_rng(5)
    batches = [_random_batch(rng, list(rng.permutation(list(TABLES))), b, weighted=w, max_len=9)
               for b, w in ((16, False), (50, True), (1, False))]
    configs = [
        TierConfig(kind="ssd"),
        TierConfig(kind="ssd", coalesce_gap_bytes=0),
        TierConfig(kind="ssd", coalesce_gap_bytes=1 << 20, max_read_bytes=1 << 20),
        TierConfig(kind="ssd", coalesce_gap_bytes=4096, max_read_bytes=16, io_threads=1),
    ]
    results = []
    for cfg in configs:
        with SsdTier(info, cfg) as t:
            results.append([t.pool(sf) for sf in batches])
    for r in results[1:]:
        for a, b in zip(results[0], r, strict=True):
            np.testing.assert_array_equal(a, b)
    for sf, got in zip(batches, results[0], strict=True):
        np.testing.assert_allclose(got, _reference(decoded, sf, "sum"), rtol=RTOL, atol=ATOL)


def test_ssd_coalescing_reduces_read_ops(small_chunk_store_path: Path) -> None:
    """Read counts follow the chunk layout (3 rows of 16 bytes per file): contiguous rows
    are one read per file; with gap 0 every isolated row is its own read, with a 4 KiB gap
    the wanted rows of one file merge into one read spanning them."""
    info = open_store(small_chunk_store_path)
    cases = {
        "contiguous": np.arange(50, dtype=np.int64),
        "every_other": np.arange(0, 50, 2, dtype=np.int64),
        "sparse_dups": np.array([49, 0, 2, 2, 30, 31, 0, 45, 47], np.int64),
    }
    for label, ids in cases.items():
        u = np.unique(ids)
        chunks = u // 3
        # independent expectation, gap 4096: one read per chunk file, first..last wanted row
        merged_ops = np.unique(chunks).size
        merged_bytes = sum((u[chunks == c].max() - u[chunks == c].min() + 1) * 16
                           for c in np.unique(chunks))
        # gap 0: runs of adjacent rows inside one chunk file
        runs = 1 + int(np.sum((np.diff(u) != 1) | (np.diff(chunks) != 0)))
        sf = SparseFeatures.from_lengths(["f32_a"], ids, [ids.size])
        for gap, ops, nbytes in ((0, runs, u.size * 16), (4096, merged_ops, merged_bytes)):
            with SsdTier(info, TierConfig(kind="ssd", coalesce_gap_bytes=gap)) as t:
                t.pool(sf)
                st_ = t.stats.tables["f32_a"]
                assert st_.rows_read == u.size, (label, gap)
                assert st_.read_ops == ops, (label, gap)
                assert st_.bytes_read == nbytes, (label, gap)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", ["f32_b", "f16_c", "i8_a"])
def test_read_rows_matches_direct_reads(store_path, small_chunk_store_path, chunked: bool,
                                        name: str) -> None:
    path = small_chunk_store_path if chunked else store_path
    g = zarr.open(str(path), mode="r")
    w_ref = np.asarray(g[f"tables/{name}/weight"][:])
    q_ref = np.asarray(g[f"tables/{name}/qparams"][:]) if TABLES[name][2] == "int8" else None
    rows_n = TABLES[name][0]
    rng = np.random.default_rng(9)
    cases = [
        rng.integers(0, rows_n, 40),                       # unsorted, duplicated
        np.array([rows_n - 1, 0, rows_n - 1, 0, 2, 2]),   # first/last, duplicated
        np.arange(0, rows_n, 2),                           # sorted unique
        np.array([5]),
        np.zeros(0, np.int64),
    ]
    info = open_store(path)
    for kind in ("ssd", "dram"):
        with open_tier(info, TierConfig(kind=kind)) as t:
            for rows in cases:
                rows = rows.astype(np.int64)
                w = np.empty((rows.size, TABLES[name][1]), w_ref.dtype)
                q = np.empty((rows.size, 2), np.float32) if q_ref is not None else None
                t.read_rows(name, rows, w, q)
                np.testing.assert_array_equal(w, w_ref[rows])
                if q_ref is not None:
                    np.testing.assert_array_equal(q, q_ref[rows])


@pytest.mark.parametrize("kind", ["ssd", "dram"])
@pytest.mark.parametrize("bad", [-1, 60, 10_000])
def test_read_rows_rejects_out_of_range(store_path, kind: str, bad: int) -> None:
    """read_rows must not silently return another row (negative ids wrap, the padding of the
    last chunk reads as zeros) nor read through an out-of-range file index."""
    with open_tier(open_store(store_path), TierConfig(kind=kind)) as t:
        rows = np.array([1, bad, 3], np.int64)
        w = np.empty((3, 4), np.int8)
        q = np.empty((3, 2), np.float32)
        with pytest.raises(InvalidBatchError, match=str(bad)):
            t.read_rows("i8_a", rows, w, q)


_READ_ROWS_BUFFERS = textwrap.dedent("""
    import sys
    import numpy as np
    from tiermem.errors import TierMemError
    from tiermem.format import create_store_from_arrays
    from tiermem.tiers import SsdTier
    a = np.arange(400, dtype=np.float32).reshape(100, 4)
    info = create_store_from_arrays(sys.argv[1], {"a": a})
    t = SsdTier(info)
    res = []
    for name, rows, w in [("int8_out", [1, 2, 3], np.zeros((3, 4), np.int8)),
                          ("short_out", [1, 2, 3], np.zeros((2, 4), np.float32)),
                          ("narrow_out", [4, 50], np.zeros((2, 2), np.float32))]:
        try:
            t.read_rows("a", np.array(rows), w)
            res.append(name + ":accepted")
        except (TierMemError, ValueError):
            res.append(name + ":rejected")
    t.close()
    print(" ".join(res), flush=True)
""")


def test_ssd_read_rows_checks_output_buffers(tmp_path: Path, subprocess_env) -> None:
    """An output buffer too small for the rows must be rejected, not written past its end
    (run in a subprocess: the unchecked write corrupts the heap)."""
    p = subprocess.run([sys.executable, "-c", _READ_ROWS_BUFFERS, str(tmp_path / "s.zarr")],
                       capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert p.returncode == 0, f"exit {p.returncode}; stdout: {p.stdout}; stderr: {p.stderr[-2000:]}"
    assert p.stdout.split() == ["int8_out:rejected", "short_out:rejected", "narrow_out:rejected"]


def test_stats(tiers, decoded) -> None:
    rng = np.random.default_rng(21)
    keys = ["f32_a", "f16_b", "i8_c", "i8_b"]
    sf = _random_batch(rng, keys, 30, max_len=6)
    counts = {k: sf.table(k)[0].size for k in keys}
    uniq = {k: np.unique(sf.table(k)[0]).size for k in keys}
    assert all(counts[k] > uniq[k] for k in keys)  # the batch has duplicates
    row_bytes = {k: TABLES[k][1] * np.dtype(TABLES[k][2]).itemsize for k in keys}
    for kind, tier in tiers.items():
        tier.stats.reset()
        tier.pool(sf)
        tier.pool(sf)
        assert tier.stats.batches == 2
        assert set(tier.stats.tables) == set(keys)
        for k in keys:
            s = tier.stats.tables[k]
            assert s.lookups == 2 * counts[k], (kind, k)
            assert s.bytes_read > 0, (kind, k)
            if kind == "ssd":
                assert s.rows_read == 2 * uniq[k] <= s.lookups
                extra = 8 if TABLES[k][2] == "int8" else 0
                assert s.bytes_read >= s.rows_read * (row_bytes[k] + extra)
                assert s.read_ops >= 2
                assert s.read_seconds >= 0
            else:
                assert s.rows_read == s.lookups
        tot = tier.stats.total()
        assert tot.lookups == 2 * sum(counts.values())
        d = tier.stats.to_dict()
        assert d["batches"] == 2 and d["tables"]["f32_a"]["lookups"] == 2 * counts["f32_a"]
        tier.stats.reset()
        assert tier.stats.batches == 0 and tier.stats.tables == {}


def test_cxl_modeled_delay(store_path: Path, decoded) -> None:
    cfg = TierConfig(kind="cxl", cxl_latency_ns=500_000.0, cxl_bandwidth_gbps=0.5,
                     cxl_outstanding=2)
    rng = np.random.default_rng(8)
    keys = ["f32_a", "i8_b", "f16_a"]
    sf = _random_batch(rng, keys, 40, max_len=6)
    with CxlTier(open_store(store_path), cfg) as t:
        t.pool(sf)  # warm-up (kernel compilation)
        t.stats.reset()
        start = time.perf_counter()
        got = t.pool(sf)
        elapsed = time.perf_counter() - start
        np.testing.assert_allclose(got, _reference(decoded, sf, "sum"), rtol=RTOL, atol=ATOL)
        total = 0.0
        for k in keys:
            n = sf.table(k)[0].size
            rb = TABLES[k][1] * np.dtype(TABLES[k][2]).itemsize
            # formula of tiermem/tiers/cxl.py: latency / outstanding per access + bytes / bw
            expect = n * 500_000e-9 / 2 + n * rb / 0.5e9
            s = t.stats.tables[k]
            assert s.modeled_delay_seconds == pytest.approx(expect, rel=1e-9)
            assert s.read_ops == n
            total += expect
        assert total > 0.02
        assert elapsed >= total * 0.999
        assert t.stats.total().modeled_delay_seconds == pytest.approx(total, rel=1e-9)
        assert t.modeled_seconds(1000, 64_000) == pytest.approx(1000 * 2.5e-4 + 64_000 / 0.5e9)


def test_drop_page_cache(small_chunk_store_path: Path, decoded) -> None:
    with SsdTier(open_store(small_chunk_store_path)) as t:
        sf = _random_batch(np.random.default_rng(1), ["f16_a", "i8_a"], 8)
        a = t.pool(sf)
        t.drop_page_cache()
        np.testing.assert_array_equal(t.pool(sf), a)


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kind", TIERS)
@pytest.mark.parametrize("bad,table", [(33, "f32_b"), (-3, "f32_b"), (10**12, "i8_c"),
                                       (-1, "f32_a")])
def test_pool_rejects_bad_ids_before_reading(tiers, kind: str, bad: int, table: str) -> None:
    tier = tiers[kind]
    keys = ["f32_a", "f32_b", "i8_c"]
    values = {k: [0, 1, TABLES[k][0] - 1] for k in keys}
    values[table][1] = bad
    sf = SparseFeatures.from_lengths(keys, np.concatenate([values[k] for k in keys]),
                                     [2, 1] * 3)
    tier.stats.reset()
    out = np.full((2, 12), 7.0, np.float32)
    with pytest.raises(InvalidBatchError) as ei:
        tier.pool(sf, out=out)
    msg = str(ei.value)
    assert repr(table) in msg and str(bad) in msg
    assert tier.stats.batches == 0 and tier.stats.tables == {}
    np.testing.assert_array_equal(out, 7.0)  # nothing pooled


@pytest.mark.parametrize("kind", TIERS)
def test_pool_misc_errors(tiers, kind: str) -> None:
    tier = tiers[kind]
    sf = SparseFeatures.from_lengths(["f32_a", "nope"], [1, 2], [1, 1])
    with pytest.raises(InvalidBatchError, match="nope"):
        tier.pool(sf)
    w = SparseFeatures.from_lengths(["f32_a"], [1, 2], [2], weights=[1.0, 2.0])
    with pytest.raises(InvalidBatchError, match="weights"):
        tier.pool(w, mode="mean")
    with pytest.raises(TierMemError, match="pooling mode"):
        tier.pool(w, mode="max")
    with pytest.raises(InvalidBatchError, match="SparseFeatures"):
        tier.pool({"f32_a": ([1], [0, 1])})  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", TIERS)
def test_closed_tier_raises(store_path: Path, kind: str) -> None:
    t = open_tier(open_store(store_path), TierConfig(kind=kind))
    sf = SparseFeatures.from_lengths(["f32_a"], [1], [1])
    t.pool(sf)
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.pool(sf)
    t.close()  # idempotent


@pytest.mark.parametrize("kind", ["ssd", "dram"])
def test_closed_tier_read_rows_raises(store_path: Path, kind: str) -> None:
    t = open_tier(open_store(store_path), TierConfig(kind=kind))
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.read_rows("f32_a", np.array([1, 2]), np.empty((2, 4), np.float32))


def test_ssd_truncated_after_open(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _make_store(path, chunk_rows=10)
    info = open_store(path)
    before = _decoded(path)
    # verify=False: with checksums the rows left in a cut block fail too (tests/test_integrity.py)
    ssd = SsdTier(info, TierConfig(kind="ssd", io_threads=4, verify=False))
    try:
        chunk = info.table("f32_a").weight_chunk(2)  # rows 20..29
        with open(chunk, "r+b") as f:
            f.truncate(5 * 16)  # rows 25..29 gone
        ok = SparseFeatures.from_lengths(["f32_a"], [1, 22, 24, 45], [2, 2])
        # the rows still on disk read as before
        np.testing.assert_allclose(ssd.pool(ok), _reference(before, ok, "sum"), rtol=RTOL,
                                   atol=ATOL)
        for ids in ([26], [3, 27, 40], [29, 1, 2, 3, 4, 5, 6, 7, 8, 9, 30, 31]):
            bad = SparseFeatures.from_lengths(["f32_a"], ids, [len(ids)])
            with pytest.raises(StoreError, match="'f32_a'.*(truncated|short read)"):
                ssd.pool(bad)
        w = np.empty((1, 4), np.float32)
        with pytest.raises(StoreError, match="f32_a"):
            ssd.read_rows("f32_a", np.array([28]), w)
    finally:
        ssd.close()
    # and opening the store again now reports the truncation
    with pytest.raises(StoreError, match="bytes"):
        open_store(path)


@pytest.mark.parametrize("kind", ["ssd", "dram"])
def test_concurrent_pool(tiers, decoded, kind: str) -> None:
    tier = tiers[kind]
    rng = np.random.default_rng(99)
    batches = [_random_batch(rng, list(rng.permutation(list(TABLES))), int(rng.integers(1, 40)),
                             weighted=bool(i % 2), max_len=8) for i in range(24)]
    sequential = [tier.pool(sf) for sf in batches]
    barrier = threading.Barrier(8)

    def work(i: int) -> list[tuple[int, np.ndarray]]:
        barrier.wait()
        return [(j, tier.pool(batches[j])) for j in range(i, len(batches), 8)] + \
            [(j, tier.pool(batches[j])) for j in range(len(batches) - 1 - i, -1, -8)]

    with ThreadPoolExecutor(8) as ex:
        results = [r for f in [ex.submit(work, i) for i in range(8)] for r in f.result()]
    assert len(results) == 2 * len(batches)
    for j, got in results:
        np.testing.assert_array_equal(got, sequential[j])
    for sf, got in zip(batches, sequential, strict=True):
        np.testing.assert_allclose(got, _reference(decoded, sf, "sum"), rtol=RTOL, atol=ATOL)


def test_open_tier_kinds(store_path: Path) -> None:
    info = open_store(store_path)
    for kind, cls in (("dram", DramTier), ("ssd", SsdTier), ("cxl", CxlTier)):
        with open_tier(info, TierConfig(kind=kind)) as t:
            assert type(t) is cls
            assert t.names == list(TABLES)
    with open_tier(info) as t:
        assert type(t) is DramTier
    with DramTier(info) as t:
        assert t.nbytes == info.nbytes


# ---------------------------------------------------------------------------
# SparseFeatures


@st.composite
def _jagged(draw, weighted: bool | None = None):
    T = draw(st.integers(1, 4))
    B = draw(st.integers(0, 6))
    keys = [f"k{i}" for i in draw(st.permutations(range(T)))]
    lengths = draw(st.lists(st.integers(0, 4), min_size=T * B, max_size=T * B))
    n = sum(lengths)
    values = draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n))
    if weighted is None:
        weighted = draw(st.booleans())
    weights = (draw(st.lists(st.floats(-4, 4, width=32), min_size=n, max_size=n))
               if weighted else None)
    return keys, B, np.array(values, np.int64), np.array(lengths, np.int64), (
        None if weights is None else np.array(weights, np.float32))


@settings(max_examples=60, deadline=None)
@given(_jagged())
def test_features_from_lengths_roundtrip(data) -> None:
    keys, B, values, lengths, weights = data
    sf = SparseFeatures.from_lengths(keys, values, lengths, weights)
    assert sf.keys == tuple(keys) and sf.num_tables == len(keys) and sf.batch_size == B
    np.testing.assert_array_equal(sf.lengths, lengths)
    np.testing.assert_array_equal(sf.offsets, np.concatenate([[0], np.cumsum(lengths)]))
    assert sf.values.dtype == np.int64 and sf.offsets.dtype == np.int64
    pos = 0
    for t, k in enumerate(keys):
        ids, off, w = sf.table(k)
        lt = lengths[t * B:(t + 1) * B]
        assert off.size == B + 1 and off[0] == 0
        np.testing.assert_array_equal(np.diff(off), lt)
        np.testing.assert_array_equal(ids, values[pos:pos + lt.sum()])
        assert sf.table_range(t) == (pos, pos + int(lt.sum()))
        if weights is None:
            assert w is None
        else:
            np.testing.assert_array_equal(w, weights[pos:pos + lt.sum()])
        pos += int(lt.sum())
    # from_offsets / from_tables rebuild the same batch
    sf2 = SparseFeatures.from_offsets(keys, values, sf.offsets, weights)
    np.testing.assert_array_equal(sf2.offsets, sf.offsets)
    sf3 = SparseFeatures.from_tables(
        [(k, *sf.table(k)[:2]) for k in keys],
        None if weights is None else {k: sf.table(k)[2] for k in keys})
    assert sf3.keys == sf.keys
    np.testing.assert_array_equal(sf3.values, sf.values)
    np.testing.assert_array_equal(sf3.offsets, sf.offsets)
    if weights is not None:
        np.testing.assert_array_equal(sf3.weights, sf.weights)
    # mapping form too
    sf4 = SparseFeatures.from_tables({k: sf.table(k)[:2] for k in keys})
    np.testing.assert_array_equal(sf4.offsets, sf.offsets)
    d = sf.to_dict()
    assert d["keys"] == list(keys) and ("weights" in d) == (weights is not None)


@settings(max_examples=60, deadline=None)
@given(_jagged(), st.data())
def test_features_select(data, extra) -> None:
    keys, B, values, lengths, weights = data
    sf = SparseFeatures.from_lengths(keys, values, lengths, weights)
    sub = extra.draw(st.lists(st.sampled_from(keys), min_size=1, unique=True))
    sel = sf.select(sub)
    assert sel.keys == tuple(sub) and sel.batch_size == B
    for k in sub:
        a, b = sel.table(k), sf.table(k)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        if weights is None:
            assert a[2] is None
        else:
            np.testing.assert_array_equal(a[2], b[2])
    assert sf.select(keys) is sf
    with pytest.raises(InvalidBatchError, match="zz"):
        sf.select([keys[0], "zz"])


def test_features_torch_inputs() -> None:
    sf = SparseFeatures.from_lengths(["a", "b"], torch.tensor([1, 2, 3]),
                                     torch.tensor([1, 0, 2, 0]),
                                     torch.tensor([0.5, 1.0, 2.0]))
    np.testing.assert_array_equal(sf.offsets, [0, 1, 1, 3, 3])
    assert sf.weights.dtype == np.float32
    sf2 = SparseFeatures.from_offsets(["a"], np.array([4, 5], np.uint32),
                                      np.array([0, 2], np.int32))
    assert sf2.values.dtype == np.int64 and sf2.batch_size == 1


def test_features_validate_ids() -> None:
    sf = SparseFeatures.from_lengths(["a", "b"], [0, 4, 5, 9], [2, 0, 1, 1])
    sf.validate_ids({"a": 5, "b": 10})
    sf.validate_ids([5, 10])
    with pytest.raises(InvalidBatchError, match=r"'b'.*10.*out of range"):
        SparseFeatures.from_lengths(["a", "b"], [0, 4, 5, 10], [2, 0, 1, 1]).validate_ids([5, 10])
    with pytest.raises(InvalidBatchError, match=r"'a'.*-1.*negative"):
        SparseFeatures.from_lengths(["a", "b"], [0, -1, 5, 9], [2, 0, 1, 1]).validate_ids([5, 10])
    # named as the caller wrote it: the sample and the position in its bag
    with pytest.raises(InvalidBatchError,
                       match=r"'a': id 4 \(sample 0, position 1 in its bag\) is out of range "
                             r"for a table of 4 rows"):
        sf.validate_ids([4, 10])
    with pytest.raises(InvalidBatchError, match=r"'b': id 10 \(sample 1, position 0 in its bag"):
        SparseFeatures.from_lengths(["a", "b"], [0, 4, 5, 10], [2, 0, 1, 1]).validate_ids([5, 10])


@pytest.mark.parametrize("make,match", [
    pytest.param(lambda: SparseFeatures.from_lengths(["a"], [1, 2], [3, -1]), "negative",
                 id="negative_length"),
    pytest.param(lambda: SparseFeatures.from_lengths(["a"], [1, 2], [1, 2]), "sum to 3",
                 id="lengths_sum"),
    pytest.param(lambda: SparseFeatures.from_lengths(["a", "b"], [1, 2, 3], [1, 1, 1]),
                 "T \\* B \\+ 1", id="lengths_not_T_times_B"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [1, 2, 3], [0, 2, 1, 3]),
                 "non-decreasing", id="offsets_not_monotone"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [1, 2, 3], [0, 1, 2]),
                 r"offsets\[-1\] = 2", id="offsets_last"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [1, 2, 3], [1, 2, 3]),
                 r"offsets\[0\]", id="offsets_first"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a", "b"], [1, 2], [0, 1, 1, 2]),
                 "T \\* B \\+ 1", id="offsets_size"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [], []), "T \\* B \\+ 1",
                 id="offsets_empty"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [1.0, 2.0], [0, 2]), "integers",
                 id="float_ids"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [1, 2], [0.0, 2.0]), "integers",
                 id="float_offsets"),
    pytest.param(lambda: SparseFeatures.from_lengths(["a"], [1, 2], [2.0]), "integers",
                 id="float_lengths"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [[1, 2]], [0, 2]), "1-D",
                 id="2d_ids"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], np.array([2**63], np.uint64),
                                                     [0, 1]), "int64", id="uint64_overflow"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [1, 2], [0, 2], weights=[1.0]),
                 "weights", id="weights_short"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [1, 2], [0, 2],
                                                     weights=[[1.0, 2.0]]),
                 "weights", id="weights_2d"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a"], [1, 2], [0, 2], weights=[1, 2]),
                 "floating", id="weights_int"),
    pytest.param(lambda: SparseFeatures.from_offsets([], [], [0]), "at least one table",
                 id="no_keys"),
    pytest.param(lambda: SparseFeatures.from_offsets(["a", "a"], [], [0, 0, 0]), "duplicates",
                 id="dup_keys"),
    pytest.param(lambda: SparseFeatures.from_tables({}), "no tables", id="from_tables_empty"),
    pytest.param(lambda: SparseFeatures.from_tables({"a": ([1], [0, 1]), "b": ([1, 2], [0, 2, 2])}),
                 "bags", id="from_tables_batch_mismatch"),
    pytest.param(lambda: SparseFeatures.from_tables({"a": ([1], [0, 2])}), "'a'",
                 id="from_tables_bad_offsets"),
    pytest.param(lambda: SparseFeatures.from_tables({"a": ([1], [0, 1]), "b": ([2], [0, 1])},
                                                    weights={"a": [1.0]}),
                 "'b'", id="from_tables_missing_weights"),
    # per-table weights of the wrong length, even when the totals happen to match
    pytest.param(lambda: SparseFeatures.from_tables({"a": ([1, 2], [0, 2]), "b": ([3], [0, 1])},
                                                    weights={"a": [1.0, 2.0, 3.0], "b": []}),
                 "weights", id="from_tables_weights_misaligned"),
])
def test_features_validation_errors(make, match: str) -> None:
    with pytest.raises(InvalidBatchError, match=match):
        make()



def test_ssd_read_many_checks_its_destinations(tmp_path: Path) -> None:
    """Rows go out through raw addresses: a bad destination is refused before any read."""
    path = tmp_path / "s.zarr"
    _make_store(path, chunk_rows=10)
    info = open_store(path)
    i = [t.name for t in info.tables].index("f32_a")
    with SsdTier(info, TierConfig(kind="ssd", io_threads=2)) as ssd:
        rows = np.array([1, 5, 7], np.int64)
        dst = np.zeros((4, 4), np.float32)
        ssd.read_many([(i, rows, dst, None, np.array([3, 0, 2]))])
        want = np.empty((3, 4), np.float32)
        ssd.read_rows("f32_a", rows, want)
        np.testing.assert_array_equal(dst[[3, 0, 2]], want)
        for bad_index, bad_dst in (([0, 1, 4], dst), ([0, -1, 2], dst), ([0, 1], dst),
                                   ([0, 1, 2], dst[:, :2]), ([0, 1, 2], dst.T)):
            with pytest.raises(InvalidBatchError, match="destination"):
                ssd.read_many([(i, rows, bad_dst, None, np.array(bad_index))])
