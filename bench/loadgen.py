"""The claim-cycle load generator: W clients, each on its own keep-alive HTTP/1.1 connection.

Raw HTTP over asyncio streams, so a client costs little next to the server it measures. Run
as `python -m bench.loadgen '<json spec>'` in its own process (never sharing a server's
GIL); it drives one or more servers in turn and prints one JSON object: for each, jobs
completed, seconds it was driven, claim latencies and errors.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from bench.workload import cpu_capability


class Connection:
    """One keep-alive connection; `call` sends a request and reads its whole answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 headers: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.headers = headers

    @classmethod
    async def open(cls, port: int, token: str | None) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        headers = b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
        if token:
            headers += b"X-Worker-Token: " + token.encode() + b"\r\n"
        return cls(reader, writer, headers)

    async def call(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\n" + self.headers
                          + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            end = lower.index(b"\r\n", at + 2)
            return status, await self.reader.readexactly(int(lower[at + 17:end]))
        if b"\r\ntransfer-encoding: chunked" in lower:
            return status, await self._chunked()
        return status, b""

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await self.reader.readexactly(size + 2))
            if size == 0:
                return b"".join(parts)[:-2]

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class Tally:
    def __init__(self) -> None:
        self.completed = 0
        self.claims: list[float] = []
        self.errors: list[str] = []
        self.elapsed_s = 0.0
        self.drained = False


async def client(n: int, conn: Connection, target: dict[str, Any], deadline: float,
                 tally: Tally) -> bool:
    """Claim → heartbeat → complete until time is up (False) or nothing is left (True)."""
    capability = cpu_capability().to_dict()
    claim_body = json.dumps({"worker_id": f"bench-w{n}", "capability": capability, "slot": 0,
                             "slot_vram_gib": 0.0, "allow_jobs": None,
                             "deny_jobs": []}).encode()
    artifact_id = target.get("artifact_id") or "0" * 64
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        status, raw = await conn.call("/v1/job/claim", claim_body)
        tally.claims.append(time.perf_counter() - t0)
        if status == 204:
            return True
        if status != 200:
            tally.errors.append(f"claim: {status} {raw[:300]!r}")
            return True
        answer = json.loads(raw)
        job_id, lease = answer["job"]["job_id"], answer["lease"]
        beat = {"lease": lease, "progress": {"fraction": 0.5, "message": "bench"}}
        status, raw = await conn.call(f"/v1/job/{job_id}/heartbeat", json.dumps(beat).encode())
        if status != 200:
            tally.errors.append(f"heartbeat: {status} {raw[:300]!r}")
            return True
        done = {"lease": lease, "artifact_id": artifact_id, "metrics": {"accuracy": 1.0}}
        status, raw = await conn.call(f"/v1/job/{job_id}/complete", json.dumps(done).encode())
        if status != 200:
            tally.errors.append(f"complete: {status} {raw[:300]!r}")
            return True
        tally.completed += 1
    return False


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Targets take turns in slices of `slice_s`, so a noisy moment hits each alike.

    All connections open first; each target's clock runs only during its own slices.
    `duration_s` 0 means one slice per target, until its queue is drained.
    """
    targets = spec["targets"]
    conns = [[await Connection.open(t["port"], t.get("token")) for _ in range(spec["workers"])]
             for t in targets]
    tallies = [Tally() for _ in targets]
    duration = float(spec.get("duration_s") or 0)
    slice_s = min(float(spec.get("slice_s") or 1.0), duration) if duration else float("inf")
    rounds = max(1, round(duration / slice_s)) if duration else 1
    cpu_before = time.process_time()
    wall = time.perf_counter()
    for _ in range(rounds):
        for target, conn_list, tally in zip(targets, conns, tallies, strict=True):
            if tally.drained or tally.errors:
                continue
            started = time.perf_counter()
            ended = await asyncio.gather(*(client(n, conn, target, started + slice_s, tally)
                                           for n, conn in enumerate(conn_list)))
            tally.elapsed_s += time.perf_counter() - started
            tally.drained = all(ended)
    cpu_pct = (time.process_time() - cpu_before) / (time.perf_counter() - wall) * 100
    for conn_list in conns:
        for conn in conn_list:
            await conn.close()
    return {"targets": [
        {"completed": t.completed, "elapsed_s": t.elapsed_s, "claim_latencies_s": t.claims,
         "errors": t.errors, "client_cpu_pct": cpu_pct} for t in tallies]}


def main(argv: list[str]) -> int:
    result = asyncio.run(run(json.loads(argv[0])))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
