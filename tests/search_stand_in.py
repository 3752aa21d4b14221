"""A stand-in web search provider for the CLI and worker tests (NANOSTREAM_SEARCH_PROVIDER =
"search_stand_in:stand_in"): each query is answered with the script's hits for the category it
starts with, or raises the script's exception; on_query(query) runs first, for a test that acts
mid-search. Tests set StandIn.script and reset StandIn.queries and StandIn.on_query."""

from __future__ import annotations

from dataclasses import replace

from nanostream.sources.search import ImageHit, SearchPacing

SPEC = f"{__name__}:stand_in"


class StandIn:
    name = "stand-in"
    pacing = SearchPacing(pause=0.0, retries=0)  # a local stand-in needs no politeness
    script: dict[str, list[ImageHit] | Exception] = {}
    queries: list[str] = []
    on_query = None

    def images(self, query: str, max_results: int) -> list[ImageHit]:
        StandIn.queries.append(query)
        if StandIn.on_query:
            StandIn.on_query(query)
        answer = self.script[next(c for c in self.script if query == c or query.startswith(c + " "))]
        if isinstance(answer, Exception):
            raise answer
        return [replace(h, query=query) for h in answer[:max_results]]


def stand_in() -> StandIn:
    return StandIn()
