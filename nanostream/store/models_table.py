"""Model versions as rows: which bundle file a build made, its metrics, and whether it is published.

The bundle files themselves belong to engine.models; a row only points at one. A model
outlives its project: deleting the project leaves the row with project None.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .database import Database, to_json
from .records import ModelRecord, StoreError

_MODEL_SELECT = "SELECT m.*, p.name AS project_name FROM models m LEFT JOIN projects p ON p.id = m.project_id"


def _model_from_row(row) -> ModelRecord:
    return ModelRecord(row["model_id"], row["project_name"], row["bundle_path"], json.loads(row["metrics"]),
                       row["created_at"], bool(row["published"]))


class ModelsTable(Database):
    """The models table's methods of the Store."""

    def record_model(self, project: str | None, model_id: str, bundle_path: str | Path, metrics: dict,
                     created_at: float | None = None) -> ModelRecord:
        created_at = time.time() if created_at is None else float(created_at)
        with self._write() as conn:
            project_id = None if project is None else self._project_row(conn, project)["id"]
            if conn.execute("SELECT 1 FROM models WHERE model_id = ?", (model_id,)).fetchone():
                raise StoreError(f"a model '{model_id}' is already recorded")
            conn.execute("INSERT INTO models (model_id, project_id, bundle_path, metrics, created_at) VALUES (?, ?, ?, ?, ?)",
                         (model_id, project_id, str(bundle_path), to_json(metrics), created_at))
            return _model_from_row(conn.execute(f"{_MODEL_SELECT} WHERE m.model_id = ?", (model_id,)).fetchone())

    def get_model(self, model_id: str) -> ModelRecord:
        with self._read() as conn:
            row = conn.execute(f"{_MODEL_SELECT} WHERE m.model_id = ?", (model_id,)).fetchone()
            if row is None:
                raise StoreError(f"no model '{model_id}'")
            return _model_from_row(row)

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
            return [_model_from_row(r) for r in rows]

    def published_models(self) -> list[ModelRecord]:
        return self.list_models(published_only=True)

    def set_published(self, model_id: str, published: bool) -> ModelRecord:
        with self._write() as conn:
            if conn.execute("UPDATE models SET published = ? WHERE model_id = ?",
                            (int(bool(published)), model_id)).rowcount == 0:
                raise StoreError(f"no model '{model_id}'")
            return _model_from_row(conn.execute(f"{_MODEL_SELECT} WHERE m.model_id = ?", (model_id,)).fetchone())

    def delete_model(self, model_id: str) -> None:
        """Forget a model version (its bundle files are the caller's to remove)."""
        with self._write() as conn:
            if conn.execute("DELETE FROM models WHERE model_id = ?", (model_id,)).rowcount == 0:
                raise StoreError(f"no model '{model_id}'")
