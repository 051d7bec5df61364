"""The durable job journal (PROTOCOL.md §8): one SQLite file, written before a job is acknowledged.

Only the server's event-loop thread touches it. Every change is its own committed transaction with
``synchronous=FULL``, so a SIGKILL at any instant leaves the last acknowledged state on disk.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from retalk_server.spec import JobSpec

UNFINISHED = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    client TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    created REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
"""


@dataclass
class JobRecord:
    id: str
    seq: int
    priority: int
    state: str
    spec: JobSpec
    client: str
    attempts: int = 0
    result: dict | None = None
    error: dict | None = None
    created: float = 0.0
    finished: float | None = None

    def summary(self) -> dict:
        """The job as LIST reports it (§4.5)."""
        return {
            "job": self.id,
            "state": self.state,
            "priority": self.priority,
            "attempt": self.attempts,
            "client": self.client,
            "created": self.created,
            "clip": str(self.spec.video),
            "error": self.error,
        }


def _row_to_record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        seq=row["seq"],
        priority=row["priority"],
        state=row["state"],
        spec=JobSpec.from_json(json.loads(row["spec"])),
        client=row["client"],
        attempts=row["attempts"],
        result=json.loads(row["result"]) if row["result"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
        created=row["created"],
        finished=row["finished"],
    )


class Journal:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(str(path), check_same_thread=False)  # one thread at a time: the loop's
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, job_id: str, spec: JobSpec, *, priority: int, client: str) -> JobRecord:
        """Journal a new queued job (committed on return: only then may ACCEPTED be sent, §8.1)."""
        with self._db:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            created = time.time()
            self._db.execute(
                "INSERT INTO jobs (id, seq, priority, state, spec, client, created) VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                (job_id, seq, priority, json.dumps(spec.to_json()), client, created),
            )
        return JobRecord(job_id, seq, priority, "queued", spec, client, created=created)

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_record(row) if row else None

    def state(self, job_id: str) -> str | None:
        row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def start(self, job_id: str) -> int:
        """Mark a job running and count the attempt; returns the attempt number."""
        with self._db:
            self._db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1 WHERE id = ?", (job_id,)
            )
            return self._db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def requeue(self, job_id: str) -> None:
        with self._db:
            self._db.execute("UPDATE jobs SET state = 'queued' WHERE id = ?", (job_id,))

    def finish(
        self, job_id: str, state: str, *, result: dict | None = None, error: dict | None = None
    ) -> None:
        """End a job: done (with its result), failed (with the error) or cancelled."""
        with self._db:
            self._db.execute(
                "UPDATE jobs SET state = ?, result = ?, error = ?, finished = ? WHERE id = ?",
                (
                    state,
                    json.dumps(result) if result is not None else None,
                    json.dumps(error) if error is not None else None,
                    time.time(),
                    job_id,
                ),
            )

    def recover(self) -> list[JobRecord]:
        """After a restart: unfinished jobs, back in the queue; a run cut short by the crash is not counted."""
        with self._db:
            self._db.execute(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0) WHERE state = 'running'"
            )
        rows = self._db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq").fetchall()
        return [_row_to_record(row) for row in rows]

    def expire(self, before: float) -> list[JobRecord]:
        """Finished jobs older than ``before``: rows marked expired (results are the caller's to delete)."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND finished < ?", (before,)
        ).fetchall()
        with self._db:
            self._db.executemany(
                "UPDATE jobs SET state = 'expired' WHERE id = ?", [(row["id"],) for row in rows]
            )
        return [_row_to_record(row) for row in rows]

    def list(
        self, states: list[str] | None = None, limit: int = 100, job: str | None = None
    ) -> list[JobRecord]:
        """The newest jobs first: at most ``limit``, only those in ``states`` and only ``job`` when given."""
        where, values = [], []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            values += states
        if job is not None:
            where.append("id = ?")
            values.append(job)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._db.execute(
            f"SELECT * FROM jobs {clause}ORDER BY seq DESC LIMIT ?", (*values, limit)
        ).fetchall()
        return [_row_to_record(row) for row in rows]

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
