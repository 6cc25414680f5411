"""Evaluation metrics for the three problem types, computed locally (no Hub download)."""

from __future__ import annotations

import numpy as np


def _f1(tp, fp, fn):
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0)


def compute_metrics(logits: np.ndarray, labels: np.ndarray, task: str) -> dict[str, float]:
    """accuracy + macro-F1 (single-label); micro/macro-F1 + subset accuracy (multi-label); MSE, MAE, R2,
    Pearson r (regression; R2 is NaN for constant targets)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if task == "single_label_classification":
        predictions = logits.argmax(-1)
        classes = np.arange(logits.shape[-1])
        tp = np.array([np.sum((predictions == c) & (labels == c)) for c in classes])
        fp = np.array([np.sum((predictions == c) & (labels != c)) for c in classes])
        fn = np.array([np.sum((predictions != c) & (labels == c)) for c in classes])
        present = (tp + fn) > 0
        return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(_f1(tp, fp, fn)[present].mean())}
    if task == "multi_label_classification":
        predictions, labels = logits > 0, labels > 0.5
        tp = (predictions & labels).sum(0)
        fp = (predictions & ~labels).sum(0)
        fn = (~predictions & labels).sum(0)
        return {
            "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
            "macro_f1": float(_f1(tp, fp, fn).mean()),
            "subset_accuracy": float(np.mean((predictions == labels).all(-1))),
        }
    if task == "regression":
        predictions = logits.reshape(len(logits), -1)
        labels = labels.reshape(len(labels), -1).astype(np.float64)
        residual = predictions - labels
        variance = np.square(labels - labels.mean(0)).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):  # constant targets (or one row): R^2 is undefined, NaN
            r2 = np.where(variance > 0, 1 - np.square(residual).sum(0) / variance, np.nan)
        pearson = [np.corrcoef(predictions[:, i], labels[:, i])[0, 1] if labels[:, i].std() > 0 else 0.0
                   for i in range(labels.shape[1])]
        return {"mse": float(np.square(residual).mean()), "mae": float(np.abs(residual).mean()),
                "r2": float(r2.mean()), "pearson": float(np.mean(pearson))}
    raise ValueError(f"Unknown task {task!r}.")
