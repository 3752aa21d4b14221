"""A warm worker: one process that has imported torch and the engine, and forks a worker for each
of the app's jobs.

A new worker process spends 2-6 s importing torch and the engine (more on a machine's first
start, which imports timm to prepare the backbones: engine/inference.py), and ~0.5 s more loading
the backbones and creating oneDNN's kernels, where a rebuild's own work is ~1 s. So the app keeps one standby process: `warm_up` starts it (at app start); it imports
everything and then keeps a spare worker forked and warmed while no job runs. `hand_over` writes
a job id to the standby's stdin, at once, even while it is still importing; the spare takes it,
writes its pid in the job's pid file (the standby's pid until then: the job is alive while either
is), and runs the job exactly as a fresh worker does (worker.py), writing to the job's log, in a
session of its own, and exits: one job per process, so a crash or a leak never outlives its job.
Jobs that follow one another (the ranking a project's opening starts, then a build) all start
warm, and none starts cold beside a standby still importing: on 2 cores that slowed both. The
standby runs no torch operation itself: OpenMP's threads do not survive a fork.

The standby holds ~0.5 GB, shared with its workers until they write. It exits by itself when the
app does (its stdin closes), and it is replaced when the environment it was started in changes
in anything but NanoStream's own settings (JOB_ENV_PREFIX). This module manages that process and
is its main loop (serve).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import paths

DISABLE_ENV = "NANOSTREAM_WARM_WORKER"  # "0": every job starts a fresh worker
_lock = threading.Lock()
_current: tuple[str, subprocess.Popen] | None = None  # (key, process): one per app process


class Handed:
    """A job handed to the standby, with the part of Popen's interface jobs.py uses: its pid is the
    one in the job's pid file (the standby's, then the forked worker's, which removes the file when
    it ends). That worker is not this process's child: the standby reaps it."""

    def __init__(self, pid_file: Path, server: subprocess.Popen):
        self.pid_file, self.server, self._pid = pid_file, server, server.pid

    @property
    def pid(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            self._pid = int(self.pid_file.read_text())
        return self._pid

    def poll(self) -> int | None:
        """None while the job's process runs; 0 once it is gone (its exit status is the standby's)."""
        if not self.pid_file.exists():
            return 0  # removed by the worker as it ended
        if self.pid == self.server.pid:  # not forked yet: the standby holds it (and is our child to reap)
            return self.server.poll()
        return None if alive(self.pid) else 0

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.05)  # polling a process that is not our child: there is nothing to wait on
        return status


# NanoStream reads its own settings when it uses them, never on import, so each job brings its
# own (NANOSTREAM_HOME, the Ray address, ...): one standby serves every store of the app's
# process. Any other variable (PYTHONPATH, torch's and oneDNN's) may act on import: a change
# needs another standby.
JOB_ENV_PREFIX = "NANOSTREAM_"


def _key(env: dict[str, str]) -> str:
    """What a standby was started for: a job from another environment needs another one."""
    text = "\0".join([sys.executable] + [f"{k}={v}" for k, v in sorted(env.items())
                                         if not k.startswith(JOB_ENV_PREFIX)])
    return hashlib.sha256(text.encode()).hexdigest()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the number: not ours, but alive
        return True
    return True


def warm_up(env: dict[str, str], folder: Path) -> subprocess.Popen | None:
    """Make sure a standby for this environment is starting or waiting. Returns it, or None when
    it could not be started (jobs then start cold, as before)."""
    global _current
    if env.get(DISABLE_ENV) == "0":
        return None
    key = _key(env)
    with _lock:
        if _current is not None:
            current_key, process = _current
            if current_key == key and process.poll() is None:
                return process
            _stop(process)
            _current = None
        try:
            with open(folder / "standby.log", "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "nanostream.worker", "--standby", str(folder)],
                    cwd=paths.REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=log, stderr=log,
                    start_new_session=True)  # a Ctrl-C in the app's terminal does not reach a running job
        except OSError:
            return None
        _current = (key, process)
        return process


def hand_over(root: Path, env: dict[str, str], job_id: str, pid_file: Path) -> Handed | None:
    """Give the job (its store, its NanoStream settings) to the standby, still importing or waiting
    with a warm spare, and return at once; None when there is no standby for this environment, or
    it died, and the caller starts a fresh worker."""
    global _current
    with _lock:
        if env.get(DISABLE_ENV) == "0" or _current is None or _current[0] != _key(env) \
                or _current[1].poll() is not None:
            return None
        process = _current[1]
        pid_file.write_text(str(process.pid))  # before the job: the worker's own pid replaces it
        job = {"job": job_id, "root": str(root), "env": {k: v for k, v in env.items() if k.startswith(JOB_ENV_PREFIX)}}
        try:
            process.stdin.write(json.dumps(job).encode() + b"\n")
            process.stdin.flush()
        except OSError:  # it died between the poll and the write
            pid_file.unlink(missing_ok=True)
            _stop(process)
            _current = None
            return None
        return Handed(pid_file, process)


def stop() -> None:
    """End the standby, if any (tests; an app shutting down closes its stdin anyway). The workers
    it forked run on: each is its job's, in a session of its own."""
    global _current
    with _lock:
        if _current is not None:
            _stop(_current[1])
            _current = None


def current() -> subprocess.Popen | None:
    """The standby process, if any."""
    with _lock:
        return _current[1] if _current is not None else None


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    with contextlib.suppress(OSError):  # closing a pipe whose reader was killed
        process.stdin.close()


# ---------------------------------------------------------------- inside the standby process

@dataclass(frozen=True)
class Taken:
    """What a forked worker was handed: its job, and the store it belongs to."""
    job_id: str
    root: str


def serve(folder: Path, warm: Callable[[], None]) -> Taken | None:
    """The standby's loop, once everything is imported (worker.py): keep one spare worker forked
    and warmed (`warm`: backbones loaded, kernels made) while no job runs, and give it each job id
    read from stdin. Returns what each worker was handed, its NanoStream settings made the job's;
    None in the standby once the app has gone (stdin closed).

    A spare is forked only while no job runs, or when a job comes and none is waiting: its ~1 s of
    warm-up beside a running build would slow that build on 2 cores."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers as they exit
    spare: tuple[int, int] | None = None  # (pid, the pipe its job id is written to)
    running: list[int] = []
    pending = b""
    while True:
        running = [pid for pid in running if alive(pid)]
        if spare is not None and not alive(spare[0]):  # it died warming up: fork another when needed
            os.close(spare[1])
            spare = None
        line, newline, rest = pending.partition(b"\n")
        job = line.strip() if newline else b""
        if spare is None and (job or not running):
            spare = _fork_spare(folder, warm)
            if isinstance(spare, Taken):
                return spare  # in the spare, once its job came
        if not newline:
            if not select.select([0], [], [], 0.5)[0]:
                continue  # nothing yet: look at the workers again
            if not (chunk := os.read(0, 4096)):
                return None  # the app has gone; the spare sees its pipe close and exits too
            pending += chunk
            continue
        pending = rest
        if job:
            pid, pipe = spare
            spare = None
            os.write(pipe, job + b"\n")
            os.close(pipe)
            running.append(pid)


def warm_path(folder: Path, pid: int) -> Path:
    """Written by the standby's spare worker while it waits, warm (for benchmarks and tests)."""
    return folder / f"standby-{pid}.warm"


def _fork_spare(folder: Path, warm: Callable[[], None]) -> tuple[int, int] | Taken:
    """Fork a worker that warms up and then waits for its job. In the standby: (its pid, the
    write end of its pipe). In the spare: the job, when it comes."""
    standby_pid = os.getpid()
    job_pipe, job_end = os.pipe()
    if (pid := os.fork()) != 0:
        os.close(job_pipe)
        return pid, job_end
    os.close(job_end)
    os.setsid()  # cancel and kill reach the job's whole process group, not the standby
    _become_worker()
    try:
        warm()
    except Exception:  # noqa: BLE001 - its job then loads what it needs itself, as a new worker does
        traceback.print_exc()
    marker = warm_path(folder, standby_pid)
    marker.write_text(f"{os.getpid()}\n")
    line = b""
    while not line.endswith(b"\n"):
        if not (chunk := os.read(job_pipe, 4096)):
            marker.unlink(missing_ok=True)
            os._exit(0)  # the standby has gone: there will be no job
        line += chunk
    marker.unlink(missing_ok=True)
    os.close(job_pipe)
    job = json.loads(line)
    for key in [k for k in os.environ if k.startswith(JOB_ENV_PREFIX)]:
        del os.environ[key]
    os.environ.update(job["env"])
    return Taken(job["job"], job["root"])


def _become_worker() -> None:
    """In a forked child: its own random state, the default child handling, and no hold on the
    standby's stdin (the app's pipe); it writes to the standby's log until its job's replaces it."""
    import random

    random.seed()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
