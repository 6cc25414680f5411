"""STC model configuration.

Self-contained (only transformers / huggingface_hub imports): the Hub copies this file for `trust_remote_code`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import logging

from .features_stc import POOLINGS, SOURCES, check_names


logger = logging.get_logger(__name__)


def is_causal_backbone(text_config: PreTrainedConfig) -> bool:
    """Whether the backbone is a decoder LLM (causal attention), judged by the model types transformers maps."""
    model_type = text_config.model_type
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def default_poolings(text_config: PreTrainedConfig) -> list[str]:
    """Mean + last token for decoders (the last token has seen the whole text), mean + max for encoders."""
    return ["mean", "last"] if is_causal_backbone(text_config) else ["mean", "max"]


@strict
class STCConfig(PreTrainedConfig):
    r"""
    Configuration of [`STCForSequenceClassification`]: a backbone config nested as `text_config` plus the
    Sparsify-then-Classify settings.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            Configuration of the wrapped backbone (any text model type `AutoModel` can build).
        sources (`list[str]`, defaults to `["hidden", "mlp"]`):
            Representations read from every layer: `"hidden"` (residual stream after the block) and/or `"mlp"`
            (MLP neuron activations, the input of the down-projection).
        poolings (`list[str]`, *optional*):
            Token poolings among `"mean"`, `"max"`, `"first"`, `"last"`. Defaults to mean+max for encoders and
            mean+last for decoders.
        selection (`list[dict]`, *optional*):
            The selected neurons: a list of `{"source", "pooling", "layer", "neurons"}` groups, in head-input order.
            `None` means every neuron of every layer, source and pooling (the dense head used before a fit).
        standardize (`bool`, defaults to `True`):
            Standardise the selected features with the stored mean / scale before the head.
        l1_strength (`float`, defaults to 0.0):
            L1 penalty on the head weights added to the training loss (use with `sparsify`).
        long_input_chunks (`bool`, defaults to `False`):
            Read texts longer than the backbone's window (its `max_position_embeddings`, less RoBERTa's padding
            offset) in overlapping chunks instead of failing. The model receives the full token ids, cuts each row's
            real tokens into chunks (left or right padding alike), runs the backbone on them and combines the pooled
            features per text: mean -> token-count-weighted mean of the chunk means (the mean over all chunk
            tokens), max -> max over chunks, first -> the first chunk's first token, last -> the last chunk's last
            token. Special tokens are not repeated per chunk. Inference and the fit share this code
            (`pooled_features`). Tokenize without truncation to use it: `tokenizer(texts, truncation=False)`; the
            `text-classification` pipeline does not truncate unless asked (`classifier(text)`, not
            `classifier(text, truncation=True)`), and a fit must be given no `max_length` cut either, or training
            sees only the truncated prefix. Texts within the window are unaffected.
        chunk_overlap (`int`, defaults to 64):
            Tokens shared by consecutive chunks (stride = window - overlap); must be smaller than the window.
        fit_summary (`dict`, *optional*):
            What the fast fit chose and measured (per-layer validation scores, eta, pooling, ...), for reports and
            model cards.
        backbone_num_layers (`int`, *optional*):
            Layers of the backbone before early exit cut it (`text_config.num_hidden_layers` counts those kept);
            set by `truncate_backbone`, for reports and model cards.

    Example:

    ```python
    >>> from transformers import BertConfig
    >>> from stc_transformers import STCConfig, STCForSequenceClassification

    >>> config = STCConfig(text_config=BertConfig(num_hidden_layers=2).to_dict(), num_labels=3)
    >>> model = STCForSequenceClassification(config)
    ```"""

    model_type = "stc"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    text_config: dict | PreTrainedConfig | None = None
    sources: list[str] | tuple[str, ...] = ("hidden", "mlp")
    poolings: list[str] | tuple[str, ...] | None = None
    selection: list[dict] | None = None
    standardize: bool = True
    l1_strength: float = 0.0
    long_input_chunks: bool = False
    chunk_overlap: int = 64
    fit_summary: dict | None = None
    backbone_num_layers: int | None = None
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "STCConfig":
        """As transformers: `num_labels=` given when loading a checkpoint with another number of named labels
        replaces those names by LABEL_0, LABEL_1, ... (a new head; see `ignore_mismatched_sizes`)."""
        num_labels, id2label = kwargs.get("num_labels"), config_dict.get("id2label")
        if num_labels is not None and id2label is not None and len(id2label) != num_labels:
            logger.warning(f"`num_labels={num_labels}` replaces the checkpoint's {len(id2label)} labels "
                           f"{list(id2label.values())} by LABEL_0..LABEL_{num_labels - 1}.")
            config_dict = {k: v for k, v in config_dict.items() if k not in ("id2label", "label2id")}
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        if self.id2label is not None and kwargs.get("num_labels") not in (None, len(self.id2label)):
            raise ValueError(
                f"`num_labels={kwargs['num_labels']}` does not match `id2label` with {len(self.id2label)} entries: "
                "pass one of them, or make them agree."
            )
        super().__post_init__(**kwargs)
        self.sources = list(check_names(self.sources, SOURCES, "source"))
        if self.poolings is None:
            self.poolings = default_poolings(self.text_config)
        self.poolings = list(check_names(self.poolings, POOLINGS, "pooling"))
        if self.selection is not None:
            self.selection = [self._check_group(group) for group in self.selection]
        if self.l1_strength < 0:
            raise ValueError(f"`l1_strength` must be >= 0, got {self.l1_strength}.")

    def _check_group(self, group: dict) -> dict:
        missing = {"source", "pooling", "layer", "neurons"} - set(group)
        if missing:
            raise ValueError(f"Selection group {group!r} lacks {sorted(missing)}.")
        check_names(group["source"], SOURCES, "source")
        check_names(group["pooling"], POOLINGS, "pooling")
        return {
            "source": group["source"],
            "pooling": group["pooling"],
            "layer": int(group["layer"]),
            "neurons": [int(n) for n in group["neurons"]],
        }

    @property
    def exit_layer(self) -> int:
        """Last backbone layer the classifier reads; the backbone never runs past it."""
        if self.selection:
            return max(group["layer"] for group in self.selection)
        return self.text_config.num_hidden_layers - 1

    @property
    def exit_at(self) -> str:
        """Where the backbone stops in the exit layer: "mlp" (at its MLP down-projection) when the selection reads
        only MLP neurons of that layer, else "block" (after the whole layer)."""
        last = [group["source"] for group in self.selection or () if group["layer"] == self.exit_layer]
        return "mlp" if last and all(source == "mlp" for source in last) else "block"

    @property
    def num_backbone_layers(self) -> int:
        """Layers of the backbone as pretrained, also after early exit cut it."""
        fitted = (self.fit_summary or {}).get("num_layers") or 0
        return max(self.backbone_num_layers or 0, fitted, self.text_config.num_hidden_layers)

    @property
    def num_selected_features(self) -> int | None:
        if self.selection is None:
            return None
        return sum(len(group["neurons"]) for group in self.selection)


__all__ = ["STCConfig"]
