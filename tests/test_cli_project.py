"""Project, images and export-dataset commands through cli.main, with real photos; web search
against a stand-in provider whose hits point at a local HTTP server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nanostream import paths
from nanostream.cli.main import main
from nanostream.engine.data import scan_folder
from nanostream.sources.search import ImageHit, RateLimited
from nanostream.store.db import Store
from search_stand_in import SPEC, StandIn

# ---------------------------------------------------------------- helpers


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private store (no other test sees these projects) sharing the session's feature cache."""
    shared_features = paths.home() / "features"
    shared_features.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "home"
    root.mkdir()
    (root / "features").symlink_to(shared_features, target_is_directory=True)
    monkeypatch.setenv("NANOSTREAM_HOME", str(root))
    return root


def cli(capsys, *argv):
    """Run a command in-process: (exit status, stdout, stderr, the last stdout line as JSON or None)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    try:
        payload = json.loads(lines[-1]) if "--json" in argv and lines else None
    except json.JSONDecodeError:
        payload = None
    return code, out, err, payload


def ok(capsys, *argv):
    code, out, err, payload = cli(capsys, *argv)
    assert code == 0, err
    return payload


def one_line_error(capsys, *argv) -> str:
    code, _, err, _ = cli(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err


def photos(datasets, cls: str, n: int, start: int = 0) -> list[Path]:
    return sorted((datasets / "hymenoptera" / "train" / cls).iterdir())[start:start + n]


# ---------------------------------------------------------------- project


def test_project_create_list_rename_categories_delete(capsys, home):
    created = ok(capsys, "project", "create", "insects", "--categories", " ants, bees,, ", "--json")
    assert created["name"] == "insects" and created["categories"] == ["ants", "bees"]
    assert created["counts"] == {"ants": 0, "bees": 0}
    assert "already exists" in one_line_error(capsys, "project", "create", "Insects")
    assert "repeat" in one_line_error(capsys, "project", "create", "x", "--categories", "a,A")

    listed = ok(capsys, "project", "list", "--json")
    assert [(p["name"], p["categories"], p["images"]) for p in listed] == [("insects", ["ants", "bees"], 0)]

    renamed = ok(capsys, "project", "rename", "insects", "bugs", "--json")
    assert renamed["name"] == "bugs"
    changed = ok(capsys, "project", "categories", "bugs", "--add", "wasps,flies", "--remove", "bees",
                 "--terms", "ants=macro,colony", "--json")
    assert [(c["name"], c["search_terms"]) for c in changed["categories"]] == [
        ("ants", "macro,colony"), ("wasps", ""), ("flies", "")]
    assert changed["removed"] == {"bees": 0}
    assert "CATEGORY=extra words" in one_line_error(capsys, "project", "categories", "bugs", "--terms", "nowords")

    deleted = ok(capsys, "project", "delete", "bugs", "--json")
    assert deleted == {"deleted": "bugs", "images": 0}
    assert ok(capsys, "project", "list", "--json") == []
    assert "no project named 'bugs'" in one_line_error(capsys, "project", "delete", "bugs")


# ---------------------------------------------------------------- images add / list / export


def test_images_add_file_folder_zip_and_url_list(capsys, home, datasets, tmp_path, httpserver, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_ALLOW_PRIVATE_HOSTS", "1")
    ants, bees = photos(datasets, "ants", 5), photos(datasets, "bees", 3)
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in ants[1:3]:
        shutil.copy(p, folder / p.name)
    (folder / "notes.md").write_text("not a picture")
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(ants[3], "ants/a.jpg")
        z.writestr("../escape.jpg", ants[4].read_bytes())
    httpserver.expect_request("/bee.jpg").respond_with_data(bees[0].read_bytes(), content_type="image/jpeg")
    httpserver.expect_request("/gone.jpg").respond_with_data("", status=404)
    url_list = tmp_path / "urls.txt"
    url_list.write_text(f"# bees\n{httpserver.url_for('/bee.jpg')}\n{httpserver.url_for('/gone.jpg')}\nnot a url\n")

    ok(capsys, "project", "create", "insects", "--categories", "ants,bees")
    added = ok(capsys, "images", "add", "insects", "ants", ants[0], folder, archive, "--json")
    assert len(added["added"]) == 4 and added["duplicates"] == [] and added["count"] == 4
    reasons = {Path(s["source"]).name: s["reason"] for s in added["skipped"]}
    assert reasons == {"notes.md": "not an image: unsupported file type '.md'", "escape.jpg": "unsafe path"}

    from_urls = ok(capsys, "images", "add", "insects", "bees", url_list, "--json")
    assert len(from_urls["added"]) == 1
    skipped = {s["source"]: s["reason"] for s in from_urls["skipped"]}
    assert "404" in skipped[httpserver.url_for("/gone.jpg")] and f"{url_list}:4" in skipped

    again = ok(capsys, "images", "add", "insects", "ants", ants[0], folder, "--json")
    assert again["added"] == [] and len(again["duplicates"]) == 3 and again["count"] == 4

    code, _, _, payload = cli(capsys, "images", "add", "insects", "ants", tmp_path / "missing.jpg", "--json")
    assert code == 1 and payload["skipped"] == [{"source": str(tmp_path / "missing.jpg"), "reason": "not found"}]
    assert "no category 'ant'" in one_line_error(capsys, "images", "add", "insects", "ant", ants[0])
    assert "no project named 'nope'" in one_line_error(capsys, "images", "add", "nope", "ants", ants[0])

    listed = ok(capsys, "images", "list", "insects", "--json")
    assert listed["counts"] == {"ants": 4, "bees": 1}
    assert {(i["category"], i["source"]) for i in listed["images"]} == {("ants", "upload"), ("bees", "url_list")}
    bee = next(i for i in listed["images"] if i["category"] == "bees")
    assert bee["image_url"] == httpserver.url_for("/bee.jpg") and len(bee["hash"]) == 64

    out = tmp_path / "export"
    exported = ok(capsys, "export-dataset", "insects", out, "--json")
    assert exported["images"] == 5
    dataset = scan_folder(out)
    assert dataset.classes == ("ants", "bees") and len(dataset.train) == 5
    assert {p.name for p in (out / "ants").iterdir()} == {f"{i['hash']}.jpg" for i in listed["images"]
                                                          if i["category"] == "ants"}
    assert "not an empty folder" in one_line_error(capsys, "export-dataset", "insects", out)


_KILLED_IMAGES_ADD = """
import os, signal, sys
from nanostream.cli.main import main
from nanostream.store.db import Store

write_blob = Store._write_blob


def write_then_die(self, digest, data):
    write_blob(self, digest, data)
    os.kill(os.getpid(), signal.SIGKILL)  # the crash window: the file is on disk, its row not committed


Store._write_blob = write_then_die
main(sys.argv[1:])
"""


def _run_cli(*argv, script: str | None = None) -> subprocess.CompletedProcess:
    """A command in a process of its own (bounded: a hang fails the test instead of stalling it)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "nanostream"]
    return subprocess.run([*command, *map(str, argv)], env=env, capture_output=True, text=True, timeout=120)


def test_images_add_killed_mid_write_leaves_no_orphan_after_the_next_open(capsys, home, datasets):
    ok(capsys, "project", "create", "insects", "--categories", "ants")
    first, second = photos(datasets, "ants", 2)
    ok(capsys, "images", "add", "insects", "ants", first)
    killed = _run_cli("images", "add", "insects", "ants", second, "--quiet", script=_KILLED_IMAGES_ADD)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    blobs = sorted(p for p in (home / "blobs").rglob("*") if p.is_file())
    assert len(blobs) == 2  # the killed command left a file without its row
    listed = ok(capsys, "images", "list", "insects", "--json")  # the next command opens the store
    assert listed["counts"] == {"ants": 1}
    kept = listed["images"][0]["hash"]
    assert [p.name for p in (home / "blobs").rglob("*") if p.is_file()] == [f"{kept}.jpg"]


def test_images_add_skips_a_named_pipe_instead_of_hanging(capsys, home, datasets, tmp_path):
    ok(capsys, "project", "create", "insects", "--categories", "ants")
    pipe = tmp_path / "ant.jpg"
    os.mkfifo(pipe)
    photo = photos(datasets, "ants", 1)[0]
    done = _run_cli("images", "add", "insects", "ants", pipe, photo, "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "added 1 image to 'ants' (now 1)",
        f"  skipped {pipe}: not a regular file (a named pipe); only regular files are read"]
    assert ok(capsys, "images", "list", "insects", "--json")["counts"] == {"ants": 1}


# ---------------------------------------------------------------- images search

@pytest.fixture
def search_env(home, monkeypatch, httpserver):
    monkeypatch.setenv("NANOSTREAM_SEARCH_PROVIDER", SPEC)
    monkeypatch.setenv("NANOSTREAM_ALLOW_PRIVATE_HOSTS", "1")
    StandIn.queries, StandIn.script, StandIn.on_query = [], {}, None
    return httpserver


def serve(httpserver, path: str, photo: Path) -> ImageHit:
    httpserver.expect_request(path).respond_with_data(photo.read_bytes(), content_type="image/jpeg")
    return ImageHit(httpserver.url_for(path), f"https://example.org/page{path}", "", "", None, None, "stand-in",
                    "CC0 1.0")  # licensed: the default filter (free) keeps them


def test_images_search_downloads_stores_provenance_and_caches(capsys, search_env, datasets):
    server = search_env
    ants, bees = photos(datasets, "ants", 3), photos(datasets, "bees", 3)
    server.expect_request("/broken.jpg").respond_with_data("<html>", content_type="text/html")
    StandIn.script = {
        "ants": [serve(server, f"/ant{i}.jpg", p) for i, p in enumerate(ants)]
        + [serve(server, "/ant0-again.jpg", ants[0])],  # same picture at another URL
        "bees": [serve(server, f"/bee{i}.jpg", p) for i, p in enumerate(bees)]
        + [ImageHit(server.url_for("/broken.jpg"), "", "", "", None, None, "stand-in", "CC0 1.0")],
    }
    ok(capsys, "project", "create", "insects", "--categories", "ants,bees")
    code, out, err, report = cli(capsys, "images", "search", "insects", "--per-category", "10",
                                 "--terms", "macro", "--json")
    assert code == 0, err
    ants_result, bees_result = report["categories"]["ants"], report["categories"]["bees"]
    assert (len(ants_result["added"]), len(ants_result["duplicates"]), ants_result["failed"]) == (3, 1, [])
    assert (len(bees_result["added"]), bees_result["duplicates"]) == (3, [])
    assert [f["url"] for f in bees_result["failed"]] == [server.url_for("/broken.jpg")]
    assert bees_result["failed"][0]["reason"]  # says why, in words
    assert report["counts"] == {"ants": 3, "bees": 3} and report["added"] == 6 and not report["rate_limited"]
    assert ants_result["queries"] == ["ants", "ants photo", "ants macro"]  # --terms adds a variant
    assert "search ants" in err and "download bees" in err  # progress on stderr
    assert "ants: 3 new images from 4 found (1 already in the project, 0 failed)" in out

    with Store() as store:
        records = store.list_images("insects", "ants")
    first = records[0].provenance
    assert first.source == "web_search" and first.query == "ants"
    assert first.image_url == server.url_for("/ant0.jpg") and first.final_url == first.image_url
    assert first.page_url == "https://example.org/page/ant0.jpg" and first.width > 0

    # again: every query comes from the cache, and nothing new is added
    StandIn.queries = []
    again = ok(capsys, "images", "search", "insects", "--per-category", "10", "--terms", "macro", "--json")
    assert StandIn.queries == []
    assert again["added"] == 0 and again["counts"] == {"ants": 3, "bees": 3}


def test_images_search_rate_limited_midway_keeps_what_was_found(capsys, search_env, datasets):
    server = search_env
    StandIn.script = {
        "ants": [serve(server, f"/ant{i}.jpg", p) for i, p in enumerate(photos(datasets, "ants", 2))],
        "bees": RateLimited("429 Too Many Requests"),
        "wasps": [serve(server, "/wasp.jpg", photos(datasets, "bees", 1)[0])],
    }
    ok(capsys, "project", "create", "insects", "--categories", "ants,bees,wasps")
    code, out, err, report = cli(capsys, "images", "search", "insects", "--per-category", "2", "--json")
    assert code == 0, err
    assert report["rate_limited"] and report["counts"] == {"ants": 2, "bees": 0, "wasps": 0}
    assert report["categories"]["bees"]["rate_limited"] and not report["categories"]["wasps"]["searched"]
    assert not any(q.startswith("wasps") for q in StandIn.queries)  # no more calls once refused
    assert "rate limited while searching 'bees': kept every image found so far; not searched: wasps" in out


def test_images_search_errors(capsys, search_env, monkeypatch):
    ok(capsys, "project", "create", "empty")
    assert "no categories to search" in one_line_error(capsys, "images", "search", "empty")
    monkeypatch.setenv("NANOSTREAM_SEARCH_PROVIDER", "no_such_module:factory")
    ok(capsys, "project", "categories", "empty", "--add", "cats")
    assert "not an importable" in one_line_error(capsys, "images", "search", "empty")


# ---------------------------------------------------------------- train a project


def test_train_a_project_and_review_it(capsys, home, datasets, tmp_path):
    ok(capsys, "project", "create", "hymenoptera", "--categories", "ants,bees,wasps")
    for cls in ("ants", "bees"):
        folder = tmp_path / cls
        folder.mkdir()
        for p in photos(datasets, cls, 6):
            shutil.copy(p, folder / p.name)
        ok(capsys, "images", "add", "hymenoptera", cls, folder, "--quiet")

    summary = ok(capsys, "train", "hymenoptera", "--backbone", "efficientnet_lite0", "--views", "1", "--json")
    assert summary["classes"] == ["ants", "bees"]  # the empty category is left out
    assert summary["n_train"] + summary["n_val"] == 12 and 0.5 <= summary["accuracy"] <= 1
    from nanostream.store.db import Store
    assert [m.model_id for m in Store().list_models("hymenoptera")] == [summary["model_id"]]

    review = ok(capsys, "images", "review", "hymenoptera", "--json", "--quiet")
    assert set(review["categories"]) == {"ants", "bees", "wasps"}
    assert len(review["categories"]["ants"]) == 6 and review["categories"]["wasps"] == []

    assert "no data folder or project named 'hymenopterra' (projects: hymenoptera)" in one_line_error(
        capsys, "train", "hymenopterra")
    ok(capsys, "project", "create", "lonely", "--categories", "ants,bees")
    ok(capsys, "images", "add", "lonely", "ants", photos(datasets, "ants", 2)[0], photos(datasets, "ants", 2)[1])
    assert "need at least 2 classes with images, found only 'ants'" in one_line_error(capsys, "train", "lonely")
