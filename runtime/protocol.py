"""What the serving layers need of a session: the :class:`Session` protocol.

The batcher, the serving runtime, the HTTP server and the CLI run one local
:class:`~runtime.session.InferenceSession` or a Ray-sharded
:class:`~runtime.distributed.sharded.ShardedSession` through this contract
alone (no ``getattr``/``hasattr`` probing). ``tests/test_session.py`` checks
that both implement it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tiermem.batch import BoundsCheck, CheckedFeatures
from tiermem.features import SparseFeatures
from tiermem.metrics import TierMetrics

__all__ = ["Session", "SparseInput"]

SparseInput = SparseFeatures | Mapping[str, Any]
"""A batch's sparse part as callers give it: SparseFeatures, a mapping table ->
``(ids, offsets)`` or JaggedTensor, or (sessions only) a KeyedJaggedTensor."""


@runtime_checkable
class Session(Protocol):
    """A model and its embedding tables, ready to score batches."""

    table_names: Sequence[str]
    """The model's tables, in the order of its embedding inputs."""

    @property
    def table_rows(self) -> dict[str, int]: ...

    @property
    def num_dense(self) -> int: ...

    @property
    def bounds_check(self) -> BoundsCheck: ...

    @property
    def prefetch_enabled(self) -> bool: ...

    @property
    def stats(self) -> dict[str, Any]: ...

    def check(self, sparse: SparseInput) -> CheckedFeatures:
        """The batch in the model's table order with every id checked (once)."""
        ...

    def predict(self, dense: Any, sparse: SparseInput) -> np.ndarray: ...

    def embed(self, sparse: SparseInput) -> np.ndarray: ...

    def prefetch(self, sparse: SparseInput) -> None: ...

    def predict_stream(self, batches: Iterable[tuple[Any, SparseInput]], *,
                       pipeline: bool = True) -> Iterator[np.ndarray]: ...

    def warmup(self, *, weighted: bool = True,
               batch_sizes: Sequence[int] | None = None) -> dict[str, Any]: ...

    def warm(self, profile: Mapping[str, np.ndarray]) -> int: ...

    def tier_metrics(self) -> TierMetrics: ...

    def close(self) -> None: ...
