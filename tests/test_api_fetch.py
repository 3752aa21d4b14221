"""URL fetches through the API under hostile servers and inputs: deadlines, their own threads,
caps per request and per client, one sentence for private targets, short echoes of input.

Every server is a raw socket on 127.0.0.1 (test_download's raw_server), never the internet.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from model_fixture import serving_home
from nanostream.sources import addresses
from nanostream.api.app import create_app
from nanostream.api.service import ServeConfig
from nanostream.sources.addresses import MAX_URL_CHARS, PRIVATE_REFUSAL
from test_download import assert_never_connected, closed_port, drip_headers, quiet_port, raw_server

PUBLIC = "m-00000000f1"  # published: anyone may ask it, no key needed
PREDICT = f"/v1/models/{PUBLIC}/predict"
BACKSLASH = "refused: URL contains a backslash, space or control character"


@pytest.fixture(scope="module")
def model(datasets, tmp_path_factory):
    """A NANOSTREAM_HOME of its own with one published copy of the tiny model."""
    with serving_home(tmp_path_factory.mktemp("api-fetch-home"), public=(PUBLIC,)) as tiny:
        yield tiny


@contextlib.contextmanager
def serve(**config):
    # Anonymous rate limits have tests of their own; these send more requests than a visitor would.
    app = create_app(ServeConfig(anonymous_burst=1_000, **config))
    with TestClient(app) as client:
        yield client


@pytest.fixture
def allow_loopback(monkeypatch):
    monkeypatch.setenv(addresses.ALLOW_PRIVATE_ENV, "1")


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.delenv(addresses.ALLOW_PRIVATE_ENV, raising=False)


class Tally:
    """A raw_server handler around another: how many connections are open now, at most, and in all.

    A handler may return its last answer instead of sending it: the connection then counts as closed
    before the answer goes out. The client starts its next fetch the moment an answer arrives,
    which on a busy machine came before this thread counted the answered one closed (peak 3 of 2)."""

    def __init__(self, handle):
        self.handle = handle
        self.open = self.peak = self.total = 0
        self._lock = threading.Lock()

    def __call__(self, conn, stop):
        with self._lock:
            self.open += 1
            self.total += 1
            self.peak = max(self.peak, self.open)
        answer = None
        try:
            answer = self.handle(conn, stop)
        finally:
            with self._lock:
                self.open -= 1
        if answer:
            conn.sendall(answer)


def hold_then_404(conn, stop) -> bytes:
    conn.recv(65536)
    stop.wait(0.2)  # stand-in for network time, so that fetches overlap
    return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def wait_until(condition, within: float, what: str) -> None:
    """Poll with a bound."""
    give_up = time.monotonic() + within
    while not condition():
        assert time.monotonic() < give_up, f"not within {within} s: {what}"
        time.sleep(0.01)


def timed_out(url: str, n: int = 1) -> dict:
    """The body of a 422 for n URLs, all of them `url`, that ran into the deadline."""
    return {"error": f"could not fetch {n} of {n} URLs (first: {url}: timed out)",
            "failed": [{"url": url, "reason": "timed out"}] * n}


# ---------------------------------------------------------------- deadlines and threads

def test_a_header_drip_ends_at_the_deadline(model, allow_loopback):
    with serve(fetch_deadline=1.0) as client, raw_server(drip_headers) as url:
        started = time.monotonic()
        response = client.post(PREDICT, json={"urls": [url]})
        took = time.monotonic() - started
    assert response.status_code == 422
    assert response.json() == timed_out(url)
    assert took < 1.8  # the deadline, and the time to answer; a byte every 50 ms never trips the read timeout


def test_healthz_and_uploads_answer_while_40_fetches_drip(model, allow_loopback):
    photo = model.photos[0]
    upload = [("file", (photo.name, photo.read_bytes(), "image/jpeg"))]
    tally = Tally(drip_headers)
    with serve(fetch_workers=40, fetch_per_client=40, fetch_deadline=6.0) as client, raw_server(tally) as url:
        assert client.post(PREDICT, files=upload).status_code == 200  # the model loaded before the flood
        with ThreadPoolExecutor(40) as pool:
            posts = [pool.submit(client.post, PREDICT, json={"urls": [url]}) for _ in range(40)]
            wait_until(lambda: tally.open == 40, within=4, what="40 fetches dripping at once")
            started = time.monotonic()
            health = client.get("/healthz")
            took = time.monotonic() - started
            predicted = client.post(PREDICT, files=upload)
            still_dripping = tally.open
            responses = [post.result() for post in posts]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert took < 1.0
    assert predicted.status_code == 200 and len(predicted.json()["predictions"]) == 1
    assert still_dripping == 40  # the upload was answered while every fetch still held its connection
    assert {r.status_code for r in responses} == {422}
    assert all(r.json() == timed_out(url) for r in responses)


# ---------------------------------------------------------------- caps

def test_one_request_fetches_at_most_fetch_per_request_urls_at_once(model, allow_loopback):
    tally = Tally(hold_then_404)
    with serve(fetch_per_request=2) as client, raw_server(tally) as url:
        response = client.post(PREDICT, json={"urls": [url] * 6})
    assert response.status_code == 422
    assert response.json() == {"error": f"could not fetch 6 of 6 URLs (first: {url}: HTTP 404)",
                               "failed": [{"url": url, "reason": "HTTP 404"}] * 6}
    assert (tally.total, tally.peak) == (6, 2)


def test_a_client_past_its_fetch_cap_gets_429_and_others_do_not(model, allow_loopback):
    tally = Tally(drip_headers)
    refused_fast = f"http://127.0.0.1:{closed_port()}/a.jpg"  # connection refused: fails at once
    with serve(fetch_per_request=2, fetch_per_client=2, fetch_deadline=2.0) as client, raw_server(tally) as url:
        other = TestClient(client.app, client=("203.0.113.7", 50000))  # the same app, another address
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, PREDICT, json={"urls": [url, url]})
            wait_until(lambda: tally.open == 2, within=2, what="the first request's two fetches")
            refused = client.post(PREDICT, json={"urls": [refused_fast]})
            elsewhere = other.post(PREDICT, json={"urls": [refused_fast]})
            first = first.result()
        again = client.post(PREDICT, json={"urls": [refused_fast]})  # its fetches over: room again
        held = dict(client.app.state.service.fetching)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "2"  # the deadline: a fetch has ended
    assert refused.json() == {"error": "too many URL fetches in flight from your address (at most 2): "
                                       "wait for your other requests to finish"}
    failed = {"error": f"could not fetch 1 of 1 URLs (first: {refused_fast}: connection failed)",
              "failed": [{"url": refused_fast, "reason": "connection failed"}]}
    assert (elsewhere.status_code, elsewhere.json()) == (422, failed)
    assert (again.status_code, again.json()) == (422, failed)
    assert first.json() == timed_out(url, 2)
    assert tally.total == 2 and held == {}


# ---------------------------------------------------------------- private targets

def test_open_and_closed_private_ports_answer_alike(model, strict):
    with serve() as client, quiet_port() as listener:
        open_port = listener.getsockname()[1]
        for form, reason in (("http://127.0.0.1:{}/a.jpg", PRIVATE_REFUSAL),
                             ("http://localhost:{}/a.jpg", PRIVATE_REFUSAL),
                             ("http://127.0.0.1:{}\\@93.184.216.34/a.jpg", BACKSLASH)):
            for port in (open_port, closed_port()):
                url = form.format(port)
                response = client.post(PREDICT, json={"urls": [url]})
                assert response.status_code == 422
                assert response.json() == {"error": f"could not fetch 1 of 1 URLs (first: {url}: {reason})",
                                           "failed": [{"url": url, "reason": reason}]}
        assert_never_connected(listener)


# ---------------------------------------------------------------- what answers repeat

def test_a_url_over_the_length_limit_is_refused_up_front(model, strict):
    huge = "http://example.com/" + "a" * 1_000_000
    with serve() as client:
        response = client.post(PREDICT, json={"urls": ["http://example.com/a.jpg", huge]})
    assert response.status_code == 422
    assert response.json() == {"error": f"URL 2 is longer than {MAX_URL_CHARS:,} characters"}


def test_a_long_url_is_quoted_200_characters_once_per_sentence(model, strict):
    url = "http://10.0.0.1/" + "a" * (MAX_URL_CHARS - 16)
    assert len(url) == MAX_URL_CHARS  # as long as is allowed
    with serve() as client:
        response = client.post(PREDICT, json={"urls": [url] * 3})
    quoted = url[:200] + "..."
    assert response.status_code == 422
    assert response.json() == {"error": f"could not fetch 3 of 3 URLs (first: {quoted}: {PRIVATE_REFUSAL})",
                               "failed": [{"url": quoted, "reason": PRIVATE_REFUSAL}] * 3}
    assert len(response.content) < 1_500
