"""Where a job runs: `local` (this machine's worker processes, the default) or `ray` (a Ray
cluster, cluster.py). Importable without Ray: the product runs without it installed.

NANOSTREAM_RAY_ADDRESS names the cluster ("127.0.0.1:6379", "ray://head:10001"); when it is set,
the builds, searches and rankings the app and the CLI start run there (jobs.py records the
runner in each job's parameters, so a job runs where it was started for).
"""

from __future__ import annotations

import os
import socket

ADDRESS_ENV = "NANOSTREAM_RAY_ADDRESS"
RUNNERS = ("local", "ray")
ON_CLUSTER = ("build", "search", "rank")  # the job kinds the ray runner takes; a pasted URL list stays local


def configured_runner() -> str:
    """The runner new jobs get: "ray" when NANOSTREAM_RAY_ADDRESS is set, else "local"."""
    return "ray" if os.environ.get(ADDRESS_ENV, "").strip() else "local"


def local_node() -> str:
    """What a local run reports as its node: this machine's host name."""
    return socket.gethostname()
