"""The dense part of DLRM: bottom MLP, pairwise-dot interaction, top MLP.

The sparse part (embedding lookups and pooling) lives in tiermem; this module
receives its result, the pooled embeddings, and runs the rest of the model in
torch::

    dense (B, num_dense) --bottom MLP--> x (B, D)
    pooled (B, T, D)
    F = [x, pooled[:, 0], ..., pooled[:, T-1]]          (B, T+1, D)
    Z = F @ F^T                                          (B, T+1, T+1)
    z = cat(x, Z[:, li, lj])                             (B, D + (T+1)T/2)
    z --top MLP--> logit (B,) --sigmoid--> probability (B,)

The pair order ``(li, lj)`` is what tells the two checkpoint families apart:

- ``"dlrm"`` (facebookresearch/dlrm ``interact_features``): pairs ``(i, j)``
  with ``j < i``, ordered by ``i`` then ``j`` -- the strict lower triangle of
  ``Z`` read row by row.
- ``"torchrec"`` (TorchRec ``InteractionArch``): ``torch.triu_indices(T+1,
  T+1, offset=1)`` -- the strict upper triangle read row by row.

Both hold the same dot products, in different orders, so a top MLP trained
with one order gives wrong answers with the other.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from tiermem.config import Choice, ConfigDict
from tiermem.errors import ConfigError, InvalidBatchError

__all__ = ["DLRMConfig", "DenseDLRM", "Interaction", "TracedDense", "interaction_indices",
           "random_dense"]


class Interaction(Choice):
    """The order of the pairwise dot products (see the module docstring)."""

    DLRM = "dlrm"
    """Strict lower triangle, row by row (facebookresearch/dlrm)."""
    TORCHREC = "torchrec"
    """Strict upper triangle, row by row (torchrec's DLRM)."""


def _check_sizes(name: str, sizes: Any) -> tuple[int, ...]:
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise ConfigError(
            f"Expected {name} to be a sequence of layer sizes. Got {sizes!r} instead."
        )
    out = tuple(sizes)
    if not out:
        raise ConfigError(f"Expected {name} to have at least one layer. Got {out!r} instead.")
    for k, size in enumerate(out):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(
                f"Expected {name}[{k}] to be a positive int. Got {size!r} instead (in {out!r})."
            )
    return out


@dataclass(frozen=True)
class DLRMConfig(ConfigDict):
    """Shape of the dense part of a DLRM model.

    Parameters
    ----------
    num_dense : int
        Number of dense (continuous) input features.
    embedding_dim : int
        Width ``D`` of every embedding row and of the bottom MLP output.
    num_tables : int
        Number ``T`` of embedding tables, i.e. of pooled embeddings per sample.
    bottom_mlp : tuple of int
        Output size of each bottom-MLP layer; the last must equal ``embedding_dim``.
    top_mlp : tuple of int
        Output size of each top-MLP layer; the last must be 1.
    interaction : {"dlrm", "torchrec"}
        Order of the pairwise dot products (see the module docstring).

    Examples
    --------
    >>> cfg = DLRMConfig(13, 16, 26, (512, 256, 16), (512, 256, 1))
    >>> cfg.top_in_features   # 16 + 27 * 26 / 2
    367
    """

    num_dense: int
    embedding_dim: int
    num_tables: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    interaction: Interaction = Interaction.DLRM

    def __post_init__(self) -> None:
        for name in ("num_dense", "embedding_dim", "num_tables"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Expected {name} to be a positive int. Got {value!r} instead.")
        # Accept lists (from JSON / from_dict) but store tuples so the config stays hashable.
        object.__setattr__(self, "bottom_mlp", _check_sizes("bottom_mlp", self.bottom_mlp))
        object.__setattr__(self, "top_mlp", _check_sizes("top_mlp", self.top_mlp))
        if self.bottom_mlp[-1] != self.embedding_dim:
            raise ConfigError(
                f"Expected the last bottom_mlp size to equal embedding_dim={self.embedding_dim}"
                f" (the bottom MLP output is interacted with the embeddings)."
                f" Got bottom_mlp={self.bottom_mlp!r} instead."
            )
        if self.top_mlp[-1] != 1:
            raise ConfigError(
                f"Expected the last top_mlp size to be 1 (one logit per sample)."
                f" Got top_mlp={self.top_mlp!r} instead."
            )
        object.__setattr__(self, "interaction", Interaction.parse(self.interaction))

    @property
    def num_interactions(self) -> int:
        """Number of pairwise dot products, ``(T + 1) * T / 2``."""
        return (self.num_tables + 1) * self.num_tables // 2

    @property
    def top_in_features(self) -> int:
        """Input width of the top MLP, ``embedding_dim + (T + 1) * T / 2``."""
        return self.embedding_dim + self.num_interactions


def interaction_indices(num_tables: int, interaction: str | Interaction
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(li, lj)``, the int64 row/column indices of the kept entries of ``Z``.

    Parameters
    ----------
    num_tables : int
        ``T``; ``Z`` is ``(T + 1) x (T + 1)`` (bottom-MLP output first).
    interaction : {"dlrm", "torchrec"}
        ``"dlrm"``: strict lower triangle, row-major; ``"torchrec"``: strict
        upper triangle, row-major.
    """
    n = num_tables + 1
    if Interaction.parse(interaction) is Interaction.DLRM:
        idx = torch.tril_indices(n, n, offset=-1)
    else:
        idx = torch.triu_indices(n, n, offset=1)
    return idx[0].contiguous(), idx[1].contiguous()


class DenseDLRM(nn.Module):
    """Bottom MLP, interaction and top MLP of a DLRM model.

    Parameters
    ----------
    config : DLRMConfig
        Layer sizes and interaction order.

    Notes
    -----
    State-dict keys (what :func:`runtime.checkpoint.load_checkpoint` maps both
    checkpoint layouts onto)::

        bottom.{k}.weight  (bottom_mlp[k], in_k)      k = 0 .. len(bottom_mlp) - 1
        bottom.{k}.bias    (bottom_mlp[k],)
        top.{k}.weight     (top_mlp[k], in_k)         k = 0 .. len(top_mlp) - 1
        top.{k}.bias       (top_mlp[k],)

    Every bottom layer is Linear + ReLU; every top layer but the last is
    Linear + ReLU; the last is Linear, and :meth:`forward` applies the sigmoid.
    """

    # buffers (register_buffer): nn.Module's __getattr__ finds them, typed Tensor | Module
    li: torch.Tensor
    lj: torch.Tensor
    lflat: torch.Tensor

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__()
        if not isinstance(config, DLRMConfig):
            raise ConfigError(f"Expected a DLRMConfig. Got {type(config).__name__} instead.")
        self.config = config
        self.bottom = nn.ModuleList(_linears(config.num_dense, config.bottom_mlp))
        self.top = nn.ModuleList(_linears(config.top_in_features, config.top_mlp))
        li, lj = interaction_indices(config.num_tables, config.interaction)
        # Derived from the config, so kept out of the state dict.
        self.register_buffer("li", li, persistent=False)
        self.register_buffer("lj", lj, persistent=False)
        # the same entries as positions in the flattened (T+1)^2 matrix: index_select
        # on them is ~4x faster than advanced indexing z[:, li, lj]
        self.register_buffer("lflat", li * (config.num_tables + 1) + lj, persistent=False)

    def _check(
        self, dense: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        for name, t in (("dense", dense), ("pooled", pooled)):
            if not isinstance(t, torch.Tensor):
                raise InvalidBatchError(
                    f"Expected {name} to be a torch.Tensor. Got {type(t).__name__} instead."
                )
            if not t.is_floating_point():
                raise InvalidBatchError(
                    f"Expected {name} to be a float tensor (float32). Got dtype {t.dtype} instead."
                )
        if dense.ndim != 2 or dense.shape[1] != cfg.num_dense:
            raise InvalidBatchError(
                f"Expected dense of shape (B, num_dense={cfg.num_dense})."
                f" Got shape {tuple(dense.shape)} instead."
            )
        expect = (cfg.num_tables, cfg.embedding_dim)
        if pooled.ndim != 3 or tuple(pooled.shape[1:]) != expect:
            raise InvalidBatchError(
                f"Expected pooled of shape (B, num_tables={cfg.num_tables},"
                f" embedding_dim={cfg.embedding_dim}). Got shape {tuple(pooled.shape)} instead."
            )
        if dense.shape[0] != pooled.shape[0]:
            raise InvalidBatchError(
                f"Batch size mismatch: dense has B={dense.shape[0]} rows,"
                f" pooled has B={pooled.shape[0]}."
            )
        dtype = cast(nn.Linear, self.top[0]).weight.dtype  # _linears: every layer is Linear
        return dense.to(dtype), pooled.to(dtype)

    def interact(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Return ``cat(x, pairwise dots)``, shape ``(B, D + (T + 1) * T / 2)``."""
        feats = torch.cat((x.unsqueeze(1), pooled), dim=1)  # (B, T+1, D)
        z = torch.bmm(feats, feats.transpose(1, 2))  # (B, T+1, T+1)
        return torch.cat((x, z.flatten(1).index_select(1, self.lflat)), dim=1)

    def logits(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Return the pre-sigmoid scores.

        Parameters
        ----------
        dense : torch.Tensor
            ``(B, num_dense)`` float32 dense features.
        pooled : torch.Tensor
            ``(B, num_tables, embedding_dim)`` float32 pooled embeddings, tables
            in checkpoint order.

        Returns
        -------
        torch.Tensor
            ``(B,)`` logits.

        Raises
        ------
        InvalidBatchError
            If a shape, the batch size or the dtype is wrong (float64/float16
            inputs are cast to the weights' float32; integer inputs are an error).
        """
        x, pooled = self._check(dense, pooled)
        for layer in self.bottom:
            x = torch.relu(layer(x))
        z = self.interact(x, pooled)
        last = len(self.top) - 1
        for k, layer in enumerate(self.top):
            z = layer(z)
            if k < last:
                z = torch.relu(z)
        return z.squeeze(1)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Return click probabilities, ``sigmoid(logits(dense, pooled))``, shape ``(B,)``."""
        return torch.sigmoid(self.logits(dense, pooled))


class TracedDense:
    """:meth:`DenseDLRM.forward` traced with ``torch.jit.trace``: the same ops, one call.

    Eager torch releases and re-takes the GIL around every op (~15 per batch);
    a serving thread then waits for the GIL after each op while another thread
    (the HTTP event loop, another worker) holds it: measured here, 9 ms -> 219
    ms for one batch next to a busy Python thread. The traced graph runs all
    ops under one release (9 -> 11 ms) and skips Python between ops (~1.5x
    faster alone). Shapes are still checked in Python before the call; the
    results are bit-identical to the eager module's (tested).
    """

    def __init__(self, model: DenseDLRM) -> None:
        cfg = model.config
        self.model = model
        example = (torch.zeros(2, cfg.num_dense), torch.zeros(2, cfg.num_tables,
                                                               cfg.embedding_dim))
        with torch.inference_mode(), warnings.catch_warnings():
            # the shape checks of forward() are Python ifs: the trace drops them (they
            # run in __call__ instead), which is what TracerWarning says
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # TorchScript is deprecated in favour of torch.compile/export, but it is the only
            # one whose graph runs in C++ with the GIL released (export's runs op by op in
            # Python; compile needs a C++ toolchain at run time)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.traced = torch.jit.trace(model.eval(), example, check_trace=False)

    def __call__(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        dense, pooled = self.model._check(dense, pooled)
        return self.traced(dense, pooled)


def _linears(in_features: int, sizes: tuple[int, ...]) -> list[nn.Linear]:
    layers = []
    for size in sizes:
        layers.append(nn.Linear(in_features, size, bias=True))
        in_features = size
    return layers


def random_dense(config: DLRMConfig, seed: int = 0) -> DenseDLRM:
    """Return a :class:`DenseDLRM` with deterministic random weights, in eval mode.

    Weights follow facebookresearch/dlrm's init: ``W ~ N(0, sqrt(2 / (in + out)))``,
    ``b ~ N(0, sqrt(1 / out))``, drawn from a private generator seeded with
    ``seed`` (the global torch RNG is untouched).
    """
    model = DenseDLRM(config)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for layer in [*model.bottom, *model.top]:
            out_f, in_f = layer.weight.shape
            layer.weight.copy_(
                torch.randn(out_f, in_f, generator=gen) * (2.0 / (in_f + out_f)) ** 0.5
            )
            layer.bias.copy_(torch.randn(out_f, generator=gen) * (1.0 / out_f) ** 0.5)
    return model.eval()
