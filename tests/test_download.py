"""Safe fetching: every URL is hostile. Served from 127.0.0.1 only, never the internet."""

from __future__ import annotations

import io
import socket
import struct
import threading
import itertools
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from werkzeug import Response

from nanostream.sources import addresses, connections, download
from nanostream.engine import images
from nanostream.store.records import content_hash
from nanostream.sources.addresses import MAX_URL_CHARS, PRIVATE_REFUSAL, DownloadError, check_url
from nanostream.sources.download import DownloadLimits, fetch_image, fetch_images
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
    monkeypatch.setenv(addresses.ALLOW_PRIVATE_ENV, "1")


@pytest.fixture
def only_httpserver_allowed(monkeypatch, httpserver):
    """Private addresses refused as in production, except the test server's own port."""
    monkeypatch.delenv(addresses.ALLOW_PRIVATE_ENV, raising=False)
    strict = addresses.address_allowed

    def allow_test_server(address: str, port: int) -> bool:
        return (address in ("127.0.0.1", "::1") and port == httpserver.port) or strict(address, port)

    monkeypatch.setattr(connections, "address_allowed", allow_test_server)  # where connections look it up


@pytest.fixture
def strict(monkeypatch):
    """Private addresses refused as in production."""
    monkeypatch.delenv(addresses.ALLOW_PRIVATE_ENV, raising=False)


@contextmanager
def quiet_port():
    """A loopback port that listens but never serves; .accept() on it says whether anyone connected."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        yield listener


def assert_never_connected(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):  # nothing in the accept queue: not even a handshake arrived
        listener.accept()


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return listener.getsockname()[1]


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


def dripper(first: bytes, drip: bytes = b"\0", read_request: bool = True):
    """A handler that sends `first`, then `drip` one byte every 50 ms: only a deadline ends it."""
    def handle(conn, stop):
        if read_request:
            conn.recv(65536)
        conn.sendall(first)
        for byte in itertools.cycle(drip):
            if stop.wait(0.05):
                return
            try:
                conn.sendall(bytes([byte]))
            except OSError:  # the client hung up: what a deadline should make it do
                return
    return handle


# Valid headers and JPEG magic at once, then the body one byte at a time.
drip_jpeg = dripper(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0" + b"\0" * 16)
# The status line, then headers without end, one byte at a time: http.client reads these inside requests.
drip_headers = dripper(b"HTTP/1.1 200 OK\r\n", drip=b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaa\r\n")
# Not even the status line: "HTTP/1.1 200 OK" one byte at a time, and more after it.
drip_status = dripper(b"", drip=b"HTTP/1.1 200 OK" + b"K" * 1000)
# For an https URL: a TLS record header announcing 16 KB, then its bytes one at a time; the
# handshake inside urllib3 waits for all of them (ssl bounds a handshake by the socket timeout:
# the connect timeout, capped by what is left of the deadline).
drip_tls = dripper(b"\x16\x03\x03\x40\x00", read_request=False)


# ---------------------------------------------------------------- good images

def test_fetches_real_jpeg_and_normalizes_it(httpserver, allow_loopback, ant_jpeg):
    httpserver.expect_request("/ant.jpg").respond_with_data(ant_jpeg, content_type="image/jpeg")
    url = httpserver.url_for("/ant.jpg")
    got = fetch_image(url)
    assert got.url == got.final_url == url
    assert got.data == images.normalize_image(ant_jpeg)  # the stored form, metadata stripped
    assert got.content_hash == content_hash(got.data)
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


ONE_SECOND = DownloadLimits(connect_timeout=1.0, read_timeout=0.5, deadline=1.0)


@pytest.mark.parametrize("handler, scheme", [
    (drip_jpeg, "http"),      # the body
    (drip_headers, "http"),   # the headers, before requests hands back a response
    (drip_status, "http"),    # the status line
    (drip_tls, "https"),      # the TLS handshake
], ids=["body", "headers", "status-line", "tls-handshake"])
def test_a_dripping_server_is_cut_off_at_the_deadline(allow_loopback, handler, scheme):
    with raw_server(handler) as url:
        started = time.monotonic()
        assert reason_for(url.replace("http://", f"{scheme}://"), ONE_SECOND) == "timed out"
        took = time.monotonic() - started
    # A byte every 50 ms never trips the 0.5 s read timeout: only the 1 s deadline ends the fetch.
    assert 0.9 < took < 1.5


def test_the_deadline_spans_redirect_hops(allow_loopback, httpserver):
    """Each hop answers, but the second one drips its headers: the whole fetch ends at the deadline."""
    with raw_server(drip_headers) as slow:
        httpserver.expect_request("/hop").respond_with_data("", status=302, headers={"Location": slow})
        started = time.monotonic()
        assert reason_for(httpserver.url_for("/hop"), ONE_SECOND) == "timed out"
        assert time.monotonic() - started < 1.5


# ---------------------------------------------------------------- addresses and schemes

@pytest.mark.parametrize("url", [
    "http://127.0.0.1/",
    "http://10.0.0.1/",
    "http://192.168.1.1:8080/",
    "http://169.254.169.254/latest/meta-data/",  # link-local: cloud metadata
    "http://[::1]/",
    "http://0.0.0.0/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://[64:ff9b::7f00:1]/",   # NAT64 for 127.0.0.1
    "http://100.100.100.200/",     # carrier-grade NAT; Alibaba metadata
    "http://224.0.0.1/",           # multicast
    "http://240.0.0.1/",           # reserved
    "http://localhost/",
    "http://127.1/",               # 127.0.0.1 for the resolver
    "http://2130706433/",          # 127.0.0.1 as one number
])
def test_private_addresses_are_refused_in_one_sentence(strict, url):
    assert reason_for(url) == PRIVATE_REFUSAL == "refused: private address (only public addresses are fetched)"


def test_public_addresses_are_allowed(strict):
    check_url("https://93.184.216.34/photo.jpg")  # numeric: no DNS, no network
    assert addresses.address_allowed("93.184.216.34", 443)
    assert addresses.address_allowed("2606:2800:220:1:248:1893:25c8:1946", 443)


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "refused: scheme 'file' (only http and https)"),
    ("ftp://example.com/a.jpg", "refused: scheme 'ftp' (only http and https)"),
    ("data:image/png;base64,iVBORw0KGgo=", "refused: scheme 'data' (only http and https)"),
    ("/relative/path.jpg", "refused: scheme '(none)' (only http and https)"),
    ("//example.com/a.jpg", "refused: scheme '(none)' (only http and https)"),
    ("http:///nohost.jpg", "refused: no host in URL"),
    ("http://example.com:99999/a.jpg", "refused: malformed URL"),
    ("http://example.com:+80/a.jpg", "refused: malformed URL"),
    ("http://[::1/a.jpg", "refused: malformed URL"),
    ("http://[::1]x/a.jpg", "refused: malformed URL"),
])
def test_bad_schemes_and_urls_refused(url, reason):
    assert reason_for(url) == reason


@pytest.mark.parametrize("url, reason", [
    # urlsplit sees host 1.2.3.4 (user "127.0.0.1:22\"); urllib3 would connect to 127.0.0.1:22
    ("http://127.0.0.1:22\\@1.2.3.4/", "refused: URL contains a backslash, space or control character"),
    ("http:\\\\example.com\\a.jpg", "refused: URL contains a backslash, space or control character"),
    ("http://example.com/a b.jpg", "refused: URL contains a backslash, space or control character"),
    ("http://example.com/a.jpg\r\nHost: 127.0.0.1", "refused: URL contains a backslash, space or control character"),
    ("http://example.com\t/a.jpg", "refused: URL contains a backslash, space or control character"),
    ("http://example.com/\x00.jpg", "refused: URL contains a backslash, space or control character"),
    ("http://example.com/\u00a0.jpg", "refused: URL contains a backslash, space or control character"),
    ("http://user:secret@example.com/a.jpg", "refused: URL with a user name or password"),
    ("http://127.0.0.1@example.com/a.jpg", "refused: URL with a user name or password"),
    ("http://@example.com/a.jpg", "refused: URL with a user name or password"),
    # both parsers keep "%31%32%37" in the host; requests sends it decoded, as 127.0.0.1
    ("http://%31%32%37.0.0.1/a.jpg", "refused: ambiguous URL (parsers disagree on its host)"),
    ("http://[fe80::1%25eth0]/a.jpg", "refused: ambiguous URL (parsers disagree on its host)"),
    ("http://b\u00fccher.example/a.jpg", "refused: non-ASCII host name (send its xn-- form)"),
    ("http://127\u30020\u30020\u30021/a.jpg", "refused: non-ASCII host name (send its xn-- form)"),  # ideographic dots
])
def test_urls_the_parsers_could_read_differently_are_refused(strict, url, reason):
    with pytest.raises(DownloadError) as caught:
        check_url(url)
    assert caught.value.reason == reason
    assert reason_for(url) == reason


def test_a_fragment_or_query_holding_an_at_sign_is_not_userinfo(strict):
    """Both parsers end the host at "#" and "?": these go to 93.184.216.34, so they pass the check."""
    check_url("http://93.184.216.34/a.jpg#@127.0.0.1/")
    check_url("http://93.184.216.34?@127.0.0.1/")


def test_an_open_and_a_closed_private_port_get_the_same_sentence(strict):
    """Port probing through the answer: nothing tells an open private port from a closed one."""
    with quiet_port() as listener:
        open_port = listener.getsockname()[1]
        for form in ("http://127.0.0.1:{}/", "http://localhost:{}/admin", "http://[::ffff:127.0.0.1]:{}/",
                     "http://127.0.0.1:{}\\@93.184.216.34/"):
            reasons = {reason_for(form.format(port)) for port in (open_port, closed_port())}
            assert len(reasons) == 1 and reasons <= {PRIVATE_REFUSAL, (
                "refused: URL contains a backslash, space or control character")}, (form, reasons)
        assert_never_connected(listener)


def test_env_switch_is_needed_for_loopback(httpserver, strict, small_png):
    httpserver.expect_request("/pic.png").respond_with_data(small_png, content_type="image/png")
    assert reason_for(httpserver.url_for("/pic.png")) == PRIVATE_REFUSAL
    assert not httpserver.log


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:{other}/admin",
                                    "http://127.0.0.1:{closed}/admin"])
def test_redirect_to_private_address_refused(httpserver, only_httpserver_allowed, small_png, target):
    with quiet_port() as other:  # a real loopback service, never reached
        location = target.format(other=other.getsockname()[1], closed=closed_port())
        httpserver.expect_request("/ok.png").respond_with_data(small_png, content_type="image/png")
        httpserver.expect_request("/hop").respond_with_data("", status=302, headers={"Location": location})
        assert fetch_image(httpserver.url_for("/ok.png")).width == 64  # the first hop is allowed
        assert reason_for(httpserver.url_for("/hop")) == PRIVATE_REFUSAL
        assert_never_connected(other)


@pytest.fixture
def resolver(monkeypatch):
    """A DNS of our own for *.test names: answers[name] lists the addresses it gives, None: no such name."""
    real = socket.getaddrinfo
    answers: dict[str, list[str] | None] = {}
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        if answers[host] is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, asked


def test_the_address_checked_is_the_address_connected_to(strict, resolver):
    """DNS rebinding: one lookup per connection, and a private answer is refused before connecting."""
    answers, asked = resolver
    with quiet_port() as listener:
        port = listener.getsockname()[1]
        answers["rebind.test"] = ["127.0.0.1"]
        assert reason_for(f"http://rebind.test:{port}/pic.png") == PRIVATE_REFUSAL
        answers["mixed.test"] = ["93.184.216.34", "127.0.0.1"]  # any private answer refuses the name
        assert reason_for(f"https://mixed.test:{port}/pic.png") == PRIVATE_REFUSAL
        assert asked == ["rebind.test", "mixed.test"]
        assert_never_connected(listener)


def test_a_name_that_does_not_resolve(strict, resolver):
    answers, _ = resolver
    answers["nowhere.test"] = None
    assert reason_for("http://nowhere.test/a.jpg") == "cannot resolve host"


# ---------------------------------------------------------------- what messages repeat

def test_long_inputs_are_quoted_at_most_200_characters(strict):
    assert reason_for("x" * 3000 + "://example.com/") == "refused: scheme '" + "x" * 200 + "...' (only http and https)"
    url = "http://example.com/" + "a" * 10 * MAX_URL_CHARS
    assert reason_for(url) == "refused: URL longer than 4,096 characters"


def test_a_long_content_type_is_quoted_short(allow_loopback):
    def long_type(conn, stop):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/" + b"h" * 5000 + b"\r\nContent-Length: 0\r\n\r\n")

    with raw_server(long_type) as url:
        assert reason_for(url) == "not an image: text/" + "h" * 195 + "..."


def test_an_unexpected_error_names_its_type_only(monkeypatch, caplog):
    def broken(url, limits):
        raise RuntimeError("/srv/nanostream/secret.py <object at 0x7f00>")

    monkeypatch.setattr(download, "fetch_image", broken)
    with caplog.at_level("ERROR", logger="nanostream.sources.download"):
        report = fetch_images(["http://example.com/a.jpg"])
    assert [(f.url, f.reason) for f in report.failed] == [("http://example.com/a.jpg", "unexpected error (RuntimeError)")]
    assert "secret.py" in caplog.text  # the details stay in the server's log


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
        (urls[5], "refused: malformed URL"),
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
