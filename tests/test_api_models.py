"""One server for many models: models on one frozen backbone share its network and its forward
passes, each answering with its own head; a fine-tuned model keeps its own network."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from model_fixture import TinyModel, serving_home
from test_api import blocking_forward
from nanostream.api.app import create_app
from nanostream.api.batching import BatchConfig, BatcherClosed, MicroBatcher
from nanostream.api.service import ServeConfig
from nanostream.engine.bundle import read_bundle, save_bundle
from nanostream.engine.predict import Classifier, load_classifier
from nanostream.store import keys

BASE = "m-00000000a1"                                 # the tiny model as trained
MODELS = tuple(f"m-00000001a{i}" for i in range(4))   # fast-mode copies, each with a head of its own
FINE_TUNED = "m-00000002f0"
FINE_TUNED_STAGE = "body.blocks.6.0.conv_pw.weight"   # one of efficientnet_lite0's fine-tuned stages
PHOTOS = 3  # of the tiny model's held-out photos: an ant, a bee and an ant
TOL = 1e-4  # batch composition may change the last bits of the features (oneDNN kernels by batch size)


def with_other_head(path: Path, model_id: str, seed: int) -> Path:
    """The bundle re-registered as model_id with its head's weights moved by seeded noise: a model
    that answers differently on the same features, at the cost of a copy."""
    meta, tensors = read_bundle(path)
    generator = torch.Generator().manual_seed(seed)
    weight = tensors["head.linear.weight"]
    moved = weight + weight.std() * torch.randn(weight.shape, generator=generator)
    return save_bundle(path.with_name(f"{model_id}.safetensors"), {**meta, "model_id": model_id},
                       {**tensors, "head.linear.weight": moved})


def fine_tuned_copy(path: Path, model_id: str) -> Path:
    """The bundle with one last-stage tensor of its backbone changed, as the fine-tune path saves it."""
    from nanostream.engine.backbones import load_backbone

    meta, tensors = read_bundle(path)
    stage = load_backbone(meta["backbone"]).state_dict()[FINE_TUNED_STAGE]
    return save_bundle(path.with_name(f"{model_id}.safetensors"), {**meta, "model_id": model_id},
                       {**tensors, f"backbone.{FINE_TUNED_STAGE}": stage * 1.5})


@pytest.fixture(scope="module")
def home(datasets, tmp_path_factory):
    """The tiny model as four fast-mode models with different heads and one fine-tuned one; a key."""
    root = tmp_path_factory.mktemp("many-models-home")
    with serving_home(root, private=(BASE,)) as model:
        source = bundle(root, BASE)
        for seed, model_id in enumerate(MODELS):
            with_other_head(source, model_id, seed)
        fine_tuned_copy(source, FINE_TUNED)
        _, key = keys.create_key("many-models")
        yield root, model, {"Authorization": f"Bearer {key}"}


def bundle(root: Path, model_id: str) -> Path:
    return root / "models" / f"{model_id}.safetensors"


def alone(root: Path, model_id: str, model: TinyModel) -> list[dict]:
    """What the model alone says about each photo, through the library (as the CLI)."""
    return [p.to_dict() for p in load_classifier(bundle(root, model_id)).predict_files(model.photos[:PHOTOS])]


def assert_close(got: dict, expected: dict) -> None:
    assert got["label"] == expected["label"] and got["unknown"] is expected["unknown"]
    assert set(got["probs"]) == set(expected["probs"])
    assert all(abs(got["probs"][k] - expected["probs"][k]) <= TOL for k in expected["probs"])


def ask_all(client: TestClient, headers: dict, requests: list[tuple[str, Path]]) -> list[dict]:
    """Every (model, photo) as a one-photo request, eight at a time; each request's prediction."""
    def ask(request):
        model_id, photo = request
        response = client.post(f"/v1/models/{model_id}/predict", headers=headers,
                               files=[("file", (photo.name, photo.read_bytes(), "image/jpeg"))])
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, requests))


def test_a_pass_runs_the_backbone_once_then_each_requests_own_head():
    """The batcher alone: one forward pass for submissions of two "models", each then gets its own
    head's answer on its own rows, and a failing head fails its own request only."""
    calls, started, release = [], threading.Event(), threading.Event()
    backbone = blocking_forward(calls, started, release, scale=10)

    def broken_head(rows):
        raise ValueError("head damaged")

    batcher = MicroBatcher(backbone, BatchConfig(max_batch=8))
    first = batcher.submit(torch.ones(1, 2), lambda rows: rows + 1)
    assert started.wait(10)  # the next submissions queue behind this pass
    double, negate = (lambda rows: rows * 2), (lambda rows: -rows)
    a = batcher.submit(torch.full((2, 2), 1.0), double)
    b = batcher.submit(torch.full((3, 2), 2.0), negate)
    c = batcher.submit(torch.full((1, 2), 3.0), broken_head)
    d = batcher.submit(torch.full((1, 2), 4.0))  # no head: the rows themselves
    release.set()
    assert torch.equal(first.result(10), torch.full((1, 2), 11.0))
    assert torch.equal(a.result(10), torch.full((2, 2), 20.0))
    assert torch.equal(b.result(10), torch.full((3, 2), -20.0))
    with pytest.raises(ValueError, match="head damaged"):
        c.result(10)
    assert torch.equal(d.result(10), torch.full((1, 2), 40.0))
    batcher.close()
    assert calls == [1, 7]  # the four waiting submissions of four "models" shared one pass
    assert batcher.stats.batches == 2 and batcher.stats.mixed == 1


def test_cross_model_batches_give_each_models_own_numbers(home):
    root, model, headers = home
    expected = {model_id: alone(root, model_id, model) for model_id in MODELS}
    # the heads differ: a mixed pass that gave every request the same head's answer would fail below
    assert len({tuple(round(p["confidence"], 3) for p in expected[m]) for m in MODELS}) == len(MODELS)
    requests = [(model_id, photo) for photo in model.photos[:PHOTOS] for model_id in MODELS]
    config = ServeConfig(batch=BatchConfig(max_batch=8, max_wait_ms=500))  # waits for company: mixed passes
    with TestClient(create_app(config)) as client:
        got = ask_all(client, headers, requests)
        service = client.app.state.service
        (name, batcher), = service.batchers().items()  # one network for the four models
        loaded = service.loaded()
    index = {photo: i for i, photo in enumerate(model.photos)}
    for (model_id, photo), prediction in zip(requests, got):
        assert_close(prediction, expected[model_id][index[photo]])
    assert name == load_classifier(bundle(root, MODELS[0])).backbone_key and loaded == {name: len(MODELS)}
    stats = batcher.stats
    assert stats.requests == len(requests) and stats.batches < len(requests) and stats.mixed >= 1


def test_a_photo_unlike_the_models_own_is_unknown(home, datasets):
    """Daisies shown to the ants/bees model: the API says `unknown` where the library (and the CLI) does."""
    root, model, headers = home
    daisies = sorted((datasets / "flowers" / "daisy").glob("*.jpg"))[:4]
    expected = [p.to_dict() for p in load_classifier(bundle(root, BASE)).predict_files(daisies)]
    with TestClient(create_app(ServeConfig())) as client:
        got = ask_all(client, headers, [(BASE, photo) for photo in daisies])
    for prediction, reference in zip(got, expected):
        assert_close(prediction, reference)
    assert any(p["unknown"] for p in got) and {p["label"] for p in got} <= set(model.labels)


def test_the_backbone_is_prepared_once_for_many_models(home, monkeypatch):
    root, model, headers = home
    traced = []
    real_traced = Classifier.traced

    def counted(self):
        traced.append(self.model_id)
        return real_traced(self)

    monkeypatch.setattr(Classifier, "traced", counted)
    photo = model.photos[:1]
    with TestClient(create_app(ServeConfig())) as client:
        for model_id in MODELS:
            ask_all(client, headers, [(model_id, photo[0])])
        service = client.app.state.service
        entries = [service.load(bundle(root, model_id)) for model_id in MODELS]
        assert len(service.batchers()) == 1
    assert traced == [MODELS[0]]  # the first model prepared the network; the others brought a head
    assert len({id(e.backbone) for e in entries}) == 1
    assert len({id(e.classifier.backbone) for e in entries}) == 1  # one prepared copy in the process
    assert len({id(e.classifier) for e in entries}) == len(MODELS)  # each its own head and calibration


def test_a_fine_tuned_model_keeps_its_own_network(home):
    root, model, headers = home
    fine_tuned = load_classifier(bundle(root, FINE_TUNED))
    assert fine_tuned.backbone_key is None
    expected = alone(root, FINE_TUNED, model)
    fast = alone(root, MODELS[0], model)
    # its own network: other features, so other numbers than its fast-mode twin's head would give
    assert any(abs(e["confidence"] - f["confidence"]) > 0.01 for e, f in zip(expected, fast))
    requests = [(model_id, photo) for photo in model.photos[:PHOTOS] for model_id in (FINE_TUNED, MODELS[0])]
    with TestClient(create_app(ServeConfig(batch=BatchConfig(max_batch=8, max_wait_ms=100)))) as client:
        got = ask_all(client, headers, requests)
        service = client.app.state.service
        batchers, loaded = service.batchers(), service.loaded()
        entry = service.load(bundle(root, FINE_TUNED))
    index = {photo: i for i, photo in enumerate(model.photos)}
    for (model_id, photo), prediction in zip(requests, got):
        assert_close(prediction, (expected if model_id == FINE_TUNED else fast)[index[photo]])
    fast_key = load_classifier(bundle(root, MODELS[0])).backbone_key
    assert set(batchers) == {fast_key, FINE_TUNED} and loaded == {fast_key: 1, FINE_TUNED: 1}
    assert batchers[FINE_TUNED].stats.requests == PHOTOS and batchers[FINE_TUNED].stats.mixed == 0
    assert entry.backbone.runner.backbone is not load_classifier(bundle(root, MODELS[0])).backbone


def test_per_model_batching_keeps_each_models_requests_apart(home):
    """The bench's baseline (`serve --per-model-batching`): the same answers, one batcher per model.
    Those batchers run on the one cached network, so max_backbones does not count them."""
    root, model, headers = home
    requests = [(model_id, photo) for photo in model.photos[:2] for model_id in MODELS[:2]]
    with TestClient(create_app(ServeConfig(share_backbones=False, max_backbones=1))) as client:
        got = ask_all(client, headers, requests)
        batchers = client.app.state.service.batchers()
    expected = {model_id: alone(root, model_id, model) for model_id in MODELS[:2]}
    index = {photo: i for i, photo in enumerate(model.photos)}
    for (model_id, photo), prediction in zip(requests, got):
        assert_close(prediction, expected[model_id][index[photo]])
    assert set(batchers) == set(MODELS[:2]) and all(b.stats.mixed == 0 for b in batchers.values())


def test_the_least_recently_used_leave_first_a_network_with_its_models(home):
    root, model, headers = home
    with TestClient(create_app(ServeConfig(max_loaded_models=2))) as client:
        service = client.app.state.service
        first = service.load(bundle(root, MODELS[0]))
        for model_id in MODELS[1:3]:
            service.load(bundle(root, model_id))
        assert service.loaded() == {first.classifier.backbone_key: 2}  # the first head left, the network stays
        assert service.load(bundle(root, MODELS[0])) is not first  # loaded again when asked
    # one network at most: the fine-tuned model's takes the place of the shared one and its models
    with TestClient(create_app(ServeConfig(max_backbones=1))) as client:
        service = client.app.state.service
        first = service.load(bundle(root, MODELS[0]))
        service.load(bundle(root, MODELS[1]))
        service.load(bundle(root, FINE_TUNED))
        assert service.loaded() == {FINE_TUNED: 1}
        with pytest.raises(BatcherClosed):  # its threads have stopped; a request holding it runs alone
            first.backbone.batcher.submit(torch.zeros(1, 3, 8, 8))
        prediction, = ask_all(client, headers, [(MODELS[0], model.photos[0])])
        assert service.loaded() == {first.classifier.backbone_key: 1}
    assert_close(prediction, alone(root, MODELS[0], model)[0])
