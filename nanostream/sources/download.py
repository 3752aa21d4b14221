"""Safe fetch of untrusted image URLs: limits, redirects, verification, normalization.

Every URL comes from a web search or an API caller and is treated as hostile. A fetch only
succeeds for an http(s) URL on a public address whose body is, byte for byte, a decodable
image within the limits; anything else is a FetchFailure with a short reason the user can read.

Which URLs and addresses may be fetched is addresses.py's to say; connections.py makes the
connections (to the checked addresses only) and enforces the whole-fetch deadline. This module
follows redirects hop by hop (each hop checked again), reads the body under its byte limit,
checks its format from its first bytes, and normalizes the image; fetch_images runs many
fetches in a pool, a few per host at a time.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from PIL import Image

from ..engine import images
from ..store.records import content_hash
from .addresses import DownloadError, check_url, clip_input
from .connections import TIMED_OUT, Watchdog, checked_session

log = logging.getLogger(__name__)

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
    content_hash: str   # store.records.content_hash(data)
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


def _open_final(session: requests.Session, url: str, limits: DownloadLimits, watchdog: Watchdog):
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
    with Watchdog(limits.deadline) as watchdog, checked_session(watchdog) as session:
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
