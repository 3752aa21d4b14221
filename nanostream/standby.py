"""A warm worker: one process that has imported torch and the engine and loaded the backbones,
waiting for the app's next job.

A new worker process spends ~2.5-3 s importing torch, timm and the engine and ~0.5 s more loading
the prepared backbones and creating oneDNN's kernels; a rebuild's own work is ~1 s. So the app
keeps one worker warm: `warm_up` starts it (at app start, and again whenever the previous
one took a job and finished it), and `hand_over` gives it a job id on its stdin. It then runs the
job exactly as a fresh worker does (`jobs.main`), writing to the job's log, and exits: one job
per process, so a crash or a leak never outlives its job.

The standby holds ~0.5 GB. It exits by itself when the app does (its stdin closes), and it is
replaced when the environment it was started in no longer matches (another NANOSTREAM_HOME).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

from . import paths

DISABLE_ENV = "NANOSTREAM_WARM_WORKER"  # "0": every job starts a fresh worker (the test suite, by default)
_lock = threading.Lock()
_current: tuple[str, subprocess.Popen] | None = None  # (key, process): at most one standby per app process


def _key(root: Path, env: dict[str, str]) -> str:
    """What a standby was started for: a job from another store or environment needs another one."""
    text = "\0".join([sys.executable, str(root)] + [f"{k}={v}" for k, v in sorted(env.items())])
    return hashlib.sha256(text.encode()).hexdigest()


def ready_path(pid: int) -> Path:
    """Written by the standby once it is warm (for benchmarks and tests; hand_over needs no wait)."""
    from .jobs import jobs_dir

    return jobs_dir() / f"standby-{pid}.ready"


def warm_up(root: Path, env: dict[str, str]) -> subprocess.Popen | None:
    """Make sure a standby for this store and environment is starting or waiting. Returns it,
    or None when it could not be started (jobs then start cold, as before)."""
    global _current
    if env.get(DISABLE_ENV) == "0":
        return None
    key = _key(root, env)
    with _lock:
        if _current is not None:
            current_key, process = _current
            if current_key == key and process.poll() is None:
                return process
            _stop(process)
            _current = None
        from .jobs import jobs_dir

        try:
            with open(jobs_dir() / "standby.log", "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "nanostream.standby", "--root", str(root)],
                    cwd=paths.REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=log, stderr=log,
                    start_new_session=True)  # a Ctrl-C in the app's terminal does not reach a running job
        except OSError:
            return None
        _current = (key, process)
        return process


def hand_over(root: Path, env: dict[str, str], job_id: str) -> subprocess.Popen | None:
    """Give the job to the waiting standby; None when there is none for this store and environment
    (or it died), and the caller starts a fresh worker."""
    global _current
    with _lock:
        if _current is None or _current[0] != _key(root, env) or _current[1].poll() is not None:
            return None
        process = _current[1]
        _current = None  # it is this job's worker now
        try:
            process.stdin.write(f"{job_id}\n".encode())
            process.stdin.close()
        except OSError:  # it died between the poll and the write
            _stop(process)
            return None
        return process


def stop() -> None:
    """End the standby, if any (tests; an app shutting down closes its stdin anyway)."""
    global _current
    with _lock:
        if _current is not None:
            _stop(_current[1])
            _current = None


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    ready_path(process.pid).unlink(missing_ok=True)  # a killed standby cannot remove its own
    with contextlib.suppress(OSError):  # closing a pipe whose reader was killed
        process.stdin.close()


# ---------------------------------------------------------------- the standby process

def _warm() -> None:
    """Everything a build needs before its first line of work: imports, backbones, kernels."""
    import torch

    from . import jobs, train  # noqa: F401 - imported for their import cost
    from .backbones import BackboneUnavailable, available_backbones, get_spec
    from .device import default_device, precision
    from .inference import inference_backbone

    device = default_device()
    mode = precision(device)
    for name in available_backbones()[:3]:  # the automatic candidates that inference_backbone caches
        try:
            network = inference_backbone(name, str(device), mode)
        except BackboneUnavailable:
            continue
        size = get_spec(name).input_size
        with torch.inference_mode():  # oneDNN creates its kernels for a shape on the first pass
            network(torch.zeros(8, 3, size, size, device=device))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nanostream.standby", description="a warm job worker")
    parser.add_argument("--root", required=True, help="the store's folder")
    args = parser.parse_args(argv)
    _warm()
    ready = ready_path(os.getpid())
    ready.write_text("ready\n")
    try:
        line = sys.stdin.readline()  # blocks until the app hands over a job, or goes away ("")
    finally:
        ready.unlink(missing_ok=True)
    job_id = line.strip()
    if not job_id:
        return 0
    from . import jobs

    with open(jobs.log_path(job_id), "ab") as log:  # from here on, the job's log, as a fresh worker's
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    return jobs.main([job_id, "--root", args.root])


if __name__ == "__main__":
    sys.exit(main())
