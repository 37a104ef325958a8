"""The server's index: uploaded files, jobs and their place in the queue, in SQLite (WAL mode).

The index holds what a run directory cannot: file ids and where their bytes are, which job came
first (the FIFO queue), a job's metadata and the request that created it, and what the server was
asked to do with a job (cancel, pause). A job's status, events, checkpoints and results stay in its
run directory, so `ftlab jobs …` and the API read the same record.
"""
import json
import sqlite3
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    path TEXT NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    run_dir TEXT NOT NULL,
    state TEXT NOT NULL,          -- the queue's view: validating_files | queued | running | paused | done
    request TEXT NOT NULL,        -- the create request, as JSON (hyperparameters, suffix, integrations, …)
    metadata TEXT NOT NULL,       -- the job's metadata, as JSON
    training_file TEXT NOT NULL,
    validation_file TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    wanted TEXT                   -- cancel | pause: asked for while the job's process runs
);
CREATE TABLE IF NOT EXISTS job_files (
    job_id TEXT NOT NULL,
    file_id TEXT NOT NULL,
    PRIMARY KEY (job_id, file_id)
);
CREATE TABLE IF NOT EXISTS removed_models (
    name TEXT PRIMARY KEY,
    removed_at INTEGER NOT NULL
);
"""


class FileInUse(Exception):
    """A file a job uses: one being created from it, or an unfinished one training on it (`job_id`)."""

    def __init__(self, job_id: Optional[str]):
        super().__init__(job_id or "a job being created")
        self.job_id = job_id


class Index:
    """The SQLite index at `<jobs_root>/ftlab.sqlite`; safe to share between the server's threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._creating: Counter = Counter()  # file id → jobs being created from it (not yet in `jobs`)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, args).fetchall()]

    def _one(self, sql: str, args: tuple = ()) -> Optional[dict]:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # ---- files ---------------------------------------------------------------------------
    def add_file(self, *, file_id: str, purpose: str, filename: str, size: int, path: Path,
                 status: str = "processed", created_at: Optional[int] = None) -> dict:
        self._write("INSERT INTO files (id, purpose, filename, bytes, created_at, path, status) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (file_id, purpose, filename, size, created_at or int(time.time()), str(path), status))
        return self.file(file_id)

    def file(self, file_id: str) -> Optional[dict]:
        return self._one("SELECT * FROM files WHERE id = ?", (file_id,))

    def files(self, *, purpose: Optional[str] = None, limit: int = 10000, after: Optional[str] = None,
              order: str = "desc") -> tuple[list[dict], bool]:
        """A page of files in `order` of creation, after the file `after`; and whether more follow."""
        descending = order != "asc"
        where, args = [], []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            cursor = self.file(after)
            if cursor is not None:
                where.append("seq < ?" if descending else "seq > ?")
                args.append(cursor["seq"])
        sql = ("SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?")
        rows = self._all(sql, (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    @contextmanager
    def files_for_new_job(self, file_ids: Iterable[Optional[str]]) -> Iterator[dict[str, dict]]:
        """The rows of the files a job is being created from (those that exist), kept from deletion until the
        block ends; by then the job's own row keeps them (`add_job` inside the block)."""
        with self._lock:
            rows = {file_id: row for file_id in dict.fromkeys(file_ids) if file_id and (row := self.file(file_id))}
            self._creating.update(rows.keys())
        try:
            yield rows
        finally:
            with self._lock:
                self._creating.subtract(rows.keys())
                self._creating += Counter()  # drop the zeros

    def delete_file(self, file_id: str, unfinished: Callable[[str], bool] = lambda job_id: True) -> bool:
        """Delete the file's row, unless a job uses it (raises FileInUse): one being created from it, or one the
        index has not marked done and `unfinished(job_id)` confirms has not finished. Whether a row went."""
        with self._lock:
            if self._creating[file_id]:
                raise FileInUse(None)
            users = self._all("SELECT id FROM jobs WHERE state != 'done' AND (training_file = ? OR validation_file = ?)",
                              (file_id, file_id))
            user = next((row["id"] for row in users if unfinished(row["id"])), None)
            if user is not None:
                raise FileInUse(user)
            return self._write("DELETE FROM files WHERE id = ?", (file_id,)) > 0

    # ---- jobs ----------------------------------------------------------------------------
    def add_job(self, *, job_id: str, created_at: int, run_dir: Path, request: dict, metadata: dict,
                training_file: str, validation_file: Optional[str]) -> dict:
        self._write("INSERT INTO jobs (id, created_at, run_dir, state, request, metadata, training_file, "
                    "validation_file) VALUES (?, ?, ?, 'validating_files', ?, ?, ?, ?)",
                    (job_id, created_at, str(run_dir), json.dumps(request), json.dumps(metadata), training_file,
                     validation_file))
        return self.job(job_id)

    def job(self, job_id: str) -> Optional[dict]:
        return _decode(self._one("SELECT * FROM jobs WHERE id = ?", (job_id,)))

    def jobs(self, *, limit: int = 20, after: Optional[str] = None,
             metadata: Optional[dict] = None) -> tuple[list[dict], bool]:
        """A page of jobs, newest first, after the job `after`, keeping those whose metadata has every pair
        of `metadata`; and whether more follow."""
        where, args = [], []
        if after:
            cursor = self.job(after)
            if cursor is not None:
                where.append("seq < ?")
                args.append(cursor["seq"])
        for key, value in (metadata or {}).items():
            where.append("json_extract(metadata, ?) = ?")
            args += [f'$."{key}"', value]
        sql = ("SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY seq DESC LIMIT ?")
        rows = [_decode(row) for row in self._all(sql, (*args, limit + 1))]
        return rows[:limit], len(rows) > limit

    def jobs_in(self, *states: str) -> list[dict]:
        """Jobs in any of `states`, oldest first (the queue's order)."""
        marks = ", ".join("?" * len(states))
        return [_decode(row) for row in self._all(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq", states)]

    def set_job(self, job_id: str, **fields) -> None:
        """Update a job's queue fields (state, wanted, restarts)."""
        assignments = ", ".join(f"{key} = ?" for key in fields)
        self._write(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def move_job(self, job_id: str, from_states: tuple[str, ...], to_state: str, **fields) -> bool:
        """Set the job's state to `to_state` only if it is in one of `from_states`; whether it moved."""
        assignments = ", ".join(["state = ?", *(f"{key} = ?" for key in fields)])
        marks = ", ".join("?" * len(from_states))
        return self._write(f"UPDATE jobs SET {assignments} WHERE id = ? AND state IN ({marks})",
                           (to_state, *fields.values(), job_id, *from_states)) > 0

    def link_file(self, job_id: str, file_id: str) -> None:
        self._write("INSERT OR IGNORE INTO job_files (job_id, file_id) VALUES (?, ?)", (job_id, file_id))

    def job_result_files(self, job_id: str) -> list[str]:
        return [row["file_id"] for row in self._all("SELECT file_id FROM job_files WHERE job_id = ? ORDER BY rowid",
                                                    (job_id,))]

    # ---- models --------------------------------------------------------------------------
    def remove_model(self, name: str) -> None:
        self._write("INSERT OR REPLACE INTO removed_models (name, removed_at) VALUES (?, ?)", (name, int(time.time())))

    def removed_models(self) -> set[str]:
        return {row["name"] for row in self._all("SELECT name FROM removed_models")}

    def model_removed(self, name: str) -> bool:
        """Whether `name` is a deleted ft: model, or one of its checkpoints (`…:ckpt-step-N`)."""
        base = name.rpartition(":ckpt-step-")[0] if ":ckpt-step-" in name else name
        return self._one("SELECT 1 AS removed FROM removed_models WHERE name IN (?, ?)", (name, base)) is not None


def _decode(row: Optional[dict]) -> Optional[dict]:
    if row is not None:
        row["request"] = json.loads(row["request"])
        row["metadata"] = json.loads(row["metadata"])
    return row
