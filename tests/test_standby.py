"""The warm worker (a job handed to it runs as a fresh worker's would, and the next one is warmed), and the
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


def test_a_job_handed_to_the_warm_worker_runs_there_and_the_next_one_is_warmed(warm_store):
    store = warm_store
    store.create_project("p", ["a", "b"])
    jobs.warm_up(store)
    first = standby.current()
    wait_for(lambda: standby.ready_path(jobs.jobs_dir(), first.pid).is_file())  # imported and loaded: waiting on stdin
    job = store.create_job("p", "nosuchkind", {})  # the worker reports an unknown kind: no training needed
    jobs._launch(store, job.id)
    assert int(jobs.pid_path(job.id).read_text()) == first.pid  # the warm process took it
    assert standby.current() is None  # nothing waits while the job runs: it would take its CPU
    done = wait_for(lambda: (j := store.get_job(job.id)).status in FINISHED and j)
    assert done.status == "failed" and "unknown job kind 'nosuchkind'" in done.error
    assert first.wait(30) == 1 and not standby.ready_path(jobs.jobs_dir(), first.pid).exists()
    jobs.reap(store)  # the page's poll notices the worker ended, and warms the next one
    second = standby.current()
    assert second.pid != first.pid and second.poll() is None


def test_a_standby_for_another_environment_is_replaced_not_used(warm_store, monkeypatch, tmp_path):
    store = warm_store
    jobs.warm_up(store)
    old = standby.current()
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "elsewhere"))
    assert standby.hand_over(store.root, jobs._worker_env(), "some-job") is None  # not started for this home
    jobs.warm_up(store)
    assert old.wait(10) is not None and standby.current() is not old


def test_off_means_no_standby(tmp_path, monkeypatch):
    monkeypatch.setenv(standby.DISABLE_ENV, "0")
    assert standby.warm_up(tmp_path, dict(os.environ), tmp_path) is None and standby.current() is None


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
