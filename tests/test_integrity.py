"""Block checksums (tiermem/integrity.py) and hardened store opening.

Real stores on disk, real bits flipped in chunk files. References: a plain
Python implementation of the tmh64 block hash, the source arrays, and the
files' own bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.config import TierConfig
from tiermem.errors import ConfigError, CorruptBlockError, StoreFormatError
from tiermem.format import TableSpec, create_store, create_store_from_arrays, open_store
from tiermem.integrity import BLOCK_BYTES, chunk_sums
from tiermem.tiers import CxlTier, DramTier, SsdTier

TIERS = {"dram": DramTier, "ssd": SsdTier, "cxl": CxlTier}
M64 = (1 << 64) - 1
P1, P2, P3, P4 = (0xC2B2AE3D27D4EB4F, 0x9E3779B97F4A7C15, 0xFF51AFD7ED558CCD,
                  0xC4CEB9FE1A85EC53)


def _ref_hash(data: bytes) -> int:
    """tmh64 in plain Python integers (the documented algorithm, not the kernel)."""
    def rnd(acc: int, w: int) -> int:
        x = ((acc ^ w) * P1) & M64
        return ((x << 31) | (x >> 33)) & M64

    words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data) // 8 * 8, 8)]
    acc = [((k + 1) * P2) & M64 for k in range(8)]
    full = len(words) // 8 * 8
    for j in range(0, full, 8):
        acc = [rnd(acc[k], words[j + k]) for k in range(8)]
    h = (len(data) * P2) & M64
    for a in acc:
        h = ((h ^ a) * P2) & M64
    for w in words[full:]:
        h = rnd(h, w)
    if len(data) % 8:
        h = rnd(h, int.from_bytes(data[len(words) * 8:], "little"))
    for p in (P3, P4):
        h ^= h >> 33
        h = (h * p) & M64
    return h ^ (h >> 33)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=3 * BLOCK_BYTES + 100))
def test_block_sums_match_reference(data: bytes) -> None:
    got = chunk_sums(np.frombuffer(data, np.uint8))
    blocks = [data[i:i + BLOCK_BYTES] for i in range(0, len(data), BLOCK_BYTES)]
    if blocks:
        assert got.tolist() == [_ref_hash(b) for b in blocks]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 * BLOCK_BYTES - 1), st.integers(0, 7), st.integers(1, 2 * BLOCK_BYTES))
def test_any_bit_flip_changes_its_block_sum(pos: int, bit: int, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    pos %= size
    flipped = data.copy()
    flipped[pos] ^= 1 << bit
    a, b = chunk_sums(data), chunk_sums(flipped)
    k = pos // BLOCK_BYTES
    assert a[k] != b[k]
    assert np.array_equal(np.delete(a, k), np.delete(b, k))


def _store(tmp: Path, dtype: str = "float32") -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    tabs = {"a": rng.standard_normal((3000, 13)).astype(np.float32),  # 52-byte rows
            "b": rng.standard_normal((500, 32)).astype(np.float32)}
    path = tmp / "s.zarr"
    create_store_from_arrays(path, tabs, chunk_rows=1000, dtype=dtype)
    return path, tabs


def _flip(path: Path, byte: int, bit: int = 6) -> None:
    with open(path, "r+b") as f:
        f.seek(byte)
        b = f.read(1)[0]
        f.seek(byte)
        f.write(bytes([b ^ (1 << bit)]))


@pytest.mark.parametrize("tier", sorted(TIERS))
@pytest.mark.parametrize("row", [0, 1500, 2999])  # first block, mid file, the last short block
def test_flipped_bit_refused_by_every_tier(tmp_path: Path, tier: str, row: int) -> None:
    path, tabs = _store(tmp_path)
    info = open_store(path)
    t = info.table("a")
    chunk, local = divmod(row, t.chunk_rows)
    _flip(t.weight_chunk(chunk), local * 52 + 3)  # an exponent bit of the row's first value
    # the flip is real: without checks the row is served wrong
    with SsdTier(info, TierConfig(kind="ssd", verify=False)) as raw:
        w = np.empty((1, 13), np.float32)
        raw.read_rows("a", np.array([row]), w)
        assert not np.array_equal(w[0], tabs["a"][row])
    with pytest.raises(CorruptBlockError) as ei:
        tr = TIERS[tier](info, TierConfig(kind=tier))
        try:
            w = np.empty((2, 13), np.float32)
            tr.read_rows("a", np.array([row, (row + 7) % 3000]), w)
        finally:
            tr.close()
    msg = str(ei.value)
    first, last = ei.value.bad_blocks[0].rows
    assert "'a'" in msg and str(t.weight_chunk(chunk)) in msg and first <= row <= last
    assert f"rows {first}-{last}" in msg


def _as_version_2(path: Path) -> None:
    """Rewrite a store the way tiermem 2 wrote it: block checksums only, no row checksums."""
    g = json.loads((path / "zarr.json").read_text())
    g["attributes"]["tiermem"]["version"] = 2
    (path / "zarr.json").write_text(json.dumps(g))
    for d in path.glob("tables/*/*_rowsums"):
        shutil.rmtree(d)


def test_ssd_checks_only_the_rows_it_reads(tmp_path: Path) -> None:
    path, tabs = _store(tmp_path)
    info = open_store(path)
    assert info.version == 3 and all(t.row_checked for t in info.tables)
    _flip(info.table("a").weight_chunk(1), 10 * BLOCK_BYTES + 5)  # byte 41 of row 1787
    with SsdTier(info, TierConfig(kind="ssd", io_threads=2)) as ssd:
        assert ssd.row_sums_nbytes == 4 * (3000 + 1000)  # 4 B per row (whole chunks)
        ok = np.array([0, 999, 1000, 1700, 1786, 1788, 1800, 1900, 2999])  # 1786/88/1800 share
        w = np.empty((ok.size, 13), np.float32)                          # the bad row's block
        ssd.read_rows("a", ok, w)
        np.testing.assert_array_equal(w, tabs["a"][ok])
        with pytest.raises(CorruptBlockError, match="'a' weights: rows 1787-1787 of .*c/1/0"):
            ssd.read_rows("a", np.array([1786, 1787, 1788]), np.empty((3, 13), np.float32))


def test_version_2_store_ssd_checks_whole_blocks(tmp_path: Path) -> None:
    path, tabs = _store(tmp_path)
    _as_version_2(path)
    info = open_store(path)
    assert info.version == 2 and info.verified and not info.table("a").row_checked
    _flip(info.table("a").weight_chunk(1), 10 * BLOCK_BYTES + 5)
    with SsdTier(info, TierConfig(kind="ssd", io_threads=2)) as ssd:
        assert ssd.row_sums_nbytes == 0
        ok = np.array([0, 999, 1000, 1700, 1900, 2999])
        w = np.empty((ok.size, 13), np.float32)
        ssd.read_rows("a", ok, w)
        np.testing.assert_array_equal(w, tabs["a"][ok])
        with pytest.raises(CorruptBlockError, match="block 10 "):  # 1800 shares 1787's block
            ssd.read_rows("a", np.array([1800]), np.empty((1, 13), np.float32))
    with pytest.raises(CorruptBlockError, match="block 10 "):
        DramTier(info)
    assert _tiermem("verify", str(path)).returncode == 1


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([("float32", 13), ("float32", 32), ("float16", 7), ("int8", 24),
                        ("int8", 5)]), st.integers(0, 1199), st.integers(0, 10**6),
       st.integers(0, 7), st.booleans())
def test_flip_in_a_row_read_alone_is_caught(tmp_path_factory: pytest.TempPathFactory,
                                            kind: tuple[str, int], row: int, byte: int,
                                            bit: int, in_qparams: bool) -> None:
    """Any bit of any row (or its qparams), read row-sized by the SSD tier, is refused,
    and its neighbours in the same block are served exactly."""
    dtype, dim = kind
    tmp = tmp_path_factory.mktemp("row")
    src = np.random.default_rng(row).standard_normal((1200, dim)).astype(np.float32)
    create_store_from_arrays(tmp / "s.zarr", {"t": src}, chunk_rows=500, dtype=dtype)
    info = open_store(tmp / "s.zarr")
    t = info.table("t")
    quant = dtype == "int8"
    in_qparams = in_qparams and quant
    rb = 8 if in_qparams else t.spec.row_bytes
    chunk, local = divmod(row, t.chunk_rows)
    f = t.qparams_chunk(chunk) if in_qparams else t.weight_chunk(chunk)
    with SsdTier(info, TierConfig(kind="ssd", verify=False)) as raw:  # the reference: no checks
        ref_w = np.empty((1200, dim), t.spec.dtype.numpy)
        ref_q = np.empty((1200, 2), np.float32) if quant else None
        raw.read_rows("t", np.arange(1200), ref_w, ref_q)
    _flip(f, local * rb + byte % rb, bit)
    near = np.array([r for r in (row - 1, row + 1) if 0 <= r < 1200])
    with SsdTier(info, TierConfig(kind="ssd")) as ssd:
        w = np.empty((near.size, dim), t.spec.dtype.numpy)
        q = np.empty((near.size, 2), np.float32) if quant else None
        ssd.read_rows("t", near, w, q)
        np.testing.assert_array_equal(w, ref_w[near])
        if quant:
            np.testing.assert_array_equal(q, ref_q[near])
        what = "qparams" if in_qparams else "weights"
        with pytest.raises(CorruptBlockError, match=f"'t' {what}: rows {row}-{row} of "):
            ssd.read_rows("t", np.array([row]), np.empty((1, dim), t.spec.dtype.numpy),
                          np.empty((1, 2), np.float32) if quant else None)


@pytest.mark.parametrize("what", ["weight", "qparams"])
def test_flip_in_the_row_checksums_refused_and_named(tmp_path: Path, what: str) -> None:
    path, tabs = _store(tmp_path, "int8")
    info = open_store(path)
    p = path / "tables" / "a" / f"{what}_rowsums" / "c" / "2" / "0"
    _flip(p, 4 * 345 + 1)
    name = "weights" if what == "weight" else "qparams"
    with pytest.raises(CorruptBlockError, match=rf"table 'a' {name}: the row checksums of rows "
                                                rf"2000-2999 \({p}\) fail"):
        SsdTier(info, TierConfig(kind="ssd"))
    with SsdTier(info, TierConfig(kind="ssd", verify=False)):
        pass  # without checks it opens (the data itself is intact)
    with DramTier(info) as d:  # the DRAM tier checks blocks, which are intact
        np.testing.assert_array_equal(d.table_rows("b")[0], open_store(path).read_table("b")[0])
    bad = _tiermem("verify", "--json", str(path))
    assert bad.returncode == 1
    got = json.loads(bad.stdout)["bad_blocks"]
    assert [(b["table"], b["array"], b["chunk"]) for b in got] == [("a", f"{name} row sums", 2)]


def test_dram_load_hashes_while_reading_catches_every_piece(tmp_path: Path) -> None:
    """A table of several load pieces: a flip in the last piece of a chunk, and one at a
    piece boundary, are both named (the hashing threads' results are all collected)."""
    from tiermem.integrity import LOAD_PIECE

    src = np.random.default_rng(3).standard_normal((60_000, 32)).astype(np.float32)
    create_store_from_arrays(tmp_path / "s.zarr", {"t": src}, chunk_rows=25_000)
    info = open_store(tmp_path / "s.zarr")
    with DramTier(info) as d:
        np.testing.assert_array_equal(d.table_rows("t")[0], src)
    t = info.table("t")
    assert 25_000 * 128 > 3 * LOAD_PIECE
    _flip(t.weight_chunk(1), 3 * LOAD_PIECE)  # first byte of chunk 1's fourth piece
    _flip(t.weight_chunk(2), 10_000 * 128 - 1)  # last byte of the last chunk's rows
    with pytest.raises(CorruptBlockError, match=r"and 1 more") as ei:
        DramTier(info)
    assert [(b.chunk, b.block) for b in ei.value.bad_blocks] == [
        (1, 3 * LOAD_PIECE // BLOCK_BYTES), (2, (10_000 * 128 - 1) // BLOCK_BYTES)]


def test_int8_qparams_are_checked(tmp_path: Path) -> None:
    path, _ = _store(tmp_path, "int8")
    info = open_store(path)
    _flip(info.table("b").qparams_chunk(0), 8 * 100 + 3)
    for tier in ("dram", "ssd"):
        with pytest.raises(CorruptBlockError, match="'b' qparams"):
            tr = TIERS[tier](info, TierConfig(kind=tier))
            try:
                tr.read_rows("b", np.array([100]), np.empty((1, 32), np.int8),
                             np.empty((1, 2), np.float32))
            finally:
                tr.close()


def test_truncated_and_regrown_chunk_refused(tmp_path: Path) -> None:
    path, _ = _store(tmp_path)
    info = open_store(path)
    p = info.table("a").weight_chunk(0)
    size = p.stat().st_size
    with open(p, "r+b") as f:  # half cut, then zero-filled back to its size: opens fine
        f.truncate(size // 2)
        f.truncate(size)
    info = open_store(path)
    with SsdTier(info, TierConfig(kind="ssd")) as ssd, pytest.raises(CorruptBlockError):
        ssd.read_rows("a", np.array([900]), np.empty((1, 13), np.float32))
    with pytest.raises(CorruptBlockError):
        DramTier(info)


def _tiermem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])


def test_verify_cli_names_every_bad_block(tmp_path: Path) -> None:
    path, _ = _store(tmp_path, "int8")
    ok = _tiermem("verify", str(path))
    assert ok.returncode == 0 and "all blocks match" in ok.stdout
    info = open_store(path)
    _flip(info.table("a").weight_chunk(2), 5)
    _flip(info.table("a").weight_chunk(2), 2 * BLOCK_BYTES + 1)
    _flip(info.table("b").qparams_chunk(0), 17)
    bad = _tiermem("verify", "--json", str(path))
    assert bad.returncode == 1
    got = {(b["table"], b["array"], b["chunk"], b["block"]) for b in
           json.loads(bad.stdout)["bad_blocks"]}
    assert got == {("a", "weights", 2, 0), ("a", "weights", 2, 2), ("b", "qparams", 0, 0)}
    text = _tiermem("verify", str(path))
    assert text.returncode == 1 and text.stdout.count("bad block:") == 3
    assert "\r" not in text.stderr  # no progress bar into a pipe


def _as_version_1(path: Path) -> None:
    """Rewrite a store the way tiermem 1 wrote it: no checksum arrays, version 1."""
    g = json.loads((path / "zarr.json").read_text())
    meta = g["attributes"]["tiermem"]
    meta["version"] = 1
    del meta["checksum"]
    (path / "zarr.json").write_text(json.dumps(g))
    for d in path.glob("tables/*/*_sums"):
        shutil.rmtree(d)


def test_version_1_store_opens_unverified_and_nonfinite_rows_refused(tmp_path: Path) -> None:
    path, tabs = _store(tmp_path)
    _as_version_1(path)
    info = open_store(path)
    assert not info.verified and info.version == 1
    out = _tiermem("info", str(path))
    assert out.returncode == 0 and "unverified" in out.stdout
    assert json.loads(_tiermem("info", "--json", str(path)).stdout)["checksums"] == "unverified"
    with DramTier(info) as d:  # served as before
        np.testing.assert_array_equal(d.table_rows("b")[0], tabs["b"])
    p = info.table("b").weight_chunk(0)
    with open(p, "r+b") as f:  # row 321 becomes NaN
        f.seek(321 * 128 + 8)
        f.write(np.float32(np.nan).tobytes())
    with pytest.raises(CorruptBlockError, match="table 'b': row 321 holds NaN"):
        DramTier(info)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rows_refused_at_creation(tmp_path: Path, bad: float) -> None:
    a = np.zeros((100, 4), np.float32)
    a[77, 2] = bad
    with pytest.raises(ConfigError, match="table 'x': row 77 holds NaN or infinity"):
        create_store_from_arrays(tmp_path / "s.zarr", {"x": a}, block_rows=30)
    assert not (tmp_path / "s.zarr").exists()
    assert not list(tmp_path.iterdir())  # the temporary folder is gone too


def test_plain_zarr_reads_data_and_sums(tmp_path: Path) -> None:
    import zarr

    path, tabs = _store(tmp_path)
    g = zarr.open(str(path), mode="r")
    np.testing.assert_array_equal(g["tables/a/weight"][:], tabs["a"])
    sums = g["tables/a/weight_sums"][:]
    raw = open_store(path).table("a").weight_chunk(1).read_bytes()
    assert sums.shape == (3, -(-1000 * 52 // BLOCK_BYTES))
    np.testing.assert_array_equal(sums[1], [_ref_hash(raw[i:i + BLOCK_BYTES])
                                            for i in range(0, len(raw), BLOCK_BYTES)])


def test_interrupted_create_leaves_hidden_temp_cleaned_next_time(tmp_path: Path) -> None:
    target = tmp_path / "s.zarr"
    code = textwrap.dedent(f"""
        import os, numpy as np
        from tiermem.format import create_store, TableSpec
        w = create_store({str(target)!r}, [TableSpec("t", 1000, 8)], chunk_rows=100)
        w.write("t", np.ones((500, 8), np.float32))
        os._exit(3)  # killed mid-write
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       timeout=60)
    assert p.returncode == 3
    left = [e.name for e in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".s.zarr.tmp-"), left
    live = tmp_path / f".s.zarr.tmp-{os.getpid()}-0123abcd"  # a writer still running: kept
    live.mkdir()
    with create_store(target, [TableSpec("t", 10, 2)]) as w:
        w.write("t", np.zeros((10, 2), np.float32))
    assert sorted(e.name for e in tmp_path.iterdir()) == sorted(["s.zarr", live.name])


def _claim_rows(path: Path, table: str, rows: int) -> None:
    g = json.loads((path / "zarr.json").read_text())
    for t in g["attributes"]["tiermem"]["tables"]:
        if t["name"] == table:
            t["rows"] = rows
            t["chunk_rows"] = rows
    (path / "zarr.json").write_text(json.dumps(g))
    for arr in ("weight", "weight_sums"):
        m = json.loads((path / "tables" / table / arr / "zarr.json").read_text())
        m["shape"][0] = rows if arr == "weight" else 1
        if arr == "weight":
            m["chunk_grid"]["configuration"]["chunk_shape"][0] = rows
        (path / "tables" / table / arr / "zarr.json").write_text(json.dumps(m))


def test_absurd_declared_size_refused_in_one_line(tmp_path: Path) -> None:
    path, _ = _store(tmp_path)
    _claim_rows(path, "b", 10**11)
    with pytest.raises(StoreFormatError, match="declares 100,000,000,000 rows.*file system"):
        open_store(path)
    for verb in ("info", "verify"):
        out = _tiermem(verb, str(path))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "declares" in out.stderr


def test_chunk_symlinked_outside_refused(tmp_path: Path) -> None:
    path, _ = _store(tmp_path)
    info = open_store(path)
    p = info.table("a").weight_chunk(1)
    outside = tmp_path / "elsewhere.bin"
    shutil.copy(p, outside)
    p.unlink()
    p.symlink_to(outside)
    with pytest.raises(StoreFormatError, match=r"c/1/0 resolves outside the store"):
        open_store(path)
    p.unlink()
    shutil.copy(outside, p)
    inner = path / "tables" / "b"  # a table folder linked outside
    shutil.move(inner, tmp_path / "b_out")
    inner.symlink_to(tmp_path / "b_out")
    with pytest.raises(StoreFormatError, match="resolves outside the store"):
        open_store(path)


def test_interrupted_trace_write_leaves_hidden_temp_cleaned_next_time(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os
        from traces.formats import TraceWriter
        w = TraceWriter({str(tmp_path / "tr")!r}, ("x",))
        os._exit(3)  # killed mid-write
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       timeout=60)
    assert p.returncode == 3
    left = [e.name for e in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".tr.tmp-"), left
    from traces.formats import TraceWriter

    with TraceWriter(tmp_path / "tr", ("x",)):
        assert len(list(tmp_path.iterdir())) == 1  # the dead writer's folder is gone
