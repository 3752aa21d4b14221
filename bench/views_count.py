"""How many augmented views a build's head needs: val accuracy of heads trained with 0 to 4 views a photo.

For each draw of --per-class training photos a class (bench_quality.draw: hymenoptera scored on
its val/, flowers on the photos not drawn) and each Lite backbone, a head (fit_head, as a build
fits it) learns from the originals and the first k of the default policy's augmented views
(view j of a photo is the same whatever the count, features.py); printed is the mean val
accuracy over draws and backbones for each k, and each k's gain over the count builds make,
paired by draw and backbone. Each view costs one forward pass per photo.

    python bench/views_count.py --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import draw, each_draw, features, features_only_args, paired  # noqa: E402

from nanostream.engine.augment import get_policy  # noqa: E402
from nanostream.engine.features import FeatureCache, extract_features  # noqa: E402
from nanostream.engine.head import fit_head  # noqa: E402
from nanostream.paths import datasets_dir  # noqa: E402

MAX_VIEWS = 4  # the count builds made before they made 2


def accuracies(name: str, per_class: int, seed: int, backbone: str, cache: FeatureCache) -> list[float]:
    """Val accuracy of the head with k = 0..MAX_VIEWS views of each training photo."""
    train, val = draw(datasets_dir(), name, per_class, seed)
    labels = list(train)
    y = torch.tensor([i for i, label in enumerate(labels) for _ in train[label]])
    y_val = torch.tensor([i for i, label in enumerate(labels) for _ in val[label]])
    made = extract_features([f for label in labels for f in train[label]], backbone, get_policy("default"),
                            MAX_VIEWS, cache=cache)
    assert not made.failed, made.failed
    x_val = features([f for label in labels for f in val[label]], backbone, cache)
    out = []
    for k in range(MAX_VIEWS + 1):
        x = torch.cat([made.original, made.augmented[:, :k].reshape(-1, made.original.shape[1])])
        head = fit_head(x, torch.cat([y, y.repeat_interleave(k)]), len(labels))
        with torch.inference_mode():
            out.append(float((head(x_val).argmax(1) == y_val).float().mean()))
    return out


def main() -> None:
    args = features_only_args(__doc__.splitlines()[0])
    build = get_policy("default").views
    for name, runs in each_draw(args, accuracies):
        means = ", ".join(f"{k} views {statistics.mean(r[k] for r in runs):.4f}" for k in range(MAX_VIEWS + 1))
        print(f"{name} ({len(args.seeds)} draws x 3 backbones, {args.per_class} a class), mean val accuracy: {means}")
        for k in (k for k in range(MAX_VIEWS + 1) if k != build):
            print(f"  {k} views against a build's {build}: {paired([r[k] - r[build] for r in runs])}")


if __name__ == "__main__":
    main()
