"""Which backbone-choice rule gives the best val accuracy, on random draws of the shared sets.

For each draw of --per-class training photos a class (bench_quality.draw: hymenoptera scored on
its val/, flowers on the photos not drawn), every Lite backbone's features of the training photos
(originals and the default policy's views) and of the val photos are computed once (cached), and:
  - each rule picks a backbone from its repeated cross-validation (train.REPEATS rounds of 5
    folds, as a build does): "best" (the default), "one-se", and the lowest out-of-fold
    log-loss after a fitted temperature;
  - each pick is scored on val the way a build delivers it: the head on originals and views.
It also prints each backbone's probe (originals only), with views, and the mean of the three
heads' probabilities (an ensemble, for its cost in GFLOPs see bench_quality.py). The rule
"ensembles too" scores every pair and the trio as a build scores one backbone (the mean of their
heads' out-of-fold probabilities, on the same folds) and picks among them and the single
backbones by the same rule as "best" (equal scores to the cheaper): what a build that may deliver
an ensemble would give, and the mean GFLOPs per prediction of what each rule picks.

    python bench/selection_rules.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import SETS, draw, paired  # noqa: E402

from nanostream.engine.augment import get_policy  # noqa: E402
from nanostream.engine.backbones import available_backbones, get_spec  # noqa: E402
from nanostream.engine.calibration import fit_temperature  # noqa: E402
from nanostream.engine.choice import Candidate, choose_backbone  # noqa: E402
from nanostream.engine.device import machine_summary  # noqa: E402
from nanostream.engine.features import FeatureCache, extract_features  # noqa: E402
from nanostream.engine.head import fit_head, out_of_fold_logits  # noqa: E402
from nanostream.engine.train import REPEATS  # noqa: E402
from nanostream.paths import datasets_dir  # noqa: E402


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs.argmax(1) == y).float().mean())


def one_draw(name: str, per_class: int, seed: int, cache: FeatureCache) -> dict:
    train, val = draw(datasets_dir(), name, per_class, seed)
    labels = list(train)
    y = torch.tensor([i for i, label in enumerate(labels) for _ in train[label]])
    y_val = torch.tensor([i for i, label in enumerate(labels) for _ in val[label]])
    files = [f for label in labels for f in train[label]]
    val_files = [f for label in labels for f in val[label]]
    policy = get_policy("default")
    scores, delivered, probes, probs, oof_probs = {}, {}, {}, [], {}
    for backbone in available_backbones()[:3]:
        made = extract_features(files, backbone, policy, policy.views, cache=cache)
        x, views = made.original, made.augmented
        v = extract_features(val_files, backbone, None, 0, cache=cache).original
        oof = out_of_fold_logits(x, y, len(labels), 0, repeats=REPEATS)
        temperature = fit_temperature(oof, y)
        oof_probs[backbone] = torch.softmax(oof, 2)
        scores[backbone] = dict(cv=accuracy(oof.reshape(-1, len(labels)), y.repeat(REPEATS)),
                                nll=float(F.cross_entropy(oof.reshape(-1, len(labels)) / temperature, y.repeat(REPEATS))))
        rows = torch.cat([x, views.reshape(-1, x.shape[1])])
        head = fit_head(rows, torch.cat([y, y.repeat_interleave(views.shape[1])]), len(labels))
        with torch.inference_mode():
            p = torch.softmax(head(v), 1)
            probes[backbone] = accuracy(torch.softmax(fit_head(x, y, len(labels))(v), 1), y_val)
        delivered[backbone] = accuracy(p, y_val)
        probs.append(p)
    candidates = [Candidate(b, s["cv"], 0.0, get_spec(b).gflops) for b, s in scores.items()]
    members = {b: (b,) for b in scores}
    for size in (2, 3):
        for combo in itertools.combinations(scores, size):
            key = "+".join(combo)
            members[key] = combo
            mean_oof = torch.stack([oof_probs[b] for b in combo]).mean(0)
            candidates.append(Candidate(key, accuracy(mean_oof.reshape(-1, len(labels)), y.repeat(REPEATS)), 0.0,
                                        sum(get_spec(b).gflops for b in combo)))
            delivered[key] = accuracy(torch.stack([probs[list(scores).index(b)] for b in combo]).mean(0), y_val)
    singles = candidates[:len(scores)]
    picks = {"best": choose_backbone(singles, n_train=len(y)).backbone,
             "one-se": choose_backbone(singles, n_train=len(y), rule="one-se").backbone,
             "log-loss": min(scores, key=lambda b: scores[b]["nll"]),
             "ensembles too": choose_backbone(candidates, n_train=len(y)).backbone}
    return dict(set=name, seed=seed, picks=picks, val={rule: delivered[b] for rule, b in picks.items()},
                gflops={rule: sum(get_spec(b).gflops for b in members[pick]) for rule, pick in picks.items()},
                probe=probes, views={b: delivered[b] for b in scores},
                ensemble=accuracy(torch.stack(probs).mean(0), y_val))


def short(pick: str) -> str:
    """efficientnet_lite0+efficientnet_lite2 -> lite0+lite2"""
    return "+".join(b.removeprefix("efficientnet_") for b in pick.split("+"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: NANOSTREAM_HOME's)")
    args = parser.parse_args()
    print(machine_summary())
    cache = FeatureCache(args.cache)
    rows = [one_draw(name, args.per_class, seed, cache) for seed in args.seeds for name in SETS]
    for row in rows:
        print(row["set"], row["seed"], {rule: f"{short(row['picks'][rule])} {acc:.3f}" for rule, acc in row["val"].items()})
    for name in SETS:
        mine = [r for r in rows if r["set"] == name]
        mean = lambda get: statistics.mean(get(r) for r in mine)  # noqa: E731
        print(f"\n{name}, {len(mine)} draws of {args.per_class} a class, mean val accuracy:")
        print("  rules: " + ", ".join(f"{rule} {mean(lambda r: r['val'][rule]):.3f} ({mean(lambda r: r['gflops'][rule]):.2f} GFLOPs)"
                                      for rule in mine[0]["val"]))
        print("  probes (originals / with views): " + ", ".join(
            f"{short(b)} {mean(lambda r: r['probe'][b]):.3f} / {mean(lambda r: r['views'][b]):.3f}" for b in mine[0]["probe"]))
        print(f"  ensemble of the three (views): {mean(lambda r: r['ensemble']):.3f}")
        print("  ensembles too against best, paired by draw: "
              + paired([r["val"]["ensembles too"] - r["val"]["best"] for r in mine]))


if __name__ == "__main__":
    main()
