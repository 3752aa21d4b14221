"""The warm worker (the jobs handed to it run in workers it forks, as a fresh worker's would), and the
Build page's promise of how long a build takes here."""

from __future__ import annotations

import os
import time

import pytest

from nanostream import jobs, standby
from nanostream.store.db import Store
from nanostream.store.records import FINISHED


@pytest.fixture()
def warm_store(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(standby.DISABLE_ENV, "1")
    with Store(tmp_path / "home" / "store") as store:
        yield store
    standby.stop()


def wait_for(predicate, seconds=90.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def test_jobs_handed_to_the_warm_worker_run_in_workers_it_forks_one_after_another(warm_store, datasets,
                                                                                   monkeypatch, tmp_path):
    """The standby stays: each job runs in a warm spare it forked (a real build included, so torch
    works after the fork); a job handed over while it still imports waits for it, not beside it;
    it serves every store, and is replaced when the environment changes."""
    from nanostream.engine.images import normalize_image
    from nanostream.engine.train import TrainConfig
    from nanostream.store.records import Provenance

    store = warm_store
    store.create_project("p", ["ants", "bees"])
    for label in ("ants", "bees"):
        for path in sorted((datasets / "hymenoptera" / "train" / label).glob("*.jpg"))[:4]:
            store.add_image("p", label, normalize_image(path.read_bytes()), Provenance("upload"))
    jobs.warm_up(store)
    server = standby.current()
    early = store.create_job("p", "nosuchkind", {})  # the worker reports an unknown kind: no training needed
    jobs._launch(store, early.id)  # at once, while the standby imports: the job is the standby's for now
    handed = jobs._children[early.id]
    assert isinstance(handed, standby.Handed) and int(jobs.pid_path(early.id).read_text()) == server.pid
    assert handed.poll() is None
    done = wait_for(lambda: (j := store.get_job(early.id)).status in FINISHED and j)
    assert done.status == "failed" and "unknown job kind 'nosuchkind'" in done.error
    assert "unknown job kind" in jobs.log_path(early.id).read_text()  # its output went to its own log
    assert handed.wait(30) == 0 and handed.poll() == 0 and not jobs.pid_path(early.id).exists()

    wait_for(lambda: standby.warm_path(jobs.jobs_dir(), server.pid).is_file())  # a spare waits, warm
    spare = int(standby.warm_path(jobs.jobs_dir(), server.pid).read_text())
    assert os.getsid(spare) == spare  # a session of its own: cancel and kill reach the job, not the standby
    build_id = jobs.start_build(store, "p", TrainConfig(backbone="efficientnet_lite0", views=1))
    built_by = jobs._children[build_id]
    assert wait_for(lambda: built_by.pid == spare)  # the spare took the build
    built = wait_for(lambda: (j := store.get_job(build_id)).status in FINISHED and j, seconds=180)
    assert built.status == "done", built.error
    assert built.result["classes"] == ["ants", "bees"] and store.get_model(built.result["model_id"])
    built_by.wait(30)
    assert standby.current() is server and server.poll() is None  # still there for the next job
    wait_for(lambda: standby.warm_path(jobs.jobs_dir(), server.pid).is_file())  # with a new spare, warm
    assert int(standby.warm_path(jobs.jobs_dir(), server.pid).read_text()) not in (handed.pid, spare)
    jobs.reap(store)
    assert standby.current() is server

    # A job brings its own NanoStream settings (another NANOSTREAM_HOME here): the same standby runs it.
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "elsewhere"))
    with Store(tmp_path / "elsewhere" / "store") as other:
        other.create_project("q", ["a", "b"])
        job = other.create_job("q", "nosuchkind", {})
        jobs._launch(other, job.id)
        assert standby.current() is server
        done = wait_for(lambda: (j := other.get_job(job.id)).status in FINISHED and j)
        assert "unknown job kind 'nosuchkind'" in done.error  # run against its own store...
        assert jobs.log_path(job.id).is_relative_to(tmp_path / "elsewhere")  # ...logged in its own home
        assert "unknown job kind" in jobs.log_path(job.id).read_text()
    # Any other variable may act on import: a change to one needs a new standby.
    monkeypatch.setenv("ONEDNN_VERBOSE", "0")
    assert standby.hand_over(store.root, jobs._worker_env(), "some-job", tmp_path / "some-job.pid") is None
    jobs.warm_up(store)
    assert server.wait(10) is not None and standby.current() is not server


def test_off_means_no_standby(tmp_path, monkeypatch):
    monkeypatch.setenv(standby.DISABLE_ENV, "0")
    assert standby.warm_up(dict(os.environ), tmp_path) is None and standby.current() is None


def test_the_build_page_promises_what_this_machine_took_last(tmp_path):
    with Store(tmp_path / "store") as store:
        store.create_project("p", ["a", "b"])
        assert "first build on this machine" in jobs.build_time_hint(store, 30)
        job = store.create_job("p", "build", {})
        store.update_job(job.id, status="running")
        store.update_job(job.id, status="done", result={"n_train": 24, "n_val": 6})
        done = store.get_job(job.id)
        took = done.finished_at - done.created_at
        hint = jobs.build_time_hint(store, 60)  # twice the photos: twice the time
        assert hint == (f"about {max(round(took * 2), 1)} s for 60 photos on this machine: its last build took "
                        f"{took:.0f} s for 30, and photos it has seen before are quicker")
