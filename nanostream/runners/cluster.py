"""The ray runner: a job's work as one Ray task, driven from the machine that owns the store.

The driver (a job's worker process, or `nanostream train --runner ray`) packs the project or
folder as data (replica.py), submits one task and polls it: the task reports progress to a
small actor (ProgressBoard, one per cluster), which the driver reads and writes to the store; a cancel reaches
the task through ray.cancel (a build or ranking: its partial work is worthless) or the board's
stop flag (a search: what it found so far is kept, as locally). The task sends back the job's
result and the files it wrote; the driver writes them here. The cluster needs no shared disk.

Ray is imported here only, when a job runs on it; each task runs this very NanoStream (shipped
as the job's runtime_env py_modules), so a cluster's nodes need its dependencies, not its code.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import paths
from . import ADDRESS_ENV
from .replica import (FolderSnapshot, Outcome, ProjectSnapshot, Replica, bring_back_build, bring_back_folder_build,
                      bring_back_ranking, bring_back_search, take_folder, take_snapshot, write_folder, written_files)

POLL_S = 0.25        # the driver reads progress and checks for a cancel this often (the page polls once a second)
GRACE_S = 10.0       # a stopped search has this long to end by itself (keeping its finds) before ray.cancel
CONNECT_TIMEOUT_S = 5.0  # a reachable head accepts in well under a second
BUILD_CPUS = 2       # a build's feature extraction runs two threads (engine/features.py WORKERS)
# Variables of the owner's that do not travel: they name this machine's folders and cluster.
LOCAL_ONLY_ENV = {"NANOSTREAM_HOME", "NANOSTREAM_BACKBONES", "NANOSTREAM_DATASETS", "NANOSTREAM_WARM_WORKER",
                  ADDRESS_ENV}
WORKER_LOST = ("the Ray worker running the job ended without finishing (killed or crashed, "
               "or its machine left the cluster)")

Progress = Callable[[str, int, int, "str | None"], None]


class ClusterError(Exception):
    """The cluster could not run the job (unreachable, a worker lost); the message says which."""


# ---------------------------------------------------------------- connecting

def runtime_env() -> dict:
    """What every task of ours runs with: this NanoStream package, without its bytecode."""
    return {"py_modules": [str(Path(__file__).resolve().parent.parent)], "excludes": ["__pycache__", "*.pyc"]}


def connect():
    """Ray, connected: to NANOSTREAM_RAY_ADDRESS, else to a Ray started on this machine (ray.init())."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get(ADDRESS_ENV, "").strip() or None
    if address is not None:
        check_reachable(address)
    try:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = (str(exc).splitlines() or ["no reason given"])[0][:200]  # its first line: never a traceback
        raise ClusterError(f"cannot reach the Ray cluster at {address or 'this machine'} "
                           f"({type(exc).__name__}: {reason})") from None
    return ray


def check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at a "host:port" address: ray.init would retry for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and friends: Ray finds the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start one there "
                           f"with `ray start --head`, or unset {ADDRESS_ENV} to run here") from None


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def task_resources(ray, cpus: int) -> dict:
    """A GPU where the cluster has them, else `cpus` CPUs (no more than its largest machine has)."""
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return {"num_cpus": max(1, min(cpus, int(largest)))}


# ---------------------------------------------------------------- on the task's side

class ProgressBoard:
    """A Ray actor between tasks and their drivers: each run's latest progress and stop flag,
    under a key of its own. One per cluster (named, detached): a job does not pay an actor's
    process start."""

    def __init__(self):
        self._latest: dict[str, tuple] = {}
        self._stop: set[str] = set()

    def report(self, key: str, event: tuple) -> None:
        self._latest[key] = event

    def take(self, key: str) -> tuple | None:
        return self._latest.pop(key, None)

    def stop(self, key: str) -> None:
        self._stop.add(key)

    def stopped(self, key: str) -> bool:
        return key in self._stop

    def forget(self, key: str) -> None:
        self._latest.pop(key, None)
        self._stop.discard(key)


class TaskReporter:
    """progress() and should_stop() of a job's work, as worker.py's reporter offers them, on the board."""

    def __init__(self, board, key: str):
        self.board, self.key = board, key
        self._checked, self._stop = 0.0, False

    def progress(self, stage: str, done: int, total: int, message: str | None = None) -> None:
        self.board.report.remote(self.key, (stage, done, total, message))  # not awaited: the work goes on

    def should_stop(self) -> bool:
        import ray

        now = time.monotonic()
        if not self._stop and now - self._checked >= POLL_S:  # the work asks far more often than we poll
            self._checked = now
            try:
                asked = ray.get(self.board.stopped.remote(self.key))
            except ray.exceptions.ActorUnavailableError:
                # "temporarily unavailable but may be available later" (Ray): seen on a busy 2-core
                # machine when a progress report's RPC was late. The next poll asks again, and
                # ray.cancel still reaches the task below; one late answer must not fail the build.
                asked = False
            self._stop = asked or ray.get_runtime_context().is_canceled()
        return self._stop


@contextlib.contextmanager
def _environment(overrides: dict[str, str]) -> Iterator[None]:
    """The owner's settings for the task's duration: a Ray worker process runs many tasks."""
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _use_assigned_cpus() -> None:
    import ray
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def _task_home(home: Path) -> dict[str, str]:
    """A task's own NANOSTREAM_HOME, with this machine's prepared backbones: prepared by its first
    task and read by the next (a prepared copy is ~0.1 s to read, ~2-6 s to make with timm's import)."""
    return {"NANOSTREAM_HOME": str(home), "NANOSTREAM_BACKBONES": str(paths.backbones_dir())}


def run_project_job(snapshot: ProjectSnapshot, kind: str, params: dict, work: Callable, env: dict,
                    board: tuple) -> Outcome:
    """The task: the job's work (worker.WORK[kind]) on a replica of the project, in a fresh home."""
    with tempfile.TemporaryDirectory(prefix="nanostream-task-") as temp:
        with _environment({**env, **_task_home(Path(temp) / "home")}):
            _use_assigned_cpus()
            replica = Replica(snapshot, Path(temp))
            try:
                job = replica.store.create_job(snapshot.name, kind, params)
                result = work(replica.store, job, TaskReporter(*board))
                return replica.outcome(result, node_id())
            finally:
                replica.store.close()


def run_folder_build(snapshot: FolderSnapshot, config: dict, env: dict, board: tuple) -> Outcome:
    """The task of `nanostream train FOLDER --runner ray`: build_project on the folder's copy."""
    from ..engine.train import TrainConfig
    from ..flows.build import build_project

    with tempfile.TemporaryDirectory(prefix="nanostream-task-") as temp:
        folder, home = Path(temp) / "data", Path(temp) / "home"
        with _environment({**env, **_task_home(home)}):
            _use_assigned_cpus()
            shipped = write_folder(snapshot, folder, home)
            reporter = TaskReporter(*board)
            summary = build_project(TrainConfig(**config), folder=folder,
                                    on_progress=lambda stage, done, total: reporter.progress(stage, done, total),
                                    should_stop=reporter.should_stop)
            return Outcome(summary.to_dict(), node_id(), tuple(written_files(home, shipped)), (),
                           str(home), str(folder))


# ---------------------------------------------------------------- on the driver's side

BOARD = "nanostream-progress"  # the board's name in the cluster's "nanostream" namespace


@functools.cache
def _remote(ray):
    """The Ray handles of the two tasks, made once Ray is imported. No retries: a killed build
    is reported, not silently started again on the same photos."""
    return ray.remote(max_retries=0)(run_project_job), ray.remote(max_retries=0)(run_folder_build)


def _board(ray):
    return ray.remote(ProgressBoard).options(name=BOARD, namespace="nanostream", lifetime="detached",
                                             get_if_exists=True, num_cpus=0).remote()


def task_env() -> dict[str, str]:
    """The owner's NanoStream settings (precision, search provider, ...) that the task runs with."""
    return {k: v for k, v in os.environ.items() if k.startswith("NANOSTREAM_") and k not in LOCAL_ONLY_ENV}


def _drive(ray, submit: Callable, on_progress: Progress, should_stop: Callable[[], bool],
           keeps_partial: bool) -> Outcome:
    """Submit (submit((board, key)) -> ref), then relay progress and cancel until the task ends."""
    board, key = _board(ray), uuid.uuid4().hex
    try:
        ref = submit((board, key))
        asked = None
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            event = ray.get(board.take.remote(key))
            if event is not None:
                on_progress(*event)
            if ready:
                return _outcome(ray, ref)
            if asked is None and should_stop():
                asked = time.monotonic()
                board.stop.remote(key)
                if not keeps_partial:
                    ray.cancel(ref)
            elif asked is not None and keeps_partial and time.monotonic() - asked > GRACE_S:
                ray.cancel(ref)
                keeps_partial = False
    finally:
        board.forget.remote(key)


def _outcome(ray, ref) -> Outcome:
    """The task's outcome; its failure as the exception a local run raises, or ClusterError."""
    from ray import exceptions as rx

    try:
        return ray.get(ref)
    except rx.TaskCancelledError:
        raise InterruptedError("cancelled") from None
    except (rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError, rx.OwnerDiedError,
            rx.ObjectLostError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)  # the job's log; the page gets the sentence
        raise ClusterError(WORKER_LOST) from None
    except rx.RayTaskError as exc:
        print(exc, file=sys.stderr)  # the task's traceback, for the job's log
        if isinstance(exc.cause, Exception) and not isinstance(exc.cause, rx.RayError):
            raise exc.cause from None  # what the same work raises locally: DataError, InterruptedError, ...
        raise ClusterError(f"the job failed on the Ray cluster ({type(exc.cause).__name__})") from None
    except rx.RayError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise ClusterError(f"the Ray cluster could not run the job ({type(exc).__name__})") from None


def run_job(store, project: str, kind: str, params: dict, work: Callable, on_progress: Progress,
            should_stop: Callable[[], bool], job_id: str | None = None) -> dict:
    """A build, search or ranking of the store's project, run on the cluster: its result as
    work's locally (work: worker.WORK[kind]), with "runner" and "node" added. A ranking names
    its job (job_id): its file is the job's, as worker.py writes it."""
    from .. import jobs
    from ..flows.build import previous_backbone

    ray = connect()
    snapshot = take_snapshot(store, project)
    params = dict(params)
    if kind == "build" and params["config"].get("backbone") == "auto" and params["config"].get("prefer") is None:
        # what build_project reads from the owner's model records, which the replica has none of
        params["config"] = {**params["config"], "prefer": previous_backbone(store, snapshot.name)}
    task = _remote(ray)[0].options(**task_resources(ray, BUILD_CPUS))
    outcome = _drive(ray, lambda board: task.remote(snapshot, kind, params, work, task_env(), board),
                     on_progress, should_stop, keeps_partial=kind == "search")
    if kind == "build":
        result = bring_back_build(store, snapshot, outcome)
    elif kind == "search":
        result = bring_back_search(store, snapshot, outcome)
    else:
        ranking = jobs.ranking_path(job_id)  # where worker.py's ranking writes it
        bring_back_ranking(outcome, outcome.result["path"], ranking)
        result = {**outcome.result, "path": str(ranking)}
    return {**result, "runner": "ray", "node": outcome.node}


def build_folder(config, folder: str | Path, out: str | Path | None, on_progress: Callable[[str, int, int], None],
                 should_stop: Callable[[], bool] = lambda: False):
    """`nanostream train FOLDER --runner ray`: (BuildSummary, node id)."""
    from dataclasses import asdict

    ray = connect()
    snapshot = take_folder(folder)
    task = _remote(ray)[1].options(**task_resources(ray, BUILD_CPUS))
    outcome = _drive(ray, lambda board: task.remote(snapshot, asdict(config), task_env(), board),
                     lambda stage, done, total, _message: on_progress(stage, done, total), should_stop,
                     keeps_partial=False)
    return bring_back_folder_build(snapshot, outcome, out), outcome.node
