"""Does the review find planted mislabelled and off-topic photos? Precision and recall on a noisy copy.

measure(dataset) copies `per_class` photos of each category of a shared set into a fresh project,
moves 10% of them to another category (swapped labels), adds 10% more photos from another shared
set to random categories (off-topic), runs review.rank_suspicious (the ranking the app shows) and
counts: of the photos flagged, how many were planted (precision); of the planted, how many were
flagged (recall); and, cutting every copy's ranking (in the order the review shows it) at the
same depth, the share planted among the photos above the cut at the shallowest cut that finds
80% of the planted ones (precision_at_recall: the order's quality, whatever the review flags).
bench/bench_quality.py imports it; alone it prints one line per seed and dataset and the pooled
counts with 95% Wilson intervals:

    python bench/label_noise.py [--per-class 20] [--seeds 3]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NOISE = 0.10      # the bench: 10% of labels swapped, and 10% off-topic photos added


@dataclass(frozen=True)
class LabelNoiseResult:
    dataset: str
    photos: int                # in the noisy project, planted ones included
    planted: int               # swapped + off-topic
    flagged: int               # photos with any reason in the ranking
    found: int                 # planted and flagged
    in_order: tuple[bool, ...] = ()  # planted or not, every photo in the order the review shows them (_order)

    @property
    def precision(self) -> float:
        return self.found / self.flagged if self.flagged else 0.0

    @property
    def recall(self) -> float:
        return self.found / self.planted if self.planted else 0.0


def _categories(root: Path) -> dict[str, list[Path]]:
    """category -> photos, sorted; DATA/train/<category>/ when the set has a train/ split."""
    root = root / "train" if (root / "train").is_dir() else root
    return {d.name: sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(root.iterdir()) if d.is_dir()}


def measure(dataset_dir: Path, per_class: int = 20, seed: int = 0,
            off_topic_dir: Path | None = None) -> LabelNoiseResult:
    """Plant swapped labels and off-topic photos (from off_topic_dir; default: the other shared set)
    in a copy of dataset_dir, rank it, count."""
    from nanostream.paths import datasets_dir
    from nanostream.flows.review import rank_suspicious
    from nanostream.sources.ingest import add_sources
    from nanostream.store.db import Store

    rng = random.Random(f"label noise {seed}")
    dataset_dir = Path(dataset_dir)
    photos = _categories(dataset_dir)
    names = list(photos)
    chosen = [(photo, name) for name in names for photo in rng.sample(photos[name], per_class)]
    swapped = set(rng.sample(range(len(chosen)), round(NOISE * len(chosen))))
    filed = [(photo, rng.choice([n for n in names if n != name]) if i in swapped else name)
             for i, (photo, name) in enumerate(chosen)]
    if off_topic_dir is None:
        off_topic_dir = datasets_dir() / ("flowers" if Path(dataset_dir).name == "hymenoptera" else "hymenoptera")
    strangers = [p for ps in _categories(off_topic_dir).values() for p in ps]
    filed += [(photo, rng.choice(names)) for photo in rng.sample(strangers, round(NOISE * len(chosen)))]
    planted_files = {chosen[i][0] for i in swapped} | {photo for photo, _ in filed[len(chosen):]}

    with tempfile.TemporaryDirectory() as home, Store(Path(home)) as store:
        store.create_project("noisy", names)
        planted: set[str] = set()  # content hashes, as the store reports them
        for name in names:
            mine = [photo for photo, filed_as in filed if filed_as == name]
            add_sources(store, "noisy", name, [photo for photo in mine if photo not in planted_files])
            planted |= set(add_sources(store, "noisy", name, [photo for photo in mine if photo in planted_files]).added)
        ranked = rank_suspicious(store, "noisy")  # features from the usual cache: reruns are cheap
        by_hash = {r.id: r.content_hash for r in store.list_images("noisy")}
    flagged = {by_hash[s.image_id] for suspects in ranked.values() for s in suspects if s.flagged}
    in_order = tuple(by_hash[s.image_id] in planted for s in _order(ranked))
    return LabelNoiseResult(dataset_dir.name, len(by_hash), len(planted), len(flagged), len(flagged & planted), in_order)


def _order(ranked) -> list:
    """Every category's ranking as one list, in the review's own order (facts, then findings, then the rest)."""
    from nanostream.flows.review import review_order

    return sorted((s for suspects in ranked.values() for s in suspects), key=review_order)


def precision_at_recall(results: list[LabelNoiseResult], recall: float = 0.8) -> float:
    """The share of planted photos among the first k of each copy's ranking, at the least k that
    finds `recall` of the planted photos over all copies: how good the order is, whatever the
    review flags."""
    for k in range(1, max(len(r.in_order) for r in results) + 1):
        found = sum(sum(r.in_order[:k]) for r in results)
        if found >= recall * sum(r.planted for r in results):
            return found / sum(len(r.in_order[:k]) for r in results)
    return 0.0


def main(argv: list[str] | None = None) -> None:
    from nanostream.engine.device import machine_summary
    from nanostream.engine.metrics import wilson_interval as wilson
    from nanostream.paths import datasets_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="noisy copies per dataset, each planted anew")
    args = parser.parse_args(argv)
    print(machine_summary())
    root = datasets_dir()
    for name, other in (("hymenoptera", "flowers"), ("flowers", "hymenoptera")):
        results = [measure(root / name, args.per_class, seed, root / other) for seed in range(args.seeds)]
        for seed, r in enumerate(results):
            print(f"{name} seed {seed}: {r.photos} photos, {r.planted} planted, {r.flagged} flagged, {r.found} "
                  f"found: precision {r.precision:.2f}, recall {r.recall:.2f}")
        found, flagged, planted = (sum(getattr(r, k) for r in results) for k in ("found", "flagged", "planted"))
        p_lo, p_hi = wilson(found, flagged)
        r_lo, r_hi = wilson(found, planted)
        print(f"{name}, {args.per_class} per class, {args.seeds} noisy copies pooled: precision {found}/{flagged} = "
              f"{found / max(flagged, 1):.2f} (95% {p_lo:.2f}-{p_hi:.2f}), recall {found}/{planted} = "
              f"{found / max(planted, 1):.2f} (95% {r_lo:.2f}-{r_hi:.2f}); each copy's ranking cut at the depth that "
              f"finds 80% of the planted: {precision_at_recall(results):.2f} planted above the cut")


if __name__ == "__main__":
    main()
