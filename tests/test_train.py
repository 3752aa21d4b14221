import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanostream.engine.backbone_specs import BackboneUnavailable
from nanostream.engine.choice import Candidate, choose_backbone
from nanostream.engine.data import DataError, scan_folder
from nanostream.engine.features import FeatureCache, extract_features
from nanostream.engine.head import WEIGHT_DECAY, cross_val_accuracy, fit_head, fit_logits, stratified_folds
from nanostream.engine.train import TrainConfig, TrainResult, train

FAST = TrainConfig(backbone="efficientnet_lite0", augment="default", views=1)


def test_fast_path_learns_ants_from_bees(tiny_hymenoptera):
    stages = []
    result = train(scan_folder(tiny_hymenoptera), FAST, on_progress=lambda s, d, t: stages.append(s))
    assert result.labels == ("ants", "bees")
    assert (result.n_train, result.n_val) == (12, 8)
    assert result.metrics["accuracy"] >= 0.75  # 8 real val photos; chance is 0.5
    assert set(result.metrics["per_class"]) == {"ants", "bees"}
    assert sum(map(sum, result.metrics["confusion"])) == 8
    assert len(result.metrics["highest_loss"]) == 8
    assert any(s.startswith("augmenting") for s in stages)
    # what the learning curve needs comes with the result: the winner's features of the training pool
    assert result.pool_features.shape == (12, 1280) and result.pool_targets.tolist() == [0] * 6 + [1] * 6
    assert result.config == FAST


@pytest.fixture(scope="session")
def auto_build(tiny_hymenoptera) -> TrainResult:
    """One automatic build of the tiny slice, shared: every candidate scored, no views."""
    return train(scan_folder(tiny_hymenoptera), TrainConfig(augment="none"))


def test_auto_backbone_scores_every_candidate_and_picks_the_cheapest_of_the_best(auto_build):
    result = auto_build
    scores = {c.backbone: c.cv_accuracy for c in result.candidates}
    assert set(scores) >= {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    best = max(scores.values())
    tied = [c for c in result.candidates if c.cv_accuracy >= best - 1e-9]
    assert result.backbone == min(tied, key=lambda c: c.gflops).backbone
    assert {c.photos for c in result.candidates} == {result.n_train}  # a first build: every photo


def test_an_automatic_build_also_scores_each_pair_and_the_trio_as_their_mean_on_the_same_folds(
        auto_build, tiny_hymenoptera):
    from nanostream.engine.head import out_of_fold_logits
    from nanostream.engine.train import REPEATS

    singles = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    data = scan_folder(tiny_hymenoptera)
    y = torch.tensor([data.classes.index(item.label) for item in data.train])
    probs = {b: out_of_fold_logits(extract_features([i.path for i in data.train], b).original, y, 2,
                                   repeats=REPEATS).softmax(2) for b in singles}
    found = {c.backbone: c for c in auto_build.candidates}
    for members in (singles[:2], singles[::2], singles[1:], singles):
        candidate = found["+".join(members)]
        mean = torch.stack([probs[b] for b in members]).mean(0)
        assert candidate.cv_accuracy == pytest.approx(float((mean.argmax(2) == y).float().mean()))
        assert candidate.gflops == pytest.approx(sum(found[b].gflops for b in members))
        assert candidate.seconds == pytest.approx(sum(found[b].seconds for b in members))
    assert len(found) == 7


def test_without_val_every_photo_is_measured_out_of_fold_and_fixed_by_seed(datasets, tmp_path):
    for label in ("ants", "bees"):
        (tmp_path / label).mkdir()
        for photo in sorted((datasets / "hymenoptera" / "train" / label).iterdir())[:5]:
            shutil.copy(photo, tmp_path / label)
    config = TrainConfig(backbone="efficientnet_lite0", augment="none", seed=3)
    a, b = train(scan_folder(tmp_path), config), train(scan_folder(tmp_path), config)
    assert (a.n_train, a.n_val) == (10, 0)  # no photo set aside: each of the 10 held out once per round
    assert a.estimate.kind == "cross-validation" and a.estimate.n == 10 and a.estimate.repeats == 5
    assert a.metrics["per_class"]["ants"]["n"] == 5 and a.metrics["n"] == 10
    assert a.estimate.low <= a.estimate.accuracy <= a.estimate.high
    assert a.estimate.accuracy == pytest.approx(a.metrics["accuracy"], abs=1e-6)  # a float32 mean beside a rounded one
    wrong = [h for h in a.metrics["highest_loss"] if h["label"] != h["predicted"]]
    assert len(wrong) == round((1 - a.estimate.accuracy) * 10)  # every wrong photo is listed
    assert [h["file"] for h in a.metrics["highest_loss"]] == [h["file"] for h in b.metrics["highest_loss"]]
    assert torch.equal(a.head.linear.weight, b.head.linear.weight)
    assert a.calibration == b.calibration and a.calibration.temperature > 0


def test_bad_files_are_skipped_and_counted(tiny_hymenoptera, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_hymenoptera, data)
    (data / "train" / "ants" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (data / "train" / "bees" / "readme.txt").write_text("not an image")
    result = train(scan_folder(data), FAST)
    reasons = dict(result.skipped)
    assert "not a readable image" in reasons[str(data / "train" / "ants" / "broken.jpg")]
    assert str(data / "train" / "bees" / "readme.txt") in reasons
    assert result.n_train == 12


def test_single_class_and_too_few_images_are_clear_errors(datasets, tmp_path):
    (tmp_path / "one" / "ants").mkdir(parents=True)
    shutil.copy(next((datasets / "hymenoptera/train/ants").iterdir()), tmp_path / "one" / "ants")
    with pytest.raises(DataError, match="at least 2 classes"):
        train(scan_folder(tmp_path / "one"), FAST)
    (tmp_path / "one" / "bees").mkdir()
    for photo in sorted((datasets / "hymenoptera/train/bees").iterdir())[:3]:
        shutil.copy(photo, tmp_path / "one" / "bees")
    with pytest.raises(DataError, match=r"too few in 'ants' \(1\)"):
        train(scan_folder(tmp_path / "one"), FAST)


def test_finetune_path_trains_last_stages_only(tiny_hymenoptera):
    config = TrainConfig(backbone="efficientnet_lite0", augment="default", views=0, mode="finetune",
                         finetune_epochs=1)
    result = train(scan_folder(tiny_hymenoptera), config)
    assert result.mode == "finetune"
    assert result.finetuned and all(k.startswith(("body.blocks.5.", "body.blocks.6.", "body.conv_head.", "body.bn2."))
                                    for k in result.finetuned)
    assert 0.0 <= result.finetune_metrics["accuracy"] <= 1.0


def test_head_separates_separable_features_and_cv_sees_it():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=generator)
    y = (x[:, 0] > 0).long()
    head = fit_head(x, y, 2)
    assert (head(x).argmax(1) == y).float().mean() == 1.0
    assert cross_val_accuracy(x, y, 2) >= 0.9
    noise_y = torch.randint(0, 2, (40,), generator=generator)
    assert cross_val_accuracy(torch.randn(40, 16, generator=generator), noise_y, 2) < 0.8


def test_the_head_fit_is_the_optimum_of_the_standardised_problem():
    # The fit folds standardising into the weights; the weights it finds must be where the loss on
    # explicitly standardised features is flat (balanced classes: every photo weighs 1 / N).
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=generator).relu() + 2.0
    y = torch.arange(30) % 3
    head = fit_head(x, y, 3)
    weight = head.linear.weight.detach().clone().requires_grad_()
    bias = head.linear.bias.detach().clone().requires_grad_()

    def gradient_norm(w, b):
        z = (x - head.mean) / head.scale
        loss = F.cross_entropy(z @ w.T + b, y) + WEIGHT_DECAY * w.pow(2).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [w, b])]).norm()

    at_start = gradient_norm(torch.zeros_like(weight, requires_grad=True), torch.zeros_like(bias, requires_grad=True))
    assert gradient_norm(weight, bias) < 1e-3 * at_start


def test_heads_fitted_together_give_each_ones_own_logits():
    # fit_logits fits several heads at once, each on its own rows with its own standardising, as
    # cross-validation does. Feature 3 is 0 on every photo but one: head 1 never sees that photo,
    # and its scale there is 1e-6, so only an exact 0 on the photos it fits keeps that feature's
    # weight at 0, and that photo's logits in range.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 6, generator=generator).relu()
    x[:, 3], x[0, 3] = 0.0, 5.0
    y = torch.arange(24) % 2
    fit_rows = torch.ones(3, 24, dtype=torch.bool)
    fit_rows[1, :8], fit_rows[2, 8:16] = False, False
    together = fit_logits(x, y, 2, fit_rows)
    for p, rows in enumerate(fit_rows):
        alone = fit_head(x[rows], y[rows], 2)(x).detach()
        assert torch.allclose(together[p], alone, atol=0.05), p  # L-BFGS stops on the sum of the losses
    assert together[1, 0].abs().max() < 100


def test_fitting_a_head_in_a_new_process_imports_no_compiler():
    # torch.optim imports torch._dynamo (~2 s of a new worker) unless engine/lbfgs.py keeps it out.
    code = ("import sys, torch; from nanostream.engine.head import cross_val_accuracy; "
            "from nanostream.engine.calibration import fit_temperature; "
            "x, y = torch.randn(12, 4), torch.arange(12) % 2; cross_val_accuracy(x, y, 2); "
            "fit_temperature(torch.randn(12, 2), y); "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_folds_are_stratified_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 5)
    folds = stratified_folds(y, 5, seed=1)
    assert sorted(torch.cat(folds).tolist()) == list(range(15))
    assert all((y[f] == 1).sum() == 1 for f in folds)


def test_near_duplicates_never_straddle_the_split(datasets, tmp_path):
    from PIL import Image

    from nanostream.engine.data import LabeledImage, stratified_split
    from nanostream.engine.train import near_duplicate_groups

    items = []
    for label in ("ants", "bees"):
        (tmp_path / label).mkdir()
        for photo in sorted((datasets / "hymenoptera" / "train" / label).iterdir())[:4]:
            shutil.copy(photo, tmp_path / label)
            items.append(LabeledImage(tmp_path / label / photo.name, label))
            copy = tmp_path / label / f"small-{photo.stem}.jpg"  # a resized, recompressed copy
            image = Image.open(photo).convert("RGB")
            image.resize((image.width // 2, image.height // 2)).save(copy, quality=70)
            items.append(LabeledImage(copy, label))
    groups = near_duplicate_groups(items)
    assert len(set(groups.values())) == 8
    for seed in range(5):
        train, val = stratified_split(items, 0.25, seed, groups)
        assert not {groups[str(i.path)] for i in train} & {groups[str(i.path)] for i in val}
        assert {i.label for i in val} == {"ants", "bees"}


def test_the_choice_takes_the_best_score_the_cheaper_on_a_tie_and_keeps_the_preferred():
    cheap, dear, broken = (Candidate("cheap", 0.80, 1.0, 0.4), Candidate("dear", 0.80, 2.0, 4.0),
                           Candidate("broken", None, 0.0, 0.1, "no weights"))
    better = Candidate("better", 0.90, 3.0, 8.0)
    assert choose_backbone([dear, cheap, broken]) == cheap
    assert choose_backbone([cheap, better], n_train=9) == better
    # one-se: 0.10 apart is more than one standard error of 0.90 on 10 photos (0.095), within it on 9 (0.10)
    assert choose_backbone([cheap, better], n_train=10, rule="one-se") == better
    assert choose_backbone([cheap, better], n_train=9, rule="one-se") == cheap
    assert choose_backbone([cheap, better], prefer="cheap", n_train=10) == cheap    # 0.10 is one image in 10
    assert choose_backbone([cheap, better], prefer="cheap", n_train=11) == better   # more than one in 11
    close = Candidate("close", 0.86, 3.0, 8.0)  # 0.06 better: over one image in 20, within one-se's 0.078
    assert choose_backbone([cheap, close], prefer="cheap", n_train=20) == close
    assert choose_backbone([cheap, close], prefer="cheap", n_train=20, rule="one-se") == cheap
    assert choose_backbone([cheap, better], prefer="broken", n_train=10) == better  # an unusable one is not kept
    with pytest.raises(BackboneUnavailable, match="^no weights$"):
        choose_backbone([broken])


def test_a_rebuild_keeps_the_previous_backbone_unless_another_is_clearly_better(tiny_hymenoptera, auto_build):
    data = scan_folder(tiny_hymenoptera)
    first = auto_build
    scores = {c.backbone: c.cv_accuracy for c in first.candidates}
    margin = 1 / first.n_train
    for name, score in scores.items():
        again = train(data, TrainConfig(augment="none", prefer=name))
        clearly_better = max(scores.values()) - score > margin + 1e-9
        assert (again.backbone == name) != clearly_better, (name, scores)


def test_work_done_ahead_for_the_preferred_backbone_gives_the_same_model(tiny_hymenoptera, tmp_path):
    """A rebuild makes the preferred backbone's views and validation features during scoring;
    when it is kept, the model is the one a build fixed on that backbone makes."""
    data = scan_folder(tiny_hymenoptera)
    chosen = train(data, TrainConfig(views=2)).backbone
    ahead = train(data, TrainConfig(views=2, prefer=chosen), cache=FeatureCache(tmp_path / "a"))
    fixed = train(data, TrainConfig(views=2, backbone=chosen), cache=FeatureCache(tmp_path / "b"))
    assert ahead.backbone == chosen and len(ahead.candidates) == 3 + 4  # and their pairs and trio
    assert ahead.metrics == fixed.metrics and ahead.n_train == fixed.n_train
    torch.testing.assert_close(ahead.head.linear.weight, fixed.head.linear.weight)


def test_a_rebuild_with_a_few_new_photos_scores_the_other_candidates_on_the_photos_they_have(
        tiny_hymenoptera, datasets, tmp_path, monkeypatch):
    """One new photo in 13 (under RESCORE_NEW): the other candidates are scored, with the kept one,
    on the 12 photos whose features they have, and never run on the new one; a candidate chosen
    on those photos gets the new one's features before its model is made."""
    import nanostream.engine.train as training

    data, cache, config, first, has_new = _built_then_one_new_photo(tiny_hymenoptera, datasets, tmp_path)
    again = train(scan_folder(data), dataclasses.replace(config, prefer=first.backbone), cache=cache)
    others = [c.backbone for c in again.candidates if c.backbone != first.backbone]
    assert again.n_train == 13 and {c.photos for c in again.candidates} == {12}
    assert {c.backbone: c.cv_accuracy for c in again.candidates} == {c.backbone: c.cv_accuracy for c in first.candidates}
    assert has_new(first.backbone) and not any(map(has_new, others))

    picked = others[0]
    monkeypatch.setattr(training, "choose_backbone", lambda candidates, *_: next(c for c in candidates if c.backbone == picked))
    switched = train(scan_folder(data), dataclasses.replace(config, prefer=first.backbone), cache=cache)
    assert switched.backbone == picked and switched.n_train == 13 and switched.pool_features.shape[0] == 13
    assert has_new(picked) and not has_new(others[1])


def test_a_rebuild_of_an_ensemble_runs_its_members_on_the_new_photo_and_only_them(tiny_hymenoptera, datasets, tmp_path):
    """The previous model was a pair: both members are its previous backbones (views made in the
    candidate pass, the new photo's features computed); the third is scored on the photos it has."""
    from nanostream.engine.backbone_specs import ENSEMBLE_SEP, ensemble_name

    data, cache, config, first, has_new = _built_then_one_new_photo(tiny_hymenoptera, datasets, tmp_path)
    *pair, third = [c.backbone for c in first.candidates if ENSEMBLE_SEP not in c.backbone]
    again = train(scan_folder(data), dataclasses.replace(config, prefer=ensemble_name(pair)), cache=cache)
    assert again.n_train == 13 and {c.photos for c in again.candidates} == {12}
    assert [has_new(name) for name in (*pair, third)] == [True, True, False]


def _built_then_one_new_photo(tiny_hymenoptera, datasets, tmp_path):
    """A first build of a copy of the slice, then one new ant photo in it: (data, cache, config,
    the first build, has_new(backbone): whether the cache holds the new photo's features)."""
    from nanostream.engine.device import default_device, precision
    from nanostream.store.records import content_hash

    data = shutil.copytree(tiny_hymenoptera, tmp_path / "data")
    cache = FeatureCache(tmp_path / "features")
    config = TrainConfig(augment="none")
    first = train(scan_folder(data), config, cache=cache)
    new = sorted((datasets / "hymenoptera" / "train" / "ants").iterdir())[6]  # the slice holds the first 6
    shutil.copy(new, data / "train" / "ants" / new.name)
    digest, mode = content_hash(new.read_bytes()), precision(default_device())

    def has_new(backbone: str) -> bool:
        return cache.get(digest, backbone, mode, "original") is not None

    return data, cache, config, first, has_new


def test_more_classes_than_a_model_file_holds_are_refused_before_any_work():
    from pathlib import Path

    from nanostream.engine.data import LabeledImage, check_trainable

    items = [LabeledImage(Path(f"{i}-{j}.jpg"), f"c{i}") for i in range(1001) for j in range(2)]
    with pytest.raises(DataError, match=r"^1,001 classes is more than a model can hold \(1,000\)$"):
        check_trainable(tuple(f"c{i}" for i in range(1001)), items)
    check_trainable(tuple(f"c{i}" for i in range(1000)), items[:2000])  # the limit itself is fine
