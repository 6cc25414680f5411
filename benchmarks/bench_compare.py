"""Side by side on one backbone and dataset: STC, the Base probe, an LLMEmbed-style head, full fine-tuning with the
HF `Trainer` (3 epochs), and STC on the fine-tuned backbone; accuracy, fit time and inference throughput.

    python benchmarks/bench_compare.py --model minilm --data rotten_tomatoes_offline --train-limit 4000

* Base: STC's own last-layer probe score is not used; Base is sklearn logistic regression on the last layer's
  mean-pooled (encoders) / last-token (decoders) hidden state, C chosen on validation.
* LLMEmbed-style: mean-pooled hidden states of the last 5 layers, each compressed by a linear map, fused with
  their co-occurrence matrix (X X^T squashed by 2*sigmoid(x)-1) and their mean, then an MLP head (Adam, early
  stopping on validation).
* Fine-tuning: `AutoModelForSequenceClassification` + `Trainer`, 3 epochs, lr 5e-5, batch 32.
* Throughput: texts per second on the test split, same batching, STC (early exit) vs the fine-tuned
  `AutoModelForSequenceClassification` on the same backbone.
* SetFit (when `pip install setfit` is done): contrastive training of the sentence-transformers body on pairs
  sampled from the training texts (`--setfit-steps` steps of 16 pairs), then its logistic-regression head on
  every training text. A backbone folder without sentence-transformers files gets mean pooling.

`--methods` runs a subset (STC on the fine-tuned backbone and the throughput comparison need `finetune`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from bench_stc import sklearn_base, subsample, texts_per_second
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from stc_transformers import STCForSequenceClassification, STCTrainer, STCTrainingArguments
from stc_transformers.backbones import resolve_backbone
from stc_transformers.data import load_text_dataset
from stc_transformers.extraction import extract_features
from stc_transformers.metrics import compute_metrics
from stc_transformers.selection import block_rows, block_statistics
from stc_transformers.trainer import predict_logits


class LLMEmbedHead(nn.Module):
    """Compressed last-k layer embeddings + squashed co-occurrence + mean vector -> MLP."""

    def __init__(self, dim: int, layers: int, num_labels: int, compressed: int = 128, hidden: int = 256):
        super().__init__()
        self.compress = nn.ModuleList(nn.Linear(dim, compressed) for _ in range(layers))
        fused = layers * compressed + layers * layers + compressed
        self.mlp = nn.Sequential(nn.Linear(fused, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, num_labels))

    def forward(self, x):  # x [batch, layers, dim]
        z = torch.stack([c(x[:, i]) for i, c in enumerate(self.compress)], 1)  # [batch, layers, compressed]
        cooc = 2 * torch.sigmoid(z @ z.transpose(1, 2) / z.shape[-1] ** 0.5) - 1
        return self.mlp(torch.cat([z.flatten(1), cooc.flatten(1), z.mean(1)], 1))


def train_llmembed(X, y, X_val, y_val, num_labels, epochs=30, seed=0):
    torch.manual_seed(seed)
    head = LLMEmbedHead(X.shape[-1], X.shape[1], num_labels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    best = (-1.0, None)
    for _ in range(epochs):
        head.train()
        for rows in torch.randperm(len(X)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(head(X[rows]), y[rows]).backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            accuracy = (head(X_val).argmax(-1) == y_val).float().mean().item()
        if accuracy > best[0]:
            best = (accuracy, {k: v.clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[1])
    return head.eval()


def fit_stc(path, tokenizer, train, validation, out_dir, max_length):
    model = STCForSequenceClassification.from_backbone_pretrained(path)
    shutil.rmtree(out_dir / "feature_cache", ignore_errors=True)  # timed with its extraction, never from a cache
    trainer = STCTrainer(model, STCTrainingArguments(str(out_dir), max_length=max_length, progress=False),
                         train_dataset=train, eval_dataset=validation, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - started


def fit_setfit(path, train, steps: int, out_dir, seed: int = 0):
    """SetFit on the backbone folder: (model, fit seconds). Its checkpoints go under `out_dir`, not the cwd."""
    from setfit import SetFitModel
    from setfit import Trainer as SetFitTrainer
    from setfit import TrainingArguments as SetFitArguments

    model = SetFitModel.from_pretrained(path)
    arguments = SetFitArguments(output_dir=str(out_dir), batch_size=16, num_epochs=1, max_steps=steps, seed=seed,
                                show_progress_bar=False)
    started = time.perf_counter()
    SetFitTrainer(model=model, args=arguments, train_dataset=train.select_columns(["text", "label"])).train()
    return model, time.perf_counter() - started


METHODS = ("stc", "base", "llmembed", "finetune", "setfit")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="rotten_tomatoes_offline")
    parser.add_argument("--train-limit", type=int, default=4000)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--output-dir", default="outputs/compare")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--setfit-steps", type=int, default=500)
    args = parser.parse_args(argv)
    methods = set(args.methods)
    torch.manual_seed(0)
    path = resolve_backbone(args.model)
    data = load_text_dataset(args.data)
    train = subsample(data["train"], args.train_limit, 0)
    validation = subsample(data["validation"], args.eval_limit, 0)
    test = subsample(data["test"], args.eval_limit, 0)
    out = Path(args.output_dir) / f"{args.model}-{args.data}-{len(train)}"
    tokenizer = AutoTokenizer.from_pretrained(path)
    y_test = np.array(test["label"])
    results = {}

    if "stc" in methods:
        stc, stc_seconds = fit_stc(path, tokenizer, train, validation, out / "stc", args.max_length)
        stc_logits = predict_logits(stc.model, stc.tokenizer, list(test["text"]), max_length=args.max_length,
                                    progress=False)
        results["STC"] = {**compute_metrics(stc_logits, y_test, "single_label_classification"),
                          "fit_seconds": stc_seconds, "exit_layer": stc.model.config.exit_layer,
                          "features": stc.model.config.num_selected_features}
    if methods & {"base", "llmembed"}:
        results.update(probe_heads(path, tokenizer, train, validation, test, out, args.max_length, methods))
    if "setfit" in methods:
        if importlib.util.find_spec("setfit") is None:
            print("SetFit skipped: pip install setfit")
        else:
            setfit, setfit_seconds = fit_setfit(path, train, args.setfit_steps, out / "setfit")
            setfit_logits = np.asarray(setfit.predict_proba(list(test["text"])))
            results[f"SetFit ({args.setfit_steps} steps)"] = {
                **compute_metrics(setfit_logits, y_test, "single_label_classification"), "fit_seconds": setfit_seconds}
    if "finetune" in methods:
        results.update(finetune_and_stc(path, tokenizer, train, validation, test, out, args,
                                        stc if "stc" in methods else None))

    if not results:
        print("No method ran: nothing to compare.")
        return results
    print(f"\n{args.model} on {args.data}: train {len(train)}, validation {len(validation)}, test {len(test)}")
    print(f"{'method':36s} {'accuracy':>9s} {'macro_f1':>9s} {'fit s':>8s}")
    for name, row in results.items():
        if "accuracy" in row:
            print(f"{name:36s} {row['accuracy']:9.4f} {row['macro_f1']:9.4f} {row['fit_seconds']:8.1f}")
    if "throughput_texts_per_second" in results:
        print("throughput (texts/s):", results["throughput_texts_per_second"])
    if "STC" in results and "finetune" in methods:
        ft = next(row for name, row in results.items() if name.startswith("Fine-tuning"))
        print(f"STC fit / fine-tuning time: {results['STC']['fit_seconds'] / ft['fit_seconds']:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(results, indent=1, default=float))
    return results


def probe_heads(path, tokenizer, train, validation, test, out, max_length, methods):
    """Base and LLMEmbed-style heads on cached mean-pooled hidden states of the plain backbone; their fit times
    include that extraction."""
    results = {}
    dense = STCForSequenceClassification.from_backbone_pretrained(path, sources=["hidden"], poolings=["mean"])
    shutil.rmtree(out / "cache", ignore_errors=True)
    started = time.perf_counter()
    caches = [extract_features(dense, tokenizer, list(s["text"]), out / "cache", max_length=max_length,
                               progress=False) for s in (train, validation, test)]
    extraction_seconds = time.perf_counter() - started
    stats = block_statistics(caches[0], 4096)
    ys = [np.array(s["label"]) for s in (train, validation, test)]
    layers = dense.config.text_config.num_hidden_layers
    rows = [np.arange(c.num_texts) for c in caches]
    if "base" in methods:
        last = [block_rows(c, stats, ("hidden", "mean"), r, [layers - 1])[0].numpy() for c, r in zip(caches, rows)]
        started = time.perf_counter()
        results["Base"] = {**sklearn_base(last[0], ys[0], last[1], ys[1], last[2], ys[2],
                                          "single_label_classification"),
                           "fit_seconds": extraction_seconds + time.perf_counter() - started}
    if "llmembed" in methods:
        lastk = [block_rows(c, stats, ("hidden", "mean"), r, range(max(0, layers - 5), layers)).transpose(0, 1)
                 .contiguous() for c, r in zip(caches, rows)]
        started = time.perf_counter()
        head = train_llmembed(lastk[0], torch.tensor(ys[0]), lastk[1], torch.tensor(ys[1]), len(set(ys[0])))
        with torch.no_grad():
            llm_logits = head(lastk[2]).numpy()
        results["LLMEmbed-style head"] = {**compute_metrics(llm_logits, ys[2], "single_label_classification"),
                                          "fit_seconds": extraction_seconds + time.perf_counter() - started}
    return results


def finetune_and_stc(path, tokenizer, train, validation, test, out, args, stc):
    """Full fine-tuning with `Trainer`, STC on the fine-tuned backbone against its own head, and the throughput of
    STC (when fitted) against the fine-tuned `AutoModelForSequenceClassification`."""
    results = {}
    y_test = np.array(test["label"])
    set_seed(0)  # the new head's initialisation must not depend on which methods ran before
    finetuned = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(set(train["label"])))
    tokenized = [s.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True)
                 for s in (train, validation)]
    training = TrainingArguments(str(out / "finetune"), num_train_epochs=args.epochs, learning_rate=5e-5,
                                 per_device_train_batch_size=32, save_strategy="no", report_to=[], use_cpu=True,
                                 seed=0, disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=finetuned, args=training, train_dataset=tokenized[0], processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    trainer.train()
    ft_seconds = time.perf_counter() - started
    finetuned.eval()
    ft_logits = predict_logits(finetuned, tokenizer, list(test["text"]), max_length=args.max_length, progress=False)
    results[f"Fine-tuning ({args.epochs:g} epochs)"] = {
        **compute_metrics(ft_logits, y_test, "single_label_classification"), "fit_seconds": ft_seconds}
    finetuned.save_pretrained(out / "finetuned")
    tokenizer.save_pretrained(out / "finetuned")

    stc_ft, stc_ft_seconds = fit_stc(str(out / "finetuned"), tokenizer, train, validation, out / "stc_ft",
                                     args.max_length)
    stc_ft_logits = predict_logits(stc_ft.model, stc_ft.tokenizer, list(test["text"]), max_length=args.max_length,
                                   progress=False)
    results["STC on fine-tuned backbone"] = {
        **compute_metrics(stc_ft_logits, y_test, "single_label_classification"), "fit_seconds": stc_ft_seconds,
        "exit_layer": stc_ft.model.config.exit_layer}

    if stc is not None:  # inference throughput on the test texts (same batching, length-sorted batches of 32)
        results["throughput_texts_per_second"] = texts_per_second(
            {"STC (early exit)": stc.model, "AutoModelForSequenceClassification": finetuned}, stc.tokenizer,
            list(test["text"]), args.max_length, batch_size=32)
    return results


if __name__ == "__main__":
    main()
