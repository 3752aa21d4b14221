import shutil

import pytest
import torch

from nanostream.engine.augment import get_policy
from nanostream.engine.features import FeatureCache, extract_features


@pytest.fixture()
def photos(datasets, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in sorted((datasets / "flowers" / "daisy").iterdir())[:3]:
        shutil.copy(photo, folder / photo.name)
    return sorted(folder.iterdir())


def test_second_extraction_comes_from_cache(photos, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    policy = get_policy("default")
    first = extract_features(photos, "efficientnet_lite0", policy, views=2, cache=cache)
    assert first.computed == 3 * 3  # original + 2 views each
    again = extract_features(photos, "efficientnet_lite0", policy, views=2, cache=cache)
    assert again.computed == 0
    assert torch.allclose(first.original, again.original) and torch.allclose(first.augmented, again.augmented)
    assert first.augmented.shape == (3, 2, 1280)


def test_a_photos_features_do_not_depend_on_the_pass_it_shared(photos, tmp_path):
    """A rebuild mixes rows cached from passes of other sizes (feature_chunks.batch_size) with new
    ones: every row must be what the photo alone gives (in the precision this CPU runs: bf16 or fp32)."""
    together = extract_features(photos, "efficientnet_lite0", cache=FeatureCache(tmp_path / "together"))
    alone = torch.cat([extract_features([photo], "efficientnet_lite0", cache=FeatureCache(tmp_path / f"alone{i}")).original
                       for i, photo in enumerate(photos)])
    assert together.computed == len(photos) and together.original.shape == alone.shape
    torch.testing.assert_close(together.original, alone, rtol=2e-2, atol=2e-2)


def test_adding_images_or_views_computes_only_what_is_new(photos, datasets, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    policy = get_policy("default")
    extract_features(photos[:2], "efficientnet_lite0", policy, views=1, cache=cache)
    grown = extract_features(photos, "efficientnet_lite0", policy, views=1, cache=cache)
    assert grown.computed == 2  # the new image: original + one view
    more_views = extract_features(photos, "efficientnet_lite0", policy, views=3, cache=cache)
    assert more_views.computed == 3 * 2  # two more views per image, originals reused
    other_policy = extract_features(photos, "efficientnet_lite0", get_policy("aerial"), views=1, cache=cache)
    assert other_policy.computed == 3  # originals shared across policies


def test_augmented_views_differ_from_original_and_are_deterministic(photos, tmp_path):
    a = extract_features(photos[:1], "efficientnet_lite0", get_policy("default"), views=2,
                         cache=FeatureCache(tmp_path / "a"))
    b = extract_features(photos[:1], "efficientnet_lite0", get_policy("default"), views=2,
                         cache=FeatureCache(tmp_path / "b"))
    assert torch.equal(a.augmented, b.augmented)
    assert not torch.allclose(a.augmented[0, 0], a.original[0])
    assert not torch.allclose(a.augmented[0, 0], a.augmented[0, 1])


def test_unreadable_files_are_reported_not_raised(photos, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photos[0].read_bytes()[:2000])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    result = extract_features([photos[0], truncated, text, missing], "efficientnet_lite0",
                              cache=FeatureCache(tmp_path / "cache"))
    assert result.kept == [0]
    assert [f for f, _ in result.failed] == [str(truncated), str(text), str(missing)]
    assert all(reason for _, reason in result.failed)


def test_should_stop_interrupts(photos, tmp_path):
    with pytest.raises(InterruptedError):
        extract_features(photos, "efficientnet_lite0", cache=FeatureCache(tmp_path / "c"), should_stop=lambda: True)


def test_unchanged_files_are_not_read_again_and_changed_ones_are(photos, tmp_path, monkeypatch):
    from nanostream.engine import features
    from nanostream.store.records import content_hash

    cache = FeatureCache(tmp_path / "cache")
    extract_features(photos, "efficientnet_lite0", cache=cache)
    reads = []
    monkeypatch.setattr(features, "_read", lambda source: reads.append(source) or source.read_bytes())
    load = features.inference_backbone

    def not_needed(*_):
        raise AssertionError("the network was loaded though every feature was cached")

    monkeypatch.setattr(features, "inference_backbone", not_needed)
    again = extract_features(photos, "efficientnet_lite0", cache=cache)
    assert again.computed == 0 and reads == []  # hashes remembered, features cached: no file opened
    monkeypatch.setattr(features, "inference_backbone", load)
    target = photos[0]
    target.write_bytes(photos[1].read_bytes() + b"trailer")  # other content under the same name
    changed = extract_features(photos, "efficientnet_lite0", cache=cache)
    assert set(reads) == {target} and changed.computed == 1  # hashed, then decoded
    assert changed.hashes[0] == content_hash(target.read_bytes()) != again.hashes[0]
