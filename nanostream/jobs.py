"""Background jobs whose state lives in the store: model builds, web image searches, pasted URL
lists and the suspicious-image ranking, each run by a worker process of its own (worker.py: a
fresh one, or one the warm standby forks: standby.py).

A page starts a job (start_build, start_search, start_url_list, start_rank) and polls store.get_job; the worker
writes status, stage, progress, message, result and error there, refreshes the heartbeat while
it lives and checks store.cancel_requested between steps. So a refresh, a second tab or a
restarted app finds the job where it is, and a worker that is killed is noticed by reap():
its process is gone, or its heartbeat is older than STALE_AFTER_S.

A build, search or ranking records its runner (runners/) when it starts: "ray" while
NANOSTREAM_RAY_ADDRESS is set, and its worker then drives it as a task on that Ray cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from . import paths, runners, standby
from .flows.collect import DEFAULT_PER_CATEGORY as SEARCH_PER_CATEGORY
from .store.db import Store
from .store.licenses import DEFAULT_FILTER as DEFAULT_LICENSE_FILTER, LICENSE_FILTERS
from .store.records import FINISHED, Job, StoreError

HEARTBEAT_S = 2.0           # the worker refreshes updated_at this often while its process lives
STALE_AFTER_S = 30.0        # fifteen missed heartbeats: the worker died (killed, crashed, machine restarted)
START_TIMEOUT_S = 60.0      # python + torch start in seconds; a job still queued after this never got a worker
PROGRESS_INTERVAL_S = 0.25  # at most 4 progress writes a second: the page polls once a second
WORKER_GONE = "the worker process ended without finishing (killed or crashed)"


class JobError(ValueError):
    """A job that cannot be started; the message says why and what to do."""


# Workers this process started: polled in reap() so that a finished one does not linger as a
# zombie, which would look alive to a pid check.
_children: dict[str, subprocess.Popen | standby.Handed] = {}


def jobs_dir() -> Path:
    path = paths.home() / "jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_path(job_id: str) -> Path:
    """The worker's stdout and stderr: tracebacks go here, never to the page."""
    return jobs_dir() / f"{job_id}.log"


def pid_path(job_id: str) -> Path:
    return jobs_dir() / f"{job_id}.pid"


def ranking_path(job_id: str) -> Path:
    """A ranking job's table: a file, not the job row, since pages list jobs every second."""
    return jobs_dir() / f"{job_id}-ranking.json"


# ---------------------------------------------------------------- starting jobs

def latest_job(store: Store, project: str, kind: str) -> Job | None:
    return next((job for job in store.list_jobs(project) if job.kind == kind), None)


def active_job(store: Store, project: str, kind: str) -> Job | None:
    """The project's queued or running job of this kind, if any."""
    return next((job for job in store.list_jobs(project)
                 if job.kind == kind and job.status not in FINISHED), None)


def cancel(store: Store, job_id: str) -> None:
    """Ask a job to stop (the Cancel buttons): a queued one ends at once, a running one at its worker's next step."""
    store.request_cancel(job_id)


def _start(store: Store, project: str, kind: str, params: dict) -> str:
    running = active_job(store, project, kind)
    if running is not None:
        what = {"build": "A build", "search": "A web search", "urls": "A download", "rank": "A ranking"}[kind]
        raise JobError(f"{what} of project '{project}' is already running; wait for it or cancel it.")
    if kind in runners.ON_CLUSTER:  # where it runs is decided now: the worker runs it there
        params = {**params, "runner": runners.configured_runner()}
    job = store.create_job(project, kind, params)
    first = [j for j in store.list_jobs(project) if j.kind == kind and j.status not in FINISHED][-1]
    if first.id != job.id:  # another tab started one at the same moment: the earlier one stands
        store.request_cancel(job.id)
        raise JobError(f"{kind.capitalize()} of project '{project}' was just started elsewhere; it is running now.")
    _launch(store, job.id)
    return job.id


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(paths.REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def warm_up(store: Store) -> None:
    """Have a warm worker waiting for this store's next job (standby.py): the app calls it at start."""
    standby.warm_up(_worker_env(), jobs_dir())


def _launch(store: Store, job_id: str) -> None:
    """Hand the job to the warm worker, else start a worker: its own session (a Ctrl-C or a page
    rerun does not reach it), output to its log."""
    env = _worker_env()
    process = standby.hand_over(store.root, env, job_id, pid_path(job_id))
    if process is None:
        with open(log_path(job_id), "ab") as log:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "nanostream.worker", job_id, "--root", str(store.root)],
                    cwd=paths.REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True)
            except OSError as exc:
                store.update_job(job_id, status="failed", error=f"could not start the worker: {exc.strerror or exc}")
                raise JobError(f"could not start the worker: {exc.strerror or exc}") from None
        pid_path(job_id).write_text(str(process.pid))
    _children[job_id] = process


def start_build(store: Store, project: str, config) -> str:
    """Check that the project can be built with config (a train.TrainConfig), then build it in a worker.
    Returns the job id; JobError says what to fix when the build cannot start."""
    from .engine.train import MODES

    try:
        config.policy()  # unknown policy or fill mode: say so now, not in a worker
        if config.mode not in MODES:
            raise ValueError(f"unknown mode '{config.mode}'; valid: {', '.join(MODES)}")
        if config.backbone != "auto":
            from .engine.backbones import get_spec
            get_spec(config.backbone)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    counts = store.counts(project)
    used = {name: n for name, n in counts.items() if n}
    if len(used) < 2 or min(used.values()) < 2:
        now = ", ".join(f"{name} {n}" for name, n in counts.items()) or "no categories"
        raise JobError(f"A model needs at least 2 categories with 2 or more images each (now: {now}). "
                       f"Add images on the Images page first.")
    return _start(store, project, "build", {"config": asdict(config)})


def rebuild(store: Store, job: Job) -> str:
    """Build a finished build's project again as it was asked for (after fixes to its photos)."""
    from .engine.train import TrainConfig

    return start_build(store, job.project, TrainConfig(**job.params["config"]))


def build_time_hint(store: Store, photos: int) -> str:
    """What the Build page promises, from what this machine took last: the newest finished build
    (of any project), from click to result, scaled to `photos`. A promise from another machine
    (or a fixed "a minute or so") would be wrong by 3x between an AMX server and an AVX2 laptop."""
    last = next((job for job in store.list_jobs() if job.kind == "build" and job.status == "done"
                 and job.result and job.finished_at), None)
    if last is None:
        return "the first build on this machine also prepares the pretrained networks, once"
    seconds = last.finished_at - last.created_at
    measured = last.result["n_train"] + last.result["n_val"]
    guess = seconds * max(photos, 1) / max(measured, 1)
    return (f"about {max(round(guess), 1)} s for {photos} photos on this machine: its last build took "
            f"{seconds:.0f} s for {measured}, and photos it has seen before are quicker")


def start_search(store: Store, project: str, categories: Sequence[str] | None = None,
                 per_category: int = SEARCH_PER_CATEGORY, terms: str = "", source: str = "auto",
                 license: str = DEFAULT_LICENSE_FILTER) -> str:
    """Search the web for images of some categories (all when None) and add them, in a worker
    (flows.collect.search_project; terms: extra query variants for every category; source and
    license: as `images search --source/--license`)."""
    known = [c.name for c in store.list_categories(project)]
    chosen = known if categories is None else [store.get_category(project, c).name for c in categories]
    if not chosen:
        raise JobError("Add a category first: the search looks for each category's name.")
    if per_category < 1:
        raise JobError("Ask for at least 1 image per category.")
    if license not in LICENSE_FILTERS:
        raise JobError(f"Choose a licence filter: {', '.join(LICENSE_FILTERS)}.")
    return _start(store, project, "search", {"categories": chosen, "per_category": int(per_category),
                                             "terms": terms, "source": source, "license": license})


def start_url_list(store: Store, project: str, category: str, text: str) -> str:
    """Download the images of a pasted URL list (one per line) into a category, in a worker."""
    from .sources.ingest import IngestLimits, parse_url_list

    category = store.get_category(project, category).name
    urls, bad = parse_url_list(text)
    if not urls:
        hint = f" (line {bad[0][0]} is not one: {bad[0][1][:60]})" if bad else ""
        raise JobError(f"No image URLs found: paste one http(s) URL per line{hint}.")
    if len(urls) > IngestLimits().max_urls:
        raise JobError(f"{len(urls):,} URLs is more than {IngestLimits().max_urls:,} at once: paste them in parts.")
    return _start(store, project, "urls", {"category": category, "text": text})


def images_fingerprint(store: Store, project: str) -> str:
    """Changes whenever an image is added, removed or moved: a ranking is current when it matches."""
    pairs = sorted(f"{r.id}:{r.category}" for r in store.list_images(project))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:16]


def start_rank(store: Store, project: str) -> str:
    return _start(store, project, "rank", {"fingerprint": images_fingerprint(store, project)})


def ensure_ranking(store: Store, project: str) -> Job | None:
    """The job ranking the project's images as they are now: the running or latest one, or a new
    one when the images changed since. None when the project has no images."""
    if not store.list_images(project):
        return None
    running = active_job(store, project, "rank")
    if running is not None:
        return running
    latest = latest_job(store, project, "rank")
    if (latest is not None and latest.status in ("done", "failed")
            and latest.params.get("fingerprint") == images_fingerprint(store, project)):
        return latest  # done, or failed for these very images: starting again would fail again
    return store.get_job(start_rank(store, project))


def latest_ranking(store: Store, project: str) -> dict:
    """The newest finished ranking ({category: [review.SuspectImage]}), possibly for older images; {} if none."""
    from .flows.review import ranking_from_dict

    for job in store.list_jobs(project):
        if job.kind == "rank" and job.status == "done" and job.result:
            try:
                return ranking_from_dict(json.loads(Path(job.result["path"]).read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                return {}  # removed, damaged or an older format: the page falls back to the order images were added
    return {}


# ---------------------------------------------------------------- noticing dead workers

def _pid_gone(path: Path) -> bool:
    """True when the pid file names a process that has exited (False when there is no such file)."""
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return False
    return not standby.alive(pid)


def _worker_gone(job: Job) -> bool:
    """True when the job's worker process is known to have exited (this machine's pid file)."""
    return _pid_gone(pid_path(job.id))


def _remove_stale_pid_files(store: Store, pid_files: Sequence[Path]) -> None:
    """Delete the pid files a killed worker could not: its job has finished, or it is no job of
    this store and its process is gone (another store's jobs may share the folder)."""
    status = {job.id: job.status for job in store.list_jobs()}
    for path in pid_files:
        if status.get(path.stem) in FINISHED or (path.stem not in status and _pid_gone(path)):
            path.unlink(missing_ok=True)


def reap(store: Store, stale_after: float = STALE_AFTER_S) -> list[Job]:
    """Mark as failed the unfinished jobs whose worker is gone: its process exited, its heartbeat
    is stale (store.reap_stale_jobs), or it never started; then delete the pid files such
    workers left. Returns the jobs marked. Cheap: pages call it on every poll."""
    ended = [job_id for job_id, process in _children.items()
             if process.poll() is not None]  # collects the exit status, so the pid really disappears
    for job_id in ended:
        del _children[job_id]
    if ended and not _children:
        # A standby that died (or was never started) is started again once no job runs: its
        # imports beside a running build took that build from 2.5 to 10 s on 2 cores.
        warm_up(store)
    marked = list(store.reap_stale_jobs(stale_after))
    pid_files = list(jobs_dir().glob("*.pid"))  # before the jobs are listed: each is of a job listed below
    now = time.time()
    for job in store.list_jobs():
        if job.status in FINISHED:
            continue
        never_started = job.status == "queued" and now - job.created_at > START_TIMEOUT_S
        if _worker_gone(job) or never_started:
            message = WORKER_GONE if job.status == "running" else "the worker did not start"
            try:
                marked.append(store.update_job(job.id, status="failed", error=message, message=message))
            except StoreError:  # it finished (or was deleted) a moment ago: nothing to mark
                continue
    _remove_stale_pid_files(store, pid_files)
    return marked
