"""What every experiment shares: its config, the feature table of a dataset, the arms it compares
and their result, as a table and as a chart.

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
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import charts
from ..engine import backbones
from ..engine.augment import AugmentPolicy
from ..engine.choice import Candidate, choose_backbone
from ..engine.curve import FeatureTable, Split, make_splits, seed_std
from ..engine.data import Dataset, DataError, check_trainable
from ..engine.device import default_device
from ..engine.features import FeatureCache, extract_features
from ..engine.head import cross_val_accuracy


@dataclass(frozen=True)
class ExperimentConfig:
    backbone: str = backbones.DEFAULT_BACKBONE  # cheapest offline backbone: fast and the same everywhere
    seeds: int = 5                 # 5 draws show the spread without a 2-core CPU working for an hour
    per_class: int | None = None   # cap on training images per class; None: all the split leaves
    views: int = 4                 # augmented views per image, as the policies train with; the same for
                                   # every arm, so arms differ only by technique (5 classes x 20 images:
                                   # ~3 minutes on 2 CPU cores, 11 augmented arms included)
    test_fraction: float = 0.25    # held out per class when DATA has no val/: 5 of 20 images


# ---------------------------------------------------------------- results

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


def experiment_result(arms: list[Arm], table: FeatureTable, splits: list[Split], started: float,
                      **notes) -> ExperimentResult:
    """The arms of an experiment that began at perf_counter() `started`, with what they were measured on."""
    return ExperimentResult(arms=arms, backbone=table.backbone, seeds=len(splits),
                            train_per_class=splits[0].per_class, n_test=len(splits[0].test),
                            test_given=bool(table.given_test.any()), seconds=time.perf_counter() - started,
                            skipped=table.skipped, notes=notes)


# ---------------------------------------------------------------- the feature table

class Run:
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

    def table(self, dataset: Dataset) -> FeatureTable:
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
        table = FeatureTable(labels, kept, torch.tensor([index_of[i.label] for i in kept], dtype=torch.long),
                             torch.tensor([i in val for i in kept], dtype=torch.bool),
                             feats.original, names[0], skipped)
        check_trainable(labels, [i for i, v in zip(kept, table.given_test.tolist()) if not v])
        if len(names) > 1:
            table = self._choose_backbone(table, names)
        return table

    def _choose_backbone(self, table: FeatureTable, names: list[str]) -> FeatureTable:
        """As train() does (choice.choose_backbone): best cross-validated accuracy on seed 0's
        training images, ties to the cheaper."""
        rows = make_splits(table, 1, self.config.per_class, self.config.test_fraction)[0].train()
        candidates, originals = [], {}
        for name in names:
            started = time.perf_counter()
            try:
                feats = self.features([table.items[r].path for r in range(len(table.items))], name,
                                      stage=f"features {name}")
            except backbones.BackboneUnavailable:
                continue
            if len(feats.kept) != len(table.items):
                continue  # decodes differently: keep to backbones that see every image
            score = cross_val_accuracy(feats.original[rows], table.y[rows], len(table.labels), seed=0)
            candidates.append(Candidate(name, score, time.perf_counter() - started, backbones.get_spec(name).gflops))
            originals[name] = feats.original
        name = choose_backbone(candidates, n_train=len(rows)).backbone
        return dataclasses.replace(table, backbone=name, original=originals[name])

    def views(self, table: FeatureTable, policy: AugmentPolicy, rows: Sequence[int]) -> torch.Tensor:
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


# ---------------------------------------------------------------- the arms as a chart and a table

def plot_arms(result: ExperimentResult, title: str = "") -> bytes:
    """PNG (charts.arms_png): each seed's accuracy as a dot and the mean +- 1 std per arm, the first
    arm's mean as the reference line; the axis says what the accuracies were measured on."""
    where = "val/" if result.test_given else "held-out"
    xlabel = (f"accuracy on {result.n_test} {where} test images "
              f"({result.seeds} seeds, {result.train_per_class} training images per class)")
    return charts.arms_png([(arm.name, arm.accuracies) for arm in result.arms], xlabel, title)


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
