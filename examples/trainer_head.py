"""Train the STC head with the plain Hugging Face `Trainer`, then sparsify it by hand.

What it shows: `STCForSequenceClassification` is an ordinary `PreTrainedModel`. Before a fit its head is dense
(a linear layer over every pooled hidden-state and MLP neuron of every layer: 23,040 features for MiniLM), so
the usual `Trainer` loop can train it on a frozen backbone. `model.sparsify(eta)` then keeps, per layer, the
smallest neuron set carrying `eta` of the head's squared weights, shrinks the head and drops the layers after the
last one used (early exit). `STCTrainer` (see quickstart.py) does this selection with a validation search instead.

Data: the 300-row movie-review sample shipped inside the package (`load_sample_dataset()`: 210 train / 45
validation / 45 test snippets, negative vs positive); backbone: the real all-MiniLM-L6-v2 (offline package).
An L1 penalty on the head weights (`l1_strength`) concentrates the weights on fewer neurons before sparsifying.

Run from the repository root (about 30 seconds on 2 CPU cores):

    python examples/trainer_head.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments, pipeline

from stc_transformers import STCForSequenceClassification
from stc_transformers.backbones import minilm_path
from stc_transformers.data import load_sample_dataset
from stc_transformers.model_card import copy_model_card


ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "outputs" / "trainer-head-minilm-sample"
CARD = ROOT / "model_cards" / "trainer-head-minilm-sample.md"  # the card, also committed there


def accuracy(prediction):
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


@torch.no_grad()
def standardize_head_inputs(model, tokenizer, texts, batch_size=32):
    """Set the head's feature mean / scale from the training texts (the dense head's inputs differ in scale by
    orders of magnitude across layers and sources; standardised, one learning rate suits them all)."""
    model.eval()
    features = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        features.append(model.pooled_features(**batch))
    features = torch.cat(features)
    model.head.feature_mean.copy_(features.mean(0))
    model.head.feature_scale.copy_(features.std(0).clamp_min(1e-6))


def main():
    started = time.perf_counter()
    torch.manual_seed(0)
    data = load_sample_dataset()  # text, label (negative / positive), score
    backbone = minilm_path()
    model = STCForSequenceClassification.from_backbone_pretrained(
        backbone, id2label={0: "negative", 1: "positive"}, l1_strength=1e-4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # a frozen backbone: the same features each epoch
    ).freeze_backbone()  # only the head (23,040 x 2 weights) trains
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    print(f"Dense head: {model.head.classifier.in_features} features from all "
          f"{model.config.text_config.num_hidden_layers} layers")
    standardize_head_inputs(model, tokenizer, data["train"]["text"])
    torch.nn.init.zeros_(model.head.classifier.weight)  # start from "no opinion": 23,040 random weights add noise

    tokenized = data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=128), batched=True,
                         remove_columns=["text", "score"]).rename_column("label", "labels")
    args = TrainingArguments(
        output_dir=str(OUTPUT / "trainer"), num_train_epochs=5, learning_rate=1e-4, per_device_train_batch_size=16,
        per_device_eval_batch_size=64, eval_strategy="epoch", save_strategy="no", logging_strategy="epoch",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=accuracy)
    trainer.train()
    dense = trainer.evaluate(tokenized["test"], metric_key_prefix="test")
    print(f"\nDense head:  test accuracy {dense['test_accuracy']:.4f} with {model.head.classifier.in_features} "
          f"features, {model.config.text_config.num_hidden_layers} layers")

    # sparsify in place (a new, smaller head: a new Trainer would be needed to train it further); the second call
    # sparsifies the already sparse head further
    for eta in (0.9, 0.5):
        model.sparsify(eta)
        sparse = trainer.evaluate(tokenized["test"], metric_key_prefix="test")
        print(f"eta {eta:<4}     test accuracy {sparse['test_accuracy']:.4f} with {model.head.classifier.in_features} "
              f"features, exit after layer {model.config.exit_layer}")

    model.save_pretrained(OUTPUT)  # the model card is written too (no per-layer plot: no search was run)
    tokenizer.save_pretrained(OUTPUT)
    copy_model_card(model, OUTPUT, CARD)
    classifier = pipeline("text-classification", model=str(OUTPUT))
    print(f"\nSaved to {OUTPUT.relative_to(ROOT)}:",
          classifier("An absolute delight from beginning to end."),
          classifier("Tedious, shallow and badly edited."))
    print(f"Total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
