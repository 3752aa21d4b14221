import dataclasses
import hashlib
import io

import pytest
import torch
import torchvision

from nanostream.engine import backbones
from nanostream.engine.backbones import BackboneUnavailable, get_spec, load_backbone, prepare_image
from nanostream.engine.images import load_image

ANT, BEE = 310, 309  # ImageNet class indices


@pytest.mark.parametrize("name", backbones.offline_backbones())
def test_bundled_weights_classify_real_photos_into_their_imagenet_class(name, datasets):
    """Wrong key renames or normalisation give near-chance results; right ones get most of these."""
    backbone = load_backbone(name)
    spec = backbone.spec
    correct = 0
    for folder, target in (("ants", ANT), ("bees", BEE)):
        photos = sorted((datasets / "hymenoptera" / "val" / folder).iterdir())[:6]
        x = torch.stack([prepare_image(load_image(p, draft_size=spec.resize_size), spec) for p in photos])
        with torch.inference_mode():
            correct += int((backbone.classify_imagenet(x).argmax(1) == target).sum())
    assert correct >= 9, f"{name}: only {correct}/12 photos in their ImageNet class"


def test_lite_key_rename_covers_every_tensor():
    import timm

    network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    renamed = backbones.rename_lite_keys(backbones._lite_state_dict(get_spec("efficientnet_lite0")), network)
    assert set(renamed) == set(network.state_dict())
    assert all(renamed[k].shape == v.shape for k, v in network.state_dict().items())


def test_backbone_maps_images_to_features_of_declared_width():
    backbone = load_backbone("efficientnet_lite0")
    with torch.inference_mode():
        features = backbone(torch.rand(2, 3, 224, 224))
    assert features.shape == (2, get_spec("efficientnet_lite0").feature_dim)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="valid: efficientnet_lite0, efficientnet_lite1"):
        get_spec("resnet9000")


def test_offline_zoo_is_available_and_sorted_by_cost():
    names = backbones.available_backbones()
    assert names[:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _small_torchvision_spec(weights_file: str):
    # The download path is the same for every torchvision entry; a small network keeps the test fast.
    return dataclasses.replace(get_spec("resnet50"), name="mobilenet_v3_small", feature_dim=1024,
                               head="classifier.3", weights=weights_file)


@pytest.fixture()
def weights_server(httpserver, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), buffer)
    data = buffer.getvalue()
    name = f"mobilenet_v3_small-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    httpserver.expect_request(f"/models/{name}").respond_with_data(data)
    monkeypatch.setenv("NANOSTREAM_WEIGHTS_MIRROR", httpserver.url_for("/models/"))
    return name


def test_torchvision_weights_download_into_cache_then_load_offline(weights_server, httpserver):
    spec = _small_torchvision_spec(weights_server)
    with pytest.raises(BackboneUnavailable, match="not cached"):
        backbones._build_torchvision(spec, download=False)
    network = backbones._build_torchvision(spec, download=True)
    assert backbones.torchvision_weights_path(spec).is_file()
    httpserver.clear()  # offline from here: the cached file must suffice
    again = backbones._build_torchvision(spec, download=False)
    for (k, a), (_, b) in zip(network.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.inference_mode():
        assert backbones.Backbone(spec, again).eval()(torch.rand(1, 3, 224, 224)).shape == (1, 1024)


def test_torchvision_weights_with_wrong_checksum_are_refused(weights_server, httpserver):
    served = weights_server.rsplit("-", 1)[0] + "-00000000.pth"  # the name's hash no longer matches
    httpserver.expect_request(f"/models/{served}").respond_with_data(b"not the weights")
    spec = _small_torchvision_spec(served)
    with pytest.raises(BackboneUnavailable):
        backbones.download_weights(spec)
    assert not backbones.torchvision_weights_path(spec).exists()


def test_unreachable_weights_give_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("NANOSTREAM_WEIGHTS_MIRROR", "http://127.0.0.1:9/")  # discard port: refused
    with pytest.raises(BackboneUnavailable, match="could not be downloaded.*offline backbones: efficientnet_lite0"):
        backbones.download_weights(get_spec("resnet50"), timeout=2)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "resnet50"])
def test_prepare_image_matches_torchvision_resize_and_centre_crop(name, datasets):
    """prepare_image resizes with torch's uint8 kernels; torchvision's reference resizes with PIL."""
    from torchvision import transforms

    spec = get_spec(name)
    mode = transforms.InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else transforms.InterpolationMode.BILINEAR
    reference = transforms.Compose([transforms.Resize(spec.resize_size, interpolation=mode),
                                    transforms.CenterCrop(spec.input_size), transforms.ToTensor()])
    files = sorted((datasets / "hymenoptera/val/bees").iterdir())[:4] + sorted((datasets / "flowers/tulip").iterdir())[:4]
    for path in files:  # landscape and portrait photos of several sizes
        image = load_image(path, draft_size=spec.resize_size)
        ours, theirs = prepare_image(image, spec), reference(image)
        assert ours.shape == theirs.shape == (3, spec.input_size, spec.input_size)
        diff = (ours - theirs).abs()
        assert diff.mean() < 0.05 / 255 and diff.max() <= 3 / 255, path.name
