"""The build flow (flows/build.py) through its two front ends: `nanostream train PROJECT --json`
and the worker's build job, on the same project of real photos, give the same summary; and the
summary's JSON round trip, including results stored before it existed.

In-process (cli.main and worker.run_job, the worker's own entry): no second torch start. Builds are
tiny: efficientnet_lite0, no augmentation, 8 photos, features from the session's cache.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from nanostream import paths, worker
from nanostream.cli.main import main
from nanostream.engine import backbones
from nanostream.engine.bundle import BundleError, read_bundle, read_header, save_bundle
from nanostream.engine.images import normalize_image
from nanostream.engine.train import TrainConfig
from nanostream.flows.build import BuildSummary, accuracy_in_words, backbone_in_words, photos_to_fix, unsure_photos
from nanostream.store.db import Store
from nanostream.store.records import Provenance

TINY = TrainConfig(backbone="efficientnet_lite0", augment="none")
TINY_ARGS = ["--backbone", "efficientnet_lite0", "--augment", "none"]
# What one build's summary says that another identical build's cannot: its own id and file, its times.
OWN = ("model_id", "path", "curve_png", "seconds")
TRAIN_JSON = ("model_id", "path", "accuracy", "backbone", "mode", "augment", "classes", "n_train", "n_val",
              "seconds", "per_class", "confusion", "candidates", "skipped")  # `train --json` before the flow


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private store (no other test sees its projects) sharing the session's feature cache."""
    shared_features = paths.home() / "features"
    shared_features.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("build-flow-home")
    (root / "features").symlink_to(shared_features, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOSTREAM_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def store(home, datasets):
    with Store() as store:
        store.create_project("insects")
        for label in ("ants", "bees"):
            store.ensure_category("insects", label)
            for photo in sorted((datasets / "hymenoptera" / "train" / label).glob("*.jpg"))[:4]:
                store.add_image("insects", label, normalize_image(photo.read_bytes()), Provenance("upload"))
        store.add_category("insects", "wasps")  # no photos yet: left out of the model, and said so
        yield store


def cli_train(capsys, *argv) -> dict:
    assert main(["train", *map(str, argv), "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def job_build(store: Store, config: TrainConfig) -> dict:
    """The build job as start_build stores it, run by the worker's entry point in this process."""
    job = store.create_job("insects", "build", {"config": asdict(config)})
    finished = worker.run_job(store, job.id)
    assert finished.status == "done", finished.error
    return finished.result


def without_own(summary: dict) -> dict:
    rest = {k: v for k, v in summary.items() if k not in OWN}
    rest["candidates"] = [{k: v for k, v in c.items() if k != "seconds"} for c in rest["candidates"]]
    return rest


def test_the_cli_and_the_worker_build_the_same_model(store, capsys):
    by_cli = cli_train(capsys, "insects", *TINY_ARGS)
    by_job = job_build(store, TINY)

    assert set(by_cli) == set(by_job) and set(TRAIN_JSON) <= set(by_cli)
    assert without_own(by_cli) == without_own(by_job)
    assert by_cli["model_id"] != by_job["model_id"]
    assert [m.model_id for m in store.list_models("insects")][:2] == [by_job["model_id"], by_cli["model_id"]]
    # the summary itself: the project's photos, the model's metrics, every photo's id
    assert (by_cli["project"], by_cli["classes"], by_cli["empty_categories"]) == ("insects", ["ants", "bees"], ["wasps"])
    # no val/: every photo trains, and each is measured by a fit that never saw it
    assert (by_cli["n_train"], by_cli["n_val"]) == (8, 0) and sum(map(sum, by_cli["confusion"])) == 8
    assert by_cli["estimate"] == "cross-validation" and set(by_cli["calibration"]) == {"temperature", "ece"}
    low, high = by_cli["accuracy_interval"]
    assert 0 <= low <= by_cli["accuracy"] <= high <= 1
    assert accuracy_in_words(BuildSummary.from_dict(by_cli)) == (
        f"about {by_cli['accuracy']:.0%} ({low:.0%}–{high:.0%}), measured on all 8 photos, each held out once")
    assert set(by_cli["per_class"]) == {"ants", "bees"} and by_cli["skipped"] == []
    ids = {r.id for r in store.list_images("insects")}
    assert {e["image_id"] for e in by_job["highest_loss"]} <= ids and len(by_job["highest_loss"]) == 8
    assert store.get_model(by_job["model_id"]).metrics["highest_loss"] == by_job["highest_loss"]
    assert by_job["advice"] and by_job["advice_error"] is None and Path(by_job["curve_png"]).is_file()
    assert (by_job["augment"], by_job["policy"]["name"], by_job["config"]["augment"]) == ("none", "none", "none")
    assert by_job["device"] == "CPU" or by_job["device"].startswith("GPU (")
    for summary in (by_cli, by_job):  # what the page reads back is what was written
        built = {k: v for k, v in summary.items() if k not in ("runner", "node")}  # where it ran: not the build's
        assert json.loads(json.dumps(BuildSummary.from_dict(summary).to_dict())) == built


def test_the_bundle_says_how_the_model_was_asked_for(store, capsys, tmp_path):
    summary = cli_train(capsys, "insects", *TINY_ARGS, "--seed", "3", "--out", tmp_path / "copy.safetensors")
    assert summary["path"] == str(tmp_path / "copy.safetensors")
    assert read_header(summary["path"]).meta["config"] == summary["config"] == {**asdict(TINY), "seed": 3}
    assert main(["models", "--json"]) == 0
    listed = {m["model_id"]: m for m in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
    assert listed[summary["model_id"]]["config"]["seed"] == 3

    meta, tensors = read_bundle(summary["path"])
    damaged = save_bundle(tmp_path / "damaged.safetensors", {**meta, "config": "fast"}, tensors)
    with pytest.raises(BundleError, match=r"^damaged model file: 'config' in its header is 'fast', not an object$"):
        read_header(damaged)
    old = save_bundle(tmp_path / "old.safetensors", {k: v for k, v in meta.items() if k != "config"}, tensors)
    assert "config" not in read_header(old).meta  # made before the config was saved: still sound


def test_a_project_rebuild_prefers_the_previous_backbone_through_both(store, capsys, monkeypatch):
    """An automatic build of a project asks the choice to keep its latest model's backbone, the
    CLI and the job alike. One backbone available keeps it quick."""
    monkeypatch.setattr(backbones, "available_backbones", lambda: ["efficientnet_lite0"])
    auto = TrainConfig(augment="none")
    first = job_build(store, auto)  # now the project's latest model is of first's backbone
    by_cli = cli_train(capsys, "insects", "--augment", "none")
    by_job = job_build(store, auto)
    assert by_cli["config"]["prefer"] == first["backbone"] and by_job["config"]["prefer"] == by_cli["backbone"]
    assert by_job["backbone"] == "efficientnet_lite0" and by_job["candidates"][0]["cv_accuracy"] is None


def test_a_build_stored_before_the_summary_existed_still_reads(store):
    """A job result of an older NanoStream (labels, metrics, [file, reason] pairs) is read as a summary."""
    ant = store.list_images("insects", "ants")[0]
    old = {"model_id": "m-0123456789", "accuracy": 0.5, "labels": ["ants", "bees"], "backbone": "efficientnet_lite0",
           "mode": "fast", "policy": {"name": "default", "views": 1, "fill": "reflect"},
           "metrics": {"accuracy": 0.5, "n": 2, "confusion": [[0, 1], [0, 1]],
                       "per_class": {"ants": {"precision": 0.0, "recall": 0.0, "n": 1},
                                     "bees": {"precision": 0.5, "recall": 1.0, "n": 1}},
                       "highest_loss": [{"file": "a.jpg", "image_id": ant.id, "label": "ants", "predicted": "bees",
                                         "confidence": 0.9, "loss": 2.3}]},
           "candidates": [{"backbone": "efficientnet_lite0", "cv_accuracy": None, "seconds": 1.0, "gflops": 0.4,
                           "error": None}],
           "n_train": 2, "n_val": 2, "seconds": 3.0, "device": "CPU", "gpu": False, "precision": "fp32",
           "skipped": [["b.jpg", "not an image"]], "advice": None}
    summary = BuildSummary.from_dict(old)
    assert (summary.classes, summary.augment, summary.views, summary.gpu) == (("ants", "bees"), "default", 1, False)
    assert [(c.label, c.correct, c.n) for c in summary.per_class] == [("ants", 0, 1), ("bees", 1, 1)]
    assert [(s.file, s.reason) for s in summary.skipped] == [("b.jpg", "not an image")]
    fixes = photos_to_fix(store, "insects", summary)
    assert [(entry.predicted, record.id) for entry, record in fixes] == [("bees", ant.id)]
    assert unsure_photos(store, "insects", summary, not_sure=0.95) == []  # the only one is wrong, not unsure
    assert accuracy_in_words(summary) == "50% on 2 held-out photos"  # no interval then: said as before


def test_an_ensemble_is_named_for_what_it_is():
    assert backbone_in_words("efficientnet_lite2") == "efficientnet_lite2"
    assert backbone_in_words("efficientnet_lite0+efficientnet_lite2") == (
        "efficientnet_lite0 and efficientnet_lite2, an ensemble: each photo goes through both "
        "and their answers are averaged")
    assert backbone_in_words("efficientnet_lite0+efficientnet_lite1+efficientnet_lite2").startswith(
        "efficientnet_lite0, efficientnet_lite1 and efficientnet_lite2, an ensemble: each photo goes through all 3 ")
