"""Stand-ins for Openverse and Wikimedia Commons on a pytest-httpserver (127.0.0.1), answering in
each API's documented JSON shape, and serving real photos from the shared datasets.

The shapes are copied from the APIs' own examples: Openverse's image search response
(WordPress/openverse, api/examples/image_responses.py: "Tree Bark Photo" by Tim Sullivan) and
a MediaWiki `generator=search&prop=imageinfo&iiprop=url|extmetadata&formatversion=2` answer
(Commons' CommonsMetadata fields: LicenseShortName, Artist (HTML), AttributionRequired,
LicenseUrl, ObjectName). Each stand-in answers from a script of replies, one per call, and
records the query parameters and headers of every call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from werkzeug import Request, Response


def openverse_result(url: str, title: str = "Tree Bark Photo", license: str = "cc0", version: str = "1.0",
                     creator: str = "Tim Sullivan", filetype: str = "jpg", **extra) -> dict:
    """One result as Openverse's /v1/images/ documents it (its example, with our URL and licence)."""
    landing = extra.pop("landing", "https://stocksnap.io/photo/XNVBVXO3B7")
    deed = {"cc0": "https://creativecommons.org/publicdomain/zero/1.0/"}.get(
        license, f"https://creativecommons.org/licenses/{license}/{version}/")
    return {
        "id": "4bc43a04-ef46-4544-a0c1-63c63f56e276", "title": title, "indexed_on": "2022-08-27T17:39:48Z",
        "foreign_landing_url": landing, "url": url, "creator": creator,
        "creator_url": "https://www.secretagencygroup.com", "license": license, "license_version": version,
        "license_url": deed, "provider": "stocksnap", "source": "stocksnap", "category": "photograph",
        "filesize": 896128, "filetype": filetype,
        "tags": [{"accuracy": None, "name": "tree", "unstable__provider": "stocksnap"}],
        "attribution": f'"{title}" by {creator} is marked with CC0 1.0.', "fields_matched": ["title"],
        "mature": False, "height": 4016, "width": 6016,
        "thumbnail": "https://api.openverse.org/v1/images/4bc43a04-ef46-4544-a0c1-63c63f56e276/thumb/",
        "detail_url": "https://api.openverse.org/v1/images/4bc43a04-ef46-4544-a0c1-63c63f56e276/",
        "related_url": "https://api.openverse.org/v1/images/4bc43a04-ef46-4544-a0c1-63c63f56e276/related/",
        "unstable__sensitivity": [], **extra,
    }


def openverse_page(results: list[dict], page: int = 1, page_count: int = 1) -> dict:
    return {"result_count": len(results) * page_count, "page_count": page_count, "page_size": 20, "page": page,
            "results": results}


OPENVERSE_HEADERS = {  # what api.openverse.org sends an anonymous client with budget left
    "X-RateLimit-Limit-anon_burst": "20/min", "X-RateLimit-Available-anon_burst": "19",
    "X-RateLimit-Limit-anon_sustained": "200/day", "X-RateLimit-Available-anon_sustained": "199",
}
THROTTLED = {"detail": "Request was throttled. Expected available in 7 seconds."}  # DRF's 429 body


def commons_page(index: int, url: str, title: str, mime: str = "image/jpeg", license: str = "CC BY-SA 4.0",
                 artist: str = '<a href="//commons.wikimedia.org/wiki/User:Ana" title="User:Ana">Ana</a> &amp; Bo',
                 required: str = "true") -> dict:
    """One page of a Commons file search with its imageinfo, as formatversion=2 answers it."""
    name = title.replace(" ", "_")
    meta = {
        "ObjectName": {"value": title.rsplit(".", 1)[0], "source": "mediawiki-metadata", "hidden": ""},
        "Artist": {"value": artist, "source": "commons-desc-page"},
        "LicenseShortName": {"value": license, "source": "commons-desc-page", "hidden": ""},
        "LicenseUrl": {"value": "https://creativecommons.org/licenses/by-sa/4.0", "source": "commons-desc-page",
                       "hidden": ""},
        "AttributionRequired": {"value": required, "source": "commons-desc-page", "hidden": ""},
    }
    return {"pageid": 1000 + index, "ns": 6, "title": f"File:{title}", "index": index, "imagerepository": "local",
            "imageinfo": [{"size": 123456, "width": 640, "height": 480, "url": url,
                           "descriptionurl": f"https://commons.wikimedia.org/wiki/File:{name}",
                           "descriptionshorturl": f"https://commons.wikimedia.org/w/index.php?curid={1000 + index}",
                           "mime": mime, "extmetadata": meta}]}


def commons_answer(pages: list[dict], next_offset: int | None = None) -> dict:
    answer: dict = {"batchcomplete": True, "query": {"pages": pages}}
    if next_offset is not None:
        answer["continue"] = {"gsroffset": next_offset, "continue": "gsroffset||"}
    return answer


MAXLAG = {"error": {"code": "maxlag", "info": "Waiting for 10.64.48.35: 6 seconds lagged.", "host": "10.64.48.35",
                    "lag": 6, "type": "db"}, "servedby": "mw1234"}


@dataclass
class Reply:
    status: int = 200
    body: object = None           # JSON-able, or bytes sent as they are
    headers: dict = field(default_factory=dict)


@dataclass
class ApiStandIn:
    """Answers one API path from a script of replies, one per call (the last one repeats)."""
    replies: list[Reply] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)        # each call's query parameters
    user_agents: list[str] = field(default_factory=list)

    def __call__(self, request: Request) -> Response:
        self.calls.append(request.args.to_dict())
        self.user_agents.append(request.headers.get("User-Agent", ""))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        return Response(body, status=reply.status, headers=reply.headers, content_type="application/json")


def serve_photos(httpserver, photos: list[Path], prefix: str) -> list[str]:
    """Each photo at /<prefix><i>.jpg on the server; their URLs."""
    urls = []
    for i, photo in enumerate(photos):
        path = f"/{prefix}{i}.jpg"
        httpserver.expect_request(path).respond_with_data(photo.read_bytes(), content_type="image/jpeg")
        urls.append(httpserver.url_for(path))
    return urls


def install(httpserver, monkeypatch) -> tuple[ApiStandIn, ApiStandIn]:
    """Both stand-ins on the server, reached through NANOSTREAM_OPENVERSE_URL / NANOSTREAM_WIKIMEDIA_URL."""
    openverse, commons = ApiStandIn(), ApiStandIn()
    httpserver.expect_request("/v1/images/").respond_with_handler(openverse)
    httpserver.expect_request("/w/api.php").respond_with_handler(commons)
    base = httpserver.url_for("").rstrip("/")
    monkeypatch.setenv("NANOSTREAM_OPENVERSE_URL", base)
    monkeypatch.setenv("NANOSTREAM_WIKIMEDIA_URL", base)
    return openverse, commons
