"""The model registry against hostile files: ids that are paths, files that claim other models' ids,
and damaged files in models/ (the API still lists, `models --check` names them, `models delete` removes them)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from nanostream.store import keys
from nanostream.engine.bundle import BundleError, read_header, save_bundle
from nanostream.engine.models import export_path, model_path, resolve_model, scan_models
from nanostream.store.db import Store
from nanostream.store.records import StoreError

REPO = Path(__file__).resolve().parent.parent
GOOD, BROKEN, VICTIM = "m-00000000a1", "m-00000000b2", "m-00000000c3"


def sound_bundle(path: Path, model_id: str, labels=("ants", "bees"), created="2025-01-01T00:00:00+00:00") -> Path:
    """A sound bundle without training: the header a reader needs, zeros for the head."""
    meta = {"model_id": model_id, "labels": list(labels), "backbone": "efficientnet_lite0", "created_at": created,
            "metrics": {"accuracy": 0.9}}
    width, classes = 1280, len(labels)
    return save_bundle(path, meta, {"head.mean": torch.zeros(width), "head.scale": torch.ones(width),
                                    "head.linear.weight": torch.zeros(classes, width),
                                    "head.linear.bias": torch.zeros(classes)})


def run(home: Path, *args) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in its own NANOSTREAM_HOME."""
    return subprocess.run([sys.executable, "-m", "nanostream", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "NANOSTREAM_HOME": str(home)}, timeout=300)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("NANOSTREAM_HOME", str(root))
    (root / "models").mkdir(parents=True)
    return root


# ---------------------------------------------------------------- ids are names, never paths

@pytest.mark.parametrize("bad_id", ["../../evil", "m-0123456789/../../x", "/m-0123456789", "m-00000000A1",
                                    "m-0123", "m-0123456789\n", "M-0123456789"])
def test_an_id_that_is_not_one_nanostream_makes_builds_no_path(bad_id, home):
    for build in (model_path, lambda i: export_path(i, "onnx")):
        with pytest.raises(BundleError, match="not a valid model id"):
            build(bad_id)
    with pytest.raises(BundleError, match="no model file or model id"):
        resolve_model(bad_id)


def test_the_share_page_exports_no_path_a_stored_id_points_at(home, tmp_path):
    """A version an older NanoStream recorded under '../../evil': the page says so and offers no export."""
    from streamlit.testing.v1 import AppTest

    bundle = sound_bundle(tmp_path / "elsewhere.safetensors", GOOD)
    with Store(home) as store:
        store.create_project("insects")
        store.record_model("insects", "../../evil", bundle, {"accuracy": 0.9})
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    at.session_state["app_project"] = "insects"
    at.switch_page("pages/share.py").run()
    assert not at.exception, [e.value for e in at.exception]
    errors = "\n".join(e.value for e in at.error)
    assert "This version cannot be exported: not a valid model id: '../../evil'" in errors
    assert not [b for b in at.button if b.label.startswith("Prepare the")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.safetensors", "home"]


# ---------------------------------------------------------------- publish FILE: the file's own id

def test_a_file_claiming_another_models_id_publishes_only_itself(home, tmp_path):
    sound_bundle(model_path(VICTIM), VICTIM)
    claim = sound_bundle(tmp_path / "claim.safetensors", VICTIM, labels=("cats", "dogs"))
    own_id = "m-" + hashlib.sha256(claim.read_bytes()).hexdigest()[:10]
    first = run(home, "publish", claim, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1]) == {"model_id": own_id, "published": True,
                                                        "demo": f"/demo?model={own_id}", "unpublished": [],
                                                        "project_demo": None}  # a file of no project
    with Store(home) as store:
        assert store.get_model(own_id).published and store.get_model(own_id).bundle_path == str(model_path(own_id))
        with pytest.raises(StoreError):
            store.get_model(VICTIM)  # never recorded, so never published
    imported = read_header(model_path(own_id))
    assert imported.model_id == own_id and imported.meta["labels"] == ["cats", "dogs"]
    assert read_header(model_path(VICTIM)).meta["labels"] == ["ants", "bees"]  # untouched
    again = run(home, "publish", claim, "--json")  # the same bytes: the same model, not a third one
    assert json.loads(again.stdout.splitlines()[-1])["model_id"] == own_id
    assert sorted(p.stem for p in (home / "models").iterdir()) == sorted([VICTIM, own_id])


def test_even_an_exact_copy_of_a_model_is_published_as_itself(home, tmp_path):
    """Bytes equal to the victim's still do not publish the victim: whoever holds the file publishes the file."""
    sound_bundle(model_path(VICTIM), VICTIM)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(model_path(VICTIM).read_bytes())
    proc = run(home, "publish", copy, "--json")
    model_id = json.loads(proc.stdout.splitlines()[-1])["model_id"]
    assert model_id != VICTIM
    with Store(home) as store:
        assert [r.model_id for r in store.published_models()] == [model_id]
    own = run(home, "publish", model_path(VICTIM), "--json")  # the registry's own file is that model
    assert json.loads(own.stdout.splitlines()[-1])["model_id"] == VICTIM


def test_publish_refuses_a_header_id_that_is_a_path(home, tmp_path):
    crafted = sound_bundle(tmp_path / "evil.safetensors", "../../../tmp/evil")
    proc = run(home, "publish", crafted)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {crafted}: damaged model file: its model id '../../../tmp/evil' is not one "
                           f"NanoStream makes ('m-' and 10 hex digits)\n")
    assert not list((home / "models").iterdir())


# ---------------------------------------------------------------- a damaged file in models/

@pytest.fixture
def damaged(home) -> Path:
    """A sound model and a published one whose file was then damaged."""
    sound_bundle(model_path(GOOD), GOOD, created="2025-01-02T00:00:00+00:00")
    sound_bundle(model_path(BROKEN), BROKEN)
    assert run(home, "publish", GOOD).returncode == 0
    assert run(home, "publish", BROKEN).returncode == 0
    model_path(BROKEN).write_bytes(model_path(BROKEN).read_bytes()[:100])  # cut inside its header
    return home


def test_the_api_lists_the_sound_models_and_logs_the_damaged_one(damaged, caplog):
    from nanostream.api.app import create_app

    _, key = keys.create_key("tests")
    with TestClient(create_app()) as client, caplog.at_level(logging.WARNING, logger="nanostream.api.service"):
        for headers in ({"Authorization": f"Bearer {key}"}, {}):
            response = client.get("/v1/models", headers=headers)
            assert response.status_code == 200, response.text
            assert [m["model_id"] for m in response.json()["models"]] == [GOOD]
        assert client.get(f"/v1/models/{BROKEN}", headers={"Authorization": f"Bearer {key}"}).status_code == 404
    assert (f"model list leaves out {model_path(BROKEN)}: not a NanoStream model file (not a safetensors file, "
            f"or a truncated one)") in caplog.text


def test_check_names_the_damaged_file_and_delete_removes_it(damaged):
    listed = run(damaged, "models")
    assert listed.returncode == 0 and listed.stdout.startswith(GOOD) and BROKEN not in listed.stdout
    assert "1 file(s) in the model folder are not sound models" in listed.stderr
    check = run(damaged, "models", "--check")
    assert check.returncode == 1
    assert check.stdout.splitlines() == [
        f"{BROKEN}: not a NanoStream model file (not a safetensors file, or a truncated one) ({model_path(BROKEN)})",
        "1 of 2 model files cannot be read; remove one with `nanostream models delete NAME`"]
    unpublished = run(damaged, "unpublish", BROKEN)  # reads no file: a damaged one can be closed
    assert unpublished.returncode == 0, unpublished.stderr
    assert unpublished.stdout == f"unpublished {BROKEN}: it needs an API key again\n"
    export_path(BROKEN, "onnx").parent.mkdir()
    for ext in ("onnx", "labels.json"):
        export_path(BROKEN, ext).write_text("an export of it")
    deleted = run(damaged, "models", "delete", BROKEN, "--json")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout.splitlines()[-1]) == {
        "name": BROKEN, "forgotten": True,
        "files": [str(model_path(BROKEN)), str(export_path(BROKEN, "labels.json")), str(export_path(BROKEN, "onnx"))]}
    assert not model_path(BROKEN).exists() and not list(export_path(BROKEN, "onnx").parent.iterdir())
    with Store(damaged) as store:
        assert [r.model_id for r in store.list_models()] == [GOOD]
    clean = run(damaged, "models", "--check")
    assert (clean.returncode, clean.stdout) == (0, "all 1 model files are sound\n")


def test_any_file_check_lists_can_be_deleted_and_nothing_else(home):
    junk = home / "models" / "notes.safetensors"
    junk.write_text("not a model")
    assert scan_models()[1][0].reason == "its name is not a model id ('m-' and 10 hex digits)"
    for name in ("../models/notes", "../../etc/passwd", "m-0000000000"):
        refused = run(home, "models", "delete", name)
        assert refused.returncode == 2 and refused.stderr.startswith(f"error: no model '{name}' to delete")
    assert junk.exists()
    assert run(home, "models", "delete", "notes.safetensors").stdout == f"deleted model notes: removed {junk}\n"
    assert not junk.exists()
