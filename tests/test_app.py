"""The Streamlit app through streamlit.testing.v1.AppTest: each page, its errors as messages,
and the main flow (create project -> upload photos -> build -> test -> share link -> demo).

Each test gets its own NANOSTREAM_HOME (a fresh store with the sample project). Builds are
tiny (efficientnet_lite0, one augmented view) and run in real worker processes; the tests
poll the job in the store with a bound.
"""

from __future__ import annotations

import io
import os
import signal
import time
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from nanostream.engine.images import normalize_image
from nanostream.store.db import Store
from nanostream.store.records import FINISHED, Provenance

APP = str(Path(__file__).resolve().parent.parent / "app.py")
SAMPLE = "Sample: ants and bees"
BUILD_TIMEOUT_S = 300


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private NANOSTREAM_HOME; workers the pages started (rankings) are stopped afterwards."""
    from nanostream import jobs

    root = tmp_path / "home"
    monkeypatch.setenv("NANOSTREAM_HOME", str(root))
    yield root
    for process in list(jobs._children.values()):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # each worker leads its own session
        process.wait(timeout=60)


@pytest.fixture
def store(home):
    with Store(home) as store:
        yield store


def open_app(page: str | None = None, project: str | None = None, query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(query or {})
    at.run()
    if project is not None:
        at.session_state["app_project"] = project
    if page is not None:
        at.switch_page(page).run()
    ok(at)
    return at


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def button(at: AppTest, label: str):
    matches = [b for b in at.button if b.label == label]
    assert matches, f"no button '{label}' in {[b.label for b in at.button]}"
    return matches[0]


def photos(datasets: Path, split: str, label: str, n: int) -> list[Path]:
    found = sorted((datasets / "hymenoptera" / split / label).glob("*.jpg"))[:n]
    assert len(found) == n, f"need {n} {label} photos under {datasets}"
    return found


def as_upload(path: Path) -> tuple[str, bytes, str]:
    return path.name, path.read_bytes(), "image/jpeg"


def add_photos(store: Store, project: str, category: str, files) -> None:
    store.ensure_category(project, category)
    for path in files:
        store.add_image(project, category, normalize_image(Path(path).read_bytes()), Provenance("upload"))


def wait_for_build(store: Store, project: str):
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while True:
        job = next(j for j in store.list_jobs(project) if j.kind == "build")
        if job.status in FINISHED:
            return job
        assert time.monotonic() < deadline, f"build still {job.status} ({job.stage}) after {BUILD_TIMEOUT_S} s"
        time.sleep(0.25)  # polling interval


def zipped(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


# ---------------------------------------------------------------- the app and its projects

def test_pages_and_their_helpers_do_not_import_torch():
    """Opening a page must not pay for torch: it loads only when a page draws a preview or predicts."""
    import subprocess
    import sys

    code = ("import sys; import nanostream.ui, nanostream.ui.images, nanostream.ui.build, nanostream.jobs, nanostream.flows.sample, nanostream.store.keys, "
            "nanostream.flows.review, nanostream.flows.evaluate, nanostream.flows.publish, nanostream.charts, "
            "nanostream.engine.bundle, nanostream.engine.prediction; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(APP).parent)
    for page in Path(APP).parent.glob("pages/*.py"):
        assert "import torch" not in page.read_text(), page


def test_ui_holds_widgets_only():
    """ui/ imports neither torch nor PIL (at any depth of its files), and only reads the store:
    library work lives in the flows, the engine and charts; a page's own callback changes things."""
    import ast

    from nanostream.store.db import Store

    reads = {"counts", "image_path", "blob_path", "published_models", "cancel_requested"}
    writes = {name for name in dir(Store) if not name.startswith(("_", "get_", "list_")) and name not in reads}
    files = sorted((Path(APP).parent / "nanostream" / "ui").glob("*.py"))
    assert {"__init__.py", "build.py", "images.py"} <= {f.name for f in files}
    for path in files:
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"torch", "torchvision", "PIL", "numpy", "matplotlib"}, path.name
        called = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert called & writes == set(), path.name



def test_app_opens_as_nanostream_with_the_sample_project(home, store):
    at = open_app()
    assert at.title[0].value == "NanoStream"
    assert SAMPLE in at.sidebar.selectbox(key="app_project_picker").options
    assert store.counts(SAMPLE) == {"ants": 15, "bees": 15}

    store.delete_project(SAMPLE)  # deleted stays deleted on the next launch...
    at = open_app()
    assert SAMPLE not in at.sidebar.selectbox(key="app_project_picker").options
    at.button(key="projects_sample").click().run()  # ...until the user asks for it again
    ok(at)
    assert at.session_state["app_project"] == SAMPLE and at.header[0].value == "Images"


def test_projects_create_open_rename_delete(home, store):
    at = open_app()
    at.text_input(key="projects_new_name").set_value("Birds")
    at.text_input(key="projects_new_categories").set_value("robin, blackbird")
    button(at, "Create project").click().run()
    ok(at)
    assert at.header[0].value == "Categories" and at.session_state["app_project"] == "Birds"
    assert store.get_project("Birds").categories == ("robin", "blackbird")

    at = open_app()
    at.text_input(key="projects_new_name").set_value("birds")
    button(at, "Create project").click().run()
    assert "already exists" in texts(at.error)
    at.text_input(key="projects_new_name").set_value("a/b")
    button(at, "Create project").click().run()
    assert "slash" in texts(at.error)

    project_id = store.get_project("Birds").id
    at.session_state["app_project"] = "Birds"
    at.text_input(key=f"projects_name_{project_id}").set_value("Garden birds")
    at.button(key=f"projects_rename_{project_id}").click().run()
    ok(at)
    assert "Garden birds" in [p.name for p in store.list_projects()]
    assert at.session_state["app_project"] == "Garden birds"

    assert at.button(key=f"projects_delete_{project_id}").disabled  # until the user ticks "delete it"
    at.checkbox(key=f"projects_sure_{project_id}").check().run()
    at.button(key=f"projects_delete_{project_id}").click().run()
    ok(at)
    assert "Garden birds" not in [p.name for p in store.list_projects()]
    assert at.session_state["app_project"] is None


def test_pages_without_a_project_say_where_to_start(home):
    for page in ("pages/categories.py", "pages/images.py", "pages/build.py", "pages/test.py", "pages/share.py"):
        at = open_app(page)
        assert "Choose a project" in texts(at.info), page


def test_categories_add_rename_search_words_remove(home, store, datasets):
    store.create_project("pets", ["cat"])
    add_photos(store, "pets", "cat", photos(datasets, "train", "ants", 1))
    at = open_app("pages/categories.py", "pets")
    at.text_input(key="categories_new").set_value("dog, fish")
    button(at, "Add").click().run()
    ok(at)
    assert store.get_project("pets").categories == ("cat", "dog", "fish")
    at.text_input(key="categories_new").set_value("Dog")
    button(at, "Add").click().run()
    assert "already has a category" in texts(at.error)

    fish = store.get_category("pets", "fish")
    at.text_input(key=f"categories_name_{fish.id}").set_value("goldfish")
    at.text_input(key=f"categories_terms_{fish.id}").set_value("pet fish, aquarium")
    [b for b in at.button if b.label == "Save"][2].click().run()
    ok(at)
    assert store.get_category("pets", "goldfish").search_terms == "pet fish, aquarium"
    [b for b in at.button if b.label == "Remove"][2].click().run()
    assert store.get_project("pets").categories == ("cat", "dog")

    cat = store.get_category("pets", "cat")
    [b for b in at.button if b.label == "Remove"][0].click().run()
    assert "has 1 images" in texts(at.error) and "cat" in store.get_project("pets").categories
    at.checkbox(key=f"categories_sure_{cat.id}").check()  # in the category's form: sent with Remove
    [b for b in at.button if b.label == "Remove"][0].click().run()
    ok(at)
    assert store.get_project("pets").categories == ("dog",)


# ---------------------------------------------------------------- images

def test_images_upload_zip_warnings_move_and_delete(home, store, datasets):
    store.create_project("insects", ["ants", "bees"])
    at = open_app("pages/images.py", "insects")
    ants = photos(datasets, "train", "ants", 3)
    at.file_uploader(key="images_upload_files_0").set_value(
        [as_upload(p) for p in ants] + [("broken.jpg", b"not an image", "image/jpeg")]).run()
    at.button(key="images_upload_go").click().run()
    ok(at)
    assert "Added 3 image(s)" in texts(at.success) and "1 skipped" in texts(at.success)
    assert "broken.jpg: not an image" in texts(at.caption)
    assert store.counts("insects") == {"ants": 3, "bees": 0}

    # a zip laid out by category, and a photo over the 20 MB ingest limit
    bees = photos(datasets, "train", "bees", 2)
    archive = zipped({f"photos/bees/{p.name}": p.read_bytes() for p in bees} | {"photos/wasps/w.jpg": ants[0].read_bytes()})
    at.selectbox(key="images_upload_target").set_value("(use folder names as categories)")
    at.file_uploader(key="images_upload_files_1").set_value(
        [("insects.zip", archive, "application/zip"), ("huge.jpg", b"\xff\xd8" + b"0" * 21_000_000, "image/jpeg")]).run()
    at.button(key="images_upload_go").click().run()
    ok(at)
    assert store.counts("insects") == {"ants": 3, "bees": 2, "wasps": 0}  # the wasp is a copy of an ant
    assert "too large" in texts(at.caption) and "already in the project" in texts(at.success) + texts(at.warning)
    warnings = texts(at.warning)
    assert "Too few images in ants (3), bees (2), wasps (0)" in warnings and "add at least 5" in warnings

    # review grid: move one ant to bees; delete another, asked first ("keep them", then yes)
    shown = [r.id for r in store.list_images("insects", "ants")]
    assert at.button(key="images_delete").disabled and at.button(key="images_move").disabled  # nothing ticked
    at.checkbox(key=f"images_sel_{shown[0]}").check().run()
    assert "1 of the 3 photos on this page selected." in texts(at.caption)
    at.selectbox(key="images_move_to").set_value("bees").run()
    at.button(key="images_move").click().run()
    ok(at)
    assert "Moved 1 image(s)" in texts(at.success)
    assert store.counts("insects")["bees"] == 3
    at.checkbox(key=f"images_sel_{shown[1]}").check().run()
    at.button(key="images_delete").click().run()
    ok(at)
    assert "Delete **1** photo(s) from the project? They cannot be brought back." in texts(at.markdown)
    assert store.counts("insects")["ants"] == 2  # asked, not deleted yet
    at.button(key="images_delete_no").click().run()
    assert store.counts("insects")["ants"] == 2
    at.button(key="images_delete").click().run()
    at.button(key="images_delete_yes").click().run()
    ok(at)
    assert "Deleted 1 image(s)." in texts(at.success)
    assert store.counts("insects")["ants"] == 1

    # the magnifier enlarges a photo, and it stays open through a rerun until closed
    kept = store.list_images("insects", "ants")[0].id
    at.button(key=f"images_zoom_{kept}").click().run()
    assert f"#{kept} in **ants**" in texts(at.caption)
    at.run()
    assert f"#{kept} in **ants**" in texts(at.caption)
    at.button(key="images_zoom_close").click().run()
    assert f"#{kept} in **ants**" not in texts(at.caption)


def test_images_page_reads_the_rankings_findings_not_its_words(home, store, datasets, tmp_path):
    """A finished ranking that files one photo under two labels: the page counts it by its Finding,
    however the reason is worded, and shows the reason's text under the photo."""
    import json

    from nanostream import jobs
    from nanostream.flows.review import Finding, Reason, SuspectImage

    store.create_project("insects", ["ants", "bees"])
    add_photos(store, "insects", "ants", photos(datasets, "train", "ants", 5))
    add_photos(store, "insects", "bees", photos(datasets, "train", "bees", 5))
    first, second = (r.id for r in store.list_images("insects", "ants")[:2])
    odd = SuspectImage(first, 0.9, (Reason(Finding.CONFLICT, "this photo is filed twice, see the bees"),))
    fine = SuspectImage(second, 0.5, (Reason(Finding.LOOKS_LIKE, "looks more like 'bees'"),))
    ranking = tmp_path / "ranking.json"
    ranking.write_text(json.dumps({"ants": [odd.to_dict(), fine.to_dict()], "bees": []}))
    job = store.create_job("insects", "rank", {"fingerprint": jobs.images_fingerprint(store, "insects")})
    store.update_job(job.id, status="running")
    store.update_job(job.id, status="done", result={"path": str(ranking)})
    at = open_app("pages/images.py", "insects")
    assert texts(at.warning) == ("1 image(s) appear in more than one category (marked 'also in' below): keep each "
                                 "photo in the one category it belongs to, and delete or move the other copy.")
    captions = [c.value for c in at.caption]
    assert ":warning: this photo is filed twice, see the bees" in captions
    assert captions.index(":warning: this photo is filed twice, see the bees") < captions.index(
        ":warning: looks more like 'bees'")  # the ranking's order: the photo to act on first
    assert [j.id for j in store.list_jobs("insects") if j.kind == "rank"] == [job.id]  # current: none started


def test_images_page_reports_job_errors_as_messages(home, store):
    from nanostream import jobs

    store.create_project("insects", ["ants", "bees"])
    failed = store.create_job("insects", "search", {"categories": ["ants"], "per_category": 5})
    store.update_job(failed.id, status="failed", error="You seem to be offline: the image search cannot be reached.")
    at = open_app("pages/images.py", "insects")
    assert "offline" in texts(at.error)
    at.text_area(key="images_urls_text").set_value("just words\n")
    at.button(key="images_urls_go").click().run()
    ok(at)
    assert "No image URLs found" in texts(at.error)
    assert jobs.active_job(store, "insects", "urls") is None

    store.create_project("bare")
    empty = open_app("pages/images.py", "bare")
    assert "Add the categories" in texts(empty.info)


# ---------------------------------------------------------------- build, with failures

def test_build_page_refuses_too_few_images_and_reports_failed_builds(home, store, datasets):
    from nanostream import jobs

    store.create_project("tiny", ["ants", "bees"])
    add_photos(store, "tiny", "ants", photos(datasets, "train", "ants", 1))
    at = open_app("pages/build.py", "tiny")
    assert at.image, "the augmentation preview shows the user's photos"
    at.button(key="build_go").click().run()
    ok(at)
    assert "at least 2 categories with 2 or more images" in texts(at.error)
    assert store.list_jobs("tiny") == []

    killed = store.create_job("tiny", "build", {})
    store.update_job(killed.id, status="running")
    store.update_job(killed.id, status="failed", error=jobs.WORKER_GONE)
    at = open_app("pages/build.py", "tiny")
    assert "worker process ended" in texts(at.error) and "unchanged" in texts(at.error)
    assert at.button(key="build_go")  # the project stays usable: build again

    cancelled = store.create_job("tiny", "build", {})
    store.request_cancel(cancelled.id)
    at = open_app("pages/build.py", "tiny")
    assert "cancelled" in texts(at.info)


def test_build_page_offers_one_click_fixes_for_wrong_photos(home, store, datasets):
    store.create_project("insects")
    add_photos(store, "insects", "ants", photos(datasets, "train", "ants", 2))
    add_photos(store, "insects", "bees", photos(datasets, "train", "bees", 2))
    wrong, unsure = store.list_images("insects", "ants")
    job = store.create_job("insects", "build", {"config": {"backbone": "efficientnet_lite0", "views": 1}})
    store.update_job(job.id, status="running")
    metrics = {"accuracy": 0.5, "n": 2, "confusion": [[0, 1], [0, 1]],
               "per_class": {"ants": {"precision": 0, "recall": 0, "n": 1}, "bees": {"precision": 0.5, "recall": 1, "n": 1}},
               "highest_loss": [{"file": "", "image_id": wrong.id, "label": "ants", "predicted": "bees", "confidence": 0.9, "loss": 2.3},
                                {"file": "", "image_id": unsure.id, "label": "ants", "predicted": "ants", "confidence": 0.55, "loss": 0.6}]}
    store.update_job(job.id, status="done", result={
        "model_id": "m-0123456789", "accuracy": 0.5, "metrics": metrics, "labels": ["ants", "bees"],
        "backbone": "efficientnet_lite0", "mode": "fast", "policy": {"name": "default", "views": 1, "fill": "reflect"},
        "candidates": [{"backbone": "efficientnet_lite0", "cv_accuracy": None, "seconds": 1.0, "gflops": 0.4, "error": None}],
        "n_train": 2, "n_val": 2, "seconds": 3.0, "device": "CPU", "gpu": False, "precision": "fp32", "skipped": [],
        "advice": "Add about 10 more images per category.", "curve_png": ""})
    at = open_app("pages/build.py", "insects")
    assert "50%" in [m.value for m in at.metric] and "CPU" in [m.value for m in at.metric]
    assert "Labelled **ants**; the model says **bees** (90%)." in texts(at.markdown)
    assert at.button(key=f"build_delete_{unsure.id}")  # right but unsure: deleting is offered, moving is not
    assert f"build_move_{unsure.id}" not in [b.key for b in at.button]
    at.button(key=f"build_move_{wrong.id}").click().run()
    ok(at)
    assert store.get_image("insects", wrong.id).category == "bees"
    assert at.button(key="build_rebuild")  # fixed: rebuild with one click


# ---------------------------------------------------------------- the main flow

def test_main_flow_create_upload_build_test_share_demo(home, store, datasets):
    # create a project with two categories
    at = open_app()
    at.text_input(key="projects_new_name").set_value("Insects")
    at.text_input(key="projects_new_categories").set_value("ants, bees")
    button(at, "Create project").click().run()
    ok(at)

    # add photos by upload, one category at a time
    at.switch_page("pages/images.py").run()
    for label in ("ants", "bees"):
        at.selectbox(key="images_upload_target").set_value(label)
        at.file_uploader(key=f"images_upload_files_{at.session_state['images_upload_round']}").set_value(
            [as_upload(p) for p in photos(datasets, "train", label, 4)]).run()
        at.button(key="images_upload_go").click().run()
        ok(at)
    assert store.counts("Insects") == {"ants": 4, "bees": 4}

    # build in a worker process; the page shows progress, then the results
    at.switch_page("pages/build.py").run()
    ok(at)
    at.selectbox(key="build_backbone").set_value("efficientnet_lite0")
    at.number_input(key="build_views_default").set_value(1)
    at.button(key="build_go").click().run()
    ok(at)
    assert "Building…" in texts(at.subheader) and any(b.label == "Cancel" for b in at.button)
    second_tab = open_app("pages/build.py", "Insects")  # a new session finds the job in the store
    assert "Building…" in texts(second_tab.subheader) or "Model m-" in texts(second_tab.subheader)
    job = wait_for_build(store, "Insects")
    assert job.status == "done", job.error
    at.run()
    ok(at)
    model_id = job.result["model_id"]
    assert f"Model {model_id}" in texts(at.subheader)
    assert any(m.label.startswith("Accuracy on") for m in at.metric)
    assert len(at.image) >= 1  # the confusion matrix
    assert "Backbones tried" in texts(at.subheader)

    # test it; the threshold turns a low answer into "not sure". On a photo it learned from: one of
    # 8 new ones can be "not one of ants, bees" (the unknown check's threshold rests on 8 photos),
    # a training photo is nearer its category's mean than any held out when the threshold was set
    at.switch_page("pages/test.py").run()
    ok(at)
    ant = photos(datasets, "train", "ants", 1)[0]
    at.file_uploader(key="test_files").set_value([as_upload(ant)])
    at.run()
    ok(at)
    assert at.success or at.warning
    at.slider(key="test_threshold").set_value(1.0).run()
    assert "Not sure" in texts(at.warning)
    labelled = zipped({f"test/{label}/{p.name}": p.read_bytes()
                       for label in ("ants", "bees") for p in photos(datasets, "val", label, 2)})
    at.file_uploader(key="test_zip").set_value([("labelled.zip", labelled, "application/zip")])
    at.run()
    ok(at)
    assert any(m.label == "Accuracy on 4 photos" for m in at.metric)

    # share: publish this version and read its demo link
    at.switch_page("pages/share.py").run()
    ok(at)
    assert "Authorization: Bearer" in texts(at.code)  # not published yet: the API needs a key
    at.button(key="share_publish").click().run()
    ok(at)
    assert store.get_model(model_id).published
    link = next(c.value for c in at.code if "/demo?model=" in c.value)
    assert link.endswith(f"/demo?model={model_id}")
    assert f"/v1/models/{model_id}/predict" in texts(at.code)

    # the demo link, as someone who has nothing but the link
    demo = open_app(query={"model": model_id})
    demo.switch_page("pages/demo.py").run()
    ok(demo)
    assert demo.title[0].value == "Insects"
    assert "**ants**, **bees**" in texts(demo.markdown)
    assert not demo.sidebar.selectbox  # no project picker: nothing of the project is reachable
    demo.file_uploader(key="demo_photo").set_value(as_upload(ant))
    demo.run()
    ok(demo)
    assert demo.success or demo.warning

    store.set_published(model_id, False)
    demo.run()
    assert "not published" in texts(demo.error)


def test_demo_refuses_unknown_and_unpublished_models(home, store):
    from model_fixture import tiny_model

    for query in ({"model": "m-0000000000"}, {}):
        demo = open_app(query=query)
        demo.switch_page("pages/demo.py").run()
        ok(demo)
        assert "not published" in texts(demo.error)
    model = tiny_model()
    store.create_project("insects")
    store.record_model("insects", model.model_id, model.path, {"accuracy": 1.0})
    demo = open_app(query={"model": model.model_id})
    demo.switch_page("pages/demo.py").run()
    assert "not published" in texts(demo.error) and not demo.file_uploader


def test_share_keys_publish_and_downloads(home, store):
    from model_fixture import tiny_model

    model = tiny_model()
    store.create_project("insects")
    store.record_model("insects", model.model_id, model.path, {"accuracy": 1.0})
    at = open_app("pages/share.py", "insects")
    assert at.get("download_button"), "the model bundle can be downloaded"
    at.text_input(key=[t.key for t in at.text_input if t.label.startswith("Name for a new key")][0]).set_value("phone")
    button(at, "Create key").click().run()
    ok(at)
    assert "shown only this once" in texts(at.success)
    assert any(c.value.startswith("ns_") for c in at.code)
    at.button(key="share_revoke_phone").click().run()
    ok(at)
    assert "revoked" in texts(at.markdown)
    at.button(key="share_publish").click().run()
    assert store.get_model(model.model_id).published and at.get("link_button")
    at.button(key="share_unpublish").click().run()
    assert not store.get_model(model.model_id).published
