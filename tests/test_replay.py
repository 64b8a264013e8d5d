"""Trace replay through the runtime: report fields, tiers, prefetch, predictions, and the
tuner's simulation equal to a real replay (hit and miss counts, every policy)."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

from runtime import (
    CheckpointModel,
    DLRMConfig,
    InferenceSession,
    RuntimeConfig,
    random_dense,
    save_dlrm_checkpoint,
    store_from_checkpoint,
)
from tiermem.config import TierConfig
from tiermem.errors import ConfigError, InvalidBatchError, StoreFormatError
from tiermem.format import TableSpec, create_random_store
from traces.formats import TraceBatch, open_trace, write_trace
from traces.replay import replay
from traces.synth import GeneratorConfig, Pooling, generate
from traces.tuning import simulate

ROWS = (3000, 410, 6000, 70)
DIM = 8
N_BATCHES = 12


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    cfg = DLRMConfig(num_dense=5, embedding_dim=DIM, num_tables=len(ROWS), bottom_mlp=(11, DIM),
                     top_mlp=(9, 4, 1))
    rng = np.random.default_rng(3)
    tables = [rng.standard_normal((r, DIM)).astype(np.float32) for r in ROWS]
    save_dlrm_checkpoint(d / "m.pt", cfg, tables, random_dense(cfg, seed=5))
    info = store_from_checkpoint(d / "m.pt", d / "s.zarr")
    names = tuple(info.names)
    g = GeneratorConfig(table_rows=ROWS, keys=names, batch_size=64, n_batches=N_BATCHES,
                        pooling=Pooling.parse("uniform:1:4"), locality=0.2, seed=2)
    batches = list(generate(g))
    write_trace(d / "trace", batches)
    # the same sparse features with dense features, in another table order
    rng = np.random.default_rng(8)
    dense = [TraceBatch(rng.standard_normal((b.batch_size, 5)).astype(np.float32),
                        b.sparse.select(names[::-1]), None) for b in batches]
    write_trace(d / "dense_trace", dense)
    return {"dir": d, "store": d / "s.zarr", "model": d / "m.pt", "trace": d / "trace",
            "dense_trace": d / "dense_trace", "names": names, "batches": batches, "cfg": cfg}


def _check_report(rep, *, cache: bool, warm: int):
    n = N_BATCHES - warm
    assert rep["batches"] == n and rep["profile_batches"] == warm
    assert rep["lookups"] == sum(t["lookups"] for t in rep["tables"].values())
    assert rep["samples"] == 64 * n
    th, lat = rep["throughput"], rep["latency_ms"]
    assert th["batches_per_s"] > 0 and th["lookups_per_s"] > th["samples_per_s"] > 0
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    cold = rep["reads"]["cold"]
    if cache:
        c = rep["cache"]
        assert c["hits"] + c["misses"] == c["accesses"] > 0
        assert c["hits"] == sum(t["cache_hits"] for t in rep["tables"].values())
        assert 0 <= c["hit_lookups"] <= rep["lookups"]
        assert 0 <= c["hit_rate"] <= 1 and 0 <= c["lookup_hit_rate"] <= 1
        # every miss is read once from the cold tier (filled or bypassed)
        assert cold["rows"] == c["misses"]
        assert rep["reads"]["cache"]["rows"] == c["hits"]
        assert c["capacity_rows"] > 0 and c["capacity_bytes"] == c["capacity_rows"] * DIM * 4
        for t in rep["tables"].values():
            assert t["cache_hits"] + t["cache_misses"] > 0 and 0 <= t["hit_rate"] <= 1
    else:
        assert rep["cache"] is None and cold["rows"] > 0
    assert cold["bytes"] >= cold["rows"] * DIM * 4 or cold["kind"] == "ssd"


@pytest.mark.parametrize("tier", ["dram", "ssd", "cxl"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_replay_tiers(env, tier, prefetch, tmp_path):
    out = tmp_path / "r.json"
    rep = replay(env["store"], env["trace"], tier=tier, policy="lru", cache_size="5%",
                 prefetch_lookahead=prefetch, io_threads=4, progress=False, report_out=out)
    _check_report(rep, cache=True, warm=1)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rep))
    assert rep["tier"] == tier and rep["cache"]["capacity_rows"] == int(sum(ROWS) * 0.05)
    pf = rep["prefetch"]
    assert pf["lookahead"] == prefetch
    if prefetch:
        assert pf["issued"] > 0 and pf["useful"] + pf["wasted"] <= pf["issued"]
        assert pf["errors"] == []
    else:
        assert pf["issued"] == 0
    if tier == "ssd":
        cold = rep["reads"]["cold"]
        assert cold["read_ops"] > 0 and cold["device_read_MBps"] > 0


@pytest.mark.parametrize("tier", ["dram", "ssd"])
def test_replay_without_cache(env, tier):
    rep = replay(env["store"], env["trace"], tier=tier, io_threads=4, progress=False,
                 profile_batches=0)
    _check_report(rep, cache=False, warm=0)
    assert "prefetch" not in rep


POLICY_SIZES = [(p, s) for p in ["lru", "lfu", "fifo", "clock", "s3fifo", "static", "hybrid"]
                for s in ["1%", "4%", 700]]


@pytest.mark.parametrize(("policy", "size"), POLICY_SIZES)
def test_simulation_equals_replay(env, policy, size):
    trace = open_trace(env["trace"])
    rep = replay(env["store"], trace, tier="dram", policy=policy, cache_size=size,
                 progress=False)
    sim = simulate(trace, env["store"], [policy], [size], opt=True)
    r = sim.get(policy, str(size))
    c = rep["cache"]
    assert (r.hits, r.misses, r.hit_lookups) == (c["hits"], c["misses"], c["hit_lookups"])
    assert r.capacity_rows == c["capacity_rows"] and r.pinned_rows == c["pinned_rows"]
    assert sim.profile_batches == rep["profile_batches"] and r.lookups == rep["lookups"]
    assert sim.get("opt", str(size)).misses <= r.misses


@pytest.mark.parametrize(("policy", "admission", "prof"),
                         [("lru", "tinylfu", 3), ("s3fifo", "tinylfu", 0), ("hybrid", None, 4),
                          ("static", None, 2), ("clock", "tinylfu", 1)])
def test_simulation_equals_replay_on_ssd_options(env, policy, admission, prof):
    rep = replay(env["store"], env["trace"], tier="ssd", policy=policy, cache_size=500,
                 admission=admission, pinned_fraction=0.3, profile_batches=prof, io_threads=4,
                 progress=False)
    r = simulate(open_trace(env["trace"]), env["store"], [policy], [500], admission=admission,
                 pinned_fraction=0.3, profile_batches=prof, opt=False).results[0]
    c = rep["cache"]
    assert (r.hits, r.misses, r.hit_lookups) == (c["hits"], c["misses"], c["hit_lookups"])


def test_simulation_equals_replay_multi_pool(tmp_path):
    """Tables of several (dtype, dim) pools: the tuner sizes and keys them like the cache."""
    specs = [TableSpec("a", 2000, 8), TableSpec("b", 500, 4), TableSpec("c", 3000, 8),
             TableSpec("d", 800, 4, "float16"), TableSpec("e", 900, 8, "int8")]
    create_random_store(tmp_path / "s", specs)
    g = GeneratorConfig(table_rows=(3000, 2000, 500, 800, 900), keys=("c", "a", "b", "d", "e"),
                        batch_size=48, n_batches=8, seed=5)
    write_trace(tmp_path / "t", generate(g))
    for pol, size in [("lru", "3%"), ("static", 500), ("hybrid", "20KiB")]:
        rep = replay(tmp_path / "s", tmp_path / "t", tier="dram", policy=pol, cache_size=size,
                     progress=False)
        r = simulate(open_trace(tmp_path / "t"), tmp_path / "s", [pol], [size],
                     opt=False).results[0]
        c = rep["cache"]
        assert (r.hits, r.misses, r.capacity_rows) == (c["hits"], c["misses"],
                                                       c["capacity_rows"])
        assert len(c["pools"]) == 4


def _reference_predictions(env, batches, dense_of):
    conf = RuntimeConfig(tier=TierConfig(kind="dram"))
    with InferenceSession.open(env["model"], env["store"], conf) as sess:
        return np.concatenate([sess.predict(dense_of(b), b.sparse) for b in batches])


def test_predictions_equal_session_predict(env, tmp_path):
    out = tmp_path / "p.npy"
    rep = replay(env["store"], env["trace"], tier="ssd", policy="s3fifo", cache_size="3%",
                 prefetch_lookahead=2, model=CheckpointModel(env["model"]),
                 predictions_out=out, io_threads=4, progress=False)
    assert rep["dense"] == "zeros" and rep["predictions"]["count"] == 64 * (N_BATCHES - 1)
    _check_report(rep, cache=True, warm=1)
    got = np.load(out)
    ref = _reference_predictions(env, env["batches"][1:],
                                 lambda b: np.zeros((b.batch_size, 5), np.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_predictions_with_trace_dense_features(env, tmp_path):
    out = tmp_path / "p.npy"
    rep = replay(env["store"], env["dense_trace"], tier="cxl",
                 model=CheckpointModel(env["model"]), predictions_out=out, profile_batches=0,
                 progress=False)
    assert rep["dense"] == "trace" and rep["batches"] == N_BATCHES
    batches = list(open_trace(env["dense_trace"]))
    ref = _reference_predictions(env, batches, lambda b: b.dense)
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-6, atol=1e-7)


def test_table_map_and_unknown_tables(env, tmp_path):
    renamed = [TraceBatch(None, type(b.sparse)(tuple(f"x{i}" for i in range(len(ROWS))),
                                               b.sparse.values, b.sparse.offsets), None)
               for b in env["batches"][:4]]
    write_trace(tmp_path / "t", renamed)
    with pytest.raises(ConfigError) as e:
        replay(env["store"], tmp_path / "t", tier="dram", progress=False)
    msg = str(e.value)
    assert "x0" in msg and "emb_l.0" in msg and "store tables" in msg
    tm = {f"x{i}": n for i, n in enumerate(env["names"])}
    rep = replay(env["store"], tmp_path / "t", tier="dram", policy="lru", cache_size=300,
                 table_map=tm, progress=False)
    assert set(rep["tables"]) == set(env["names"])
    direct = replay(env["store"], [b for b in env["batches"][:4]], tier="dram", policy="lru",
                    cache_size=300, progress=False)
    assert direct["cache"]["hits"] == rep["cache"]["hits"]


@pytest.mark.parametrize(("kwargs", "exc", "msg"), [
    ({"policy": "mru", "cache_size": "5%"}, ConfigError, "unknown policy 'mru'"),
    ({"policy": "lru", "cache_size": "0%"}, ConfigError, "(0%, 100%]"),
    ({"policy": "lru", "cache_size": "101%"}, ConfigError, "(0%, 100%]"),
    ({"policy": "lru"}, ConfigError, "needs a cache size"),
    ({"prefetch_lookahead": 2}, ConfigError, "prefetch needs a cache"),
    ({"predictions_out": "p.npy"}, ConfigError, "need a model"),
    ({"model": "/nonexistent/m.pt"}, ConfigError, "does not exist"),
    ({"model": "m.pt", "as_path": True}, ConfigError, "runtime.CheckpointModel(path)"),
    ({"tier": "tape"}, Exception, "tape"),
    ({"profile_batches": N_BATCHES}, ConfigError, "nothing to measure"),
])
def test_bad_inputs(env, kwargs, exc, msg):
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=re.escape(msg)):
        if "model" in kwargs and not kwargs.pop("as_path", False):
            kwargs["model"] = CheckpointModel(kwargs["model"])  # the caller checks it exists
        replay(env["store"], env["trace"], progress=False, **kwargs)


def test_missing_files(env, tmp_path):
    with pytest.raises(StoreFormatError, match="does not exist"):
        replay(tmp_path / "nope.zarr", env["trace"], progress=False)
    with pytest.raises(InvalidBatchError, match="no trace.json"):
        replay(env["store"], tmp_path, progress=False)


def test_ids_beyond_the_store(env, tmp_path):
    big = GeneratorConfig(table_rows=(30000, 410, 6000, 70), keys=env["names"], batch_size=64,
                          n_batches=3, alpha=0.2, seed=1)
    write_trace(tmp_path / "t", generate(big))
    # checked before anything runs: the table, the max id (of the first offending batch,
    # found here independently) and the store's rows
    first = next(iter(open_trace(tmp_path / "t"))).sparse
    s, e = first.table_range(0)
    mx = int(first.values[s:e].max())
    with pytest.raises(ConfigError, match=rf"emb_l.0 has ids up to {mx} \(batch 0\).*"
                                          r"has 3000 rows.*--for-store"):
        replay(env["store"], tmp_path / "t", tier="dram", progress=False)


def test_declared_rows_beyond_the_store_but_ids_within(env, tmp_path):
    """Metadata rows larger than the store's only cost a pass: ids that fit replay."""
    write_trace(tmp_path / "t", env["batches"][:4], rows=[r * 10 for r in ROWS])
    rep = replay(env["store"], tmp_path / "t", tier="dram", progress=False)
    assert rep["batches"] == 4 - 1 and not rep["interrupted"]


def test_table_mismatch_names_both_ways_out(env, tmp_path):
    keys = tuple(f"C{i + 1}" for i in range(len(ROWS)))
    write_trace(tmp_path / "t", [TraceBatch(None, type(b.sparse)(keys, b.sparse.values,
                                                                   b.sparse.offsets), None)
                                 for b in env["batches"][:2]])
    with pytest.raises(ConfigError) as e:
        replay(env["store"], tmp_path / "t", tier="dram", progress=False)
    msg = str(e.value)
    assert "--table-map" in msg and "--for-store" in msg
    assert "trace tables: C1, C2, C3, C4" in msg and "store tables: emb_l.0, emb_l.1" in msg
    from traces.tuning import table_mismatch

    long = table_mismatch([f"C{i}" for i in range(26)], [f"e{i}" for i in range(26)],
                          [f"C{i}" for i in range(26)])
    assert "C0, C1, C2, C3, ..., C24, C25 (26)" in long and "C10" not in long


def test_for_store_trace_replays_and_tunes(env, tmp_path, capsys):
    """trace-generate --for-store: the store's names and rows; replay and tune take it."""
    from runtime.cli import main
    from tiermem.format import open_store

    out = tmp_path / "t"
    assert main(["trace-generate", str(out), "--for-store", str(env["store"]), "--batches",
                 "6", "--batch-size", "128", "--pooling", "uniform:1:3", "-q"]) == 0
    tr = open_trace(out)
    info = open_store(env["store"])
    assert tr.keys == tuple(info.names) and tr.rows == tuple(t.spec.rows for t in info.tables)
    for b in tr:
        b.sparse.validate_ids(tr.rows)
        assert b.sparse.lengths.max() == 3
    capsys.readouterr()
    assert main(["replay", "--store", str(env["store"]), "--trace", str(out), "--tier",
                 "dram", "--cache-size", "5%", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["batches"] == 6 - 1
    assert main(["trace-generate", str(tmp_path / "u"), "--for-store", str(env["store"]),
                 "--tables", "criteo_kaggle"]) == 2
    assert "--tables or --for-store" in capsys.readouterr().err


def test_tune_table_map_and_store_rows(env, tmp_path, capsys):
    from runtime.cli import main

    keys = tuple(f"x{i}" for i in range(len(ROWS)))
    write_trace(tmp_path / "t", [TraceBatch(None, type(b.sparse)(keys, b.sparse.values,
                                                                   b.sparse.offsets), None)
                                 for b in env["batches"]])
    base = ["tune", "--trace", str(tmp_path / "t"), "--store", str(env["store"]),
            "--policies", "lru", "--sizes", "5%", "--no-opt", "--json", "-q"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "--table-map" in err and "--for-store" in err and "x0" in err
    tm = ",".join(f"x{i}={n}" for i, n in enumerate(env["names"]))
    assert main([*base, "--table-map", tm]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]
    ref = replay(env["store"], env["trace"], tier="dram", policy="lru", cache_size="5%",
                 progress=False)
    assert (got["hits"], got["misses"]) == (ref["cache"]["hits"], ref["cache"]["misses"])


def _pool_reference(env, ahead):
    """Replay with prefetch by hand, the prefetch of every submitted batch done before the
    next batch runs: what the deterministic (sync) replay must count."""
    from tiermem.cache.cache import CachedTier
    from tiermem.format import open_store
    from tiermem.kernels.dedupe import dedupe_first
    from tiermem.tiers import open_tier
    from traces.tuning import cache_config

    info = open_store(env["store"])
    tier = CachedTier(open_tier(info, TierConfig(kind="ssd", io_threads=4)),
                      cache_config("lru", "5%"))
    try:
        sfs = [b.sparse for b in env["batches"]]
        warm = 1
        for sf in sfs[:warm]:
            tier.pool(sf)
        before = sum(t.cache_hits for t in tier.stats.tables.values())
        meas = sfs[warm:]
        for i, sf in enumerate(meas):
            # replay keeps the batch running plus `ahead` more in its window, and submits
            # each batch as it enters: before batch 0 runs, batches 1..ahead+1 were
            todo = meas[1:2 + ahead] if i == 0 else meas[i + 1 + ahead:i + 2 + ahead]
            for nxt in todo:
                for key, gids in tier.global_ids(nxt).items():
                    tier.prefetch_rows(key, dedupe_first(gids)[0])
            tier.pool(sf)
        return sum(t.cache_hits for t in tier.stats.tables.values()) - before
    finally:
        tier.close()


def test_prefetch_replay_is_deterministic(env):
    runs = [replay(env["store"], env["trace"], tier="ssd", policy="lru", cache_size="5%",
                   prefetch_lookahead=2, io_threads=4, progress=False) for _ in range(3)]
    assert {r["cache"]["hits"] for r in runs} == {_pool_reference(env, 2)}
    assert runs[0]["prefetch"]["mode"] == "sync" and runs[0]["prefetch"]["issued"] > 0
    fast = replay(env["store"], env["trace"], tier="ssd", policy="lru", cache_size="5%",
                  prefetch_lookahead=2, io_threads=4, progress=False, prefetch_async=True)
    assert fast["prefetch"]["mode"] == "async"


def test_ctrl_c_writes_a_partial_report(env, tmp_path, python, subprocess_env, repo_root):
    """A real SIGINT while the replay waits on batch 8 (a FIFO): exit 130, report marked."""
    import os
    import shutil
    import signal

    tr = tmp_path / "t"
    shutil.copytree(env["trace"], tr)
    fifo = tr / "batches" / "000008.npz"
    fifo.unlink()
    os.mkfifo(fifo)
    p = subprocess.Popen([python, "-m", "runtime.cli", "replay", "--store",
                          str(env["store"]), "--trace", str(tr), "--tier", "dram",
                          "--cache-size", "5%", "--report", str(tmp_path / "r.json")],
                         cwd=repo_root, env=subprocess_env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        with open(fifo, "wb"):  # blocks until the replay opens batch 8
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["interrupted"] is True and "INTERRUPTED" in out
    # batches 1..6 ran (0 warms up; 7 waited in the window when batch 8 was read)
    assert rep["batches"] == 6 and rep["samples"] == 6 * 64


def test_meta_files_replay_without_profile_batches(env, tmp_path, capsys):
    """Meta .pt.gz files: one batch per file, so the trace's length is known."""
    import gzip

    import torch

    from runtime.cli import main

    paths = []
    for i, b in enumerate(env["batches"]):
        sf = b.sparse
        lengths = torch.from_numpy(sf.lengths.reshape(len(ROWS), sf.batch_size).copy())
        obj = (torch.from_numpy(sf.values.copy()), torch.from_numpy(sf.offsets.copy()), lengths)
        paths.append(tmp_path / f"f{i:02d}.pt.gz")
        with gzip.open(paths[-1], "wb") as f:
            torch.save(obj, f)
    tm = ",".join(f"t{i}={n}" for i, n in enumerate(env["names"]))
    argv = ["replay", "--store", str(env["store"]), "--trace", *map(str, paths),
            "--tier", "dram", "--cache-size", "5%", "--table-map", tm, "--json", "-q"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    ref = replay(env["store"], env["trace"], tier="dram", policy="lru", cache_size="5%",
                 progress=False)
    assert rep["profile_batches"] == 1 == ref["profile_batches"]
    assert rep["cache"]["hits"] == ref["cache"]["hits"]
    # re-cut into other batches, the length is unknown: one batch warms up
    assert main([*argv, "--batch-size", "100"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["profile_batches"] == 1 and rep["samples"] == 64 * N_BATCHES - 100


# -- CLI -------------------------------------------------------------------------------

def test_cli_replay(env, tmp_path, capsys):
    from runtime.cli import main

    rc = main(["replay", "--store", str(env["store"]), "--trace", str(env["trace"]),
               "--tier", "ssd", "--policy", "hybrid", "--cache-size", "5%", "--prefetch", "1",
               "--io-threads", "4", "--model", str(env["model"]), "--predictions",
               str(tmp_path / "p.npy"), "--report", str(tmp_path / "r.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "hit rate" in out and "throughput" in out and "p99" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["cache"]["policy"] == "hybrid" and rep["prefetch"]["lookahead"] == 1
    assert np.load(tmp_path / "p.npy").shape == (64 * (N_BATCHES - 1),)


def test_cli_replay_errors(env, tmp_path, capsys):
    from runtime.cli import main

    base = ["replay", "--store", str(env["store"]), "--trace", str(env["trace"]), "--no-progress"]
    for extra, msg in [(["--policy", "nope", "--cache-size", "5%"], "unknown policy"),
                       (["--cache-size", "0%"], "(0%, 100%]"),
                       (["--prefetch", "2"], "prefetch needs a cache")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and err.startswith("tiermem replay: error:")
    assert main(["replay", "--store", str(tmp_path / "x"), "--trace", str(env["trace"])]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_help_subprocess(python, subprocess_env, repo_root):
    p = subprocess.run([python, "-m", "runtime.cli", "replay", "--help"], cwd=repo_root,
                       env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--cache-size" in p.stdout and "--predictions" in p.stdout


def test_main_cli_wiring(python, subprocess_env, repo_root, env):
    """Once runtime.cli wires REPLAY_COMMANDS in, ``tiermem replay`` runs end to end."""
    p = subprocess.run([python, "-m", "runtime.cli", "replay", "--store", str(env["store"]),
                        "--trace", str(env["trace"]), "--tier", "dram", "--policy", "lru",
                        "--cache-size", "5%", "--no-progress", "--json"],
                       cwd=repo_root, env=subprocess_env, capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0 and "invalid choice" in p.stderr:
        pytest.skip("runtime.cli does not register the replay commands yet")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["cache"]["policy"] == "lru"
    # a fresh process: every kernel the measured batches ran came from the warm-up
    assert rep["kernel_warmup"]["kernels_added"] > 0
    assert rep["kernel_warmup"]["compiled_while_measuring"] == 0


def test_cold_process_model_replay_compiles_nothing_while_measuring(python, subprocess_env,
                                                                    repo_root, env):
    p = subprocess.run([python, "-m", "runtime.cli", "replay", "--store", str(env["store"]),
                        "--model", str(env["model"]), "--trace", str(env["trace"]),
                        "--tier", "ssd", "--policy", "clock", "--cache-size", "20%",
                        "--prefetch", "2", "--no-progress", "--json"],
                       cwd=repo_root, env=subprocess_env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["kernel_warmup"]["kernels_added"] > 0
    assert rep["kernel_warmup"]["compiled_while_measuring"] == 0
