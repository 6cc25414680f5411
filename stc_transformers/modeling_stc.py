"""STCForSequenceClassification: a Sparsify-then-Classify head on any `AutoModel` text backbone.

Data flow, in one direction: token ids -> backbone (hooks pool each needed layer's hidden state / MLP neurons,
the backbone stops at the exit layer) -> gather of the selected neurons -> standardisation -> linear head.

Self-contained with relative imports only: the Hub copies this file flat for `trust_remote_code` users.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils.generic import can_return_tuple

from .configuration_stc import STCConfig, is_causal_backbone
from .features_stc import LayerMap, capture_pooled


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
_IGNORED_KWARGS = ("output_attentions", "output_hidden_states", "num_items_in_batch", "use_cache")


def feature_groups(config: STCConfig, dims: dict[str, int]) -> list[dict]:
    """The head's input groups: `config.selection`, or every neuron of every layer/source/pooling when None."""
    if config.selection is not None:
        return config.selection
    return [
        {"source": source, "pooling": pooling, "layer": layer, "neurons": None, "size": dims[source]}
        for source in config.sources
        for pooling in config.poolings
        for layer in range(config.text_config.num_hidden_layers)
    ]


def group_size(group: dict) -> int:
    return group["size"] if group["neurons"] is None else len(group["neurons"])


class STCFeatureSelector:
    """Knows which (source, layer) to hook, which neurons to gather, and how to assemble the head input.

    For each (source, layer) the union of neurons needed by its poolings is gathered before pooling; each group
    then picks its neurons out of that union. The index tensors are derived from the config (not module state,
    so loading never has to restore them) and cached per device.
    """

    def __init__(self, groups: list[dict]):
        self.groups = [(g["source"], g["pooling"], g["layer"]) for g in groups]
        self.sizes = [group_size(g) for g in groups]
        self.requests: dict[tuple[str, int], tuple[str, ...]] = {}
        for source, pooling, layer in self.groups:
            poolings = self.requests.setdefault((source, layer), ())
            if pooling not in poolings:
                self.requests[(source, layer)] = poolings + (pooling,)
        self.dense = all(g["neurons"] is None for g in groups)
        self._unions: dict[tuple[str, int], torch.Tensor] = {}
        self._positions: list[torch.Tensor] = []
        self._cache: dict[torch.device, tuple[dict, list]] = {}
        if self.dense:
            return
        unions: dict[tuple[str, int], set[int]] = {}
        for g in groups:
            unions.setdefault((g["source"], g["layer"]), set()).update(g["neurons"])
        ordered = {key: sorted(union) for key, union in unions.items()}
        self._unions = {key: torch.tensor(union, dtype=torch.long, device="cpu") for key, union in ordered.items()}
        for g in groups:
            where = {neuron: pos for pos, neuron in enumerate(ordered[(g["source"], g["layer"])])}
            self._positions.append(torch.tensor([where[n] for n in g["neurons"]], dtype=torch.long, device="cpu"))

    @property
    def num_features(self) -> int:
        return sum(self.sizes)

    def _on(self, device) -> tuple[dict, list]:
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = (
                {key: index.to(device) for key, index in self._unions.items()},
                [positions.to(device) for positions in self._positions],
            )
        return self._cache[device]

    def neurons(self, device) -> dict[tuple[str, int], torch.Tensor]:
        """Neuron ids to gather per (source, layer) before pooling; empty when the head is dense."""
        return self._on(device)[0]

    def assemble(self, pooled: dict[tuple[str, str, int], torch.Tensor]) -> torch.Tensor:
        """Concatenate the groups' pooled neurons in head-input order: [batch, num_features]."""
        if self.dense:
            return torch.cat([pooled[key] for key in self.groups], dim=-1)
        positions = self._on(next(iter(pooled.values())).device)[1]
        return torch.cat([pooled[key].index_select(-1, pos) for key, pos in zip(self.groups, positions)], dim=-1)


class STCHead(nn.Module):
    """Standardise the selected features with stored statistics, then a linear classifier. Kept in float32."""

    def __init__(self, num_features: int, num_labels: int, standardize: bool = True):
        super().__init__()
        self.standardize = standardize
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_scale", torch.ones(num_features))
        self.classifier = nn.Linear(num_features, num_labels)

    def standardized(self, features: torch.Tensor) -> torch.Tensor:
        if not self.standardize:
            return features
        return (features - self.feature_mean) / self.feature_scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.standardized(features.to(self.classifier.weight.dtype)))


class STCPreTrainedModel(PreTrainedModel):
    config: STCConfig
    config_class = STCConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["head"]
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, STCHead):
            init.zeros_(module.feature_mean)
            init.ones_(module.feature_scale)
            init.normal_(module.classifier.weight, std=self.config.initializer_range)
            init.zeros_(module.classifier.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a saved STC checkpoint. Refuses other model types with a pointer to `from_backbone_pretrained`."""
        if not isinstance(kwargs.get("config"), STCConfig):
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
            model_type = config_dict.get("model_type")
            if model_type != STCConfig.model_type:
                raise ValueError(
                    f"{pretrained_model_name_or_path!r} is a {model_type!r} checkpoint, not an STC one. To wrap a "
                    f"pretrained backbone use `{cls.__name__}.from_backbone_pretrained({pretrained_model_name_or_path!r}"
                    ", num_labels=...)` and fit it (e.g. with `STCTrainer`)."
                )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


class STCForSequenceClassification(STCPreTrainedModel):
    """Sequence classifier reading the selected neurons of several layers of a (frozen) backbone.

    Before a fit the head is dense over every pooled feature of every layer (trainable with the HF `Trainer`);
    `sparsify(eta)` or `STCTrainer` reduce it to the salient neurons and let the backbone exit early.
    """

    def __init__(self, config: STCConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.text_config)
        self._build_head_input()
        self.head = STCHead(self.selector.num_features, config.num_labels, config.standardize)
        self.post_init()

    # ---------------------------------------------------------------------------------------------------------------
    # construction helpers
    # ---------------------------------------------------------------------------------------------------------------

    def _build_head_input(self):
        self.layer_map = LayerMap.build(self.backbone, need_mlp="mlp" in self.config.sources)
        self.source_dims = self.layer_map.source_dims(self.backbone)
        if len(self.layer_map.layers) != self.config.text_config.num_hidden_layers:
            raise ValueError(
                f"The backbone has {len(self.layer_map.layers)} layers but its config says "
                f"{self.config.text_config.num_hidden_layers}."
            )
        if self.config.selection:
            for group in self.config.selection:
                if group["layer"] >= len(self.layer_map.layers):
                    raise ValueError(f"Selection uses layer {group['layer']}, the backbone has {len(self.layer_map.layers)}.")
        self.selector = STCFeatureSelector(feature_groups(self.config, self.source_dims))
        self._causal = is_causal_backbone(self.config.text_config)
        self._backbone_arguments = set(inspect.signature(self.backbone.forward).parameters)

    @classmethod
    def from_backbone_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        num_labels: int | None = None,
        id2label: dict | None = None,
        label2id: dict | None = None,
        problem_type: str | None = None,
        sources=("hidden", "mlp"),
        poolings=None,
        l1_strength: float = 0.0,
        pad_token_id: int | None = None,
        **backbone_kwargs,
    ) -> "STCForSequenceClassification":
        """Wrap a pretrained backbone (Hub id or local folder), loading its weights unchanged.

        `backbone_kwargs` go to `AutoModel.from_pretrained` (e.g. `dtype=torch.bfloat16`, `attn_implementation`,
        `gguf_file`, `revision`).
        """
        backbone = AutoModel.from_pretrained(pretrained_model_name_or_path, **backbone_kwargs)
        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
            num_labels = len(id2label) if num_labels is None else num_labels
            label2id = label2id or {v: k for k, v in id2label.items()}
        label_kwargs = {"id2label": id2label, "label2id": label2id} if id2label is not None else {}
        config = STCConfig(
            text_config=backbone.config.to_dict(),
            num_labels=num_labels if num_labels is not None else 2,
            problem_type=problem_type,
            sources=list(sources),
            poolings=poolings,
            l1_strength=l1_strength,
            pad_token_id=pad_token_id if pad_token_id is not None else backbone.config.pad_token_id,
            **label_kwargs,
        )
        # The sub-config is rebuilt from a dict; the attention implementation must follow the backbone (a None
        # here makes Llama attention non-causal after a save/load round trip).
        config.text_config._attn_implementation = backbone.config._attn_implementation
        config._attn_implementation = backbone.config._attn_implementation
        backbone.config = config.text_config
        config.dtype = backbone.dtype
        model = cls(config, backbone=backbone)
        model.head.float()
        model.name_or_path = str(pretrained_model_name_or_path)
        return model

    # ---------------------------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------------------------

    def pooled_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **backbone_inputs,
    ) -> torch.Tensor:
        """The selected pooled features [batch, num_features] in float32, before standardisation."""
        reference = input_ids if input_ids is not None else backbone_inputs.get("inputs_embeds")
        if reference is None:
            raise ValueError("Pass `input_ids` (or `inputs_embeds`) from the tokenizer.")
        if reference.shape[0] == 0 or reference.shape[1] == 0:
            raise ValueError(
                "Empty batch: got input of shape "
                f"{tuple(reference.shape)}. Pass at least one non-empty text (tokenized to at least one token)."
            )
        if attention_mask is None:
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        requests = self.selector.requests
        with capture_pooled(self.layer_map, attention_mask, requests, self.selector.neurons(reference.device)) as pooled:
            if self.config.text_config.is_encoder_decoder:
                raise ValueError("Encoder-decoder backbones are not supported; use an encoder or a decoder model.")
            accepted = self._backbone_arguments
            if "use_cache" in accepted:
                backbone_inputs["use_cache"] = False
            if self._causal and "position_ids" in accepted and "position_ids" not in backbone_inputs:
                # Decoders with absolute positions (GPT-2) must count positions from the first real token, so
                # left padding gives the same features as no padding (as `generate` does).
                backbone_inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **backbone_inputs)
            return self.selector.assemble(pooled)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor] | SequenceClassifierOutput:
        unknown = set(kwargs) - set(_IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"STCForSequenceClassification.forward got unexpected arguments {sorted(unknown)}.")
        backbone_inputs = {
            name: value
            for name, value in (
                ("token_type_ids", token_type_ids),
                ("position_ids", position_ids),
                ("inputs_embeds", inputs_embeds),
            )
            if value is not None
        }
        features = self.pooled_features(input_ids, attention_mask, **backbone_inputs)
        logits = self.head(features)
        loss = self.loss(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Regression / single-label / multi-label loss on `config.problem_type` (inferred as in transformers)."""
        num_labels = self.config.num_labels
        if self.config.problem_type is None:
            if num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        problem_type = self.config.problem_type
        labels = labels.to(logits.device)
        if problem_type == "single_label_classification":
            labels = labels.view(-1).long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
                raise ValueError(
                    f"Label ids must be in [0, {num_labels - 1}] for num_labels={num_labels}; got "
                    f"min {labels.min().item()}, max {labels.max().item()}. Map your labels with `label2id`."
                )
            loss = CrossEntropyLoss()(logits.view(-1, num_labels), labels)
        elif problem_type == "multi_label_classification":
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Multi-label targets must have shape [batch, {num_labels}] (one 0/1 column per label); got "
                    f"{tuple(labels.shape)}."
                )
            loss = BCEWithLogitsLoss()(logits, labels.to(logits.dtype))
        elif problem_type == "regression":
            labels = labels.to(logits.dtype)
            loss = MSELoss()(logits.squeeze(-1), labels.squeeze(-1)) if num_labels == 1 else MSELoss()(logits, labels)
        else:
            raise ValueError(f"Unknown problem_type {problem_type!r}.")
        if self.training and self.config.l1_strength > 0:
            loss = loss + self.config.l1_strength * self.head.classifier.weight.abs().sum()
        return loss

    # ---------------------------------------------------------------------------------------------------------------
    # sparsification and early exit
    # ---------------------------------------------------------------------------------------------------------------

    def freeze_backbone(self, frozen: bool = True) -> "STCForSequenceClassification":
        """Stop (or restart) gradient updates of the backbone; only the head trains."""
        self.backbone.requires_grad_(not frozen)
        return self

    def set_selection(self, selection: list[dict], weight, bias, mean=None, scale=None, truncate: bool = True):
        """Install a neuron selection with its head (weight [num_labels, F], bias, standardisation statistics).

        The backbone is cut after the highest selected layer when `truncate` (early exit).
        """
        self.config.selection = [self.config._check_group(group) for group in selection]
        self.selector = STCFeatureSelector(feature_groups(self.config, self.source_dims))
        head = STCHead(self.selector.num_features, self.config.num_labels, self.config.standardize)
        with torch.no_grad():
            head.classifier.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            head.classifier.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
            if mean is not None:
                head.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            if scale is not None:
                head.feature_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        self.head = head.to(self.device)
        if truncate:
            self.truncate_backbone()
        return self

    def sparsify(self, eta: float = 0.9, truncate: bool = True) -> "STCForSequenceClassification":
        """Keep, per (source, pooling, layer) group, the smallest neuron set reaching `eta` of the group's
        importance (squared head weight summed over labels), shrink the head, and exit early."""
        if not 0 < eta <= 1:
            raise ValueError(f"`eta` must be in (0, 1], got {eta}.")
        weight = self.head.classifier.weight.detach().float()
        groups = feature_groups(self.config, self.source_dims)
        selection, columns, start = [], [], 0
        for group in groups:
            size = group_size(group)
            importance = weight[:, start : start + size].pow(2).sum(0)
            keep = _smallest_set_reaching(importance, eta)
            if keep.numel():
                neurons = list(range(size)) if group["neurons"] is None else group["neurons"]
                selection.append({**{k: group[k] for k in ("source", "pooling", "layer")},
                                  "neurons": [neurons[i] for i in keep.tolist()]})
                columns.append(keep + start)
            start += size
        if not selection:
            raise ValueError("Every head weight is zero: train the head (or lower `l1_strength`) before sparsifying.")
        columns = torch.cat(columns)
        return self.set_selection(
            selection,
            weight[:, columns],
            self.head.classifier.bias.detach(),
            self.head.feature_mean[columns],
            self.head.feature_scale[columns],
            truncate=truncate,
        )

    def truncate_backbone(self) -> "STCForSequenceClassification":
        """Drop backbone layers after the exit layer; logits are unchanged and checkpoints get smaller."""
        keep = self.config.exit_layer + 1
        total = len(self.layer_map.layers)
        if keep >= total:
            return self
        del self.layer_map.layers[keep:]
        for config in {id(c): c for c in (self.config.text_config, self.backbone.config)}.values():
            for name, value in list(vars(config).items()):
                if isinstance(value, (list, tuple)) and len(value) == total and name != "architectures":
                    setattr(config, name, type(value)(value[:keep]))
            config.num_hidden_layers = keep
        self._build_head_input()
        return self

    def feature_names(self) -> list[tuple[str, str, int, int]]:
        """(source, pooling, layer, neuron) of every head input, in order."""
        names = []
        for group in feature_groups(self.config, self.source_dims):
            neurons = range(group_size(group)) if group["neurons"] is None else group["neurons"]
            names.extend((group["source"], group["pooling"], group["layer"], int(n)) for n in neurons)
        return names

    def feature_contributions(self, input_ids=None, attention_mask=None, **backbone_inputs) -> torch.Tensor:
        """Per-feature contributions [batch, num_labels, num_features]: head weight x standardised activation.

        Summed over features and added to the head bias, they give the logits exactly.
        """
        features = self.head.standardized(self.pooled_features(input_ids, attention_mask, **backbone_inputs))
        return features.unsqueeze(1) * self.head.classifier.weight.unsqueeze(0)


def _smallest_set_reaching(importance: torch.Tensor, eta: float) -> torch.Tensor:
    """Indices (ascending) of the smallest set whose importance reaches `eta` of the total."""
    total = importance.sum()
    if total <= 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.sort(importance, descending=True, stable=True).indices
    cumulative = importance[order].cumsum(0)
    count = int(torch.searchsorted(cumulative, eta * total * (1 - 1e-6)).item()) + 1
    return order[: min(count, importance.numel())].sort().values


__all__ = ["STCForSequenceClassification", "STCPreTrainedModel", "STCHead", "STCFeatureSelector"]
