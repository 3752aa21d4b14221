"""Which "none of these" score separates a project's photos from another domain's, on random draws.

For each draw of --per-class training photos a class (bench_quality.draw: hymenoptera scored on
its val/, flowers on the photos not drawn) and each Lite backbone (features cached), the model of
one shared set meets the other set's val photos. Three scores, each with its threshold set as a
build sets it (the split-conformal quantile of the training photos' held-out scores,
unknown.conformal_threshold):
  - "both spaces" (unknown.py's): the mean of the distances to the closest category's mean in what
    the backbone's ImageNet head makes of the features (unknown.semantic) and in the unit
    features, each over its own threshold;
  - "ImageNet space" (the score before it): the first of those distances alone;
  - "nearest photo" (the score before that): 1 - the highest similarity, in the ImageNet space, to
    a training photo of the predicted category, each training photo held out of its own
    out-of-fold prediction.
It prints, per set and score, the mean over draws and backbones of the AUROC, the share of own val
photos and of the other set's photos above the threshold, and the other set's share at the
threshold that marks 10% of own val photos (what a perfectly placed threshold would reach).

    python bench/unknown_scores.py --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import SETS, draw, each_draw, features_only_args  # noqa: E402

from nanostream.engine.device import default_device, precision  # noqa: E402
from nanostream.engine.features import FeatureCache, extract_features  # noqa: E402
from nanostream.engine.head import fit_head, out_of_fold_logits  # noqa: E402
from nanostream.engine.inference import imagenet_head  # noqa: E402
from nanostream.engine.unknown import (class_means, conformal_threshold, fit_unknown, held_out_scores,  # noqa: E402
                                       semantic)
from nanostream.paths import datasets_dir  # noqa: E402


def nearest_photo(z: torch.Tensor, predicted: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor,
                  exclude_self: bool = False) -> torch.Tensor:
    similarity = (z @ reference.T).masked_fill(predicted[:, None] != targets[None, :], -1.0)
    if exclude_self:
        similarity.fill_diagonal_(-1.0)
    return 1 - similarity.max(1).values


def one(name: str, per_class: int, seed: int, backbone: str, cache: FeatureCache) -> dict[str, tuple]:
    from sklearn.metrics import roc_auc_score

    drawn = {n: draw(datasets_dir(), n, per_class, seed) for n in SETS}
    train, val = drawn[name]
    labels = list(train)
    y = torch.tensor([i for i, label in enumerate(labels) for _ in train[label]])
    other = [f for files in drawn[next(n for n in SETS if n != name)][1].values() for f in files]

    def feats(files):
        return extract_features(files, backbone, None, 0, cache=cache).original.float()

    x = feats([f for label in labels for f in train[label]])
    v, o = feats([f for label in labels for f in val[label]]), feats(other)
    device = default_device()
    meaning = imagenet_head(backbone, str(device), precision(device))
    zx, zv, zo = (semantic(t, meaning) for t in (x, v, o))
    head = fit_head(x, y, len(labels))
    with torch.inference_mode():
        pv, po = head(v).argmax(1), head(o).argmax(1)
    oof = out_of_fold_logits(x, y, len(labels), seed)[0].argmax(1)
    means = class_means(zx, y)
    detector = fit_unknown(x, y, meaning, seed)
    scores = {"both spaces": (detector.threshold, detector.scores(v), detector.scores(o)),
              "ImageNet space": (conformal_threshold(held_out_scores(zx, y)), 1 - (zv @ means.T).max(1).values,
                                 1 - (zo @ means.T).max(1).values),
              "nearest photo": (conformal_threshold(nearest_photo(zx, oof, zx, y, exclude_self=True)),
                                nearest_photo(zv, pv, zx, y), nearest_photo(zo, po, zx, y))}
    out = {}
    for score, (threshold, own, foreign) in scores.items():
        at_ten = float(own.sort().values[int(0.9 * len(own))])
        auroc = roc_auc_score([0] * len(own) + [1] * len(foreign), torch.cat([own, foreign]).tolist())
        out[score] = (auroc, float((own > threshold).float().mean()), float((foreign > threshold).float().mean()),
                      float((foreign > at_ten).float().mean()))
    return out


def main() -> None:
    args = features_only_args(__doc__.splitlines()[0])
    for name, runs in each_draw(args, one):
        print(f"\n{name} model on the other set's photos "
              f"({len(args.seeds)} draws x 3 backbones, {args.per_class} a class):")
        for score in runs[0]:
            auroc, own, foreign, at_ten = (statistics.mean(r[score][i] for r in runs) for i in range(4))
            print(f"  {score}: AUROC {auroc:.3f}; at its threshold own val {own:.1%}, other set {foreign:.1%}; "
                  f"other set at 10% own {at_ten:.1%}")


if __name__ == "__main__":
    main()
