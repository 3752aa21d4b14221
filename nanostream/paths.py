"""Where NanoStream keeps its state and finds the shared datasets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    """NANOSTREAM_HOME (default ~/.nanostream): models, caches and the project store."""
    path = Path(os.environ.get("NANOSTREAM_HOME", Path.home() / ".nanostream")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def backbones_dir() -> Path:
    """What is derived from the backbones' weights (their fingerprints, inference-ready copies):
    NANOSTREAM_BACKBONES, else NANOSTREAM_HOME/backbones. Every file is keyed by the weights it came
    from, so stores on one machine can share one folder (the tests' many homes do)."""
    folder = os.environ.get("NANOSTREAM_BACKBONES")
    return Path(folder).expanduser() if folder else home() / "backbones"


def datasets_dir() -> Path:
    """The shared real-photo datasets: NANOSTREAM_DATASETS, else ../shared/datasets from the repo."""
    return Path(os.environ.get("NANOSTREAM_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def sample_project_dir() -> Path:
    """The small bundled sample project, so the app works offline on first launch."""
    return REPO_ROOT / "samples" / "hymenoptera"


def write_atomically(out: Path, write: Callable[[str], None]) -> None:
    """write(temp_path) then rename over `out`: readers, and a crash, never see half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, out)
    finally:
        Path(temp).unlink(missing_ok=True)
