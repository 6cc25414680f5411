"""Row reading and standardisation of cached features (`selection.py`), checked against plain numpy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from stc_transformers import selection
from stc_transformers.extraction import FeatureCache
from stc_transformers.selection import (
    Candidate,
    FeatureMatrix,
    SearchSettings,
    SelectionSearch,
    _BlockGrams,
    _PrefixGrams,
    _exit_points,
    _set_columns,
    block_rows,
    block_statistics,
)
from stc_transformers.features_stc import steady_features
from stc_transformers.probes import ProbeFit, RowSpace, fit_linear_probes, predict_probes, probe_objective


def make_cache(tmp_path, num_texts=300, offset=0.0, seed=0) -> tuple[FeatureCache, dict]:
    rng = np.random.default_rng(seed)
    arrays = {
        ("hidden", "mean"): (offset + rng.normal(0, 2, (3, num_texts, 5))).astype(np.float32),
        ("mlp", "max"): rng.normal(1, 0.5, (3, num_texts, 7)).astype(np.float32),
    }
    arrays[("hidden", "mean")][:, :, 4] = offset + 3.0  # a constant feature
    for (source, pooling), values in arrays.items():
        np.save(tmp_path / f"{source}_{pooling}.npy", values)
    blocks = [{"source": s, "pooling": p, "num_layers": v.shape[0], "dim": v.shape[2]} for (s, p), v in arrays.items()]
    return FeatureCache(tmp_path, {"num_texts": num_texts, "blocks": blocks}), arrays


def test_read_rows_reads_row_ranges_of_chosen_layers_into_a_buffer(tmp_path):
    cache, arrays = make_cache(tmp_path)
    values = arrays[("mlp", "max")]
    np.testing.assert_array_equal(cache.read_rows("mlp", "max", 10, 60), values[:, 10:60])
    np.testing.assert_array_equal(cache.read_rows("mlp", "max", 0, 300, layers=[2, 0]), values[[2, 0]])
    buffer = np.zeros((3, 100, 7), np.float32)
    cache.read_rows("mlp", "max", 250, 300, out=buffer[:, :50])
    np.testing.assert_array_equal(buffer[:, :50], values[:, 250:])
    assert not buffer[:, 50:].any()
    with pytest.raises(IndexError, match="out of range"):
        cache.read_rows("mlp", "max", 290, 301)


@pytest.mark.parametrize("offset", [0.0, 6e4])
def test_block_statistics_match_numpy_in_float64(tmp_path, offset):
    """Chunked, shifted float32 sums agree with float64 numpy, also for features far from zero."""
    cache, arrays = make_cache(tmp_path, offset=offset)
    stats = block_statistics(cache, chunk_rows=64)
    for block, values in arrays.items():
        mean, scale = stats[block]
        reference = values.astype(np.float64)
        np.testing.assert_allclose(mean, reference.mean(1), rtol=1e-6, atol=1e-6)
        varying = reference.std(1) > 0
        np.testing.assert_allclose(scale[varying], reference.std(1)[varying], rtol=1e-4)
        assert (scale[~varying] == 1.0).all()
    with pytest.MonkeyPatch.context() as patch:  # wide blocks: chunks bounded in bytes too (10 rows of 3 x 7 floats)
        patch.setattr(selection, "_CHUNK_BYTES", 10 * 3 * 7 * 4)
        read = []  # (block, rows) of every chunk read
        patch.setattr(cache, "read_rows", lambda s, p, start, stop, **k: read.append(((s, p), stop - start))
                      or FeatureCache.read_rows(cache, s, p, start, stop, **k))
        for block, (mean, scale) in block_statistics(cache, chunk_rows=64).items():
            np.testing.assert_allclose(mean, stats[block][0], rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(scale, stats[block][1], rtol=1e-5)
        assert max(rows for block, rows in read if block == ("mlp", "max")) == 10
        assert max(rows for block, rows in read if block == ("hidden", "mean")) == 14  # 3 x 5 floats a row


def test_feature_matrix_rows_come_back_standardised_in_the_order_asked(tmp_path):
    cache, arrays = make_cache(tmp_path)
    stats = block_statistics(cache, chunk_rows=128)
    groups = [(("hidden", "mean"), 0, np.array([1, 3])), (("mlp", "max"), 2, np.array([0, 5, 6]))]
    matrix = FeatureMatrix(cache, stats, groups)
    index = np.array([250, 4, 120, 5])
    expected = np.concatenate(
        [(arrays[b][layer][index][:, n] - stats[b][0][layer, n]) / stats[b][1][layer, n] for b, layer, n in groups], 1
    )
    np.testing.assert_allclose(matrix.rows(index).numpy(), expected, rtol=1e-6, atol=1e-6)
    materialized = matrix.materialize(tmp_path / "selected.npy", chunk_rows=70).numpy()
    np.testing.assert_allclose(materialized[index], expected, rtol=1e-6, atol=1e-6)
    with pytest.MonkeyPatch.context() as patch:  # wide matrices: chunks bounded in bytes too (here 3 rows)
        patch.setattr(selection, "_CHUNK_BYTES", 3 * 4 * matrix.num_features)
        np.testing.assert_array_equal(matrix.materialize(tmp_path / "small.npy", chunk_rows=70).numpy(), materialized)
    # block rows: the same standardisation for every layer and neuron, contiguous or not
    mean, scale = stats[("mlp", "max")]
    for rows in (np.arange(10, 60), np.array([0, 2, 299])):
        block = block_rows(cache, stats, ("mlp", "max"), rows).numpy()
        reference = (arrays[("mlp", "max")][:, rows] - mean[:, None]) / scale[:, None]
        np.testing.assert_allclose(block, reference, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cache.array("mlp", "max"), arrays[("mlp", "max")])  # the cache is never modified


def depth_search(task="single_label_classification", num_validation=200) -> SelectionSearch:
    search = SelectionSearch.__new__(SelectionSearch)  # only what `_choose_depth` reads
    search.settings, search.task, search.val_rows = SearchSettings(), task, np.arange(num_validation)
    search.folds = []
    return search


def candidate(layers, score, num_features=100, loss=0.5, exit_at="block") -> Candidate:
    return Candidate((("hidden", "mean"), ("mlp", "max")), 0.9, tuple(layers), 1.0, score, num_features, loss,
                     exit_at=exit_at, partial_exit=exit_at == "mlp")


def test_depth_choice_takes_the_earliest_prefix_within_tolerance():
    prefixes = [candidate(range(k + 1), score) for k, score in enumerate([0.70, 0.80, 0.899, 0.90])]
    assert depth_search()._choose_depth(prefixes, prefixes[-1]).layers == (0, 1, 2)


@pytest.mark.parametrize("single_score, expected", [(0.91, (0, 1, 2)), (0.95, (2,))])
def test_a_single_layer_must_beat_the_prefix_by_more_than_validation_noise(single_score, expected):
    """200 validation rows at accuracy 0.9: the standard error is sqrt(0.9 * 0.1 / 200) = 0.021."""
    prefixes = [candidate(range(k + 1), score) for k, score in enumerate([0.80, 0.85, 0.90])]
    singles = [candidate([1], 0.84), candidate([2], single_score, num_features=30)]
    assert depth_search()._choose_depth(prefixes + singles, prefixes[-1]).layers == expected
    # a large validation set makes the same margin significant
    assert depth_search(num_validation=20000)._choose_depth(prefixes + singles, prefixes[-1]).layers == (2,)


@pytest.mark.parametrize("partial_score, expected", [(0.899, ((0, 1, 2), "mlp")), (0.85, ((0, 1, 2), "block")),
                                                    (0.95, ((0, 1), "block"))])
def test_an_exit_at_the_mlp_is_taken_within_tolerance_and_never_raises_the_bar(partial_score, expected):
    """Layer 2's MLP neurons alone stop the backbone before layer 2's down-projection: cheaper than the whole
    layer 2, dearer than stopping after layer 1. Its score counts only against the whole-layer prefixes' best."""
    prefixes = [candidate(range(k + 1), score) for k, score in enumerate([0.70, 0.80, 0.90])]
    partial = candidate(range(3), partial_score, num_features=80, exit_at="mlp")
    if expected[0] == (0, 1):
        prefixes[1].score = 0.899  # within tolerance (0.002) of the whole-layer best, 0.90, not of the 0.95
    chosen = depth_search()._choose_depth(prefixes + [partial], prefixes[-1])
    assert (chosen.layers, chosen.exit_at) == expected


def test_regression_depth_choice_uses_the_tolerance_alone():
    prefixes = [candidate(range(k + 1), score) for k, score in enumerate([0.5, 0.6])]
    single = candidate([1], 0.61)
    assert depth_search("regression")._choose_depth(prefixes + [single], prefixes[-1]).layers == (1,)


def test_prefix_grams_grow_and_match_direct_products():
    """Growing prefixes are updated in place, a shorter one or a range not from 0 is computed afresh."""
    generator = torch.Generator().manual_seed(0)
    X, X_val = torch.randn(20, 50, generator=generator, dtype=torch.float64), torch.randn(7, 50, dtype=torch.float64)
    grams = _PrefixGrams(X, X_val)
    for start, stop in [(0, 10), (0, 30), (0, 50), (0, 20), (10, 40)]:
        gram, cross = grams.get(start, stop)
        A = X[:, start:stop]
        torch.testing.assert_close(gram, A @ A.T)
        torch.testing.assert_close(cross, X_val[:, start:stop] @ A.T)


@pytest.mark.parametrize("folds", [0, 3])
def test_block_grams_match_direct_products_of_families_and_growing_etas(tmp_path, folds):
    """Stage 2's Gram matrices, summed from per-block parts that grow with eta, equal the products of each
    candidate's own columns: for every family and eta, in a cross-validation fold, and for a smaller set asked
    after a larger one (its parts are rebuilt)."""
    cache, arrays = make_cache(tmp_path)
    y = (arrays[("mlp", "max")][0, :, 0] - 1 + arrays[("hidden", "mean")][1, :, 1] / 4 > 0).astype(int)
    search = SelectionSearch(cache, cache, y, y[:40], "single_label_classification", 2,
                             SearchSettings(progress=False, cv_folds=folds, cv_below=1000))
    search.val_rows = np.arange(40)
    search.folds = search._cross_validation_folds()
    search.layer_probes(block_statistics(cache, 4096))
    layers = (0, 1, 2)
    families = selection._families(cache.blocks)
    for fitter in search.searches:
        grams = _BlockGrams(fitter)
        for eta in (0.5, 0.9, 0.99, 0.5):
            for family in families:
                groups = fitter._groups(family, eta, fitter.probes, layers)
                X = torch.cat([fitter._columns(b, layer, n, False) for b, layer, n in groups], 1)
                X_val = torch.cat([fitter._columns(b, layer, n, True) for b, layer, n in groups], 1)
                gram, cross = grams.get(groups)
                torch.testing.assert_close(gram, X @ X.T, rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(cross, X_val @ X.T, rtol=1e-5, atol=1e-4)
    assert len(search.searches) == 1 + folds


def test_all_layer_candidates_with_shared_grams_score_as_separate_fits(tmp_path, monkeypatch):
    """Stage 2 runs etas outermost to share Gram matrices, and returns its candidates family by family, each eta in
    the settings' order, scored as when every candidate is fitted on its own (12 sample rows: in the row space)."""
    monkeypatch.setattr(selection, "_ROW_SPACE_WIDTH", 1)  # the row space from 13 columns on
    cache, arrays = make_cache(tmp_path)
    y = (arrays[("mlp", "max")][0, :, 0] - 1 + arrays[("hidden", "mean")][1, :, 1] / 4 > 0).astype(int)
    settings = SearchSettings(progress=False, cv_folds=0, search_samples=12, etas=(0.9, 0.5, 0.99))
    shared, alone = (SelectionSearch(cache, cache, y, y, "single_label_classification", 2, settings) for _ in "ab")
    for search in (shared, alone):
        search.layer_probes(block_statistics(cache, 4096))
    families, layers = selection._families(cache.blocks), (0, 1, 2)
    candidates = shared._all_layer_candidates(families, selection.tqdm(disable=True))
    expected = []
    for family in families:
        for eta in settings.etas:
            groups = alone._groups(family, eta, alone.probes, layers)
            layer_sets = [(layers, _exit_points(groups, layers)[-1])]
            expected += alone._candidates(family, eta, layer_sets, *alone._integrate(family, eta, layer_sets, groups),
                                          groups)
    assert [c.key for c in candidates] == [c.key for c in expected]
    assert max(c.num_features for c in candidates) > 12  # some fits ran in the row space
    np.testing.assert_allclose([c.score for c in candidates], [c.score for c in expected], atol=1e-6)
    # the fits stop within the solver's tolerance (1e-3) of the optimum, from other warm starts in the other order
    np.testing.assert_allclose([c.loss for c in candidates], [c.loss for c in expected], rtol=5e-3)


def test_tie_break_takes_the_lowest_loss_among_scores_within_noise():
    """200 validation rows at accuracy 0.9: standard error 0.021, so 0.885 ties with 0.9 and 0.85 does not."""
    tied = candidate(range(3), 0.885, num_features=300, loss=0.30)
    best = candidate(range(3), 0.90, num_features=100, loss=0.35)
    worse = candidate(range(3), 0.85, num_features=50, loss=0.20)
    search = depth_search()
    assert search._tie_break([best, tied, worse], lambda c: c.score, lambda c: c.loss) is tied
    # equal losses go to fewer neurons; with 20000 rows the same gap is significant
    same_loss = candidate(range(3), 0.885, num_features=80, loss=0.35)
    assert search._tie_break([best, same_loss], lambda c: c.score, lambda c: c.loss) is same_loss
    assert depth_search(num_validation=20000)._tie_break([best, tied], lambda c: c.score, lambda c: c.loss) is best


def test_regression_tie_break_needs_equal_scores():
    a, b = candidate(range(2), 0.61, loss=0.9), candidate(range(2), 0.60, loss=0.1)
    assert depth_search("regression")._tie_break([a, b], lambda c: c.score, lambda c: c.loss) is a


def test_layer_probes_extend_the_grid_only_for_the_layers_at_the_weak_edge(tmp_path):
    cache, arrays = make_cache(tmp_path)
    y = (arrays[("mlp", "max")][1, :, 0] > 1).astype(int)
    search = SelectionSearch(cache, cache, y, y, "single_label_classification", 2,
                             SearchSettings(progress=False, strength_ratios=(0.5, 0.1)))
    fits, fit_probes = [], search._fit

    def fit(X, Y, strengths, **kwargs):
        fits.append(fit_probes(X, Y, strengths, **kwargs))
        return fits[-1]

    def score(X_val, fit):  # the first grid: layer 1 is best at its weakest strength; its extension at 0.3x that
        if fit.weight.shape[0] == 1:
            return torch.tensor([[0.95, 0.1]])
        scores = torch.tensor([[0.9, 0.5]]).repeat(fit.weight.shape[0], 1)
        scores[1] = torch.tensor([0.5, 0.9])
        return scores

    search._fit, search._score = fit, score
    results = search.layer_probes(block_statistics(cache, 128))
    assert [f.weight.shape[:2] for f in fits] == [(3, 2), (1, 2)] * 2  # per block: all layers, then layer 1 alone
    weight, scores = results[("mlp", "max")]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.95, 0.9]))
    torch.testing.assert_close(weight[1], fits[3].weight[0, 0])  # the extension's weight replaces layer 1's
    torch.testing.assert_close(weight[0], fits[2].weight[0, 0])


@pytest.mark.parametrize("bf16_probes", [None, False, True])
def test_bf16_probes_setting_reaches_the_layer_probes_only(tmp_path, monkeypatch, bf16_probes):
    cache, arrays = make_cache(tmp_path)
    y = (arrays[("mlp", "max")][1, :, 0] > 1).astype(int)
    search = SelectionSearch(cache, cache, y, y, "single_label_classification", 2,
                             SearchSettings(progress=False, bf16_probes=bf16_probes, cv_folds=0))
    seen, fit = [], selection.fit_linear_probes

    def spy(X, Y, task, strengths, **kwargs):
        seen.append((kwargs.get("penalty", "l1"), kwargs["bf16_products"]))
        return fit(X, Y, task, strengths, **kwargs)

    monkeypatch.setattr(selection, "fit_linear_probes", spy)
    search.run()
    assert {penalty for penalty, _ in seen} == {"l1", "l2"}
    assert {flag for _, flag in seen} == {bf16_probes}  # L2 fits ignore it (see test_probes)


def test_layer_probes_leave_out_neurons_steadier_than_reduced_precision_resolves(tmp_path):
    cache, arrays = make_cache(tmp_path)
    y = (arrays[("mlp", "max")][1, :, 0] > 1).astype(int)
    values = arrays[("mlp", "max")]
    values[:, :, 2] = 8.0 + 1e-4 * y  # predicts every label, but bfloat16 rounds 8.0 to steps of 0.06
    np.save(tmp_path / "mlp_max.npy", values)
    stats = block_statistics(cache, 128)
    steady = steady_features(*map(torch.from_numpy, stats[("mlp", "max")]))
    assert not steady[:, 2].any() and steady[:, [0, 1, 3, 4, 5, 6]].all()
    assert steady_features(*map(torch.from_numpy, stats[("hidden", "mean")])).all()  # constant neuron 4 (scale 1) is harmless

    def layer_weights(**settings):
        search = SelectionSearch(cache, cache, y, y, "single_label_classification", 2,
                                 SearchSettings(progress=False, **settings))
        return search.layer_probes(stats)[("mlp", "max")][0]  # [layers, dim, classes]

    weight = layer_weights()
    assert (weight[:, 2] == 0).all() and (weight[1] != 0).any()
    assert (layer_weights(min_relative_spread=0.0)[:, 2] != 0).all()  # without the rule it carries every probe
    weight = layer_weights(strength_ratios=(0.5, 0.3))  # best at the weak edge: the grid is extended, still masked
    assert (weight[:, 2] == 0).all() and (weight[1] != 0).any()
    search = SelectionSearch(cache, cache, y, y, "single_label_classification", 2,
                             SearchSettings(progress=False, min_relative_spread=0.99))
    with pytest.raises(ValueError, match=r"No layer probe kept any neuron.*lower `min_relative_spread` \(0.99"):
        search.run()


def cv_search(tmp_path, y, num_validation, **settings) -> SelectionSearch:
    cache, _ = make_cache(tmp_path)
    validation = FeatureCache(tmp_path, {"num_texts": num_validation, "blocks": cache.meta["blocks"]})
    return SelectionSearch(cache, validation, y, y[:num_validation], "single_label_classification", 3,
                           SearchSettings(progress=False, **settings))


def test_small_validation_sets_add_stratified_cross_validation_folds(tmp_path):
    y = np.repeat([0, 1, 2], [150, 100, 50])
    search = cv_search(tmp_path, y, num_validation=40)
    folds = search._cross_validation_folds()
    assert len(folds) == 5
    held_out = np.concatenate([fold.val_rows for fold in folds])
    np.testing.assert_array_equal(np.sort(held_out), np.arange(300))  # every sample row is held out exactly once
    for fold in folds:
        assert not set(fold.sample) & set(fold.val_rows) and len(fold.sample) + len(fold.val_rows) == 300
        np.testing.assert_array_equal(np.bincount(fold.y_validation.numpy()), [30, 20, 10])  # stratified
        np.testing.assert_array_equal(fold.y_validation.numpy(), y[fold.val_rows])
    # large validation sets, `cv_folds=0` or too few rows for the folds: the validation set alone
    assert cv_search(tmp_path, y, num_validation=40, cv_below=40)._cross_validation_folds() == []
    assert cv_search(tmp_path, y, num_validation=40, cv_folds=0)._cross_validation_folds() == []
    assert cv_search(tmp_path, y, num_validation=40, search_samples=9)._cross_validation_folds() == []


def test_fold_columns_are_the_search_sample_rows(tmp_path):
    y = np.arange(300) % 3
    search = cv_search(tmp_path, y, num_validation=40)
    stats = block_statistics(search.train, 128)
    fold = search._cross_validation_folds()[2]
    block = ("mlp", "max")
    full = block_rows(search.train, stats, block, np.arange(300))
    torch.testing.assert_close(fold._block(stats, block, validation=True), full[:, fold.val_rows])
    torch.testing.assert_close(fold._block(stats, block, validation=False), full[:, fold.sample])
    torch.testing.assert_close(fold._columns(block, 1, np.array([0, 3]), True), full[1][fold.val_rows][:, [0, 3]])


def test_pooled_candidates_average_scores_weighted_by_validation_rows(tmp_path):
    search = cv_search(tmp_path, np.arange(300) % 3, num_validation=40)
    fold = search._cross_validation_folds()[0]  # 60 held-out rows
    a, b = candidate(range(3), 0.9, loss=0.2), candidate(range(2), 0.8, loss=0.4)
    fold_a = candidate(range(3), 0.5, loss=0.6)  # the fold could not form b
    search.folds = [fold]
    pooled = search._pool_candidates([[a, b], [fold_a]])
    assert [c.layers for c in pooled] == [a.layers, b.layers]
    assert pooled[0].score == pytest.approx((40 * 0.9 + 60 * 0.5) / 100)
    assert pooled[0].loss == pytest.approx((40 * 0.2 + 60 * 0.6) / 100)
    assert pooled[1].score == pytest.approx(0.8) and a.score == 0.9  # the inputs are not modified


def probes_for(cache, seed=0, classes=2) -> dict:
    """Random probe weights per block: [layers, dim, classes]."""
    generator = torch.Generator().manual_seed(seed)
    return {(b["source"], b["pooling"]): (torch.randn(b["num_layers"], b["dim"], classes, generator=generator), None)
            for b in cache.meta["blocks"]}


def test_groups_put_mlp_neurons_first_in_a_layer_so_an_exit_at_the_mlp_is_a_column_range(tmp_path):
    cache, _ = make_cache(tmp_path)
    search = SelectionSearch.__new__(SelectionSearch)
    family = (("hidden", "mean"), ("mlp", "max"))
    probes = probes_for(cache)
    groups = search._groups(family, 0.9, probes, (0, 1, 2))
    assert [(block[0], layer) for block, layer, _ in groups] == [
        ("mlp", 0), ("hidden", 0), ("mlp", 1), ("hidden", 1), ("mlp", 2), ("hidden", 2)]
    sizes = [len(neurons) for _, _, neurons in groups]
    assert _exit_points(groups, (0, 1)) == ["mlp", "block"]
    np.testing.assert_array_equal(_set_columns(groups, (0, 1), "mlp"), np.arange(sum(sizes[:3])))
    np.testing.assert_array_equal(_set_columns(groups, (0, 1), "block"), np.arange(sum(sizes[:4])))
    np.testing.assert_array_equal(_set_columns(groups, (1,), "block"), np.arange(sum(sizes[:2]), sum(sizes[:4])))
    # the groups of a candidate that stops at layer 1's MLP are those columns
    partial = search._groups(family, 0.9, probes, (0, 1), exit_at="mlp")
    assert [(block[0], layer) for block, layer, _ in partial] == [("mlp", 0), ("hidden", 0), ("mlp", 1)]
    # a layer with only hidden neurons, or none, ends after its block
    assert _exit_points(groups[1:2], (0,)) == ["block"]
    assert _exit_points(groups[:2], (1,)) == ["block"]
    assert _exit_points(groups[:1], (0,)) == ["mlp"]


def test_a_chosen_prefix_may_stop_at_its_exit_layers_mlp(tmp_path, monkeypatch):
    """With every prefix within tolerance the search exits at layer 0, and there at its MLP: the packaged selection
    reads only layer 0's MLP neurons, as many as the candidate says."""
    cache, arrays = make_cache(tmp_path)
    y = (arrays[("mlp", "max")][0, :, 0] - 1 + arrays[("hidden", "mean")][0, :, 0] / 4 > 0).astype(int)
    monkeypatch.setattr(selection, "_families", lambda blocks, kind: [tuple(blocks)])
    search = SelectionSearch(cache, cache, y, y, "single_label_classification", 2,
                             SearchSettings(progress=False, early_exit_tolerance=1.0, cv_folds=0))
    result = search.run()
    assert (result.best.layers, result.best.exit_at, result.best.partial_exit) == ((0,), "mlp", True)
    assert {(group["source"], group["layer"]) for group in result.selection} == {("mlp", 0)}
    assert result.best.num_features == sum(len(group["neurons"]) for group in result.selection)
    assert result.weight.shape == (2, result.best.num_features)
    whole = [c for c in result.candidates if c.layers == (0,) and c.exit_at == "block"]
    assert whole and all(c.num_features > result.best.num_features for c in whole)
    assert result.best.key in {c.key for c in result.candidates}


def test_fits_up_to_twice_as_wide_as_the_sample_run_on_their_columns(tmp_path, monkeypatch):
    """17 columns and 12 sample rows: no row space (its Gram matrix and factor would cost more than they save), and
    the row space once the width limit is lowered below 17 / 12."""
    cache, arrays = make_cache(tmp_path)
    y = (arrays[("mlp", "max")][0, :, 0] - 1 + arrays[("hidden", "mean")][1, :, 1] / 4 > 0).astype(int)
    search = SelectionSearch(cache, cache, y, y, "single_label_classification", 2,
                             SearchSettings(progress=False, cv_folds=0, search_samples=12))
    search.layer_probes(block_statistics(cache, 4096))
    family, layers = tuple(cache.blocks), (0, 1, 2)
    groups = search._groups(family, 0.99, search.probes, layers)
    assert sum(len(neurons) for *_, neurons in groups) == 17
    built, build = [], RowSpace.build
    monkeypatch.setattr(RowSpace, "build", lambda X, gram=None: built.append(X.shape) or build(X, gram))
    scores, _ = search._integrate(family, 0.99, [(layers, "block")], groups)
    assert built == [] and torch.isfinite(scores).all()
    monkeypatch.setattr(selection, "_ROW_SPACE_WIDTH", 1)
    search._sample_fits.clear()
    search._integrate(family, 0.99, [(layers, "block")], groups)
    assert built == [(12, 17)]


@pytest.mark.parametrize("search_samples", [3000, 12])  # 12 rows: the larger set is fitted in the row space
def test_nested_column_sets_start_from_the_largest_set_inside_them_fitted_before(tmp_path, monkeypatch, search_samples):
    """Growing etas (and prefixes) are nested column sets: an L2 fit starts at the logits of the largest set inside
    its own that was fitted before, and ends at the objective a cold start reaches."""
    monkeypatch.setattr(selection, "_ROW_SPACE_WIDTH", 1)  # the row space from 13 columns on
    cache, arrays = make_cache(tmp_path)
    y = (arrays[("mlp", "max")][0, :, 0] - 1 + arrays[("hidden", "mean")][1, :, 1] / 4 > 0).astype(int)
    search = SelectionSearch(cache, cache, y, y, "single_label_classification", 2,
                             SearchSettings(progress=False, cv_folds=0, search_samples=search_samples))
    search.layer_probes(block_statistics(cache, 4096))
    family, layers = tuple(cache.blocks), (0, 1, 2)
    groups = {eta: search._groups(family, eta, search.probes, layers) for eta in (0.5, 0.99)}
    ids = {eta: search._column_ids(group) for eta, group in groups.items()}
    X = {eta: torch.cat([search._columns(b, layer, n, False) for b, layer, n in group], 1)
         for eta, group in groups.items()}
    assert np.isin(ids[0.5], ids[0.99]).all() and len(ids[0.5]) < len(ids[0.99])
    assert len(set(ids[0.99].tolist())) == len(ids[0.99])  # one name per column
    assert search._warm_start(ids[0.99]) is None  # nothing fitted yet

    search._integrate(family, 0.5, [(layers, "block")], groups[0.5])
    small = search._sample_fits[(family, 0.5, layers, "block")][0]
    start = search._warm_start(ids[0.99])
    torch.testing.assert_close(predict_probes(X[0.99][None], start), predict_probes(X[0.5][None], small))
    assert search._warm_start(ids[0.5][1:]) is None  # the fitted set is not inside this one

    in_row_space, coordinates = [], RowSpace.coordinates
    monkeypatch.setattr(RowSpace, "coordinates", lambda space, fit: in_row_space.append(1) or coordinates(space, fit))
    search._integrate(family, 0.99, [(layers, "block")], groups[0.99])
    assert len(in_row_space) == (search_samples == 12)  # 17 columns, 12 rows: the start is mapped into the row space
    warm = search._sample_fits[(family, 0.99, layers, "block")][0]
    strengths = torch.tensor(search.settings.final_strengths)
    cold = fit_linear_probes(X[0.99][None], search.y_sample, "single_label_classification", strengths, penalty="l2",
                             max_iter=5000, tol=1e-9)
    objective = {name: probe_objective(X[0.99][None].double(), search.y_sample, "single_label_classification", fit,
                                       strengths, penalty="l2") for name, fit in (("warm", warm), ("cold", cold))}
    assert (objective["warm"] - objective["cold"] <= 1e-3 * objective["cold"]).all()


@pytest.mark.parametrize("grid, peak, expected, rounds", [
    ((1.0, 10.0), 0.05, 0.03, 2),  # weak edge: 0.3, 0.1 (edge again), then 0.03 (interior), 0.01
    ((0.1, 1.0), 50.0, 30.0, 2),  # strong edge: 3, 10, then 30, 100
    ((1.0, 10.0), 1e-9, 0.001, 3),  # at most three extensions
    ((0.1, 1.0, 10.0), 1.0, 1.0, 0),  # interior: nothing to extend
])
def test_l2_strengths_are_extended_beyond_the_edge_until_the_choice_is_interior(monkeypatch, grid, peak, expected,
                                                                               rounds):
    search = depth_search()
    search.settings = SearchSettings(final_strengths=grid)
    score = lambda strength: 1 - abs(np.log10(strength / peak)) / 20  # noqa: E731
    asked = []

    def strength_candidates(self, chosen, strengths):
        asked.append(strengths)
        return [Candidate(chosen.blocks, chosen.eta, chosen.layers, s, score(s), chosen.num_features, 0.5)
                for s in strengths]

    monkeypatch.setattr(SelectionSearch, "_strength_candidates", strength_candidates)
    best = min(grid, key=lambda s: -score(s))
    chosen = Candidate((("hidden", "mean"),), 0.9, (0, 1), best, score(best), 10, 0.5)
    candidates = []
    result = search._extend_strengths(chosen, candidates)
    assert result.strength == pytest.approx(expected) and len(asked) == rounds
    assert [c.strength for c in candidates] == [s for strengths in asked for s in strengths]
    assert all(s == float(f"{s:.6g}") for strengths in asked for s in strengths)  # 0.03, not 0.030000000000000006


def test_l2_extension_needs_a_higher_validation_score(monkeypatch):
    """A tie (even at a lower validation loss) keeps the edge strength; of two higher scores the best wins, and of
    equal ones the lower loss."""
    search = depth_search()
    search.settings = SearchSettings(final_strengths=(1.0, 10.0))
    chosen = Candidate((("hidden", "mean"),), 0.9, (0, 1), 1.0, 0.8, 10, 0.5)
    for scores, losses, expected in (([0.8, 0.8], [0.4, 0.3], 1.0), ([0.79, 0.8], [0.4, 0.4], 1.0),
                                     ([0.85, 0.81], [0.4, 0.3], 0.3), ([0.81, 0.81], [0.4, 0.3], 0.1)):
        def strength_candidates(self, c, strengths, scores=scores, losses=losses):
            if min(strengths) < 0.1:  # a second round (from 0.1): nothing better
                return [replace(c, strength=s, score=0.0) for s in strengths]
            return [replace(c, strength=s, score=v, loss=loss) for s, v, loss in zip(strengths, scores, losses)]

        monkeypatch.setattr(SelectionSearch, "_strength_candidates", strength_candidates)
        assert search._extend_strengths(chosen, []).strength == pytest.approx(expected)
    assert search._extend_strengths(replace(chosen, strength=5.0), []).strength == 5.0  # not an edge of the grid
    search.settings = SearchSettings(final_strengths=(1.0,))
    assert search._extend_strengths(chosen, []).strength == 1.0  # a grid of one strength is taken as given


@pytest.mark.parametrize("cv", [False, True])
def test_a_search_at_the_weak_edge_refits_at_the_extended_strength(tmp_path, cv):
    """Validation rows that are the training rows reward ever weaker penalties: the grid (30, 100) is extended three
    times, to 0.03, and the packaged head is the all-rows L2 fit at 0.03. With cross-validation folds every fold fits
    the new strengths too."""
    cache, arrays = make_cache(tmp_path)
    y = (arrays[("mlp", "max")][2, :, 0] - 1 + arrays[("hidden", "mean")][2, :, 1] / 4 > 0).astype(int)
    validation = FeatureCache(tmp_path, {"num_texts": 40 if cv else 300, "blocks": cache.meta["blocks"]})
    search = SelectionSearch(cache, validation, y, y[: validation.num_texts], "single_label_classification", 2,
                             SearchSettings(progress=False, final_strengths=(30.0, 100.0)))
    result = search.run()
    same = sorted(c.strength for c in result.candidates if c.key[:-1] == result.best.key[:-1])
    assert same == [0.03, 0.09, 0.3, 0.9, 3.0, 9.0, 30.0, 100.0] and result.best.strength == 0.03
    assert len(search.folds) == (5 if cv else 0)
    for fold in search.folds:
        assert {key[-1] for key in fold._extension_fits} == {0.03, 0.09, 0.3, 0.9, 3.0, 9.0}
    columns = [arrays[(g["source"], g["pooling"])][g["layer"]][:, g["neurons"]] for g in result.selection]
    X = ((torch.from_numpy(np.concatenate(columns, 1)) - result.mean) / result.scale)[None].double()
    head = ProbeFit(result.weight.T[None, None].double(), result.bias[None, None].double(), 0, None)
    strength = torch.tensor([0.03])
    cold = fit_linear_probes(X.float(), torch.from_numpy(y), "single_label_classification", strength, penalty="l2",
                             max_iter=5000, tol=1e-9)
    objective = {name: probe_objective(X, torch.from_numpy(y), "single_label_classification", fit, strength,
                                       penalty="l2") for name, fit in (("head", head), ("cold", cold))}
    assert (objective["head"] - objective["cold"] <= 1e-4 * objective["cold"]).all()
