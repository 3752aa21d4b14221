"""Labelled image datasets: scanning DATA folders, skipping bad files, stratified splits."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import MAX_LABELS
from .images import is_image_name


class DataError(ValueError):
    """A dataset that cannot be trained on; the message says what to fix."""


@dataclass(frozen=True)
class LabeledImage:
    path: Path
    label: str


@dataclass(frozen=True)
class Dataset:
    classes: tuple[str, ...]
    train: tuple[LabeledImage, ...]
    val: tuple[LabeledImage, ...] = ()          # empty: no given validation set
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (file, reason)


def _class_folders(root: Path) -> dict[str, list[Path]]:
    folders = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        folders[sub.name] = sorted(p for p in sub.rglob("*") if p.is_file() and not p.name.startswith("."))
    return folders


def scan_folder(root: str | Path) -> Dataset:
    """Read DATA/<class>/* or DATA/train/<class>/* (+ DATA/val/<class>/*).

    Files without an image extension are skipped and reported; whether the rest decode
    is checked when they are read (see features.py), so scanning stays fast.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    has_split = (root / "train").is_dir()
    skipped: list[tuple[str, str]] = []

    def collect(folder: Path) -> list[LabeledImage]:
        items = []
        for label, files in _class_folders(folder).items():
            for path in files:
                if is_image_name(path):
                    items.append(LabeledImage(path, label))
                else:
                    skipped.append((str(path), "not an image file extension"))
        return items

    train = collect(root / "train" if has_split else root)
    val = collect(root / "val") if has_split and (root / "val").is_dir() else []
    classes = tuple(sorted({item.label for item in train}))
    unknown = sorted({item.label for item in val} - set(classes))
    if unknown:
        raise DataError(f"val/ has classes that train/ lacks: {', '.join(unknown)}")
    return Dataset(classes, tuple(train), tuple(val), tuple(skipped))


def check_trainable(classes: tuple[str, ...], items: tuple[LabeledImage, ...] | list[LabeledImage]) -> None:
    """Raise DataError naming the problem when a training set cannot make a classifier."""
    counts = Counter(item.label for item in items)
    if len(counts) > MAX_LABELS:  # a model file holds at most this many: refuse now, not after training
        raise DataError(f"{len(counts):,} classes is more than a model can hold ({MAX_LABELS:,})")
    if len(counts) < 2:
        found = f"only '{next(iter(counts))}'" if counts else "none"
        raise DataError(f"need at least 2 classes with images, found {found}")
    small = sorted(f"'{label}' ({counts.get(label, 0)})" for label in classes if counts.get(label, 0) < 2)
    if small:
        raise DataError(f"need at least 2 readable images per class; too few in {', '.join(small)}")


def stratified_split(items, val_fraction: float, seed: int, groups: dict[str, str] | None = None) -> tuple[list, list]:
    """Split per class so each class keeps at least one training and (when it has 2+) one val item.

    `groups` maps str(path) to a group key (near-duplicates share one, see dedupe.group_ids):
    a group goes wholly to one side, so a copy of a training photo never scores validation.
    """
    by_label: dict[str, dict[str, list]] = {}
    for item in items:
        key = (groups or {}).get(str(item.path), str(item.path))
        by_label.setdefault(item.label, {}).setdefault(key, []).append(item)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        clusters = [by_label[label][key] for key in sorted(by_label[label])]
        rng.shuffle(clusters)
        size = sum(len(c) for c in clusters)
        want = min(size - 1, max(1, round(size * val_fraction)))
        taken = 0
        for cluster in clusters:
            if taken < want and len(clusters) > 1 and cluster is not clusters[-1]:
                val += cluster
                taken += len(cluster)
            else:
                train += cluster
    return train, val
