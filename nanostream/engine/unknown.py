""""None of these": a photo unlike the project's own, found in the backbone's feature space.

A softmax head always names one of its categories: shown a daisy, an ants/bees model says "bees
(100%)". The photo's features, though, read as something else. They are compared with each
category's mean in two spaces:
  - what the backbone's own ImageNet head makes of them: sqrt of its 1000 class probabilities, a
    unit vector whose dot product with another is their Bhattacharyya coefficient ("it looks like
    a daisy, and the bees look like bees");
  - the features themselves, scaled to unit length (cosine similarity).
In each, a photo's distance is 1 - its highest similarity to a category's mean, divided by that
space's threshold (the distance 95% of the project's own photos stay under, see below), so both
say "1" at the same point; the score is the mean of the two.

Why the categories' means, not the nearest training photo (Sun et al. 2022, which this module used
before): one close training photo is enough to make a foreign one "known" (a bee on a daisy, for
a daisy), where a category's mean is not moved much by one photo. Why both spaces: together they
order foreign photos above own ones as well as the better one alone, or better (the unit
features alone, in a throw-away run on the same draws: AUROC 0.913 and 0.902). Measured by
`python bench/unknown_scores.py --seeds 0 1 2 3 4 5` (6 draws of 20 training photos a class,
each Lite backbone, the other shared set's val photos as the foreign ones, 2-core Xeon, bf16),
at the threshold below, as own val / other set marked unknown:
  hymenoptera model on flower photos: both spaces 9.2% / 84.9% (AUROC 0.949); the ImageNet space
  alone 7.6% / 79.2% (0.949); the nearest photo 5.7% / 50.9% (0.908);
  flowers model on hymenoptera photos: both 4.5% / 55.8% (0.935); the ImageNet space alone 4.0% /
  47.6% (0.923); the nearest photo 3.4% / 29.8% (0.745).
On hymenoptera the gain is where the threshold falls, not the order (at a threshold that marks
10% of own val photos, both spaces reach 88.6% of flowers, the ImageNet space alone 91.3%); on
flowers it is both.
In throw-away runs on the same features, the nearest half of the photos, softmax temperatures,
the top 10 or 30 ImageNet classes only, a Mahalanobis distance, the raw features alone, each
category's own scale and the larger of the two distances were not better on both sets.
The threshold comes from the project's own photos, each scored against means that leave it out,
so that about PASS_RATE of new photos like them pass; above it is `unknown`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

PASS_RATE = 0.95            # the target: about 95% of the project's own photos pass
# References kept per class in the bundle: 200 x 1280 floats are 1 MB a class; past that a class's
# mean moves little and the bundle grows.
MAX_REFERENCE_PER_CLASS = 200
MIN_SCALE = 1e-3          # a space's scale: distances of photos that are all alike are ~0
SCORE = ("mean over the backbone's ImageNet class probabilities (Bhattacharyya) and its unit features (cosine) of "
         "1 - the similarity to the closest category's mean, each divided by its own threshold")


@dataclass(frozen=True)
class UnknownDetector:
    features: torch.Tensor      # (M, D) backbone features of training photos (what the bundle keeps)
    targets: torch.Tensor       # (M,) their classes
    threshold: float            # scores above it are unknown
    scales: tuple[float, float]  # each space's distance is divided by its own: ImageNet space, features
    imagenet_head: nn.Module    # the backbone's ImageNet classifier: the first space
    # (classes present, width) each category's mean in each space, computed from the features
    means: tuple[torch.Tensor, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "means", tuple(class_means(z, self.targets)
                                                for z in spaces(self.features, self.imagenet_head)))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) the mean of each space's distance to the closest category's mean, over its scale."""
        distances = [1 - (z @ means.T).max(1).values
                     for z, means in zip(spaces(features, self.imagenet_head), self.means)]
        return combined(distances, self.scales)

    def unknown(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features) > self.threshold

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"unknown.reference": self.features, "unknown.targets": self.targets}

    def to_meta(self) -> dict:
        return {"threshold": self.threshold, "scales": list(self.scales), "pass_rate": PASS_RATE, "score": SCORE}


@torch.inference_mode()
def semantic(features: torch.Tensor, imagenet_head: nn.Module) -> torch.Tensor:
    """Features -> sqrt(softmax(ImageNet logits)): unit vectors, on the features' device."""
    weight = imagenet_head.weight
    logits = imagenet_head(features.to(weight.device, weight.dtype)).float()
    return torch.softmax(logits, 1).sqrt().to(features.device)


def spaces(features: torch.Tensor, imagenet_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The two spaces photos are compared in, unit rows in both: semantic(), and the features scaled."""
    return semantic(features, imagenet_head), F.normalize(features.float(), dim=1)


def class_means(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(classes present, width) mean row of each class in y."""
    return torch.stack([z[y == label].mean(0) for label in torch.unique(y)])


def held_out_scores(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) each unit row's score against the class means of every other row (leave-one-out);
    2, farther than any score, for the only photo of a one-photo project."""
    member = y[:, None] == torch.unique(y)[None, :]                     # (N, C)
    counts = member.sum(0).float()
    similarity = z @ (member.float().T @ z).T                           # (N, C): dot with each class's sum
    own = (similarity - (z * z).sum(1, keepdim=True)) / (counts - 1).clamp(min=1)
    similarity = torch.where(member, own, similarity / counts)
    similarity = similarity.masked_fill(member & (counts == 1), -1.0)   # its class has no other photo
    return 1 - similarity.max(1).values


def conformal_threshold(scores: torch.Tensor) -> float:
    """The k-th smallest of N held-out scores, k = ceil(PASS_RATE * (N + 1)) (split-conformal
    prediction, Vovk et al.; Angelopoulos & Bates 2021): a new photo of the same kind then passes
    with probability at least PASS_RATE whatever the scores' distribution. The plain 95% quantile
    of 40 scores passes fewer."""
    k = math.ceil(PASS_RATE * (len(scores) + 1))
    return round(float(scores.max()) if k > len(scores) else float(scores.sort().values[k - 1]), 6)


def combined(distances: list[torch.Tensor], scales: tuple[float, float]) -> torch.Tensor:
    """The score: the mean of the spaces' distances, each over its scale."""
    return sum(d / scale for d, scale in zip(distances, scales)) / len(distances)


def fit_unknown(x: torch.Tensor, y: torch.Tensor, imagenet_head: nn.Module, seed: int = 0) -> UnknownDetector:
    """The detector for training originals x (N, D) of classes y: the scales and the threshold
    from every photo held out once, the references the bundle keeps drawn with `seed`."""
    keep = _reference_rows(y, seed)
    threshold, scales = threshold_for(x, y, imagenet_head)
    return UnknownDetector(x[keep].float().contiguous(), y[keep].clone(), threshold, scales, imagenet_head)


def threshold_for(x: torch.Tensor, y: torch.Tensor, imagenet_head: nn.Module) -> tuple[float, tuple[float, float]]:
    """(threshold, scales) for photos with features x (N, D) of classes y, each held out once: each
    space's scale is the conformal threshold of its own distances (so that both say 1 at the same
    pass rate; a floor keeps a project of identical photos from dividing by 0), the threshold
    that of the combined score."""
    held_out = [held_out_scores(z, y) for z in spaces(x, imagenet_head)]
    scales = tuple(max(conformal_threshold(d), MIN_SCALE) for d in held_out)
    return conformal_threshold(combined(held_out, scales)), scales


def _reference_rows(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Every photo's row, or MAX_REFERENCE_PER_CLASS of each class drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).flatten()
        if len(members) > MAX_REFERENCE_PER_CLASS:
            members = members[torch.randperm(len(members), generator=generator)[:MAX_REFERENCE_PER_CLASS]]
        rows.append(members)
    return torch.cat(rows).sort().values


def from_bundle(meta: dict, tensors: dict[str, torch.Tensor], imagenet_head: nn.Module,
                device: torch.device | None = None) -> UnknownDetector | None:
    """The bundle's detector (its shapes checked by bundle.read_header); None for a model made
    before there was one (or kept no photo). ValueError when a reference photo's class is not one of the labels.
    A model made with an earlier score (the nearest training photo's distance, or the ImageNet
    space alone) gets this score's threshold and scales from its kept photos, as a build would set them."""
    found = meta.get("unknown")
    if not isinstance(found, dict) or "unknown.reference" not in tensors or not len(tensors["unknown.targets"]):
        return None
    targets = tensors["unknown.targets"].long()
    if not (0 <= int(targets.min()) and int(targets.max()) < len(meta["labels"])):
        raise ValueError("damaged model file: its unknown check names a class it does not have")
    features = tensors["unknown.reference"].float().to(device)
    targets = targets.to(device)
    if found.get("score") == SCORE and "scales" in found:  # bundle.read_header checked them
        threshold, scales = float(found["threshold"]), tuple(float(s) for s in found["scales"])
    else:
        threshold, scales = threshold_for(features, targets, imagenet_head)
    return UnknownDetector(features, targets, threshold, scales, imagenet_head)
