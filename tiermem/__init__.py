"""tiermem: a tiered embedding store (DRAM / SSD / CXL-emulated) with Numba SLS kernels.

The public API; everything else is internal and may change.
"""

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
from tiermem.quantize import RowDtype, dequantize_rows, quantize_rows
from tiermem.stats import TableStats, TierStats
from tiermem.tiers import CxlTier, DramTier, SsdTier, Tier, open_tier

__all__ = [
    "CapacityError",
    "ConfigError",
    "CxlTier",
    "DramTier",
    "InvalidBatchError",
    "PoolingMode",
    "RowDtype",
    "SparseFeatures",
    "SsdTier",
    "StoreError",
    "StoreFormatError",
    "StoreInfo",
    "StoreWriter",
    "TableInfo",
    "TableSpec",
    "TableStats",
    "Tier",
    "TierConfig",
    "TierKind",
    "TierMemError",
    "TierStats",
    "create_random_store",
    "create_store",
    "create_store_from_arrays",
    "dequantize_rows",
    "open_store",
    "open_tier",
    "quantize_rows",
]
