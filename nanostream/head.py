"""The small model trained on frozen features: multinomial logistic regression, and its CV score."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# L2 strength on standardised features. Accuracy on hymenoptera and flowers moved by
# under one image across 1e-4..1e-1 (bench/bench_train.py), so one value serves.
WEIGHT_DECAY = 1e-3
# L-BFGS converges on these convex problems in well under 100 steps.
MAX_ITER = 100


class Head(nn.Module):
    """Standardise features, then one linear layer: (feature_dim + 1) x classes parameters."""

    def __init__(self, feature_dim: int, n_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("scale", torch.ones(feature_dim))
        self.linear = nn.Linear(feature_dim, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.scale)


def fit_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = WEIGHT_DECAY) -> Head:
    """Fit by full-batch L-BFGS with class-balanced loss, so a rare class is not ignored.
    Deterministic: it starts from zeros, and the problem is convex.

    The loss's gradient is written out (softmax minus one-hot, weighted) rather than taken by
    autograd: a few small matrix products per step, a quarter less time than the autograd pass,
    and cross-validation fits 15 of these per candidate backbone.
    """
    x = x.float()
    head = Head(x.shape[1], n_classes)
    head.mean.copy_(x.mean(0))
    head.scale.copy_(x.std(0, unbiased=False) + 1e-6)
    counts = torch.bincount(y, minlength=n_classes).float()
    class_weight = counts.sum() / (n_classes * counts.clamp(min=1))
    sample_weight = class_weight[y] / class_weight[y].sum()  # cross_entropy(weight=...)'s mean
    target = F.one_hot(y, n_classes).float()
    z = (x - head.mean) / head.scale
    weight, bias = head.linear.weight, head.linear.bias
    with torch.no_grad():
        weight.zero_()
        bias.zero_()
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    @torch.no_grad()
    def closure():
        log_p = torch.log_softmax(torch.addmm(bias, z, weight.t()), 1)
        loss = -(sample_weight * (log_p * target).sum(1)).sum() + weight_decay * weight.pow(2).sum()
        d_logits = (log_p.exp() - target) * sample_weight[:, None]
        torch.mm(d_logits.t(), z, out=weight.grad).add_(weight, alpha=2 * weight_decay)
        torch.sum(d_logits, 0, out=bias.grad)
        return loss

    optimizer.step(closure)
    weight.grad = bias.grad = None
    return head.eval()


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


def cross_val_accuracy(original: torch.Tensor, y: torch.Tensor, n_classes: int,
                       augmented: torch.Tensor | None = None, seed: int = 0, max_folds: int = 5) -> float:
    """K-fold accuracy on the original images; augmented views of training folds join their fit."""
    n_folds = max(2, min(max_folds, int(torch.bincount(y).min())))
    folds = stratified_folds(y, n_folds, seed)
    correct = 0
    for held in folds:
        train = torch.ones(len(y), dtype=torch.bool)
        train[held] = False
        x_fit, y_fit = original[train], y[train]
        if augmented is not None and augmented.shape[1]:
            views = augmented[train]
            x_fit = torch.cat([x_fit, views.reshape(-1, views.shape[-1])])
            y_fit = torch.cat([y_fit, y[train].repeat_interleave(views.shape[1])])
        head = fit_head(x_fit, y_fit, n_classes)
        with torch.inference_mode():
            correct += int((head(original[held]).argmax(1) == y[held]).sum())
    return correct / len(y)
