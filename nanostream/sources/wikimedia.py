"""Wikimedia Commons: freely licensed files, each with its licence and author, through the MediaWiki Action API.

    GET {NANOSTREAM_WIKIMEDIA_URL}/w/api.php?action=query&format=json&formatversion=2
        &generator=search&gsrsearch=...&gsrnamespace=6&gsrlimit=N&gsroffset=K
        &prop=imageinfo&iiprop=url|mime|size|extmetadata&maxlag=5
    -> {"continue": {"gsroffset": K', ...}, "query": {"pages": [{"title": "File:...", "index": 1,
        "imageinfo": [{"url", "descriptionurl", "mime", "width", "height", "extmetadata": {
        "LicenseShortName": {"value": "CC BY-SA 4.0"}, "Artist": {"value": "<a ...>Name</a>"},
        "AttributionRequired": {"value": "true"}, "LicenseUrl": {"value": ...}, "ObjectName": ...}}]}]}}

(https://www.mediawiki.org/wiki/API:Search, API:Imageinfo, Extension:CommonsMetadata.) Namespace 6
holds the files; the search also finds drawings (SVG), videos and sounds, which are skipped with
a reason. Wikimedia's etiquette: a descriptive User-Agent (api_client.USER_AGENT), requests in
series, and maxlag=5 so a lagging cluster answers "maxlag" (with Retry-After) instead of work:
that is a rate limit here, retried after the wait it asks for.
"""

from __future__ import annotations

import os
import time
from html.parser import HTMLParser
from typing import Any, Callable

from ..store.licenses import license_name
from .api_client import RateBudget, get_json, retry_after
from .search import ImageHit, RateLimited, SearchError, SearchPacing

BASE_ENV = "NANOSTREAM_WIKIMEDIA_URL"
DEFAULT_BASE = "https://commons.wikimedia.org"
MAX_LIMIT = 50         # gsrlimit's maximum for a client without bot rights
MAX_PAGES = 10         # 500 results: far past what one category needs
PAUSE_S = 1.0          # between calls: requests in series, a second apart, is well within Wikimedia's etiquette
MAXLAG_S = 5           # Wikimedia's recommended maxlag for non-interactive clients
PHOTO_MIMES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp", "image/tiff", "image/bmp"})
EXTMETADATA = "ObjectName|Artist|LicenseShortName|LicenseUrl|AttributionRequired"


class _PlainText(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def plain_text(html: Any) -> str:
    """The text of an extmetadata value (Artist is HTML: links, spans), entities decoded, one line."""
    if not isinstance(html, str):
        return ""
    parser = _PlainText()
    parser.feed(html)
    parser.close()
    return " ".join("".join(parser.parts).split())


def skip_reason(mime: str) -> str:
    """Why a Commons file is no photo NanoStream can use; "" when it is one."""
    if mime in PHOTO_MIMES:
        return ""
    if mime == "image/svg+xml":
        return "an SVG drawing, not a photo"
    kind = {"video": "a video", "audio": "a sound file"}.get(mime.partition("/")[0])
    return f"{kind}, not a photo" if kind else f"a {mime or 'file of unknown type'} file, not a photo format"


def _meta(info: dict, field: str) -> str:
    entry = info.get("extmetadata", {}).get(field) if isinstance(info.get("extmetadata"), dict) else None
    return plain_text(entry.get("value")) if isinstance(entry, dict) else ""


class WikimediaProvider:
    """Commons' file search, page after page (gsroffset), in series under maxlag."""

    source = "wikimedia"  # its name in search.PROVIDERS
    pacing = SearchPacing(pause=0.0, retries=2)  # the pause between calls is the RateBudget's

    def __init__(self, base_url: str | None = None, pause: float = PAUSE_S,
                 sleep: Callable[[float], None] = time.sleep):
        self.base_url = (base_url or os.environ.get(BASE_ENV) or DEFAULT_BASE).rstrip("/")
        self.name = f"wikimedia/{self.base_url}"
        self.budget = RateBudget("Wikimedia Commons", min_interval=pause, sleep=sleep)

    def images(self, query: str, max_results: int) -> list[ImageHit]:
        hits: list[ImageHit] = []
        offset: int | None = 0
        for _ in range(MAX_PAGES):
            pages, offset = self._page(query, offset, min(MAX_LIMIT, max(10, max_results)))
            hits += [hit for hit in (self._to_hit(page, query) for page in pages) if hit is not None]
            if offset is None or len([h for h in hits if not h.skipped]) >= max_results:
                break
        return hits

    def _page(self, query: str, offset: int, limit: int) -> tuple[list[dict], int | None]:
        self.budget.before_call()
        answer = get_json("Wikimedia Commons", f"{self.base_url}/w/api.php", {
            "action": "query", "format": "json", "formatversion": 2, "generator": "search",
            "gsrsearch": query, "gsrnamespace": 6, "gsrlimit": limit, "gsroffset": offset,
            "prop": "imageinfo", "iiprop": "url|mime|size|extmetadata", "iiextmetadatafilter": EXTMETADATA,
            "iiextmetadatalanguage": "en", "maxlag": MAXLAG_S})
        self.budget.after_call(answer.headers)
        data = answer.data
        if not isinstance(data, dict):
            raise SearchError("Wikimedia Commons answered JSON that is not an object")
        error = data.get("error")
        if isinstance(error, dict):
            if error.get("code") == "maxlag":
                raise RateLimited("Wikimedia Commons is lagging (maxlag)", retry_after(answer.headers) or MAXLAG_S)
            raise SearchError(f"Wikimedia Commons refused the search: {plain_text(error.get('info'))[:200]}")
        found = data.get("query", {"pages": []})  # a search that finds nothing answers no "query" at all
        pages = found.get("pages", []) if isinstance(found, dict) else None
        if not isinstance(pages, list):
            raise SearchError("Wikimedia Commons answered JSON without a list of pages")
        pages = sorted((p for p in pages if isinstance(p, dict)),
                       key=lambda p: p["index"] if type(p.get("index")) is int else 1 << 30)
        more = (data.get("continue") or {}).get("gsroffset") if isinstance(data.get("continue"), dict) else None
        return pages, more if type(more) is int and more > offset else None

    @staticmethod
    def _to_hit(page: dict, query: str) -> ImageHit | None:
        infos = page.get("imageinfo")
        info = infos[0] if isinstance(infos, list) and infos and isinstance(infos[0], dict) else None
        if info is None or not isinstance(info.get("url"), str):
            return None  # a search hit without a file (a deleted or missing one): nothing to show
        title = str(page.get("title") or "").removeprefix("File:")
        mime = info.get("mime") if isinstance(info.get("mime"), str) else ""
        size = {k: v if type(v) is int and v > 0 else None for k, v in
                (("width", info.get("width")), ("height", info.get("height")))}
        required = _meta(info, "AttributionRequired").lower()
        return ImageHit(url=info["url"], page_url=str(info.get("descriptionurl") or ""),
                        title=_meta(info, "ObjectName") or title.rsplit(".", 1)[0], query=query,
                        width=size["width"], height=size["height"], source="wikimedia",
                        license=license_name(_meta(info, "LicenseShortName")), creator=_meta(info, "Artist"),
                        license_url=_meta(info, "LicenseUrl"), attribution_required=required != "false",
                        provider="wikimedia", skipped=skip_reason(mime))
