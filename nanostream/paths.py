"""Where NanoStream keeps its state and finds the shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    """NANOSTREAM_HOME (default ~/.nanostream): models, caches and the project store."""
    path = Path(os.environ.get("NANOSTREAM_HOME", Path.home() / ".nanostream")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def datasets_dir() -> Path:
    """The shared real-photo datasets: NANOSTREAM_DATASETS, else ../shared/datasets from the repo."""
    return Path(os.environ.get("NANOSTREAM_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def sample_project_dir() -> Path:
    """The small bundled sample project, so the app works offline on first launch."""
    return REPO_ROOT / "samples" / "hymenoptera"
