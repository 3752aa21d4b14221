"""How many images are enough? Accuracy at growing images per class on a DATA folder, the power law
through it and the images per class it predicts for a target (the measuring is engine/curve.py's,
shared with the build's advice; this adds the dataset's features and the printed table)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from ..engine.augment import get_policy
from ..engine.curve import CURVE_SIZES, LearningCurve, StageProgress, fit_learning_curve, make_splits, measure_curve
from ..engine.data import Dataset
from ..engine.features import FeatureCache
from .common import ExperimentConfig, Run


def learning_curve(dataset: Dataset, target: float = 0.95, config: ExperimentConfig = ExperimentConfig(),
                   augment: str = "default", sizes: Sequence[int] = CURVE_SIZES,
                   on_progress: StageProgress | None = None, should_stop: Callable[[], bool] | None = None,
                   device: torch.device | None = None, cache: FeatureCache | None = None) -> LearningCurve:
    """Accuracy at growing images per class (nested subsets per seed), the fitted power law, and the
    images per class it predicts for `target`."""
    started = time.perf_counter()
    run = Run(config, on_progress, should_stop, device, cache)
    table = run.table(dataset)
    splits = make_splits(table, config.seeds, config.per_class, config.test_fraction)
    views = run.views(table, get_policy(augment), sorted({r for s in splits for r in s.train()}))
    points = measure_curve(table, splits, views, sizes, run.progress)
    pool = table.y[~table.given_test]
    cap = config.per_class or len(pool)  # a capped run stands for a project with that many images
    have = {label: min(cap, int((pool == i).sum())) for i, label in enumerate(table.labels)}
    curve = fit_learning_curve(points, target, have, len(splits))
    curve.seconds, curve.skipped = time.perf_counter() - started, table.skipped
    return curve


def curve_table(curve: LearningCurve) -> str:
    """Plain text: mean and std per size, then each seed; the fit, and the advice it gives."""
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
