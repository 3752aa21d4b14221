"""Safe fetching: every URL is hostile. Served from 127.0.0.1 only, never the internet."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from werkzeug import Response

from nanostream import download, images
from nanostream.download import DownloadError, DownloadLimits, check_url, fetch_image, fetch_images
from nanostream.paths import datasets_dir

FAST = DownloadLimits(connect_timeout=1.0, read_timeout=0.5, deadline=3.0)


# ---------------------------------------------------------------- payloads

@pytest.fixture(scope="session")
def ant_jpeg() -> bytes:
    """A real photo; a missing datasets folder fails the test instead of skipping it."""
    ants = sorted((datasets_dir() / "hymenoptera" / "train" / "ants").glob("*.jpg"))
    assert ants, f"no ant photos under {datasets_dir()}"
    return ants[0].read_bytes()


@pytest.fixture(scope="session")
def small_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory) -> bytes:
    """A valid 12000x9000 (108 MP) 1-bit PNG: a few KB on the wire, a bomb once decoded."""
    width, height = 12000, 9000
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    data = (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    path: Path = tmp_path_factory.mktemp("bomb") / "huge.png"
    path.write_bytes(data)
    return path.read_bytes()


@pytest.fixture
def allow_loopback(monkeypatch):
    monkeypatch.setenv(download.ALLOW_PRIVATE_ENV, "1")


@pytest.fixture
def only_httpserver_allowed(monkeypatch, httpserver):
    """Private addresses refused as in production, except the test server's own port."""
    monkeypatch.delenv(download.ALLOW_PRIVATE_ENV, raising=False)
    strict = download.address_refusal

    def allow_test_server(address: str, port: int) -> str | None:
        if address in ("127.0.0.1", "::1") and port == httpserver.port:
            return None
        return strict(address, port)

    monkeypatch.setattr(download, "address_refusal", allow_test_server)


@contextmanager
def raw_server(handle):
    """A TCP server on 127.0.0.1 whose connections are handled by handle(conn, stop_event)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    conns = []

    def serve():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conns.append(conn)
            threading.Thread(target=handle, args=(conn, stop), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/image.jpg"
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in conns:
            conn.close()
        listener.close()


def never_answer(conn, stop):
    stop.wait(10)


def drip_jpeg(conn, stop):
    """Valid headers and JPEG magic at once, then one byte every 50 ms: only a deadline ends it."""
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0" + b"\0" * 16)
    while not stop.wait(0.05):
        try:
            conn.sendall(b"\0")
        except OSError:
            return


# ---------------------------------------------------------------- good images

def test_fetches_real_jpeg_and_normalizes_it(httpserver, allow_loopback, ant_jpeg):
    httpserver.expect_request("/ant.jpg").respond_with_data(ant_jpeg, content_type="image/jpeg")
    url = httpserver.url_for("/ant.jpg")
    got = fetch_image(url)
    assert got.url == got.final_url == url
    assert got.data == images.normalize_image(ant_jpeg)  # the stored form, metadata stripped
    assert got.content_hash == images.content_hash(got.data)
    assert (got.width, got.height) == Image.open(io.BytesIO(got.data)).size
    assert got.content_type == "image/jpeg"


def test_png_served_as_octet_stream_after_redirect(httpserver, allow_loopback, small_png):
    httpserver.expect_request("/go").respond_with_data("", status=302, headers={"Location": "/pic"})
    httpserver.expect_request("/pic").respond_with_data(small_png, content_type="application/octet-stream")
    got = fetch_image(httpserver.url_for("/go"))
    assert got.final_url == httpserver.url_for("/pic")
    assert (got.width, got.height, got.content_type) == (64, 48, "image/png")
    assert Image.open(io.BytesIO(got.data)).format == "JPEG"


def test_chunked_body_is_read_whole(allow_loopback, small_png):
    def chunked_png(conn, stop):
        conn.recv(65536)
        chunks = [small_png[i:i + 50] for i in range(0, len(small_png), 50)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n" + body)

    with raw_server(chunked_png) as url:
        got = fetch_image(url, FAST)
    assert (got.width, got.height) == (64, 48)


# ---------------------------------------------------------------- bad payloads

def reason_for(url: str, limits: DownloadLimits = FAST) -> str:
    with pytest.raises(DownloadError) as caught:
        fetch_image(url, limits)
    return caught.value.reason


def test_truncated_jpeg_refused(httpserver, allow_loopback, ant_jpeg):
    httpserver.expect_request("/cut.jpg").respond_with_data(ant_jpeg[: len(ant_jpeg) // 2], content_type="image/jpeg")
    assert reason_for(httpserver.url_for("/cut.jpg")).startswith("not a readable image")


def test_html_served_as_jpeg_refused(httpserver, allow_loopback):
    page = b"<!DOCTYPE html><html><body>Buy now!</body></html>"
    httpserver.expect_request("/fake.jpg").respond_with_data(page, content_type="image/jpeg")
    assert reason_for(httpserver.url_for("/fake.jpg")) == (
        "not an image: image/jpeg body is not JPEG, PNG, GIF, WEBP, BMP or TIFF")


def test_html_content_type_refused(httpserver, allow_loopback):
    httpserver.expect_request("/page").respond_with_data("<html></html>", content_type="text/html; charset=utf-8")
    assert reason_for(httpserver.url_for("/page")) == "not an image: text/html"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns; we refuse
def test_decompression_bomb_refused(httpserver, allow_loopback, huge_png):
    assert len(huge_png) < 100_000 and Image.open(io.BytesIO(huge_png)).size == (12000, 9000)
    httpserver.expect_request("/bomb.png").respond_with_data(huge_png, content_type="image/png")
    started = time.monotonic()
    assert reason_for(httpserver.url_for("/bomb.png")).startswith("too many pixels (12000x9000")
    assert time.monotonic() - started < 5  # refused from the header, never decoded


def test_tighter_pixel_limit(httpserver, allow_loopback, small_png):
    httpserver.expect_request("/pic.png").respond_with_data(small_png, content_type="image/png")
    reason = reason_for(httpserver.url_for("/pic.png"), DownloadLimits(max_pixels=1000))
    assert reason.startswith("too many pixels (64x48")


def test_body_over_limit_with_content_length(httpserver, allow_loopback):
    body = b"\xff\xd8\xff\xe0" + b"\0" * 50_000
    httpserver.expect_request("/big").respond_with_data(body, content_type="image/jpeg")
    assert reason_for(httpserver.url_for("/big"), DownloadLimits(max_bytes=10_000)) == "too large (> 10,000 bytes)"


def test_body_over_limit_without_content_length(httpserver, allow_loopback):
    served = []

    def endless():  # no Content-Length: only counting while reading can stop it
        yield b"\xff\xd8\xff\xe0"
        for _ in range(10_000):  # 640 MB: far more than socket buffers can soak up
            served.append(1)
            yield b"\0" * 65536

    httpserver.expect_request("/stream").respond_with_handler(
        lambda request: Response(endless(), content_type="image/jpeg"))
    assert reason_for(httpserver.url_for("/stream"), DownloadLimits(max_bytes=10_000)) == "too large (> 10,000 bytes)"
    assert len(served) < 10_000  # we hung up long before the end


def test_http_error_status(httpserver, allow_loopback):
    httpserver.expect_request("/missing.jpg").respond_with_data("gone", status=404)
    assert reason_for(httpserver.url_for("/missing.jpg")) == "HTTP 404"


def test_too_many_redirects(httpserver, allow_loopback):
    httpserver.expect_request("/loop").respond_with_data("", status=301, headers={"Location": "/loop"})
    assert reason_for(httpserver.url_for("/loop"), DownloadLimits(max_redirects=3)) == "too many redirects (> 3)"


# ---------------------------------------------------------------- slow servers

def test_server_that_never_answers_times_out(allow_loopback):
    with raw_server(never_answer) as url:
        started = time.monotonic()
        assert reason_for(url) == "timed out"
        assert time.monotonic() - started < 2.5


def test_dripping_server_hits_the_deadline(allow_loopback):
    limits = DownloadLimits(connect_timeout=1.0, read_timeout=0.5, deadline=1.0)
    with raw_server(drip_jpeg) as url:
        started = time.monotonic()
        assert reason_for(url, limits) == "timed out"
        assert time.monotonic() - started < 2.5  # read timeout alone would never fire


# ---------------------------------------------------------------- addresses and schemes

@pytest.mark.parametrize("url, kind", [
    ("http://127.0.0.1/", "loopback"),
    ("http://10.0.0.1/", "private"),
    ("http://192.168.1.1:8080/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[::1]/", "loopback"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),  # IPv4-mapped IPv6
    ("http://100.100.100.200/", "not globally routable"),  # carrier-grade NAT; Alibaba metadata
    ("http://224.0.0.1/", "multicast"),
    ("http://localhost/", "loopback"),
])
def test_check_url_refuses_private_addresses(monkeypatch, url, kind):
    monkeypatch.delenv(download.ALLOW_PRIVATE_ENV, raising=False)
    with pytest.raises(DownloadError) as caught:
        check_url(url)
    assert caught.value.reason.startswith("refused: private address")
    assert caught.value.reason.endswith(f"({kind})")


def test_check_url_accepts_public_address(monkeypatch):
    monkeypatch.delenv(download.ALLOW_PRIVATE_ENV, raising=False)
    check_url("https://93.184.216.34/photo.jpg")  # numeric: no DNS, no network


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "refused: scheme 'file' (only http and https)"),
    ("ftp://example.com/a.jpg", "refused: scheme 'ftp' (only http and https)"),
    ("data:image/png;base64,iVBORw0KGgo=", "refused: scheme 'data' (only http and https)"),
    ("/relative/path.jpg", "refused: scheme '(none)' (only http and https)"),
    ("http:///nohost.jpg", "refused: no host in URL"),
    ("http://example.com:99999/a.jpg", "refused: malformed URL"),
])
def test_bad_schemes_and_urls_refused(url, reason):
    assert reason_for(url).startswith(reason)


def test_env_switch_is_needed_for_loopback(httpserver, monkeypatch, small_png):
    monkeypatch.delenv(download.ALLOW_PRIVATE_ENV, raising=False)
    httpserver.expect_request("/pic.png").respond_with_data(small_png, content_type="image/png")
    assert reason_for(httpserver.url_for("/pic.png")) == "refused: private address 127.0.0.1 (loopback)"


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:{other}/admin"])
def test_redirect_to_private_address_refused(httpserver, only_httpserver_allowed, small_png, target):
    with socket.create_server(("127.0.0.1", 0)) as other:  # a real loopback service, never reached
        location = target.format(other=other.getsockname()[1])
        httpserver.expect_request("/ok.png").respond_with_data(small_png, content_type="image/png")
        httpserver.expect_request("/hop").respond_with_data("", status=302, headers={"Location": location})
        assert fetch_image(httpserver.url_for("/ok.png")).width == 64  # the first hop is allowed
        reason = reason_for(httpserver.url_for("/hop"))
    assert reason.startswith("refused: private address")
    assert ("169.254.169.254" in reason) if "169.254" in target else ("127.0.0.1 (loopback)" in reason)


def test_connection_peer_is_checked_even_if_dns_check_was_fooled(httpserver, monkeypatch, small_png):
    """DNS rebinding: the name looked public when checked, then resolved to loopback."""
    monkeypatch.delenv(download.ALLOW_PRIVATE_ENV, raising=False)
    monkeypatch.setattr(download, "check_url", lambda url: None)
    httpserver.expect_request("/pic.png").respond_with_data(small_png, content_type="image/png")
    assert reason_for(httpserver.url_for("/pic.png")) == "refused: private address 127.0.0.1 (loopback)"
    assert not httpserver.log  # refused before a request was sent


def test_https_connections_are_peer_checked_too(monkeypatch):
    monkeypatch.delenv(download.ALLOW_PRIVATE_ENV, raising=False)
    monkeypatch.setattr(download, "check_url", lambda url: None)
    with raw_server(never_answer) as url:  # refused before the TLS handshake could even start
        assert reason_for(url.replace("http://", "https://")) == "refused: private address 127.0.0.1 (loopback)"


# ---------------------------------------------------------------- many URLs

def test_fetch_images_reports_everything_in_order(httpserver, allow_loopback, ant_jpeg, small_png):
    httpserver.expect_request("/a.jpg").respond_with_data(ant_jpeg, content_type="image/jpeg")
    httpserver.expect_request("/b.png").respond_with_data(small_png, content_type="image/png")
    httpserver.expect_request("/404").respond_with_data("", status=404)
    urls = [httpserver.url_for("/a.jpg"), "file:///etc/passwd", httpserver.url_for("/404"),
            "not a url", httpserver.url_for("/b.png"), "http://[::1"]
    progress = []
    report = fetch_images(urls, FAST, on_progress=lambda done, total: progress.append((done, total)))
    assert [f.url for f in report.fetched] == [urls[0], urls[4]]
    assert [(f.url, f.reason) for f in report.failed] == [
        (urls[1], "refused: scheme 'file' (only http and https)"),
        (urls[2], "HTTP 404"),
        (urls[3], "refused: scheme '(none)' (only http and https)"),
        (urls[5], "refused: malformed URL (Invalid IPv6 URL)"),
    ]
    assert progress == [(i, len(urls)) for i in range(1, len(urls) + 1)]


def test_fetch_images_stops_when_asked():
    report = fetch_images(["http://a.example/1.jpg", "http://b.example/2.jpg"], should_stop=lambda: True)
    assert report.fetched == ()
    assert [f.reason for f in report.failed] == ["cancelled", "cancelled"]


def test_fetch_images_limits_concurrency_per_host(monkeypatch):
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    lock = threading.Lock()

    def fake_fetch(url, limits):
        host = url.split("/")[2]
        with lock:
            active[host] = active.get(host, 0) + 1
            peak[host] = max(peak.get(host, 0), active[host])
        time.sleep(0.05)  # stand-in for network time, so requests overlap
        with lock:
            active[host] -= 1
        raise DownloadError("HTTP 503")

    monkeypatch.setattr(download, "fetch_image", fake_fetch)
    urls = [f"http://{host}.example/{i}.jpg" for i in range(6) for host in ("a", "b")]
    report = fetch_images(urls, DownloadLimits(workers=8, per_host=2))
    assert len(report.failed) == len(urls)
    assert peak == {"a.example": 2, "b.example": 2}
