"""Sharded inference on Ray: the embedding tables spread over shard actors by a plan.

    batch ─► Router.split_batch ─► shard 0 (Ray actor: tier + cache + prefetcher) ─┐
                                ─► shard 1 ...                                      ├► merge
                                ─► shard N-1 ...                                   ─┘   │
    dense ──────────────────────────────────────────► bottom MLP ─► interaction ─► top MLP

The driver (this process) validates each batch, sends every shard only the
lookups of the pieces it holds, all shards at once, gathers the pooled parts
(adding the partial sums of row-split tables) and runs the MLPs in torch.
Results equal the single-process :class:`runtime.session.InferenceSession`:
bit for bit for tables placed whole, to float32 rounding for row-split ones
(their partial sums are added in a different order).

A shard that dies or does not answer in time fails the batches waiting on
it with :class:`ShardUnavailableError` / :class:`ShardTimeoutError`, never a
wrong answer; Ray restarts the actor (``ShardOptions.max_restarts``) and
later batches succeed once it has reopened its store.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.checkpoint import load_checkpoint
from runtime.distributed.cluster import connect, import_ray
from runtime.distributed.cluster import shutdown as ray_shutdown
from runtime.distributed.plan import ShardPlan, load_plan
from runtime.distributed.routing import Router, ShardRequest
from runtime.distributed.shard import EmbeddingShard, _cpu_seconds
from runtime.model import DenseDLRM
from runtime.pipeline import pipelined
from runtime.session import RuntimeConfig, batch_features, dense_tensor, run_dense
from tiermem.batch import BoundsCheck, CheckedFeatures, check_batch
from tiermem.config import Choice, ConfigDict
from tiermem.errors import ConfigError, TierMemError
from tiermem.features import SparseFeatures
from tiermem.format import open_store
from tiermem.kernels import kernel_census
from tiermem.metrics import TierMetrics
from tiermem.warmup import synthetic_batch

__all__ = ["ShardError", "ShardOptions", "ShardTimeoutError", "ShardUnavailableError",
           "ShardedSession", "Transport"]


class ShardError(TierMemError, RuntimeError):
    """A shard could not serve its part of a batch."""


class ShardUnavailableError(ShardError):
    """A shard's actor died or is restarting."""


class ShardTimeoutError(ShardError, TimeoutError):
    """A shard did not answer within ``ShardOptions.timeout_s``."""


class Transport(Choice):
    """How a batch reaches the shard actors."""

    COMPILED = "compiled"
    """One Ray compiled graph (shared-memory channels) broadcasts the batch; each shard
    cuts its own part."""
    TASKS = "tasks"
    """One Ray task per shard, carrying only its part."""


@dataclass(frozen=True)
class ShardOptions(ConfigDict):
    """How shard actors are started and waited for."""

    num_cpus: float = 1.0
    """Ray CPUs reserved per shard actor."""
    max_restarts: int = -1
    """How often Ray restarts a dead shard (-1: always)."""
    timeout_s: float = 30.0
    """How long a batch waits for a shard before failing."""
    startup_timeout_s: float = 300.0
    """How long opening the shards (stores, caches, warm-up) may take."""
    max_concurrency: int = 4
    """Threads per shard actor: concurrent batches and prefetch hints."""
    spread: bool = True
    """Place shards on different nodes when the cluster has several."""
    transport: Transport = Transport.COMPILED
    """``"compiled"``: one Ray compiled graph (shared-memory channels) broadcasts each
    batch to the shards, which cut their own part (about 5x less overhead per batch
    here); ``"tasks"``: one Ray task per shard carrying only its part (no graph to
    rebuild after a failure; also for Ray versions without compiled graphs)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "transport", Transport.parse(self.transport))
        if not (isinstance(self.num_cpus, (int, float)) and self.num_cpus >= 0):
            raise ConfigError(f"ShardOptions.num_cpus must be >= 0, got {self.num_cpus!r}")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) \
                or self.max_restarts < -1:
            raise ConfigError(f"ShardOptions.max_restarts must be -1 or >= 0, got "
                              f"{self.max_restarts!r}")
        for name in ("timeout_s", "startup_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"ShardOptions.{name} must be > 0, got {v!r}")
        if isinstance(self.max_concurrency, bool) or not isinstance(self.max_concurrency, int) \
                or self.max_concurrency < 1:
            raise ConfigError(f"ShardOptions.max_concurrency must be >= 1, got "
                              f"{self.max_concurrency!r}")


class ShardedSession:
    """A DLRM model whose embedding tables are served by Ray shard actors.

    Build one with :meth:`open` (checkpoint + store + plan); ``predict``,
    ``embed`` and ``predict_stream`` behave like :class:`InferenceSession`'s.
    """

    def __init__(self, dense: DenseDLRM, store: str | os.PathLike[str], plan: ShardPlan,
                 table_names: Iterable[str], config: RuntimeConfig | None = None,
                 options: ShardOptions | None = None, *, address: str | None = None,
                 temp_dir: str | os.PathLike[str] | None = None) -> None:
        self.dense = dense.eval()
        self.config = config or RuntimeConfig()
        self.options = options or ShardOptions()
        self.plan = plan
        self.table_names: Sequence[str] = tuple(table_names)
        cfg = dense.config
        if len(self.table_names) != cfg.num_tables:
            raise ConfigError(f"the model has {cfg.num_tables} tables but "
                              f"{len(self.table_names)} table names were given")
        self.store = Path(store).resolve()
        info = open_store(self.store)
        plan.check_store(info)
        for name in self.table_names:
            if name not in plan.tables:
                raise ConfigError(f"the plan does not place the model's table {name!r}")
            if plan.tables[name].dim != cfg.embedding_dim:
                raise ConfigError(f"table {name!r} has dim {plan.tables[name].dim} but the model "
                                  f"expects {cfg.embedding_dim}")
        self._rows = [plan.tables[n].rows for n in self.table_names]
        self.router = Router(plan, self.table_names)
        self._ray = import_ray()
        need = int(np.ceil(len(self.router.active_shards) * self.options.num_cpus))
        self._owns_cluster = connect(address, num_cpus=max(os.cpu_count() or 1, need),
                                     temp_dir=temp_dir)
        self._lock = threading.Lock()
        self.batches = 0
        self.request_bytes = 0
        self.actors: dict[int, Any] = {}
        self._dag: Any = None
        self._closed = False
        try:
            remote_cls = self._ray.remote(EmbeddingShard)
            o = self.options
            for s in self.router.active_shards:
                self.actors[s] = remote_cls.options(
                    num_cpus=o.num_cpus, max_restarts=o.max_restarts, max_task_retries=0,
                    max_concurrency=o.max_concurrency,
                    scheduling_strategy="SPREAD" if o.spread else "DEFAULT",
                ).remote(str(self.store), plan.to_dict(), s, self.config.to_dict(),
                         list(self.table_names))
            self.shard_info = self.wait_ready(self.options.startup_timeout_s)
            self._pids = {i["shard"]: i["pid"] for i in self.shard_info}
            self._dag = None
            self._dag_lock = threading.RLock()
            if self.options.transport == "compiled":
                self._dag = self._compile()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, model: str | os.PathLike[str], store: str | os.PathLike[str],
             plan: ShardPlan | str | os.PathLike[str], config: RuntimeConfig | None = None,
             options: ShardOptions | None = None, *, layout: str = "auto",
             table_map: Mapping[str, str] | None = None, address: str | None = None,
             temp_dir: str | os.PathLike[str] | None = None) -> ShardedSession:
        """Open a checkpoint's dense part here and its tables on the plan's shards."""
        if not isinstance(plan, ShardPlan):
            plan = load_plan(plan)
        ckpt = load_checkpoint(model, layout=layout)
        names = [(table_map or {}).get(n, n) for n in ckpt.table_names]
        return cls(ckpt.build_dense(), store, plan, names, config, options, address=address,
                   temp_dir=temp_dir)

    # -- shards ------------------------------------------------------------------
    def _tables_of(self, s: int) -> str:
        names = sorted({p.table for p in self.router.pieces_of(s)})
        return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")

    def _get(self, s: int, ref: Any, deadline: float) -> Any:
        ray = self._ray
        exc = ray.exceptions
        try:
            return ray.get(ref, timeout=max(deadline - time.monotonic(), 0.001))
        except exc.GetTimeoutError:
            raise ShardTimeoutError(
                f"shard {s} (tables {self._tables_of(s)}) did not answer within "
                f"{self.options.timeout_s:g} s") from None
        except exc.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, TierMemError):
                raise cause from None
            raise ShardError(f"shard {s} (tables {self._tables_of(s)}) failed: "
                             f"{cause!r}") from None
        except (exc.RayActorError, exc.WorkerCrashedError, exc.ObjectLostError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ShardUnavailableError(
                f"shard {s} (tables {self._tables_of(s)}) is unavailable: {first}"
                + (" -- Ray is restarting it" if self.options.max_restarts != 0 else "")
            ) from None

    def wait_ready(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until every shard answers (after start or a restart); their identities."""
        deadline = time.monotonic() + timeout
        out = []
        for s, actor in self.actors.items():
            while True:
                try:
                    out.append(self._get(s, actor.ready.remote(), deadline))
                    break
                except ShardUnavailableError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.2)
                except ShardTimeoutError:
                    raise ShardTimeoutError(
                        f"shard {s} (tables {self._tables_of(s)}) was not ready within "
                        f"{timeout:g} s") from None
        return out

    # -- the compiled-graph transport -------------------------------------------------
    def _compile(self) -> Any:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:
            dag = MultiOutputNode([self.actors[s].pool_batch.bind(inp)
                                   for s in self.router.active_shards])
        compiled = dag.experimental_compile()
        # the first execution sets the channels up (seconds here): do it now with an
        # empty batch, so that a batch's timeout measures the shards, not the set-up
        empty: tuple[np.ndarray, np.ndarray, None, str, list[tuple[np.ndarray, np.ndarray]]] = (
            np.zeros(0, np.int64), np.zeros(1, np.int64), None, "sum", [])
        try:
            self._ray.get(compiled.execute(empty), timeout=self.options.startup_timeout_s)
        except Exception:
            try:
                compiled.teardown()
            except Exception:  # noqa: BLE001
                pass
            raise
        return compiled

    def _drop_dag(self) -> None:
        dag, self._dag = self._dag, None
        if dag is not None:
            try:
                dag.teardown()
            except Exception:  # noqa: BLE001 - a dead actor's graph may not tear down cleanly
                pass

    def _probe(self, timeout: float = 2.0, *, restarted_failed: bool = True
               ) -> tuple[list[int], list[int]]:
        """(dead or restarted shards, shards still working on a request)."""
        dead, slow = [], []
        deadline = time.monotonic() + timeout
        for s, a in self.actors.items():
            try:
                info = self._get(s, a.ready.remote(), deadline)
            except ShardTimeoutError:  # alive, still busy past the probe's wait
                slow.append(s)
                continue
            except ShardError:
                dead.append(s)
                continue
            if info["pid"] != self._pids.get(s, info["pid"]):  # died and was restarted
                self._pids[s] = info["pid"]
                if restarted_failed:
                    dead.append(s)
                    continue
            # still on a request, or its last one took longer than a batch may wait (an
            # actor may answer only once the graph's current execution is done)
            if info["busy_seconds_now"] > 0.0 or \
                    info["last_request_seconds"] >= self.options.timeout_s:
                slow.append(s)
        return dead, slow

    def _shards_named_by(self, e: BaseException) -> list[int]:
        """The shards whose actors a Ray error names (a restarting actor may not answer
        the probe in time, but the error itself says which actor it was)."""
        ids = set(re.findall(r"\b[0-9a-f]{32}\b", str(e)))
        actor_id = getattr(e, "actor_id", None)
        if actor_id:
            ids.add(str(actor_id))
        return [s for s, a in self.actors.items() if a._actor_id.hex() in ids]

    def _describe(self, shards: list[int]) -> str:
        return "; ".join(f"shard {s} (tables {self._tables_of(s)})" for s in shards)

    def _dag_failure(self, e: BaseException) -> ShardError | TierMemError:
        """The error for a batch whose graph execution failed; the graph is dropped (and
        rebuilt by the next batch once every shard answers)."""
        exc = self._ray.exceptions
        if isinstance(e, exc.RayTaskError):  # a shard raised
            # the graph is rebuilt all the same: results come back in execution order, and
            # a pipelined stream may leave another execution in flight behind this one
            self._drop_dag()
            cause = getattr(e, "cause", None)
            if isinstance(cause, TierMemError):
                return cause
            return ShardError(f"a shard failed: {cause!r}")
        dead, slow = self._probe()  # before the teardown, which waits for busy shards
        self._drop_dag()
        if not dead and isinstance(e, (TimeoutError, exc.GetTimeoutError)):
            who = self._describe(slow) or (
                "no shard was working on it: " + self._describe(self.router.active_shards)
                + " -- the batch")
            return ShardTimeoutError(f"{who} did not answer within "
                                     f"{self.options.timeout_s:g} s")
        who = self._describe(dead or self._shards_named_by(e)) or "a shard"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return ShardUnavailableError(
            f"{who} unavailable: {first}"
            + (" -- Ray is restarting it" if self.options.max_restarts != 0 else ""))

    def _dag_execute(self, f: SparseFeatures, hints: list[tuple[np.ndarray, np.ndarray]]
                     ) -> Any:
        with self._dag_lock:
            if self._dag is None:  # broken by a failure: rebuild once the shards answer
                dead, _ = self._probe(min(self.options.timeout_s, 5.0),
                                      restarted_failed=False)
                if dead:
                    raise ShardUnavailableError(f"{self._describe(dead)} unavailable: "
                                                "restarting or dead")
                self._dag = self._compile()
            with self._lock:
                self.batches += 1
                self.request_bytes += f.values.nbytes + f.offsets.nbytes
            msg = (f.values, f.offsets, f.weights, self.config.pooling.value, hints)
            try:
                return self._dag.execute(msg)
            except Exception as e:  # noqa: BLE001 - mapped to a shard error
                raise self._dag_failure(e) from None

    def _dag_result(self, f: SparseFeatures, ref: Any) -> np.ndarray:
        with self._dag_lock:
            try:
                outs = self._ray.get(ref, timeout=self.options.timeout_s)
            except Exception as e:  # noqa: BLE001 - mapped to a shard error
                raise self._dag_failure(e) from None
        return self.router.merge(f, dict(zip(self.router.active_shards, outs, strict=True)),
                                 self.config.pooling, self.dense.config.embedding_dim)

    # -- inference ---------------------------------------------------------------
    def _route(self, sparse: SparseFeatures | Mapping[str, Any]
               ) -> tuple[CheckedFeatures, list[ShardRequest]]:
        f = self.check(sparse)
        return f, self.router.split_batch(f)

    def _submit(self, requests: list[ShardRequest]) -> dict[int, Any]:
        mode = self.config.pooling.value
        refs = {r.shard: self.actors[r.shard].pool.remote(r.values, r.lengths, r.weights, mode)
                for r in requests}
        with self._lock:
            self.batches += 1
            for r in requests:
                self.request_bytes += r.nbytes
        return refs

    def _gather(self, f: SparseFeatures, refs: dict[int, Any]) -> np.ndarray:
        deadline = time.monotonic() + self.options.timeout_s
        outs = {s: self._get(s, ref, deadline) for s, ref in refs.items()}
        return self.router.merge(f, outs, self.config.pooling, self.dense.config.embedding_dim)

    def check(self, sparse: SparseFeatures | Mapping[str, Any]) -> CheckedFeatures:
        """The batch in the model's table order, every id checked once, here: the shards
        trust the parts the router cuts from it."""
        return check_batch(batch_features(sparse, self.table_names), self._rows,
                           self.config.bounds_check)

    @property
    def num_dense(self) -> int:
        return int(self.dense.config.num_dense)

    @property
    def bounds_check(self) -> BoundsCheck:
        return self.config.bounds_check

    def warmup(self, *, weighted: bool = True,
               batch_sizes: Sequence[int] | None = None) -> dict[str, Any]:
        """Compile the driver's part of a batch (the id check, the router's cut and merge,
        the MLPs) on synthetic batches; the shards compiled theirs when they started.
        Nothing is sent to the shards, so no counter moves."""
        t0 = time.perf_counter()
        before = kernel_census()
        D = self.dense.config.embedding_dim
        for B in batch_sizes or (1, 64):
            f = synthetic_batch(self.table_names, self._rows, int(B), weighted=weighted)
            f = self.check(f)
            reqs = self.router.split_batch(f)
            outs = {r.shard: np.zeros((B, sum(self.plan.tables[p.table].dim
                                             for p in self.router.pieces_of(r.shard))),
                                      np.float32) for r in reqs}
            pooled = self.router.merge(f, outs, self.config.pooling, D)
            run_dense(self.dense, dense_tensor(np.zeros((B, self.num_dense), np.float32),
                                               self.num_dense), pooled, self.config.num_threads)
        added = kernel_census().since(before)
        return {"seconds": time.perf_counter() - t0, "kernels_added": added.signatures,
                "compiled": added.compiled, "loaded_from_cache": added.loaded}

    def embed(self, sparse: SparseFeatures | Mapping[str, Any]) -> np.ndarray:
        """Pooled embeddings ``(B, T, D)`` in the model's table order."""
        f = self.check(sparse)
        if f.batch_size == 0:  # nothing to ask the shards
            return np.zeros((0, len(self.table_names), self.dense.config.embedding_dim),
                            np.float32)
        if self.options.transport == "compiled":
            with self._dag_lock:
                return self._dag_result(f, self._dag_execute(f, []))
        return self._gather(f, self._submit(self.router.split_batch(f)))

    def predict(self, dense: Any, sparse: SparseFeatures | Mapping[str, Any]) -> np.ndarray:
        """Click probabilities ``(B,)`` float32 for a batch."""
        d = dense_tensor(dense, self.dense.config.num_dense)
        return run_dense(self.dense, d, self.embed(sparse), self.config.num_threads)

    @property
    def table_rows(self) -> dict[str, int]:
        """Rows of each of the model's tables (valid ids are ``0 .. rows - 1``)."""
        return dict(zip(self.table_names, self._rows, strict=True))

    @property
    def prefetch_enabled(self) -> bool:
        """Whether :meth:`prefetch` reads ahead (the shards have prefetchers)."""
        return self.config.prefetch is not None

    def warm(self, profile: Mapping[str, np.ndarray]) -> int:
        """Fill the shards' caches from a popularity profile (table -> ids seen); rows loaded."""
        per_shard: dict[int, dict[str, np.ndarray]] = {}
        for table, ids in profile.items():
            if table not in self.plan.tables:
                raise ConfigError(f"warm-up profile names table {table!r}, which the plan "
                                  f"does not place")
            ids = np.asarray(ids, np.int64).reshape(-1)
            for p in self.plan.table_pieces(table):
                if p.shard not in self.actors:
                    continue
                local = ids[(ids >= p.row_start) & (ids < p.row_stop)] - p.row_start
                per_shard.setdefault(p.shard, {})[p.name] = local
        deadline = time.monotonic() + self.options.startup_timeout_s
        refs = {s: self.actors[s].warm.remote(prof) for s, prof in per_shard.items()}
        return int(sum(self._get(s, r, deadline) for s, r in refs.items()))

    def tier_metrics(self) -> TierMetrics:
        """The tier figures summed over the shards (per table, the pieces of a row-split
        table added up)."""
        deadline = time.monotonic() + self.options.timeout_s
        parts = [self._get(sh, a.tier_metrics.remote(), deadline)
                 for sh, a in self.actors.items()]
        return sum(parts, TierMetrics.empty(self.config.tier.kind.value))

    def prefetch(self, sparse: SparseFeatures | Mapping[str, Any]) -> None:
        """Announce a batch that will run soon: each shard reads its misses ahead."""
        if self.config.prefetch is None:
            return
        _, reqs = self._route(sparse)
        for r in reqs:
            self.actors[r.shard].prefetch.remote(r.values, r.lengths)

    def predict_stream(self, batches: Iterable[tuple[Any, SparseFeatures | Mapping[str, Any]]],
                       *, pipeline: bool = True) -> Iterator[np.ndarray]:
        """Predictions for a stream of batches, in order.

        With ``pipeline`` the shards already pool batch i+1 while the MLPs of
        batch i run here; with a prefetcher configured, the shards are told of
        batches up to ``lookahead`` ahead.
        """
        ahead = self.config.prefetch.lookahead if self.config.prefetch is not None else 0
        if self.options.transport == "compiled":
            yield from self._stream_compiled(batches, pipeline, ahead)
            return

        def prepare(batch: tuple[Any, SparseFeatures | Mapping[str, Any]]
                    ) -> tuple[torch.Tensor, CheckedFeatures, list[ShardRequest]]:
            f, reqs = self._route(batch[1])
            return dense_tensor(batch[0], self.num_dense), f, reqs

        def hint(item: tuple[torch.Tensor, CheckedFeatures, list[ShardRequest]]) -> None:
            for r in item[2]:
                self.actors[r.shard].prefetch.remote(r.values, r.lengths)

        yield from pipelined(
            batches, prepare, launch=lambda item, _later: self._submit(item[2]),
            finish=lambda item, refs: run_dense(self.dense, item[0], self._gather(item[1], refs),
                                                self.config.num_threads),
            overlap=pipeline, horizon=(2 if pipeline else 1) + ahead,
            hint=hint if ahead else None)

    def _stream_compiled(self, batches: Iterable[tuple[Any, Any]], pipeline: bool, ahead: int
                         ) -> Iterator[np.ndarray]:
        """The stream over the compiled graph: batch i+ahead rides along with batch i's
        launch as a prefetch hint. The graph is held for the whole stream (other
        callers wait)."""

        def launch(item: tuple[torch.Tensor, CheckedFeatures],
                   later: Sequence[tuple[torch.Tensor, CheckedFeatures]]) -> Any:
            hint = [(later[ahead - 1][1].values, later[ahead - 1][1].offsets)] \
                if ahead and len(later) >= ahead else []
            return self._dag_execute(item[1], hint)

        with self._dag_lock:
            yield from pipelined(
                batches, lambda b: (dense_tensor(b[0], self.num_dense), self.check(b[1])),
                launch,
                finish=lambda item, ref: run_dense(self.dense, item[0],
                                                   self._dag_result(item[1], ref),
                                                   self.config.num_threads),
                overlap=pipeline, horizon=(2 if pipeline else 1) + ahead)

    # -- measurements -----------------------------------------------------------------
    def cpu_seconds(self) -> dict[str, Any]:
        """CPU time used so far: this process, each shard process, and their sum."""
        deadline = time.monotonic() + self.options.timeout_s
        shards = {s: self._get(s, a.cpu_seconds.remote(), deadline)
                  for s, a in self.actors.items()}
        driver = _cpu_seconds()
        return {"driver": driver, "shards": shards, "total": driver + sum(shards.values())}

    @property
    def stats(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.options.timeout_s
        shards = [self._get(s, a.stats.remote(), deadline) for s, a in self.actors.items()]
        counts = np.zeros(self.plan.num_shards, np.int64)
        for st in shards:  # counted where the lookups were served (both transports)
            counts[st["shard"]] = st["lookups"]
        lk = counts[self.router.active_shards].astype(np.float64)
        return {"batches": self.batches, "request_bytes": self.request_bytes,
                "shard_lookups": counts.tolist(),
                "lookup_balance": float(lk.max() / lk.mean()) if lk.size and lk.mean() else 1.0,
                "shards": shards}

    def reset_stats(self) -> None:
        with self._lock:
            self.batches = 0
            self.request_bytes = 0
        deadline = time.monotonic() + self.options.timeout_s
        for s, a in self.actors.items():
            self._get(s, a.reset_stats.remote(), deadline)

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Stop the shard actors (and the local Ray cluster if this session started it)."""
        if self._closed:
            return
        self._closed = True
        self._drop_dag()
        for a in self.actors.values():
            try:
                self._ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = {}
        if self._owns_cluster:
            ray_shutdown()

    def __enter__(self) -> ShardedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
