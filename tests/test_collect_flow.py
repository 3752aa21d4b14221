"""flows.collect: one web search driven through `nanostream images search --json` and through the
worker's search job (jobs.start_search, run in this process) gives the same summary; stopping a
job part-way keeps what it found. The provider is a stand-in (NANOSTREAM_SEARCH_PROVIDER) whose
hits point at real photos on a local HTTP server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanostream import jobs, worker
from nanostream.cli.main import main
from nanostream.flows.collect import (
    PROVIDER_ENV, CategorySearch, Duplicate, FailedDownload, SearchSummary, SourceUse, read_summary, search_project,
)
from nanostream.sources.search import ImageHit, RateLimited
from nanostream.store.db import Store
from search_stand_in import SPEC, StandIn


@pytest.fixture
def web(monkeypatch, httpserver, datasets):
    """The stand-in's script: ants (4 hits, one a copy of another), bees (2 and one broken page),
    wasps (rate limited), flies (never asked)."""
    monkeypatch.setenv(PROVIDER_ENV, SPEC)
    monkeypatch.setenv("NANOSTREAM_ALLOW_PRIVATE_HOSTS", "1")  # the image server is on 127.0.0.1
    photos = {cls: sorted((datasets / "hymenoptera" / "train" / cls).glob("*.jpg")) for cls in ("ants", "bees")}

    def serve(path: str, photo: Path) -> ImageHit:
        httpserver.expect_request(path).respond_with_data(photo.read_bytes(), content_type="image/jpeg")
        return ImageHit(httpserver.url_for(path), f"https://example.org{path}", "", "", None, None, "stand-in",
                        "CC BY 4.0")  # licensed: the default filter (free) keeps them

    httpserver.expect_request("/broken.jpg").respond_with_data("<html>", content_type="text/html")
    StandIn.script = {
        "ants": [serve(f"/ant{i}.jpg", p) for i, p in enumerate(photos["ants"][:3])]
        + [serve("/ant0-again.jpg", photos["ants"][0])],
        "bees": [serve(f"/bee{i}.jpg", p) for i, p in enumerate(photos["bees"][:2])]
        + [ImageHit(httpserver.url_for("/broken.jpg"), "", "", "", None, None, "stand-in", "CC0")],
        "wasps": RateLimited("429 Too Many Requests"),
        "flies": [],
    }
    StandIn.queries, StandIn.on_query = [], None
    return httpserver


def new_home(tmp_path: Path, name: str, monkeypatch) -> Path:
    """A fresh store with the same project: image ids then match between two homes."""
    home = tmp_path / name
    monkeypatch.setenv("NANOSTREAM_HOME", str(home))
    with Store(home) as store:
        store.create_project("insects", ["ants", "bees", "wasps", "flies"])
        store.set_search_terms("insects", "ants", "macro")
    return home


def search_by_cli(capsys, *argv) -> dict:
    assert main(["images", "search", "insects", "--quiet", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def search_by_job(home: Path, monkeypatch, **params) -> jobs.Job:
    """jobs.start_search with the worker's run_job in this process instead of a worker process."""
    monkeypatch.setattr(jobs, "_launch", lambda store, job_id: worker.run_job(store, job_id))
    with Store(home) as store:
        return store.get_job(jobs.start_search(store, "insects", **params))


def test_the_cli_and_the_worker_give_the_same_summary(web, tmp_path, monkeypatch, capsys):
    new_home(tmp_path, "cli", monkeypatch)
    by_cli = search_by_cli(capsys, "--per-category", "10", "--terms", "close-up")
    cli_queries, StandIn.queries = StandIn.queries, []
    job_home = new_home(tmp_path, "job", monkeypatch)
    job = search_by_job(job_home, monkeypatch, per_category=10, terms="close-up")

    assert job.status == "done" and not job.error
    assert {key: job.result[key] for key in by_cli} == by_cli  # the same JSON, key for key (a job adds where it ran)
    assert StandIn.queries == cli_queries
    summary = SearchSummary.from_dict(job.result)
    assert summary == SearchSummary.from_dict(by_cli)
    assert summary.to_dict() == by_cli  # nothing is lost on the way through the typed value
    ants, bees, wasps, flies = summary.categories
    assert ants == CategorySearch("ants", found=4, added=(1, 2, 3),
                                  duplicates=(Duplicate(web.url_for("/ant0-again.jpg"), 1, "ants"),),
                                  queries=("ants", "ants photo", "ants macro", "ants close-up"),
                                  sources=(SourceUse("stand-in", "gave", 4),))
    (broken,) = bees.failed
    assert (bees.added, bees.found, broken.url) == ((4, 5), 3, web.url_for("/broken.jpg"))
    assert broken == FailedDownload(web.url_for("/broken.jpg"), broken.reason) and broken.reason
    assert wasps == CategorySearch("wasps", queries=("wasps",), rate_limited=True, errors=(
        "Rate limited while searching 'wasps' (429 Too Many Requests). Kept the 0 images found so far; "
        "wait a few minutes, then search again.",), sources=(SourceUse("stand-in", "rate limited"),))
    assert flies == CategorySearch("flies", searched=False, errors=(
        "not searched: the search engine asked us to slow down while searching 'wasps'; "
        "search again in a few minutes",))
    assert not any(q.startswith("flies") for q in cli_queries)  # no more calls once refused
    assert dict(summary.counts) == {"ants": 3, "bees": 2, "wasps": 0, "flies": 0}
    assert (summary.added, summary.stopped_by, summary.rate_limited, summary.cancelled) == (5, "wasps", True, False)
    assert list(by_cli) == ["project", "categories", "counts", "added", "rate_limited",  # today's keys
                            "stopped_by", "cancelled", "order"]


def test_a_second_search_comes_from_the_cache_for_both_front_ends(web, tmp_path, monkeypatch, capsys):
    home = new_home(tmp_path, "home", monkeypatch)
    first = search_by_cli(capsys, "--category", "ants", "--category", "BEES")
    assert list(first["categories"]) == ["ants", "bees"]  # the project's names and order
    StandIn.queries = []
    again = SearchSummary.from_dict(search_by_job(home, monkeypatch, categories=["bees", "ants"]).result)
    assert StandIn.queries == []  # the CLI's queries answered the worker's search
    assert again.added == 0 and [c.name for c in again.categories] == ["ants", "bees"]
    assert [len(c.duplicates) for c in again.categories] == [4, 2]


def test_stopping_the_job_midway_keeps_what_it_found(web, tmp_path, monkeypatch):
    home = new_home(tmp_path, "home", monkeypatch)

    def cancel_at_bees(query: str) -> None:
        if query == "bees":
            with Store(home) as store:
                store.request_cancel(jobs.active_job(store, "insects", "search").id)

    StandIn.on_query = cancel_at_bees
    job = search_by_job(home, monkeypatch, per_category=10)
    assert (job.status, job.message) == ("cancelled", "Stopped. The images found so far were kept.")
    summary = SearchSummary.from_dict(job.result)
    ants, bees, wasps, flies = summary.categories
    assert len(ants.added) == 3 and ants.searched
    # bees: its first query answered, then no more queries and no downloads (never tried: no failures)
    assert (bees.queries, bees.found, bees.added, bees.failed) == (("bees",), 3, (), ())
    assert wasps == CategorySearch("wasps", searched=False, errors=("not searched: the search was stopped",))
    assert flies == CategorySearch("flies", searched=False, errors=("not searched: the search was stopped",))
    assert summary.cancelled and not summary.rate_limited
    with Store(home) as store:
        assert store.counts("insects") == {"ants": 3, "bees": 0, "wasps": 0, "flies": 0}


def test_partial_summaries_after_each_category(web, tmp_path, monkeypatch):
    home = new_home(tmp_path, "home", monkeypatch)
    partial: list[SearchSummary] = []
    with Store(home) as store:
        final = search_project(store, "insects", ["ants", "bees"], per_category=10, on_category=partial.append)
    assert [[c.name for c in s.categories] for s in partial] == [["ants"], ["ants", "bees"]]
    assert dict(partial[0].counts) == {"ants": 3, "bees": 0, "wasps": 0, "flies": 0}
    assert partial[-1] == final


def test_what_cannot_be_searched(web, tmp_path, monkeypatch, capsys):
    home = new_home(tmp_path, "home", monkeypatch)
    with Store(home) as store:
        store.create_project("empty")
    assert main(["images", "search", "empty"]) == 2
    assert capsys.readouterr().err == ("error: project 'empty' has no categories to search; "
                                       "add some with `nanostream project categories empty --add NAME`\n")
    assert main(["images", "search", "insects", "--category", "moths"]) == 2
    assert "no category" in capsys.readouterr().err and StandIn.queries == []
    monkeypatch.setenv(PROVIDER_ENV, "no_such_module:factory")
    job = search_by_job(home, monkeypatch)
    assert job.status == "failed"
    assert job.error == ("NANOSTREAM_SEARCH_PROVIDER='no_such_module:factory' is not an importable "
                         "'module:factory' (No module named 'no_such_module')")


def test_read_summary_tolerates_what_is_not_one():
    assert read_summary(None) is None  # a job cancelled before it began stored nothing
    assert read_summary({"categories": {"ants": {"added": 2, "found": 3}}}) is None  # an older version's
    with pytest.raises(ValueError, match="not a search summary"):
        SearchSummary.from_dict({"project": "insects"})


def test_the_images_page_shows_the_last_search_from_its_summary(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    home = new_home(tmp_path, "home", monkeypatch)  # no images: the page starts no ranking worker
    summary = SearchSummary("insects", (
        CategorySearch("ants", found=3, added=(), queries=("ants",),
                       duplicates=(Duplicate("https://img.example/a.jpg", 7, "bees"),),
                       failed=(FailedDownload("https://img.example/b.jpg", "HTTP 404"),)),
        CategorySearch("bees", searched=False, errors=("not searched: the search was stopped",)),
    ), {"ants": 0, "bees": 0, "wasps": 0, "flies": 0}, cancelled=True)
    with Store(home) as store:
        job = store.create_job("insects", "search", {"categories": ["ants", "bees"], "per_category": 5})
        store.update_job(job.id, status="cancelled", result=summary.to_dict(), message="Stopped.")

    def images_page() -> AppTest:
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120)
        at.run()
        at.session_state["app_project"] = "insects"
        at.switch_page("pages/images.py").run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    at = images_page()
    assert "**ants**: 0 added (3 found, 1 already here, 1 failed to download)" in [c.value for c in at.caption]
    assert [w.value for w in at.warning if " added" in w.value] == [
        "**bees**: 0 added  \nnot searched: the search was stopped"]

    with Store(home) as store:  # a result an older NanoStream stored: the page still opens
        older = store.create_job("insects", "search", {"categories": ["ants"], "per_category": 5})
        store.update_job(older.id, status="done", result={"categories": {"ants": {"added": 2, "found": 3}}})
    at = images_page()
    assert [e.label.split(",")[0] for e in at.expander] == ["Last web search: done"]
    assert not any(" added" in e.value for e in [*at.caption, *at.warning])
