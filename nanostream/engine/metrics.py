"""Classification metrics: accuracy with its interval, per-class precision and recall, confusion, hardest examples."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def classification_report(probs: torch.Tensor, y: torch.Tensor, labels: list[str] | tuple[str, ...],
                          files: list[str] | None = None, n_hardest: int = 8) -> dict:
    """JSON-ready metrics. confusion[i][j] counts true class i predicted as class j."""
    n = len(labels)
    predicted = probs.argmax(1)
    confusion = torch.zeros(n, n, dtype=torch.long)
    for t, p in zip(y.tolist(), predicted.tolist()):
        confusion[t, p] += 1
    per_class = {}
    for i, label in enumerate(labels):
        true_positive = int(confusion[i, i])
        predicted_as = int(confusion[:, i].sum())
        actual = int(confusion[i].sum())
        per_class[label] = {
            "precision": true_positive / predicted_as if predicted_as else 0.0,
            "recall": true_positive / actual if actual else 0.0,
            "n": actual,
        }
    report = {
        "accuracy": float((predicted == y).float().mean()) if len(y) else 0.0,
        "n": len(y),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
    if files is not None and len(y):
        loss = -torch.log(probs[torch.arange(len(y)), y].clamp(min=1e-12))
        order = torch.argsort(loss, descending=True)[:n_hardest]
        report["highest_loss"] = [
            {"file": files[i], "label": labels[int(y[i])], "predicted": labels[int(predicted[i])],
             "confidence": float(probs[i].max()), "loss": float(loss[i])}
            for i in order.tolist()]
    return report


# The normal quantile of a two-sided 95% interval (scipy.stats.norm.ppf(0.975)).
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """The headline accuracy and where it was measured, with its 95% Wilson interval."""
    accuracy: float
    low: float
    high: float
    n: int                      # photos it was measured on
    kind: str                   # "val": the val/ photos; "cross-validation": every photo, each held out once
    repeats: int = 1            # cross-validation rounds, each with other folds (their probabilities averaged)

    def covers(self, accuracy: float) -> bool:
        return self.low - 1e-9 <= accuracy <= self.high + 1e-9


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (correct of n): unlike accuracy +- 2 SE, it stays
    inside [0, 1] and is not zero-wide at 100% (Brown, Cai & DasGupta 2001 recommend it for small n)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def estimate(predicted: torch.Tensor, y: torch.Tensor, kind: str, repeats: int = 1) -> Estimate:
    correct, n = int((predicted == y).sum()), len(y)
    low, high = wilson_interval(correct, n)
    return Estimate(correct / n if n else 0.0, round(low, 4), round(high, 4), n, kind, repeats)
