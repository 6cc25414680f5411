"""The `stc` command line, run in-process through `main([...])` on a tiny random BERT saved to a folder and tiny
csv / jsonl files; bad input must end with one clear line on stderr and exit code 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import STCModelTester, make_tiny_tokenizer
from test_trainer import synthetic_texts
from transformers import AutoModel, AutoTokenizer, pipeline

from stc_transformers.cli import main
from stc_transformers import STCForSequenceClassification
from stc_transformers.data import load_sample_dataset
from stc_transformers.metrics import compute_metrics
from stc_transformers.trainer import predict_logits


NAMES = ["neg", "pos"]
FAST = ["--max-length", "32", "--etas", "0.5", "0.9", "--strength-ratios", "0.1", "0.01",
        "--final-strengths", "1e-3", "1e-1", "--max-iter", "100", "--no-progress"]


def write_csv(path, rows, columns=("review", "sentiment")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def backbone(workdir):
    """A tiny random BERT and its tokenizer, saved like a downloaded model, so `--model <folder>` works."""
    torch.manual_seed(0)
    folder = workdir / "backbone"
    AutoModel.from_config(STCModelTester().backbone_config("bert")).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(workdir):
    """Learnable synthetic data with string labels: train/validation csv files and a test jsonl file."""
    texts, labels = synthetic_texts(260, 2, seed=0)
    rows = [(text, NAMES[label]) for text, label in zip(texts, labels)]
    files = {
        "train": write_csv(workdir / "train.csv", rows[:160]),
        "validation": write_csv(workdir / "validation.csv", rows[160:210]),
        "test_csv": write_csv(workdir / "test.csv", rows[210:]),
        "test": write_jsonl(workdir / "test.jsonl", [{"review": t, "sentiment": y} for t, y in rows[210:]]),
    }
    files["test_rows"] = rows[210:]
    return files


@pytest.fixture(scope="module")
def fitted(workdir, backbone, data):
    """`stc fit` with explicit train / validation / test files; returns (output folder, stdout)."""
    output = workdir / "fitted"
    capture = _Capture()
    with capture:
        code = main(["fit", "--model", str(backbone), "--data", f"train={data['train']}",
                     f"validation={data['validation']}", f"test={data['test_csv']}", "--text-column", "review",
                     "--label-column", "sentiment", "--output-dir", str(output), *FAST])
    assert code == 0, capture.err
    return output, capture.out


class _Capture:
    """capsys for module-scoped fixtures."""

    def __enter__(self):
        import io

        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc):
        self.out, self.err = sys.stdout.getvalue(), sys.stderr.getvalue()
        sys.stdout, sys.stderr = self._saved


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------------------------
# help
# ------------------------------------------------------------------------------------------------------------------


def test_help_lists_the_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("fit", "evaluate", "predict", "push", "report"):
        assert command in out
    for command in ("fit", "evaluate", "predict", "push", "report"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and f"usage: stc {command}" in out and "example:" in out
    code, out, _ = run(capsys, "fit", "--help")
    assert "rotten_tomatoes_offline" in out and "minilm" in out and "(default: 256)" in out


def test_cli_constants_match_the_package():
    """The CLI repeats a few names so that `stc --help` needs no `datasets` import; they must not drift."""
    from stc_transformers import cli, data, features_stc, selection

    assert cli.BUILTIN_NAMES == tuple(data.BUILTIN_DATASETS)
    assert cli.SOURCES == features_stc.SOURCES and cli.POOLINGS == features_stc.POOLINGS
    defaults = selection.SearchSettings()
    assert cli.SEARCH_DEFAULTS == {name: getattr(defaults, name) for name in cli.SEARCH_DEFAULTS}


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "stc_transformers", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("stc-transformers ")


# ------------------------------------------------------------------------------------------------------------------
# fit / evaluate / predict / report
# ------------------------------------------------------------------------------------------------------------------


def test_fit_saves_checkpoint_card_and_metrics(fitted, data):
    output, out = fitted
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["task"] == "single_label_classification" and metrics["metric"] == "accuracy"
    assert metrics["num_train"] == 160 and metrics["num_validation"] == 50 and metrics["num_test"] == 50
    assert metrics["validation"] == "given + 5-fold cross-validation" and metrics["validation_score"] > 0.7
    assert set(metrics["test_metrics"]) == {"test_accuracy", "test_macro_f1"}
    assert 0 <= metrics["exit_layer"] < metrics["num_layers"] == 3 and metrics["num_features"] > 0
    assert {"extraction", "total", "test", "command"} <= set(metrics["seconds"])
    # the printed summary
    assert f"Validation accuracy: STC {metrics['validation_score']:.4f}, Base probe {metrics['base_score']:.4f}" in out
    at_mlp = " (at its MLP)" if metrics["exit_at"] == "mlp" else ""
    assert f"exit layer {metrics['exit_layer']} of 0-2{at_mlp}, {metrics['num_features']} neurons" in out
    assert f"Test (50 texts, split 'test'): accuracy {metrics['test_metrics']['test_accuracy']:.4f}" in out
    # checkpoint, card with the test results, no leftover feature cache
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "stc_layer_scores.png",
                 "stc_training_args.json", "candidates.csv"):
        assert (output / name).is_file(), name
    assert not (output / "feature_cache").exists()
    assert json.loads((output / "stc_training_args.json").read_text())["min_relative_spread"] == 0.01
    card = (output / "README.md").read_text()
    assert "| test | Accuracy |" in card and "local files train.csv, validation.csv, test.csv" in card
    # the saved model works in a plain pipeline and labels keep their names
    classifier = pipeline("text-classification", model=str(output))
    assert {p["label"] for p in classifier([t for t, _ in data["test_rows"][:6]])} <= set(NAMES)


def test_evaluate_reproduces_the_fit_test_metrics(fitted, data, capsys, tmp_path):
    output, _ = fitted
    expected = json.loads((output / "metrics.json").read_text())["test_metrics"]
    code, out, _ = run(capsys, "evaluate", "--model", output, "--data", data["test"], "--text-column", "review",
                       "--label-column", "sentiment", "--output", tmp_path / "eval.json")
    assert code == 0
    result = json.loads(out)
    assert result["split"] == "train" and result["num_texts"] == 50  # a single file is one split
    assert result["metrics"]["accuracy"] == pytest.approx(expected["test_accuracy"], abs=1e-6)
    assert json.loads((tmp_path / "eval.json").read_text()) == result


def test_evaluate_matches_labels_by_name(fitted, data, capsys, tmp_path):
    """A file holding only 'pos' rows gets ClassLabel(['pos']) (id 0); it must still score against 'pos' (id 1)."""
    output, _ = fitted
    rows = [(t, y) for t, y in data["test_rows"] if y == "pos"]
    file = write_csv(tmp_path / "only_pos.csv", rows)
    code, out, _ = run(capsys, "evaluate", "--model", output, "--data", file, "--text-column", "review",
                       "--label-column", "sentiment")
    assert code == 0
    classifier = pipeline("text-classification", model=str(output))
    predicted = [p["label"] for p in classifier([t for t, _ in rows])]
    assert json.loads(out)["metrics"]["accuracy"] == pytest.approx(np.mean([p == "pos" for p in predicted]))


def test_predict_texts_and_files(fitted, data, capsys, tmp_path):
    output, _ = fitted
    texts = [t for t, _ in data["test_rows"][:5]]
    expected = pipeline("text-classification", model=str(output))(texts)
    code, out, _ = run(capsys, "predict", "--model", output, *[a for t in texts for a in ("--text", t)])
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    assert [r["score"] for r in rows] == pytest.approx([e["score"] for e in expected], abs=1e-5)

    (tmp_path / "in.txt").write_text("\n".join(texts[:3]) + "\n\n")  # blank lines are skipped
    code, out, _ = run(capsys, "predict", "--model", output, "--input", tmp_path / "in.txt", "--top-k", "5",
                       "--output", tmp_path / "out.jsonl")
    assert code == 0 and "Wrote 3 predictions" in out
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [len(r["predictions"]) for r in rows] == [2, 2, 2]  # top-k is capped at the number of labels
    assert [r["predictions"][0]["label"] for r in rows] == [e["label"] for e in expected[:3]]
    assert sum(p["score"] for p in rows[0]["predictions"]) == pytest.approx(1, abs=1e-5)

    code, _, _ = run(capsys, "predict", "--model", output, "--input", data["test"], "--text-column", "review",
                     "--output", tmp_path / "out.csv")
    assert code == 0
    lines = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8")))
    assert len(lines) == 50 and lines[0]["label"] == expected[0]["label"] and lines[0]["text"] == texts[0]


def test_report_prints_summary_and_writes_plots(fitted, capsys, tmp_path):
    output, _ = fitted
    code, out, _ = run(capsys, "report", "--model", output, "--plots-dir", tmp_path / "plots", "--top-neurons", "2")
    assert code == 0
    assert out.startswith("STC single label classification on ") and "neurons kept of" in out
    assert "Validation accuracy" in out and "Heaviest head weights (top 2 per label)" in out
    for name in ("stc_layer_scores.png", "stc_kept_neurons.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG")


def test_report_needs_no_tokenizer(capsys, tmp_path):
    """A checkpoint saved without its tokenizer (e.g. `model.save_pretrained` after `sparsify`) reports fine."""
    model = STCModelTester().model("bert")
    with torch.no_grad():
        model.head.classifier.weight.normal_()
    model.sparsify(0.5).save_pretrained(tmp_path / "sparse")
    code, out, err = run(capsys, "report", "--model", tmp_path / "sparse", "--plots-dir", tmp_path / "plots")
    assert code == 0, err
    assert "neurons kept" in out and (tmp_path / "plots" / "stc_kept_neurons.png").exists()


def test_evaluate_and_predict_truncate_at_the_tokenizer_limit_and_need_a_tokenizer(fitted, capsys, tmp_path):
    """Without stc_training_args.json, `evaluate` and `predict` truncate at the tokenizer's limit, at most the
    backbone's window (512 positions; the text has 600 words); a folder without tokenizer files gets a clear
    error."""
    import shutil

    output, _ = fitted
    bare = tmp_path / "bare"
    shutil.copytree(output, bare)
    (bare / "stc_training_args.json").unlink()
    tokenizer_config = json.loads((bare / "tokenizer_config.json").read_text())
    text = " ".join(f"w{i % 90}" for i in range(600))
    long = write_csv(tmp_path / "long.csv", [(text, "pos")] * 2)
    classifier, scores = pipeline("text-classification", model=str(output)), {}
    for limit, tokens in ((48, 48), (int(1e30), 512)):  # a tokenizer without a limit: the backbone's window
        (bare / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": limit}))
        for argv in (("evaluate", "--data", long, "--text-column", "review", "--label-column", "sentiment"),
                     ("predict", "--input", long, "--text-column", "review")):
            code, _, err = run(capsys, *argv[:1], "--model", bare, *argv[1:])
            assert code == 0, err
        code, out, err = run(capsys, "predict", "--model", bare, "--text", text, "--top-k", "2")
        assert code == 0, err
        predicted = {p["label"]: p["score"] for p in json.loads(out)["predictions"]}
        expected = {p["label"]: p["score"] for p in classifier(text, truncation=True, max_length=tokens, top_k=None)}
        assert predicted == pytest.approx(expected, abs=1e-5)  # the text cut at `tokens` tokens
        scores[tokens] = predicted
    assert scores[48] != pytest.approx(scores[512], abs=1e-3)  # the two cuts are told apart
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (bare / name).unlink(missing_ok=True)
    code, _, err = run(capsys, "predict", "--model", bare, "--text", "w1 w2")
    assert code == 2 and "no usable tokenizer files" in err and "save_pretrained" in err


def test_fit_single_file_internal_split_subsample_then_evaluate_on_builtin_sample(backbone, capsys, tmp_path):
    """A single file has no validation split (seeded internal split); --max-train-samples; then `evaluate` on the
    shipped sample through its built-in name (same label names: negative / positive)."""
    texts, labels = synthetic_texts(120, 2, seed=4)
    names = ["negative", "positive"]
    file = write_jsonl(tmp_path / "all.jsonl", [{"text": t, "label": names[y]} for t, y in zip(texts, labels)])
    code, out, err = run(capsys, "fit", "--model", backbone, "--data", file, "--output-dir", tmp_path / "out",
                         "--max-train-samples", "100", "--sources", "hidden", "--poolings", "mean", "--bf16-probes",
                         "off", *FAST)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "stc_training_args.json").read_text())["bf16_probes"] is False
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["validation"] == "internal split + 5-fold cross-validation" and metrics["num_train"] + metrics["num_validation"] == 100
    assert metrics["test_metrics"] is None and "No test split" in out
    assert metrics["chosen"]["sources"] == ["hidden"] and metrics["chosen"]["poolings"] == ["mean"]
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "out", "--data", "sample",
                         "--max-eval-samples", "20")
    assert code == 0, err
    result = json.loads(out)
    assert result["split"] == "test" and result["num_texts"] == 20
    sample = load_sample_dataset()["test"].shuffle(seed=42).select(range(20))  # --max-eval-samples, default --seed
    predicted = [p["label"] for p in pipeline("text-classification", model=str(tmp_path / "out"))(list(sample["text"]))]
    truth = [sample.features["label"].int2str(y) for y in sample["label"]]
    assert result["metrics"]["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth)]))


def test_fit_multi_label_and_regression(backbone, capsys, tmp_path):
    texts, labels = synthetic_texts(160, 3, seed=5)
    rng = np.random.default_rng(0)
    tags = [sorted({"abc"[y]} | ({"abc"[int(rng.integers(3))]} if rng.random() < 0.3 else set())) for y in labels]
    file = write_jsonl(tmp_path / "tags.jsonl", [{"text": t, "tags": g} for t, g in zip(texts, tags)])
    code, out, err = run(capsys, "fit", "--model", backbone, "--data", file, "--label-column", "tags",
                         "--output-dir", tmp_path / "multi", *FAST)
    assert code == 0, err
    assert "Validation micro_f1" in out
    code, out, _ = run(capsys, "evaluate", "--model", tmp_path / "multi", "--data", file, "--label-column", "tags")
    assert code == 0 and {"micro_f1", "macro_f1", "subset_accuracy"} == set(json.loads(out)["metrics"])
    model = STCForSequenceClassification.from_pretrained(tmp_path / "multi")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "multi")
    order = [model.config.id2label[i] for i in range(3)]  # the model's columns, by tag name
    targets = np.array([[tag in g for tag in order] for g in tags], dtype=float)
    logits = predict_logits(model, tokenizer, texts, progress=False)
    expected = compute_metrics(logits, targets, "multi_label_classification")
    assert json.loads(out)["metrics"] == pytest.approx(expected)

    targets = [float(y) * 2 - 1 for y in labels]
    file = write_jsonl(tmp_path / "scores.jsonl", [{"text": t, "label": s} for t, s in zip(texts, targets)])
    code, out, err = run(capsys, "fit", "--model", backbone, "--data", file, "--output-dir", tmp_path / "reg", *FAST)
    assert code == 0, err
    assert "Validation r2" in out
    code, out, _ = run(capsys, "predict", "--model", tmp_path / "reg", "--text", texts[0])
    model = STCForSequenceClassification.from_pretrained(tmp_path / "reg")
    raw = predict_logits(model, AutoTokenizer.from_pretrained(tmp_path / "reg"), texts[:1], progress=False)
    assert code == 0 and json.loads(out)["score"] == pytest.approx(float(raw[0, 0]), abs=1e-5)  # the value itself


def test_sentence_pairs_fit_evaluate_predict(backbone, capsys, tmp_path):
    """--text-pair-column for fit / evaluate / predict files, --text with --text-pair for predict."""
    hypotheses, labels = synthetic_texts(200, 2, seed=5)
    premises, _ = synthetic_texts(200, 2, seed=6)
    rows = [{"premise": p, "hypothesis": h, "label": NAMES[y]} for p, h, y in zip(premises, hypotheses, labels)]
    train, test = write_jsonl(tmp_path / "train.jsonl", rows[:150]), write_jsonl(tmp_path / "test.jsonl", rows[150:])
    columns = ["--text-column", "premise", "--text-pair-column", "hypothesis"]
    with pytest.warns(UserWarning, match="no template for text pairs"):  # the tiny tokenizer has none
        code, out, err = run(capsys, "fit", "--model", backbone, "--data", f"train={train}", f"test={test}",
                             *columns, "--output-dir", tmp_path / "out", *FAST)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test_metrics"]["test_accuracy"] >= 0.65  # the label is in the second text only: chance is 0.5,
    # and 0.65 on these 50 rows is 2 standard errors above it
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "out", "--data", test, *columns)
    assert code == 0, err
    assert json.loads(out)["metrics"]["accuracy"] == pytest.approx(metrics["test_metrics"]["test_accuracy"])
    code, _, err = run(capsys, "evaluate", "--model", tmp_path / "out", "--data", test, *columns[:2])
    assert code == 2 and "training data are (text, text_pair) pairs but the given data are single texts" in err

    pairs = [{"text": r["premise"], "text_pair": r["hypothesis"]} for r in rows[150:155]]
    expected = pipeline("text-classification", model=str(tmp_path / "out"))(pairs)
    code, out, err = run(capsys, "predict", "--model", tmp_path / "out",
                         *[a for p in pairs for a in ("--text", p["text"], "--text-pair", p["text_pair"])])
    assert code == 0, err
    predicted = [json.loads(line) for line in out.splitlines()]
    assert [{"text": r["text"], "text_pair": r["text_pair"]} for r in predicted] == pairs
    assert [r["label"] for r in predicted] == [e["label"] for e in expected]
    code, out, err = run(capsys, "predict", "--model", tmp_path / "out", "--input", test, *columns,
                         "--output", tmp_path / "pred.csv")
    assert code == 0, err
    with open(tmp_path / "pred.csv", encoding="utf-8") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == 50 and [line["label"] for line in lines[:5]] == [e["label"] for e in expected]
    assert lines[0]["text_pair"] == rows[150]["hypothesis"]
    code, _, err = run(capsys, "predict", "--model", tmp_path / "out", "--text", "w1")
    assert code == 2 and "pairs but the given data are single texts" in err
    code, _, err = run(capsys, "predict", "--model", tmp_path / "out", "--text", "w1", "--text", "w2",
                       "--text-pair", "w3")
    assert code == 2 and "Got 2 --text but 1 --text-pair" in err


# ------------------------------------------------------------------------------------------------------------------
# push
# ------------------------------------------------------------------------------------------------------------------


def test_push_uploads_model_card_and_tokenizer(fitted, capsys, tmp_path, monkeypatch):
    from test_hub import install_fake_hub

    output, _ = fitted
    commits = install_fake_hub(tmp_path / "hub", monkeypatch.setattr)
    code, out, err = run(capsys, "push", "--model", output, "--repo-id", "me/stc-cli", "--token", "hf_fake")
    assert code == 0, err
    assert "Pushed" in out and "me/stc-cli" in out
    files = {name for repo, names in commits for name in names if repo == "me/stc-cli"}
    assert {"config.json", "model.safetensors", "README.md", "modeling_stc.py", "tokenizer.json"} <= files
    assert 'model="me/stc-cli"' in (tmp_path / "hub" / "me/stc-cli" / "README.md").read_text()


def test_push_without_a_token(fitted, capsys, monkeypatch, tmp_path):
    import huggingface_hub
    from test_hub import install_fake_hub

    commits = install_fake_hub(tmp_path / "hub", monkeypatch.setattr)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, out, err = run(capsys, "push", "--model", fitted[0], "--repo-id", "me/stc-cli")
    assert code == 2 and out == "" and commits == []
    assert err == "stc push: error: No Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass --token.\n"


# ------------------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(workdir):
    texts, labels = synthetic_texts(20, 2, seed=9)
    rows = [(t, NAMES[y]) for t, y in zip(texts, labels)]
    other_model = workdir / "other_model"
    other_model.mkdir(exist_ok=True)
    (other_model / "config.json").write_text('{"model_type": "bert"}')
    (workdir / "empty.csv").write_text("")
    (workdir / "empty.jsonl").write_text("\n")
    (workdir / "latin1.csv").write_bytes("review,sentiment\ncaf\xe9 w1,pos\nw2,neg\n".encode("latin-1"))
    return {
        "empty_text": write_csv(workdir / "empty_text.csv", rows[:2] + [("", "pos")] + rows[2:]),
        "no_label": write_csv(workdir / "no_label.csv", rows[:2] + [("w3 w4", "")] + rows[2:]),
        "header_only": write_csv(workdir / "header_only.csv", []),
        "jsonl": write_jsonl(workdir / "bad.jsonl", [{"review": t, "sentiment": y} for t, y in rows]),
        "blank_txt": workdir / "blank.txt",
    }


BAD_INPUTS = [
    # (argv with placeholders, exact stderr line)
    (["evaluate", "--model", "{fitted}", "--data", "{work}/missing.csv"],
     "stc evaluate: error: Data file '{work}/missing.csv' not found."),
    (["fit", "--model", "{backbone}", "--data", "imdbx", "--output-dir", "{tmp}/o"],
     "stc fit: error: Unknown dataset 'imdbx': built-in datasets are rotten_tomatoes_offline, movie_valence, "
     "bbc_news, sample; otherwise give a local csv/tsv/json/jsonl/parquet file, a `save_to_disk` folder, or a Hub "
     "dataset id (owner/name)."),
    (["evaluate", "--model", "{fitted}", "--data", "{work}/test.csv"],
     "stc evaluate: error: Column(s) ['text', 'label'] not found in split 'train'; available columns: ['review', "
     "'sentiment']. Choose them with --text-column / --text-pair-column / --label-column."),
    (["fit", "--model", "{backbone}", "--data", "{work}/train.csv", "--text-column", "review", "--label-column",
      "stars", "--output-dir", "{tmp}/o"],
     "stc fit: error: Column(s) ['stars'] not found in split 'train'; available columns: ['review', 'sentiment']. "
     "Choose them with --text-column / --text-pair-column / --label-column."),
    (["fit", "--model", "{backbone}", "--data", "{work}/empty_text.csv", "--text-column", "review",
      "--label-column", "sentiment", "--output-dir", "{tmp}/o"],
     "stc fit: error: Text 2 of split 'train' (counting from 0) is empty: drop or fill that row."),
    (["fit", "--model", "{backbone}", "--data", "train={work}/train.csv", "test={work}/bad.jsonl",
      "--output-dir", "{tmp}/o"],
     "stc fit: error: The --data files must share one format (csv, tsv, json/jsonl or parquet); got ['.csv', "
     "'.jsonl']."),
    (["fit", "--model", "{backbone}", "--data", "{work}/train.csv", "{work}/test.csv", "--output-dir", "{tmp}/o"],
     "stc fit: error: Several --data values must each be SPLIT=FILE (e.g. train=train.csv test=test.csv); got "
     "'{work}/train.csv'."),
    (["fit", "--model", "{backbone}", "--data", "{work}/train.csv", "--validation-split", "dev",
      "--text-column", "review", "--label-column", "sentiment", "--output-dir", "{tmp}/o"],
     "stc fit: error: Split 'dev' (--validation-split) not found; the data has splits ['train']."),
    (["fit", "--model", "{fitted}", "--data", "{work}/train.csv", "--output-dir", "{tmp}/o"],
     "stc fit: error: '{fitted}' is already a fitted STC classifier; `stc fit` needs a backbone (a Hub model id, "
     "a local model folder, minilm or smollm2)."),
    (["fit", "--model", "{work}/no_such_model", "--data", "{work}/train.csv", "--output-dir", "{tmp}/o"],
     "stc fit: error: Model folder '{work}/no_such_model' not found."),
    (["evaluate", "--model", "{backbone}", "--data", "{work}/test.jsonl", "--text-column", "review",
      "--label-column", "sentiment"],
     "stc evaluate: error: '{backbone}' is a 'bert' checkpoint, not a fitted STC classifier; fit one with "
     "`stc fit --model {backbone} --data ... --output-dir ...`."),
    (["report", "--model", "{work}"],
     "stc report: error: '{work}' has no config.json: it is not a saved model folder."),
    (["report", "--model", "{work}/no_such_model"],
     "stc report: error: Model folder '{work}/no_such_model' not found."),
    (["predict", "--model", "{fitted}", "--text", "w1 w2", "--text", "   "],
     "stc predict: error: Text 1 of --text (counting from 0) is empty: drop or fill that row."),
    (["predict", "--model", "{fitted}", "--input", "{work}/missing.txt"],
     "stc predict: error: Input file '{work}/missing.txt' not found."),
    (["predict", "--model", "{fitted}", "--input", "{work}/blank.txt"],
     "stc predict: error: Input file '{work}/blank.txt' has no texts."),
    (["predict", "--model", "{fitted}", "--input", "{work}/bad.jsonl"],
     "stc predict: error: Column 'text' not found in '{work}/bad.jsonl'; available columns: ['review', "
     "'sentiment']. Choose it with --text-column."),
    (["predict", "--model", "{fitted}", "--input", "{work}/empty_text.csv", "--text-column", "review"],
     "stc predict: error: Text 2 of '{work}/empty_text.csv' (counting from 0) is empty: drop or fill that row."),
    (["push", "--model", "{fitted}", "--repo-id", "no-namespace", "--token", "hf_fake"],
     "stc push: error: --repo-id must look like user/name or org/name, got 'no-namespace'."),
    (["evaluate", "--model", "{fitted}", "--data", "sample", "--data-arg", "oops"],
     "stc evaluate: error: --data-arg expects KEY=VALUE, got 'oops'."),
    # nothing the user saved is overwritten
    (["fit", "--model", "{backbone}", "--data", "{work}/train.csv", "--text-column", "review", "--label-column",
      "sentiment", "--output-dir", "{backbone}"],
     "stc fit: error: --output-dir '{backbone}' is the backbone's own folder: the fit would overwrite the "
     "backbone. Choose another folder."),
    (["fit", "--model", "{backbone}", "--data", "{work}/train.csv", "--text-column", "review", "--label-column",
      "sentiment", "--output-dir", "{work}/other_model"],
     "stc fit: error: --output-dir '{work}/other_model' holds a bert model (config.json) that the fit would "
     "overwrite. Choose another folder."),
    (["predict", "--model", "{fitted}", "--input", "{work}/test.csv", "--text-column", "review", "--output",
      "{work}/test.csv"],
     "stc predict: error: --output is the --input file: the predictions would overwrite the texts. Choose another "
     "file."),
    (["predict", "--model", "{fitted}", "--text", "w1", "--output", "{tmp}/o/predictions.txt"],
     "stc predict: error: --output '{tmp}/o/predictions.txt': write predictions to a .jsonl or a .csv file."),
    # data files
    (["fit", "--model", "{backbone}", "--data", "{work}/no_label.csv", "--text-column", "review",
      "--label-column", "sentiment", "--output-dir", "{tmp}/o"],
     "stc fit: error: The label column of split 'train' holds missing values: drop or fill those rows."),
    (["fit", "--model", "{backbone}", "--data", "{work}/header_only.csv", "--output-dir", "{tmp}/o"],
     "stc fit: error: Data file {work}/header_only.csv has no rows (at most a header line)."),
    (["evaluate", "--model", "{fitted}", "--data", "{work}/empty.csv"],
     "stc evaluate: error: Data file {work}/empty.csv has no rows (at most a header line)."),
    (["evaluate", "--model", "{fitted}", "--data", "{work}/empty.jsonl"],
     "stc evaluate: error: Data file {work}/empty.jsonl has no rows."),
    (["fit", "--model", "{backbone}", "--data", "{work}/train.csv", "--text-column", "review", "--label-column",
      "review", "--output-dir", "{tmp}/o"],
     "stc fit: error: The text, text pair and label columns must be three different columns. Choose them with --text-column / "
     "--text-pair-column / --label-column."),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD_INPUTS)])
def test_bad_input_gives_one_line_and_exit_code_2(argv, message, fitted, backbone, data, bad_files, workdir,
                                                  capsys, tmp_path):
    (workdir / "blank.txt").write_text("\n  \n")
    values = {"fitted": fitted[0], "backbone": backbone, "work": workdir, "tmp": tmp_path}
    code, out, err = run(capsys, *[a.format(**values) for a in argv])
    assert code == 2
    assert err == message.format(**values) + "\n"
    assert not (tmp_path / "o").exists()


def test_unreadable_file_names_the_cause_and_the_loader_options(fitted, bad_files, workdir, capsys):
    code, _, err = run(capsys, "evaluate", "--model", fitted[0], "--data", workdir / "latin1.csv",
                       "--text-column", "review", "--label-column", "sentiment")
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("stc evaluate: error: Could not load local file latin1.csv: ")
    assert "UnicodeDecodeError" in line and "--data-arg encoding=latin-1" in line


def test_push_without_a_connection_leaves_the_checkpoint_alone(fitted, capsys, monkeypatch):
    from stc_transformers import STCForSequenceClassification

    class ConnectError(Exception):  # as the Hub client's HTTP library (httpx) raises without a network
        pass

    def offline(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(STCForSequenceClassification, "push_to_hub", offline)
    before = {p.name: p.stat().st_mtime_ns for p in fitted[0].iterdir()}
    code, out, err = run(capsys, "push", "--model", fitted[0], "--repo-id", "me/stc-cli", "--token", "hf_fake")
    assert code == 2 and out == ""
    assert err == (f"stc push: error: Could not push to the Hugging Face Hub ([Errno -2] Name or service not known); "
                   f"{fitted[0]} is unchanged. Check the connection (and HF_HUB_OFFLINE) and the token, then run "
                   "`stc push` again.\n")
    assert {p.name: p.stat().st_mtime_ns for p in fitted[0].iterdir()} == before


def test_fit_star_ratings_as_class_names(backbone, capsys, tmp_path):
    """--class-labels reads integer labels (star ratings 1 and 5) as class names; csv cells such as "NA" or "None"
    are texts, not missing values."""
    texts, labels = synthetic_texts(120, 2, seed=11)
    rows = [("None" if i == 3 else "NA" if i == 4 else text, (1, 5)[label])
            for i, (text, label) in enumerate(zip(texts, labels))]
    data = write_csv(tmp_path / "stars.csv", rows, columns=("review", "stars"))
    common = ["--data", data, "--text-column", "review", "--label-column", "stars"]
    code, _, err = run(capsys, "fit", "--model", backbone, *common, "--output-dir", tmp_path / "out", *FAST)
    assert code == 2 and "--class-labels" in err
    code, _, err = run(capsys, "fit", "--model", backbone, *common, "--class-labels", "--output-dir",
                       tmp_path / "out", *FAST)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["id2label"] == {"0": "1", "1": "5"}
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "out", *common, "--class-labels")
    assert code == 0, err
    assert json.loads(out)["metrics"]["accuracy"] > 0.7


def test_traceback_flag_reraises(fitted, capsys, workdir):
    with pytest.raises(ValueError, match="Text 0 of --text"):
        main(["predict", "--model", str(fitted[0]), "--text", "", "--traceback"])


@pytest.mark.parametrize("argv,fragment", [
    ([], "the following arguments are required: COMMAND"),
    (["fit", "--model", "minilm", "--output-dir", "x"], "the following arguments are required: --data"),
    (["fit", "--model", "m", "--data", "sample", "--output-dir", "x", "--etas", "1.5"],
     "argument --etas: must be in (0, 1], got 1.5"),
    (["predict", "--model", "m"], "one of the arguments --text --input is required"),
    (["predict", "--model", "m", "--text", "a", "--top-k", "0"], "argument --top-k: must be a positive integer"),
    (["fit", "--model", "m", "--data", "sample", "--output-dir", "x", "--early-exit-tolerance", "-0.5"],
     "argument --early-exit-tolerance: must be >= 0, got -0.5"),
    (["fit", "--model", "m", "--data", "sample", "--output-dir", "x", "--cv-folds", "1"],
     "argument --cv-folds: must be 0 (off) or at least 2, got 1"),
    (["fit", "--model", "m", "--data", "sample", "--output-dir", "x", "--validation-fraction", "1"],
     "argument --validation-fraction: must be in (0, 1), got 1"),
    (["predict", "--model", "m", "--text", "a", "--device", "foo"], "argument --device: not a torch device: 'foo'"),
    (["predict", "--model", "m", "--text", "a", "--device", "cuda:99"], "argument --device: 'cuda:99'"),
    (["report", "--model", "m", "--top-neurons", "-1"], "argument --top-neurons: must be >= 0, got -1"),
    (["fit", "--model", "m", "--data", "sample", "--output-dir", "x", "--cv-below", "-1"],
     "argument --cv-below: must be >= 0, got -1"),  # 0 is allowed: as STCTrainingArguments(cv_below=0)
    (["fit", "--model", "m", "--data", "sample", "--output-dir", "x", "--min-relative-spread", "1"],
     "argument --min-relative-spread: must be in [0, 1), got 1"),
])
def test_usage_errors_exit_2(argv, fragment, capsys):
    code, out, err = run(capsys, *argv)
    assert code == 2 and fragment in err and err.startswith("usage: stc")
