"""STCForSequenceClassification: a Sparsify-then-Classify head on any `AutoModel` text backbone.

Data flow, in one direction: token ids -> backbone (hooks pool each needed layer's hidden state / MLP neurons,
the backbone stops at the exit layer) -> gather of the selected neurons -> standardisation -> linear head.

Self-contained with relative imports only: the Hub copies this file flat for `trust_remote_code` users.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import shutil
import tempfile

import huggingface_hub
import torch
from huggingface_hub.errors import LocalTokenNotFoundError
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, PreTrainedModel
from transformers import initialization as init
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .configuration_stc import STCConfig, is_causal_backbone
from .features_stc import (
    autocast_dtype,
    eval_mode,
    ChunkPlan,
    LayerMap,
    backbone_window,
    capture_pooled,
    find_up_projections,
    first_position_id,
    ids_position_table,
    is_tracing,
    mlp_exit_layer,
    MIN_RELATIVE_SPREAD,
    steady_features,
)


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
_ACCEPTED_KWARGS = ("num_items_in_batch", "use_cache")  # what Trainer / pipeline pass (return_dict: the decorator)
logger = logging.get_logger(__name__)


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

    For each (source, layer) the capture keeps the union of neurons needed by its poolings; each group then picks
    its neurons out of that union. The index tensors are derived from the config (not module state,
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
            with torch.inference_mode(False):  # kept copies made under inference mode must serve autograd later
                self._cache[device] = (
                    {key: index.to(device) for key, index in self._unions.items()},
                    [positions.to(device) for positions in self._positions],
                )
        return self._cache[device]

    def neurons(self, device) -> dict[tuple[str, int], torch.Tensor]:
        """Neuron ids to gather per (source, layer) before pooling; empty when the head is dense."""
        return self._on(device)[0]

    def assemble(self, pooled: dict[tuple[str, str, int], torch.Tensor], device=None) -> torch.Tensor:
        """Concatenate the groups' pooled neurons in head-input order: [batch, num_features], on `device` (default:
        that of the pooled features; layers split over several devices with `device_map` are gathered there)."""
        device = torch.device(device) if device is not None else next(iter(pooled.values())).device
        if self.dense:
            return torch.cat([pooled[key].to(device) for key in self.groups], dim=-1)
        positions = self._on(device)[1]
        return torch.cat([pooled[key].to(device).index_select(-1, pos) for key, pos in zip(self.groups, positions)],
                         dim=-1)


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
        features = features.to(self.classifier.weight.dtype)
        device_type = features.device.type  # float32 under autocast too
        autocast = autocast_dtype(device_type) is not None
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            return self.classifier(self.standardized(features))


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
            if not config_dict:
                raise OSError(
                    f"{pretrained_model_name_or_path!r} has no config.json: it is not a saved model, or saving it was "
                    "interrupted. Save the model there again."
                )
            model_type = config_dict.get("model_type")
            if model_type != STCConfig.model_type:
                raise ValueError(
                    f"{pretrained_model_name_or_path!r} is a {model_type!r} checkpoint, not an STC one. To wrap a "
                    f"pretrained backbone use `{cls.__name__}.from_backbone_pretrained({pretrained_model_name_or_path!r}"
                    ", num_labels=...)` and fit it (e.g. with `STCTrainer`)."
                )
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except Exception as error:
            if type(error).__name__ != "SafetensorError":  # safetensors is not imported here (Hub copy of the file)
                raise
            raise OSError(
                f"The weights of {pretrained_model_name_or_path!r} cannot be read: the checkpoint is truncated or "
                f"corrupted ({error}). Save it again or re-download it."
            ) from error
        # transformers only logs missing / unexpected weights and initialises the missing ones at random: for a
        # saved STC classifier that means an incomplete or corrupted checkpoint, never something to predict with.
        problems = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys") if info.get(k)}
        if problems:
            details = "; ".join(
                f"{len(names)} {kind.replace('_', ' ')} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                for kind, names in problems.items()
            )
            raise OSError(
                f"The checkpoint {pretrained_model_name_or_path!r} is incomplete or corrupted: {details}. Its weights "
                "do not match its config.json; save the model again (or re-download it) instead of loading it with "
                "randomly initialised weights."
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, made atomic by `_atomic_save`."""
        return self._atomic_save(save_directory, *args, **kwargs)

    def _atomic_save(self, save_directory, *args, **kwargs):
        """Save so that an interrupted save never leaves a checkpoint that loads silently.

        `PreTrainedModel.save_pretrained` writes the config first and the weights after it, in place: an error
        in between leaves the new config with the old weights, and a failed shard mixes new and old shards; both
        load without a word. Here everything is written to a hidden staging folder inside `save_directory` (same
        file system), then moved in: the old `config.json` is removed first and the new one moved in last (the
        commit), stale weight files of an earlier save are removed in between. An error before the commit leaves
        the previous checkpoint untouched; one during the commit leaves a folder without `config.json`, which
        fails loudly. Files the save does not write (tokenizer, README, training state) are kept.
        """
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        if (
            kwargs.get("push_to_hub")
            or os.path.isfile(save_directory)
            or not self.should_save_on_this_rank(is_main_process)
        ):
            return super().save_pretrained(save_directory, *args, **kwargs)
        target = os.fspath(save_directory)
        os.makedirs(target, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".stc-saving-", dir=target)
        try:
            result = super().save_pretrained(staging, *args, **kwargs)
            written = sorted(os.listdir(staging), key=lambda name: name == "config.json")  # config.json last
            if "config.json" in written and os.path.exists(os.path.join(target, "config.json")):
                os.remove(os.path.join(target, "config.json"))
            variant = re.escape(f".{kwargs['variant']}") if kwargs.get("variant") else ""
            shards = rf"model{variant}(-\d{{5}}-of-\d{{5}})?\.safetensors"
            stale = re.compile(rf"{shards}|model\.safetensors\.index{variant}\.json")
            for name in os.listdir(target):
                if stale.fullmatch(name) and name not in written:
                    os.remove(os.path.join(target, name))
            for name in written:
                os.replace(os.path.join(staging, name), os.path.join(target, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return result


# arguments of `from_pretrained` that say where the files are (also needed to read the config first)
_LOADING_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "gguf_file", "subfolder",
                   "force_download", "proxies")


def _numeric_settings(module: nn.Module | None) -> dict | None:
    """A module's own int / float / bool attributes (e.g. a residual scale computed from the number of layers)."""
    if module is None:
        return None
    runtime = ("training", "gradient_checkpointing")
    return {name: value for name, value in vars(module).items()
            if isinstance(value, (int, float, bool)) and not name.startswith("_") and name not in runtime}


def backbone_class(text_config: PreTrainedConfig):
    """`AutoModel`, or for encoder-decoder models with an encoder-only class (T5, mT5, UMT5) `AutoModelForTextEncoding`,
    which loads just the encoder. Other encoder-decoder models are refused: STC reads one stack of blocks.

    Judged by model type: the encoder-only classes set `is_encoder_decoder = False` on the config they are built from.
    """
    model_type = text_config.model_type
    if not hasattr(text_config, "num_hidden_layers"):
        raise ValueError(
            f"The {model_type} config has no `num_hidden_layers`: its layers are described by sub-configs (as "
            "T5Gemma's encoder and decoder). STC reads one stack of blocks of known depth; it is not supported."
        )
    if model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES and model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForTextEncoding
    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES or getattr(text_config, "is_encoder_decoder", False):
        raise ValueError(
            f"{model_type} is an encoder-decoder model without an encoder-only class in transformers; STC reads one "
            "stack of blocks: use an encoder (BERT-like, T5 encoder) or a decoder model."
        )
    return AutoModel


class STCForSequenceClassification(STCPreTrainedModel):
    """Sequence classifier reading the selected neurons of several layers of a (frozen) backbone.

    Before a fit the head is dense over every pooled feature of every layer (trainable with the HF `Trainer`);
    `sparsify(eta)` or `STCTrainer` reduce it to the salient neurons and let the backbone exit early.
    """

    def __init__(self, config: STCConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self._backbone_frozen = False  # `freeze_backbone`
        self._precision_checked = None  # (head, dtype) of the last `_check_precision`
        model_class = backbone_class(config.text_config)  # refuses encoder-decoder models without an encoder class
        if backbone is None:
            backbone = model_class.from_config(config.text_config)
        elif getattr(backbone, "decoder", None) is not None and model_class is AutoModelForTextEncoding:
            raise ValueError(
                f"{type(backbone).__name__} holds an encoder and a decoder; STC reads one stack of blocks: pass the "
                "encoder only (`AutoModelForTextEncoding.from_pretrained(...)`)."
            )
        self.backbone = backbone
        # activation checkpointing runs in the backbone's blocks: only where the backbone supports it (not MPNet)
        self.supports_gradient_checkpointing = backbone.supports_gradient_checkpointing
        self._build_head_input()
        self.head = STCHead(self.selector.num_features, config.num_labels, config.standardize)
        self.post_init()

    # ---------------------------------------------------------------------------------------------------------------
    # construction helpers
    # ---------------------------------------------------------------------------------------------------------------

    def _build_head_input(self):
        self.layer_map = LayerMap.build(self.backbone, need_mlp="mlp" in self.config.sources)
        self.source_dims = self.layer_map.dims
        num_layers = self.layer_map.num_layers
        if num_layers != self.config.text_config.num_hidden_layers:
            raise ValueError(
                f"{type(self.backbone).__name__} has {self.config.text_config.num_hidden_layers} layers in its "
                f"config but STC found a list of {num_layers} blocks at `{self.layer_map.path}`: its "
                "layers are not one stack of blocks (e.g. CANINE's character encoders). It is not supported."
            )
        if self.config.selection:
            for group in self.config.selection:
                if group["layer"] >= num_layers:
                    raise ValueError(f"Selection uses layer {group['layer']}, the backbone has {num_layers}.")
        self.selector = STCFeatureSelector(feature_groups(self.config, self.source_dims))
        self._causal = is_causal_backbone(self.config.text_config)
        self._backbone_arguments = set(inspect.signature(self.backbone.forward).parameters)
        self._window = backbone_window(self.backbone)
        # Count positions from the first real token (as `generate` does) wherever the backbone takes position ids:
        # left padding then gives the features of no padding. RoBERTa-style backbones number real tokens after their
        # padding index from the ids (`!= padding_idx`); counted from the mask instead, any pad token works.
        self._positions_from_mask = "position_ids" in self._backbone_arguments
        table = ids_position_table(self.backbone)
        self._position_padding_idx = None if table is None else table.padding_idx
        self._first_position = None  # read at the first forward: buffers are still on the meta device here
        self._narrowed = None  # the exit layer's up-projections to narrow (`_exit_narrowing`); None: not checked yet

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
        loading = {key: backbone_kwargs[key] for key in _LOADING_KWARGS if key in backbone_kwargs}
        backbone_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **loading)
        if backbone_config.model_type == STCConfig.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is already an STC checkpoint, not a backbone: load it with "
                "`STCForSequenceClassification.from_pretrained(...)` (or `AutoModelForSequenceClassification`)."
            )
        model_class = backbone_class(backbone_config)
        backbone = model_class.from_pretrained(pretrained_model_name_or_path, **backbone_kwargs)
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
        return model.eval()  # as `from_pretrained` returns models

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the first parameter, or, for a backbone dispatched with `device_map`
        (layers offloaded to disk or spread over devices), the device its first module runs on."""
        placement = getattr(getattr(self, "backbone", None), "hf_device_map", None)
        if placement:
            first = next(iter(placement.values()))
            return torch.device("cpu" if first == "disk" else first)
        return super().device

    # ---------------------------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------------------------

    def pooled_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **backbone_inputs,
    ) -> torch.Tensor:
        """The selected pooled features [batch, num_features] in float32, before standardisation.

        With `config.long_input_chunks`, rows longer than the backbone's window are cut into overlapping chunks
        (`ChunkPlan`), run with at most as many tokens per backbone call as the input had, and their pooled features
        recombined per row.
        """
        self._check_precision()
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
        if not (self.config.long_input_chunks and self._window is not None and reference.shape[1] > self._window):
            pooled = self._pooled_by_layer(input_ids, attention_mask, backbone_inputs)
            return self.selector.assemble(pooled, self.head.classifier.weight.device)
        if "position_ids" in backbone_inputs:
            raise ValueError("`position_ids` cannot be combined with `long_input_chunks`: each chunk counts from 0.")
        plan = ChunkPlan.build(attention_mask, self._window, self.config.chunk_overlap)
        pad_id = getattr(self.config.text_config, "pad_token_id", None) or 0  # any valid id: the mask hides it
        inputs = {"input_ids": None if input_ids is None else plan.split(input_ids, pad_id)}
        inputs["attention_mask"] = plan.mask
        inputs.update({name: plan.split(value) for name, value in backbone_inputs.items()})
        # never more tokens per backbone call than the caller's batch had
        step, parts = max(1, reference.shape[0] * reference.shape[1] // plan.mask.shape[1]), []
        for start in range(0, plan.num_chunks, step):
            part = {k: v[start : start + step] if v is not None else None for k, v in inputs.items()}
            parts.append(self._pooled_by_layer(part.pop("input_ids"), part.pop("attention_mask"), part))
        pooled = {key: plan.combine(torch.cat([part[key] for part in parts]), key[1]) for key in parts[0]}
        return self.selector.assemble(pooled, self.head.classifier.weight.device)

    def _pooled_by_layer(self, input_ids, attention_mask, backbone_inputs) -> dict:
        """Run the backbone (up to the exit layer) once; {(source, pooling, layer): [batch, dim]} pooled features."""
        requests = self.selector.requests
        device = attention_mask.device
        narrowed = None if torch.is_grad_enabled() or is_tracing() else self._exit_narrowing()
        with capture_pooled(self.layer_map, attention_mask, requests, self.selector.neurons(device),
                            narrowed) as pooled:
            accepted = self._backbone_arguments
            if "use_cache" in accepted:
                backbone_inputs["use_cache"] = False
            if self._positions_from_mask and "position_ids" not in backbone_inputs:
                real = attention_mask.long()
                if self._position_padding_idx is not None:  # RoBERTa's numbering, from the mask: padding_idx + 1, ...
                    positions = real.cumsum(-1) * real + self._position_padding_idx
                else:  # from the first real token: the backbone's own positions for right padding, shifted past left
                    leading = (real.cumsum(-1) == 0).sum(-1, keepdim=True)
                    positions = torch.arange(real.shape[1], device=real.device) - leading
                    first = self._first_position
                    if first is None:
                        first = first_position_id(self.backbone)
                        self._first_position = first if isinstance(first, int) else None  # a tensor while tracing
                    positions = positions.clamp(min=0) + first
                backbone_inputs["position_ids"] = positions
            try:
                self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **backbone_inputs)
            except (IndexError, RuntimeError) as error:  # position tables / buffers indexed past their end
                if self._window is None or attention_mask.shape[1] <= self._window:
                    raise
                raise ValueError(
                    f"The input has {attention_mask.shape[1]} tokens but {type(self.backbone).__name__} reads at most "
                    f"{self._window}: truncate it (`truncation=True` in the tokenizer or pipeline call), or set "
                    "`model.config.long_input_chunks = True` to read long texts in overlapping chunks."
                ) from error
        return pooled

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
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            logger.warning_once("STCForSequenceClassification returns logits (and a loss) only, no hidden states or "
                                "attentions: call `model.backbone(...)` for those.")
        unknown = sorted(set(kwargs) - {*_ACCEPTED_KWARGS, "output_hidden_states", "output_attentions"})
        if unknown:  # as transformers' classifiers: extra inputs (e.g. dataset columns a Trainer keeps) are ignored
            logger.warning_once(f"STCForSequenceClassification.forward ignores the arguments {unknown}.")
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

    def _check_precision(self):
        """Warn (once) when the backbone runs in float16 / bfloat16 and the head standardises features too steady for
        its rounding (`steady_features`; fits leave them out, older checkpoints may have them). Checked once per head
        and dtype."""
        if is_tracing():  # the count below is a tensor value, unknown while tracing
            return
        dtype = autocast_dtype(self.device.type) or self.backbone.dtype
        if dtype not in (torch.float16, torch.bfloat16) or not self.config.standardize:
            return
        if self._precision_checked == (self.head, dtype) or self.head.feature_mean.is_meta:
            return
        self._precision_checked = (self.head, dtype)
        unsteady = int((~steady_features(self.head.feature_mean, self.head.feature_scale)).sum())
        if unsteady:
            logger.warning_once(
                f"{unsteady} of the head's features vary over the training texts by less than "
                f"{MIN_RELATIVE_SPREAD:.0%} of their size: in {str(dtype).removeprefix('torch.')} rounding (up to "
                f"{torch.finfo(dtype).eps / 2:.2%} of a value) is a large share of that spread and can change the "
                "predictions. Run the backbone in float32, or refit: fits leave such features out."
            )

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
            labels = labels.view(-1)
            if labels.is_floating_point() and not torch.equal(labels, labels.round()):
                raise ValueError(
                    "Single-label targets are class ids (integers); got fractional values. For regression targets "
                    "set `problem_type='regression'` on the config."
                )
            labels = labels.long()
            kept = labels[labels != -100]  # -100 marks rows without a label, as in transformers
            if kept.numel() and (kept.min() < 0 or kept.max() >= num_labels):
                raise ValueError(
                    f"Label ids must be in [0, {num_labels - 1}] for num_labels={num_labels} (or -100 for rows "
                    f"without a label); got min {kept.min().item()}, max {kept.max().item()}. Map your labels with "
                    "`label2id`."
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
        """Stop (or restart) gradient updates of the backbone; only the head trains.

        A frozen backbone is a fixed feature extractor, as in the fit: `train()` leaves it in eval mode, so dropout
        does not move the features the head standardises (neurons of tiny spread would be scaled up by thousands).
        """
        self.backbone.requires_grad_(not frozen)
        self._backbone_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> "STCForSequenceClassification":
        """`nn.Module.train`, except that a frozen backbone (`freeze_backbone`) stays in eval mode."""
        super().train(mode)
        if mode and self._backbone_frozen:
            self.backbone.eval()
        return self

    def set_selection(self, selection: list[dict], weight, bias, mean=None, scale=None, truncate: bool = True):
        """Install a neuron selection with its head (weight [num_labels, F], bias, standardisation statistics).

        The backbone is cut after the highest selected layer when `truncate` (early exit).
        """
        self.config.selection = [self.config._check_group(group) for group in selection]
        self.selector = STCFeatureSelector(feature_groups(self.config, self.source_dims))
        self._narrowed = None
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
        importance (squared head weight summed over labels), shrink the head, and exit early.

        The head is a new module: to train it further, build a new `Trainer` (or optimizer); one made before still
        holds the old head's parameters."""
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
        """Drop backbone layers after the exit layer where that leaves the same model: logits are unchanged and
        checkpoints get smaller.

        The same model: the forward pass gives the same features on a probe input, and the backbone rebuilt from the
        shortened config (as `from_pretrained` will build it) has the parameters and per-layer settings of the full
        one without its last layers. Otherwise (one block running every layer, as in ALBERT; layers scaled by their
        number; configs that need a layer of each kind) every layer stays, with a warning, and the forward pass
        stops after the exit layer all the same (`capture_pooled`).
        """
        keep = self.config.exit_layer + 1
        total = self.layer_map.num_layers
        if keep >= total or self.layer_map.shared:
            return self
        configs = list({id(c): c for c in (self.config.text_config, self.backbone.config)}.values())
        saved_configs, removed = [dict(vars(config)) for config in configs], list(self.layer_map.layers[keep:])
        probe = self._probe_inputs()
        try:
            expected = self._probe_features(probe)
        except Exception:  # e.g. a backbone that needs inputs besides token ids: no features to compare
            expected = None
        try:
            reference = self._rebuilt_layers(self.config.text_config, keep)
        except Exception as error:
            reference = error
        del self.layer_map.layers[keep:]
        for config in configs:
            for name, value in list(vars(config).items()):  # per-layer lists (e.g. `layer_types`) lose the rest
                per_layer = name != "architectures" and "token_id" not in name  # not e.g. a list of EOS ids
                if per_layer and isinstance(value, (list, tuple)) and len(value) == total:
                    setattr(config, name, type(value)(value[:keep]))
            config.num_hidden_layers = keep
        problem = self._truncation_problem(probe, expected, reference, keep)
        if problem:
            for config, saved in zip(configs, saved_configs):
                vars(config).clear()
                vars(config).update(saved)
            self.layer_map.layers.extend(removed)
            logger.warning(
                f"Early exit keeps all {total} layers of {type(self.backbone).__name__}: {problem}. The forward pass "
                f"still stops after layer {keep - 1}; only the checkpoint is not smaller."
            )
        else:
            self.config.backbone_num_layers = max(self.config.num_backbone_layers, total)  # the depth, for reports
        self._build_head_input()
        return self

    def _exit_narrowing(self) -> list:
        """Up-projections of the exit layer that may compute only its kept MLP neurons when the backbone stops at that
        layer's MLP (`capture_pooled`), checked once: a probe pass must give the same features with and without.
        The exit layer's up-projection and activation then cost a fraction of their full width."""
        if self._narrowed is not None:
            return self._narrowed
        self._narrowed = []  # also while checking: the probe passes come back here
        layer_map, last = self.layer_map, mlp_exit_layer(self.selector.requests)
        if self.selector.dense or layer_map.shared or last is None:
            return self._narrowed
        candidates = find_up_projections(layer_map.layers[last], layer_map.down_projections[last],
                                         layer_map.dims["hidden"])
        if not candidates:
            return self._narrowed
        probe = self._probe_inputs()
        try:
            expected = self._probe_features(probe)
            self._narrowed = candidates
            got = self._probe_features(probe)
        except Exception:  # e.g. a backbone that needs inputs besides token ids: not narrowed
            got = None
        self._narrowed = []
        tolerance = max(1e-4, 2 * torch.finfo(candidates[0][0].weight.dtype).eps)  # rounding, not another model
        if got is not None and got.shape == expected.shape and \
                torch.allclose(got, expected, rtol=tolerance, atol=tolerance * float(expected.abs().amax())):
            self._narrowed = candidates
        return self._narrowed

    def _probe_inputs(self) -> dict:
        """Three tokens of valid ids, to check that truncation leaves the features unchanged."""
        vocab = getattr(self.config.text_config, "vocab_size", None) or 4
        ids = torch.tensor([[1, 2, 3]], device=self.device) % vocab
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _probe_features(self, probe: dict) -> torch.Tensor:
        """The selected features of `probe` in eval mode; every module's mode is restored afterwards."""
        with eval_mode(self), torch.no_grad():
            return self.pooled_features(**probe)

    def _rebuilt_layers(self, config: PreTrainedConfig, keep: int) -> dict:
        """What `from_pretrained` builds from `config` (on the meta device), its first `keep` layers only: parameter
        shapes and each kept module's numeric settings, by name."""
        config = type(config).from_dict(config.to_dict())  # validated as when loading
        with torch.device("meta"):
            rebuilt = backbone_class(config).from_config(config)
        path = self.layer_map.path
        layers = rebuilt.get_submodule(path)
        if len(layers) > keep:
            del layers[keep:]
        in_layers = lambda name: name == path or name.startswith(path + ".")
        return {"shapes": {name: tuple(value.shape) for name, value in rebuilt.state_dict().items()},
                "settings": {name: _numeric_settings(module) for name, module in rebuilt.named_modules()
                             if in_layers(name)}}

    def _truncation_problem(self, probe: dict, expected, reference, keep: int) -> str | None:
        """Why the truncated backbone is not the same model, or None: its features on `probe` against `expected`, and
        the backbone its shortened config rebuilds against `reference`, the full config's without its last layers."""
        if expected is not None:
            try:
                got = self._probe_features(probe)
            except Exception as error:
                return f"the shortened backbone does not run ({type(error).__name__}: {error})"
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                return "the shortened backbone gives other features"
        if isinstance(reference, Exception):
            return f"its config does not build the backbone here ({type(reference).__name__}: {reference})"
        try:
            shortened = self._rebuilt_layers(self.config.text_config, keep)
        except Exception as error:
            return f"its shortened config does not build the backbone ({type(error).__name__}: {error})"
        if shortened["shapes"] != reference["shapes"]:
            return "its shortened config builds other parameters"
        changed = next((name for name, settings in reference["settings"].items()
                        if shortened["settings"].get(name) != settings), None)
        if changed is not None:
            return f"its layers depend on the number of layers (`{changed}`)"
        return None

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


    # ---------------------------------------------------------------------------------------------------------------
    # sharing and reading: the card, report and explanations live in the `stc_transformers` package
    # ---------------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the model card (`README.md` and its per-layer plot).

        The card needs the `stc_transformers` package and is skipped without it (`trust_remote_code` users); a
        README.md that stc-transformers did not generate is never overwritten. `push_to_hub=True` saves, then pushes.
        """
        if push_to_hub:
            hub_kwargs = {k: kwargs.pop(k) for k in ("commit_message", "create_pr", "private", "token") if k in kwargs}
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.save_pretrained(save_directory, *args, **kwargs)
            return self.push_to_hub(repo_id, max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_kwargs)
        super().save_pretrained(save_directory, *args, **kwargs)
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        card = _stc_module("model_card", required=False)
        if card is not None and os.path.isdir(save_directory) and self.should_save_on_this_rank(is_main_process):
            card.save_model_card(self, save_directory)

    def push_to_hub(self, repo_id: str, *, commit_message=None, commit_description=None, private=None, token=None,
                    revision=None, create_pr=False, max_shard_size="50GB", tags=None) -> str:
        """Upload weights, config (with `auto_map`), the three modeling files and the model card to `repo_id`.

        Fails early when no token is available. A README.md on the Hub that stc-transformers did not generate is
        kept; without the package no card is uploaded (the repository keeps its own).
        """
        if token is False or (token in (None, True) and huggingface_hub.get_token() is None):
            raise LocalTokenNotFoundError(
                "No Hugging Face token found to push with: run `hf auth login` (or set HF_TOKEN), or pass `token=...`."
            )
        repo_id = huggingface_hub.HfApi().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            card = _stc_module("model_card", required=False)
            if card is not None:
                card.prepare_upload(self, folder, repo_id, tags=[*(self.model_tags or []), *tags], token=token,
                                    revision=revision)
            return self._upload_modified_files(
                folder, repo_id, files_timestamps={}, commit_message=commit_message, token=token,
                create_pr=create_pr, revision=revision, commit_description=commit_description,
            )

    def stc_report(self):
        """What the fit selected and measured: an `STCReport` (needs the `stc_transformers` package)."""
        return _stc_module("interpret").stc_report(self)

    def explain(self, tokenizer, texts, **kwargs):
        """Predictions with per-layer and per-neuron contributions (`stc_transformers.interpret.explain`)."""
        return _stc_module("interpret").explain(self, tokenizer, texts, **kwargs)


def _stc_module(name: str, required: bool = True):
    """`stc_transformers.<name>`, imported lazily: the Hub copy of this file must run without the package."""
    try:
        return importlib.import_module(f"stc_transformers.{name}")
    except ImportError as error:
        if error.name not in ("stc_transformers", f"stc_transformers.{name}"):
            raise
        if not required:
            return None
        raise ImportError(
            f"This needs the stc-transformers package (`pip install stc-transformers`) for `stc_transformers.{name}`; "
            "a model loaded with `trust_remote_code=True` predicts without it."
        ) from error


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
