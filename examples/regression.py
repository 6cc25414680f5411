"""STC for regression: predict the human valence rating (-4 .. +4) of movie-review snippets.

What it shows: float labels make the fit a regression (one output, R² chooses the selection, MSE / MAE / R² /
Pearson r are reported), and `pipeline("text-classification")` returns the raw predicted value as `score`
(no sigmoid: `config.problem_type == "regression"`).

Data: the snippets of Hutto & Gilbert (2014, MIT licence) with their mean human rating
(`load_movie_valence(task="regression")`), subsampled to 2,000 train / 500 validation / 500 test snippets for
speed. Backbone: the real all-MiniLM-L6-v2 (offline package).

Run from the repository root. Cost: about 2 CPU-minutes (measured: 3 minutes wall on the 2 CPU cores of this
project's machine, shared with other jobs, load average 4-7; 40 s on the AVX-512 machine):

    python examples/regression.py
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import AutoTokenizer, pipeline

from stc_transformers import STCForSequenceClassification
from stc_transformers.backbones import minilm_path
from stc_transformers.data import load_movie_valence
from stc_transformers.model_card import copy_model_card
from stc_transformers.trainer import STCTrainer, STCTrainingArguments


ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "outputs" / "regression-minilm-movie-valence"
CARD = ROOT / "model_cards" / "regression-minilm-movie-valence.md"  # the card, also committed there
FEATURE_CACHE = ROOT / "outputs" / ".feature_cache" / "regression"
SNIPPETS = [
    "One of the most exhilarating films of the year.",
    "It has its moments, but they are few and far between.",
    "An insufferable, smug and utterly pointless exercise.",
]


def main():
    started = time.perf_counter()
    data = load_movie_valence(task="regression")  # label: mean human rating in [-4, 4]
    train = data["train"].shuffle(seed=0).select(range(2000))
    validation = data["validation"].shuffle(seed=0).select(range(500))
    test = data["test"].shuffle(seed=0).select(range(500))

    backbone = minilm_path()
    model = STCForSequenceClassification.from_backbone_pretrained(backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    args = STCTrainingArguments(output_dir=str(OUTPUT), max_length=128, batch_size=64, cache_dir=str(FEATURE_CACHE))
    trainer = STCTrainer(model, args, train_dataset=train, eval_dataset=validation, processing_class=tokenizer,
                         dataset_name="movie_valence regression (stc-transformers built-in, 2,000-snippet subsample)")
    result = trainer.train()
    test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    summary = model.config.fit_summary
    summary["backbone"] = "sentence-transformers/all-MiniLM-L6-v2"
    trainer.save_model(str(OUTPUT))
    copy_model_card(model, OUTPUT, CARD)
    shutil.rmtree(FEATURE_CACHE, ignore_errors=True)

    chosen = summary["chosen"]
    print(f"\nTask {summary['task']}, {model.config.num_labels} output")
    print(f"Validation R²: STC {result.validation_score:.4f}, Base probe (last layer, mean-pooled) "
          f"{summary['base_score']:.4f}")
    print("Test (500 snippets): " + ", ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in test_metrics.items()))
    print(f"STC reads {chosen['num_features']} neurons of layers 0-{chosen['exit_layer']} "
          f"(of 0-{summary['num_layers'] - 1}); fit time {summary['seconds']['total']:.0f} s")

    regressor = pipeline("text-classification", model=str(OUTPUT))
    print("\nPredicted valence (-4 .. +4):")
    for snippet, prediction in zip(SNIPPETS, regressor(SNIPPETS)):
        print(f"  {prediction['score']:+.2f}  {snippet}")
    print(f"Total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
