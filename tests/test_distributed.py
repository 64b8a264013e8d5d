"""Sharded inference on a real local Ray cluster: equals one process, survives a dead shard.

The cluster is started the way users start it (``ray.init`` through
:func:`runtime.distributed.cluster.connect`), with its session folder and
auth token in a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

from runtime import (  # noqa: E402
    DLRMConfig,
    InferenceSession,
    RuntimeConfig,
    random_dense,
    save_dlrm_checkpoint,
    store_from_checkpoint,
)
from runtime.distributed import (  # noqa: E402
    Piece,
    ShardedSession,
    ShardOptions,
    ShardPlan,
    ShardTimeoutError,
    ShardUnavailableError,
)
from runtime.distributed.cluster import connect, shutdown  # noqa: E402
from tests.naive import reference_dlrm_forward  # noqa: E402
from tiermem import InvalidBatchError, SparseFeatures, TierConfig  # noqa: E402
from tiermem.cache.cache import CacheConfig  # noqa: E402
from tiermem.cache.prefetch import PrefetchConfig  # noqa: E402
from tiermem.format import open_store  # noqa: E402

pytestmark = pytest.mark.ray

ROWS = (300, 41, 1000, 7)
DIM = 6


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module; HOME and the temp dir point into a folder we remove."""
    root = tempfile.mkdtemp(prefix="tmray")
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = root  # Ray writes ~/.ray/auth_token
    try:
        assert connect(num_cpus=4, temp_dir=os.path.join(root, "r"))
        yield root
    finally:
        shutdown()
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    cfg = DLRMConfig(num_dense=5, embedding_dim=DIM, num_tables=len(ROWS), bottom_mlp=(11, DIM),
                     top_mlp=(9, 4, 1))
    rng = np.random.default_rng(3)
    tables = [rng.standard_normal((r, DIM)).astype(np.float32) for r in ROWS]
    path = tmp / "m.pt"
    save_dlrm_checkpoint(path, cfg, tables, random_dense(cfg, seed=5))
    store = tmp / "s.zarr"
    store_from_checkpoint(path, store)
    return path, store, cfg


def _batch(names, b, rng, max_pool=5):
    per = []
    for name, rows in zip(names, ROWS, strict=True):
        lengths = rng.integers(0, max_pool + 1, b)
        ids = rng.integers(0, rows, int(lengths.sum()))
        per.append((name, ids, np.concatenate([[0], np.cumsum(lengths)])))
    return SparseFeatures.from_tables(per), per


def _plan(store: Path) -> ShardPlan:
    """Table 2 (1000 rows) split over both shards, the others whole."""
    specs = {t.name: t.spec for t in open_store(store).tables}
    names = list(specs)
    pieces = (Piece(names[0], 0, 300, 0), Piece(names[1], 0, 41, 1),
              Piece(names[2], 0, 450, 1), Piece(names[2], 450, 1000, 0),
              Piece(names[3], 0, 7, 1))
    return ShardPlan(2, specs, pieces, strategy="manual")


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_sharded_equals_single_process(cluster, model, transport) -> None:
    path, store, cfg = model
    conf = RuntimeConfig(tier=TierConfig(kind="ssd", io_threads=4),
                         cache=CacheConfig(capacity_fraction=0.2),
                         prefetch=PrefetchConfig(lookahead=2), num_threads=1)
    rng = np.random.default_rng(11)
    with InferenceSession.open(path, store, conf) as single, \
            ShardedSession.open(path, store, _plan(store), conf,
                                ShardOptions(transport=transport)) as sharded:
        assert sorted(i["shard"] for i in sharded.shard_info) == [0, 1]
        assert all(i["pid"] != os.getpid() for i in sharded.shard_info)
        names = single.table_names
        batches = []
        for b in (1, 17, 64):
            sparse, per = _batch(names, b, rng)
            dense = rng.standard_normal((b, cfg.num_dense)).astype(np.float32)
            batches.append((dense, sparse))
            got = sharded.predict(dense, sparse)
            np.testing.assert_allclose(got, single.predict(dense, sparse), rtol=1e-6, atol=1e-7)
            ref = reference_dlrm_forward(
                torch.load(path, weights_only=True), "dlrm", torch.from_numpy(dense),
                [(torch.from_numpy(i), torch.from_numpy(o)) for _, i, o in per]).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
            e_sh, e_single = sharded.embed(sparse), single.embed(sparse)
            for t, name in enumerate(names):  # whole tables: bit for bit
                if name not in sharded.router.split:
                    np.testing.assert_array_equal(e_sh[:, t], e_single[:, t])
        streamed = list(sharded.predict_stream(batches * 3))  # the shards prefetch ahead
        assert len(streamed) == 3 * len(batches)
        for (d, s), got in zip(batches * 3, streamed, strict=True):
            np.testing.assert_allclose(got, single.predict(d, s), rtol=1e-6, atol=1e-7)
        st = sharded.stats
        assert st["batches"] >= 15 and sum(st["shard_lookups"]) > 0
        # announcing a batch makes the shards read its missing rows ahead (the stream's
        # hints may have found everything resident already: here most rows are not)
        every_row = SparseFeatures.from_tables(
            {n: (np.arange(r), np.array([0, r])) for n, r in zip(names, ROWS, strict=True)})
        sharded.prefetch(every_row)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pre = [s["cache"]["prefetch"] for s in sharded.stats["shards"]]
            if sum(p["issued"] + p["dropped"] for p in pre) > 0:
                break
            time.sleep(0.1)
        assert sum(p["issued"] + p["dropped"] for p in pre) > 0, pre
        assert [s["lookups"] for s in st["shards"]] == [st["shard_lookups"][s] for s in (0, 1)]
        cpu = sharded.cpu_seconds()
        assert cpu["total"] >= cpu["driver"] > 0 and set(cpu["shards"]) == {0, 1}


def test_bad_ids_fail_before_any_shard_is_called(cluster, model) -> None:
    path, store, _ = model
    with ShardedSession.open(path, store, _plan(store)) as sharded:
        names = sharded.table_names
        bad = SparseFeatures.from_tables({n: ([ROWS[i]] if i == 2 else [0], [0, 1])
                                          for i, n in enumerate(names)})
        with pytest.raises(InvalidBatchError, match=f"table '{names[2]}'"):
            sharded.predict(np.zeros((1, 5), np.float32), bad)
        assert sharded.batches == 0
        with pytest.raises(InvalidBatchError, match="dense must have shape"):
            sharded.predict(np.zeros((1, 4), np.float32), bad)


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_dead_shard_fails_clearly_then_recovers(cluster, model, transport) -> None:
    path, store, cfg = model
    rng = np.random.default_rng(5)
    opts = ShardOptions(timeout_s=60, max_restarts=2, transport=transport)
    with InferenceSession.open(path, store) as single, \
            ShardedSession.open(path, store, _plan(store), options=opts) as sharded:
        sparse, _ = _batch(single.table_names, 8, rng)
        dense = rng.standard_normal((8, cfg.num_dense)).astype(np.float32)
        want = single.predict(dense, sparse)
        np.testing.assert_allclose(sharded.predict(dense, sparse), want, rtol=1e-6)
        victim = next(i for i in sharded.shard_info if i["shard"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        # the batch that meets the dead shard fails with a clear error, never a wrong answer
        deadline = time.monotonic() + 30
        with pytest.raises(ShardUnavailableError, match="shard 1 .*unavailable"):
            while time.monotonic() < deadline:  # until Ray has noticed the death
                got = sharded.predict(dense, sparse)
                np.testing.assert_allclose(got, want, rtol=1e-6)
                time.sleep(0.05)
        info = sharded.wait_ready(timeout=120)  # Ray restarted the actor
        assert next(i for i in info if i["shard"] == 1)["pid"] != victim["pid"]
        np.testing.assert_allclose(sharded.predict(dense, sparse), want, rtol=1e-6)
        # a restarting actor may not answer the failure probe in time: the shard is then
        # named from the actor id in Ray's error, never left as "a shard"
        err = ray.exceptions.ActorUnavailableError(
            "RPC error: Socket closed", sharded.actors[1]._actor_id.binary())
        assert "shard 1 (tables" in str(sharded._dag_failure(err))
        np.testing.assert_allclose(sharded.predict(dense, sparse), want, rtol=1e-6)


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_slow_shard_times_out(cluster, model, transport) -> None:
    path, store, cfg = model
    # the CXL model charges 20 ms per access: a 40-lookup batch takes ~0.8 s per shard
    conf = RuntimeConfig(tier=TierConfig(kind="cxl", cxl_latency_ns=2e7, cxl_outstanding=1))
    with ShardedSession.open(path, store, _plan(store), conf,
                             ShardOptions(timeout_s=0.2, transport=transport)) as sharded:
        sparse, _ = _batch(sharded.table_names, 10, np.random.default_rng(0), max_pool=2)
        with pytest.raises(ShardTimeoutError, match=r"shard \d .*did not answer within 0.2 s"):
            sharded.predict(np.zeros((10, cfg.num_dense), np.float32), sparse)


def test_serving_runtime_over_shards(cluster, model) -> None:
    """The embeddable serving runtime (dynamic batching, threads) over a sharded session."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.service import BatcherConfig, ServingConfig, ServingRuntime

    path, store, cfg = model
    conf = RuntimeConfig(tier=TierConfig(kind="ssd", io_threads=4),
                         cache=CacheConfig(capacity_fraction=0.3),
                         prefetch=PrefetchConfig(lookahead=2))
    rng = np.random.default_rng(8)
    with InferenceSession.open(path, store, conf) as single:
        names = single.table_names
        reqs = []
        for b in rng.integers(1, 9, 24):
            sparse, _ = _batch(names, int(b), rng)
            reqs.append((rng.standard_normal((int(b), cfg.num_dense)).astype(np.float32),
                         sparse))
        want = [single.predict(d, s) for d, s in reqs]
    sharded = ShardedSession.open(path, store, _plan(store), conf)
    profile = {names[2]: np.arange(0, 1000, 7), names[0]: np.arange(50)}
    with ServingRuntime(sharded, ServingConfig(BatcherConfig(max_batch_size=64, max_delay_ms=5)),
                        warm_profile=profile, owns_session=True) as rt:
        assert rt.wait_ready(120)
        with ThreadPoolExecutor(6) as ex:
            got = list(ex.map(lambda r: rt.predict(*r), reqs))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
        m = rt.metrics()
        assert m["requests"]["completed"] == len(reqs)
        tier = m["tier"]
        assert tier["shards"] == 2 and tier["lookups"] > 0
        assert set(tier["bytes_read_per_table"]) <= set(names)
        assert tier["cache"]["resident_rows"] > 0  # warmed, then filled by the batches


def test_cli_predict_with_a_plan(cluster, model, tmp_path) -> None:
    """`tiermem plan` then `tiermem predict --plan`: the same predictions as without."""
    from runtime.batchfile import save_batch
    from runtime.cli import main

    path, store, cfg = model
    plan = tmp_path / "plan.json"
    assert main(["plan", "--store", str(store), "--shards", "2", "--capacity", "60%",
                 "--strategy", "load", "--out", str(plan)]) == 0
    rng = np.random.default_rng(4)
    names = [t.name for t in open_store(store).tables]
    sparse, _ = _batch(names, 11, rng)
    batch = tmp_path / "b.npz"
    save_batch(batch, rng.standard_normal((11, cfg.num_dense)).astype(np.float32), sparse)
    outs = []
    for extra in ([], ["--plan", str(plan), "--transport", "tasks"], ["--plan", str(plan)]):
        out = tmp_path / f"p{len(outs)}.npy"
        assert main(["predict", "--model", str(path), "--store", str(store), "--batch",
                     str(batch), "--out", str(out), *extra]) == 0
        outs.append(np.load(out))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-6, atol=1e-7)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    assert main(["predict", "--model", str(path), "--store", str(store), "--batch", str(batch),
                 "--out", str(tmp_path / "x.npy"), "--plan", str(bad)]) == 2


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_shard_side_error_is_raised_then_served_again(cluster, model, tmp_path,
                                                      transport) -> None:
    """A shard that fails a read (its store file truncated under it) raises the store's
    own error for that batch; once the file is back, batches are served again."""
    import shutil

    from tiermem.errors import StoreError

    path, store, cfg = model
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    conf = RuntimeConfig(tier=TierConfig(kind="ssd", io_threads=2))
    rng = np.random.default_rng(6)
    with InferenceSession.open(path, store) as single, \
            ShardedSession.open(path, copy, _plan(copy), conf,
                                ShardOptions(transport=transport, timeout_s=60)) as sharded:
        names = single.table_names
        sparse, _ = _batch(names, 16, rng)
        dense = rng.standard_normal((16, cfg.num_dense)).astype(np.float32)
        want = single.predict(dense, sparse)
        np.testing.assert_allclose(sharded.predict(dense, sparse), want, rtol=1e-6)
        chunk = open_store(copy).table(names[0]).weight_chunk(0)
        data = chunk.read_bytes()
        chunk.write_bytes(data[:64])
        try:
            with pytest.raises(StoreError, match="short read"):
                sharded.predict(dense, sparse)
        finally:
            chunk.write_bytes(data)
        np.testing.assert_allclose(sharded.predict(dense, sparse), want, rtol=1e-6)


def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets the given processes listen on (from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    out.append(cols[1])
    return out


def test_local_cluster_listens_on_loopback_only(cluster) -> None:
    """Every server of the local cluster (GCS, raylet, workers, agents) is on 127.0.0.1."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    pids, grew = {os.getpid()}, True
    while grew:  # our process tree: the cluster's servers and workers descend from this one
        more = {p for p, pp in parent.items() if pp in pids} - pids
        pids |= more
        grew = bool(more)
    addrs = _listening(pids)
    assert addrs, "no Ray listener found"
    # /proc hex: 0100007F = 127.0.0.1; v6: ::1, or ::ffff:127.0.0.1
    loopback = ("0100007F:", "00000000000000000000000001000000:",
                "0000000000000000FFFF00000100007F:")
    assert all(a.startswith(loopback) for a in addrs), addrs
