"""The fast fit (STCTrainer) on tiny random backbones with synthetic, learnable data."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import STCModelTester, make_tiny_tokenizer
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from tokenizers.processors import TemplateProcessing
from transformers import AutoModel, AutoModelForSequenceClassification, pipeline

from stc_transformers import STCForSequenceClassification
from stc_transformers.extraction import extract_features
from stc_transformers.trainer import LabelEncoder, STCTrainer, STCTrainingArguments


def synthetic_texts(n, num_classes=2, seed=0, length=(3, 10)):
    """Texts of tokens w0..w95 where class c draws most tokens from its own range: learnable from pooled states."""
    rng = np.random.default_rng(seed)
    width = 96 // num_classes
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(num_classes))
        size = int(rng.integers(*length))
        own = rng.integers(label * width, (label + 1) * width, size=size)
        noise = rng.integers(0, 96, size=size)
        words = np.where(rng.random(size) < 0.7, own, noise)
        texts.append(" ".join(f"w{w}" for w in words))
        labels.append(label)
    return texts, labels


def small_args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), progress=False, max_length=32, batch_size=16,
                    etas=(0.5, 0.9), strength_ratios=(0.1, 0.01), final_strengths=(1e-3, 1e-1), max_iter=100)
    return STCTrainingArguments(**{**defaults, **kwargs})


def test_training_arguments_reach_the_search_settings():
    """Every search setting of `STCTrainingArguments` (all but the fields the trainer itself reads) is the one the
    search gets, so a non-default value is never dropped on the way."""
    import dataclasses

    from stc_transformers.selection import SearchSettings

    own = {"output_dir", "text_column", "text_pair_column", "label_column", "max_length", "batch_size", "cache_dir",
           "validation_fraction", "device"}
    changed = {"etas": (0.7,), "strength_ratios": (0.4,), "final_strengths": (3.0,), "search_samples": 123,
               "max_iter": 7, "tol": 0.5, "families": "all", "finalists": 2, "early_exit_tolerance": 0.05,
               "min_relative_spread": 0.05, "cv_folds": 3, "cv_below": 9, "bf16_probes": False, "seed": 5,
               "progress": False}
    fields = {field.name for field in dataclasses.fields(STCTrainingArguments)}
    assert fields - own == set(changed)
    settings = STCTrainingArguments(**changed).search_settings("cpu")
    assert {name: getattr(settings, name) for name in changed} == changed
    assert set(changed) <= {field.name for field in dataclasses.fields(SearchSettings)}


def make_trainer(tmp_path, arch="bert", num_classes=2, n=160, seed=0, **kwargs):
    texts, labels = synthetic_texts(n, num_classes, seed)
    names = [f"class_{i}" for i in range(num_classes)]
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    data = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    split = data.train_test_split(test_size=0.25, seed=0)
    model = STCModelTester().model(arch)
    tokenizer = make_tiny_tokenizer(pad=arch not in ("gpt2", "llama"))
    trainer = STCTrainer(model, small_args(tmp_path, **kwargs), train_dataset=split["train"],
                         eval_dataset=split["test"], processing_class=tokenizer)
    return trainer, split


@pytest.mark.parametrize("arch", ["bert", "llama", "albert"])  # ALBERT: one block runs every layer
def test_fit_beats_chance_and_inference_matches_the_fit(tmp_path, arch):
    trainer, split = make_trainer(tmp_path, arch)
    result = trainer.train()
    model = trainer.model
    assert model.config.selection is not None
    assert result.metric == "accuracy" and result.validation_score >= 0.7
    assert result.validation_score >= result.base_score
    assert model.config.id2label == {0: "class_0", 1: "class_1"}
    assert model.config.problem_type == "single_label_classification"
    # every candidate has a validation score; the chosen one is a candidate within the noise of the best
    assert result.candidates and all("validation_score" in c for c in result.candidates)
    chosen = result.chosen
    pooled = chosen.get("cross_validated_score", chosen["validation_score"])  # scored as the candidates are
    same = ("sources", "poolings", "eta", "exit_layer", "exit_at", "layers", "strength", "num_features")
    assert any(all(c[k] == chosen[k] for k in same) and c["validation_score"] == pooled for c in result.candidates)
    top = max(c["validation_score"] for c in result.candidates)
    rows = len(split["test"]) + len(split["train"])  # validation rows and the folds' held-out rows
    assert pooled >= top - math.sqrt(top * (1 - top) / rows) - trainer.args.early_exit_tolerance
    assert (tmp_path / "out" / "candidates.csv").exists()
    # the model's own forward on raw texts gives the fit's validation outputs
    predictions = trainer.predict(split["test"]).predictions
    np.testing.assert_allclose(predictions, trainer._validation_outputs.numpy(), atol=1e-4)
    assert trainer.evaluate()["eval_accuracy"] == pytest.approx(result.validation_score, abs=1e-6)
    # the backbone exits at the chosen layer (ALBERT keeps its one block and stops the pass there), and at its MLP
    # down-projection when the chosen candidate reads only MLP neurons there
    assert model.layer_map.num_layers == (3 if model.layer_map.shared else result.chosen["exit_layer"] + 1)
    assert model.config.exit_at == result.chosen["exit_at"]
    summary = model.config.fit_summary
    assert summary["chosen"] == result.chosen and summary["num_layers"] == 3
    assert set(summary["layer_scores"]) == {f"{s}/{p}" for s in ("hidden", "mlp") for p in model.config.poolings}


def test_subsampled_search_refits_its_finalists_on_every_row(tmp_path):
    trainer, _ = make_trainer(tmp_path, n=240, search_samples=60, finalists=2, cv_folds=0)  # see the CV test
    result = trainer.train()
    finalists = [c for c in result.candidates if c["all_rows_validation_score"] is not None]
    assert len(finalists) == 2 and len({(tuple(c["sources"]), c["eta"]) for c in finalists}) == 2
    # among the finalists within the validation noise of the best all-rows score, the lowest all-rows loss wins
    top = max(c["all_rows_validation_score"] for c in finalists)
    noise = math.sqrt(top * (1 - top) / len(trainer.eval_dataset))
    close = [c for c in finalists if c["all_rows_validation_score"] >= top - noise]
    best = min(close, key=lambda c: (c["all_rows_validation_loss"], c["num_features"]))
    assert [result.chosen[k] for k in ("sources", "poolings", "eta")] == [best[k] for k in ("sources", "poolings", "eta")]
    # without subsampling the sample fits are the final fits: no second round
    trainer, _ = make_trainer(tmp_path / "full", n=240, finalists=2)
    assert all(c["all_rows_validation_score"] is None for c in trainer.train().candidates)


def test_saved_fit_works_in_pipeline(tmp_path):
    trainer, split = make_trainer(tmp_path)
    trainer.train()
    # evaluate() records its metrics in the config (a later call with the same prefix replaces them): the saved
    # config and the model card report them
    first = trainer.evaluate(split["train"], metric_key_prefix="test")
    assert trainer.model.config.fit_summary["evaluation"] == first
    trainer.model.config.fit_summary["evaluation"]["test_stale"] = 0.5  # dropped by the next "test" call
    test = trainer.evaluate(split["test"].select(range(20)), metric_key_prefix="test")
    validation = trainer.evaluate()
    assert trainer.model.config.fit_summary["evaluation"] == {**test, **validation}
    path = trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["fit_summary"]
    assert saved["evaluation"] == pytest.approx({**test, **validation})
    card = (tmp_path / "saved" / "README.md").read_text()
    assert f"| test | Accuracy | {test['test_accuracy']:.4f} |" in card
    assert card.count("| validation | Accuracy |") == 1  # the fit's own validation score, not repeated
    classifier = pipeline("text-classification", model=path)
    texts = split["test"]["text"][:8]
    labels = [d["label"] for d in classifier(texts)]
    expected = trainer.predict(texts).predictions.argmax(-1)
    assert labels == [f"class_{i}" for i in expected]
    loaded = AutoModelForSequenceClassification.from_pretrained(path)
    assert loaded.config.selection == trainer.model.config.selection
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["fit_summary"]["chosen"]


def test_multi_class(tmp_path):
    trainer, _ = make_trainer(tmp_path, num_classes=4, n=240)
    result = trainer.train()
    assert trainer.model.config.num_labels == 4
    assert trainer.model.head.classifier.weight.shape[0] == 4
    assert result.validation_score > 0.5


def test_multi_label_from_label_lists(tmp_path):
    texts, labels = synthetic_texts(200, 3, seed=1)
    rng = np.random.default_rng(0)
    label_lists = [[y] + ([int(rng.integers(3))] if rng.random() < 0.3 else []) for y in labels]
    data = Dataset.from_dict({"text": texts, "tags": [sorted(set(x)) for x in label_lists]},
                             features=Features({"text": Value("string"),
                                                "tags": Sequence(ClassLabel(names=["a", "b", "c"]))}))
    split = data.train_test_split(test_size=0.25, seed=0)
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path, label_column="tags"),
                         train_dataset=split["train"], eval_dataset=split["test"],
                         processing_class=make_tiny_tokenizer())
    result = trainer.train()
    assert trainer.model.config.problem_type == "multi_label_classification"
    assert trainer.model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert result.metric == "micro_f1" and result.validation_score > 0.5
    metrics = trainer.evaluate()
    assert {"eval_micro_f1", "eval_macro_f1", "eval_subset_accuracy"} <= set(metrics)


def test_regression(tmp_path):
    texts, labels = synthetic_texts(200, 2, seed=2)
    targets = [float(y) * 2 - 1 + 0.1 * (len(t.split()) - 6) for t, y in zip(texts, labels)]
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path),
                         train_dataset=Dataset.from_dict({"text": texts, "label": targets}),
                         processing_class=make_tiny_tokenizer())
    result = trainer.train()
    assert trainer.model.config.problem_type == "regression" and trainer.model.config.num_labels == 1
    assert result.metric == "r2" and result.validation_score > 0.3
    assert trainer.model.config.fit_summary["validation"] == "internal split + 5-fold cross-validation"


def test_regression_does_not_depend_on_the_targets_offset_or_units(tmp_path):
    """Targets shifted by 1e4 or in units of 1e20: the same neurons, the same R^2, predictions in the targets' units
    (the solvers' stopping rule used to stop early on a large bias; 1e20 overflowed float32 squares)."""
    texts, labels = synthetic_texts(200, 2, seed=2)
    base = np.array([float(y) * 2 - 1 + 0.1 * (len(t.split()) - 6) for t, y in zip(texts, labels)])
    fits = []
    for shift, unit in ((0.0, 1.0), (1e4, 1.0), (0.0, 1e20)):
        targets = (base * unit + shift).tolist()
        trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path / f"{shift}-{unit}", cv_folds=0),
                             train_dataset=(texts[:150], targets[:150]), eval_dataset=(texts[150:], targets[150:]),
                             processing_class=make_tiny_tokenizer())
        result = trainer.train()
        predictions = (trainer.predict(texts[150:]).predictions[:, 0] - shift) / unit
        fits.append((trainer.model.config.selection, result.validation_score, predictions))
    assert fits[0][1] > 0.3
    for selection, score, predictions in fits[1:]:
        assert selection == fits[0][0] and score == pytest.approx(fits[0][1], abs=1e-3)
        np.testing.assert_allclose(predictions, fits[0][2], atol=1e-2)


def test_a_cross_validation_fold_without_signal_is_skipped(tmp_path):
    """One non-zero training target: the fold holding it out has constant targets and keeps no neuron, and the
    other folds' held-out targets are constant."""
    texts, labels = synthetic_texts(120, 2, seed=2)
    targets = [0.0] * 30
    targets[3] = 3.0
    validation = [float(y) for y in labels[30:]]
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path, cv_below=1000),
                         train_dataset=(texts[:30], targets), eval_dataset=(texts[30:], validation),
                         processing_class=make_tiny_tokenizer())
    assert trainer.train().metric == "r2"
    # folds whose held-out targets are all 0 have no R^2: they count for nothing (they scored -1e38 and swamped it)
    assert trainer.model.config.fit_summary["chosen"]["cross_validated_score"] > -1e6


def test_integer_labels_are_refused_where_classes_are_named_by_numbers(tmp_path):
    """Classes named '1', '2', '3' (string labels): an integer 1 in evaluation data could be the class named '1' or
    id 1 (named '2'); it used to be read as the id, silently. Ids are fine where the training labels were ids."""
    texts, labels = synthetic_texts(120, 3, seed=4)
    names = [str(y + 1) for y in labels]
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path / "named", cv_folds=0),
                         train_dataset=(texts[:90], names[:90]), eval_dataset=(texts[90:], names[90:]),
                         processing_class=make_tiny_tokenizer())
    trainer.train()
    by_name = trainer.evaluate((texts[90:], names[90:]))["eval_accuracy"]
    with pytest.raises(ValueError, match="could be the class named '.' or the class with id"):
        trainer.evaluate((texts[90:], [int(name) for name in names[90:]]))
    with pytest.raises(ValueError, match="could be the class named"):  # a reloaded model does not know: refused too
        LabelEncoder.for_model(trainer.model, [1, 2]).encode([1, 2])
    numbered = ClassLabel(names=["1", "2", "3"])  # a ClassLabel column says they are ids
    np.testing.assert_array_equal(LabelEncoder.for_model(trainer.model, [0, 2]).encode([0, 2], numbered), [0, 2])
    assert by_name > 0.5
    ids = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path / "ids", cv_folds=0),
                     train_dataset=Dataset.from_dict({"text": texts[:90], "label": labels[:90]},
                                                     features=Features({"text": Value("string"),
                                                                        "label": ClassLabel(names=["1", "2", "3"])})),
                     eval_dataset=(texts[90:], labels[90:]), processing_class=make_tiny_tokenizer())
    ids.train()  # training ids with a ClassLabel: validation ids are ids, also after a reload
    assert ids.evaluate((texts[90:], labels[90:]))["eval_accuracy"] > 0.5
    ids.save_model(tmp_path / "saved")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(LabelEncoder.for_model(reloaded, [0, 2]).encode([0, 2]), [0, 2])
    zero_based = LabelEncoder.fit(["0", "1", "1", "0"])  # names '0', '1': the id is the name
    np.testing.assert_array_equal(zero_based.encode([0, 1]), zero_based.encode(["0", "1"]))


def test_tiny_training_sets_split_or_say_why_not(tmp_path):
    tokenizer = make_tiny_tokenizer()
    four = {"text": ["w1 w2", "w3", "w4 w5 w6", "w7"], "label": [0, 1, 0, 1]}  # one validation text per class
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path / "four"), train_dataset=four,
                         processing_class=tokenizer)
    with pytest.warns(UserWarning, match="holds 2 of 4 training examples"):
        trainer.train()
    assert trainer.model.config.fit_summary["num_validation"] == 2
    pairs = {"text": [f"w{i}" for i in range(12)], "label": [f"class {i // 2}" for i in range(12)]}
    with pytest.warns(UserWarning, match="holds 6 of 12 training examples \\(50%, not 15%\\).*eval_dataset"):
        STCTrainer(STCModelTester().model("bert"), small_args(tmp_path / "pairs"), train_dataset=pairs,
                   processing_class=tokenizer).train()
    singletons = {"text": ["w1", "w2", "w3"], "label": ["a", "b", "c"]}
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path / "one"), train_dataset=singletons,
                         processing_class=tokenizer)
    with pytest.raises(ValueError, match="too few for an internal validation split.*eval_dataset"):
        trainer.train()


@pytest.mark.parametrize("targets,validation,match", [
    ([0.5, 0.5, 0.5, 0.5], None, "targets .*are all equal"),
    ([0.1, 0.5], None, "The 1 validation targets are all equal"),  # R^2 of one row is undefined
    ([0.1, 0.7, 0.2], [0.3, 0.3], "The 2 validation targets are all equal"),
    ([0.1], [0.1, 0.5], "No layer probe kept any neuron"),
])
def test_regression_without_signal(tmp_path, targets, validation, match):
    def rows(values):
        return {"text": [f"w{i} w{i + 1}" for i in range(len(values))], "label": values}

    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path), train_dataset=rows(targets),
                         eval_dataset=None if validation is None else rows(validation),
                         processing_class=make_tiny_tokenizer())
    with pytest.raises(ValueError, match=match):
        trainer.train()


def test_lists_of_texts_and_string_labels_with_internal_split(tmp_path):
    texts, labels = synthetic_texts(120, 2, seed=3)
    names = ["neg" if y == 0 else "pos" for y in labels]
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path), train_dataset=(texts, names),
                         processing_class=make_tiny_tokenizer())
    trainer.train()
    assert trainer.model.config.id2label == {0: "neg", 1: "pos"}
    assert trainer.model.config.fit_summary["num_validation"] == 18  # 15% of each class, rounded


@pytest.mark.parametrize("kind", ["pandas", "dict", "iterable", "iterable_without_features"])
def test_other_containers_give_the_same_fit(tmp_path, kind):
    """A pandas DataFrame, a dict of lists, and streaming `IterableDataset`s (with or without known features) fit
    exactly as the `Dataset` of the same rows."""
    import pandas as pd
    from datasets import IterableDataset

    texts, labels = synthetic_texts(120, 2, seed=3)
    rows = {"text": texts, "label": labels}
    containers = {
        "pandas": lambda: pd.DataFrame(rows),
        "dict": lambda: rows,
        "iterable": lambda: Dataset.from_dict(rows).to_iterable_dataset(),
        "iterable_without_features": lambda: IterableDataset.from_generator(
            lambda: ({"text": t, "label": y} for t, y in zip(texts, labels))),
    }
    fits = []
    for name, data in (("dataset", Dataset.from_dict(rows)), (kind, containers[kind]())):
        trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path / name), train_dataset=data,
                             processing_class=make_tiny_tokenizer())
        trainer.train()
        fits.append((trainer.model.config.selection, trainer.predict(texts[:20]).predictions))
    assert fits[0][0] == fits[1][0]
    np.testing.assert_array_equal(fits[0][1], fits[1][1])


def test_a_dataset_dict_asks_for_one_split(tmp_path):
    from datasets import DatasetDict

    data = DatasetDict({"train": Dataset.from_dict({"text": ["w1", "w2"], "label": [0, 1]})})
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]: pass one split"):
        STCTrainer(STCModelTester().model("bert"), small_args(tmp_path), train_dataset=data,
                   processing_class=make_tiny_tokenizer()).train()


def test_same_seed_same_selection_and_predictions(tmp_path):
    runs = []
    for i in range(2):
        trainer, split = make_trainer(tmp_path / str(i))
        trainer.train()
        runs.append((trainer.model.config.selection, trainer.predict(split["test"]).predictions))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_sentence_pairs(tmp_path):
    """NLI/paraphrase-style data: the label lives in the second text only, so the fit must read the pairs; the
    saved model gives the same outputs through `pipeline` ({"text", "text_pair"} inputs) and `explain`."""
    from stc_transformers.interpret import explain

    seconds, labels = synthetic_texts(400, 2, seed=5)
    firsts, _ = synthetic_texts(400, 2, seed=6)  # classes unrelated to the labels
    data = Dataset.from_dict({"premise": firsts, "hypothesis": seconds, "label": labels})
    split = data.train_test_split(test_size=0.25, seed=0)
    args = small_args(tmp_path, text_column="premise", text_pair_column="hypothesis")
    tokenizer = make_tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(  # BERT-like: a separator, token type ids
        single="$A", pair="$A <s> $B:1", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))])
    trainer = STCTrainer(STCModelTester().model("bert"), args, train_dataset=split["train"],
                         eval_dataset=split["test"], processing_class=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tokenizer with a pair template gets no warning
        result = trainer.train()
    # 0.72 measured; chance is 0.5 (the first texts carry no signal), and on 100 rows 0.66 is 3 standard errors above
    assert result.validation_score >= 0.66
    pairs = list(zip(split["test"]["premise"], split["test"]["hypothesis"]))
    predictions = trainer.predict(split["test"]).predictions
    shuffled = list(zip(split["test"]["premise"], np.roll(list(split["test"]["hypothesis"]), 1)))
    assert np.abs(trainer.predict(shuffled).predictions - predictions).max() > 0.1  # the second texts are read
    np.testing.assert_allclose(predictions, trainer._validation_outputs.numpy(), atol=1e-4)
    np.testing.assert_allclose(trainer.predict(pairs).predictions, predictions, atol=1e-5)
    path = trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert 'classifier({"text": "A man is playing a guitar.", "text_pair": "Someone is making music."})' in card
    classifier = pipeline("text-classification", model=path)
    piped = classifier([{"text": a, "text_pair": b} for a, b in pairs[:8]], top_k=None)
    for output, row in zip(piped, predictions[:8]):
        scores = {o["label"]: o["score"] for o in output}
        np.testing.assert_allclose([scores["0"], scores["1"]] if "0" in scores else
                                   [scores["LABEL_0"], scores["LABEL_1"]], torch.softmax(torch.tensor(row), -1),
                                   atol=1e-5)
    explained = explain(trainer.model, trainer.tokenizer, pairs[:2] + [{"text": pairs[2][0], "text_pair": pairs[2][1]}])
    assert [e.text for e in explained] == pairs[:3]
    np.testing.assert_allclose([e.logits for e in explained], predictions[:3], atol=1e-5)
    with pytest.raises(ValueError, match="training data are \\(text, text_pair\\) pairs but the given data are single"):
        trainer.predict(list(split["test"]["premise"]))
    # without a pair template (most decoder LLMs) the two texts are glued together: the fit says so
    untemplated = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path / "untemplated"),
                             train_dataset=(pairs[:40], split["test"]["label"][:40]), processing_class=make_tiny_tokenizer())
    with pytest.warns(UserWarning, match="no template for text pairs"):
        untemplated.train()


@pytest.mark.parametrize("texts,match", [
    ([("w1", "w2"), "w3"], "Text 1 is a str but text 0 is a tuple"),
    (["w1", ["w2", "w3"]], "Text 1 is a list but text 0 is a str"),
    ([("w1", "w2", "w3")], "Text 0 is a tuple of 3 items"),
    ([("w1", "w2"), ("w3", " ")], "Text 1 is empty"),
    ([("w1", None)], "Text 0 is a NoneType"),
])
def test_bad_text_pairs(tmp_path, texts, match):
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path),
                         train_dataset=(texts, [0, 1][: len(texts)]), processing_class=make_tiny_tokenizer())
    with pytest.raises(ValueError, match=match):
        trainer.train()


@pytest.mark.filterwarnings("ignore:The tokenizer has no template")
def test_pairs_and_single_texts_are_not_mixed(tmp_path):
    pairs = [("w1 w2", "w3"), ("w4", "w5 w6")] * 10
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path), train_dataset=(pairs, [0, 1] * 10),
                         eval_dataset=(["w1", "w4"], [0, 1]), processing_class=make_tiny_tokenizer())
    with pytest.raises(ValueError, match="training data are \\(text, text_pair\\) pairs but the validation data"):
        trainer.train()


def test_text_pair_column_missing(tmp_path):
    with pytest.raises(ValueError, match="Text column 'hypothesis' not found.*Set `text_pair_column=`"):
        trainer_for(tmp_path, ["w1"] * 4, [0, 1, 0, 1], text_pair_column="hypothesis").train()


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def trainer_for(tmp_path, texts, labels, **kwargs):
    return STCTrainer(STCModelTester().model("bert"), small_args(tmp_path, **kwargs),
                      train_dataset=Dataset.from_dict({"text": texts, "label": labels}),
                      processing_class=make_tiny_tokenizer())


def test_fewer_than_two_classes(tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        trainer_for(tmp_path, ["w1 w2"] * 10, [0] * 10).train()


def test_label_column_missing(tmp_path):
    with pytest.raises(ValueError, match="Label column 'stars' not found.*columns \\['text', 'label'\\]"):
        trainer_for(tmp_path, ["w1"] * 4, [0, 1, 0, 1], label_column="stars").train()


def test_unknown_labels_in_validation(tmp_path):
    texts, labels = synthetic_texts(40, 2)
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path),
                         train_dataset=Dataset.from_dict({"text": texts, "label": [str(y) for y in labels]}),
                         eval_dataset=Dataset.from_dict({"text": texts[:4], "label": ["0", "1", "2", "1"]}),
                         processing_class=make_tiny_tokenizer())
    with pytest.raises(ValueError, match="Unknown label '2'"):
        trainer.train()


def test_validation_class_never_seen_in_training(tmp_path):
    texts, labels = synthetic_texts(40, 2)
    names = ClassLabel(names=["a", "b", "c"])
    features = Features({"text": Value("string"), "label": names})
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path),
                         train_dataset=Dataset.from_dict({"text": texts, "label": labels}, features=features),
                         processing_class=make_tiny_tokenizer())
    with pytest.raises(ValueError, match=r"Classes \['c'\] have no training examples"):
        trainer.train()


def test_integer_labels_with_gaps_point_to_class_encoding(tmp_path):
    texts, labels = synthetic_texts(40, 2)
    stars = [1 + 4 * y for y in labels]  # values 1 and 5, not class ids
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path),
                         train_dataset=Dataset.from_dict({"text": texts, "label": stars}),
                         processing_class=make_tiny_tokenizer())
    with pytest.raises(ValueError, match=r"ids \[0, 2, 3, 4\] have no training examples.*class_encode_column"):
        trainer.train()
    encoded = Dataset.from_dict({"text": texts, "label": stars}).class_encode_column("label")
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path / "encoded"), train_dataset=encoded,
                         processing_class=make_tiny_tokenizer())
    trainer.train()
    assert trainer.model.config.id2label == {0: "1", 1: "5"}


def test_boolean_labels_are_named(tmp_path):
    texts, labels = synthetic_texts(60, 2)
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path),
                         train_dataset=(texts, [bool(y) for y in labels]), processing_class=make_tiny_tokenizer())
    trainer.train()
    assert trainer.model.config.id2label == {0: "False", 1: "True"}


def test_negative_label_ids_point_to_unlabelled_rows(tmp_path):
    texts, labels = synthetic_texts(60, 2)
    with pytest.raises(ValueError, match=r"Label id -1 is negative.*unlabelled.*dataset.filter"):
        trainer_for(tmp_path, texts, [y - 1 for y in labels]).train()
    trainer = trainer_for(tmp_path / "fit", texts, labels)
    trainer.train()
    with pytest.raises(ValueError, match=r"Label id -1 is negative"):  # a test split without labels (GLUE style)
        trainer.evaluate(Dataset.from_dict({"text": texts[:4], "label": [-1] * 4}))


@pytest.mark.parametrize("bad,match", [("", "Text 2 is empty"), ("   ", "Text 2 is empty"), (None, "Text 2 is a NoneType"),
                                       ("\u200b\ufeff\x07", "Text 2 is empty or only whitespace, control or zero-width")])
def test_empty_or_non_string_texts(tmp_path, bad, match):
    texts = ["w1 w2", "w3", bad, "w4"]
    with pytest.raises(ValueError, match=match):
        trainer_for(tmp_path, texts, [0, 1, 0, 1]).train()


def test_missing_labels(tmp_path):
    with pytest.raises(ValueError, match="missing values"):
        trainer_for(tmp_path, ["w1", "w2", "w3"], [0, None, 1]).train()


def test_non_finite_features_are_refused(tmp_path):
    model = STCModelTester().model("bert")
    with torch.no_grad():
        model.backbone.embeddings.word_embeddings.weight[5] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf.*float32 or bfloat16"):
        extract_features(model, make_tiny_tokenizer(), ["w2 w3", "w4"], tmp_path, progress=False)


def test_predict_before_fit(tmp_path):
    trainer, split = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="not fitted yet"):
        trainer.predict(split["test"])


# ------------------------------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------------------------------


def crash_in_batch(monkeypatch, model, batch: int):
    """Make the model's `pooled_features` raise KeyboardInterrupt on its `batch`-th call (counting from 1); returns
    (the original method, the crashing one, its call counter)."""
    original = type(model).pooled_features
    calls = {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == batch:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "pooled_features", crashing)
    return original, crashing, calls


def test_interrupted_extraction_resumes_to_identical_cache(tmp_path, monkeypatch):
    model = STCModelTester().model("llama")
    tokenizer = make_tiny_tokenizer()
    texts, _ = synthetic_texts(50)
    reference = extract_features(model, tokenizer, texts, tmp_path / "ref", batch_size=4, progress=False)

    original, crashing, calls = crash_in_batch(monkeypatch, model, 7)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, tokenizer, texts, tmp_path / "run", batch_size=4, commit_every=2, progress=False)
    meta = json.loads(next((tmp_path / "run").glob("*/meta.json")).read_text())
    assert meta["batches_done"] == 6 and meta["num_batches"] == 13  # committed every 2 batches, crash in the 7th
    monkeypatch.setattr(type(model), "pooled_features", original)
    resumed = extract_features(model, tokenizer, texts, tmp_path / "run", batch_size=4, progress=False)
    assert resumed.complete
    for block in reference.blocks:
        np.testing.assert_array_equal(resumed.array(*block), reference.array(*block))
    # a finished cache is reused without running the backbone
    monkeypatch.setattr(type(model), "pooled_features", crashing)
    calls["n"] = 6
    assert extract_features(model, tokenizer, texts, tmp_path / "run", batch_size=4, progress=False).complete


def test_extraction_commits_by_time_by_default(tmp_path, monkeypatch):
    from stc_transformers import extraction

    model = STCModelTester().model("bert")
    texts, _ = synthetic_texts(20)
    crash_in_batch(monkeypatch, model, 4)
    monkeypatch.setattr(extraction, "COMMIT_SECONDS", 0.0)  # every batch is due
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, make_tiny_tokenizer(), texts, tmp_path, batch_size=4, progress=False)
    meta = json.loads(next(tmp_path.glob("*/meta.json")).read_text())
    assert meta["batches_done"] == 3


def test_a_failed_commit_stops_the_pass_and_the_cache_resumes(tmp_path, monkeypatch):
    """A commit's error (e.g. a full disk) stops the pass, the progress stays at the last commit that finished, and
    the pass resumes from there to the same cache."""
    from stc_transformers import extraction

    model = STCModelTester().model("bert")
    tokenizer, (texts, _) = make_tiny_tokenizer(), synthetic_texts(20)
    reference = extract_features(model, tokenizer, texts, tmp_path / "ref", batch_size=4, progress=False)
    commit = extraction._commit

    def failing(cache, arrays, batches_done, seconds, durable):
        if batches_done == 3:
            raise OSError(28, "No space left on device")
        commit(cache, arrays, batches_done, seconds, durable)

    monkeypatch.setattr(extraction, "COMMIT_SECONDS", 0.0)  # every batch is due
    monkeypatch.setattr(extraction, "_commit", failing)
    with pytest.raises(OSError, match="No space left"):
        extract_features(model, tokenizer, texts, tmp_path / "run", batch_size=4, progress=False)
    assert json.loads(next((tmp_path / "run").glob("*/meta.json")).read_text())["batches_done"] == 2
    monkeypatch.setattr(extraction, "_commit", commit)
    resumed = extract_features(model, tokenizer, texts, tmp_path / "run", batch_size=4, progress=False)
    assert resumed.complete
    for block in reference.blocks:
        np.testing.assert_array_equal(resumed.array(*block), reference.array(*block))


def test_commits_force_rows_to_disk_only_now_and_then_and_a_reboot_resumes_from_the_last_forced(tmp_path,
                                                                                                monkeypatch):
    """Commits record rows in the page cache, which a crashed process does not lose; every DURABLE_SECONDS and at
    the end they are forced to disk first. After a reboot (another boot id) an unfinished pass resumes after the
    last durable commit, and finishes to the same cache."""
    from stc_transformers import extraction

    if extraction.boot_id() is None:
        pytest.skip("the boot id is read on Linux; elsewhere every commit is durable")
    model = STCModelTester().model("bert")
    tokenizer, (texts, _) = make_tiny_tokenizer(), synthetic_texts(40)
    reference = extract_features(model, tokenizer, texts, tmp_path / "ref", batch_size=4, progress=False)
    assert json.loads(next((tmp_path / "ref").glob("*/meta.json")).read_text())["batches_durable"] == 10
    synced, clock = [], {"now": 0.0}
    monkeypatch.setattr(extraction, "_write_to_disk", lambda array: synced.append(array.filename))
    monkeypatch.setattr(extraction.time, "perf_counter", lambda: clock["now"])
    original = type(model).pooled_features

    def slow_then_crash(self, *args, **kwargs):  # each batch takes 100 s; the 8th crashes
        clock["now"] += 100.0
        if clock["now"] >= 800.0:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "pooled_features", slow_then_crash)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, tokenizer, texts, tmp_path / "run", batch_size=4, progress=False)
    meta_file = next((tmp_path / "run").glob("*/meta.json"))
    meta = json.loads(meta_file.read_text())
    # a commit after every batch (10 s apart), forced to disk after the 3rd and the 6th (300 s apart)
    assert (meta["batches_done"], meta["batches_durable"], meta["boot_id"]) == (7, 6, extraction.boot_id())
    assert len(synced) == 2 * len(reference.blocks)
    monkeypatch.setattr(type(model), "pooled_features", original)
    monkeypatch.undo()  # the real clock and disk writes

    meta["boot_id"] = "another boot"
    meta_file.write_text(json.dumps(meta))
    calls = {"n": 0}
    counting = type(model).pooled_features

    def count(self, *args, **kwargs):
        calls["n"] += 1
        return counting(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "pooled_features", count)
    resumed = extract_features(model, tokenizer, texts, tmp_path / "run", batch_size=4, progress=False)
    assert calls["n"] == 4 and resumed.complete  # batches 7-10: the 7th was only in the lost page cache
    assert json.loads(meta_file.read_text())["boot_id"] == extraction.boot_id()
    for block in reference.blocks:
        np.testing.assert_array_equal(resumed.array(*block), reference.array(*block))


def test_every_commit_syncs_where_the_boot_cannot_be_told(tmp_path, monkeypatch):
    from stc_transformers import extraction

    model = STCModelTester().model("bert")
    synced = []
    monkeypatch.setattr(extraction, "boot_id", lambda: None)
    monkeypatch.setattr(extraction, "_write_to_disk", lambda array: synced.append(array.filename))
    cache = extract_features(model, make_tiny_tokenizer(), synthetic_texts(20)[0], tmp_path, batch_size=4,
                             commit_every=1, progress=False)
    assert cache.meta["batches_durable"] == cache.meta["batches_done"] == 5
    assert len(synced) == 5 * len(cache.blocks)


def test_cache_depends_on_weights_dtype_and_tokens(tmp_path):
    """Any change of what the backbone computes or reads makes a new cache: all weights, a few rows of an
    embedding far from its start, a cast to another dtype, another truncation side or max_length, autocast."""
    model = STCModelTester().model("bert")
    tokenizer = make_tiny_tokenizer()
    texts = [" ".join(f"w{i}" for i in range(20)), "w3"]

    def cache(**kwargs):
        arguments = {"max_length": 8, **kwargs}
        return extract_features(model, arguments.pop("tokenizer", tokenizer), texts, tmp_path, progress=False,
                                **arguments).path

    paths = [cache()]
    assert cache() == paths[0]  # the same model and tokens: reused
    threads = torch.get_num_threads()
    try:  # processes of an accelerate run have one thread each: their cache is the same one
        torch.set_num_threads(1)
        assert cache() == paths[0]
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        model.backbone.embeddings.word_embeddings.weight.mul_(1.01)
    paths.append(cache())
    with torch.no_grad():
        model.backbone.embeddings.word_embeddings.weight[90:].mul_(2)  # rows past any fixed-size prefix
    paths.append(cache())
    model.to(torch.bfloat16)
    paths.append(cache())
    model.to(torch.float32)  # bf16 values are exact in float32: only the dtype tells them apart
    paths.append(cache())
    left = make_tiny_tokenizer()
    left.truncation_side = "left"
    paths.append(cache(tokenizer=left))
    paths.append(cache(max_length=9))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the pass runs in the caller's autocast
        paths.append(cache(max_length=9))
    assert len(set(paths)) == len(paths)


def test_a_fit_fingerprints_the_weights_once_for_both_splits(tmp_path, monkeypatch):
    """The weights' fingerprint (2 s on SmolLM2) is computed once per fit, and the fit's caches are the ones a direct
    `extract_features` call computes its own fingerprint for and finds."""
    from stc_transformers import extraction, trainer as trainer_module

    calls = []
    counted = lambda model: calls.append(1) or extraction.model_fingerprint(model)  # noqa: E731
    monkeypatch.setattr(trainer_module, "model_fingerprint", counted)
    trainer, split = make_trainer(tmp_path)
    trainer.train()
    assert len(calls) == 1
    dense = STCModelTester().model("bert")  # the same seed: the weights the fit started from
    for texts in (split["train"]["text"], split["test"]["text"]):
        cache = extract_features(dense, trainer.tokenizer, list(texts), trainer._cache_dir(), max_length=32,
                                 batch_size=16, progress=False)
        assert cache.complete
    assert len(list(trainer._cache_dir().iterdir())) == 2  # both found: no third cache


def test_a_full_disk_gives_an_error_before_any_work(tmp_path, monkeypatch):
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError, match=r"No room for the feature cache in .* GB\): free disk space, or give `cache_dir="):
        extract_features(STCModelTester().model("bert"), make_tiny_tokenizer(), ["w1 w2", "w3"], tmp_path,
                         progress=False)


def test_small_validation_sets_are_joined_by_cross_validation(tmp_path):
    """40 validation rows (< cv_below): every choice is made on them and 5 folds of the training sample together."""
    trainer, _ = make_trainer(tmp_path)
    result = trainer.train()
    assert trainer.model.config.fit_summary["validation"] == "given + 5-fold cross-validation"
    keys = ("sources", "poolings", "eta", "exit_layer", "exit_at", "layers", "strength")
    chosen = {k: result.chosen[k] for k in keys}
    same = [c for c in result.candidates if {k: c[k] for k in chosen} == chosen]
    assert len(same) == 1 and same[0]["validation_score"] == result.chosen["cross_validated_score"]
    assert result.validation_score == pytest.approx(trainer.evaluate()["eval_accuracy"], abs=1e-6)
    plain, _ = make_trainer(tmp_path / "plain", cv_folds=0)
    plain_result = plain.train()
    assert "cross_validated_score" not in plain_result.chosen
    assert plain.model.config.fit_summary["validation"] == "given"


# -- labels and texts as users hand them over ------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [int, float])
def test_multi_label_flags_in_torch_format_fit_and_survive_a_reload(tmp_path, flag):
    """0/1 flag vectors (ints, or floats as BCE wants them) in a torch-formatted dataset are multi-label, also with
    a label on every row; a reloaded model reads them as flags, not as label ids."""
    texts, labels = synthetic_texts(160, 3, seed=1)
    flags = [[flag(y == 0), flag(y == 1), flag(y != 1), flag(1)] for y in labels]  # the last label is always on
    data = Dataset.from_dict({"text": texts, "label": flags}).with_format("torch")
    train, test = data.select(range(120)), data.select(range(120, 160))
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path, cv_folds=0), train_dataset=train,
                         processing_class=make_tiny_tokenizer())
    trainer.train()
    assert trainer.model.config.problem_type == "multi_label_classification"
    assert trainer.model.config.num_labels == 4
    before = trainer.evaluate(test)
    assert before["eval_micro_f1"] > 0.6
    reloaded = AutoModelForSequenceClassification.from_pretrained(trainer.save_model())
    after = STCTrainer(reloaded, small_args(tmp_path), processing_class=make_tiny_tokenizer()).evaluate(test)
    assert after == before


def test_torch_formatted_regression_stays_regression(tmp_path):
    texts, labels = synthetic_texts(120, 2, seed=2)
    targets = [y + 0.1 * len(t.split()) for t, y in zip(texts, labels)]
    data = Dataset.from_dict({"text": texts, "label": targets})
    fits = []
    for dataset in (data, data.with_format("torch")):
        trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path, cv_folds=0), train_dataset=dataset,
                             processing_class=make_tiny_tokenizer())
        trainer.train()
        fits.append((trainer.model.config.problem_type, trainer.predict(texts[:10]).predictions))
    assert fits[0][0] == fits[1][0] == "regression"
    np.testing.assert_array_equal(fits[0][1], fits[1][1])


def test_splits_encoded_separately_are_read_by_class_name(tmp_path):
    """A validation or test split whose ClassLabel numbers the same classes otherwise (e.g. `class_encode_column`
    per split) is scored by name; a class name the model does not know is refused."""
    texts, labels = synthetic_texts(160, 2, seed=0)

    def split(rows, names):
        features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
        named = [("neg", "pos")[labels[i]] for i in rows]
        return Dataset.from_dict({"text": [texts[i] for i in rows], "label": [names.index(n) for n in named]},
                                 features=features)

    train = split(range(100), ["neg", "pos"])
    flipped, same = split(range(100, 160), ["pos", "neg"]), split(range(100, 160), ["neg", "pos"])
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path, cv_folds=0), train_dataset=train,
                         eval_dataset=flipped, processing_class=make_tiny_tokenizer())
    result = trainer.train()
    assert trainer.evaluate(flipped) == trainer.evaluate(same)
    accuracy = trainer.evaluate(same)["eval_accuracy"]
    assert accuracy == pytest.approx(result.validation_score) and accuracy > 0.7
    other = Dataset.from_dict({"text": ["w1"], "label": [2]},
                              features=Features({"text": Value("string"),
                                                 "label": ClassLabel(names=["pos", "neg", "maybe"])}))
    with pytest.raises(ValueError, match="Unknown label 'maybe'"):
        trainer.evaluate(other)


def test_problem_type_and_label_names_set_on_the_config_are_used(tmp_path):
    texts, labels = synthetic_texts(120, 3, seed=4)
    model = STCModelTester().model("bert", num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"})
    STCTrainer(model, small_args(tmp_path / "names", cv_folds=0), train_dataset=(texts, labels),
               processing_class=make_tiny_tokenizer()).train()
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    counts = [len(t.split()) for t in texts]  # integer targets: classes unless the config says regression
    model = STCModelTester().model("bert", num_labels=1, problem_type="regression")
    STCTrainer(model, small_args(tmp_path / "regression", cv_folds=0), train_dataset=(texts, counts),
               processing_class=make_tiny_tokenizer()).train()
    assert model.config.problem_type == "regression" and model.config.num_labels == 1


@pytest.mark.parametrize("labels,match", [
    ([0, 1, 1.5, 0], "Label 1.5 is not a class id"),
    (["a", 1, "b", "a"], "mix class names such as 'a' with other values such as 1"),
    ([0, 1, float("nan"), 0], "missing values"),
])
def test_labels_of_mixed_kinds_are_refused(tmp_path, labels, match):
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path),
                         train_dataset=(["w1 w2", "w3", "w4 w5", "w6"], labels), processing_class=make_tiny_tokenizer())
    with pytest.raises(ValueError, match=match):
        trainer.train()


def test_predict_takes_texts_in_plain_containers_and_evaluate_checks_labels(tmp_path):
    import pandas as pd

    texts, labels = synthetic_texts(80, 2, seed=5)
    trainer = trainer_for(tmp_path, texts, labels, cv_folds=0)
    trainer.train()
    expected = trainer.predict(texts[:3]).predictions
    column = Dataset.from_dict({"text": texts[:3]})["text"]
    for given in (tuple(texts[:3]), np.array(texts[:3]), pd.Series(texts[:3]), column):
        np.testing.assert_array_equal(trainer.predict(given).predictions, expected)
    np.testing.assert_allclose(trainer.predict(texts[0]).predictions, expected[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="label of row 1 is missing"):
        trainer.evaluate((texts[:2], [0, None]))
    with pytest.raises(ValueError, match="Label 0.7 is not a class id"):
        trainer.evaluate((texts[:2], [0.7, 1]))


def test_labelled_rows_given_as_pairs_get_a_pointer(tmp_path):
    trainer = STCTrainer(STCModelTester().model("bert"), small_args(tmp_path),
                         train_dataset=[("w1 w2", 0), ("w3", 1)], processing_class=make_tiny_tokenizer())
    with pytest.raises(ValueError, match=r"give labelled rows as \(texts, labels\)"):
        trainer.train()


def test_fit_leaves_dropout_off_and_a_device_map_in_place(tmp_path):
    """A backbone placed with `device_map` (here the embeddings and one layer offloaded to disk) is fitted where it
    is, and the fitted model answers the same twice: the fit does not switch the backbone's dropout on."""
    torch.manual_seed(0)
    AutoModel.from_config(STCModelTester().backbone_config("bert")).save_pretrained(tmp_path / "backbone")
    device_map = {"embeddings": "disk", "encoder.layer.0": "cpu", "encoder.layer.1": "disk", "encoder.layer.2": "cpu",
                  "pooler": "cpu"}
    model = STCForSequenceClassification.from_backbone_pretrained(
        tmp_path / "backbone", num_labels=2, hidden_dropout_prob=0.5, device_map=device_map,
        offload_folder=str(tmp_path / "offload"))
    texts, labels = synthetic_texts(160)
    tokenizer = make_tiny_tokenizer()
    trainer = STCTrainer(model, small_args(tmp_path), train_dataset={"text": texts[:120], "label": labels[:120]},
                         eval_dataset={"text": texts[120:], "label": labels[120:]}, processing_class=tokenizer)
    trainer.train()
    assert model.backbone.hf_device_map["encoder.layer.1"] == "disk"
    assert not model.backbone.training
    inputs = tokenizer(texts[120:124], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**inputs).logits)
    assert trainer.evaluate()["eval_accuracy"] >= 0.7


def test_max_length_is_capped_at_the_backbone_window(tmp_path):
    """A text longer than the backbone's position table is cut at the window, not sent whole into an error."""
    from transformers import BertConfig

    from stc_transformers import STCConfig, STCForSequenceClassification

    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, pad_token_id=0, max_position_embeddings=16)
    model = STCForSequenceClassification(STCConfig(text_config=config.to_dict()))
    texts, labels = synthetic_texts(60, 2, seed=6)
    texts[0] = " ".join(["w1"] * 40)
    trainer = STCTrainer(model, small_args(tmp_path, cv_folds=0), train_dataset=(texts, labels),
                         processing_class=make_tiny_tokenizer())
    assert trainer.args.token_limit(model) == 16
    trainer.train()
    assert trainer.predict([texts[0]]).predictions.shape == (1, 2)
