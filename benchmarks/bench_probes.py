"""Batched probes (stc_transformers.probes) vs sklearn saga, one probe at a time. Prints numbers; not a test.

For each configuration (d features, C classes) it builds synthetic "layer features" for G layers, fits our
probes for all layers x S strengths in one call, and fits sklearn ``LogisticRegression(l1, saga, max_iter=100)``
one layer and strength at a time (like the reference STC code, without a process pool), on the same
standardised data and the same strength grid (``C = 1 / (n * strength)``). It reports wall times, the speed-up,
sklearn's convergence warnings and, per layer, the validation accuracy of the best strength for both.

sklearn saga takes minutes per probe at d=1536, so by default it is timed on a subset of layers and its time
for all G layers is extrapolated (printed as such); ``--sklearn-layers all`` fits every layer.

    python benchmarks/bench_probes.py                       # all four configurations
    python benchmarks/bench_probes.py --configs 384x2 --sklearn-layers all
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from stc_transformers.probes import (
    ProbeFit,
    fit_linear_probes,
    lambda_max,
    predict_probes,
    probe_objective,
    score_predictions,
)


TASK = "single_label_classification"


def make_layers(G=6, n_train=8000, n_val=1000, d=384, classes=2, n_signal=300, rank=24, seed=0):
    """Synthetic layer features: class signal spread over ``n_signal`` features, strongest in middle layers,
    on top of correlated noise (a rank-``rank`` factor model plus isotropic noise, as in the anisotropic
    hidden states of transformers). Standardised with training statistics; float32."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    y = rng.integers(0, classes, size=n)
    layers = []
    for g in range(G):
        loadings = (rng.normal(size=(rank, d)) * rng.uniform(0.3, 1.5, size=(rank, 1))).astype(np.float32)
        X = rng.normal(size=(n, rank)).astype(np.float32) @ loadings
        X += rng.normal(size=(n, d)).astype(np.float32) + rng.normal(size=(1, d)).astype(np.float32) * 0.5
        signal = rng.choice(d, size=min(n_signal, d), replace=False)
        strength = 3 * (0.022 + 0.02 * np.sin(np.pi * (g + 1) / (G + 1)))
        X[:, signal] += (rng.normal(size=(classes, len(signal))) * strength)[y].astype(np.float32)
        layers.append(X)
    X = np.stack(layers)
    mean, std = X[:, :n_train].mean(1, keepdims=True), X[:, :n_train].std(1, keepdims=True)
    X = ((X - mean) / std).astype(np.float32)
    return X[:, :n_train].copy(), y[:n_train], X[:, n_train:].copy(), y[n_train:]


class Timer:
    """Wall-clock and CPU (all threads of this process) seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_ours(X, y, Xv, yv, ratios, repeats=2):
    """All layers x strengths in one call (lambda_max + fit); the fastest of ``repeats`` runs."""
    X, y, Xv, yv = map(torch.from_numpy, (X, y, Xv, yv))
    runs = []
    for _ in range(repeats):
        with Timer() as timer:
            strengths = lambda_max(X, y, TASK)[:, None] * torch.as_tensor(ratios, dtype=torch.float32)[None]
            fit = fit_linear_probes(X, y, TASK, strengths)
        runs.append(timer)
    accuracy = score_predictions(predict_probes(Xv, fit), yv, TASK).numpy()
    return min(runs, key=lambda r: r.wall), accuracy, strengths.numpy(), fit


def run_sklearn(X, y, Xv, yv, strengths, layers):
    """sklearn saga L1 logistic regression, one probe at a time, max_iter=100 like the reference code."""
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    new_api = tuple(int(part) for part in sklearn.__version__.split(".")[:2]) >= (1, 8)
    l1_penalty = dict(l1_ratio=1.0) if new_api else dict(penalty="l1")  # penalty= is deprecated since 1.8

    G, S = strengths.shape
    n, d = X.shape[1:]
    C = int(y.max()) + 1
    accuracy = np.full((G, S), np.nan)
    weight, bias = np.zeros((G, S, d, C), np.float32), np.zeros((G, S, C), np.float32)
    wall, cpu, n_warnings = 0.0, 0.0, 0
    for g in layers:
        for s, lam in enumerate(strengths[g]):
            model = LogisticRegression(C=1 / (n * lam), solver="saga", max_iter=100, tol=1e-4, **l1_penalty)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                with Timer() as timer:
                    model.fit(X[g], y)
            wall, cpu = wall + timer.wall, cpu + timer.cpu
            n_warnings += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            accuracy[g, s] = model.score(Xv[g], yv)
            if C == 2:  # sklearn's single vector v is our [-v/2, v/2]
                weight[g, s] = np.stack([-model.coef_[0], model.coef_[0]], -1) / 2
                bias[g, s] = np.array([-model.intercept_[0], model.intercept_[0]]) / 2
            else:
                weight[g, s], bias[g, s] = model.coef_.T, model.intercept_
        print(f"    sklearn layer {g}: {wall:.1f}s so far", flush=True)
    fit = ProbeFit(torch.from_numpy(weight), torch.from_numpy(bias), 100, torch.zeros(G, S, dtype=torch.bool))
    return wall, cpu, accuracy, n_warnings, fit


def sklearn_layers(choice: str, G: int, d: int, classes: int) -> list[int]:
    """Layers to fit with sklearn: 'auto' keeps its run to roughly 5-15 minutes per configuration."""
    if choice == "all":
        return list(range(G))
    if choice != "auto":
        return [int(g) for g in choice.split(",")]
    if d * classes <= 1024:
        return list(range(G))
    return [0, G // 2] if d <= 512 else [G // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="384x2,384x5,1536x2,1536x5", help="comma list of DxC")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--strengths", type=int, default=8)
    parser.add_argument("--sklearn-layers", default="auto",
                        help="'all', 'none', a comma list of layer ids, or 'auto' (all for 384x2, 2 layers "
                        "for 384x5, the middle layer at d=1536)")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma list of torch thread counts to time our solver with (sklearn saga uses one)")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    ratios = np.logspace(-0.5, -2.5, args.strengths)  # strengths = lambda_max(layer) * ratios
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start")
    print(f"torch {torch.__version__}; G={args.layers}, n={args.n_train} "
          f"train / {args.n_val} val, S={args.strengths} strengths = lambda_max * logspace(-0.5, -2.5)")
    for config in args.configs.split(","):
        d, classes = map(int, config.lower().split("x"))
        X, y, Xv, yv = make_layers(args.layers, args.n_train, args.n_val, d, classes)
        print(f"\n== d={d}, {classes} classes ==")
        ours = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            ours[threads], ours_acc, strengths, fit = run_ours(X, y, Xv, yv, ratios)
            print(f"  ours, {threads} thread(s): {ours[threads].wall:7.2f}s wall, {ours[threads].cpu:7.2f}s CPU for "
                  f"{args.layers * args.strengths} probes ({fit.n_iter} iterations, "
                  f"{fit.converged.float().mean().item():.0%} converged at tol 1e-4)", flush=True)
        if args.sklearn_layers == "none":
            continue
        layers = sklearn_layers(args.sklearn_layers, args.layers, d, classes)
        sk_wall, sk_cpu, sk_acc, n_warnings, sk_fit = run_sklearn(X, y, Xv, yv, strengths.astype(np.float64), layers)
        scale = args.layers / len(layers)
        note = "" if len(layers) == args.layers else f" (measured on layers {layers}, x{scale:g} to all layers)"
        print(f"  sklearn: {sk_wall * scale:7.1f}s wall, {sk_cpu * scale:7.1f}s CPU for "
              f"{args.layers * args.strengths} probes{note}; {n_warnings}/{len(layers) * args.strengths} "
              "ConvergenceWarnings")
        for threads, timer in ours.items():
            print(f"  speed-up with {threads} thread(s): {sk_wall * scale / timer.wall:.0f}x wall-clock, "
                  f"{sk_cpu * scale / timer.cpu:.0f}x CPU time")
        print("  layer | best val acc: ours (strength #) | sklearn (strength #)")
        for g in layers:
            print(f"  {g:5d} | {ours_acc[g].max():18.3f} ({ours_acc[g].argmax()})"
                  f" | {sk_acc[g].max():13.3f} ({sk_acc[g].argmax()})")
        print(f"  mean  | {ours_acc[layers].max(1).mean():18.4f}     | {sk_acc[layers].max(1).mean():13.4f}")
        # training objective (mean loss + strength * ||W||_1; lower is better) of both, probe by probe
        args_ = (torch.from_numpy(X), torch.from_numpy(y), TASK)
        ours_obj = probe_objective(*args_, fit, torch.from_numpy(strengths))[layers].double()
        sk_obj = probe_objective(*args_, sk_fit, torch.from_numpy(strengths))[layers].double()
        relative = ((ours_obj - sk_obj) / sk_obj).flatten()
        print(f"  training objective (ours - sklearn) / sklearn: lower on {(relative < -1e-5).float().mean():.0%} "
              f"of probes, within 1e-5 on {(relative.abs() <= 1e-5).float().mean():.0%}, higher by more on "
              f"{(relative > 1e-5).float().mean():.0%}; min {relative.min():+.1e}, max {relative.max():+.1e}")


if __name__ == "__main__":
    main()
