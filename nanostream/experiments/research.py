"""Experiments on a labelled dataset: does augmentation help, does transfer help, how many images are enough.

Every experiment computes backbone features once per image (original and augmented views, cached on
disk by features.py) and then fits a head per seed and arm on subsets of those rows, so twelve
arms over five seeds cost one feature pass per policy, not sixty trainings. Splits:
  - DATA with val/: every seed scores on val/; the seed picks which training images are used.
  - DATA without val/: the seed makes a stratified split (test_fraction held out per class),
    then picks training images from the rest.
`per_class` caps training images per class. Same seed, same data: the same numbers.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine import backbones
from ..engine.augment import POLICIES, AugmentPolicy, augment_batch, get_policy, single_technique_policies
from ..engine.data import Dataset, DataError, LabeledImage, check_trainable, stratified_split
from ..engine.device import default_device
from ..engine.features import FeatureCache, extract_features
from ..engine.head import cross_val_accuracy, fit_head
from ..engine.images import BadImage, load_image

StageProgress = Callable[[str, int, int], None]

# Images per class of a learning curve (those the data supports, then all it has).
CURVE_SIZES = (5, 10, 20, 40)
# A fitted curve is not trusted this far past the largest size measured.
MAX_EXTRAPOLATION = 20


@dataclass(frozen=True)
class ExperimentConfig:
    backbone: str = backbones.DEFAULT_BACKBONE  # cheapest offline backbone: fast and the same everywhere
    seeds: int = 5                 # 5 draws show the spread without a 2-core CPU working for an hour
    per_class: int | None = None   # cap on training images per class; None: all the split leaves
    views: int = 4                 # augmented views per image, as the policies train with; the same for
                                   # every arm, so arms differ only by technique (5 classes x 20 images:
                                   # ~3 minutes on 2 CPU cores, 11 augmented arms included)
    test_fraction: float = 0.25    # held out per class when DATA has no val/: 5 of 20 images


@dataclass(frozen=True)
class ScratchConfig:
    """The from-scratch arm: a small CNN that a 2-core CPU trains in under a minute per seed."""
    size: int = 64         # px: ~100 images cannot teach finer detail, and 64 px keeps epochs cheap
    width: int = 16        # channels of the first of 4 conv blocks, doubling each block: ~100k
                           # parameters, ~0.2 s per 16-image step on one CPU core (32 doubles it)
    epochs: int = 30       # fixed budget: loss on 20 images per class has flattened by then
    batch_size: int = 16
    lr: float = 3e-3       # AdamW with cosine decay: a standard small-CNN recipe
    augment: str = "default"  # online, fresh each epoch: the scratch arm gets augmentation too


# ---------------------------------------------------------------- results

def seed_std(values: list[float]) -> float:
    """Sample standard deviation of per-seed values (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Arm:
    """One arm of an experiment: accuracy on the test images for each seed."""
    name: str
    accuracies: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return seed_std(self.accuracies)

    def to_dict(self, key: str = "name") -> dict:
        return {key: self.name, "accuracies": [round(a, 4) for a in self.accuracies],
                "mean": round(self.mean, 4), "std": round(self.std, 4)}


@dataclass
class ExperimentResult:
    arms: list[Arm]
    backbone: str
    seeds: int
    train_per_class: int           # training images per class in each seed's fit
    n_test: int                    # test images per seed
    test_given: bool               # True: scored on DATA/val/; False: a held-out split per seed
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


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


# ---------------------------------------------------------------- features table and splits

@dataclass
class _Table:
    """Features of every readable image, one row each: the training pool first, then val/."""
    labels: tuple[str, ...]
    items: list[LabeledImage]
    y: torch.Tensor
    given_test: torch.Tensor       # (N,) bool: rows from DATA/val/
    original: torch.Tensor         # (N, D)
    backbone: str
    skipped: list[tuple[str, str]]


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


class _Run:
    """Shared plumbing of one experiment: device, cache, progress and the feature table."""

    def __init__(self, config: ExperimentConfig, on_progress, should_stop, device, cache):
        self.config = config
        self.progress = on_progress or (lambda *_: None)
        self.should_stop = should_stop
        self.device = device or default_device()
        self.cache = cache if cache is not None else FeatureCache()

    def features(self, sources, backbone, policy=None, views=0, stage="features", names=None):
        return extract_features(sources, backbone, policy, views, self.device, self.cache,
                                on_progress=lambda d, t: self.progress(stage, d, t),
                                should_stop=self.should_stop, names=names)

    def table(self, dataset: Dataset) -> _Table:
        """Originals of all images (unreadable ones skipped and reported), with the backbone chosen."""
        if self.config.seeds < 1:
            raise ValueError(f"seeds must be >= 1; got {self.config.seeds}")
        if self.config.per_class is not None and self.config.per_class < 2:
            raise ValueError(f"per_class must be >= 2; got {self.config.per_class}")
        if self.config.views < 0 or not 0 < self.config.test_fraction < 1:
            raise ValueError(f"need views >= 0 and 0 < test_fraction < 1; got {self.config.views}, "
                             f"{self.config.test_fraction}")
        check_trainable(dataset.classes, dataset.train)
        items = list(dataset.train) + list(dataset.val)
        names = backbones.available_backbones() if self.config.backbone == "auto" else [self.config.backbone]
        if self.config.backbone != "auto":
            backbones.get_spec(self.config.backbone)  # unknown name: error listing the valid ones
        if not names:
            raise backbones.BackboneUnavailable("no backbone is available offline")
        feats = self.features([i.path for i in items], names[0], stage=f"features {names[0]}")
        kept = [items[i] for i in feats.kept]
        skipped = list(dataset.skipped) + list(feats.failed)
        labels = dataset.classes
        index_of = {label: i for i, label in enumerate(labels)}
        val = set(dataset.val)
        table = _Table(labels, kept, torch.tensor([index_of[i.label] for i in kept], dtype=torch.long),
                       torch.tensor([i in val for i in kept], dtype=torch.bool),
                       feats.original, names[0], skipped)
        check_trainable(labels, [i for i, v in zip(kept, table.given_test.tolist()) if not v])
        if len(names) > 1:
            table = self._choose_backbone(table, names)
        return table

    def _choose_backbone(self, table: _Table, names: list[str]) -> _Table:
        """As train() does: best cross-validated accuracy on seed 0's training images, ties to the cheaper."""
        rows = make_splits(table, 1, self.config.per_class, self.config.test_fraction)[0].train()
        scores = []
        for name in names:
            try:
                feats = self.features([table.items[r].path for r in range(len(table.items))], name,
                                      stage=f"features {name}")
            except backbones.BackboneUnavailable:
                continue
            if len(feats.kept) != len(table.items):
                continue  # decodes differently: keep to backbones that see every image
            score = cross_val_accuracy(feats.original[rows], table.y[rows], len(table.labels), seed=0)
            scores.append((score, -backbones.get_spec(name).gflops, name, feats.original))
        _, _, name, original = max(scores, key=lambda s: s[:2])
        return dataclasses.replace(table, backbone=name, original=original)

    def views(self, table: _Table, policy: AugmentPolicy, rows: Sequence[int]) -> torch.Tensor:
        """(N, K, D) augmented features; only `rows` (the training rows of any seed) are filled."""
        k = self.config.views if not policy.is_identity else 0
        out = torch.zeros(len(table.items), k, table.original.shape[1])
        if k == 0 or not rows:
            return out
        rows = sorted(set(rows))
        feats = self.features([table.items[r].path for r in rows], table.backbone, policy, k,
                              stage=f"augmenting {policy.name}")
        if len(feats.kept) != len(rows):
            bad = ", ".join(f for f, _ in feats.failed)
            raise DataError(f"images became unreadable during the experiment: {bad}")
        out[rows] = feats.augmented
        return out


def make_splits(table: _Table, seeds: int, per_class: int | None, test_fraction: float) -> list[Split]:
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


def _accuracy(table: _Table, train_rows: list[int], test_rows: Sequence[int], views: torch.Tensor | None) -> float:
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


def _result(arms, table, splits, config, started, **notes) -> ExperimentResult:
    return ExperimentResult(arms=arms, backbone=table.backbone, seeds=len(splits),
                            train_per_class=splits[0].per_class, n_test=len(splits[0].test),
                            test_given=bool(table.given_test.any()), seconds=time.perf_counter() - started,
                            skipped=table.skipped, notes=notes)


# ---------------------------------------------------------------- augmentation

def augmentation_arms(names: Sequence[str] | None = None) -> dict[str, AugmentPolicy]:
    """The arms by name: none, default and each technique alone (or the named ones, in that order).
    Names are policies of augment.POLICIES or techniques of single_technique_policies()."""
    known = {"none": POLICIES["none"], "default": POLICIES["default"], **single_technique_policies(),
             **{k: v for k, v in POLICIES.items() if k not in ("none", "default")}}
    if names is None:
        return {k: known[k] for k in ["none", "default", *single_technique_policies()]}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown augmentation arm {', '.join(map(repr, unknown))}; valid: {', '.join(known)}")
    return {n: known[n] for n in dict.fromkeys(names)}


def augmentation_experiment(dataset: Dataset, policies: Sequence[str] | None = None,
                            config: ExperimentConfig = ExperimentConfig(),
                            on_progress: StageProgress | None = None, should_stop: Callable[[], bool] | None = None,
                            device: torch.device | None = None, cache: FeatureCache | None = None) -> ExperimentResult:
    """Accuracy per augmentation arm over seeds, all arms on the same splits and training images."""
    started = time.perf_counter()
    arms_policies = augmentation_arms(policies)
    run = _Run(config, on_progress, should_stop, device, cache)
    table = run.table(dataset)
    splits = make_splits(table, config.seeds, config.per_class, config.test_fraction)
    used = sorted({r for s in splits for r in s.train()})
    arms = []
    for name, policy in arms_policies.items():
        views = run.views(table, policy, used)
        accuracies = []
        for split in splits:
            accuracies.append(_accuracy(table, split.train(), split.test, views))
            run.progress(f"heads {name}", len(accuracies), len(splits))
        arms.append(Arm(name, accuracies))
    return _result(arms, table, splits, config, started, views=config.views)


# ---------------------------------------------------------------- transfer

def small_cnn(n_classes: int, width: int = 16) -> nn.Sequential:
    """Four conv-BN-ReLU-pool blocks, global pooling, one linear layer: a classic from-scratch baseline."""
    layers: list[nn.Module] = []
    c_in = 3
    for block in range(4):
        c_out = width * 2 ** block
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)]
    return nn.Sequential(*layers)


def _small_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size): shorter side to size*8/7 then a centre crop, as ImageNet evals do."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    out = []
    for path in paths:
        image = load_image(path, draft_size=size * 2)
        image = TF.center_crop(TF.resize(image, round(size * 8 / 7), interpolation=InterpolationMode.BILINEAR), size)
        out.append(TF.pil_to_tensor(image))
    return torch.stack(out)


def train_from_scratch(images: torch.Tensor, y: torch.Tensor, n_classes: int, config: ScratchConfig = ScratchConfig(),
                       seed: int = 0, should_stop: Callable[[], bool] | None = None,
                       on_progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """Train small_cnn on uint8 images for a fixed budget with online augmentation; returns it in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = small_cnn(n_classes, config.width)
    policy = get_policy(config.augment)
    counts = torch.bincount(y, minlength=n_classes).float()
    class_weight = counts.sum() / (n_classes * counts.clamp(min=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config.batch_size):
            if should_stop and should_stop():
                raise InterruptedError("stopped")
            batch = order[start:start + config.batch_size]
            if len(batch) < 2:
                continue  # batch norm needs 2+ samples
            x = augment_batch(images[batch].float() / 255, policy, generator)
            loss = F.cross_entropy(model((x - 0.5) / 0.5), y[batch], weight=class_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if on_progress:
            on_progress(epoch + 1, config.epochs)
    return model.eval()


def transfer_experiment(dataset: Dataset, config: ExperimentConfig = ExperimentConfig(),
                        scratch: ScratchConfig = ScratchConfig(), on_progress: StageProgress | None = None,
                        should_stop: Callable[[], bool] | None = None, device: torch.device | None = None,
                        cache: FeatureCache | None = None) -> ExperimentResult:
    """The same training images, twice per seed: a small CNN trained from scratch, and a head on the
    frozen pretrained backbone's features. Both get the default augmentation."""
    started = time.perf_counter()
    run = _Run(config, on_progress, should_stop, device, cache)
    table = run.table(dataset)
    splits = make_splits(table, config.seeds, config.per_class, config.test_fraction)
    used = sorted({r for s in splits for r in s.train()} | {r for s in splits for r in s.test})
    pixels = torch.zeros(len(table.items), 3, scratch.size, scratch.size, dtype=torch.uint8)
    for done, row in enumerate(used, 1):
        try:
            pixels[row] = _small_images([table.items[row].path], scratch.size)[0]
        except BadImage as exc:
            raise DataError(f"image became unreadable during the experiment: {exc}") from exc
        run.progress("small images", done, len(used))

    scratch_acc = []
    for split in splits:
        rows, test = split.train(), list(split.test)
        model = train_from_scratch(pixels[rows], table.y[rows], len(table.labels), scratch, split.seed,
                                   run.should_stop, lambda d, t: run.progress(f"scratch seed {split.seed}", d, t))
        with torch.inference_mode():
            logits = torch.cat([model((pixels[test[i:i + 64]].float() / 255 - 0.5) / 0.5)
                                for i in range(0, len(test), 64)])
        scratch_acc.append(float((logits.argmax(1) == table.y[test]).float().mean()))

    views = run.views(table, get_policy(scratch.augment), sorted({r for s in splits for r in s.train()}))
    pretrained_acc = [_accuracy(table, s.train(), s.test, views) for s in splits]
    params = sum(p.numel() for p in small_cnn(len(table.labels), scratch.width).parameters())
    return _result([Arm("scratch", scratch_acc), Arm("pretrained", pretrained_acc)], table, splits, config,
                   started, scratch=dataclasses.asdict(scratch), scratch_params=params, views=config.views)


# ---------------------------------------------------------------- learning curve

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


def _measure_curve(table: _Table, splits: list[Split], views: torch.Tensor | None, sizes: Sequence[int],
                   progress: StageProgress) -> list[CurvePoint]:
    largest = min(s.per_class for s in splits)
    points = []
    chosen = _curve_sizes(largest, sizes)
    for i, k in enumerate(chosen, 1):
        points.append(CurvePoint(k, [_accuracy(table, s.train(k), s.test, views) for s in splits]))
        progress("curve", i, len(chosen))
    return points


def learning_curve(dataset: Dataset, target: float = 0.95, config: ExperimentConfig = ExperimentConfig(),
                   augment: str = "default", sizes: Sequence[int] = CURVE_SIZES,
                   on_progress: StageProgress | None = None, should_stop: Callable[[], bool] | None = None,
                   device: torch.device | None = None, cache: FeatureCache | None = None) -> LearningCurve:
    """Accuracy at growing images per class (nested subsets per seed), the fitted power law, and the
    images per class it predicts for `target`."""
    started = time.perf_counter()
    run = _Run(config, on_progress, should_stop, device, cache)
    table = run.table(dataset)
    splits = make_splits(table, config.seeds, config.per_class, config.test_fraction)
    views = run.views(table, get_policy(augment), sorted({r for s in splits for r in s.train()}))
    points = _measure_curve(table, splits, views, sizes, run.progress)
    pool = table.y[~table.given_test]
    cap = config.per_class or len(pool)  # a capped run stands for a project with that many images
    have = {label: min(cap, int((pool == i).sum())) for i, label in enumerate(table.labels)}
    curve = fit_learning_curve(points, target, have, len(splits))
    curve.seconds, curve.skipped = time.perf_counter() - started, table.skipped
    return curve


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
    table = _Table(labels, items, y.long(), torch.zeros(len(items), dtype=torch.bool), original.float(),
                   "", [])
    splits = make_splits(table, seeds, None, test_fraction)
    points = _measure_curve(table, splits, augmented, sizes, lambda *_: None)
    have = {label: int((y == i).sum()) for i, label in enumerate(labels)}
    return fit_learning_curve(points, target, have, seeds)


# ---------------------------------------------------------------- charts and text

def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=120, bbox_inches="tight")
    return out.getvalue()


def plot_arms(result: ExperimentResult, title: str = "") -> bytes:
    """PNG: each seed's accuracy as a dot and the mean +- 1 std per arm; the first arm's mean as a reference line."""
    from matplotlib.figure import Figure

    arms = result.arms
    figure = Figure(figsize=(7, 0.42 * len(arms) + 1.6))
    ax = figure.add_subplot()
    ypos = np.arange(len(arms))[::-1]
    for y0, arm in zip(ypos, arms):
        jitter = np.linspace(-0.18, 0.18, len(arm.accuracies)) if len(arm.accuracies) > 1 else np.zeros(1)
        ax.scatter(arm.accuracies, y0 + jitter, s=12, color="#9ecae1", zorder=2,
                   label="one seed" if y0 == ypos[0] else None)
    ax.errorbar([a.mean for a in arms], ypos, xerr=[a.std for a in arms], fmt="D", color="#08519c",
                capsize=3, zorder=3, label="mean +- std over seeds")
    ax.axvline(arms[0].mean, color="grey", linestyle="--", linewidth=1, label=f"mean of {arms[0].name}")
    ax.set_yticks(ypos, [a.name for a in arms])
    lo = min(min(a.accuracies) for a in arms)
    ax.set_xlim(max(0.0, lo - 0.05), 1.005)
    where = "val/" if result.test_given else "held-out"
    ax.set_xlabel(f"accuracy on {result.n_test} {where} test images "
                  f"({result.seeds} seeds, {result.train_per_class} training images per class)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
    return _png(figure)


def plot_learning_curve(curve: LearningCurve, title: str = "") -> bytes:
    """PNG: measured accuracy per size (mean +- std, seeds as dots), the fitted curve out to the
    estimate, and the target line."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2))
    ax = figure.add_subplot()
    sizes = [p.images_per_class for p in curve.points]
    for p in curve.points:
        ax.scatter([p.images_per_class] * len(p.accuracies), p.accuracies, s=10, color="#9ecae1", zorder=2)
    ax.errorbar(sizes, [p.accuracy for p in curve.points], yerr=[p.std for p in curve.points], fmt="o",
                color="#08519c", capsize=3, zorder=3, label="measured (mean +- std)")
    right = max(sizes)
    if curve.estimate is not None:
        right = max(right, min(curve.estimate, MAX_EXTRAPOLATION * max(sizes)))
    if curve.fit is not None:
        xs = np.geomspace(max(1, min(sizes) / 1.5), right * 1.3, 200)
        f = curve.fit
        ax.plot(xs, f.accuracy(xs), color="#e6550d",
                label=f"fit: error = {f.a:.2f} n^-{f.b:.2f} + {f.c:.3f}")
    ax.axhline(curve.target, color="grey", linestyle="--", linewidth=1, label=f"target {curve.target:.0%}")
    if curve.images_per_class_for_target is not None:
        ax.axvline(curve.images_per_class_for_target, color="#31a354", linestyle=":",
                   label=f"~{curve.images_per_class_for_target} images per class")
    ax.set_xscale("log")
    ticks = sorted(set(sizes) | ({curve.images_per_class_for_target} if curve.images_per_class_for_target else set()))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("training images per class")
    ax.set_ylabel("accuracy")
    ax.set_title(title or curve.advice(), fontsize=9 if not title else None)
    ax.legend(loc="lower right", fontsize=8)
    return _png(figure)


def arms_table(result: ExperimentResult, key: str = "arm") -> str:
    """Plain-text table: mean, std, the paired difference from the first arm (same seed, same
    images: mean +- std over seeds, and seeds better/worse), then each seed."""
    first = result.arms[0]
    lines = [f"{key:<16} {'mean':>6} {'std':>6}   {'vs ' + first.name + ' (paired)':<22} per seed"]
    for arm in result.arms:
        paired = ""
        if arm is not first:
            deltas = [a - b for a, b in zip(arm.accuracies, first.accuracies)]
            spread = seed_std(deltas)
            better, worse = sum(d > 0 for d in deltas), sum(d < 0 for d in deltas)
            paired = f"{statistics.fmean(deltas):+.3f} +- {spread:.3f} {better}/{worse}"
        seeds = " ".join(f"{a:.3f}" for a in arm.accuracies)
        lines.append(f"{arm.name:<16} {arm.mean:6.3f} {arm.std:6.3f}   {paired:<22} {seeds}")
    where = "val/" if result.test_given else "a held-out split per seed"
    lines.append(f"{result.seeds} seeds, {result.train_per_class} training images per class, "
                 f"{result.n_test} test images ({where}), backbone {result.backbone}, {result.seconds:.0f}s; "
                 f"paired: mean +- std of the per-seed difference, seeds better/worse")
    return "\n".join(lines)


def curve_table(curve: LearningCurve) -> str:
    lines = [f"{'per class':>9} {'mean':>6} {'std':>6}   per seed"]
    for p in curve.points:
        lines.append(f"{p.images_per_class:>9} {p.accuracy:6.3f} {p.std:6.3f}   "
                     + " ".join(f"{a:.3f}" for a in p.accuracies))
    if curve.fit is not None:
        f = curve.fit
        lines.append(f"fit: error(n) = {f.a:.3f} * n^-{f.b:.3f} + {f.c:.3f} (levels off at {1 - f.c:.1%})")
    lines.append(curve.advice())
    if curve.reason and curve.images_per_class_for_target is not None:
        lines.append(f"note: {curve.reason}")
    return "\n".join(lines)
