"""Suspicious images: each category's images ranked by how untypical they are, for review.

Web searches bring in off-topic pictures (logos, diagrams, the wrong animal) and users drop a
photo into the wrong category. Both show up in backbone feature space: the image sits far from
the other images of its category, or nearer to another category. Duplicates are found by
dedupe.py. Mislabelled photos are found by confident learning (the maintained `cleanlab`,
cleanlab.filter.find_label_issues) on out-of-fold probabilities: a head that never saw a photo
calls it another category, more surely than that category's photos are usually called. Off-topic
photos are the ones much farther from the rest of their category than its photos usually are.
This module only suggests; the page (or the user) decides what to delete or move.
Each reason carries what it found (a Finding) beside its sentence: readers decide by the finding,
never by the wording. Importing this module costs no torch (pages read rankings and warnings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Sequence

from ..engine.backbone_specs import REVIEW_BACKBONES  # the default backbones: the Lite trio
from ..engine.dedupe import DuplicateGroup, ImageRef, find_duplicates
from ..store.db import Store

if TYPE_CHECKING:
    import torch

    from ..engine.features import FeatureCache

MIN_PER_CATEGORY = 5      # fewer: the held-out score rests on one or two photos of the category
IMBALANCE_RATIO = 3.0     # the largest category this many times the smallest: the model leans to it
# Out-of-fold probabilities averaged over this many different fold splits when a project is small:
# with 40 photos one split's luck decides which photo a fold lacks; the folds are fitted together
# (head.out_of_fold_logits), so 5 repeats of 100 photos cost about 0.2 s.
OOF_REPEATS, SMALL_PROJECT = 5, 500
# Off-topic: the distance to its category's OFF_TOPIC_K-th nearest other photo, in what the
# backbones' ImageNet heads make of the features (engine/unknown.semantic), above Q3 + OFF_TOPIC_IQR
# interquartile ranges of the project's (Tukey's fence; 1.5 is the textbook value). 0.5 against 1.0,
# bench/label_noise.py --seeds 12 (chosen on copies 0-5, then held on 6-11): recall 0.66 -> 0.79
# (hymenoptera) and 0.76 -> 0.82 (flowers), precision 0.75 -> 0.74 and 0.62 -> 0.61. The K-th, not
# the nearest: off-topic photos come in groups (a search for "bees" brings several flowers), each
# the others' nearest neighbour.
OFF_TOPIC_K, OFF_TOPIC_IQR = 5, 0.5
MIN_TO_COMPARE = 3        # a category needs this many photos before one can be "unlike" the others


class Finding(Enum):
    UNREADABLE = "unreadable"    # the stored file no longer decodes
    COPY = "copy"                # an exact or near copy of another image of its category
    CONFLICT = "conflict"        # the same picture is also in another category
    LOOKS_LIKE = "looks like"    # confident learning: out of fold, the model calls it another category
    OFF_TOPIC = "off-topic"      # far from every other photo of its category in feature space


@dataclass(frozen=True)
class Reason:
    finding: Finding
    text: str                    # the sentence the user reads


@dataclass(frozen=True)
class SuspectImage:
    image_id: int
    score: float                 # higher: less typical of its category (see suspicion_scores)
    reasons: tuple[Reason, ...] = ()  # findings ("looks like rose (91%)", "near-duplicate of image 12"); empty: none

    @property
    def flagged(self) -> bool:
        """Something was found: the user should look at it (delete, move or keep)."""
        return bool(self.reasons)

    def has(self, finding: Finding) -> bool:
        return any(r.finding is finding for r in self.reasons)

    def to_dict(self) -> dict:
        """JSON (the CLI's and the worker's ranking file): reasons as sentences, findings beside them."""
        return {"image_id": self.image_id, "score": self.score if math.isfinite(self.score) else None,
                "reasons": [r.text for r in self.reasons], "findings": [r.finding.value for r in self.reasons]}

    @classmethod
    def from_dict(cls, d: dict) -> SuspectImage:
        """Inverse of to_dict (a null score is an unreadable image's infinite one); ValueError or
        KeyError for anything else."""
        reasons = tuple(Reason(Finding(f), str(t)) for f, t in zip(d["findings"], d["reasons"], strict=True))
        return cls(int(d["image_id"]), math.inf if d["score"] is None else float(d["score"]), reasons)


def ranking_from_dict(table: Mapping[str, list[dict]]) -> dict[str, list[SuspectImage]]:
    """A ranking saved as {category: [SuspectImage.to_dict(), ...]}, typed again."""
    return {name: [SuspectImage.from_dict(d) for d in entries] for name, entries in table.items()}


@dataclass(frozen=True)
class Suspicion:
    """Per-image results of suspicion_scores, parallel to its input rows."""
    score: torch.Tensor          # (N,) own distance + how much nearer the nearest other category is
    own_distance: torch.Tensor   # (N,) cosine distance to its category's centroid, itself left out
    other_distance: torch.Tensor  # (N,) cosine distance to the nearest other category's centroid (inf: none)
    nearest_other: torch.Tensor  # (N,) index of that category (-1: none)


def suspicion_scores(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> Suspicion:
    """Score each row by how untypical it is of its own label.

    own = cosine distance to the centroid of its category's other images (leave-one-out, so an
    outlier does not pull its own reference towards itself); other = the same distance to the
    nearest other category's centroid. score = own + max(0, own - other): an off-topic image
    is far from its own category, a mislabelled one is also nearer another. An image alone in
    its category has nothing to compare with: own distance 1 (orthogonal), which ranks it high.
    Features are L2-normalised first; only directions matter.
    """
    import torch
    import torch.nn.functional as F

    x = F.normalize(features.float(), dim=1)
    y = labels.long()
    onehot = F.one_hot(y, n_classes).float()            # (N, C)
    sums = onehot.T @ x                                 # (C, D)
    counts = onehot.sum(0)                              # (C,)

    own_sum = sums[y] - x                               # leave-one-out: its category without itself
    own_count = (counts[y] - 1).unsqueeze(1)
    own_centroid = own_sum / own_count.clamp(min=1)
    own_sim = F.cosine_similarity(x, own_centroid, dim=1, eps=1e-12)
    own_sim = torch.where(own_count.squeeze(1) > 0, own_sim, torch.zeros_like(own_sim))
    own_distance = 1 - own_sim

    centroids = sums / counts.clamp(min=1).unsqueeze(1)
    sims = x @ F.normalize(centroids, dim=1).T          # (N, C)
    sims = sims.masked_fill(onehot.bool() | (counts == 0).unsqueeze(0), float("-inf"))
    best_sim, nearest = sims.max(1)
    other_distance = 1 - best_sim                       # inf where there is no other category
    nearest = torch.where(torch.isfinite(best_sim), nearest, torch.full_like(nearest, -1))

    margin = (own_distance - other_distance).clamp(min=0).nan_to_num(0.0)
    return Suspicion(own_distance + margin, own_distance, other_distance, nearest)


# ---------------------------------------------------------------- mislabelled and off-topic

def out_of_fold_probabilities(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, C) probabilities of fit_head's model for each photo from fits that never saw it, averaged
    over OOF_REPEATS fold splits when the project is small. Every class needs 2 or more photos."""
    import torch

    from ..engine.head import out_of_fold_logits

    repeats = OOF_REPEATS if len(labels) < SMALL_PROJECT else 1
    logits = out_of_fold_logits(features, labels, n_classes, seed=0, repeats=repeats)
    return torch.softmax(logits, 2).mean(0)


def label_issues(probs: torch.Tensor, labels: torch.Tensor) -> dict[int, int]:
    """Row -> the category it looks like, for the rows confident learning flags: cleanlab's
    find_label_issues on out-of-fold probabilities."""
    import torch
    from cleanlab.filter import find_label_issues

    y = labels.numpy()
    # prune_by_class: flagged 10-20% fewer clean photos than the default on bench/label_noise.py's
    # copies for as many planted ones. n_jobs=1: no process pool per ranking.
    flagged = find_label_issues(y, probs.double().numpy(), filter_by="prune_by_class", n_jobs=1)
    others = probs.clone()
    others[torch.arange(len(y)), labels] = -1  # the category it looks like: the likeliest other one
    return {int(i): int(others[i].argmax()) for i in flagged.nonzero()[0]}


def off_topic(z: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """Rows whose OFF_TOPIC_K-th nearest other photo of their category (unit rows z, by dot product)
    is much farther than the project's usually are (Tukey's fence), in categories of
    MIN_TO_COMPARE photos or more (fewer: the K-th nearest is the farthest there is)."""
    import torch

    comparable = torch.bincount(labels)[labels] >= MIN_TO_COMPARE
    if int(comparable.sum()) < 4:  # quartiles of fewer say nothing
        return []
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    k = min(OFF_TOPIC_K, int(same.sum(1).min().clamp(min=1)))
    distance = 1 - (z @ z.T).masked_fill(~same, -1.0).topk(k, 1).values[:, -1].double()
    q1, q3 = torch.quantile(distance[comparable], torch.tensor([0.25, 0.75], dtype=torch.double))
    fence = q3 + OFF_TOPIC_IQR * (q3 - q1)
    return (comparable & (distance > fence)).nonzero().flatten().tolist()


def content_reasons(features: torch.Tensor, semantic: torch.Tensor, labels: torch.Tensor,
                    categories: Sequence[str]) -> tuple[torch.Tensor, dict[int, list[Reason]]]:
    """Each row's suspicion score, and the reasons found for rows that look mislabelled
    ("looks like rose (91%)": the out-of-fold probability of that category) or off-topic
    ("unlike every other photo of daisy", from `semantic`: unit rows, see off_topic). Mislabelled
    photos need 2 categories of 2 or more photos.

    A photo confident learning flags is said to look like another category only when it is also
    nearer another category's centre than its own (suspicion_scores): two views of the features
    that agree. Most false alarms were correctly filed photos that the out-of-fold head alone got
    wrong. bench/label_noise.py --seeds 12, without this -> with it: precision 0.74 -> 0.77
    (hymenoptera) and 0.61 -> 0.64 (flowers), recall 0.79 -> 0.78 and 0.82 -> 0.80; of the 28
    flags it dropped, 22 were correctly filed photos. Precision rose on copies 0-5 and 6-11 alike."""
    import torch

    result = suspicion_scores(features, labels, len(categories))
    nearer_another = result.other_distance < result.own_distance
    reasons: dict[int, list[Reason]] = {}
    present = [c for c in range(len(categories)) if int((labels == c).sum()) >= 2]
    rows = torch.isin(labels, torch.tensor(present)).nonzero().flatten()
    if len(present) >= 2:
        index = {c: i for i, c in enumerate(present)}  # categories of 1 or 0 photos: left out of the fit
        y = torch.tensor([index[int(c)] for c in labels[rows]])
        probs = out_of_fold_probabilities(features[rows], y, len(present))
        for row, other in label_issues(probs, y).items():
            if not nearer_another[rows[row]]:
                continue
            reasons.setdefault(int(rows[row]), []).append(
                Reason(Finding.LOOKS_LIKE, f"looks like {categories[present[other]]} ({float(probs[row, other]):.0%})"))
    for row in off_topic(semantic, labels):
        reasons.setdefault(row, []).append(Reason(Finding.OFF_TOPIC, f"unlike every other photo of {categories[int(labels[row])]}"))
    return result.score, reasons


# ---------------------------------------------------------------- duplicates

def duplicate_reasons(groups: Sequence[DuplicateGroup]) -> dict[str, list[Reason]]:
    """Reasons per image id: later copies inside a category, and every copy that carries a
    different label elsewhere (the user must say which label is right)."""
    reasons: dict[str, list[Reason]] = {}
    exact_copies: set[str] = set()  # a near group lists exact copies again: say it once, as exact
    for group in sorted(groups, key=lambda g: g.kind != "exact"):
        kind = "exact copy" if group.kind == "exact" else "near-duplicate"
        first_in: dict[str, str] = {}
        for image_id, category in zip(group.ids, group.categories):
            if category not in first_in:
                first_in[category] = image_id
            elif image_id not in exact_copies:
                reasons.setdefault(image_id, []).append(Reason(Finding.COPY, f"{kind} of image {first_in[category]}"))
                if group.kind == "exact":
                    exact_copies.add(image_id)
        if len(first_in) > 1:  # the same picture under two or more labels
            for image_id, category in zip(group.ids, group.categories):
                elsewhere = ", ".join(f"'{c}' as image {i}" for c, i in first_in.items() if c != category)
                reasons.setdefault(image_id, []).append(Reason(Finding.CONFLICT, f"{kind} also in {elsewhere}"))
    return {image_id: list(dict.fromkeys(r)) for image_id, r in reasons.items()}


# ---------------------------------------------------------------- a project

def rank_suspicious(store: Store, project: str, backbones: Sequence[str] = REVIEW_BACKBONES,
                    cache: FeatureCache | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, list[SuspectImage]]:
    """Every category of the project (empty ones too) -> its images, most suspicious first.

    Facts come first (unreadable, a duplicate, a label conflict), then what the photos' content
    suggests (mislabelled, off-topic), then the rest; within each part, higher score first.
    Features of each of `backbones` come from the cache when present, side by side.
    """
    import torch

    categories = [c.name for c in store.list_categories(project)]
    records = store.list_images(project)
    ranked: dict[str, list[SuspectImage]] = {name: [] for name in categories}
    if not records:
        return ranked
    paths = [store.image_path(r) for r in records]
    failed, kept_rows, features, semantic = _side_by_side(paths, [str(r.id) for r in records], backbones,
                                                          cache, on_progress)
    reasons: dict[int, list[Reason]] = {r.id: [] for r in records}
    scores: dict[int, float] = {r.id: float("inf") for r in records}  # unreadable: first in line
    for name, why in failed:
        reasons[int(name)].append(Reason(Finding.UNREADABLE, f"unreadable: {why}"))

    kept = [records[i] for i in kept_rows]
    if kept:
        index_of = {name: i for i, name in enumerate(categories)}
        labels = torch.tensor([index_of[r.category] for r in kept])
        score, found = content_reasons(features, semantic, labels, categories)
        for i, record in enumerate(kept):
            scores[record.id] = float(score[i])
            reasons[record.id] += found.get(i, [])
        refs = [ImageRef(str(r.id), r.category, store.image_path(r)) for r in kept]
        for image_id, why in duplicate_reasons(find_duplicates(refs)).items():
            reasons[int(image_id)] += why

    for record in records:
        ranked[record.category].append(SuspectImage(record.id, scores[record.id], tuple(reasons[record.id])))
    for name in ranked:
        ranked[name].sort(key=review_order)
    return ranked


def _side_by_side(paths: Sequence, names: Sequence[str], backbones: Sequence[str], cache: FeatureCache | None,
                  on_progress: Callable[[int, int], None] | None):
    """(failed, kept rows, features, semantic): each backbone's features of the photos it could read
    (every backbone reads the same files the same way), concatenated, and what its ImageNet head
    makes of them (unknown.semantic), concatenated and scaled back to unit rows."""
    import torch

    from ..engine.device import default_device, precision
    from ..engine.features import extract_features
    from ..engine.inference import imagenet_head
    from ..engine.unknown import semantic

    device = default_device()
    features, meanings, feats = [], [], None
    for i, backbone in enumerate(backbones):
        def step(done: int, total: int, before: int = i) -> None:  # one bar over every backbone
            if on_progress:
                on_progress(before * total + done, len(backbones) * total)
        feats = extract_features(paths, backbone, cache=cache, on_progress=step, names=names)
        features.append(feats.original.float())
        meanings.append(semantic(feats.original, imagenet_head(backbone, str(device), precision(device))))
    return feats.failed, feats.kept, torch.cat(features, 1), torch.cat(meanings, 1).float() / len(backbones) ** 0.5


FACTS = {Finding.UNREADABLE, Finding.COPY, Finding.CONFLICT}  # certain, unlike a model's view of a photo


def _tier(suspect: SuspectImage) -> int:
    """0: a fact to act on, 1: a finding about its content, 2: nothing found."""
    return 0 if any(r.finding in FACTS for r in suspect.reasons) else 1 if suspect.flagged else 2


def review_order(suspect: SuspectImage) -> tuple[int, float, int]:
    """The ranking's sort key: facts to act on, then findings about content, then the rest; within
    each, the higher score first."""
    return _tier(suspect), -suspect.score, suspect.image_id


# ---------------------------------------------------------------- before a build

def data_warnings(counts: Mapping[str, int], ranked: Mapping[str, Sequence[SuspectImage]] | None = None) -> list[str]:
    """What is wrong with a project's images for training, each with what to do about it: too few
    per category, unbalanced categories, and (from a ranking) photos filed under two categories."""
    warnings = []
    few = [f"{name} ({n})" for name, n in counts.items() if n < MIN_PER_CATEGORY]
    if few:
        warnings.append(f"Too few images in {', '.join(few)}: add at least {MIN_PER_CATEGORY} per category "
                        f"(search the web or upload), or the accuracy will be a guess.")
    filled = {name: n for name, n in counts.items() if n}
    if len(filled) >= 2:
        big, small = max(filled, key=filled.get), min(filled, key=filled.get)
        if filled[big] >= IMBALANCE_RATIO * filled[small]:
            warnings.append(f"Unbalanced: '{big}' has {filled[big]} images, '{small}' only {filled[small]}. "
                            f"The model will lean towards '{big}': add images to '{small}' or remove some from '{big}'.")
    conflicts = sum(s.has(Finding.CONFLICT) for suspects in (ranked or {}).values() for s in suspects)
    if conflicts:
        warnings.append(f"{conflicts} image(s) appear in more than one category (marked 'also in' below): "
                        f"keep each photo in the one category it belongs to, and delete or move the other copy.")
    return warnings
