"""STC's probe stage and selection against a faithful sklearn reimplementation of the reference method, on the same
real cached features. Prints numbers; not a test.

Both pipelines run on the same rows (the fit's search sample of the training split, the validation split), the same
standardisation, the same L1 strength grid (ratios of each layer's lambda_max) and the same eta and final-strength
grids:

* reference: one sklearn fit at a time, as the reference code does: per layer and strength an L1
  `LogisticRegression(solver="saga", max_iter=100)`; per layer the strength with the best validation accuracy;
  neurons kept by the eta rule; then for every eta and layer prefix 0..k one L2 `LogisticRegression` (lbfgs) per
  strength; the best validation accuracy wins;
* ours: the same steps with `stc_transformers.probes` (all layers x strengths in one batched solve, all final
  strengths of a prefix at once), with the fit's own iteration settings.

The chosen (eta, exit layer, strength) of each pipeline is scored on the test split.

    python benchmarks/bench_reference.py --model minilm --data rotten_tomatoes_offline \\
        --blocks hidden/mean mlp/mean --seeds 42 43 44

Each (block, seed) is one comparison on its own search sample; the summary gives the paired differences of the chosen
settings' accuracies (ours - reference), since one validation set of a few hundred texts picks noisily.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_probes import Timer, run_sklearn
from bench_stc import subsample
from transformers import AutoTokenizer

from stc_transformers import STCForSequenceClassification
from stc_transformers.backbones import resolve_backbone
from stc_transformers.data import load_text_dataset
from stc_transformers.extraction import extract_features
from stc_transformers.probes import (
    fit_linear_probes,
    lambda_max,
    predict_probes,
    score_predictions,
    select_by_importance,
)
from stc_transformers.selection import SearchSettings, block_rows, block_statistics
from stc_transformers.trainer import LabelEncoder


TASK = "single_label_classification"


def best_per_layer(weight: torch.Tensor, accuracy: np.ndarray) -> torch.Tensor:
    """Weights [layers, d, C] of each layer's best-validation strength."""
    best = np.nanargmax(accuracy, axis=1)
    return weight[torch.arange(weight.shape[0]), torch.from_numpy(best)]


def integrate(weights, X, y, Xv, yv, Xt, yt, settings: SearchSettings, fit_prefix):
    """For every eta and prefix 0..k, `fit_prefix` returns validation and test accuracy per final strength; the best
    validation accuracy (ties: fewer neurons) wins. Returns (chosen dict, seconds)."""
    best = None
    with Timer() as timer:
        for eta in settings.etas:
            keep = [torch.nonzero(select_by_importance(w, eta)).flatten() for w in weights]
            for k in range(len(keep)):
                size = sum(len(keep[g]) for g in range(k + 1))
                if size == 0:
                    continue
                A, Av, At = (torch.cat([F[g][:, keep[g]] for g in range(k + 1)], 1) for F in (X, Xv, Xt))
                val, test = fit_prefix(A, y, Av, yv, At, yt)
                for s, strength in enumerate(settings.final_strengths):
                    key = (val[s], -size)
                    if best is None or key > best[0]:
                        best = (key, {"eta": eta, "exit_layer": k, "strength": strength, "neurons": size,
                                      "validation_accuracy": round(float(val[s]), 4),
                                      "test_accuracy": round(float(test[s]), 4)})
    return best[1], timer.wall


def ours_prefix(settings):
    def fit(X, y, Xv, yv, Xt, yt):
        probe = fit_linear_probes(X[None], y, TASK, torch.tensor(settings.final_strengths), penalty="l2",
                                  max_iter=settings.max_iter, tol=settings.tol)
        return [score_predictions(predict_probes(A[None], probe), b, TASK)[0].numpy() for A, b in ((Xv, yv), (Xt, yt))]

    return fit


def reference_prefix(settings, num_classes):
    from sklearn.linear_model import LogisticRegression

    def fit(X, y, Xv, yv, Xt, yt):
        scores = []
        for strength in settings.final_strengths:
            # our objective mean(loss) + strength/2 |W|^2 in sklearn's C (binary: one weight vector, see probes.py)
            C = (2.0 if num_classes == 2 else 1.0) / (len(y) * strength)
            model = LogisticRegression(C=C, max_iter=1000)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(X.numpy(), y.numpy())
            scores.append((model.score(Xv.numpy(), yv.numpy()), model.score(Xt.numpy(), yt.numpy())))
        return np.array(scores).T

    return fit


def compare(caches, stats, ys, num_classes, block, seed, settings, samples):
    """One probe-stage comparison on the search sample drawn with `seed` (`stats`: the training cache's
    `block_statistics`); returns its report."""
    rng = np.random.default_rng(seed)
    n = caches[0].num_texts
    sample = np.sort(rng.choice(n, samples, replace=False)) if n > samples else np.arange(n)
    X = block_rows(caches[0], stats, block, sample)
    Xv = block_rows(caches[1], stats, block, np.arange(caches[1].num_texts))
    Xt = block_rows(caches[2], stats, block, np.arange(caches[2].num_texts))
    y, yv, yt = ys[0][sample], ys[1], ys[2]
    layers, _, dim = X.shape
    strengths = lambda_max(X, y, TASK)[:, None] * torch.tensor(settings.strength_ratios)[None]
    print(f"block {'/'.join(block)}, seed {seed}: {layers} layers x {dim} neurons, {len(y)} probe rows, "
          f"{len(yv)} validation, {len(yt)} test; {strengths.shape[1]} L1 strengths per layer", flush=True)

    with Timer() as ours_timer:
        fit = fit_linear_probes(X, y, TASK, strengths, max_iter=settings.max_iter, tol=settings.tol)
    ours_accuracy = score_predictions(predict_probes(Xv, fit), yv, TASK).numpy()
    print(f"ours: probe stage {ours_timer.wall:.2f} s", flush=True)
    ref_wall, ref_cpu, ref_accuracy, n_warnings, ref_fit = run_sklearn(
        X.numpy(), y.numpy(), Xv.numpy(), yv.numpy(), strengths.numpy(), list(range(layers)))
    print(f"reference: probe stage {ref_wall:.1f} s ({n_warnings} ConvergenceWarnings)", flush=True)

    ours_chosen, ours_integration = integrate(best_per_layer(fit.weight, ours_accuracy), X, y, Xv, yv, Xt, yt,
                                              settings, ours_prefix(settings))
    ref_chosen, ref_integration = integrate(best_per_layer(ref_fit.weight, ref_accuracy), X, y, Xv, yv, Xt, yt,
                                            settings, reference_prefix(settings, num_classes))
    rows = [("per-layer L1 probes", ours_timer.wall, ref_wall), ("eta x prefix integration", ours_integration,
                                                                 ref_integration)]
    print(f"\n{'stage':28s} {'ours s':>9s} {'sklearn s':>10s} {'speed-up':>9s}")
    for name, ours, ref in rows + [("total", sum(r[1] for r in rows), sum(r[2] for r in rows))]:
        print(f"{name:28s} {ours:9.2f} {ref:10.1f} {ref / ours:8.1f}x")
    print("per layer best validation accuracy (ours | reference):")
    for g in range(layers):
        print(f"  layer {g}: {np.nanmax(ours_accuracy[g]):.4f} | {np.nanmax(ref_accuracy[g]):.4f}")
    print(f"chosen, ours:      {ours_chosen}")
    print(f"chosen, reference: {ref_chosen}\n", flush=True)
    return {"block": "/".join(block), "seed": seed, "rows": len(y),
            "seconds": {name: {"ours": round(o, 3), "reference": round(r, 2)} for name, o, r in rows},
            "ours": ours_chosen, "reference": ref_chosen, "reference_convergence_warnings": n_warnings}


def summarize(reports) -> dict:
    """Paired differences (ours - reference) of the chosen settings' accuracies over all runs."""
    print(f"{'block':12s} {'seed':>5s} {'probes: ours / sklearn':>24s} {'validation: ours / ref':>24s} "
          f"{'test: ours / ref':>18s} {'neurons: ours / ref':>20s}")
    for r in reports:
        o, f, t = r["ours"], r["reference"], r["seconds"]["per-layer L1 probes"]
        print(f"{r['block']:12s} {r['seed']:5d} {t['ours']:10.2f} s / {t['reference']:7.1f} s "
              f"{o['validation_accuracy']:12.4f} / {f['validation_accuracy']:.4f} "
              f"{o['test_accuracy']:9.4f} / {f['test_accuracy']:.4f} {o['neurons']:11d} / {f['neurons']}")
    summary = {}
    for split in ("validation", "test"):
        diff = np.array([r["ours"][f"{split}_accuracy"] - r["reference"][f"{split}_accuracy"] for r in reports])
        error = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        summary[split] = {"mean_difference": round(float(diff.mean()), 4), "standard_error": round(float(error), 4),
                          "better": int((diff > 0).sum()), "equal": int((diff == 0).sum()),
                          "worse": int((diff < 0).sum())}
        spread = f"+- {error:.4f} (standard error over {len(diff)} runs)" if len(diff) > 1 else "(one run)"
        print(f"{split}: ours - reference = {diff.mean():+.4f} {spread}; "
              f"better {summary[split]['better']}, equal {summary[split]['equal']}, worse {summary[split]['worse']}")
    speed = [r["seconds"]["per-layer L1 probes"]["reference"] / r["seconds"]["per-layer L1 probes"]["ours"]
             for r in reports]
    summary["probe_speedup"] = {"min": round(min(speed), 1), "max": round(max(speed), 1)}
    print(f"probe-stage speed-up: {min(speed):.0f}x to {max(speed):.0f}x")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="rotten_tomatoes_offline")
    parser.add_argument("--blocks", nargs="+", default=["hidden/mean"], help="source/pooling blocks to probe")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42],
                        help="one comparison per seed, each on its own search sample of the training split")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--samples", type=int, default=SearchSettings.search_samples,
                        help="training rows of the probe stage (the fit's search sample)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--cache-dir", default="outputs/bench_reference/cache")
    args = parser.parse_args(argv)
    settings = SearchSettings(progress=False)

    path = resolve_backbone(args.model)
    data = load_text_dataset(args.data)
    splits = [subsample(data[name], limit, 42) for name, limit in
              (("train", args.train_limit), ("validation", args.eval_limit), ("test", args.eval_limit))]
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = STCForSequenceClassification.from_backbone_pretrained(path)
    caches = [extract_features(dense, tokenizer, list(s["text"]), args.cache_dir, max_length=args.max_length,
                               batch_size=64, progress=True) for s in splits]
    encoder = LabelEncoder.fit(list(splits[0]["label"]))
    if encoder.task != TASK:
        raise SystemExit("bench_reference compares single-label classification probes.")
    ys = [encoder.encode(list(s["label"])) for s in splits]
    print(f"{args.model} on {args.data}", flush=True)
    warm = torch.randn(2, 64, 8)  # the first solve in a process pays torch's one-time set-up: keep it out of timings
    fit_linear_probes(warm, torch.arange(64) % 2, TASK, torch.tensor([0.1, 0.01]), max_iter=5)
    stats = block_statistics(caches[0], settings.chunk_rows)  # one pass over the training cache for all runs
    reports = [compare(caches, stats, ys, encoder.num_labels, tuple(block.split("/")), seed, settings, args.samples)
               for block in args.blocks for seed in args.seeds]
    report = {"model": args.model, "data": args.data, "runs": reports, "summary": summarize(reports)}
    out = Path(args.cache_dir).parent / f"{args.model}-{args.data}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
