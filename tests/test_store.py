"""The on-disk store (tiermem.format): round trips, plain-zarr readability, atomic
creation, validation at open, TableSpec and StoreWriter errors.

References are independent of tiermem: plain numpy casts / arithmetic and plain
``zarr.open`` of the store folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiermem.errors import ConfigError, StoreError, StoreFormatError
from tiermem.format import (
    FORMAT_NAME,
    StoreWriter,
    TableSpec,
    create_random_store,
    create_store,
    create_store_from_arrays,
    open_store,
    random_table,
)
from tiermem.quantize import RowDtype

DTYPES = ["float32", "float16", "int8"]


# ---------------------------------------------------------------------------
# helpers (independent references)


def _rand(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    a = rng.standard_normal((rows, dim)).astype(np.float32)
    # rows of different magnitudes, a constant row and a row with a single value spike
    a[: rows // 3] *= 10.0
    if rows > 2:
        a[1] = 0.25
    if rows > 3:
        a[2] = 0.0
        a[2, 0] = -3.0
    return a


def _zarr_weight(path: Path, name: str) -> np.ndarray:
    g = zarr.open(str(path), mode="r")
    return np.asarray(g[f"tables/{name}/weight"][:])


def _zarr_qparams(path: Path, name: str) -> np.ndarray:
    g = zarr.open(str(path), mode="r")
    return np.asarray(g[f"tables/{name}/qparams"][:])


def _dequant(w: np.ndarray, qp: np.ndarray) -> np.ndarray:
    """Plain numpy ``scale * q + bias`` (float64, so the reference adds no rounding)."""
    return qp[:, 0:1].astype(np.float64) * w.astype(np.float64) + qp[:, 1:2].astype(np.float64)


def _check_values(path: Path, name: str, dtype: str, original: np.ndarray) -> float:
    """Check table ``name`` of the store at ``path`` against the float32 ``original``,
    reading it with plain zarr; return the max abs error vs float32."""
    w = _zarr_weight(path, name)
    assert w.shape == original.shape
    if dtype == "float32":
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, original)
        return 0.0
    if dtype == "float16":
        assert w.dtype == np.float16
        np.testing.assert_array_equal(w, original.astype(np.float16))
        return float(np.abs(w.astype(np.float32) - original).max(initial=0.0))
    assert dtype == "int8"
    assert w.dtype == np.int8
    qp = _zarr_qparams(path, name)
    assert qp.shape == (original.shape[0], 2) and qp.dtype == np.float32
    scale = qp[:, 0].astype(np.float64)
    lo = original.min(axis=1).astype(np.float64)
    hi = original.max(axis=1).astype(np.float64)
    # the scale spans the row's range in 255 steps
    np.testing.assert_allclose(scale, (hi - lo) / 255.0, rtol=1e-6, atol=0)
    err = np.abs(_dequant(w, qp) - original.astype(np.float64))
    # every element within half a step (plus float32 rounding of scale*q + bias)
    slack = 8 * np.finfo(np.float32).eps * np.maximum(np.abs(lo), np.abs(hi))
    bound = scale / 2 + slack
    assert (err <= bound[:, None]).all(), (
        f"int8 error {err.max()} exceeds scale/2 (worst row "
        f"{int(np.argmax((err - bound[:, None]).max(axis=1)))})")
    # constant rows are exact
    const = hi == lo
    if const.any():
        assert err[const].max() == 0.0
    return float(err.max(initial=0.0))


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_rows,block_rows",
                         [(None, 65536), (8, 7), (5, 3), (64, 1000), (1, 4)])
def test_round_trip_from_arrays(tmp_path: Path, dtype: str, chunk_rows: int | None,
                                block_rows: int, record_property) -> None:
    rng = np.random.default_rng(1)
    a = _rand(rng, 37, 5)
    b = _rand(rng, 11, 3)
    c = _rand(rng, 1, 1)
    path = tmp_path / "s.zarr"
    info = create_store_from_arrays(path, {"a": a, "b": b, "c": c}, dtype=dtype,
                                    chunk_rows=chunk_rows, block_rows=block_rows)
    assert info.names == ["a", "b", "c"]
    assert [t.spec.dtype for t in info.tables] == [RowDtype(dtype)] * 3
    assert [(t.spec.rows, t.spec.dim) for t in info.tables] == [(37, 5), (11, 3), (1, 1)]
    if chunk_rows is not None:
        # chunk_rows not dividing rows: several chunk files and a padded last chunk
        assert info.table("a").chunk_rows == chunk_rows
        assert info.table("a").n_chunks == -(-37 // chunk_rows)
    max_err = 0.0
    for name, arr in (("a", a), ("b", b), ("c", c)):
        max_err = max(max_err, _check_values(path, name, dtype, arr))
        # tiermem's own reader agrees with plain zarr
        w, q = open_store(path).read_table(name)
        np.testing.assert_array_equal(w, _zarr_weight(path, name))
        if dtype == "int8":
            np.testing.assert_array_equal(q, _zarr_qparams(path, name))
        else:
            assert q is None
    record_property(f"max_abs_err_vs_float32[{dtype}]", max_err)
    print(f"{dtype}: max abs error vs float32 = {max_err:.3g}")
    if dtype == "float32":
        assert max_err == 0.0


def test_int8_error_reported(tmp_path: Path, capsys) -> None:
    """The int8 error against float32 is bounded by half a quantization step and non-zero."""
    rng = np.random.default_rng(7)
    a = rng.uniform(-1, 1, (300, 16)).astype(np.float32)
    create_store_from_arrays(tmp_path / "s", {"t": a}, dtype="int8", chunk_rows=37)
    err = _check_values(tmp_path / "s", "t", "int8", a)
    print(f"int8 max abs error vs float32: {err:.4g} (row range 2 -> scale/2 ~ {2 / 255 / 2:.4g})")
    assert 0 < err <= (2.0 / 255) / 2 * 1.0001


def test_round_trip_torch_and_memmap_sources(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((23, 4)).astype(np.float32)
    mm_path = tmp_path / "a.bin"
    mm = np.memmap(mm_path, dtype=np.float32, mode="w+", shape=(23, 4))
    mm[:] = a
    mm.flush()
    mm = np.memmap(mm_path, dtype=np.float32, mode="r", shape=(23, 4))
    t64 = torch.from_numpy(a.astype(np.float64))
    create_store_from_arrays(tmp_path / "s", {"mm": mm, "torch": t64, "f64": a.astype(np.float64)},
                             block_rows=5, chunk_rows=6)
    for name in ("mm", "torch", "f64"):
        np.testing.assert_array_equal(_zarr_weight(tmp_path / "s", name), a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_writer_odd_blocks(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(11)
    a = _rand(rng, 50, 7)
    b = _rand(rng, 13, 2)
    path = tmp_path / "s.zarr"
    specs = [TableSpec("a", 50, 7, dtype), TableSpec("b", 13, 2, dtype)]
    with create_store(path, specs, chunk_rows=6) as w:
        # interleave the two tables, blocks of odd sizes, an empty block in the middle
        pos_a = pos_b = 0
        for na, nb in [(1, 2), (3, 0), (0, 5), (11, 1), (17, 4), (5, 1), (13, 0)]:
            if na:
                w.write("a", a[pos_a:pos_a + na])
                pos_a += na
            w.write("b", b[pos_b:pos_b + nb])
            pos_b += nb
            assert w.rows_written("a") == pos_a and w.rows_written("b") == pos_b
        assert (pos_a, pos_b) == (50, 13)
    info = open_store(path)
    assert info.table("a").chunk_rows == 6 and info.table("a").n_chunks == 9
    _check_values(path, "a", dtype, a)
    _check_values(path, "b", dtype, b)


def test_streaming_writer_prequantized_int8(tmp_path: Path) -> None:
    """int8 rows given with their qparams are stored verbatim."""
    rng = np.random.default_rng(5)
    q = rng.integers(-128, 128, (19, 3), dtype=np.int8)
    qp = rng.uniform(0.01, 1, (19, 2)).astype(np.float32)
    with create_store(tmp_path / "s", [TableSpec("q", 19, 3, "int8")], chunk_rows=4) as w:
        w.write("q", q[:7], qp[:7])
        w.write("q", q[7:], qp[7:])
    np.testing.assert_array_equal(_zarr_weight(tmp_path / "s", "q"), q)
    np.testing.assert_array_equal(_zarr_qparams(tmp_path / "s", "q"), qp)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 40),
    dim=st.integers(1, 9),
    chunk_rows=st.integers(1, 17),
    dtype=st.sampled_from(DTYPES),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_streaming_writer_property(rows: int, dim: int, chunk_rows: int, dtype: str,
                                   cuts: list[int], seed: int) -> None:
    a = np.random.default_rng(seed).uniform(-2, 2, (rows, dim)).astype(np.float32)
    bounds = sorted({0, rows, *(c for c in cuts if c <= rows)})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.zarr"
        with create_store(path, [TableSpec("t", rows, dim, dtype)], chunk_rows=chunk_rows) as w:
            for s, e in zip(bounds[:-1], bounds[1:], strict=True):
                w.write("t", a[s:e])
        info = open_store(path)
        assert info.table("t").n_chunks == -(-rows // chunk_rows)
        _check_values(path, "t", dtype, a)
        # every chunk file holds chunk_rows rows, the last one padded
        rb = RowDtype(dtype).row_bytes(dim)
        for i in range(info.table("t").n_chunks):
            assert info.table("t").weight_chunk(i).stat().st_size == chunk_rows * rb


def test_random_store_matches_random_table(tmp_path: Path) -> None:
    specs = [TableSpec("x", 70, 3), TableSpec("y", 9, 5)]
    create_random_store(tmp_path / "s", specs, seed=4, chunk_rows=16, block_rows=13)
    for ti, s in enumerate(specs):
        ref = random_table(s, 4, ti)
        np.testing.assert_array_equal(_zarr_weight(tmp_path / "s", s.name), ref)
        assert np.abs(ref).max() <= 1 / np.sqrt(s.rows)


def test_zarr_metadata_and_attrs(tmp_path: Path) -> None:
    a = np.arange(30, dtype=np.float32).reshape(10, 3)
    create_store_from_arrays(tmp_path / "s", {"emb_l.0": a}, dtype="int8", chunk_rows=4,
                             attrs={"note": "hello"})
    g = zarr.open(str(tmp_path / "s"), mode="r")
    meta = dict(g.attrs)["tiermem"]
    assert meta["format"] == FORMAT_NAME
    assert meta["tables"] == [{"name": "emb_l.0", "rows": 10, "dim": 3, "dtype": "int8",
                               "chunk_rows": 4}]
    assert meta["attrs"] == {"note": "hello"}
    arr = g["tables/emb_l.0/weight"]
    assert arr.shape == (10, 3) and arr.chunks == (4, 3) and arr.dtype == np.int8
    assert g["tables/emb_l.0/qparams"].shape == (10, 2)
    assert open_store(tmp_path / "s").attrs == {"note": "hello"}


# ---------------------------------------------------------------------------
# atomic creation


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from tiermem.format import TableSpec, create_store
    target = sys.argv[1]
    w = create_store(target, [TableSpec("t", 4000, 8)], chunk_rows=10, overwrite=True)
    for i in range(400):
        w.write("t", np.full((10, 8), float(i), np.float32))
        if i == 20:
            print("ready", flush=True)
        time.sleep(0.02)
    w.commit()
    print("committed", flush=True)
""")


def _start_and_kill_writer(target: Path, env: dict[str, str]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_killed_creation_leaves_no_store(tmp_path: Path, subprocess_env) -> None:
    target = tmp_path / "big.zarr"
    _start_and_kill_writer(target, subprocess_env)
    assert not target.exists()
    with pytest.raises(StoreFormatError, match="does not exist"):
        open_store(target)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".big.zarr.tmp-")]
    assert len(leftovers) == 1, list(tmp_path.iterdir())
    # some chunks were written before the kill, yet the folder is not a store
    assert (leftovers[0] / "tables" / "t" / "weight" / "c" / "0" / "0").exists()
    with pytest.raises(StoreFormatError, match="not a tiermem store"):
        open_store(leftovers[0])


def test_killed_overwrite_keeps_old_store(tmp_path: Path, subprocess_env) -> None:
    target = tmp_path / "s.zarr"
    old = np.arange(12, dtype=np.float32).reshape(4, 3)
    create_store_from_arrays(target, {"old": old})
    _start_and_kill_writer(target, subprocess_env)
    info = open_store(target)
    assert info.names == ["old"]
    np.testing.assert_array_equal(_zarr_weight(target, "old"), old)


# ---------------------------------------------------------------------------
# errors at open


@pytest.fixture
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "s.zarr"
    create_store_from_arrays(path, {"a": rng.standard_normal((20, 4)).astype(np.float32)},
                             chunk_rows=6)
    create_store_from_arrays(tmp_path / "q.zarr",
                             {"a": rng.standard_normal((20, 4)).astype(np.float32)},
                             dtype="int8", chunk_rows=6)
    return path


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def test_open_truncated_chunk(store: Path) -> None:
    f = store / "tables" / "a" / "weight" / "c" / "2" / "0"
    with open(f, "r+b") as fh:
        fh.truncate(6 * 16 - 5)
    with pytest.raises(StoreFormatError, match=r"c/2/0.*91 bytes, expected 96"):
        open_store(store)


def test_open_oversized_chunk(store: Path) -> None:
    f = store / "tables" / "a" / "weight" / "c" / "3" / "0"
    with open(f, "ab") as fh:
        fh.write(b"\0" * 4)
    with pytest.raises(StoreFormatError, match="expected 96"):
        open_store(store)


def test_open_truncated_qparams_chunk(tmp_path: Path, store: Path) -> None:
    q = tmp_path / "q.zarr"
    f = q / "tables" / "a" / "qparams" / "c" / "0" / "0"
    with open(f, "r+b") as fh:
        fh.truncate(8)
    with pytest.raises(StoreFormatError, match=r"qparams/c/0/0"):
        open_store(q)


def test_open_missing_chunk(store: Path) -> None:
    (store / "tables" / "a" / "weight" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreFormatError, match=r"c/1/0 is missing"):
        open_store(store)
    # without the chunk check, open succeeds (metadata only)
    assert open_store(store, check_chunks=False).names == ["a"]


@pytest.mark.parametrize("content", [b"\x00\xffgarbage\x01", b"{not json", b"", b"[1, 2]",
                                     b'"a string"', b"\xc3\x28"])
def test_open_garbage_group_json(store: Path, content: bytes) -> None:
    (store / "zarr.json").write_bytes(content)
    with pytest.raises(StoreFormatError, match="zarr.json"):
        open_store(store)


def test_open_missing_group_json(store: Path) -> None:
    (store / "zarr.json").unlink()
    with pytest.raises(StoreFormatError, match="missing"):
        open_store(store)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m.update(zarr_format=2), id="zarr_format2"),
    pytest.param(lambda m: m.update(node_type="array"), id="node_type_array"),
    pytest.param(lambda m: m["attributes"]["tiermem"].update(format="other"), id="format_name"),
    pytest.param(lambda m: m["attributes"]["tiermem"].update(version=99), id="version"),
    pytest.param(lambda m: m["attributes"]["tiermem"].update(tables=[]), id="no_tables"),
    pytest.param(lambda m: m["attributes"]["tiermem"].update(tables="a"), id="tables_str"),
    pytest.param(lambda m: m["attributes"]["tiermem"]["tables"][0].update(rows=0), id="rows0"),
    pytest.param(lambda m: m["attributes"]["tiermem"]["tables"][0].update(rows=21),
                 id="rows_mismatch"),
    pytest.param(lambda m: m["attributes"]["tiermem"]["tables"][0].update(chunk_rows=0),
                 id="chunk_rows0"),
    pytest.param(lambda m: m["attributes"]["tiermem"]["tables"][0].update(chunk_rows=5),
                 id="chunk_rows_mismatch"),
    pytest.param(lambda m: m["attributes"]["tiermem"]["tables"][0].pop("chunk_rows"),
                 id="no_chunk_rows"),
    pytest.param(lambda m: m["attributes"]["tiermem"]["tables"][0].update(name="../a"),
                 id="bad_name"),
    pytest.param(lambda m: m["attributes"]["tiermem"]["tables"][0].update(dtype="bf16"),
                 id="bad_dtype"),
    pytest.param(lambda m: m["attributes"]["tiermem"]["tables"].__setitem__(0, "a"),
                 id="table_entry_str"),
    pytest.param(lambda m: m["attributes"].pop("tiermem"), id="no_tiermem_attr"),
    pytest.param(lambda m: m["attributes"].update(tiermem="yes"), id="tiermem_attr_str"),
    # the same table listed twice (two specs over one folder)
    pytest.param(lambda m: m["attributes"]["tiermem"]["tables"].append(
        dict(m["attributes"]["tiermem"]["tables"][0])), id="duplicate_table"),
    # not a JSON object where one is expected: must still be a clear StoreFormatError
    pytest.param(lambda m: m.update(attributes=[1, 2]), id="attributes_list"),
])
def test_open_bad_group_metadata(store: Path, edit) -> None:
    _edit_json(store / "zarr.json", edit)
    with pytest.raises(StoreFormatError):
        open_store(store)


@pytest.mark.parametrize("edit,match", [
    pytest.param(lambda m: m.update(data_type="float64"), "data_type", id="dtype_float64"),
    pytest.param(lambda m: m.update(data_type="int8"), "data_type", id="dtype_int8"),
    pytest.param(lambda m: m.update(shape=[20, 5]), "shape", id="shape"),
    pytest.param(lambda m: m.update(node_type="group"), "not a zarr v3 array", id="group"),
    pytest.param(lambda m: m["codecs"].append({"name": "zstd", "configuration": {"level": 3}}),
                 "codecs", id="zstd"),
    pytest.param(lambda m: m.update(codecs=[{"name": "bytes", "configuration": {"endian": "big"}}]),
                 "codecs", id="big_endian"),
    pytest.param(lambda m: m.update(codecs=[{"name": "gzip", "configuration": {"level": 1}}]),
                 "codecs", id="gzip_only"),
    pytest.param(lambda m: m.update(codecs=[]), "codecs", id="no_codecs"),
    pytest.param(lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[5, 4]),
                 "chunk grid", id="chunk_shape"),
    pytest.param(lambda m: m["chunk_key_encoding"]["configuration"].update(separator="."),
                 "chunk_key_encoding", id="separator"),
    pytest.param(lambda m: m["chunk_key_encoding"].update(name="v2"), "chunk_key_encoding",
                 id="v2_keys"),
    # malformed (non-object) entries must give a clear StoreFormatError too
    pytest.param(lambda m: m.update(chunk_grid="regular"), "chunk grid", id="chunk_grid_str"),
    pytest.param(lambda m: m.update(chunk_key_encoding="default"), "chunk_key_encoding",
                 id="cke_str"),
    pytest.param(lambda m: m.update(codecs=["bytes"]), "codecs", id="codecs_str"),
])
def test_open_bad_array_metadata(store: Path, edit, match: str) -> None:
    _edit_json(store / "tables" / "a" / "weight" / "zarr.json", edit)
    with pytest.raises(StoreFormatError, match=match):
        open_store(store)


def test_open_bad_qparams_metadata(tmp_path: Path, store: Path) -> None:
    q = tmp_path / "q.zarr"
    _edit_json(q / "tables" / "a" / "qparams" / "zarr.json", lambda m: m.update(shape=[20, 3]))
    with pytest.raises(StoreFormatError, match="qparams"):
        open_store(q)
    shutil.rmtree(q / "tables" / "a" / "qparams")
    with pytest.raises(StoreFormatError, match="missing"):
        open_store(q)


def test_open_foreign_zarr_group(tmp_path: Path) -> None:
    path = tmp_path / "foreign.zarr"
    g = zarr.open_group(str(path), mode="w")
    g.create_array("tables/a/weight", shape=(10, 4), chunks=(5, 4), dtype="float32")
    g["tables/a/weight"][:] = 1.0
    g.attrs["other"] = {"format": "something"}
    with pytest.raises(StoreFormatError, match="not a tiermem store"):
        open_store(path)


def test_open_missing_table_folder(store: Path) -> None:
    shutil.rmtree(store / "tables" / "a")
    with pytest.raises(StoreFormatError, match=r"table 'a' is missing"):
        open_store(store)


def test_open_missing_or_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(StoreFormatError, match="does not exist"):
        open_store(tmp_path / "nope.zarr")
    f = tmp_path / "file.zarr"
    f.write_bytes(b"hello")
    with pytest.raises(StoreFormatError, match="not a folder"):
        open_store(f)
    e = tmp_path / "empty.zarr"
    e.mkdir()
    with pytest.raises(StoreFormatError, match="missing"):
        open_store(e)


def test_errors_are_store_errors() -> None:
    assert issubclass(StoreFormatError, StoreError)
    assert issubclass(StoreFormatError, ValueError)


# ---------------------------------------------------------------------------
# TableSpec


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a b", "x" * 129, "tab\tle",
                                  "a\\b", "é", None, 3,
                                  # a trailing newline must not slip through the name check
                                  "abc\n"])
def test_tablespec_bad_names(name) -> None:
    with pytest.raises(ConfigError, match="name"):
        TableSpec(name, 10, 4)


@pytest.mark.parametrize("name", ["a", "emb_l.0", "a-b", "_x", "0", "x" * 128, "A.b-c_9"])
def test_tablespec_good_names(name: str) -> None:
    assert TableSpec(name, 10, 4).name == name


@pytest.mark.parametrize("rows,dim,field", [(0, 4, "rows"), (-1, 4, "rows"), (1.5, 4, "rows"),
                                            (True, 4, "rows"), ("10", 4, "rows"), (10, 0, "dim"),
                                            (10, -1, "dim"), (10, 2.0, "dim"), (10, None, "dim")])
def test_tablespec_bad_sizes(rows, dim, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        TableSpec("t", rows, dim)


def test_tablespec_dtype_and_sizes() -> None:
    s = TableSpec("t", np.int64(10), 4, "INT8")
    assert s.rows == 10 and type(s.rows) is int and s.dtype is RowDtype.INT8
    assert s.row_bytes == 4 and s.nbytes == 10 * 4 + 10 * 8
    assert TableSpec("t", 10, 4, "float16").nbytes == 10 * 4 * 2
    assert TableSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="bfloat16"):
        TableSpec("t", 10, 4, "bfloat16")


# ---------------------------------------------------------------------------
# overwrite


def test_overwrite_false_raises(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    a = np.ones((3, 2), np.float32)
    create_store_from_arrays(path, {"a": a})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StoreError, match="already exists"):
        create_store_from_arrays(path, {"b": a})
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(path, [TableSpec("b", 3, 2)])
    # nothing left behind, old store intact
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert open_store(path).names == ["a"]
    # a plain file in the way counts too
    f = tmp_path / "f.zarr"
    f.write_text("x")
    with pytest.raises(StoreError, match="already exists"):
        create_store_from_arrays(f, {"a": a})


def test_overwrite_true_replaces(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    create_store_from_arrays(path, {"a": np.ones((3, 2), np.float32)}, chunk_rows=1)
    b = np.arange(8, dtype=np.float32).reshape(4, 2)
    info = create_store_from_arrays(path, {"b": b}, overwrite=True, dtype="float16")
    assert info.names == ["b"]
    assert not (path / "tables" / "a").exists()
    np.testing.assert_array_equal(_zarr_weight(path, "b"), b.astype(np.float16))
    # no temporary or old folders left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_overwrite_true_replaces_a_file(tmp_path: Path) -> None:
    path = tmp_path / "f.zarr"
    path.write_text("not a store")
    create_store_from_arrays(path, {"a": np.ones((2, 2), np.float32)}, overwrite=True)
    assert open_store(path).names == ["a"]
    # the replaced file is gone too: no '.f.zarr.old-*' left beside the store
    assert [p.name for p in tmp_path.iterdir()] == ["f.zarr"]


def test_overwrite_failure_keeps_old_store(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    old = np.arange(6, dtype=np.float32).reshape(3, 2)
    create_store_from_arrays(path, {"a": old})
    with pytest.raises(ConfigError, match="NaN"):
        create_store_from_arrays(path, {"a": np.full((3, 2), np.nan, np.float32)}, overwrite=True)
    with pytest.raises(StoreError, match="incomplete"):
        with create_store(path, [TableSpec("a", 3, 2)], overwrite=True) as w:
            w.write("a", old[:2])
    np.testing.assert_array_equal(_zarr_weight(path, "a"), old)
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


# ---------------------------------------------------------------------------
# writer errors


def _writer(tmp_path: Path, dtype: str = "float32") -> StoreWriter:
    return create_store(tmp_path / "w.zarr", [TableSpec("a", 10, 4, dtype),
                                              TableSpec("b", 5, 2, dtype)], chunk_rows=3)


def _no_leftovers(tmp_path: Path) -> None:
    assert not (tmp_path / "w.zarr").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".w.zarr")] == []


def test_writer_wrong_width(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    with pytest.raises(ConfigError, match=r"'a'.*\(n, 4\)"):
        w.write("a", np.zeros((2, 5), np.float32))
    with pytest.raises(ConfigError, match=r"\(n, 4\)"):
        w.write("a", np.zeros(4, np.float32))
    w.abort()
    _no_leftovers(tmp_path)


def test_writer_too_many_rows(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    w.write("a", np.zeros((7, 4), np.float32))
    with pytest.raises(ConfigError, match=r"'a'.*exceeds its 10 rows"):
        w.write("a", np.zeros((4, 4), np.float32))
    w.write("a", np.zeros((3, 4), np.float32))  # exactly full is fine
    with pytest.raises(ConfigError, match="exceeds"):
        w.write("a", np.zeros((1, 4), np.float32))
    w.abort()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_writer_rejects_non_finite(tmp_path: Path, dtype: str, bad: float) -> None:
    block = np.zeros((3, 4), np.float32)
    block[1, 2] = bad
    with pytest.raises(ConfigError, match="NaN or infinity"):
        with _writer(tmp_path, dtype) as w:
            w.write("a", block)
    _no_leftovers(tmp_path)


def test_writer_float16_overflow_is_rejected(tmp_path: Path) -> None:
    """A finite float32 beyond float16's range would be stored as inf: reject it, as the
    writer rejects infinities it is given."""
    block = np.zeros((10, 4), np.float32)
    block[3, 1] = 1e5  # > 65504, the largest float16
    with pytest.raises(ConfigError):
        with _writer(tmp_path, "float16") as w:
            w.write("a", block)
            w.write("b", np.zeros((5, 2), np.float32))
    _no_leftovers(tmp_path)


def test_writer_bad_input_types(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    with pytest.raises(ConfigError, match="numeric"):
        w.write("a", np.zeros((1, 4), bool))
    with pytest.raises(ConfigError, match="numeric"):
        w.write("a", np.full((1, 4), "x"))
    with pytest.raises(ConfigError, match="unknown table"):
        w.write("zz", np.zeros((1, 4), np.float32))
    with pytest.raises(ConfigError, match="qparams"):
        w.write("a", np.zeros((1, 4), np.int8), np.zeros((1, 2), np.float32))
    w.abort()
    wq = create_store(tmp_path / "q.zarr", [TableSpec("a", 4, 2, "int8")])
    with pytest.raises(ConfigError, match="qparams"):
        wq.write("a", np.zeros((2, 2), np.int8), np.zeros((3, 2), np.float32))
    with pytest.raises(ConfigError, match="qparams"):
        wq.write("a", np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
    wq.abort()
    assert list(tmp_path.iterdir()) == []


def test_from_arrays_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="2-D"):
        create_store_from_arrays(tmp_path / "s", {"a": np.ones(5, np.float32)})
    with pytest.raises(ConfigError, match="rows"):
        create_store_from_arrays(tmp_path / "s", {"a": np.ones((0, 3), np.float32)})
    with pytest.raises(ConfigError, match="dtype"):
        create_store_from_arrays(tmp_path / "s", {"a": np.ones((2, 3), np.float32)},
                                 dtype="float64")
    assert list(tmp_path.iterdir()) == []


def test_writer_bad_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one table"):
        create_store(tmp_path / "s", [])
    with pytest.raises(ConfigError, match="duplicate"):
        create_store(tmp_path / "s", [TableSpec("a", 1, 1), TableSpec("a", 2, 1)])
    with pytest.raises(ConfigError, match="chunk_rows"):
        create_store(tmp_path / "s", [TableSpec("a", 1, 1)], chunk_rows=0)
    assert list(tmp_path.iterdir()) == []


def test_commit_with_missing_rows_leaves_no_store(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    w.write("a", np.zeros((10, 4), np.float32))
    w.write("b", np.zeros((4, 2), np.float32))
    with pytest.raises(StoreError, match=r"b: 4 of 5 rows"):
        w.commit()
    _no_leftovers(tmp_path)
    with pytest.raises(StoreError, match="already"):
        w.write("b", np.zeros((1, 2), np.float32))
    with pytest.raises(StoreError, match="already"):
        w.commit()
    # a table never written at all
    with pytest.raises(StoreError, match="a: 0 of 10 rows"):
        with _writer(tmp_path) as w2:
            w2.write("b", np.zeros((5, 2), np.float32))
    _no_leftovers(tmp_path)


def test_exception_in_context_aborts(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with _writer(tmp_path) as w:
            w.write("a", np.zeros((10, 4), np.float32))
            raise RuntimeError("boom")
    _no_leftovers(tmp_path)


def test_commit_returns_validated_store(tmp_path: Path) -> None:
    w = _writer(tmp_path, "int8")
    w.write("a", np.ones((10, 4), np.float32))
    w.write("b", np.ones((5, 2), np.float32))
    info = w.commit()
    assert info.path == tmp_path / "w.zarr" and info.names == ["a", "b"]
    assert info.nbytes == 10 * 4 + 80 + 5 * 2 + 40
    with pytest.raises(StoreError, match="already"):
        w.write("a", np.ones((1, 4), np.float32))
    # only the store remains
    assert [p.name for p in tmp_path.iterdir()] == ["w.zarr"]


def test_store_info_table_lookup(tmp_path: Path) -> None:
    info = create_store_from_arrays(tmp_path / "s", {"a": np.ones((3, 2), np.float32)})
    with pytest.raises(KeyError, match="zz"):
        info.table("zz")
    w, _ = info.read_table("a", slice(1, 3))
    assert w.shape == (2, 2)


def test_open_is_fast_enough_for_many_chunks(tmp_path: Path) -> None:
    """Sanity: open validates a few hundred chunk files quickly."""
    create_store_from_arrays(tmp_path / "s", {"a": np.ones((500, 2), np.float32)}, chunk_rows=1)
    t = time.perf_counter()
    info = open_store(tmp_path / "s")
    assert info.table("a").n_chunks == 500
    assert time.perf_counter() - t < 5
    os.unlink(info.table("a").weight_chunk(499))
    with pytest.raises(StoreFormatError, match="c/499/0"):
        open_store(tmp_path / "s")


def test_chunk_replaced_by_a_folder_of_the_same_size(tmp_path: Path) -> None:
    """A folder whose st_size equals the chunk's byte size passes a size check alone."""
    probe = tmp_path / "probe"
    probe.mkdir()
    size = probe.stat().st_size  # 4096 on ext4, 40+ on tmpfs...
    if not size or size % 4:
        pytest.skip(f"folders here have st_size {size}, not a whole number of float32 rows")
    path = tmp_path / "s.zarr"
    rows = 3 * size // 4
    table = np.arange(rows, dtype=np.float32).reshape(rows, 1)
    create_store_from_arrays(path, {"a": table}, chunk_rows=size // 4)
    chunk = path / "tables" / "a" / "weight" / "c" / "1" / "0"
    chunk.unlink()
    chunk.mkdir()
    assert chunk.stat().st_size == size  # the case that fooled open_store
    with pytest.raises(StoreFormatError, match=r"c/1/0 is not a regular file \(a folder\)"):
        open_store(path)
    from tiermem.config import TierConfig
    from tiermem.tiers import open_tier

    info = open_store(path, check_chunks=False)
    with pytest.raises(StoreFormatError, match=r"c/1/0 is not a regular file"):
        open_tier(info, TierConfig(kind="dram"))
    with pytest.raises(StoreError, match=r"c/1/0: not a regular file"):
        open_tier(info, TierConfig(kind="ssd"))


def test_store_path_in_a_symlink_loop(tmp_path: Path) -> None:
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(StoreFormatError, match=r"a\.zarr cannot be opened: symlink loop"):
        open_store(a)
    with pytest.raises(StoreFormatError, match="does not exist"):
        open_store(tmp_path / "nope.zarr")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_written_through_temporaries_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """mkstemp/mkdtemp make 0600/0700 whatever the umask; what is renamed into place must not."""
    from runtime.checkpoint import save_dlrm_checkpoint
    from runtime.distributed.planner import make_plan
    from runtime.model import DLRMConfig, random_dense
    from tiermem.features import SparseFeatures
    from tiermem.format import TableSpec
    from traces.formats import write_trace
    from traces.replay import _save_npy_atomic, write_json_atomic

    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    old = os.umask(umask)
    try:
        cfg = DLRMConfig(num_dense=2, embedding_dim=2, num_tables=1, bottom_mlp=(2,),
                         top_mlp=(1,), interaction="dlrm")
        written = [
            save_dlrm_checkpoint(tmp_path / "model.pt", cfg, [np.ones((3, 2), np.float32)],
                                 random_dense(cfg)),
            make_plan([TableSpec("a", 10, 2)], 1, None, "load").save(tmp_path / "plan.json"),
            write_json_atomic(tmp_path / "replay.json", {"x": 1}),
            _save_npy_atomic(tmp_path / "preds.npy", np.zeros(3, np.float32)),
        ]
        trace = write_trace(tmp_path / "trace", [SparseFeatures.from_tables({"a": ([1], [0, 1])})])
    finally:
        os.umask(old)
    for p in written:
        assert oct(p.stat().st_mode & 0o777) == oct(file_mode), p
    assert oct(Path(trace).stat().st_mode & 0o777) == oct(dir_mode)
    for p in Path(trace).rglob("*"):
        want = dir_mode if p.is_dir() else file_mode
        assert oct(p.stat().st_mode & 0o777) == oct(want), p
