"""Web image search: providers by name, query variants, pacing, backoff, a licence filter and a query cache -> candidate URLs.

Search engines answer an unthrottled client with empty pages or errors, so every live call is
spaced by a pause (one Pacer for a whole search, across categories), retried with exponential
backoff when it looks rate limited or times out, and remembered in a QueryCache so a repeated
search never calls the engine again.

A provider is anything with a `name` and `images(query, max_results)` (SearchProvider), found
by its source name in providers.PROVIDERS: openverse.py and wikimedia.py (licensed images,
with their licence and creator) and DDGSProvider here (DuckDuckGo: any image, licence
unknown). Adding a search engine is one module and one entry there; flows.collect runs every
provider the same way, licensed ones first. Whatever a provider filters on
its side, search_category keeps only the hits whose licence the caller's filter admits
(licenses.admits), so an unknown licence never passes for a free one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from ..store.licenses import admits


@dataclass(frozen=True)
class ImageHit:
    url: str              # the image file itself: what download.fetch_images gets
    page_url: str         # the page showing it, for attribution
    title: str
    query: str            # the query that found it
    width: int | None     # as the engine reports it; None when unknown
    height: int | None
    source: str           # the engine's source label, e.g. "Bing", "flickr"
    license: str          # licenses.license_name of the image's licence; "" unknown (DuckDuckGo reports none)
    thumbnail: str = ""   # a small preview hosted by the engine
    creator: str = ""     # who made it, as plain text
    license_url: str = ""
    attribution_required: bool = True  # unknown counts as required: a credit never hurts
    provider: str = ""    # the source name in PROVIDERS that found it
    skipped: str = ""     # why this result is no image we can use (an SVG, a video); "" when it is one


class RateLimited(Exception):
    """The engine refuses or answers nothing: slow down and try later. retry_after: the seconds
    the engine asked us to wait (Retry-After), None when it did not say."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class SearchError(Exception):
    """A search that failed for another reason; the message says why."""


class SearchTimeout(SearchError):
    """The engine did not answer in time, or answered with a server error (5xx); retried with
    backoff like RateLimited."""


class SearchProvider(Protocol):
    """What every image search answers. Optional attributes, read with getattr:
    `pacing` (a SearchPacing; SearchPacing() when absent) and `reach` ((host, port) the engine
    answers on, checked before searching to tell "offline" from "no images"; stand-ins have none)."""

    name: str  # part of the cache key: different settings must have different names

    def images(self, query: str, max_results: int) -> list[ImageHit]:
        """Hits in rank order; raises RateLimited or SearchError."""
        ...


# ---------------------------------------------------------------- the real provider

def _to_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


class DDGSProvider:
    """Image search through ddgs. Its DuckDuckGo engine is tried first, Bing's when it fails.
    No engine says an image's licence, so every hit's licence is unknown ("")."""

    source = "ddg"  # its name in search.PROVIDERS
    reach = ("duckduckgo.com", 443)  # where ddgs searches first: unreachable means offline

    def __init__(self, safesearch: str = "moderate", license_image: str | None = None,
                 region: str = "wt-wt", timeout: int = 10, type_image: str | None = None,
                 backend: str = "duckduckgo,bing"):
        self.safesearch, self.license_image, self.region = safesearch, license_image, region
        self.timeout, self.type_image, self.backend = timeout, type_image, backend
        self.name = f"ddgs/{backend}/{region}/{safesearch}/{license_image or 'any'}/{type_image or 'any'}"
        from ddgs import DDGS  # here: the CLI reads this module's source names without the HTTP stack

        self._ddgs = DDGS(timeout=timeout)

    def images(self, query: str, max_results: int) -> list[ImageHit]:
        from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

        filters = {k: v for k, v in (("license_image", self.license_image), ("type_image", self.type_image)) if v}
        try:
            results = self._ddgs.images(query, region=self.region, safesearch=self.safesearch,
                                        max_results=max_results, backend=self.backend, **filters)
        except RatelimitException as exc:
            raise RateLimited(str(exc)) from exc
        except TimeoutException as exc:
            raise SearchTimeout(f"timed out: {exc}") from exc
        except DDGSException as exc:
            message = str(exc)
            # The engines turn a 403/429 into "No results found.", and DuckDuckGo withholds its
            # vqd token when throttling: both mean "slow down" far more often than "no images".
            if "No results found" in message or "vqd" in message:
                raise RateLimited(f"no results ({message}); search engines answer this way when rate limiting") from exc
            raise SearchError(message) from exc
        return [self._to_hit(result, query) for result in results if result.get("image")]

    def _to_hit(self, result: dict[str, Any], query: str) -> ImageHit:
        return ImageHit(url=result["image"], page_url=result.get("url") or "", title=result.get("title") or "",
                        query=query, width=_to_int(result.get("width")), height=_to_int(result.get("height")),
                        source=result.get("source") or "", license="",
                        thumbnail=result.get("thumbnail") or "", provider="ddg")


# ---------------------------------------------------------------- cache

class QueryCache:
    """Search results as JSON files in a directory, one per (provider name, query, max_results).

    JSON, never pickle: the files are data anyone could edit. An unreadable or expired entry is
    a cache miss, and the search simply runs again.
    """

    def __init__(self, directory: Path, ttl_seconds: float = 7 * 24 * 3600, clock: Callable[[], float] = time.time):
        self.directory, self.ttl_seconds, self.clock = Path(directory), ttl_seconds, clock

    def path(self, provider_name: str, query: str, max_results: int) -> Path:
        key = hashlib.sha256(json.dumps([provider_name, query, max_results]).encode()).hexdigest()
        return self.directory / f"{key}.json"

    def get(self, provider_name: str, query: str, max_results: int) -> list[ImageHit] | None:
        try:
            entry = json.loads(self.path(provider_name, query, max_results).read_text())
            if self.clock() - entry["saved_at"] > self.ttl_seconds:
                return None
            return [ImageHit(**hit) for hit in entry["hits"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, provider_name: str, query: str, max_results: int, hits: list[ImageHit]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = {"saved_at": self.clock(), "provider": provider_name, "query": query,
                 "max_results": max_results, "hits": [asdict(hit) for hit in hits]}
        handle, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(entry, out)
        os.replace(tmp, self.path(provider_name, query, max_results))  # readers never see half a file


# ---------------------------------------------------------------- one category

@dataclass(frozen=True)
class SearchPacing:
    pause: float = 2.0         # between live calls: DuckDuckGo throttles clients that search back to back
    retries: int = 4           # extra tries after a rate-limited or timed-out call; then give up politely
    backoff: float = 2.0       # base seconds, doubled each retry: 2, 4, 8, 16 (times jitter)
    max_backoff: float = 30.0  # a longer wait is better spent telling the user to come back later


class Pacer:
    """Spaces the live calls of one search by a pause: the first goes at once, each later one
    waits, whichever category it is for. Cached answers call nothing, so they wait for nothing."""

    def __init__(self, pause: float, sleep: Callable[[float], None] = time.sleep):
        self.pause, self.sleep, self.live_calls = pause, sleep, 0

    def before_live_call(self) -> None:
        if self.live_calls:
            self.sleep(self.pause)
        self.live_calls += 1


@dataclass(frozen=True)
class SearchReport:
    category: str
    hits: tuple[ImageHit, ...]   # unique by url, in rank order, at most per_category, all admitted by the filter
    queries: tuple[str, ...]     # the queries actually run (cached ones included)
    errors: tuple[str, ...]      # messages for the user
    rate_limited: bool           # hits may be partial: the engine asked us to slow down
    unlicensed: int = 0          # unique hits left out because the licence filter does not admit their licence
    skipped: tuple[ImageHit, ...] = ()  # results that are no usable image, each with its reason (hit.skipped)
    failed: bool = False         # every query failed: the engine is down or broken, not out of images


def query_variants(category: str, extra_terms: str = "") -> list[str]:
    """Queries for one category: the name, the name + "photo", and the name + each comma-separated extra term."""
    name = " ".join(category.split())
    variants = [name, f"{name} photo"] + [f"{name} {' '.join(t.split())}" for t in extra_terms.split(",") if t.strip()]
    unique: dict[str, str] = {}
    for query in variants:
        unique.setdefault(query.lower(), query)
    return list(unique.values())


def backoff_delay(attempt: int, pacing: SearchPacing, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number attempt+1: exponential, capped, with jitter in [50%, 100%]
    so clients that were throttled together do not come back together."""
    return min(pacing.max_backoff, pacing.backoff * 2 ** attempt) * (0.5 + 0.5 * rand())


def _retry_delay(exc: Exception, attempt: int, pacing: SearchPacing) -> float | None:
    """backoff_delay, or the engine's own Retry-After when it gave one; None when that is longer
    than pacing.max_backoff: then telling the user beats waiting."""
    asked = getattr(exc, "retry_after", None)
    if asked is None:
        return backoff_delay(attempt, pacing)
    return None if asked > pacing.max_backoff else max(0.0, asked)


def _search_with_backoff(provider: SearchProvider, query: str, max_results: int,
                         pacing: SearchPacing, sleep: Callable[[float], None]) -> list[ImageHit]:
    attempt = 0
    while True:
        try:
            return provider.images(query, max_results)
        except (RateLimited, SearchTimeout) as exc:
            delay = _retry_delay(exc, attempt, pacing)
            if attempt >= pacing.retries or delay is None:
                raise
            sleep(delay)
            attempt += 1


def search_category(
    category: str,
    provider: SearchProvider,
    per_category: int = 50,
    extra_terms: str = "",
    pacing: SearchPacing = SearchPacing(),
    cache: QueryCache | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    pacer: Pacer | None = None,
    license_filter: str = "any",
    exclude: frozenset[str] = frozenset(),
) -> SearchReport:
    """Run the query variants of one category until per_category unique image URLs are found
    whose licence license_filter admits (licenses.admits); URLs in exclude (found already by
    another source) do not count.

    Every live call but the first waits pacing.pause; a caller searching several categories
    passes them one pacer, so the pause also falls between categories, and only before a live
    call. When the engine stays rate limited after all retries, the remaining queries are
    skipped and the hits found so far are returned. on_progress(done, total) counts queries.
    """
    pacer = pacer or Pacer(pacing.pause, sleep)
    queries = query_variants(category, extra_terms)
    hits: dict[str, ImageHit] = {}
    unlicensed: set[str] = set()
    skipped: dict[str, ImageHit] = {}
    ran: list[str] = []
    errors: list[str] = []
    rate_limited = False
    answered = 0
    for done, query in enumerate(queries, start=1):
        if len(hits) >= per_category or (should_stop and should_stop()):
            break
        ran.append(query)
        found = cache.get(provider.name, query, per_category) if cache else None
        if found is None:
            pacer.before_live_call()
            try:
                found = _search_with_backoff(provider, query, per_category, pacing, sleep)
            except RateLimited as exc:
                rate_limited = True
                errors.append(f"Rate limited while searching {query!r} ({exc}). Kept the {len(hits)} "
                              f"images found so far; wait a few minutes, then search again.")
                break
            except SearchError as exc:
                errors.append(f"Search for {query!r} failed: {exc}")
                found = None
            if found is not None and cache:
                try:
                    cache.put(provider.name, query, per_category, found)
                except OSError as exc:  # the hits are still good; only the next search repeats the call
                    errors.append(f"Could not cache results for {query!r}: {exc}")
        answered += found is not None
        for hit in found or ():
            if hit.url in exclude or hit.url in hits:
                continue
            if hit.skipped:
                skipped.setdefault(hit.url, hit)
            elif admits(license_filter, hit.license):
                hits[hit.url] = hit
            else:
                unlicensed.add(hit.url)
        if on_progress:
            on_progress(done, len(queries))
    return SearchReport(category=category, hits=tuple(list(hits.values())[:per_category]),
                        queries=tuple(ran), errors=tuple(errors), rate_limited=rate_limited,
                        unlicensed=len(unlicensed - hits.keys()), skipped=tuple(skipped.values()),
                        failed=bool(ran) and not answered and not rate_limited)
