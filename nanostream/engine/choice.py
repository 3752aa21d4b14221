"""The backbone choice: the candidates scored on the user's own images and the rule that picks one.

train.py and the experiments both choose with choose_backbone. Importable without torch, so the
Build page can read a build's candidates without paying for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .backbone_specs import BackboneUnavailable


@dataclass(frozen=True)
class Candidate:
    backbone: str
    cv_accuracy: float | None     # None when the backbone could not be used (see error), or was the only one
    seconds: float                # feature time on this machine for the training images
    gflops: float
    error: str | None = None


def choose_backbone(candidates: Sequence[Candidate], prefer: str | None = None, n_train: int = 0,
                    rule: str = "one-se") -> Candidate:
    """The cheapest backbone whose cross-validated accuracy is within one standard error of the best.

    On tens of photos CV cannot tell backbones apart by a photo or two (one 4-class set: Lite2
    won CV by one photo of 80 and lost on val, 0.925 against Lite0's 0.963), so a score within
    the best one's binomial standard error sqrt(p(1-p)/n) counts as a tie, and ties go to the
    cheaper network (Hastie, Tibshirani & Friedman's one-standard-error rule). rule="best" is the
    previous rule (the best score, equal ones to the cheaper), kept for the quality bench.

    `prefer` (the previous build's backbone) stays unless another's score is more than one of the
    n_train images, and that error, better: a switch recomputes every augmented view.
    """
    usable = [c for c in candidates if c.error is None]
    if not usable:
        raise BackboneUnavailable("; ".join(c.error or c.backbone for c in candidates) or "no backbone to choose from")
    best = max(usable, key=lambda c: (c.cv_accuracy or 0.0, -c.gflops))
    top = best.cv_accuracy or 0.0
    margin = standard_error(top, n_train) if rule == "one-se" else 0.0
    tied = [c for c in usable if (c.cv_accuracy or 0.0) >= top - margin - 1e-9]
    chosen = min(tied, key=lambda c: (c.gflops, -(c.cv_accuracy or 0.0)))
    kept = next((c for c in usable if c.backbone == prefer), None)
    if kept is not None and n_train and top - (kept.cv_accuracy or 0.0) <= max(1 / n_train, margin) + 1e-9:
        return kept
    return chosen


def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy measured on n photos (0 when n is 0)."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0
