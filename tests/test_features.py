"""SparseFeatures input checks: per-sample weights and JaggedTensor-like tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.naive import Jagged
from tiermem.config import PoolingMode, TierConfig
from tiermem.errors import InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.format import create_store_from_arrays, open_store
from tiermem.tiers import open_tier

ROWS = {"a": 13, "b": 5}
DIM = 4


@pytest.fixture(scope="module")
def tables_and_tier(tmp_path_factory):
    rng = np.random.default_rng(0)
    tables = {k: rng.standard_normal((r, DIM)).astype(np.float32) for k, r in ROWS.items()}
    path = tmp_path_factory.mktemp("feat") / "s.zarr"
    create_store_from_arrays(path, tables)
    tier = open_tier(open_store(path), TierConfig())
    yield tables, tier
    tier.close()


@st.composite
def weighted_batch(draw, elements):
    b = draw(st.integers(1, 5))
    lengths = draw(hnp.arrays(np.int64, len(ROWS) * b, elements=st.integers(0, 3)))
    per_table = lengths.reshape(len(ROWS), b).sum(axis=1)
    values = np.concatenate([draw(hnp.arrays(np.int64, int(n), elements=st.integers(0, r - 1)))
                             for n, r in zip(per_table, ROWS.values(), strict=True)])
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    weights = draw(hnp.arrays(dtype, values.size, elements=elements(dtype)))
    return b, values, lengths, weights


def _finite(dtype):
    return st.floats(-1e3, 1e3, width=32 if dtype == np.float32 else 64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=weighted_batch(_finite))
def test_finite_weights_pool_like_embedding_bag(tables_and_tier, batch):
    tables, tier = tables_and_tier
    b, values, lengths, weights = batch
    f = SparseFeatures.from_lengths(list(ROWS), values, lengths, weights)
    pooled = tier.pool(f, mode=PoolingMode.SUM).reshape(b, len(ROWS), DIM)
    for t, k in enumerate(ROWS):
        ids, off, w = f.table(k)
        bag = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(tables[k]), mode="sum")
        ref = bag(torch.from_numpy(ids), torch.from_numpy(off[:-1]),
                  per_sample_weights=torch.from_numpy(weights[f.table_range(t)[0]:
                                                              f.table_range(t)[1]]
                                                      .astype(np.float32)))
        np.testing.assert_allclose(pooled[:, t], ref.numpy(), rtol=1e-5, atol=1e-3)


def _bad(dtype):
    specials = [np.nan, np.inf, -np.inf]
    if dtype == np.float64:
        specials += [1e39, -3.5e38, 1e300]
    return st.sampled_from(specials)


@settings(max_examples=40, deadline=None)
@given(batch=weighted_batch(_finite), data=st.data())
def test_non_finite_or_out_of_range_weight_is_refused(batch, data):
    b, values, lengths, weights = batch
    if values.size == 0:
        return
    weights = weights.copy()
    i = data.draw(st.integers(0, values.size - 1))
    weights[i] = data.draw(_bad(weights.dtype.type))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    t = int(np.searchsorted(offsets[b::b], i, side="right"))
    key = list(ROWS)[t]
    pos = i - int(offsets[t * b])
    with pytest.raises(InvalidBatchError,
                       match=rf"weights\[{i}\] = .* table '{key}', weight {pos} of the table"):
        SparseFeatures.from_lengths(list(ROWS), values, lengths, weights)
    # the per-table constructor refuses it too, before any float32 cast turns 1e39 into inf
    per = {k: SparseFeatures.from_offsets(list(ROWS), values, offsets).table(k)[:2]
           for k in ROWS}
    starts = offsets[::b]
    wmap = {k: weights[starts[j]:starts[j + 1]] for j, k in enumerate(ROWS)}
    with pytest.raises(InvalidBatchError, match=rf"table '{key}', weight {pos} of the table"):
        SparseFeatures.from_tables(per, wmap)


def test_float64_weight_beyond_float32_is_refused_not_inf():
    with pytest.raises(InvalidBatchError, match=r"weights\[1\] = .*1e\+39.*float32 range.*'a'"):
        SparseFeatures.from_lengths(["a"], [0, 1], [2], np.array([1.0, 1e39]))
    # the largest float32 itself is fine
    f = SparseFeatures.from_lengths(["a"], [0], [1], np.array([np.finfo(np.float32).max]))
    assert np.isfinite(f.weights).all()


def test_mapping_of_jagged_tensors_equals_pairs():
    ids_a, off_a = torch.tensor([3, 1, 0]), torch.tensor([0, 2, 3])
    ids_b, off_b = torch.tensor([4]), torch.tensor([0, 0, 1], dtype=torch.int32)
    w_a = torch.tensor([0.5, 2.0, -1.0])
    got = SparseFeatures.from_tables({"a": Jagged(ids_a, off_a, w_a), "b": Jagged(ids_b, off_b)})
    exp = SparseFeatures.from_tables({"a": (ids_a, off_a), "b": (ids_b, off_b)},
                                     {"a": w_a.numpy(), "b": np.ones(1, np.float32)})
    for field in ("values", "offsets", "weights"):
        np.testing.assert_array_equal(getattr(got, field), getattr(exp, field))
    unweighted = SparseFeatures.from_tables({"a": Jagged(ids_a, off_a)})
    assert unweighted.weights is None
    with pytest.raises(InvalidBatchError, match=r"weights\[1\] = .*table 'a'"):
        SparseFeatures.from_tables({"a": Jagged(ids_a, off_a, torch.tensor([1, np.nan, 1]))})


def test_table_of_a_wrong_type_names_the_accepted_types():
    with pytest.raises(InvalidBatchError, match=r"table 'a': expected a pair \(ids, offsets\) "
                                                r"or a JaggedTensor"):
        SparseFeatures.from_tables({"a": 42})
