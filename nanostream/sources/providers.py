"""The image sources by name: what `--source` accepts, in the order `--source auto` tries them.

Each factory takes the licence filter (licenses.LICENSE_FILTERS), so a source that can filter on
its side does; the modules load when a search makes a provider (the CLI reads the names alone).
"""

from __future__ import annotations

from collections.abc import Callable

from .search import SearchError, SearchProvider


def _ddg(license_filter: str) -> SearchProvider:
    from .search import DDGSProvider

    return DDGSProvider()  # its engines' licence filters say nothing per image: search_category filters


def _openverse(license_filter: str) -> SearchProvider:
    from .openverse import OpenverseProvider

    return OpenverseProvider(license_filter=license_filter)


def _wikimedia(license_filter: str) -> SearchProvider:
    from .wikimedia import WikimediaProvider

    return WikimediaProvider()


# source name -> factory(license filter); in the order --source auto tries them: licensed first,
# DuckDuckGo (any subject, no licence) last.
PROVIDERS: dict[str, Callable[[str], SearchProvider]] = {"openverse": _openverse, "wikimedia": _wikimedia,
                                                          "ddg": _ddg}
AUTO = "auto"
SOURCES = (AUTO, *PROVIDERS)  # what --source accepts
UNLICENSED = frozenset({"ddg"})  # every hit's licence unknown: worth searching only with --license any


def _check_source(source: str) -> None:
    """SearchError with the valid names unless source is one of PROVIDERS."""
    if source not in PROVIDERS:
        raise SearchError(f"unknown image source {source[:200]!r}; valid: {', '.join(SOURCES)}")


def make_provider(source: str, license_filter: str = "any") -> SearchProvider:
    """The provider registered as source, asking its engine for license_filter's images where it
    can; SearchError with the valid names for an unknown one."""
    _check_source(source)
    return PROVIDERS[source](license_filter)


def sources_to_try(source: str) -> list[str]:
    """The provider names a --source value stands for, in order; SearchError for an unknown one."""
    if source == AUTO:
        return list(PROVIDERS)
    _check_source(source)
    return [source]
