"""The ``tiermem`` command, run as subprocesses (the installed entry point, or
``python -m runtime.cli``).

Predictions are compared with the plain-torch DLRM of tests/naive.py; stores with a
plain ``zarr.open``. Independent subprocesses run a few at a time, and the extra help /
error cases go through ``runtime.cli.main`` in-process (the entry point's own function),
since every subprocess that runs a model pays a ~2-3 s torch + numba import
(``--help``/``info`` do not: tests/test_cli_startup.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from runtime.batchfile import save_batch
from runtime.checkpoint import save_dlrm_checkpoint, save_torchrec_checkpoint
from runtime.cli import main as cli_main
from runtime.model import DLRMConfig, random_dense
from tiermem.features import SparseFeatures

try:
    from tests.naive import reference_dlrm_forward
except ImportError:  # tests/ on sys.path instead of the repo root
    from naive import reference_dlrm_forward  # type: ignore[no-redef]

_ENTRY = Path(sys.executable).parent / "tiermem"
CLI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "runtime.cli"]

ROWS = (120, 7, 300, 45)
DIM = 4
NUM_DENSE = 3
TIERS = ["dram", "ssd", "cxl"]
DEMO_TIERS = ["dram", "ssd", "ssd+cache", "cxl"]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _run_many(arg_lists: list[list[str]], cwd: Path, env: dict[str, str]
              ) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(3) as ex:
        return list(ex.map(lambda a: _run(a, cwd, env), arg_lists))


def _ok(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 0, f"{p.args}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr


def _fails_cleanly(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode not in (0, None), f"{p.args} exited 0:\n{p.stdout}"
    assert p.returncode > 0, f"{p.args} died of signal {-p.returncode}:\n{p.stderr}"
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    for n in needles:
        assert n in p.stderr, f"{n!r} not in stderr of {p.args}:\n{p.stderr}"


# ---------------------------------------------------------------------------
# help


def test_help(tmp_path: Path, subprocess_env) -> None:
    cmds = [["--help"], ["predict", "--help"]]
    top, pred = _run_many(cmds, tmp_path, subprocess_env)
    for p in (top, pred):
        _ok(p)
        assert "usage: tiermem" in p.stdout
    assert all(c in top.stdout for c in ("demo", "create-store", "info", "predict"))
    assert "usage: tiermem predict" in pred.stdout
    assert all(o in pred.stdout for o in ("--model", "--store", "--batch", "--tier"))


def test_no_command_is_an_error(capsys) -> None:
    with pytest.raises(SystemExit) as ei:
        cli_main([])
    assert ei.value.code == 2
    assert "usage: tiermem" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,needle", [("demo", "--max-rows"),
                                        ("create-store", "--from-checkpoint"),
                                        ("info", "--json")])
def test_subcommand_help_in_process(capsys, cmd: str, needle: str) -> None:
    """The same parser as the entry point, without paying a subprocess start per subcommand."""
    with pytest.raises(SystemExit) as ei:
        cli_main([cmd, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: tiermem {cmd}" in out and needle in out


# ---------------------------------------------------------------------------
# create-store + info


def test_create_store_random_and_info(tmp_path: Path, subprocess_env) -> None:
    out = tmp_path / "r.zarr"
    p = _run(["create-store", out, "--random", "t0:100:8,t1:50:4", "--dtype", "int8",
              "--seed", "3"], tmp_path, subprocess_env)
    _ok(p)
    assert "created" in p.stdout and "2 tables" in p.stdout
    assert "create-store:" not in p.stderr and "\r" not in p.stderr  # no bar into a pipe
    info, info_json = _run_many([["info", out], ["info", out, "--json"]], tmp_path,
                                subprocess_env)
    _ok(info)
    _ok(info_json)
    lines = info.stdout.splitlines()
    assert any(line.split()[:4] == ["t0", "100", "8", "int8"] for line in lines), info.stdout
    assert any(line.split()[:4] == ["t1", "50", "4", "int8"] for line in lines), info.stdout
    d = json.loads(info_json.stdout)
    assert Path(d["path"]) == out
    tables = {t["name"]: t for t in d["tables"]}
    assert list(tables) == ["t0", "t1"]
    assert {k: tables["t0"][k] for k in ("rows", "dim", "dtype")} == {
        "rows": 100, "dim": 8, "dtype": "int8"}
    assert {k: tables["t1"][k] for k in ("rows", "dim", "dtype")} == {
        "rows": 50, "dim": 4, "dtype": "int8"}
    assert tables["t0"]["nbytes"] == 100 * 8 + 100 * 8  # int8 rows + (scale, bias)
    assert d["nbytes"] == tables["t0"]["nbytes"] + tables["t1"]["nbytes"]
    # the rows: uniform in [-1/sqrt(rows), 1/sqrt(rows)] from default_rng([seed, table]),
    # quantized within half a step
    g = zarr.open(str(out), mode="r")
    for ti, (name, rows, dim) in enumerate([("t0", 100, 8), ("t1", 50, 4)]):
        a = 1 / np.sqrt(rows)
        ref = np.random.default_rng([3, ti]).uniform(-a, a, (rows, dim)).astype(np.float32)
        q = np.asarray(g[f"tables/{name}/weight"][:]).astype(np.float64)
        qp = np.asarray(g[f"tables/{name}/qparams"][:]).astype(np.float64)
        err = np.abs(qp[:, :1] * q + qp[:, 1:] - ref)
        assert (err <= qp[:, :1] / 2 + 1e-6).all()


# ---------------------------------------------------------------------------
# checkpoints -> stores -> predict


def _checkpoint(path: Path, layout: str) -> list[np.ndarray]:
    cfg = DLRMConfig(num_dense=NUM_DENSE, embedding_dim=DIM, num_tables=len(ROWS),
                     bottom_mlp=(6, DIM), top_mlp=(5, 3, 1), interaction=layout)
    rng = np.random.default_rng(42)
    tables = [rng.standard_normal((r, DIM)).astype(np.float32) * 0.5 for r in ROWS]
    dense = random_dense(cfg, seed=7)
    if layout == "dlrm":
        save_dlrm_checkpoint(path, cfg, tables, dense)
    else:
        save_torchrec_checkpoint(path, cfg, tables, dense, table_names=TORCHREC_NAMES,
                                 wrapper="state_dict", prefix="model.")
    return tables


TORCHREC_NAMES = ["user", "item", "ctx_a", "ctx_b"]


def _store_names(store: Path) -> list[str]:
    """Table names of a store, from its metadata read with plain zarr."""
    meta = dict(zarr.open(str(store), mode="r").attrs)["tiermem"]
    return [t["name"] for t in meta["tables"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory, subprocess_env) -> dict[str, tuple[Path, Path, list[np.ndarray]]]:
    """Both checkpoint layouts, converted to stores by ``create-store --from-checkpoint``."""
    d = tmp_path_factory.mktemp("cli_models")
    out = {}
    cmds = []
    for layout in ("dlrm", "torchrec"):
        ckpt = d / f"{layout}.pt"
        tables = _checkpoint(ckpt, layout)
        store = d / f"{layout}.zarr"
        out[layout] = (ckpt, store, tables)
        cmds.append(["create-store", store, "--from-checkpoint", ckpt, "--no-progress"])
    for p in _run_many(cmds, d, subprocess_env):
        _ok(p)
        assert "created" in p.stdout and "4 tables" in p.stdout
    return out


def _raw_state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


@pytest.mark.parametrize("layout", ["dlrm", "torchrec"])
def test_create_store_from_checkpoint(models, layout: str) -> None:
    ckpt, store, tables = models[layout]
    state = _raw_state(ckpt)
    g = zarr.open(str(store), mode="r")
    meta = dict(g.attrs)["tiermem"]
    names = _store_names(store)
    assert len(names) == len(ROWS) and len(set(names)) == len(names)
    assert meta["attrs"]["layout"] == layout
    if layout == "dlrm":
        keys = [f"emb_l.{k}.weight" for k in range(len(ROWS))]
    else:
        assert names == TORCHREC_NAMES
        keys = [f"model.sparse_arch.embedding_bag_collection.embedding_bags.{n}.weight"
                for n in names]
    # table k of the store is table k of the checkpoint, bit for bit
    for k, (name, key) in enumerate(zip(names, keys, strict=True)):
        w = np.asarray(g[f"tables/{name}/weight"][:])
        np.testing.assert_array_equal(w, state[key].numpy())
        np.testing.assert_array_equal(w, tables[k])


def _kjt_batch(rng: np.random.Generator, names: list[str], b: int):
    per = []
    for name, rows in zip(names, ROWS, strict=True):
        lengths = rng.integers(0, 4, b)
        lengths[0] = 0  # an empty bag
        ids = rng.integers(0, rows, int(lengths.sum()))
        ids[:2] = rows - 1  # the last row
        per.append((name, ids, np.concatenate([[0], np.cumsum(lengths)])))
    return SparseFeatures.from_tables(per), per


def _reference(ckpt: Path, layout: str, dense: np.ndarray, per) -> np.ndarray:
    sparse = [(torch.from_numpy(ids), torch.from_numpy(off)) for _, ids, off in per]
    return reference_dlrm_forward(_raw_state(ckpt), layout, torch.from_numpy(dense),
                                  sparse).numpy()


def _load_preds(path: Path) -> np.ndarray:
    return np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.float64)


def test_predict(models, tmp_path: Path, subprocess_env) -> None:
    """Every tier x {KJT batch file, one-hot (B, T) batch} for the dlrm layout, and the
    torchrec layout once; predictions equal the plain-torch DLRM."""
    rng = np.random.default_rng(5)
    b = 19
    dense = rng.standard_normal((b, NUM_DENSE)).astype(np.float32)
    jobs = []  # (cmd, out file, reference)
    for layout in ("dlrm", "torchrec"):
        ckpt, store, _ = models[layout]
        names = _store_names(store)
        sparse, per = _kjt_batch(rng, names, b)
        kjt = tmp_path / f"{layout}-kjt.npz"
        # keys in a shuffled order: the batch is matched to the model by name
        save_batch(kjt, dense, sparse.select(list(reversed(names))))
        ref_kjt = _reference(ckpt, layout, dense, per)
        onehot = np.stack([rng.integers(0, r, b) for r in ROWS], axis=1)
        onehot[0] = np.asarray(ROWS) - 1
        oh = tmp_path / f"{layout}-onehot.npz"
        np.savez(oh, dense=dense, sparse=onehot)
        ref_oh = _reference(ckpt, layout, dense, [
            (names[t], onehot[:, t].astype(np.int64), np.arange(b + 1, dtype=np.int64))
            for t in range(len(ROWS))])
        assert not np.allclose(ref_kjt, ref_oh)
        variants = ([(t, k) for t in TIERS for k in ("kjt", "onehot")] if layout == "dlrm"
                    else [("dram", "kjt")])
        for tier, kind in variants:
            suffix = ".csv" if (tier, kind) == ("cxl", "onehot") else ".npy"
            out = tmp_path / f"{layout}-{tier}-{kind}{suffix}"
            cmd = ["predict", "--model", ckpt, "--store", store, "--batch",
                   kjt if kind == "kjt" else oh, "--out", out, "--tier", tier,
                   "--threads", "2", "--io-threads", "4", "--stats"]
            jobs.append((cmd, out, ref_kjt if kind == "kjt" else ref_oh, names))
    results = _run_many([j[0] for j in jobs], tmp_path, subprocess_env)
    for p, (_, out, ref, names) in zip(results, jobs, strict=True):
        _ok(p)
        # with --stats stdout is one JSON document; the human line goes to stderr
        assert f"wrote {b} predictions" in p.stderr
        stats = json.loads(p.stdout)
        assert set(stats["tables"]) == set(names)
        for k in ("lookups", "rows_read", "bytes_read"):  # the sums over the tables
            assert stats["total"][k] == sum(t[k] for t in stats["tables"].values())
        assert stats["total"]["lookups"] > 0
        got = _load_preds(out)
        assert got.shape == (b,)
        if out.suffix == ".npy":
            assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7, err_msg=str(out.name))


# ---------------------------------------------------------------------------
# bad arguments: non-zero exit, a message naming the problem, no traceback


@pytest.fixture
def bad_batches(models, tmp_path: Path) -> dict[str, Path]:
    ckpt, store, _ = models["dlrm"]
    names = _store_names(store)
    rng = np.random.default_rng(2)
    dense = rng.standard_normal((4, NUM_DENSE)).astype(np.float32)
    sparse, _ = _kjt_batch(rng, names, 4)
    files = {"good": tmp_path / "good.npz"}
    save_batch(files["good"], dense, sparse)
    # an id past the end of the third table (300 rows)
    vals = {k: sparse.table(k)[:2] for k in names}
    ids2, off2 = vals[names[2]]
    vals[names[2]] = (np.concatenate([ids2, [300]]), np.concatenate([off2[:-1], [off2[-1] + 1]]))
    files["oob"] = tmp_path / "oob.npz"
    save_batch(files["oob"], dense, SparseFeatures.from_tables(vals))
    files["text"] = tmp_path / "text.npz"
    files["text"].write_text("this is not an npz file\n")
    np.save(tmp_path / "array.npy", np.zeros((4, 3)))
    files["npy"] = tmp_path / "array.npz"
    (tmp_path / "array.npy").rename(files["npy"])  # a .npy file named .npz
    files["nodense"] = tmp_path / "nodense.npz"
    np.savez(files["nodense"], sparse=np.zeros((4, 4), np.int64))
    files["floatids"] = tmp_path / "floatids.npz"
    np.savez(files["floatids"], dense=dense, sparse=np.zeros((4, 4), np.float32))
    files["wrongwidth"] = tmp_path / "wrongwidth.npz"
    np.savez(files["wrongwidth"], dense=dense, sparse=np.zeros((4, 3), np.int64))
    files["baddense"] = tmp_path / "baddense.npz"
    np.savez(files["baddense"], dense=dense[:, :2], sparse=np.zeros((4, 4), np.int64))
    files["negid"] = tmp_path / "negid.npz"
    neg = np.zeros((4, 4), np.int64)
    neg[2, 1] = -5
    np.savez(files["negid"], dense=dense, sparse=neg)
    files["names"] = names  # type: ignore[assignment]
    return files


def test_bad_arguments_subprocess(models, bad_batches, tmp_path: Path, subprocess_env) -> None:
    ckpt, store, _ = models["dlrm"]
    names = bad_batches["names"]

    def predict(*extra, batch=bad_batches["good"], store=store):
        return ["predict", "--model", ckpt, "--store", store, "--batch", batch,
                "--out", tmp_path / "o.npy", *extra]

    cases = [
        (predict("--tier", "tape"), ["tape", "--tier"]),
        (predict(store=tmp_path / "missing.zarr"), ["missing.zarr", "does not exist"]),
        (["create-store", tmp_path / "x.zarr", "--random", "t0:abc:8"], ["t0:abc:8"]),
        (predict("--threads", "-2"), ["--threads", "-2"]),
        (predict(batch=bad_batches["oob"]), [repr(names[2]), "300"]),
        (predict(batch=bad_batches["text"]), ["text.npz", "npz"]),
    ]
    results = _run_many([c for c, _ in cases], tmp_path, subprocess_env)
    for (_, needles), p in zip(cases, results, strict=True):
        _fails_cleanly(p, *needles)
    assert not (tmp_path / "o.npy").exists()
    assert not (tmp_path / "x.zarr").exists()


def test_bad_arguments_in_process(models, bad_batches, tmp_path: Path, capsys) -> None:
    """More error cases through ``main`` itself (same code as the entry point): each returns
    or exits non-zero with a message on stderr; any other exception fails the test."""
    ckpt, store, _ = models["dlrm"]
    names = bad_batches["names"]
    existing = models["torchrec"][1]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")

    def predict(*extra, batch=bad_batches["good"]):
        return ["predict", "--model", str(ckpt), "--store", str(store), "--batch", str(batch),
                "--out", str(tmp_path / "o.npy"), *extra]

    cases = [
        (predict("--threads", "two"), ["--threads", "two"]),
        (predict("--threads", "0"), ["--threads"]),
        (predict("--io-threads", "0"), ["--io-threads"]),
        (predict("--prefetch-distance", "-1"), ["--prefetch-distance"]),
        (predict("--prefetch-distance", "5000"), ["prefetch_distance", "4096"]),
        (predict("--cxl-bandwidth-gbps", "0"), ["cxl_bandwidth_gbps"]),
        (predict("--cxl-latency-ns", "-1"), ["cxl_latency_ns"]),
        (predict("--cxl-latency-ns", "nan"), ["cxl_latency_ns"]),
        (predict("--layout", "keras"), ["keras"]),
        (predict(batch=bad_batches["npy"]), ["array.npz"]),
        (predict(batch=bad_batches["nodense"]), ["nodense.npz", "dense"]),
        (predict(batch=bad_batches["floatids"]), ["floatids.npz", "integers"]),
        (predict(batch=bad_batches["wrongwidth"]), ["wrongwidth.npz", "sparse", "(B, 4)"]),
        (predict(batch=bad_batches["baddense"]), ["dense", "(B, 3)"]),
        (predict(batch=bad_batches["negid"]), [repr(names[1]), "-5", "negative"]),
        (predict(batch=tmp_path / "absent.npz"), ["absent.npz", "does not exist"]),
        (predict("--out", str(tmp_path / "o.bin")), ["o.bin"]),
        (["predict", "--model", str(tmp_path / "nope.pt"), "--store", str(store), "--batch",
          str(bad_batches["good"]), "--out", str(tmp_path / "o.npy")], ["nope.pt"]),
        (["create-store", str(existing), "--random", "5:2"], ["already exists"]),
        (["create-store", str(tmp_path / "x.zarr"), "--random", "t0:10"], ["t0:10"]),
        (["create-store", str(tmp_path / "x.zarr"), "--random", ""], ["no tables"]),
        (["create-store", str(tmp_path / "x.zarr"), "--random", "t0:0:8"], ["rows", "0"]),
        (["create-store", str(tmp_path / "x.zarr"), "--random", "t0:8:-1"], ["dim", "-1"]),
        (["create-store", str(tmp_path / "x.zarr"), "--random", "bad/name:10:8"], ["bad/name"]),
        (["create-store", str(tmp_path / "x.zarr"), "--random", "a:1:1,a:2:2"], ["duplicate"]),
        (["create-store", str(tmp_path / "x.zarr"), "--random", "t0:10:8", "--dtype", "bf16"],
         ["bf16"]),
        (["create-store", str(tmp_path / "x.zarr")], ["--random", "--from-checkpoint"]),
        (["create-store", str(tmp_path / "x.zarr"), "--from-checkpoint", str(a_file)],
         ["file.txt"]),
        (["create-store", str(tmp_path / "x.zarr"), "--from-checkpoint", str(ckpt),
          "--layout", "torchrec"], ["sparse_arch"]),
        (["info", str(tmp_path / "missing.zarr")], ["missing.zarr", "does not exist"]),
        (["info", str(a_file)], ["file.txt", "not a folder"]),
        (["info", str(tmp_path)], ["zarr.json", "missing"]),
        (["frobnicate"], ["frobnicate"]),
    ]
    for args, needles in cases:
        try:
            code = cli_main(args)
        except SystemExit as e:  # argparse errors
            code = e.code
        err = capsys.readouterr().err
        assert code not in (0, None), f"{args} succeeded"
        for n in needles:
            assert n in err, f"{n!r} not in stderr of {args}:\n{err}"
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "o.bin").exists()
    assert not (tmp_path / "x.zarr").exists()
    assert _store_names(existing) == TORCHREC_NAMES  # untouched by the refused create-store


# ---------------------------------------------------------------------------
# demo


def test_demo_small(tmp_path: Path, subprocess_env) -> None:
    out = tmp_path / "demo"
    p = _run(["demo", "--max-rows", "2000", "--batches", "3", "--batch-size", "64", "--out", out,
              "--threads", "2"], tmp_path, subprocess_env, timeout=300)
    _ok(p)
    lines = p.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines
            if line.split() and line.split()[0] in DEMO_TIERS}
    assert set(rows) == set(DEMO_TIERS), p.stdout
    report = json.loads((out / "report.json").read_text())
    tiers = {t["tier"]: t for t in report["tiers"]}
    assert list(tiers) == DEMO_TIERS
    for name, t in tiers.items():
        assert t["max_abs_diff_vs_dram"] < 1e-5, name
        assert t["lookups"] == 3 * 64 * 26
        assert t["samples_per_s"] > 0
        # every kernel was compiled (or loaded) by the warm-up, none in a measured batch
        assert t["kernels_compiled_while_measuring"] == 0, name
    assert tiers["ssd"]["rows_read"] <= tiers["ssd"]["lookups"]
    assert tiers["dram"]["rows_read"] is None and tiers["dram"]["hit_rate"] is None
    assert 0 <= tiers["ssd+cache"]["hit_rate"] <= 1
    assert tiers["ssd+cache"]["rows_read"] > 0 and tiers["ssd+cache"]["bytes_read"] > 0
    assert tiers["cxl"]["modeled_s"] > 0
    assert "max |dp|" in p.stdout and "hit rate" in p.stdout  # the legend explains them
    assert report["config"]["max_rows"] == 2000
    assert (out / "model.pt").exists() and (out / "store.zarr" / "zarr.json").exists()
