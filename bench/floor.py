"""The floors: the same work with nothing of ours in the way.

- `claim_app`: a bare Starlette app whose three endpoints each run one raw SQLite statement
  (UPDATE … RETURNING claim, UPDATE heartbeat, UPDATE complete) on one connection, in the
  event loop: the HTTP + SQLite floor of the claim cycle. Durability is the product's: the
  claim and the completion commit at the queue's synchronous setting (FULL: an fsync each),
  the heartbeat at NORMAL (no fsync; the next FULL commit syncs it), as the receiver's does.
- `RawQueue`: the same statements in process, without HTTP: the database floor.
- `upload_app`: a bare Starlette endpoint that streams a body to disk with sha256 and fsync.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY,
    job_id       TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL DEFAULT 'pending',
    lease        TEXT,
    heartbeat_at REAL,
    completions  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (id) WHERE status = 'pending';
"""
CLAIM = """
UPDATE jobs SET status = 'claimed', lease = :lease, heartbeat_at = :now
WHERE id = (SELECT id FROM jobs WHERE status = 'pending' ORDER BY id LIMIT 1)
RETURNING job_id, lease
"""
HEARTBEAT = """
UPDATE jobs SET heartbeat_at = :now
WHERE job_id = :job_id AND lease = :lease AND status = 'claimed'
"""
COMPLETE = """
UPDATE jobs SET status = 'completed', completions = completions + 1
WHERE job_id = :job_id AND lease = :lease AND status = 'claimed'
"""


class RawQueue:
    """The floor's queue: one connection, WAL, autocommit statements."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.synchronous = synchronous.upper()
        self.db.execute(f"PRAGMA synchronous = {self.synchronous}")
        self.db.executescript(SCHEMA)

    def load(self, n: int) -> None:
        """n pending jobs with sha256-like ids, in one transaction."""
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO jobs (job_id) VALUES (?)",
                            ((hashlib.sha256(b"%d" % i).hexdigest(),) for i in range(n)))
        self.db.execute("COMMIT")

    def claim(self) -> tuple[str, str] | None:
        row = self.db.execute(CLAIM, {"lease": secrets.token_hex(16), "now": time.time()})
        found = row.fetchone()
        return None if found is None else (found[0], found[1])

    def heartbeat(self, job_id: str, lease: str) -> bool:
        """Committed at synchronous=NORMAL, like the product's heartbeat: no fsync."""
        params = {"job_id": job_id, "lease": lease, "now": time.time()}
        if self.synchronous == "NORMAL":
            return self.db.execute(HEARTBEAT, params).rowcount == 1
        self.db.execute("PRAGMA synchronous = NORMAL")
        try:
            return self.db.execute(HEARTBEAT, params).rowcount == 1
        finally:
            self.db.execute(f"PRAGMA synchronous = {self.synchronous}")

    def complete(self, job_id: str, lease: str) -> bool:
        return self.db.execute(COMPLETE, {"job_id": job_id, "lease": lease}).rowcount == 1

    def verify(self) -> dict[str, int]:
        """Jobs completed, and jobs completed more than once (must be 0)."""
        completed, doubled = self.db.execute(
            "SELECT count(*), coalesce(sum(completions > 1), 0) FROM jobs WHERE completions > 0"
        ).fetchone()
        live = self.db.execute("SELECT count(*) FROM jobs WHERE status = 'claimed'").fetchone()[0]
        return {"completed": completed, "double_completions": doubled, "left_claimed": live}

    def close(self) -> None:
        self.db.close()


def raw_cycle(queue: RawQueue, duration_s: float) -> dict[str, Any]:
    """Claim → heartbeat → complete in process until the queue is empty or time is up."""
    latencies: list[float] = []
    done = 0
    started = time.perf_counter()
    deadline = started + duration_s if duration_s > 0 else float("inf")
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        claimed = queue.claim()
        latencies.append(time.perf_counter() - t0)
        if claimed is None:
            break
        if not (queue.heartbeat(*claimed) and queue.complete(*claimed)):
            raise RuntimeError(f"raw floor: lost the lease of {claimed[0]}")
        done += 1
    return {"completed": done, "elapsed_s": time.perf_counter() - started,
            "claim_latencies_s": latencies}


def claim_app(queue: RawQueue) -> Starlette:
    """The HTTP + SQLite floor: the receiver's claim-cycle paths, one statement each."""

    async def claim(request: Request) -> Response:
        await request.json()
        claimed = queue.claim()
        if claimed is None:
            return Response(status_code=204)
        return JSONResponse({"job": {"job_id": claimed[0]}, "lease": claimed[1]})

    async def heartbeat(request: Request) -> Response:
        body = await request.json()
        if not queue.heartbeat(request.path_params["job_id"], body["lease"]):
            return JSONResponse({"error": "lease lost"}, status_code=409)
        return JSONResponse({"action": "continue"})

    async def complete(request: Request) -> Response:
        body = await request.json()
        job_id = request.path_params["job_id"]
        if not queue.complete(job_id, body["lease"]):
            return JSONResponse({"error": "lease lost"}, status_code=409)
        return JSONResponse({"job_id": job_id, "status": "completed"})

    return Starlette(routes=[
        Route("/v1/health", health),
        Route("/v1/job/claim", claim, methods=["POST"]),
        Route("/v1/job/{job_id}/heartbeat", heartbeat, methods=["POST"]),
        Route("/v1/job/{job_id}/complete", complete, methods=["POST"]),
    ])


def upload_app(directory: Path) -> Starlette:
    """The upload floor: stream to a temp file, sha256 while streaming, fsync, rename."""

    async def put(request: Request) -> Response:
        artifact_id = request.path_params["artifact_id"]
        digest = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=directory, suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                fh.write(chunk)
                digest.update(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        if digest.hexdigest() != artifact_id:
            os.unlink(name)
            return JSONResponse({"error": "digest mismatch"}, status_code=400)
        os.replace(name, directory / artifact_id)
        return JSONResponse({"artifact_id": artifact_id}, status_code=201)

    return Starlette(routes=[
        Route("/v1/health", health),
        Route("/v1/model/{artifact_id}", put, methods=["PUT"]),
    ])


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})
