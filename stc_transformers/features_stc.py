"""Capture of per-layer hidden states and MLP neuron activations by hooks, and masked pooling.

Self-contained (only torch / transformers imports): the Hub copies this file next to the modeling file for users
who load a checkpoint with ``trust_remote_code=True``.

Layers are the backbone's transformer blocks (``GradientCheckpointingLayer`` subclasses, or the one-block-per-layer
ModuleList of models with plain blocks), numbered 0..L-1; a block that runs every layer (ALBERT) is layer k at its
k-th call.
For layer ``l``:

* ``hidden``: the block's output (the residual stream after the block), captured by a forward hook on the block;
* ``mlp``: the MLP neuron vector, i.e. the input of the MLP down-projection (``act(up)`` for plain MLPs,
  ``act(gate) * up`` for gated ones), captured by a forward pre-hook on that projection.

With gradients both are pooled over real tokens in the block's forward hook, which runs outside activation
checkpointing, so gradients flow through the captured tensors with the non-reentrant checkpoint (the transformers v5
default). Without gradients MLP neurons are pooled at once in the pre-hook, while they are still in cache.

Long inputs (``STCConfig.long_input_chunks``): `ChunkPlan` cuts each row's real tokens into overlapping windows the
backbone can read, and combines the chunks' pooled features consistently with each pooling.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D


SOURCES = ("hidden", "mlp")
POOLINGS = ("mean", "max", "first", "last")
MIN_RELATIVE_SPREAD = 0.01  # see `steady_features`
_ATTENTION_NAME_PARTS = ("attn", "attention")
_MOE_NAME_PARTS = ("expert", "moe", "router")
# the usual names of an MLP's down-projection, for MLPs as wide as the hidden state (their shape does not tell)
_DOWN_PROJECTION_NAMES = (
    "down_proj", "fc2", "c_proj", "dense_4h_to_h", "output.dense", "lin2", "wo", "w2", "ffn_output",
)


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


def _outermost(items: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs nearest the root: nested lists would be inside a block."""
    depth = min((name.count(".") for name, _ in items), default=None)
    return [item for item in items if item[0].count(".") == depth]


def find_layer_list(backbone: nn.Module) -> tuple[str, nn.ModuleList, int]:
    """Return (attribute path, ModuleList, layers per forward pass) of the backbone's transformer blocks.

    Blocks are `GradientCheckpointingLayer`s in most transformers v5 models. For the few whose blocks are plain
    modules (e.g. MPNet), the stack is the ModuleList of one block class with one entry per layer of the config.
    A backbone that runs one block for every layer (ALBERT) gives a list of that one block: layer k is its k-th call.
    """
    modules = [(name, module) for name, module in backbone.named_modules() if isinstance(module, nn.ModuleList)]
    candidates = [
        (name, module) for name, module in modules
        if len(module) > 0 and all(isinstance(child, GradientCheckpointingLayer) for child in module)
    ]
    if candidates:
        path, layers = _outermost(candidates)[0]
        return path, layers, len(layers)
    num_layers = getattr(backbone.config.get_text_config(), "num_hidden_layers", None)
    containers = (nn.ModuleList, nn.ModuleDict)  # a list of lists is a stack of stages, not of blocks
    stacks = _outermost([
        (name, module) for name, module in modules
        if len(module) == num_layers and len({type(child) for child in module}) == 1
        and not isinstance(module[0], containers)
        and not any(part.isdigit() for part in name.split("."))  # not a stack inside one group of a list
    ])
    if len(stacks) > 1:
        raise ValueError(
            f"{type(backbone).__name__} keeps the parts of its layers in parallel lists "
            f"({', '.join(name for name, _ in stacks)}), not one block per layer whose output is the layer's output "
            "(e.g. XLM, FlauBERT). STC cannot hook it: it is not supported."
        )
    if stacks:
        path, layers = stacks[0]
        return path, layers, len(layers)
    if isinstance(num_layers, int) and num_layers > 1:
        # one block reused for every layer: the outermost list holding a single block, if only one list is there
        single = _outermost([(name, module) for name, module in modules
                             if len(module) == 1 and not isinstance(module[0], containers)])
        if len(single) == 1:
            return (*single[0], num_layers)
    raise ValueError(
        f"Cannot find the transformer blocks of {type(backbone).__name__}: STC needs a list of one module per "
        "layer (transformers' `GradientCheckpointingLayer` blocks, or a ModuleList with `num_hidden_layers` "
        "blocks) or one block run for every layer (ALBERT). Backbones that share several blocks between layers "
        "(e.g. ALBERT with 1 < `num_hidden_groups` < `num_hidden_layers`) or group their layers into stages "
        "(e.g. Funnel Transformer) are not supported."
    )


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or GPT-2 style Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return None


def _has_no_dense_mlp(layer: nn.Module) -> bool:
    """MoE blocks (routers, experts; in v5 often fused into 3-D parameters) and convolutional or state-space mixers
    (3-D kernels) outside attention have no single dense neuron vector."""
    for name, module in layer.named_modules():
        label = f"{name} {type(module).__name__}".lower()
        if any(part in label for part in _MOE_NAME_PARTS):
            return True
    return any(param.dim() >= 3 for name, param in layer.named_parameters()
               if not any(part in name.lower() for part in _ATTENTION_NAME_PARTS))


def find_down_projection(layer: nn.Module, hidden_size: int) -> nn.Module:
    """The one Linear/Conv1D inside `layer` mapping intermediate_size -> hidden_size outside attention."""
    if _has_no_dense_mlp(layer):
        raise ValueError(
            f"{type(layer).__name__} has no single dense MLP (a mixture-of-experts, state-space or convolutional "
            "block), so STC's `mlp` source cannot read it. Use `sources=['hidden']` for this backbone."
        )
    found, square = [], []
    for name, module in layer.named_modules():
        shape = _linear_shape(module)
        if shape is None or any(part in name.lower() for part in _ATTENTION_NAME_PARTS):
            continue
        in_features, out_features = shape
        if out_features == hidden_size:
            (square if in_features == hidden_size else found).append(name)
    if not found:  # an MLP as wide as the hidden state: known by its name
        found = [name for name in square
                 if any(f".{name.lower()}".endswith(f".{known}") for known in _DOWN_PROJECTION_NAMES)]
    if len(found) != 1:
        raise ValueError(
            f"Cannot locate the MLP down-projection of {type(layer).__name__} (candidates: {found or 'none'}). "
            "STC's `mlp` source needs exactly one dense MLP per layer (mixture-of-experts layers are not "
            "supported): use `sources=['hidden']` for this backbone."
        )
    return layer.get_submodule(found[0])


def find_up_projections(layer: nn.Module, down: nn.Module, hidden_size: int) -> list[tuple[nn.Module, int]]:
    """The plain Linear/Conv1D modules of `layer` outside attention that map the hidden state to the MLP's neurons
    (the down-projection's input): [(module, parts)], parts = 2 for a fused gate and up projection (twice as wide).
    Candidates only: `capture_pooled` narrows them where a probe pass has shown that the result is unchanged."""
    width = _linear_shape(down)[0]
    found = []
    for name, module in layer.named_modules():
        shape = _linear_shape(module)
        if module is down or type(module) not in (nn.Linear, Conv1D) or "forward" in vars(module) or \
                any(part in name.lower() for part in _ATTENTION_NAME_PARTS):  # vars: already wrapped (accelerate)
            continue
        if shape[0] == hidden_size and shape[1] in (width, 2 * width):
            found.append((module, shape[1] // width))
    return found


def _narrowed_forward(module: nn.Module, rows: torch.Tensor):
    """A forward for a Linear or Conv1D `module` that computes only its output features `rows`."""
    if isinstance(module, Conv1D):  # x @ W + b with W [in, out]

        def forward(x):
            weight, bias = module.weight.index_select(1, rows), module.bias.index_select(0, rows)
            return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], rows.numel())

        return forward

    def forward(x):
        bias = None if module.bias is None else module.bias.index_select(0, rows)
        return nn.functional.linear(x, module.weight.index_select(0, rows), bias)

    return forward


def backbone_hidden_size(backbone: nn.Module) -> int:
    config = backbone.config.get_text_config()
    return config.hidden_size


@dataclass(frozen=True)
class LayerMap:
    """Where the hooks go: the block list and, per block, the MLP down-projection (None when not needed); `dims`
    gives the width of each source (`hidden`, and `mlp` when the down-projections were found). `num_layers` is the
    number of layers a forward pass runs: more than the blocks when one block is reused for every layer (`shared`).
    """

    path: str
    layers: nn.ModuleList
    down_projections: tuple[nn.Module | None, ...]
    dims: dict[str, int]
    num_layers: int
    shared: bool  # one block runs every layer: layer k is its k-th call in a forward pass
    pads_to_window: bool = False  # states come back padded at the end to a window multiple (Longformer, BigBird)

    @classmethod
    def build(cls, backbone: nn.Module, need_mlp: bool = True) -> "LayerMap":
        config = backbone.config.get_text_config()
        if need_mlp and getattr(config, "chunk_size_feed_forward", 0):
            raise ValueError(
                f"The backbone runs its MLPs on chunks of {config.chunk_size_feed_forward} tokens "
                "(`chunk_size_feed_forward`): STC's `mlp` source reads all tokens at once. Set "
                "`chunk_size_feed_forward=0` when loading the backbone, or use `sources=['hidden']`."
            )
        path, layers, num_layers = find_layer_list(backbone)
        hidden = backbone_hidden_size(backbone)
        downs = tuple(find_down_projection(layer, hidden) if need_mlp else None for layer in layers)
        dims = {"hidden": hidden}
        if need_mlp and downs:
            dims["mlp"] = _linear_shape(downs[0])[0]
        pads = getattr(config, "attention_window", None) is not None or \
            getattr(config, "attention_type", None) == "block_sparse"
        return cls(path, layers, downs, dims, num_layers, shared=num_layers > len(layers), pads_to_window=pads)


# --------------------------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------------------------


def token_spans(mask: torch.Tensor, max_runs: int | None = None) -> list[tuple[int, int, int, int]] | None:
    """Cut a batch into runs of consecutive rows whose real tokens fill the same contiguous positions.

    Returns [(first_row, end_row, first_token, end_token)], or None when a row's real tokens are not contiguous or
    more than `max_runs` runs would be needed. Pooling then slices each run's real tokens, with no masked copy of the
    activations. On the CPU slicing is faster even with a run per row (3-6x for unsorted batches of 32-512 rows), so
    `max_runs` defaults to no limit there; on accelerators, where each slice is a kernel launch, to 8 (length-sorted
    batches, left or right padded, give a few runs).
    """
    if max_runs is None and mask.device.type != "cpu":
        max_runs = 8
    real = mask.detach().to("cpu", torch.bool)
    if real.shape[1] == 0:
        return [(0, real.shape[0], 0, 0)]
    counts = real.sum(1)
    positions = torch.arange(real.shape[1]).expand_as(real)
    starts = positions.masked_fill(~real, real.shape[1]).amin(1)
    ends = positions.masked_fill(~real, -1).amax(1) + 1
    starts = torch.where(counts > 0, starts, 0)
    ends = torch.where(counts > 0, ends, 0)
    if not torch.equal(ends - starts, counts):
        return None
    runs = []
    for row, span in enumerate(zip(starts.tolist(), ends.tolist())):
        if runs and runs[-1][2:] == span:
            runs[-1] = (runs[-1][0], row + 1, *span)
        else:
            runs.append((row, row + 1, *span))
    return runs if max_runs is None or len(runs) <= max_runs else None


def _pool_span(states: torch.Tensor, first_token: int, end_token: int, method: str) -> torch.Tensor:
    if end_token == first_token:  # rows without real tokens
        return states.new_zeros(states.shape[0], states.shape[2])
    if method == "mean":  # sum / count: torch's CPU mean over a middle dimension is ~10x slower than its sum
        return states[:, first_token:end_token].sum(1) / (end_token - first_token)
    if method == "max":
        return states[:, first_token:end_token].amax(1)
    return states[:, first_token if method == "first" else end_token - 1].clone()  # a copy: the states can go


def _mean_by_product(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: their sum as one batched product with the mask (weights 1, 0 on padding: products are
    exact), divided by their count. On the CPU 2-3x faster than summing over the token axis, which torch reduces at
    a fraction of the memory bandwidth (a [64, 128, 1536] tensor: 2.1 ms against 5.5 ms). Padding holding inf/NaN
    makes the result non-finite."""
    real = mask.to(device=states.device, dtype=states.dtype)
    return torch.bmm(real.unsqueeze(1), states).squeeze(1).div_(real.sum(1, keepdim=True).clamp(min=1))


def pool(states: torch.Tensor, mask: torch.Tensor, method: str, spans="auto") -> torch.Tensor:
    """Pool `states` [B, T, D] over real tokens (`mask` [B, T], 1 = real) into [B, D] float32.

    Computed in float32 so fp16 activations cannot overflow. Rows without any real token (all padding) pool to
    zeros for every method. "first"/"last" pick the first/last real token, so they are right for left and right
    padding alike; the values at padded positions never matter (even inf/NaN there is ignored by every method).
    `spans`: `token_spans(mask)` when the caller pools several tensors of one batch (computed here by default);
    with spans the pooling slices the real tokens (on the CPU, means are a product with the mask,
    `_mean_by_product`, over the whole batch unless padding holds inf/NaN), without it masks the padding.
    """
    if method not in POOLINGS:
        raise ValueError(f"Unknown pooling {method!r}: choose from {list(POOLINGS)}.")
    states = states.float()
    if isinstance(spans, str):
        spans = token_spans(mask)
    if spans is not None:
        if method == "mean" and states.device.type == "cpu":
            pooled = _mean_by_product(states, mask)
            if math.isfinite(pooled.detach().sum()):  # 10x faster than `isfinite(pooled).all()`
                return pooled
            # inf/NaN in the real tokens (given either way) or only in padding: the same product over each run's
            # real tokens, so that a row rounds as it does without padding
            parts = [_mean_by_product(states[r0:r1, t0:t1], mask[r0:r1, t0:t1]) for r0, r1, t0, t1 in spans]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        parts = [_pool_span(states[r0:r1], t0, t1, method) for r0, r1, t0, t1 in spans]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    mask = mask.to(device=states.device, dtype=torch.bool)
    has_tokens = mask.any(dim=1, keepdim=True)
    if method == "mean":
        total = states.masked_fill(~mask.unsqueeze(-1), 0.0).sum(1)  # masked_fill, not a product: NaN * 0 is NaN
        return total / mask.sum(1, keepdim=True).clamp(min=1).float()
    if method == "max":
        masked = states.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return masked.amax(1).masked_fill(~has_tokens, 0.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if method == "first":
        index = positions.masked_fill(~mask, mask.shape[1]).amin(1).clamp(max=mask.shape[1] - 1)
    else:
        index = positions.masked_fill(~mask, -1).amax(1).clamp(min=0)
    picked = states[torch.arange(states.shape[0], device=states.device), index]
    return picked.masked_fill(~has_tokens, 0.0)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None where it is off (or unknown, as on "meta")."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


def is_tracing() -> bool:
    """Whether torch.export, torch.compile or torch.jit.trace is tracing the model: nothing may then branch on tensor
    values (the trace would keep one batch's values as constants)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def steady_features(mean: torch.Tensor, scale: torch.Tensor, min_relative_spread: float = MIN_RELATIVE_SPREAD):
    """Which pooled features (bool, of `mean`'s shape) vary over the training texts by at least `min_relative_spread`
    of their size: std >= min_relative_spread * (|mean| + std).

    Rounding moves a value by up to 0.4% of its size in bfloat16 (0.05% in float16), and standardisation divides that
    by the feature's spread: a feature almost constant far from zero (a max-pooled outlier dimension of BERT-like
    encoders: 8.0 +- 2e-5 in MiniLM, where bfloat16 rounds 8.0 to steps of 0.06) moves by thousands of units. The
    default 1% is a margin of 2.5x over bfloat16's rounding. The fit leaves the other features out (three of them
    took a float32 fit of MiniLM from 0.829 to 0.578 test accuracy when its checkpoint ran in bfloat16; without them
    it kept 0.832), and a model that has them warns in reduced precision.
    """
    return scale >= min_relative_spread * (mean.abs() + scale)


# --------------------------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run `model` in eval mode, then give every module back its own mode (not the top module's to all)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


class _StopForward(Exception):
    """Raised by a hook once every requested feature is pooled; `capture_pooled` swallows it."""


def mlp_exit_layer(requests) -> int | None:
    """The last layer read when it gives only MLP neurons (the pass can stop at its MLP down-projection), else None.
    `requests`: {(source, layer): poolings}."""
    last = max((layer for _, layer in requests), default=None)
    return last if ("mlp", last) in requests and ("hidden", last) not in requests else None


class _Capture:
    """Collects pooled features while a backbone runs; see `capture_pooled`."""

    def __init__(self, mask, requests, neurons, dims, num_layers, pads_to_window=False, narrowed=None):
        self.mask = mask
        self.pads_to_window = pads_to_window  # Longformer, BigBird: states come back longer, padded at the end
        self.dims = dims  # {source: features per token}
        # While the model is traced (`is_tracing`), nothing may branch on tensor values: padding is masked (no token
        # spans) and the backbone is not stopped early (a fitted backbone ends at its exit layer anyway).
        tracing = is_tracing()
        self.spans = None if tracing else token_spans(mask)  # computed once per batch
        self.requests = requests  # {(source, layer): tuple of poolings}
        self.neurons = neurons  # {(source, layer): LongTensor of neuron ids} or {} for all neurons
        self.num_layers = num_layers
        self.blocks_done = 0  # block calls so far: the layer index of a reused block's next call
        self.mlp_seen: set[int] = set()
        self.blocks_seen: set[int] = set()
        self.stash: dict[int, torch.Tensor] = {}
        self.pooled: dict[tuple[str, str, int], torch.Tensor] = {}
        # Without gradients, MLP neurons are pooled in the down-projection's pre-hook while they are still in the
        # processor's cache (with gradients: in the block's hook, outside activation checkpointing), and the backbone
        # stops once the last layer read has given its features (at its MLP down-projection when that layer gives
        # only MLP neurons): the rest is never used.
        self.pool_early = not torch.is_grad_enabled()
        last = max(layer for _, layer in requests) if requests else None
        stops = self.pool_early and not tracing
        self.stop_layer = last if stops else None
        self.mlp_stop_layer = mlp_exit_layer(requests) if stops else None
        # the up-projections of that layer, to compute only its kept MLP neurons (`capture_pooled`)
        self.narrowed = narrowed if self.mlp_stop_layer is not None and ("mlp", last) in neurons else []

    def _pool_into(self, source, layer, states):
        batch, tokens = self.mask.shape
        if states.dim() == 2 and states.shape[0] == self.mask.numel():  # tokens flattened over the batch (e.g. OPT)
            states = states.view(batch, tokens, states.shape[1])
        if states.dim() != 3:
            raise ValueError(
                f"Layer {layer} gave a {states.dim()}-D {source} tensor; STC pools [batch, tokens, features] "
                "tensors. Backbones with several residual streams (hyper-connections) are not supported; nor are "
                "unpadded/packed attention implementations (load the backbone with `attn_implementation='sdpa'` or "
                "'eager')."
            )
        width, index = self.dims[source], self.neurons.get((source, layer))
        if self.narrowed and source == "mlp" and layer == self.mlp_stop_layer:
            width, index = len(index), None  # its up-projections computed only the kept neurons, in this order
        if self.pads_to_window and states.shape[0] == batch and states.shape[1] > tokens and states.shape[2] == width:
            states = states[:, :tokens]  # padded at the end inside the backbone to a window multiple
        if states.shape != (batch, tokens, width):
            raise ValueError(
                f"Layer {layer} gave a {source} tensor of shape {tuple(states.shape)} for a batch of {batch} texts "
                f"of {tokens} tokens and {width} features: STC pools [batch, tokens, features] tensors, and this "
                "backbone lays them out otherwise (sequence-first as in XLNet, channels-first as in SqueezeBERT, "
                "with tokens pooled between layers, or with tokens of its own added, as CPM-Ant's prompt). It is not "
                "supported."
            )
        if index is not None:
            index = index.to(states.device)
            if self.spans is None or states.dtype != torch.float32:  # pooling copies: copy only the kept neurons
                states, index = states.index_select(-1, index), None
        for method in self.requests[(source, layer)]:
            pooled = pool(states, self.mask, method, self.spans)  # sliced: reads the states once, copies nothing
            self.pooled[(source, method, layer)] = pooled if index is None else pooled.index_select(-1, index)

    def mlp_pre_hook(self, layer=None):
        """Pre-hook of a layer's MLP down-projection (`layer=None`: of a reused block, the layer it is running)."""

        def hook(module, args, kwargs=None):
            index = self.blocks_done if layer is None else layer
            if ("mlp", index) not in self.requests:
                return
            if index in self.mlp_seen:
                raise ValueError(
                    f"The MLP down-projection of layer {index} ran twice in one forward pass (a looped or "
                    "recurrent-depth backbone): STC cannot tell its runs apart. It is not supported."
                )
            self.mlp_seen.add(index)
            if self.pool_early:
                self._pool_into("mlp", index, args[0])
                if index == self.mlp_stop_layer:
                    raise _StopForward
                return
            self.stash[index] = args[0]

        return hook

    def layer_hook(self, layer=None):
        """Forward hook of a layer's block (`layer=None`: of the block reused for every layer, counting its calls)."""

        def hook(module, args, output):
            index = layer
            if layer is None:
                index, self.blocks_done = self.blocks_done, self.blocks_done + 1
                if index >= self.num_layers:
                    raise ValueError(
                        f"The reused block of this backbone ran more than num_hidden_layers={self.num_layers} times "
                        "in one forward pass: STC cannot tell its layers apart. It is not supported."
                    )
            if index in self.blocks_seen:
                raise ValueError(
                    f"The block of layer {index} ran twice in one forward pass (a looped or recurrent-depth "
                    "backbone): STC cannot tell its runs apart. It is not supported."
                )
            self.blocks_seen.add(index)
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if ("hidden", index) in self.requests:
                self._pool_into("hidden", index, hidden)
            mlp = self.stash.pop(index, None)  # None: its hook never ran (the capture's end says why)
            if mlp is not None:
                if torch.is_grad_enabled() and hidden.requires_grad and not mlp.requires_grad:
                    raise RuntimeError(
                        "MLP activations were captured without gradient (reentrant activation checkpointing). "
                        "Enable it with `model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})` (the default)."
                    )
                self._pool_into("mlp", index, mlp)
            if index == self.stop_layer:
                raise _StopForward

        return hook


@contextlib.contextmanager
def capture_pooled(layer_map: LayerMap, attention_mask, requests, neurons=None, narrowed=None):
    """Context manager hooking the backbone; yields a dict {(source, pooling, layer): [B, D] tensor}.

    `requests` maps (source, layer) to the poolings wanted; `neurons` optionally maps (source, layer) to the
    neuron ids to keep (picked from the pooled vectors, or before pooling when padding must be masked: the values are
    the same either way).
    Without gradients, the backbone call inside the context stops early (after the last layer read, or at its MLP
    down-projection when that layer gives only MLP features): code after it in the same context does not run.
    Hooks are removed when the context exits, even on error.
    `narrowed`: the up-projections of the last layer read (`find_up_projections`); when the pass stops at that
    layer's MLP, they compute only its kept neurons (`neurons`), which is all the capture reads of them.
    """
    state = _Capture(attention_mask, requests, neurons or {}, layer_map.dims, layer_map.num_layers,
                     layer_map.pads_to_window, narrowed or [])
    handles, patched = [], []
    try:
        if state.narrowed:
            kept = state.neurons[("mlp", state.mlp_stop_layer)]
            width = layer_map.dims["mlp"]
            for module, parts in state.narrowed:
                ids = kept.to(module.weight.device)
                module.forward = _narrowed_forward(module, torch.cat([ids + part * width for part in range(parts)]))
                patched.append(module)
        if layer_map.shared:  # one block runs every layer: its hooks count the calls
            if any(source == "mlp" for source, _ in requests):
                handles.append(layer_map.down_projections[0].register_forward_pre_hook(state.mlp_pre_hook()))
            handles.append(layer_map.layers[0].register_forward_hook(state.layer_hook()))
        else:
            for source, layer in requests:
                if source == "mlp":
                    down = layer_map.down_projections[layer]
                    handles.append(down.register_forward_pre_hook(state.mlp_pre_hook(layer)))
            for layer in sorted({layer for _, layer in requests}):
                handles.append(layer_map.layers[layer].register_forward_hook(state.layer_hook(layer)))
        stopped = False
        try:
            yield state.pooled
        except _StopForward:  # the backbone was stopped after the last feature it had to give
            stopped = True
        missing = [(source, layer) for (source, layer), poolings in requests.items()
                   if any((source, method, layer) not in state.pooled for method in poolings)]
        if missing:
            raise ValueError(
                f"The backbone ran without calling the hooks of its blocks ({missing[0][0]} of layer "
                f"{missing[0][1]} never came): it calls them outside `nn.Module.__call__` (e.g. SqueezeBERT's "
                "`layer.forward(...)`), which is not supported, or its modules were replaced after the model was "
                "built (e.g. by `torch.ao.quantization.quantize_dynamic`; torchao's `quantize_` keeps them)."
            )
        if layer_map.shared and not stopped and state.blocks_done != layer_map.num_layers:
            raise ValueError(
                f"The reused block of this backbone ran {state.blocks_done} times in one forward pass, not "
                f"num_hidden_layers={layer_map.num_layers}: STC cannot tell its layers apart. It is not supported."
            )
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward  # the class's own forward again
        state.stash.clear()


# --------------------------------------------------------------------------------------------------------------------
# Long inputs: overlapping chunks
# --------------------------------------------------------------------------------------------------------------------


def ids_position_table(backbone: nn.Module) -> nn.Module | None:
    """The position table of RoBERTa-style backbones (it has a padding index): they number positions from the
    input ids themselves, starting after the padding index, so left padding is already skipped. Any embedding
    module with a padding index counts (e.g. I-BERT's quantized `QuantEmbedding`)."""
    for name, module in backbone.named_modules():
        is_table = isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2
        if is_table and "position" in name and getattr(module, "padding_idx", None) is not None:
            return module
    return None


def first_position_id(backbone: nn.Module) -> int | torch.Tensor:
    """The position id of a text's first token when none are passed: the first entry of the backbone's
    `position_ids` buffer where it keeps one (2 in YOSO, MRA and Nystromformer), else 0. While the model is traced
    (`is_tracing`) it is that entry as a tensor."""
    for name, buffer in backbone.named_buffers():
        if name.split(".")[-1] == "position_ids" and buffer.numel():
            first = buffer.reshape(-1)[0]
            return first if is_tracing() else int(first)
    return 0


def backbone_window(backbone: nn.Module) -> int | None:
    """Most tokens the backbone reads at once: its position table (`max_position_embeddings`), less the offset of
    RoBERTa-style position ids that start after the padding index; None when the config sets no limit."""
    limit = getattr(backbone.config.get_text_config(), "max_position_embeddings", None)
    if limit is None or limit <= 0:  # e.g. XLNet's -1: no limit
        return None
    table = ids_position_table(backbone)
    if table is not None:
        limit = min(limit, table.weight.shape[0] - table.padding_idx - 1)
    return int(limit)


@dataclass(frozen=True)
class ChunkPlan:
    """How the rows of a batch are cut into overlapping chunks, and how the chunks' pooled features recombine.

    Each row's real tokens (mask == 1, wherever the padding is) are cut into windows of at most `window` tokens;
    consecutive windows of a row share `overlap` tokens (stride `window - overlap`), the last one may be shorter.
    Chunks are right-padded and laid out row after row. A row without real tokens gets one all-padding chunk.
    Special tokens are not re-inserted: the first chunk keeps the text's first token (e.g. [CLS]), the last
    chunk its last one (e.g. [SEP] / EOS).
    """

    rows: torch.Tensor  # [C] original row of each chunk
    token_index: torch.Tensor  # [C, W] position in the original row of each chunk token (0 on padding)
    mask: torch.Tensor  # [C, W] attention mask of the chunks (right padded)
    slots: torch.Tensor  # [B, K] chunk ids of each row, in order (0 where unused)
    slot_mask: torch.Tensor  # [B, K] which slots hold a chunk

    @classmethod
    def build(cls, attention_mask: torch.Tensor, window: int, overlap: int) -> "ChunkPlan":
        if window < 1 or not 0 <= overlap < window:
            raise ValueError(
                f"`chunk_overlap` must be in [0, {window - 1}] for a window of {window} tokens, got {overlap}."
            )
        stride = window - overlap
        real = attention_mask.detach().to(torch.bool).cpu()
        rows, pieces, row_chunks = [], [], []
        for row, row_mask in enumerate(real):
            positions = torch.nonzero(row_mask).flatten()
            count = positions.numel()
            starts = range(0, max(count - overlap, 1), stride) if count > window else [0]
            row_chunks.append(list(range(len(rows), len(rows) + len(starts))))
            for start in starts:
                rows.append(row)
                pieces.append(positions[start : start + window])
        width = max(max(piece.numel() for piece in pieces), 1)
        token_index = torch.zeros(len(pieces), width, dtype=torch.long)
        mask = torch.zeros(len(pieces), width, dtype=torch.long)
        for chunk, piece in enumerate(pieces):
            token_index[chunk, : piece.numel()] = piece
            mask[chunk, : piece.numel()] = 1
        most = max(len(ids) for ids in row_chunks)
        slots = torch.zeros(len(row_chunks), most, dtype=torch.long)
        slot_mask = torch.zeros(len(row_chunks), most, dtype=torch.bool)
        for row, ids in enumerate(row_chunks):
            slots[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            slot_mask[row, : len(ids)] = True
        device = attention_mask.device
        return cls(
            torch.tensor(rows, dtype=torch.long, device=device),
            token_index.to(device),
            mask.to(device=device, dtype=attention_mask.dtype),
            slots.to(device),
            slot_mask.to(device),
        )

    @property
    def num_chunks(self) -> int:
        return self.rows.shape[0]

    def split(self, tensor: torch.Tensor, pad_value=0) -> torch.Tensor:
        """Cut a per-token tensor [B, T, ...] (input ids, token type ids, embeddings) into chunks [C, W, ...]."""
        index = self.token_index.to(tensor.device)
        chunks = tensor[self.rows.to(tensor.device).unsqueeze(1), index]
        padding = ~self.mask.to(device=tensor.device, dtype=torch.bool)
        padding = padding.view(padding.shape + (1,) * (chunks.dim() - 2))
        return chunks.masked_fill(padding, pad_value)

    def combine(self, pooled: torch.Tensor, method: str) -> torch.Tensor:
        """Per-chunk pooled features [C, D] -> per-row [B, D], consistently with `method`.

        mean: token-count-weighted mean of the chunk means (the mean over all chunk tokens, overlaps counted per
        chunk); max: max over chunks; first: the first chunk's value; last: the last chunk's value.
        """
        stacked = pooled[self.slots.to(pooled.device)]  # [B, K, D]
        slot_mask = self.slot_mask.to(pooled.device)
        if method == "mean":
            counts = self.mask.sum(1).to(device=pooled.device, dtype=torch.float32)[self.slots.to(pooled.device)]
            weights = counts * slot_mask.float()  # [B, K]
            return (stacked * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
        return pool(stacked, slot_mask, method)
