"""Projects, categories, images, model versions and build jobs: SQLite plus content-addressed files.

Layout under the root (default paths.home()):
    store.sqlite3                    rows (WAL mode, so the app and a worker process can share it)
    blobs/<hash[:2]>/<hash>.jpg      each normalized image once, named by the sha256 of its bytes

Every write runs in one `BEGIN IMMEDIATE` transaction, so two processes never interleave a
read-check-write. A blob file is written (temp file + os.replace) before its row is inserted,
and deleted only while holding the write lock after checking nothing references it, so a row
never points at a missing file. A process killed between writing a file and committing its row
leaves the file without a row (or a dot-named temp file); every open deletes those (prune_blobs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .. import paths

DB_NAME = "store.sqlite3"
BUSY_TIMEOUT_S = 30.0  # a worker's write is milliseconds; waiting this long means something is stuck
SOURCES = ("web_search", "upload", "url_list", "folder", "sample")
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
MAX_NAME_LENGTH = 100  # names become folder names and labels on screen
STALE_JOB_ERROR = "the build stopped unexpectedly"
TEMP_PREFIX = ".tmp-"  # dot-prefixed: invisible to scan_folder and to "*.jpg" globs


class StoreError(ValueError):
    """A request the store cannot carry out (unknown name, invalid or duplicate name); says why."""



def content_hash(data: bytes) -> str:
    """Hex sha256 of raw bytes: the identity of an image everywhere in NanoStream (its file name here)."""
    return hashlib.sha256(data).hexdigest()

@dataclass(frozen=True)
class Project:
    id: int
    name: str
    created_at: float
    categories: tuple[str, ...] = ()  # in the order they were added


@dataclass(frozen=True)
class Category:
    id: int
    project: str
    name: str
    search_terms: str = ""  # empty: search the web for the category name itself
    created_at: float = 0.0


@dataclass(frozen=True)
class Provenance:
    """Where an image came from, kept so a user (or a licence question) can trace it."""
    source: str                   # one of SOURCES
    query: str = ""               # the web search that found it, if any
    page_url: str = ""            # the page that showed it, if known
    image_url: str = ""           # the URL it was requested from
    final_url: str = ""           # where that URL ended up after redirects
    license: str = ""             # empty: unknown, which is the common case for web images
    original_name: str = ""       # file name (or path inside an archive) as the user had it
    width: int = 0                # pixels of the stored image; 0: unknown
    height: int = 0
    created_at: float = field(default_factory=time.time)  # when it was obtained


@dataclass(frozen=True)
class ImageRecord:
    id: int
    project: str
    category: str
    content_hash: str
    provenance: Provenance
    added_at: float


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    project: str | None           # None: trained from a folder, or its project was deleted
    bundle_path: str
    metrics: dict
    created_at: float
    published: bool = False       # private until the user chooses to share it


@dataclass(frozen=True)
class Job:
    id: str
    project: str | None
    kind: str
    params: dict
    status: str                   # one of JOB_STATUSES
    progress: float = 0.0         # 0..1
    stage: str = ""
    message: str = ""
    result: dict | None = None    # set by the worker when the job is done
    error: str = ""
    cancel_requested: bool = False
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0       # the worker's heartbeat; a stale one means the worker died


def clean_name(name: str, what: str = "name") -> str:
    """Strip a project or category name and check it can become a folder name; StoreError if not."""
    if not isinstance(name, str):
        raise StoreError(f"{what} must be text, got {type(name).__name__}")
    name = name.strip()
    if not name:
        raise StoreError(f"{what} is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise StoreError(f"{what} '{name[:20]}...' is longer than {MAX_NAME_LENGTH} characters")
    if "/" in name or "\\" in name:
        raise StoreError(f"{what} '{name}' contains a slash; names become folder names")
    if name.startswith("."):
        raise StoreError(f"{what} '{name}' starts with '.'; such folders are hidden")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise StoreError(f"{what} '{name!r}' contains control characters")
    return name


def _key(name: str) -> str:
    return name.casefold()  # names compare case-insensitively: 'Cats' and 'cats' are one folder on macOS


def _to_json(value) -> str:
    def fallback(obj):
        if hasattr(obj, "tolist"):  # numpy scalars and arrays in metrics
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")
    return json.dumps(value, default=fallback, sort_keys=True)


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS projects (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        name_key TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS categories (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        name_key TEXT NOT NULL,
        search_terms TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        UNIQUE (project_id, name_key))""",
    """CREATE TABLE IF NOT EXISTS images (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        category_id INTEGER NOT NULL REFERENCES categories(id) ON DELETE CASCADE,
        content_hash TEXT NOT NULL,
        source TEXT NOT NULL,
        query TEXT NOT NULL DEFAULT '',
        page_url TEXT NOT NULL DEFAULT '',
        image_url TEXT NOT NULL DEFAULT '',
        final_url TEXT NOT NULL DEFAULT '',
        license TEXT NOT NULL DEFAULT '',
        original_name TEXT NOT NULL DEFAULT '',
        width INTEGER NOT NULL DEFAULT 0,
        height INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        added_at REAL NOT NULL,
        UNIQUE (project_id, content_hash))""",
    "CREATE INDEX IF NOT EXISTS images_by_hash ON images(content_hash)",
    "CREATE INDEX IF NOT EXISTS images_by_category ON images(category_id)",
    """CREATE TABLE IF NOT EXISTS models (
        model_id TEXT PRIMARY KEY,
        project_id INTEGER REFERENCES projects(id) ON DELETE SET NULL,
        bundle_path TEXT NOT NULL,
        metrics TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        published INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        project_id INTEGER REFERENCES projects(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        params TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL,
        progress REAL NOT NULL DEFAULT 0,
        stage TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        result TEXT,
        error TEXT NOT NULL DEFAULT '',
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status)",
)

_IMAGE_SELECT = """SELECT i.*, p.name AS project_name, c.name AS category_name
    FROM images i JOIN projects p ON p.id = i.project_id JOIN categories c ON c.id = i.category_id"""
_MODEL_SELECT = "SELECT m.*, p.name AS project_name FROM models m LEFT JOIN projects p ON p.id = m.project_id"
_JOB_SELECT = "SELECT j.*, p.name AS project_name FROM jobs j LEFT JOIN projects p ON p.id = j.project_id"


class Store:
    """One SQLite connection (guarded by a lock, so threads may share the instance) and a blob folder.

    Separate processes each open their own Store on the same root; SQLite's locking and the
    busy timeout make their writes take turns.
    """

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else paths.home()
        self.root.mkdir(parents=True, exist_ok=True)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.root / DB_NAME, timeout=BUSY_TIMEOUT_S,
                                     isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        self._conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash loses at most the last commit
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
        self.prune_blobs()  # the files a killed add_image left without their row

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions ---------------------------------------------------------------------------

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction that takes the database's write lock up front (no upgrade deadlocks)."""
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read transaction: one consistent snapshot across several queries."""
        return self._transaction("BEGIN")

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute(begin)
            try:
                with self._conn:  # commits on success, rolls back on any exception
                    yield self._conn
            finally:
                if self._conn.in_transaction:  # a failed COMMIT leaves it open; never leak it to the next call
                    self._conn.rollback()

    # -- lookups --------------------------------------------------------------------------------

    @staticmethod
    def _project_row(conn, name: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM projects WHERE name_key = ?", (_key(str(name).strip()),)).fetchone()
        if row is None:
            raise StoreError(f"no project named '{name}'")
        return row

    @staticmethod
    def _category_row(conn, project_id: int, name: str, project: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM categories WHERE project_id = ? AND name_key = ?",
                           (project_id, _key(str(name).strip()))).fetchone()
        if row is None:
            raise StoreError(f"no category named '{name}' in project '{project}'")
        return row

    @staticmethod
    def _project_from_row(conn, row) -> Project:
        names = conn.execute("SELECT name FROM categories WHERE project_id = ? ORDER BY id", (row["id"],))
        return Project(row["id"], row["name"], row["created_at"], tuple(r["name"] for r in names))

    # -- projects -------------------------------------------------------------------------------

    def create_project(self, name: str, categories: Sequence[str] = ()) -> Project:
        name = clean_name(name, "project name")
        cleaned = [clean_name(c, "category name") for c in categories]
        keys = [_key(c) for c in cleaned]
        repeated = sorted({c for c, k in zip(cleaned, keys) if keys.count(k) > 1})
        if repeated:
            raise StoreError(f"category names repeat: {', '.join(repeated)}")
        now = time.time()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM projects WHERE name_key = ?", (_key(name),)).fetchone():
                raise StoreError(f"a project named '{name}' already exists")
            project_id = conn.execute("INSERT INTO projects (name, name_key, created_at) VALUES (?, ?, ?)",
                                      (name, _key(name), now)).lastrowid
            for category in cleaned:
                conn.execute("INSERT INTO categories (project_id, name, name_key, created_at) VALUES (?, ?, ?, ?)",
                             (project_id, category, _key(category), now))
        return Project(project_id, name, now, tuple(cleaned))

    def list_projects(self) -> list[Project]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM projects ORDER BY name_key").fetchall()
            return [self._project_from_row(conn, row) for row in rows]

    def get_project(self, name: str) -> Project:
        with self._read() as conn:
            return self._project_from_row(conn, self._project_row(conn, name))

    def rename_project(self, old: str, new: str) -> Project:
        new = clean_name(new, "project name")
        with self._write() as conn:
            row = self._project_row(conn, old)
            clash = conn.execute("SELECT 1 FROM projects WHERE name_key = ? AND id != ?", (_key(new), row["id"]))
            if clash.fetchone():
                raise StoreError(f"a project named '{new}' already exists")
            conn.execute("UPDATE projects SET name = ?, name_key = ? WHERE id = ?", (new, _key(new), row["id"]))
            return self._project_from_row(conn, conn.execute("SELECT * FROM projects WHERE id = ?", (row["id"],)).fetchone())

    def delete_project(self, name: str) -> int:
        """Remove the project, its categories, images and jobs; its models stay, detached.
        Returns how many blob files were deleted (those no other project uses)."""
        with self._write() as conn:
            row = self._project_row(conn, name)
            hashes = [r[0] for r in conn.execute("SELECT content_hash FROM images WHERE project_id = ?", (row["id"],))]
            conn.execute("DELETE FROM projects WHERE id = ?", (row["id"],))
        return self._delete_unreferenced(hashes)

    # -- categories -----------------------------------------------------------------------------

    def list_categories(self, project: str) -> list[Category]:
        with self._read() as conn:
            prow = self._project_row(conn, project)
            rows = conn.execute("SELECT * FROM categories WHERE project_id = ? ORDER BY id", (prow["id"],))
            return [Category(r["id"], prow["name"], r["name"], r["search_terms"], r["created_at"]) for r in rows]

    def get_category(self, project: str, name: str) -> Category:
        with self._read() as conn:
            prow = self._project_row(conn, project)
            r = self._category_row(conn, prow["id"], name, prow["name"])
            return Category(r["id"], prow["name"], r["name"], r["search_terms"], r["created_at"])

    def add_category(self, project: str, name: str, search_terms: str = "") -> Category:
        name = clean_name(name, "category name")
        now = time.time()
        with self._write() as conn:
            prow = self._project_row(conn, project)
            clash = conn.execute("SELECT name FROM categories WHERE project_id = ? AND name_key = ?",
                                 (prow["id"], _key(name))).fetchone()
            if clash:
                raise StoreError(f"project '{prow['name']}' already has a category '{clash['name']}'")
            category_id = conn.execute(
                "INSERT INTO categories (project_id, name, name_key, search_terms, created_at) VALUES (?, ?, ?, ?, ?)",
                (prow["id"], name, _key(name), search_terms.strip(), now)).lastrowid
        return Category(category_id, prow["name"], name, search_terms.strip(), now)

    def ensure_category(self, project: str, name: str) -> Category:
        """The category matching name case-insensitively, created if missing (for folder and zip layouts)."""
        name = clean_name(name, "category name")
        try:
            return self.get_category(project, name)
        except StoreError:
            pass
        try:
            return self.add_category(project, name)
        except StoreError:  # another process created it between our two calls
            return self.get_category(project, name)

    def rename_category(self, project: str, old: str, new: str) -> Category:
        new = clean_name(new, "category name")
        with self._write() as conn:
            prow = self._project_row(conn, project)
            row = self._category_row(conn, prow["id"], old, prow["name"])
            clash = conn.execute("SELECT name FROM categories WHERE project_id = ? AND name_key = ? AND id != ?",
                                 (prow["id"], _key(new), row["id"])).fetchone()
            if clash:
                raise StoreError(f"project '{prow['name']}' already has a category '{clash['name']}'")
            conn.execute("UPDATE categories SET name = ?, name_key = ? WHERE id = ?", (new, _key(new), row["id"]))
        return Category(row["id"], prow["name"], new, row["search_terms"], row["created_at"])

    def set_search_terms(self, project: str, category: str, search_terms: str) -> Category:
        with self._write() as conn:
            prow = self._project_row(conn, project)
            row = self._category_row(conn, prow["id"], category, prow["name"])
            conn.execute("UPDATE categories SET search_terms = ? WHERE id = ?", (search_terms.strip(), row["id"]))
        return Category(row["id"], prow["name"], row["name"], search_terms.strip(), row["created_at"])

    def remove_category(self, project: str, name: str) -> int:
        """Remove a category and its images. Returns how many images were removed."""
        with self._write() as conn:
            prow = self._project_row(conn, project)
            row = self._category_row(conn, prow["id"], name, prow["name"])
            hashes = [r[0] for r in conn.execute("SELECT content_hash FROM images WHERE category_id = ?", (row["id"],))]
            conn.execute("DELETE FROM categories WHERE id = ?", (row["id"],))
        self._delete_unreferenced(hashes)
        return len(hashes)

    # -- blobs ----------------------------------------------------------------------------------

    def blob_path(self, content_hash: str) -> Path:
        return self.blob_dir / content_hash[:2] / f"{content_hash}.jpg"

    def image_path(self, record: ImageRecord) -> Path:
        return self.blob_path(record.content_hash)

    def _write_blob(self, digest: str, data: bytes) -> None:
        """Write data to its final name atomically: a dot-named temp file in the same folder, then rename."""
        final = self.blob_path(digest)
        if final.exists():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.parent / f"{TEMP_PREFIX}{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before any row can point at them
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _delete_unreferenced(self, hashes: Sequence[str]) -> int:
        """Delete the blobs among hashes that no image row uses. Runs under the write lock, so a
        concurrent add_image either sees the file gone (and rewrites it) or has already committed its row."""
        removed = 0
        with self._write() as conn:
            for digest in sorted(set(hashes)):
                if conn.execute("SELECT 1 FROM images WHERE content_hash = ? LIMIT 1", (digest,)).fetchone():
                    continue
                path = self.blob_path(digest)
                if path.exists():
                    path.unlink()
                    removed += 1
        return removed

    def prune_blobs(self) -> int:
        """Delete the blob files no row uses and every temp file: what a process killed inside
        add_image leaves. Safe beside other processes: add_image holds the write lock from writing
        its file to committing its row, so while this holds it no file belongs to a write in
        progress. Returns how many files were deleted."""
        removed = 0
        with self._write() as conn:
            used = {r[0] for r in conn.execute("SELECT DISTINCT content_hash FROM images")}
            for path in self.blob_dir.glob("*/*"):
                if path.name.startswith(TEMP_PREFIX) or (path.suffix == ".jpg" and path.stem not in used):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    # -- images ---------------------------------------------------------------------------------

    @staticmethod
    def _image_from_row(row) -> ImageRecord:
        provenance = Provenance(row["source"], row["query"], row["page_url"], row["image_url"], row["final_url"],
                                row["license"], row["original_name"], row["width"], row["height"], row["created_at"])
        return ImageRecord(row["id"], row["project_name"], row["category_name"], row["content_hash"],
                           provenance, row["added_at"])

    def add_image(self, project: str, category: str, data: bytes,
                  provenance: Provenance) -> tuple[ImageRecord, bool]:
        """Store normalized JPEG bytes (images.normalize_image) in a category.

        Returns (record, added); the same content already in the project is not added again,
        and the record returned is the existing one (possibly in another category).
        """
        if provenance.source not in SOURCES:
            raise StoreError(f"unknown image source '{provenance.source}'; expected one of {', '.join(SOURCES)}")
        if not data.startswith(b"\xff\xd8"):
            raise StoreError("image bytes are not a JPEG; pass them through images.normalize_image first")
        digest = content_hash(data)
        with self._write() as conn:
            prow = self._project_row(conn, project)
            crow = self._category_row(conn, prow["id"], category, prow["name"])
            existing = conn.execute(f"{_IMAGE_SELECT} WHERE i.project_id = ? AND i.content_hash = ?",
                                    (prow["id"], digest)).fetchone()
            if existing:
                return self._image_from_row(existing), False
            self._write_blob(digest, data)  # the file exists before the row that points at it
            p = provenance
            image_id = conn.execute(
                """INSERT INTO images (project_id, category_id, content_hash, source, query, page_url, image_url,
                   final_url, license, original_name, width, height, created_at, added_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (prow["id"], crow["id"], digest, p.source, p.query, p.page_url, p.image_url, p.final_url,
                 p.license, p.original_name, int(p.width), int(p.height), float(p.created_at), time.time())).lastrowid
            row = conn.execute(f"{_IMAGE_SELECT} WHERE i.id = ?", (image_id,)).fetchone()
            return self._image_from_row(row), True

    def get_image(self, project: str, image_id: int) -> ImageRecord:
        with self._read() as conn:
            prow = self._project_row(conn, project)
            row = conn.execute(f"{_IMAGE_SELECT} WHERE i.project_id = ? AND i.id = ?", (prow["id"], image_id)).fetchone()
            if row is None:
                raise StoreError(f"no image {image_id} in project '{prow['name']}'")
            return self._image_from_row(row)

    def list_images(self, project: str, category: str | None = None) -> list[ImageRecord]:
        with self._read() as conn:
            prow = self._project_row(conn, project)
            if category is None:
                rows = conn.execute(f"{_IMAGE_SELECT} WHERE i.project_id = ? ORDER BY c.id, i.id", (prow["id"],))
            else:
                crow = self._category_row(conn, prow["id"], category, prow["name"])
                rows = conn.execute(f"{_IMAGE_SELECT} WHERE i.category_id = ? ORDER BY i.id", (crow["id"],))
            return [self._image_from_row(r) for r in rows]

    def delete_images(self, project: str, ids: Sequence[int]) -> int:
        """Delete images by id (ids from other projects are ignored). Returns how many were deleted."""
        ids = [int(i) for i in ids]
        with self._write() as conn:
            prow = self._project_row(conn, project)
            hashes = []
            for image_id in ids:
                row = conn.execute("SELECT content_hash FROM images WHERE id = ? AND project_id = ?",
                                   (image_id, prow["id"])).fetchone()
                if row:
                    hashes.append(row[0])
                    conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
        self._delete_unreferenced(hashes)
        return len(hashes)

    def move_images(self, project: str, ids: Sequence[int], category: str) -> int:
        """Move images to another category of the same project. Returns how many were moved."""
        ids = [int(i) for i in ids]
        with self._write() as conn:
            prow = self._project_row(conn, project)
            crow = self._category_row(conn, prow["id"], category, prow["name"])
            moved = 0
            for image_id in ids:
                moved += conn.execute("UPDATE images SET category_id = ? WHERE id = ? AND project_id = ?",
                                      (crow["id"], image_id, prow["id"])).rowcount
        return moved

    def counts(self, project: str) -> dict[str, int]:
        """Images per category, every category included (0 when empty), in category order."""
        with self._read() as conn:
            prow = self._project_row(conn, project)
            rows = conn.execute("""SELECT c.name, COUNT(i.id) FROM categories c
                                   LEFT JOIN images i ON i.category_id = c.id
                                   WHERE c.project_id = ? GROUP BY c.id ORDER BY c.id""", (prow["id"],))
            return {name: n for name, n in rows}

    def export_dataset(self, project: str, directory: str | Path) -> int:
        """Copy the project to DIR/<category>/<hash>.jpg (the layout data.scan_folder reads).
        Returns how many images were written."""
        directory = Path(directory)
        for category in self.list_categories(project):
            (directory / category.name).mkdir(parents=True, exist_ok=True)
        records = self.list_images(project)
        for record in records:
            shutil.copyfile(self.image_path(record), directory / record.category / f"{record.content_hash}.jpg")
        return len(records)

    # -- model versions -------------------------------------------------------------------------

    @staticmethod
    def _model_from_row(row) -> ModelRecord:
        return ModelRecord(row["model_id"], row["project_name"], row["bundle_path"], json.loads(row["metrics"]),
                           row["created_at"], bool(row["published"]))

    def record_model(self, project: str | None, model_id: str, bundle_path: str | Path, metrics: dict,
                     created_at: float | None = None) -> ModelRecord:
        created_at = time.time() if created_at is None else float(created_at)
        with self._write() as conn:
            project_id = None if project is None else self._project_row(conn, project)["id"]
            if conn.execute("SELECT 1 FROM models WHERE model_id = ?", (model_id,)).fetchone():
                raise StoreError(f"a model '{model_id}' is already recorded")
            conn.execute("INSERT INTO models (model_id, project_id, bundle_path, metrics, created_at) VALUES (?, ?, ?, ?, ?)",
                         (model_id, project_id, str(bundle_path), _to_json(metrics), created_at))
            return self._model_from_row(conn.execute(f"{_MODEL_SELECT} WHERE m.model_id = ?", (model_id,)).fetchone())

    def get_model(self, model_id: str) -> ModelRecord:
        with self._read() as conn:
            row = conn.execute(f"{_MODEL_SELECT} WHERE m.model_id = ?", (model_id,)).fetchone()
            if row is None:
                raise StoreError(f"no model '{model_id}'")
            return self._model_from_row(row)

    def list_models(self, project: str | None = None, published_only: bool = False) -> list[ModelRecord]:
        """Models newest first; all of them when project is None."""
        with self._read() as conn:
            where, args = [], []
            if project is not None:
                where.append("m.project_id = ?")
                args.append(self._project_row(conn, project)["id"])
            if published_only:
                where.append("m.published = 1")
            clause = f" WHERE {' AND '.join(where)}" if where else ""
            rows = conn.execute(f"{_MODEL_SELECT}{clause} ORDER BY m.created_at DESC, m.rowid DESC", args)
            return [self._model_from_row(r) for r in rows]

    def published_models(self) -> list[ModelRecord]:
        return self.list_models(published_only=True)

    def set_published(self, model_id: str, published: bool) -> ModelRecord:
        with self._write() as conn:
            if conn.execute("UPDATE models SET published = ? WHERE model_id = ?",
                            (int(bool(published)), model_id)).rowcount == 0:
                raise StoreError(f"no model '{model_id}'")
            return self._model_from_row(conn.execute(f"{_MODEL_SELECT} WHERE m.model_id = ?", (model_id,)).fetchone())

    def delete_model(self, model_id: str) -> None:
        """Forget a model version (its bundle files are the caller's to remove)."""
        with self._write() as conn:
            if conn.execute("DELETE FROM models WHERE model_id = ?", (model_id,)).rowcount == 0:
                raise StoreError(f"no model '{model_id}'")

    # -- jobs -----------------------------------------------------------------------------------

    @staticmethod
    def _job_from_row(row) -> Job:
        return Job(row["id"], row["project_name"], row["kind"], json.loads(row["params"]), row["status"],
                   row["progress"], row["stage"], row["message"],
                   None if row["result"] is None else json.loads(row["result"]), row["error"],
                   bool(row["cancel_requested"]), row["created_at"], row["started_at"], row["finished_at"],
                   row["updated_at"])

    @staticmethod
    def _job_row(conn, job_id: str) -> sqlite3.Row:
        row = conn.execute(f"{_JOB_SELECT} WHERE j.id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job '{job_id}'")
        return row

    def create_job(self, project: str | None, kind: str, params: dict | None = None) -> Job:
        job_id, now = uuid.uuid4().hex, time.time()
        with self._write() as conn:
            project_id = None if project is None else self._project_row(conn, project)["id"]
            conn.execute("""INSERT INTO jobs (id, project_id, kind, params, status, created_at, updated_at)
                            VALUES (?, ?, ?, ?, 'queued', ?, ?)""",
                         (job_id, project_id, kind, _to_json(params or {}), now, now))
            return self._job_from_row(self._job_row(conn, job_id))

    def get_job(self, job_id: str) -> Job:
        with self._read() as conn:
            return self._job_from_row(self._job_row(conn, job_id))

    def list_jobs(self, project: str | None = None) -> list[Job]:
        """Jobs newest first; all of them when project is None."""
        with self._read() as conn:
            if project is None:
                rows = conn.execute(f"{_JOB_SELECT} ORDER BY j.created_at DESC, j.rowid DESC")
            else:
                project_id = self._project_row(conn, project)["id"]
                rows = conn.execute(f"{_JOB_SELECT} WHERE j.project_id = ? ORDER BY j.created_at DESC, j.rowid DESC",
                                    (project_id,))
            return [self._job_from_row(r) for r in rows]

    def update_job(self, job_id: str, *, status: str | None = None, progress: float | None = None,
                   stage: str | None = None, message: str | None = None, result: dict | None = None,
                   error: str | None = None) -> Job:
        """Record a worker's progress; every call also refreshes the heartbeat (updated_at).
        A finished job (done, failed, cancelled) stays finished: updating it raises StoreError."""
        if status is not None and status not in JOB_STATUSES:
            raise StoreError(f"unknown job status '{status}'; expected one of {', '.join(JOB_STATUSES)}")
        now = time.time()
        with self._write() as conn:
            row = self._job_row(conn, job_id)
            if row["status"] in FINISHED:
                raise StoreError(f"job '{job_id}' has already finished ({row['status']})")
            changes: dict = {"updated_at": now}
            if status is not None:
                changes["status"] = status
                if status == "running" and row["started_at"] is None:
                    changes["started_at"] = now
                if status in FINISHED:
                    changes["finished_at"] = now
            if progress is not None:
                changes["progress"] = min(1.0, max(0.0, float(progress)))  # a bar, not a measurement
            if stage is not None:
                changes["stage"] = stage
            if message is not None:
                changes["message"] = message
            if result is not None:
                changes["result"] = _to_json(result)
            if error is not None:
                changes["error"] = error
            assignments = ", ".join(f"{column} = ?" for column in changes)
            conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*changes.values(), job_id))
            return self._job_from_row(self._job_row(conn, job_id))

    def request_cancel(self, job_id: str) -> Job:
        """Ask a job to stop: a queued job is cancelled at once, a running one is flagged for its
        worker (which sees cancel_requested() and sets status 'cancelled'); a finished one is unchanged."""
        now = time.time()
        with self._write() as conn:
            row = self._job_row(conn, job_id)
            if row["status"] == "queued":
                conn.execute("""UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ?,
                                updated_at = ? WHERE id = ?""", (now, now, job_id))
            elif row["status"] == "running":
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._job_from_row(self._job_row(conn, job_id))

    def cancel_requested(self, job_id: str) -> bool:
        """For a worker's should_stop: True once the user asked this job to stop."""
        with self._read() as conn:
            row = self._job_row(conn, job_id)
            return bool(row["cancel_requested"]) or row["status"] == "cancelled"

    def reap_stale_jobs(self, max_age_seconds: float, now: float | None = None) -> list[Job]:
        """Mark running jobs whose heartbeat is older than max_age_seconds as failed: their worker
        died (killed, crashed, machine restarted). Returns the jobs marked."""
        now = time.time() if now is None else now
        with self._write() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM jobs WHERE status = 'running' AND updated_at < ?",
                                              (now - max_age_seconds,))]
            for job_id in ids:
                conn.execute("""UPDATE jobs SET status = 'failed', error = ?, message = ?, finished_at = ?,
                                updated_at = ? WHERE id = ?""", (STALE_JOB_ERROR, STALE_JOB_ERROR, now, now, job_id))
            return [self._job_from_row(self._job_row(conn, job_id)) for job_id in ids]
