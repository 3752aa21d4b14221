"""Sign-in for real, in a browser: the app started with an [auth] secrets.toml pointing at an
OIDC provider (oidc-provider-mock, a Flask app served on 127.0.0.1 by this test), and Debian's
chromium signing in through the provider's own form.

An editor (NANOSTREAM_EDITORS) gets the projects; a signed-in non-editor gets "you can view demos
only" and no Share page (so no API keys); a visitor gets the sign-in and nothing of the projects;
/demo?project=<name> and /demo?model=<id> open without signing in, and a replaced version's link
says so and points to the project's. One app start for the module; every wait is bounded.
Screenshots go to NANOSTREAM_SCREENSHOTS (e.g. docs/screenshots) when it is set (test_browser.shots).
"""

from __future__ import annotations

import secrets
import threading

import pytest
import werkzeug.serving
from model_fixture import copy_as, tiny_model
from streamlit_app import free_port, start_app
from test_browser import PAGE_S, browser, shots  # noqa: F401 - fixtures: chromium, and screenshots

EDITOR, VIEWER = "editor@example.org", "viewer@example.org"
OLD, CURRENT = "m-00000000a1", "m-00000000a2"   # two versions of project "insects"; CURRENT is published
FIRST_MODEL_S = 180_000  # ms: the app's first model (torch imported, a backbone loaded) on 2 busy CPU cores


@pytest.fixture(scope="module")
def provider():
    """oidc-provider-mock on 127.0.0.1 (any client id and secret; whoever types an e-mail as the subject)."""
    import oidc_provider_mock

    server = werkzeug.serving.make_server("127.0.0.1", 0, oidc_provider_mock.app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def app_url(provider, tmp_path_factory):
    """The app with sign-in on, its home holding project 'insects' whose second version is published."""
    from nanostream.flows.publish import publish
    from nanostream.store.db import Store

    folder = tmp_path_factory.mktemp("auth")
    home, port = folder / "home", free_port()
    (home / "models").mkdir(parents=True)
    model = tiny_model()
    with Store(home) as store:
        store.create_project("insects", list(model.labels))
        for model_id in (OLD, CURRENT):
            store.record_model("insects", model_id, copy_as(model, home / "models", model_id), {"accuracy": 1.0})
        for model_id in (OLD, CURRENT):  # the second publication replaces the first
            store.set_published(model_id, False)
            publish(store, model_id)
    secrets_toml = folder / "secrets.toml"
    secrets_toml.write_text(f'''[auth]
redirect_uri = "http://127.0.0.1:{port}/oauth2callback"
cookie_secret = "{secrets.token_urlsafe(32)}"
client_id = "nanostream-test"
client_secret = "{secrets.token_urlsafe(16)}"
server_metadata_url = "{provider}/.well-known/openid-configuration"
''')
    server = start_app(home, folder / "streamlit.log", port, "--server.headless", "true",
                       "--server.address", "127.0.0.1", "--secrets.files", str(secrets_toml),
                       env={"NANOSTREAM_EDITORS": EDITOR, "AUTHLIB_INSECURE_TRANSPORT": "1"})  # the provider is http
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


def signed_in_page(browser, app_url: str, email: str):
    """A fresh browser context that pressed Sign in and typed `email` into the provider's form."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(PAGE_S)
    page.goto(app_url)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_placeholder("sub").fill(email)  # the provider's form: the subject, which it also gives as e-mail
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(f"{app_url}/**")
    return page


def main_text(page) -> str:
    return page.locator("[data-testid='stMain']").inner_text()


def test_sign_in_lets_editors_edit_and_others_see_demos_only(app_url, browser, shots):
    # a visitor: the sign-in, and nothing of the projects
    visitor = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    visitor.set_default_timeout(PAGE_S)
    visitor.goto(app_url)
    visitor.get_by_role("button", name="Sign in").wait_for()
    shots(visitor, "auth-01-visitor")
    assert "Sign in to open your projects." in main_text(visitor)
    assert "insects" not in visitor.content() and not visitor.locator("[data-testid='stSidebar']").count()

    # ... who can open both demo links without signing in, and is told where a replaced version went
    visitor.goto(f"{app_url}/demo?project=insects")
    visitor.get_by_text("Tells apart:").wait_for(timeout=FIRST_MODEL_S)
    assert visitor.get_by_role("heading", name="insects").count() and "ants" in main_text(visitor)
    shots(visitor, "auth-02-demo-project-link")
    visitor.goto(f"{app_url}/demo?model={CURRENT}")
    visitor.get_by_text("Tells apart:").wait_for()
    visitor.goto(f"{app_url}/demo?model={OLD}")
    visitor.get_by_text("This version was replaced by a newer one of the same model.").wait_for()
    assert visitor.get_by_role("link", name="this project's demo link").get_attribute("href").endswith(
        "/demo?project=insects")
    shots(visitor, "auth-03-demo-replaced")

    # an editor gets the projects
    editor = signed_in_page(browser, app_url, EDITOR)
    editor.get_by_role("heading", name="Your projects").wait_for()
    # the list streams in after its heading: wait for the project, not just the page
    editor.locator("[data-testid='stMain']").get_by_text("insects").first.wait_for()
    assert "insects" in main_text(editor)
    assert f"Signed in as {EDITOR}" in editor.locator("[data-testid='stSidebar']").inner_text()
    shots(editor, "auth-04-editor")

    # a signed-in non-editor: demos only, and no Share page (API keys are made there)
    viewer = signed_in_page(browser, app_url, VIEWER)
    viewer.get_by_text("you can view demos only").wait_for()
    assert "insects" not in main_text(viewer)
    shots(viewer, "auth-05-non-editor")
    viewer.goto(f"{app_url}/share")
    viewer.get_by_text("you can view demos only").wait_for()
    assert "Create key" not in viewer.content() and "API keys" not in viewer.content()
