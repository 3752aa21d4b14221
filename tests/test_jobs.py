"""Background jobs: a build's worker process from start to model, cancel, a killed worker reaped
as failed with its project still usable, two builds of two projects at once; and the web search,
URL-list and ranking jobs run in-process with their network replaced by fakes.

Real photos from the shared datasets; builds are tiny (efficientnet_lite0, one augmented view).
No test sleeps to wait for work: each polls the job's state in the store with a bound.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from nanostream import jobs, worker
from nanostream.engine.images import normalize_image
from nanostream.store.db import Store
from nanostream.store.records import FINISHED, Provenance
from nanostream.engine.train import TrainConfig

TINY = TrainConfig(backbone="efficientnet_lite0", views=1)
BUILD_TIMEOUT_S = 300  # a cold worker on two CPU cores: torch import, backbone load, features


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "store")
    yield store
    for job in store.list_jobs():  # no worker outlives its test
        if job.status not in FINISHED:
            store.request_cancel(job.id)
    for job_id, process in list(jobs._children.items()):
        process.wait(timeout=60)
    store.close()


def photos(datasets: Path, split: str, label: str, n: int, start: int = 0) -> list[Path]:
    found = sorted((datasets / "hymenoptera" / split / label).glob("*.jpg"))[start:start + n]
    assert len(found) == n, f"need {n} {label} photos in {datasets}"
    return found


def add_photos(store: Store, project: str, category: str, files) -> None:
    store.ensure_category(project, category)
    for path in files:
        store.add_image(project, category, normalize_image(Path(path).read_bytes()), Provenance("upload"))


@pytest.fixture
def ants_and_bees(store, datasets) -> str:
    store.create_project("insects")
    add_photos(store, "insects", "ants", photos(datasets, "train", "ants", 4))
    add_photos(store, "insects", "bees", photos(datasets, "train", "bees", 4))
    return "insects"


def wait(store: Store, job_id: str, until=lambda job: job.status in FINISHED, timeout: float = BUILD_TIMEOUT_S):
    """Poll the job (reaping dead workers, as the page does) until `until(job)`; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        jobs.reap(store)
        job = store.get_job(job_id)
        if until(job):
            return job
        assert job.status not in FINISHED, f"job ended as {job.status} ({job.error}) before the awaited state"
        assert time.monotonic() < deadline, f"job still {job.status} ({job.stage}) after {timeout} s"
        time.sleep(0.2)  # polling interval, not a wait for the work


def worker_pid(job_id: str) -> int:
    return int((jobs.jobs_dir() / f"{job_id}.pid").read_text())


# ---------------------------------------------------------------- builds in worker processes

def test_build_runs_in_a_worker_and_records_a_model(store, ants_and_bees):
    job_id = jobs.start_build(store, ants_and_bees, TINY)
    assert worker_pid(job_id) != os.getpid()
    seen = set()
    job = wait(store, job_id, until=lambda j: seen.add(j.status) or j.status in FINISHED)
    assert job.status == "done", job.error
    assert "running" in seen or "queued" in seen
    result = job.result
    assert result["classes"] == ["ants", "bees"] and result["project"] == ants_and_bees
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["backbone"] == "efficientnet_lite0" and result["policy"]["views"] == 1
    assert result["device"] in ("CPU",) or result["device"].startswith("GPU")
    assert [c["backbone"] for c in result["candidates"]] == ["efficientnet_lite0"]
    assert all(e["image_id"] in {r.id for r in store.list_images(ants_and_bees)}
               for e in result["highest_loss"])
    model = store.get_model(result["model_id"])
    assert model.project == ants_and_bees and Path(model.bundle_path).is_file()
    assert model.metrics["accuracy"] == result["accuracy"]
    assert job.progress == 1.0 and job.stage == "done" and job.started_at and job.finished_at
    assert jobs.log_path(job_id).is_file()
    assert not (jobs.jobs_dir() / f"{job_id}.pid").exists()  # the worker cleaned up after itself


def test_build_refuses_what_cannot_work(store, ants_and_bees, datasets, monkeypatch):
    with pytest.raises(jobs.JobError, match="unknown backbone"):
        jobs.start_build(store, ants_and_bees, TrainConfig(backbone="no-such-net"))
    with pytest.raises(jobs.JobError, match="unknown augmentation policy"):
        jobs.start_build(store, ants_and_bees, TrainConfig(augment="wild"))
    store.create_project("lonely", ["cats", "dogs"])
    add_photos(store, "lonely", "cats", photos(datasets, "train", "ants", 1))
    with pytest.raises(jobs.JobError, match="at least 2 categories with 2 or more images"):
        jobs.start_build(store, "lonely", TINY)
    assert not store.list_jobs("lonely")

    job_id = jobs.start_build(store, ants_and_bees, TINY)
    with pytest.raises(jobs.JobError, match="already running"):
        jobs.start_build(store, ants_and_bees, TINY)
    with monkeypatch.context() as m:  # two tabs pressing Build at once both pass that check...
        m.setattr(jobs, "active_job", lambda *_: None)
        with pytest.raises(jobs.JobError, match="just started elsewhere"):
            jobs.start_build(store, ants_and_bees, TINY)
    newest, first = store.list_jobs(ants_and_bees)  # ...and only the first one goes on
    assert newest.status == "cancelled" and first.id == job_id and first.status in ("queued", "running")
    store.request_cancel(job_id)
    assert wait(store, job_id).status == "cancelled"


def test_rebuild_starts_the_build_again_as_it_was_asked_for(store, ants_and_bees, monkeypatch):
    monkeypatch.setattr(jobs, "_launch", lambda *_: None)  # the job's params are the point, not its worker
    asked = TrainConfig(backbone="efficientnet_lite0", augment="mild", views=2, mode="auto", seed=7)
    first = store.get_job(jobs.start_build(store, ants_and_bees, asked))
    store.update_job(first.id, status="done")
    again = store.get_job(jobs.rebuild(store, first))
    assert again.id != first.id and again.kind == "build" and again.params == first.params
    assert TrainConfig(**again.params["config"]) == asked


def test_cancel_stops_the_build_and_keeps_the_project_as_it_was(store, ants_and_bees):
    images_before = store.list_images(ants_and_bees)
    queued = jobs.start_build(store, ants_and_bees, TINY)
    assert store.request_cancel(queued).status in ("cancelled", "running")
    assert wait(store, queued).status == "cancelled"

    running = jobs.start_build(store, ants_and_bees, TINY)
    wait(store, running, until=lambda j: j.status == "running")
    store.request_cancel(running)
    job = wait(store, running)
    assert job.status == "cancelled" and job.message.startswith("Cancelled")
    assert store.list_models(ants_and_bees) == []
    assert store.list_images(ants_and_bees) == images_before


def test_a_killed_worker_is_reaped_as_failed_and_the_project_stays_usable(store, ants_and_bees):
    job_id = jobs.start_build(store, ants_and_bees, TINY)
    wait(store, job_id, until=lambda j: j.status == "running")
    os.killpg(worker_pid(job_id), signal.SIGKILL)  # its own session: the worker and nothing else
    job = wait(store, job_id)
    assert job.status == "failed" and job.error == jobs.WORKER_GONE
    assert not (jobs.jobs_dir() / f"{job_id}.pid").exists()  # the reaper removed what the worker could not
    assert store.list_models(ants_and_bees) == []

    again = wait(store, jobs.start_build(store, ants_and_bees, TINY))
    assert again.status == "done", again.error
    assert store.list_models(ants_and_bees)[0].model_id == again.result["model_id"]


def test_reap_fails_jobs_with_a_stale_heartbeat_or_no_worker(store, ants_and_bees, monkeypatch):
    stale = store.create_job(ants_and_bees, "build", {})
    store.update_job(stale.id, status="running")
    assert jobs.reap(store, stale_after=60) == []  # its heartbeat is fresh
    assert [j.id for j in jobs.reap(store, stale_after=0)] == [stale.id]
    assert store.get_job(stale.id).status == "failed"

    never = store.create_job(ants_and_bees, "build", {})
    monkeypatch.setattr(jobs, "START_TIMEOUT_S", 0.0)
    assert [j.id for j in jobs.reap(store)] == [never.id]
    assert store.get_job(never.id).error == "the worker did not start"


def test_reap_removes_the_pid_files_of_killed_workers_and_keeps_live_ones(store, ants_and_bees):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited: a killed worker's pid file names one like it
    killed = store.create_job(ants_and_bees, "build", {})
    store.update_job(killed.id, status="running")
    alive = store.create_job(ants_and_bees, "rank", {})
    store.update_job(alive.id, status="running")
    finished = store.create_job(ants_and_bees, "search", {})
    store.update_job(finished.id, status="done")  # killed after its last write, before removing its pid file
    pid_files = {job_id: jobs.jobs_dir() / f"{job_id}.pid" for job_id in (killed.id, alive.id, finished.id)}
    pid_files[killed.id].write_text(str(dead_pid))
    pid_files[alive.id].write_text(str(os.getpid()))  # a worker that still runs
    pid_files[finished.id].write_text(str(os.getpid()))
    others = {"gone": (jobs.jobs_dir() / "not-this-stores-job.pid", dead_pid),
              "running": (jobs.jobs_dir() / "another-stores-job.pid", os.getpid())}
    for path, pid in others.values():
        path.write_text(str(pid))

    assert [j.id for j in jobs.reap(store)] == [killed.id]
    assert store.get_job(killed.id).error == "the worker process ended without finishing (killed or crashed)"
    assert not pid_files[killed.id].exists() and not pid_files[finished.id].exists()
    assert not others["gone"][0].exists()
    assert int(pid_files[alive.id].read_text()) == os.getpid() and store.get_job(alive.id).status == "running"
    assert int(others["running"][0].read_text()) == os.getpid()  # another store's live worker keeps its file
    for path in (pid_files[alive.id], others["running"][0]):
        path.unlink()


def test_two_projects_build_at_the_same_time(store, ants_and_bees, datasets):
    store.create_project("flowers")
    for label in ("daisy", "rose"):
        add_photos(store, "flowers", label, sorted((datasets / "flowers" / label).glob("*.jpg"))[:4])
    first = jobs.start_build(store, ants_and_bees, TINY)
    second = jobs.start_build(store, "flowers", TINY)
    wait(store, first, until=lambda j: j.status == "running")
    assert store.get_job(second).status in ("queued", "running")  # both under way together
    done = [wait(store, first), wait(store, second)]
    assert [j.status for j in done] == ["done", "done"], [j.error for j in done]
    assert done[0].result["classes"] == ["ants", "bees"] and done[1].result["classes"] == ["daisy", "rose"]
    assert store.list_models("flowers")[0].model_id == done[1].result["model_id"]
    assert done[0].result["model_id"] != done[1].result["model_id"]


def test_the_worker_reports_an_error_the_user_can_read(store, ants_and_bees):
    """A failure inside training is a job error with its message, never a traceback on the page."""
    job = store.create_job(ants_and_bees, "build", {"config": {**TINY.__dict__, "backbone": "resnet-nonexistent"}})
    finished = worker.run_job(store, job.id)
    assert finished.status == "failed"
    assert "resnet-nonexistent" in finished.error and "Traceback" not in finished.error


# ---------------------------------------------------------------- search, URL lists, ranking

def _jpeg(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(out, format="JPEG")
    return normalize_image(out.getvalue())


def test_search_offline_fails_with_a_clear_message(store, ants_and_bees, monkeypatch):
    from nanostream.flows import collect
    from nanostream.sources import search

    monkeypatch.delenv(collect.PROVIDER_ENV, raising=False)  # the real provider, whose engine is unreachable
    images_before = store.list_images(ants_and_bees)
    with socket_closed_port() as port:
        monkeypatch.setattr(search.DDGSProvider, "reach", ("127.0.0.1", port))
        job = store.create_job(ants_and_bees, "search", {"categories": ["ants"], "per_category": 5})
        finished = worker.run_job(store, job.id)
    assert finished.status == "failed" and finished.result is None
    assert finished.error == ("You seem to be offline: the image search (127.0.0.1) cannot be reached "
                              "(Connection refused). Upload or add photos you have instead, or search again later.")
    assert store.list_images(ants_and_bees) == images_before


class socket_closed_port:
    """A local port nothing listens on: connecting to it fails at once, as offline does."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]  # bound, never listening: connections are refused

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_search_keeps_partial_results_when_rate_limited(store, ants_and_bees, monkeypatch):
    from nanostream.sources import download, search

    store.add_category(ants_and_bees, "wasps")
    colors = {"ants": ["red", "green"], "bees": [], "wasps": ["blue"]}

    class FakeProvider:
        name = "fake"
        pacing = search.SearchPacing(pause=0, retries=0, backoff=0)  # a stand-in's own pacing (SearchProvider)

        def images(self, query, max_results):
            category = query.split()[0]
            if category == "bees":
                raise search.RateLimited("429")
            return [search.ImageHit(f"https://img.example/{category}/{c}.jpg", "https://page.example", c, query,
                                    64, 48, "fake", "") for c in colors[category]]

    def fake_fetch(urls, on_progress=None, should_stop=None, **_):
        fetched = [download.Fetched(u, u, _jpeg(u.rsplit("/", 1)[1][:-4]), "", 64, 48, "image/jpeg") for u in urls]
        return download.FetchReport(tuple(fetched), ())

    from nanostream.flows import collect

    monkeypatch.setattr(collect, "load_provider", FakeProvider)  # no `reach`: no internet check
    monkeypatch.setattr(download, "fetch_images", fake_fetch)
    job = store.create_job(ants_and_bees, "search", {"categories": ["ants", "bees", "wasps"], "per_category": 5})
    finished = worker.run_job(store, job.id)

    assert finished.status == "done", finished.error
    summary = collect.SearchSummary.from_dict(finished.result)
    ants, bees, wasps = summary.categories
    assert (ants.name, len(ants.added), ants.found, ants.queries) == ("ants", 2, 2, ("ants", "ants photo"))
    assert bees.rate_limited and bees.added == () and bees.queries == ("bees",)
    assert bees.errors == ("Rate limited while searching 'bees' (429). Kept the 0 images found so far; "
                           "wait a few minutes, then search again.",)
    assert (wasps.searched, wasps.added, wasps.errors) == (False, (), (
        "not searched: the search engine asked us to slow down while searching 'bees'; "
        "search again in a few minutes",))
    assert (summary.stopped_by, summary.rate_limited, summary.cancelled) == ("bees", True, False)
    assert summary.counts == {"ants": 6, "bees": 4, "wasps": 0}
    web = [r for r in store.list_images(ants_and_bees, "ants") if r.provenance.source == "web_search"]
    assert len(web) == 2 and web[0].provenance.page_url == "https://page.example"


def test_url_list_job_downloads_into_the_category(store, ants_and_bees, httpserver, monkeypatch, datasets):
    monkeypatch.setenv("NANOSTREAM_ALLOW_PRIVATE_HOSTS", "1")  # the test server is on 127.0.0.1
    photo = photos(datasets, "val", "ants", 1)[0].read_bytes()
    httpserver.expect_request("/ant.jpg").respond_with_data(photo, content_type="image/jpeg")
    httpserver.expect_request("/missing.jpg").respond_with_data("no", status=404)
    with pytest.raises(jobs.JobError, match="No image URLs"):
        jobs.start_url_list(store, ants_and_bees, "ants", "not a url\n")
    text = f"{httpserver.url_for('/ant.jpg')}\n{httpserver.url_for('/missing.jpg')}\n"
    job = store.create_job(ants_and_bees, "urls", {"category": "ants", "text": text})
    finished = worker.run_job(store, job.id)
    assert finished.status == "done", finished.error
    assert finished.result["added"] == 1 and len(finished.result["skipped"]) == 1
    assert "404" in finished.result["skipped"][0][1]
    assert len(store.list_images(ants_and_bees, "ants")) == 5


def test_ranking_job_orders_every_image_and_reruns_only_when_images_change(store, ants_and_bees):
    job = jobs.ensure_ranking(store, ants_and_bees)
    job = wait(store, job.id)
    assert job.status == "done", job.error
    ranked = jobs.latest_ranking(store, ants_and_bees)
    assert sorted(e.image_id for entries in ranked.values() for e in entries) == \
        sorted(r.id for r in store.list_images(ants_and_bees))
    assert jobs.ensure_ranking(store, ants_and_bees).id == job.id  # same images: no new job
    store.delete_images(ants_and_bees, [ranked["ants"][0].image_id])
    newer = jobs.ensure_ranking(store, ants_and_bees)
    assert newer.id != job.id
    assert wait(store, newer.id).status == "done"
