"""JSON from a search API (Openverse, Wikimedia Commons) over the checked connections of a download.

An API's base URL comes from the environment (tests and mirrors point it elsewhere), so its
answers are fetched like any untrusted URL: connections.checked_session (public addresses
only, unless NANOSTREAM_ALLOW_PRIVATE_HOSTS=1), one deadline for the whole call, a cap on the
body. Each answer becomes JSON or one of search.py's errors: RateLimited for 429 (with the
server's Retry-After, when it sends one), SearchTimeout for a timeout or a 5xx (both retried
with backoff), SearchError for anything else, malformed JSON included.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Mapping

import requests
import urllib3

from .. import __version__
from .addresses import DownloadError, check_url, clip_input
from .connections import Watchdog, checked_session
from .search import RateLimited, SearchError, SearchTimeout

# Wikimedia's User-Agent policy asks every client to say what it is; Openverse logs it too.
USER_AGENT = f"NanoStream/{__version__} (few-shot image classifier builder) requests/{requests.__version__}"


@dataclass(frozen=True)
class ApiLimits:
    deadline: float = 20.0        # a search page is a few KB: a healthy API answers in a second or two
    max_bytes: int = 5_000_000    # 50 Commons results with all their metadata are ~200 KB


@dataclass(frozen=True)
class Answer:
    """A 200 answer: every other status is raised as one of search.py's errors (_answer)."""
    headers: Mapping[str, str]    # case-insensitive (requests' CaseInsensitiveDict)
    data: Any                     # the parsed JSON


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (RFC 9110 also allows a date; APIs here send seconds); None if absent or unreadable."""
    try:
        seconds = float(headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def get_json(engine: str, url: str, params: Mapping[str, str | int], limits: ApiLimits = ApiLimits()) -> Answer:
    """GET url?params as JSON. engine names the API in messages ("Openverse")."""
    try:
        check_url(url)
        with Watchdog(limits.deadline) as watchdog, checked_session(watchdog) as session:
            response = session.get(url, params=dict(params), stream=True, allow_redirects=False,
                                   timeout=(5.0, 10.0),  # connect, and longest silence between reads
                                   headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
            with response:
                body = _read(response, limits.max_bytes, engine)
                status, headers = response.status_code, response.headers
    except DownloadError as exc:  # refused address, malformed base URL
        raise SearchError(f"{engine} cannot be reached: {exc.reason}") from None
    except (requests.Timeout, urllib3.exceptions.TimeoutError):
        raise SearchTimeout(f"{engine} did not answer in time") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if watchdog.expired:  # the deadline cut the connection: a slow API, not a broken one
            raise SearchTimeout(f"{engine} did not answer in time") from None
        raise SearchError(f"{engine} cannot be reached ({type(exc).__name__})") from None
    return _answer(engine, status, headers, body)


def _read(response: requests.Response, max_bytes: int, engine: str) -> bytes:
    chunks, size = [], 0
    while chunk := response.raw.read1(64 * 1024, decode_content=True):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise SearchError(f"{engine} answered with more than {max_bytes:,} bytes")
    return b"".join(chunks)


def _answer(engine: str, status: int, headers: Mapping[str, str], body: bytes) -> Answer:
    if status == 429:
        wait = retry_after(headers)
        said = f"; it asks to wait {wait:g} s" if wait is not None else ""
        raise RateLimited(f"{engine} answered 429 Too Many Requests{said}", wait)
    if status >= 500:
        raise SearchTimeout(f"{engine} answered HTTP {status} (a server error; it may be back soon)")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        kind = headers.get("Content-Type", "").split(";")[0].strip() or "no content type"
        raise SearchError(f"{engine} answered HTTP {status} with something that is not JSON "
                          f"({clip_input(kind)})") from None
    if status != 200:
        detail = data.get("detail") if isinstance(data, dict) else None
        said = f": {clip_input(str(detail))}" if isinstance(detail, str) else ""
        raise SearchError(f"{engine} answered HTTP {status}{said}")
    return Answer(headers, data)



# ---------------------------------------------------------------- an API's own pace

_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
            "d": 86400, "day": 86400}
LOW = 2  # requests left in a window below which calls are spread over what remains of it


def _rate(text: str) -> tuple[int, float] | None:
    """("20/min") -> (20, 60.0); None for anything else."""
    count, _, period = str(text).partition("/")
    try:
        return int(count), float(_PERIODS[period.strip().lower()])
    except (ValueError, KeyError):
        return None


class RateBudget:
    """The pace an API asks for: at least min_interval between calls (Wikimedia asks for calls
    in series, no hard limit on reads), and the X-RateLimit-* headers honoured (Openverse's:
    X-RateLimit-Limit-anon_burst "20/min", X-RateLimit-Available-anon_burst "19", the same for
    anon_sustained "200/day"). With few calls left in a window the next waits the window's share
    of one call (20/min: 3 s); with none left, calls raise RateLimited until the window has passed,
    so a search moves on to the next source instead of waiting it out."""

    def __init__(self, engine: str, min_interval: float = 0.0, sleep=None, clock=None):
        self.engine, self.min_interval = engine, min_interval
        self.sleep, self.clock = sleep or time.sleep, clock or time.monotonic
        self.last_call: float | None = None
        self.spread = 0.0                 # seconds the next call waits after the last
        self.closed_until = 0.0           # no calls before this clock time
        self.closed_by = ""

    def before_call(self) -> None:
        now = self.clock()
        if now < self.closed_until:
            raise RateLimited(f"{self.engine}'s allowance of {self.closed_by} is used up", self.closed_until - now)
        if self.last_call is not None:
            wait = max(self.min_interval, self.spread) - (now - self.last_call)
            if wait > 0:
                self.sleep(wait)
        self.last_call = self.clock()

    def after_call(self, headers: Mapping[str, str]) -> None:
        self.spread = 0.0
        for key, value in headers.items():
            if not key.lower().startswith("x-ratelimit-available-"):
                continue
            scope = key[len("x-ratelimit-available-"):]
            limit = headers.get(f"X-RateLimit-Limit-{scope}", "")
            rate = _rate(limit)
            try:
                left = int(value)
            except ValueError:
                continue
            if rate is None:
                continue
            count, period = rate
            if left <= 0:
                self.closed_until = max(self.closed_until, self.clock() + period)
                self.closed_by = clip_input(limit)
            elif left <= LOW:
                self.spread = max(self.spread, period / max(1, count))
