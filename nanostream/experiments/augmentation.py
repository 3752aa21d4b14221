"""Does augmentation help? Accuracy with no augmentation, the default policy and each technique
alone, every arm on the same splits and the same training images, each seed with its own views."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from ..engine.augment import POLICIES, AugmentPolicy, single_technique_policies
from ..engine.curve import StageProgress, head_accuracy, make_splits
from ..engine.data import Dataset
from ..engine.features import FeatureCache
from .common import Arm, ExperimentConfig, ExperimentResult, Run, experiment_result, run_key, view_blocks


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
    """Accuracy per augmentation arm over seeds, all arms on the same splits and training images;
    each seed draws its own augmented views of them (common.view_blocks)."""
    started = time.perf_counter()
    arms_policies = augmentation_arms(policies)
    run = Run(config, on_progress, should_stop, device, cache)
    table = run.table(dataset)
    splits = make_splits(table, config.seeds, config.per_class, config.test_fraction)
    blocks = view_blocks(splits)
    arms = []
    for name, policy in arms_policies.items():
        views = run.seed_views(table, policy, blocks)
        accuracies = []
        for split, seed_views in zip(splits, views):
            accuracies.append(head_accuracy(table, split.train(), split.test, seed_views))
            run.progress(f"heads {name}", len(accuracies), len(splits))
        augmented = views[0].shape[1] > 0
        runs = tuple(run_key(split, seed_blocks if augmented else None) for split, seed_blocks in zip(splits, blocks))
        arms.append(Arm(name, tuple(accuracies), runs))
    return experiment_result(arms, table, splits, started, views=config.views)
