"""Learning curves: accuracy at growing images per class, a power law through them, and what it
says about reaching a target -- the build's "would more photos help?" advice (images_needed) and
the experiments' learning_curve (experiments/curves.py) both measure here.

Everything works on a FeatureTable of features already computed, so a curve costs head fits
only: a build passes the features it trained on and extracts nothing twice.
"""

from __future__ import annotations

import math
import random
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .data import LabeledImage, check_trainable, stratified_split
from .head import fit_head, fit_logits

StageProgress = Callable[[str, int, int], None]

# Images per class of a learning curve (those the data supports, then all it has).
CURVE_SIZES = (5, 10, 20, 40)
# A fitted curve is not trusted this far past the largest size measured.
MAX_EXTRAPOLATION = 20


def seed_std(values: list[float]) -> float:
    """Sample standard deviation of per-seed values (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class PowerLaw:
    """error(n) = a * n**-b + c: error falls as a power of n towards the floor c."""
    a: float
    b: float
    c: float

    def error(self, n):
        return self.a * np.power(np.asarray(n, dtype=float), -self.b) + self.c

    def accuracy(self, n):
        return 1 - self.error(n)

    def images_for(self, accuracy: float) -> float | None:
        """Images per class where the curve reaches `accuracy`; None when its floor is above it."""
        gap = (1 - accuracy) - self.c
        if gap <= 0:
            return None
        if self.a <= 0:
            return 1.0
        return float((self.a / gap) ** (1 / self.b))


@dataclass
class CurvePoint:
    images_per_class: int
    accuracies: list[float]        # one per seed

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return seed_std(self.accuracies)


@dataclass
class LearningCurve:
    points: list[CurvePoint]
    target: float
    fit: PowerLaw | None
    images_per_class_for_target: int | None
    reason: str | None             # why images_per_class_for_target is None (or how the fit fell back)
    have_per_class: dict[str, int]  # images each category has now
    seeds: int = 0
    estimate: float | None = None  # the fitted value even when it is too far out to report
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def more_per_class(self) -> dict[str, int] | None:
        """Images to add to each category to reach the target (0 where it has enough)."""
        if self.images_per_class_for_target is None:
            return None
        return {c: max(0, self.images_per_class_for_target - n) for c, n in self.have_per_class.items()}

    def advice(self) -> str:
        """One sentence for the user: how many more images, or why no number can be given."""
        pct = f"{self.target:.0%}"
        if self.images_per_class_for_target is None:
            return f"No estimate for {pct}: {self.reason}"
        more = max(self.more_per_class.values(), default=0)
        if more == 0:
            return f"The curve reaches {pct} at about {self.images_per_class_for_target} images per category: you have enough."
        return (f"Add about {more} more images per category (about {self.images_per_class_for_target} "
                f"in all) to reach {pct}.")

    def to_dict(self) -> dict:
        """The CLI's JSON: points and the estimate; `reason` only when there is no estimate."""
        d = {"points": [{"images_per_class": p.images_per_class, "accuracy": round(p.accuracy, 4)}
                        for p in self.points],
             "images_per_class_for_target": self.images_per_class_for_target}
        if self.images_per_class_for_target is None:
            d["reason"] = self.reason
        return d


@dataclass
class FeatureTable:
    """Features of every readable image, one row each: the training pool first, then val/."""
    labels: tuple[str, ...]
    items: list[LabeledImage]
    y: torch.Tensor
    given_test: torch.Tensor       # (N,) bool: rows from DATA/val/
    original: torch.Tensor         # (N, D)
    backbone: str = ""             # the experiments' choice; a build's curve knows its own
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Split:
    """One seed's rows: training rows per class in the seed's order (prefixes nest), test rows."""
    seed: int
    train_by_class: tuple[tuple[int, ...], ...]
    test: tuple[int, ...]

    def train(self, per_class: int | None = None) -> list[int]:
        return [row for rows in self.train_by_class for row in rows[:per_class]]

    @property
    def per_class(self) -> int:
        return min(len(rows) for rows in self.train_by_class)


def make_splits(table: FeatureTable, seeds: int, per_class: int | None, test_fraction: float) -> list[Split]:
    """Per seed: test rows (val/, or a stratified hold-out) and training rows per class in a
    seeded order, capped at `per_class` and at the smallest class so every class has as many."""
    pool = [i for i, v in enumerate(table.given_test.tolist()) if not v]
    given = [i for i, v in enumerate(table.given_test.tolist()) if v]
    row_of = {item: i for i, item in enumerate(table.items)}
    splits = []
    for seed in range(seeds):
        if given:
            train_rows, test_rows = pool, given
        else:
            train_items, test_items = stratified_split([table.items[i] for i in pool], test_fraction, seed)
            train_rows = [row_of[item] for item in train_items]
            test_rows = [row_of[item] for item in test_items]
        rng = random.Random(f"training images {seed}")  # apart from the split's own stream
        by_class = []
        for label in range(len(table.labels)):
            rows = sorted((r for r in train_rows if int(table.y[r]) == label), key=lambda r: str(table.items[r].path))
            rng.shuffle(rows)
            by_class.append(rows)
        cap = min(len(rows) for rows in by_class)
        if per_class is not None:
            cap = min(cap, per_class)
        splits.append(Split(seed, tuple(tuple(rows[:cap]) for rows in by_class), tuple(sorted(test_rows))))
    return splits


def head_accuracy(table: FeatureTable, train_rows: list[int], test_rows: Sequence[int],
                  views: torch.Tensor | None) -> float:
    """Head fitted on the training rows (and their augmented views), scored on the test originals."""
    x, y = table.original[train_rows], table.y[train_rows]
    if views is not None and views.shape[1]:
        v = views[train_rows]
        x = torch.cat([x, v.reshape(-1, v.shape[-1])])
        y = torch.cat([y, y.repeat_interleave(v.shape[1])])
    head = fit_head(x, y, len(table.labels))
    test = list(test_rows)
    with torch.inference_mode():
        predicted = head(table.original[test]).argmax(1)
    return float((predicted == table.y[test]).float().mean())


def head_accuracies(table: FeatureTable, runs: Sequence[tuple[list[int], Sequence[int]]],
                    views: torch.Tensor | None) -> list[float]:
    """head_accuracy of each (training rows, test rows) run, the heads fitted together
    (head.fit_logits): one optimisation instead of one per seed."""
    originals = sorted({row for train_rows, test_rows in runs for row in (*train_rows, *test_rows)})
    x, owner = table.original[originals], torch.tensor(originals)
    if views is not None and views.shape[1]:
        trained = torch.tensor(sorted({row for train_rows, _ in runs for row in train_rows}))
        x = torch.cat([x, views[trained].reshape(-1, views.shape[-1])])
        owner = torch.cat([owner, trained.repeat_interleave(views.shape[1])])
    fit_rows = torch.stack([torch.isin(owner, torch.tensor(train_rows)) for train_rows, _ in runs])
    logits = fit_logits(x, table.y[owner], len(table.labels), fit_rows, at=len(originals))
    position = {row: i for i, row in enumerate(originals)}
    return [float((logits[p, [position[r] for r in test_rows]].argmax(1) == table.y[list(test_rows)]).float().mean())
            for p, (_, test_rows) in enumerate(runs)]


def fit_power_law(sizes: Sequence[float], errors: Sequence[float]) -> tuple[PowerLaw | None, str | None]:
    """Fit error(n) = a * n**-b + c to mean errors; returns (fit, note).

    Three or more sizes: all three parameters, with 0 <= c <= the lowest error seen (the floor cannot
    sit above the data) and 0.05 <= b <= 3 (learning curves fall, and none falls that fast). When that
    fails or there are two sizes: c = 0, a straight line in log-log. Otherwise (None, why).
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    order = np.argsort(np.asarray(sizes, dtype=float))
    n = np.asarray(sizes, dtype=float)[order]
    e = np.clip(np.asarray(errors, dtype=float)[order], 0.0, 1.0)
    if len(n) < 2 or len(set(n.tolist())) < 2:
        return None, f"need accuracy at 2 or more sizes to fit a curve; have {len(set(n.tolist()))}"
    if np.all(e == 0):
        return None, "no errors at any size: nothing to fit"
    if e[-1] >= e[0]:
        return None, "accuracy did not improve from the smallest to the largest size measured"
    if len(n) >= 3:
        floor = float(e.min())
        b0 = 0.5
        a0 = max(float(e[0] - floor / 2) * n[0] ** b0, 1e-6)
        try:
            with warnings.catch_warnings():  # 3 points for 3 parameters: no covariance, which is not used
                warnings.simplefilter("ignore", OptimizeWarning)
                (a, b, c), _ = curve_fit(lambda x, a, b, c: a * x ** -b + c, n, e, p0=(a0, b0, floor / 2),
                                         bounds=([0.0, 0.05, 0.0], [np.inf, 3.0, max(floor, 1e-9)]), maxfev=20000)
            exact = "3 sizes for 3 parameters: the curve can pass through every point, so treat the estimate as rough"
            return PowerLaw(float(a), float(b), float(c)), exact if len(n) == 3 else None
        except (RuntimeError, ValueError) as exc:
            note = f"3-parameter fit failed ({exc}); fitted with no floor (c = 0)"
    else:
        note = "only 2 sizes: fitted with no floor (c = 0), so the estimate is optimistic"
    positive = e > 0
    if positive.sum() < 2:
        return None, "fewer than 2 sizes with any error: cannot fit a slope"
    slope, intercept = np.polyfit(np.log(n[positive]), np.log(e[positive]), 1)
    b = -slope
    if b <= 0:
        return None, "error does not fall with more images in these measurements"
    return PowerLaw(float(math.exp(intercept)), float(b), 0.0), note


def images_for_target(fit: PowerLaw | None, target: float, largest: int,
                      note: str | None = None) -> tuple[int | None, float | None, str | None]:
    """(images per class for the target or None, the raw estimate, reason when None)."""
    if fit is None:
        return None, None, note or "no curve could be fitted"
    n = fit.images_for(target)
    if n is None:
        return None, None, (f"the fitted curve levels off at about {1 - fit.c:.1%} accuracy, "
                            f"below the {target:.0%} target: more images of the same kind will not get there")
    if n > MAX_EXTRAPOLATION * largest:
        return None, n, (f"the fitted curve needs about {n:,.0f} images per class, over {MAX_EXTRAPOLATION}x the "
                         f"largest size measured ({largest}): too far to extrapolate")
    return max(1, math.ceil(n)), n, note


def fit_learning_curve(points: list[CurvePoint], target: float, have_per_class: dict[str, int],
                       seeds: int = 0) -> LearningCurve:
    """The power law through measured points, and what it says about reaching `target`."""
    have = have_per_class
    fit, note = fit_power_law([p.images_per_class for p in points], [1 - p.accuracy for p in points])
    largest = max(p.images_per_class for p in points)
    n, estimate, reason = images_for_target(fit, target, largest, note)
    reached = [p.images_per_class for p in points if p.accuracy >= target]
    if n is None and reached:  # no usable curve, but a measured size already reaches the target
        n, reason = min(reached), f"measured, not fitted ({reason})"
    return LearningCurve(points, target, fit, n, reason, have, seeds, estimate)


def _curve_sizes(largest: int, sizes: Sequence[int]) -> list[int]:
    return sorted({s for s in sizes if 0 < s < largest} | {largest})


def measure_curve(table: FeatureTable, splits: list[Split], views: torch.Tensor | None, sizes: Sequence[int],
                  progress: StageProgress) -> list[CurvePoint]:
    """Mean accuracy over the splits at each size the smallest class allows (and at that size itself)."""
    largest = min(s.per_class for s in splits)
    points = []
    chosen = _curve_sizes(largest, sizes)
    for i, k in enumerate(chosen, 1):
        points.append(CurvePoint(k, head_accuracies(table, [(s.train(k), s.test) for s in splits], views)))
        progress("curve", i, len(chosen))
    return points


def images_needed(original: torch.Tensor, y: torch.Tensor, labels: Sequence[str], target: float = 0.95,
                  augmented: torch.Tensor | None = None, seeds: int = 5, test_fraction: float = 0.25,
                  sizes: Sequence[int] = CURVE_SIZES) -> LearningCurve:
    """How many images per category a project needs for `target` accuracy, from its cached features.

    original: (N, D) features of the project's images (features.extract_features(...).original);
    y: (N,) class indices into `labels`; augmented: optional (N, K, D) views, as training uses them.
    Each seed holds out `test_fraction` per class and measures nested subsets of the rest; the
    result's advice() is the sentence to show, more_per_class the numbers behind it.
    """
    if original.shape[0] != y.shape[0]:
        raise ValueError(f"features and labels differ in length: {original.shape[0]} vs {y.shape[0]}")
    labels = tuple(labels)
    items = [LabeledImage(Path(f"#{i:07d}"), labels[int(c)]) for i, c in enumerate(y.tolist())]
    check_trainable(labels, items)
    table = FeatureTable(labels, items, y.long(), torch.zeros(len(items), dtype=torch.bool), original.float())
    splits = make_splits(table, seeds, None, test_fraction)
    points = measure_curve(table, splits, augmented, sizes, lambda *_: None)
    have = {label: int((y == i).sum()) for i, label in enumerate(labels)}
    return fit_learning_curve(points, target, have, seeds)


def curve_png(curve: LearningCurve, title: str = "") -> bytes:
    """The curve as charts.learning_curve_png draws it: the fit out to its estimate (never past
    MAX_EXTRAPOLATION times the largest size measured), titled with its advice unless told otherwise."""
    from .. import charts

    largest = max(p.images_per_class for p in curve.points)
    fit = None if curve.fit is None else (curve.fit.a, curve.fit.b, curve.fit.c)
    until = None if curve.estimate is None else min(curve.estimate, MAX_EXTRAPOLATION * largest)
    return charts.learning_curve_png([(p.images_per_class, p.accuracies) for p in curve.points], curve.target,
                                     fit, curve.images_per_class_for_target, until, title or curve.advice())
