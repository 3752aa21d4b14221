import pickle
import shutil

import pytest
import torch

from nanostream.engine.bundle import BundleError, read_bundle, save_bundle
from nanostream.engine.models import resolve_model
from nanostream.engine.predict import load_classifier


def test_bundle_header_says_how_the_model_was_made(trained_model):
    model_id, path = trained_model
    meta, tensors = read_bundle(path)
    assert meta["model_id"] == model_id and meta["labels"] == ["ants", "bees"]
    assert meta["backbone"] == "efficientnet_lite0" and meta["preprocessing"]["input_size"] == 224
    assert meta["augmentation"]["name"] == "default" and meta["augmentation"]["vflip"] == 0.0
    for key in ("metrics", "data_fingerprint", "versions", "created_at", "backbone_weights"):
        assert meta[key]
    # the fast path's model is the head alone: (1280 + 1) x 2 trainable numbers
    assert tensors["head.linear.weight"].shape == (2, 1280) and tensors["head.linear.bias"].shape == (2,)


def test_predict_by_id_or_path_without_the_training_data(trained_model, tiny_hymenoptera, tmp_path):
    model_id, path = trained_model
    photos = tmp_path / "photos"
    shutil.copytree(tiny_hymenoptera / "val", photos)
    by_id = load_classifier(model_id).predict_files(sorted((photos / "bees").iterdir()))
    copy = tmp_path / "model.safetensors"
    shutil.copy(path, copy)
    by_path = load_classifier(copy).predict_files(sorted((photos / "bees").iterdir()))
    assert [p.probs for p in by_id] == [p.probs for p in by_path]
    assert sum(p.label == "bees" for p in by_id) >= 3
    for p in by_id:
        assert abs(sum(p.probs.values()) - 1) < 1e-4 and p.confidence == max(p.probs.values())


def test_a_corrupt_image_fails_alone(trained_model, tiny_hymenoptera, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    good = sorted((tiny_hymenoptera / "val" / "ants").iterdir())[0]
    results = load_classifier(trained_model[0]).predict_files([bad, good, tmp_path / "missing.png"])
    assert results[0].error and results[0].label is None
    assert results[1].error is None and results[1].label in ("ants", "bees")
    assert "cannot read" in results[2].error


def test_pickles_and_foreign_files_are_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(BundleError, match="not a NanoStream model"):
        read_bundle(evil)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, plain)
    with pytest.raises(BundleError, match="no header"):
        read_bundle(plain)
    with pytest.raises(BundleError, match="no model file or model id"):
        resolve_model("m-doesnotexist")


def test_bundles_are_written_atomically(tmp_path, monkeypatch):
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_bundle(tmp_path / "m.safetensors", {}, {"x": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_input_says_what_it_is(trained_model, tmp_path):
    inputs = {"page.jpg": b"<html><head><title>404</title></head></html>", "notes.png": b"shopping list",
              "scan.jpg": b"%PDF-1.7 ...", "cut.png": b"\x89PNG\r\n\x1a\n then nothing", "blank.jpg": b""}
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
    results = load_classifier(trained_model[0]).predict_files([tmp_path / name for name in inputs])
    assert [r.error for r in results] == ["not an image (HTML)", "not an image (text)", "not an image (PDF)",
                                          "not a readable image: damaged PNG data", "empty file"]
    assert all(r.label is None and r.probs == {} for r in results)


def test_inputs_that_are_no_pictures_are_refused_as_the_model_would_without_it(trained_model, tiny_hymenoptera, tmp_path):
    from nanostream.engine.prediction import refused, refused_files

    photo = sorted((tiny_hymenoptera / "val" / "ants").iterdir())[0].read_bytes()
    bad = {"page.jpg": b"<!doctype html><html></html>", "cut.jpg": photo[:len(photo) // 2], "blank.png": b""}
    (tmp_path / "cut.jpg").write_bytes(bad["cut.jpg"])
    model_says = load_classifier(trained_model[0]).predict_bytes(list(bad.values()), list(bad))
    assert refused(list(bad.values()), list(bad)) == model_says  # the truncated JPEG too: it is decoded
    assert [p.error for p in model_says] == ["not an image (HTML)", "not a readable image: damaged JPEG data",
                                             "empty file"]
    assert refused([*bad.values(), photo], [*bad, "ant.jpg"]) is None  # one picture: the model has work
    assert [p.error for p in refused_files([tmp_path / "cut.jpg", tmp_path / "gone.jpg"])] == [
        "not a readable image: damaged JPEG data", "cannot read file: No such file or directory"]


def test_a_fine_tuned_tensor_that_does_not_fit_its_backbone_is_refused(trained_model, tmp_path):
    """The header check cannot see the network's own shapes; the loader compares before loading."""
    meta, tensors = read_bundle(trained_model[1])
    wrong = {**tensors, "backbone.body.blocks.6.0.conv_pw.weight": torch.zeros(7, 7, 1, 1)}
    path = save_bundle(tmp_path / "m.safetensors", meta, wrong)
    with pytest.raises(BundleError, match=r"^damaged model file: tensor 'body.blocks.6.0.conv_pw.weight' is "
                                          r"\(7, 7, 1, 1\), its backbone's is \(1152, 192, 1, 1\)$"):
        load_classifier(path)
    unknown = {**tensors, "backbone.body.blocks.6.9.weight": torch.zeros(1)}
    with pytest.raises(BundleError, match="its backbone has no tensor 'body.blocks.6.9.weight'"):
        load_classifier(save_bundle(tmp_path / "u.safetensors", meta, unknown))


def test_models_on_one_frozen_backbone_share_it_and_split_into_features_and_outputs(trained_model, tiny_hymenoptera,
                                                                                     tmp_path):
    """The contract of the API's one server for many models: one backbone copy, features once, many heads."""
    meta, tensors = read_bundle(trained_model[1])
    twin_path = save_bundle(tmp_path / "twin.safetensors", {**meta, "model_id": "m-00000000ab"}, tensors)
    a, b = load_classifier(trained_model[0]), load_classifier(twin_path)
    assert a is not b and a.backbone_key == b.backbone_key and a.backbone is b.backbone
    assert a.backbone_key.startswith(f"efficientnet_lite0/{meta['backbone_weights']}/{a.precision}/")
    photos = sorted((tiny_hymenoptera / "val" / "ants").iterdir())
    x = torch.stack([a.prepare(p.read_bytes()) for p in photos])
    features = a.features(x)
    assert features.shape == (len(photos), 1280) and features.dtype == torch.float32
    said = b.outputs(features)
    assert torch.equal(said.probs, a.probabilities(x)) and said.unknown.dtype == torch.bool
    assert said.unknown.shape == (len(photos),)
    assert a.traced().backbone is b.traced().backbone  # one trace per backbone too


def test_confidence_is_calibrated_and_photos_of_another_domain_score_as_unknown(trained_model, tiny_hymenoptera,
                                                                                 datasets, caplog):
    """With 12 training photos the threshold is their largest held-out score (a 95% conformal
    quantile needs 19), which one odd photo sets, and bf16 and fp32 set it apart: the share of
    these daisies above it is not what holds on every CPU. The score's order is."""
    from sklearn.metrics import roc_auc_score

    meta, tensors = read_bundle(trained_model[1])
    assert meta["calibration"]["temperature"] > 0 and 0 <= meta["calibration"]["ece"] <= 1
    assert meta["unknown"]["threshold"] > 0 and tensors["unknown.reference"].shape == (12, 1280)
    classifier = load_classifier(trained_model[0])
    flowers = sorted((datasets / "flowers" / "daisy").iterdir())[:10]
    own = sorted((tiny_hymenoptera / "val").rglob("*.jpg"))

    def scores(files):
        features = classifier.features(torch.stack([classifier.prepare(f.read_bytes()) for f in files]))
        outputs = classifier.outputs(features)
        found = classifier.detector.scores(features)
        assert torch.equal(outputs.unknown, found > classifier.detector.threshold)
        return found

    foreign, ours = scores(flowers), scores(own)
    assert roc_auc_score([0] * len(ours) + [1] * len(foreign), torch.cat([ours, foreign]).tolist()) >= 0.9
    said = classifier.predict_files(flowers[:1])[0]
    assert said.to_dict()["unknown"] is said.unknown


def test_a_model_made_before_calibration_loads_with_temperature_one_and_never_unknown(trained_model, tmp_path, caplog):
    meta, tensors = read_bundle(trained_model[1])
    old_meta = {k: v for k, v in meta.items() if k not in ("calibration", "unknown")}
    old = save_bundle(tmp_path / "old.safetensors", {**old_meta, "model_id": "m-00000000cd"},
                      {k: v for k, v in tensors.items() if k.startswith("head.")})
    with caplog.at_level("INFO", logger="nanostream.engine.predict"):
        classifier = load_classifier(old)
        load_classifier(old)  # cached: said once
    assert classifier.temperature == 1.0 and classifier.detector is None
    assert [r.getMessage() for r in caplog.records] == [
        "model m-00000000cd was made before calibration (temperature 1) and the unknown check (never unknown)"]
    flowers = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 30, 90)).save(flowers)
    assert classifier.predict_files([flowers])[0].unknown is False


@pytest.mark.parametrize("earlier", ["the nearest training photo of the predicted class",
                                     "1 - Bhattacharyya coefficient of the backbone's ImageNet class probabilities "
                                     "with the closest category's mean"])
def test_a_model_made_with_an_earlier_unknown_score_gets_this_scores_threshold(earlier, trained_model, tmp_path):
    """Its stored threshold was another score's number (and it has no scales): the same number means
    something else now. Every photo is kept in this small model, so its load sets what its build set."""
    from nanostream.engine.unknown import threshold_for

    meta, tensors = read_bundle(trained_model[1])
    stored = {"threshold": 0.01, "pass_rate": 0.95, "score": earlier}
    old = save_bundle(tmp_path / "old.safetensors", {**meta, "unknown": stored, "model_id": "m-00000000ce"}, tensors)
    detector = load_classifier(old).detector
    threshold, scales = threshold_for(detector.features, detector.targets, detector.imagenet_head)
    built = load_classifier(trained_model[0]).detector
    assert (detector.threshold, detector.scales) == (threshold, scales) == (built.threshold, built.scales)
    assert detector.threshold != 0.01 and all(scale > 0 for scale in scales)
