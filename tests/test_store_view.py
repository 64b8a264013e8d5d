"""Row windows over a store (what a shard holds) against slices of the plain zarr arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.cache.cache import CacheConfig, CachedTier
from tiermem.config import TierConfig
from tiermem.errors import StoreError
from tiermem.features import SparseFeatures
from tiermem.format import TableSpec, create_store, open_store
from tiermem.tiers import open_tier

TABLES = {"a": (47, 4, "float32"), "b": (31, 8, "float16"), "c": (40, 4, "int8")}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Chunks of 5 rows, so windows start and end inside chunk files."""
    p = tmp_path_factory.mktemp("view") / "s.zarr"
    rng = np.random.default_rng(3)
    specs = [TableSpec(n, r, d, dt) for n, (r, d, dt) in TABLES.items()]
    with create_store(p, specs, chunk_rows=5) as w:
        for s in specs:
            w.write(s.name, rng.uniform(-1, 1, (s.rows, s.dim)).astype(np.float32))
    return p


@pytest.fixture(scope="module")
def plain(store: Path) -> dict[str, np.ndarray]:
    g = zarr.open(str(store), mode="r")
    out = {}
    for name, (_, _, dtype) in TABLES.items():
        w = np.asarray(g[f"tables/{name}/weight"][:])
        if dtype == "int8":
            qp = np.asarray(g[f"tables/{name}/qparams"][:])
            out[name] = qp[:, :1] * w.astype(np.float32) + qp[:, 1:]
        else:
            out[name] = w.astype(np.float32)
    return out


def _open(info, kind: str):
    if kind == "cached-ssd":
        return CachedTier(open_tier(info, TierConfig(kind="ssd", io_threads=4)),
                          CacheConfig(capacity_fraction=0.3))
    return open_tier(info, TierConfig(kind=kind, io_threads=4))


@settings(max_examples=25, deadline=None)
@given(st.data())
@pytest.mark.parametrize("kind", ["dram", "ssd", "cxl", "cached-ssd"])
def test_window_equals_slice(store: Path, plain, kind: str, data) -> None:
    info = open_store(store)
    windows = []
    for name, (rows, _, _) in TABLES.items():
        a = data.draw(st.integers(0, rows - 1), label=f"{name} start")
        b = data.draw(st.integers(a + 1, rows), label=f"{name} stop")
        windows.append((f"{name}.w", name, a, b))
    view = info.view(windows)
    tier = _open(view, kind)
    try:
        rng = np.random.default_rng(data.draw(st.integers(0, 1000), label="seed"))
        batch = 3
        tables = {}
        for new, _, a, b in windows:
            ids = rng.integers(0, b - a, 7)
            tables[new] = (ids, np.array([0, 2, 2, 7]))
        sf = SparseFeatures.from_tables(tables)
        got = tier.pool(sf, mode="sum")
        for t, (new, name, a, b) in enumerate(windows):
            ids, off = tables[new]
            rows = plain[name][a:b][ids]
            want = np.stack([rows[off[i]:off[i + 1]].sum(0) for i in range(batch)])
            d = TABLES[name][1]
            np.testing.assert_allclose(got[:, t * 0 + sum(TABLES[w[1]][1] for w in windows[:t]):
                                           sum(TABLES[w[1]][1] for w in windows[:t]) + d],
                                       want, rtol=1e-5, atol=1e-5)
        # rows past the window's end are out of range for it, not rows of the next piece
        with pytest.raises(ValueError, match="out of range|>="):
            tier.pool(SparseFeatures.from_tables(
                {new: (np.array([b - a]), np.array([0, 1])) for new, _, a, b in windows[:1]}))
    finally:
        tier.close()


def test_window_errors(store: Path) -> None:
    info = open_store(store)
    with pytest.raises(StoreError, match="outside its 47 rows"):
        info.view([("x", "a", 10, 48)])
    with pytest.raises(StoreError, match="used twice"):
        info.view([("x", "a", 0, 5), ("x", "a", 5, 10)])
    with pytest.raises(KeyError, match="no table 'zz'"):
        info.view([("x", "zz", 0, 5)])
    with pytest.raises(StoreError, match="already a window"):
        info.view([("x", "a", 1, 5)]).view([("y", "x", 0, 2)])


def test_window_read_table(store: Path, plain) -> None:
    info = open_store(store).view([("a2", "a", 12, 29)])
    w, _ = info.read_table("a2")
    np.testing.assert_array_equal(w, plain["a"][12:29])
