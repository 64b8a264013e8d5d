"""A DLRM checkpoint as the model of a trace replay (``traces.replay.replay(model=...)``).

``traces`` sits below ``runtime`` and cannot open a checkpoint; the caller
(the ``tiermem replay`` command, a test, a script) builds this and hands it
down, and the replay opens it over the tier, cache and prefetcher it chose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tiermem.config import TierConfig
from tiermem.errors import ConfigError

if TYPE_CHECKING:
    from runtime.session import InferenceSession
    from tiermem.cache.cache import CacheConfig
    from tiermem.cache.prefetch import PrefetchConfig
    from tiermem.format import StoreInfo

__all__ = ["CheckpointModel"]


@dataclass(frozen=True)
class CheckpointModel:
    """A checkpoint to open as an :class:`~runtime.session.InferenceSession` (a
    :class:`traces.replay.ReplayModel`); checked to exist when built, before a replay
    opens anything."""

    path: str | os.PathLike[str]
    layout: str = "auto"
    """Checkpoint layout, as :func:`runtime.checkpoint.load_checkpoint` takes it."""

    def __post_init__(self) -> None:
        if not Path(self.path).exists():
            raise ConfigError(f"model checkpoint {self.path} does not exist")

    @property
    def name(self) -> str:
        """The path, as the replay report names the model."""
        return str(self.path)

    def open(self, store: StoreInfo, *, tier: TierConfig, cache: CacheConfig | None,
             prefetch: PrefetchConfig | None) -> InferenceSession:
        from runtime.session import InferenceSession, RuntimeConfig

        return InferenceSession.open(self.path, store.path, RuntimeConfig(
            tier=tier, cache=cache, prefetch=prefetch), layout=self.layout)
