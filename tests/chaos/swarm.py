"""Many lightweight workers on one asyncio loop, over raw keep-alive HTTP/1.1, all recorded.

Each worker claims, heartbeats, uploads (a tiny artifact of its own every `unique_every`
jobs, else one it shares) and completes, until claims come back empty. Every answer's
status is counted, so a test can assert that no 5xx and no "database is locked" was seen:
the retries are ours and visible, not hidden inside a client.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.history import History

RETRY_S = 0.05


class Unreachable(Exception):
    """No answer: the connection failed or closed mid-exchange."""


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened after any failure."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, body: bytes = b"",
                      content_type: str = "application/json") -> tuple[int, bytes]:
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            assert self._reader is not None
            head = (f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
            self._writer.write(head.encode() + body)
            await self._writer.drain()
            raw = await self._reader.readuntil(b"\r\n\r\n")
            status, headers = _parse_head(raw)
            answer = await self._reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return status, answer
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            await self.close()
            raise Unreachable(repr(exc)) from exc

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


@dataclass
class Stats:
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  #: every 5xx, with its body
    locked: list[str] = field(default_factory=list)  #: any answer naming "database is locked"
    unreachable: int = 0
    completed: int = 0


class SwarmWorker:
    def __init__(self, name: str, conn: Connection, history: History, stats: Stats,
                 unique_every: int, idle_exit_s: float) -> None:
        self.name, self.conn, self.history, self.stats = name, conn, history, stats
        self.unique_every = unique_every
        self.idle_exit_s = idle_exit_s
        self.jobs = 0
        self.capability = {"hostname": f"host-{name}", "os": "linux", "cpu_count": 2,
                           "ram_gib": 8.0, "cuda": False}
        shared = gzip.compress(f"shared artifact of {name}".encode(), mtime=0)
        self.shared = (hashlib.sha256(shared).hexdigest(), shared)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while True:
            body = {"worker_id": self.name, "capability": self.capability}
            answer = await self._call("claim", {}, "POST", "/v1/job/claim", body)
            if answer is None:
                continue  # unknown or refused: ask again
            if answer == {}:
                if loop.time() - idle_since > self.idle_exit_s:
                    return
                await asyncio.sleep(RETRY_S)
                continue
            await self.run_job(answer["job"]["job_id"], answer["lease"], answer["attempt"])
            idle_since = loop.time()

    async def run_job(self, job_id: str, lease: str, attempt: int) -> None:
        fields = {"job_id": job_id, "lease": lease, "attempt": attempt}
        hb = await self._call("heartbeat", fields, "POST", f"/v1/job/{job_id}/heartbeat",
                              {"lease": lease, "progress": {"fraction": 0.5}})
        if hb is None or hb.get("action") != "continue":
            return
        artifact_id, data = self._artifact(job_id)
        fields["artifact_id"] = artifact_id
        query = urllib.parse.urlencode({"job_id": job_id, "lease": lease})
        if await self._call("upload", fields, "PUT", f"/v1/model/{artifact_id}?{query}",
                            data) is None:
            return
        done = await self._call("complete", fields, "POST", f"/v1/job/{job_id}/complete",
                                {"lease": lease, "artifact_id": artifact_id,
                                 "metrics": {"by": self.name}})
        if done is not None:
            self.stats.completed += 1
            self.jobs += 1

    def _artifact(self, job_id: str) -> tuple[str, bytes]:
        if self.jobs % self.unique_every:
            return self.shared
        data = gzip.compress(job_id.encode(), mtime=0)
        return hashlib.sha256(data).hexdigest(), data

    async def _call(self, f: str, fields: dict[str, Any], method: str, target: str,
                    body: Any) -> dict[str, Any] | None:
        """One recorded call, repeated while unanswered or 5xx; its JSON ({} for 204) or None
        when refused (4xx)."""
        while True:
            call = self.history.invoke(self.name, f, **fields)
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            kind = "application/octet-stream" if isinstance(body, bytes) else "application/json"
            try:
                status, answer = await self.conn.request(method, target, raw, kind)
            except Unreachable as exc:
                self.stats.unreachable += 1
                call.unknown(str(exc))
                await asyncio.sleep(RETRY_S)
                continue
            self.stats.statuses[status] += 1
            if b"database is locked" in answer:
                self.stats.locked.append(f"{method} {target}: {status} {answer[:200]!r}")
            if status >= 500:
                self.stats.server_errors.append(f"{method} {target}: {status} {answer[:200]!r}")
                call.unknown(f"{status}: {answer[:200]!r}")
                await asyncio.sleep(RETRY_S)
                continue
            if status >= 400:
                call.fail(f"{status}: {answer[:200]!r}")
                return None
            data = json.loads(answer) if answer else {}
            if f == "claim" and data:
                call.ok(job_id=data["job"]["job_id"], lease=data["lease"],
                        attempt=data["attempt"], value="claimed")
            else:
                call.ok(value=data.get("status") or data.get("action"))
            return data


async def swarm(host: str, port: int, history: History, workers: int, unique_every: int = 10,
                idle_exit_s: float = 1.0) -> Stats:
    """Run `workers` swarm workers until every one has found nothing to claim for a while."""
    stats = Stats()
    crew = [SwarmWorker(f"w{i:03d}", Connection(host, port), history, stats, unique_every,
                        idle_exit_s) for i in range(workers)]
    try:
        await asyncio.gather(*(w.run() for w in crew))
    finally:
        for w in crew:
            await w.conn.close()
    return stats
