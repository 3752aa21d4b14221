"""The entry point of a job's worker process: `python -m nanostream.worker JOB_ID --root STORE`
runs one job (jobs.run_job) and exits; `--standby FOLDER` first warms up, then waits on stdin for
the job id the app hands it (standby.py), and runs that one job the same way.

Process-wide settings are made here, in the process that needs them, never on import: the
Streamlit server, the API and the tests import the engine without them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import jobs, standby
from .process import keep_freed_memory
from .store.db import Store


def _warm() -> None:
    """Everything a build needs before its first line of work: imports, backbones, kernels."""
    import torch

    from .engine import train  # noqa: F401 - imported for its import cost (timm, the engine)
    from .engine.backbones import BackboneUnavailable, available_backbones, get_spec
    from .engine.device import default_device, precision
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


def _wait_for_job(folder: str) -> str:
    """Warm up, say so, and block until the app hands over a job id ("" when the app went away)."""
    _warm()
    ready = standby.ready_path(Path(folder), os.getpid())
    ready.write_text("ready\n")
    try:
        return sys.stdin.readline().strip()
    finally:
        ready.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanostream.worker", description="run one background job")
    parser.add_argument("job_id", nargs="?", help="the job to run (with --standby: read from stdin)")
    parser.add_argument("--root", help="the store's folder (default: NANOSTREAM_HOME)")
    parser.add_argument("--standby", metavar="FOLDER", help="warm up first, then wait for a job id on stdin")
    args = parser.parse_args(argv)
    keep_freed_memory()  # a worker runs networks on the CPU: see the function
    job_id = args.job_id
    if args.standby:
        job_id = _wait_for_job(args.standby)
        if not job_id:
            return 0
        with open(jobs.log_path(job_id), "ab") as log:  # from here on the job's log, as a fresh worker's
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
    if not job_id:
        parser.error("a job id is needed")
    with Store(args.root) as store:
        job = jobs.run_job(store, job_id)
    jobs.pid_path(job_id).unlink(missing_ok=True)
    return 0 if job is None or job.status != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
