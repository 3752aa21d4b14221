"""Suspicious-image ranking: the score against a direct computation, planted real photos found
first, duplicates flagged, and duplicate groups for leakage-safe splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from nanostream.sources.ingest import add_sources
from nanostream.flows.review import (
    Finding, Reason, SuspectImage, data_warnings, duplicate_reasons, rank_suspicious, ranking_from_dict, suspicion_scores,
)
from nanostream.engine.dedupe import DuplicateGroup
from nanostream.store.db import Store


def reference_scores(x: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """The score spelled out image by image: cosine distances to leave-one-out centroids."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)

    def distance(v, members):
        if len(members) == 0:
            return None
        c = x[members].mean(0)
        return 1 - float(v @ c / np.linalg.norm(c))

    scores = []
    for i, (v, label) in enumerate(zip(x, y)):
        own = distance(v, [j for j in range(len(x)) if y[j] == label and j != i])
        own = 1.0 if own is None else own
        others = [d for k in range(n_classes) if k != label
                  if (d := distance(v, [j for j in range(len(x)) if y[j] == k])) is not None]
        scores.append(own + max(0.0, own - min(others)) if others else own)
    return np.array(scores)


def test_scores_match_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(14, 9, generator=generator)   # non-negative, like pooled backbone features
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 3, 3, 4])  # class 2 empty, class 4 a single image
    result = suspicion_scores(x, y, 5)
    np.testing.assert_allclose(result.score.numpy(), reference_scores(x.numpy(), y.numpy(), 5), atol=1e-5)
    assert result.nearest_other[-1] != 4 and result.nearest_other[-1] != 2
    assert float(result.own_distance[-1]) == 1.0  # alone in its category: no reference


def test_one_category_scores_are_distances_to_the_others():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [0.0, 1.0]])
    result = suspicion_scores(x, torch.zeros(4, dtype=torch.long), 1)
    assert int(result.score.argmax()) == 3 and bool((result.nearest_other == -1).all())
    assert torch.allclose(result.score, result.own_distance)


def test_mislabelled_and_off_topic_points_rank_first():
    cats = torch.tensor([[1.0, 0.1, 0.0]]) + 0.05 * torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    dogs = torch.tensor([[0.1, 1.0, 0.0]]) + 0.05 * torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    a_dog_in_cats, a_logo_in_cats = torch.tensor([[0.1, 1.0, 0.0]]), torch.tensor([[0.3, 0.3, 1.0]])
    x = torch.cat([cats, a_dog_in_cats, a_logo_in_cats, dogs])
    y = torch.tensor([0] * 8 + [1] * 6)
    order = suspicion_scores(x, y, 2).score[:8].argsort(descending=True).tolist()
    assert set(order[:2]) == {6, 7}


def test_a_photo_looks_like_another_category_only_when_it_is_also_nearer_that_category(monkeypatch):
    """Confident learning proposes; the photo must also sit nearer another category's centre than
    its own, or no "looks like" is said (a correct but unusual photo the head got wrong)."""
    import nanostream.flows.review as review

    cats = torch.tensor([[1.0, 0.1, 0.0]]) + 0.05 * torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    dogs = torch.tensor([[0.1, 1.0, 0.0]]) + 0.05 * torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    x = torch.cat([cats, torch.tensor([[0.1, 1.0, 0.0]]), dogs])  # row 6: a dog filed as a cat
    y = torch.tensor([0] * 7 + [1] * 6)
    monkeypatch.setattr(review, "label_issues", lambda probs, labels: {0: 1, 6: 1})  # a typical cat, and the dog
    _, reasons = review.content_reasons(x, torch.nn.functional.normalize(x, dim=1), y, ["cats", "dogs"])
    assert [r.finding for r in reasons.get(6, [])][:1] == [Finding.LOOKS_LIKE]
    assert Finding.LOOKS_LIKE not in [r.finding for r in reasons.get(0, [])]


# ---------------------------------------------------------------- real photos in a store


def hymenoptera(datasets, cls: str) -> list[Path]:
    return sorted((datasets / "hymenoptera" / "train" / cls).iterdir())


def add(store: Store, project: str, category: str, files) -> list[int]:
    """Add files and return their image ids, in order."""
    report = add_sources(store, project, category, list(files))
    assert not report.skipped and not report.duplicates, report
    ids = {r.content_hash: r.id for r in store.list_images(project)}
    return [ids[h] for h in report.added]


def near_copy(photo: Path, dest: Path, brightness: float = 1.0) -> Path:
    """Half size, recompressed, optionally brighter: a different file of the same picture."""
    with Image.open(photo) as image:
        copy = image.convert("RGB").resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    ImageEnhance.Brightness(copy).enhance(brightness).save(dest, format="JPEG", quality=70)
    return dest


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with Store(tmp_path_factory.mktemp("ranking-store")) as s:
        yield s


def test_planted_bee_and_flower_rank_first(store, datasets):
    ants, bees = hymenoptera(datasets, "ants"), hymenoptera(datasets, "bees")
    daisy = sorted((datasets / "flowers" / "daisy").iterdir())[0]
    store.create_project("planted", ["ants", "bees"])
    add(store, "planted", "ants", ants[:12])  # 12 a category: out-of-fold fits of fewer are a guess
    planted_bee, planted_daisy = add(store, "planted", "ants", [bees[12], daisy])
    add(store, "planted", "bees", bees[:12])

    ranked = rank_suspicious(store, "planted")
    assert [len(ranked["ants"]), len(ranked["bees"])] == [14, 12]
    assert {s.image_id for s in ranked["ants"][:2]} == {planted_bee, planted_daisy}
    bee, daisy = (next(s for s in ranked["ants"] if s.image_id == i) for i in (planted_bee, planted_daisy))
    assert bee.reasons[0] == Reason(Finding.LOOKS_LIKE, "looks like bees (100%)")  # out of fold: a bee
    assert {r.finding for r in bee.reasons} <= {Finding.LOOKS_LIKE, Finding.OFF_TOPIC}  # and unlike the ants
    assert Reason(Finding.OFF_TOPIC, "unlike every other photo of ants") in daisy.reasons
    flagged = {s.image_id for suspects in ranked.values() for s in suspects if s.flagged}
    assert {planted_bee, planted_daisy} <= flagged and len(flagged) <= 6  # 4 borderline real photos besides
    for suspects in ranked.values():  # flagged first, then by score
        assert [(not s.flagged, -s.score) for s in suspects] == sorted((not s.flagged, -s.score) for s in suspects)


def test_duplicates_and_cross_category_copies_are_flagged(store, datasets, tmp_path):
    ants, bees = hymenoptera(datasets, "ants"), hymenoptera(datasets, "bees")
    store.create_project("copies", ["ants", "bees"])
    ant_ids = add(store, "copies", "ants", ants[:4])
    bee_ids = add(store, "copies", "bees", bees[:4])
    ant_copy = add(store, "copies", "ants", [near_copy(ants[0], tmp_path / "ant-copy.jpg")])[0]
    bee_as_ant = add(store, "copies", "ants", [near_copy(bees[1], tmp_path / "bee-copy.jpg", 1.1)])[0]

    ranked = rank_suspicious(store, "copies")
    reasons = {s.image_id: s.reasons for suspects in ranked.values() for s in suspects}
    assert Reason(Finding.COPY, f"near-duplicate of image {ant_ids[0]}") in reasons[ant_copy]
    assert Reason(Finding.CONFLICT, f"near-duplicate also in 'bees' as image {bee_ids[1]}") in reasons[bee_as_ant]
    assert Reason(Finding.CONFLICT, f"near-duplicate also in 'ants' as image {bee_as_ant}") in reasons[bee_ids[1]]
    assert not any(r.finding in (Finding.COPY, Finding.CONFLICT)
                   for i in (ant_ids[1], ant_ids[2], bee_ids[0]) for r in reasons[i])
    suspects = [s for suspects in ranked.values() for s in suspects]
    assert {s.image_id for s in suspects if s.has(Finding.CONFLICT)} == {bee_as_ant, bee_ids[1]}
    assert "2 image(s) appear in more than one category" in data_warnings({"ants": 6, "bees": 4}, ranked)[-1]
    flagged = {s.image_id for s in ranked["ants"][:2]}
    assert flagged == {ant_copy, bee_as_ant}


def test_unreadable_blob_comes_first_with_its_reason(store, datasets):
    store.create_project("damaged", ["ants", "bees"])
    ids = add(store, "damaged", "ants", hymenoptera(datasets, "ants")[:3])
    add(store, "damaged", "bees", hymenoptera(datasets, "bees")[:2])
    record = store.get_image("damaged", ids[1])
    blob = store.image_path(record)
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:200])  # a truncated file on disk: decoding fails
        ranked = rank_suspicious(store, "damaged")
    finally:
        blob.write_bytes(original)
    first = ranked["ants"][0]
    assert first.image_id == ids[1] and first.reasons[0].finding is Finding.UNREADABLE
    assert first.reasons[0].text.startswith("unreadable: ") and first.flagged


def test_empty_categories_are_listed(store):
    store.create_project("nothing", ["a", "b"])
    assert rank_suspicious(store, "nothing") == {"a": [], "b": []}


def test_duplicate_reasons_say_exact_copies_once():
    groups = [DuplicateGroup("exact", ("1", "2"), ("a", "a"), 0),
              DuplicateGroup("near", ("1", "2", "3"), ("a", "a", "b"), 6)]
    reasons = duplicate_reasons(groups)
    assert reasons["2"] == [Reason(Finding.COPY, "exact copy of image 1"),
                            Reason(Finding.CONFLICT, "near-duplicate also in 'b' as image 3")]
    assert reasons["3"] == [Reason(Finding.CONFLICT, "near-duplicate also in 'a' as image 1")]


def test_a_saved_ranking_reads_back_typed_and_the_warning_counts_conflicts_by_finding():
    """The worker saves to_dict() as JSON; the Images page reads it back and counts by Finding, never by words."""
    import json

    conflict = Reason(Finding.CONFLICT, "exact copy also in 'b' as image 3")
    ranked = {"a": [SuspectImage(1, float("inf"), (Reason(Finding.UNREADABLE, "unreadable: empty file"),)),
                    SuspectImage(2, 0.4, (conflict,))],
              "b": [SuspectImage(3, 0.3, (Reason(Finding.CONFLICT, "worded any way at all"),)),
                    SuspectImage(4, 0.1, (Reason(Finding.LOOKS_LIKE, "looks more like 'a'"),))]}
    saved = json.loads(json.dumps({name: [s.to_dict() for s in suspects] for name, suspects in ranked.items()}))
    assert saved["a"][1] == {"image_id": 2, "score": 0.4, "reasons": [conflict.text], "findings": ["conflict"]}
    assert ranking_from_dict(saved) == ranked
    assert data_warnings({"a": 5, "b": 5}, ranking_from_dict(saved)) == [
        "2 image(s) appear in more than one category (marked 'also in' below): keep each photo in the one "
        "category it belongs to, and delete or move the other copy."]
    with pytest.raises(KeyError):  # a ranking saved before findings existed: not read as if it had none
        ranking_from_dict({"a": [{"id": 1, "score": 0.1, "reasons": ["exact copy also in 'b' as image 3"]}]})


# ---------------------------------------------------------------- leakage
