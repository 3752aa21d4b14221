"""Who may edit (access.decide) and how often a client may ask (access.RateLimiter), as plain
functions, then the app's pages driven by AppTest with and without an [auth] section. The real
sign-in through an OIDC provider is tests/test_auth.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from nanostream import access
from nanostream.access import Access, Editors, Visitor, decide

APP = str(Path(__file__).resolve().parent.parent / "app.py")
EDITORS = Editors.parse(" Editor@Example.org, second@example.org ,")
AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32, "client_id": "c",
        "client_secret": "s", "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}
NOT_EDITOR = ("You are signed in as viewer@example.org, which is not an editor of this app: you can view demos "
              "only. Ask its owner to add your address to NANOSTREAM_EDITORS.")


def test_editors_are_the_listed_addresses_in_any_case_or_everyone_for_a_star():
    assert EDITORS == Editors(frozenset({"editor@example.org", "second@example.org"}))
    assert EDITORS.include("EDITOR@example.org") and not EDITORS.include("viewer@example.org")
    assert not EDITORS.include(None) and not Editors.parse("").include("")
    assert Editors.parse("*").include("anyone@example.net")


def test_with_sign_in_only_a_signed_in_editor_edits():
    def who(visitor: Visitor, editors: Editors = EDITORS) -> Access:
        return decide(visitor, True, editors)

    assert who(Visitor()) == Access(False, True, "Sign in to open your projects. A demo link works without "
                                                 "signing in.")
    assert who(Visitor(ip_address=None, forwarded=False)).sign_in  # being local is not enough once sign-in is on
    assert who(Visitor(True, "editor@example.org", ip_address="203.0.113.9")) == Access(True)
    assert who(Visitor(True, "viewer@example.org")) == Access(False, notice=NOT_EDITOR)
    assert not who(Visitor(True, "editor@example.org", email_verified=False)).can_edit  # the provider did not check it
    assert who(Visitor(True, "editor@example.org", email_verified=True)).can_edit
    assert "signed in without an e-mail address" in who(Visitor(True, None)).notice
    assert who(Visitor(True, "viewer@example.org"), Editors.parse("*")).can_edit
    assert not who(Visitor(True, "editor@example.org"), Editors()).can_edit  # nobody named: nobody edits


@pytest.mark.parametrize(("visitor", "can_edit"), [
    (Visitor(ip_address=None), True),                      # Streamlit's None: 127.0.0.1 or ::1
    (Visitor(ip_address="127.0.0.2"), True),
    (Visitor(ip_address="::ffff:127.0.0.1"), True),
    (Visitor(ip_address=None, forwarded=True), False),     # a proxy on this machine, forwarding someone
    (Visitor(ip_address="192.0.2.7"), False),
    (Visitor(ip_address="fd00::2"), False),
    (Visitor(ip_address="not an address"), False),
])
def test_without_sign_in_only_this_computer_edits(visitor, can_edit):
    decision = decide(visitor, False, Editors())
    assert decision.can_edit is can_edit and not decision.sign_in
    if not can_edit:
        assert decision.notice == ("This app has no sign-in, so projects can be edited only on the computer it "
                                   "runs on: you can view demos only. Open a demo link to try a model.")


def test_a_visitor_is_read_from_streamlits_user_address_and_headers():
    user = {"is_logged_in": True, "email": "editor@example.org", "email_verified": True}
    assert access.visitor_from(user, "192.0.2.7", {"X-Forwarded-For": "198.51.100.1"}) == Visitor(
        True, "editor@example.org", True, "192.0.2.7", True)
    assert access.visitor_from({"is_logged_in": False, "email": "x@example.org"}, None, {}) == Visitor()
    assert access.visitor_from({}, object(), {}) == Visitor()  # AppTest's stand-in client has no address


def test_the_app_says_on_start_who_may_edit():
    assert "only from this computer" in access.startup_notice(False, EDITORS)
    assert "nobody may edit" in access.startup_notice(True, Editors())
    assert "everyone who signs in" in access.startup_notice(True, Editors.parse("*"))
    assert access.startup_notice(True, EDITORS) == "NanoStream: sign-in is on; 2 editor(s) may edit (NANOSTREAM_EDITORS)."


def test_budgets_come_from_the_environment_and_a_bad_value_names_its_variable(monkeypatch):
    assert access.demo_budget() == access.Budget(20, 5) and access.api_budget() == access.Budget(60, 10)
    monkeypatch.setenv("NANOSTREAM_DEMO_PER_MINUTE", "2.5")
    monkeypatch.setenv("NANOSTREAM_DEMO_BURST", "1")
    assert access.demo_budget() == access.Budget(2.5, 1)
    monkeypatch.setenv("NANOSTREAM_API_BURST", "many")
    with pytest.raises(ValueError, match="NANOSTREAM_API_BURST='many' is not a number"):
        access.api_budget()
    monkeypatch.setenv("NANOSTREAM_API_BURST", "0")
    with pytest.raises(ValueError, match="NANOSTREAM_API_BURST must be above 0"):
        access.api_budget()


def test_a_client_is_its_address_and_an_ipv6_host_its_64():
    assert access.client_of("203.0.113.7") == access.client_of("::ffff:203.0.113.7") == "address 203.0.113.7"
    assert access.client_of("2001:db8:1:2::1") == access.client_of("2001:db8:1:2:ffff::9") == "address 2001:db8:1:2::/64"
    assert access.client_of(None) == "address unknown"


# ---------------------------------------------------------------- the app, by AppTest

def app(secrets: dict | None = None, user: dict | None = None, query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.secrets.update(secrets or {})
    if user is not None:
        at.user = user
    at.query_params.update(query or {})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_with_auth_a_visitor_gets_the_sign_in_and_nothing_of_the_projects(monkeypatch):
    monkeypatch.setenv("NANOSTREAM_EDITORS", "editor@example.org")
    visitor = app({"auth": AUTH}, {"is_logged_in": False})
    assert [b.label for b in visitor.button] == ["Sign in"]
    assert not visitor.sidebar.selectbox and not visitor.subheader  # no project picker, no "Your projects"
    viewer = app({"auth": AUTH}, {"is_logged_in": True, "email": "viewer@example.org"})
    assert [i.value for i in viewer.info] == [NOT_EDITOR]
    assert [b.label for b in viewer.button] == ["Sign out"]
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        viewer.switch_page("pages/share.py")  # no Share page, so no API keys, for a non-editor
    editor = app({"auth": AUTH}, {"is_logged_in": True, "email": "editor@example.org"})
    assert editor.title[0].value == "NanoStream" and editor.subheader[0].value == "Your projects"
    assert "Signed in as editor@example.org" in [c.value for c in editor.sidebar.caption]


def test_the_demo_refuses_a_visitors_photos_past_the_budget_with_a_sentence(tmp_path, monkeypatch):
    from model_fixture import tiny_model

    from nanostream.store.db import Store

    model = tiny_model()
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NANOSTREAM_DEMO_BURST", "1")
    monkeypatch.setenv("NANOSTREAM_DEMO_PER_MINUTE", "0.5")  # a bucket of this test's own: 1 photo, 1 per 2 min
    with Store(tmp_path / "home") as store:
        store.create_project("insects")
        store.record_model("insects", model.model_id, model.path, {"accuracy": 1.0})
        store.set_published(model.model_id, True)
    demo = app(query={"project": "insects"})
    demo.switch_page("pages/demo.py").run()
    refusal = re.compile(r"Too many photos in a short time: this demo classifies 1 at once and 0\.5 a minute for "
                         r"each visitor\. Try again in (\d+) s\.")

    def refused() -> list[int]:  # the seconds each refusal on the page asks the visitor to wait
        return [int(m[1]) for w in demo.warning if (m := refusal.fullmatch(w.value))]

    for i, photo in enumerate(model.photos[:2]):
        demo.file_uploader(key="demo_photo").set_value((photo.name, photo.read_bytes(), "image/jpeg")).run()
        assert not demo.exception, [e.value for e in demo.exception]
        assert bool(demo.image) is (i == 0)  # the first photo was classified, the second was not
    [wait] = refused()
    assert 110 <= wait <= 120  # a token every 120 s, less the seconds the test took since the first
    demo.run()  # a rerun with the same photo spends nothing more, and still classifies nothing
    assert len(refused()) == 1 and not demo.image


def test_the_apis_budget_for_callers_without_a_key_comes_from_the_environment(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    from model_fixture import serving_home

    from nanostream.api.app import create_app
    from nanostream.api.service import ServeConfig

    monkeypatch.setenv("NANOSTREAM_API_BURST", "2")
    monkeypatch.setenv("NANOSTREAM_API_PER_MINUTE", "1")
    assert (ServeConfig().anonymous_burst, ServeConfig().anonymous_per_minute) == (2, 1.0)
    (tmp_path / "home").mkdir()
    with serving_home(tmp_path / "home", public=("m-00000000e1",)), TestClient(create_app(ServeConfig())) as client:
        # no body at all: refused for that (415) while the budget lasts, then for the budget
        answers = [client.post("/v1/models/m-00000000e1/predict") for _ in range(3)]
    assert [a.status_code for a in answers] == [415, 415, 429]
    assert answers[2].headers["Retry-After"] == "60"
    assert "at most 2 at once and 1 a minute" in answers[2].json()["error"]
