"""Safe fetch of untrusted image URLs: address checks, limits, verification, normalization.

Every URL comes from a web search and is treated as hostile. A fetch only succeeds for an
http(s) URL on a public address whose body is, byte for byte, a decodable image within the
limits; anything else is a FetchFailure with a short reason the user can read.

Address checks happen twice. `check_url` resolves the host of every hop (the first URL and
each redirect) and refuses if any resolved address is not public. Then, because DNS can
answer differently a moment later (DNS rebinding), the connection itself is checked: the
socket's peer address -- the IP we actually connected to -- must pass the same test before a
single byte of the request is sent. Connecting by hostname keeps TLS certificate and SNI
checks standard, and checking the peer makes the address test about the real connection.
Proxies from the environment are ignored, since a proxy would hide the real destination.
"""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from . import images

ALLOW_PRIVATE_ENV = "NANOSTREAM_ALLOW_PRIVATE_HOSTS"  # "1": tests against 127.0.0.1 only
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# Leading bytes of the formats we accept, whatever the Content-Type claims.
MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
MAGIC_LEN = 12  # enough for every signature above and for RIFF....WEBP
HEADERS = {
    "User-Agent": "NanoStream/0.1 (image classifier builder)",
    "Accept": "image/*",
    "Accept-Encoding": "identity",  # images are already compressed; no gzip bombs to inflate
}


@dataclass(frozen=True)
class DownloadLimits:
    max_bytes: int = 15_000_000   # a 24 MP JPEG is ~10 MB; bigger bodies are scans, RAW files or abuse
    connect_timeout: float = 5.0  # a healthy server accepts in well under a second
    read_timeout: float = 10.0    # longest silence between two reads before we give up
    deadline: float = 30.0        # whole-image wall clock: a server dripping bytes cannot hold a worker
    max_redirects: int = 5        # CDNs use one or two hops; long chains are loops or traps
    max_pixels: int = images.MAX_PIXELS  # can only tighten images.MAX_PIXELS, never loosen it
    workers: int = 4              # parallel downloads; searches return URLs on many different hosts
    per_host: int = 2             # politeness: concurrent requests per host


@dataclass(frozen=True)
class Fetched:
    url: str            # as asked for
    final_url: str      # after redirects
    data: bytes         # the normalized JPEG from images.normalize_image
    content_hash: str   # images.content_hash(data)
    width: int          # of data (the normalized image)
    height: int
    content_type: str   # the original format, detected from its magic bytes (data is always JPEG)


@dataclass(frozen=True)
class FetchFailure:
    url: str
    reason: str


@dataclass(frozen=True)
class FetchReport:
    fetched: tuple[Fetched, ...]       # in input order
    failed: tuple[FetchFailure, ...]   # in input order; every input URL is in one of the two


class DownloadError(Exception):
    """A URL that did not give an image; .reason says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- address checks

def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(address: str, port: int) -> str | None:
    """Why connecting to this IP is refused, or None when it is a public address.

    `port` is unused by the rule itself; it is there so tests can allow exactly one server.
    """
    if os.environ.get(ALLOW_PRIVATE_ENV) == "1":
        return None
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)):
        ip = inner
    for kind, flag in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("reserved", ip.is_reserved), ("private", ip.is_private),
                       ("not globally routable", not ip.is_global)):
        if flag:
            return f"refused: private address {ip} ({kind})"
    return None


def check_url(url: str) -> None:
    """Raise DownloadError unless url is http(s) and every address its host resolves to is public."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # bad port, bad IPv6 literal
        raise DownloadError(f"refused: malformed URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise DownloadError(f"refused: scheme {parts.scheme or '(none)'!r} (only http and https)")
    if not host:
        raise DownloadError("refused: no host in URL")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DownloadError(f"cannot resolve host {host}") from exc
    for info in infos:
        if reason := address_refusal(info[4][0], port):
            raise DownloadError(reason)


class _PeerCheck:
    """Mixin for urllib3 connections: refuse the socket if the address it reached is not public."""

    def _new_conn(self):
        sock = super()._new_conn()
        address, port = sock.getpeername()[:2]
        if reason := address_refusal(address, port):
            sock.close()
            raise DownloadError(reason)
        return sock


class _CheckedHTTPConnection(_PeerCheck, HTTPConnection):
    pass


class _CheckedHTTPSConnection(_PeerCheck, HTTPSConnection):
    pass


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class _CheckedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _CheckedHTTPPool, "https": _CheckedHTTPSPool}


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc from the environment: a proxy hides the peer
    session.headers.update(HEADERS)
    for prefix in ("http://", "https://"):
        session.mount(prefix, _CheckedAdapter())
    return session


# ---------------------------------------------------------------- one image

def sniff_format(head: bytes) -> str | None:
    """MIME type of an accepted image format from its first bytes, else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in MAGIC if head.startswith(magic)), None)


def _failure_reason(exc: requests.RequestException | urllib3.exceptions.HTTPError) -> str:
    """Short reason for a network error from requests (headers) or urllib3 (body reads)."""
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)) or "timed out" in str(exc):
        return "timed out"
    if isinstance(exc, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)):
        return "TLS error"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "connection broken while reading"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return f"request failed: {type(exc).__name__}"


def _open_final(session: requests.Session, url: str, limits: DownloadLimits, started: float):
    """Follow redirects by hand, checking every hop. Returns (final_url, streaming response)."""
    for _hop in range(limits.max_redirects + 1):
        check_url(url)
        remaining = limits.deadline - (time.monotonic() - started)
        if remaining <= 0:
            raise DownloadError("timed out")
        timeout = (min(limits.connect_timeout, remaining), min(limits.read_timeout, remaining))
        response = session.get(url, stream=True, allow_redirects=False, timeout=timeout)
        if response.status_code not in REDIRECT_CODES:
            return url, response
        location = response.headers.get("Location")
        response.close()
        if not location:
            raise DownloadError(f"HTTP {response.status_code} redirect without a Location")
        url = urljoin(url, location)
    raise DownloadError(f"too many redirects (> {limits.max_redirects})")


def _read_body(response: requests.Response, limits: DownloadLimits, started: float) -> tuple[bytes, str]:
    """Check status and headers, then stream the body under the byte limit and deadline."""
    if response.status_code != 200:
        raise DownloadError(f"HTTP {response.status_code}")
    declared = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not (declared.startswith("image/") or declared == "application/octet-stream"):
        raise DownloadError(f"not an image: {declared or 'no content type'}")
    too_large = f"too large (> {limits.max_bytes:,} bytes)"
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limits.max_bytes:
        raise DownloadError(too_large)

    body, size, detected = [], 0, None
    # read1 returns as soon as any bytes arrive (iter_content waits for a full chunk), so the
    # deadline is checked between reads even against a server dripping one byte at a time.
    # A single silent read can still overshoot the deadline by up to read_timeout.
    while chunk := response.raw.read1(64 * 1024, decode_content=True):
        body.append(chunk)
        size += len(chunk)
        if size > limits.max_bytes:  # counted while reading: Content-Length may be absent or lie
            raise DownloadError(too_large)
        if detected is None and size >= MAGIC_LEN:  # refuse an HTML page before reading all of it
            detected = sniff_format(b"".join(body)[:MAGIC_LEN]) or ""
            if not detected:
                raise DownloadError(f"not an image: {declared} body is not JPEG, PNG, GIF, WEBP, BMP or TIFF")
        if time.monotonic() - started > limits.deadline:
            raise DownloadError("timed out")
    data = b"".join(body)
    detected = detected or sniff_format(data)
    if not detected:
        raise DownloadError(f"not an image: {declared} body is not JPEG, PNG, GIF, WEBP, BMP or TIFF")
    return data, detected


def _normalize(data: bytes, limits: DownloadLimits) -> tuple[bytes, int, int]:
    """Verify + fully decode (truncated files and bombs fail here), then re-encode as clean JPEG."""
    try:
        if limits.max_pixels < images.MAX_PIXELS:  # normalize_image itself decodes under MAX_PIXELS
            images.decode_image(data, max_pixels=limits.max_pixels)
        clean = images.normalize_image(data)
        with Image.open(io.BytesIO(clean)) as probe:  # header only: our own JPEG, just made
            width, height = probe.size
    except images.BadImage as exc:
        raise DownloadError(str(exc)) from exc
    return clean, width, height


def fetch_image(url: str, limits: DownloadLimits = DownloadLimits()) -> Fetched:
    """Download one untrusted URL and return the normalized image; DownloadError(reason) otherwise."""
    started = time.monotonic()
    with _session() as session:
        try:
            final_url, response = _open_final(session, url, limits, started)
            with response:
                data, detected = _read_body(response, limits, started)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise DownloadError(_failure_reason(exc)) from exc
        except (ValueError, UnicodeError) as exc:  # urllib3 refuses some malformed URLs this way
            raise DownloadError(f"refused: malformed URL ({exc})") from exc
    clean, width, height = _normalize(data, limits)
    return Fetched(url=url, final_url=final_url, data=clean, content_hash=images.content_hash(clean),
                   width=width, height=height, content_type=detected)


# ---------------------------------------------------------------- many images

def fetch_images(
    urls: Sequence[str],
    limits: DownloadLimits = DownloadLimits(),
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FetchReport:
    """Fetch many URLs in a thread pool, at most limits.per_host at a time per host.

    Never raises for a bad URL: each one ends up in .fetched or .failed (in input order).
    URLs not started once should_stop() is true fail with reason "cancelled".
    on_progress(done, total) is called from the calling thread.
    """
    host_slots: dict[str, threading.Semaphore] = {}
    slots_lock = threading.Lock()

    def fetch_one(url: str) -> Fetched | FetchFailure:
        if should_stop and should_stop():
            return FetchFailure(url, "cancelled")
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            host = ""
        with slots_lock:
            slot = host_slots.setdefault(host, threading.Semaphore(max(1, limits.per_host)))
        with slot:
            if should_stop and should_stop():
                return FetchFailure(url, "cancelled")
            try:
                return fetch_image(url, limits)
            except DownloadError as exc:
                return FetchFailure(url, exc.reason)
            except Exception as exc:  # noqa: BLE001 - a bug or odd input still becomes a visible failure
                return FetchFailure(url, f"unexpected error: {type(exc).__name__}: {exc}")

    results: list[Fetched | FetchFailure | None] = [None] * len(urls)
    with ThreadPoolExecutor(max_workers=max(1, limits.workers), thread_name_prefix="fetch") as pool:
        futures = {pool.submit(fetch_one, url): i for i, url in enumerate(urls)}
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if on_progress:
                on_progress(done, len(urls))
    return FetchReport(
        fetched=tuple(r for r in results if isinstance(r, Fetched)),
        failed=tuple(r for r in results if isinstance(r, FetchFailure)),
    )
