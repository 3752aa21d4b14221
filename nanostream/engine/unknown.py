""""None of these": a photo unlike the project's own, found in the backbone's feature space.

A softmax head always names one of its categories: shown a daisy, an ants/bees model says "bees
(100%)". The photo's features, though, read as something else. They are compared in what the
backbone's own ImageNet head makes of them: sqrt of its 1000 class probabilities, a unit vector
whose dot product with another is their Bhattacharyya coefficient. Each category is the mean of
its training photos' vectors, and the score is 1 - the photo's highest dot product with a
category's mean: a photo unlike every category scores high.

Why the categories' means, not the nearest training photo (Sun et al. 2022, which this module used
before): one close training photo is enough to make a foreign one "known" (a bee on a daisy, for
a daisy), where a category's mean is not moved much by one photo. Measured by
`python bench/unknown_scores.py --seeds 0 1 2` (3 draws of 20 training photos a class, each Lite
backbone, the other shared set's val photos as the foreign ones, 2-core Xeon, bf16):
  hymenoptera model on flower photos: AUROC 0.944 (nearest photo 0.883); at the threshold below
  77% of flowers unknown (34%), and 8.0% of its own val photos (4.3%);
  flowers model on hymenoptera photos: AUROC 0.920 (0.742); 49% unknown (30%), 4.4% of its own.
In throw-away runs on the same features, the nearest half of the photos did as well on
hymenoptera and worse on flowers; the mean of all photos, or a Mahalanobis distance on the raw
features added in, was not better on both.
The threshold comes from the project's own photos, each scored against means that leave it out,
so that about PASS_RATE of new photos like them pass; above it is `unknown`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

PASS_RATE = 0.95            # the target: about 95% of the project's own photos pass
# References kept per class in the bundle: 200 x 1280 floats are 1 MB a class; past that a class's
# mean moves little and the bundle grows.
MAX_REFERENCE_PER_CLASS = 200
SCORE = ("1 - Bhattacharyya coefficient of the backbone's ImageNet class probabilities with the closest "
         "category's mean")


@dataclass(frozen=True)
class UnknownDetector:
    features: torch.Tensor      # (M, D) backbone features of training photos (what the bundle keeps)
    targets: torch.Tensor       # (M,) their classes
    threshold: float            # scores above it are unknown
    imagenet_head: nn.Module    # the backbone's ImageNet classifier: the space the means live in
    # (classes present, 1000): each category's mean in that space, computed from the features
    means: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "means", class_means(semantic(self.features, self.imagenet_head), self.targets))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) 1 - the highest similarity of each feature row to a category's mean."""
        return 1 - (semantic(features, self.imagenet_head) @ self.means.T).max(1).values

    def unknown(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features) > self.threshold

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"unknown.reference": self.features, "unknown.targets": self.targets}

    def to_meta(self) -> dict:
        return {"threshold": self.threshold, "pass_rate": PASS_RATE, "score": SCORE}


@torch.inference_mode()
def semantic(features: torch.Tensor, imagenet_head: nn.Module) -> torch.Tensor:
    """Features -> sqrt(softmax(ImageNet logits)): unit vectors, on the features' device."""
    weight = imagenet_head.weight
    logits = imagenet_head(features.to(weight.device, weight.dtype)).float()
    return torch.softmax(logits, 1).sqrt().to(features.device)


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


def fit_unknown(x: torch.Tensor, y: torch.Tensor, imagenet_head: nn.Module, seed: int = 0) -> UnknownDetector:
    """The detector for training originals x (N, D) of classes y: the threshold from every photo
    held out once, the references the bundle keeps drawn with `seed`."""
    keep = _reference_rows(y, seed)
    return UnknownDetector(x[keep].float().contiguous(), y[keep].clone(), threshold_for(x, y, imagenet_head),
                           imagenet_head)


def threshold_for(x: torch.Tensor, y: torch.Tensor, imagenet_head: nn.Module) -> float:
    """The threshold for photos with features x (N, D) of classes y: each held out once."""
    return conformal_threshold(held_out_scores(semantic(x, imagenet_head), y))


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
    A model made with the earlier score (the nearest training photo's distance) gets this score's
    threshold from its kept photos, as a build would set it."""
    found = meta.get("unknown")
    if not isinstance(found, dict) or "unknown.reference" not in tensors or not len(tensors["unknown.targets"]):
        return None
    targets = tensors["unknown.targets"].long()
    if not (0 <= int(targets.min()) and int(targets.max()) < len(meta["labels"])):
        raise ValueError("damaged model file: its unknown check names a class it does not have")
    features = tensors["unknown.reference"].float().to(device)
    targets = targets.to(device)
    threshold = (float(found["threshold"]) if found.get("score") == SCORE
                 else threshold_for(features, targets, imagenet_head))
    return UnknownDetector(features, targets, threshold, imagenet_head)
