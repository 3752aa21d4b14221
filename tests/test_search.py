"""Image search: pacing, backoff, partial results, cache, and the real ddgs parsing on canned pages."""

from __future__ import annotations

import json
from types import SimpleNamespace
from urllib.parse import urlsplit

import primp
import pytest

from nanostream.sources.search import (
    DDGSProvider, ImageHit, Pacer, QueryCache, RateLimited, SearchError, SearchPacing, SearchTimeout,
    backoff_delay, query_variants, search_category,
)
from nanostream.sources.providers import make_provider, sources_to_try


def hit(url: str, query: str = "q") -> ImageHit:
    return ImageHit(url=url, page_url=f"{url}.html", title=url, query=query, width=None, height=None,
                    source="test", license="")


class StandInProvider:
    """Answers from a script: per query, a list of outcomes (hits or an exception) consumed in order."""

    name = "stand-in"

    def __init__(self, script: dict[str, list]):
        self.script = {q: list(outcomes) for q, outcomes in script.items()}
        self.calls: list[str] = []

    def images(self, query: str, max_results: int) -> list[ImageHit]:
        self.calls.append(query)
        outcome = self.script[query].pop(0) if len(self.script[query]) > 1 else self.script[query][0]
        if isinstance(outcome, Exception):
            raise outcome
        return [hit(u, query) for u in outcome][:max_results]


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def urls(report) -> list[str]:
    return [h.url for h in report.hits]


# ---------------------------------------------------------------- queries and pacing

def test_query_variants():
    assert query_variants("  golden   retriever ") == ["golden retriever", "golden retriever photo"]
    assert query_variants("tulip", "flower, close up , ") == ["tulip", "tulip photo", "tulip flower", "tulip close up"]
    assert query_variants("rose", "Photo") == ["rose", "rose photo"]  # no duplicate query


def test_pause_between_live_calls_only_and_dedup_by_url():
    provider = StandInProvider({"ant": [["a", "b"]], "ant photo": [["b", "c"]], "ant macro": [["c", "d", "a"]]})
    sleeps, progress = Sleeps(), []
    report = search_category("ant", provider, per_category=50, extra_terms="macro", sleep=sleeps,
                             on_progress=lambda done, total: progress.append((done, total)))
    assert urls(report) == ["a", "b", "c", "d"]  # rank order, first sighting wins
    assert report.hits[2].query == "ant photo"
    assert report.queries == ("ant", "ant photo", "ant macro") and provider.calls == list(report.queries)
    assert sleeps == [2.0, 2.0]  # none before the first call
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert (report.errors, report.rate_limited) == ((), False)


def test_one_pacer_spaces_live_calls_across_categories_and_never_waits_for_the_cache(tmp_path):
    cache = QueryCache(tmp_path)
    script = {"ant": [["a"]], "ant photo": [["b"]], "bee": [["c"]], "bee photo": [["d"]],
              "cat": [["e"]], "cat photo": [["f"]]}
    search_category("ant", StandInProvider(script), cache=cache, sleep=Sleeps())  # fills the cache for "ant"
    provider, sleeps = StandInProvider(script), Sleeps()
    pacer = Pacer(2.0, sleeps)
    reports = [search_category(name, provider, cache=cache, pacer=pacer, sleep=Sleeps())
               for name in ("ant", "bee", "cat")]
    assert [urls(r) for r in reports] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert provider.calls == ["bee", "bee photo", "cat", "cat photo"]  # "ant" came from the cache
    assert sleeps == [2.0, 2.0, 2.0]  # before every live call but the first, between categories too
    assert pacer.live_calls == 4


def test_providers_by_name_in_the_order_auto_tries_them():
    assert [type(make_provider(name, "free")).__name__ for name in sources_to_try("auto")] == [
        "OpenverseProvider", "WikimediaProvider", "DDGSProvider"]  # licensed first, DuckDuckGo last
    assert sources_to_try("wikimedia") == ["wikimedia"]
    for bad in (lambda: make_provider("altavista"), lambda: sources_to_try("ddgs")):
        with pytest.raises(SearchError) as caught:
            bad()
        assert str(caught.value).startswith("unknown image source ")
        assert str(caught.value).endswith("; valid: auto, openverse, wikimedia, ddg")


def test_stops_querying_once_enough_hits_and_caps_them():
    provider = StandInProvider({"bee": [["a", "b", "c"]], "bee photo": [["x"]]})
    report = search_category("bee", provider, per_category=2, sleep=Sleeps())
    assert urls(report) == ["a", "b"]
    assert provider.calls == ["bee"]


def test_backoff_delay_is_exponential_capped_and_jittered():
    pacing = SearchPacing(backoff=2.0, max_backoff=30.0)
    assert [backoff_delay(a, pacing, rand=lambda: 1.0) for a in range(6)] == [2, 4, 8, 16, 30, 30]
    assert [backoff_delay(a, pacing, rand=lambda: 0.0) for a in range(3)] == [1, 2, 4]


def test_rate_limit_is_retried_with_backoff():
    provider = StandInProvider({"ant": [RateLimited("slow down"), RateLimited("slow down"), ["a"]],
                                "ant photo": [["b"]]})
    sleeps = Sleeps()
    report = search_category("ant", provider, sleep=sleeps)
    assert urls(report) == ["a", "b"] and not report.rate_limited
    assert provider.calls == ["ant", "ant", "ant", "ant photo"]
    first, second, pause = sleeps
    assert 1.0 <= first <= 2.0 and 2.0 <= second <= 4.0 and pause == 2.0


def test_rate_limited_midway_keeps_partial_hits_and_tells_the_user():
    provider = StandInProvider({"ant": [["a", "b"]], "ant photo": [RateLimited("403")], "ant nest": [["c"]]})
    pacing = SearchPacing(retries=2)
    report = search_category("ant", provider, extra_terms="nest", pacing=pacing, sleep=Sleeps())
    assert urls(report) == ["a", "b"]
    assert report.rate_limited
    assert provider.calls == ["ant"] + ["ant photo"] * 3  # bounded: 1 try + 2 retries; "ant nest" never sent
    assert report.queries == ("ant", "ant photo")
    (message,) = report.errors
    assert "Rate limited" in message and "Kept the 2 images" in message and "wait a few minutes" in message


def test_timeouts_are_retried_then_reported_without_stopping():
    provider = StandInProvider({"ant": [SearchTimeout("timed out")], "ant photo": [["b"]]})
    report = search_category("ant", provider, pacing=SearchPacing(retries=1), sleep=Sleeps())
    assert provider.calls == ["ant", "ant", "ant photo"]
    assert urls(report) == ["b"] and not report.rate_limited
    assert report.errors == ("Search for 'ant' failed: timed out",)


def test_other_errors_are_not_retried():
    provider = StandInProvider({"ant": [SearchError("bad request")], "ant photo": [["b"]]})
    report = search_category("ant", provider, sleep=Sleeps())
    assert provider.calls == ["ant", "ant photo"]
    assert report.errors == ("Search for 'ant' failed: bad request",)


def test_should_stop_before_any_query():
    provider = StandInProvider({"ant": [["a"]]})
    report = search_category("ant", provider, sleep=Sleeps(), should_stop=lambda: True)
    assert (report.hits, report.queries, provider.calls) == ((), (), [])


# ---------------------------------------------------------------- cache

def test_cache_answers_repeated_searches_without_calling_or_sleeping(tmp_path):
    cache = QueryCache(tmp_path / "cache")
    script = {"ant": [["a", "b"]], "ant photo": [["c"]]}
    first = search_category("ant", StandInProvider(script), cache=cache, sleep=Sleeps())
    provider, sleeps = StandInProvider(script), Sleeps()
    again = search_category("ant", provider, cache=cache, sleep=sleeps)
    assert again == first
    assert (provider.calls, sleeps) == ([], [])
    files = list((tmp_path / "cache").glob("*.json"))
    assert len(files) == 2 and json.loads(files[0].read_text())["provider"] == "stand-in"  # plain JSON


def test_cache_key_and_expiry(tmp_path):
    now = [1000.0]
    cache = QueryCache(tmp_path, ttl_seconds=60, clock=lambda: now[0])
    cache.put("p", "ant", 50, [hit("a", "ant")])
    assert cache.get("p", "ant", 50) == [hit("a", "ant")]
    assert cache.get("p", "ant", 10) is None      # max_results is part of the key
    assert cache.get("other", "ant", 50) is None  # so is the provider (and its settings)
    now[0] += 61
    assert cache.get("p", "ant", 50) is None


def test_rate_limited_queries_are_not_cached(tmp_path):
    cache = QueryCache(tmp_path)
    search_category("ant", StandInProvider({"ant": [RateLimited("no")]}), cache=cache,
                    pacing=SearchPacing(retries=0), sleep=Sleeps())
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_is_reported_not_fatal(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    report = search_category("ant", StandInProvider({"ant": [["a"]], "ant photo": [["b"]]}),
                             cache=QueryCache(blocker), sleep=Sleeps())
    assert urls(report) == ["a", "b"]
    assert len(report.errors) == 2 and report.errors[0].startswith("Could not cache results for 'ant'")


def test_corrupt_cache_entry_is_a_miss(tmp_path):
    cache = QueryCache(tmp_path)
    cache.put("p", "ant", 50, [hit("a")])
    cache.path("p", "ant", 50).write_text("{not json")
    assert cache.get("p", "ant", 50) is None


# ---------------------------------------------------------------- the real DDGSProvider, network faked

VQD_PAGE = b'<html><script>DDG.deep.initialize("/d.js?q=golden+retriever&vqd="4-31415926535897932384626433832795"&l=wt-wt");</script></html>'
DDG_JSON = {
    "ads": None, "next": "i.js?q=golden+retriever&o=json&p=1&s=100&u=bing&f=,,,,,&l=wt-wt",
    "query": "golden retriever", "queryEncoded": "golden%20retriever", "response_type": "places",
    "results": [
        {"height": 1365, "image": "https://upload.wikimedia.org/wikipedia/commons/b/bd/Golden_Retriever_Dukedestiny01_drvd.jpg",
         "image_token": "a1", "source": "Bing", "thumbnail": "https://tse1.mm.bing.net/th?id=OIP.abc&pid=Api",
         "thumbnail_token": "t1", "title": "Golden Retriever - Wikipedia",
         "url": "https://en.wikipedia.org/wiki/Golden_Retriever", "width": 2048},
        {"height": 800, "image": "https://dogs.example.com/img/golden%20puppy.jpg", "image_token": "a2",
         "source": "Bing", "thumbnail": "https://tse2.mm.bing.net/th?id=OIP.def&pid=Api", "thumbnail_token": "t2",
         "title": "Golden <b>Retriever</b> puppy &amp; ball", "url": "https://dogs.example.com/puppy", "width": 1200},
        {"height": 500, "image": "https://cats.example.org/cat.png", "image_token": "a3", "source": "Bing",
         "thumbnail": "https://tse3.mm.bing.net/th?id=OIP.ghi&pid=Api", "thumbnail_token": "t3",
         "title": "A cat", "url": "https://cats.example.org/", "width": 500},
    ],
    "vqd": {"golden retriever": "4-31415926535897932384626433832795"},
}
BING_ASYNC = """<html><body><ul><li>
<div class="iuscp"><div class="imgpt"><a class="iusc" m='{"t":"Golden retriever in a field","murl":"https://bing-img.example.com/g1.jpg","turl":"https://tse4.mm.bing.net/th?id=OIP.b1","purl":"https://field.example.com/dogs"}' href="#"></a>
<div class="img_info hon"><span class="nowrap">1600 x 1067 \u00b7 jpeg</span></div></div>
<div class="infopt"><div class="lnkw"><a href="https://field.example.com/dogs">field.example.com</a></div></div></div>
</li></ul></body></html>"""


class FakeNetwork:
    """Stands in for primp.Client, the HTTP layer under ddgs: every engine request lands here."""

    def __init__(self, routes: dict[str, tuple[int, bytes] | Exception]):
        self.routes = routes
        self.requests: list[tuple[str, str, dict]] = []

    def client(self, **_options):
        network = self

        class Client:
            def headers_update(self, headers):
                pass

            def request(self, method, url, params=None, data=None, **_kwargs):
                network.requests.append((method, url, dict(params or data or {})))
                route = network.routes.get(urlsplit(url)._replace(query="").geturl(), (404, b""))
                if isinstance(route, Exception):
                    raise route
                status, body = route
                return SimpleNamespace(status_code=status, content=body, text=body.decode())

        return Client()


@pytest.fixture
def network(monkeypatch):
    def install(routes):
        fake = FakeNetwork(routes)
        monkeypatch.setattr("ddgs.http_client.primp.Client", fake.client)
        return fake
    return install


DDG_OK = {"https://duckduckgo.com": (200, VQD_PAGE), "https://duckduckgo.com/i.js": (200, json.dumps(DDG_JSON).encode())}


def test_ddgs_provider_parses_duckduckgo_results(network):
    fake = network(DDG_OK)
    hits = DDGSProvider(license_image="Public").images("golden retriever", max_results=10)
    assert [h.url for h in hits] == [  # ddgs ranks hits whose title matches the query first
        "https://upload.wikimedia.org/wikipedia/commons/b/bd/Golden_Retriever_Dukedestiny01_drvd.jpg",
        "https://dogs.example.com/img/golden+puppy.jpg",
        "https://cats.example.org/cat.png",
    ]
    first = hits[0]
    assert (first.page_url, first.title, first.query) == (
        "https://en.wikipedia.org/wiki/Golden_Retriever", "Golden Retriever - Wikipedia", "golden retriever")
    # the engine's licence filter says nothing about each image: its licence stays unknown
    assert (first.width, first.height, first.source, first.license, first.provider) == (2048, 1365, "Bing", "", "ddg")
    assert first.thumbnail == "https://tse1.mm.bing.net/th?id=OIP.abc&pid=Api"
    assert hits[1].title == "Golden Retriever puppy & ball"
    (_, vqd_url, vqd_params), (_, search_url, params) = fake.requests
    assert (vqd_url, vqd_params) == ("https://duckduckgo.com", {"q": "golden retriever"})
    assert search_url == "https://duckduckgo.com/i.js"
    assert params["vqd"] == "4-31415926535897932384626433832795"
    assert (params["q"], params["l"], params["p"]) == ("golden retriever", "wt-wt", "1")
    assert params["f"].endswith("license:Public")


def test_ddgs_provider_respects_max_results(network):
    network(DDG_OK)
    assert len(DDGSProvider().images("golden retriever", max_results=2)) == 2


def test_ddgs_provider_falls_back_to_bing_when_duckduckgo_refuses(network):
    fake = network({"https://duckduckgo.com": (200, VQD_PAGE), "https://duckduckgo.com/i.js": (403, b""),
                    "https://www.bing.com/images/async": (200, BING_ASYNC.encode())})
    (only,) = DDGSProvider().images("golden retriever", max_results=10)
    assert (only.url, only.page_url, only.width, only.height) == (
        "https://bing-img.example.com/g1.jpg", "https://field.example.com/dogs", 1600, 1067)
    assert only.title == "Golden retriever in a field"
    assert fake.requests[-1][1] == "https://www.bing.com/images/async"


@pytest.mark.parametrize("routes", [
    {"https://duckduckgo.com": (200, VQD_PAGE), "https://duckduckgo.com/i.js": (403, b"")},
    {"https://duckduckgo.com": (200, b"<html>no token here</html>")},
])
def test_ddgs_provider_maps_refusals_to_rate_limited(network, routes):
    network(routes)  # Bing answers 404 too
    with pytest.raises(RateLimited, match="rate limiting"):
        DDGSProvider().images("golden retriever", max_results=10)


def test_ddgs_provider_maps_timeouts(network):
    network({"https://duckduckgo.com": primp.TimeoutError("operation timed out")})
    with pytest.raises(SearchTimeout):
        DDGSProvider(backend="duckduckgo").images("golden retriever", max_results=10)


def test_ddgs_provider_maps_other_failures_to_search_error(network):
    network({"https://duckduckgo.com": primp.ConnectError("connection refused")})
    with pytest.raises(SearchError) as caught:
        DDGSProvider(backend="duckduckgo").images("golden retriever", max_results=10)
    assert not isinstance(caught.value, (RateLimited, SearchTimeout))
    assert "ConnectError" in str(caught.value)


def test_search_category_with_real_provider_and_cache(network, tmp_path):
    fake = network(DDG_OK)
    cache = QueryCache(tmp_path)
    report = search_category("golden retriever", DDGSProvider(), per_category=3, cache=cache, sleep=Sleeps())
    assert len(report.hits) == 3 and report.queries == ("golden retriever",)
    sent = len(fake.requests)
    again = search_category("golden retriever", DDGSProvider(), per_category=3, cache=cache, sleep=Sleeps())
    assert again == report and len(fake.requests) == sent
