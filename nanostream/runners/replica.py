"""A project (or a data folder) as data, for a task on a machine that shares no disk with the
store: take_snapshot packs the photos, their categories and the owner's cached features;
Replica rebuilds them in a throw-away store and NANOSTREAM_HOME on the task's machine and says
what the task wrote there; bring_back writes a finished job's outputs into the owner's store and
home, with the replica's image ids and paths replaced by the owner's.

No Ray here: cluster.py moves these values; this module only packs and unpacks them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import paths
from ..store.db import Store
from ..store.records import Provenance, StoreError, content_hash

SEARCH_CACHE = "search-cache"  # the task's own query cache: answers for its run, not the owner's


@dataclass(frozen=True)
class ImageCopy:
    """One stored photo as data."""
    image_id: int           # its id where it was taken (the owner's, or the replica's for a search's new photo)
    category: str
    data: bytes             # the stored JPEG
    provenance: Provenance


@dataclass(frozen=True)
class ProjectSnapshot:
    project_id: int
    name: str
    categories: tuple[tuple[str, str], ...]   # (name, search terms), in the project's order
    images: tuple[ImageCopy, ...]             # in store.list_images order, so a build splits them the same way
    features: tuple[tuple[str, bytes], ...]   # the owner's cached features of these photos: (path under home, bytes)


@dataclass(frozen=True)
class FolderSnapshot:
    """The files of a data folder that scan_folder reads, at their paths under it."""
    root: str                                 # the folder as the user named it: summaries name files under it
    files: tuple[tuple[str, bytes], ...]      # (relative path, bytes); b"" for a file skipped by its name
    features: tuple[tuple[str, bytes], ...]   # the owner's cached feature files of these photos


@dataclass(frozen=True)
class Outcome:
    """What a task sends back: its job's result and the files it wrote under its home."""
    result: dict                              # what the work returned (a summary's to_dict)
    node: str                                 # the Ray node that ran it
    files: tuple[tuple[str, bytes], ...]      # (path under home, bytes): bundle, chart, ranking, new features
    replica_ids: tuple[tuple[int, int], ...]  # (replica id, owner id) of the snapshot's photos
    home: str = ""                            # the task's NANOSTREAM_HOME: paths in `result` under it
    origin: str = ""                          # the folder its photos were in (the replica's blobs, a data folder)
    new_images: tuple[ImageCopy, ...] = ()    # photos the task added (a search), with their replica ids
    model_metrics: dict | None = None         # a build's record in the replica store


def _feature_files(digests: Sequence[str]) -> tuple[tuple[str, bytes], ...]:
    """The owner's cached rows of these photos, every backbone, precision and policy."""
    home = paths.home()
    root = home / "features"
    found = []
    for digest in dict.fromkeys(digests):
        for path in root.glob(f"*/*/*/{digest[:2]}/{digest}.npy"):
            try:
                found.append((str(path.relative_to(home)), path.read_bytes()))
            except OSError:
                continue  # removed meanwhile: the task computes it
    return tuple(found)


def take_snapshot(store: Store, project: str) -> ProjectSnapshot:
    found = store.get_project(project)
    records = store.list_images(found.name)
    images = tuple(ImageCopy(r.id, r.category, store.image_path(r).read_bytes(), r.provenance) for r in records)
    categories = tuple((c.name, c.search_terms) for c in store.list_categories(found.name))
    return ProjectSnapshot(found.id, found.name, categories, images, _feature_files([r.content_hash for r in records]))


def take_folder(folder: str | Path) -> FolderSnapshot:
    """The photos scan_folder finds, and empty stand-ins for the files it skips by name (so the
    task's scan skips and reports them the same way)."""
    from ..engine.data import scan_folder

    dataset = scan_folder(folder)
    root = Path(folder)
    photos = [(str(item.path.relative_to(root)), item.path.read_bytes()) for item in dataset.train + dataset.val]
    skipped = [(str(Path(file).relative_to(root)), b"") for file, _ in dataset.skipped]
    return FolderSnapshot(str(folder), tuple(photos + skipped), _feature_files([content_hash(d) for _, d in photos]))


def _write(path: Path, data: bytes) -> None:
    paths.write_atomically(path, lambda temp: Path(temp).write_bytes(data))


class Replica:
    """The snapshot rebuilt under `root` (a fresh folder): store/ and home/. The caller points
    NANOSTREAM_HOME at `home` while the job runs."""

    def __init__(self, snapshot: ProjectSnapshot, root: Path):
        self.snapshot, self.home = snapshot, root / "home"
        self.store = Store(root / "store")
        self.store.create_project(snapshot.name, [name for name, _ in snapshot.categories])
        for name, terms in snapshot.categories:
            if terms:
                self.store.set_search_terms(snapshot.name, name, terms)
        self.ids: dict[int, int] = {}  # replica id -> owner id
        for image in snapshot.images:
            record, _ = self.store.add_image(snapshot.name, image.category, image.data, image.provenance)
            self.ids[record.id] = image.image_id
        for relative, data in snapshot.features:
            _write(self.home / relative, data)
        self._shipped = {relative for relative, _ in snapshot.features}

    def outcome(self, result: dict, node: str) -> Outcome:
        new = tuple(ImageCopy(r.id, r.category, self.store.image_path(r).read_bytes(), r.provenance)
                    for r in self.store.list_images(self.snapshot.name) if r.id not in self.ids)
        models = self.store.list_models(self.snapshot.name)
        return Outcome(result, node, tuple(written_files(self.home, self._shipped)), tuple(self.ids.items()),
                       str(self.home), str(self.store.blob_dir), new, models[0].metrics if models else None)


def written_files(home: Path, shipped: set[str] | frozenset[str] = frozenset()) -> Iterator[tuple[str, bytes]]:
    """The files a task wrote under its home, except its query cache and what it was sent."""
    for path in sorted(home.rglob("*")):
        relative = str(path.relative_to(home))
        if path.is_file() and relative not in shipped and not relative.startswith(SEARCH_CACHE):
            yield relative, path.read_bytes()


def write_folder(snapshot: FolderSnapshot, folder: Path, home: Path) -> set[str]:
    """The folder's files under `folder`, its cached features under `home`; returns the latter's paths."""
    for relative, data in snapshot.files:
        _write(folder / relative, data)
    for relative, data in snapshot.features:
        _write(home / relative, data)
    return {relative for relative, _ in snapshot.features}


# ---------------------------------------------------------------- back on the owner's machine

def keep_files(outcome: Outcome) -> None:
    """Write the task's files into this home: new features join the cache (an existing file is
    kept: the same key holds the same rows), a bundle and its chart land where a local build
    writes them. Its jobs/ folder (its job's own files) stays behind: the caller rewrites what it needs."""
    home = paths.home()
    for relative, data in outcome.files:
        target = home / relative
        if relative.startswith("jobs") or (relative.startswith("features") and target.exists()):
            continue
        _write(target, data)


def moved(text: str, old: Path | str, new: Path | str) -> str:
    """A path written on the task's machine, as the same file's path here."""
    old = str(old)
    return str(new) + text[len(old):] if text.startswith(old) else text


def current_name(store: Store, snapshot: ProjectSnapshot) -> str:
    """The project's name now: it may have been renamed while the task ran (found by its id)."""
    name = next((p.name for p in store.list_projects() if p.id == snapshot.project_id), None)
    if name is None:
        raise StoreError(f"the project '{snapshot.name}' was deleted while the cluster worked on it")
    return name


def _files_here(summary, origin: str, base: Path | str):
    """A BuildSummary with the files the task named on its machine (held-out and skipped photos
    under base, its learning curve among this home's exports) as their paths here."""
    from ..engine.models import curve_path

    def here(file: str) -> str:
        return moved(file, origin, base)

    return replace(summary, highest_loss=tuple(replace(h, file=here(h.file)) for h in summary.highest_loss),
                   skipped=tuple(replace(s, file=here(s.file)) for s in summary.skipped),
                   curve_png=str(curve_path(summary.model_id)) if summary.curve_png else None)


def bring_back_build(store: Store, snapshot: ProjectSnapshot, outcome: Outcome) -> dict:
    """Record a project build's model here, as build_project does locally; returns the summary (to_dict)."""
    from ..engine.models import model_path
    from ..flows.build import BuildSummary

    summary = BuildSummary.from_dict(outcome.result)
    ids = dict(outcome.replica_ids)
    name = current_name(store, snapshot)
    keep_files(outcome)
    summary = _files_here(summary, outcome.origin, store.blob_dir)
    held_out = tuple(replace(h, image_id=ids.get(h.image_id)) for h in summary.highest_loss)
    path = model_path(summary.model_id)
    store.record_model(name, summary.model_id, path, {**(outcome.model_metrics or {}),
                                                      "highest_loss": [asdict(h) for h in held_out]})
    return replace(summary, path=str(path), project=name, highest_loss=held_out).to_dict()


def bring_back_folder_build(snapshot: FolderSnapshot, outcome: Outcome, out: str | Path | None):
    """A folder build's model registered here (and copied to `out`); returns the BuildSummary."""
    from ..engine.models import copy_out, model_path
    from ..flows.build import BuildSummary

    summary = BuildSummary.from_dict(outcome.result)
    keep_files(outcome)
    if out is not None:
        copy_out(summary.model_id, out)
    return replace(_files_here(summary, outcome.origin, snapshot.root), path=str(out or model_path(summary.model_id)))


def bring_back_search(store: Store, snapshot: ProjectSnapshot, outcome: Outcome) -> dict:
    """Add the photos a search found to the project here, in the order it found them; returns
    its summary (to_dict) with this store's ids and counts."""
    from ..flows.collect import SearchSummary

    ids = dict(outcome.replica_ids)
    name = current_name(store, snapshot)
    for image in outcome.new_images:
        try:
            record, _ = store.add_image(name, image.category, image.data, image.provenance)
        except StoreError:
            continue  # its category was removed meanwhile, as a local search would skip it
        ids[image.image_id] = record.id
    summary = SearchSummary.from_dict(outcome.result)
    categories = tuple(replace(c, added=tuple(ids[i] for i in c.added if i in ids),
                               duplicates=tuple(replace(d, image_id=ids.get(d.image_id, d.image_id))
                                                for d in c.duplicates))
                       for c in summary.categories)
    return replace(summary, project=name, categories=categories, counts=store.counts(name)).to_dict()


def bring_back_ranking(outcome: Outcome, ranking_file: str, owner_file: Path) -> None:
    """The ranking file the task wrote (its path there), with this store's image ids, written at owner_file."""
    from ..flows.review import ranking_from_dict

    keep_files(outcome)  # the features it computed
    ids = dict(outcome.replica_ids)
    written = dict(outcome.files)[str(Path(ranking_file).relative_to(outcome.home))]
    ranked = ranking_from_dict(json.loads(written))
    table = {name: [replace(s, image_id=ids[s.image_id]).to_dict() for s in suspects]
             for name, suspects in ranked.items()}
    _write(owner_file, json.dumps(table).encode())

