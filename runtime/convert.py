"""Stores from checkpoints: stream a checkpoint's embedding tables to disk."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.checkpoint import load_checkpoint
from tiermem.format import StoreInfo, create_store_from_arrays
from tiermem.quantize import RowDtype

__all__ = ["store_from_checkpoint"]


def store_from_checkpoint(checkpoint: str | os.PathLike[str], store: str | os.PathLike[str], *,
                          layout: str = "auto", dtype: RowDtype | str = RowDtype.FLOAT32,
                          overwrite: bool = False, progress: bool = False,
                          block_rows: int = 65536) -> StoreInfo:
    """Write the embedding tables of a DLRM/TorchRec checkpoint as a tiermem store.

    The checkpoint is memory-mapped and its tables are copied in blocks of
    ``block_rows`` rows, so a checkpoint larger than RAM converts too. Table
    names are the checkpoint's (``InferenceSession.open`` matches by name).
    """
    ckpt = load_checkpoint(checkpoint, layout=layout)
    tables = dict(zip(ckpt.table_names, ckpt.tables, strict=True))
    attrs = {"source": str(Path(checkpoint)), "layout": ckpt.layout,
             "model": ckpt.config.to_dict()}
    return create_store_from_arrays(store, tables, dtype=dtype, overwrite=overwrite,
                                    progress=progress, block_rows=block_rows, attrs=attrs)
