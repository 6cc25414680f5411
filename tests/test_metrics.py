"""Local evaluation metrics of the three problem types."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stc_transformers.metrics import compute_metrics


def test_single_label_accuracy_and_macro_f1_over_present_classes():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    metrics = compute_metrics(logits, np.array([0, 1, 0, 0]), "single_label_classification")
    assert metrics["accuracy"] == 0.75
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # class 2 never occurs: not averaged


def test_multi_label_thresholds_logits_at_zero():
    metrics = compute_metrics(np.array([[1.0, -1.0], [1.0, 1.0]]), np.array([[1, 0], [1, 0]]),
                              "multi_label_classification")
    assert metrics["micro_f1"] == pytest.approx(0.8) and metrics["subset_accuracy"] == 0.5


def test_regression_r2_is_undefined_for_constant_targets():
    metrics = compute_metrics(np.array([[1.0], [2.0], [2.5]]), np.array([1.0, 2.0, 3.0]), "regression")
    assert metrics["r2"] == pytest.approx(1 - 0.25 / 2) and metrics["mse"] == pytest.approx(0.25 / 3)
    for targets in (np.array([2.0, 2.0, 2.0]), np.array([2.0])):  # constant, or a single row
        assert math.isnan(compute_metrics(np.ones((len(targets), 1)), targets, "regression")["r2"])
