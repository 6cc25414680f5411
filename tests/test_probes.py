"""Batched linear probes (stc_transformers.probes) against sklearn and hand-checked cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from stc_transformers.probes import (
    TASKS,
    ProbeFit,
    RowSpace,
    check_finite,
    fit_linear_probes,
    lambda_max,
    macro_f1,
    predict_probes,
    probe_objective,
    score_predictions,
    select_by_importance,
    validation_loss,
)


sklearn = pytest.importorskip("sklearn")
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import Lasso, LogisticRegression  # noqa: E402
from sklearn.metrics import f1_score, log_loss, mean_squared_error, r2_score  # noqa: E402


SINGLE, MULTI, REGRESSION = TASKS
TIGHT = dict(max_iter=20000, tol=1e-11)


def make_data(n=240, d=12, classes=3, groups=1, seed=0):
    """Correlated standardised features [G, n, d] (float64) and labels from a noisy linear model."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(groups, n, d))
    X[..., 1] += 0.8 * X[..., 0]
    X = (X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True)
    coef = rng.normal(size=(groups, d, max(classes, 2))) * (rng.random((groups, d, 1)) < 0.6)
    scores = X @ coef + rng.normal(size=(groups, n, max(classes, 2)))
    y = scores[0].argmax(-1) if classes > 1 else scores[0, :, 0]
    return torch.from_numpy(X), torch.from_numpy(y)


def penalty_kwargs(l1: bool) -> dict:
    """sklearn >= 1.8 selects the penalty with l1_ratio (penalty= is deprecated); older versions use penalty=."""
    if tuple(int(part) for part in sklearn.__version__.split(".")[:2]) >= (1, 8):
        return dict(l1_ratio=1.0 if l1 else 0.0)
    return dict(penalty="l1" if l1 else "l2")


def sklearn_logistic(X, y, C, l1):
    """A tightly converged sklearn fit (saga for L1, lbfgs for L2)."""
    model = LogisticRegression(C=C, solver="saga" if l1 else "lbfgs", tol=1e-12, max_iter=100000,
                               **penalty_kwargs(l1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


def logit_gaps(Z):
    """Logits up to the per-row constant that softmax ignores (class 0 as reference)."""
    return Z[..., 1:] - Z[..., :1]


# --------------------------------------------------------------------------------------- agreement with sklearn


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_logistic_matches_sklearn(classes, penalty):
    X, y = make_data(classes=classes)
    n = X.shape[1]
    lam = 0.02
    fit = fit_linear_probes(X, y, SINGLE, torch.tensor([lam]), penalty=penalty, **TIGHT)
    assert fit.converged.all()
    # sklearn minimises C * sum(loss) + penalty; ours is mean(loss) + lam * penalty. Binary L2 differs by 2
    # because sklearn has one weight vector v where we have [-v/2, v/2].
    C = (2 if classes == 2 and penalty == "l2" else 1) / (n * lam)
    ref = sklearn_logistic(X[0].numpy(), y.numpy(), C, penalty == "l1")
    ours = predict_probes(X, fit)[0, 0].numpy()
    theirs = ref.decision_function(X[0].numpy())
    if classes == 2:
        np.testing.assert_allclose(logit_gaps(ours)[:, 0], theirs, atol=2e-5)
        ref_weight = np.stack([-ref.coef_[0] / 2, ref.coef_[0] / 2], -1)
    else:
        np.testing.assert_allclose(logit_gaps(ours), logit_gaps(theirs), atol=2e-5)
        ref_weight = ref.coef_.T
    # same objective value (sklearn's binary weights split symmetrically, as ours are)
    ref_fit = ProbeFit(torch.from_numpy(ref_weight)[None, None], torch.zeros(1, 1, max(classes, 2)), 0,
                       torch.ones(1, 1, dtype=torch.bool))
    if classes == 2:
        ref_fit.bias[..., 1] = float(ref.intercept_[0]) / 2
        ref_fit.bias[..., 0] = -float(ref.intercept_[0]) / 2
    else:
        ref_fit.bias[0, 0] = torch.from_numpy(ref.intercept_)
    ours_obj = probe_objective(X, y, SINGLE, fit, torch.tensor([lam]), penalty=penalty)
    ref_obj = probe_objective(X, y, SINGLE, ref_fit, torch.tensor([lam]), penalty=penalty)
    assert ours_obj.item() <= ref_obj.item() + 1e-9
    assert ours_obj.item() == pytest.approx(ref_obj.item(), rel=1e-7)
    if penalty == "l1":  # same support
        np.testing.assert_array_equal(np.abs(fit.weight[0, 0].numpy()) > 1e-6, np.abs(ref_weight) > 1e-6)


def test_lasso_matches_sklearn_per_target():
    X, _ = make_data()
    rng = np.random.default_rng(1)
    coef = rng.normal(size=(12, 2)) * (rng.random((12, 1)) < 0.5)
    Y = torch.from_numpy(X[0].numpy() @ coef + rng.normal(size=(240, 2)) + 3.0)
    strengths = torch.tensor([0.05, 0.3])
    fit = fit_linear_probes(X, Y, REGRESSION, strengths, **TIGHT)
    for s, alpha in enumerate(strengths.tolist()):
        for c in range(2):
            ref = Lasso(alpha=alpha, tol=1e-12, max_iter=100000).fit(X[0].numpy(), Y[:, c].numpy())
            np.testing.assert_allclose(fit.weight[0, s, :, c].numpy(), ref.coef_, atol=1e-6)
            assert fit.bias[0, s, c].item() == pytest.approx(ref.intercept_, abs=1e-6)


def test_multi_label_matches_independent_sklearn_fits():
    X, _ = make_data(n=200, d=8, seed=3)
    rng = np.random.default_rng(2)
    Y = torch.from_numpy((X[0].numpy() @ rng.normal(size=(8, 3)) + rng.normal(size=(200, 3)) > 0.3).astype(float))
    lam = 0.01
    fit = fit_linear_probes(X, Y, MULTI, torch.tensor([lam]), penalty="l2", **TIGHT)
    outputs = predict_probes(X, fit)
    for c in range(3):
        ref = sklearn_logistic(X[0].numpy(), Y[:, c].numpy(), 1 / (200 * lam), l1=False)
        np.testing.assert_allclose(outputs[0, 0, :, c].numpy(), ref.decision_function(X[0].numpy()), atol=2e-5)
    micro = score_predictions(outputs, Y, MULTI)
    expected = f1_score(Y.numpy(), (outputs[0, 0] > 0).numpy(), average="micro")
    assert micro.shape == (1, 1) and micro.item() == pytest.approx(expected, abs=1e-6)


# -------------------------------------------------------------------------------------------------- lambda_max


@pytest.mark.parametrize("task", TASKS)
def test_lambda_max_is_the_zero_threshold(task):
    X, y = make_data(groups=2, classes=3 if task == SINGLE else 1)
    Y = y if task != MULTI else torch.stack([y > 0, y > 0.5], 1).double()
    Y = Y[:, None] if task == REGRESSION else Y
    top = lambda_max(X, Y, task)
    assert top.shape == (2,) and (top > 0).all()
    fit = fit_linear_probes(X, Y, task, top[:, None] * torch.tensor([[1.0, 0.99]]), max_iter=2000)
    assert (fit.weight[:, 0] == 0).all()
    assert (fit.weight[:, 1] != 0).any(-1).any(-1).all()


# ------------------------------------------------------------------------------------- masks, groups, warm start


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_masked_features_get_exact_zeros_and_match_the_submatrix(penalty):
    X, y = make_data(groups=2, d=10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False  # group 0 is a narrower layer, zero-padded
    mask[1, ::3] = False
    strengths = torch.tensor([0.01, 0.05])
    fit = fit_linear_probes(X, y, SINGLE, strengths, feature_mask=mask, penalty=penalty, **TIGHT)
    assert (fit.weight[~mask[:, None, :, None].expand_as(fit.weight)] == 0).all()
    for g in range(2):
        alone = fit_linear_probes(X[g : g + 1, :, mask[g]], y, SINGLE, strengths, penalty=penalty, **TIGHT)
        torch.testing.assert_close(fit.weight[g][:, mask[g]], alone.weight[0], atol=1e-7, rtol=0)
    # the mask also applies at prediction time: weights put on masked features are not read
    noisy = ProbeFit(fit.weight + (~mask)[:, None, :, None] * 5.0, fit.bias, fit.n_iter, fit.converged)
    torch.testing.assert_close(predict_probes(X, noisy, feature_mask=mask), predict_probes(X, fit))
    assert not torch.allclose(predict_probes(X, noisy), predict_probes(X, fit))


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_batched_groups_equal_separate_fits(penalty):
    X, y = make_data(groups=3, classes=4, seed=5)
    strengths = torch.tensor([[0.003, 0.02], [0.005, 0.01], [0.01, 0.04]])  # per-group grids
    fit = fit_linear_probes(X, y, SINGLE, strengths, penalty=penalty, max_iter=500)
    for g in range(3):
        alone = fit_linear_probes(X[g : g + 1], y, SINGLE, strengths[g : g + 1], penalty=penalty, max_iter=500)
        torch.testing.assert_close(fit.weight[g], alone.weight[0], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(fit.bias[g], alone.bias[0], atol=1e-9, rtol=1e-9)
        assert (fit.converged[g] == alone.converged[0]).all()


def test_strided_features_give_the_contiguous_fit():
    """A column-major X (as LAPACK returns it) or a column slice is read as a contiguous copy: the same fit."""
    X, y = make_data(groups=1, classes=3, d=16, seed=7)
    column_major = X[0].T.contiguous().T[None]  # same values, Fortran-order strides
    sliced = torch.cat([X, X], -1)[:, :, :16]  # rows strided by 32
    assert not column_major.is_contiguous() and not sliced.is_contiguous()
    strengths = torch.tensor([0.003, 0.02])
    fit = fit_linear_probes(X, y, SINGLE, strengths, max_iter=300)
    for strided in (column_major, sliced):
        other = fit_linear_probes(strided, y, SINGLE, strengths, max_iter=300)
        torch.testing.assert_close(other.weight, fit.weight, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(predict_probes(strided, other), predict_probes(X, fit), atol=1e-12, rtol=1e-12)


def test_groups_solved_a_few_at_a_time_equal_one_pass(monkeypatch):
    """On CPU groups whose features exceed the cache budget are solved in passes; masks, per-group strengths and
    warm starts follow their groups."""
    from stc_transformers import probes

    X, y = make_data(groups=5, classes=3, seed=9)
    mask = torch.ones(5, 12, dtype=torch.bool)
    mask[1, 4:] = False
    strengths = torch.tensor([[0.003, 0.02], [0.005, 0.01], [0.01, 0.04], [0.002, 0.03], [0.004, 0.008]])
    init = fit_linear_probes(X, y, SINGLE, strengths * 1.5, max_iter=20)
    kwargs = {"feature_mask": mask, "init": init, "max_iter": 400}
    monkeypatch.setattr(probes, "_CACHE_BYTES", 1 << 40)
    assert probes._groups_per_pass(X) == 5
    whole = fit_linear_probes(X, y, SINGLE, strengths, **kwargs)
    monkeypatch.setattr(probes, "_CACHE_BYTES", 1)
    assert probes._groups_per_pass(X) == min(5, torch.get_num_threads())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert probes._groups_per_pass(X) == 2  # passes of 2, 2 and 1 groups
    passes = fit_linear_probes(X, y, SINGLE, strengths, **kwargs)
    torch.testing.assert_close(passes.weight, whole.weight, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(passes.bias, whole.bias, atol=1e-9, rtol=1e-9)
    assert torch.equal(passes.converged, whole.converged) and passes.n_iter == whole.n_iter


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_warm_start_converges_faster_to_the_same_solution(penalty):
    X, y = make_data(classes=3, seed=7)
    kwargs = dict(penalty=penalty, max_iter=5000, tol=1e-9)
    cold = fit_linear_probes(X, y, SINGLE, torch.tensor([0.01]), **kwargs)
    previous = fit_linear_probes(X, y, SINGLE, torch.tensor([0.012]), **kwargs)
    warm = fit_linear_probes(X, y, SINGLE, torch.tensor([0.01]), init=previous, **kwargs)
    assert warm.converged.all() and cold.converged.all()
    assert warm.n_iter < cold.n_iter
    torch.testing.assert_close(logit_gaps(predict_probes(X, warm)), logit_gaps(predict_probes(X, cold)),
                               atol=1e-6, rtol=0)
    again = fit_linear_probes(X, y, SINGLE, torch.tensor([0.01]), init=cold, **kwargs)
    assert again.n_iter <= 3


@pytest.mark.parametrize("task", TASKS)
def test_row_space_fit_equals_the_fit_on_all_columns(task):
    """More features than rows: the L2 fit on the n x n row-space factor is the fit on X, weights included."""
    X, y = make_data(n=80, d=300, classes=3 if task == SINGLE else 1, seed=13)
    X_val, _ = make_data(n=40, d=300, classes=3 if task == SINGLE else 1, seed=14)
    Y = {SINGLE: y, MULTI: torch.stack([y > 0, y > 0.7], 1).double(), REGRESSION: y}[task]
    strengths = torch.tensor([0.01, 0.1, 1.0])
    direct = fit_linear_probes(X, Y, task, strengths, penalty="l2", **TIGHT)
    space = RowSpace.build(X[0], ridge=1e-12)  # centred columns: X X^T is singular (all-ones null vector)
    reduced = fit_linear_probes(space.features[None], Y, task, strengths, penalty="l2", **TIGHT)
    assert space.features.shape == (80, 80)
    mapped = space.weights(reduced)
    torch.testing.assert_close(mapped.weight, direct.weight, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(mapped.bias, direct.bias, atol=1e-7, rtol=1e-6)
    on_validation = predict_probes(space.transform(X_val[0] @ X[0].T)[None], reduced)
    torch.testing.assert_close(on_validation, predict_probes(X_val, direct), atol=1e-7, rtol=1e-6)


def test_row_space_coordinates_keep_the_training_logits_and_warm_start_a_fit():
    """A fit of X's features mapped into the row space has the same training logits there; started from the mapped
    optimum, the row-space fit is done at once."""
    X, y = make_data(n=60, d=200, classes=3, seed=16)
    strengths = torch.tensor([0.03, 0.3])
    direct = fit_linear_probes(X, y, SINGLE, strengths, penalty="l2", **TIGHT)
    space = RowSpace.build(X[0], ridge=1e-12)
    mapped = space.coordinates(direct)
    assert mapped.weight.shape == (1, 2, 60, 3)
    torch.testing.assert_close(predict_probes(space.features[None], mapped), predict_probes(X, direct),
                               atol=1e-7, rtol=1e-6)
    again = fit_linear_probes(space.features[None], y, SINGLE, strengths, penalty="l2", init=mapped, tol=1e-6)
    assert again.n_iter <= 3
    torch.testing.assert_close(space.weights(again).weight, direct.weight, atol=1e-6, rtol=1e-5)


def test_row_space_of_repeated_rows():
    """Duplicate rows make X X^T singular: the default ridge keeps it factorable and the fit unchanged."""
    X, y = make_data(n=60, d=200, classes=2, seed=15)
    X, y = torch.cat([X, X[:, :10]], 1), torch.cat([y, y[:10]])
    direct = fit_linear_probes(X, y, SINGLE, torch.tensor([0.1]), penalty="l2", **TIGHT)
    assert RowSpace.build(X[0], ridge=0.0) is None  # not positive definite: the caller fits on X instead
    space = RowSpace.build(X[0])
    reduced = fit_linear_probes(space.features[None], y, SINGLE, torch.tensor([0.1]), penalty="l2", **TIGHT)
    torch.testing.assert_close(predict_probes(X, space.weights(reduced)), predict_probes(X, direct),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("task", TASKS)
def test_chunked_equals_unchunked_and_is_deterministic(task, penalty):
    X, y = make_data(n=300, classes=3 if task == SINGLE else 1, groups=2, seed=11)
    Y = {SINGLE: y, MULTI: torch.stack([y > 0, y > 0.7], 1).double(), REGRESSION: y}[task]
    strengths = torch.tensor([0.004, 0.02])
    whole = fit_linear_probes(X, Y, task, strengths, penalty=penalty, max_iter=150)
    chunked = fit_linear_probes(X, Y, task, strengths, penalty=penalty, max_iter=150, chunk_size=64)
    torch.testing.assert_close(chunked.weight, whole.weight, atol=1e-8, rtol=1e-6)
    assert chunked.n_iter == whole.n_iter and torch.equal(chunked.converged, whole.converged)
    again = fit_linear_probes(X, Y, task, strengths, penalty=penalty, max_iter=150)
    assert torch.equal(again.weight, whole.weight) and torch.equal(again.bias, whole.bias)


def test_l2_fits_converge_in_few_iterations_where_conditioning_is_poor():
    """L2 problems are solved by L-BFGS: nearly collinear features and a weak strength (condition number ~1e4)
    converge to sklearn's optimum in a few dozen iterations, from a cold start and from a start far away."""
    X, y = make_data(n=400, d=30, classes=3, seed=21)
    X[..., 2] = X[..., 0] + 1e-2 * X[..., 3]
    X = (X - X.mean(1, keepdim=True)) / X.std(1, keepdim=True)
    lam = torch.tensor([1e-4])
    fit = fit_linear_probes(X, y, SINGLE, lam, penalty="l2", max_iter=1000, tol=1e-8)
    assert fit.converged.all() and fit.n_iter < 120  # FISTA: 170
    ref = sklearn_logistic(X[0].numpy(), y.numpy(), 1 / (400 * 1e-4), l1=False)
    ref_fit = ProbeFit(torch.from_numpy(ref.coef_.T)[None, None], torch.from_numpy(ref.intercept_)[None, None], 0,
                       torch.ones(1, 1, dtype=torch.bool))
    ours, theirs = (probe_objective(X, y, SINGLE, f, lam, penalty="l2").item() for f in (fit, ref_fit))
    assert ours <= theirs + 1e-9 and ours == pytest.approx(theirs, rel=1e-7)
    far = ProbeFit(torch.full_like(fit.weight, 50.0), torch.full_like(fit.bias, -30.0), 0, fit.converged)
    again = fit_linear_probes(X, y, SINGLE, lam, penalty="l2", init=far, max_iter=1000, tol=1e-8)
    assert again.converged.all()
    assert probe_objective(X, y, SINGLE, again, lam, penalty="l2").item() == pytest.approx(ours, rel=1e-7)


def test_unconverged_problems_are_reported():
    X, y = make_data(classes=3)
    fit = fit_linear_probes(X, y, SINGLE, torch.tensor([1e-4, 10.0]), max_iter=5)
    assert fit.n_iter == 5
    assert fit.converged.tolist() == [[False, True]]  # the huge strength is solved by the zero start
    assert (fit.weight[0, 1] == 0).all()


def test_float32_inputs_are_left_untouched_and_fit_well():
    X, y = make_data(classes=3, groups=2, seed=2)
    X32 = X.float()
    copy = X32.clone()
    strengths = torch.tensor([0.005, 0.02])
    fit = fit_linear_probes(X32, y, SINGLE, strengths, max_iter=1000, tol=1e-5, bf16_products=False)
    assert torch.equal(X32, copy)
    assert fit.weight.dtype == torch.float32 and fit.weight.shape == (2, 2, 12, 3) and fit.bias.shape == (2, 2, 3)
    exact = fit_linear_probes(X, y, SINGLE, strengths, **TIGHT)
    gap = probe_objective(X, y, SINGLE, fit, strengths) - probe_objective(X, y, SINGLE, exact, strengths)
    assert (gap.abs() < 1e-7).all()
    # half precision features are upcast
    half = fit_linear_probes(X32.half(), y, SINGLE, strengths, max_iter=50)
    assert half.weight.dtype == torch.float32


@pytest.mark.parametrize("task,classes", [(SINGLE, 2), (SINGLE, 4), (MULTI, 3), (REGRESSION, 3)])
def test_bf16_products_solve_the_float32_problem(task, classes):
    """bfloat16 products (L1 on float32 data) converge like float32 ones, to the objective within the rounding of
    the data (relative 1e-4), with the features that float32 products keep, deterministically; masked features stay
    exactly zero."""
    X, y = make_data(n=400, d=30, classes=classes, groups=2, seed=3)
    Y = {SINGLE: y, MULTI: torch.stack([y > 0, y > 1], 1).double(), REGRESSION: y.double()}[task]
    strengths = torch.tensor([0.001, 0.01, 0.05])
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :5] = False
    exact = fit_linear_probes(X, Y, task, strengths, feature_mask=mask, **TIGHT)
    X32 = X.float()
    fast = fit_linear_probes(X32, Y, task, strengths, feature_mask=mask, max_iter=1000, tol=1e-4, bf16_products=True)
    plain = fit_linear_probes(X32, Y, task, strengths, feature_mask=mask, max_iter=1000, tol=1e-4,
                              bf16_products=False)
    assert fast.converged.all() and fast.n_iter <= plain.n_iter + 10
    best = probe_objective(X, Y, task, exact, strengths)
    assert ((probe_objective(X, Y, task, fast, strengths) - best) / best).abs().max() < 1e-4
    assert torch.equal(fast.weight != 0, plain.weight != 0)
    for eta in (0.5, 0.9, 0.99):  # up to a swap of two features whose importances are nearly tied at the cut
        assert (select_by_importance(fast.weight, eta) != select_by_importance(plain.weight, eta)).sum() <= 2
    assert (fast.weight[1, :, :5] == 0).all()
    again = fit_linear_probes(X32, Y, task, strengths, feature_mask=mask, max_iter=1000, tol=1e-4, bf16_products=True)
    assert torch.equal(again.weight, fast.weight) and torch.equal(again.bias, fast.bias)
    assert not torch.equal(fast.weight, plain.weight)  # the bfloat16 path really ran


def test_bf16_products_default_to_native_support_and_only_apply_to_float32_l1(monkeypatch):
    from stc_transformers import probes

    X, y = make_data(classes=3, groups=2, seed=4)
    X32, strengths = X.float(), torch.tensor([0.005, 0.02])

    def fit(data, **kwargs):
        return fit_linear_probes(data, y, SINGLE, strengths, max_iter=200, **kwargs).weight

    for native in (True, False):
        monkeypatch.setattr(probes, "native_bf16", lambda device, native=native: native)
        assert torch.equal(fit(X32), fit(X32, bf16_products=native))
    assert not torch.equal(fit(X32, bf16_products=True), fit(X32, bf16_products=False))
    # float64 data, L2 fits and chunked fits keep float32 (or float64) products
    assert torch.equal(fit(X, bf16_products=True), fit(X, bf16_products=False))
    assert torch.equal(fit(X32, penalty="l2", bf16_products=True), fit(X32, penalty="l2", bf16_products=False))
    assert torch.equal(fit(X32, chunk_size=64, bf16_products=True), fit(X32, chunk_size=64, bf16_products=False))
    assert probes.native_bf16(torch.device("meta")) is False


# ----------------------------------------------------------------------------------------------------- scoring


def test_scores_match_sklearn_metrics():
    rng = np.random.default_rng(0)
    outputs = torch.from_numpy(rng.normal(size=(2, 3, 50, 4)))
    y = torch.from_numpy(rng.integers(0, 4, size=50))
    accuracy, macro = score_predictions(outputs, y, SINGLE), macro_f1(outputs, y)
    assert accuracy.shape == macro.shape == (2, 3)
    for g in range(2):
        for s in range(3):
            predicted = outputs[g, s].argmax(-1).numpy()
            assert accuracy[g, s].item() == pytest.approx((predicted == y.numpy()).mean())
            assert macro[g, s].item() == pytest.approx(f1_score(y.numpy(), predicted, average="macro"))
    targets = torch.from_numpy(rng.normal(size=(50, 2)))
    r2 = score_predictions(outputs[..., :2] + targets, targets, REGRESSION)
    assert r2[1, 2].item() == pytest.approx(r2_score(targets.numpy(), (outputs[1, 2, :, :2] + targets).numpy()))


def test_validation_loss_matches_sklearn():
    rng = np.random.default_rng(1)
    outputs = torch.from_numpy(rng.normal(size=(2, 3, 40, 4)) * 3)
    y = torch.from_numpy(rng.integers(0, 4, size=40))
    loss = validation_loss(outputs, y, SINGLE)
    assert loss.shape == (2, 3)
    probabilities = torch.softmax(outputs[1, 2], -1).numpy()
    assert loss[1, 2].item() == pytest.approx(log_loss(y.numpy(), probabilities, labels=range(4)))
    labels = torch.from_numpy(rng.integers(0, 2, size=(40, 4))).double()
    multi = validation_loss(outputs, labels, MULTI)
    per_label = [log_loss(labels[:, c].numpy(), torch.sigmoid(outputs[0, 1, :, c]).numpy()) for c in range(4)]
    assert multi[0, 1].item() == pytest.approx(sum(per_label))
    targets = torch.from_numpy(rng.normal(size=40))
    mse = validation_loss(outputs[..., :1], targets, REGRESSION)
    assert mse[0, 0].item() == pytest.approx(mean_squared_error(targets.numpy(), outputs[0, 0, :, 0].numpy()))


# ------------------------------------------------------------------------------------------ select_by_importance


def test_select_by_importance_hand_made():
    w = torch.tensor([[3.0], [0.0], [1.0], [2.0], [1.0]])  # importances 9, 0, 1, 4, 1 (total 15)
    assert select_by_importance(w, 0.5).tolist() == [True, False, False, False, False]  # 9 >= 7.5
    assert select_by_importance(w, 0.8).tolist() == [True, False, False, True, False]  # 13 >= 12
    assert select_by_importance(w, 0.9).tolist() == [True, False, True, True, False]  # tie 1/1: lower index
    assert select_by_importance(w, 1.0).tolist() == [True, False, True, True, True]  # all non-zero
    # importance sums squared weights over classes: feature 1 = 1 + 4 = 5 beats feature 0 = 4
    multi = torch.tensor([[2.0, 0.0], [1.0, -2.0], [0.0, 0.5]])
    assert select_by_importance(multi, 0.5).tolist() == [False, True, False]
    assert select_by_importance(torch.zeros(4, 3), 0.9).tolist() == [False] * 4
    batched = torch.stack([w.expand(5, 2), torch.zeros(5, 2)])[:, None]  # [2, 1, 5, 2]
    mask = select_by_importance(batched, 0.8)
    assert mask.shape == (2, 1, 5) and mask[0, 0].tolist() == [True, False, False, True, False]
    assert not mask[1].any()
    with pytest.raises(ValueError):
        select_by_importance(w, 0.0)


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise(bad):
    X, y = make_data()
    X = X.clone()
    X[0, 5, 3] = bad
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        fit_linear_probes(X, y, SINGLE, torch.tensor([0.01]))
    with pytest.raises(ValueError, match="overflowed"):
        lambda_max(X, y, SINGLE)
    with pytest.raises(ValueError, match="overflowed"):
        check_finite(X)
    overflowed = (make_data()[0] * 1e5).half()  # float16 tops out at 65504
    with pytest.raises(ValueError, match="overflowed"):
        fit_linear_probes(overflowed, y, SINGLE, torch.tensor([0.01]))


def test_invalid_arguments_raise():
    X, y = make_data()
    with pytest.raises(ValueError):
        fit_linear_probes(X, y, "ranking", torch.tensor([0.1]))
    with pytest.raises(ValueError):
        fit_linear_probes(X, y, SINGLE, torch.tensor([-0.1]))
    with pytest.raises(ValueError):
        fit_linear_probes(X, y, SINGLE, torch.tensor([0.1]), penalty="l0")
    with pytest.raises(ValueError):
        fit_linear_probes(X, y, SINGLE, torch.tensor([0.1]), feature_mask=torch.ones(3, 3, dtype=torch.bool))
