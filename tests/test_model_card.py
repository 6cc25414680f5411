"""Model cards: Hub metadata, sections, metrics, the plot next to the README, and never clobbering a user's card."""

from __future__ import annotations

import sys

import pytest
from conftest import STCModelTester
from huggingface_hub import ModelCard, metadata_load
from test_interpret import PNG_SIGNATURE, fitted_model, make_fit_summary

from stc_transformers.model_card import CARD_MARKER, PLOT_NAME, copy_model_card, is_generated_card, make_model_card


SECTIONS = ["## Model details", "## Evaluation", "## Selected neurons", "## Hyperparameters", "## Usage",
            "## How it works", "## Citation"]


@pytest.fixture(scope="module")
def model():
    model = fitted_model()
    model.config.fit_summary = make_fit_summary(model, 3, test_metrics={"test_accuracy": 0.86, "test_loss": 0.3,
                                                                        "test_runtime": 1.2})
    return model


def test_card_metadata_and_model_index(model, tmp_path):
    card = make_model_card(model, extra_metrics={"macro_f1": 0.85, "eval_accuracy": 0.87}, repo_id="me/stc-tiny")
    card.save(tmp_path / "README.md")
    meta = metadata_load(tmp_path / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == "org/tiny-backbone" and meta["datasets"] == ["rotten_tomatoes"]
    assert {"stc", "sparsify-then-classify", "text-classification"} <= set(meta["tags"])
    assert meta["metrics"] == ["accuracy", "f1"]
    loaded = ModelCard.load(tmp_path / "README.md")
    results = {(r.dataset_split, r.metric_type, r.metric_config): r.metric_value for r in loaded.data.eval_results}
    assert results == {("validation", "accuracy", None): 0.87, ("test", "accuracy", None): 0.86,
                       ("test", "f1", "macro"): 0.85}
    assert all(r.dataset_name == "rotten_tomatoes" and r.task_type == "text-classification"
               for r in loaded.data.eval_results)
    assert loaded.data.model_name == "stc-tiny"


def test_card_body(model):
    text = str(make_model_card(model, repo_id="me/stc-tiny", plot_path=PLOT_NAME))
    assert is_generated_card(text) and CARD_MARKER in text
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert 'pipeline("text-classification", model="me/stc-tiny", trust_remote_code=True)' in text
    assert "| test | Accuracy | 0.8600 |" in text and "| validation | Accuracy | 0.8700 |" in text
    assert "loss" not in text.split("## Evaluation")[1].split("##")[0].lower()  # loss / runtime are not metrics
    assert "Base probe" in text and "+0.0700" in text
    assert f"]({PLOT_NAME})" in text
    assert "`class_0`, `class_1`" in text and "| Training examples | 8000 |" in text
    assert "| Head L2 strength | 0.01 |" in text  # the final classifier's penalty, chosen on validation
    num_features = len(model.feature_names())
    assert f"It reads {num_features} of {2 * 2 * (32 + 37)} neurons" in text and "after layer 1 of 0-2" in text
    # per-layer table rows add up to the features the head reads
    rows = [line for line in text.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert sum(int(row.split("|")[2]) for row in rows) == num_features


def test_card_without_dataset_or_summary():
    model = fitted_model(summary=False)
    card = make_model_card(model)
    assert card.data.eval_results is None and card.data.base_model is None
    assert "No metrics were recorded" in str(card) and "## Selected neurons" in str(card)
    # a dense, never-sparsified model still gets a card that says so
    dense = make_model_card(STCModelTester().model("bert"))
    assert "The head is dense" in str(dense)
    assert "pools the hidden states and MLP neuron activations of every layer" in str(dense)
    hidden_only = make_model_card(STCModelTester().model("bert", sources=["hidden"]))
    assert "pools the hidden states of every layer" in str(hidden_only)  # what it reads, not a fixed sentence


def test_regression_card_and_local_backbone(tmp_path):
    model = fitted_model(num_labels=1, problem_type="regression")
    summary = make_fit_summary(model, 3, backbone=str(tmp_path), dataset="my local data")
    summary.update(task="regression", metric="r2")
    model.config.fit_summary = summary
    card = make_model_card(model)
    assert card.data.base_model is None and card.data.datasets is None  # neither is a Hub id
    assert [r.metric_type for r in card.data.eval_results] == ["r_squared"]
    assert "| validation | R² | 0.8700 |" in str(card) and "| Task | regression |" in str(card)


def test_save_pretrained_writes_card_and_plot(model, tmp_path):
    model.save_pretrained(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert is_generated_card(readme) and f"]({PLOT_NAME})" in readme
    assert (tmp_path / PLOT_NAME).read_bytes().startswith(PNG_SIGNATURE)
    # a generated card is rewritten on the next save
    model.config.fit_summary["chosen"]["validation_score"] = 0.91
    model.save_pretrained(tmp_path)
    assert "| validation | Accuracy | 0.9100 |" in (tmp_path / "README.md").read_text()
    model.config.fit_summary["chosen"]["validation_score"] = 0.87


def test_copy_model_card_takes_the_plot_along(model, tmp_path):
    model.save_pretrained(tmp_path / "checkpoint")
    card = copy_model_card(model, tmp_path / "checkpoint", tmp_path / "docs" / "tiny.md")
    text = card.read_text()
    assert "](tiny.png)" in text and is_generated_card(text)
    assert (tmp_path / "docs" / "tiny.png").read_bytes() == (tmp_path / "checkpoint" / PLOT_NAME).read_bytes()
    bare = fitted_model(summary=False)  # no per-layer scores: no plot, no image link
    bare.save_pretrained(tmp_path / "bare")
    assert ".png" not in copy_model_card(bare, tmp_path / "bare", tmp_path / "docs" / "bare.md").read_text()


def test_save_pretrained_keeps_a_user_written_readme(model, tmp_path):
    (tmp_path / "README.md").write_text("# My own card\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My own card\n"
    assert (tmp_path / "model.safetensors").exists()


def test_save_pretrained_skips_card_without_the_package(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "stc_transformers.model_card", None)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists() and (tmp_path / "config.json").exists()
