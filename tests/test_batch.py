"""A batch checked once (tiermem.batch), the Session contract, TierMetrics and the stream
pipeline (runtime.pipeline).

References: torch.nn.functional.embedding_bag over the ids a client meant (the bad ones
left out), SparseFeatures.from_tables for select, plain lists for the pipeline's order.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime.batcher
import tiermem.batch
import tiermem.features
import tiermem.kernels.validate
from runtime.checkpoint import save_dlrm_checkpoint
from runtime.convert import store_from_checkpoint
from runtime.distributed.sharded import ShardedSession
from runtime.model import DLRMConfig, random_dense
from runtime.pipeline import pipelined
from runtime.protocol import Session
from runtime.server.codecs import parse_json_body
from runtime.service import ServingConfig, ServingRuntime
from runtime.session import InferenceSession, RuntimeConfig
from tiermem.batch import BoundsCheck, CheckedFeatures, check_batch
from tiermem.cache.cache import CacheConfig
from tiermem.config import TierConfig
from tiermem.errors import InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.format import create_store_from_arrays, open_store
from tiermem.metrics import TierMetrics
from tiermem.stats import TableStats
from tiermem.tiers import open_tier

ROWS = (50, 7, 120)
NAMES = tuple(f"t{i}" for i in range(len(ROWS)))
DIM = 4
MODEL_NAMES = tuple(f"emb_l.{i}" for i in range(len(ROWS)))  # store_from_checkpoint's


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((r, DIM)).astype(np.float32) for r in ROWS]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tables):
    path = tmp_path_factory.mktemp("batch") / "s.zarr"
    create_store_from_arrays(path, dict(zip(NAMES, tables, strict=True)))
    return open_store(path)


@st.composite
def batches(draw, bad=True):
    """A batch over ROWS, some ids possibly out of range (negative or >= rows)."""
    b = draw(st.integers(0, 6))
    lengths = draw(st.lists(st.integers(0, 4), min_size=len(ROWS) * b,
                            max_size=len(ROWS) * b))
    vals = []
    for t, r in enumerate(ROWS):
        n = sum(lengths[t * b:(t + 1) * b])
        lo, hi = (-3, r + 3) if bad else (0, r - 1)
        vals += draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    weighted = draw(st.booleans())
    w = np.asarray(draw(st.lists(st.floats(-2, 2, width=32), min_size=len(vals),
                                 max_size=len(vals))), np.float32) if weighted else None
    return SparseFeatures.from_lengths(NAMES, np.asarray(vals, np.int64),
                                       np.asarray(lengths, np.int64), w)


def reference_pool(tables, f: SparseFeatures) -> np.ndarray:
    """embedding_bag per table over the valid ids only (what WARN promises)."""
    outs = []
    for t, k in enumerate(f.keys):
        ids, off, w = f.table(k)
        ok = (ids >= 0) & (ids < ROWS[t])
        bag = np.repeat(np.arange(off.size - 1), np.diff(off))
        lengths = np.bincount(bag[ok], minlength=off.size - 1)
        offsets = np.concatenate([[0], np.cumsum(lengths)])[:-1].astype(np.int64)
        out = torch.nn.functional.embedding_bag(
            torch.as_tensor(ids[ok]), torch.from_numpy(tables[t]), torch.as_tensor(offsets),
            mode="sum", per_sample_weights=None if w is None else torch.from_numpy(w[ok]))
        outs.append(out.numpy())
    return np.concatenate(outs, axis=1)


@settings(max_examples=60, deadline=None)
@given(f=batches())
def test_warn_drops_out_of_range_ids_like_a_batch_without_them(store, tables, f):
    with open_tier(store, TierConfig()) as tier:
        bad = int(sum(((f.table(k)[0] < 0) | (f.table(k)[0] >= ROWS[t])).sum()
                      for t, k in enumerate(NAMES)))
        if bad:
            with pytest.raises(InvalidBatchError, match="out of range|negative"):
                tier.pool(f)
        got = tier.pool(f, bounds="warn")
        np.testing.assert_allclose(got, reference_pool(tables, f), rtol=1e-5, atol=1e-5)
        checked = check_batch(f, ROWS, BoundsCheck.WARN)
        assert checked.dropped == bad and checked.bounds == ROWS
        assert checked.values.size == f.values.size - bad


def test_warn_logs_one_line_naming_the_first_bad_id(caplog):
    f = SparseFeatures.from_lengths(NAMES, [1, 99, 2, 3, 500], [2, 1, 2])
    with caplog.at_level(logging.WARNING, logger="tiermem.batch"):
        out = check_batch(f, ROWS, "warn")
    assert out.dropped == 2
    assert len(caplog.records) == 1
    assert "dropped 2" in caplog.text and "'t0'" in caplog.text and "id 99" in caplog.text


def test_fatal_names_table_sample_and_position():
    f = SparseFeatures.from_lengths(NAMES, [1, 2, 7, 3], [1, 2, 1])
    with pytest.raises(InvalidBatchError, match=r"table 't1': id 7 \(sample 0, position 1"):
        check_batch(f, ROWS)
    with pytest.raises(Exception, match="unknown bounds check 'skip'"):
        check_batch(f, ROWS, "skip")


@settings(max_examples=40, deadline=None)
@given(f=batches(bad=False), order=st.permutations(range(len(ROWS))),
       k=st.integers(1, len(ROWS)))
def test_select_keeps_the_check_and_matches_from_tables(f, order, k):
    keys = [NAMES[i] for i in order[:k]]
    ref = SparseFeatures.from_tables([(n, *f.table(n)[:2]) for n in keys],
                                     None if f.weights is None
                                     else {n: f.table(n)[2] for n in keys})
    checked = check_batch(f, ROWS)
    for src in (f, checked):
        got = src.select(keys)
        assert got.keys == ref.keys
        np.testing.assert_array_equal(got.values, ref.values)
        np.testing.assert_array_equal(got.offsets, ref.offsets)
        if ref.weights is None:
            assert got.weights is None
        else:
            np.testing.assert_array_equal(got.weights, ref.weights)
    sel = checked.select(keys)
    assert isinstance(sel, CheckedFeatures)
    assert sel.bounds == tuple(ROWS[NAMES.index(n)] for n in keys)
    assert check_batch(sel, {n: ROWS[NAMES.index(n)] for n in keys}) is sel  # no second pass


def test_checked_batch_is_checked_again_against_smaller_tables():
    f = check_batch(SparseFeatures.from_lengths(NAMES, [49, 6, 119], [1, 1, 1]), ROWS)
    assert check_batch(f, ROWS) is f
    with pytest.raises(InvalidBatchError, match="id 49"):
        check_batch(f, (40, 7, 120))  # bounds do not cover a smaller table


def test_select_refuses_duplicates():
    f = SparseFeatures.from_lengths(NAMES, [1, 2, 3], [1, 1, 1])
    with pytest.raises(InvalidBatchError, match="distinct"):
        f.select(["t0", "t0"])


# -- one check per served request ---------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory, tables):
    tmp = tmp_path_factory.mktemp("batch-model")
    cfg = DLRMConfig(num_dense=3, embedding_dim=DIM, num_tables=len(ROWS),
                     bottom_mlp=(5, DIM), top_mlp=(4, 1), interaction="dlrm")
    ckpt = tmp / "m.pt"
    save_dlrm_checkpoint(ckpt, cfg, tables, random_dense(cfg, seed=1))
    store_from_checkpoint(ckpt, tmp / "s.zarr")
    return ckpt, tmp / "s.zarr"


class Counting:
    """Wraps the validation kernels' Python entry points and counts what they look at."""

    def __init__(self, monkeypatch):
        self.offsets = 0
        self.ids = 0
        real_off = tiermem.kernels.validate.check_offsets
        real_ids = tiermem.kernels.validate.check_table_ids

        def check_offsets(offsets, nnz):
            self.offsets += int(offsets.size)
            return real_off(offsets, nnz)

        def check_table_ids(values, offsets, batch, rows):
            self.ids += int(offsets[rows.size * batch] - offsets[0]) if batch else 0
            return real_ids(values, offsets, batch, rows)

        for mod in (tiermem.features, tiermem.batch):
            if hasattr(mod, "check_offsets"):
                monkeypatch.setattr(mod, "check_offsets", check_offsets)
            if hasattr(mod, "check_table_ids"):
                monkeypatch.setattr(mod, "check_table_ids", check_table_ids)


def test_a_served_request_is_checked_once(model, monkeypatch):
    """From the JSON body to the kernel: every offset and every id is looked at once."""
    body = json.dumps({"dense": [[0.1, 0.2, 0.3], [0.0, 1.0, 2.0]],
                       "sparse": {"emb_l.2": {"ids": [3, 1, 0], "lengths": [2, 1]},
                                  "emb_l.0": {"ids": [5], "lengths": [0, 1]},
                                  "emb_l.1": {"ids": [6, 6], "offsets": [0, 1, 2]}}}).encode()
    with InferenceSession.open(*model, RuntimeConfig(num_threads=1)) as sess, \
            ServingRuntime(sess, ServingConfig(warmup=False)) as rt:
        rt.predict(*parse_json_body(body, sess.table_names, 3)[:2])  # compile outside
        count = Counting(monkeypatch)
        dense, sparse, _ = parse_json_body(body, sess.table_names, 3)
        got = rt.predict(dense, sparse)
        # per table B + 1 offsets, each table's checked once; 6 ids
        assert count.offsets == 3 * 3 and count.ids == 6
        np.testing.assert_allclose(got, sess.predict(dense, sparse), rtol=1e-6)


def test_merged_requests_stay_checked():
    parts = [check_batch(SparseFeatures.from_lengths(NAMES, [1, 2, 3], [1, 1, 1]), ROWS),
             check_batch(SparseFeatures.from_lengths(NAMES, [4, 5], [0, 1, 1]), ROWS)]
    merged = runtime.batcher.concat_features(parts)
    assert isinstance(merged, CheckedFeatures) and merged.bounds == ROWS
    assert merged.batch_size == 2
    plain = runtime.batcher.concat_features([SparseFeatures(p.keys, p.values, p.offsets)
                                             for p in parts])
    assert not isinstance(plain, CheckedFeatures)


# -- the session contract ----------------------------------------------------------------

def test_both_sessions_implement_the_protocol(model):
    with InferenceSession.open(*model, RuntimeConfig(num_threads=1)) as sess:
        assert isinstance(sess, Session)
        assert sess.num_dense == 3 and sess.bounds_check is BoundsCheck.FATAL
    members = [n for n in dir(Session) if not n.startswith("_")] + ["table_names"]
    missing = [n for n in members if n != "table_names" and not hasattr(ShardedSession, n)]
    assert not missing, f"ShardedSession lacks {missing}"


def test_session_warn_mode_serves_what_the_client_meant(model, tables):
    f = SparseFeatures.from_lengths(MODEL_NAMES, [1, 999, 2, 3, -1], [2, 1, 2])
    clean = SparseFeatures.from_lengths(MODEL_NAMES, [1, 2, 3], [1, 1, 1])
    dense = np.zeros((1, 3), np.float32)
    with InferenceSession.open(*model, RuntimeConfig(num_threads=1, bounds_check="warn")) as s:
        np.testing.assert_array_equal(s.embed(f), s.embed(clean))
        np.testing.assert_array_equal(s.predict(dense, f), s.predict(dense, clean))
    with InferenceSession.open(*model, RuntimeConfig(num_threads=1)) as s, \
            pytest.raises(InvalidBatchError, match="id 999"):
        s.embed(f)
    assert RuntimeConfig(bounds_check="warn").to_dict()["bounds_check"] == "warn"


# -- TierMetrics -------------------------------------------------------------------------

def test_tier_metrics_add_counts_and_derive_rates(store):
    with open_tier(store, TierConfig(kind="ssd")) as cold:
        from tiermem.cache.cache import CachedTier

        with CachedTier(cold, CacheConfig(capacity_rows=20)) as tier:
            f = SparseFeatures.from_lengths(NAMES, [1, 1, 2, 3, 4], [2, 1, 2])
            tier.pool(f)
            tier.pool(f)
            m = TierMetrics.from_tier(tier)
    tot = m.total()
    assert m.kind == "ssd" and m.batches == 2 and tot.lookups == 10
    assert tot.cache_hits + tot.cache_misses > 0 and m.cache is not None
    twice = m + m
    assert twice.total().lookups == 20 and twice.batches == 2 and twice.shards == 2
    assert twice.to_dict()["cache"]["hit_rate"] == pytest.approx(m.to_dict()["cache"]["hit_rate"])
    assert twice.cache.capacity_rows == 2 * m.cache.capacity_rows
    assert sum([m, m, m], TierMetrics.empty("ssd")).total().lookups == 30
    renamed = TierMetrics("dram", 1, {"a.rows-0-5": TableStats(lookups=3)})
    assert (renamed + TierMetrics("dram", 2, {"a.rows-0-5": TableStats(lookups=4)})
            ).tables["a.rows-0-5"].lookups == 7
    d = m.to_dict()
    for key in ("kind", "batches", "lookups", "rows_read", "bytes_read", "read_ops",
                "read_seconds", "bytes_read_per_table", "cache"):
        assert key in d
    for key in ("hits", "misses", "hit_rate", "lookup_hit_rate", "nbytes", "capacity_rows",
                "resident_rows", "prefetch", "hit_rate_per_table"):
        assert key in d["cache"]


# -- the pipeline ------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 12), overlap=st.booleans(), horizon=st.integers(1, 6))
def test_pipeline_order_depth_and_hints(n, overlap, horizon):
    events: list[tuple[str, int]] = []
    inflight: set[int] = set()
    peak = [0]

    def launch(i, later):
        assert list(later) == sorted(later) and all(j > i for j in later)
        inflight.add(i)
        peak[0] = max(peak[0], len(inflight))
        events.append(("launch", i))
        return i * 10

    def finish(i, h):
        assert h == i * 10
        inflight.discard(i)
        events.append(("finish", i))
        return i + 0.5

    def prepare(b):
        events.append(("prepare", b))
        return b

    out = list(pipelined(range(n), prepare, launch, finish, overlap=overlap, horizon=horizon,
                         hint=lambda i: events.append(("hint", i))))
    assert out == [i + 0.5 for i in range(n)]
    assert [i for e, i in events if e == "prepare"] == list(range(n))
    assert [i for e, i in events if e == "launch"] == list(range(n))
    assert peak[0] <= (2 if overlap else 1)
    hinted = [i for e, i in events if e == "hint"]
    assert hinted == sorted(set(hinted)) and all(i >= 2 for i in hinted)
    if horizon >= 3 and n >= 3:
        assert 2 in hinted
    if n >= 2:  # with overlap batch 1 is launched before batch 0 finishes, else after
        assert (events.index(("launch", 1)) < events.index(("finish", 0))) == overlap
