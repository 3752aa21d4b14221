"""Openverse and Wikimedia Commons beside DuckDuckGo: each API's documented answers mapped to hits
with their licences, pagination, rate limits and bad answers; the licence filter; `--source auto`
falling back in order; provenance stored and exported as ATTRIBUTION.md. Stand-ins on 127.0.0.1
(licensed_stand_ins.py) serve real photos from the shared datasets."""

from __future__ import annotations

import json
import sqlite3

import pytest

from licensed_stand_ins import (
    MAXLAG, OPENVERSE_HEADERS, THROTTLED, Reply, commons_answer, commons_page, install, openverse_page,
    openverse_result, serve_photos,
)
from nanostream.cli.main import main
from nanostream.sources.addresses import PRIVATE_REFUSAL
from nanostream.sources.api_client import USER_AGENT
from nanostream.sources.openverse import OpenverseProvider
from nanostream.sources.search import RateLimited, SearchError, SearchTimeout, search_category
from nanostream.sources.wikimedia import WikimediaProvider
from nanostream.store import licenses
from nanostream.store.db import Store


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def apis(httpserver, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_ALLOW_PRIVATE_HOSTS", "1")  # the stand-ins are on 127.0.0.1
    return install(httpserver, monkeypatch)


@pytest.fixture
def photos(datasets):
    return {cls: sorted((datasets / "hymenoptera" / "train" / cls).glob("*.jpg"))[:4] for cls in ("ants", "bees")}


# ---------------------------------------------------------------- licences

def test_licence_strings_read_into_families_and_unknown_ones_are_never_free():
    assert [licenses.license_name(code, version) for code, version in
            (("by-sa", "4.0"), ("cc0", "1.0"), ("pdm", "1.0"), ("CC-BY-SA-3.0", ""), ("GFDL", ""))] == [
        "CC BY-SA 4.0", "CC0 1.0", "Public domain", "CC BY-SA 3.0", "GFDL"]
    table = {text: (licenses.admits("free", text), licenses.admits("commercial", text), licenses.admits("any", text))
             for text in ("CC0 1.0", "Public domain", "CC BY 2.0", "CC BY-SA 4.0", "CC BY-ND 4.0",
                          "CC BY-NC 4.0", "CC BY-NC-SA 2.0", "GFDL", "Public", "")}
    assert table == {
        "CC0 1.0": (True, True, True), "Public domain": (True, True, True), "CC BY 2.0": (True, True, True),
        "CC BY-SA 4.0": (True, True, True), "CC BY-ND 4.0": (False, True, True),
        "CC BY-NC 4.0": (False, False, True), "CC BY-NC-SA 2.0": (False, False, True),
        "GFDL": (False, False, True), "Public": (False, False, True), "": (False, False, True)}
    with pytest.raises(ValueError, match="valid: any, free, commercial"):
        licenses.admits("cheap", "CC0")


def test_the_sentence_a_model_says_about_its_photos():
    counts = licenses.count_families(["CC BY 4.0"] * 41 + ["CC0 1.0"] * 12 + ["", "GFDL"] * 3 + [""])
    assert counts == {"CC BY": 41, "CC0": 12, "unknown licence": 7}
    assert licenses.trained_on(counts) == "trained on 60 photos: 41 CC BY, 12 CC0, 7 unknown licence"
    assert licenses.trained_on(None) == "" and licenses.trained_on({"CC0": "many"}) == ""  # old or damaged header


# ---------------------------------------------------------------- Openverse

def test_openverse_maps_its_documented_answer_and_pages_through(apis):
    openverse, _ = apis
    first = [openverse_result(f"https://img.example/{i}.jpg", license="by", version="2.0") for i in range(20)]
    second = [openverse_result("https://img.example/svg.svg", filetype="svg"),
              openverse_result("https://img.example/last.jpg", title="Last one", license="by-sa", version="4.0")]
    openverse.replies = [Reply(body=openverse_page(first, 1, 2), headers=OPENVERSE_HEADERS),
                         Reply(body=openverse_page(second, 2, 2), headers=OPENVERSE_HEADERS)]
    hits = OpenverseProvider(license_filter="free").images("tree bark", max_results=30)
    assert [call["page"] for call in openverse.calls] == ["1", "2"]  # page_count says there is no third
    assert openverse.calls[0] == {"q": "tree bark", "page": "1", "page_size": "20", "mature": "false",
                                  "license": "cc0,pdm,by,by-sa"}  # the free filter, asked of the API
    assert openverse.user_agents[0] == USER_AGENT and USER_AGENT.startswith("NanoStream/")
    last = hits[-1]
    assert (last.url, last.title, last.creator, last.license, last.provider) == (
        "https://img.example/last.jpg", "Last one", "Tim Sullivan", "CC BY-SA 4.0", "openverse")
    assert (last.page_url, last.license_url, last.attribution_required, last.source) == (
        "https://stocksnap.io/photo/XNVBVXO3B7", "https://creativecommons.org/licenses/by-sa/4.0/", True, "stocksnap")
    assert hits[20].skipped == "an SVG drawing, not a photo"
    assert OpenverseProvider(license_filter="commercial").filters == {"license_type": "commercial"}


def test_openverse_429_with_and_without_retry_after(apis):
    openverse, _ = apis
    ok = Reply(body=openverse_page([openverse_result("https://img.example/a.jpg")]), headers=OPENVERSE_HEADERS)
    openverse.replies = [Reply(429, THROTTLED, {"Retry-After": "7"}), ok]
    sleeps = Sleeps()
    report = search_category("bark", OpenverseProvider(), per_category=1, sleep=sleeps)
    assert [h.url for h in report.hits] == ["https://img.example/a.jpg"]
    assert sleeps == [7.0]  # the wait the API asked for, not our own backoff
    openverse.replies, sleeps = [Reply(429, THROTTLED), ok], Sleeps()
    search_category("moss", OpenverseProvider(), per_category=1, sleep=sleeps)
    assert len(sleeps) == 1 and 1.0 <= sleeps[0] <= 2.0  # no Retry-After: exponential backoff
    openverse.replies = [Reply(429, THROTTLED, {"Retry-After": "3600"})]
    with pytest.raises(RateLimited, match="429 Too Many Requests; it asks to wait 3600 s"):
        OpenverseProvider().images("bark", 5)  # a wait past max_backoff is not waited: the caller moves on
    assert len(openverse.calls) == 5  # and not retried


def test_openverse_spent_allowance_stops_the_next_call(apis):
    openverse, _ = apis
    spent = {**OPENVERSE_HEADERS, "X-RateLimit-Available-anon_sustained": "0"}
    openverse.replies = [Reply(body=openverse_page([openverse_result("https://img.example/a.jpg")]), headers=spent)]
    provider = OpenverseProvider()
    assert len(provider.images("bark", 5)) == 1
    with pytest.raises(RateLimited, match="Openverse's allowance of 200/day is used up"):
        provider.images("moss", 5)
    assert len(openverse.calls) == 1  # the refused call was never sent


@pytest.mark.parametrize("reply, error, message", [
    (Reply(503, {"detail": "down"}), SearchTimeout, "Openverse answered HTTP 503 (a server error; it may be back soon)"),
    (Reply(200, b"<html>maintenance</html>", {"Content-Type": "text/html"}), SearchError,
     "Openverse answered HTTP 200 with something that is not JSON (application/json)"),
    (Reply(200, {"detail": "no results key"}), SearchError, "Openverse answered JSON without a list of results"),
    (Reply(400, {"detail": "Invalid input given for fields."}), SearchError,
     "Openverse answered HTTP 400: Invalid input given for fields."),
])
def test_openverse_bad_answers_are_errors_in_words(apis, reply, error, message):
    openverse, _ = apis
    openverse.replies = [reply]
    with pytest.raises(error) as caught:
        OpenverseProvider().images("bark", 5)
    assert str(caught.value) == message


# ---------------------------------------------------------------- Wikimedia Commons

def test_wikimedia_maps_extmetadata_skips_svg_and_video_and_follows_gsroffset(apis):
    _, commons = apis
    answers = [
        Reply(body=commons_answer([commons_page(2, "https://up.example/b.webm", "Bee flight.webm", "video/webm"),
                                   commons_page(1, "https://up.example/a.jpg", "Honey bee.jpg")], next_offset=2)),
        Reply(body=commons_answer([commons_page(3, "https://up.example/c.svg", "Bee icon.svg", "image/svg+xml"),
                                   commons_page(4, "https://up.example/d.jpg", "Bee on a flower.jpg",
                                                license="GFDL", artist="Carl", required="false")])),
    ]
    commons.replies = list(answers)
    hits = WikimediaProvider(pause=0).images("bee", max_results=5)
    assert [h.url for h in hits] == ["https://up.example/a.jpg", "https://up.example/b.webm",
                                     "https://up.example/c.svg", "https://up.example/d.jpg"]  # by search rank
    first = hits[0]
    assert (first.title, first.creator, first.license, first.attribution_required) == (
        "Honey bee", "Ana & Bo", "CC BY-SA 4.0", True)  # Artist's HTML read as text
    assert first.page_url == "https://commons.wikimedia.org/wiki/File:Honey_bee.jpg"
    assert [h.skipped for h in hits] == ["", "a video, not a photo", "an SVG drawing, not a photo", ""]
    assert (hits[3].license, hits[3].attribution_required) == ("GFDL", False)  # unknown to us: kept as written
    call = commons.calls[0]
    assert (call["generator"], call["gsrnamespace"], call["gsrsearch"], call["maxlag"], call["formatversion"]) == (
        "search", "6", "bee", "5", "2")
    assert call["iiprop"] == "url|mime|size|extmetadata" and commons.calls[1]["gsroffset"] == "2"
    assert commons.user_agents == [USER_AGENT, USER_AGENT]

    commons.replies = list(answers)
    report = search_category("bee", WikimediaProvider(pause=0), per_category=5, license_filter="free",
                             sleep=Sleeps())
    assert [h.url for h in report.hits] == ["https://up.example/a.jpg"]  # GFDL is no licence the filter knows
    assert report.unlicensed == 1 and [h.skipped for h in report.skipped] == [
        "a video, not a photo", "an SVG drawing, not a photo"]


def test_wikimedia_maxlag_is_a_rate_limit_with_its_wait(apis):
    _, commons = apis
    commons.replies = [Reply(body=MAXLAG, headers={"Retry-After": "5"}),
                       Reply(body=commons_answer([commons_page(1, "https://up.example/a.jpg", "Ant.jpg")]))]
    sleeps = Sleeps()
    report = search_category("ant", WikimediaProvider(pause=0), per_category=1, sleep=sleeps)
    assert [h.url for h in report.hits] == ["https://up.example/a.jpg"] and sleeps == [5.0]


# ---------------------------------------------------------------- the whole search, through the CLI

@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NANOSTREAM_SEARCH_PROVIDER", raising=False)
    return tmp_path / "home"


def search(capsys, *argv) -> dict:
    assert main(["images", "search", "insects", "--quiet", "--json", *argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_auto_falls_back_in_order_and_credits_travel_to_the_export(apis, home, httpserver, photos, capsys, tmp_path):
    openverse, commons = apis
    ants = serve_photos(httpserver, photos["ants"], "ant")
    bees = serve_photos(httpserver, photos["bees"], "bee")
    with Store(home) as store:
        store.create_project("insects", ["ants", "bees"])
    # Openverse: ants gets one CC0 photo, one NC one (left out by "free") and runs dry; then it is throttled
    openverse.replies = [
        Reply(body=openverse_page([openverse_result(ants[0], "Red ant"),
                                   openverse_result(ants[1], "NC ant", license="by-nc", version="4.0")]),
              headers=OPENVERSE_HEADERS),
        Reply(body=openverse_page([]), headers=OPENVERSE_HEADERS),
        Reply(429, THROTTLED, {"Retry-After": "0"}),
    ]
    # Commons: for ants, a copy of Openverse's photo at another URL, a new one and a video; for bees, two
    commons.replies = [
        Reply(body=commons_answer([commons_page(1, ants[0] + "?copy", "Ant again.jpg"),
                                   commons_page(2, ants[2], "Ant on a leaf.jpg"),
                                   commons_page(3, "https://up.example/ant.ogv", "Ants.ogv", "video/ogg")])),
        Reply(body={"batchcomplete": True}),  # a search that finds nothing answers no "query" at all
        Reply(body=commons_answer([commons_page(1, bees[0], "Bee one.jpg", license="CC BY 2.0"),
                                   commons_page(2, bees[1], "Bee two.jpg", license="Public domain")])),
    ]
    report = search(capsys, "--per-category", "3")  # --source auto and --license free are the defaults
    ants_done, bees_done = report["categories"]["ants"], report["categories"]["bees"]
    assert [(u["name"], u["status"], u["found"], u["unlicensed"]) for u in ants_done["sources"]] == [
        ("openverse", "gave", 1, 1), ("wikimedia", "gave", 2, 0)]  # enough: DuckDuckGo not reached
    assert ants_done["sources"][1]["skipped"] == [{"url": "https://up.example/ant.ogv", "reason": "a video, not a photo"}]
    assert (len(ants_done["added"]), len(ants_done["duplicates"])) == (2, 1)  # the copy is not stored twice
    assert [(u["name"], u["status"], u["found"]) for u in bees_done["sources"]] == [
        ("openverse", "rate limited", 0), ("wikimedia", "gave", 2), ("ddg", "not asked", 0)]
    assert bees_done["sources"][2]["message"] == ("not asked: its images have no licence, and this search keeps "
                                                  "licensed ones only")  # DuckDuckGo, for free images
    assert [c["q"] for c in openverse.calls] == ["ants", "ants photo"] + ["bees"] * 3  # 1 try + 2 retries
    assert report["counts"] == {"ants": 2, "bees": 2} and report["stopped_by"] is None

    with Store(home) as store:
        records = store.list_images("insects")
    red = records[0].provenance
    assert (red.provider, red.title, red.creator, red.license, red.page_url) == (
        "openverse", "Red ant", "Tim Sullivan", "CC0 1.0", "https://stocksnap.io/photo/XNVBVXO3B7")
    assert [r.provenance.provider for r in records] == ["openverse", "wikimedia", "wikimedia", "wikimedia"]

    out = tmp_path / "export"
    assert main(["export-dataset", "insects", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["attribution"] == str(out / "ATTRIBUTION.md")
    lines = (out / "ATTRIBUTION.md").read_text().splitlines()
    assert lines[:3] == ["# Credits: insects", "", "4 images: 1 CC BY, 1 CC BY-SA, 1 CC0, 1 Public domain."]
    r = records
    assert lines[5:] == [
        f'- `ants/{r[0].content_hash}.jpg`: "Red ant" by Tim Sullivan, '
        "[CC0 1.0](https://creativecommons.org/publicdomain/zero/1.0/), "
        "[source page](https://stocksnap.io/photo/XNVBVXO3B7)",
        f'- `ants/{r[1].content_hash}.jpg`: "Ant on a leaf" by Ana & Bo, '
        "[CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0), "
        "[source page](https://commons.wikimedia.org/wiki/File:Ant_on_a_leaf.jpg)",
        f'- `bees/{r[2].content_hash}.jpg`: "Bee one" by Ana & Bo, '
        "[CC BY 2.0](https://creativecommons.org/licenses/by-sa/4.0), "
        "[source page](https://commons.wikimedia.org/wiki/File:Bee_one.jpg)",
        f'- `bees/{r[3].content_hash}.jpg`: "Bee two" by Ana & Bo, '
        "[Public domain](https://creativecommons.org/licenses/by-sa/4.0), "
        "[source page](https://commons.wikimedia.org/wiki/File:Bee_two.jpg)"]
    assert sorted(p.name for p in out.iterdir()) == ["ATTRIBUTION.md", "ants", "bees"]


def test_a_private_image_url_is_refused_and_any_keeps_unknown_licences(httpserver, monkeypatch, home, photos, capsys):
    openverse, _ = install(httpserver, monkeypatch)
    # only the stand-in's own port is reachable: no NANOSTREAM_ALLOW_PRIVATE_HOSTS here
    monkeypatch.setattr("nanostream.sources.connections.address_allowed", lambda address, port: port == httpserver.port)
    (ant,) = serve_photos(httpserver, photos["ants"][:1], "ant")
    openverse.replies = [Reply(body=openverse_page([
        openverse_result("http://127.0.0.1:9/inside.jpg", "Inside", license="by"),
        openverse_result(ant, "Odd licence", license="sampling+", version="1.0")]), headers=OPENVERSE_HEADERS)]
    with Store(home) as store:
        store.create_project("insects", ["ants"])
    report = search(capsys, "--source", "openverse", "--license", "any", "--per-category", "2")
    ants = report["categories"]["ants"]
    assert ants["failed"] == [{"url": "http://127.0.0.1:9/inside.jpg", "reason": PRIVATE_REFUSAL}]
    assert [u["name"] for u in ants["sources"]] == ["openverse"] and len(ants["added"]) == 1
    with Store(home) as store:
        (record,) = store.list_images("insects")
        assert record.provenance.license == "sampling+"  # kept as written, and unknown to every filter
        assert licenses.unknown_license(store.list_images("insects")) == [record.id]


# ---------------------------------------------------------------- an older store

def test_an_older_store_gains_the_provenance_columns(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    with sqlite3.connect(root / "store.sqlite3") as conn:  # the images table as NanoStream 0.1 made it
        conn.executescript("""
            CREATE TABLE projects (id INTEGER PRIMARY KEY, name TEXT NOT NULL, name_key TEXT NOT NULL UNIQUE,
                                   created_at REAL NOT NULL);
            CREATE TABLE categories (id INTEGER PRIMARY KEY, project_id INTEGER NOT NULL, name TEXT NOT NULL,
                                     name_key TEXT NOT NULL, search_terms TEXT NOT NULL DEFAULT '',
                                     created_at REAL NOT NULL, UNIQUE (project_id, name_key));
            CREATE TABLE images (id INTEGER PRIMARY KEY, project_id INTEGER NOT NULL, category_id INTEGER NOT NULL,
                content_hash TEXT NOT NULL, source TEXT NOT NULL, query TEXT NOT NULL DEFAULT '',
                page_url TEXT NOT NULL DEFAULT '', image_url TEXT NOT NULL DEFAULT '',
                final_url TEXT NOT NULL DEFAULT '', license TEXT NOT NULL DEFAULT '',
                original_name TEXT NOT NULL DEFAULT '', width INTEGER NOT NULL DEFAULT 0,
                height INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, added_at REAL NOT NULL,
                UNIQUE (project_id, content_hash));
            INSERT INTO projects VALUES (1, 'old', 'old', 0);
            INSERT INTO categories VALUES (1, 1, 'cats', 'cats', '', 0);
            INSERT INTO images (project_id, category_id, content_hash, source, page_url, license, created_at, added_at)
                VALUES (1, 1, 'ab', 'web_search', 'https://example.org/cat', 'Public', 0, 0);
        """)
    (root / "blobs" / "ab").mkdir(parents=True)
    (root / "blobs" / "ab" / "ab.jpg").write_bytes(b"\xff\xd8")
    with Store(root) as store:
        (record,) = store.list_images("old")
    p = record.provenance
    assert (p.page_url, p.license, p.title, p.creator, p.license_url, p.attribution_required, p.provider) == (
        "https://example.org/cat", "Public", "", "", "", True, "")
    assert licenses.license_family(p.license) == licenses.UNKNOWN  # ddgs' filter word, not the image's licence


def test_a_models_header_keeps_its_photos_licences_and_credits(tmp_path, datasets):
    from nanostream.engine.images import normalize_image
    from nanostream.store.records import Provenance

    photos = sorted((datasets / "hymenoptera" / "train" / "ants").glob("*.jpg"))[:3]
    given = [Provenance("web_search", license="CC BY 2.0", title="Ant", creator="Ana", provider="wikimedia",
                        page_url="https://commons.wikimedia.org/wiki/File:Ant.jpg"),
             Provenance("web_search", license="CC0 1.0", provider="openverse"),
             Provenance("upload", original_name="mine.jpg")]
    with Store(tmp_path / "home") as store:
        store.create_project("p", ["ants"])
        for photo, provenance in zip(photos, given):
            store.add_image("p", "ants", normalize_image(photo.read_bytes()), provenance)
        records = store.list_images("p")
    header = json.loads(json.dumps(licenses.bundle_credits(records)))  # as the bundle's JSON header holds it
    assert licenses.trained_on(header["licenses"]) == "trained on 3 photos: 1 CC BY, 1 CC0, 1 unknown licence"
    first, second, third = licenses.header_credits(header)
    assert (first.title, first.creator, first.license, first.page_url) == (
        "Ant", "Ana", "CC BY 2.0", "https://commons.wikimedia.org/wiki/File:Ant.jpg")
    assert (third.title, third.license, third.file) == ("mine.jpg", "", f"ants/{records[2].content_hash}.jpg")
    assert licenses.unknown_license(records) == []  # the upload is the user's own: not dropped in one click
    assert licenses.header_credits({"credits": [{"file": 1}, "x"]}) == []  # a damaged header shows none
    assert licenses.bundle_credits((), unknown_photos=4)["licenses"] == {"unknown licence": 4}  # a folder build
