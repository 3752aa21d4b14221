"""Test-time flip averaging and feature normalisation: do they make a build's head more accurate?

For each draw of --per-class training photos a class (bench_quality.draw: hymenoptera scored on
its val/, flowers on the photos not drawn) and each Lite backbone, a head (fit_head, as a build
fits it) learns from the originals and the augmented views a build makes, and is scored on val:
  - as builds predict: the head on each val photo's features;
  - flip averaging: the mean of its probabilities for the photo and its mirror image (a second
    forward pass per prediction: twice the prediction cost, where issue 14 allows 1.3x);
  - normalised: every feature row scaled to unit length before the head learns and predicts
    (the head standardises each feature either way).
Printed per set: the mean val accuracy of each, and each one's gain over the first paired by
draw and backbone, with its standard error.

    python bench/flip_and_norm.py --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import draw, each_draw, features_only_args, paired  # noqa: E402

from nanostream.engine.augment import POLICIES, get_policy  # noqa: E402
from nanostream.engine.features import FeatureCache, extract_features  # noqa: E402
from nanostream.engine.head import fit_head  # noqa: E402
from nanostream.paths import datasets_dir  # noqa: E402

# Every photo mirrored, nothing else: its one "view" is the mirror image.
MIRROR = dataclasses.replace(POLICIES["none"], name="mirror", hflip=1.0)
ARMS = ("as builds predict", "flip averaging", "normalised")


def accuracies(name: str, per_class: int, seed: int, backbone: str, cache: FeatureCache) -> list[float]:
    """Val accuracy of each arm (ARMS)."""
    train, val = draw(datasets_dir(), name, per_class, seed)
    labels = list(train)
    y = torch.tensor([i for i, label in enumerate(labels) for _ in train[label]])
    y_val = torch.tensor([i for i, label in enumerate(labels) for _ in val[label]])
    policy = get_policy("default")
    made = extract_features([f for label in labels for f in train[label]], backbone, policy, policy.views,
                            cache=cache)
    seen = extract_features([f for label in labels for f in val[label]], backbone, MIRROR, 1, cache=cache)
    assert not made.failed and not seen.failed, (made.failed, seen.failed)
    x = torch.cat([made.original, made.augmented.reshape(-1, made.original.shape[1])])
    y_all = torch.cat([y, y.repeat_interleave(policy.views)])
    head = fit_head(x, y_all, len(labels))
    normed = fit_head(F.normalize(x.float(), dim=1), y_all, len(labels))
    with torch.inference_mode():
        plain = torch.softmax(head(seen.original), 1)
        mirrored = torch.softmax(head(seen.augmented[:, 0]), 1)
        unit = normed(F.normalize(seen.original.float(), dim=1))
    return [float((p.argmax(1) == y_val).float().mean()) for p in (plain, (plain + mirrored) / 2, unit)]


def main() -> None:
    args = features_only_args(__doc__.splitlines()[0])
    for name, runs in each_draw(args, accuracies):
        means = ", ".join(f"{arm} {statistics.mean(r[i] for r in runs):.4f}" for i, arm in enumerate(ARMS))
        print(f"{name} ({len(args.seeds)} draws x 3 backbones, {args.per_class} a class), mean val accuracy: {means}")
        for i, arm in enumerate(ARMS[1:], start=1):
            print(f"  {arm} against {ARMS[0]}: {paired([r[i] - r[0] for r in runs])}")


if __name__ == "__main__":
    main()
