"""Safe fetch of untrusted image URLs: address checks, limits, verification, normalization.

Every URL comes from a web search or an API caller and is treated as hostile. A fetch only
succeeds for an http(s) URL on a public address whose body is, byte for byte, a decodable
image within the limits; anything else is a FetchFailure with a short reason the user can read.

A URL is read the way the HTTP client will read it, or refused: no backslash, space, control
character or user name, and urllib's and urllib3's parsers must agree on its host and port
(`check_url`). The address check happens where the connection is made: the host of every hop
(the first URL and each redirect) is resolved once, the fetch is refused unless every address
is public, and the socket connects to one of those very addresses -- so DNS has no second
chance to answer differently (DNS rebinding), and nothing, not even a SYN, reaches a private
address: open and closed private ports get the same sentence. TLS still checks the certificate
and SNI against the host name. Proxies from the environment are ignored, since a proxy would
hide the real destination.

One deadline covers the whole fetch -- connect, status line, headers and body -- enforced by a
watchdog that shuts the sockets down when it passes, so a server dripping bytes cannot hold a
worker past it (DNS resolution is bounded by the system resolver's own timeout).
"""

from __future__ import annotations

import functools
import io
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import suppress
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ..engine import images
from ..store.db import content_hash

log = logging.getLogger(__name__)

ALLOW_PRIVATE_ENV = "NANOSTREAM_ALLOW_PRIVATE_HOSTS"  # "1": tests against 127.0.0.1 only
# Signed CDN links reach 1-2 KB; longer "URLs" are abuse, and every message about one stays small.
MAX_URL_CHARS = 4096
QUOTE_CHARS = 200  # the most of any input a message repeats
# The one sentence for every private target, reachable or not, whatever kind of address it is.
PRIVATE_REFUSAL = "refused: private address (only public addresses are fetched)"
TIMED_OUT = "timed out"
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
    deadline: float = 30.0        # whole fetch (connect, headers, body): a server dripping bytes cannot hold a worker
    max_redirects: int = 5        # CDNs use one or two hops; long chains are loops or traps
    max_pixels: int = images.MAX_PIXELS  # can only tighten images.MAX_PIXELS, never loosen it
    workers: int = 4              # parallel downloads; searches return URLs on many different hosts
    per_host: int = 2             # politeness: concurrent requests per host


@dataclass(frozen=True)
class Fetched:
    url: str            # as asked for
    final_url: str      # after redirects
    data: bytes         # the normalized JPEG from images.normalize_image
    content_hash: str   # store.db.content_hash(data)
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


def clip_input(text: str) -> str:
    """At most QUOTE_CHARS of an input, for a message that repeats it."""
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


# ---------------------------------------------------------------- reading a URL

def check_url(url: str) -> None:
    """Raise DownloadError unless url is http(s) and reads the same to us and to the HTTP client.

    urlsplit is what we check, urllib3's parse_url (inside requests) is what connects: any URL
    the two could read differently is refused rather than guessed at. `\\` is the known case
    (`http://127.0.0.1:22\\@1.2.3.4/`: urlsplit sees 1.2.3.4, urllib3 connects to 127.0.0.1).
    """
    if len(url) > MAX_URL_CHARS:
        raise DownloadError(f"refused: URL longer than {MAX_URL_CHARS:,} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # bad port or IPv6 literal; its text would quote the input
        raise DownloadError("refused: malformed URL") from None
    if parts.scheme not in ("http", "https"):
        raise DownloadError(f"refused: scheme {clip_input(parts.scheme) or '(none)'!r} (only http and https)")
    if "\\" in url or " " in url or not url.isprintable():  # isprintable: no control or other space characters
        raise DownloadError("refused: URL contains a backslash, space or control character")
    if "@" in parts.netloc:
        raise DownloadError("refused: URL with a user name or password")
    if not parts.hostname:
        raise DownloadError("refused: no host in URL")
    if not parts.hostname.isascii():
        raise DownloadError("refused: non-ASCII host name (send its xn-- form)")
    sent = _sent_host_and_port(url)
    if sent is None:
        raise DownloadError("refused: malformed URL")
    if sent != (parts.hostname, port or (443 if parts.scheme == "https" else 80)):
        raise DownloadError("refused: ambiguous URL (parsers disagree on its host)")


def _sent_host_and_port(url: str) -> tuple[str, int] | None:
    """Host and port of the URL requests will send, as urllib3 reads it; None if it cannot."""
    prepared = requests.PreparedRequest()
    try:
        prepared.prepare_url(url, None)  # requote_uri decodes %-escapes: "%31%32%37.0.0.1" becomes 127.0.0.1
        sent = urllib3.util.parse_url(prepared.url)
    except (requests.RequestException, urllib3.exceptions.LocationParseError, ValueError):
        return None
    return (sent.host or "").strip("[]").lower(), sent.port or (443 if sent.scheme == "https" else 80)


# ---------------------------------------------------------------- addresses and connections

def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_allowed(address: str, port: int) -> bool:
    """Whether a fetch may connect to this IP: a globally routable unicast address.

    `port` is unused by the rule itself; it is there so tests can allow exactly one server.
    """
    if os.environ.get(ALLOW_PRIVATE_ENV) == "1":
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)):
        ip = inner
    # is_global alone lets a few through (multicast ranges count as global)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


class _Watchdog:
    """The whole-fetch deadline: when it passes, every socket of the fetch is shut down.

    A socket timeout only bounds one silent read, and a server sending a byte every few seconds
    never trips it -- in the body, or in the status line and headers that http.client reads
    deep inside requests. shutdown() wakes whichever read is blocked, over TLS too.
    """

    def __init__(self, seconds: float):
        self.ends = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        # A duplicate descriptor of the same socket: wrapping for TLS detaches the original object.
        with self._lock:
            self._sockets.append(sock.dup())

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                with suppress(OSError):  # already closed by the other end
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _connect(host: str, port: int, timeout: float, options, watchdog: _Watchdog) -> socket.socket:
    """Resolve host once, refuse unless every address is public, then connect to one of them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise DownloadError("cannot resolve host") from None
    if not all(address_allowed(info[4][0], port) for info in infos):
        raise DownloadError(PRIVATE_REFUSAL)
    reason = "connection failed"
    for family, kind, proto, _, address in infos:
        if (remaining := watchdog.remaining()) <= 0:
            raise DownloadError(TIMED_OUT)
        sock = socket.socket(family, kind, proto)
        try:
            for option in options or ():
                sock.setsockopt(*option)
            sock.settimeout(min(timeout, remaining))
            watchdog.watch(sock)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            reason = TIMED_OUT if isinstance(exc, TimeoutError) else "connection failed"
            continue
        if watchdog.expired:  # it passed while connecting, when there was nothing to shut down yet
            sock.close()
            raise DownloadError(TIMED_OUT)
        return sock
    raise DownloadError(reason)


class _CheckedConnection:
    """Mixin for urllib3 connections: connect through _connect, under the fetch's watchdog."""

    def __init__(self, *args, watchdog: _Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def _new_conn(self) -> socket.socket:
        return _connect(self.host, self.port, self.timeout, self.socket_options, self._watchdog)


class _CheckedHTTPConnection(_CheckedConnection, HTTPConnection):
    pass


class _CheckedHTTPSConnection(_CheckedConnection, HTTPSConnection):
    pass


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class _CheckedAdapter(HTTPAdapter):
    def __init__(self, watchdog: _Watchdog):
        self._watchdog = watchdog
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        # Through the pool class, not pool kwargs: PoolManager builds its pool keys from those.
        self.poolmanager.pool_classes_by_scheme = {
            "http": functools.partial(_CheckedHTTPPool, watchdog=self._watchdog),
            "https": functools.partial(_CheckedHTTPSPool, watchdog=self._watchdog),
        }


def _session(watchdog: _Watchdog) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc from the environment: a proxy hides the peer
    session.headers.update(HEADERS)
    for prefix in ("http://", "https://"):
        session.mount(prefix, _CheckedAdapter(watchdog))
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
        return TIMED_OUT
    if isinstance(exc, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)):
        return "TLS error"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "connection broken while reading"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return f"request failed: {type(exc).__name__}"


def _open_final(session: requests.Session, url: str, limits: DownloadLimits, watchdog: _Watchdog):
    """Follow redirects by hand, checking every hop. Returns (final_url, streaming response)."""
    for _hop in range(limits.max_redirects + 1):
        check_url(url)
        remaining = watchdog.remaining()
        if remaining <= 0:
            raise DownloadError(TIMED_OUT)
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


def _read_body(response: requests.Response, limits: DownloadLimits) -> tuple[bytes, str]:
    """Check status and headers, then stream the body under the byte limit."""
    if response.status_code != 200:
        raise DownloadError(f"HTTP {response.status_code}")
    declared = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not (declared.startswith("image/") or declared == "application/octet-stream"):
        raise DownloadError(f"not an image: {clip_input(declared) or 'no content type'}")
    too_large = f"too large (> {limits.max_bytes:,} bytes)"
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limits.max_bytes:
        raise DownloadError(too_large)

    not_image = f"not an image: {clip_input(declared)} body is not JPEG, PNG, GIF, WEBP, BMP or TIFF"
    body, size, detected = [], 0, None
    # read1 returns as soon as any bytes arrive (iter_content waits for a full chunk): an HTML
    # page is refused from its first bytes, and the size is counted as it comes.
    while chunk := response.raw.read1(64 * 1024, decode_content=True):
        body.append(chunk)
        size += len(chunk)
        if size > limits.max_bytes:  # counted while reading: Content-Length may be absent or lie
            raise DownloadError(too_large)
        if detected is None and size >= MAGIC_LEN:  # refuse an HTML page before reading all of it
            detected = sniff_format(b"".join(body)[:MAGIC_LEN]) or ""
            if not detected:
                raise DownloadError(not_image)
    data = b"".join(body)
    detected = detected or sniff_format(data)
    if not detected:
        raise DownloadError(not_image)
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


def _download(url: str, limits: DownloadLimits) -> tuple[str, bytes, str]:
    """(final_url, body, detected format) of url, all within limits.deadline."""
    with _Watchdog(limits.deadline) as watchdog, _session(watchdog) as session:
        try:
            final_url, response = _open_final(session, url, limits, watchdog)
            with response:
                data, detected = _read_body(response, limits)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise DownloadError(TIMED_OUT if watchdog.expired else _failure_reason(exc)) from exc
        except DownloadError:
            if watchdog.expired:  # a cut connection can look like missing headers or a short body
                raise DownloadError(TIMED_OUT) from None
            raise
        except (ValueError, UnicodeError) as exc:  # urllib3 refuses some malformed URLs this way
            raise DownloadError("refused: malformed URL") from exc
        if watchdog.expired:  # cut off where the body could have ended: not the whole image
            raise DownloadError(TIMED_OUT)
    return final_url, data, detected


def fetch_image(url: str, limits: DownloadLimits = DownloadLimits()) -> Fetched:
    """Download one untrusted URL and return the normalized image; DownloadError(reason) otherwise."""
    final_url, data, detected = _download(url, limits)
    clean, width, height = _normalize(data, limits)
    return Fetched(url=url, final_url=final_url, data=clean, content_hash=content_hash(clean),
                   width=width, height=height, content_type=detected)


def fetch_outcome(url: str, limits: DownloadLimits = DownloadLimits()) -> Fetched | FetchFailure:
    """fetch_image that never raises: every URL ends as an image or a failure the user can read."""
    try:
        return fetch_image(url, limits)
    except DownloadError as exc:
        return FetchFailure(url, exc.reason)
    except Exception as exc:  # noqa: BLE001 - a bug or odd input still becomes a visible failure
        log.exception("unexpected error fetching a URL")  # the details stay in the server's log
        return FetchFailure(url, f"unexpected error ({type(exc).__name__})")


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
            return fetch_outcome(url, limits)

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
