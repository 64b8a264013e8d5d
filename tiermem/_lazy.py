"""Package namespaces whose public names load on first use (PEP 562).

``import tiermem`` / ``runtime`` / ``traces`` then costs nothing heavy (no
torch, numba or zarr) until a name is used, which is what keeps the
``tiermem`` command's ``--help`` and ``info`` instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, names: Mapping[str, str], namespace: dict[str, Any],
               extra: Mapping[str, Callable[[], Any]] | None = None
               ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a public name to the
    module defining it, ``extra`` a name to a function computing it; a name is looked up
    once, then cached in the package's ``namespace`` (its ``globals()``)."""
    extra = dict(extra or {})

    def __getattr__(name: str) -> Any:
        if name in extra:
            value = extra[name]()
        else:
            module = names.get(name)
            if module is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names) | set(extra))

    return __getattr__, __dir__
