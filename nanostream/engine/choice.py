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
    photos: int = 0               # training photos cv_accuracy was measured on: all of them, but in a
                                  # rebuild (train.RESCORE_NEW); 0 when not scored


def choose_backbone(candidates: Sequence[Candidate], prefer: str | None = None, n_train: int = 0,
                    rule: str = "best") -> Candidate:
    """The backbone with the best cross-validated accuracy (repeated rounds, train.REPEATS), equal
    scores going to the cheaper network.

    rule="one-se" takes the cheapest within one binomial standard error sqrt(p(1-p)/n) of the best
    (Hastie, Tibshirani & Friedman's one-standard-error rule). It was the default for a while, for
    one 4-class set where CV on 80 photos picked Lite2 by one photo and Lite0 did better on val; on
    the shared sets at 20 photos a class it cost accuracy: over 3 random draws each, val accuracy
    0.952 against the best score's 0.965 (hymenoptera) and 0.854 against 0.867 (flowers), because
    the cheaper networks it falls back to are the weaker ones there. bench/bench_quality.py builds
    with both rules.

    `prefer` (the previous build's backbone) stays unless another's score is more than one of the
    n_train images better (and, for one-se, more than that standard error): a switch recomputes
    every augmented view.
    """
    usable = [c for c in candidates if c.error is None]
    if not usable:
        raise BackboneUnavailable("; ".join(c.error or c.backbone for c in candidates) or "no backbone to choose from")
    top = max((c.cv_accuracy or 0.0) for c in usable)
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
