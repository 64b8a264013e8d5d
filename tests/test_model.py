"""DenseDLRM and the checkpoint loaders against the plain-torch reference (tests/naive.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from runtime.checkpoint import (
    Checkpoint,
    load_checkpoint,
    save_dlrm_checkpoint,
    save_torchrec_checkpoint,
)
from runtime.model import DenseDLRM, DLRMConfig, TracedDense, interaction_indices, random_dense
from tiermem.errors import ConfigError, InvalidBatchError, StoreFormatError

try:
    from tests.naive import reference_dlrm_forward
except ImportError:  # tests/ on sys.path instead of the repo root
    from naive import reference_dlrm_forward  # type: ignore[no-redef]

RTOL = 1e-5
ATOL = 1e-7

CONFIGS = {
    "small": dict(
        num_dense=5, embedding_dim=4, num_tables=3, bottom_mlp=(8, 4), top_mlp=(16, 8, 1)
    ),
    "one_table": dict(num_dense=3, embedding_dim=8, num_tables=1, bottom_mlp=(8,), top_mlp=(4, 1)),
    # 12 tables and 6 bottom layers: sequential indices reach 10, so a string sort breaks.
    "deep": dict(
        num_dense=7, embedding_dim=6, num_tables=12,
        bottom_mlp=(16, 12, 10, 8, 8, 6), top_mlp=(32, 16, 8, 4, 2, 1),
    ),
}


def _tables(cfg: DLRMConfig, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((int(rng.integers(5, 40)), cfg.embedding_dim), dtype=np.float32)
        for _ in range(cfg.num_tables)
    ]


def _batch(cfg: DLRMConfig, rows: list[int], batch: int, seed: int):
    """Dense features and per-table CSR (indices, offsets), some bags empty."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, cfg.num_dense, generator=gen)
    sparse = []
    for n in rows:
        lengths = torch.randint(0, 5, (batch,), generator=gen)
        offsets = torch.zeros(batch + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        indices = torch.randint(0, n, (int(offsets[-1]),), generator=gen)
        sparse.append((indices, offsets))
    return dense, sparse


def _pool(tables: list[torch.Tensor], sparse) -> torch.Tensor:
    """(B, T, D) pooled embeddings with nn.EmbeddingBag over the loaded tables."""
    out = []
    for w, (idx, off) in zip(tables, sparse, strict=True):
        bag = nn.EmbeddingBag.from_pretrained(w.float(), mode="sum", include_last_offset=True)
        out.append(bag(idx, off))
    return torch.stack(out, dim=1)


def _write(layout: str, path: Path, cfg: DLRMConfig, seed: int = 0, **kw) -> list[np.ndarray]:
    tables = _tables(cfg, seed)
    dense = random_dense(cfg, seed)
    if layout == "dlrm":
        save_dlrm_checkpoint(path, cfg, tables, dense, **kw)
    else:
        save_torchrec_checkpoint(path, cfg, tables, dense, **kw)
    return tables


def _raw_state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


# --------------------------------------------------------------------------- config


def test_config_roundtrip_and_sizes() -> None:
    cfg = DLRMConfig(13, 16, 26, (512, 256, 16), (512, 256, 1), "torchrec")
    assert cfg.top_in_features == 16 + 27 * 26 // 2
    again = DLRMConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(again.bottom_mlp, tuple)
    assert DLRMConfig.from_dict({**cfg.to_dict(), "top_mlp": [4, 1]}).top_mlp == (4, 1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bottom_mlp": (8, 5)}, "embedding_dim=4"),
        ({"top_mlp": (8, 2)}, "top_mlp"),
        ({"interaction": "dot"}, "interaction"),
        ({"num_tables": 0}, "num_tables"),
        ({"num_dense": True}, "num_dense"),
        ({"bottom_mlp": ()}, "bottom_mlp"),
        ({"top_mlp": (8, 0, 1)}, r"top_mlp\[1\]"),
    ],
)
def test_config_validation(change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DLRMConfig(**{**CONFIGS["small"], **change})


def test_config_from_dict_rejects_unknown() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        DLRMConfig.from_dict({**CONFIGS["small"], "bogus": 1})


def test_interaction_orders() -> None:
    li, lj = interaction_indices(3, "dlrm")
    assert list(zip(li.tolist(), lj.tolist(), strict=True)) == [
        (i, j) for i in range(4) for j in range(i)
    ]
    li, lj = interaction_indices(3, "torchrec")
    assert list(zip(li.tolist(), lj.tolist(), strict=True)) == [
        (i, j) for i in range(4) for j in range(i + 1, 4)
    ]


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("layout", ["dlrm", "torchrec"])
def test_matches_reference(tmp_path: Path, layout: str, name: str) -> None:
    cfg = DLRMConfig(**CONFIGS[name], interaction=layout)
    path = tmp_path / "ckpt.pt"
    tables = _write(layout, path, cfg, seed=3)

    ckpt = load_checkpoint(path)  # auto-detected
    assert ckpt.layout == layout
    assert ckpt.config == cfg
    assert len(ckpt.tables) == cfg.num_tables
    for got, want in zip(ckpt.tables, tables, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)

    model = ckpt.build_dense()
    assert not model.training
    dense, sparse = _batch(cfg, [t.shape[0] for t in tables], batch=9, seed=4)
    with torch.inference_mode():
        got = model(dense, _pool(ckpt.tables, sparse))
        logits = model.logits(dense, _pool(ckpt.tables, sparse))
    want = reference_dlrm_forward(_raw_state(path), layout, dense, sparse)
    assert got.shape == (9,)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.sigmoid(logits), got, rtol=RTOL, atol=ATOL)


def test_interaction_order_matters(tmp_path: Path) -> None:
    """The same weights read with the other interaction order give other answers."""
    cfg = DLRMConfig(**CONFIGS["small"], interaction="torchrec")
    path = tmp_path / "tr.pt"
    tables = _write("torchrec", path, cfg)
    dense, sparse = _batch(cfg, [t.shape[0] for t in tables], batch=16, seed=1)
    right = reference_dlrm_forward(_raw_state(path), "torchrec", dense, sparse)
    ckpt = load_checkpoint(path)
    wrong = DenseDLRM(DLRMConfig(**CONFIGS["small"], interaction="dlrm"))
    wrong.load_state_dict(ckpt.dense_state)
    with torch.no_grad():
        assert not torch.allclose(wrong(dense, _pool(ckpt.tables, sparse)), right, rtol=1e-3)


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict"])
@pytest.mark.parametrize("layout", ["dlrm", "torchrec"])
def test_wrapped_and_explicit_layout(tmp_path: Path, layout: str, wrapper: str) -> None:
    cfg = DLRMConfig(**CONFIGS["small"], interaction=layout)
    path = tmp_path / "w.pt"
    _write(layout, path, cfg, wrapper=wrapper)
    assert wrapper in torch.load(path, weights_only=True)
    assert load_checkpoint(path, layout=layout).config == cfg


def test_torchrec_model_prefix_and_names(tmp_path: Path) -> None:
    cfg = DLRMConfig(**CONFIGS["small"], interaction="torchrec")
    path = tmp_path / "train.pt"
    names = ["zeta", "alpha", "mid"]  # not sorted: order must follow the state dict
    tables = _write("torchrec", path, cfg, table_names=names, prefix="model.")
    assert all(k.startswith("model.") for k in torch.load(path, weights_only=True))
    ckpt = load_checkpoint(path)
    assert ckpt.layout == "torchrec"
    assert ckpt.table_names == names
    for got, want in zip(ckpt.tables, tables, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


def test_dlrm_noncontiguous_sequential_indices(tmp_path: Path) -> None:
    """Linear layers at arbitrary Sequential indices (e.g. extra dropout) sort numerically."""
    cfg = DLRMConfig(**CONFIGS["small"], interaction="dlrm")
    dense = random_dense(cfg, 5)
    tables = [torch.from_numpy(t) for t in _tables(cfg, 5)]
    state: dict[str, torch.Tensor] = {f"emb_l.{k}.weight": t for k, t in enumerate(tables)}
    for name, layers, idx in (("bot_l", dense.bottom, [0, 3]), ("top_l", dense.top, [0, 9, 10])):
        for i, layer in zip(idx, layers, strict=True):
            state[f"{name}.{i}.weight"] = layer.weight.detach().clone()
            state[f"{name}.{i}.bias"] = layer.bias.detach().clone()
    path = tmp_path / "gaps.pt"
    torch.save({"state_dict": state, "nepochs": 3}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.config == cfg
    assert ckpt.table_names == ["emb_l.0", "emb_l.1", "emb_l.2"]
    b, sparse = _batch(cfg, [t.shape[0] for t in tables], batch=5, seed=2)
    with torch.no_grad():
        got = ckpt.build_dense()(b, _pool(ckpt.tables, sparse))
    torch.testing.assert_close(
        got, reference_dlrm_forward(state, "dlrm", b, sparse), rtol=RTOL, atol=ATOL
    )


def test_legacy_non_zip_checkpoint(tmp_path: Path) -> None:
    cfg = DLRMConfig(**CONFIGS["small"], interaction="dlrm")
    path = tmp_path / "new.pt"
    _write("dlrm", path, cfg)
    legacy = tmp_path / "legacy.pt"
    torch.save(_raw_state(path), legacy, _use_new_zipfile_serialization=False)
    ckpt = load_checkpoint(legacy)
    assert ckpt.config == cfg
    torch.testing.assert_close(ckpt.tables[2], load_checkpoint(path).tables[2])


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    target = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_tables_are_memory_mapped(tmp_path: Path) -> None:
    cfg = DLRMConfig(**CONFIGS["small"], interaction="torchrec")
    path = tmp_path / "mm.pt"
    _write("torchrec", path, cfg)
    ckpt = load_checkpoint(path)
    ranges = _mapped_ranges(path)
    assert ranges, "checkpoint file is not mapped into the process"
    for t in ckpt.tables:
        ptr = t.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in ranges), "table was copied out of the mapping"


def test_atomic_write_leaves_no_temp(tmp_path: Path) -> None:
    cfg = DLRMConfig(**CONFIGS["small"], interaction="dlrm")
    _write("dlrm", tmp_path / "a.pt", cfg)
    _write("dlrm", tmp_path / "a.pt", cfg, seed=1)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    cfg = DLRMConfig(**CONFIGS["small"], interaction="dlrm")
    tables = _tables(cfg, 0)
    dense = random_dense(cfg, 0)
    with pytest.raises(ConfigError, match="interaction"):
        save_torchrec_checkpoint(tmp_path / "x.pt", cfg, tables, dense)
    with pytest.raises(ConfigError, match="num_tables=3"):
        save_dlrm_checkpoint(tmp_path / "x.pt", cfg, tables[:2], dense)
    with pytest.raises(ConfigError, match="table 1"):
        bad = [tables[0], tables[1][:, :3], tables[2]]
        save_dlrm_checkpoint(tmp_path / "x.pt", cfg, bad, dense)
    trcfg = DLRMConfig(**CONFIGS["small"], interaction="torchrec")
    with pytest.raises(ConfigError, match="unique"):
        save_torchrec_checkpoint(
            tmp_path / "x.pt", trcfg, tables, random_dense(trcfg, 0), table_names=["a", "b", "a"]
        )
    assert not list(tmp_path.iterdir())


def test_random_dense_is_deterministic() -> None:
    cfg = DLRMConfig(**CONFIGS["small"])
    a, b, c = random_dense(cfg, 7), random_dense(cfg, 7), random_dense(cfg, 8)
    for (ka, va), (_, vb), (_, vc) in zip(
        a.state_dict().items(), b.state_dict().items(), c.state_dict().items(), strict=True
    ):
        assert torch.equal(va, vb), ka
        assert not torch.equal(va, vc), ka


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StoreFormatError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"]
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(StoreFormatError, match="junk.pt"):
        load_checkpoint(path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(StoreFormatError, match="Tensor"):
        load_checkpoint(path)
    torch.save({"epoch": 3}, path)
    with pytest.raises(StoreFormatError, match="no tensors"):
        load_checkpoint(path)


def test_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'keras'"):
        load_checkpoint(tmp_path / "x.pt", layout="keras")
    path = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(StoreFormatError, match="layout"):
        load_checkpoint(path)


def _save_edited(tmp_path: Path, layout: str, edit) -> Path:
    cfg = DLRMConfig(**CONFIGS["small"], interaction=layout)
    path = tmp_path / "src.pt"
    _write(layout, path, cfg)
    state = dict(_raw_state(path))
    edit(state)
    out = tmp_path / "edited.pt"
    torch.save(state, out)
    return out


@pytest.mark.parametrize(
    ("layout", "key"),
    [
        ("dlrm", "bot_l.2.bias"),
        ("dlrm", "emb_l.1.weight"),
        ("dlrm", "top_l.0.weight"),
        ("torchrec", "over_arch.model.1.weight"),
        ("torchrec", "dense_arch.model._mlp.0._linear.weight"),
        ("torchrec", "over_arch.model.0._mlp.1._linear.bias"),
    ],
)
def test_missing_key(tmp_path: Path, layout: str, key: str) -> None:
    path = _save_edited(tmp_path, layout, lambda s: s.pop(key))
    with pytest.raises(StoreFormatError, match=re.escape(repr(key))):
        load_checkpoint(path, layout=layout)


def test_no_tables_torchrec(tmp_path: Path) -> None:
    def drop_tables(s):
        for k in [k for k in s if k.startswith("sparse_arch.")]:
            del s[k]

    path = _save_edited(tmp_path, "torchrec", drop_tables)
    with pytest.raises(StoreFormatError, match="embedding_bags"):
        load_checkpoint(path, layout="torchrec")


def test_tables_of_different_dims(tmp_path: Path) -> None:
    path = _save_edited(
        tmp_path, "dlrm", lambda s: s.__setitem__("emb_l.2.weight", torch.zeros(10, 5))
    )
    with pytest.raises(StoreFormatError, match=r"emb_l\.2\.weight has dim 5.*dim 4"):
        load_checkpoint(path)


def test_bottom_output_not_embedding_dim(tmp_path: Path) -> None:
    def edit(s):
        s["bot_l.2.weight"] = torch.zeros(6, 8)
        s["bot_l.2.bias"] = torch.zeros(6)

    path = _save_edited(tmp_path, "dlrm", edit)
    with pytest.raises(StoreFormatError, match=r"bot_l\.2.*6 features.*dim is 4"):
        load_checkpoint(path)


def test_top_in_features_mismatch(tmp_path: Path) -> None:
    key = "over_arch.model.0._mlp.0._linear"

    def edit(s):
        s[key + ".weight"] = torch.zeros(16, 11)

    path = _save_edited(tmp_path, "torchrec", edit)
    # 4 + 4*3/2 = 10 expected, 11 found
    with pytest.raises(StoreFormatError, match=re.escape(key) + r".*in_features=11.*expected 10"):
        load_checkpoint(path)


def test_inner_layer_mismatch(tmp_path: Path) -> None:
    path = _save_edited(
        tmp_path, "dlrm", lambda s: s.__setitem__("top_l.2.weight", torch.zeros(8, 15))
    )
    with pytest.raises(StoreFormatError, match=r"top_l\.2.*in_features=15.*expected 16"):
        load_checkpoint(path)


def test_bias_shape_mismatch(tmp_path: Path) -> None:
    path = _save_edited(tmp_path, "dlrm", lambda s: s.__setitem__("top_l.0.bias", torch.zeros(3)))
    with pytest.raises(StoreFormatError, match=r"top_l\.0\.bias"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- batch checks


@pytest.fixture(scope="module")
def model() -> DenseDLRM:
    return random_dense(DLRMConfig(**CONFIGS["small"]), 0)


@pytest.mark.parametrize(
    ("dense_shape", "pooled_shape", "match"),
    [
        ((4, 6), (4, 3, 4), "num_dense=5"),
        ((4, 5), (4, 2, 4), "num_tables=3"),
        ((4, 5), (4, 3, 5), "embedding_dim=4"),
        ((4, 5), (3, 3, 4), "B=4.*B=3"),
        ((5,), (1, 3, 4), "dense"),
    ],
)
def test_bad_batch_shapes(model: DenseDLRM, dense_shape, pooled_shape, match: str) -> None:
    with pytest.raises(InvalidBatchError, match=match):
        model(torch.zeros(dense_shape), torch.zeros(pooled_shape))


def test_bad_batch_dtype(model: DenseDLRM) -> None:
    with pytest.raises(InvalidBatchError, match=r"dense.*int64"):
        model(torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 3, 4))
    with pytest.raises(InvalidBatchError, match="pooled"):
        model(torch.zeros(2, 5), np.zeros((2, 3, 4), np.float32))


def test_empty_batch(model: DenseDLRM) -> None:
    with torch.inference_mode():
        assert model(torch.zeros(0, 5), torch.zeros(0, 3, 4)).shape == (0,)


def test_checkpoint_repr_is_short(tmp_path: Path) -> None:
    cfg = DLRMConfig(**CONFIGS["small"], interaction="dlrm")
    _write("dlrm", tmp_path / "r.pt", cfg)
    ckpt = load_checkpoint(tmp_path / "r.pt")
    assert isinstance(ckpt, Checkpoint)
    assert "tensor(" not in repr(ckpt)


@pytest.mark.parametrize("interaction", ["dlrm", "torchrec"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_traced_dense_is_bit_identical(name: str, interaction: str) -> None:
    """The traced graph runs the eager module's ops: equal bits for any batch size."""
    cfg = DLRMConfig(**CONFIGS[name], interaction=interaction)
    model = random_dense(cfg, seed=4)
    traced = TracedDense(model)
    gen = torch.Generator().manual_seed(1)
    for b in (0, 1, 2, 7, 300):
        dense = torch.randn(b, cfg.num_dense, generator=gen)
        pooled = torch.randn(b, cfg.num_tables, cfg.embedding_dim, generator=gen)
        with torch.inference_mode():
            exp, got = model(dense, pooled), traced(dense, pooled)
        assert got.shape == (b,)
        assert torch.equal(got, exp)
    # the shape checks still hold (they run before the traced call)
    with pytest.raises(InvalidBatchError, match="num_dense"):
        traced(torch.zeros(2, cfg.num_dense + 1), torch.zeros(2, cfg.num_tables,
                                                              cfg.embedding_dim))
    with pytest.raises(InvalidBatchError, match="Batch size mismatch"):
        traced(torch.zeros(3, cfg.num_dense), torch.zeros(2, cfg.num_tables, cfg.embedding_dim))
