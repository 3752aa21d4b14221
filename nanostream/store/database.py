"""The store's SQLite file: its schema, how it is opened, its transactions and the lookups every table needs.

    store.sqlite3    rows (WAL mode, so the app and a worker process can share it)

Every write runs in one `BEGIN IMMEDIATE` transaction, so two processes never interleave a
read-check-write. Database is the base of the tables (jobs_table, models_table) that db.Store
puts together; each table adds its own methods on this one connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator

from .records import StoreError, name_key

DB_NAME = "store.sqlite3"
BUSY_TIMEOUT_S = 30.0  # a worker's write is milliseconds; waiting this long means something is stuck

SCHEMA = (
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
        title TEXT NOT NULL DEFAULT '',
        creator TEXT NOT NULL DEFAULT '',
        license_url TEXT NOT NULL DEFAULT '',
        attribution_required INTEGER NOT NULL DEFAULT 1,
        provider TEXT NOT NULL DEFAULT '',
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

# Columns added since the first stores: (table, column, definition). A store made before them
# gets each column, with its default, the first time a newer NanoStream opens it.
MIGRATIONS = (
    ("images", "title", "TEXT NOT NULL DEFAULT ''"),
    ("images", "creator", "TEXT NOT NULL DEFAULT ''"),
    ("images", "license_url", "TEXT NOT NULL DEFAULT ''"),
    ("images", "attribution_required", "INTEGER NOT NULL DEFAULT 1"),  # unknown: a credit never hurts
    ("images", "provider", "TEXT NOT NULL DEFAULT ''"),
)


def to_json(value) -> str:
    """The text of a JSON column (params, metrics, results)."""
    def fallback(obj):
        if hasattr(obj, "tolist"):  # numpy scalars and arrays in metrics
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")
    return json.dumps(value, default=fallback, sort_keys=True)


class Database:
    """One SQLite connection (guarded by a lock, so threads may share the instance).

    Separate processes each open their own on the same root; SQLite's locking and the busy
    timeout make their writes take turns.
    """

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.root / DB_NAME, timeout=BUSY_TIMEOUT_S,
                                     isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        self._conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash loses at most the last commit
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._write() as conn:
            for statement in SCHEMA:
                conn.execute(statement)
            self._migrate(conn)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Add the MIGRATIONS columns an older store lacks (inside the opening write transaction,
        so two processes opening one old store never both add a column)."""
        for table, column, definition in MIGRATIONS:
            present = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

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
        row = conn.execute("SELECT * FROM projects WHERE name_key = ?", (name_key(str(name).strip()),)).fetchone()
        if row is None:
            raise StoreError(f"no project named '{name}'")
        return row
