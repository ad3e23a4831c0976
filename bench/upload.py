"""Figure 3: a bundle PUT through the real receiver (`python -m trainfleet receiver`, its own
process), streamed, hashed, fsynced and published; and the receiver's peak RSS growth.

Floors: a bare Starlette endpoint on the same uvicorn settings that streams the body to disk
with sha256 and fsync; a plain write + fsync of the same size in this process. Both PUTs are
sent by trainfleet's own client (the worker's upload path), so the client is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench import measure, process, workload
from bench.measure import MIB
from bench.options import Options
from trainfleet.client import Client

WORKER_TOKEN = "bench-worker-token"
OPERATOR_TOKEN = "bench-operator-token"
GZIP_MAGIC = b"\x1f\x8b"  #: so the store takes the random bytes for a gzip bundle


def run(options: Options, work: Path) -> dict[str, Any]:
    size = options.upload_mib * MIB
    bundle, artifact_id = make_bundle(work / "bundle.bin", size)
    runs = []
    for r in range(options.runs):
        run_dir = work / f"run-{r}"
        run_dir.mkdir()
        try:
            runs.append({
                "ours": ours_once(options, bundle, artifact_id, run_dir / "ours"),
                "starlette": floor_once(options, bundle, artifact_id, run_dir / "floor"),
                "plain": plain_once(size, run_dir / "plain.bin"),
            })
        finally:
            shutil.rmtree(run_dir)

    def pick(who: str, key: str) -> list[float]:
        return [r[who][key] for r in runs]

    mib = options.upload_mib
    rows = [
        measure.row("upload", f"upload {mib} MiB", "MiB/s", pick("ours", "mib_per_s"),
                    {"starlette stream+sha256+fsync": pick("starlette", "mib_per_s"),
                     "plain write+fsync": pick("plain", "mib_per_s")}),
        measure.row("upload", f"upload {mib} MiB: server peak RSS growth", "MiB",
                    pick("ours", "rss_growth_mib"),
                    {"starlette stream+sha256+fsync": pick("starlette", "rss_growth_mib")},
                    higher_is_better=False),
    ]
    return {"rows": rows, "runs": runs, "artifact_id": artifact_id}


def make_bundle(path: Path, size: int) -> tuple[Path, str]:
    """`size` random bytes that sniff as gzip, and their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        written = 0
        while written < size:
            chunk = os.urandom(min(MIB, size - written))
            if written == 0:
                chunk = GZIP_MAGIC + chunk[len(GZIP_MAGIC):]
            fh.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    return path, digest.hexdigest()


def ours_once(options: Options, bundle: Path, artifact_id: str, work: Path) -> dict[str, Any]:
    work.mkdir()
    manifest = workload.write_manifest(work / "m.toml", [workload.eligible_job(0)])
    with receiver(work, manifest) as (proc, port):
        client = Client(f"http://127.0.0.1:{port}", worker_token=WORKER_TOKEN, retries=0,
                        timeout_s=600.0)
        claim = client.claim("bench-upload", workload.cpu_capability().to_dict())
        if claim is None:
            raise RuntimeError("upload benchmark: nothing to claim")
        with process.PeakRss(proc.pid) as rss:
            t0 = time.perf_counter()
            answer = client.upload(artifact_id, bundle, claim["job"]["job_id"], claim["lease"])
            elapsed = time.perf_counter() - t0
        if not answer.get("new") or answer.get("size") != bundle.stat().st_size:
            raise RuntimeError(f"upload benchmark: receiver answered {answer}")
    return _result(bundle.stat().st_size, elapsed, rss)


def floor_once(options: Options, bundle: Path, artifact_id: str, work: Path) -> dict[str, Any]:
    work.mkdir()
    spec = {"kind": "upload-floor", "dir": str(work), "http": options.http, "loop": options.loop}
    with process.started(process.python("-m", "bench.serve", json.dumps(spec)),
                         work / "server.log") as server:
        port = int(server.wait_for_line(r"port (\d+)").group(1))
        process.wait_http_ok(port, "/v1/health", server)
        client = Client(f"http://127.0.0.1:{port}", retries=0, timeout_s=600.0)
        with process.PeakRss(server.pid) as rss:
            t0 = time.perf_counter()
            client.upload(artifact_id, bundle, "floor", "floor")
            elapsed = time.perf_counter() - t0
    if not (work / artifact_id).is_file():
        raise RuntimeError("upload floor: the file was not published")
    return _result(bundle.stat().st_size, elapsed, rss)


def plain_once(size: int, path: Path) -> dict[str, Any]:
    """Write `size` bytes from memory in 1 MiB chunks, then fsync: the disk's floor."""
    chunk = os.urandom(MIB)
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(size // MIB):
            fh.write(chunk)
        fh.write(chunk[: size % MIB])
        fh.flush()
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "mib_per_s": size / MIB / elapsed}


def _result(size: int, elapsed: float, rss: process.PeakRss) -> dict[str, Any]:
    return {"elapsed_s": elapsed, "mib_per_s": size / MIB / elapsed,
            "rss_before_mib": rss.before_mib, "rss_peak_mib": rss.peak_mib,
            "rss_growth_mib": rss.growth_mib, "hwm_reset": rss.hwm_reset}


class receiver:  # noqa: N801 - used as a context manager, like contextlib's
    """`python -m trainfleet receiver --port 0` with both tokens, for the block's duration."""

    def __init__(self, work: Path, manifest: Path) -> None:
        self.work = work
        self.manifest = manifest
        self._proc: process.Proc | None = None

    def __enter__(self) -> tuple[process.Proc, int]:
        (self.work / "worker.token").write_text(WORKER_TOKEN)
        (self.work / "operator.token").write_text(OPERATOR_TOKEN)
        argv = process.python(
            "-m", "trainfleet", "receiver", "--manifest", str(self.manifest),
            "--state-dir", str(self.work / "state"), "--host", "127.0.0.1", "--port", "0",
            "--worker-token-file", str(self.work / "worker.token"),
            "--operator-token-file", str(self.work / "operator.token"), "--log-level", "warning")
        self._proc = process.Proc(argv, self.work / "receiver.log")
        try:
            port = int(self._proc.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
            process.wait_http_ok(port, "/v1/health", self._proc)
        except BaseException:
            self._proc.stop()
            raise
        return self._proc, port

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.stop()
