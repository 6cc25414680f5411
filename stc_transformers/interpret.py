"""Reading a fitted STC classifier: which neurons of which layers it keeps, how each layer scored, and why it
predicts what it predicts.

* `stc_report(model)` -> `STCReport`: kept neurons per layer and (source, pooling), per-layer validation scores
  (from `config.fit_summary`), the chosen settings, the heaviest head weights per class; tables and plots.
* `explain(model, tokenizer, texts)` -> one `Explanation` per text: prediction, logits, per-layer contribution
  sums and the top contributing neurons. A contribution is head weight x standardised activation, so a text's
  contributions summed over neurons plus the head bias give its logits.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .extraction import check_texts
from .features_stc import eval_mode
from .tokenization import encode, prepare_tokenizer


METRIC_NAMES = {"accuracy": "accuracy", "micro_f1": "micro-F1", "r2": "R²"}
_NOT_FITTED = (
    "This STC model was never fitted: its head is dense over every neuron and `config.fit_summary` is empty. "
    "Fit it with `STCTrainer(...).train()`, or train the head and call `model.sparsify(eta)`, first."
)


def check_fitted(model) -> None:
    """Raise a clear `ValueError` unless the model has a neuron selection or a fit summary."""
    if model.config.selection is None and not model.config.fit_summary:
        raise ValueError(_NOT_FITTED)


def problem_type(model) -> str:
    """The task: `config.problem_type`, else the fit summary's, else inferred as transformers does."""
    summary = model.config.fit_summary or {}
    task = model.config.problem_type or summary.get("task")
    if task:
        return task
    return "regression" if model.config.num_labels == 1 else "single_label_classification"


def label_names(model) -> list[str]:
    id2label = model.config.id2label or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]


def describe_exit(exit_layer: int, exit_at: str, num_layers: int) -> str:
    """How much of the backbone runs, as a phrase: "runs all 6 layers of the backbone", "stops the backbone after
    layer 3 of 0-5 (early exit)" or "stops the backbone in layer 5 of 0-5, at its MLP down-projection (early exit)"."""
    if exit_at == "mlp":
        return (f"stops the backbone in layer {exit_layer} of 0-{num_layers - 1}, at its MLP down-projection "
                "(early exit)")
    if exit_layer < num_layers - 1:
        return f"stops the backbone after layer {exit_layer} of 0-{num_layers - 1} (early exit)"
    return f"runs all {num_layers} layers of the backbone"


def kept_counts(model) -> Counter:
    """Number of head inputs per (source, pooling, layer), ordered as the config lists sources and poolings."""
    counts = Counter((source, pooling, layer) for source, pooling, layer, _ in model.feature_names())
    sources, poolings = list(model.config.sources), list(model.config.poolings)

    def rank(key):
        source, pooling, layer = key
        return (sources.index(source) if source in sources else len(sources),
                poolings.index(pooling) if pooling in poolings else len(poolings), layer)

    return Counter(dict(sorted(counts.items(), key=lambda item: rank(item[0]))))


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class STCReport:
    """What a fitted STC classifier selected and measured. Build it with `stc_report(model)`.

    `kept[(source, pooling)][layer]` is the number of neurons kept; `layer_scores[(source, pooling)][layer]` the
    validation score of the best single-layer probe (NaN where unknown); `neurons_per_layer[source]` the number of
    neurons a layer offers per pooling.
    """

    backbone: str | None
    task: str
    metric: str | None
    labels: list[str]
    num_layers: int
    exit_layer: int
    sources: list[str]
    poolings: list[str]
    eta: float | None
    strength: float | None
    layer_mode: str | None
    validation_score: float | None
    base_score: float | None
    kept: dict[tuple[str, str], list[int]]
    neurons_per_layer: dict[str, int]
    layer_scores: dict[tuple[str, str], list[float]]
    feature_names: list[tuple[str, str, int, int]] = field(repr=False)
    weights: np.ndarray = field(repr=False)
    fit_summary: dict | None = field(default=None, repr=False)
    exit_at: str = "block"  # "mlp": the backbone stops in the exit layer at its MLP down-projection

    @property
    def num_features(self) -> int:
        """Neurons read by the head (over all layers, sources and poolings)."""
        return len(self.feature_names)

    @property
    def num_candidates(self) -> int | None:
        """Neurons the selection chose from: layers 0..exit layer, for the chosen sources and poolings."""
        if any(source not in self.neurons_per_layer for source in self.sources):
            return None
        return len(self.poolings) * (self.exit_layer + 1) * sum(self.neurons_per_layer[s] for s in self.sources)

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES.get(self.metric, self.metric or "validation score")

    def layers_frame(self) -> pd.DataFrame:
        """One row per (layer, source, pooling): neurons kept, neurons available, validation score."""
        rows = []
        for layer in range(self.num_layers):
            for (source, pooling), counts in self.kept.items():
                scores = self.layer_scores.get((source, pooling))
                rows.append({
                    "layer": layer, "source": source, "pooling": pooling, "kept": counts[layer],
                    "total": self.neurons_per_layer.get(source),
                    "validation_score": scores[layer] if scores else math.nan,
                })
        return pd.DataFrame(rows, columns=["layer", "source", "pooling", "kept", "total", "validation_score"])

    def layer(self, index: int) -> pd.DataFrame:
        """The `layers_frame()` rows of one layer."""
        if not 0 <= index < self.num_layers:
            raise ValueError(f"Layer {index} does not exist: the backbone has layers 0..{self.num_layers - 1}.")
        frame = self.layers_frame()
        return frame[frame["layer"] == index].reset_index(drop=True)

    def top_neurons_frame(self, k: int = 10) -> pd.DataFrame:
        """The `k` heaviest head weights (by magnitude, on standardised inputs) of each class / output."""
        if k < 1:
            raise ValueError(f"`k` must be >= 1, got {k}.")
        rows = []
        for row, label in enumerate(self.labels):
            weights = self.weights[row]
            for rank, column in enumerate(np.argsort(-np.abs(weights), kind="stable")[:k], start=1):
                source, pooling, layer, neuron = self.feature_names[column]
                rows.append({"label": label, "rank": rank, "source": source, "pooling": pooling, "layer": layer,
                             "neuron": neuron, "weight": float(weights[column])})
        return pd.DataFrame(rows, columns=["label", "rank", "source", "pooling", "layer", "neuron", "weight"])

    def summary(self) -> str:
        """A few lines of plain text."""
        candidates = self.num_candidates
        share = f" of {candidates} ({100 * self.num_features / candidates:.1f}%)" if candidates else ""
        lines = [
            f"STC {self.task.replace('_', ' ')} on {self.backbone or 'an unnamed backbone'}: "
            f"{self.num_features} neurons kept{share}, from layers 0-{self.exit_layer} of {self.num_layers}; it "
            f"{describe_exit(self.exit_layer, self.exit_at, self.num_layers)}.",
            f"Sources {'+'.join(self.sources)}, pooling {'+'.join(self.poolings)}"
            + (f", eta {self.eta:g}" if self.eta is not None else "")
            + (f", strength {self.strength:g}" if self.strength is not None else "")
            + (f", layers {self.layer_mode}" if self.layer_mode else "") + ".",
        ]
        if self.validation_score is not None:
            base = f" (Base probe {self.base_score:.4f})" if self.base_score is not None else ""
            lines.append(f"Validation {self.metric_name} {self.validation_score:.4f}{base}.")
        best = self._best_layer()
        if best:
            lines.append(f"Best single layer: {best[0]}/{best[1]} layer {best[2]} ({best[3]:.4f}).")
        per_layer = [sum(counts[layer] for counts in self.kept.values()) for layer in range(self.exit_layer + 1)]
        lines.append("Kept per layer: " + ", ".join(f"L{i} {n}" for i, n in enumerate(per_layer)) + ".")
        return "\n".join(lines)

    def _best_layer(self):
        best = None
        for (source, pooling), scores in self.layer_scores.items():
            for layer, score in enumerate(scores):
                if not math.isnan(score) and (best is None or score > best[3]):
                    best = (source, pooling, layer, score)
        return best

    def plot_layer_scores(self, path) -> Path:
        """Per-layer validation score, one line per source/pooling, with the exit layer and the Base score; PNG."""
        if not self.layer_scores:
            raise ValueError(
                "No per-layer validation scores: they come from the fast fit (`STCTrainer`, stored in "
                "`config.fit_summary['layer_scores']`). Use `plot_kept_neurons` for a model sparsified by hand."
            )
        figure, axes = _figure()
        layers = np.arange(self.num_layers)
        for (source, pooling), scores in self.layer_scores.items():
            axes.plot(layers, scores, marker="o", markersize=3, label=f"{source}/{pooling} (single layer)")
        axes.axvline(self.exit_layer, color="grey", linestyle="--", label=f"exit layer {self.exit_layer}")
        if self.base_score is not None:
            axes.axhline(self.base_score, color="black", linestyle=":", label=f"Base probe ({self.base_score:.3f})")
        if self.validation_score is not None:
            axes.scatter([self.exit_layer], [self.validation_score], marker="*", s=150, color="crimson", zorder=3,
                         label=f"STC ({self.validation_score:.3f})")
        axes.set(xlabel="layer", ylabel=f"validation {self.metric_name}", title="Per-layer probes")
        axes.set_xticks(layers)
        axes.legend(fontsize="small")
        return _save(figure, path)

    def plot_kept_neurons(self, path) -> Path:
        """Neurons kept per layer, stacked by source/pooling; PNG."""
        figure, axes = _figure()
        layers = np.arange(self.num_layers)
        bottom = np.zeros(self.num_layers)
        for (source, pooling), counts in self.kept.items():
            axes.bar(layers, counts, bottom=bottom, label=f"{source}/{pooling}")
            bottom += np.asarray(counts, dtype=float)
        if self.exit_at == "mlp":
            axes.axvline(self.exit_layer, color="grey", linestyle="--", label=f"exit at layer {self.exit_layer}'s MLP")
        elif self.exit_layer < self.num_layers - 1:
            axes.axvline(self.exit_layer + 0.5, color="grey", linestyle="--",
                         label=f"exit after layer {self.exit_layer}")
        axes.set(xlabel="layer", ylabel="neurons kept", title=f"{self.num_features} neurons kept")
        axes.set_xticks(layers)
        axes.legend(fontsize="small")
        return _save(figure, path)


def _figure():
    # A bare Figure on the Agg canvas: no pyplot, so the user's global backend (e.g. a notebook's) is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


def stc_report(model) -> STCReport:
    """Summarise what a fitted STC model selected and (when `config.fit_summary` is set) measured."""
    check_fitted(model)
    config, summary = model.config, model.config.fit_summary or {}
    chosen = summary.get("chosen") or {}
    names = model.feature_names()
    counts = kept_counts(model)
    exit_layer = config.exit_layer
    num_layers = max(config.num_backbone_layers, exit_layer + 1)

    pairs = list(dict.fromkeys((s, p) for s, p, _ in counts))
    pairs += [(s, p) for s in chosen.get("sources") or config.sources for p in chosen.get("poolings") or config.poolings]
    layer_scores = {}
    for key, scores in (summary.get("layer_scores") or {}).items():
        source, _, pooling = key.partition("/")
        padded = [math.nan if s is None else float(s) for s in scores][:num_layers]
        layer_scores[(source, pooling)] = padded + [math.nan] * (num_layers - len(padded))
        pairs.append((source, pooling))
    pairs = list(dict.fromkeys(pairs))

    return STCReport(
        backbone=summary.get("backbone") or getattr(config.text_config, "_name_or_path", None) or None,
        task=problem_type(model),
        metric=summary.get("metric"),
        labels=label_names(model),
        num_layers=num_layers,
        exit_layer=exit_layer,
        sources=list(chosen.get("sources") or dict.fromkeys(s for s, _, _ in counts)),
        poolings=list(chosen.get("poolings") or dict.fromkeys(p for _, p, _ in counts)),
        eta=chosen.get("eta"),
        strength=chosen.get("strength"),
        layer_mode=chosen.get("layers"),
        validation_score=chosen.get("validation_score"),
        base_score=summary.get("base_score"),
        kept={pair: [counts[(*pair, layer)] for layer in range(num_layers)] for pair in pairs},
        neurons_per_layer=dict(getattr(model, "source_dims", {})),
        layer_scores=layer_scores,
        feature_names=names,
        weights=model.head.classifier.weight.detach().float().cpu().numpy(),
        fit_summary=config.fit_summary,
        exit_at=config.exit_at,
    )


# --------------------------------------------------------------------------------------------------------------------
# Explanations
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Explanation:
    """Why the model predicts what it predicts for one text.

    `prediction` is the label name (single-label), the list of predicted label names (multi-label) or the predicted
    value(s) (regression). `layer_contributions[layer][i]` is the summed contribution of that layer's neurons to
    output `i` (`labels[i]`); over all layers plus `bias[i]` it gives `logits[i]`. `top_neurons` lists, for each
    explained output (the predicted label(s); every output for regression), the neurons with the largest
    |contribution|.
    """

    text: str | tuple[str, str]
    prediction: str | list[str] | float | list[float]
    labels: list[str]
    logits: list[float]
    bias: list[float]
    layer_contributions: dict[int, list[float]]
    top_neurons: list[dict]

    def to_frame(self) -> pd.DataFrame:
        """Top neurons as a DataFrame (label, source, pooling, layer, neuron, activation, contribution)."""
        columns = ["label", "source", "pooling", "layer", "neuron", "activation", "contribution"]
        return pd.DataFrame(self.top_neurons, columns=columns)

    def layers_frame(self) -> pd.DataFrame:
        """Per-layer contribution sums: one row per layer, one column per label."""
        frame = pd.DataFrame.from_dict(self.layer_contributions, orient="index", columns=self.labels)
        return frame.rename_axis("layer")


def _prediction(task: str, logits: torch.Tensor, labels: list[str]):
    if task == "regression":
        values = logits.tolist()
        return (values[0] if len(values) == 1 else values), list(range(len(values)))
    if task == "multi_label_classification":  # every label with a positive logit; none may be
        chosen = (logits > 0).nonzero().flatten().tolist()
        return [labels[i] for i in chosen], chosen or [int(logits.argmax())]  # explain the likeliest when none
    best = int(logits.argmax())
    return labels[best], [best]


@torch.no_grad()
def explain(model, tokenizer, texts, *, top_k: int = 10, max_length: int | None = None, batch_size: int = 32):
    """Explain the model's predictions for `texts` (a string, a (text, text_pair) tuple, or a list of either), in
    batches of `batch_size`."""
    check_fitted(model)
    if isinstance(texts, (str, tuple, dict)):
        texts = [texts]
    texts = check_texts(texts)
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"`top_k` and `batch_size` must be >= 1, got {top_k} and {batch_size}.")
    if tokenizer.pad_token is None and len(texts) > 1:
        prepare_tokenizer(tokenizer)
    names = model.feature_names()
    labels, task = label_names(model), problem_type(model)
    feature_layer = torch.tensor([layer for _, _, layer, _ in names])
    layers = sorted(set(feature_layer.tolist()))
    weight = model.head.classifier.weight.detach()
    bias = model.head.classifier.bias.detach()
    explanations = []
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            # a model reading long texts in chunks sees them whole, as in `pipeline`
            whole = model.config.long_input_chunks and max_length is None
            batch = encode(tokenizer, chunk, padding=True, truncation=not whole, max_length=max_length,
                           return_tensors="pt")
            inputs = {k: v.to(model.device) for k, v in batch.items()
                      if k in ("input_ids", "attention_mask", "token_type_ids")}
            features = model.pooled_features(**inputs)
            # the same product as `model.feature_contributions`, computed from the one backbone pass
            contributions = (model.head.standardized(features).unsqueeze(1) * weight.unsqueeze(0)).cpu()
            logits, activations = model.head(features).cpu(), features.cpu()
            per_layer = torch.zeros(*contributions.shape[:2], max(layers) + 1).index_add_(
                2, feature_layer, contributions)
            for row, text in enumerate(chunk):
                prediction, explained = _prediction(task, logits[row], labels)
                top = []
                for label in explained:
                    values = contributions[row, label]
                    for column in values.abs().argsort(descending=True, stable=True)[:top_k].tolist():
                        source, pooling, layer, neuron = names[column]
                        top.append({"label": labels[label], "source": source, "pooling": pooling, "layer": layer,
                                    "neuron": neuron, "activation": float(activations[row, column]),
                                    "contribution": float(values[column])})
                explanations.append(Explanation(
                    text=text, prediction=prediction, labels=labels, logits=logits[row].tolist(),
                    bias=bias.float().cpu().tolist(),
                    layer_contributions={layer: per_layer[row, :, layer].tolist() for layer in layers},
                    top_neurons=top,
                ))
    return explanations


__all__ = ["STCReport", "Explanation", "stc_report", "explain"]
