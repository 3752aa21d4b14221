"""Openverse: Creative Commons and public-domain images, each with its licence, creator and landing page.

    GET {NANOSTREAM_OPENVERSE_URL}/v1/images/?q=...&page=N&page_size=20
    -> {"result_count", "page_count", "page_size", "page", "results": [{"url", "foreign_landing_url",
        "title", "creator", "license", "license_version", "license_url", "filetype", ...}]}

(https://api.openverse.org/v1/; the example response in WordPress/openverse's
api/examples/image_responses.py.) Anonymous clients get at most 20 results a page (a larger
page_size is refused) and 20 pages; throttling is reported in X-RateLimit-* headers and a 429
with Retry-After (api_client.RateBudget honours both). The licence filter is asked of the API
(`license=cc0,pdm,by,by-sa`, `license_type=commercial`) and checked again by search_category.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from ..store.licenses import CC0, PUBLIC_DOMAIN, license_family, license_name
from .api_client import RateBudget, get_json
from .search import ImageHit, SearchError, SearchPacing

BASE_ENV = "NANOSTREAM_OPENVERSE_URL"
DEFAULT_BASE = "https://api.openverse.org"
PAGE_SIZE = 20   # the most an anonymous client may ask for
MAX_PAGES = 20   # Openverse answers no deeper (2022: "results constrained to 20 pages")
SERVER_FILTERS = {"any": {}, "free": {"license": "cc0,pdm,by,by-sa"}, "commercial": {"license_type": "commercial"}}
NOT_PHOTOS = {"svg": "an SVG drawing, not a photo"}  # Openverse's filetype -> why it is skipped


def _text(value: Any) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


def _size(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


class OpenverseProvider:
    """Openverse's image search, page after page, under its own rate limits."""

    source = "openverse"  # its name in search.PROVIDERS
    pacing = SearchPacing(pause=0.0, retries=2)  # pauses come from its headers (RateBudget), not a fixed wait

    def __init__(self, base_url: str | None = None, license_filter: str = "any",
                 sleep: Callable[[float], None] = time.sleep):
        self.base_url = (base_url or os.environ.get(BASE_ENV) or DEFAULT_BASE).rstrip("/")
        self.filters = SERVER_FILTERS.get(license_filter, {})
        self.name = f"openverse/{self.base_url}/{license_filter}"  # the cache key: other filters, other hits
        self.budget = RateBudget("Openverse", sleep=sleep)

    def images(self, query: str, max_results: int) -> list[ImageHit]:
        hits: list[ImageHit] = []
        for page in range(1, MAX_PAGES + 1):
            results, pages = self._page(query, page)
            hits += [self._to_hit(result, query) for result in results if isinstance(result, dict)]
            if len([h for h in hits if not h.skipped]) >= max_results or not results or page >= pages:
                break
        return hits

    def _page(self, query: str, page: int) -> tuple[list, int]:
        self.budget.before_call()
        answer = get_json("Openverse", f"{self.base_url}/v1/images/",
                          {"q": query, "page": page, "page_size": PAGE_SIZE, "mature": "false", **self.filters})
        self.budget.after_call(answer.headers)
        data = answer.data
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise SearchError("Openverse answered JSON without a list of results")
        pages = data.get("page_count")
        return data["results"], pages if type(pages) is int else page

    @staticmethod
    def _to_hit(result: dict, query: str) -> ImageHit:
        url = _text(result.get("url"))
        license = license_name(_text(result.get("license")), _text(result.get("license_version")))
        skipped = "" if url else "no image URL in Openverse's answer"
        skipped = skipped or NOT_PHOTOS.get(_text(result.get("filetype")).lower(), "")
        return ImageHit(url=url or _text(result.get("foreign_landing_url")) or _text(result.get("id")),
                        page_url=_text(result.get("foreign_landing_url")), title=_text(result.get("title")),
                        query=query, width=_size(result.get("width")), height=_size(result.get("height")),
                        source=_text(result.get("source")), license=license,
                        thumbnail=_text(result.get("thumbnail")), creator=_text(result.get("creator")),
                        license_url=_text(result.get("license_url")),
                        attribution_required=license_family(license) not in (CC0, PUBLIC_DOMAIN),
                        provider="openverse", skipped=skipped)
