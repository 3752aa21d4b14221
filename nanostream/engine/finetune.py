"""The fine-tune path: unfreeze a backbone's last stages and train them with online augmentation.

Starts from the fast path's head (linear probe, then fine-tune: the head is already good, so
the unfrozen features are not wrecked by a random head's early gradients). Batch-norm
statistics stay frozen, because batches of a few images estimate them badly.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .augment import AugmentPolicy, augment_batch
from .backbones import Backbone, load_backbone, prepare_image
from .data import LabeledImage
from .device import autocast, precision
from .head import Head
from .images import load_image

BATCH_SIZE = 16
BODY_LR = 1e-4   # small steps for pretrained layers
HEAD_LR = 1e-3


def trainable_prefixes(backbone: Backbone) -> tuple[str, ...]:
    return tuple(f"body.{name}." for name in backbone.spec.finetune)


def _load_images(items: Sequence[LabeledImage], backbone: Backbone) -> torch.Tensor:
    spec = backbone.spec
    images = [prepare_image(load_image(item.path, draft_size=spec.resize_size), spec) for item in items]
    return (torch.stack(images) * 255).round().to(torch.uint8)  # uint8 keeps 1,000 images in ~150 MB


def finetune_backbone(name: str, train_items: Sequence[LabeledImage], y: torch.Tensor,
                      val_items: Sequence[LabeledImage], head: Head, policy: AugmentPolicy, epochs: int,
                      seed: int, device: torch.device,
                      on_progress: Callable[[int, int], None] | None = None,
                      should_stop: Callable[[], bool] | None = None):
    """Returns (changed backbone tensors, fine-tuned head, validation probabilities)."""
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    backbone = copy.deepcopy(load_backbone(name)).to(device)
    head = copy.deepcopy(head).to(device)
    prefixes = trainable_prefixes(backbone)
    body_params = [p for n, p in backbone.named_parameters() if n.startswith(prefixes)]
    for p in body_params:
        p.requires_grad_(True)
    for p in head.parameters():
        p.requires_grad_(True)
    backbone.eval()  # frozen batch-norm statistics and no dropout, though some weights train
    mode = precision(device)

    images = _load_images(train_items, backbone)
    y = y.to(device)
    counts = torch.bincount(y, minlength=head.linear.out_features).float()
    class_weight = counts.sum() / (len(counts) * counts.clamp(min=1))
    optimizer = torch.optim.AdamW([{"params": body_params, "lr": BODY_LR},
                                   {"params": head.linear.parameters(), "lr": HEAD_LR}], weight_decay=1e-4)
    steps = epochs * ((len(images) + BATCH_SIZE - 1) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), BATCH_SIZE):
            if should_stop and should_stop():
                raise InterruptedError("stopped")
            batch = order[start:start + BATCH_SIZE]
            x = images[batch].to(device).float() / 255
            x = augment_batch(x, policy, generator)
            with autocast(device, mode):
                loss = F.cross_entropy(head(backbone(x).float()), y[batch], weight=class_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if on_progress:
                on_progress(step, steps)

    with torch.inference_mode():
        val_images = _load_images(val_items, backbone)
        probs = torch.cat([torch.softmax(head(backbone(val_images[i:i + BATCH_SIZE].to(device).float() / 255)), 1)
                           for i in range(0, len(val_images), BATCH_SIZE)]).cpu()
    changed = {k: v.detach().cpu() for k, v in backbone.state_dict().items() if k.startswith(prefixes)}
    return changed, head.cpu().eval(), probs
