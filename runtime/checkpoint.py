"""Load DLRM checkpoints of the two common layouts, embedding tables memory-mapped.

A checkpoint is a state dict saved with :func:`torch.save`, possibly wrapped
(``{"state_dict": ...}`` or ``{"model_state_dict": ...}``, as training scripts
write them). Two key layouts are understood:

``"dlrm"`` -- facebookresearch/dlrm ``dlrm_s_pytorch.py`` (``DLRM_Net``)::

    emb_l.{k}.weight              (rows_k, D)   k = 0 .. T-1, table k = sparse feature k
    bot_l.{i}.weight / .bias      nn.Sequential index i; Linear layers sit at
    top_l.{i}.weight / .bias      even i because ReLU/Sigmoid are interleaved

``"torchrec"`` -- TorchRec ``torchrec.models.dlrm.DLRM``::

    sparse_arch.embedding_bag_collection.embedding_bags.<name>.weight   (rows, D)
    dense_arch.model._mlp.{i}._linear.weight / .bias                    DenseArch MLP
    over_arch.model.0._mlp.{i}._linear.weight / .bias                   OverArch MLP
    over_arch.model.1.weight / .bias                                    final Linear

with an optional ``model.`` prefix (``DLRMTrain`` wraps ``DLRM`` as
``self.model``) or ``module.`` prefix (``DistributedDataParallel``).

Loading uses ``torch.load(..., weights_only=True, mmap=True)``: the tensors
are views of a private file mapping, so embedding tables are paged in on
first touch rather than read up front. Legacy (non-zip) files cannot be
mapped and are read normally.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from runtime.model import DenseDLRM, DLRMConfig, Interaction, random_dense
from tiermem.atomicio import chmod_default
from tiermem.errors import ConfigError, StoreFormatError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "LAYOUTS",
    "Checkpoint",
    "detect_layout",
    "load_checkpoint",
    "random_dense",
    "save_dlrm_checkpoint",
    "save_torchrec_checkpoint",
]

LAYOUTS: tuple[str, ...] = ("dlrm", "torchrec")
"""Checkpoint layouts :func:`load_checkpoint` understands (besides ``"auto"``)."""

_WRAPPER_KEYS = ("state_dict", "model_state_dict")
_PREFIX_RE = re.compile(r"^(?:(?:model|module)\.)+")

_TR_EMB = "sparse_arch.embedding_bag_collection.embedding_bags."
_TR_EMB_RE = re.compile(r"^sparse_arch\.embedding_bag_collection\.embedding_bags\.([^.]+)\.weight$")
_TR_DENSE_RE = re.compile(r"^dense_arch\.model\._mlp\.(\d+)\._linear\.(?:weight|bias)$")
_TR_OVER_RE = re.compile(r"^over_arch\.model\.0\._mlp\.(\d+)\._linear\.(?:weight|bias)$")
_TR_FINAL = "over_arch.model.1"
_DL_EMB_RE = re.compile(r"^emb_l\.(\d+)\.weight$")
_DL_BOT_RE = re.compile(r"^bot_l\.(\d+)\.(?:weight|bias)$")
_DL_TOP_RE = re.compile(r"^top_l\.(\d+)\.(?:weight|bias)$")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded DLRM checkpoint.

    Attributes
    ----------
    config : DLRMConfig
        Shapes inferred from the weights; ``interaction`` follows the layout.
    layout : {"dlrm", "torchrec"}
        The key layout the file was written in.
    table_names : list of str
        One name per table, in model (interaction) order. ``"dlrm"`` files
        have no names; table ``k`` is named after its module, ``emb_l.{k}``.
        ``"torchrec"`` names are the ``EmbeddingBagCollection`` table names.
    tables : list of torch.Tensor
        The ``(rows, embedding_dim)`` embedding weights, memory-mapped from
        the file where it is a zip checkpoint (dtype as stored).
    dense_state : dict of str to torch.Tensor
        Weights for :meth:`DenseDLRM.load_state_dict` (``bottom.{k}.*``,
        ``top.{k}.*``).
    path : Path or None
        The file it came from.
    """

    config: DLRMConfig
    layout: str
    table_names: list[str]
    tables: list[torch.Tensor] = field(repr=False)
    dense_state: dict[str, torch.Tensor] = field(repr=False)
    path: Path | None = None

    def build_dense(self) -> DenseDLRM:
        """Return a :class:`DenseDLRM` in eval mode with this checkpoint's weights."""
        model = DenseDLRM(self.config)
        model.load_state_dict(self.dense_state, strict=True)
        return model.eval()

    @property
    def table_rows(self) -> list[int]:
        """Number of rows of each table."""
        return [int(t.shape[0]) for t in self.tables]


# --------------------------------------------------------------------------- loading


def _read(path: Path) -> Any:
    if not path.exists():
        raise StoreFormatError(f"Checkpoint {str(path)!r} does not exist.")
    if not path.is_file():
        raise StoreFormatError(f"Checkpoint {str(path)!r} is not a regular file.")
    # mmap needs the zip container torch.save has written since 1.6; older files
    # (the legacy tar/pickle format) are read into memory instead.
    use_mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise StoreFormatError(
            f"{str(path)!r} is not a readable torch checkpoint"
            f" (torch.load with weights_only=True failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})."
        ) from exc


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(4):  # {"state_dict": {"model_state_dict": ...}} at worst
        if not isinstance(obj, Mapping):
            raise StoreFormatError(
                f"{str(path)!r} is not a state-dict checkpoint: it holds a"
                f" {type(obj).__name__}, expected a dict of tensors."
            )
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue  # epoch counters, optimizer state, metrics...
        norm = _PREFIX_RE.sub("", key)
        if norm in state:
            raise StoreFormatError(
                f"{str(path)!r}: keys {key!r} and another key both map to {norm!r}"
                f" once the 'model.'/'module.' prefixes are removed."
            )
        state[norm] = value
    if not state:
        raise StoreFormatError(f"{str(path)!r} holds no tensors; it is not a model checkpoint.")
    return state


def detect_layout(state: Mapping[str, Any]) -> str:
    """Return ``"dlrm"`` or ``"torchrec"`` for a (prefix-stripped) state dict.

    Raises
    ------
    StoreFormatError
        If neither or both layouts' embedding/MLP keys are present.
    """
    keys = list(state)
    is_dlrm = any(_DL_EMB_RE.match(k) or k.startswith("bot_l.") for k in keys)
    is_tr = any(k.startswith((_TR_EMB, "dense_arch.model.")) for k in keys)
    if is_dlrm and not is_tr:
        return "dlrm"
    if is_tr and not is_dlrm:
        return "torchrec"
    why = "keys of both layouts" if is_dlrm else "no emb_l./bot_l. or sparse_arch./dense_arch. keys"
    raise StoreFormatError(
        f"Cannot detect the checkpoint layout ({why}); first keys: {keys[:6]}."
        f" Pass layout='dlrm' or layout='torchrec'."
    )


def _need(state: Mapping[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    try:
        return state[key]
    except KeyError:
        raise StoreFormatError(f"{str(path)!r}: missing key {key!r}.") from None


def _linear(state: Mapping[str, torch.Tensor], prefix: str, path: Path) -> tuple[torch.Tensor, ...]:
    w = _need(state, prefix + ".weight", path)
    b = _need(state, prefix + ".bias", path)
    if w.ndim != 2 or not w.is_floating_point():
        raise StoreFormatError(
            f"{str(path)!r}: {prefix}.weight should be a 2-D float matrix."
            f" Got shape {tuple(w.shape)}, dtype {w.dtype}."
        )
    if b.ndim != 1 or b.shape[0] != w.shape[0] or not b.is_floating_point():
        raise StoreFormatError(
            f"{str(path)!r}: {prefix}.bias should be a float vector of {w.shape[0]}"
            f" (the rows of {prefix}.weight). Got shape {tuple(b.shape)}, dtype {b.dtype}."
        )
    return w, b


def _indexed(state: Mapping[str, torch.Tensor], pattern: re.Pattern[str]) -> list[int]:
    # Numeric sort: "bot_l.10" comes after "bot_l.2", and gaps (activations) are fine.
    # A layer counts if its weight or its bias is there, so a lone bias is reported
    # as a missing weight rather than silently dropping the layer.
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _mlp(
    state: Mapping[str, torch.Tensor], prefixes: list[str], what: str, in_features: int | None,
    path: Path, in_source: str = "",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = []
    for prefix in prefixes:
        w, b = _linear(state, prefix, path)
        if in_features is not None and w.shape[1] != in_features:
            raise StoreFormatError(
                f"{str(path)!r}: {what} layer {prefix} has in_features={w.shape[1]},"
                f" expected {in_features}{in_source}."
            )
        layers.append((w, b))
        in_features = int(w.shape[0])
        in_source = f" (the out_features of {prefix})"
    return layers


def _parse_dlrm(state: Mapping[str, torch.Tensor], path: Path) -> tuple[Any, ...]:
    emb_ids = _indexed(state, _DL_EMB_RE)
    if not emb_ids:
        raise StoreFormatError(
            f"{str(path)!r}: missing key 'emb_l.0.weight' (no embedding tables)."
        )
    for k in range(emb_ids[-1] + 1):  # emb_l is an nn.ModuleList: 0 .. T-1
        _need(state, f"emb_l.{k}.weight", path)
    names = [f"emb_l.{k}" for k in emb_ids]  # the module path, as TorchRec names are
    tables = [state[f"emb_l.{k}.weight"] for k in emb_ids]
    tables_keys = [f"emb_l.{k}.weight" for k in emb_ids]
    bot = [f"bot_l.{i}" for i in _indexed(state, _DL_BOT_RE)]
    top = [f"top_l.{i}" for i in _indexed(state, _DL_TOP_RE)]
    if not bot:
        raise StoreFormatError(f"{str(path)!r}: missing key 'bot_l.0.weight' (no bottom MLP).")
    if not top:
        raise StoreFormatError(f"{str(path)!r}: missing key 'top_l.0.weight' (no top MLP).")
    return names, tables, tables_keys, bot, top


def _parse_torchrec(state: Mapping[str, torch.Tensor], path: Path) -> tuple[Any, ...]:
    names, tables, tables_keys = [], [], []
    for key, value in state.items():  # table order = state-dict (= EBC config) order
        if m := _TR_EMB_RE.match(key):
            names.append(m.group(1))
            tables.append(value)
            tables_keys.append(key)
    if not names:
        raise StoreFormatError(
            f"{str(path)!r}: missing key '{_TR_EMB}<name>.weight' (no embedding tables)."
        )
    dense_ids = _indexed(state, _TR_DENSE_RE)
    over_ids = _indexed(state, _TR_OVER_RE)
    # MLP._mlp is an nn.Sequential of Perceptrons: indices are 0 .. n-1.
    bot = [f"dense_arch.model._mlp.{i}._linear" for i in range(max(dense_ids, default=0) + 1)]
    top = [f"over_arch.model.0._mlp.{i}._linear" for i in range(max(over_ids, default=0) + 1)]
    top.append(_TR_FINAL)
    return names, tables, tables_keys, bot, top


def load_checkpoint(path: str | os.PathLike[str], layout: str = "auto") -> Checkpoint:
    """Load a DLRM checkpoint, memory-mapping its embedding tables.

    Parameters
    ----------
    path : str or PathLike
        A file written by :func:`torch.save` (state dict, possibly wrapped in
        ``{"state_dict": ...}`` or ``{"model_state_dict": ...}``).
    layout : {"auto", "dlrm", "torchrec"}
        Key layout; ``"auto"`` detects it from the keys.

    Returns
    -------
    Checkpoint
        Config inferred from the weight shapes, the tables and the dense weights.

    Raises
    ------
    ConfigError
        If ``layout`` is not one of the names above.
    StoreFormatError
        If the file is missing or is not a torch checkpoint, the layout cannot
        be detected, a key is missing (the message names it), or shapes are
        inconsistent (the message names the layer or table and both numbers).
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise ConfigError(
            f"Expected layout to be 'auto' or one of {LAYOUTS}. Got {layout!r} instead."
        )
    path = Path(path)
    state = _unwrap(_read(path), path)
    if layout == "auto":
        layout = detect_layout(state)
    parse = _parse_dlrm if layout == "dlrm" else _parse_torchrec
    names, tables, table_keys, bot, top = parse(state, path)

    dim = None
    for key, t in zip(table_keys, tables, strict=True):
        if t.ndim != 2 or not t.is_floating_point():
            raise StoreFormatError(
                f"{str(path)!r}: table {key} should be a 2-D float (rows, dim) matrix."
                f" Got shape {tuple(t.shape)}, dtype {t.dtype}."
            )
        if dim is None:
            dim, first = int(t.shape[1]), key
        elif t.shape[1] != dim:
            raise StoreFormatError(
                f"{str(path)!r}: tables have different dims: {key} has dim {t.shape[1]},"
                f" {first} has dim {dim}."
            )
    if dim is None:  # the parsers already refuse a checkpoint without tables
        raise StoreFormatError(f"{str(path)!r}: no embedding tables.")
    num_tables = len(tables)

    bot_layers = _mlp(state, bot, "bottom MLP", None, path)
    num_dense = int(bot_layers[0][0].shape[1])
    if bot_layers[-1][0].shape[0] != dim:
        raise StoreFormatError(
            f"{str(path)!r}: bottom MLP output ({bot[-1]}) has {bot_layers[-1][0].shape[0]}"
            f" features, but the embedding dim is {dim}; they must match."
        )
    top_in = dim + (num_tables + 1) * num_tables // 2
    top_layers = _mlp(
        state, top, "top MLP", top_in, path,
        f" (embedding_dim {dim} + {num_tables + 1}*{num_tables}/2 pairwise dots"
        f" of {num_tables} tables and the bottom MLP output)",
    )
    if top_layers[-1][0].shape[0] != 1:
        raise StoreFormatError(
            f"{str(path)!r}: top MLP output ({top[-1]}) has {top_layers[-1][0].shape[0]}"
            f" features, expected 1 (one logit)."
        )
    config = DLRMConfig(
        num_dense=num_dense,
        embedding_dim=dim,
        num_tables=num_tables,
        bottom_mlp=tuple(int(w.shape[0]) for w, _ in bot_layers),
        top_mlp=tuple(int(w.shape[0]) for w, _ in top_layers),
        interaction=Interaction.parse(layout),
    )
    dense_state: dict[str, torch.Tensor] = {}
    for part, layers in (("bottom", bot_layers), ("top", top_layers)):
        for k, (w, b) in enumerate(layers):
            dense_state[f"{part}.{k}.weight"] = w
            dense_state[f"{part}.{k}.bias"] = b
    return Checkpoint(config, layout, names, tables, dense_state, path)


# --------------------------------------------------------------------------- writing


def _as_table(t: np.ndarray | torch.Tensor, k: int, config: DLRMConfig) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"Expected table {k} to be an ndarray or Tensor. Got {type(t).__name__}.")
    dim = config.embedding_dim
    if tensor.ndim != 2 or tensor.shape[1] != dim or not tensor.is_floating_point():
        raise ConfigError(
            f"Expected table {k} to be a float (rows, embedding_dim={config.embedding_dim})"
            f" matrix. Got shape {tuple(tensor.shape)}, dtype {tensor.dtype}."
        )
    tensor = tensor.detach().cpu().contiguous()
    # torch.save writes whole storages: a view into a larger buffer would drag it along.
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def _check_writer_args(
    config: DLRMConfig, tables: Sequence[np.ndarray | torch.Tensor], dense: nn.Module, layout: str
) -> list[torch.Tensor]:
    if not isinstance(config, DLRMConfig):
        raise ConfigError(f"Expected a DLRMConfig. Got {type(config).__name__} instead.")
    if config.interaction != layout:
        raise ConfigError(
            f"A {layout!r} checkpoint implies interaction={layout!r}."
            f" Got config.interaction={config.interaction!r} instead."
        )
    if not isinstance(dense, DenseDLRM) or dense.config.to_dict() != config.to_dict():
        got = dense.config if isinstance(dense, DenseDLRM) else type(dense).__name__
        raise ConfigError(f"Expected a DenseDLRM built from {config}. Got {got} instead.")
    if len(tables) != config.num_tables:
        raise ConfigError(
            f"Expected num_tables={config.num_tables} tables. Got {len(tables)} instead."
        )
    return [_as_table(t, k, config) for k, t in enumerate(tables)]


def _dense_weights(dense: DenseDLRM) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], ...]:
    def grab(layers: nn.ModuleList) -> list[tuple[torch.Tensor, torch.Tensor]]:
        linears = cast("Iterable[nn.Linear]", layers)  # _linears: every layer is Linear
        return [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears]

    return grab(dense.bottom), grab(dense.top)


def _atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        chmod_default(fd)  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _wrap(state: dict[str, torch.Tensor], wrapper: str | None) -> dict[str, Any]:
    if wrapper is None:
        return state
    if wrapper not in _WRAPPER_KEYS:
        raise ConfigError(
            f"Expected wrapper to be None or one of {_WRAPPER_KEYS}. Got {wrapper!r} instead."
        )
    return {wrapper: state}


def save_dlrm_checkpoint(
    path: str | os.PathLike[str],
    config: DLRMConfig,
    tables: Sequence[np.ndarray | torch.Tensor],
    dense: DenseDLRM,
    *,
    wrapper: str | None = None,
) -> Path:
    """Write a facebookresearch/dlrm-layout checkpoint, atomically.

    Keys: ``emb_l.{k}.weight``, ``bot_l.{2i}.weight/bias``, ``top_l.{2i}.weight/bias``
    (Linear layers at even ``nn.Sequential`` indices, activations between them).

    Parameters
    ----------
    path : str or PathLike
        Destination; written to a temporary file in the same folder, then renamed.
    config : DLRMConfig
        Must have ``interaction="dlrm"``.
    tables : sequence of ndarray or Tensor
        ``num_tables`` float ``(rows, embedding_dim)`` matrices.
    dense : DenseDLRM
        Built from ``config``.
    wrapper : {None, "state_dict", "model_state_dict"}
        Nest the state dict under this key, as training scripts do.

    Returns
    -------
    Path
        ``path``.
    """
    tabs = _check_writer_args(config, tables, dense, "dlrm")
    bottom, top = _dense_weights(dense)
    state: dict[str, torch.Tensor] = {}
    for k, t in enumerate(tabs):
        state[f"emb_l.{k}.weight"] = t
    for name, layers in (("bot_l", bottom), ("top_l", top)):
        for i, (w, b) in enumerate(layers):
            state[f"{name}.{2 * i}.weight"] = w
            state[f"{name}.{2 * i}.bias"] = b
    return _atomic_save(_wrap(state, wrapper), path)


def save_torchrec_checkpoint(
    path: str | os.PathLike[str],
    config: DLRMConfig,
    tables: Sequence[np.ndarray | torch.Tensor],
    dense: DenseDLRM,
    table_names: Sequence[str] | None = None,
    *,
    wrapper: str | None = None,
    prefix: str = "",
) -> Path:
    """Write a TorchRec ``DLRM``-layout checkpoint, atomically.

    Keys, in this order (the order ``DLRM.state_dict()`` has)::

        sparse_arch.embedding_bag_collection.embedding_bags.<name>.weight
        dense_arch.model._mlp.{i}._linear.weight / .bias
        over_arch.model.0._mlp.{i}._linear.weight / .bias    (all top layers but the last)
        over_arch.model.1.weight / .bias                     (the last top layer)

    Parameters
    ----------
    path, config, tables, dense, wrapper
        As for :func:`save_dlrm_checkpoint`; ``config.interaction`` must be
        ``"torchrec"`` and ``len(config.top_mlp) >= 2`` (TorchRec's OverArch
        has an MLP and a final Linear).
    table_names : sequence of str, optional
        Unique names without dots; default ``table_{k}``.
    prefix : str
        Put before every key, e.g. ``"model."`` as ``DLRMTrain`` does.

    Returns
    -------
    Path
        ``path``.
    """
    tabs = _check_writer_args(config, tables, dense, "torchrec")
    if len(config.top_mlp) < 2:
        raise ConfigError(
            f"TorchRec's OverArch needs at least 2 top layers. Got top_mlp={config.top_mlp!r}."
        )
    names = [f"table_{k}" for k in range(len(tabs))] if table_names is None else list(table_names)
    if len(names) != len(tabs):
        raise ConfigError(f"Expected {len(tabs)} table_names. Got {len(names)}: {names!r}.")
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigError(
                f"Expected table names to be non-empty strings without '.'. Got {name!r} instead."
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"Expected unique table_names. Got {names!r}.")
    bottom, top = _dense_weights(dense)
    state: dict[str, torch.Tensor] = {}
    for name, t in zip(names, tabs, strict=True):
        state[f"{prefix}{_TR_EMB}{name}.weight"] = t
    for i, (w, b) in enumerate(bottom):
        state[f"{prefix}dense_arch.model._mlp.{i}._linear.weight"] = w
        state[f"{prefix}dense_arch.model._mlp.{i}._linear.bias"] = b
    for i, (w, b) in enumerate(top[:-1]):
        state[f"{prefix}over_arch.model.0._mlp.{i}._linear.weight"] = w
        state[f"{prefix}over_arch.model.0._mlp.{i}._linear.bias"] = b
    state[f"{prefix}{_TR_FINAL}.weight"], state[f"{prefix}{_TR_FINAL}.bias"] = top[-1]
    return _atomic_save(_wrap(state, wrapper), path)
