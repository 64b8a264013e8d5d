"""Configuration of the tiers, as frozen dataclasses validated on creation."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from tiermem.errors import ConfigError

__all__ = ["Choice", "PoolingMode", "TierConfig", "TierKind", "parse_bytes"]

_BYTE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
               "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20,
               "gib": 1 << 30, "tib": 1 << 40}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(spec: str) -> int:
    """``"256MiB"``, ``"2GB"``, ``"1048576"`` -> bytes (k/M/G decimal, KiB/MiB/GiB binary).

    Raises ConfigError for anything else or less than one byte.
    """
    m = _BYTES_RE.match(str(spec))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _BYTE_UNITS or (_BYTE_UNITS[unit] == 1 and "." in m.group(1)):
        raise ConfigError(f"bad size {spec!r}: expected bytes like 1048576, 256MiB or 2GB")
    n = int(float(m.group(1)) * _BYTE_UNITS[unit])
    if n < 1:
        raise ConfigError(f"size {spec!r} must be at least 1 byte")
    return n


def parse_share_or_bytes(spec: str) -> tuple[str, float]:
    """``"30%"``/``"0.3"`` -> ``("share", 0.3)``; ``"2GiB"``/``"1048576"`` -> ``("bytes", n)``.

    The common form of sizes given either as a share of something or in bytes.
    ValueError/ConfigError for anything else; callers check the share's range.
    """
    s = str(spec).strip()
    if s.endswith("%"):
        share = float(s[:-1]) / 100.0
    elif re.fullmatch(r"0?\.\d+|1\.0*", s):
        share = float(s)
    else:
        return "bytes", parse_bytes(s)
    return "share", share


class Choice(str, Enum):
    """A string enum whose :meth:`parse` names the valid choices on a bad value."""

    @classmethod
    def parse(cls, value: Any) -> Any:
        """The member named ``value`` (case-insensitive); ConfigError listing the choices."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            what = re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()  # TierKind: tier kind
            raise ConfigError(f"unknown {what} {value!r}; expected one of: "
                              f"{', '.join(m.value for m in cls)}") from None


class TierKind(Choice):
    """Where the rows of the tables are read from."""

    DRAM = "dram"
    """The tables are loaded into memory."""
    SSD = "ssd"
    """Rows are read from the store's files with pread, per batch."""
    CXL = "cxl"
    """DRAM plus a latency/bandwidth model of a CXL memory expander."""


class PoolingMode(Choice):
    """How the rows of a bag are combined (torch.nn.EmbeddingBag's ``mode``)."""

    SUM = "sum"
    MEAN = "mean"


@dataclass(frozen=True)
class TierConfig:
    """How a store is served: the tier and its knobs."""

    kind: TierKind = TierKind.DRAM
    prefetch_distance: int = 48
    """Software prefetch distance of the SLS kernel, in lookups (0 = off). 48 measured
    best of 16-64 (bench/bench_sls.py); 16 was ~5-20% slower on 2-core Xeons."""
    io_threads: int = 64
    """SSD tier: Python threads issuing preads (each in a GIL-free Numba call)."""
    background_io_threads: int = 16
    """SSD tier: reads in flight for prefetching, apart from the demand reads."""
    coalesce_gap_bytes: int = 4096
    """SSD tier: merge reads of rows of one chunk file closer than this."""
    max_read_bytes: int = 1 << 20
    """SSD tier: largest single merged read."""
    direct_io: bool = False
    """SSD tier: open files O_DIRECT (bypass the OS page cache)."""
    cxl_latency_ns: float = 250.0
    """CXL tier: latency of one row access."""
    cxl_bandwidth_gbps: float = 32.0
    """CXL tier: link bandwidth, GB/s (1e9 bytes/s)."""
    cxl_outstanding: int = 16
    """CXL tier: accesses in flight (memory-level parallelism) the model assumes."""
    verify: bool = True
    """Check every block read against the store's checksums (tiermem/integrity.py)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TierKind.parse(self.kind))
        ints = {"prefetch_distance": 0, "io_threads": 1, "background_io_threads": 1,
                "coalesce_gap_bytes": 0,
                "max_read_bytes": 1, "cxl_outstanding": 1}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"TierConfig.{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.direct_io, bool):
            raise ConfigError(f"TierConfig.direct_io must be a bool, got {self.direct_io!r}")
        if not isinstance(self.verify, bool):
            raise ConfigError(f"TierConfig.verify must be a bool, got {self.verify!r}")
        if self.prefetch_distance > 4096:
            raise ConfigError(f"TierConfig.prefetch_distance must be <= 4096, got "
                              f"{self.prefetch_distance}")
        if self.io_threads > 1024:
            raise ConfigError(f"TierConfig.io_threads must be <= 1024, got {self.io_threads}")
        for name in ("cxl_latency_ns", "cxl_bandwidth_gbps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"TierConfig.{name} must be a number >= 0, got {v!r}")
        if self.cxl_bandwidth_gbps == 0:
            raise ConfigError("TierConfig.cxl_bandwidth_gbps must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TierConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown TierConfig field(s): {sorted(unknown)}")
        return cls(**d)
