"""STC for multi-label classification: which news topics does a text mention?

What it shows: labels given as lists of names make the fit multi-label (one sigmoid output per label, micro-F1
chooses the selection, micro / macro-F1 and subset accuracy are reported), and `pipeline(...)` applies the
sigmoid per label, so `top_k=None` gives an independent probability for every topic.

Data, built honestly from a single-label corpus: the BBC News articles of `load_bbc_news()` (business,
entertainment, politics, sports, tech). Each example is the lead (title + first paragraph) of one article
(about 30% of examples) or the leads of two articles joined (70%); its labels are the topics of those articles
(one or two labels; two articles of the same topic give one). Articles are shuffled with a fixed seed and used
once, within their own split, so train / validation / test share no article. This is a synthetic task — real
texts, but paired by us — so the scores say how well the selected neurons detect each topic in a mixture, not
how a model does on naturally multi-topic news.

Backbone: the real all-MiniLM-L6-v2 (offline package). Run from the repository root. Cost: about 2.3
CPU-minutes (measured: 3.5 minutes wall on the 2 CPU cores of this project's machine, shared with other jobs,
load average 6-7; 87 s on the AVX-512 machine):

    python examples/multi_label.py
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, pipeline

from stc_transformers import STCForSequenceClassification
from stc_transformers.backbones import minilm_path
from stc_transformers.data import load_bbc_news
from stc_transformers.model_card import copy_model_card
from stc_transformers.trainer import STCTrainer, STCTrainingArguments


ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "outputs" / "multi-label-minilm-bbc-leads"
CARD = ROOT / "model_cards" / "multi-label-minilm-bbc-leads.md"  # the card, also committed there
FEATURE_CACHE = ROOT / "outputs" / ".feature_cache" / "multi_label"


def lead(article: str) -> str:
    """Title and first paragraph of a BBC article."""
    paragraphs = [p.strip() for p in article.split("\n\n") if p.strip()]
    return " ".join(paragraphs[:2])


def pair_articles(split, topics: list[str], seed: int) -> Dataset:
    """One or two article leads per example; labels = their topic names."""
    rng = random.Random(seed)
    rows = [(lead(text), topics[label]) for text, label in zip(split["text"], split["label"])]
    rng.shuffle(rows)
    texts, labels, i = [], [], 0
    while i < len(rows):
        size = 1 if rng.random() < 0.3 or i + 1 == len(rows) else 2
        chunk = rows[i : i + size]
        i += size
        texts.append(" ".join(text for text, _ in chunk))
        labels.append(sorted({topic for _, topic in chunk}))
    return Dataset.from_dict({"text": texts, "labels": labels})


def main():
    started = time.perf_counter()
    bbc = load_bbc_news()
    topics = bbc["train"].features["label"].names
    data = {name: pair_articles(split, topics, seed) for seed, (name, split) in enumerate(bbc.items())}
    print({name: len(split) for name, split in data.items()}, "examples; e.g.", data["train"][0]["labels"])

    backbone = minilm_path()
    model = STCForSequenceClassification.from_backbone_pretrained(backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    args = STCTrainingArguments(output_dir=str(OUTPUT), label_column="labels", max_length=192, batch_size=32,
                                cache_dir=str(FEATURE_CACHE))
    trainer = STCTrainer(model, args, train_dataset=data["train"], eval_dataset=data["validation"],
                         processing_class=tokenizer, dataset_name="BBC News article leads, paired (multi-label)")
    result = trainer.train()
    test_metrics = trainer.evaluate(data["test"], metric_key_prefix="test")
    summary = model.config.fit_summary
    summary["backbone"] = "sentence-transformers/all-MiniLM-L6-v2"
    trainer.save_model(str(OUTPUT))
    copy_model_card(model, OUTPUT, CARD)
    shutil.rmtree(FEATURE_CACHE, ignore_errors=True)

    chosen = summary["chosen"]
    print(f"\nLabels {list(model.config.id2label.values())}, task {summary['task']}")
    print(f"Validation micro-F1: STC {result.validation_score:.4f}, Base probe (last layer, mean-pooled) "
          f"{summary['base_score']:.4f}")
    print(f"Test ({len(data['test'])} examples): " + ", ".join(
        f"{k.removeprefix('test_')} {v:.4f}" for k, v in test_metrics.items()))
    print(f"STC reads {chosen['num_features']} neurons of layers 0-{chosen['exit_layer']} "
          f"(of 0-{summary['num_layers'] - 1}); fit time {summary['seconds']['total']:.0f} s")

    classifier = pipeline("text-classification", model=str(OUTPUT), top_k=None)
    example = data["test"][0]
    scores = classifier([example["text"]], truncation=True, max_length=192)[0]  # every label, best first
    print(f"\nTrue topics {example['labels']}; predicted probabilities: "
          + ", ".join(f"{s['label']} {s['score']:.2f}" for s in scores))
    print(f"Total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
