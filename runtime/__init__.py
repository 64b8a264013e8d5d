"""tiermem runtime: the DLRM model, checkpoints, the inference session and the CLI.

The names below are loaded on first use (module ``__getattr__``), so that
``import runtime.cli`` -- the ``tiermem`` command -- does not pay for torch
before a command needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tiermem._lazy import lazy_names

if TYPE_CHECKING:
    from runtime.checkpoint import (
        Checkpoint,
        load_checkpoint,
        save_dlrm_checkpoint,
        save_torchrec_checkpoint,
    )
    from runtime.convert import store_from_checkpoint
    from runtime.model import DenseDLRM, DLRMConfig, random_dense
    from runtime.replay_model import CheckpointModel
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
    "CheckpointModel": "runtime.replay_model",
    "InferenceSession": "runtime.session",
    "RuntimeConfig": "runtime.session",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names("runtime", _LAZY, globals())
