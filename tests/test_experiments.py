"""Experiments on a tiny slice of real photos: JSON shapes, same seed same numbers, the power-law fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import copy_slice
from nanostream.engine import curve as C
from nanostream.experiments import augmentation, common, curves, transfer
from nanostream.cli.main import main
from nanostream.engine.data import scan_folder
from nanostream.engine.features import FeatureCache

ARM_KEYS = {"accuracies", "distinct_runs", "mean", "std"}
# Tiny but real: 3 classes x 6 photos; 2 seeds, 1 view per image keep the module near 30 s on 2 cores.
FAST = common.ExperimentConfig(seeds=2, views=1)
FAST_SCRATCH = transfer.ScratchConfig(size=32, epochs=2)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """NANOSTREAM_HOME in tmp for the whole module, so features are computed once and shared."""
    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOSTREAM_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def flowers(tmp_path_factory, home, datasets) -> Path:
    root = tmp_path_factory.mktemp("data") / "flowers"
    return copy_slice(datasets / "flowers", root, 6, classes=["daisy", "sunflower", "tulip"])


@pytest.fixture(scope="module")
def bees(tmp_path_factory, home, datasets) -> Path:
    """hymenoptera's train/ + val/ layout: 2 classes x 5 training and 3 validation photos."""
    src, root = datasets / "hymenoptera", tmp_path_factory.mktemp("data") / "hymenoptera"
    copy_slice(src / "train", root / "train", 5)
    copy_slice(src / "val", root / "val", 3)
    return root


# splits ----------------------------------------------------------------------------------------

def test_splits_hold_out_per_seed_and_nest_training_subsets(flowers):
    table = common.Run(FAST, None, None, None, FeatureCache()).table(scan_folder(flowers))
    splits = C.make_splits(table, 3, None, 0.25)
    assert len({s.test for s in splits}) > 1, "no val/: each seed holds out its own images"
    for split in splits:
        assert not set(split.train()) & set(split.test)
        assert [len(rows) for rows in split.train_by_class] == [4, 4, 4]  # 6 per class, 2 held out
        assert set(split.train(2)) < set(split.train())                   # smaller sizes nest
        assert {int(table.y[r]) for r in split.test} == {0, 1, 2}
    capped = C.make_splits(table, 3, 3, 0.25)
    assert all(s.per_class == 3 for s in capped)
    assert C.make_splits(table, 3, None, 0.25) == splits  # the same seeds, the same splits


def test_given_val_is_the_test_set_for_every_seed(bees):
    dataset = scan_folder(bees)
    table = common.Run(FAST, None, None, None, FeatureCache()).table(dataset)
    val_rows = {i for i, item in enumerate(table.items) if item in set(dataset.val)}
    splits = C.make_splits(table, 3, 3, 0.25)
    assert all(set(s.test) == val_rows for s in splits)
    assert len({tuple(sorted(s.train())) for s in splits}) > 1  # the seed picks training images
    result = augmentation.augmentation_experiment(dataset, ["none"], common.ExperimentConfig(seeds=2, views=1, per_class=3))
    assert result.test_given and result.n_test == 6 and result.train_per_class == 3


# experiments -----------------------------------------------------------------------------------

def test_augmentation_arms_shape_and_same_seed_same_numbers(flowers):
    dataset = scan_folder(flowers)
    first = augmentation.augmentation_experiment(dataset, ["none", "hflip"], FAST)
    again = augmentation.augmentation_experiment(dataset, ["none", "hflip"], FAST)
    arms = [arm.to_dict("policy") for arm in first.arms]
    assert arms == [arm.to_dict("policy") for arm in again.arms]
    assert [a["policy"] for a in arms] == ["none", "hflip"]
    for arm in arms:
        assert set(arm) == ARM_KEYS | {"policy"}
        assert len(arm["accuracies"]) == 2 and all(0 <= a <= 1 for a in arm["accuracies"])
        assert arm["distinct_runs"] == 2  # no val/: each seed holds out its own photos
        assert arm["mean"] == pytest.approx(np.mean(arm["accuracies"]), abs=1e-4)
        assert arm["std"] == pytest.approx(np.std(arm["accuracies"], ddof=1), abs=1e-4)
    assert common.plot_arms(first).startswith(b"\x89PNG")


def test_seeds_on_a_fixed_val_with_every_photo_used_are_real_repetitions(bees):
    """val/ fixed and all 5 training photos per class used: the seeds differ only by their
    augmentations. Unaugmented, the three seeds are one run: mean of it, no spread. Augmented,
    each seed draws its own views, so three runs, and their spread is the spread of those."""
    dataset = scan_folder(bees)
    config = common.ExperimentConfig(seeds=3, views=1)
    result = augmentation.augmentation_experiment(dataset, ["none", "default"], config)
    none, default = (arm.to_dict("policy") for arm in result.arms)
    assert len(set(none["accuracies"])) == 1 and none["distinct_runs"] == 1 and none["std"] is None
    assert default["distinct_runs"] == 3
    assert default["std"] == pytest.approx(np.std(default["accuracies"], ddof=1), abs=1e-4)
    assert "-" in common.arms_table(result).splitlines()[1].split()[3]  # none's std column: not measured

    run = common.Run(config, None, None, None, FeatureCache())
    table = run.table(dataset)
    splits = C.make_splits(table, 3, None, 0.25)
    assert len({tuple(sorted(s.train())) for s in splits}) == 1  # the same photos every seed
    blocks = common.view_blocks(splits)
    assert [set(b.values()) for b in blocks] == [{0}, {1}, {2}]
    from nanostream.engine.augment import get_policy
    views = run.seed_views(table, get_policy("default"), blocks)
    rows = splits[0].train()
    assert all(not torch.equal(views[0][rows], v[rows]) for v in views[1:])  # each seed its own views
    assert torch.equal(views[0], run.views(table, get_policy("default"), rows))  # seed 0: a build's views


def test_view_blocks_count_each_photos_earlier_uses():
    split = lambda seed, rows: C.Split(seed, (tuple(rows),), ())
    blocks = common.view_blocks([split(0, [1, 2]), split(1, [2, 3]), split(2, [1, 2, 3])])
    assert blocks == [{1: 0, 2: 0}, {2: 1, 3: 0}, {1: 1, 2: 2, 3: 1}]
    arm = common.Arm("x", (0.5, 0.5, 0.7), ("a", "a", "b"))
    assert arm.distinct == [0.5, 0.7] and arm.mean == pytest.approx(0.6)


def test_default_arms_are_none_default_and_each_technique():
    from nanostream.engine.augment import single_technique_policies

    assert list(augmentation.augmentation_arms()) == ["none", "default", *single_technique_policies()]
    with pytest.raises(ValueError, match="valid: none, default"):
        augmentation.augmentation_arms(["none", "sharpen"])


def test_transfer_arms_shape_and_same_seed_same_numbers(flowers):
    dataset = scan_folder(flowers)
    first = transfer.transfer_experiment(dataset, FAST, FAST_SCRATCH)
    again = transfer.transfer_experiment(dataset, FAST, FAST_SCRATCH)
    arms = [arm.to_dict() for arm in first.arms]
    assert arms == [arm.to_dict() for arm in again.arms]
    assert [a["name"] for a in arms] == ["scratch", "pretrained"]
    assert all(set(a) == ARM_KEYS | {"name"} and len(a["accuracies"]) == 2 for a in arms)


def test_learning_curve_points_and_estimate(flowers):
    curve = curves.learning_curve(scan_folder(flowers), 0.95, FAST, sizes=(2,))
    d = curve.to_dict()
    assert [p["images_per_class"] for p in d["points"]] == [2, 4]
    assert all(set(p) == {"images_per_class", "accuracy"} for p in d["points"])
    n = d["images_per_class_for_target"]
    assert (isinstance(n, int) and n > 0) or (n is None and d["reason"])
    assert curve.have_per_class == {"daisy": 6, "sunflower": 6, "tulip": 6}
    assert curves.learning_curve(scan_folder(flowers), 0.95, FAST, sizes=(2,)).to_dict() == d
    assert C.curve_png(curve).startswith(b"\x89PNG")



def test_heads_fitted_together_score_as_heads_fitted_one_at_a_time():
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 32, generator=generator) + F.one_hot(y, 32).float()  # overlapping classes: errors to count
    items = [C.LabeledImage(Path(f"#{i}"), "abc"[int(label)]) for i, label in enumerate(y)]
    table = C.FeatureTable(("a", "b", "c"), items, y, torch.zeros(60, dtype=torch.bool), x)
    splits = C.make_splits(table, 4, None, 0.25)
    views = x[:, None] + 0.5 * torch.randn(60, 2, 32, generator=generator)
    for augmented in (None, views):
        for k in (3, 10):
            alone = [C.head_accuracy(table, s.train(k), s.test, augmented) for s in splits]
            assert C.head_accuracies(table, [(s.train(k), s.test) for s in splits], augmented) == pytest.approx(alone)
            assert len(set(alone)) > 1 and max(alone) < 1.0  # the splits differ, and the fits can miss


# the fitted curve ------------------------------------------------------------------------------

def test_power_law_fit_recovers_known_parameters():
    truth = C.PowerLaw(a=0.8, b=0.6, c=0.03)
    sizes = [5, 10, 20, 40, 80]
    fit, note = C.fit_power_law(sizes, truth.error(sizes))
    assert note is None
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.8, 0.6, 0.03), rel=1e-3, abs=1e-4)
    n, _, _ = C.images_for_target(fit, 0.95, largest=80)
    assert n == pytest.approx((0.8 / (0.05 - 0.03)) ** (1 / 0.6), rel=0.01)  # about 466 per class
    assert truth.accuracy(n) >= 0.95 > truth.accuracy(n - 2)


def test_unreachable_target_is_null_with_reason():
    floor = C.PowerLaw(a=0.6, b=0.7, c=0.12)  # levels off at 88% accuracy
    points = [C.CurvePoint(k, [float(floor.accuracy(k))] * 2) for k in (5, 10, 20, 40)]
    curve = C.fit_learning_curve(points, 0.95, {"a": 40, "b": 40}, seeds=2)
    d = curve.to_dict()
    assert d["images_per_class_for_target"] is None
    assert "levels off at about 88" in d["reason"]
    assert curve.more_per_class is None and curve.advice().startswith("No estimate for 95%")
    # too far out to extrapolate: the raw estimate is kept, the reported number is null
    far = C.PowerLaw(a=0.9, b=0.1, c=0.0)
    n, estimate, reason = C.images_for_target(far, 0.95, largest=40)
    assert n is None and estimate > C.MAX_EXTRAPOLATION * 40 and "too far" in reason


def test_fit_falls_back_gracefully():
    fit, note = C.fit_power_law([5, 10], [0.4, 0.2])  # two sizes: no floor
    assert fit.c == 0 and fit.b == pytest.approx(1.0) and "2 sizes" in note
    fit, note = C.fit_power_law([5, 10, 20], [0.3, 0.2, 0.15])  # as many points as parameters
    assert fit is not None and note.startswith("3 sizes for 3 parameters")
    assert C.fit_power_law([5], [0.3]) == (None, "need accuracy at 2 or more sizes to fit a curve; have 1")
    assert C.fit_power_law([5, 10, 20], [0.0, 0.0, 0.0])[0] is None
    assert C.fit_power_law([20, 5, 10], [0.3, 0.1, 0.2]) == (
        None, "accuracy did not improve from the smallest to the largest size measured")
    # no curve, but the measurements reach the target: the smallest size that did
    perfect = [C.CurvePoint(k, [1.0, 1.0]) for k in (5, 10)]
    curve = C.fit_learning_curve(perfect, 0.95, {"a": 10, "b": 12})
    assert curve.images_per_class_for_target == 5 and curve.more_per_class == {"a": 0, "b": 0}


def test_images_needed_from_features_for_the_app():
    """Two overlapping Gaussian classes in 32 dimensions: accuracy grows with n towards ~84%."""
    g = torch.Generator().manual_seed(0)
    n, d = 200, 32
    y = torch.arange(2).repeat_interleave(n)
    x = torch.randn(2 * n, d, generator=g) + y[:, None] * 0.35
    curve = C.images_needed(x, y, ["cats", "dogs"], target=0.8, seeds=3)
    assert [p.images_per_class for p in curve.points] == [5, 10, 20, 40, 150]  # 50 per class held out
    assert curve.points[-1].accuracy > curve.points[0].accuracy + 0.1
    assert curve.have_per_class == {"cats": 200, "dogs": 200}
    assert curve.fit is not None and 0 < curve.fit.b <= 3
    need = curve.images_per_class_for_target
    assert 150 <= need <= 400
    assert curve.more_per_class == {"cats": max(0, need - 200), "dogs": max(0, need - 200)}
    assert f"about {need} in all" in curve.advice() or "you have enough" in curve.advice()
    assert C.images_needed(x, y, ["cats", "dogs"], target=0.8, seeds=3).to_dict() == curve.to_dict()
    assert C.curve_png(curve).startswith(b"\x89PNG")


# CLI -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, key", [
    (["augmentation", "--policies", "none,hflip"], "arms"),
    (["transfer", "--epochs", "1", "--size", "32"], "arms"),
    (["learning-curve", "--sizes", "2", "--target", "0.9"], "points"),
])
def test_cli_json_is_the_last_line_and_chart_is_written(flowers, tmp_path, capsys, argv, key):
    chart = tmp_path / "chart.png"
    code = main(["experiment", argv[0], str(flowers), *argv[1:], "--seeds", "1", "--views", "1", "--quiet",
                 "--chart", str(chart), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    payload = json.loads(out[-1])
    assert key in payload
    if key == "arms":
        assert all(len(a["accuracies"]) == 1 and a["distinct_runs"] == 1 and a["std"] is None
                   for a in payload["arms"])  # one run: no spread measured, none reported
    else:
        assert "images_per_class_for_target" in payload
    assert chart.read_bytes().startswith(b"\x89PNG")
    assert str(chart) in "\n".join(out[:-1])


def test_cli_rejects_an_unknown_arm_before_any_work(flowers, tmp_path, capsys):
    code = main(["experiment", "augmentation", str(flowers), "--policies", "none,sharpen",
                 "--out-dir", str(tmp_path)])
    assert code == 2
    assert "unknown augmentation arm 'sharpen'" in capsys.readouterr().err
    assert not (tmp_path / "augmentation.png").exists()
