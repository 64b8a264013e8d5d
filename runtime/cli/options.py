"""Command-line options generated from config dataclasses: a flag per field, so that a flag
and its field cannot drift apart.

    max_queue_delay_ms: float | None = None
    \"\"\"A bound on the queue in time ...\"\"\"      ->  --max-queue-delay-ms MS (float, default
                                                     None, help: the field's docstring)

A :class:`~tiermem.config.Choice` enum field gets ``choices``, a bool ``--x/--no-x``, a
nested config dataclass field its own fields as flags (flattened). Each value is checked by
the class's own ``__post_init__`` as it is parsed, so a bad one is an argparse error naming
the flag; :meth:`ConfigOptions.build` makes the config object from the parsed namespace.

The classes are read from their source with :mod:`ast`, not imported: the config modules
import numpy and Numba, and ``tiermem serve --help`` must not (tests/test_cli_startup.py).
The class is imported when a value is checked or the config is built.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import functools
import importlib
import importlib.util
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiermem.errors import ConfigError

__all__ = ["ConfigOptions", "FieldSpec", "config_fields"]

_NO_DEFAULT = object()
_SCALARS = {"int", "float", "bool", "str"}
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Pow: operator.pow, ast.LShift: operator.lshift}


@dataclass(frozen=True)
class FieldSpec:
    """One field of a config dataclass, as its source declares it."""

    name: str
    kind: str
    """int, float, bool, str, choice (a Choice/Enum) or config (a nested dataclass)."""
    optional: bool
    """``X | None``: the flag may be left out and the field stays None."""
    default: Any
    """The default (an enum's as its value); ``None`` for a nested config."""
    help: str
    choices: tuple[str, ...] = ()
    config: str | None = None
    """``module:Class`` of a nested config dataclass."""


# -- reading a class from its source ------------------------------------------------------

@functools.cache
def _module_tree(module: str) -> ast.Module:
    """The parsed source of ``module``, found without importing it (importing a package
    runs its ``__init__``: only the top-level package is imported, and ours are light)."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"cannot find the source of module {module!r}")
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base.joinpath(*rest.split(".")) if rest else base
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _lookup(module: str, name: str) -> tuple[str, ast.stmt | None]:
    """Where ``name`` used in ``module`` is defined: (module, its ClassDef or Assign), following
    ``from X import name``; (X, None) for a name from outside our sources (e.g. ``enum``)."""
    for node in _module_tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return module, node
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    if node.module.split(".")[0] not in ("tiermem", "runtime", "traces"):
                        return node.module, None
                    return _lookup(node.module, alias.name)
    if name in vars(builtins):
        return "builtins", None
    raise ConfigError(f"{module}: cannot resolve {name!r} in its source")


def _is_enum(module: str, cls: ast.ClassDef) -> bool:
    for base in cls.bases:
        if isinstance(base, ast.Attribute) and base.attr in ("Enum", "StrEnum"):  # enum.Enum
            return True
        if isinstance(base, ast.Name):
            where, node = _lookup(module, base.id)
            if node is None and base.id in ("Enum", "StrEnum"):
                return True
            if isinstance(node, ast.ClassDef) and _is_enum(where, node):
                return True
    return False


def _is_dataclass(cls: ast.ClassDef) -> bool:
    return any((d.func if isinstance(d, ast.Call) else d).id == "dataclass"  # type: ignore[attr-defined]
               for d in cls.decorator_list
               if isinstance(d.func if isinstance(d, ast.Call) else d, ast.Name))


def _enum_members(cls: ast.ClassDef) -> dict[str, str]:
    return {t.id: n.value.value for n in cls.body if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
            for t in n.targets if isinstance(t, ast.Name)}


def _value(module: str, node: ast.expr) -> Any:
    """The value of a default written as a constant expression (``1 << 24``, ``-1.0``,
    ``TierKind.DRAM`` -> ``"dram"``, a module constant)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(module, node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_value(module, node.left), _value(module, node.right))
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        where, cls = _lookup(module, node.value.id)
        if isinstance(cls, ast.ClassDef) and node.attr in _enum_members(cls):
            return _enum_members(cls)[node.attr]
    if isinstance(node, ast.Name):
        where, assign = _lookup(module, node.id)
        if isinstance(assign, (ast.Assign, ast.AnnAssign)) and assign.value is not None:
            return _value(where, assign.value)
    raise ConfigError(f"{module}: a default the CLI cannot read: {ast.unparse(node)}")


def _field(module: str, cls_name: str, name: str, ann: ast.expr, default: ast.expr | None,
           doc: str) -> FieldSpec:
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):  # a quoted annotation
        ann = ast.parse(ann.value, mode="eval").body
    optional = False
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        parts = [ann.left, ann.right]
        rest = [p for p in parts if not (isinstance(p, ast.Constant) and p.value is None)]
        optional = len(rest) < len(parts)
        ann = rest[0] if len(rest) == 1 else ann
    if not isinstance(ann, ast.Name):
        raise ConfigError(f"{cls_name}.{name}: no command-line option for a field of type "
                          f"{ast.unparse(ann)} (exclude it, or give it a scalar type)")
    if isinstance(default, ast.Call) and isinstance(default.func, ast.Name) \
            and default.func.id == "field":
        kw = {k.arg: k.value for k in default.keywords}
        default = kw.get("default")
    value = _NO_DEFAULT if default is None else _value(module, default)
    if ann.id in _SCALARS:
        return FieldSpec(name, ann.id, optional, value, doc)
    where, node = _lookup(module, ann.id)
    if isinstance(node, ast.ClassDef) and _is_enum(where, node):
        members = tuple(_enum_members(node).values())
        return FieldSpec(name, "choice", optional, value,
                         doc or " ".join((ast.get_docstring(node) or "").split()), members)
    if isinstance(node, ast.ClassDef) and _is_dataclass(node):
        return FieldSpec(name, "config", optional, None, doc, config=f"{where}:{ann.id}")
    raise ConfigError(f"{cls_name}.{name}: no command-line option for type {ann.id}")


def attribute_docstrings(cls: ast.ClassDef) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal right after the field in
    the class body), whitespace folded."""
    body = cls.body
    out = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


@functools.cache
def config_fields(ref: str) -> tuple[FieldSpec, ...]:
    """The fields of the dataclass ``module:Class``, read from its source (cached)."""
    module, _, name = ref.partition(":")
    where, cls = _lookup(module, name)
    if not isinstance(cls, ast.ClassDef) or not _is_dataclass(cls):
        raise ConfigError(f"{ref} is not a dataclass")
    docs = attribute_docstrings(cls)
    out = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and "ClassVar" not in ast.unparse(node.annotation):
            out.append(_field(where, name, node.target.id, node.annotation, node.value,
                              docs.get(node.target.id, "")))
    return tuple(out)


def _import(ref: str) -> type:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# -- the options ---------------------------------------------------------------------------

def _scalar(kind: str) -> Callable[[str], Any]:
    def parse(s: str) -> Any:
        if kind == "int":
            try:
                return int(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if kind == "float":  # nan and inf too: the class's check names the field
            try:
                return float(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        return s
    return parse


def _checked(parse: Callable[[str], Any], ref: str, name: str, default: Any,
             probe: Mapping[str, Any]) -> Callable[[str], Any]:
    """``parse``, then the value checked by constructing the class with it (its own
    ``__post_init__`` words the message). The default is not checked: argparse parses a
    string default too, and that would import the class for every run."""
    def check(s: str) -> Any:
        v = parse(s)
        if s == default:
            return v
        try:
            _import(ref)(**{**probe, name: v})
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return v
    check.__name__ = parse.__name__
    return check


class ConfigOptions:
    """The options of one config dataclass on a parser (or argument group), and the config
    built back from the parsed namespace.

    ``prefix`` goes before every flag (``prefetch``: ``--prefetch-lookahead``), ``names``
    gives a field's flag instead (``{"kind": "tier"}``: ``--tier``, no prefix), ``exclude``
    lists fields without a flag (set by the caller through :meth:`build`), ``defaults``
    and ``types`` override a field's default or its argparse type (which then is the whole
    check) for this command, ``notes`` add to a field's help, ``probe`` are the other
    keyword arguments the class needs to check one value alone (e.g. a cache size).
    """

    def __init__(self, parser: Any, ref: str, *, prefix: str = "",
                 names: Mapping[str, str] | None = None, exclude: Iterable[str] = (),
                 defaults: Mapping[str, Any] | None = None,
                 types: Mapping[str, Callable[[str], Any]] | None = None,
                 probe: Mapping[str, Any] | None = None,
                 notes: Mapping[str, str] | None = None) -> None:
        self.ref = ref
        self._dests: dict[str, str] = {}  # field -> namespace attribute
        self._nested: dict[str, ConfigOptions] = {}
        names, defaults, types = dict(names or {}), dict(defaults or {}), dict(types or {})
        notes = dict(notes or {})
        excluded = set(exclude)
        known = {f.name for f in config_fields(ref)}
        for what, given in (("names", names), ("defaults", defaults), ("types", types),
                            ("notes", notes), ("exclude", excluded)):
            stray = set(given) - known - {k for f in config_fields(ref) if f.kind == "config"
                                          for k in {g.name for g in config_fields(f.config)}}
            if stray:
                raise ConfigError(f"{ref}: {what} names no field: {sorted(stray)}")
        for f in config_fields(ref):
            if f.name in excluded:
                continue
            if f.kind == "config":
                sub = {k: v for k, v in names.items() if k not in known}
                self._nested[f.name] = ConfigOptions(
                    parser, f.config or "", prefix=prefix, names=sub,
                    exclude=excluded - known, probe=dict(probe or {}),
                    defaults={k: v for k, v in defaults.items() if k not in known},
                    notes={k: v for k, v in notes.items() if k not in known},
                    types={k: v for k, v in types.items() if k not in known})
                continue
            flag = names.get(f.name) or (f"{prefix}_{f.name}" if prefix else f.name)
            flag = flag.replace("_", "-")
            dest = flag.replace("-", "_")
            default = defaults.get(f.name, f.default)
            required = default is _NO_DEFAULT
            help_ = f.help.replace("``", "").replace("%", "%%")  # docstring markup off
            if f.name in notes:
                help_ = f"{help_} ({notes[f.name]})".lstrip()
            if default is not None and default is not _NO_DEFAULT \
                    and not isinstance(default, bool):
                help_ += f" (default: {default})"
            kw: dict[str, Any] = {"dest": dest, "help": help_ or None}
            if f.kind == "bool":
                kw.update(action=argparse.BooleanOptionalAction,
                          default=bool(default) if not required else None)
            else:
                parse = types.get(f.name) or _checked(
                    _scalar("str" if f.kind == "choice" else f.kind), ref, f.name, default,
                    probe or {})
                kw.update(type=parse, required=required,
                          default=None if required else default)
                if f.kind == "choice":
                    kw["choices"] = f.choices
            parser.add_argument(f"--{flag}", **kw)
            self._dests[f.name] = dest

    @property
    def dests(self) -> dict[str, str]:
        """field -> namespace attribute, nested configs' fields included."""
        out = dict(self._dests)
        for sub in self._nested.values():
            out.update(sub.dests)
        return out

    def _kwargs(self, args: argparse.Namespace, fixed: dict[str, Any]) -> dict[str, Any]:
        own = {f.name for f in config_fields(self.ref)}
        kw = {f: getattr(args, d) for f, d in self._dests.items()}
        for f, sub in self._nested.items():
            kw[f] = _import(sub.ref)(**sub._kwargs(args, {k: v for k, v in fixed.items()
                                                          if k not in own}))
        kw.update({k: v for k, v in fixed.items() if k in own})
        return kw

    def build(self, args: argparse.Namespace, **fixed: Any) -> Any:
        """The config from the parsed flags; ``fixed`` sets fields (excluded ones, or those
        of a nested config) too. A field's bad value names the field's flag."""
        try:
            return _import(self.ref)(**self._kwargs(args, dict(fixed)))
        except ConfigError as e:
            msg = str(e)
            for f, d in self.dests.items():
                msg = re.sub(rf"\b\w+Config\.{f}\b", "--" + d.replace("_", "-"), msg)
            raise ConfigError(msg) from None
