"""Background jobs whose state lives in the store: model builds, web image searches, pasted URL
lists and the suspicious-image ranking, each run by a worker process of its own (worker.py: a
fresh one, or the warm one standby.py keeps waiting).

A page starts a job (start_build, start_search, start_url_list, start_rank) and polls store.get_job; the worker
writes status, stage, progress, message, result and error there, refreshes the heartbeat while
it lives and checks store.cancel_requested between steps. So a refresh, a second tab or a
restarted app finds the job where it is, and a worker that is killed is noticed by reap():
its process is gone, or its heartbeat is older than STALE_AFTER_S.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from . import paths, standby
from .store.db import FINISHED, Job, Store, StoreError

KINDS = ("build", "search", "urls", "rank")
HEARTBEAT_S = 2.0           # the worker refreshes updated_at this often while its process lives
STALE_AFTER_S = 30.0        # fifteen missed heartbeats: the worker died (killed, crashed, machine restarted)
START_TIMEOUT_S = 60.0      # python + torch start in seconds; a job still queued after this never got a worker
PROGRESS_INTERVAL_S = 0.25  # at most 4 progress writes a second: the page polls once a second
SEARCH_PER_CATEGORY = 30    # enough to start a few-shot project; the rate limit makes more slow
SEARCH_HOST = ("duckduckgo.com", 443)  # where ddgs searches first; unreachable means offline
WORKER_GONE = "the worker process ended without finishing (killed or crashed)"


class JobError(ValueError):
    """A job that cannot be started; the message says why and what to do."""


class JobFailed(Exception):
    """Raised inside a worker for an expected failure: the message is shown to the user as is."""


# Workers this process started: polled in reap() so that a finished one does not linger as a
# zombie, which would look alive to a pid check.
_children: dict[str, subprocess.Popen] = {}


def jobs_dir() -> Path:
    path = paths.home() / "jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_path(job_id: str) -> Path:
    """The worker's stdout and stderr: tracebacks go here, never to the page."""
    return jobs_dir() / f"{job_id}.log"


def pid_path(job_id: str) -> Path:
    return jobs_dir() / f"{job_id}.pid"


# ---------------------------------------------------------------- starting jobs

def latest_job(store: Store, project: str, kind: str) -> Job | None:
    return next((job for job in store.list_jobs(project) if job.kind == kind), None)


def active_job(store: Store, project: str, kind: str) -> Job | None:
    """The project's queued or running job of this kind, if any."""
    return next((job for job in store.list_jobs(project)
                 if job.kind == kind and job.status not in FINISHED), None)


def _start(store: Store, project: str, kind: str, params: dict) -> str:
    running = active_job(store, project, kind)
    if running is not None:
        what = {"build": "A build", "search": "A web search", "urls": "A download", "rank": "A ranking"}[kind]
        raise JobError(f"{what} of project '{project}' is already running; wait for it or cancel it.")
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
    standby.warm_up(store.root, _worker_env(), jobs_dir())


def _launch(store: Store, job_id: str) -> None:
    """Hand the job to the warm worker, else start a worker: its own session (a Ctrl-C or a page
    rerun does not reach it), output to its log."""
    env = _worker_env()
    process = standby.hand_over(store.root, env, job_id)
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
                 per_category: int = SEARCH_PER_CATEGORY) -> str:
    """Search the web for images of some categories (all when None) and add them, in a worker."""
    known = [c.name for c in store.list_categories(project)]
    chosen = known if categories is None else [store.get_category(project, c).name for c in categories]
    if not chosen:
        raise JobError("Add a category first: the search looks for each category's name.")
    if per_category < 1:
        raise JobError("Ask for at least 1 image per category.")
    return _start(store, project, "search", {"categories": chosen, "per_category": int(per_category)})


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


def latest_ranking(store: Store, project: str) -> dict[str, list[dict]]:
    """The newest finished ranking ({category: [{id, score, reasons}]}), possibly for older images; {} if none."""
    for job in store.list_jobs(project):
        if job.kind == "rank" and job.status == "done" and job.result:
            try:
                return json.loads(Path(job.result["path"]).read_text())
            except (OSError, ValueError, KeyError):
                return {}  # removed or damaged: the page falls back to the order images were added
    return {}


# ---------------------------------------------------------------- noticing dead workers

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the number: not ours, but alive
        return True
    return True


def _pid_gone(path: Path) -> bool:
    """True when the pid file names a process that has exited (False when there is no such file)."""
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return False
    return not _alive(pid)


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
    for job_id, process in list(_children.items()):
        if process.poll() is not None:  # collects the exit status, so the pid really disappears
            del _children[job_id]
            # The next job gets a warm worker. Started now, not when this one was handed over:
            # its imports would have taken CPU from the job that was running.
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


# ---------------------------------------------------------------- the worker

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
        while not self._done.wait(HEARTBEAT_S):
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
        if stage == self._stage and done < total and now - self._last_write < PROGRESS_INTERVAL_S:
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
    work = {"build": _build, "search": _search, "urls": _urls, "rank": _rank}.get(job.kind)
    reporter = _Reporter(store, job_id)
    final: dict
    try:
        if work is None:
            raise JobFailed(f"unknown job kind '{job.kind}'; expected one of {', '.join(KINDS)}")
        result = work(store, job, reporter)
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


def _user_message(exc: Exception, job: Job) -> str:
    """What the user reads: the message of a failure they can act on; a pointer to the log otherwise."""
    from .engine.backbones import BackboneUnavailable
    from .engine.data import DataError

    if isinstance(exc, (JobFailed, DataError, StoreError, OSError, BackboneUnavailable)):
        return str(exc)
    what = {"build": "The build", "search": "The search", "urls": "The download", "rank": "Ranking"}.get(job.kind, "The job")
    return f"{what} failed unexpectedly ({type(exc).__name__}: {exc}). Details: {log_path(job.id)}"


# -- build

def previous_backbone(store: Store, project: str) -> str | None:
    """The backbone of the project's latest build, so a rebuild keeps it unless another is clearly better."""
    from .engine.bundle import BundleError, read_bundle

    for record in store.list_models(project):  # newest first
        try:
            return read_bundle(record.bundle_path, with_tensors=False)[0]["backbone"]
        except BundleError:
            continue
    return None


def _build(store: Store, job: Job, report: _Reporter) -> dict:
    from .engine.data import Dataset, LabeledImage
    from .engine.device import default_device
    from .engine.models import save_trained
    from .engine.train import TrainConfig, train

    config = TrainConfig(**job.params["config"])
    if config.backbone == "auto" and config.prefer is None:
        config = replace(config, prefer=previous_backbone(store, job.project))
    records = store.list_images(job.project)
    counts = store.counts(job.project)
    classes = tuple(name for name, n in counts.items() if n)
    by_path = {str(store.image_path(r)): r for r in records}
    dataset = Dataset(classes, tuple(LabeledImage(store.image_path(r), r.category) for r in records))
    device = default_device()

    result = train(dataset, config, on_progress=report.progress, should_stop=report.should_stop, device=device)
    if report.should_stop():
        raise InterruptedError("cancelled")
    report.progress("saving", 0, 1, "")
    project = store.get_job(job.id).project or job.project  # renamed meanwhile: the new name
    model_id, path = save_trained(result, project=project)
    metrics = dict(result.metrics)
    for entry in metrics.get("highest_loss", []):
        record = by_path.get(entry["file"])
        entry["image_id"] = record.id if record else None
    store.record_model(project, model_id, path, metrics)
    report.progress("learning curve", 0, 1, "")
    advice = _advice(store, job, result, records, device)
    return {
        "model_id": model_id,
        "accuracy": metrics["accuracy"],
        "metrics": metrics,
        "labels": list(result.labels),
        "backbone": result.backbone,
        "mode": result.mode,
        "policy": result.policy.to_dict(),
        "candidates": [asdict(c) for c in result.candidates],
        "n_train": result.n_train,
        "n_val": result.n_val,
        "seconds": round(result.seconds, 1),
        "device": _device_name(device),
        "gpu": device.type == "cuda",
        "precision": result.precision,
        "skipped": [list(s) for s in result.skipped],
        "empty_categories": [name for name, n in counts.items() if not n],
        **advice,
    }


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch
        return f"GPU ({torch.cuda.get_device_name(device)})"
    return "CPU"


def _advice(store: Store, job: Job, result, records, device) -> dict:
    """How many more images per category would reach 95%: the learning curve of this project's
    images with the chosen backbone (features come from the cache the build just filled)."""
    from .experiments.research import images_needed, plot_learning_curve
    from .engine.features import extract_features

    try:
        feats = extract_features([store.image_path(r) for r in records], result.backbone, device=device)
        index = {label: i for i, label in enumerate(result.labels)}
        import torch
        y = torch.tensor([index[records[i].category] for i in feats.kept])
        curve = images_needed(feats.original, y, result.labels, target=0.95)
        png = jobs_dir() / f"{job.id}-curve.png"
        png.write_bytes(plot_learning_curve(curve, title="Accuracy by images per category"))
        return {"advice": curve.advice(), "curve_png": str(png)}
    except Exception as exc:  # noqa: BLE001 - advice is a bonus: its failure must not fail the build
        return {"advice": None, "advice_error": str(exc)}


# -- web search

def _check_online() -> None:
    import socket

    try:
        socket.create_connection(SEARCH_HOST, timeout=5).close()
    except OSError as exc:
        raise JobFailed(f"You seem to be offline: the image search ({SEARCH_HOST[0]}) cannot be reached "
                        f"({exc.strerror or exc}). Upload photos or a zip instead, or search again later.") from None


def _search(store: Store, job: Job, report: _Reporter) -> dict:
    """The CLI's `images search` (cli_project: its provider and its way of storing hits), as a job:
    category by category, each one's images stored as soon as they are downloaded."""
    from .cli.project import PROVIDER_ENV, load_provider
    from .sources.ingest import add_search_hits
    from .sources.download import fetch_images
    from .sources.search import QueryCache, SearchPacing, search_category

    if not os.environ.get(PROVIDER_ENV):  # a stand-in provider (tests) needs no internet
        _check_online()
    project, per_category = job.project, job.params["per_category"]
    names = list(job.params["categories"])
    provider = load_provider()
    pacing = getattr(provider, "pacing", None) or SearchPacing()
    cache = QueryCache(paths.home() / "search-cache")
    summary: dict[str, dict] = {}
    for i, name in enumerate(names):
        if report.should_stop():
            break
        if i:
            time.sleep(pacing.pause)  # search.py: pause between categories, as between queries
        try:
            category = store.get_category(project, name)
        except StoreError:
            summary[name] = {"added": 0, "errors": ["the category was removed during the search"]}
            continue
        report.progress(f"searching '{name}'", i, len(names), "")
        found = search_category(name, provider, per_category, category.search_terms, pacing=pacing,
                                cache=cache, should_stop=report.should_stop)
        stage = f"downloading '{name}'"
        fetched = fetch_images([hit.url for hit in found.hits], should_stop=report.should_stop,
                               on_progress=lambda d, t, stage=stage: report.progress(stage, d, t))
        stored = add_search_hits(store, project, name, found.hits, fetched)
        summary[name] = {"found": len(found.hits), "added": len(stored["added"]),
                         "duplicates": len(stored["duplicates"]),
                         "failed": sum(f["reason"] != "cancelled" for f in stored["failed"]),
                         "errors": list(found.errors), "rate_limited": found.rate_limited}
        store.update_job(job.id, result={"categories": summary})  # partial results, shown as they come
        if found.rate_limited:
            for rest in names[i + 1:]:
                summary[rest] = {"added": 0, "errors": ["not searched: the search engine asked us to slow down; "
                                                        "search again in a few minutes"], "rate_limited": True}
            break
    return {"categories": summary}


# -- pasted URL lists

def _urls(store: Store, job: Job, report: _Reporter) -> dict:
    from .sources.ingest import add_sources

    listing = jobs_dir() / f"{job.id}-urls.txt"  # ingest reads URL lists from .txt files
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
    table = {name: [{"id": s.image_id, "score": s.score if math.isfinite(s.score) else None,
                     "reasons": list(s.reasons)} for s in suspects]
             for name, suspects in ranked.items()}
    path = jobs_dir() / f"{job.id}-ranking.json"  # a file, not the job row: pages list jobs every second
    path.write_text(json.dumps(table))
    return {"fingerprint": job.params.get("fingerprint"), "path": str(path),
            "flagged": sum(bool(s.reasons) for suspects in ranked.values() for s in suspects)}
