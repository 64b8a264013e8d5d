"""Plain-torch reference implementations the tests compare tiermem against.

Nothing here imports ``tiermem`` or ``runtime``: these are the yardsticks, so
they re-derive everything (key parsing, layer order, interaction order) from
the published model code they mirror, in the most literal way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["Jagged", "reference_dlrm_forward"]


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith(("model.", "module.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _linear_from(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _bag_from(weight: torch.Tensor) -> nn.EmbeddingBag:
    # include_last_offset=True: offsets are CSR (B + 1 entries), as in TorchRec.
    return nn.EmbeddingBag.from_pretrained(
        weight.float().clone(), mode="sum", freeze=True, include_last_offset=True
    )


def _parse_facebookresearch(state: dict[str, torch.Tensor]):
    # DLRM_Net: emb_l = ModuleList of EmbeddingBag; bot_l / top_l = Sequential of
    # [Linear, ReLU, Linear, ReLU, ..., Linear, Sigmoid] -> Linear at even indices.
    tables = []
    k = 0
    while f"emb_l.{k}.weight" in state:
        tables.append(state[f"emb_l.{k}.weight"])
        k += 1

    def seq(name: str) -> list[nn.Linear]:
        idx = [
            int(key[len(name) + 1 : -len(".weight")])
            for key in state
            if key.startswith(name + ".") and key.endswith(".weight")
        ]
        return [
            _linear_from(state[f"{name}.{i}.weight"], state[f"{name}.{i}.bias"])
            for i in sorted(idx)
        ]

    return tables, seq("bot_l"), seq("top_l")


def _parse_torchrec(state: dict[str, torch.Tensor]):
    # torchrec.models.dlrm.DLRM: SparseArch -> EmbeddingBagCollection.embedding_bags
    # (ModuleDict, insertion order); DenseArch.model = MLP(_mlp = Sequential of
    # Perceptron(_linear)); OverArch.model = Sequential(MLP, Linear).
    head = "sparse_arch.embedding_bag_collection.embedding_bags."
    tables = [v for key, v in state.items() if key.startswith(head) and key.endswith(".weight")]

    def perceptrons(prefix: str) -> list[nn.Linear]:
        layers = []
        i = 0
        while f"{prefix}.{i}._linear.weight" in state:
            layers.append(
                _linear_from(
                    state[f"{prefix}.{i}._linear.weight"], state[f"{prefix}.{i}._linear.bias"]
                )
            )
            i += 1
        return layers

    bottom = perceptrons("dense_arch.model._mlp")
    top = perceptrons("over_arch.model.0._mlp")
    top.append(_linear_from(state["over_arch.model.1.weight"], state["over_arch.model.1.bias"]))
    return tables, bottom, top


def _interact_facebookresearch(x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
    # interact_features, "dot", arch_interaction_itself=False:
    #   li = [i for i in range(ni) for j in range(i)], lj = [j for i ... for j in range(i)]
    feats = [x, *ly]
    cols = [x]
    for i in range(len(feats)):
        for j in range(i):
            cols.append((feats[i] * feats[j]).sum(dim=1, keepdim=True))
    return torch.cat(cols, dim=1)


def _interact_torchrec(x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
    # InteractionArch: Z[:, triu_indices(F+1, F+1, offset=1)] -> row-major upper triangle.
    feats = [x, *ly]
    cols = [x]
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            cols.append((feats[i] * feats[j]).sum(dim=1, keepdim=True))
    return torch.cat(cols, dim=1)


@torch.no_grad()
def reference_dlrm_forward(
    state_dict: Mapping[str, torch.Tensor],
    layout: str,
    dense: torch.Tensor,
    sparse: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Click probabilities of a DLRM checkpoint, computed the plain-torch way.

    Parameters
    ----------
    state_dict : mapping of str to Tensor
        The raw state dict as saved (already unwrapped from ``{"state_dict": ...}``);
        ``model.`` / ``module.`` key prefixes are accepted.
    layout : {"dlrm", "torchrec"}
        facebookresearch/dlrm ``DLRM_Net`` or TorchRec ``DLRM`` keys.
    dense : Tensor
        ``(B, num_dense)`` float32.
    sparse : sequence of (indices, offsets)
        One pair per table in model order; ``offsets`` is CSR with ``B + 1``
        entries (bag ``b`` is ``indices[offsets[b]:offsets[b+1]]``), sum pooling.

    Returns
    -------
    Tensor
        ``(B,)`` probabilities (sigmoid of the final layer).
    """
    state = _strip_prefixes(state_dict)
    if layout == "dlrm":
        tables, bottom, top = _parse_facebookresearch(state)
        interact = _interact_facebookresearch
    elif layout == "torchrec":
        tables, bottom, top = _parse_torchrec(state)
        interact = _interact_torchrec
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if len(sparse) != len(tables):
        raise ValueError(f"{len(tables)} tables but {len(sparse)} (indices, offsets) pairs")

    x = dense.float()
    for layer in bottom:
        x = torch.relu(layer(x))
    ly = [
        _bag_from(w)(idx.long(), off.long())
        for w, (idx, off) in zip(tables, sparse, strict=True)
    ]
    z = interact(x, ly)
    for layer in top[:-1]:
        z = torch.relu(layer(z))
    return torch.sigmoid(top[-1](z)).reshape(-1)


class Jagged:
    """A stand-in for torchrec's JaggedTensor: the methods tiermem reads (values, offsets,
    weights_or_none), for tests that run without torchrec."""

    def __init__(self, values, offsets, weights=None):
        self._v, self._o, self._w = values, offsets, weights

    def values(self):
        return self._v

    def offsets(self):
        return self._o

    def weights_or_none(self):
        return self._w
