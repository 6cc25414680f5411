"""STCTrainer: the fast frozen-backbone fit, with the `train` / `evaluate` / `predict` / `push_to_hub` API
users know from the Hugging Face `Trainer` and SetFit.

    trainer = STCTrainer(model, STCTrainingArguments("out"), train_dataset=ds["train"],
                         eval_dataset=ds["validation"], processing_class=tokenizer)
    trainer.train()          # one forward pass over the data + batched probes; writes the selection into `model`
    trainer.evaluate(ds["test"])
    trainer.save_model()     # model + tokenizer (+ card), loadable with pipeline("text-classification", ...)
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict, IterableDataset, IterableDatasetDict
from tqdm.auto import tqdm

from .extraction import check_texts, distributed_state, extract_features, model_fingerprint
from .interpret import label_names, problem_type
from .metrics import compute_metrics
from .selection import METRIC_NAMES, SearchSettings, SelectionSearch
from .tokenization import LengthSortedBatches, prepare_tokenizer


@dataclass
class STCTrainingArguments:
    """Settings of the fast fit. The search grids are documented in `stc_transformers.selection`."""

    output_dir: str = "stc_output"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int | None = 256
    batch_size: int = 32
    cache_dir: str | None = None
    validation_fraction: float = 0.15
    etas: tuple[float, ...] = SearchSettings.etas
    strength_ratios: tuple[float, ...] = SearchSettings.strength_ratios
    final_strengths: tuple[float, ...] = SearchSettings.final_strengths
    search_samples: int = SearchSettings.search_samples
    max_iter: int = SearchSettings.max_iter
    tol: float = SearchSettings.tol
    families: str = SearchSettings.families
    finalists: int = SearchSettings.finalists
    early_exit_tolerance: float = SearchSettings.early_exit_tolerance
    min_relative_spread: float = SearchSettings.min_relative_spread
    cv_folds: int = SearchSettings.cv_folds
    cv_below: int = SearchSettings.cv_below
    bf16_probes: bool | None = SearchSettings.bf16_probes
    seed: int = 42
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        """Settings outside their range fail here, with the setting's name, not deep inside a fit."""
        checks = [
            ("max_length", self.max_length is None or self.max_length >= 1, "a positive integer or None"),
            ("batch_size", self.batch_size >= 1, "a positive integer"),
            ("validation_fraction", 0 < self.validation_fraction < 1, "in (0, 1)"),
            ("etas", bool(self.etas) and all(0 < eta <= 1 for eta in self.etas), "values in (0, 1]"),
            ("strength_ratios", bool(self.strength_ratios) and min(self.strength_ratios) > 0, "positive values"),
            ("final_strengths", bool(self.final_strengths) and min(self.final_strengths) > 0, "positive values"),
            ("search_samples", self.search_samples >= 1, "a positive integer"),
            ("max_iter", self.max_iter >= 1, "a positive integer"),
            ("tol", self.tol > 0, "positive"),
            ("families", self.families in ("sources", "all"), "'sources' or 'all'"),
            ("finalists", self.finalists >= 1, "a positive integer"),
            ("early_exit_tolerance", self.early_exit_tolerance >= 0, ">= 0"),
            ("min_relative_spread", 0 <= self.min_relative_spread < 1, "in [0, 1)"),
            ("cv_folds", self.cv_folds == 0 or self.cv_folds >= 2, "0 (off) or at least 2"),
            ("cv_below", self.cv_below >= 0, ">= 0"),
        ]
        for name, valid, expected in checks:
            if not valid:
                raise ValueError(f"STCTrainingArguments.{name} must be {expected}, got {getattr(self, name)!r}.")

    def token_limit(self, model) -> int | None:
        return token_limit(model, self.max_length)

    def search_settings(self, device) -> SearchSettings:
        return SearchSettings(
            etas=tuple(self.etas), strength_ratios=tuple(self.strength_ratios),
            final_strengths=tuple(self.final_strengths), search_samples=self.search_samples,
            max_iter=self.max_iter, tol=self.tol, families=self.families, finalists=self.finalists,
            early_exit_tolerance=self.early_exit_tolerance, min_relative_spread=self.min_relative_spread,
            cv_folds=self.cv_folds, cv_below=self.cv_below, bf16_probes=self.bf16_probes, device=device,
            seed=self.seed, progress=self.progress,
        )


@dataclass
class STCTrainOutput:
    """What `train()` returns: the chosen candidate, every candidate's validation score, and timings."""

    validation_score: float
    metric: str
    chosen: dict
    candidates: list[dict]
    seconds: dict[str, float]
    base_score: float
    layer_scores: dict[str, list[float]] = field(repr=False)


@dataclass
class PredictionOutput:
    predictions: np.ndarray
    label_ids: np.ndarray | None
    metrics: dict[str, float] | None


def _feature_names(feature) -> list[str] | None:
    """Class names of a `ClassLabel` feature, or of a sequence of them (multi-label)."""
    return getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)


def token_limit(model, max_length: int | None) -> int | None:
    """Tokens per text: all of them when the model reads long texts in chunks, else `max_length`, at most as many as
    the backbone reads (its position window)."""
    if model.config.long_input_chunks:
        return None
    window = getattr(model, "_window", None)
    if window is None:
        return max_length
    return window if max_length is None else min(max_length, window)


def _default_names(names) -> bool:
    """transformers' placeholder class names LABEL_0, LABEL_1, ... (no real names known)."""
    return all(name == f"LABEL_{i}" for i, name in enumerate(names))


def _plain(label):
    """A label as plain Python: tensors and numpy values become numbers or lists; NaN and pandas' NA become None."""
    if hasattr(label, "tolist"):
        label = label.tolist()
    if type(label).__name__ == "NAType" or (isinstance(label, float) and math.isnan(label)):
        return None
    return label


def _problem_type(labels: list, names) -> str:
    """transformers' problem type of a label column: lists of ids, names or 0/1 flags are multi-label, other lists
    of floats regression targets; a float is a regression target unless class names are known."""
    first = labels[0]
    if isinstance(first, (list, tuple)):
        values = [value for row in labels for value in row]
        floats = any(isinstance(value, float) for value in values)
        return "regression" if floats and not set(values) <= {0, 1} else "multi_label_classification"
    if isinstance(first, float) and names is None:
        return "regression"
    return "single_label_classification"


class LabelEncoder:
    """Maps a dataset's label column to model targets for the three problem types.

    Single-label: class ids or names. Multi-label: 0/1 vectors of fixed width (ints or floats), or lists of label
    ids / names. Regression: a float, or a list of floats per row.
    """

    def __init__(self, task: str, names: list[str] | None, num_labels: int, vectors: bool = False,
                 named: bool = True):
        self.task, self.names, self.num_labels, self.vectors = task, names, num_labels, vectors
        self.named = named  # the training labels were class names (unknown for a reloaded model: assumed)

    @classmethod
    def fit(cls, labels: list, feature=None, problem_type: str | None = None, names=None) -> "LabelEncoder":
        """The encoder of training labels. `problem_type` and `names` (class names for integer ids) come from the
        model config when the user set them; a `ClassLabel` feature's names come first."""
        if not labels:
            raise ValueError("The training data has no labels.")
        if any(label is None for label in labels):
            raise ValueError("The label column holds missing values (None/NaN): drop or fill those rows.")
        first = labels[0]
        names = _feature_names(feature) or names
        is_list = isinstance(first, (list, tuple))
        problem_type = problem_type or _problem_type(labels, names)
        if problem_type == "regression":
            encoder = cls(problem_type, None, len(first) if is_list else 1)
            if len(labels) > 1 and bool((encoder.encode(labels).std(0) == 0).any()):
                raise ValueError("The regression targets (or one of their columns) are all equal: nothing to learn.")
            return encoder
        if problem_type == "multi_label_classification":
            return cls._fit_multi_label(labels, names)
        names_given = names is not None
        if isinstance(first, str):
            other = next((label for label in labels if not isinstance(label, str)), None)
            if other is not None:
                raise ValueError(f"The labels mix class names such as {first!r} with other values such as {other!r}: "
                                 "use names only, or class ids only.")
            names = sorted(set(labels))
        elif isinstance(first, (bool, np.bool_)) and names is None:
            names = ["False", "True"]
        elif names is None:
            top = max(int(x) for x in labels)
            names = [f"LABEL_{i}" for i in range(top + 1)]
        encoder = cls(problem_type, list(names), len(names), named=isinstance(first, str))
        present = set(encoder.encode(labels).tolist())
        if len(present) < 2:
            raise ValueError(
                f"The training data has only {len(present)} class: a classifier needs at least two."
            )
        missing = [encoder.names[i] for i in range(encoder.num_labels) if i not in present]
        if missing and names_given:
            raise ValueError(
                f"Classes {missing} have no training examples. Add examples, or remove them from the label names."
            )
        if missing:
            raise ValueError(
                f"Integer labels are class ids 0..{encoder.num_labels - 1} (as in transformers), and ids "
                f"{[i for i in range(encoder.num_labels) if i not in present]} have no training examples. If the "
                "labels are values such as 1..5 or {1, 5}, encode them as classes first "
                "(`dataset.class_encode_column('label')`; `--class-labels` with `stc fit`) or pass them as strings."
            )
        return encoder

    @classmethod
    def _fit_multi_label(cls, labels, names) -> "LabelEncoder":
        items = [x for row in labels for x in row]
        widths = {len(row) for row in labels}
        if all(isinstance(x, str) for x in items):
            names = sorted(set(items))
            return cls("multi_label_classification", names, len(names))
        if len(widths) == 1 and all(x in (0, 1) for x in items) and (names is None or len(names) == widths.copy().pop()):
            width = widths.pop()
            return cls("multi_label_classification", names or [f"LABEL_{i}" for i in range(width)], width, True)
        if names is None:
            names = [f"LABEL_{i}" for i in range(max(int(x) for x in items) + 1)]
        return cls("multi_label_classification", list(names), len(names), named=False)

    @classmethod
    def for_model(cls, model, labels: list) -> "LabelEncoder":
        """The encoder of a fitted model's labels (`id2label`, `problem_type`), for data it was not fitted on."""
        config, task = model.config, problem_type(model)
        if task == "regression":
            return cls(task, None, config.num_labels)
        names = label_names(model)
        vectors = False
        if task == "multi_label_classification":
            summary = getattr(config, "fit_summary", None) or {}
            vectors = summary.get("label_vectors")
            if vectors is None:  # fitted before the format was recorded: flags have the model's width
                vectors = all(isinstance(row, (list, tuple)) and len(row) == config.num_labels
                              and set(row) <= {0, 1} for row in labels)
        named = (getattr(config, "fit_summary", None) or {}).get("labels_by_name", True)  # unknown: assumed
        return cls(task, names, config.num_labels, vectors, named=named)

    def encode(self, labels: list, feature=None) -> torch.Tensor:
        """Targets of `labels`. With their `ClassLabel` `feature`, ids are read by class name: a split encoded on its
        own may number the same classes otherwise."""
        missing = next((row for row, label in enumerate(labels) if label is None), None)
        if missing is not None:
            raise ValueError(f"The label of row {missing} is missing (None/NaN): drop or fill those rows.")
        if _feature_names(feature) is None:
            self._check_ids_are_not_names(labels)
        labels = self._by_name(labels, _feature_names(feature))
        if self.task == "regression":
            values = torch.tensor(np.asarray(labels, dtype=np.float32)).reshape(len(labels), self.num_labels)
            if not torch.isfinite(values).all():
                raise ValueError("Regression targets contain NaN/inf: drop or fix those rows.")
            return values
        if self.task == "multi_label_classification":
            out = torch.zeros(len(labels), self.num_labels)
            for i, row in enumerate(labels):
                if self.vectors:
                    if len(row) != self.num_labels:
                        raise ValueError(f"Row {i} has {len(row)} label flags, expected {self.num_labels}.")
                    out[i] = torch.tensor([float(x) for x in row])
                else:
                    for x in row:
                        out[i, self._index(x)] = 1.0
            return out
        return torch.tensor([self._index(x) for x in labels], dtype=torch.long)

    def _check_ids_are_not_names(self, labels: list):
        """Integer labels are class ids; with classes named by numbers ('1', '2', '3') an integer could mean either,
        unless the training labels were ids too."""
        if self.task == "regression" or self.vectors or not self.named or not self.names or _default_names(self.names):
            return
        numbers = all(name.lstrip("-").isdigit() for name in self.names)
        if not numbers or self.names == [str(i) for i in range(len(self.names))]:  # '0', '1', ...: name = id
            return
        rows = labels if self.task == "single_label_classification" else [x for row in labels for x in row]
        given = next((x for x in rows if isinstance(x, int) and not isinstance(x, bool)), None)
        if given is not None:
            raise ValueError(
                f"Label {given} is an integer, and the classes are named by numbers ({self.names[:5]}...): it could "
                f"be the class named '{given}' or the class with id {given}. Pass the labels as the class names "
                "(strings, e.g. `[str(y) for y in labels]`, or `stc ... --class-labels` on the command line), or as a "
                "`ClassLabel` column."
            )

    def _by_name(self, labels: list, names) -> list:
        """Class ids of a feature with other class names than the model's, replaced by their names."""
        if names is None or self.names is None or self.vectors or list(names) == self.names \
                or _default_names(self.names):
            return labels

        def name(label):
            return names[label] if isinstance(label, int) and 0 <= label < len(names) else label

        if self.task == "multi_label_classification":
            return [[name(label) for label in row] for row in labels]
        return [name(label) for label in labels]

    def _index(self, label) -> int:
        if isinstance(label, str):
            if label not in self.names:
                raise ValueError(f"Unknown label {label!r}: the training labels are {self.names}.")
            return self.names.index(label)
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if not isinstance(label, int):
            raise ValueError(
                f"Label {label!r} is not a class id (an integer in 0..{self.num_labels - 1}) nor one of the class "
                f"names {self.names}. For regression targets set `problem_type='regression'` on the model config."
            )
        index = label
        if index < 0:
            raise ValueError(
                f"Label id {index} is negative: class ids count from 0. Rows labelled {index} are usually unlabelled "
                "(as in GLUE test splits): drop them, e.g. `dataset.filter(lambda row: row['label'] >= 0)`."
            )
        if index >= self.num_labels:
            raise ValueError(
                f"Label id {index} is outside 0..{self.num_labels - 1} ({self.names}); validation/test classes "
                "must also occur in the training data."
            )
        return index

    def configure(self, model):
        """Write labels and problem type into the model config."""
        config = model.config
        config.problem_type = self.task
        config.num_labels = self.num_labels
        if self.names is not None:
            config.id2label = dict(enumerate(self.names))
            config.label2id = {name: i for i, name in enumerate(self.names)}


def _columns(dataset, args, need_labels=True):
    """Texts (pairs with `args.text_pair_column`) and labels with their feature, from a `datasets.Dataset`, a dict
    of lists or a DataFrame, (texts, labels), or texts alone (a string, or any sequence of them)."""
    if isinstance(dataset, str):
        dataset = [dataset]
    if isinstance(dataset, tuple) and len(dataset) == 2 and not isinstance(dataset[0], str):
        texts, labels = dataset
        return check_texts(texts), (None if labels is None else [_plain(label) for label in labels]), None
    table = hasattr(dataset, "column_names") or hasattr(dataset, "columns") or isinstance(dataset, dict)
    if not table or getattr(dataset, "ndim", None) == 1:  # texts: a list, tuple, numpy array, Series, Column, ...
        return check_texts(list(dataset)), None, None
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        raise ValueError(f"Got a DatasetDict with splits {list(dataset)}: pass one split, e.g. `data['train']`.")
    if hasattr(dataset, "with_format"):  # torch / numpy formatted datasets: read plain Python values
        dataset = dataset.with_format(None)
    if isinstance(dataset, IterableDataset) and dataset.column_names is None:  # no features: read the rows once
        rows = list(dataset)
        dataset = {name: [row.get(name) for row in rows] for name in (rows[0] if rows else {})}
    names = dataset.column_names if hasattr(dataset, "column_names") else list(dataset)
    for option in ("text_column", "text_pair_column"):
        column = getattr(args, option)
        if column is not None and column not in names:
            raise ValueError(f"Text column {column!r} not found; the data has columns {names}. Set `{option}=`.")
    labels, feature = None, None
    if args.label_column in names:
        labels = [_plain(label) for label in dataset[args.label_column]]
        feature = getattr(dataset, "features", {}).get(args.label_column) if hasattr(dataset, "features") else None
    elif need_labels:
        raise ValueError(f"Label column {args.label_column!r} not found; the data has columns {names}. "
                         "Set `label_column=`.")
    texts = dataset[args.text_column]
    if args.text_pair_column is not None:
        texts = list(zip(texts, dataset[args.text_pair_column]))
    return check_texts(texts), labels, feature


def _same_kind(pairs: bool, other: list, name: str, other_name: str):
    """Text pairs and single texts give different features: a model reads the kind it was fitted on."""
    if pairs != isinstance(other[0], tuple):
        kinds = ["(text, text_pair) pairs" if kind else "single texts" for kind in (pairs, not pairs)]
        raise ValueError(
            f"The {name} data are {kinds[0]} but the {other_name} data are {kinds[1]}: give both the same kind "
            "(set `text_pair_column=` for pairs)."
        )


def check_input_kind(model, texts: list) -> list:
    """Checked texts: a model fitted by `STCTrainer` reads the kind of input it was fitted on (pairs or not)."""
    summary = getattr(model.config, "fit_summary", None) or {}
    if "text_pairs" in summary:
        _same_kind(summary["text_pairs"], texts, "training", "given")
    return texts


def _split_indices(num: int, labels, fraction: float, seed: int, stratify: bool):
    """Seeded (stratified for classification) train/validation split of row ids."""
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(num)
        cut = min(max(1, int(round(num * fraction))), num - 1)
        train, val = order[cut:], order[:cut]
    else:
        labels = np.asarray(labels)
        train, val = [], []
        for value in np.unique(labels):  # each class with two or more rows keeps one in each part at least
            rows = rng.permutation(np.flatnonzero(labels == value))
            cut = min(max(1, int(round(len(rows) * fraction))), len(rows) - 1)
            val.extend(rows[:cut])
            train.extend(rows[cut:])
    if len(val) == 0:
        raise ValueError(
            f"{num} training examples are too few for an internal validation split (every class needs two): pass "
            "`eval_dataset=` or more examples."
        )
    if len(val) > 2 * fraction * num and len(val) > 1:  # classes of two or three rows each give one to validation
        warnings.warn(
            f"The internal validation split holds {len(val)} of {num} training examples ({len(val) / num:.0%}, not "
            f"{fraction:.0%}): most classes have only a few rows, and each gives one to validation. Pass "
            "`eval_dataset=` to keep them for training.", stacklevel=3)
    return np.sort(train), np.sort(val)


def predict_logits(model, tokenizer, texts, *, max_length=256, batch_size=32, progress=True) -> np.ndarray:
    """Run the (fitted) model over texts in length-sorted batches; logits in the input order."""
    texts = check_input_kind(model, check_texts(texts))
    batches = LengthSortedBatches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    out = np.zeros((len(batches.lengths), model.config.num_labels), dtype=np.float32)
    model.eval()
    for number in tqdm(range(len(batches)), desc="Predicting", disable=not progress, unit="batch"):
        with torch.inference_mode():
            logits = model(**batches.batch(number, model.device)).logits
        out[batches.index[number]] = logits.float().cpu().numpy()
    return out


class STCTrainer:
    """Fits an `STCForSequenceClassification` on a frozen backbone: one forward pass + batched sparse probes."""

    def __init__(self, model, args: STCTrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, dataset_name: str | None = None):
        if processing_class is None:
            raise ValueError("Pass the backbone's tokenizer as `processing_class=`.")
        self.model = model
        self.args = args or STCTrainingArguments()
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.tokenizer = prepare_tokenizer(processing_class, model)
        self.dataset_name = dataset_name
        self.encoder: LabelEncoder | None = None
        self.result: STCTrainOutput | None = None

    @property
    def device(self):
        if self.args.device is not None:
            return torch.device(self.args.device)
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def _cache_dir(self) -> Path:
        return Path(self.args.cache_dir or Path(self.args.output_dir) / "feature_cache")

    def train(self) -> STCTrainOutput:
        """Extract features once, search the selection on validation data, and write it into the model."""
        args = self.args
        if self.train_dataset is None:
            raise ValueError("Pass `train_dataset=` to fit.")
        started = time.perf_counter()
        texts, labels, feature = _columns(self.train_dataset, args)
        pairs = isinstance(texts[0], tuple)
        if pairs and self.tokenizer.num_special_tokens_to_add(pair=True) == 0:
            warnings.warn(
                "The tokenizer has no template for text pairs (as most decoder LLMs): it joins the two texts with "
                "nothing between them. Join them yourself into one text with a separator (e.g. "
                "'Premise: ...\nHypothesis: ...') to keep them apart.", stacklevel=2)
        names = label_names(self.model)  # class names set on the config before the fit count, defaults do not
        self.encoder = LabelEncoder.fit(labels, feature, self.model.config.problem_type,
                                        None if _default_names(names) else names)
        y = self.encoder.encode(labels)
        if self.eval_dataset is not None:
            val_texts, val_labels, val_feature = _columns(self.eval_dataset, args)
            _same_kind(pairs, val_texts, "training", "validation")
            y_val = self.encoder.encode(val_labels, val_feature)
            validation = "given"
        else:
            stratify = self.encoder.task == "single_label_classification"
            train_rows, val_rows = _split_indices(len(texts), y.numpy() if stratify else None,
                                                  args.validation_fraction, args.seed, stratify)
            val_texts, y_val = [texts[i] for i in val_rows], y[val_rows]
            texts, y = [texts[i] for i in train_rows], y[train_rows]
            validation = "internal split"
        if self.encoder.task == "regression" and (len(y_val) < 2 or bool((y_val.std(0) == 0).any())):
            raise ValueError(
                f"The {len(y_val)} validation targets are all equal: R^2 cannot rank the candidates. Pass a larger "
                "`eval_dataset` (or more training rows for the internal split)."
            )
        self.encoder.configure(self.model)
        # under `accelerate launch` / torchrun with several processes: each extracts a share of the batches on its
        # own device, the main process runs the search, and the others receive its result
        distributed = distributed_state(self.device)
        if not getattr(self.model.backbone, "hf_device_map", None):  # placed with `device_map`: it stays there
            self.model.to(distributed.device if distributed is not None else self.device)
        extract = dict(max_length=args.token_limit(self.model), batch_size=args.batch_size, progress=args.progress,
                       accelerator=distributed, weights_fingerprint=model_fingerprint(self.model))
        train_cache = extract_features(self.model, self.tokenizer, texts, self._cache_dir(),
                                       description="Features (train)", **extract)
        val_cache = extract_features(self.model, self.tokenizer, val_texts, self._cache_dir(),
                                     description="Features (validation)", **extract)
        extraction_seconds = time.perf_counter() - started
        if distributed is not None and not distributed.is_main_process:
            return self._receive_fit()
        search = SelectionSearch(train_cache, val_cache, y, y_val, self.encoder.task, self.encoder.num_labels,
                                 args.search_settings(self.device))
        result = search.run()
        num_layers = self.model.config.text_config.num_hidden_layers
        self.model.set_selection(result.selection, result.weight, result.bias, result.mean, result.scale)
        seconds = {"extraction": round(extraction_seconds, 2), **{k: round(v, 2) for k, v in result.seconds.items()}}
        seconds["total"] = round(time.perf_counter() - started, 2)
        if result.cross_validation_folds:
            validation += f" + {result.cross_validation_folds}-fold cross-validation"
        metric = METRIC_NAMES[self.encoder.task]
        cross_validated = {"cross_validated_score": round(result.best.score, 6)} if result.cross_validation_folds else {}
        chosen = {**result.best.as_dict(), **cross_validated, "validation_score": round(
            float(compute_metrics(result.validation_outputs.numpy(), y_val.numpy(), self.encoder.task)[metric]), 6)}
        candidates = [c.as_dict() for c in result.candidates]
        self.model.config.fit_summary = {
            "task": self.encoder.task,
            "metric": metric,
            "chosen": chosen,
            "layer_scores": {k: [round(v, 6) for v in scores] for k, scores in result.layer_scores.items()},
            "base_score": round(result.base_score, 6),
            "candidates_top": candidates[:20],
            "text_pairs": pairs,
            "label_vectors": self.encoder.vectors,
            "labels_by_name": self.encoder.named,
            "num_train": len(texts),
            "num_validation": len(val_texts),
            "validation": validation,
            "num_layers": num_layers,
            "seconds": seconds,
            "backbone": getattr(self.model, "name_or_path", None) or self.model.config.text_config._name_or_path,
            "dataset": self.dataset_name,
        }
        self._validation_outputs = result.validation_outputs
        self._validation_texts = val_texts
        self._write_candidates(candidates)
        self.result = STCTrainOutput(chosen["validation_score"], metric, chosen, candidates, seconds,
                                     result.base_score, result.layer_scores)
        if distributed is not None:
            self._share_fit((result.selection, result.weight, result.bias, result.mean, result.scale))
        return self.result

    def _share_fit(self, fitted: tuple):
        """Main process: send the fit to the other processes (which wait in `_receive_fit`)."""
        from accelerate.utils import broadcast_object_list

        fitted = tuple(x.cpu() if torch.is_tensor(x) else x for x in fitted)
        broadcast_object_list([(fitted, self.model.config.fit_summary, self.result, self._validation_outputs.cpu(),
                                self._validation_texts)])

    def _receive_fit(self) -> STCTrainOutput:
        """Other processes: take the main process's fit, so every process ends with the same fitted model."""
        from accelerate.utils import broadcast_object_list

        payload = [None]
        broadcast_object_list(payload)
        fitted, summary, self.result, self._validation_outputs, self._validation_texts = payload[0]
        self.model.config.fit_summary = summary
        self.model.set_selection(*fitted)
        return self.result

    def _write_candidates(self, candidates: list[dict]):
        output = Path(self.args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        with open(output / "candidates.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(candidates[0]))
            writer.writeheader()
            for row in candidates:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})

    def _require_fitted(self):
        if self.model.config.selection is None:
            raise ValueError("The model is not fitted yet: call `trainer.train()` first.")

    def predict(self, dataset) -> PredictionOutput:
        """Logits for a dataset (or list of texts); metrics when it has labels."""
        self._require_fitted()
        texts, labels, feature = _columns(dataset, self.args, need_labels=False)
        logits = predict_logits(self.model, self.tokenizer, texts, max_length=self.args.token_limit(self.model),
                                batch_size=self.args.batch_size, progress=self.args.progress)
        label_ids, metrics = None, None
        if labels is not None:
            encoder = self.encoder or LabelEncoder.for_model(self.model, labels)
            label_ids = encoder.encode(labels, feature).numpy()
            metrics = compute_metrics(logits, label_ids, self.model.config.problem_type)
        return PredictionOutput(logits, label_ids, metrics)

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Metrics on a labelled dataset (default: `eval_dataset`), keys prefixed with `metric_key_prefix`.

        They are also recorded in `model.config.fit_summary["evaluation"]` (a later call with the same prefix
        replaces them), so the saved config and the model card report them: `metric_key_prefix="test"` for a test
        split.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Pass a labelled dataset to evaluate (no `eval_dataset` was given).")
        metrics = self.predict(dataset).metrics
        if metrics is None:
            raise ValueError(f"The evaluation data has no {self.args.label_column!r} column.")
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        summary = self.model.config.fit_summary
        if summary is not None:
            recorded = {k: v for k, v in summary.get("evaluation", {}).items()
                        if not k.startswith(f"{metric_key_prefix}_")}
            summary["evaluation"] = {**recorded, **metrics}
        return metrics

    def save_model(self, output_dir: str | None = None):
        """Save model and tokenizer so `pipeline("text-classification", model=output_dir)` works."""
        self._require_fitted()
        output_dir = output_dir or self.args.output_dir
        distributed = distributed_state(self.device)
        if distributed is None or distributed.is_main_process:  # several processes: only the main one writes
            self.model.save_pretrained(output_dir)
            self.tokenizer.save_pretrained(output_dir)
            (Path(output_dir) / "stc_training_args.json").write_text(json.dumps(asdict(self.args), indent=1))
        if distributed is not None:
            distributed.wait_for_everyone()
        return output_dir

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the fitted model (weights, config, modeling code, card) and the tokenizer."""
        self._require_fitted()
        result = self.model.push_to_hub(repo_id, **kwargs)
        self.tokenizer.push_to_hub(repo_id, **{k: v for k, v in kwargs.items() if k in ("token", "private", "revision")})
        return result
