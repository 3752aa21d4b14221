"""Build jobs as rows: what the app asks for and a worker process reports back, the store being the truth.

A job moves queued -> running -> done | failed | cancelled and never leaves a finished state.
Each update refreshes its heartbeat (updated_at), so a running job whose worker died is found
by its stale heartbeat and marked failed (reap_stale_jobs).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

from .database import Database, to_json
from .records import FINISHED, JOB_STATUSES, STALE_JOB_ERROR, Job, StoreError

_JOB_SELECT = "SELECT j.*, p.name AS project_name FROM jobs j LEFT JOIN projects p ON p.id = j.project_id"


def _job_from_row(row) -> Job:
    return Job(row["id"], row["project_name"], row["kind"], json.loads(row["params"]), row["status"],
               row["progress"], row["stage"], row["message"],
               None if row["result"] is None else json.loads(row["result"]), row["error"],
               bool(row["cancel_requested"]), row["created_at"], row["started_at"], row["finished_at"],
               row["updated_at"])


def _job_row(conn, job_id: str) -> sqlite3.Row:
    row = conn.execute(f"{_JOB_SELECT} WHERE j.id = ?", (job_id,)).fetchone()
    if row is None:
        raise StoreError(f"no job '{job_id}'")
    return row


class JobsTable(Database):
    """The jobs table's methods of the Store."""

    def create_job(self, project: str | None, kind: str, params: dict | None = None) -> Job:
        job_id, now = uuid.uuid4().hex, time.time()
        with self._write() as conn:
            project_id = None if project is None else self._project_row(conn, project)["id"]
            conn.execute("""INSERT INTO jobs (id, project_id, kind, params, status, created_at, updated_at)
                            VALUES (?, ?, ?, ?, 'queued', ?, ?)""",
                         (job_id, project_id, kind, to_json(params or {}), now, now))
            return _job_from_row(_job_row(conn, job_id))

    def get_job(self, job_id: str) -> Job:
        with self._read() as conn:
            return _job_from_row(_job_row(conn, job_id))

    def list_jobs(self, project: str | None = None) -> list[Job]:
        """Jobs newest first; all of them when project is None."""
        with self._read() as conn:
            if project is None:
                rows = conn.execute(f"{_JOB_SELECT} ORDER BY j.created_at DESC, j.rowid DESC")
            else:
                project_id = self._project_row(conn, project)["id"]
                rows = conn.execute(f"{_JOB_SELECT} WHERE j.project_id = ? ORDER BY j.created_at DESC, j.rowid DESC",
                                    (project_id,))
            return [_job_from_row(r) for r in rows]

    def update_job(self, job_id: str, *, status: str | None = None, progress: float | None = None,
                   stage: str | None = None, message: str | None = None, result: dict | None = None,
                   error: str | None = None) -> Job:
        """Record a worker's progress; every call also refreshes the heartbeat (updated_at).
        A finished job (done, failed, cancelled) stays finished: updating it raises StoreError."""
        if status is not None and status not in JOB_STATUSES:
            raise StoreError(f"unknown job status '{status}'; expected one of {', '.join(JOB_STATUSES)}")
        now = time.time()
        with self._write() as conn:
            row = _job_row(conn, job_id)
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
                changes["result"] = to_json(result)
            if error is not None:
                changes["error"] = error
            assignments = ", ".join(f"{column} = ?" for column in changes)
            conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*changes.values(), job_id))
            return _job_from_row(_job_row(conn, job_id))

    def request_cancel(self, job_id: str) -> Job:
        """Ask a job to stop: a queued job is cancelled at once, a running one is flagged for its
        worker (which sees cancel_requested() and sets status 'cancelled'); a finished one is unchanged."""
        now = time.time()
        with self._write() as conn:
            row = _job_row(conn, job_id)
            if row["status"] == "queued":
                conn.execute("""UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ?,
                                updated_at = ? WHERE id = ?""", (now, now, job_id))
            elif row["status"] == "running":
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return _job_from_row(_job_row(conn, job_id))

    def cancel_requested(self, job_id: str) -> bool:
        """For a worker's should_stop: True once the user asked this job to stop."""
        with self._read() as conn:
            row = _job_row(conn, job_id)
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
            return [_job_from_row(_job_row(conn, job_id)) for job_id in ids]
