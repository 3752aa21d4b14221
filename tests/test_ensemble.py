"""Ensembles: several backbones as one model, each on its own crop, their probabilities averaged."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch

from nanostream.engine.augment import get_policy
from nanostream.engine.backbone_specs import get_spec
from nanostream.engine.backbones import prepare_image
from nanostream.engine.bundle import read_bundle
from nanostream.engine.data import scan_folder
from nanostream.engine.export import export_model
from nanostream.engine.features import extract_features
from nanostream.engine.head import fit_head, mean_probability, out_of_fold_logits
from nanostream.engine.images import load_image
from nanostream.engine.inference import inference_backbone
from nanostream.engine.models import save_trained
from nanostream.engine.predict import Classifier
from nanostream.engine.train import TrainConfig, train

PAIR = "efficientnet_lite0+efficientnet_lite1"


def test_an_ensemble_is_named_by_its_members_cheapest_first_and_costs_their_sum():
    spec = get_spec("efficientnet_lite0+efficientnet_lite2")
    assert spec.members == ("efficientnet_lite0", "efficientnet_lite2") and spec.widths == (1280, 1280)
    assert (spec.feature_dim, spec.gflops, spec.input_shape) == (2560, 1.3, (260, 224 + 260))
    assert spec.resize_size == 292 and spec.finetune == ()
    assert [m["input_size"] for m in spec.preprocessing()["members"]] == [224, 260]
    for name in ("efficientnet_lite2+efficientnet_lite0", "efficientnet_lite0+efficientnet_lite0",
                 "efficientnet_lite0+nope", "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2+resnet50"):
        with pytest.raises(ValueError, match="cheapest first"):
            get_spec(name)


def test_an_ensemble_head_says_the_mean_of_its_members_probabilities():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 12, generator=generator), torch.arange(40) % 3
    views = torch.randn(40, 2, 12, generator=generator)
    head = fit_head(x, y, 3, widths=(5, 7))
    first, second = fit_head(x[:, :5], y, 3), fit_head(x[:, 5:], y, 3)
    with torch.no_grad():
        mean = (first(x[:, :5]).softmax(1) + second(x[:, 5:]).softmax(1)) / 2
        torch.testing.assert_close(head(x).softmax(1), mean)
    assert head.members == 2 and head.linear.weight.shape == (6, 12)
    oof = out_of_fold_logits(x, y, 3, repeats=2, views=views, widths=(5, 7))
    each = [out_of_fold_logits(x[:, s], y, 3, repeats=2, views=views[..., s]) for s in (slice(0, 5), slice(5, 12))]
    torch.testing.assert_close(oof.softmax(2), (each[0].softmax(2) + each[1].softmax(2)) / 2)
    torch.testing.assert_close(oof, mean_probability(torch.stack(each), 0))


@pytest.fixture(scope="module")
def ensemble_build(tiny_hymenoptera):
    result = train(scan_folder(tiny_hymenoptera), TrainConfig(backbone=PAIR, views=1))
    return result, save_trained(result)[1]


def test_an_ensemble_trains_on_its_members_features_side_by_side(ensemble_build, tiny_hymenoptera):
    result, _ = ensemble_build
    assert result.backbone == PAIR and result.mode == "fast" and result.head.members == 2
    assert result.pool_features.shape == (12, 2560) and result.metrics["n"] == 8
    assert result.metrics["accuracy"] >= 0.75  # 8 real val photos; chance is 0.5
    files = [item.path for item in scan_folder(tiny_hymenoptera).train]
    policy = get_policy("default")
    together = extract_features(files, PAIR, policy, 1)
    members = [extract_features(files, m, policy, 1) for m in get_spec(PAIR).members]
    assert torch.equal(together.original, torch.cat([m.original for m in members], 1))
    assert torch.equal(together.augmented, torch.cat([m.augmented for m in members], 2))
    assert torch.equal(result.pool_features, together.original)


def test_an_ensemble_serves_what_it_was_trained_on(ensemble_build, tiny_hymenoptera):
    result, path = ensemble_build
    classifier = Classifier(*read_bundle(path))
    photos = sorted((tiny_hymenoptera / "val" / "bees").iterdir())[:3]
    x = torch.stack([classifier.prepare(p.read_bytes()) for p in photos])
    assert x.shape[1:] == (3, 240, 224 + 240)
    served = classifier.features(x)
    # each member on its own crop, as its single model would see the photo
    with torch.inference_mode():
        own = torch.cat([torch.cat([inference_backbone(m, str(classifier.device), classifier.precision)(
            prepare_image(load_image(p), get_spec(m))[None].to(classifier.device)).float().cpu()
            for m in get_spec(PAIR).members], 1) for p in photos])
    torch.testing.assert_close(served, own, rtol=0.02, atol=0.02)  # bf16 passes of other batch sizes
    trained = extract_features(photos, PAIR).original
    torch.testing.assert_close(served, trained, rtol=0.02, atol=0.02)
    probs = classifier.probabilities(x)
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(1), torch.ones(3))


def test_an_ensemble_exports_with_its_members_crops_in_one_input(ensemble_build, tiny_hymenoptera, tmp_path,
                                                                  monkeypatch):
    _, path = ensemble_build
    monkeypatch.setenv("NANOSTREAM_PRECISION", "fp32")
    classifier = Classifier(*read_bundle(path), device=torch.device("cpu"))
    photos = sorted((tiny_hymenoptera / "val" / "ants").iterdir())[:2]
    x = torch.stack([classifier.prepare(p.read_bytes()) for p in photos])
    exported = export_model(path, "onnx", tmp_path / "pair.onnx")
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(got, classifier.probabilities(x), atol=1e-4, rtol=0)
    info = json.loads(exported.labels_path.read_text())
    assert info["input"]["shape"] == ["batch", 3, 240, 464] and info["backbone"] == PAIR
    assert [m["resize_size"] for m in info["preprocessing"]["members"]] == [256, 272]
    assert "side by side" in info["preprocessing"]["crop"]


def test_an_ensemble_is_not_fine_tuned(tiny_hymenoptera):
    with pytest.raises(ValueError, match="is an ensemble, which is not fine-tuned"):
        train(scan_folder(tiny_hymenoptera), TrainConfig(backbone=PAIR, mode="finetune"))
