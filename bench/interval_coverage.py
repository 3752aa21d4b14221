"""How often the headline's 95% interval covers the accuracy on photos the build never saw, over many draws.

For each draw of --per-class training photos a class (bench_quality.draw: hymenoptera scored on
its val/, flowers on the photos not drawn) and each Lite backbone, from cached features: the
headline as a build measures it without val/ (every photo out of fold, 5 repeats of 5 folds, the
default policy's views in each fold's fit; its Wilson interval) against the val accuracy of the
head fitted on every photo and its views, as delivered. It prints, per set, the mean headline,
the mean val accuracy, the mean val accuracy of heads that learn from 4/5 of the photos (what
the out-of-fold heads see), and how many intervals cover val.

    python bench/interval_coverage.py --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import draw, each_draw, features, features_only_args  # noqa: E402

from nanostream.engine.augment import get_policy  # noqa: E402
from nanostream.engine.calibration import calibrate  # noqa: E402
from nanostream.engine.features import FeatureCache, extract_features  # noqa: E402
from nanostream.engine.head import fit_head, out_of_fold_logits, stratified_folds  # noqa: E402
from nanostream.engine.metrics import estimate  # noqa: E402
from nanostream.engine.train import REPEATS  # noqa: E402
from nanostream.paths import datasets_dir  # noqa: E402


def one(name: str, per_class: int, seed: int, backbone: str, cache: FeatureCache) -> tuple[float, float, float, bool]:
    """(headline, val accuracy, val accuracy from 4/5 of the photos, whether the interval covers val)."""
    train, val = draw(datasets_dir(), name, per_class, seed)
    labels = list(train)
    y = torch.tensor([i for i, label in enumerate(labels) for _ in train[label]])
    y_val = torch.tensor([i for i, label in enumerate(labels) for _ in val[label]])
    policy = get_policy("default")
    made = extract_features([f for label in labels for f in train[label]], backbone, policy, policy.views, cache=cache)
    x, views = made.original, made.augmented
    x_val = features([f for label in labels for f in val[label]], backbone, cache)

    def val_accuracy(rows: torch.Tensor) -> float:
        x_fit = torch.cat([x[rows], views[rows].reshape(-1, x.shape[1])])
        head = fit_head(x_fit, torch.cat([y[rows], y[rows].repeat_interleave(views.shape[1])]), len(labels))
        with torch.inference_mode():
            return float((head(x_val).argmax(1) == y_val).float().mean())

    oof = out_of_fold_logits(x, y, len(labels), seed, repeats=REPEATS, views=views)
    probs = torch.softmax(oof / calibrate(oof, y).temperature, 2).mean(0)  # as train() averages them
    headline = estimate(probs.argmax(1), y, "cross-validation", REPEATS)
    delivered = val_accuracy(torch.arange(len(y)))
    four_fifths = statistics.mean(val_accuracy(torch.tensor(sorted(set(range(len(y))) - set(held.tolist()))))
                                  for held in stratified_folds(y, 5, seed))
    return headline.accuracy, delivered, four_fifths, headline.covers(delivered)


def main() -> None:
    args = features_only_args(__doc__.splitlines()[0])
    for name, runs in each_draw(args, one):
        headline, delivered, four_fifths = (statistics.mean(r[i] for r in runs) for i in range(3))
        print(f"{name} ({len(args.seeds)} draws x 3 backbones, {args.per_class} a class): headline {headline:.3f}, "
              f"val {delivered:.3f} (heads from 4/5 of the photos: {four_fifths:.3f}); "
              f"the interval covers val in {sum(r[3] for r in runs)} of {len(runs)}")


if __name__ == "__main__":
    main()
