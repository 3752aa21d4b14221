"""A job's worker: what each kind of job does (run_job), and the entry point of its process.
`python -m nanostream.worker JOB_ID --root STORE` runs one job and exits; `--standby FOLDER` imports
everything first, then forks a warm worker for each job id the app hands it on stdin (standby.py),
which runs its one job the same way. A job started for the ray runner is driven from here as a Ray
task (runners/cluster.py): this process keeps the store, the heartbeat and the cancel checks.

Process-wide settings are made here, in the process that needs them, never on import: the
Streamlit server, the API and the tests import the engine without them.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import jobs, runners, standby
from .process import keep_freed_memory, skip_collection_at_exit
from .store.db import Store
from .store.records import Job, StoreError


class JobFailed(Exception):
    """Raised inside a worker for an expected failure: the message is shown to the user as is."""


class _Reporter:
    """Progress, heartbeat and cancel checks of one job, as train and search expect them."""

    def __init__(self, store: Store, job_id: str):
        self.store, self.job_id = store, job_id
        self._last_write = 0.0
        self._stage = None
        self._done = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._done.wait(jobs.HEARTBEAT_S):
            try:
                self.store.update_job(self.job_id)  # no change but the heartbeat
            except StoreError:
                return  # finished or deleted: nothing left to keep alive
            except sqlite3.OperationalError:
                continue  # database busy past the timeout: try at the next beat

    def stop(self) -> None:
        self._done.set()
        self._heartbeat.join()

    def progress(self, stage: str, done: int, total: int, message: str | None = None) -> None:
        now = time.monotonic()
        if stage == self._stage and done < total and now - self._last_write < jobs.PROGRESS_INTERVAL_S:
            return
        self._stage, self._last_write = stage, now
        try:
            self.store.update_job(self.job_id, stage=stage, progress=done / total if total else 0.0,
                                  message=message if message is not None else f"{done} of {total}")
        except StoreError:
            pass  # deleted with its project: should_stop() now says stop

    def should_stop(self) -> bool:
        try:
            return self.store.cancel_requested(self.job_id)
        except StoreError:
            return True  # the job is gone (its project was deleted): stop working for it


def run_job(store: Store, job_id: str) -> Job | None:
    """Run one job to its end in this process, recording everything in the store.
    Returns the finished job, or None when it was cancelled or deleted before it began."""
    try:
        job = store.update_job(job_id, status="running", stage="starting", message="starting")
    except StoreError:
        return None  # cancelled while queued, or its project was deleted
    work = WORK.get(job.kind)
    reporter = _Reporter(store, job_id)
    final: dict
    try:
        if work is None:
            raise JobFailed(f"unknown job kind '{job.kind}'; expected one of {', '.join(WORK)}")
        result = _run(store, job, reporter, work)
        if job.kind in ("search", "urls") and reporter.should_stop():  # stopped part-way: what it found stays
            final = dict(status="cancelled", stage="cancelled", result=result,
                         message="Stopped. The images found so far were kept.")
        else:  # a build cancelled after its model was saved is a finished build
            final = dict(status="done", progress=1.0, stage="done", message="done", result=result)
    except InterruptedError:
        final = dict(status="cancelled", stage="cancelled", message="Cancelled. The project is unchanged.")
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message on the page
        traceback.print_exc()
        final = dict(status="failed", stage="failed", error=_user_message(exc, job), message="failed")
    finally:
        reporter.stop()
    try:
        return store.update_job(job_id, **final)
    except StoreError:
        return None  # the project (and its jobs) were deleted meanwhile


def _run(store: Store, job: Job, reporter: _Reporter, work) -> dict:
    """The job's work on the runner it was started for (runners/): here, or as a task on the Ray
    cluster; its result says which, and where ("node": the Ray node, or this host's name)."""
    if job.params.get("runner") == "ray" and job.kind in runners.ON_CLUSTER:
        from .runners.cluster import run_job as run_on_cluster

        return run_on_cluster(store, job.project, job.kind, job.params, work, reporter.progress,
                              reporter.should_stop, job_id=job.id)
    return {**work(store, job, reporter), "runner": "local", "node": runners.local_node()}


def _user_message(exc: Exception, job: Job) -> str:
    """What the user reads: the message of a failure they can act on; a pointer to the log otherwise."""
    from .engine.backbones import BackboneUnavailable
    from .engine.data import DataError
    from .runners.cluster import ClusterError

    if isinstance(exc, (JobFailed, DataError, StoreError, OSError, BackboneUnavailable, ClusterError)):
        return str(exc)
    what = {"build": "The build", "search": "The search", "urls": "The download", "rank": "Ranking"}.get(job.kind, "The job")
    return f"{what} failed unexpectedly ({type(exc).__name__}: {exc}). Details: {jobs.log_path(job.id)}"


# -- build

def _build(store: Store, job: Job, report: _Reporter) -> dict:
    """The CLI's `train PROJECT` (flows/build.py), as a job: the summary is the job's result."""
    from .engine.train import TrainConfig
    from .flows.build import build_project, preferring_previous
    from .flows.build_progress import project_build_progress

    # Resolved once: the progress plan and the build read the same previous backbone
    config = preferring_previous(TrainConfig(**job.params["config"]), store, job.project)
    whole = project_build_progress(store, job.project, config)  # one bar for the build, not one per stage

    def progress(stage: str, done: int, total: int) -> None:
        # The job's progress is the whole build's (in thousandths); its message this stage's count.
        report.progress(stage, round(whole(stage, done, total) * 1000), 1000,
                        "" if total <= 1 else f"{done} of {total}")  # a one-step stage has no count to show

    summary = build_project(config, project=job.project, store=store,
                            on_progress=progress, should_stop=report.should_stop)
    return summary.to_dict()


# -- web search

def _search(store: Store, job: Job, report: _Reporter) -> dict:
    """flows.collect.search_project as a job, the same search as `nanostream images search`: its
    summary is the result, rewritten after each category so the page shows what came so far."""
    from .flows.collect import SearchUnavailable, search_project

    params = job.params
    try:
        summary = search_project(store, job.project, params["categories"], params["per_category"],
                                 params.get("terms", ""),  # jobs made without start_search (older ones) have none
                                 on_progress=report.progress, should_stop=report.should_stop,
                                 on_category=lambda partial: store.update_job(job.id, result=partial.to_dict()),
                                 # older jobs searched DuckDuckGo alone, whatever the licence: the same search
                                 source=params.get("source", "ddg"), license=params.get("license", "any"))
    except SearchUnavailable as exc:
        raise JobFailed(str(exc)) from None
    return summary.to_dict()


# -- pasted URL lists

def _urls(store: Store, job: Job, report: _Reporter) -> dict:
    from .sources.ingest import add_sources

    listing = jobs.jobs_dir() / f"{job.id}-urls.txt"  # ingest reads URL lists from .txt files
    listing.write_text(job.params["text"])
    added = add_sources(store, job.project, job.params["category"], [listing], should_stop=report.should_stop,
                        on_progress=lambda d, t: report.progress("downloading", d, t))
    return {"added": len(added.added), "duplicates": len(added.duplicates),
            "skipped": [[source.removeprefix(str(listing)), reason] for source, reason in added.skipped
                        if reason != "cancelled"]}


# -- suspicious-image ranking

def _rank(store: Store, job: Job, report: _Reporter) -> dict:
    from .flows.review import rank_suspicious

    ranked = rank_suspicious(store, job.project, on_progress=lambda d, t: report.progress("ranking", d, t))
    table = {name: [s.to_dict() for s in suspects] for name, suspects in ranked.items()}
    path = jobs.ranking_path(job.id)
    path.write_text(json.dumps(table))
    return {"fingerprint": job.params.get("fingerprint"), "path": str(path),
            "flagged": sum(bool(s.reasons) for suspects in ranked.values() for s in suspects)}


WORK = {"build": _build, "search": _search, "urls": _urls, "rank": _rank}  # job kind -> what its worker does


# ---------------------------------------------------------------- the process

def _import_everything() -> None:
    """What a build or a ranking imports before its first line of work, in the standby, which runs
    no torch operation: it forks the workers, and OpenMP's threads do not survive a fork. Not timm:
    prepared backbones are read without it (engine/inference.py), and the spare's warm-up, which
    prepares them on a machine's first start, imports it then."""
    import cleanlab.filter  # noqa: F401 - the ranking's label issues; it imports scikit-learn
    from scipy.optimize import curve_fit  # noqa: F401 - the learning-curve advice's fit

    from . import charts  # noqa: F401 - its chart (matplotlib)
    from .engine import head, inference, train  # noqa: F401
    from .flows import build, review  # noqa: F401


def _warm() -> None:
    """In the standby's spare worker, before its job comes: the candidates' backbones loaded (and
    prepared, on a machine's first start) and oneDNN's kernels made, and the head fit run once."""
    import torch

    from .engine.backbones import BackboneUnavailable, available_backbones, get_spec
    from .engine.device import default_device, precision
    from .engine.head import cross_val_accuracy
    from .engine.inference import inference_backbone

    device = default_device()
    mode = precision(device)
    for name in available_backbones()[:3]:  # the automatic candidates, which inference_backbone caches
        try:
            network = inference_backbone(name, str(device), mode)
        except BackboneUnavailable:
            continue
        size = get_spec(name).input_size
        with torch.inference_mode():  # oneDNN creates its kernels for a shape on the first pass
            network(torch.zeros(8, 3, size, size, device=device))
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2
    cross_val_accuracy(x, y, 2)  # its optimizer's first run and its kernels: here, not in the build


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanostream.worker", description="run one background job")
    parser.add_argument("job_id", nargs="?", help="the job to run (with --standby: read from stdin)")
    parser.add_argument("--root", help="the store's folder (default: NANOSTREAM_HOME)")
    parser.add_argument("--standby", metavar="FOLDER", help="import first, then fork a warm worker for each job id read from stdin")
    args = parser.parse_args(argv)
    keep_freed_memory()  # a worker runs networks on the CPU: see the function
    job_id = args.job_id
    if args.standby:
        _import_everything()
        taken = standby.serve(Path(args.standby), warm=_warm)
        if taken is None:
            return 0
        job_id, args.root = taken.job_id, taken.root
        jobs.pid_path(job_id).write_text(str(os.getpid()))  # the standby's until now: this process has the job
        with open(jobs.log_path(job_id), "ab") as log:  # from here on the job's log, as a fresh worker's
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
    if not job_id:
        parser.error("a job id is needed")
    with Store(args.root) as store:
        job = run_job(store, job_id)
    jobs.pid_path(job_id).unlink(missing_ok=True)
    return 0 if job is None or job.status != "failed" else 1


if __name__ == "__main__":
    skip_collection_at_exit()
    sys.exit(main())
