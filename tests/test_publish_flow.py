"""One publishing rule behind two front ends: the Share page and `nanostream publish` both keep
one published version per project (publishing a version unpublishes the project's others), and
leave other projects' models and models without a project alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from nanostream.cli.main import main
from nanostream.engine.bundle import save_bundle
from nanostream.engine.models import model_path
from nanostream.flows import publish
from nanostream.store.db import Store

APP = str(Path(__file__).resolve().parent.parent / "app.py")
FIRST, SECOND, ELSEWHERE, ALONE = "m-00000000a1", "m-00000000a2", "m-00000000b1", "m-00000000c1"


def sound_bundle(model_id: str, project: str | None) -> Path:
    """A sound registered bundle without training: the header a reader needs, zeros for the head."""
    meta = {"model_id": model_id, "labels": ["ants", "bees"], "backbone": "efficientnet_lite0",
            "created_at": "2025-01-01T00:00:00+00:00", "metrics": {"accuracy": 0.9}, "project": project}
    return save_bundle(model_path(model_id), meta, {
        "head.mean": torch.zeros(1280), "head.scale": torch.ones(1280),
        "head.linear.weight": torch.zeros(2, 1280), "head.linear.bias": torch.zeros(2)})


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Project 'insects' with two versions, project 'birds' with one published, one model with no project."""
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    with Store(tmp_path / "home") as store:
        store.create_project("insects", ["ants", "bees"])
        store.create_project("birds", ["ants", "bees"])
        for model_id, project in ((FIRST, "insects"), (SECOND, "insects"), (ELSEWHERE, "birds"), (ALONE, None)):
            store.record_model(project, model_id, sound_bundle(model_id, project), {"accuracy": 0.9})
        for model_id in (ELSEWHERE, ALONE):
            store.set_published(model_id, True)
        yield store


def published(store: Store) -> set[str]:
    return {m.model_id for m in store.published_models()}


def cli_publish(capsys, model_id: str) -> dict:
    assert main(["publish", model_id, "--json"]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def share_page_publish(model_id: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.session_state["app_project"] = "insects"
    at.switch_page("pages/share.py").run()
    at.selectbox(key="share_model").set_value(model_id).run()
    at.button(key="share_publish").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_cli_publishing_a_second_version_unpublishes_the_first(store, capsys):
    assert cli_publish(capsys, FIRST)["unpublished"] == []
    assert published(store) == {FIRST, ELSEWHERE, ALONE}
    assert main(["publish", SECOND]) == 0
    assert capsys.readouterr().out == (f"published {SECOND}: anyone may use it without an API key; unpublished "
                                       f"{FIRST} (one published version per project)\n"
                                       f"project demo link (always the published version): /demo?project=insects\n"
                                       f"this version's demo page:\n/demo?model={SECOND}\n")
    assert published(store) == {SECOND, ELSEWHERE, ALONE}


def test_share_page_and_cli_apply_the_same_rule(store, capsys):
    share_page_publish(FIRST)
    assert published(store) == {FIRST, ELSEWHERE, ALONE}
    assert cli_publish(capsys, SECOND) == {"model_id": SECOND, "published": True, "demo": f"/demo?model={SECOND}",
                                           "project_demo": "/demo?project=insects", "unpublished": [FIRST]}
    assert published(store) == {SECOND, ELSEWHERE, ALONE}
    at = share_page_publish(FIRST)  # and back, from the page
    assert published(store) == {FIRST, ELSEWHERE, ALONE}
    assert [c.value for c in at.code if "/demo?" in c.value] == [  # the project's link, then the version's own
        "http://localhost:8501/demo?project=insects", f"http://localhost:8501/demo?model={FIRST}"]
    assert [w.value for w in at.warning] == [publish.LOCAL_LINK_WARNING]  # nobody else can open localhost


def test_the_flow_says_what_it_closed_and_unpublish_closes_only_that_version(store):
    assert publish.publish(store, FIRST) == publish.Publication(FIRST, True, (), "insects")
    assert publish.publish(store, SECOND) == publish.Publication(SECOND, True, (FIRST,), "insects")
    assert publish.publish(store, SECOND) == publish.Publication(SECOND, True, (), "insects")  # again: nothing else open
    assert publish.unpublish(store, SECOND) == publish.Publication(SECOND, False)
    assert published(store) == {ELSEWHERE, ALONE}
    with pytest.raises(publish.PublishError, match="no model 'm-00000000ff'"):
        publish.unpublish(store, "m-00000000ff")


def test_a_version_whose_file_is_gone_is_refused_on_the_page_and_nothing_changes(store):
    share_page_publish(FIRST)
    model_path(SECOND).unlink()
    at = share_page_publish(SECOND)
    assert [e.value for e in at.error] == [
        f"cannot publish {SECOND}: model file not found",
        "The model file of this version is missing: nothing to download or export. Build it again."]
    assert published(store) == {FIRST, ELSEWHERE, ALONE}


def test_the_cli_prints_the_public_stable_link_above_the_version_path(store, capsys, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_PUBLIC_URL", "https://demo.example.org/")
    assert main(["publish", FIRST]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["project demo link (always the published version): https://demo.example.org/demo?project=insects",
                          "this version's demo page:", f"/demo?model={FIRST}"]
    assert main(["publish", ALONE]) == 0  # no project: no project link, the path still last
    assert capsys.readouterr().out.splitlines()[-2:] == ["this version's demo page:", f"/demo?model={ALONE}"]


def test_a_project_link_serves_the_published_version_and_an_old_version_link_points_to_it(store):
    store.create_project("Garden birds & co")
    assert publish.project_demo_path("Garden birds & co") == "/demo?project=Garden%20birds%20%26%20co"
    publish.publish(store, FIRST)
    assert publish.demo_target(store, None, "insects").record.model_id == FIRST
    assert publish.demo_target(store, FIRST, None).record.model_id == FIRST
    publish.publish(store, SECOND)  # a rebuilt version: the link already sent now serves it
    assert publish.demo_target(store, None, "insects").record.model_id == SECOND
    replaced = publish.demo_target(store, FIRST, None)
    assert replaced == publish.DemoTarget(None, "This version was replaced by a newer one of the same model.",
                                          "/demo?project=insects")
    publish.unpublish(store, SECOND)  # nothing published: neither link serves, and neither says "replaced"
    not_published = ("This model is not published, or the link is incomplete. "
                     "Ask the person who shared it to publish the model and send the link again.")
    assert publish.demo_target(store, FIRST, None) == publish.DemoTarget(None, not_published)
    assert publish.demo_target(store, "m-00000000ff", None) == publish.DemoTarget(None, not_published)
    for project in ("insects", "no such project"):
        assert publish.demo_target(store, None, project).problem.startswith("This project has no published version")


def test_the_demo_page_says_replaced_with_the_projects_link(store):
    publish.publish(store, FIRST)
    publish.publish(store, SECOND)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["model"] = FIRST
    at.run()
    at.switch_page("pages/demo.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == ["This version was replaced by a newer one of the same model."]
    assert "[this project's demo link](/demo?project=insects)" in at.markdown[-1].value
    assert not at.file_uploader


@pytest.mark.parametrize(("configured", "address", "port", "seen", "expected"), [
    ("https://demo.example.org/", "localhost", 8501, "http://localhost:8501", "https://demo.example.org"),
    (None, "nanostream.example.org", 443, "http://localhost:8501", "https://nanostream.example.org"),
    (None, "192.0.2.10", 8501, "http://localhost:8501", "http://192.0.2.10:8501"),
    (None, "localhost", 8501, "http://127.0.0.1:8502", "http://127.0.0.1:8502"),  # what the browser shows
])
def test_the_public_address_is_the_setting_else_streamlits_else_the_browsers(configured, address, port, seen,
                                                                            expected):
    assert publish.public_base_url(configured, address, port, seen) == expected


def test_links_that_say_localhost_are_flagged():
    local = ["http://localhost:8501", "http://127.0.0.1:8501", "http://[::1]:8501", "http://app.localhost"]
    remote = ["https://demo.example.org", "http://192.0.2.10:8501", "http://[2001:db8::1]:8501"]
    assert [publish.is_local_host(u) for u in local + remote] == [True] * len(local) + [False] * len(remote)
