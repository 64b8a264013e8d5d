"""tiermem runtime: the DLRM model, checkpoints, the inference session and the CLI."""

from runtime.checkpoint import (
    Checkpoint,
    load_checkpoint,
    save_dlrm_checkpoint,
    save_torchrec_checkpoint,
)
from runtime.convert import store_from_checkpoint
from runtime.model import DenseDLRM, DLRMConfig, random_dense
from runtime.session import InferenceSession, RuntimeConfig

__all__ = [
    "Checkpoint",
    "DLRMConfig",
    "DenseDLRM",
    "InferenceSession",
    "RuntimeConfig",
    "load_checkpoint",
    "random_dense",
    "save_dlrm_checkpoint",
    "save_torchrec_checkpoint",
    "store_from_checkpoint",
]
