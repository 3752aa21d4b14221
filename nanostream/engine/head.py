"""The small model trained on frozen features: multinomial logistic regression, and its CV score."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lbfgs import lbfgs

# L2 strength on standardised features. Accuracy on hymenoptera and flowers moved by
# under one image across 1e-4..1e-1 (bench/bench_train.py), so one value serves.
WEIGHT_DECAY = 1e-3
# L-BFGS converges on these convex problems in well under 100 steps.
MAX_ITER = 100
# Curvature pairs L-BFGS keeps: scipy's default, not torch's 100, whose two-loop recursion is 2 x 100
# small tensor operations per step. Out of fold, 5 x 5 folds on 100 flower photos (Lite0, one thread,
# 2-core Xeon under the AVX2 cap): 1.01 -> 0.77 s, the probabilities within 0.002 of each other.
HISTORY = 10


class Head(nn.Module):
    """Standardise features, then one linear layer: (feature_dim + 1) x classes parameters.

    An ensemble's head (members > 1) has one such layer per member backbone, each on that member's
    share of the features (the rest of its weights are 0: ensemble()), and says the log of the mean
    of their probabilities: logits whose softmax is that mean, so the temperature, the exports and
    every predict path treat it as any head's."""

    def __init__(self, feature_dim: int, n_classes: int, members: int = 1):
        super().__init__()
        self.members = members
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("scale", torch.ones(feature_dim))
        self.linear = nn.Linear(feature_dim, n_classes * members)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.linear((features.float() - self.mean) / self.scale)
        return logits if self.members == 1 else mean_probability(logits.unflatten(1, (self.members, -1)), 1, self.members)

    @classmethod
    def ensemble(cls, heads: Sequence[Head]) -> Head:
        """One head for features side by side that averages these heads' probabilities."""
        head = cls(sum(len(h.mean) for h in heads), heads[0].linear.out_features, len(heads))
        with torch.no_grad():
            head.mean.copy_(torch.cat([h.mean for h in heads]))
            head.scale.copy_(torch.cat([h.scale for h in heads]))
            head.linear.weight.copy_(torch.block_diag(*[h.linear.weight for h in heads]))
            head.linear.bias.copy_(torch.cat([h.linear.bias for h in heads]))
        return head.eval()


def mean_probability(logits: torch.Tensor, dim: int, count: int | None = None) -> torch.Tensor:
    """Logits whose softmax is the mean over `dim` of the softmax of each of `logits`. `count`, that
    dimension's size, keeps a traced or exported graph free of a size read from its input."""
    return torch.logsumexp(torch.log_softmax(logits, -1), dim) - math.log(count or logits.shape[dim])


def _split(x: torch.Tensor, widths: Sequence[int] | None) -> list[torch.Tensor]:
    """Each member's share of features side by side (the last dimension); [x] for one backbone."""
    return list(x.split(list(widths), -1)) if widths and len(widths) > 1 else [x]


def fit_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = WEIGHT_DECAY,
             widths: Sequence[int] | None = None) -> Head:
    """Fit by full-batch L-BFGS with class-balanced loss, so a rare class is not ignored.
    Deterministic: it starts from zeros, and the problem is convex. With `widths` (an ensemble's
    members' feature widths, BackboneSpec.widths), one head per member, averaged (Head.ensemble)."""
    parts = _split(x, widths)
    if len(parts) > 1:
        return Head.ensemble([fit_head(part, y, n_classes, weight_decay) for part in parts])
    x = x.float()
    head = Head(x.shape[1], n_classes)
    head.mean.copy_(x.mean(0))
    head.scale.copy_(x.std(0, unbiased=False) + 1e-6)
    weight, bias = _fit_linear(x, head.mean[None], head.scale[None], F.one_hot(y, n_classes).float(),
                               _balanced(y, n_classes)[None], weight_decay)
    with torch.no_grad():
        head.linear.weight.copy_(weight[0])
        head.linear.bias.copy_(bias[0, 0])
    return head.eval()


def _balanced(y: torch.Tensor, n_classes: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weights that give every class the same total (over `rows`, a mask; others 0),
    summing to 1: what cross_entropy(weight=class weights) averages with."""
    rows = torch.ones(len(y), dtype=torch.bool) if rows is None else rows
    counts = torch.bincount(y[rows], minlength=n_classes).float()
    class_weight = counts.sum() / (n_classes * counts.clamp(min=1))
    weight = class_weight[y] * rows
    return weight / weight.sum()


def _fit_linear(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, target: torch.Tensor,
                sample_weight: torch.Tensor, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted multinomial logistic regression on standardised features, for P independent
    problems at once.

    x (N, D) features; problem p standardises them with mean[p] and scale[p] (P, D); target (N, C)
    one-hot; sample_weight (P, N): each row sums to 1, and 0 leaves a sample out of that problem.
    Returns weights (P, C, D) and biases (P, 1, C) on the standardised scale. The P losses share
    no parameter, so L-BFGS on their sum reaches each one's optimum: cross-validation runs one
    optimisation for all its folds instead of one per fold, five times fewer small steps, each of
    which waits its turn for the interpreter while the feature workers run. The gradient is
    written out (softmax minus one-hot, weighted), a quarter less time than autograd's.
    """
    with _threads_for(len(mean) * x.numel()):
        return _lbfgs(x, mean, scale, target, sample_weight, weight_decay)


# Below this many feature numbers (problems x rows x width) a fit runs on one thread. Small
# problems lose more in handing work over than a second thread saves, and on a busy 2-core machine
# each of L-BFGS's many small parallel regions waits for the other core: 9 s instead of 0.2 s was
# seen in a worker beside a process polling the store. Large ones gain on an idle machine and lose
# less beside a busy core. out_of_fold_logits, 5 repeats of 5 folds, 2-core Xeon, one thread ->
# two: 24 photos (0.8M) 0.19 -> 0.13 s idle, 0.22 -> 0.47 s busy; 100 photos (3.2M) 0.56 -> 0.30 s
# idle, 0.55 -> 0.94 s busy; 100 photos with 4 views each (16M) 1.28 -> 0.85 s, 1.79 -> 2.54 s.
# Those were measured before the folding in _folded. With it, idle, synthetic 1280-wide features:
# 100 photos 0.41 -> 0.17 s, with 4 views 1.3 -> 0.86 s; not re-measured on a busy machine.
PARALLEL_FROM = 3_000_000


@contextlib.contextmanager
def _threads_for(size: int):
    threads = torch.get_num_threads()
    if size < PARALLEL_FROM:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _lbfgs(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, target: torch.Tensor,
           sample_weight: torch.Tensor, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    problems, (_, dim) = len(mean), x.shape
    inv_scale, shift = _folded(mean, scale)
    weight = torch.zeros(problems, target.shape[1], dim)
    bias = torch.zeros(problems, 1, target.shape[1])
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    optimizer = lbfgs([weight, bias], max_iter=MAX_ITER, history_size=HISTORY, line_search_fn="strong_wolfe")

    @torch.no_grad()
    def closure():
        log_p = torch.log_softmax(_logits(x, inv_scale, shift, weight, bias), 2)
        loss = -(sample_weight * (log_p * target).sum(2)).sum() + weight_decay * weight.pow(2).sum()
        d_logits = (log_p.exp() - target) * sample_weight[..., None]  # (P, N, C)
        d_sum = d_logits.sum(1, keepdim=True)
        # d_logits.T @ standardised x, as _logits computes it
        grad = (d_logits.permute(0, 2, 1).reshape(-1, len(x)) @ x).view_as(weight)
        grad.mul_(inv_scale).sub_(d_sum.transpose(1, 2) * shift)
        weight.grad.copy_(grad.add_(weight, alpha=2 * weight_decay))
        bias.grad.copy_(d_sum)
        return loss

    optimizer.step(closure)
    return weight, bias


def _folded(mean: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / scale, mean / scale) of P problems, shaped for _logits.

    Each problem standardises x with its own mean and scale. Folding that into the weights,
    (x - m) / s @ W.T = x @ (W / s).T - (m / s) @ W.T, lets the P problems share one x instead of
    a standardised (P, N, D) copy each, and each step is one matrix product over N x D numbers,
    not P of them. out_of_fold_logits, 5 repeats of 5 folds, 1280 features, one thread (2-core
    Xeon, fp32): 30 photos with 4 views each 0.92 -> 0.27 s, 100 with 4 views 3.3 -> 1.3 s,
    without views about the same (0.12 s; 0.49 -> 0.41 s). x is not centred first: a feature that
    is 0 on every photo of a fit (common after ReLU) then gives exactly 0, as the unfolded form
    does, and its weight stays 0 however large a held-out photo's value is over the tiny scale.
    """
    inv_scale = 1 / scale
    return inv_scale[:, None], (mean * inv_scale)[:, None]


def _logits(x: torch.Tensor, inv_scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor) -> torch.Tensor:
    """(P, N, C): x @ (W / s).T - (m / s) @ W.T + b, each problem's logits of its standardised x (_folded)."""
    problems, classes, dim = weight.shape
    scaled = (weight * inv_scale).view(-1, dim)  # (P * C, D): one matrix product for all P
    logits = (x @ scaled.T).view(len(x), problems, classes).transpose(0, 1)
    return logits + (bias - torch.matmul(shift, weight.transpose(1, 2)))


def fit_logits(x: torch.Tensor, y: torch.Tensor, n_classes: int, fit_rows: torch.Tensor,
               at: int | None = None) -> torch.Tensor:
    """(P, at, C) logits for the first `at` rows of x (every row by default) of P heads, the p-th
    fitted as fit_head fits one on the rows fit_rows[p] marks ((P, N) bool); all P at once (_fit_linear)."""
    x = x.float()
    mean = torch.stack([x[rows].mean(0) for rows in fit_rows])
    scale = torch.stack([x[rows].std(0, unbiased=False) for rows in fit_rows]) + 1e-6
    sample_weight = torch.stack([_balanced(y, n_classes, rows) for rows in fit_rows])
    weight, bias = _fit_linear(x, mean, scale, F.one_hot(y, n_classes).float(), sample_weight, WEIGHT_DECAY)
    with torch.no_grad():
        return _logits(x[:at], *_folded(mean, scale), weight, bias)


def stratified_folds(y: torch.Tensor, n_folds: int, seed: int) -> list[torch.Tensor]:
    """Indices of each fold; every class is spread round-robin over the folds after a shuffle."""
    generator = torch.Generator().manual_seed(seed)
    folds = [[] for _ in range(n_folds)]
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        for i, index in enumerate(members.tolist()):
            folds[i % n_folds].append(index)
    return [torch.tensor(sorted(f), dtype=torch.long) for f in folds if f]


def fold_count(y: torch.Tensor, n_classes: int, max_folds: int = 5) -> int:
    """K of out_of_fold_logits: max_folds, fewer when the smallest class has fewer photos."""
    return max(2, min(max_folds, int(torch.bincount(y, minlength=n_classes).min())))


def out_of_fold_logits(x: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int = 0,
                       max_folds: int = 5, repeats: int = 1, views: torch.Tensor | None = None,
                       widths: Sequence[int] | None = None) -> torch.Tensor:
    """(repeats, N, C) logits of fit_head's model for every photo from a fit that never saw it:
    stratified K-fold, repeated with different folds (seed, seed + 1, ...). All the folds of all
    the repeats are fitted together (_fit_linear). With `views` (N, K, D), each fit also trains on
    the augmented views of its training photos, as the delivered head does; a held-out photo's
    views stay out of its fit. With `widths`, an ensemble's: its members' on the same folds, averaged
    as Head.ensemble averages them."""
    parts = _split(x, widths)
    if len(parts) > 1:
        member_views = _split(views, widths) if views is not None else [None] * len(parts)
        return mean_probability(torch.stack([out_of_fold_logits(part, y, n_classes, seed, max_folds, repeats, v)
                                             for part, v in zip(parts, member_views)]), 0)
    n_folds = fold_count(y, n_classes, max_folds)
    splits = [stratified_folds(y, n_folds, seed + r) for r in range(repeats)]
    x = x.float()
    owner = torch.arange(len(y))  # the photo each training row comes from
    rows_x, rows_y = x, y
    if views is not None and views.shape[1]:
        rows_x = torch.cat([x, views.float().reshape(-1, x.shape[1])])
        owner = torch.cat([owner, owner.repeat_interleave(views.shape[1])])
        rows_y = y[owner]
    held_out = [held for folds in splits for held in folds]
    fit_rows = torch.stack([~torch.isin(owner, held) for held in held_out])
    logits = fit_logits(rows_x, rows_y, n_classes, fit_rows, at=len(y))  # (problems, N, C): originals
    out = torch.empty(repeats, len(y), n_classes)
    p = 0
    for r, folds in enumerate(splits):
        for held in folds:
            out[r, held] = logits[p, held]
            p += 1
    return out


def cross_val_accuracy(x: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int = 0, max_folds: int = 5,
                       repeats: int = 1) -> float:
    """Stratified K-fold accuracy of fit_head's model, the mean over `repeats` rounds with other folds
    (out_of_fold_logits); the folds are fitted together (_fit_linear)."""
    return oof_accuracy(out_of_fold_logits(x, y, n_classes, seed, max_folds, repeats), y)


def oof_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The share of right answers over every round of out-of-fold logits (repeats, N, C)."""
    return int((logits.argmax(2) == y).sum()) / (logits.shape[0] * logits.shape[1])
