"""The backbone choice: the candidates scored on the user's own images and the rule that picks one.

train.py and the experiments both choose with choose_backbone. Importable without torch, so the
Build page can read a build's candidates without paying for it.
"""

from __future__ import annotations

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


def choose_backbone(candidates: Sequence[Candidate], prefer: str | None = None, n_train: int = 0) -> Candidate:
    """The best cross-validated accuracy; equal scores go to the cheaper backbone.

    `prefer` (the previous build's backbone) stays unless another's score is more than one of the
    n_train images better: CV on tens of images moves by about that between rebuilds, and a
    switch recomputes every augmented view.
    """
    usable = [c for c in candidates if c.error is None]
    if not usable:
        raise BackboneUnavailable("; ".join(c.error or c.backbone for c in candidates) or "no backbone to choose from")
    best = max(usable, key=lambda c: (c.cv_accuracy or 0.0, -c.gflops))
    kept = next((c for c in usable if c.backbone == prefer), None)
    if kept is not None and n_train and (best.cv_accuracy or 0.0) - (kept.cv_accuracy or 0.0) <= 1 / n_train + 1e-9:
        return kept
    return best
