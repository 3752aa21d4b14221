"""A warm worker: one process that has imported torch and the engine and loaded the backbones,
waiting for the app's next job.

A new worker process spends ~2.5-3 s importing torch, timm and the engine and ~0.5 s more loading
the prepared backbones and creating oneDNN's kernels; a rebuild's own work is ~1 s. So the app
keeps one worker warm: `warm_up` starts it (at app start, and again once the job the previous
one took has ended: jobs.reap), and `hand_over` gives it a job id on its stdin. It then runs the
job exactly as a fresh worker does (worker.py), writing to the job's log, and exits: one job
per process, so a crash or a leak never outlives its job. This module only manages that process.

The standby holds ~0.5 GB. It exits by itself when the app does (its stdin closes), and it is
replaced when the environment it was started in no longer matches (another NANOSTREAM_HOME).
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

from . import paths

DISABLE_ENV = "NANOSTREAM_WARM_WORKER"  # "0": every job starts a fresh worker (the test suite, by default)
_lock = threading.Lock()
_current: tuple[str, Path, subprocess.Popen] | None = None  # (key, folder, process): one per app process


def _key(root: Path, env: dict[str, str]) -> str:
    """What a standby was started for: a job from another store or environment needs another one."""
    text = "\0".join([sys.executable, str(root)] + [f"{k}={v}" for k, v in sorted(env.items())])
    return hashlib.sha256(text.encode()).hexdigest()


def ready_path(folder: Path, pid: int) -> Path:
    """Written by the standby once it is warm (for benchmarks and tests; hand_over needs no wait)."""
    return folder / f"standby-{pid}.ready"


def warm_up(root: Path, env: dict[str, str], folder: Path) -> subprocess.Popen | None:
    """Make sure a standby for this store and environment is starting or waiting. Returns it,
    or None when it could not be started (jobs then start cold, as before)."""
    global _current
    if env.get(DISABLE_ENV) == "0":
        return None
    key = _key(root, env)
    with _lock:
        if _current is not None:
            current_key, _, process = _current
            if current_key == key and process.poll() is None:
                return process
            _stop(*_current[1:])
            _current = None
        try:
            with open(folder / "standby.log", "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "nanostream.worker", "--standby", str(folder), "--root", str(root)],
                    cwd=paths.REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=log, stderr=log,
                    start_new_session=True)  # a Ctrl-C in the app's terminal does not reach a running job
        except OSError:
            return None
        _current = (key, folder, process)
        return process


def hand_over(root: Path, env: dict[str, str], job_id: str) -> subprocess.Popen | None:
    """Give the job to the waiting standby; None when there is none for this store and environment
    (or it died), and the caller starts a fresh worker."""
    global _current
    with _lock:
        if _current is None or _current[0] != _key(root, env) or _current[2].poll() is not None:
            return None
        _, folder, process = _current
        _current = None  # it is this job's worker now
        try:
            process.stdin.write(f"{job_id}\n".encode())
            process.stdin.close()
        except OSError:  # it died between the poll and the write
            _stop(folder, process)
            return None
        return process


def stop() -> None:
    """End the standby, if any (tests; an app shutting down closes its stdin anyway)."""
    global _current
    with _lock:
        if _current is not None:
            _stop(*_current[1:])
            _current = None


def current() -> subprocess.Popen | None:
    """The standby process waiting now, if any."""
    with _lock:
        return _current[2] if _current is not None else None


def _stop(folder: Path, process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    ready_path(folder, process.pid).unlink(missing_ok=True)  # a killed standby cannot remove its own
    with contextlib.suppress(OSError):  # closing a pipe whose reader was killed
        process.stdin.close()
