"""tiermem runtime: the DLRM model, checkpoints, the inference session and the CLI.

The names below are loaded on first use (module ``__getattr__``), so that
``import runtime.cli`` -- the ``tiermem`` command -- does not pay for torch
before a command needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.checkpoint import (
        Checkpoint,
        load_checkpoint,
        save_dlrm_checkpoint,
        save_torchrec_checkpoint,
    )
    from runtime.convert import store_from_checkpoint
    from runtime.model import DenseDLRM, DLRMConfig, random_dense
    from runtime.session import InferenceSession, RuntimeConfig

# public name -> the module that defines it
_LAZY = {
    "Checkpoint": "runtime.checkpoint",
    "load_checkpoint": "runtime.checkpoint",
    "save_dlrm_checkpoint": "runtime.checkpoint",
    "save_torchrec_checkpoint": "runtime.checkpoint",
    "store_from_checkpoint": "runtime.convert",
    "DenseDLRM": "runtime.model",
    "DLRMConfig": "runtime.model",
    "random_dense": "runtime.model",
    "InferenceSession": "runtime.session",
    "RuntimeConfig": "runtime.session",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
