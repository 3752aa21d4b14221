"""The ray runner (runners/): one local Ray for the module (2 CPUs, 127.0.0.1). A build and a
web search run as Ray tasks give what the local runner gives; a cancelled Ray build leaves the
project as it was; a Ray worker killed mid-build fails the job and leaves the store readable;
feature extraction spread over the cluster computes the rows a local extraction does.

Real photos (efficientnet_lite0, a few per class). Each run gets a fresh NANOSTREAM_HOME, so
both runners compute their features instead of one reading the other's cache. No test sleeps
to wait for work: each polls the job in the store with a bound.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from nanostream import jobs, worker
from nanostream.engine import feature_chunks, features
from nanostream.engine.images import normalize_image
from nanostream.engine.train import TrainConfig
from nanostream.flows import collect
from nanostream.runners import ADDRESS_ENV, cluster
from nanostream.store.db import Store
from nanostream.store.records import FINISHED, Provenance

import ray_search_stand_in
from conftest import copy_slice

TINY = TrainConfig(backbone="efficientnet_lite0", views=1)
SLOW = replace(TINY, views=4)  # long enough on two cores to be stopped part-way
TIMEOUT_S = 300  # a Ray worker's first task imports torch and loads the backbone on two busy cores
# Compared between runners; not: model_id, path, seconds (of the whole and of each candidate), curve_png.
SAME = ("classes", "accuracy", "backbone", "mode", "policy", "config", "per_class", "confusion", "highest_loss",
        "n_train", "n_val", "device", "precision", "skipped", "empty_categories", "advice", "project")


@pytest.fixture(scope="module")
def ray_node():
    """One local Ray for this module (its only users), shut down after it: its processes would
    otherwise hold memory through the rest of the suite. Its tasks import the search stand-in."""
    import ray

    env = {**cluster.runtime_env(), "env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}
    for attempt in (1, 2):  # Ray waits a fixed 30 s for its raylet: on a machine loaded past 10 that can be short
        try:
            context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                               object_store_memory=100 * 1024 ** 2, runtime_env=env)
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this timeout
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    os.environ[ADDRESS_ENV] = context.address_info["gcs_address"]  # jobs started now get the ray runner
    yield ray.get_runtime_context().get_node_id()
    del os.environ[ADDRESS_ENV]
    ray.shutdown()


def make_project(root: Path, datasets: Path, per_class: int) -> Store:
    store = Store(root)
    store.create_project("insects", ["ants", "bees"])
    for label in ("ants", "bees"):
        for path in sorted((datasets / "hymenoptera" / "train" / label).glob("*.jpg"))[:per_class]:
            store.add_image("insects", label, normalize_image(path.read_bytes()), Provenance("upload"))
    return store


def run(store: Store, kind: str, params: dict):
    """The job as the worker runs it, in this process (the driver), on the runner params name."""
    job = worker.run_job(store, store.create_job("insects", kind, params).id)
    assert job.status == "done", job.error
    return job


def poll(store: Store, job_id: str, until, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not until(job := store.get_job(job_id)):
        assert job.status not in FINISHED, f"job ended as {job.status} ({job.error}) before the awaited state"
        assert time.monotonic() < deadline, f"job still {job.status} ({job.stage}) after {timeout} s"
        time.sleep(0.05)  # polling interval, not a wait for the work
    return job


def same_part(result: dict, photos: Path | None = None) -> dict:
    """What two runs of one build share; the photos' folder named alike (each store has its own)."""
    text = json.dumps({key: result[key] for key in SAME})
    text = text.replace(str(photos), "PHOTOS") if photos else text
    return {**json.loads(text), "candidates": [{k: c[k] for k in ("backbone", "cv_accuracy", "gflops", "error")}
                                              for c in result["candidates"]]}


def test_a_build_on_ray_gives_the_local_build(ray_node, tmp_path, datasets, monkeypatch):
    from nanostream.engine.predict import load_classifier

    built = {}
    for runner in ("local", "ray"):
        monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / f"home-{runner}"))
        store = make_project(tmp_path / runner, datasets, per_class=5)
        job = run(store, "build", {"config": asdict(TINY), "runner": runner})
        model = store.get_model(job.result["model_id"])
        assert Path(model.bundle_path).is_file() and model.metrics["accuracy"] == job.result["accuracy"]
        assert model.bundle_path == job.result["path"]
        assert model.bundle_path.startswith(str(tmp_path / f"home-{runner}"))  # in the owner's registry
        built[runner] = (store, job.result, load_classifier(model.bundle_path))
    (local_store, local, local_model), (ray_store, on_ray, ray_model) = built["local"], built["ray"]
    assert (local["runner"], local["node"]) == ("local", socket.gethostname())
    assert (on_ray["runner"], on_ray["node"]) == ("ray", ray_node)
    assert same_part(on_ray, ray_store.blob_dir) == same_part(local, local_store.blob_dir)
    photos = sorted((datasets / "hymenoptera" / "val" / "bees").glob("*.jpg"))[:3]
    assert [(p.label, round(p.confidence, 5)) for p in ray_model.predict_files(photos)] == \
        [(p.label, round(p.confidence, 5)) for p in local_model.predict_files(photos)]
    cached = {home: sorted(p.relative_to(tmp_path / home) for p in (tmp_path / home / "features").rglob("*.npy"))
              for home in ("home-local", "home-ray")}
    assert cached["home-ray"] == cached["home-local"] != []  # the task's features came back to the owner's cache
    # The prepared backbones stay on the task's machine, in its own folder: the owner's path does
    # not travel, and no copy of them comes back to the owner's home.
    assert "NANOSTREAM_BACKBONES" not in cluster.task_env() and not (tmp_path / "home-ray" / "backbones").exists()


def test_features_spread_over_the_cluster_match_local_ones(ray_node, tmp_path, datasets, monkeypatch):
    sources = sorted((datasets / "hymenoptera" / "val" / "ants").glob("*.jpg"))[:5]
    sources.append(b"not an image")
    local = features.extract_features(sources, "efficientnet_lite0", cache=features.FeatureCache(tmp_path / "local"))
    monkeypatch.setattr(features, "CLUSTER_MIN_IMAGES", 1)
    monkeypatch.setattr(feature_chunks, "CHUNK_IMAGES", 3)  # two chunks, as two tasks

    def not_here(*_):
        raise AssertionError("the chunks ran in the driver")

    monkeypatch.setattr(features, "chunk_rows", not_here)
    seen = []
    spread = features.extract_features(sources, "efficientnet_lite0", cache=features.FeatureCache(tmp_path / "ray"),
                                       on_progress=lambda done, total: seen.append((done, total)))
    assert (spread.kept, spread.hashes, spread.computed) == (local.kept, local.hashes, local.computed) == \
        (list(range(5)), local.hashes, 5)
    assert spread.failed == local.failed and len(spread.failed) == 1
    assert spread.original.equal(local.original)
    assert seen[-1] == (6, 6)
    assert sorted(p.name for p in (tmp_path / "ray").rglob("*.npy")) == \
        sorted(p.name for p in (tmp_path / "local").rglob("*.npy"))  # cached on the caller's disk


def test_a_search_on_ray_gives_the_local_search(ray_node, tmp_path, datasets, monkeypatch, httpserver):
    monkeypatch.setenv("NANOSTREAM_ALLOW_PRIVATE_HOSTS", "1")  # the test server is on 127.0.0.1
    monkeypatch.setenv(collect.PROVIDER_ENV, "ray_search_stand_in:stand_in")
    hits = {}
    for label in ("ants", "bees"):
        for i, path in enumerate(sorted((datasets / "hymenoptera" / "val" / label).glob("*.jpg"))[:2]):
            httpserver.expect_request(f"/{label}{i}.jpg").respond_with_data(path.read_bytes(),
                                                                           content_type="image/jpeg")
            hits.setdefault(label, []).append(httpserver.url_for(f"/{label}{i}.jpg"))
    hits["ants"].append(httpserver.url_for("/missing.jpg"))  # a 500: a failed download, on both runners
    monkeypatch.setenv(ray_search_stand_in.HITS_ENV, json.dumps(hits))
    searched = {}
    for runner in ("local", "ray"):
        monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / f"home-{runner}"))
        store = make_project(tmp_path / runner, datasets, per_class=2)
        job = run(store, "search", {"categories": ["ants", "bees"], "per_category": 5, "terms": "", "runner": runner})
        searched[runner] = (job.result, [(r.id, r.category, r.content_hash, r.provenance.image_url)
                                         for r in store.list_images("insects")])
    (local, local_images), (on_ray, ray_images) = searched["local"], searched["ray"]
    assert on_ray["runner"] == "ray" and on_ray["node"] == ray_node
    assert collect.SearchSummary.from_dict(on_ray) == collect.SearchSummary.from_dict(local)
    assert collect.SearchSummary.from_dict(on_ray).added == 4 and on_ray["counts"] == {"ants": 4, "bees": 4}
    assert ray_images == local_images
    ranked = {}  # the ranking of the photos found, on both runners
    for runner, store_root in (("local", tmp_path / "local"), ("ray", tmp_path / "ray")):
        monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / f"home-{runner}"))
        with Store(store_root) as store:
            job = run(store, "rank", {"fingerprint": jobs.images_fingerprint(store, "insects"), "runner": runner})
            assert Path(job.result["path"]).parent == tmp_path / f"home-{runner}" / "jobs"
            ranked[runner] = jobs.latest_ranking(store, "insects")
    assert ranked["ray"] == ranked["local"] and sum(map(len, ranked["ray"].values())) == 8


def test_cancelling_a_ray_build_leaves_the_project_unchanged(ray_node, tmp_path, datasets, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    store = make_project(tmp_path / "store", datasets, per_class=8)
    job_id = store.create_job("insects", "build", {"config": asdict(SLOW), "runner": "ray"}).id
    driver = threading.Thread(target=worker.run_job, args=(store, job_id))
    driver.start()
    poll(store, job_id, until=lambda job: job.stage not in ("", "starting"))  # the task reported progress
    jobs.cancel(store, job_id)
    driver.join(timeout=TIMEOUT_S)
    job = store.get_job(job_id)
    assert (job.status, job.message) == ("cancelled", "Cancelled. The project is unchanged.")
    assert store.list_models("insects") == [] and not list((tmp_path / "home").glob("models/*"))
    assert store.counts("insects") == {"ants": 8, "bees": 8}


def test_the_cli_trains_a_folder_on_ray(ray_node, datasets, tmp_path, monkeypatch, capsys):
    """`nanostream train DATA --runner ray --json`: the local run's summary, with runner and node."""
    from nanostream.cli.main import main

    data = copy_slice(datasets / "hymenoptera" / "val", tmp_path / "data", per_class=4)
    (data / "ants" / "notes.txt").write_text("not a photo")
    printed = {}
    for runner in ("local", "ray"):
        monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / f"home-{runner}"))
        out = tmp_path / f"{runner}.safetensors"
        assert main(["train", str(data), "--backbone", "efficientnet_lite0", "--augment", "none", "--runner", runner,
                     "--out", str(out), "--quiet", "--json"]) == 0
        printed[runner] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed[runner]["path"] == str(out) and out.is_file()
    assert (printed["ray"]["runner"], printed["ray"]["node"]) == ("ray", ray_node)
    assert printed["ray"]["skipped"] == [{"file": str(data / "ants" / "notes.txt"),
                                          "reason": "not an image file extension"}]
    for summary in printed.values():
        del summary["runner"], summary["node"]
    assert same_part(printed["ray"]) == same_part(printed["local"])


def ray_task_pids(function: str) -> list[int]:
    """The Ray workers running `function` now (Ray titles a busy worker ray::FUNCTION)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(f"ray::{function}".encode()):
                found.append(int(entry.name))
        except OSError:
            continue  # ended while we looked
    return found


def test_a_killed_ray_worker_fails_the_build_and_the_store_stays_readable(ray_node, tmp_path, datasets, monkeypatch):
    """Through the app's path: start_build records the ray runner, its worker process drives the task."""
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    store = make_project(tmp_path / "store", datasets, per_class=8)
    job_id = jobs.start_build(store, "insects", SLOW)
    assert store.get_job(job_id).params["runner"] == "ray"
    poll(store, job_id, until=lambda job: job.stage not in ("", "starting") and ray_task_pids("run_project_job"))
    for pid in ray_task_pids("run_project_job"):
        os.kill(pid, signal.SIGKILL)
    job = poll(store, job_id, until=lambda job: job.status in FINISHED)
    assert (job.status, job.error) == ("failed", cluster.WORKER_LOST)
    jobs._children.pop(job_id).wait(timeout=60)
    with Store(tmp_path / "store") as again:
        assert again.counts("insects") == {"ants": 8, "bees": 8} and again.list_models("insects") == []
        assert again.get_job(job_id).status == "failed"


def test_an_unreachable_cluster_is_one_sentence_in_seconds():
    """Nothing listens at the address: said at once (ray.init would retry for minutes)."""
    with pytest.raises(cluster.ClusterError) as failed:
        cluster.check_reachable("127.0.0.1:1")
    assert str(failed.value) == ("cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused); start one "
                                 "there with `ray start --head`, or unset NANOSTREAM_RAY_ADDRESS to run here")


def test_a_stop_check_the_board_cannot_answer_in_time_lets_the_work_go_on(monkeypatch):
    """One ActorUnavailableError while polling the board (its RPC late on a busy machine) reads as
    "not stopped": the next poll asks again and sees a real stop."""
    import ray

    class Board:
        class stopped:
            @staticmethod
            def remote(key):
                return key

    answers = iter([ray.exceptions.ActorUnavailableError("late", None), True])

    def get(_ref):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    class Context:
        @staticmethod
        def is_canceled():
            return False

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context)
    monkeypatch.setattr(cluster, "POLL_S", 0.0)
    reporter = cluster.TaskReporter(Board, "job-1")
    assert reporter.should_stop() is False
    assert reporter.should_stop() is True
