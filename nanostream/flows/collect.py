"""Web image search of a project, written once: `nanostream images search`, the worker's search
job and the Images page all go through search_project and read its SearchSummary.

Category by category: the query variants (its name, its search terms, the caller's extra
terms), the hits downloaded and the new ones stored with their provenance. One Pacer spaces
every live call of the run, within and between categories, and one QueryCache
(NANOSTREAM_HOME/search-cache) answers a repeated query without calling the engine. When the
engine stays rate limited, the categories after it are not searched: what was found stays, and
the summary says where it stopped.

Sources: `--source auto` (the default) tries the licensed sources first (Openverse, then
Wikimedia Commons) and DuckDuckGo last, each for what the ones before it did not find; a source
that is rate limited or fails is not asked again during the run, one that runs dry only for that
category. DuckDuckGo reports no licence, so it is searched only with `--license any`. Each
category's summary says which source gave what (SourceUse). NANOSTREAM_SEARCH_PROVIDER names a
factory ("module:function", called with no arguments) whose SearchProvider replaces them all:
tests use it to search a local stand-in.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .. import paths
from ..store.licenses import check_filter
from ..store.records import StoreError

# The sources are imported where they are used: every CLI command imports this module (for its
# defaults), and most need no HTTP stack.
if TYPE_CHECKING:
    from ..sources.search import Pacer, QueryCache, SearchProvider
    from ..store.db import Store

PROVIDER_ENV = "NANOSTREAM_SEARCH_PROVIDER"
DEFAULT_PER_CATEGORY = 30  # enough for a first model (a few-shot head needs ~10); the user can search again
ONLINE_TIMEOUT_S = 5.0     # a reachable engine accepts in well under a second
STOPPED = "not searched: the search was stopped"
UNLICENSED_NOTE = "not asked: its images have no licence, and this search keeps licensed ones only"
REMOVED = "not searched: the category was removed during the search"


class SearchUnavailable(Exception):
    """The search cannot start (a provider that does not load, no internet); the message says why."""


class NothingToSearch(SearchUnavailable):
    """The project has no categories to search."""


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class Duplicate:
    url: str
    image_id: int   # the image already in the project
    category: str   # where that image is: possibly another category


@dataclass(frozen=True)
class FailedDownload:
    url: str
    reason: str     # in words, from download.fetch_images or the store


@dataclass(frozen=True)
class SourceUse:
    """What one source did for one category."""
    name: str                # "openverse", "wikimedia", "ddg" (a stand-in: its name)
    status: str              # "gave", "dry", "rate limited", "failed" or "not asked"
    found: int = 0           # new hits it gave whose licence the filter admits
    unlicensed: int = 0      # hits left out by the licence filter
    skipped: tuple[FailedDownload, ...] = ()  # results that are no usable photo (SVG, video), with why
    message: str = ""        # why it was not asked, in words; "" when it was

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped": [asdict(f) for f in self.skipped]}  # JSON lists, as read back


@dataclass(frozen=True)
class CategorySearch:
    name: str
    searched: bool = True                    # False: skipped (rate limited before it, stopped, removed)
    found: int = 0                           # unique hits the search returned
    added: tuple[int, ...] = ()              # ids of the new images
    duplicates: tuple[Duplicate, ...] = ()   # downloaded, but already in the project
    failed: tuple[FailedDownload, ...] = ()  # hits that gave no image
    errors: tuple[str, ...] = ()             # messages for the user
    queries: tuple[str, ...] = ()            # the queries run, cached ones included
    rate_limited: bool = False               # the engine asked us to slow down during this category
    sources: tuple[SourceUse, ...] = ()      # which source gave what, in the order they were tried

    def to_dict(self) -> dict:
        return {"searched": self.searched, "found": self.found, "added": list(self.added),
                "duplicates": [asdict(d) for d in self.duplicates], "failed": [asdict(f) for f in self.failed],
                "errors": list(self.errors), "queries": list(self.queries), "rate_limited": self.rate_limited,
                "sources": [u.to_dict() for u in self.sources]}

    @classmethod
    def from_dict(cls, name: str, data: Mapping) -> CategorySearch:
        sources = tuple(SourceUse(**{**u, "skipped": tuple(FailedDownload(**f) for f in u["skipped"])})
                        for u in data.get("sources", ()))  # jobs stored before sources were counted have none
        return cls(name, bool(data["searched"]), int(data["found"]), tuple(data["added"]),
                   tuple(Duplicate(**d) for d in data["duplicates"]),
                   tuple(FailedDownload(**f) for f in data["failed"]),
                   tuple(data["errors"]), tuple(data["queries"]), bool(data["rate_limited"]), sources)


@dataclass(frozen=True)
class SearchSummary:
    project: str
    categories: tuple[CategorySearch, ...]  # in the project's order
    counts: Mapping[str, int]               # images per category once the search ended
    stopped_by: str | None = None           # the category the engine rate limited; later ones were skipped
    cancelled: bool = False                 # should_stop() ended the search early

    @property
    def added(self) -> int:
        return sum(len(c.added) for c in self.categories)

    @property
    def rate_limited(self) -> bool:
        return self.stopped_by is not None

    def to_dict(self) -> dict:
        """JSON for `images search --json` and the job's result; keys are only ever added. "order"
        keeps the categories' order, which a JSON object need not (the store sorts its keys)."""
        return {"project": self.project, "categories": {c.name: c.to_dict() for c in self.categories},
                "counts": dict(self.counts), "added": self.added, "rate_limited": self.rate_limited,
                "stopped_by": self.stopped_by, "cancelled": self.cancelled,
                "order": [c.name for c in self.categories]}

    @classmethod
    def from_dict(cls, data: Mapping) -> SearchSummary:
        """The summary to_dict wrote; ValueError for anything else."""
        try:
            if sorted(data["order"]) != sorted(data["categories"]):
                raise ValueError("its order does not name its categories")
            return cls(data["project"],
                       tuple(CategorySearch.from_dict(name, data["categories"][name]) for name in data["order"]),
                       dict(data["counts"]), data["stopped_by"], bool(data["cancelled"]))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a search summary ({type(exc).__name__}: {exc})") from None


def read_summary(result: Mapping | None) -> SearchSummary | None:
    """A search job's stored summary; None when it has none (stopped before it began) or one
    written by an older NanoStream, so a page never breaks on an old job."""
    try:
        return SearchSummary.from_dict(result)
    except ValueError:
        return None


# ---------------------------------------------------------------- provider

def load_provider() -> SearchProvider | None:
    """NANOSTREAM_SEARCH_PROVIDER's factory's provider if set, else None (the --source decides)."""
    spec = os.environ.get(PROVIDER_ENV, "").strip()
    if not spec:
        return None
    module_name, _, factory_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name or "provider")
    except (ImportError, AttributeError, ValueError) as exc:  # ValueError: an empty module name
        raise SearchUnavailable(f"{PROVIDER_ENV}={spec[:200]!r} is not an importable 'module:factory' "
                                f"({exc})") from None
    return factory()


def check_online(provider: SearchProvider) -> None:
    """Fail at once when the provider's engine cannot be reached: otherwise every query would
    wait out its retries before saying the same thing less clearly."""
    reach = getattr(provider, "reach", None)
    if reach is None:  # a stand-in (tests): nothing to reach
        return
    try:
        socket.create_connection(reach, timeout=ONLINE_TIMEOUT_S).close()
    except OSError as exc:
        raise SearchUnavailable(f"You seem to be offline: the image search ({reach[0]}) cannot be reached "
                                f"({exc.strerror or exc}). Upload or add photos you have instead, or "
                                f"search again later.") from None


# ---------------------------------------------------------------- the search

Progress = Callable[[str, int, int], None]


def search_project(
    store: Store,
    project: str,
    categories: Sequence[str] | None = None,
    per_category: int = DEFAULT_PER_CATEGORY,
    terms: str = "",
    provider: SearchProvider | None = None,
    on_progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_category: Callable[[SearchSummary], None] | None = None,
    source: str = "auto",
    license: str = "any",
) -> SearchSummary:
    """Search the web for the images of some categories (all when None), download them and add
    the new ones, category by category.

    terms: comma-separated extra query variants for every category, after its own search terms.
    source: "auto" (licensed sources first, DuckDuckGo last) or one of search.PROVIDERS; provider
    (or NANOSTREAM_SEARCH_PROVIDER) replaces them. license: a licenses.LICENSE_FILTERS key.
    on_progress(stage, done, total) for stages "search NAME" (queries) and "download NAME".
    should_stop() is checked between queries and downloads: what was stored stays.
    on_category(the summary so far) after each category, for a page showing partial results.
    Raises StoreError for an unknown project or category, NothingToSearch, SearchUnavailable.
    """
    from ..sources.search import QueryCache

    project = store.get_project(project).name
    names = _categories_to_search(store, project, categories)
    if not names:
        raise NothingToSearch(f"project '{project}' has no categories to search")
    try:
        check_filter(license)
    except ValueError as exc:
        raise SearchUnavailable(str(exc)) from None
    providers = [provider] if provider is not None else _providers(source, license)
    if len(providers) == 1:
        check_online(providers[0])
    run = _Run(store, project, per_category, terms, tuple(providers), license,
               QueryCache(paths.home() / "search-cache"), on_progress, should_stop)
    done: list[CategorySearch] = []
    stopped_by = None
    for name in names:
        if stopped_by is not None:
            done.append(CategorySearch(name, searched=False, errors=(
                f"not searched: the search engine asked us to slow down while searching '{stopped_by}'; "
                f"search again in a few minutes",)))
        elif should_stop and should_stop():
            done.append(CategorySearch(name, searched=False, errors=(STOPPED,)))
        else:
            done.append(run.category(name))
            if done[-1].rate_limited and run.exhausted():
                stopped_by = name
        if on_category:
            on_category(SearchSummary(project, tuple(done), store.counts(project), stopped_by))
    return SearchSummary(project, tuple(done), store.counts(project), stopped_by,
                         cancelled=bool(should_stop and should_stop()))


def _providers(source: str, license: str) -> list[SearchProvider]:
    """NANOSTREAM_SEARCH_PROVIDER's provider, else the providers source stands for, in order."""
    from ..sources.providers import make_provider, sources_to_try
    from ..sources.search import SearchError

    override = load_provider()
    if override is not None:
        return [override]
    try:
        return [make_provider(name, license) for name in sources_to_try(source)]
    except SearchError as exc:
        raise SearchUnavailable(str(exc)) from None


def source_name(provider: SearchProvider) -> str:
    """The source a provider is in summaries: its registry name, or a stand-in's own name."""
    return getattr(provider, "source", None) or provider.name


def _categories_to_search(store: Store, project: str, categories: Sequence[str] | None) -> list[str]:
    """The categories to search in the project's order, each once, by their stored names."""
    known = [c.name for c in store.list_categories(project)]
    if categories is None:
        return known
    wanted = {store.get_category(project, name).name for name in categories}
    return [name for name in known if name in wanted]


@dataclass(frozen=True)
class _Run:
    """What every category of one search shares: one pacer per source and one cache for the whole
    run, and the sources that are not to be asked again (rate limited or failed: why, in words)."""
    store: Store
    project: str
    per_category: int
    terms: str
    providers: tuple[SearchProvider, ...]
    license: str
    cache: QueryCache
    on_progress: Progress | None
    should_stop: Callable[[], bool] | None
    pacers: dict[str, Pacer] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def stage(self, stage: str) -> Callable[[int, int], None] | None:
        if self.on_progress is None:
            return None
        return lambda done, total: self.on_progress(stage, done, total)

    def exhausted(self) -> bool:
        """No source is left to ask: the later categories cannot be searched in this run."""
        return all(source_name(p) in self.unavailable or self._unlicensed(p) for p in self.providers)

    def _unlicensed(self, provider: SearchProvider) -> bool:
        from ..sources.providers import UNLICENSED

        return self.license != "any" and source_name(provider) in UNLICENSED and len(self.providers) > 1

    def category(self, name: str) -> CategorySearch:
        from ..sources import download
        from ..sources.ingest import add_search_hits

        try:
            category = self.store.get_category(self.project, name)
        except StoreError:
            return CategorySearch(name, searched=False, errors=(REMOVED,))
        extra = ",".join(t for t in (category.search_terms, self.terms) if t.strip())
        hits, uses, errors, queries = self._search(name, extra)
        fetched = download.fetch_images([hit.url for hit in hits], on_progress=self.stage(f"download {name}"),
                                        should_stop=self.should_stop)
        stored = add_search_hits(self.store, self.project, name, hits, fetched)
        return CategorySearch(
            name, found=len(hits), added=tuple(stored["added"]),
            duplicates=tuple(Duplicate(**d) for d in stored["duplicates"]),
            # "cancelled": never tried, because the user stopped the search; not a failure
            failed=tuple(FailedDownload(**f) for f in stored["failed"] if f["reason"] != "cancelled"),
            errors=tuple(errors), queries=tuple(queries),
            rate_limited=any(u.status == "rate limited" for u in uses), sources=tuple(uses))

    def _search(self, name: str, extra: str) -> tuple[list, list[SourceUse], list[str], list[str]]:
        """Each source in turn for what the ones before it did not find: (hits, uses, errors, queries)."""
        from ..sources.search import Pacer, SearchPacing, search_category

        hits: dict[str, object] = {}
        uses, errors, queries = [], [], []
        for provider in self.providers:
            source = source_name(provider)
            if len(hits) >= self.per_category or (self.should_stop and self.should_stop()):
                break
            if source in self.unavailable or self._unlicensed(provider):
                uses.append(SourceUse(source, "not asked", message=self.unavailable.get(source) or UNLICENSED_NOTE))
                continue
            pacing = getattr(provider, "pacing", None) or SearchPacing()
            pacer = self.pacers.setdefault(source, Pacer(pacing.pause))
            report = search_category(name, provider, self.per_category - len(hits), extra, pacing, self.cache,
                                     on_progress=self.stage(f"search {name}"), should_stop=self.should_stop,
                                     pacer=pacer, license_filter=self.license, exclude=frozenset(hits))
            hits.update((hit.url, hit) for hit in report.hits)
            status = ("rate limited" if report.rate_limited else "failed" if report.failed
                      else "gave" if report.hits else "dry")
            if status in ("rate limited", "failed"):
                self.unavailable[source] = f"{status} earlier in this search"
            uses.append(SourceUse(source, status, len(report.hits), report.unlicensed,
                                  tuple(FailedDownload(h.url, h.skipped) for h in report.skipped)))
            prefix = f"{source}: " if len(self.providers) > 1 else ""
            errors += [prefix + e for e in report.errors]
            queries += [q for q in report.queries if q not in queries]
        return list(hits.values()), uses, errors, queries
