"""What every experiment shares: its config, the feature table of a dataset, the arms it compares
and their result, as a table and as a chart.

Every experiment computes backbone features once per image (original and augmented views, cached on
disk by features.py) and then fits a head per seed and arm on subsets of those rows, so twelve
arms over five seeds cost one feature pass per policy, not sixty trainings. Splits:
  - DATA with val/: every seed scores on val/; the seed picks which training images are used.
  - DATA without val/: the seed makes a stratified split (test_fraction held out per class),
    then picks training images from the rest.
`per_class` caps training images per class. Same seed, same data: the same numbers.
Each seed draws its own augmented views (Run.seed_views), so seeds that train on the same photos
are still different runs; seeds whose runs are the same (no augmentation, a fixed val/ and every
training photo used) count once in an arm's mean and spread.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import charts
from ..engine import backbones
from ..engine.augment import AugmentPolicy
from ..engine.choice import Candidate, choose_backbone
from ..engine.curve import FeatureTable, Split, make_splits
from ..engine.data import Dataset, DataError, check_trainable
from ..engine.device import default_device
from ..engine.features import FeatureCache, extract_features
from ..engine.head import cross_val_accuracy


@dataclass(frozen=True)
class ExperimentConfig:
    backbone: str = backbones.DEFAULT_BACKBONE  # cheapest offline backbone: fast and the same everywhere
    seeds: int = 5                 # 5 draws show the spread without a 2-core CPU working for an hour
    per_class: int | None = None   # cap on training images per class; None: all the split leaves
    views: int = 4                 # augmented views per image, the same for every arm, so arms differ
                                   # only by technique (5 classes x 20 images: ~3 minutes on 2 CPU cores,
                                   # 11 augmented arms included). Builds make 2 (augment.py); the
                                   # experiments keep 4, with which docs/evidence.md was measured
    test_fraction: float = 0.25    # held out per class when DATA has no val/: 5 of 20 images


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class Arm:
    """One arm of an experiment: accuracy on the test images for each seed, and what each seed's
    run was (run_key): heads are deterministic, so two seeds with the same key measured one thing."""
    name: str
    accuracies: tuple[float, ...]
    runs: tuple[Hashable, ...]     # per seed, parallel to accuracies

    @property
    def distinct(self) -> list[float]:
        """One accuracy per distinct run, in seed order: what the mean and the spread are over."""
        return distinct_values(self.accuracies, self.runs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.distinct)

    @property
    def std(self) -> float | None:
        """Sample std over distinct runs; None with one, where no spread was measured."""
        return statistics.stdev(self.distinct) if len(self.distinct) > 1 else None

    def to_dict(self, key: str = "name") -> dict:
        return {key: self.name, "accuracies": [round(a, 4) for a in self.accuracies],
                "distinct_runs": len(self.distinct), "mean": round(self.mean, 4),
                "std": None if self.std is None else round(self.std, 4)}


def distinct_values(values: Sequence[float], runs: Sequence[Hashable]) -> list[float]:
    """The value of each run key's first seed, in seed order."""
    first: dict[Hashable, float] = {}
    for value, run in zip(values, runs, strict=True):
        first.setdefault(run, value)
    return list(first.values())


def run_key(split: Split, blocks: dict[int, int] | None = None, *extra: Hashable) -> tuple:
    """What a seed's fit depends on: its training and test rows, the block of augmented views
    each training row drew (None: no augmentation) and anything else it was seeded with."""
    rows = sorted(split.train())  # the same photos in another order: the same full-batch fit
    drawn = None if blocks is None else tuple(blocks[r] for r in rows)
    return (tuple(rows), split.test, drawn, *extra)


def view_blocks(splits: Sequence[Split]) -> list[dict[int, int]]:
    """Per seed, training row -> which block of augmented views it draws: the j-th seed that
    trains on a photo gets its j-th block, so no two seeds see the same augmentations of a photo,
    and a photo used by one seed costs one block (seed 0's block 0 is the views a build makes)."""
    uses: Counter[int] = Counter()
    blocks = []
    for split in splits:
        rows = split.train()
        blocks.append({r: uses[r] for r in rows})
        uses.update(rows)
    return blocks


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
        """(N, K, D) augmented features, block 0 (the views a build makes); only `rows` are filled.
        The learning curve's: its nested sizes of one seed share them."""
        return self.seed_views(table, policy, [{r: 0 for r in rows}])[0]

    def seed_views(self, table: FeatureTable, policy: AugmentPolicy,
                   blocks: Sequence[dict[int, int]]) -> list[torch.Tensor]:
        """Per seed, (N, K, D) augmented features of its training rows (others zero): row r gets
        views blocks[seed][r] * K + 1 .. + K, each deterministic in (image, view) (features.py)."""
        k = self.config.views if not policy.is_identity else 0
        out = [torch.zeros(len(table.items), k, table.original.shape[1]) for _ in blocks]
        need: dict[int, int] = {}  # row -> blocks of views it needs
        for seed_blocks in blocks:
            for row, block in seed_blocks.items():
                need[row] = max(need.get(row, 0), block + 1)
        if k == 0 or not need:
            return out
        for count in sorted(set(need.values())):  # one pass per depth: a row computes only its blocks
            rows = sorted(r for r, n in need.items() if n == count)
            feats = self.features([table.items[r].path for r in rows], table.backbone, policy, k * count,
                                  stage=f"augmenting {policy.name}")
            if len(feats.kept) != len(rows):
                bad = ", ".join(f for f, _ in feats.failed)
                raise DataError(f"images became unreadable during the experiment: {bad}")
            for i, row in enumerate(rows):
                for seed_blocks, views in zip(blocks, out):
                    if row in seed_blocks:
                        views[row] = feats.augmented[i, seed_blocks[row] * k:(seed_blocks[row] + 1) * k]
        return out


# ---------------------------------------------------------------- the arms as a chart and a table

def plot_arms(result: ExperimentResult, title: str = "") -> bytes:
    """PNG (charts.arms_png): each seed's accuracy as a dot and the mean +- 1 std per arm, the first
    arm's mean as the reference line; the axis says what the accuracies were measured on."""
    where = "val/" if result.test_given else "held-out"
    xlabel = (f"accuracy on {result.n_test} {where} test images ({result.seeds} seeds, distinct runs shown; "
              f"{result.train_per_class} training images per class)")
    return charts.arms_png([(arm.name, arm.distinct) for arm in result.arms], xlabel, title)


def arms_table(result: ExperimentResult, key: str = "arm") -> str:
    """Plain-text table: distinct runs, mean, std, the paired difference from the first arm (same
    seed, same images: mean +- std over the seeds whose pair of runs is distinct, and seeds
    better/worse), then each seed. A spread of one run is "-": none was measured."""
    first = result.arms[0]
    lines = [f"{key:<16} {'runs':>4} {'mean':>6} {'std':>6}   {'vs ' + first.name + ' (paired)':<22} per seed"]
    for arm in result.arms:
        paired = ""
        if arm is not first:
            deltas = distinct_values([a - b for a, b in zip(arm.accuracies, first.accuracies)],
                                     list(zip(arm.runs, first.runs)))
            spread = f"{statistics.stdev(deltas):.3f}" if len(deltas) > 1 else "-"
            better, worse = sum(d > 0 for d in deltas), sum(d < 0 for d in deltas)
            paired = f"{statistics.fmean(deltas):+.3f} +- {spread} {better}/{worse}"
        seeds = " ".join(f"{a:.3f}" for a in arm.accuracies)
        std = "-" if arm.std is None else f"{arm.std:.3f}"
        lines.append(f"{arm.name:<16} {len(arm.distinct):>4} {arm.mean:6.3f} {std:>6}   {paired:<22} {seeds}")
    where = "val/" if result.test_given else "a held-out split per seed"
    lines.append(f"{result.seeds} seeds, {result.train_per_class} training images per class, "
                 f"{result.n_test} test images ({where}), backbone {result.backbone}, {result.seconds:.0f}s; "
                 f"runs: distinct runs (seeds that trained on the same images and views count once); "
                 f"paired: mean +- std of the per-seed difference over distinct pairs, seeds better/worse")
    return "\n".join(lines)
