"""Publishing a model version: a demo link for anyone and the HTTP API without a key, or closed again.

One published version per project: publishing a version unpublishes the project's others, so the
project's demo link and keyless callers get the version the user chose last, never an older one
left open by mistake. A model without a project (trained from a folder, or imported) stands alone.
The Share page and `nanostream publish` / `unpublish` both come here.

Links that last: a project's demo link (/demo?project=<name>) always serves the version published
now, so publishing a rebuilt version never breaks a link already sent; a version's own link
(/demo?model=<id>) works while that version is published, and afterwards points to the project's.
The app's public address is NANOSTREAM_PUBLIC_URL, else Streamlit's browser.serverAddress, else
the address the browser shows; a link that would say localhost opens on this computer only.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from ..engine.bundle import MODEL_ID, BundleError
from ..engine.models import model_path, read_registered
from ..store.db import Store
from ..store.records import ModelRecord, StoreError

PUBLIC_URL_ENV = "NANOSTREAM_PUBLIC_URL"  # the app's public address, for links others open (public_base_url)


class PublishError(ValueError):
    """A model that cannot be published or unpublished; the message says why."""


@dataclass(frozen=True)
class Publication:
    model_id: str
    published: bool
    unpublished: tuple[str, ...] = ()  # the project's other versions that publishing this one closed
    project: str | None = None         # the project whose stable link now serves this version

    @property
    def demo_path(self) -> str:
        return demo_path(self.model_id)

    @property
    def project_demo_path(self) -> str | None:
        return project_demo_path(self.project) if self.project is not None else None


def publish(store: Store, model_id: str) -> Publication:
    """Open model_id to anyone, after checking its file is sound, and close its project's other versions.

    A model the store has not seen (trained from a folder, just imported) is recorded first, under
    the project its file names when the store has that project."""
    if not MODEL_ID.fullmatch(model_id):
        raise PublishError(f"no model file or model id '{model_id[:200]}' (ids are listed by `nanostream models`)")
    record = _recorded(store, model_id)
    others = store.list_models(record.project) if record.project is not None else []
    closed = tuple(m.model_id for m in others if m.published and m.model_id != model_id)
    for other in closed:  # first: a failure in between leaves none open, never two
        store.set_published(other, False)
    store.set_published(model_id, True)
    return Publication(model_id, True, closed, record.project)


def unpublish(store: Store, model_id: str) -> Publication:
    """Require an API key for model_id again. By the store alone: no model file is read, so a damaged
    one can always be closed, and so can any id the store holds, even one an older NanoStream let in."""
    try:
        store.set_published(model_id, False)
    except StoreError:  # never published: nothing to close, if the model exists at all
        if not (MODEL_ID.fullmatch(model_id) and model_path(model_id).is_file()):
            raise PublishError(f"no model '{model_id[:200]}' (ids are listed by `nanostream models`)") from None
    return Publication(model_id, False)


def _recorded(store: Store, model_id: str) -> ModelRecord:
    """The store's record of model_id, its bundle checked sound before anyone may use it."""
    try:
        record = store.get_model(model_id)
    except StoreError:
        record = None
    registered = model_path(model_id)
    bundle = registered if registered.is_file() or record is None else Path(record.bundle_path)
    try:
        meta = read_registered(model_id, bundle).meta
    except BundleError as exc:
        raise PublishError(f"cannot publish {model_id}: {exc}") from None
    if record is not None:
        return record
    created = datetime.datetime.fromisoformat(meta["created_at"]).timestamp()
    try:
        return store.record_model(meta.get("project"), model_id, bundle, meta["metrics"], created)
    except StoreError:  # its project is gone or was never in this store
        return store.record_model(None, model_id, bundle, meta["metrics"], created)


# ---------------------------------------------------------------- where people reach a model

def demo_path(model_id: str) -> str:
    return f"/demo?model={model_id}"


def project_demo_path(project: str) -> str:
    """The project's stable link: whichever version is published when someone opens it."""
    return f"/demo?project={quote(project, safe='')}"


def demo_url(base_url: str, model_id: str) -> str:
    return base_url.rstrip("/") + demo_path(model_id)


def app_base_url(page_url: str | None, page_path: str) -> str:
    """The app's root URL from the current page's URL (st.context.url) and its url_path."""
    url = (page_url or "http://localhost:8501").rstrip("/")
    suffix = "/" + page_path.strip("/")
    return url[: -len(suffix)] if page_path and url.endswith(suffix) else url


LOCAL_LINK_WARNING = ("This link says localhost, so it opens only on this computer: others cannot open it. Set "
                      f"{PUBLIC_URL_ENV} to the address people reach this app at (e.g. https://demo.example.org, "
                      "or http://<this computer's address>:8501 with `--server.address 0.0.0.0`) and restart the app.")


def public_base_url(configured: str | None, server_address: str | None, server_port: int | None,
                    seen: str) -> str:
    """The app's address for links others open: NANOSTREAM_PUBLIC_URL (configured), else
    Streamlit's browser.serverAddress and browser.serverPort where set to more than localhost,
    else `seen`, the root the browser shows (app_base_url)."""
    if configured and configured.strip():
        return configured.strip().rstrip("/")
    if server_address and not is_local_host(server_address):
        port = f":{server_port}" if server_port and server_port not in (80, 443) else ""
        return f"{'https' if server_port == 443 else 'http'}://{server_address}{port}"
    return seen.rstrip("/")


def is_local_host(url_or_host: str) -> bool:
    """The link opens only on this computer: localhost, *.localhost, or a loopback address."""
    host = urlsplit(url_or_host).hostname if "//" in url_or_host else url_or_host.strip("[]")
    host = (host or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DemoTarget:
    """What a demo link serves: a published version, or why not and where to go instead."""

    record: ModelRecord | None
    problem: str = ""                  # the sentence for the visitor when record is None
    project_path: str | None = None    # the project's stable link, when this version was replaced


def demo_target(store: Store, model_id: str | None, project: str | None) -> DemoTarget:
    """The version /demo?model=<model_id> or /demo?project=<project> serves now."""
    if project:
        try:
            live = store.list_models(project, published_only=True)
        except StoreError:
            live = []
        if live:
            return DemoTarget(live[0])
        return DemoTarget(None, "This project has no published version right now, or the link is incomplete. "
                                "Ask the person who shared it to publish a version.")
    try:
        record = store.get_model(model_id) if model_id else None
    except StoreError:
        record = None
    if record is not None and record.published:
        return DemoTarget(record)
    if record is not None and record.project is not None and store.list_models(record.project, published_only=True):
        return DemoTarget(None, "This version was replaced by a newer one of the same model.",
                          project_demo_path(record.project))
    return DemoTarget(None, "This model is not published, or the link is incomplete. "
                            "Ask the person who shared it to publish the model and send the link again.")


@dataclass(frozen=True)
class ApiSnippets:
    curl: str
    python: str


def api_snippets(api_url: str, model_id: str, published: bool) -> ApiSnippets:
    """A curl command and a Python snippet that classify photo.jpg through the HTTP API
    (`nanostream serve`); an unpublished model needs an API key."""
    endpoint = f"{api_url.rstrip('/')}/v1/models/{model_id}/predict"
    if published:
        curl = f'curl -X POST "{endpoint}" \\\n  -F "file=@photo.jpg"'
        call = f'requests.post("{endpoint}", files={{"file": f}})'
        imports = "import requests"
    else:
        curl = (f'curl -X POST "{endpoint}" \\\n  -H "Authorization: Bearer $NANOSTREAM_KEY" \\\n'
                f'  -F "file=@photo.jpg"')
        call = (f'requests.post("{endpoint}", files={{"file": f}},\n'
                f'                             headers={{"Authorization": f"Bearer {{os.environ[\'NANOSTREAM_KEY\']}}"}})')
        imports = "import os\n\nimport requests"
    python = (f'{imports}\n\nwith open("photo.jpg", "rb") as f:\n    response = {call}\n'
              f'response.raise_for_status()\nprint(response.json()["predictions"][0])')
    return ApiSnippets(curl, python)
