"""Duplicate detection, with the near-duplicate threshold checked on real photos."""

from __future__ import annotations

import io
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from nanostream.engine import images
from nanostream.engine.dedupe import (
    NEAR_THRESHOLD, DuplicateGroup, ImageRef, cross_category_conflicts, find_duplicates, group_ids,
    leaking_groups, perceptual_hash, within_category_drops,
)
from nanostream.paths import datasets_dir

# Real duplicates inside the shared datasets, checked by eye: one file is in both data sets
# (a bee on a dandelion); three edits of one sunflower photo; one tulip photo uploaded twice.
BEE_ON_DANDELION = ("flowers/dandelion/1297972485_33266a18d9.jpg", "hymenoptera/val/bees/1297972485_33266a18d9.jpg")
SUNFLOWER_EDITS = ("flowers/sunflower/14741866338_bdc8bfc8d5_n.jpg", "flowers/sunflower/14925398301_55a180f919_n.jpg",
                   "flowers/sunflower/14925398441_107f3e0304_n.jpg")
TULIP_REUPLOAD = ("flowers/tulip/10163955604_ae0b830975_n.jpg", "flowers/tulip/10164073235_f29931d91e.jpg")


@pytest.fixture(scope="session")
def photos() -> list[ImageRef]:
    """Every photo of datasets/flowers and datasets/hymenoptera; missing datasets fail, never skip."""
    root = datasets_dir()
    refs = [ImageRef(str(p.relative_to(root)), p.parent.name, p)
            for folder in ("flowers", "hymenoptera") for p in sorted((root / folder).rglob("*")) if images.is_image_name(p)]
    assert len(refs) > 700, f"expected the shared datasets under {root}"
    return refs


@pytest.fixture(scope="session")
def dataset_groups(photos) -> list[DuplicateGroup]:
    return find_duplicates(photos)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


COPIES = {
    "half size": half,
    "quarter size, bilinear": lambda im: im.resize((im.width // 4, im.height // 4), Image.Resampling.BILINEAR),
    "JPEG quality 30": lambda im: jpeg(im, 30),
    "10% brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "20% more contrast": lambda im: ImageEnhance.Contrast(im).enhance(1.2),
    "half size, JPEG 60, 10% brighter": lambda im: ImageEnhance.Brightness(jpeg(half(im), 60)).enhance(1.1),
    "the store's normalized copy": lambda im: images.decode_image(images.normalize_image(_lossless(im))),
}


def _lossless(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="BMP")  # lossless and quick to write
    return out.getvalue()


# ---------------------------------------------------------------- the threshold, honestly

@pytest.mark.parametrize("copy", COPIES)
def test_edited_copies_are_within_threshold(photos, copy):
    for ref in photos[::40]:  # 20 photos across all classes of both data sets
        original = images.load_image(ref.path)
        distance = perceptual_hash(original) - perceptual_hash(COPIES[copy](original))
        assert distance <= NEAR_THRESHOLD, f"{ref.id}: {copy} is {distance} bits away"


def test_different_photos_are_above_threshold(photos):
    """All ~317,000 pairs of distinct photos, minus the known duplicates, and with a margin."""
    bits = np.array([int(str(perceptual_hash(images.load_image(r.path))), 16) for r in photos], dtype=np.uint64)
    distances = np.bitwise_count(bits[:, None] ^ bits[None, :]).astype(int)
    index = {r.id: i for i, r in enumerate(photos)}
    for group in (BEE_ON_DANDELION, SUNFLOWER_EDITS, TULIP_REUPLOAD):
        for a, b in itertools.permutations(group, 2):
            distances[index[a], index[b]] = 64  # known copies: judged by the next tests
    np.fill_diagonal(distances, 64)
    assert distances.min() > NEAR_THRESHOLD + 1, distances.min()  # 12 today: two shots of one sunflower


def test_finds_exactly_the_known_duplicates_in_the_datasets(dataset_groups):
    assert [(g.kind, g.ids) for g in dataset_groups] == [
        ("exact", BEE_ON_DANDELION), ("near", SUNFLOWER_EDITS), ("near", TULIP_REUPLOAD)]
    assert dataset_groups[0].categories == ("dandelion", "bees")
    assert [g.distance for g in dataset_groups] == [0, 8, 8]


def test_suggestions_on_the_datasets(photos, dataset_groups):
    assert within_category_drops(dataset_groups) == [*SUNFLOWER_EDITS[1:], TULIP_REUPLOAD[1]]
    assert cross_category_conflicts(dataset_groups) == [dataset_groups[0]]
    keys = group_ids(photos, dataset_groups)
    assert {keys[i] for i in SUNFLOWER_EDITS} == {SUNFLOWER_EDITS[0]}
    assert keys[BEE_ON_DANDELION[1]] == BEE_ON_DANDELION[0]
    assert sum(key == image_id for image_id, key in keys.items()) == len(photos) - 4


# ---------------------------------------------------------------- files on disk

def test_exact_and_near_copies_on_disk(tmp_path, photos):
    ant = next(r for r in photos if r.category == "ants")
    shutil.copy(ant.path, tmp_path / "same.jpg")
    half(images.load_image(ant.path)).save(tmp_path / "small.png")
    other = next(r for r in photos if r.category == "daisy")
    refs = [ImageRef("ant", "ants", ant.path), ImageRef("same", "ants", tmp_path / "same.jpg"),
            ImageRef("daisy", "daisy", other.path), ImageRef("small", "insects", tmp_path / "small.png")]
    exact, near = find_duplicates(refs)
    assert (exact.kind, exact.ids, exact.distance) == ("exact", ("ant", "same"), 0)
    assert (near.kind, near.ids, near.categories) == ("near", ("ant", "same", "small"), ("ants", "ants", "insects"))
    assert near.distance <= NEAR_THRESHOLD
    assert within_category_drops([exact, near]) == ["same"]
    assert cross_category_conflicts([exact, near]) == [near]


def test_unreadable_image_is_named(tmp_path, photos):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    refs = [ImageRef("fine", "ants", photos[0].path), ImageRef("broken", "ants", tmp_path / "broken.jpg")]
    with pytest.raises(images.BadImage, match="^broken: not a readable image"):
        find_duplicates(refs)
    with pytest.raises(images.BadImage, match="^gone: cannot read"):
        find_duplicates([ImageRef("gone", "ants", tmp_path / "missing.jpg")])


# ---------------------------------------------------------------- suggestions (pure functions)

def refs_of(*pairs: tuple[str, str]) -> list[ImageRef]:
    return [ImageRef(i, c, Path("unused")) for i, c in pairs]


def test_group_ids_merge_overlapping_groups_transitively():
    refs = refs_of(("a", "x"), ("b", "x"), ("c", "y"), ("d", "y"), ("e", "x"))
    groups = [DuplicateGroup("exact", ("b", "d"), ("x", "y"), 0), DuplicateGroup("near", ("a", "d"), ("x", "y"), 7)]
    assert group_ids(refs, groups) == {"a": "a", "b": "a", "c": "c", "d": "a", "e": "e"}


def test_drops_keep_the_first_copy_per_category():
    groups = [DuplicateGroup("near", ("a", "b", "c", "d"), ("x", "y", "x", "x"), 5),
              DuplicateGroup("exact", ("a", "c"), ("x", "x"), 0)]
    assert within_category_drops(groups) == ["c", "d"]
    assert cross_category_conflicts(groups) == [groups[0]]


def test_leaking_groups():
    groups = [DuplicateGroup("near", ("a", "b"), ("x", "x"), 3), DuplicateGroup("exact", ("c", "d"), ("x", "x"), 0)]
    assert leaking_groups(train_ids=["a", "c", "d"], val_ids=["b"], groups=groups) == [groups[0]]
