"""Is an ensemble's confidence as well calibrated as a single backbone's? Val ECE over many draws.

For each draw of --per-class training photos a class (bench_quality.draw: hymenoptera scored on
its val/, flowers on the photos not drawn) and each candidate a build scores (Lite0/1/2, their
pairs and the trio), from cached features: the head as a build delivers it (every photo and the
default policy's views; one layer per member for an ensemble), its temperature as a build fits it
(out of fold, 5 repeats of 5 folds, views in each fold's fit), and its 15-bin ECE on val with
that temperature and with none. It prints the means over draws for the single backbones and for
the ensembles, and the standard error of each over draws: bench_quality's three builds are one
candidate a draw, and their ECE moves by more between draws than between these rules.

    python bench/calibration_draws.py --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import SETS, draw, features, features_only_args  # noqa: E402

from nanostream.engine.augment import get_policy  # noqa: E402
from nanostream.engine.backbones import available_backbones  # noqa: E402
from nanostream.engine.calibration import calibrate, expected_calibration_error  # noqa: E402
from nanostream.engine.device import machine_summary  # noqa: E402
from nanostream.engine.features import FeatureCache, extract_features  # noqa: E402
from nanostream.engine.head import fit_head, out_of_fold_logits  # noqa: E402
from nanostream.engine.train import REPEATS  # noqa: E402
from nanostream.paths import datasets_dir  # noqa: E402


def one_draw(name: str, per_class: int, seed: int, cache: FeatureCache) -> list[dict]:
    """Per candidate: its size (members), temperature, val ECE with it and without."""
    train, val = draw(datasets_dir(), name, per_class, seed)
    labels = list(train)
    y = torch.tensor([i for i, label in enumerate(labels) for _ in train[label]])
    y_val = torch.tensor([i for i, label in enumerate(labels) for _ in val[label]])
    policy = get_policy("default")
    singles = available_backbones()[:3]
    made = {b: extract_features([f for label in labels for f in train[label]], b, policy, policy.views, cache=cache)
            for b in singles}
    on_val = {b: features([f for label in labels for f in val[label]], b, cache) for b in singles}
    rows = []
    for size in (1, 2, 3):
        for members in itertools.combinations(singles, size):
            x = torch.cat([made[b].original for b in members], 1)
            views = torch.cat([made[b].augmented for b in members], 2)
            widths = [made[b].original.shape[1] for b in members]
            head = fit_head(torch.cat([x, views.reshape(-1, x.shape[1])]),
                            torch.cat([y, y.repeat_interleave(views.shape[1])]), len(labels), widths=widths)
            oof = out_of_fold_logits(x, y, len(labels), seed, repeats=REPEATS, views=views, widths=widths)
            temperature = calibrate(oof, y).temperature
            with torch.inference_mode():
                logits = head(torch.cat([on_val[b] for b in members], 1))
            rows.append({"members": size, "temperature": temperature,
                         "with": expected_calibration_error(torch.softmax(logits / temperature, 1), y_val),
                         "without": expected_calibration_error(torch.softmax(logits, 1), y_val)})
    return rows


def main() -> None:
    args = features_only_args(__doc__.splitlines()[0])
    print(machine_summary())
    cache = FeatureCache()
    for name in SETS:
        draws = [one_draw(name, args.per_class, seed, cache) for seed in args.seeds]
        for kind, sizes in (("single backbones", {1}), ("ensembles (pairs and trio)", {2, 3})):
            # one figure per draw (the mean of its candidates of this kind): draws are the repetitions
            per_draw = {key: [statistics.mean(r[key] for r in rows if r["members"] in sizes) for rows in draws]
                        for key in ("with", "without", "temperature")}

            def figure(key: str) -> str:
                values = per_draw[key]
                return f"{statistics.mean(values):.3f} (standard error {statistics.stdev(values) / len(values) ** 0.5:.3f})"

            print(f"{name}, {kind}, {len(args.seeds)} draws of {args.per_class} a class: val ECE with the build's "
                  f"temperature {figure('with')}, without {figure('without')}; temperature {figure('temperature')}")


if __name__ == "__main__":
    main()
