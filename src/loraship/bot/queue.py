"""A durable job queue in SQLite (WAL): what the bot accepted survives crashes and restarts.

States: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``skipped``. Each job has a unique
key (repo, ref, new SHA, rule): enqueueing the same key again returns the existing job, so a
delivery the Hub retries makes no second job. On start, jobs left ``running`` by a crash go back to
``queued``; the pipeline's own provenance check keeps a job that had already published from
publishing twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from loraship.errors import OutputError

State = Literal["queued", "running", "succeeded", "failed", "skipped"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    repo TEXT NOT NULL,
    ref TEXT NOT NULL,
    sha TEXT NOT NULL,
    rule INTEGER NOT NULL,
    job TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    result TEXT,
    error TEXT,
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, next_at, created_at);
"""


@dataclass(frozen=True)
class Job:
    """A queued merge, as stored."""

    id: str
    key: str
    repo: str
    ref: str
    sha: str
    rule: int
    job: dict[str, Any]
    state: State
    attempts: int
    next_at: float
    created_at: float
    updated_at: float
    result: dict[str, Any] | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("key")
        return data


class JobQueue:
    """The queue, in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise OutputError(
                f"Cannot open the bot's job queue `{path}` (the `state` of bot.yaml): {reason}.",
                fix="Make its folder writable by the user the bot runs as (uid 1001 in the loraship-bot image: "
                "`chown 1001` the host folder mounted at /data), or set `state` to a file in a writable folder.",
            ) from e
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "reported" not in columns:  # a queue written by loraship 0.1
                self._db.execute("ALTER TABLE jobs ADD COLUMN reported INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def enqueue(
        self, key: str, *, repo: str, ref: str, sha: str, rule: int, job: Mapping[str, Any]
    ) -> tuple[str, bool]:
        """Add a job unless one with ``key`` exists; returns its id and whether it is new."""
        now = time.time()
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO jobs (id, key, repo, ref, sha, rule, job, state, next_at, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (uuid.uuid4().hex[:16], key, repo, ref, sha, rule, json.dumps(dict(job)), now, now, now),
            )
            created = cursor.rowcount == 1
            (job_id,) = self._db.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()
        return str(job_id), created

    def claim(self) -> Job | None:
        """The oldest ready job, now ``running`` (one more attempt); None when nothing is ready."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT id FROM jobs WHERE state = 'queued' AND next_at <= ? ORDER BY created_at LIMIT 1", (now,)
                ).fetchone()
                if row is None:
                    self._db.execute("COMMIT")
                    return None
                self._db.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ? WHERE id = ?",
                    (now, row["id"]),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        job = self.get(row["id"])
        assert job is not None
        return job

    def finish(
        self, job_id: str, state: State, *, result: Mapping[str, Any] | None = None, error: str | None = None
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, result = ?, error = ?, updated_at = ? WHERE id = ?",
                (state, json.dumps(dict(result)) if result is not None else None, error, time.time(), job_id),
            )

    def retry_later(self, job_id: str, delay: float, error: str) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = 'queued', next_at = ?, error = ?, updated_at = ? WHERE id = ?",
                (now + delay, error, now, job_id),
            )

    def reported(self, job_id: str) -> bool:
        """Whether the job's outcome was already reported on the adapter repo."""
        with self._lock:
            row = self._db.execute("SELECT reported FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["reported"])

    def mark_reported(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET reported = 1, updated_at = ? WHERE id = ?", (time.time(), job_id))

    def recover(self) -> int:
        """Jobs a crash left ``running`` go back to ``queued``; returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET state = 'queued', updated_at = ? WHERE state = 'running'", (time.time(),)
            )
            return cursor.rowcount

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def list(self, limit: int = 200) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [_job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {row["state"]: row["n"] for row in rows}


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], key=row["key"], repo=row["repo"], ref=row["ref"], sha=row["sha"], rule=row["rule"],
        job=json.loads(row["job"]), state=row["state"], attempts=row["attempts"], next_at=row["next_at"],
        created_at=row["created_at"], updated_at=row["updated_at"],
        result=json.loads(row["result"]) if row["result"] else None, error=row["error"],
    )  # fmt: skip
