"""Classification metrics: accuracy, per-class precision and recall, confusion, hardest examples."""

from __future__ import annotations

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
