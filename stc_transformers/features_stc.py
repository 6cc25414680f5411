"""Capture of per-layer hidden states and MLP neuron activations by hooks, and masked pooling.

Self-contained (only torch / transformers imports): the Hub copies this file next to the modeling file for users
who load a checkpoint with ``trust_remote_code=True``.

Layers are the backbone's transformer blocks (``GradientCheckpointingLayer`` subclasses), numbered 0..L-1.
For layer ``l``:

* ``hidden``: the block's output (the residual stream after the block), captured by a forward hook on the block;
* ``mlp``: the MLP neuron vector, i.e. the input of the MLP down-projection (``act(up)`` for plain MLPs,
  ``act(gate) * up`` for gated ones), captured by a forward pre-hook on that projection.

Both are pooled over real tokens in the block's forward hook, which runs outside activation checkpointing, so
gradients flow through the captured tensors with the non-reentrant checkpoint (the transformers v5 default).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D


SOURCES = ("hidden", "mlp")
POOLINGS = ("mean", "max", "first", "last")
_ATTENTION_NAME_PARTS = ("attn", "attention")
_MOE_NAME_PARTS = ("expert", "moe", "router")


def check_names(values, allowed, what: str) -> tuple[str, ...]:
    """Return `values` as a tuple, raising a clear error on names outside `allowed`."""
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise ValueError(f"Unknown {what} {unknown or values!r}: choose one or more of {list(allowed)}.")
    return values


# --------------------------------------------------------------------------------------------------------------------
# Locating layers and MLP down-projections
# --------------------------------------------------------------------------------------------------------------------


def find_layer_list(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (attribute path, ModuleList) of the backbone's transformer blocks."""
    candidates = [
        (name, module)
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(isinstance(child, GradientCheckpointingLayer) for child in module)
    ]
    if not candidates:
        raise ValueError(
            f"Cannot find the transformer blocks of {type(backbone).__name__}: STC needs a backbone whose layers "
            "subclass transformers' `GradientCheckpointingLayer` (all transformers v5 text models do)."
        )
    # The outermost list is the stack of blocks (nested lists would be inside a block).
    return min(candidates, key=lambda item: item[0].count("."))


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or GPT-2 style Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return None


def _is_mixture_of_experts(layer: nn.Module) -> bool:
    """MoE blocks (routers, experts; in v5 often fused into 3-D parameters) have no single neuron vector."""
    for name, module in layer.named_modules():
        label = f"{name} {type(module).__name__}".lower()
        if any(part in label for part in _MOE_NAME_PARTS):
            return True
    return any(param.dim() >= 3 for param in layer.parameters(recurse=True))


def find_down_projection(layer: nn.Module, hidden_size: int) -> nn.Module:
    """The one Linear/Conv1D inside `layer` mapping intermediate_size -> hidden_size outside attention."""
    if _is_mixture_of_experts(layer):
        raise ValueError(
            f"{type(layer).__name__} is a mixture-of-experts block: it has no single MLP neuron vector, so STC's "
            "`mlp` source cannot read it. Use `sources=['hidden']` for this backbone."
        )
    found = []
    for name, module in layer.named_modules():
        shape = _linear_shape(module)
        if shape is None or any(part in name.lower() for part in _ATTENTION_NAME_PARTS):
            continue
        in_features, out_features = shape
        if out_features == hidden_size and in_features != hidden_size:
            found.append(name)
    if len(found) != 1:
        raise ValueError(
            f"Cannot locate the MLP down-projection of {type(layer).__name__} (candidates: {found or 'none'}). "
            "STC's `mlp` source needs exactly one dense MLP per layer (mixture-of-experts layers are not "
            "supported): use `sources=['hidden']` for this backbone."
        )
    return layer.get_submodule(found[0])


def backbone_hidden_size(backbone: nn.Module) -> int:
    config = backbone.config.get_text_config()
    return config.hidden_size


@dataclass(frozen=True)
class LayerMap:
    """Where the hooks go: the block list and, per block, the MLP down-projection (None when not needed)."""

    path: str
    layers: nn.ModuleList
    down_projections: tuple[nn.Module | None, ...]

    @classmethod
    def build(cls, backbone: nn.Module, need_mlp: bool = True) -> "LayerMap":
        path, layers = find_layer_list(backbone)
        hidden = backbone_hidden_size(backbone)
        downs = tuple(find_down_projection(layer, hidden) if need_mlp else None for layer in layers)
        return cls(path, layers, downs)

    def source_dims(self, backbone: nn.Module) -> dict[str, int]:
        dims = {"hidden": backbone_hidden_size(backbone)}
        if self.down_projections and self.down_projections[0] is not None:
            dims["mlp"] = _linear_shape(self.down_projections[0])[0]
        return dims


# --------------------------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------------------------


def pool(states: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool `states` [B, T, D] over real tokens (`mask` [B, T], 1 = real) into [B, D] float32.

    Computed in float32 so fp16 activations cannot overflow. Rows without any real token pool to zeros.
    "first"/"last" pick the first/last real token, so they are right for left and right padding alike.
    """
    states = states.float()
    mask = mask.to(device=states.device, dtype=torch.bool)
    has_tokens = mask.any(dim=1, keepdim=True)
    if method == "mean":
        weights = mask.unsqueeze(-1).float()
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if method == "max":
        masked = states.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return masked.amax(1).masked_fill(~has_tokens, 0.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if method == "first":
        index = positions.masked_fill(~mask, mask.shape[1]).amin(1).clamp(max=mask.shape[1] - 1)
    elif method == "last":
        index = positions.masked_fill(~mask, -1).amax(1).clamp(min=0)
    else:
        raise ValueError(f"Unknown pooling {method!r}: choose from {list(POOLINGS)}.")
    picked = states[torch.arange(states.shape[0], device=states.device), index]
    return picked * has_tokens.float()


# --------------------------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------------------------


class _Capture:
    """Collects pooled features while a backbone runs; see `capture_pooled`."""

    def __init__(self, mask, requests, neurons):
        self.mask = mask
        self.requests = requests  # {(source, layer): tuple of poolings}
        self.neurons = neurons  # {(source, layer): LongTensor of neuron ids} or {} for all neurons
        self.stash: dict[int, torch.Tensor] = {}
        self.pooled: dict[tuple[str, str, int], torch.Tensor] = {}

    def _pool_into(self, source, layer, states):
        if states.dim() != 3:
            raise ValueError(
                f"Layer {layer} gave a {states.dim()}-D {source} tensor; STC pools [batch, tokens, features] "
                "tensors (unpadded/packed attention implementations are not supported: load the backbone with "
                "`attn_implementation='sdpa'` or 'eager')."
            )
        index = self.neurons.get((source, layer))
        if index is not None:
            states = states.index_select(-1, index.to(states.device))
        for method in self.requests[(source, layer)]:
            self.pooled[(source, method, layer)] = pool(states, self.mask, method)

    def mlp_pre_hook(self, layer):
        def hook(module, args, kwargs=None):
            self.stash[layer] = args[0]

        return hook

    def layer_hook(self, layer):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if ("hidden", layer) in self.requests:
                self._pool_into("hidden", layer, hidden)
            if ("mlp", layer) in self.requests:
                mlp = self.stash.pop(layer)
                if torch.is_grad_enabled() and hidden.requires_grad and not mlp.requires_grad:
                    raise RuntimeError(
                        "MLP activations were captured without gradient (reentrant activation checkpointing). "
                        "Enable it with `model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})` (the default)."
                    )
                self._pool_into("mlp", layer, mlp)

        return hook


@contextlib.contextmanager
def capture_pooled(layer_map: LayerMap, attention_mask, requests, neurons=None):
    """Context manager hooking the backbone; yields a dict {(source, pooling, layer): [B, D] tensor}.

    `requests` maps (source, layer) to the poolings wanted; `neurons` optionally maps (source, layer) to the
    neuron ids to keep (gathered before pooling, which is cheaper and gives identical values).
    Hooks are removed when the context exits, even on error.
    """
    state = _Capture(attention_mask, requests, neurons or {})
    handles = []
    try:
        for source, layer in requests:
            if source == "mlp":
                handles.append(layer_map.down_projections[layer].register_forward_pre_hook(state.mlp_pre_hook(layer)))
        for layer in sorted({layer for _, layer in requests}):
            handles.append(layer_map.layers[layer].register_forward_hook(state.layer_hook(layer)))
        yield state.pooled
    finally:
        for handle in handles:
            handle.remove()
        state.stash.clear()
