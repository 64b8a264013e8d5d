"""Trace formats: native round trips, Meta dlrm_datasets files, Criteo TSV, malformed input."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tiermem.errors import ConfigError, TierMemError
from tiermem.features import SparseFeatures
from traces.formats import (
    FORMATS,
    CriteoTrace,
    MetaTrace,
    NativeTrace,
    TraceBatch,
    TraceFormatError,
    TraceWriter,
    convert_trace,
    open_source,
    rebatch,
    sniff,
    trace_format,
    write_trace,
)
from traces.presets import TABLE_PRESETS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"real sample data not found at {DATA} (../shared absent)")


def _batch(rng, keys, b, rows, weights=False, dense=0, labels=False):
    lens = rng.integers(0, 4, len(keys) * b)
    vals = np.concatenate([rng.integers(0, rows[t], int(lens[t * b:(t + 1) * b].sum()))
                           for t in range(len(keys))])
    w = rng.random(vals.size).astype(np.float32) if weights else None
    sf = SparseFeatures.from_lengths(keys, vals, lens, w)
    return TraceBatch(rng.random((b, dense)).astype(np.float32) if dense else None, sf,
                      rng.integers(0, 2, b).astype(np.float32) if labels else None)


def _same(a: TraceBatch, b: TraceBatch) -> None:
    assert a.sparse.keys == b.sparse.keys
    np.testing.assert_array_equal(a.sparse.values, b.sparse.values)
    np.testing.assert_array_equal(a.sparse.offsets, b.sparse.offsets)
    for x, y in ((a.sparse.weights, b.sparse.weights), (a.dense, b.dense), (a.labels, b.labels)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


# -- native ----------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, {"weights": True, "dense": 3, "labels": True}])
def test_native_round_trip(tmp_path, opts):
    rng = np.random.default_rng(0)
    keys, rows = ("a", "b", "c"), (10, 100, 7)
    batches = [_batch(rng, keys, b, rows, **opts) for b in (5, 8, 1)]
    path = write_trace(tmp_path / "tr", batches, rows=rows, attrs={"note": "x"})
    tr = NativeTrace(path)
    assert tr.keys == keys and tr.rows == rows and len(tr) == 3
    assert tr.num_dense == opts.get("dense", 0) and tr.attrs == {"note": "x"}
    got = list(tr)
    for a, b in zip(batches, got, strict=True):
        _same(a, b)
    # re-batching keeps every sample in order
    rb = list(NativeTrace(path, batch_size=4))
    assert [x.batch_size for x in rb] == [4, 4, 4, 2]
    for x, y in zip(list(rebatch(batches, 14)), list(NativeTrace(path, batch_size=14)),
                    strict=True):
        _same(x, y)
    # table selection
    sel = list(NativeTrace(path, tables=["c", "a"]))
    np.testing.assert_array_equal(sel[0].sparse.table("c")[0], batches[0].sparse.table("c")[0])
    meta = json.loads((path / "trace.json").read_text())
    assert meta["num_samples"] == 14 and meta["batch_sizes"] == [5, 8, 1]


def test_native_rows_inferred_and_compressed(tmp_path):
    rng = np.random.default_rng(1)
    b = _batch(rng, ("x",), 50, (1000,))
    path = write_trace(tmp_path / "t", [b], compress=True)
    assert NativeTrace(path).rows == (int(b.sparse.values.max()) + 1,)


def test_native_atomic_and_overwrite(tmp_path):
    rng = np.random.default_rng(2)
    b = _batch(rng, ("x",), 4, (10,))
    with pytest.raises(RuntimeError), TraceWriter(tmp_path / "t", ("x",)) as w:
        w.append(b)
        raise RuntimeError("interrupted")
    assert not (tmp_path / "t").exists()
    assert list(tmp_path.iterdir()) == []  # temp folder removed
    write_trace(tmp_path / "t", [b])
    with pytest.raises(ConfigError, match="exists"):
        write_trace(tmp_path / "t", [b])
    write_trace(tmp_path / "t", [b, b], overwrite=True)
    assert len(NativeTrace(tmp_path / "t")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_native_declared_rows_checked(tmp_path):
    sf = SparseFeatures.from_tables({"x": ([1, 9], [0, 1, 2])})
    with pytest.raises(TraceFormatError, match="batch 0"):
        write_trace(tmp_path / "t", [sf], rows=[5])
    assert not (tmp_path / "t").exists()


def test_native_malformed(tmp_path):
    rng = np.random.default_rng(3)
    bs = [_batch(rng, ("x", "y"), 6, (10, 10)) for _ in range(3)]
    path = write_trace(tmp_path / "t", bs, rows=(10, 10))
    with pytest.raises(TraceFormatError, match="no trace.json"):
        NativeTrace(tmp_path)
    # truncated: a batch file is missing
    (path / "batches" / "000001.npz").unlink()
    with pytest.raises(TraceFormatError, match=r"batch 1\).*missing"):
        list(NativeTrace(path))
    tr = NativeTrace(path, on_error="skip")
    assert len(list(tr)) == 2 and tr.skipped == 1
    # inconsistent offsets
    np.savez(path / "batches" / "000001.npz", values=np.array([1, 2]),
             offsets=np.array([0, 2, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]))
    with pytest.raises(TraceFormatError, match="batch 1"):
        list(NativeTrace(path))
    # ids beyond the recorded table size
    np.savez(path / "batches" / "000001.npz", values=np.array([1, 12]),
             offsets=np.array([0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]))
    with pytest.raises(TraceFormatError, match=r"batch 1.*'y'"):
        list(NativeTrace(path))
    (path / "trace.json").write_text("{not json")
    with pytest.raises(TraceFormatError, match="metadata"):
        NativeTrace(path)


# -- Meta dlrm_datasets ----------------------------------------------------------------

def _write_meta(path: Path, tables: list[tuple[np.ndarray, np.ndarray]], *, gz=True,
                dtype=None, tamper=None):
    """Write (indices, offsets, lengths) like dlrm_datasets: table-major, offsets T*B+1."""
    import torch

    B = tables[0][1].size - 1
    idx = np.concatenate([t[0] for t in tables])
    lengths = np.stack([np.diff(t[1]) for t in tables])
    offsets = np.concatenate([[0], np.cumsum(lengths.ravel())])
    if tamper:
        idx, offsets, lengths = tamper(idx, offsets, lengths)
    assert lengths.shape == (len(tables), B)
    obj = (torch.from_numpy(np.asarray(idx, dtype or np.int64)), torch.from_numpy(offsets),
           torch.from_numpy(lengths))
    if gz:
        with gzip.open(path, "wb") as f:
            torch.save(obj, f)
    else:
        torch.save(obj, path)
    return path


def _toy_tables(rng, B, T=3):
    out = []
    for _ in range(T):
        lens = rng.integers(0, 5, B)
        out.append((rng.integers(0, 50, int(lens.sum())), np.concatenate([[0], np.cumsum(lens)])))
    return out


def test_meta_reader_layout_rebatch_select(tmp_path):
    rng = np.random.default_rng(4)
    f1 = _toy_tables(rng, 10)
    f2 = _toy_tables(rng, 7)
    p1 = _write_meta(tmp_path / "a.pt.gz", f1)
    p2 = _write_meta(tmp_path / "b.pt", f2, gz=False, dtype=np.int32)
    tr = MetaTrace([p1, p2])
    assert tr.keys == ("t0", "t1", "t2")
    got = list(tr)
    assert [x.batch_size for x in got] == [10, 7]
    for t in range(3):
        ids, off, _ = got[0].sparse.table(f"t{t}")
        np.testing.assert_array_equal(ids, f1[t][0])
        np.testing.assert_array_equal(off, f1[t][1])
    assert tr.rows == tuple(int(max(f1[t][0].max(), f2[t][0].max())) + 1 for t in range(3))
    # re-batching across the file boundary, with table selection and reordering
    sel = list(MetaTrace([p1, p2], tables=[2, 0], batch_size=4))
    assert [x.batch_size for x in sel] == [4, 4, 4, 4, 1]
    ids = np.concatenate([x.sparse.table("t2")[0] for x in sel])
    np.testing.assert_array_equal(ids, np.concatenate([f1[2][0], f2[2][0]]))
    assert sel[0].sparse.keys == ("t2", "t0")


def test_meta_out_of_range_ids(tmp_path):
    rng = np.random.default_rng(5)
    f = _toy_tables(rng, 8, T=2)
    f[1][0][:] = np.minimum(f[1][0], 9)
    s = int(np.searchsorted(f[1][1], 0, side="right")) - 1  # bag holding id position 0
    f[1][0][0] = 99
    p = _write_meta(tmp_path / "x.pt.gz", f)
    with pytest.raises(TraceFormatError, match=rf"x.pt.gz: table 1 sample {s}: id 99"):
        list(MetaTrace(p, rows=[50, 10]))
    tr = MetaTrace(p, rows=[50, 10], on_error="skip")
    got = list(tr)
    assert tr.skipped == 1 and got[0].batch_size == 7
    assert 99 not in got[0].sparse.values[got[0].sparse.table_range(1)[0]:]


def test_meta_malformed(tmp_path):
    rng = np.random.default_rng(6)
    f = _toy_tables(rng, 6)

    def bad_offsets(i, o, n):
        o = o.copy()
        o[4] += 1
        return i, o, n

    p = _write_meta(tmp_path / "bad.pt.gz", f, tamper=bad_offsets)
    with pytest.raises(TraceFormatError, match=r"bad.pt.gz: table 0 bag 3"):
        list(MetaTrace(p))
    tr = MetaTrace([p, _write_meta(tmp_path / "ok.pt.gz", f)], on_error="skip")
    assert len(list(tr)) == 1 and tr.skipped == 1
    p = _write_meta(tmp_path / "short.pt.gz", f, tamper=lambda i, o, n: (i, o[:-1], n))
    with pytest.raises(TraceFormatError, match="T\\*B\\+1"):
        list(MetaTrace(p))
    good = (tmp_path / "ok.pt.gz").read_bytes()
    (tmp_path / "trunc.pt.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(TraceFormatError, match="trunc.pt.gz"):
        list(MetaTrace(tmp_path / "trunc.pt.gz"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(TraceFormatError, match="junk.pt"):
        MetaTrace(tmp_path / "junk.pt")
    with pytest.raises(TraceFormatError, match="no such file"):
        MetaTrace(tmp_path / "missing.pt.gz")


@needs_data
def test_meta_real_slice(tmp_path):
    z = np.load(DATA / "meta_dlrm_datasets" / "t856_bs65536_0_table0_head.npz")
    idx, off = z["indices_complete"], z["bag_offsets_complete"]
    np.testing.assert_array_equal(np.diff(z["offsets_head"]), z["lengths_head"])
    B = off.size - 1  # 35 complete bags of table 0
    rng = np.random.default_rng(7)
    t1 = rng.integers(0, 1000, 3 * B)
    tables = [(idx, off), (t1, np.arange(0, 3 * B + 1, 3))]
    p = _write_meta(tmp_path / "fbgemm_t2_bs35.pt.gz", tables)
    tr = MetaTrace(p, rows=[8_006_748, 1000], batch_size=16)
    got = list(tr)
    assert [x.batch_size for x in got] == [16, 16, 3]
    ids = np.concatenate([x.sparse.table("t0")[0] for x in got])
    np.testing.assert_array_equal(ids, idx)
    lens = np.concatenate([np.diff(x.sparse.table("t0")[1]) for x in got])
    np.testing.assert_array_equal(lens, z["lengths_head"][:B])
    assert ids.max() == 8_006_747
    with pytest.raises(TraceFormatError, match="table 0"):
        list(MetaTrace(p, rows=[8_000_000, 1000]))
    out = convert_trace(MetaTrace(p, tables=[0]), tmp_path / "native")
    assert NativeTrace(out).rows == (8_006_748,)


# -- Criteo TSV ------------------------------------------------------------------------

KROWS = TABLE_PRESETS["criteo_kaggle"]


def _line(label, ints, cats):
    f = ([] if label is None else [str(label)]) + [("" if v is None else str(v)) for v in ints] \
        + [("" if c is None else c) for c in cats]
    return "\t".join(f)


def _ref(line, labelled, rows=KROWS, missing=0):
    f = line.rstrip("\n").split("\t")
    lab = float(f[0]) if labelled else None
    f = f[1:] if labelled else f
    dense = [math.log1p(max(int(x), 0)) if x else 0.0 for x in f[:13]]
    ids = [int(c, 16) % rows[t] if c else missing for t, c in enumerate(f[13:])]
    return lab, dense, ids


def _check_against_ref(batches, lines, labelled):
    refs = [_ref(x, labelled) for x in lines]
    dense = np.concatenate([b.dense for b in batches])
    np.testing.assert_allclose(dense, np.array([r[1] for r in refs]), rtol=1e-6)
    ids = np.concatenate([b.sparse.values.reshape(26, -1).T for b in batches])
    np.testing.assert_array_equal(ids, np.array([r[2] for r in refs]))
    if labelled:
        np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]),
                                      [r[0] for r in refs])
    else:
        assert all(b.labels is None for b in batches)


def test_criteo_hand_built(tmp_path):
    rng = np.random.default_rng(8)
    lines = []
    for i in range(23):
        ints = [None if rng.random() < 0.2 else int(rng.integers(-3, 10**6)) for _ in range(13)]
        cats = [None if rng.random() < 0.2 else f"{int(rng.integers(0, 2**32)):08x}"
                for _ in range(26)]
        lines.append(_line(i % 2, ints, cats))
    lines[3] = lines[3].upper().replace("\t", "\t")  # upper-case hex is valid too
    p = tmp_path / "train.txt"
    p.write_text("\n".join(lines) + "\n")
    tr = CriteoTrace(p, batch_size=5, chunk_bytes=300)  # tiny chunks: lines cross chunks
    got = list(tr)
    assert [b.batch_size for b in got] == [5, 5, 5, 5, 3]
    assert tr.has_labels and tr.rows == KROWS and tr.keys[0] == "C1"
    _check_against_ref(got, lines, True)
    # no trailing newline, gzip, CRLF
    g = tmp_path / "train.txt.gz"
    with gzip.open(g, "wt") as f:
        f.write("\r\n".join(lines))
    _check_against_ref(list(CriteoTrace(g, batch_size=100)), lines, True)
    # unlabelled (Kaggle test layout) detected from the field count; table selection
    q = tmp_path / "test.txt"
    q.write_text("\n".join(x.split("\t", 1)[1] for x in lines) + "\n")
    t2 = CriteoTrace(q, batch_size=50, tables=[2, 0])
    b = next(iter(t2))
    assert not t2.has_labels and b.labels is None and b.sparse.keys == ("C3", "C1")
    np.testing.assert_array_equal(b.sparse.table("C3")[0],
                                  [_ref(x, True)[2][2] for x in lines])


def test_criteo_malformed(tmp_path):
    good = _line(1, range(13), [f"{i:08x}" for i in range(26)])
    cases = {
        "fields": (good + "\t", r"line 2: 41 tab-separated fields, expected 40"),
        "hex": (good.replace("00000005", "0000zz05"),
                r"line 2: field C6 = '0000zz05' is not a valid hex"),
        "int": (good.replace("\t7\t", "\t7x\t"), r"line 2: field I8 = '7x' is not a valid integer"),
        "label": ("\t".join([""] + good.split("\t")[1:]), r"line 2: field label"),
    }
    for name, (bad, msg) in cases.items():
        p = tmp_path / f"{name}.tsv"
        p.write_text("\n".join([good, bad, good]) + "\n")
        with pytest.raises(TraceFormatError, match=msg) as e:
            list(CriteoTrace(p))
        assert str(p) in str(e.value)
        tr = CriteoTrace(p, on_error="skip")
        assert sum(b.batch_size for b in tr) == 2 and tr.skipped == 1
    # truncated last line
    p = tmp_path / "trunc.tsv"
    p.write_text(good + "\n" + good[:50])
    with pytest.raises(TraceFormatError, match=r"line 2: .*truncated file"):
        list(CriteoTrace(p))
    p.write_text("a\tb\n")
    with pytest.raises(TraceFormatError, match="line 1: 2 tab-separated fields"):
        CriteoTrace(p)
    with pytest.raises(ConfigError):
        CriteoTrace(tmp_path / "fields.tsv", rows=[10] * 25)
    with pytest.raises(ConfigError):
        CriteoTrace(tmp_path / "fields.tsv", rows="nonsense")
    assert issubclass(TraceFormatError, TierMemError)


@needs_data
@pytest.mark.parametrize("name,labelled,n,rows", [
    ("criteo_kaggle_sample/criteo_kaggle_train_sample.tsv", True, 6435, "criteo_kaggle"),
    ("criteo_kaggle_sample/criteo_kaggle_test_sample.tsv", False, 1999, "criteo_kaggle"),
    ("criteo_terabyte_day0_sample/criteo_tb_day0_sample_8324.tsv", True, 8324, "dlrmv2"),
])
def test_criteo_real_samples(name, labelled, n, rows):
    path = DATA / name
    tr = CriteoTrace(path, rows=rows, batch_size=2048)
    got = list(tr)
    assert tr.has_labels == labelled and sum(b.batch_size for b in got) == n
    for b in got:
        b.sparse.validate_ids(tr.rows)
    lines = path.read_text().splitlines()
    r = TABLE_PRESETS[rows]
    refs = [_ref(x, labelled, r) for x in lines[:300]]
    np.testing.assert_array_equal(got[0].sparse.values.reshape(26, -1).T[:300],
                                  [x[2] for x in refs])
    np.testing.assert_allclose(got[0].dense[:300], [x[1] for x in refs], rtol=1e-6)
    if labelled and "kaggle" in name:
        assert np.concatenate([b.labels for b in got]).mean() == pytest.approx(0.234, abs=0.005)


@needs_data
def test_criteo_convert_round_trip(tmp_path):
    path = DATA / "criteo_kaggle_sample" / "criteo_kaggle_train_sample.tsv"
    src = CriteoTrace(path, batch_size=1000, max_samples=2500)
    out = convert_trace(src, tmp_path / "k")
    nt = NativeTrace(out)
    assert nt.rows == KROWS and nt.num_dense == 13 and nt.has_labels
    for a, b in zip(CriteoTrace(path, batch_size=1000, max_samples=2500), nt, strict=True):
        _same(a, b)


# -- the registry: sniff and open_source -----------------------------------------------

def test_sniff_and_open_source_every_format(tmp_path):
    rng = np.random.default_rng(11)
    native = write_trace(tmp_path / "tr", [_batch(rng, ("a", "b"), 6, (10, 20))
                                           for _ in range(3)])
    meta = _write_meta(tmp_path / "fbgemm_t3_bs9.pt.gz", _toy_tables(rng, 9))
    tsv = tmp_path / "day.tsv"
    tsv.write_text(_line(1, list(range(13)), [f"{i:x}" for i in range(26)]) + "\n")
    assert [sniff(p) for p in (native, meta, tsv)] == ["native", "meta", "criteo"]
    assert list(FORMATS) == ["native", "meta", "criteo"]
    # one set of options (text as the CLI has it) for every format: None and what a
    # format does not take are left out
    common = {"batch_size": None, "tables": None, "rows": None, "on_error": "raise",
              "labelled": None, "missing_id": 0, "max_samples": None}
    nt = open_source(native, **{**common, "tables": "b", "batch_size": 9})
    assert isinstance(nt, NativeTrace) and nt.keys == ("b",)
    assert [x.batch_size for x in nt] == [9, 9]
    mt = open_source([meta], **{**common, "tables": "2,0", "rows": "60,60"})
    assert isinstance(mt, MetaTrace) and mt.keys == ("t2", "t0") and mt.rows == (60, 60)
    ct = open_source(tsv, **{**common, "tables": "1"})
    assert isinstance(ct, CriteoTrace) and ct.batch_size == 2048 and ct.keys == ("C2",)
    assert ct.rows == (KROWS[1],) and next(iter(ct)).sparse.values.tolist() == [1]
    # the format named overrides the sniffing
    assert isinstance(open_source(tsv, "criteo", rows="criteo_terabyte"), CriteoTrace)
    with pytest.raises(TraceFormatError, match="no trace.json"):
        open_source(tmp_path, "native")
    with pytest.raises(ConfigError, match="one directory"):
        open_source([native, native])
    with pytest.raises(ConfigError, match="unknown trace format 'parquet'"):
        open_source(tsv, "parquet")
    assert trace_format("criteo").options >= {"labelled", "missing_id", "max_samples"}
    assert "labelled" not in trace_format("native").options
    with pytest.raises(ConfigError, match=r"unknown trace option\(s\) \['tabels'\]"):
        open_source(tsv, tabels="1")
    with pytest.raises(ConfigError, match="comma-separated integers"):
        open_source(meta, tables="a,b")
    with pytest.raises(TraceFormatError, match="no such file"):
        sniff(tmp_path / "nope.tsv")
    with pytest.raises(ConfigError, match="no input files"):
        sniff([])


def test_format_names_cost_no_numpy(python, subprocess_env, repo_root):
    """The CLI lists the registry's names in --from without loading a reader."""
    import subprocess

    code = ("import sys; from traces.formats import FORMATS; print(list(FORMATS)); "
            "print(sorted(m for m in ('numpy', 'numba', 'torch') if m in sys.modules))")
    p = subprocess.run([python, "-c", code], cwd=repo_root, env=subprocess_env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["['native', 'meta', 'criteo']", "[]"]
