"""stc_report / explain on tiny random models: contributions add up to the logits, counts match the selection."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import STCModelTester, make_tiny_tokenizer

from stc_transformers.interpret import Explanation, STCReport, describe_exit, explain, kept_counts, stc_report
from stc_transformers.modeling_stc import feature_groups, group_size
from stc_transformers.tokenization import prepare_tokenizer


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXTS = ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10"]


def make_fit_summary(model, layers, *, dataset="rotten_tomatoes", test_metrics=None, backbone="org/tiny-backbone"):
    """A hand-made `fit_summary` in the schema `STCTrainer` writes, consistent with the model's selection;
    `layers` is the backbone's layer count before the early exit."""
    num_features = len(model.feature_names())
    chosen = {"sources": list(model.config.sources), "poolings": list(model.config.poolings), "eta": 0.5,
              "exit_layer": model.config.exit_layer, "layers": "prefix", "strength": 0.01,
              "validation_score": 0.87, "num_features": num_features}
    summary = {
        "task": "single_label_classification", "metric": "accuracy", "chosen": chosen,
        "layer_scores": {"hidden/mean": [0.6 + 0.05 * i for i in range(layers)],
                         "mlp/max": [0.55 + 0.06 * i for i in range(layers)]},
        "base_score": 0.8,
        "candidates_top": [chosen, {**chosen, "eta": 0.9, "validation_score": 0.85, "num_features": 2 * num_features}],
        "num_train": 8000, "num_validation": 1000, "validation": "internal split", "num_layers": layers,
        "seconds": {"extraction": 41.2, "probes": 9.8, "total": 52.0},
        "backbone": backbone, "dataset": dataset,
    }
    if test_metrics is not None:
        summary["test_metrics"] = test_metrics
    return summary


def fitted_model(arch="bert", num_labels=2, eta=0.5, summary=True, num_layers=3, **kwargs):
    """A tiny model sparsified from its random head (exit before the last layer), with a fit summary."""
    tester = STCModelTester(num_layers=num_layers)
    if num_labels > 1 and "id2label" not in kwargs:
        kwargs["id2label"] = {i: f"class_{i}" for i in range(num_labels)}
    model = tester.model(arch, num_labels=num_labels, **kwargs)
    with torch.no_grad():
        model.head.classifier.bias.normal_()  # a non-zero bias, so "logits minus bias" is a real check
    # zero the last layer's weights so the selection leaves it out and the model exits early
    start = 0
    with torch.no_grad():
        for group in feature_groups(model.config, model.source_dims):
            size = group_size(group)
            if group["layer"] == num_layers - 1:
                model.head.classifier.weight[:, start : start + size] = 0
            start += size
    model.sparsify(eta)
    if summary:
        model.config.fit_summary = make_fit_summary(model, num_layers)
    return model


@pytest.fixture(scope="module")
def model():
    return fitted_model()


@pytest.fixture
def tokenizer():
    return make_tiny_tokenizer()


# ------------------------------------------------------------------------------------------------------------------
# Contributions
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("sparse", [True, False])
def test_contributions_sum_to_logits_minus_bias(arch, sparse):
    model = fitted_model(arch) if sparse else STCModelTester().model(arch, num_labels=3)
    with torch.no_grad():
        model.head.classifier.bias.normal_()
        inputs = STCModelTester.inputs()
        logits = model(**inputs).logits
        contributions = model.feature_contributions(**inputs)
    assert contributions.shape == (3, model.config.num_labels, len(model.feature_names()))
    torch.testing.assert_close(contributions.sum(-1), logits - model.head.classifier.bias, rtol=1e-5, atol=1e-6)


def test_explain_matches_model_and_contributions(model, tokenizer):
    explanations = explain(model, tokenizer, TEXTS, top_k=5)
    assert len(explanations) == len(TEXTS) and all(isinstance(e, Explanation) for e in explanations)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        contributions = model.feature_contributions(**batch)
    bias = model.head.classifier.bias.detach()
    names = model.feature_names()
    for row, explanation in enumerate(explanations):
        torch.testing.assert_close(torch.tensor(explanation.logits), logits[row], rtol=1e-5, atol=1e-6)
        assert explanation.prediction == explanation.labels[int(logits[row].argmax())]
        # per-layer sums add up to the total, which is the logits minus the bias
        layer_sum = torch.tensor(list(explanation.layer_contributions.values())).sum(0)
        torch.testing.assert_close(layer_sum, contributions[row].sum(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer_sum + bias, logits[row], rtol=1e-5, atol=1e-6)
        assert sorted(explanation.layer_contributions) == sorted({layer for _, _, layer, _ in names})
        # top neurons: the largest |contribution| to the predicted label, with the model's own values
        frame = explanation.to_frame()
        assert len(frame) == 5 and set(frame["label"]) == {explanation.prediction}
        label = explanation.labels.index(explanation.prediction)
        magnitudes = frame["contribution"].abs().tolist()
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert magnitudes[0] == pytest.approx(float(contributions[row, label].abs().max()), rel=1e-5)
        for record in explanation.top_neurons:
            column = names.index((record["source"], record["pooling"], record["layer"], record["neuron"]))
            assert record["contribution"] == pytest.approx(float(contributions[row, label, column]), rel=1e-5, abs=1e-7)
        assert list(explanation.layers_frame().columns) == explanation.labels


def test_explain_batches_and_model_method_agree(model, tokenizer):
    one_by_one = explain(model, tokenizer, TEXTS, batch_size=1)
    batched = model.explain(tokenizer, TEXTS)
    for a, b in zip(one_by_one, batched):
        assert a.prediction == b.prediction
        torch.testing.assert_close(torch.tensor(a.logits), torch.tensor(b.logits), rtol=1e-4, atol=1e-5)
    assert explain(model, tokenizer, "w1 w2")[0].text == "w1 w2"
    assert model.training is False


def test_explain_pads_decoder_batches_and_restores_train_mode():
    """A decoder's texts of different lengths, explained in one padded batch, get the logits of each text alone."""
    model = fitted_model("llama").train()
    tokenizer = make_tiny_tokenizer(pad=False)
    explanations = explain(model, tokenizer, TEXTS)
    assert len(explanations) == 3 and model.training
    prepared = prepare_tokenizer(tokenizer, model)
    for text, explanation in zip(TEXTS, explanations):
        with torch.no_grad():
            alone = model.eval()(**prepared([text], return_tensors="pt")).logits[0]
        torch.testing.assert_close(torch.as_tensor(explanation.logits), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("problem_type,num_labels", [("multi_label_classification", 3), ("regression", 1)])
def test_explain_multi_label_and_regression(tokenizer, problem_type, num_labels):
    model = fitted_model(num_labels=num_labels, problem_type=problem_type)
    explanation = explain(model, tokenizer, TEXTS[:1], top_k=3)[0]
    logits = torch.tensor(explanation.logits)
    if problem_type == "regression":
        assert explanation.prediction == pytest.approx(explanation.logits[0])
        assert len(explanation.top_neurons) == 3
    else:
        expected = [explanation.labels[i] for i in (logits > 0).nonzero().flatten().tolist()]
        assert explanation.prediction == expected
        explained = expected or [explanation.labels[int(logits.argmax())]]  # none predicted: the likeliest
        assert set(explanation.to_frame()["label"]) == set(explained)
        assert len(explanation.top_neurons) == 3 * len(explained)
        with torch.no_grad():
            model.head.classifier.bias.fill_(-50.0)  # every logit negative: no label is predicted
        explanation = explain(model, tokenizer, TEXTS[:1], top_k=3)[0]
        assert max(explanation.logits) < 0 and explanation.prediction == []
        assert len(explanation.top_neurons) == 3


def test_explain_reads_long_texts_whole_when_the_model_chunks_them(tokenizer):
    """With `long_input_chunks`, explain sees the whole text, as the model and `pipeline` do."""
    model = fitted_model()
    model.config.long_input_chunks, model.config.chunk_overlap = True, 4
    model._window = 16
    text = " ".join(f"w{i % 90 + 3}" for i in range(70))  # past both the window and the tokenizer's 64
    explanation = explain(model, tokenizer, [text])[0]
    expected = model(**tokenizer([text], return_tensors="pt")).logits[0]
    assert explanation.logits == pytest.approx(expected.tolist(), abs=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------


def test_report_counts_match_the_selection(model):
    report = model.stc_report()
    assert isinstance(report, STCReport)
    expected = {}
    for group in model.config.selection:
        expected[(group["source"], group["pooling"], group["layer"])] = len(group["neurons"])
    frame = report.layers_frame()
    for row in frame.itertuples():
        assert row.kept == expected.get((row.source, row.pooling, row.layer), 0)
        assert row.total == model.source_dims[row.source]
    assert frame["kept"].sum() == report.num_features == sum(expected.values())
    assert report.exit_layer == model.config.exit_layer == 1
    assert report.num_layers == 3 and (frame[frame.layer == 2]["kept"] == 0).all()
    assert report.num_candidates == 2 * 2 * (32 + 37)  # poolings x layers 0..1 x (hidden + mlp)
    assert len(report.layer(0)) == len(report.kept)


def test_report_reads_the_fit_summary(model):
    report = stc_report(model)
    assert report.metric == "accuracy" and report.eta == 0.5 and report.base_score == 0.8
    assert report.layer_scores[("hidden", "mean")] == pytest.approx([0.6, 0.65, 0.7])
    frame = report.layers_frame()
    scores = frame[(frame.source == "mlp") & (frame.pooling == "max")]["validation_score"].tolist()
    assert scores == pytest.approx([0.55, 0.61, 0.67])
    text = report.summary()
    assert "it stops the backbone after layer 1 of 0-2 (early exit)" in text
    assert "0.8700" in text and "Base probe 0.8000" in text and "org/tiny-backbone" in text


def test_report_top_neurons_are_the_heaviest_weights(model):
    frame = stc_report(model).top_neurons_frame(k=4)
    assert len(frame) == 4 * model.config.num_labels
    names = model.feature_names()
    weight = model.head.classifier.weight.detach()
    for label_id, label in enumerate(["class_0", "class_1"]):
        rows = frame[frame.label == label]
        assert rows["rank"].tolist() == [1, 2, 3, 4]
        heaviest = weight[label_id].abs().sort(descending=True).values[:4]
        assert rows["weight"].abs().tolist() == pytest.approx(heaviest.tolist())
        for row in rows.itertuples():
            column = names.index((row.source, row.pooling, row.layer, row.neuron))
            assert row.weight == pytest.approx(float(weight[label_id, column]))


def test_plots_are_png(model, tmp_path):
    report = stc_report(model)
    for path in (report.plot_layer_scores(tmp_path / "scores.png"), report.plot_kept_neurons(tmp_path / "a/kept.png")):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000


def test_report_without_fit_summary(tmp_path):
    """A model sparsified by hand (no fit summary) still reports the backbone's depth before the early exit,
    also after a save/load round trip, and the card says the same."""
    from stc_transformers.model_card import make_model_card

    model = fitted_model(summary=False, num_layers=4)
    model.save_pretrained(tmp_path / "saved")
    for current in (model, type(model).from_pretrained(tmp_path / "saved")):
        report = stc_report(current)
        assert report.num_layers == 4 and report.exit_layer == 2
        assert "of 4" in report.summary()
        card = str(make_model_card(current))
        assert "stops the backbone after layer 2 of 0-3 (early exit)" in card
        assert f"reads {report.num_features} of {report.num_candidates} neurons" in card
    model = fitted_model(summary=False)
    report = stc_report(model)
    assert report.layer_scores == {} and report.validation_score is None
    assert "neurons kept" in report.summary()
    report.plot_kept_neurons(tmp_path / "kept.png")
    with pytest.raises(ValueError, match="No per-layer validation scores.*STCTrainer"):
        report.plot_layer_scores(tmp_path / "scores.png")


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def test_never_fitted_model(tokenizer):
    model = STCModelTester().model("bert")
    for call in (lambda: stc_report(model), lambda: model.stc_report(),
                 lambda: explain(model, tokenizer, TEXTS), lambda: model.explain(tokenizer, TEXTS)):
        with pytest.raises(ValueError, match=r"never fitted.*STCTrainer\(\.\.\.\)\.train\(\).*sparsify"):
            call()


def test_bad_arguments(model, tokenizer):
    report = stc_report(model)
    with pytest.raises(ValueError, match=r"Layer 99 does not exist.*layers 0\.\.2"):
        report.layer(99)
    with pytest.raises(ValueError, match="k.*>= 1"):
        report.top_neurons_frame(k=0)
    with pytest.raises(ValueError, match="No texts given"):
        explain(model, tokenizer, [])
    with pytest.raises(ValueError, match="Text 1 is empty"):
        explain(model, tokenizer, ["w1", " "])
    with pytest.raises(ValueError, match="top_k"):
        explain(model, tokenizer, TEXTS, top_k=0)
    for size in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            explain(model, tokenizer, TEXTS, batch_size=size)


def test_model_methods_need_the_package(model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "stc_transformers.interpret", None)
    with pytest.raises(ImportError, match="pip install stc-transformers"):
        model.stc_report()
    with pytest.raises(ImportError, match="pip install stc-transformers"):
        model.explain(tokenizer, TEXTS)


def test_an_exit_layer_read_only_through_its_mlp_neurons_is_an_exit_at_its_mlp(model):
    """The config, the report and its phrase say where the backbone stops: after the exit layer, or inside it at
    its MLP down-projection when the selection reads only MLP neurons there."""
    assert model.config.exit_at == "block" and stc_report(model).exit_at == "block"
    config = copy.deepcopy(model.config)
    config.selection = [group for group in config.selection if group["layer"] < 1 or group["source"] == "mlp"]
    assert config.exit_layer == 1 and config.exit_at == "mlp"
    assert describe_exit(1, "mlp", 3) == "stops the backbone in layer 1 of 0-2, at its MLP down-projection (early exit)"
    assert describe_exit(2, "block", 3) == "runs all 3 layers of the backbone"
    assert describe_exit(1, "block", 3) == "stops the backbone after layer 1 of 0-2 (early exit)"


def test_kept_counts_follow_the_configs_order_of_sources_and_poolings():
    """The search lists a layer's MLP neurons first; tables and plots keep the config's order."""
    model = STCModelTester(num_layers=3).model("bert", num_labels=2)
    selection = [{"source": "mlp", "pooling": "max", "layer": 0, "neurons": [1, 2]},
                 {"source": "hidden", "pooling": "max", "layer": 0, "neurons": [0]},
                 {"source": "mlp", "pooling": "mean", "layer": 1, "neurons": [3]},
                 {"source": "hidden", "pooling": "mean", "layer": 1, "neurons": [4, 5]}]
    model.set_selection(selection, torch.randn(2, 6), torch.zeros(2), truncate=False)
    order = [(s, p) for s in model.config.sources for p in model.config.poolings]
    keys = list(kept_counts(model))
    assert sorted(keys, key=lambda key: (order.index(key[:2]), key[2])) == keys
    assert kept_counts(model)[("hidden", "mean", 1)] == 2 and kept_counts(model)[("mlp", "max", 0)] == 2
