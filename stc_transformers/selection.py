"""Neuron selection on cached features: per-layer L1 probes, eta selection, cross-layer integration.

Everything here works on a `FeatureCache` (memory-mapped, `[layers, texts, dim]` per source/pooling block) and
the batched probes of `probes.py`. The search runs on a bounded sample of the training rows, so its memory and
time do not grow with the dataset; the chosen candidate is then refitted on every training row, streamed from
disk in row chunks.

Search, for each problem type:
1. per block and layer, L1 probes over a data-adaptive strength grid (ratios of each layer's `lambda_max`,
   extended while the best strength sits at the weak edge); a layer's score is its best validation score. Neurons
   whose spread over the training rows is below `min_relative_spread` of their size are left out
   (`features_stc.steady_features`): rounding in bfloat16 or float16 is a large share of their spread;
2. per family of blocks (all blocks and each source; also each pooling with `families="all"`) and eta: keep per
   layer the smallest neuron set reaching `eta` of the L1 probe's importance, fit the final L2 classifier on all
   layers' kept neurons;
   when the sample is smaller than the training set, the best `finalists` (family, eta) pairs are refitted on
   every training row (fits on the sample undervalue larger neuron sets). Among the candidates whose validation
   score is within its noise (binomial standard error) of the best, the lowest validation loss wins (`_tie_break`);
3. for the best (family, eta): fit every layer prefix 0..k and every single layer k; pick the earliest prefix within
   `early_exit_tolerance` of the best score, and a single layer instead only when it beats that prefix by more than
   the validation noise (see `_choose_depth`). A chosen prefix whose exit layer has MLP and other neurons is also
   fitted without the others: within the tolerance, the backbone stops at that layer's MLP down-projection;
4. while the chosen L2 strength sits at an edge of its grid, fit the chosen layer set at two strengths beyond that
   edge (`_extend_strengths`): one of them is chosen when it scores higher;
5. refit the winner on all training rows.

Validation sets of fewer than `cv_below` rows decide by chance between candidates a few texts apart. Then
`cv_folds` folds of the search sample join them (`_Fold`): each fold runs stages 1-4 on the other folds' rows and
scores its own, every choice (each layer's L1 strength, the family and eta, the depth and L2 strength) is taken on
the scores of the validation rows and the held-out rows together, weighted by rows, and the all-rows finalists of
stage 2 are left out (README: +0.5 to +3.8 points of test accuracy with 1,000 to 64 training texts, +0.6 with
10,200 training and 150 validation texts).

The L2 fits of stages 2 and 3 run in the row space of the sample (`RowSpace`: an n x n factor of the Gram
matrix, the same objective) whenever a candidate has more than twice as many columns as the sample has rows, as
on LLM backbones.
Stage 2 takes its Gram matrices from per-block parts that grow with eta and are shared by the families
(`_BlockGrams`); stage 3 updates those of growing prefixes (`_PrefixGrams`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from .extraction import FeatureCache, empty_rows
from .features_stc import MIN_RELATIVE_SPREAD, steady_features
from .probes import (
    ProbeFit,
    RowSpace,
    fit_linear_probes,
    lambda_max,
    predict_probes,
    score_predictions,
    select_by_importance,
    validation_loss,
)


METRIC_NAMES = {
    "single_label_classification": "accuracy",
    "multi_label_classification": "micro_f1",
    "regression": "r2",
}


@dataclass
class SearchSettings:
    etas: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
    strength_ratios: tuple[float, ...] = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.003, 0.001)
    final_strengths: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0)
    search_samples: int = 3000
    max_iter: int = 100
    tol: float = 1e-3
    refit_max_iter: int = 300
    refit_tol: float = 1e-4
    families: str = "sources"
    finalists: int = 3
    early_exit_tolerance: float = 0.002
    min_relative_spread: float = MIN_RELATIVE_SPREAD
    cv_folds: int = 5
    cv_below: int = 200
    chunk_rows: int = 4096
    bf16_probes: bool | None = None  # bfloat16 products in the layer probes (None: where the CPU has them natively)
    device: str | torch.device = "cpu"
    seed: int = 42
    progress: bool = True


@dataclass
class Candidate:
    """One integration candidate and its validation score."""

    blocks: tuple[tuple[str, str], ...]
    eta: float
    layers: tuple[int, ...]
    strength: float
    score: float
    num_features: int
    loss: float = math.nan  # validation loss (`probes.validation_loss`): breaks ties between scores
    all_rows_score: float | None = None  # validation score when refitted on every training row (finalists)
    all_rows_loss: float | None = None
    exit_at: str = "block"  # where the backbone stops in the exit layer: after its block, or at its "mlp"
    partial_exit: bool = False  # reads only the MLP neurons of an exit layer that has other kept neurons

    @property
    def key(self) -> tuple:
        return self.blocks, self.eta, self.layers, self.exit_at, self.strength

    def as_dict(self) -> dict:
        return {
            "sources": sorted({s for s, _ in self.blocks}),
            "poolings": sorted({p for _, p in self.blocks}),
            "eta": self.eta,
            "exit_layer": max(self.layers),
            "exit_at": self.exit_at,
            "layers": "single" if len(self.layers) == 1 and self.layers[0] > 0 else "prefix",
            "strength": self.strength,
            "validation_score": round(float(self.score), 6),
            "validation_loss": round(float(self.loss), 6),
            "all_rows_validation_score": None if self.all_rows_score is None else round(float(self.all_rows_score), 6),
            "all_rows_validation_loss": None if self.all_rows_loss is None else round(float(self.all_rows_loss), 6),
            "num_features": self.num_features,
        }


@dataclass
class SelectionResult:
    """What the search chose, ready for `STCForSequenceClassification.set_selection`."""

    selection: list[dict]
    weight: torch.Tensor  # [num_labels, F]
    bias: torch.Tensor  # [num_labels]
    mean: torch.Tensor  # [F]
    scale: torch.Tensor  # [F]
    best: Candidate
    candidates: list[Candidate]
    layer_scores: dict[str, list[float]]
    base_score: float
    validation_outputs: torch.Tensor  # [n_val, num_labels] from the cached features
    seconds: dict[str, float] = field(default_factory=dict)
    cross_validation_folds: int = 0  # folds whose held-out rows were scored with the validation rows


# --------------------------------------------------------------------------------------------------------------------
# Standardisation and row gathering
# --------------------------------------------------------------------------------------------------------------------


def is_run(index: np.ndarray) -> bool:
    """Whether sorted row ids form one contiguous run (read from a cache with `FeatureCache.read_rows`)."""
    return bool(index.size) and int(index[-1]) - int(index[0]) + 1 == index.size


def read_block(cache: FeatureCache, block, index: np.ndarray, layers=None, out=None) -> np.ndarray:
    """`[layers, len(index), dim]` of one block at sorted row ids (all layers or the given ones), into `out`
    (default: a new `empty_rows`): file reads for a contiguous run, a memory-map gather for scattered rows (e.g. a
    small sample of a large cache)."""
    if is_run(index):
        return cache.read_rows(*block, int(index[0]), int(index[-1]) + 1, layers, out=out)
    array = cache.array(*block)
    layers = range(array.shape[0]) if layers is None else list(layers)
    out = empty_rows(len(layers), len(index), array.shape[2]) if out is None else out
    for position, layer in enumerate(layers):
        np.take(array[layer], index, axis=0, out=out[position])
    return out


_CHUNK_BYTES = 1 << 28  # most bytes of a chunk of rows read into memory at once
_STRENGTH_EXTENSIONS = 3  # at most 3 extensions of the L2 grid beyond an edge (each two strengths, down to 0.001x)
# An L2 fit runs in the sample's row space when its columns outnumber the rows this many times. Narrower, the Gram
# matrix and its Cholesky factor cost more than the smaller products save (MiniLM/movie valence, 3,000 rows: 3,020
# and 4,311 columns took 1.23 and 1.48 s in the row space, 0.33 and 0.46 s without; SmolLM2/Rotten Tomatoes, 2,000
# rows: the row space wins from about twice as many columns as rows).
_ROW_SPACE_WIDTH = 2


def _at_strength(fit: ProbeFit, s: int) -> ProbeFit:
    """The fit of the `s`-th strength alone (views of `fit`'s tensors)."""
    return ProbeFit(fit.weight[:, s : s + 1], fit.bias[:, s : s + 1], fit.n_iter, fit.converged[:, s : s + 1])


def block_statistics(cache: FeatureCache, chunk_rows: int) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Per block, mean and scale `[layers, dim]` over all rows (zero variance -> scale 1).

    Sums run over values shifted by the first row (float32 within a chunk, float64 across chunks), so the
    variance keeps its precision even for features far from zero (e.g. near the fp16 maximum). Chunks (at most
    `chunk_rows` rows and `_CHUNK_BYTES`) are read into one reused buffer: fresh large allocations are page-faulted
    in at a cost similar to the arithmetic.
    """
    stats = {}
    for block in cache.blocks:
        array = cache.array(*block)
        shift = torch.from_numpy(np.array(array[:, :1]))  # [layers, 1, dim]
        total = torch.zeros(array.shape[::2], dtype=torch.float64)
        squares = torch.zeros_like(total)
        step = max(1, min(chunk_rows, _CHUNK_BYTES // (array.shape[0] * array.shape[2] * array.itemsize)))
        buffer = empty_rows(array.shape[0], min(step, cache.num_texts), array.shape[2])
        for start in range(0, cache.num_texts, step):
            rows = min(step, cache.num_texts - start)
            cache.read_rows(*block, start, start + rows, out=buffer[:, :rows])
            chunk = torch.from_numpy(buffer[:, :rows]).sub_(shift)
            total += chunk.sum(1)  # float32 within a chunk (fast), float64 across chunks
            squares += chunk.square_().sum(1)
        offset = (total / cache.num_texts).numpy()
        mean = shift[:, 0].double().numpy() + offset
        scale = np.sqrt(np.maximum(squares.numpy() / cache.num_texts - np.square(offset), 0.0))
        scale[scale < 1e-6 * (np.abs(mean) + 1.0)] = 1.0
        stats[block] = (mean.astype(np.float32), scale.astype(np.float32))
    return stats


class FeatureMatrix:
    """Standardised columns of a cache: a list of (block, layer, neuron ids) groups, read rows on demand."""

    def __init__(self, cache: FeatureCache, stats, groups: list[tuple[tuple[str, str], int, np.ndarray]]):
        self.cache, self.groups = cache, groups
        self.mean = np.concatenate([stats[b][0][layer, neurons] for b, layer, neurons in groups])
        self.scale = np.concatenate([stats[b][1][layer, neurons] for b, layer, neurons in groups])

    @property
    def num_features(self) -> int:
        return len(self.mean)

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Standardised features [len(index), F] of the given rows (sorted internally, returned in order)."""
        order = np.argsort(index, kind="stable")
        dims = {(b["source"], b["pooling"]): b["dim"] for b in self.cache.meta["blocks"]}
        # one read buffer for every group and one output filled group by group: no allocation per group
        buffer = empty_rows(len(index) * max((dims[block] for block, _, _ in self.groups), default=0))
        values, start = torch.empty(len(index), self.num_features), 0
        for block, layer, neurons in self.groups:
            read = read_block(self.cache, block, index[order], [layer],
                              out=buffer[: len(index) * dims[block]].reshape(1, len(index), dims[block]))
            # index_select with `out=` a column slice takes a slow strided path (6x): select, then copy
            values[:, start : start + len(neurons)] = torch.from_numpy(read[0]).index_select(
                1, torch.as_tensor(neurons, dtype=torch.long))
            start += len(neurons)
        values.sub_(torch.from_numpy(self.mean)).div_(torch.from_numpy(self.scale))
        if not np.array_equal(order, np.arange(len(order))):
            values[torch.from_numpy(order)] = values.clone()
        return values

    def materialize(self, path, chunk_rows: int) -> torch.Tensor:
        """All rows written to a memory-mapped file, returned as a zero-copy tensor (memory stays flat: chunks of at
        most `chunk_rows` rows and `_CHUNK_BYTES`)."""
        shape = (self.cache.num_texts, self.num_features)
        offset = np.lib.format.open_memmap(path, "w+", np.float32, shape).offset
        chunk_rows = max(1, min(chunk_rows, _CHUNK_BYTES // (4 * max(1, self.num_features))))
        with open(path, "r+b") as file:  # file writes: faster than first touches of the map's pages
            file.seek(offset)
            for start in range(0, self.cache.num_texts, chunk_rows):  # noqa: FURB122 (writelines keeps 2 chunks alive)
                file.write(self.rows(np.arange(start, min(start + chunk_rows, self.cache.num_texts))).numpy().data)
        return torch.from_numpy(np.load(path, mmap_mode="r+"))


def block_rows(cache, stats, block, index: np.ndarray, layers=None) -> torch.Tensor:
    """Standardised `[layers, len(index), dim]` of one block for sorted row ids (all layers, or the given ones)."""
    mean, scale = stats[block]
    if layers is not None:
        layers = list(layers)
        mean, scale = mean[layers], scale[layers]
    values = read_block(cache, block, index, layers)
    values -= mean[:, None]
    values /= scale[:, None]
    return torch.from_numpy(values)


# --------------------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------------------


def _families(blocks: list[tuple[str, str]], kind: str = "sources") -> list[tuple[tuple[str, str], ...]]:
    """Block families tried in the integration: all blocks, then per source (and per pooling for "all")."""
    families = [tuple(blocks)]
    for key in (0, 1) if kind == "all" else (0,):
        for value in sorted({b[key] for b in blocks}):
            family = tuple(b for b in blocks if b[key] == value)
            if family not in families:
                families.append(family)
    return families


def _exit_points(groups, layers) -> list[str]:
    """Where a backbone read through `groups` (restricted to `layers`) can stop in its last layer, cheapest first:
    "mlp" (at that layer's MLP down-projection, reading only its MLP neurons) where it has MLP neurons, and "block"
    (after the whole block) where it has others; just "block" when it has none."""
    last = max(layers)
    sources = {block[0] for block, layer, _ in groups if layer == last}
    points = (["mlp"] if "mlp" in sources else []) + (["block"] if sources - {"mlp"} else [])
    return points or ["block"]


def _set_columns(groups, layers, exit_at: str) -> np.ndarray:
    """Column ids (of the groups' concatenation) read by a layer set: the groups of `layers`, and only the MLP
    groups of the last one when `exit_at` is "mlp"."""
    last, chosen = max(layers), []
    for block, layer, neurons in groups:
        chosen.append(np.full(len(neurons), layer in layers and (exit_at != "mlp" or layer != last or
                                                                block[0] == "mlp")))
    return np.flatnonzero(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


class _PrefixGrams:
    """The sample and validation columns X, X_val of one candidate, and the Gram matrices ``A A^T`` and ``A_val A^T``
    of their column ranges A = X[:, start:stop] (A_val of X_val alike).

    Ranges from column 0 that grow (the layer prefixes 0..k, in order) add the new columns' products to the
    previous result instead of recomputing it. Returned tensors are shared: do not modify them.
    """

    def __init__(self, X: torch.Tensor, X_val: torch.Tensor, whole=None):
        self.X, self.X_val, self.whole = X, X_val, whole  # whole(): the products of all columns, from elsewhere
        self.stop, self.gram, self.cross_gram = 0, None, None

    def get(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.whole is not None and start == 0 and stop == self.X.shape[1]:
            return self.whole()
        if start != 0:
            A = self.X[:, start:stop]
            return A @ A.T, self.X_val[:, start:stop] @ A.T
        if self.gram is None or stop < self.stop:
            n, m = self.X.shape[0], self.X_val.shape[0]
            self.stop, self.gram, self.cross_gram = 0, self.X.new_zeros(n, n), self.X.new_zeros(m, n)
        A = self.X[:, self.stop : stop]
        self.gram.addmm_(A, A.T)
        self.cross_gram.addmm_(self.X_val[:, self.stop : stop], A.T)
        self.stop = stop
        return self.gram, self.cross_gram


class _BlockGrams:
    """Gram matrices ``A A^T`` and ``A_val A^T`` of the sample and validation columns of whole candidates (every
    layer of a family of blocks at one eta), as sums of one part per block.

    The all-layer candidates of stage 2 differ by family (a union of blocks) and by eta (per layer, a larger eta
    keeps a superset of a smaller one's neurons). A block's part grows by the products of its new columns only, so
    with etas in increasing order each column's products are computed once, not once per family and eta (SmolLM2,
    Rotten Tomatoes: 23k columns instead of 127k). A request that is not a superset of a block's part rebuilds it.
    """

    def __init__(self, search: "SelectionSearch"):
        self.search = search
        self.parts: dict = {}  # block -> (neurons per layer, gram, cross_gram)

    def get(self, groups) -> tuple[torch.Tensor, torch.Tensor]:
        wanted: dict = {}
        for block, layer, neurons in groups:
            wanted.setdefault(block, {})[layer] = neurons
        gram = cross_gram = None
        for block, layers in wanted.items():
            part, cross_part = self._part(block, layers)
            gram = part.clone() if gram is None else gram.add_(part)
            cross_gram = cross_part.clone() if cross_gram is None else cross_gram.add_(cross_part)
        return gram, cross_gram

    def _part(self, block, wanted: dict) -> tuple[torch.Tensor, torch.Tensor]:
        search = self.search
        covered, gram, cross_gram = self.parts.get(block, ({}, None, None))
        if gram is None or any(not np.isin(neurons, wanted.get(layer, ())).all() for layer, neurons in covered.items()):
            n, m = len(search.sample), len(search.val_rows)
            covered = {}
            gram = torch.zeros(n, n, device=search.device)
            cross_gram = torch.zeros(m, n, device=search.device)
        new = [(layer, np.setdiff1d(neurons, covered.get(layer, ()))) for layer, neurons in wanted.items()]
        new = [(layer, neurons) for layer, neurons in new if neurons.size]
        if new:
            A = torch.cat([search._columns(block, layer, neurons, False) for layer, neurons in new], 1)
            A_val = torch.cat([search._columns(block, layer, neurons, True) for layer, neurons in new], 1)
            A, A_val = A.to(search.device), A_val.to(search.device)
            gram.addmm_(A, A.T)
            cross_gram.addmm_(A_val, A.T)
        self.parts[block] = (dict(wanted), gram, cross_gram)
        return gram, cross_gram


def _mean_of_known(weights: list, values: list) -> float:
    """Weighted mean of the values that are not NaN (NaN when none is)."""
    known = [(w, value) for w, value in zip(weights, values) if not math.isnan(value)]
    return sum(w * value for w, value in known) / sum(w for w, _ in known) if known else math.nan


class SelectionSearch:
    """Runs the search for one problem; see the module docstring."""

    def __init__(self, train: FeatureCache, validation: FeatureCache, y_train, y_validation, task: str,
                 num_labels: int, settings: SearchSettings):
        self.train, self.validation = train, validation
        self.task, self.num_labels, self.settings = task, num_labels, settings
        self.device = torch.device(settings.device)
        self.y_train = torch.as_tensor(y_train)
        self.y_validation = torch.as_tensor(y_validation)
        # Regression targets are centred per column and scaled by one factor: neither the solvers' stopping rule
        # (relative to the weights and bias) nor float32's range then depends on the targets' offset or units. Scores
        # (R^2) and the order of losses are unchanged; `run` maps the head and the losses back.
        self.target_shift, self.target_scale = torch.zeros(()), 1.0
        if task == "regression":
            targets = self.y_train.double()
            spread = float(targets.std(0).mean()) if len(targets) > 1 else 1.0
            self.target_shift, self.target_scale = targets.mean(0), spread if math.isfinite(spread) and spread else 1.0
            self.y_train = self._standardised(self.y_train)
            self.y_validation = self._standardised(self.y_validation)
        rng = np.random.default_rng(settings.seed)
        n = train.num_texts
        self.sample = np.sort(rng.choice(n, settings.search_samples, replace=False)) if n > settings.search_samples \
            else np.arange(n)
        self.y_sample = self.y_train[self.sample]
        self.val_rows = np.arange(validation.num_texts)
        self.folds: list[_Fold] = []  # cross-validation folds scored with the validation rows (`run`)
        self.num_layers = train.meta["blocks"][0]["num_layers"]
        # standardised search sample and validation rows per block, kept from stage 1 (size bounded by
        # `search_samples` and the validation set, not by the training set)
        self.sample_blocks: dict[tuple[str, str], torch.Tensor] = {}
        self.validation_blocks: dict[tuple[str, str], torch.Tensor] = {}
        self._sample_fits: dict[tuple, tuple] = {}  # (blocks, eta, layers, exit) -> L2 sample fit, scores, losses, ids
        self._extension_fits: dict[tuple, ProbeFit] = {}  # candidate key -> sample fit at a strength off the grid
        self._all_rows_fits: dict[tuple, tuple] = {}
        self.probes: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # stage 1, per block

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _standardised(self, targets: torch.Tensor) -> torch.Tensor:
        return ((targets.double() - self.target_shift) / self.target_scale).float()

    def _in_target_units(self, result: "SelectionResult") -> "SelectionResult":
        """A regression result mapped back from standardised targets: head, validation outputs and losses."""
        scale, shift = self.target_scale, self.target_shift.float()
        result.weight, result.bias = result.weight * scale, result.bias * scale + shift
        result.validation_outputs = result.validation_outputs * scale + shift

        def unscaled(candidate: Candidate) -> Candidate:
            rows = None if candidate.all_rows_loss is None else candidate.all_rows_loss * scale**2
            return replace(candidate, loss=candidate.loss * scale**2, all_rows_loss=rows)

        result.best, result.candidates = unscaled(result.best), [unscaled(c) for c in result.candidates]
        return result

    def _fit(self, X, Y, strengths, **kwargs):
        kwargs.setdefault("max_iter", self.settings.max_iter)
        kwargs.setdefault("tol", self.settings.tol)
        kwargs.setdefault("bf16_products", self.settings.bf16_probes)
        return fit_linear_probes(X.to(self.device), Y.to(self.device), self.task, strengths,
                                 num_classes=self.num_labels if self.task == "single_label_classification" else None,
                                 **kwargs)

    def _score(self, X_val, fit) -> torch.Tensor:
        """Validation scores [G, S] of fitted probes."""
        outputs = predict_probes(X_val.to(self.device), fit)
        return score_predictions(outputs, self.y_validation.to(self.device), self.task)

    def _judge(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation scores and losses [G, S] of outputs [G, S, n_val, C]."""
        y = self.y_validation.to(outputs.device)
        return score_predictions(outputs, y, self.task), validation_loss(outputs, y, self.task)

    def _bar(self, total, desc):
        return tqdm(total=total, desc=desc, disable=not self.settings.progress, unit="fit")

    # -- stage 1 -----------------------------------------------------------------------------------------------------

    def layer_probes(self, stats) -> dict:
        """Best L1 probe per block and layer: weights [layers, dim, C] and validation scores [layers].

        With cross-validation folds, the strength of each layer is chosen on the validation scores of this search
        and of the folds together (`_pooled`), and every fold keeps its probes at that strength (`fold.probes`).
        The scores returned are this search's own, on its validation rows.
        """
        searches = self.searches
        ratios = torch.tensor(self.settings.strength_ratios)
        bar = self._bar(len(self.train.blocks), "Layer probes")
        for block in self.train.blocks:
            grids = [search._probe_grid(stats, block, ratios) for search in searches]
            scores = self._pooled([grid["scores"] for grid in grids])
            # extend the grid towards weaker penalties for the layers whose best strength sits at the weak edge
            edge = torch.nonzero(scores.argmax(1) == scores.shape[1] - 1).flatten()
            if edge.numel():
                for search, grid in zip(searches, grids):
                    search._extend_grid(grid, edge)
                scores = self._pooled([grid["scores"] for grid in grids])
            best, layers = scores.argmax(1), torch.arange(scores.shape[0])
            for search, grid in zip(searches, grids):  # each keeps its own validation scores at the chosen strengths
                search.probes[block] = (grid["weight"][layers, best], grid["scores"][layers, best])
            bar.update(1)
        bar.close()
        return self.probes

    def _probe_grid(self, stats, block, ratios) -> dict:
        """L1 probes of every layer of one block over the strength grid: weights [layers, S, dim, C], scores."""
        X, X_val = self._block(stats, block, validation=False), self._block(stats, block, validation=True)
        y = self.y_sample
        mean, scale = (torch.from_numpy(values) for values in stats[block])
        steady = steady_features(mean, scale, self.settings.min_relative_spread)
        mask = None if steady.all() else steady.to(self.device)
        lam_max = lambda_max(X.to(self.device), y.to(self.device), self.task, mask,
                             num_classes=self.num_labels if self.task == "single_label_classification" else None)
        strengths = lam_max[:, None] * ratios.to(lam_max)[None, :]
        fit = self._fit(X, y, strengths, feature_mask=mask)
        return {"X": X, "X_val": X_val, "mask": mask, "strengths": strengths,
                "scores": self._score(X_val, fit).cpu(), "weight": fit.weight.cpu()}

    def _extend_grid(self, grid: dict, edge: torch.Tensor):
        """Two weaker strengths (0.3x and 0.1x the weakest) for the `edge` layers; -inf scores for the others."""
        weaker = grid["strengths"][edge, -1:] * torch.tensor([0.3, 0.1]).to(grid["strengths"])
        mask = grid["mask"]
        extra = self._fit(grid["X"][edge], self.y_sample, weaker,
                          feature_mask=None if mask is None else mask[edge.to(mask.device)])
        scores, weight = grid["scores"], grid["weight"]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], 2), -math.inf)], 1)
        scores[edge, -2:] = self._score(grid["X_val"][edge], extra).cpu()
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], 2, *weight.shape[2:])], 1)
        weight[edge, -2:] = extra.weight.cpu()
        grid["scores"], grid["weight"] = scores, weight

    def _block(self, stats, block, validation: bool) -> torch.Tensor:
        """Standardised `[layers, rows, dim]` of one block for the sample (or validation) rows, kept for stage 2."""
        kept = self.validation_blocks if validation else self.sample_blocks
        if block not in kept:
            cache, rows = (self.validation, self.val_rows) if validation else (self.train, self.sample)
            kept[block] = block_rows(cache, stats, block, rows)
        return kept[block]

    def _columns(self, block, layer: int, neurons: np.ndarray, validation: bool) -> torch.Tensor:
        """Sample (or validation) rows of some neurons of one block and layer, standardised."""
        return (self.validation_blocks if validation else self.sample_blocks)[block][layer][:, neurons]

    @property
    def searches(self) -> list["SelectionSearch"]:
        """This search and its cross-validation folds, whose scores are pooled."""
        return [self, *self.folds]

    def _pooled(self, values: list) -> float | torch.Tensor:
        """Scores (or losses) of `self.searches`, in that order, averaged with their validation rows as weights; a
        NaN (R^2 of a fold whose held-out targets are constant) counts on the others."""
        if not self.folds:
            return values[0]
        weights = [len(search.val_rows) for search in self.searches]
        if not isinstance(values[0], torch.Tensor):
            return _mean_of_known(weights, values)
        known = [~value.isnan() for value in values]
        total = sum(w * torch.where(k, value, 0.0) for w, k, value in zip(weights, known, values))
        return total / sum(w * k for w, k in zip(weights, known))

    # -- stages 2 and 3 ----------------------------------------------------------------------------------------------

    def _groups(self, family, eta, probes, layers, exit_at="block") -> list[tuple[tuple[str, str], int, np.ndarray]]:
        """Kept neurons of the family's blocks in the given layers, ordered layer-major and MLP blocks first within a
        layer (so that every prefix, ending after a layer's block or at its MLP neurons, is a column range); with
        `exit_at="mlp"` only the MLP neurons of the last layer."""
        groups, last = [], max(layers)
        for layer in layers:
            for block in sorted(family, key=lambda b: b[0] != "mlp"):  # stable: the family's order otherwise
                if exit_at == "mlp" and layer == last and block[0] != "mlp":
                    continue
                keep = select_by_importance(probes[block][0][layer], eta)
                neurons = torch.nonzero(keep).flatten().numpy()
                if neurons.size:
                    groups.append((block, layer, neurons))
        return groups

    def _matrices(self, stats, groups) -> tuple[FeatureMatrix, FeatureMatrix]:
        """Train and validation matrices of the same columns, both standardised with training statistics."""
        return FeatureMatrix(self.train, stats, groups), FeatureMatrix(self.validation, stats, groups)

    def _integrate(self, family, eta, layer_sets, groups, block_grams: _BlockGrams | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation scores and losses [len(layer_sets), strengths] of the final L2 classifier on each layer set
        (layers, exit point; see `_set_columns`).

        Columns are ordered as `_groups` orders them, so every prefix and every single layer is a contiguous column
        range:
        each set is fitted on a slice of one matrix (all strengths at once). A set with more columns than sample
        rows `_ROW_SPACE_WIDTH` times is fitted in its row space (`RowSpace`, same objective); the Gram matrices of
        growing prefixes are updated, not recomputed. Fits and scores are kept: a set fitted before (the all-layer
        set of the depth stage) is not fitted again, and the fits warm-start the refits on every training row. `block_grams` gives
        the Gram matrices of the set of all columns (stage 2).
        """
        X, X_val = self._sample_columns(groups)
        strengths = torch.tensor(self.settings.final_strengths)
        scores = torch.full((len(layer_sets), len(strengths)), -math.inf)
        losses = torch.full((len(layer_sets), len(strengths)), math.inf, dtype=torch.float64)
        whole = None if block_grams is None else (lambda: block_grams.get(groups))
        grams, ids = _PrefixGrams(X, X_val, whole), self._column_ids(groups)
        for i, (layers, exit_at) in enumerate(layer_sets):
            key = (family, eta, tuple(layers), exit_at)
            if key in self._sample_fits:
                scores[i], losses[i] = self._sample_fits[key][1:3]
                continue
            columns = _set_columns(groups, layers, exit_at)
            if columns.size == 0:
                continue
            start, stop = int(columns[0]), int(columns[-1]) + 1
            assert stop - start == columns.size, "a layer set must be a column range (see `_groups`)"
            fit, outputs = self._fit_columns(grams, start, stop, strengths, self._warm_start(ids[start:stop]))
            score, loss = self._judge(outputs)
            scores[i], losses[i] = score[0].cpu(), loss[0].cpu()
            self._sample_fits[key] = fit, scores[i].clone(), losses[i].clone(), ids[start:stop]
        return scores, losses

    def _sample_columns(self, groups) -> tuple[torch.Tensor, torch.Tensor]:
        """The groups' standardised columns of the sample and validation rows, in the groups' order."""
        X = torch.cat([self._columns(b, layer, neurons, False) for b, layer, neurons in groups], 1).to(self.device)
        X_val = torch.cat([self._columns(b, layer, neurons, True) for b, layer, neurons in groups], 1).to(self.device)
        return X, X_val

    def _fit_columns(self, grams: _PrefixGrams, start: int, stop: int, strengths,
                     init: ProbeFit | None) -> tuple[ProbeFit, torch.Tensor]:
        """L2 fit on the sample's columns start:stop and its validation outputs [1, S, n_val, C]; in the row space
        when the columns outnumber the rows `_ROW_SPACE_WIDTH` times. `init`: a warm start on these columns (all
        strengths), or None."""
        X, X_val = grams.X[:, start:stop], grams.X_val[:, start:stop]
        space = None
        if X.shape[1] > _ROW_SPACE_WIDTH * X.shape[0]:
            gram, cross_gram = grams.get(start, stop)
            space = RowSpace.build(X, gram)
        if space is None:
            fit = self._fit(X[None], self.y_sample, strengths, penalty="l2", init=init)
            return fit, predict_probes(X_val[None], fit)
        init = None if init is None else space.coordinates(init)
        fit = self._fit(space.features[None], self.y_sample, strengths, penalty="l2", init=init)
        return space.weights(fit), predict_probes(space.transform(cross_gram)[None], fit)

    def _column_ids(self, groups) -> np.ndarray:
        """One integer per column of the groups' concatenation, naming its block, layer and neuron."""
        names = [(self.train.blocks.index(block) * self.num_layers + layer) * (1 << 32) + neurons.astype(np.int64)
                 for block, layer, neurons in groups]
        return np.concatenate(names) if names else np.zeros(0, dtype=np.int64)

    def _warm_start(self, ids: np.ndarray) -> ProbeFit | None:
        """The sample fit (all strengths) of the largest column set inside `ids` fitted before, as weights on `ids`,
        zero on the columns it lacks: the same logits, a start near the optimum for nested sets (growing etas and
        prefixes). None when no earlier set is inside `ids`."""
        order = np.argsort(ids, kind="stable")
        ordered = ids[order]
        for fit, _, _, known in sorted(self._sample_fits.values(), key=lambda value: -len(value[3])):
            if not 0 < len(known) <= len(ids):
                continue
            found = np.searchsorted(ordered, known).clip(max=len(ids) - 1)
            if np.array_equal(ordered[found], known):
                weight = fit.weight.new_zeros(*fit.weight.shape[:2], len(ids), fit.weight.shape[3])
                weight[:, :, torch.from_numpy(order[found])] = fit.weight
                return ProbeFit(weight, fit.bias.clone(), 0, fit.converged)
        return None

    def run(self) -> SelectionResult:
        seconds = {}
        started = time.perf_counter()
        stats = block_statistics(self.train, self.settings.chunk_rows)
        self.folds = self._cross_validation_folds()
        searches = self.searches
        probes = self.layer_probes(stats)
        seconds["layer_probes"] = time.perf_counter() - started
        layer_scores = {f"{s}/{p}": probes[(s, p)][1].tolist() for s, p in self.train.blocks}
        base_block = self.train.blocks[0]
        base_score = float(probes[base_block][1][-1])

        families = _families(self.train.blocks, self.settings.families)
        bar = self._bar(len(searches) * len(families) * len(self.settings.etas), "Integration")
        candidates = self._pool_candidates([search._all_layer_candidates(families, bar) for search in searches])
        bar.close()
        if not candidates:
            spread = self.settings.min_relative_spread
            raise ValueError(
                "No layer probe kept any neuron: the training labels give the probes nothing to fit (e.g. constant "
                "regression targets, or too few examples). Check the labels or add examples."
                + (f" Or lower `min_relative_spread` ({spread}; default {MIN_RELATIVE_SPREAD}): it leaves out every "
                   "neuron whose spread is below that share of its size." if spread > MIN_RELATIVE_SPREAD else "")
            )
        if self.folds:
            best = self._tie_break(candidates, lambda c: c.score, lambda c: c.loss)
        else:
            best = self._final_round(candidates, probes, stats)

        # early exit and single layers for the best family and eta
        depth_candidates = self._pool_candidates([search._depth_candidates(best.blocks, best.eta)
                                                  for search in searches])
        candidates += [c for c in depth_candidates if c.layers != tuple(range(self.num_layers))]
        chosen = self._choose_depth(depth_candidates, best)
        if chosen.layers[0] == 0:  # a prefix: its exit layer's MLP neurons alone may do as well, and stop earlier
            partial = self._pool_candidates([search._partial_exit_candidates(chosen) for search in searches])
            candidates += partial
            chosen = self._choose_depth(depth_candidates + partial, best)
        chosen = self._extend_strengths(chosen, candidates)
        seconds["integration"] = time.perf_counter() - started - seconds["layer_probes"]

        result = self._package(chosen, *self._fit_all_rows(chosen, probes, stats))
        result.candidates = sorted(candidates, key=lambda c: -c.score)
        result.layer_scores, result.base_score = layer_scores, base_score
        result.cross_validation_folds = len(self.folds)
        seconds["refit"] = time.perf_counter() - started - seconds["layer_probes"] - seconds["integration"]
        result.seconds = seconds
        return self._in_target_units(result) if self.task == "regression" else result

    def _all_layer_candidates(self, families, bar) -> list[Candidate]:
        """Stage 2: the L2 classifier on every layer's kept neurons, per family of blocks and eta."""
        all_layers = tuple(range(self.num_layers))
        found, block_grams = {}, _BlockGrams(self)
        for eta in sorted(self.settings.etas):  # growing etas: the Gram matrices grow by the new columns only
            for family in families:
                groups = self._groups(family, eta, self.probes, all_layers)
                if groups:
                    layer_sets = [(all_layers, _exit_points(groups, all_layers)[-1])]
                    scores, losses = self._integrate(family, eta, layer_sets, groups, block_grams)
                    found[family, eta] = self._candidates(family, eta, layer_sets, scores, losses, groups)
                bar.update(1)
        return [c for family in families for eta in self.settings.etas for c in found.get((family, eta), [])]

    def _depth_candidates(self, blocks, eta) -> list[Candidate]:
        """Stage 3: every layer prefix 0..k and every single layer k > 0 of one family and eta."""
        groups = self._groups(blocks, eta, self.probes, tuple(range(self.num_layers)))
        if not groups:  # a cross-validation fold whose probes kept nothing (e.g. constant targets in its rows)
            return []
        layer_sets = [(layers, _exit_points(groups, layers)[-1])
                      for layers in [tuple(range(k + 1)) for k in range(self.num_layers)]
                      + [(k,) for k in range(1, self.num_layers)]]
        scores, losses = self._integrate(blocks, eta, layer_sets, groups)
        return self._candidates(blocks, eta, layer_sets, scores, losses, groups)

    def _partial_exit_candidates(self, prefix: Candidate) -> list[Candidate]:
        """A prefix without the other neurons of its exit layer: the backbone then stops at that layer's MLP
        down-projection. None where the exit layer has only MLP neurons, or none of them."""
        groups = self._groups(prefix.blocks, prefix.eta, self.probes, prefix.layers)  # no columns past the prefix
        if not groups or _exit_points(groups, prefix.layers) != ["mlp", "block"]:
            return []
        layer_sets = [(prefix.layers, "mlp")]
        scores, losses = self._integrate(prefix.blocks, prefix.eta, layer_sets, groups)
        return self._candidates(prefix.blocks, prefix.eta, layer_sets, scores, losses, groups)

    def _extend_strengths(self, chosen: Candidate, candidates: list[Candidate]) -> Candidate:
        """Stage 4: while the chosen L2 strength is the weakest (strongest) of the strengths tried, its layer set is
        fitted at 0.3x and 0.1x (3x and 10x) that strength, at most `_STRENGTH_EXTENSIONS` times; the best new
        strength replaces the choice only when it scores higher, as within the grid (`_choose_depth` compares a
        layer set's strengths by score): a validation set that the edge strength already nearly saturates ties the
        new ones, and a tie is no evidence of a better penalty beyond the edge (measured in the README). A grid of one
        strength is taken as given. The new candidates join `candidates`."""
        tried = set(self.settings.final_strengths)
        if len(tried) < 2:
            return chosen
        for _ in range(_STRENGTH_EXTENSIONS):
            if chosen.strength == min(tried):
                factors = (0.3, 0.1)
            elif chosen.strength == max(tried):
                factors = (3.0, 10.0)
            else:
                break
            strengths = tuple(float(f"{chosen.strength * factor:.6g}") for factor in factors)  # 0.03, not 0.030..06
            tried.update(strengths)
            found = self._pool_candidates([search._strength_candidates(chosen, strengths) for search in self.searches])
            candidates += found
            better = [c for c in found if c.score > chosen.score]
            if not better:
                break
            chosen = max(better, key=lambda c: (c.score, -c.loss))
        return chosen

    def _strength_candidates(self, chosen: Candidate, strengths: tuple[float, ...]) -> list[Candidate]:
        """The chosen candidate's layer set fitted on the sample at other L2 strengths, warm-started from its fit at
        the chosen strength; none where this search never fitted that set (a cross-validation fold without it)."""
        start = self._sample_fit(chosen)
        if start is None:
            return []
        groups = self._groups(chosen.blocks, chosen.eta, self.probes, chosen.layers, chosen.exit_at)
        X, X_val = self._sample_columns(groups)
        init = ProbeFit(start.weight.expand(-1, len(strengths), -1, -1).clone(),
                        start.bias.expand(-1, len(strengths), -1).clone(), 0,
                        start.converged.expand(-1, len(strengths)).clone())
        fit, outputs = self._fit_columns(_PrefixGrams(X, X_val), 0, X.shape[1], torch.tensor(strengths), init)
        score, loss = self._judge(outputs)
        found = []
        for s, strength in enumerate(strengths):
            candidate = replace(chosen, strength=strength, score=float(score[0, s]), loss=float(loss[0, s]))
            self._extension_fits[candidate.key] = _at_strength(fit, s)
            found.append(candidate)
        return found

    # -- cross-validation ----------------------------------------------------------------------------------------

    def _cross_validation_folds(self) -> list["_Fold"]:
        """With fewer than `cv_below` validation rows, `cv_folds` folds of the search sample (stratified for
        single-label tasks): every choice of the search is then made on the validation rows and the folds' held-out
        rows together, not on a few hundred validation texts alone."""
        k = self.settings.cv_folds
        if k < 2 or len(self.val_rows) >= self.settings.cv_below or len(self.sample) < 2 * k:
            return []
        rng = np.random.default_rng(self.settings.seed + 1)
        fold_of = np.empty(len(self.sample), dtype=np.int64)
        if self.task == "single_label_classification":
            y, start = self.y_sample.numpy(), 0  # classes continue the rotation: fold sizes differ by one at most
            for value in np.unique(y):
                rows = rng.permutation(np.flatnonzero(y == value))
                fold_of[rows] = (start + np.arange(len(rows))) % k
                start += len(rows)
        else:
            fold_of[rng.permutation(len(self.sample))] = np.arange(len(self.sample)) % k
        return [_Fold(self, np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]

    def _pool_candidates(self, lists: list[list[Candidate]]) -> list[Candidate]:
        """This search's candidates (`lists[0]`) with scores and losses averaged over `self.searches` (weighted by
        validation rows); a candidate that a fold could not form (no kept neuron there) counts on the others."""
        if not self.folds:
            return lists[0]
        by_key = [{c.key: c for c in candidates} for candidates in lists]
        pooled = []
        for candidate in lists[0]:
            found = [(len(search.val_rows), keyed[candidate.key]) for search, keyed in zip(self.searches, by_key)
                     if candidate.key in keyed]
            weights = [weight for weight, _ in found]
            score = _mean_of_known(weights, [c.score for _, c in found])  # see `_pooled`
            loss = _mean_of_known(weights, [c.loss for _, c in found])
            pooled.append(replace(candidate, score=score, loss=loss))
        return pooled

    def _choose_depth(self, depth_candidates: list[Candidate], best: Candidate) -> Candidate:
        """The prefix to exit after (the cheapest within `early_exit_tolerance` of the best score: the earliest exit
        layer, and in that layer its MLP before its whole block), replaced by a single layer only when that layer
        beats it by more than the validation noise.

        The best score is that of the whole-layer prefixes: an exit at a layer's MLP (`_partial_exit_candidates`) is
        a cheaper way to reach their accuracy, never a reason to exit later.

        A single layer is one of many candidates scored on the same validation rows; on small validation sets the
        best of them wins by chance (measured: 212 BBC validation texts picked a single layer at 0.981 that scored
        0.934 on test, against 0.962 for the prefix). The noise is the binomial standard error of the score,
        sqrt(s (1 - s) / n) (accuracy, and approximately micro-F1); regression scores (R^2) use the tolerance alone.
        """
        tolerance = self.settings.early_exit_tolerance
        prefixes = [c for c in depth_candidates if c.layers[0] == 0]
        top = max(c.score for c in prefixes + [best] if not c.partial_exit)
        chosen = min([c for c in prefixes if c.score >= top - tolerance],
                     key=lambda c: (max(c.layers), c.exit_at != "mlp", c.num_features, -c.score))
        singles = [c for c in depth_candidates if c.layers[0] != 0]
        if not singles:
            return chosen
        single = max(singles, key=lambda c: (c.score, -max(c.layers), -c.num_features))
        return single if single.score > chosen.score + max(self._noise(chosen.score), tolerance) else chosen

    def _candidates(self, family, eta, layer_sets, scores, losses, groups) -> list[Candidate]:
        out = []
        for g, (layers, exit_at) in enumerate(layer_sets):
            num_features = len(_set_columns(groups, layers, exit_at))
            if num_features == 0:
                continue
            partial = exit_at != _exit_points(groups, layers)[-1]
            for s, strength in enumerate(self.settings.final_strengths):
                out.append(Candidate(family, eta, layers, strength, float(scores[g, s]), num_features,
                                     float(losses[g, s]), exit_at=exit_at, partial_exit=partial))
        return out

    def _final_round(self, candidates: list[Candidate], probes, stats) -> Candidate:
        """The all-layer candidate to continue with: among those whose score is within the validation noise of the
        best, the one with the lowest validation loss (`_tie_break`). With a subsampled search the top (family, eta)
        pairs are refitted on every training row first and compared by those refits."""
        ranked = sorted(candidates, key=lambda c: (-c.score, c.num_features))
        finalists, seen = [], set()
        for candidate in ranked:
            if (candidate.blocks, candidate.eta) not in seen:
                seen.add((candidate.blocks, candidate.eta))
                finalists.append(candidate)
        finalists = finalists[: self.settings.finalists]
        if len(self.sample) == self.train.num_texts or len(finalists) < 2:
            return self._tie_break(ranked, lambda c: c.score, lambda c: c.loss)
        for candidate in finalists:
            score, loss = self._judge(self._fit_all_rows(candidate, probes, stats)[3][None, None])
            candidate.all_rows_score, candidate.all_rows_loss = float(score[0, 0]), float(loss[0, 0])
        return self._tie_break(finalists, lambda c: c.all_rows_score, lambda c: c.all_rows_loss)

    def _noise(self, score: float) -> float:
        """Binomial standard error of a validation score, sqrt(s (1 - s) / n) (accuracy, and approximately
        micro-F1); 0 for regression."""
        if self.task == "regression":
            return 0.0
        rows = sum(len(search.val_rows) for search in self.searches)  # with cross-validation, the held-out rows too
        return math.sqrt(max(score * (1 - score), 0.0) / max(rows, 1))

    def _tie_break(self, candidates: list[Candidate], score, loss) -> Candidate:
        """The lowest validation loss among the candidates whose score is within the noise of the best one.

        Validation accuracy moves in steps of one text, and on a few hundred texts candidates tie or differ by
        chance (measured: Rotten Tomatoes features extracted in batches of 32 instead of 64 tied two finalists at
        0.7969 on 1,275 texts; fewer neurons won the tie and scored 0.8119 on test against 0.8292). The loss, a
        proper scoring rule, uses each prediction's confidence and separates them with less noise.
        """
        top = max(score(c) for c in candidates)
        close = [c for c in candidates if score(c) >= top - self._noise(top)]
        return min(close, key=lambda c: (loss(c), c.num_features, -score(c)))

    def _fit_all_rows(self, candidate: Candidate, probes, stats):
        """Fit a candidate on every training row (streamed from disk in chunks): (groups, standardisation, fit,
        validation outputs). Results are kept, so the final refit of a finalist is free."""
        key = candidate.key
        if key in self._all_rows_fits:
            return self._all_rows_fits[key]
        groups = self._groups(candidate.blocks, candidate.eta, probes, candidate.layers, candidate.exit_at)
        matrix, validation = self._matrices(stats, groups)
        path = self.train.path / "selected_features.npy"
        X = matrix.materialize(path, self.settings.chunk_rows)[None]
        fit = self._fit(X, self.y_train, torch.tensor([candidate.strength]), penalty="l2",
                        chunk_size=self.settings.chunk_rows, max_iter=self.settings.refit_max_iter,
                        tol=self.settings.refit_tol, init=self._sample_fit(candidate))
        del X
        path.unlink(missing_ok=True)
        outputs = predict_probes(validation.rows(self.val_rows)[None].to(self.device), fit)[0, 0].cpu()
        self._all_rows_fits[key] = groups, matrix, fit, outputs
        return self._all_rows_fits[key]

    def _sample_fit(self, candidate: Candidate) -> ProbeFit | None:
        """The candidate's fit on the search sample (same columns and strength), a warm start for its refit."""
        if candidate.key in self._extension_fits:
            return self._extension_fits[candidate.key]
        fit = self._sample_fits.get(candidate.key[:-1], (None,))[0]  # fits are kept per key without the strength
        if fit is None:
            return None
        s = self.settings.final_strengths.index(candidate.strength)
        return _at_strength(fit, s)

    def _package(self, chosen: Candidate, groups, matrix: FeatureMatrix, fit, outputs) -> SelectionResult:
        """The chosen candidate's head, ready for `set_selection`."""
        selection = [
            {"source": block[0], "pooling": block[1], "layer": int(layer), "neurons": neurons.tolist()}
            for block, layer, neurons in groups
        ]
        weight = fit.weight[0, 0].T.cpu()
        bias = fit.bias[0, 0].cpu()
        if self.task == "regression" and weight.shape[0] != self.num_labels:
            raise RuntimeError("regression head width does not match num_labels")
        return SelectionResult(
            selection=selection,
            weight=weight,
            bias=bias,
            mean=torch.from_numpy(matrix.mean),
            scale=torch.from_numpy(matrix.scale),
            best=chosen,
            candidates=[],
            layer_scores={},
            base_score=math.nan,
            validation_outputs=outputs,
        )


class _Fold(SelectionSearch):
    """One cross-validation fold of a search: fits on part of the search's sample rows and scores the rest.

    It reads the search's standardised sample blocks (no copy kept), never refits on all rows, and is driven by
    the search (`SelectionSearch.run`), which takes every decision on the pooled scores.
    """

    def __init__(self, search: SelectionSearch, train_positions: np.ndarray, validation_positions: np.ndarray):
        self.search = search
        self.train = self.validation = search.train
        self.task, self.num_labels, self.settings = search.task, search.num_labels, search.settings
        self.device, self.num_layers, self.y_train = search.device, search.num_layers, search.y_train
        self.positions = {False: torch.from_numpy(train_positions), True: torch.from_numpy(validation_positions)}
        self.sample, self.val_rows = search.sample[train_positions], search.sample[validation_positions]
        self.y_sample = search.y_sample[self.positions[False]]
        self.y_validation = search.y_sample[self.positions[True]]
        self.folds, self.sample_blocks, self.validation_blocks = [], {}, {}
        self._sample_fits, self._extension_fits, self._all_rows_fits, self.probes = {}, {}, {}, {}

    def _block(self, stats, block, validation: bool) -> torch.Tensor:
        return self.search._block(stats, block, False).index_select(1, self.positions[validation])

    def _columns(self, block, layer: int, neurons: np.ndarray, validation: bool) -> torch.Tensor:
        return self.search._columns(block, layer, neurons, False).index_select(0, self.positions[validation])
