"""Exact and near-duplicate images: sha256 for identical files, a perceptual hash for copies.

Web searches return the same picture many times: resized by each site, recompressed, brightened.
Inside a category a copy adds nothing; across categories it is a labelling conflict; split
between train and validation it inflates the validation score. These functions only find and
suggest; the caller (the store, the splitter) decides what to apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from ..store.records import content_hash
from .images import BadImage, decode_image

# Hamming distance on the 64-bit pHash below which two images count as copies of one photo.
# Measured on the 797 photos of datasets/flowers + datasets/hymenoptera (tests/test_dedupe.py):
# a half-size, JPEG-recompressed, +10% bright copy is within 8, a +25% bright one within 10;
# two different photos are at least 12 apart (two shots of one sunflower), almost all >= 16.
# Crops are not covered: a 5% crop already moves the hash by up to 14.
NEAR_THRESHOLD = 10
HASH_SIZE = 8          # 8x8 DCT bits = 64-bit hash, imagehash's default for phash
DRAFT_SIZE = 256       # pHash looks at 32x32 pixels; decoding a big JPEG at 1/8 scale is plenty


@dataclass(frozen=True)
class ImageRef:
    id: str
    category: str
    path: Path


@dataclass(frozen=True)
class DuplicateGroup:
    kind: str                    # "exact": identical bytes; "near": perceptual hashes within the threshold
    ids: tuple[str, ...]         # in input order; a near group lists exact copies too
    categories: tuple[str, ...]  # parallel to ids
    distance: int                # largest hash distance among the links that formed the group (exact: 0)


def perceptual_hash(image: Image.Image) -> imagehash.ImageHash:
    """64-bit DCT hash (pHash): robust to resizing, recompression and mild brightness changes."""
    return imagehash.phash(image, hash_size=HASH_SIZE)


class _Components:
    """Union-find over indices, remembering the largest link distance in each component."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.distance = [0] * n

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def link(self, i: int, j: int, distance: int = 0) -> None:
        a, b = sorted((self.find(i), self.find(j)))  # the smaller index (earlier in input) is the root
        self.parent[b] = a
        self.distance[a] = max(self.distance[a], self.distance[b], distance)

    def groups(self) -> dict[int, list[int]]:
        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        return members


def _group(kind: str, refs: Sequence[ImageRef], members: Iterable[int], distance: int) -> DuplicateGroup:
    chosen = [refs[i] for i in sorted(members)]
    return DuplicateGroup(kind, tuple(r.id for r in chosen), tuple(r.category for r in chosen), distance)


def find_duplicates(refs: Sequence[ImageRef], threshold: int = NEAR_THRESHOLD) -> list[DuplicateGroup]:
    """Exact groups (identical bytes), then near groups (pHash distance <= threshold, linked
    transitively: a~b and b~c put all three together), each in order of its first member.

    Raises BadImage naming the image when a file cannot be read or decoded: the refs are
    expected to be stored, already verified images, so an unreadable one is a real fault.
    """
    by_content: dict[str, list[int]] = {}
    hashes: list[int] = []  # one per distinct content, in order of first appearance
    for i, ref in enumerate(refs):
        try:
            data = Path(ref.path).read_bytes()
        except OSError as exc:
            raise BadImage(f"{ref.id}: cannot read {ref.path}: {exc.strerror or exc}") from exc
        sha = content_hash(data)
        if sha not in by_content:
            try:
                image = decode_image(data, draft_size=DRAFT_SIZE)
            except BadImage as exc:
                raise BadImage(f"{ref.id}: {exc}") from exc
            hashes.append(int(str(perceptual_hash(image)), 16))
        by_content.setdefault(sha, []).append(i)

    exact = [_group("exact", refs, members, 0) for members in by_content.values() if len(members) > 1]

    contents = list(by_content.values())
    bits = np.array(hashes, dtype=np.uint64)
    near = _Components(len(contents))
    for a in range(len(contents) - 1):
        distances = np.bitwise_count(bits[a + 1:] ^ bits[a])
        for offset in np.flatnonzero(distances <= threshold):
            near.link(a, a + 1 + int(offset), int(distances[offset]))
    near_groups = [
        _group("near", refs, (i for c in components for i in contents[c]), near.distance[root])
        for root, components in near.groups().items() if len(components) > 1
    ]
    return exact + near_groups  # both already in order of first member: dicts keep insertion order


def within_category_drops(groups: Iterable[DuplicateGroup]) -> list[str]:
    """Ids to drop so each category keeps one image (its first) of every duplicate group."""
    drops: dict[str, None] = {}
    for group in groups:
        kept: set[str] = set()
        for image_id, category in zip(group.ids, group.categories):
            if category in kept:
                drops[image_id] = None
            kept.add(category)
    return list(drops)


def cross_category_conflicts(groups: Iterable[DuplicateGroup]) -> list[DuplicateGroup]:
    """Groups whose copies carry different labels: the user must say which label is right."""
    return [group for group in groups if len(set(group.categories)) > 1]


def group_ids(refs: Sequence[ImageRef], groups: Iterable[DuplicateGroup]) -> dict[str, str]:
    """id -> group key (the first id of its duplicate cluster; its own id when it has no copies),
    so a splitter can keep every copy of a photo on the same side of a train/val split."""
    index = {ref.id: i for i, ref in enumerate(refs)}
    clusters = _Components(len(refs))
    for group in groups:
        for image_id in group.ids[1:]:
            clusters.link(index[group.ids[0]], index[image_id])
    return {ref.id: refs[clusters.find(i)].id for i, ref in enumerate(refs)}


def leaking_groups(train_ids: Iterable[str], val_ids: Iterable[str],
                   groups: Iterable[DuplicateGroup]) -> list[DuplicateGroup]:
    """Groups with copies on both sides of a split: validation would score memorised photos."""
    train, val = set(train_ids), set(val_ids)
    return [g for g in groups if train.intersection(g.ids) and val.intersection(g.ids)]
