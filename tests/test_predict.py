import pickle
import shutil

import pytest
import torch

from nanostream.bundle import BundleError, read_bundle, save_bundle
from nanostream.models import resolve_model
from nanostream.predict import load_classifier


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
    import nanostream.bundle as bundle

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle, "save_file", crash)
    with pytest.raises(OSError):
        save_bundle(tmp_path / "m.safetensors", {}, {"x": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []
