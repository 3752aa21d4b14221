"""A real `streamlit run app.py` for the browser and bind tests: started on a free local port
with a NANOSTREAM_HOME of its own, and waited for (bounded) until its health endpoint answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_S = 60  # streamlit serving its health endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(home: Path, log_path: Path, port: int, *options: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
    """The app as `python -m streamlit run app.py --server.port PORT *options`, answering once this returns;
    `env` adds to the environment it inherits."""
    env = {**os.environ, "NANOSTREAM_HOME": str(home), "PYTHONPATH": str(REPO), **(env or {})}
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                   *options], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_S
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise AssertionError(f"streamlit did not answer in {START_S} s: {log_path.read_text()}")
        time.sleep(0.25)  # polling the endpoint, not waiting for work
