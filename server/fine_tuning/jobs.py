"""Fine-tuning jobs, their events (loss per step) and checkpoints, in the fine-tuning database.

A job's states: ``validating_files → queued → running → succeeded | failed | cancelled``. The
last three are final: nothing changes a finished job (``update`` refuses), so a cancel that
races a job's end leaves whichever came first.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.fine_tuning.db import Database, page

FINAL = ("succeeded", "failed", "cancelled")
STATES = ("validating_files", "queued", "running", *FINAL)


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    created_at: int
    model: str  # as the request named it: the base, or an adapter to continue from
    base_model: str  # the served base model's id
    base_fingerprint: str  # the base's shape; a restart under another base fails the job
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]  # n_epochs, batch_size, learning_rate_multiplier
    lora: dict[str, Any]  # rank, alpha, target_modules, dropout (the parent's when continuing)
    learning_rate: float
    micro_batch_size: int
    checkpoint_layers: bool
    seed: int
    suffix: str | None
    parent: dict[str, Any] | None = None  # the adapter continued from: name, version, digest
    status: str = "validating_files"
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    error: dict[str, Any] | None = None
    trained_tokens: int = 0
    total_steps: int = 0
    metadata: dict[str, str] | None = None
    result_files: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def describe(self) -> dict[str, Any]:
        hp = self.hyperparameters
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "created_at": self.created_at,
            "error": self.error,
            "fine_tuned_model": self.fine_tuned_model,
            "finished_at": self.finished_at,
            "hyperparameters": hp,
            "model": self.model,
            "organization_id": "candlewick",
            "result_files": self.result_files,
            "seed": self.seed,
            "status": self.status,
            "trained_tokens": self.trained_tokens if self.status == "succeeded" else None,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "estimated_finish": None,
            "integrations": [],
            "metadata": self.metadata,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": hp},
                "lora": self.lora,
            },
            "user_provided_suffix": self.suffix,
        }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()  # read-modify-write of a job's record

    # -- jobs -----------------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        self.db.write(("INSERT INTO jobs (id, body) VALUES (?, ?)", (job.id, _dump(job))))

    def get(self, job_id: str) -> Job | None:
        rows = self.db.query("SELECT body FROM jobs WHERE id = ?", (job_id,))
        return _load(rows[0]["body"]) if rows else None

    def list(self, limit: int, after: str | None) -> tuple[list[Job], bool]:
        """Newest first; ``after`` a job id from an earlier page."""
        sql, args = "SELECT body FROM jobs", []
        if after is not None:
            sql, args = sql + " WHERE seq < (SELECT seq FROM jobs WHERE id = ?)", [after]
        rows, more = page(
            self.db.query(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1]), limit
        )
        return [_load(r["body"]) for r in rows], more

    def with_status(self, *states: str) -> list[Job]:
        """Jobs in ``states``, oldest first."""
        marks = ",".join("?" * len(states))
        rows = self.db.query(
            f"SELECT body FROM jobs WHERE json_extract(body, '$.status') IN ({marks}) ORDER BY seq",
            states,
        )
        return [_load(r["body"]) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        rows = self.db.query(
            "SELECT json_extract(body, '$.status') AS status, COUNT(*) AS n FROM jobs "
            "GROUP BY status"
        )
        return {r["status"]: r["n"] for r in rows}

    def update(self, job_id: str, **changes: Any) -> Job | None:
        """Apply ``changes`` unless the job is final (then None: nothing changed)."""
        with self._lock:
            job = self.get(job_id)
            if job is None or job.final:
                return None
            if changes.get("status") in FINAL:
                changes.setdefault("finished_at", int(time.time()))
            job = dataclasses.replace(job, **changes)
            self.db.write(("UPDATE jobs SET body = ? WHERE id = ?", (_dump(job), job_id)))
            return job

    # -- events and checkpoints -----------------------------------------------------------------

    def event(
        self, job_id: str, message: str, *, level: str = "info", data: dict | None = None
    ) -> None:
        event = {
            "id": new_id("ftevent"),
            "object": "fine_tuning.job.event",
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "data": data or {},
            "type": "metrics" if data and "step" in data else "message",
        }
        self.db.write(
            (
                "INSERT INTO events (id, job_id, body) VALUES (?, ?, ?)",
                (event["id"], job_id, json.dumps(event)),
            )
        )

    def events(self, job_id: str, limit: int, after: str | None) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists them; ``after`` an event id from an earlier page."""
        return self._page("events", job_id, limit, after)

    def add_checkpoint(self, job_id: str, step: int, folder: str, body: dict) -> None:
        self.db.write(
            (
                "INSERT INTO checkpoints (id, job_id, step, folder, body) VALUES (?, ?, ?, ?, ?)",
                (body["id"], job_id, step, folder, json.dumps(body)),
            )
        )

    def checkpoints(self, job_id: str, limit: int, after: str | None) -> tuple[list[dict], bool]:
        return self._page("checkpoints", job_id, limit, after)

    def all_checkpoints(self, job_id: str) -> list[dict]:
        """Every checkpoint of the job, oldest step first."""
        rows = self.db.query(
            "SELECT body FROM checkpoints WHERE job_id = ? ORDER BY step", (job_id,)
        )
        return [json.loads(r["body"]) for r in rows]

    def delete_checkpoint(self, checkpoint_id: str) -> None:
        self.db.write(("DELETE FROM checkpoints WHERE id = ?", (checkpoint_id,)))

    def last_checkpoint(self, job_id: str) -> tuple[int, str] | None:
        """(step, folder) of the job's latest checkpoint."""
        rows = self.db.query(
            "SELECT step, folder FROM checkpoints WHERE job_id = ? ORDER BY step DESC LIMIT 1",
            (job_id,),
        )
        return (rows[0]["step"], rows[0]["folder"]) if rows else None

    def _page(
        self, table: str, job_id: str, limit: int, after: str | None
    ) -> tuple[list[dict], bool]:
        sql, args = f"SELECT body FROM {table} WHERE job_id = ?", [job_id]
        if after is not None:
            sql += f" AND seq < (SELECT seq FROM {table} WHERE id = ?)"
            args.append(after)
        rows = self.db.query(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1])
        rows, more = page(rows, limit)
        return [json.loads(r["body"]) for r in rows], more


def _dump(job: Job) -> str:
    return json.dumps(dataclasses.asdict(job))


def _load(body: str) -> Job:
    return Job(**json.loads(body))
