"""The inference session: DLRM dense part in torch, embeddings from a tiermem tier.

    dense (B, num_dense) ─► bottom MLP ─┐
    sparse (KJT) ─► tier.pool ─► (B, T, D) ─► interaction ─► top MLP ─► sigmoid

Thread-safe: ``predict`` may be called from several threads at once (the tier
and the kernels hold no per-call state; torch modules are read-only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from runtime.checkpoint import load_checkpoint
from runtime.model import DenseDLRM
from tiermem.config import PoolingMode, TierConfig
from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.format import open_store
from tiermem.kernels import threads as kernel_threads
from tiermem.tiers import Tier, open_tier

__all__ = ["InferenceSession", "RuntimeConfig"]


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model and its store are run."""

    tier: TierConfig = field(default_factory=TierConfig)
    """Which tier serves the embeddings, and its knobs."""
    num_threads: int | None = None
    """Threads for the SLS kernels and torch (None: leave the libraries' defaults)."""
    pooling: PoolingMode = PoolingMode.SUM
    """Bag pooling; DLRM uses sum."""
    validate: bool = True
    """Check every id against its table size before pooling."""

    def __post_init__(self) -> None:
        if isinstance(self.tier, Mapping):
            object.__setattr__(self, "tier", TierConfig.from_dict(dict(self.tier)))
        if not isinstance(self.tier, TierConfig):
            raise ConfigError(f"RuntimeConfig.tier must be a TierConfig, got {self.tier!r}")
        if self.num_threads is not None and (
                isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int)
                or self.num_threads < 1):
            raise ConfigError(f"RuntimeConfig.num_threads must be None or >= 1, got "
                              f"{self.num_threads!r}")
        object.__setattr__(self, "pooling", PoolingMode.parse(self.pooling))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tier"] = self.tier.to_dict()
        d["pooling"] = self.pooling.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuntimeConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown RuntimeConfig field(s): {sorted(unknown)}")
        return cls(**d)


class InferenceSession:
    """A DLRM model whose embedding tables are served by a tiermem tier.

    Build one with :meth:`open` (a checkpoint + a store) and call
    :meth:`predict` with dense features and :class:`SparseFeatures`.
    """

    def __init__(self, dense: DenseDLRM, tier: Tier, table_names: Sequence[str],
                 config: RuntimeConfig | None = None) -> None:
        self.dense = dense.eval()
        self.tier = tier
        self.config = config or RuntimeConfig(tier=tier.config)
        self.table_names = tuple(table_names)
        cfg = dense.config
        if len(self.table_names) != cfg.num_tables:
            raise ConfigError(f"the model has {cfg.num_tables} tables but "
                              f"{len(self.table_names)} table names were given")
        for name in self.table_names:
            spec = tier.tables[tier.table_index(name)].spec
            if spec.dim != cfg.embedding_dim:
                raise ConfigError(f"table {name!r} has dim {spec.dim} in the store but the model "
                                  f"expects {cfg.embedding_dim}")
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)

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
        tier = open_tier(info, config.tier)
        try:
            return cls(ckpt.build_dense(), tier, names, config)
        except BaseException:
            tier.close()
            raise

    # -- inference ---------------------------------------------------------
    def embed(self, sparse: SparseFeatures | Mapping[str, Any]) -> np.ndarray:
        """Pooled embeddings ``(B, T, D)`` in the model's table order."""
        features = self._features(sparse)
        with kernel_threads(self.config.num_threads):
            pooled = self.tier.pool(features, mode=self.config.pooling,
                                    validate=self.config.validate)
        return pooled.reshape(features.batch_size, len(self.table_names), -1)

    def predict(self, dense: Any, sparse: SparseFeatures | Mapping[str, Any]) -> np.ndarray:
        """Click probabilities ``(B,)`` float32 for a batch."""
        dense_t = self._dense(dense)
        pooled = self.embed(sparse)
        if pooled.shape[0] != dense_t.shape[0]:
            raise InvalidBatchError(f"dense has {dense_t.shape[0]} rows but the sparse features "
                                    f"have batch size {pooled.shape[0]}")
        with torch.inference_mode():
            out = self.dense(dense_t, torch.from_numpy(pooled))
        return out.numpy().astype(np.float32, copy=False)

    def _features(self, sparse: SparseFeatures | Mapping[str, Any]) -> SparseFeatures:
        if isinstance(sparse, Mapping):
            sparse = SparseFeatures.from_tables(dict(sparse))
        if not isinstance(sparse, SparseFeatures):
            raise InvalidBatchError(
                f"sparse must be SparseFeatures or a mapping of table -> (ids, offsets), got "
                f"{type(sparse).__name__}")
        return sparse.select(self.table_names)

    def _dense(self, dense: Any) -> torch.Tensor:
        if isinstance(dense, torch.Tensor):
            t = dense.detach()
        else:
            arr = np.asarray(dense)
            if arr.dtype.kind not in "fiu":
                raise InvalidBatchError(f"dense must be numeric, got dtype {arr.dtype}")
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if t.dim() != 2 or t.shape[1] != self.dense.config.num_dense:
            raise InvalidBatchError(f"dense must have shape (B, {self.dense.config.num_dense}), "
                                    f"got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise InvalidBatchError("dense features contain NaN or infinity")
        return t.float()

    # -- lifetime ------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        return self.tier.stats.to_dict()

    def close(self) -> None:
        self.tier.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
