"""The HTTP API against a real trained model: access, predictions equal to the CLI's, refusals, batching."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi import Request
from fastapi.testclient import TestClient
from PIL import Image

from model_fixture import TinyModel, serving_home
from nanostream.cli import main as cli
from nanostream.store import keys
from nanostream.api.app import create_app
from nanostream.access import RateLimiter
from nanostream.api.limits import client_id, decoded_pixels
from nanostream.api.service import ServeConfig
from nanostream.api.batching import BatchConfig, BatcherClosed, MicroBatcher
from nanostream.engine.images import decode_image, normalize_image
from nanostream.store.keys import ApiKey
from nanostream.engine.predict import load_classifier

PRIVATE, PUBLIC = "m-00000000a1", "m-00000000b2"  # ids as NanoStream makes them: m- and 10 hex digits
TOL = 1e-5


@dataclass(frozen=True)
class Served:
    model: TinyModel
    home: Path
    key: str
    revoked_key: str


@pytest.fixture(scope="module")
def served(datasets, tmp_path_factory):
    """A NANOSTREAM_HOME of its own: one private and one published copy of the model, two keys."""
    home = tmp_path_factory.mktemp("api-home")
    with serving_home(home, private=(PRIVATE,), public=(PUBLIC,)) as model:
        _, key = keys.create_key("tests")
        _, revoked = keys.create_key("old")
        keys.revoke_key("old")
        yield Served(model, home, key, revoked)


# The tests below send more requests without a key than a visitor would; the limit has tests of its own.
UNLIMITED = 1_000


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(ServeConfig(anonymous_burst=UNLIMITED))) as c:
        yield c


@pytest.fixture(scope="module")
def tight(served):
    """Small limits, so every refusal can be provoked with small bodies."""
    config = ServeConfig(max_images=3, max_file_bytes=100_000, max_request_bytes=400_000,
                         anonymous_burst=UNLIMITED)
    with TestClient(create_app(config)) as c:
        yield c


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def uploads(paths) -> list:
    return [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def png(size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def _png(width: int, height: int, idat: bytes) -> bytes:
    """An RGB PNG of this size around idat, its zlib-compressed rows."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims this size but holds one row: a few bytes that would decode to a huge picture."""
    return _png(width, height, zlib.compress(b"\0" * (1 + 3 * width)))


@functools.cache
def solid_png(width: int, height: int) -> bytes:
    """A whole PNG of one colour: small to send (~160 KB at 7071 x 7071), slow to decode (~0.5 s there)."""
    rows = zlib.compressobj()
    row = b"\0" + bytes((10, 120, 200)) * width
    return _png(width, height, b"".join(rows.compress(row) for _ in range(height)) + rows.flush())


def jpeg(size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 120, 10)).save(out, format="JPEG")
    return out.getvalue()


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    for word in words:
        assert word in body["error"], body
    return body


def assert_same_predictions(got: list[dict], expected: list[dict], tol: float = TOL) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert set(g) == {"label", "confidence", "probs", "unknown"}
        assert g["label"] == e["label"] and g["unknown"] is e["unknown"]
        assert abs(g["confidence"] - e["confidence"]) <= tol
        assert set(g["probs"]) == set(e["probs"])
        assert all(abs(g["probs"][k] - e["probs"][k]) <= tol for k in e["probs"])


# ---------------------------------------------------------------- docs, health, listing

def test_healthz_and_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/healthz", "/v1/models", "/v1/models/{model_id}", "/v1/models/{model_id}/predict"} <= set(spec["paths"])
    body = spec["paths"]["/v1/models/{model_id}/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)


def test_anyone_lists_published_models_and_a_key_lists_all(client, served):
    anonymous = [m["model_id"] for m in client.get("/v1/models").json()["models"]]
    assert anonymous == [PUBLIC]
    with_key = client.get("/v1/models", headers=auth(served.key)).json()["models"]
    assert {m["model_id"] for m in with_key} == {PUBLIC, PRIVATE}
    info = next(m for m in with_key if m["model_id"] == PRIVATE)
    assert info["classes"] == list(served.model.labels)
    assert info["published"] is False and info["name"] and info["created"]
    assert 0.0 <= info["metrics"]["accuracy"] <= 1.0
    assert "highest_loss" not in info["metrics"]  # it names local training files


def test_model_details_follow_access(client, served):
    public = client.get(f"/v1/models/{PUBLIC}")
    assert public.status_code == 200 and public.json()["published"] is True
    assert public.json()["classes"] == list(served.model.labels)
    assert_error(client.get(f"/v1/models/{PRIVATE}"), 401, "API key")
    assert client.get(f"/v1/models/{PRIVATE}", headers=auth(served.key)).json()["model_id"] == PRIVATE


def test_unknown_model_is_404(client, served):
    assert_error(client.get("/v1/models/m-nothere000", headers=auth(served.key)), 404, "m-nothere000")
    assert_error(client.post("/v1/models/m-nothere000/predict", files=uploads(served.model.photos[:1])), 404)
    # ids are never read as paths: a file name in the working directory is not a model
    assert_error(client.get("/v1/models/pyproject.toml", headers=auth(served.key)), 404)
    assert_error(client.get("/v1/nowhere"), 404)
    assert_error(client.delete("/v1/models"), 405)


# ---------------------------------------------------------------- predictions

def test_predictions_equal_the_cli(client, served, capsys):
    photos = served.model.photos
    assert cli.main(["predict", str(served.home / "models" / f"{PRIVATE}.safetensors"), *map(str, photos),
                     "--json"]) == 0
    expected = json.loads(capsys.readouterr().out.splitlines()[-1])
    response = client.post(f"/v1/models/{PRIVATE}/predict", files=uploads(photos), headers=auth(served.key))
    assert response.status_code == 200, response.text
    got = response.json()["predictions"]
    assert_same_predictions(got, expected)
    # the same through Classifier.predict_files, the library call behind the CLI
    reference = load_classifier(served.home / "models" / f"{PRIVATE}.safetensors").predict_files(photos)
    assert_same_predictions(got, [p.to_dict() for p in reference])
    assert len({g["confidence"] for g in got}) > 1  # a real model: each photo gets its own answer


def test_published_model_needs_no_key(client, served):
    response = client.post(f"/v1/models/{PUBLIC}/predict", files=uploads(served.model.photos[:2]))
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 2


def test_private_model_needs_a_valid_key(client, served):
    url = f"/v1/models/{PRIVATE}/predict"
    files = uploads(served.model.photos[:1])
    assert_error(client.post(url, files=files), 401, "API key")
    assert_error(client.post(url, files=files, headers=auth("ns_" + "x" * 43)), 401, "invalid")
    assert_error(client.post(url, files=files, headers={"Authorization": served.key}), 401, "Bearer")
    assert_error(client.post(url, files=files, headers=auth(served.revoked_key)), 403, "revoked")
    assert_error(client.get("/v1/models", headers=auth(served.revoked_key)), 403, "revoked")
    assert client.post(url, files=files, headers=auth(served.key)).status_code == 200


def test_revoking_takes_effect_at_once(client, served):
    _, key = keys.create_key("short-lived")
    url = f"/v1/models/{PRIVATE}"
    assert client.get(url, headers=auth(key)).status_code == 200
    keys.revoke_key("short-lived")
    assert_error(client.get(url, headers=auth(key)), 403, "revoked")


def test_urls_are_fetched_by_the_safe_downloader(client, served, httpserver, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_ALLOW_PRIVATE_HOSTS", "1")  # the test server is on 127.0.0.1
    photos = served.model.photos[:2]
    for i, photo in enumerate(photos):
        httpserver.expect_request(f"/{i}.jpg").respond_with_data(photo.read_bytes(), content_type="image/jpeg")
    urls = [httpserver.url_for(f"/{i}.jpg") for i in range(len(photos))]
    response = client.post(f"/v1/models/{PUBLIC}/predict", json={"urls": urls})
    assert response.status_code == 200, response.text
    # the downloader stores what normalize_image makes of a photo; that is what gets classified
    classifier = load_classifier(served.home / "models" / f"{PUBLIC}.safetensors")
    expected = classifier.predict_bytes([normalize_image(p.read_bytes()) for p in photos], urls)
    assert_same_predictions(response.json()["predictions"], [p.to_dict() for p in expected])


def test_private_and_bad_urls_are_422(client, served):
    url = f"/v1/models/{PUBLIC}/predict"
    body = assert_error(client.post(url, json={"urls": ["http://127.0.0.1:9/ant.jpg"]}), 422, "127.0.0.1")
    assert body["failed"][0]["url"] == "http://127.0.0.1:9/ant.jpg"
    assert "private address" in body["failed"][0]["reason"]
    assert_error(client.post(url, json={"urls": ["http://10.0.0.1/a.jpg"]}), 422, "private address")
    assert_error(client.post(url, json={"urls": ["ftp://example.com/a.jpg"]}), 422, "scheme")
    assert_error(client.post(url, json={"urls": ["not a url"]}), 422)
    assert_error(client.post(url, json={"urls": []}), 422, "urls")
    assert_error(client.post(url, json={"urls": "http://example.com/a.jpg"}), 422, "urls")
    assert_error(client.post(url, json={"url": ["http://example.com/a.jpg"]}), 422, "urls")
    assert_error(client.post(url, json={"urls": [1, 2]}), 422, "urls")
    json_type = {"Content-Type": "application/json"}
    assert_error(client.post(url, content=b"{not json", headers=json_type), 422, "JSON")
    assert_error(client.post(url, content=b"[" * 100_000, headers=json_type), 422, "JSON")


def test_a_model_that_cannot_load_here_is_503(client, served):
    from nanostream.engine.bundle import read_bundle, save_bundle

    meta, tensors = read_bundle(served.model.path)
    broken = save_bundle(served.home / "models" / "m-00000000c3.safetensors",
                         {**meta, "model_id": "m-00000000c3", "backbone_weights": "0" * 16}, tensors)
    try:
        response = client.post("/v1/models/m-00000000c3/predict", files=uploads(served.model.photos[:1]),
                               headers=auth(served.key))
        assert_error(response, 503, "other efficientnet_lite0 weights")
    finally:
        broken.unlink()


# ---------------------------------------------------------------- refusals of bad input

def test_not_an_image_is_415(client, served):
    url = f"/v1/models/{PUBLIC}/predict"
    good = uploads(served.model.photos[:1])
    body = [("file", ("notes.txt", b"hello, not a picture", "text/plain"))]
    assert_error(client.post(url, files=good + body), 415, "notes.txt: not an image (text)")
    assert_error(client.post(url, files=[("file", ("empty.jpg", b"", "image/jpeg"))]), 415, "empty")
    truncated = served.model.photos[0].read_bytes()[:2000]
    assert_error(client.post(url, files=[("file", ("cut.jpg", truncated, "image/jpeg"))]), 415, "cut.jpg")
    assert_error(client.post(url, content=b"raw bytes", headers={"Content-Type": "image/jpeg"}), 415, "multipart")
    bomb = png_header(10_000, 8_000)  # 80 MP by its header: refused before any decoding
    assert_error(client.post(url, files=[("file", ("bomb.png", bomb, "image/png"))]), 415, "too many pixels")
    assert_error(client.post(url), 415)


def test_missing_images_are_422(client):
    url = f"/v1/models/{PUBLIC}/predict"
    assert_error(client.post(url, files=[("other", ("a.png", png(), "image/png"))]), 422, "'file'")
    assert_error(client.post(url, data={"file": "text, not a file"}, files=[("x", ("a", b"a"))]), 422, "files")


def test_a_malformed_multipart_body_is_422_like_malformed_json(client):
    url = f"/v1/models/{PUBLIC}/predict"
    no_boundary = client.post(url, content=b"--x\r\n\r\n", headers={"Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 422
    assert no_boundary.json() == {"error": "malformed multipart body (Missing boundary in multipart): send one or "
                                           "more files in the multipart field 'file'"}
    nameless = b'--x\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\nabc\r\n--x--\r\n'
    response = client.post(url, content=nameless, headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 422
    assert response.json() == {"error": 'malformed multipart body (The Content-Disposition header field "name" '
                                        "must be provided): send one or more files in the multipart field 'file'"}


def test_limits_are_413(tight):
    url = f"/v1/models/{PUBLIC}/predict"
    small = ("file", ("a.png", png(), "image/png"))
    assert tight.post(url, files=[small] * 3).status_code == 200
    assert_error(tight.post(url, files=[small] * 4), 413, "too many images")
    assert_error(tight.post(url, json={"urls": ["http://example.com/a.jpg"] * 4}), 413, "too many images")
    big = ("file", ("big.png", png() + b"\0" * 100_000, "image/png"))  # over the per-file limit
    assert_error(tight.post(url, files=[small, big]), 413, "big.png")
    assert_error(tight.post(url, files=[big] * 5), 413, "larger")  # the whole body over the request limit
    huge = b"\0" * 500_000
    assert_error(tight.post(url, content=huge, headers={"Content-Type": "application/json"}), 413, "larger")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(50):
            yield b"x" * 10_000

    assert_error(tight.post(url, content=chunks(), headers={"Content-Type": "application/json"}), 413, "larger")


# ---------------------------------------------------------------- batching

def test_concurrent_requests_share_forward_passes(served):
    """Eight clients at once: one forward pass serves several, and each gets its own answers."""
    photos = list(served.model.photos) + list(served.model.photos[:2])
    config = ServeConfig(batch=BatchConfig(max_batch=len(photos), max_wait_ms=500))
    path = served.home / "models" / f"{PUBLIC}.safetensors"
    expected = [p.to_dict() for p in load_classifier(path).predict_files(photos)]
    with TestClient(create_app(config)) as c:
        def ask(photo):
            return c.post(f"/v1/models/{PUBLIC}/predict", files=uploads([photo]))

        with ThreadPoolExecutor(len(photos)) as pool:
            responses = list(pool.map(ask, photos))
        stats = c.app.state.service.batchers()[load_classifier(served.model.path).backbone_key].stats
    assert all(r.status_code == 200 for r in responses)
    got = [r.json()["predictions"][0] for r in responses]
    assert_same_predictions(got, expected, tol=1e-4)  # batch composition may change the last bits
    assert stats.requests == len(photos) and stats.largest > 1 and stats.batches < len(photos)


def test_batching_off_gives_the_same_predictions(served, client):
    photos = served.model.photos[:3]
    batched = client.post(f"/v1/models/{PUBLIC}/predict", files=uploads(photos)).json()["predictions"]
    with TestClient(create_app(ServeConfig(batching=False))) as c:
        alone = c.post(f"/v1/models/{PUBLIC}/predict", files=uploads(photos)).json()["predictions"]
        assert c.app.state.service.batchers() == {}
    assert_same_predictions(alone, batched)


def blocking_forward(calls: list, started: threading.Event, release: threading.Event, scale: float = 2):
    """A forward pass that records its batch sizes and holds its first pass until `release`."""
    def forward(x):
        calls.append(len(x))
        if len(calls) == 1:
            started.set()
            assert release.wait(10)
        return x * scale
    return forward


def test_batcher_merges_what_waits_behind_a_forward_pass():
    calls, started, release = [], threading.Event(), threading.Event()
    batcher = MicroBatcher(blocking_forward(calls, started, release), BatchConfig(max_batch=8, max_wait_ms=1))
    first = batcher.submit(torch.ones(1, 2))
    assert started.wait(10)
    sizes = (4, 3, 1, 4)
    later = [batcher.submit(torch.full((k, 2), float(k))) for k in sizes]
    release.set()
    assert torch.equal(first.result(10), torch.full((1, 2), 2.0))
    for k, future in zip(sizes, later):
        assert torch.equal(future.result(10), torch.full((k, 2), 2.0 * k))  # each gets its own rows
    assert calls == [1, 8, 4]  # 4+3+1 fill a batch of 8; the last 4 go next
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(torch.ones(1, 2))


def test_batcher_errors_reach_every_request_and_cancelled_ones_are_skipped():
    calls, started, release = [], threading.Event(), threading.Event()
    forward = blocking_forward(calls, started, release)

    def failing(x):
        forward(x)
        if len(calls) > 1:
            raise RuntimeError("out of memory")
        return x

    batcher = MicroBatcher(failing, BatchConfig(max_batch=16, max_wait_ms=1))
    batcher.submit(torch.ones(1, 2))
    assert started.wait(10)
    gone = batcher.submit(torch.ones(5, 2))
    a, b = batcher.submit(torch.ones(1, 2)), batcher.submit(torch.ones(2, 2))
    assert gone.cancel()  # the client went away before its turn
    release.set()
    for future in (a, b):
        with pytest.raises(RuntimeError, match="out of memory"):
            future.result(10)
    batcher.close()
    assert calls == [1, 3]



def test_traced_classifier_gives_the_same_numbers(served):
    """What the server runs on the CPU: the backbone traced to TorchScript, the same numbers up to
    float rounding (other oneDNN kernels on some CPUs: ~5e-7 seen on an AVX2 EPYC)."""
    classifier = load_classifier(served.model.path)
    traced = classifier.traced()
    assert traced is not classifier and traced.backbone is not classifier.backbone
    x = torch.stack([classifier.prepare(p.read_bytes()) for p in served.model.photos])
    for size in (1, 3, len(x), 2, 1):  # after the first calls TorchScript optimizes its plan: still equal
        torch.testing.assert_close(traced.probabilities(x[:size]), classifier.probabilities(x[:size]),
                                   rtol=1e-5, atol=1e-6)
    assert traced.labels == classifier.labels and traced.model_id == classifier.model_id


def test_a_trace_that_differs_is_not_served_and_the_log_says_why(served, monkeypatch, caplog, tmp_path):
    # A network of its own (one fine-tuned stage): traced afresh, where a frozen backbone's trace
    # may already be in the process-wide cache from an earlier test.
    from nanostream.engine.backbones import load_backbone
    from nanostream.engine.bundle import read_bundle, save_bundle

    meta, tensors = read_bundle(served.model.path)
    stage = "body.blocks.6.0.conv_pw.weight"
    tensors[f"backbone.{stage}"] = load_backbone(meta["backbone"]).state_dict()[stage]
    classifier = load_classifier(save_bundle(tmp_path / "fine-tuned.safetensors", meta, tensors))
    assert classifier.backbone_key is None
    real_trace = torch.jit.trace

    def off_by_a_little(module, example, **kwargs):
        traced = real_trace(module, example, **kwargs)
        return lambda x: traced(x).float() * 1.01  # a 1% drift: more than rounding, in bf16 too (~0.4%)
    monkeypatch.setattr(torch.jit, "trace", off_by_a_little)
    with caplog.at_level("WARNING", logger="nanostream.engine.predict"):
        assert classifier.traced() is classifier
    assert f"model {classifier.model_id} served untraced: the trace differs from the network by" in caplog.text


def test_concurrent_requests_with_two_workers(served):
    """The CPU default: two workers on one queue; every request gets its own rows back."""
    photos = served.model.photos
    expected = [p.to_dict() for p in load_classifier(served.model.path).predict_files(photos)]
    config = ServeConfig(batch=BatchConfig(max_batch=4, workers=2, spill=2, threads=1), anonymous_burst=UNLIMITED)
    with TestClient(create_app(config)) as c:
        def ask(photo):
            return c.post(f"/v1/models/{PUBLIC}/predict", files=uploads([photo]))

        with ThreadPoolExecutor(len(photos)) as pool:
            responses = list(pool.map(ask, photos * 3))
        stats = c.app.state.service.batchers()[load_classifier(served.model.path).backbone_key].stats
    assert all(r.status_code == 200 for r in responses)
    got = [r.json()["predictions"][0] for r in responses]
    assert_same_predictions(got, expected * 3, tol=1e-4)
    assert stats.requests == 3 * len(photos) and stats.largest <= 4


def test_a_second_worker_waits_for_spill_images_while_one_runs():
    calls, started, release = [], threading.Event(), threading.Event()
    batcher = MicroBatcher(blocking_forward(calls, started, release),
                           BatchConfig(max_batch=8, workers=2, spill=3))
    first = batcher.submit(torch.ones(1, 2))
    assert started.wait(10)  # one worker is busy with the first request
    waiting = [batcher.submit(torch.ones(1, 2)) for _ in range(2)]
    time.sleep(0.2)  # the idle worker had time to start a pass, and must not have: 2 < spill
    assert calls == [1] and not any(f.done() for f in waiting)
    waiting.append(batcher.submit(torch.ones(1, 2)))  # the third: the idle worker takes all three
    assert all(torch.equal(f.result(10), torch.full((1, 2), 2.0)) for f in waiting)
    assert calls == [1, 3] and not first.done()
    release.set()
    assert torch.equal(first.result(10), torch.full((1, 2), 2.0))
    batcher.close()
    assert batcher.stats.batches == 2 and batcher.stats.requests == 4


def test_a_lone_request_goes_at_once_and_close_drains_the_queue():
    batcher = MicroBatcher(lambda x: x + 1, BatchConfig(max_batch=4, workers=2, spill=2))
    assert torch.equal(batcher.submit(torch.zeros(2, 2)).result(10), torch.ones(2, 2))
    futures = [batcher.submit(torch.full((k, 2), float(k))) for k in (3, 1, 2, 5)]  # 5 > max_batch: alone
    batcher.close()
    for k, future in zip((3, 1, 2, 5), futures):
        assert torch.equal(future.result(0), torch.full((k, 2), k + 1.0))
    assert batcher.stats.largest == 5 and batcher.stats.images == 13
    with pytest.raises(BatcherClosed):
        batcher.submit(torch.ones(1, 2))


# ---------------------------------------------------------------- hostile callers: rate, pixels, decode turns

def test_callers_without_a_key_are_rate_limited(served):
    config = ServeConfig(anonymous_burst=2, anonymous_per_minute=1)
    url = f"/v1/models/{PUBLIC}/predict"
    photo = uploads(served.model.photos[:1])
    with TestClient(create_app(config)) as c:
        for _ in range(2):  # refused after the limiter (no images): quick, and each spends a token
            assert_error(c.post(url, files=[("other", ("a.png", png(), "image/png"))]), 422, "no images")
        limited = c.post(url, files=photo)
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "60"
        assert limited.json() == {"error": "too many requests without an API key from your address: at most 2 at "
                                           "once and 1 a minute; try again in 60 s"}
        assert c.post(url, files=photo, headers=auth(served.key)).status_code == 200  # a key is not limited
        # refusals before the limiter answer as ever: no such model, no key for a private one
        assert_error(c.post("/v1/models/m-00000000ff/predict", files=photo), 404)
        assert_error(c.post(f"/v1/models/{PRIVATE}/predict", files=photo), 401, "not published")


def test_the_rate_limiter_refills_each_clients_bucket_and_forgets_the_longest_idle():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, max_clients=2, clock=lambda: now[0])
    assert [limiter.wait("a"), limiter.wait("a"), limiter.wait("a")] == [0.0, 0.0, 1.0]
    assert limiter.wait("b") == 0.0  # a bucket of its own
    now[0] = 0.5
    assert limiter.wait("a") == pytest.approx(0.5)  # a refused request spends nothing
    now[0] = 1.0
    assert limiter.wait("a") == 0.0 and limiter.wait("a") == pytest.approx(1.0)
    assert limiter.wait("c") == 0.0  # a third client: "b", seen longest ago, is forgotten...
    assert [limiter.wait("b"), limiter.wait("b")] == [0.0, 0.0]  # ...which gives it a full bucket back


def test_a_client_is_its_key_else_its_address_and_an_ipv6_host_its_64():
    def from_host(host: str) -> str:
        return client_id(Request({"type": "http", "client": (host, 5000), "headers": []}), None)

    assert from_host("203.0.113.7") == from_host("::ffff:203.0.113.7") == "address 203.0.113.7"
    assert from_host("2001:db8:1:2::1") == from_host("2001:db8:1:2:ffff::9") == "address 2001:db8:1:2::/64"
    assert from_host("2001:db8:1:3::1") == "address 2001:db8:1:3::/64"
    request = Request({"type": "http", "client": ("203.0.113.7", 5000), "headers": []})
    assert client_id(request, ApiKey("ci", "2026-01-01T00:00:00+00:00")) == "key ci"


def test_pixels_are_counted_as_decode_image_will_decode_them():
    photo = jpeg((4000, 3000))  # a 12 MP phone photo: JPEG decodes at 1/8 of its size for a 256 px input
    for data in (photo, jpeg(), png((640, 480)), solid_png(300, 200)):
        for draft in (256, None):
            width, height = decode_image(data, draft_size=draft).size
            assert decoded_pixels(data, draft) == width * height
    assert decoded_pixels(photo, 256) == 500 * 375 and decoded_pixels(photo, None) == 4000 * 3000
    assert decoded_pixels(png_header(10_000, 8_000), 256) == 80_000_000  # by its header: nothing is decoded
    assert decoded_pixels(b"hello, not a picture", 256) == 0  # decode_image refuses it and says why
    assert 32 * decoded_pixels(photo, 256) < ServeConfig().max_request_pixels  # a page of photos fits


def test_a_request_may_decode_so_many_pixels_in_all(served):
    url = f"/v1/models/{PUBLIC}/predict"
    two = [("file", (f"{i}.png", png((40, 30)), "image/png")) for i in range(2)]
    with TestClient(create_app(ServeConfig(max_request_pixels=2 * 40 * 30))) as c:
        assert len(c.post(url, files=two).json()["predictions"]) == 2
        three = c.post(url, files=two + two[:1])
    assert three.status_code == 413
    assert three.json() == {"error": "the images would decode to 3,600 pixels, more than the 2,400 allowed per "
                                     "request: send fewer or smaller images"}


def test_the_issues_pixel_flood_is_refused_at_once_while_another_client_is_served(client, served):
    """Issue 12 item 5: 32 PNGs of 7071 x 7071 in one request cost 17.6 s of CPU, and with two in
    flight another client's one-photo request took 16.8 s. Their headers give them away now."""
    url = f"/v1/models/{PUBLIC}/predict"
    flood = [("file", (f"{i}.png", solid_png(7071, 7071), "image/png")) for i in range(32)]
    photo = uploads(served.model.photos[:1])
    expected = load_classifier(served.model.path).predict_files(served.model.photos[:1])[0].to_dict()
    assert client.post(url, files=photo, headers=auth(served.key)).status_code == 200  # the model is loaded
    start = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        floods = [pool.submit(client.post, url, files=flood) for _ in range(2)]
        other = pool.submit(client.post, url, files=photo, headers=auth(served.key))
        responses = [f.result() for f in floods]
    elapsed = time.monotonic() - start
    for response in responses:
        assert response.status_code == 413
        assert response.json() == {"error": "the images would decode to 1,599,969,312 pixels, more than the "
                                            "100,000,000 allowed per request: send fewer or smaller images"}
    assert other.result().status_code == 200
    assert_same_predictions(other.result().json()["predictions"], [expected], tol=1e-4)
    assert elapsed < 5, f"{elapsed:.1f} s"  # nothing was decoded: transfer and headers only


def test_one_clients_requests_decode_in_turn_and_leave_room_for_another(served):
    url = f"/v1/models/{PUBLIC}/predict"
    big = [("file", ("big.png", solid_png(7071, 7071), "image/png"))]  # 50 MP: within the budget, ~0.5 s to decode
    photo = uploads(served.model.photos[:1])
    with TestClient(create_app(ServeConfig(decode_workers=2))) as c:
        assert c.post(url, files=photo, headers=auth(served.key)).status_code == 200  # the model is loaded
        with ThreadPoolExecutor(2) as pool:
            first = [pool.submit(c.post, url, files=big) for _ in range(2)]  # one client, no key
            deadline = time.monotonic() + 30
            while c.get("/healthz").json()["decodes"] != {"decoding": 1, "queued": 1}:  # the second waits its turn
                assert time.monotonic() < deadline and not any(f.done() for f in first), "no request queued"
                time.sleep(0.01)
            other = c.post(url, files=photo, headers=auth(served.key))  # another client: a decode thread is free
            still_busy = not all(f.done() for f in first)
            assert [f.result().status_code for f in first] == [200, 200]
        assert c.get("/healthz").json()["decodes"] == {"decoding": 0, "queued": 0}
    assert other.status_code == 200 and still_busy  # served while the first client's second request waited


# ---------------------------------------------------------------- the real server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_uvicorn(served):
    port = _free_port()
    env = {**os.environ, "NANOSTREAM_HOME": str(served.home)}
    server = subprocess.Popen([sys.executable, "-m", "nanostream", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:  # poll with a bound: the server is up when it answers
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "server did not start in 60 s"
            time.sleep(0.1)
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert [m["model_id"] for m in listed["models"]] == [PUBLIC]
        # the port is taken now: a second server says so in one line
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli.main(["serve", "--port", str(port)]) == 2
        assert "cannot listen" in err.getvalue()
    finally:
        server.terminate()
        server.wait(30)
