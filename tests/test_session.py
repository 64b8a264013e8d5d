"""InferenceSession end to end: checkpoint + store -> predictions equal a plain torch DLRM."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from runtime import (
    DLRMConfig,
    InferenceSession,
    RuntimeConfig,
    random_dense,
    save_dlrm_checkpoint,
    save_torchrec_checkpoint,
    store_from_checkpoint,
)
from tests.naive import Jagged, reference_dlrm_forward
from tiermem import ConfigError, InvalidBatchError, SparseFeatures, TierConfig

ROWS = (300, 41, 1000, 7)
DIM = 6


def _model(tmp_path, layout):
    cfg = DLRMConfig(num_dense=5, embedding_dim=DIM, num_tables=len(ROWS), bottom_mlp=(11, DIM),
                     top_mlp=(9, 4, 1), interaction=layout)
    rng = np.random.default_rng(3)
    tables = [rng.standard_normal((r, DIM)).astype(np.float32) for r in ROWS]
    path = tmp_path / f"{layout}.pt"
    dense = random_dense(cfg, seed=5)
    if layout == "dlrm":
        save_dlrm_checkpoint(path, cfg, tables, dense)
    else:
        save_torchrec_checkpoint(path, cfg, tables, dense)
    return path, cfg


def _batch(names, b, rng, max_pool=4):
    per = []
    for name, rows in zip(names, ROWS, strict=True):
        lengths = rng.integers(0, max_pool + 1, b)
        ids = rng.integers(0, rows, int(lengths.sum()))
        off = np.concatenate([[0], np.cumsum(lengths)])
        per.append((name, ids, off))
    return SparseFeatures.from_tables(per), per


def _reference(path, layout, dense, per):
    state = torch.load(path, weights_only=True)
    sparse = [(torch.from_numpy(ids), torch.from_numpy(off)) for _, ids, off in per]
    return reference_dlrm_forward(state, layout, torch.from_numpy(dense), sparse).numpy()


@pytest.mark.parametrize("layout", ["dlrm", "torchrec"])
@pytest.mark.parametrize("tier", ["dram", "ssd", "cxl"])
def test_predict_matches_plain_torch(tmp_path, layout, tier):
    path, cfg = _model(tmp_path, layout)
    store = tmp_path / "s.zarr"
    store_from_checkpoint(path, store)
    rng = np.random.default_rng(11)
    conf = RuntimeConfig(tier=TierConfig(kind=tier, io_threads=4))
    with InferenceSession.open(path, store, conf) as sess:
        for b in (1, 17, 64):
            sparse, per = _batch(sess.table_names, b, rng)
            dense = rng.standard_normal((b, cfg.num_dense)).astype(np.float32)
            got = sess.predict(dense, sparse)
            ref = _reference(path, layout, dense, per)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
        assert sess.stats["tables"][sess.table_names[0]]["lookups"] > 0


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("int8", 3e-2)])
def test_reduced_precision_tables_stay_close(tmp_path, dtype, tol):
    path, cfg = _model(tmp_path, "dlrm")
    store = tmp_path / f"{dtype}.zarr"
    store_from_checkpoint(path, store, dtype=dtype)
    rng = np.random.default_rng(1)
    with InferenceSession.open(path, store) as sess:
        sparse, per = _batch(sess.table_names, 32, rng)
        dense = rng.standard_normal((32, cfg.num_dense)).astype(np.float32)
        got = sess.predict(dense, sparse)
    ref = _reference(path, "dlrm", dense, per)
    assert np.abs(got - ref).max() < tol


def test_keys_in_any_order_and_mapping_input(tmp_path):
    path, cfg = _model(tmp_path, "dlrm")
    store = tmp_path / "s.zarr"
    store_from_checkpoint(path, store)
    rng = np.random.default_rng(2)
    with InferenceSession.open(path, store) as sess:
        sparse, per = _batch(sess.table_names, 8, rng)
        dense = rng.standard_normal((8, cfg.num_dense)).astype(np.float32)
        a = sess.predict(dense, sparse)
        shuffled = SparseFeatures.from_tables(list(reversed(per)))
        b = sess.predict(dense, shuffled)
        c = sess.predict(dense, {n: (i, o) for n, i, o in per})
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_traced_and_eager_dense_agree(tmp_path):
    path, cfg = _model(tmp_path, "dlrm")
    store = tmp_path / "s.zarr"
    store_from_checkpoint(path, store)
    rng = np.random.default_rng(5)
    sparse, _ = _batch(tuple(f"emb_l.{i}" for i in range(cfg.num_tables)), 16, rng)
    dense = rng.standard_normal((16, cfg.num_dense)).astype(np.float32)
    with InferenceSession.open(path, store) as traced, \
            InferenceSession.open(path, store, RuntimeConfig(trace_dense=False)) as eager:
        assert traced.config.trace_dense and not eager.config.trace_dense
        np.testing.assert_array_equal(traced.predict(dense, sparse), eager.predict(dense, sparse))
    with pytest.raises(ConfigError, match="trace_dense"):
        RuntimeConfig(trace_dense="yes")


def test_concurrent_predict_equals_sequential(tmp_path):
    path, cfg = _model(tmp_path, "torchrec")
    store = tmp_path / "s.zarr"
    store_from_checkpoint(path, store)
    rng = np.random.default_rng(4)
    with InferenceSession.open(path, store, RuntimeConfig(tier=TierConfig(kind="ssd"))) as sess:
        batches = []
        for _ in range(16):
            sparse, _ = _batch(sess.table_names, 33, rng)
            batches.append((rng.standard_normal((33, cfg.num_dense)).astype(np.float32), sparse))
        expected = [sess.predict(d, s) for d, s in batches]
        results: list[np.ndarray | None] = [None] * len(batches)

        def work(i):
            results[i] = sess.predict(*batches[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    for e, r in zip(expected, results, strict=True):
        np.testing.assert_array_equal(e, r)


def test_bad_inputs_are_clear_errors(tmp_path):
    path, cfg = _model(tmp_path, "dlrm")
    store = tmp_path / "s.zarr"
    store_from_checkpoint(path, store)
    rng = np.random.default_rng(5)
    with InferenceSession.open(path, store) as sess:
        sparse, per = _batch(sess.table_names, 4, rng)
        dense = rng.standard_normal((4, cfg.num_dense)).astype(np.float32)
        with pytest.raises(InvalidBatchError, match=r"dense must have shape \(B, 5\)"):
            sess.predict(dense[:, :3], sparse)
        with pytest.raises(InvalidBatchError, match="3 rows but the sparse features"):
            sess.predict(dense[:3], sparse)
        with pytest.raises(InvalidBatchError, match="NaN"):
            sess.predict(np.full_like(dense, np.nan), sparse)
        bad = [(n, i.copy(), o) for n, i, o in per]
        bad[2][1][0] = ROWS[2]  # one past the end of table emb_l.2
        with pytest.raises(InvalidBatchError, match=r"emb_l\.2.*out of range"):
            sess.predict(dense, SparseFeatures.from_tables(bad))
        with pytest.raises(InvalidBatchError, match="no table"):
            sess.predict(dense, SparseFeatures.from_tables(per[:2]))
    with pytest.raises(ConfigError, match="num_threads"):
        RuntimeConfig(num_threads=0)


def test_store_missing_model_tables_is_clear(tmp_path):
    from tiermem import TableSpec, create_random_store

    path, _ = _model(tmp_path, "dlrm")
    other = tmp_path / "other.zarr"
    create_random_store(other, [TableSpec("x", 10, DIM)])
    with pytest.raises(ConfigError, match="lacks the model's table"):
        InferenceSession.open(path, other)


def test_num_threads_holds_for_torch_after_the_kernels_ran(tmp_path):
    """Numba's OpenMP layer shares libgomp with torch: the kernels' thread setting
    must not leave the MLPs on another thread count than RuntimeConfig.num_threads."""
    path, cfg = _model(tmp_path, "dlrm")
    store = tmp_path / "s.zarr"
    store_from_checkpoint(path, store)
    rng = np.random.default_rng(0)
    before = torch.get_num_threads()
    try:
        with InferenceSession.open(path, store, RuntimeConfig(num_threads=1)) as sess:
            sparse, _ = _batch(sess.table_names, 8, rng)
            dense = rng.standard_normal((8, cfg.num_dense)).astype(np.float32)
            for _ in range(2):
                sess.predict(dense, sparse)
                assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("tier", ["dram", "ssd"])
def test_empty_batch_gives_empty_results_of_the_batch_dtypes(tmp_path, tier):
    path, cfg = _model(tmp_path, "dlrm")
    store = tmp_path / "s.zarr"
    store_from_checkpoint(path, store)
    rng = np.random.default_rng(2)
    with InferenceSession.open(path, store, RuntimeConfig(tier=TierConfig(kind=tier))) as sess:
        sparse, per = _batch(sess.table_names, 3, rng)
        dense = rng.standard_normal((3, cfg.num_dense)).astype(np.float32)
        full_p, full_e = sess.predict(dense, sparse), sess.embed(sparse)
        empty = SparseFeatures(sess.table_names, np.zeros(0, np.int64),
                               np.zeros(1, np.int64))
        p = sess.predict(dense[:0], empty)
        e = sess.embed({n: (np.zeros(0, np.int64), np.zeros(1, np.int64))
                        for n in sess.table_names})
        assert p.shape == (0,) and p.dtype == full_p.dtype == np.float32
        assert e.shape == (0, *full_e.shape[1:]) and e.dtype == full_e.dtype
        assert list(sess.predict_stream([(dense[:0], empty), (dense, sparse)])
                    )[0].shape == (0,)


class _KJT(Jagged):
    """What tiermem reads of a torchrec KeyedJaggedTensor (and its to_dict)."""

    def __init__(self, f: SparseFeatures):
        super().__init__(torch.from_numpy(f.values), torch.from_numpy(f.offsets),
                         None if f.weights is None else torch.from_numpy(f.weights))
        self._f = f

    def keys(self):
        return list(self._f.keys)

    def to_dict(self):
        return {k: Jagged(*(None if a is None else torch.from_numpy(a) for a in self._f.table(k)))
                for k in self._f.keys}


def test_keyed_jagged_tensor_and_its_to_dict_are_accepted(tmp_path):
    path, cfg = _model(tmp_path, "dlrm")
    store = tmp_path / "s.zarr"
    store_from_checkpoint(path, store)
    rng = np.random.default_rng(8)
    with InferenceSession.open(path, store) as sess:
        sparse, per = _batch(sess.table_names, 5, rng)
        w = rng.random(sparse.values.size).astype(np.float32)
        weighted = SparseFeatures(sparse.keys, sparse.values, sparse.offsets, w)
        dense = rng.standard_normal((5, cfg.num_dense)).astype(np.float32)
        for f in (sparse, weighted):
            exp = sess.predict(dense, f)
            np.testing.assert_array_equal(sess.predict(dense, _KJT(f).to_dict()), exp)
            np.testing.assert_array_equal(sess.predict(dense, _KJT(f)), exp)
        with pytest.raises(InvalidBatchError, match="KeyedJaggedTensor, or a mapping"):
            sess.predict(dense, [1, 2, 3])


def test_real_torchrec_kjt_to_dict(tmp_path):
    jt = pytest.importorskip("torchrec.sparse.jagged_tensor")
    path, cfg = _model(tmp_path, "dlrm")
    store = tmp_path / "s.zarr"
    store_from_checkpoint(path, store)
    rng = np.random.default_rng(9)
    with InferenceSession.open(path, store) as sess:
        sparse, _ = _batch(sess.table_names, 4, rng)
        kjt = jt.KeyedJaggedTensor(keys=list(sparse.keys), values=torch.from_numpy(sparse.values),
                                   offsets=torch.from_numpy(sparse.offsets))
        dense = rng.standard_normal((4, cfg.num_dense)).astype(np.float32)
        exp = sess.predict(dense, sparse)
        np.testing.assert_array_equal(sess.predict(dense, kjt.to_dict()), exp)
        np.testing.assert_array_equal(sess.predict(dense, kjt), exp)


def test_demo_checkpoint_tables_are_float32(tmp_path):
    from runtime.checkpoint import load_checkpoint
    from runtime.demo import DemoConfig, run_demo

    out = tmp_path / "demo"
    run_demo(DemoConfig(out=str(out), max_rows=40, batches=1, batch_size=4), log=lambda *a: None)
    ckpt = load_checkpoint(out / "model.pt")
    assert {t.dtype for t in ckpt.tables} == {torch.float32}
    # the checkpoint is no bigger than its tables in float32 (plus the small MLPs)
    table_bytes = sum(t.numel() * 4 for t in ckpt.tables)
    assert (out / "model.pt").stat().st_size < table_bytes * 1.5 + 2**20
