"""Embedding-table presets: the row counts of well-known models' tables.

Below both the readers (:mod:`traces.formats`: Criteo ids are hashed modulo
a preset's rows) and the generator (:mod:`traces.synth`), so neither imports
the other for them.
"""

from __future__ import annotations

from tiermem.errors import ConfigError

__all__ = ["DLRMV2_MULTI_HOT", "TABLE_PRESETS", "table_preset"]

#: Embedding-table rows of the 26 Criteo features C1..C26 (facebookresearch/dlrm,
#: torchrec, MLPerf; see shared/data/criteo_cardinalities.json for the sources).
TABLE_PRESETS: dict[str, tuple[int, ...]] = {
    "criteo_kaggle": (
        1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
        14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572),
    "criteo_terabyte": (
        227605432, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 130229467, 3067956, 405282, 10,
        2209, 11938, 155, 4, 976, 14, 292775614, 40790948, 187188510, 590152, 12973, 108, 36),
    "dlrmv2": (
        40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
        2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36),
    "criteo_terabyte_40m": (
        39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
        2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36),
    "criteo_terabyte_10m": (
        9980333, 36084, 17217, 7378, 20134, 3, 7112, 1442, 61, 9758201, 1333352, 313829, 10,
        2208, 11156, 122, 4, 970, 14, 9994222, 7267859, 9946608, 415421, 12420, 101, 36),
}
TABLE_PRESETS["mlperf_dlrmv2"] = TABLE_PRESETS["dlrmv2"]
#: MLPerf DLRM-v2 synthetic multi-hot Criteo: ids per sample of each table (sum 214).
DLRMV2_MULTI_HOT: tuple[int, ...] = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1,
                                     12, 100, 27, 10, 3, 1, 1)


def table_preset(name: str) -> tuple[int, ...]:
    """Rows of a preset (``criteo_kaggle``, ``criteo_terabyte``, ``dlrmv2`` ...), or a
    comma-separated custom list such as ``"1000,50000,2000000"``."""
    if name in TABLE_PRESETS:
        return TABLE_PRESETS[name]
    try:
        rows = tuple(int(x) for x in name.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"unknown table preset {name!r}: expected one of "
                          f"{sorted(TABLE_PRESETS)} or a list like '1000,50000'") from None
    if not rows or min(rows) < 1:
        raise ConfigError(f"table rows must be >= 1, got {name!r}")
    return rows
