"""The inference session: DLRM dense part in torch, embeddings from a tiermem tier.

    dense (B, num_dense) ─► bottom MLP ─┐
    sparse (KJT) ─► tier.pool ─► (B, T, D) ─► interaction ─► top MLP ─► sigmoid

Thread-safe: ``predict`` may be called from several threads at once (the tier
and the kernels hold no per-call state; torch modules are read-only).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from runtime.checkpoint import load_checkpoint
from runtime.model import DenseDLRM, TracedDense
from runtime.pipeline import pipelined
from tiermem.batch import BoundsCheck, CheckedFeatures, check_batch
from tiermem.config import ConfigDict, PoolingMode, TierConfig
from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.format import open_store
from tiermem.kernels import resolve_threads
from tiermem.kernels import threads as kernel_threads
from tiermem.metrics import TierMetrics
from tiermem.stack import TierStack, open_stack
from tiermem.tiers import Tier

if TYPE_CHECKING:
    from tiermem.cache.cache import CacheConfig
    from tiermem.cache.prefetch import PrefetchConfig, Prefetcher

__all__ = ["InferenceSession", "RuntimeConfig"]


@dataclass(frozen=True)
class RuntimeConfig(ConfigDict):
    """How a model and its store are run."""

    tier: TierConfig = field(default_factory=TierConfig)
    """Which tier serves the embeddings, and its knobs."""
    num_threads: int | str | None = "auto"
    """Threads for the SLS kernels and torch: ``"auto"`` (each batch runs on the cores
    other processes leave idle, re-read every 100 ms: :mod:`tiermem.cpu`; next to a
    busy neighbour a batch on every core waits for the thread the neighbour preempts),
    an integer, or None (leave the libraries' defaults: every core)."""
    pooling: PoolingMode = PoolingMode.SUM
    """Bag pooling; DLRM uses sum."""
    bounds_check: BoundsCheck = BoundsCheck.FATAL
    """What an id outside its table does: ``fatal`` fails the batch naming it, ``warn``
    drops it from its bag with a logged warning (:mod:`tiermem.batch`). Every id is
    checked once, where the batch enters the session."""
    cache: CacheConfig | None = None
    """A DRAM cache in front of the tier (for ssd/cxl), or None."""
    prefetch: PrefetchConfig | None = None
    """A lookahead prefetcher feeding the cache (needs ``cache``), or None."""
    trace_dense: bool = True
    """Run the MLPs as one traced TorchScript call (``runtime.model.TracedDense``):
    bit-identical results, the GIL released once per batch instead of once per op.
    False: eager torch."""

    def __post_init__(self) -> None:
        # dicts too (from_dict, or typed by hand): the cache modules load only when used
        if isinstance(self.cache, Mapping):
            from tiermem.cache.cache import CacheConfig

            object.__setattr__(self, "cache", CacheConfig.from_dict(self.cache))
        if isinstance(self.prefetch, Mapping):
            from tiermem.cache.prefetch import PrefetchConfig

            object.__setattr__(self, "prefetch", PrefetchConfig.from_dict(self.prefetch))
        if self.prefetch is not None and self.cache is None:
            raise ConfigError("RuntimeConfig.prefetch needs a cache (RuntimeConfig.cache)")
        if isinstance(self.tier, Mapping):
            object.__setattr__(self, "tier", TierConfig.from_dict(self.tier))
        if not isinstance(self.tier, TierConfig):
            raise ConfigError(f"RuntimeConfig.tier must be a TierConfig, got {self.tier!r}")
        if self.num_threads is not None and self.num_threads != "auto" and (
                isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int)
                or self.num_threads < 1):
            raise ConfigError(f"RuntimeConfig.num_threads must be None, 'auto' or an integer "
                              f">= 1, got {self.num_threads!r}")
        object.__setattr__(self, "pooling", PoolingMode.parse(self.pooling))
        object.__setattr__(self, "bounds_check", BoundsCheck.parse(self.bounds_check))
        if not isinstance(self.trace_dense, bool):
            raise ConfigError(f"RuntimeConfig.trace_dense must be a bool, got "
                              f"{self.trace_dense!r}")


def batch_features(sparse: SparseFeatures | Mapping[str, Any],
                   table_names: Sequence[str]) -> SparseFeatures:
    """A batch's sparse part as :class:`SparseFeatures` in the model's table order."""
    if isinstance(sparse, Mapping):  # table -> (ids, offsets), or kjt.to_dict()
        sparse = SparseFeatures.from_tables(dict(sparse))
    elif not isinstance(sparse, SparseFeatures) and all(
            callable(getattr(sparse, m, None)) for m in ("keys", "values", "offsets")):
        sparse = _from_kjt(sparse)
    if not isinstance(sparse, SparseFeatures):
        raise InvalidBatchError(
            f"sparse must be SparseFeatures, a KeyedJaggedTensor, or a mapping of table -> "
            f"(ids, offsets) or JaggedTensor, got {type(sparse).__name__}")
    return sparse.select(table_names)


def _from_kjt(kjt: Any) -> SparseFeatures:
    """A KeyedJaggedTensor-like batch (key-major offsets, one stride for every key)."""
    vbe = getattr(kjt, "variable_stride_per_key", None)
    if callable(vbe) and vbe():
        raise InvalidBatchError("a KeyedJaggedTensor with a variable batch size per key is not "
                                "supported: every table needs the same B")
    weights_or_none = getattr(kjt, "weights_or_none", None)
    return SparseFeatures.from_offsets(
        list(kjt.keys()), kjt.values(), kjt.offsets(),
        weights_or_none() if callable(weights_or_none) else None)


def dense_tensor(dense: Any, num_dense: int) -> torch.Tensor:
    """Validated float32 ``(B, num_dense)`` tensor of a batch's dense features."""
    if isinstance(dense, torch.Tensor):
        t = dense.detach()
        if t.dim() != 2 or t.shape[1] != num_dense:
            raise InvalidBatchError(f"dense must have shape (B, {num_dense}), "
                                    f"got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise InvalidBatchError("dense features contain NaN or infinity")
        return t.float()
    # numpy input is checked in numpy: no torch op, so a serving thread does not give the
    # GIL away (and wait to get it back) for a validation
    arr = np.asarray(dense)
    if arr.dtype.kind not in "fiu":
        raise InvalidBatchError(f"dense must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != num_dense:
        raise InvalidBatchError(f"dense must have shape (B, {num_dense}), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InvalidBatchError("dense features contain NaN or infinity")
    return torch.from_numpy(arr)


def run_dense(model: DenseDLRM | TracedDense, dense: torch.Tensor, pooled: np.ndarray,
              num_threads: int | str | None = None) -> np.ndarray:
    """Click probabilities ``(B,)`` from dense features and pooled ``(B, T, D)`` embeddings.

    ``num_threads`` is re-applied to torch on every call: Numba's OpenMP layer
    shares libgomp with torch, and the kernels' thread setting overwrites it.
    """
    num_threads = resolve_threads(num_threads)
    if num_threads is not None and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    if pooled.shape[0] != dense.shape[0]:
        raise InvalidBatchError(f"dense has {dense.shape[0]} rows but the sparse features "
                                f"have batch size {pooled.shape[0]}")
    with torch.inference_mode():
        out = model(dense, torch.from_numpy(pooled))
    return out.numpy().astype(np.float32, copy=False)


class InferenceSession:
    """A DLRM model whose embedding tables are served by a tiermem tier.

    Build one with :meth:`open` (a checkpoint + a store) and call
    :meth:`predict` with dense features and :class:`SparseFeatures`.
    """

    def __init__(self, dense: DenseDLRM, tier: Tier | TierStack, table_names: Sequence[str],
                 config: RuntimeConfig | None = None) -> None:
        stack = tier if isinstance(tier, TierStack) else None
        top: Tier = tier.tier if isinstance(tier, TierStack) else tier
        self.dense = dense.eval()
        self.tier = top
        self.config = config or RuntimeConfig(tier=top.config)
        self.table_names: Sequence[str] = tuple(table_names)
        cfg = dense.config
        if len(self.table_names) != cfg.num_tables:
            raise ConfigError(f"the model has {cfg.num_tables} tables but "
                              f"{len(self.table_names)} table names were given")
        self._rows = []
        for name in self.table_names:
            spec = top.tables[top.table_index(name)].spec
            self._rows.append(spec.rows)
            if spec.dim != cfg.embedding_dim:
                raise ConfigError(f"table {name!r} has dim {spec.dim} in the store but the model "
                                  f"expects {cfg.embedding_dim}")
        if isinstance(self.config.num_threads, int):
            torch.set_num_threads(self.config.num_threads)
        self._forward: DenseDLRM | TracedDense = (
            TracedDense(self.dense) if self.config.trace_dense else self.dense)
        self.prefetcher: Prefetcher | None = stack.prefetcher if stack is not None else None
        if self.config.prefetch is not None and stack is None:
            from tiermem.cache.cache import CachedTier
            from tiermem.cache.prefetch import Prefetcher

            if not isinstance(top, CachedTier):
                raise ConfigError("prefetch needs a cached tier (RuntimeConfig.cache)")
            self.prefetcher = Prefetcher(top, self.config.prefetch)

    @classmethod
    def open(cls, model: str | os.PathLike[str], store: str | os.PathLike[str],
             config: RuntimeConfig | None = None, *, layout: str = "auto",
             table_map: Mapping[str, str] | None = None) -> InferenceSession:
        """Open a checkpoint (dense weights) and a store (embedding tables).

        The checkpoint's tables are matched to the store's by name
        (``table_map`` renames checkpoint names to store names); a store
        created from that checkpoint has the same names.
        """
        config = config or RuntimeConfig()
        ckpt = load_checkpoint(model, layout=layout)
        info = open_store(store)
        names = [(table_map or {}).get(n, n) for n in ckpt.table_names]
        missing = [n for n in names if n not in info.names]
        if missing:
            raise ConfigError(
                f"the store {info.path} lacks the model's table(s) {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; store tables: {info.names[:8]}")
        stack = open_stack(info, tier=config.tier, cache=config.cache, prefetch=config.prefetch)
        try:
            return cls(ckpt.build_dense(), stack, names, config)
        except BaseException:
            stack.close()
            raise

    # -- inference ---------------------------------------------------------
    def embed(self, sparse: SparseFeatures | Mapping[str, Any]) -> np.ndarray:
        """Pooled embeddings ``(B, T, D)`` in the model's table order."""
        return self._embed_features(self.check(sparse))

    def predict(self, dense: Any, sparse: SparseFeatures | Mapping[str, Any]) -> np.ndarray:
        """Click probabilities ``(B,)`` float32 for a batch."""
        dense_t = self._dense(dense)
        return self._mlp(dense_t, self.embed(sparse))

    def check(self, sparse: SparseFeatures | Mapping[str, Any]) -> CheckedFeatures:
        """The batch in the model's table order, every id checked (once: a batch checked
        already, e.g. by the batcher, passes through)."""
        return check_batch(batch_features(sparse, self.table_names), self._rows,
                           self.config.bounds_check)


    def _dense(self, dense: Any) -> torch.Tensor:
        return dense_tensor(dense, self.dense.config.num_dense)

    def prefetch(self, sparse: SparseFeatures | Mapping[str, Any]) -> None:
        """Announce a batch that will run soon: its missing rows are read ahead."""
        if self.prefetcher is None:
            return
        self.prefetcher.submit(self.check(sparse))

    def predict_stream(self, batches: Iterable[tuple[Any, SparseFeatures | Mapping[str, Any]]],
                       *, pipeline: bool = True) -> Iterator[np.ndarray]:
        """Predictions for a stream of ``(dense, sparse)`` batches, in order.

        With ``pipeline`` the embedding stage of batch i+1 runs (Numba, no
        GIL) while the MLPs of batch i run in torch, and the prefetcher (if
        configured) reads ahead for batches i+2 .. i+1+lookahead. Results are
        identical to calling :meth:`predict` on each batch in turn.
        """
        ahead = self.config.prefetch.lookahead if self.config.prefetch is not None else 0
        prefetcher = self.prefetcher

        def prepare(batch: tuple[Any, SparseFeatures | Mapping[str, Any]]
                    ) -> tuple[torch.Tensor, CheckedFeatures]:
            return self._dense(batch[0]), self.check(batch[1])

        with ThreadPoolExecutor(1, thread_name_prefix="tiermem-embed") as ex:
            yield from pipelined(
                batches, prepare,
                launch=lambda item, _later: ex.submit(self._embed_features, item[1]),
                finish=lambda item, fut: self._mlp(item[0], fut.result()),
                overlap=pipeline, horizon=2 + ahead,
                hint=(lambda item: prefetcher.submit(item[1]))
                if prefetcher is not None else None)

    def _embed_features(self, features: SparseFeatures) -> np.ndarray:
        with kernel_threads(self.config.num_threads):
            pooled = self.tier.pool(features, mode=self.config.pooling,
                                    bounds=self.config.bounds_check)
        # D spelled out: -1 is ambiguous for an empty batch (B = 0)
        return pooled.reshape(features.batch_size, len(self.table_names),
                              self.dense.config.embedding_dim)

    def _mlp(self, dense: torch.Tensor, pooled: np.ndarray) -> np.ndarray:
        return run_dense(self._forward, dense, pooled, self.config.num_threads)

    def warmup(self, *, weighted: bool = True,
               batch_sizes: Sequence[int] | None = None) -> dict[str, Any]:
        """Compile, or load from Numba's on-disk cache, every kernel this session's batches
        run, so that no measured or served batch pays for compilation.

        Runs synthetic batches through the whole path (id checks, the tier or
        cache with its miss path, the prefetcher, the MLPs): one sample (the
        serial kernels) and one batch large enough for the parallel kernels
        (when this session runs on more than one thread), unweighted and
        ``weighted`` (per-sample weights are a separate specialisation). A
        cache is warmed through a small scratch copy of itself and every
        counter is put back, so the session is left as it was: same cache
        content, same statistics. Returns seconds taken and the kernel
        specialisations it added (compiled now / loaded from the cache).
        See :mod:`tiermem.warmup`.
        """
        from tiermem.warmup import warm_tier

        T = len(self.table_names)
        num_dense = self.dense.config.num_dense

        def mlp(B: int, pooled: np.ndarray) -> None:
            dense = torch.zeros(B, num_dense)
            for _ in range(2):  # TorchScript profiles a graph's first runs
                self._mlp(dense, pooled.reshape(B, T, -1))

        return warm_tier(self.tier, names=self.table_names, pooling=self.config.pooling,
                         bounds=self.config.bounds_check,
                         # "auto" may run a batch on every core: compile the parallel kernels
                         num_threads=self.config.num_threads
                         if isinstance(self.config.num_threads, int) else None,
                         weighted=weighted, batch_sizes=batch_sizes,
                         prefetch=self.config.prefetch if self.prefetcher is not None else None,
                         on_pooled=mlp)

    def warm(self, profile: Mapping[str, np.ndarray]) -> int:
        """Fill the cache from a popularity profile (table -> ids seen); rows loaded."""
        from tiermem.cache.cache import CachedTier

        return int(self.tier.warm(dict(profile))) if isinstance(self.tier, CachedTier) else 0

    # -- lifetime ------------------------------------------------------------
    @property
    def table_rows(self) -> dict[str, int]:
        """Rows of each of the model's tables (valid ids are ``0 .. rows - 1``)."""
        return dict(zip(self.table_names, self._rows, strict=True))

    @property
    def num_dense(self) -> int:
        return int(self.dense.config.num_dense)

    @property
    def bounds_check(self) -> BoundsCheck:
        return self.config.bounds_check

    def tier_metrics(self) -> TierMetrics:
        """Reads of the tier and, with a cache, its hit counts and DRAM bytes."""
        return TierMetrics.from_tier(self.tier)

    @property
    def prefetch_enabled(self) -> bool:
        """Whether :meth:`prefetch` reads ahead (a prefetcher is configured)."""
        return self.prefetcher is not None

    @property
    def stats(self) -> dict[str, Any]:
        return self.tier.stats.to_dict()

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.tier.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
