"""Batched sparse linear probes: every group (layer) and every regularisation strength in one solve.

The Sparsify-then-Classify recipe fits an L1-regularised linear probe per layer and per strength. Instead of
one sklearn fit at a time, this module solves all ``G`` groups x ``S`` strengths together with accelerated
proximal gradient (FISTA) written as batched matrix products, so the work is a handful of large ``bmm`` calls
per iteration on whatever device ``X`` lives on.

Objective for group ``g`` and strength ``s`` (bias never penalised)::

    mean_i loss(x_gi @ W_gs + b_gs, y_i)  +  strength_gs * ||W_gs||_1          (penalty="l1")
                                          +  strength_gs / 2 * ||W_gs||_2^2    (penalty="l2")

Losses: softmax cross-entropy (single-label, ``C`` outputs), sigmoid binary cross-entropy per output
(multi-label) and half squared error (regression, so L1 matches ``sklearn.linear_model.Lasso(alpha=strength)``).
For sklearn's ``LogisticRegression`` the same problem is ``C = 1 / (n * strength)`` (multi-class, and binary
with L1); binary with L2 is ``C = 2 / (n * strength)`` because sklearn uses one weight vector where we use two.

Solver details:

* step sizes start at ``1/L`` with ``L`` a Lipschitz bound from batched power iterations on ``[X, 1]`` and are
  then adapted per problem by backtracking (halve the step when the sufficient-decrease test fails, grow it
  slowly otherwise); the test uses a cancellation-free Bregman divergence so float32 is enough;
* momentum is restarted per problem whenever it points against the proximal-gradient step;
* a problem stops when the relative change of its parameters falls below ``tol``; finished strengths are
  dropped from the batch, so late iterations only pay for the problems still running;
* logits are kept between iterations and updated by linearity, so an iteration costs two batched products
  (``X @ W`` and ``X^T @ R``); with row chunking (large ``n``) the same iteration recomputes them per chunk;
* binary single-label problems are solved as one sigmoid output ``v`` and returned as ``W = [-v/2, v/2]``,
  which is an exact minimiser of the two-output softmax objective (same loss, same penalty) at half the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


TASKS = ("single_label_classification", "multi_label_classification", "regression")

_CURVATURE = {"softmax": 0.5, "sigmoid": 0.25, "squared": 1.0}  # global Hessian bounds of each loss
_AUTO_CHUNK_ELEMENTS = 1 << 25  # n * G * S * C above which the gradient is computed in row chunks
_POWER_ITERATIONS = 30
_STEP_GROWTH = 0.9  # L is multiplied by this after an accepted step (steps grow slowly)
_STEP_BACKOFF = 2.0  # ... and by this after a rejected step


@dataclass
class ProbeFit:
    """Fitted probes for ``G`` groups x ``S`` strengths with ``d`` features and ``C`` outputs."""

    weight: torch.Tensor  # [G, S, d, C]
    bias: torch.Tensor  # [G, S, C]
    n_iter: int
    converged: torch.Tensor  # [G, S] bool


# ----------------------------------------------------------------------------------------------- input checks


def check_finite(X: torch.Tensor, name: str = "X") -> None:
    """Raise a ValueError if ``X`` holds NaN or inf (checked one group at a time to bound memory)."""
    rows = X.reshape(-1, X.shape[-1]) if X.dim() > 1 else X.reshape(1, -1)
    step = max(1, (1 << 24) // max(1, rows.shape[-1]))
    for start in range(0, rows.shape[0], step):
        if not torch.isfinite(rows[start : start + step]).all():
            raise ValueError(
                f"{name} contains NaN or infinite values: the features overflowed (typically hidden states "
                "extracted in float16). Re-extract the features in float32 or bfloat16."
            )


def _as_features(X: torch.Tensor) -> torch.Tensor:
    """Validate ``X`` [G, n, d]; half precision is upcast to float32 (a copy), other floats are used as is."""
    if X.dim() != 3:
        raise ValueError(f"X must have shape [G, n, d], got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"X must be a floating point tensor, got {X.dtype}")
    check_finite(X)
    if X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    return X


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _mask_tensor(feature_mask, X: torch.Tensor):
    """Return the feature mask as a {0, 1} float tensor [G, d] on X's device, or None."""
    if feature_mask is None:
        return None
    mask = torch.as_tensor(feature_mask, device=X.device).to(torch.bool)
    if mask.dim() == 1:
        mask = mask.expand(X.shape[0], -1)
    if mask.shape != (X.shape[0], X.shape[2]):
        raise ValueError(f"feature_mask must have shape [G, d] = {(X.shape[0], X.shape[2])}, got {tuple(mask.shape)}")
    return mask.to(X.dtype)


# ------------------------------------------------------------------------------------------- problem definition


@dataclass
class _Problem:
    """The internal (possibly reduced) problem: features, targets as floats [n, K], loss kind, mask."""

    X: torch.Tensor  # [G, n, d]
    target: torch.Tensor  # [n, K] float (one-hot for softmax)
    loss: str  # "softmax" | "sigmoid" | "squared"
    mask: torch.Tensor | None  # [G, d] float {0, 1}
    binary: bool  # single-label with 2 classes, solved as one sigmoid output

    @property
    def K(self) -> int:
        return self.target.shape[1]


def _num_classes(Y: torch.Tensor, num_classes: int | None) -> int:
    if num_classes is not None:
        return int(num_classes)
    return int(Y.max().item()) + 1 if Y.numel() else 1


def _make_problem(X, Y, task, feature_mask=None, num_classes=None) -> _Problem:
    """Validate inputs and build the internal problem."""
    _check_task(task)
    X = _as_features(X)
    Y = torch.as_tensor(Y, device=X.device)
    if Y.shape[0] != X.shape[1]:
        raise ValueError(f"Y has {Y.shape[0]} rows but X has {X.shape[1]} samples")
    mask = _mask_tensor(feature_mask, X)
    if task == "single_label_classification":
        Y = Y.reshape(-1).long()
        C = _num_classes(Y, num_classes)
        if Y.numel() and (Y.min() < 0 or Y.max() >= C):
            raise ValueError(f"class ids must lie in [0, {C})")
        if C == 2:
            return _Problem(X, (Y == 1).to(X.dtype)[:, None], "sigmoid", mask, binary=True)
        return _Problem(X, F.one_hot(Y, C).to(X.dtype), "softmax", mask, binary=False)
    Y = Y.to(X.dtype)
    if Y.dim() == 1:
        Y = Y[:, None]
    check_finite(Y, "Y")
    return _Problem(X, Y, "sigmoid" if task == "multi_label_classification" else "squared", mask, binary=False)


def _internal_strengths(strengths, problem: _Problem, penalty: str) -> torch.Tensor:
    """Strengths as [G, S] for the internal problem (binary L2 halves: ||W||^2 = ||v||^2 / 2)."""
    X = problem.X
    lam = torch.as_tensor(strengths, dtype=X.dtype, device=X.device)
    if lam.dim() == 0:
        lam = lam[None]
    if lam.dim() == 1:
        lam = lam.expand(X.shape[0], -1)
    if lam.dim() != 2 or lam.shape[0] != X.shape[0]:
        raise ValueError(f"strengths must have shape [S] or [G, S], got {tuple(lam.shape)}")
    if not torch.isfinite(lam).all() or (lam < 0).any():
        raise ValueError("strengths must be finite and non-negative")
    if problem.binary and penalty == "l2":
        lam = lam / 2
    return lam.contiguous()


def _to_internal(fit: ProbeFit, problem: _Problem):
    """Public weights [G, S, d, C] / bias [G, S, C] -> internal layout W [G, d, S, K], b [G, S, K]."""
    W, b = fit.weight.to(problem.X), fit.bias.to(problem.X)
    if problem.binary:
        W, b = W[..., 1:] - W[..., :1], b[..., 1:] - b[..., :1]
    return W.permute(0, 2, 1, 3).contiguous(), b.contiguous()


def _to_public(W: torch.Tensor, b: torch.Tensor, problem: _Problem):
    """Internal layout -> public weight [G, S, d, C], bias [G, S, C]."""
    W = W.permute(0, 2, 1, 3)
    if problem.binary:
        W, b = torch.cat([-W / 2, W / 2], -1), torch.cat([-b / 2, b / 2], -1)
    return W.contiguous(), b.contiguous()


# --------------------------------------------------------------------------------------------- loss functions


def _loss_and_residual(Z: torch.Tensor, T: torch.Tensor, loss: str):
    """Per-problem summed loss [G, S] and residual dLoss/dZ [G, m, S, K] for logits Z [G, m, S, K]."""
    T = T[None, :, None, :]
    if loss == "softmax":
        lse = torch.logsumexp(Z, -1, keepdim=True)
        values = (lse - Z).mul_(T).sum(-1)  # rows of T are one-hot
        R = (Z - lse).exp_().sub_(T)
    elif loss == "sigmoid":
        values = (F.softplus(Z) - T * Z).sum(-1)
        R = torch.sigmoid(Z).sub_(T)
    else:
        R = Z - T
        values = R.square().sum(-1).mul_(0.5)
    return values.sum(1), R


def _bregman(Z: torch.Tensor, dZ: torch.Tensor, loss: str) -> torch.Tensor:
    """Summed ``loss(Z + dZ) - loss(Z) - <loss'(Z), dZ>`` [G, S], computed without cancellation.

    The targets cancel out of this quantity, which is what the backtracking test needs; evaluating it as a
    difference of two losses would drown the O(dZ^2) signal in float32 rounding near convergence.
    """
    if loss == "squared":
        return dZ.square().sum((1, 3)).mul_(0.5)
    if loss == "sigmoid":
        p = torch.sigmoid(Z)
        small = torch.log1p(p * torch.expm1(dZ.clamp(max=1.0))) - p * dZ
        large = F.softplus(Z + dZ) - F.softplus(Z) - p * dZ
        return torch.where(dZ.abs() < 1, small, large).sum((1, 3))
    logp = torch.log_softmax(Z, -1)
    p = logp.exp()
    u = dZ - (p * dZ).sum(-1, keepdim=True)
    small = torch.log1p((p * (torch.expm1(u.clamp(max=1.0)) - u)).sum(-1))
    large = torch.logsumexp(logp + u, -1)
    return torch.where(u.abs().amax(-1) < 1, small, large).clamp_(min=0).sum(1)


def _logits(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Z = X @ W + b: X [G, m, d], W [G, d, S, K], b [G, S, K] -> [G, m, S, K]."""
    G, d, S, K = W.shape
    Z = torch.baddbmm(b.reshape(G, 1, S * K), X, W.reshape(G, d, S * K))
    return Z.view(G, X.shape[1], S, K)


def _intercept_only(problem: _Problem) -> torch.Tensor:
    """Optimal bias [G, K] of the model with all weights zero."""
    mean = problem.target.mean(0)
    if problem.loss == "softmax":
        b = mean.clamp(min=1e-12).log()
        b = b - b.mean()
    elif problem.loss == "sigmoid":
        mean = mean.clamp(1e-12, 1 - 1e-12)
        b = mean.log() - (-mean).log1p()
    else:
        b = mean
    return b.expand(problem.X.shape[0], -1)


# ------------------------------------------------------------------------------------------- lambda_max / L


def _zero_weight_gradient(problem: _Problem, chunk_size: int) -> torch.Tensor:
    """Gradient [G, d, K] of the mean loss w.r.t. W at W = 0 and the intercept-only bias (masked)."""
    X = problem.X
    G, n, d = X.shape
    W = X.new_zeros(G, d, 1, problem.K)
    b = _intercept_only(problem)[:, None, :].contiguous()
    grad = X.new_zeros(G, d, problem.K)
    for start in range(0, n, chunk_size):
        Xc = X[:, start : start + chunk_size]
        _, R = _loss_and_residual(_logits(Xc, W, b), problem.target[start : start + chunk_size], problem.loss)
        grad.baddbmm_(Xc.transpose(1, 2), R[:, :, 0])
    grad /= n
    if problem.mask is not None:
        grad *= problem.mask[:, :, None]
    return grad


def lambda_max(X, Y, task, feature_mask=None, *, num_classes=None) -> torch.Tensor:
    """Smallest L1 strength [G] whose solution has all-zero weights (per group).

    It is the largest absolute gradient entry at ``W = 0`` with the intercept-only bias, padded by a relative
    ``sqrt(eps)`` so that float rounding in the solver cannot leave stray non-zero weights at exactly this value.
    """
    problem = _make_problem(X, Y, task, feature_mask, num_classes)
    grad = _zero_weight_gradient(problem, _default_chunk(problem, 1))
    margin = 1 + math.sqrt(torch.finfo(problem.X.dtype).eps)
    return grad.abs().amax((1, 2)) * margin


def _lipschitz(problem: _Problem) -> torch.Tensor:
    """Per-group Lipschitz estimate [G] of the mean-loss gradient w.r.t. (W, b), by power iteration on [X, 1]."""
    X, mask = problem.X, problem.mask
    G, n, d = X.shape
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(G, d, 1, generator=gen, dtype=torch.float64).to(X)
    v_b = X.new_ones(G, 1, 1)
    sigma2 = X.new_zeros(G)
    for _ in range(_POWER_ITERATIONS):
        if mask is not None:
            v = v * mask[:, :, None]
        norm = torch.sqrt(v.square().sum((1, 2)) + v_b.square().sum((1, 2))).clamp(min=1e-30)
        v, v_b = v / norm[:, None, None], v_b / norm[:, None, None]
        u = torch.baddbmm(v_b, X, v)  # [G, n, 1]
        sigma2 = u.square().sum((1, 2))  # ||A v||^2 with ||v|| = 1
        v, v_b = torch.bmm(X.transpose(1, 2), u), u.sum(1, keepdim=True)
    return _CURVATURE[problem.loss] * sigma2.clamp(min=1e-12) / n


def _default_chunk(problem: _Problem, S: int) -> int:
    """Rows per chunk: all of them unless n * G * S * K is large."""
    G, n, _ = problem.X.shape
    per_row = max(1, G * S * problem.K)
    return n if n * per_row <= _AUTO_CHUNK_ELEMENTS else max(1, _AUTO_CHUNK_ELEMENTS // per_row)


# ----------------------------------------------------------------------------------------------- the solver


def _prox(W: torch.Tensor, lam: torch.Tensor, step: torch.Tensor, penalty: str, mask) -> torch.Tensor:
    """Proximal operator of ``step * penalty`` (in place on W [G, d, S, K]); masked features are zeroed."""
    thr = (lam * step)[:, None, :, None]
    if penalty == "l1":
        W = torch.sign(W).mul_((W.abs() - thr).clamp_(min=0))
    else:
        W = W.div_(1 + thr)
    if mask is not None:
        W.mul_(mask[:, :, None, None])
    return W


class _Evaluator:
    """Loss, residual and gradient of the smooth part, either on the full data or summed over row chunks."""

    def __init__(self, problem: _Problem, chunk_size: int):
        self.p, self.chunk = problem, chunk_size
        self.n = problem.X.shape[1]
        self.full = chunk_size >= self.n

    def _chunks(self):
        for start in range(0, self.n, self.chunk):
            yield self.p.X[:, start : start + self.chunk], self.p.target[start : start + self.chunk]

    def logits(self, W, b):
        """Full logits (only in unchunked mode)."""
        return _logits(self.p.X, W, b) if self.full else None

    def value_and_grad(self, W, b, Z):
        """Mean loss [G, S] and gradients at (W, b); Z are its logits in unchunked mode."""
        G, d, S, K = W.shape
        gW = W.new_zeros(G, d, S * K)
        gb = W.new_zeros(G, S, K)
        value = W.new_zeros(G, S)
        parts = [(self.p.X, self.p.target, Z)] if self.full else ((Xc, Tc, None) for Xc, Tc in self._chunks())
        for Xc, Tc, Zc in parts:
            Zc = _logits(Xc, W, b) if Zc is None else Zc
            v, R = _loss_and_residual(Zc, Tc, self.p.loss)
            value += v
            gb += R.sum(1)
            gW.baddbmm_(Xc.transpose(1, 2), R.reshape(G, Xc.shape[1], S * K))
        return value / self.n, gW.view(G, d, S, K) / self.n, gb / self.n

    def bregman(self, W, b, dW, db, Z, dZ):
        """Mean Bregman divergence [G, S] of the loss between (W, b) and (W + dW, b + db)."""
        if self.full:
            return _bregman(Z, dZ, self.p.loss) / self.n
        total = W.new_zeros(W.shape[0], W.shape[2])
        for Xc, _ in self._chunks():
            total += _bregman(_logits(Xc, W, b), _logits(Xc, dW, db), self.p.loss)
        return total / self.n


def _sq_norm(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared norm of (W, b) per problem: W [G, d, S, K], b [G, S, K] -> [G, S]."""
    return W.square().sum((1, 3)) + b.square().sum(-1)


def _inner(W1, b1, W2, b2) -> torch.Tensor:
    return (W1 * W2).sum((1, 3)) + (b1 * b2).sum(-1)


@dataclass
class _State:
    """Solver state for the strengths still in the batch; the S axis is 2 for W/Z, 1 for b and [G, S] tensors."""

    x_W: torch.Tensor
    x_b: torch.Tensor
    y_W: torch.Tensor
    y_b: torch.Tensor
    Z_x: torch.Tensor | None
    Z_y: torch.Tensor | None
    lam: torch.Tensor
    L: torch.Tensor
    t: torch.Tensor
    active: torch.Tensor
    converged: torch.Tensor
    cols: torch.Tensor  # indices of these strengths in the full grid

    def select(self, keep: torch.Tensor) -> "_State":
        """Keep only the strengths at positions ``keep``."""
        axis = {"x_W": 2, "y_W": 2, "Z_x": 2, "Z_y": 2, "cols": 0}
        picked = {}
        for name, value in vars(self).items():
            picked[name] = None if value is None else value.index_select(axis.get(name, 1), keep)
        return _State(**picked)


def _fista_step(ev: _Evaluator, s: _State, penalty: str, tol: float) -> _State:
    """One batched FISTA iteration with backtracking and gradient-based momentum restart."""
    mask = ev.p.mask
    f_y, g_W, g_b = ev.value_and_grad(s.y_W, s.y_b, s.Z_y)
    step = 1 / s.L
    new_W = _prox(s.y_W - g_W * step[:, None, :, None], s.lam, step, penalty, mask)
    new_b = s.y_b - g_b * step[..., None]
    d_W, d_b = new_W - s.y_W, new_b - s.y_b
    Z_new = ev.logits(new_W, new_b)
    dZ = None if Z_new is None else Z_new - s.Z_y
    gap = ev.bregman(s.y_W, s.y_b, d_W, d_b, s.Z_y, dZ)
    ok = s.active & (gap <= 0.5 * s.L * _sq_norm(d_W, d_b) * (1 + 1e-6))
    L = torch.where(ok, s.L * _STEP_GROWTH, torch.where(s.active, s.L * _STEP_BACKOFF, s.L))

    m_W, m_b = new_W - s.x_W, new_b - s.x_b
    restart = _inner(d_W, d_b, m_W, m_b) < 0  # momentum points against the proximal-gradient step
    t_new = (1 + torch.sqrt(1 + 4 * s.t * s.t)) / 2
    beta = torch.where(restart, torch.zeros_like(s.t), (s.t - 1) / t_new)
    change = torch.sqrt(torch.maximum(_sq_norm(m_W, m_b), _sq_norm(d_W, d_b)))
    done = ok & (change <= tol * torch.sqrt(_sq_norm(new_W, new_b)).clamp(min=1e-30))

    okW, okb, bW = ok[:, None, :, None], ok[..., None], beta[:, None, :, None]
    Z_x, Z_y = s.Z_x, s.Z_y
    if Z_new is not None:  # logits of the extrapolated point, by linearity
        Z_y = torch.where(okW, Z_new + bW * (Z_new - Z_x), Z_y)
        Z_x = torch.where(okW, Z_new, Z_x)
    return _State(
        x_W=torch.where(okW, new_W, s.x_W),
        x_b=torch.where(okb, new_b, s.x_b),
        y_W=torch.where(okW, new_W + bW * m_W, s.y_W),
        y_b=torch.where(okb, new_b + beta[..., None] * m_b, s.y_b),
        Z_x=Z_x,
        Z_y=Z_y,
        lam=s.lam,
        L=L,
        t=torch.where(ok, torch.where(restart, torch.ones_like(s.t), t_new), s.t),
        active=s.active & ~done,
        converged=s.converged | done,
        cols=s.cols,
    )


def _fista(ev: _Evaluator, W, b, lam, L0, penalty, max_iter, tol):
    """Batched FISTA over all (g, s); strengths finished in every group leave the batch.

    Returns W [G, d, S, K], b [G, S, K], the number of iterations run and ``converged`` [G, S].
    """
    G, d, S, K = W.shape
    W = _prox(W.clone(), lam, torch.zeros_like(lam), penalty, ev.p.mask)  # apply the mask to the start
    Z = ev.logits(W, b)
    flags = torch.zeros(G, S, dtype=torch.bool, device=W.device)
    s = _State(W, b, W, b, Z, Z, lam, L0[:, None].expand(G, S).contiguous(), torch.ones_like(lam),
               ~flags, flags, torch.arange(S, device=W.device))
    out_W, out_b, out_conv = W.clone(), b.clone(), flags.clone()
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        s = _fista_step(ev, s, penalty, tol)
        running = s.active.any(0)
        if not running.all():
            out_W[:, :, s.cols], out_b[:, s.cols], out_conv[:, s.cols] = s.x_W, s.x_b, s.converged
            if not running.any():
                break
            s = s.select(running.nonzero().squeeze(1))
    out_W[:, :, s.cols], out_b[:, s.cols], out_conv[:, s.cols] = s.x_W, s.x_b, s.converged
    return out_W, out_b, n_iter, out_conv


# ------------------------------------------------------------------------------------------------ public API


def fit_linear_probes(
    X,
    Y,
    task,
    strengths,
    *,
    penalty="l1",
    feature_mask=None,
    init=None,
    max_iter=300,
    tol=1e-4,
    chunk_size=None,
    num_classes=None,
) -> ProbeFit:
    """Fit G x S regularised linear probes at once (see the module docstring for the objective).

    ``X`` [G, n, d] (never modified), ``Y`` [n] class ids or [n, C] targets, ``strengths`` [S] or [G, S].
    ``feature_mask`` [G, d] bool forces zero weight on masked-out features. ``init`` is a ProbeFit of the
    same shapes to warm-start from. ``chunk_size`` rows per gradient chunk (default: automatic).
    """
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    if max_iter < 1 or tol < 0:
        raise ValueError("max_iter must be >= 1 and tol >= 0")
    problem = _make_problem(X, Y, task, feature_mask, num_classes)
    lam = _internal_strengths(strengths, problem, penalty)
    G, n, d = problem.X.shape
    S, K = lam.shape[1], problem.K
    if init is not None:
        W, b = _to_internal(init, problem)
        if W.shape != (G, d, S, K) or b.shape != (G, S, K):
            raise ValueError("init must have the shapes of this fit: weight [G, S, d, C], bias [G, S, C]")
    else:
        W = problem.X.new_zeros(G, d, S, K)
        b = _intercept_only(problem)[:, None, :].expand(G, S, K).contiguous()
    chunk = int(chunk_size) if chunk_size else _default_chunk(problem, S)
    ev = _Evaluator(problem, max(1, chunk))
    W, b, n_iter, converged = _fista(ev, W, b, lam, _lipschitz(problem), penalty, max_iter, tol)
    weight, bias = _to_public(W, b, problem)
    return ProbeFit(weight=weight, bias=bias, n_iter=n_iter, converged=converged)


def predict_probes(X, fit: ProbeFit, feature_mask=None) -> torch.Tensor:
    """Outputs [G, S, n, C] (logits, or values for regression) of every probe on X [G, n, d]."""
    X = _as_features(X)
    W = fit.weight.to(X)
    mask = _mask_tensor(feature_mask, X)
    if mask is not None:
        W = W * mask[:, None, :, None]
    G, S, d, C = W.shape
    Z = _logits(X, W.permute(0, 2, 1, 3), fit.bias.to(X))  # [G, n, S, C]
    return Z.permute(0, 2, 1, 3).contiguous()


def score_predictions(outputs: torch.Tensor, Y, task) -> torch.Tensor:
    """Score [G, S] of outputs [G, S, n, C], higher is better.

    Single-label: accuracy; multi-label: micro-F1 at logit 0; regression: R^2 averaged over targets.
    """
    _check_task(task)
    Y = torch.as_tensor(Y, device=outputs.device)
    if task == "single_label_classification":
        return (outputs.argmax(-1) == Y.reshape(-1).long()).to(torch.float32).mean(-1)
    Y = Y.to(outputs.dtype)
    if Y.dim() == 1:
        Y = Y[:, None]
    if task == "multi_label_classification":
        pred, true = outputs > 0, Y > 0.5
        tp = (pred & true).sum((-2, -1)).to(torch.float32)
        wrong = (pred ^ true).sum((-2, -1)).to(torch.float32)  # false positives + false negatives
        return torch.where(tp > 0, 2 * tp / (2 * tp + wrong), torch.zeros_like(tp))
    ss_res = (outputs - Y).square().sum(-2)
    ss_tot = (Y - Y.mean(0)).square().sum(0)
    r2 = 1 - ss_res / ss_tot.clamp(min=torch.finfo(ss_tot.dtype).tiny)
    return r2.mean(-1).to(torch.float32)


def macro_f1(outputs: torch.Tensor, Y) -> torch.Tensor:
    """Macro-averaged F1 [G, S] of single-label outputs [G, S, n, C] over the classes in Y or the predictions."""
    Y = torch.as_tensor(Y, device=outputs.device).reshape(-1).long()
    C = outputs.shape[-1]
    pred = F.one_hot(outputs.argmax(-1), C).to(torch.float32)  # [G, S, n, C]
    true = F.one_hot(Y, C).to(torch.float32)
    tp = (pred * true).sum(-2)
    fp_fn = pred.sum(-2) + true.sum(0) - 2 * tp
    f1 = torch.where(tp > 0, 2 * tp / (2 * tp + fp_fn), torch.zeros_like(tp))
    present = (pred.sum(-2) + true.sum(0)) > 0
    return (f1 * present).sum(-1) / present.sum(-1).clamp(min=1)


def select_by_importance(weight: torch.Tensor, eta: float) -> torch.Tensor:
    """Bool mask [..., d]: the fewest features whose importance (weight^2 summed over classes) reaches eta.

    Features are ranked by importance (descending, ties to the lower index) and kept until their cumulative
    importance reaches ``eta * total``; ``eta = 1`` keeps every feature with non-zero weight and an all-zero
    weight keeps nothing.
    """
    if not 0 < eta <= 1:
        raise ValueError(f"eta must lie in (0, 1], got {eta}")
    importance = weight.to(torch.float64).square().sum(-1)  # float64: no underflow of tiny weights
    ordered, order = torch.sort(importance, dim=-1, descending=True, stable=True)
    cumulative = ordered.cumsum(-1)
    total = cumulative[..., -1:]
    nonzero = (importance > 0).sum(-1, keepdim=True)
    count = (cumulative < eta * total).sum(-1, keepdim=True) + 1
    count = nonzero if eta >= 1 else torch.minimum(count, nonzero)
    keep_sorted = torch.arange(importance.shape[-1], device=weight.device) < count
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
