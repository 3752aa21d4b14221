"""Publishing a model version: a demo link for anyone and the HTTP API without a key, or closed again.

One published version per project: publishing a version unpublishes the project's others, so the
project's demo link and keyless callers get the version the user chose last, never an older one
left open by mistake. A model without a project (trained from a folder, or imported) stands alone.
The Share page and `nanostream publish` / `unpublish` both come here.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from ..engine.bundle import MODEL_ID, BundleError
from ..engine.models import model_path, read_registered
from ..store.db import Store
from ..store.records import ModelRecord, StoreError


class PublishError(ValueError):
    """A model that cannot be published or unpublished; the message says why."""


@dataclass(frozen=True)
class Publication:
    model_id: str
    published: bool
    unpublished: tuple[str, ...] = ()  # the project's other versions that publishing this one closed

    @property
    def demo_path(self) -> str:
        return demo_path(self.model_id)


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
    return Publication(model_id, True, closed)


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


def demo_url(base_url: str, model_id: str) -> str:
    return base_url.rstrip("/") + demo_path(model_id)


def app_base_url(page_url: str | None, page_path: str) -> str:
    """The app's root URL from the current page's URL (st.context.url) and its url_path."""
    url = (page_url or "http://localhost:8501").rstrip("/")
    suffix = "/" + page_path.strip("/")
    return url[: -len(suffix)] if page_path and url.endswith(suffix) else url


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
