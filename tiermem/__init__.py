"""tiermem: a tiered embedding store (DRAM / SSD / CXL-emulated) with Numba SLS kernels.

The public API; everything else is internal and may change. The names are
loaded on first use (module ``__getattr__``), so that importing one light
submodule (``tiermem.errors``, ``tiermem.config``) does not pay for numba.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tiermem._lazy import lazy_names

if TYPE_CHECKING:
    from tiermem.batch import BoundsCheck, CheckedFeatures, check_batch
    from tiermem.config import PoolingMode, TierConfig, TierKind
    from tiermem.errors import (
        CapacityError,
        ConfigError,
        InvalidBatchError,
        StoreError,
        StoreFormatError,
        TierMemError,
    )
    from tiermem.features import SparseFeatures
    from tiermem.format import (
        StoreInfo,
        StoreWriter,
        TableInfo,
        TableSpec,
        create_random_store,
        create_store,
        create_store_from_arrays,
        open_store,
    )
    from tiermem.metrics import TierMetrics
    from tiermem.quantize import RowDtype, dequantize_rows, quantize_rows
    from tiermem.stats import TableStats, TierStats
    from tiermem.tiers import CxlTier, DramTier, SsdTier, Tier, open_tier

# public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(["PoolingMode", "TierConfig", "TierKind"], "tiermem.config"),
    **dict.fromkeys(["CapacityError", "ConfigError", "InvalidBatchError", "StoreError",
                     "StoreFormatError", "TierMemError"], "tiermem.errors"),
    "SparseFeatures": "tiermem.features",
    **dict.fromkeys(["BoundsCheck", "CheckedFeatures", "check_batch"], "tiermem.batch"),
    "TierMetrics": "tiermem.metrics",
    **dict.fromkeys(["StoreInfo", "StoreWriter", "TableInfo", "TableSpec", "create_random_store",
                     "create_store", "create_store_from_arrays", "open_store"], "tiermem.format"),
    **dict.fromkeys(["RowDtype", "dequantize_rows", "quantize_rows"], "tiermem.quantize"),
    **dict.fromkeys(["TableStats", "TierStats"], "tiermem.stats"),
    **dict.fromkeys(["CxlTier", "DramTier", "SsdTier", "Tier", "open_tier"], "tiermem.tiers"),
}

__all__ = sorted(_LAZY)


def _version() -> str:
    """The installed distribution's version; the checkout's pyproject.toml when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tiermem")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            with open(pyproject, "rb") as f:
                return str(tomllib.load(f)["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__getattr__, __dir__ = lazy_names("tiermem", _LAZY, globals(), {"__version__": _version})
