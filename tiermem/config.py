"""Configuration of the tiers, as frozen dataclasses validated on creation, and what every
config dataclass shares: :class:`Choice` enums for closed sets of names, :class:`ConfigDict`
(``to_dict``/``from_dict`` in one place)."""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import functools
import inspect
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, TypeVar

from tiermem.errors import ConfigError

__all__ = ["Choice", "ConfigDict", "PoolingMode", "TierConfig", "TierKind", "parse_bytes"]

_C = TypeVar("_C")

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
    """A string enum whose :meth:`parse` names the valid choices on a bad value.

    A member equals its value (``TierKind.DRAM == "dram"``) and prints as it
    (``f"{kind}"`` is ``dram``), so code and messages written for the strings keep working.
    """

    __str__ = str.__str__

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

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



# -- to_dict / from_dict ---------------------------------------------------------------------

def _public(f: dataclasses.Field[Any]) -> bool:
    """A field a dict holds: given to the constructor, not private (``_split``)."""
    return f.init and not f.name.startswith("_")


def _plain(v: Any) -> Any:
    """``v`` as JSON holds it: enums as values, dataclasses as dicts, tuples as lists."""
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, ConfigDict):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v) if _public(f)}
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


@functools.cache
def _type_checking_names(module_name: str) -> dict[str, Any]:
    """The names a module imports under ``if TYPE_CHECKING:`` (to keep its own import
    light), imported now: annotations such as ``cache: CacheConfig | None`` resolve."""
    module = sys.modules.get(module_name)
    try:
        tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    except (OSError, TypeError, SyntaxError):
        return {}
    ns: dict[str, Any] = {"__name__": module_name,
                          "__package__": getattr(module, "__package__", None)}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
                "TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for imp in node.body:
                if isinstance(imp, (ast.Import, ast.ImportFrom)):
                    try:
                        exec(compile(ast.Module([imp], []), module_name, "exec"), ns)
                    except Exception:  # noqa: BLE001 - an optional dependency: unresolved
                        pass
    return {k: v for k, v in ns.items() if not k.startswith("__")}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation resolved (None where it cannot be: such a value is passed
    on as given, for the class's ``__post_init__`` to check)."""
    local: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        local.update(_type_checking_names(klass.__module__))
    try:
        return typing.get_type_hints(cls, localns=local)
    except Exception:  # noqa: BLE001 - one field at a time below
        pass
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        ns = vars(sys.modules.get(klass.__module__, object()))
        for name, ann in vars(klass).get("__annotations__", {}).items():
            try:
                out[name] = eval(ann, ns, {**local, **vars(klass)}) if isinstance(ann, str) \
                    else ann
            except Exception:  # noqa: BLE001
                out[name] = None
    return out


def _build(tp: Any, v: Any) -> Any:
    """``v`` (from JSON) as the field type ``tp`` wants it: a nested dataclass from a dict,
    a tuple from a list, an enum from its value; anything else as given (the class's
    ``__post_init__`` checks it)."""
    if v is None or tp is None:
        return v
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        opts = [a for a in args if a is not type(None)]
        for a in opts:  # the first option the value's shape fits
            o = typing.get_origin(a) or a
            if isinstance(v, Mapping) and (dataclasses.is_dataclass(o) or o in _MAPPINGS):
                return _build(a, v)
            if isinstance(v, list | tuple) and o in (tuple, list):
                return _build(a, v)
            if isinstance(v, str) and isinstance(o, type) and issubclass(o, Choice):
                return _build(a, v)
        return v
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(v, Mapping):
        return tp.from_dict(v) if issubclass(tp, ConfigDict) else _from_dict(tp, v)
    if isinstance(tp, type) and issubclass(tp, Choice):
        return tp.parse(v)
    if origin in (tuple, list) and isinstance(v, list | tuple):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], x) for x in v)
        if origin is tuple and args and len(args) == len(v):
            return tuple(_build(a, x) for a, x in zip(args, v, strict=True))
        return origin(_build(args[0] if args else None, x) for x in v)
    if origin in _MAPPINGS and isinstance(v, Mapping):
        return {k: _build(args[1] if len(args) == 2 else None, x) for k, x in v.items()}
    return v


_MAPPINGS = (dict, collections.abc.Mapping)


def _from_dict(cls: type[_C], d: Any) -> _C:
    name = cls.__name__
    if not isinstance(d, Mapping):
        raise ConfigError(f"{name}: expected a mapping (a JSON object), got {type(d).__name__}")
    own = [f for f in fields(cls) if _public(f)]  # type: ignore[arg-type]
    known = [f.name for f in own]
    unknown = sorted((k for k in d if k not in known), key=str)
    if unknown:
        raise ConfigError(f"unknown {name} field(s): {unknown}; known: {', '.join(known)}")
    missing = [f.name for f in own if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing {name} field(s): {missing}")
    hints = _field_types(typing.cast(type, cls))
    return cls(**{k: _build(hints.get(k), v) for k, v in d.items()})


class ConfigDict:
    """``to_dict``/``from_dict`` of a config dataclass, written once.

    :meth:`to_dict` gives JSON's types (enums as their values, nested configs as dicts,
    tuples as lists); :meth:`from_dict` takes such a mapping back: an unknown key is a
    :class:`ConfigError` naming it, the class and its fields, a nested config is built from
    its dict, an enum from its value (:meth:`Choice.parse` names the choices). Classes with
    a file format of their own override them, calling these.
    """

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name))
                for f in fields(self) if _public(f)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        return _from_dict(cls, d)


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
class TierConfig(ConfigDict):
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
