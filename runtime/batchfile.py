"""Batch files for ``tiermem predict``: npz in, predictions out.

A batch file is an ``.npz`` with:

- ``dense``: ``(B, num_dense)`` float dense features;
- either ``values`` with ``offsets`` (``T * B + 1``) or ``lengths`` (``T * B``),
  optional ``weights`` and ``keys`` (table names; default: the model's table
  order), with KeyedJaggedTensor semantics;
- or ``sparse``: ``(B, T)`` integer ids, one per table and sample (the
  one-hot layout of preprocessed Criteo data).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tiermem.errors import InvalidBatchError
from tiermem.features import SparseFeatures

__all__ = ["load_batch", "save_batch", "write_predictions"]


def load_batch(path: str | os.PathLike[str], table_names: Sequence[str]
               ) -> tuple[np.ndarray, SparseFeatures]:
    """Read ``(dense, sparse)`` from a batch file; errors name the file and field."""
    p = Path(path)
    try:
        data = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidBatchError(f"batch file {p} does not exist") from None
    except (ValueError, OSError, EOFError) as e:
        raise InvalidBatchError(f"batch file {p} is not a readable .npz file ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InvalidBatchError(f"batch file {p} is a single .npy array, not an .npz archive "
                                "with 'dense' and sparse arrays")
    with data:
        files = set(data.files)
        if "dense" not in files:
            raise InvalidBatchError(f"batch file {p}: no 'dense' array (has {sorted(files)})")
        dense = data["dense"]
        keys = [str(k) for k in data["keys"]] if "keys" in files else list(table_names)
        try:
            if "sparse" in files:
                ids = np.asarray(data["sparse"])
                if ids.ndim != 2 or ids.shape[1] != len(keys):
                    raise InvalidBatchError(
                        f"'sparse' must have shape (B, {len(keys)}), got {ids.shape}")
                b = ids.shape[0]
                sparse = SparseFeatures.from_offsets(
                    keys, ids.T.reshape(-1), np.arange(ids.size + 1, dtype=np.int64))
                if sparse.batch_size != b:
                    raise InvalidBatchError("inconsistent 'sparse' shape")
            elif "values" in files and ("offsets" in files or "lengths" in files):
                w = data["weights"] if "weights" in files else None
                if "offsets" in files:
                    sparse = SparseFeatures.from_offsets(keys, data["values"], data["offsets"], w)
                else:
                    sparse = SparseFeatures.from_lengths(keys, data["values"], data["lengths"], w)
            else:
                raise InvalidBatchError(
                    "no sparse features: expected 'sparse', or 'values' with 'offsets'/'lengths'")
        except InvalidBatchError as e:
            raise InvalidBatchError(f"batch file {p}: {e}") from None
    return dense, sparse


def save_batch(path: str | os.PathLike[str], dense: np.ndarray, sparse: SparseFeatures) -> None:
    """Write a batch file (atomically) that :func:`load_batch` reads back."""
    arrays = {"dense": np.asarray(dense, np.float32), "keys": np.array(sparse.keys),
              "values": sparse.values, "offsets": sparse.offsets}
    if sparse.weights is not None:
        arrays["weights"] = sparse.weights
    # (no key is savez's allow_pickle: mypy cannot tell from the dict's type)
    _atomic(Path(path), lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def write_predictions(path: str | os.PathLike[str], preds: np.ndarray) -> None:
    """Write predictions as ``.npy``, or text (one per line) for ``.txt``/``.csv``."""
    p = Path(path)
    if p.suffix == ".npy":
        _atomic(p, lambda f: np.save(f, preds))
    elif p.suffix in (".txt", ".csv"):
        _atomic(p, lambda f: f.write("".join(f"{v:.8g}\n" for v in preds).encode()))
    else:
        raise InvalidBatchError(f"output {p}: use a .npy, .txt or .csv file name")


def _atomic(path: Path, write: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)  # type: ignore[operator]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
