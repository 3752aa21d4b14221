"""Does transfer help? A small CNN trained from scratch against a head on the frozen pretrained
backbone, on the same training images per seed, both with the default augmentation."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.augment import augment_batch, get_policy
from ..engine.curve import StageProgress, head_accuracy, make_splits
from ..engine.data import Dataset, DataError
from ..engine.features import FeatureCache
from ..engine.images import BadImage, load_image
from .common import Arm, ExperimentConfig, ExperimentResult, Run, experiment_result, run_key, view_blocks


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


def small_images(paths: Sequence[Path], size: int) -> torch.Tensor:
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
    run = Run(config, on_progress, should_stop, device, cache)
    table = run.table(dataset)
    splits = make_splits(table, config.seeds, config.per_class, config.test_fraction)
    used = sorted({r for s in splits for r in s.train()} | {r for s in splits for r in s.test})
    pixels = torch.zeros(len(table.items), 3, scratch.size, scratch.size, dtype=torch.uint8)
    for done, row in enumerate(used, 1):
        try:
            pixels[row] = small_images([table.items[row].path], scratch.size)[0]
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

    blocks = view_blocks(splits)
    views = run.seed_views(table, get_policy(scratch.augment), blocks)
    pretrained_acc = tuple(head_accuracy(table, s.train(), s.test, v) for s, v in zip(splits, views))
    augmented = views[0].shape[1] > 0
    pretrained_runs = tuple(run_key(s, b if augmented else None) for s, b in zip(splits, blocks))
    scratch_runs = tuple(run_key(s, None, s.seed) for s in splits)  # its seed draws weights, batches, augmentations
    params = sum(p.numel() for p in small_cnn(len(table.labels), scratch.width).parameters())
    return experiment_result([Arm("scratch", tuple(scratch_acc), scratch_runs),
                              Arm("pretrained", pretrained_acc, pretrained_runs)], table, splits,
                             started, scratch=dataclasses.asdict(scratch), scratch_params=params, views=config.views)
