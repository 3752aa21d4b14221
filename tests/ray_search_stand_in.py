"""A search stand-in that answers in any process, a Ray worker's included (tests/search_stand_in.py
keeps its script in one process's memory): NANOSTREAM_STAND_IN_HITS is JSON {category: [image
URL, ...]}, and each query starting with a category's name gets that category's URLs."""

from __future__ import annotations

import json
import os

from nanostream.sources.search import ImageHit, SearchPacing

HITS_ENV = "NANOSTREAM_STAND_IN_HITS"  # a NANOSTREAM_ variable: the ray runner forwards it to its tasks
SPEC = f"{__name__}:stand_in"


class FileStandIn:
    name = "stand-in"
    pacing = SearchPacing(pause=0.0, retries=0)  # a local stand-in needs no politeness

    def images(self, query: str, max_results: int) -> list[ImageHit]:
        script = json.loads(os.environ[HITS_ENV])
        urls = next(script[c] for c in script if query == c or query.startswith(c + " "))
        return [ImageHit(url, "https://page.example", "a photo", query, None, None, "stand-in", "")
                for url in urls[:max_results]]


def stand_in() -> FileStandIn:
    return FileStandIn()
