"""The bundled sample project: 15 ants and 15 bees from samples/, so the app works offline on first launch."""

from __future__ import annotations

from pathlib import Path

from .. import paths
from ..sources.ingest import IngestReport, add_sources
from ..store.db import Store
from ..store.records import Project, StoreError

SAMPLE_NAME = "Sample: ants and bees"
MARKER = "sample-project-created"  # in the store's folder: a user who deletes the sample keeps it deleted


def create_sample_project(store: Store, name: str = SAMPLE_NAME,
                          source: Path | None = None) -> tuple[Project, IngestReport]:
    """A new project holding the sample photos, one category per folder of samples/hymenoptera.
    StoreError when a project of that name exists or the sample folder is missing."""
    source = Path(source) if source is not None else paths.sample_project_dir()
    folders = sorted(p for p in source.iterdir() if p.is_dir()) if source.is_dir() else []
    if not folders:
        raise StoreError(f"the sample photos are missing ({source}); reinstall NanoStream to get them back")
    project = store.create_project(name, [p.name for p in folders])
    report = add_sources(store, project.name, None, [source])
    return store.get_project(project.name), report


def ensure_sample_project(store: Store) -> Project | None:
    """Create the sample project on the first launch of this store; later launches leave it be
    (deleted or renamed, it stays so). Returns the project when it was created now."""
    marker = store.root / MARKER
    if marker.exists():
        return None
    try:
        project, _ = create_sample_project(store)
    except StoreError:  # the name is taken, or the photos are missing: the app works without it
        project = None
    marker.write_text("1\n")
    return project
