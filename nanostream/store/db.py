"""Projects, categories and images: the Store, SQLite rows plus content-addressed files.

Layout under the root (default paths.home()):
    store.sqlite3                    rows (database.py: schema, connection, transactions)
    blobs/<hash[:2]>/<hash>.jpg      each normalized image once, named by the sha256 of its bytes

The Store is the one object callers open: projects, categories and images live here, model
versions and build jobs in models_table.py and jobs_table.py, whose methods it inherits.
A blob file is written (temp file + os.replace) before its row is inserted, and deleted only
while holding the write lock after checking nothing references it, so a row never points at a
missing file. A process killed between writing a file and committing its row leaves the file
without a row (or a dot-named temp file); every open deletes those (prune_blobs).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Sequence

from .. import paths
from .jobs_table import JobsTable
from .licenses import attribution_markdown, credit
from .models_table import ModelsTable
from .records import (SOURCES, Category, ImageRecord, Project, Provenance, StoreError, clean_name, content_hash,
                      name_key)

TEMP_PREFIX = ".tmp-"  # dot-prefixed: invisible to scan_folder and to "*.jpg" globs
ATTRIBUTION_FILE = "ATTRIBUTION.md"  # beside an export's category folders: a file, so scan_folder skips it

_IMAGE_SELECT = """SELECT i.*, p.name AS project_name, c.name AS category_name
    FROM images i JOIN projects p ON p.id = i.project_id JOIN categories c ON c.id = i.category_id"""


class Store(JobsTable, ModelsTable):
    """The store under one root: its SQLite connection (threads may share the instance) and blob folder."""

    def __init__(self, root: Path | str | None = None):
        super().__init__(Path(root) if root is not None else paths.home())
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(exist_ok=True)
        self.prune_blobs()  # the files a killed add_image left without their row

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lookups --------------------------------------------------------------------------------

    @staticmethod
    def _category_row(conn, project_id: int, name: str, project: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM categories WHERE project_id = ? AND name_key = ?",
                           (project_id, name_key(str(name).strip()))).fetchone()
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
        keys = [name_key(c) for c in cleaned]
        repeated = sorted({c for c, k in zip(cleaned, keys) if keys.count(k) > 1})
        if repeated:
            raise StoreError(f"category names repeat: {', '.join(repeated)}")
        now = time.time()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM projects WHERE name_key = ?", (name_key(name),)).fetchone():
                raise StoreError(f"a project named '{name}' already exists")
            project_id = conn.execute("INSERT INTO projects (name, name_key, created_at) VALUES (?, ?, ?)",
                                      (name, name_key(name), now)).lastrowid
            for category in cleaned:
                conn.execute("INSERT INTO categories (project_id, name, name_key, created_at) VALUES (?, ?, ?, ?)",
                             (project_id, category, name_key(category), now))
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
            clash = conn.execute("SELECT 1 FROM projects WHERE name_key = ? AND id != ?", (name_key(new), row["id"]))
            if clash.fetchone():
                raise StoreError(f"a project named '{new}' already exists")
            conn.execute("UPDATE projects SET name = ?, name_key = ? WHERE id = ?", (new, name_key(new), row["id"]))
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
                                 (prow["id"], name_key(name))).fetchone()
            if clash:
                raise StoreError(f"project '{prow['name']}' already has a category '{clash['name']}'")
            category_id = conn.execute(
                "INSERT INTO categories (project_id, name, name_key, search_terms, created_at) VALUES (?, ?, ?, ?, ?)",
                (prow["id"], name, name_key(name), search_terms.strip(), now)).lastrowid
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
                                 (prow["id"], name_key(new), row["id"])).fetchone()
            if clash:
                raise StoreError(f"project '{prow['name']}' already has a category '{clash['name']}'")
            conn.execute("UPDATE categories SET name = ?, name_key = ? WHERE id = ?", (new, name_key(new), row["id"]))
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
                                row["license"], row["original_name"], row["width"], row["height"], row["created_at"],
                                row["title"], row["creator"], row["license_url"], bool(row["attribution_required"]),
                                row["provider"])
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
                   final_url, license, original_name, width, height, created_at, added_at, title, creator,
                   license_url, attribution_required, provider)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (prow["id"], crow["id"], digest, p.source, p.query, p.page_url, p.image_url, p.final_url,
                 p.license, p.original_name, int(p.width), int(p.height), float(p.created_at), time.time(),
                 p.title, p.creator, p.license_url, int(bool(p.attribution_required)), p.provider)).lastrowid
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
        """Copy the project to DIR/<category>/<hash>.jpg (the layout data.scan_folder reads), with
        DIR/ATTRIBUTION.md crediting every image (licenses.attribution_markdown). Returns how many
        images were written."""
        directory = Path(directory)
        name = self.get_project(project).name
        for category in self.list_categories(name):
            (directory / category.name).mkdir(parents=True, exist_ok=True)
        records = self.list_images(name)
        for record in records:
            shutil.copyfile(self.image_path(record), directory / record.category / f"{record.content_hash}.jpg")
        credits = (credit(record) for record in records)
        (directory / ATTRIBUTION_FILE).write_text(attribution_markdown(name, credits), encoding="utf-8")
        return len(records)
