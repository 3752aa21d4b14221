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
                                       f"{FIRST} (one published version per project); demo page:\n"
                                       f"/demo?model={SECOND}\n")
    assert published(store) == {SECOND, ELSEWHERE, ALONE}


def test_share_page_and_cli_apply_the_same_rule(store, capsys):
    share_page_publish(FIRST)
    assert published(store) == {FIRST, ELSEWHERE, ALONE}
    assert cli_publish(capsys, SECOND) == {"model_id": SECOND, "published": True, "demo": f"/demo?model={SECOND}",
                                           "unpublished": [FIRST]}
    assert published(store) == {SECOND, ELSEWHERE, ALONE}
    at = share_page_publish(FIRST)  # and back, from the page
    assert published(store) == {FIRST, ELSEWHERE, ALONE}
    link = next(c.value for c in at.code if "/demo?model=" in c.value)
    assert link.endswith(publish.demo_path(FIRST))


def test_the_flow_says_what_it_closed_and_unpublish_closes_only_that_version(store):
    assert publish.publish(store, FIRST) == publish.Publication(FIRST, True, ())
    assert publish.publish(store, SECOND) == publish.Publication(SECOND, True, (FIRST,))
    assert publish.publish(store, SECOND) == publish.Publication(SECOND, True, ())  # again: nothing else open
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
