"""Tiers that serve a store's rows: DRAM, SSD (pread) and CXL-emulated."""

from __future__ import annotations

from tiermem.config import TierConfig, TierKind
from tiermem.format import StoreInfo
from tiermem.tiers.base import Tier
from tiermem.tiers.cxl import CxlTier
from tiermem.tiers.dram import DramTier
from tiermem.tiers.ssd import SsdTier

__all__ = ["CxlTier", "DramTier", "SsdTier", "Tier", "open_tier"]

_TIERS: dict[TierKind, type[Tier]] = {
    TierKind.DRAM: DramTier,
    TierKind.SSD: SsdTier,
    TierKind.CXL: CxlTier,
}


def open_tier(store: StoreInfo, config: TierConfig | None = None, **kwargs: object) -> Tier:
    """Open the tier ``config.kind`` over a validated store."""
    config = config or TierConfig()
    return _TIERS[config.kind](store, config, **kwargs)
