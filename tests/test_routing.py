"""Routing a batch over a plan, with in-process shards: equals one process and EmbeddingBag.

The shards here are plain :class:`EmbeddingShard` objects (no Ray), so every
plan shape (whole tables, row-split tables, empty shards) is checked quickly;
tests/test_distributed.py runs the same path on a real Ray cluster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.distributed.plan import Piece, ShardPlan
from runtime.distributed.routing import Router
from runtime.distributed.shard import EmbeddingShard
from runtime.session import RuntimeConfig
from tiermem.config import PoolingMode, TierConfig
from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures
from tiermem.format import create_store_from_arrays, open_store
from tiermem.tiers import open_tier

ROWS = {"a": 61, "b": 13, "c": 200}
DIM = 5


@pytest.fixture(scope="module")
def tables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((r, DIM)).astype(np.float32) for n, r in ROWS.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tables) -> Path:
    p = tmp_path_factory.mktemp("routing") / "s.zarr"
    create_store_from_arrays(p, tables, chunk_rows=16)
    return p


def _specs(store: Path):
    return {t.name: t.spec for t in open_store(store).tables}


@st.composite
def plans(draw, specs):
    """Random plans: each table whole or cut at random rows, pieces on random shards."""
    n = draw(st.integers(1, 4), label="shards")
    pieces = []
    for name, spec in specs.items():
        cuts = sorted(draw(st.sets(st.integers(1, spec.rows - 1), max_size=3), label=name))
        bounds = [0, *cuts, spec.rows]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            pieces.append(Piece(name, a, b, draw(st.integers(0, n - 1)), (b - a) * DIM * 4))
    return ShardPlan(n, specs, tuple(pieces))


def _batch(rng, b, weighted):
    per = {}
    for name, rows in ROWS.items():
        lengths = rng.integers(0, 6, b)
        ids = rng.integers(0, rows, int(lengths.sum()))
        per[name] = (ids, np.concatenate([[0], np.cumsum(lengths)]))
    w = {k: rng.uniform(0.1, 2, v[0].size).astype(np.float32) for k, v in per.items()} \
        if weighted else None
    return SparseFeatures.from_tables(per, w), per, w


def _run(router: Router, shards: dict[int, EmbeddingShard], f: SparseFeatures,
         mode: PoolingMode) -> np.ndarray:
    outs = {r.shard: shards[r.shard].pool(r.values, r.lengths, r.weights, mode.value)
            for r in router.split_batch(f)}
    return router.merge(f, outs, mode, DIM)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
def test_sharded_pooling_equals_embedding_bag(store, tables, mode, data) -> None:
    specs = _specs(store)
    plan = data.draw(plans(specs), label="plan")
    router = Router(plan, list(ROWS))
    pmode = PoolingMode.MEAN if mode == "mean" else PoolingMode.SUM
    shards = {s: EmbeddingShard(store, plan.to_dict(), s,
                                RuntimeConfig(tier=TierConfig(kind="ssd", io_threads=2)))
              for s in router.active_shards}
    single = open_tier(open_store(store), TierConfig(kind="dram"))
    try:
        rng = np.random.default_rng(data.draw(st.integers(0, 99), label="seed"))
        b = data.draw(st.integers(0, 9), label="batch")
        f, per, w = _batch(rng, b, mode == "weighted")
        got = _run(router, shards, f, pmode)
        assert got.shape == (b, len(ROWS), DIM)
        for t, name in enumerate(ROWS):
            ids, off = per[name]
            bag = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(tables[name]),
                                                        mode="mean" if mode == "mean" else "sum")
            want = bag(torch.from_numpy(ids), torch.from_numpy(off[:-1]),
                       per_sample_weights=None if w is None else torch.from_numpy(w[name])
                       ).numpy() if b else np.zeros((0, DIM), np.float32)
            np.testing.assert_allclose(got[:, t], want, rtol=1e-5, atol=1e-5)
        # a table placed whole is bit-identical to the single-process tier
        ref = single.pool(f, mode=pmode).reshape(b, len(ROWS), DIM)
        for t, name in enumerate(ROWS):
            if name not in router.split:
                np.testing.assert_array_equal(got[:, t], ref[:, t])
    finally:
        single.close()
        for s in shards.values():
            s.close()


def test_split_keeps_bags_and_local_ids(store) -> None:
    specs = _specs(store)
    plan = ShardPlan(2, specs, (Piece("a", 0, 30, 1), Piece("a", 30, 61, 0),
                                Piece("b", 0, 13, 0), Piece("c", 0, 200, 1)))
    router = Router(plan, ["a", "b", "c"])
    f = SparseFeatures.from_tables({"a": ([5, 40, 29, 30, 60], [0, 3, 3, 5]),
                                    "b": ([1, 2, 3], [0, 1, 2, 3]), "c": ([0, 0, 0], [0, 0, 3, 3])})
    reqs = {r.shard: r for r in router.split_batch(f)}
    # shard 0 holds a[30:61] then b; shard 1 holds a[0:30] then c
    assert [p.name for p in router.pieces_of(0)] == ["a.rows-30-61", "b"]
    np.testing.assert_array_equal(reqs[0].values, [10, 0, 30, 1, 2, 3])
    np.testing.assert_array_equal(reqs[0].lengths, [1, 0, 2, 1, 1, 1])
    np.testing.assert_array_equal(reqs[1].values, [5, 29, 0, 0, 0])
    np.testing.assert_array_equal(reqs[1].lengths, [2, 0, 0, 0, 3, 0])


def test_router_errors(store) -> None:
    specs = _specs(store)
    plan = ShardPlan.whole_tables(specs.values(), [0, 1, 1], 3)
    with pytest.raises(ConfigError, match="places no table"):
        Router(plan, ["a", "zz"])
    router = Router(plan, ["a", "b", "c"])
    assert router.active_shards == [0, 1]  # shard 2 holds nothing: never called
    with pytest.raises(ConfigError, match="not in the plan's"):
        EmbeddingShard(store, plan, 3)


@pytest.mark.parametrize("broadcast", [False, True])
def test_plan_with_a_table_the_model_does_not_use(store, tables, broadcast) -> None:
    """The store (and plan) may hold more tables than the model: shards serve only the
    model's, whether the driver cuts their parts or they cut their own (broadcast)."""
    specs = _specs(store)
    plan = ShardPlan(2, specs, (Piece("a", 0, 61, 0), Piece("b", 0, 13, 0),
                                Piece("c", 0, 90, 1), Piece("c", 90, 200, 0)))
    model_tables = ["c", "a"]  # no "b"
    router = Router(plan, model_tables)
    shards = {s: EmbeddingShard(store, plan, s, RuntimeConfig(), model_tables)
              for s in router.active_shards}
    try:
        f, per, _ = _batch(np.random.default_rng(2), 5, False)
        f = f.select(model_tables)
        if broadcast:
            outs = {s: sh.pool_batch((f.values, f.offsets, None, "sum", []))
                    for s, sh in shards.items()}
        else:
            outs = {r.shard: shards[r.shard].pool(r.values, r.lengths, r.weights)
                    for r in router.split_batch(f)}
        got = router.merge(f, outs, PoolingMode.SUM, DIM)
        for t, name in enumerate(model_tables):
            ids, off = per[name]
            want = np.stack([tables[name][ids[off[i]:off[i + 1]]].sum(0) for i in range(5)])
            np.testing.assert_allclose(got[:, t], want, rtol=1e-5, atol=1e-5)
    finally:
        for s in shards.values():
            s.close()
