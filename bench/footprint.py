"""Figure 5: what the receiver and a worker cost a host: RSS, and a worker's CPU.

A real receiver (`python -m trainfleet receiver`) whose only job needs CUDA, and two real
workers (`python -m trainfleet worker`, CPU-only by an override file) polling it every 10 s
and every 1 s. Then a reload adds a job whose trainer sleeps; the 1 s worker claims it, and
is measured again while it heartbeats. CPU is the worker process's own (not its trainer's).
Floors: a bare Starlette app on the same uvicorn settings (idle RSS), a bare interpreter.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench import measure, process, workload
from bench.options import Options
from bench.upload import OPERATOR_TOKEN, WORKER_TOKEN, receiver
from trainfleet.client import Client
from trainfleet.manifest import JobSpec

SLEEPER = JobSpec(name="sleeper", model="sleeper", mode="realistic", hyper={}, seed=0)
GPU_ONLY = JobSpec(name="gpu-only", model="gbt", mode="realistic", hyper={"lr": 0.5}, seed=0,
                   require_cuda=True)
SLEEPING_TRAINER = '["{python}", "-c", "import time; time.sleep(3600)"]'
SETTLE_S = 1.0
READY_DEADLINE_S = 30.0


def run(options: Options, work: Path, claim: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = work / "footprint.toml"
    write_manifest(manifest, [GPU_ONLY])
    floors = idle_floors(options, work)
    with receiver(work, manifest) as (recv, port):
        time.sleep(SETTLE_S)
        receiver_idle = samples(options.runs, lambda: process.rss_mib(recv.pid))
        url = f"http://127.0.0.1:{port}"
        with (worker(work, url, "slow", poll_s=10.0, options=options) as slow,
              worker(work, url, "fast", poll_s=1.0, options=options) as fast):
            client = Client(url, worker_token=WORKER_TOKEN, operator_token=OPERATOR_TOKEN)
            wait_for(lambda: len(client.workers()) >= 2, "both workers to poll")
            idle = windows(options.runs, options.idle_window_s, [slow, fast])
            write_manifest(manifest, [GPU_ONLY, SLEEPER])
            client.reload_manifest()
            wait_for(lambda: bool(client.jobs(status="running")), "the sleeper to run")
            busy = windows(options.runs, options.busy_window_s, [fast])
    rows = [
        measure.row("footprint", "receiver RSS, idle", "MiB", receiver_idle,
                    {"bare starlette+uvicorn": floors["starlette"],
                     "bare python": floors["python"]}, higher_is_better=False),
        *_under_load(claim),
        measure.row("footprint", "worker RSS, idle (poll 10 s)", "MiB", idle[0]["rss_mib"],
                    {"bare python": floors["python"]}, higher_is_better=False),
        measure.row("footprint", "worker CPU, idle (poll 10 s)", "% of a core",
                    idle[0]["cpu_pct"], higher_is_better=False),
        measure.row("footprint", "worker CPU, idle (poll 1 s)", "% of a core",
                    idle[1]["cpu_pct"], higher_is_better=False),
        measure.row("footprint",
                    f"worker RSS, heartbeating (every {options.heartbeat_interval_s:g} s)",
                    "MiB", busy[0]["rss_mib"], {"bare python": floors["python"]},
                    higher_is_better=False),
        measure.row("footprint",
                    f"worker CPU, heartbeating (every {options.heartbeat_interval_s:g} s)",
                    "% of a core", busy[0]["cpu_pct"], higher_is_better=False),
    ]
    return {"rows": rows, "runs": {"receiver_idle_mib": receiver_idle, "floors": floors,
                                   "idle": idle, "busy": busy}}


def _under_load(claim: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The receiver's peak RSS during the claim figure's W=64 runs, when they ran."""
    runs = (claim or {}).get("runs", {}).get("W=64")
    if not runs:
        return []
    return [measure.row("footprint", "receiver peak RSS, W=64 claim load", "MiB",
                        [r["rss_peak_mib"] for r in runs["ours"]],
                        {"starlette+sqlite": [r["rss_peak_mib"] for r in runs["starlette+sqlite"]]},
                        higher_is_better=False)]


def write_manifest(path: Path, jobs: list[JobSpec]) -> None:
    text = workload.manifest_toml(jobs)
    path.write_text(text.replace('["{python}", "-c", "pass"]', SLEEPING_TRAINER, 1))


def idle_floors(options: Options, work: Path) -> dict[str, list[float]]:
    """Idle RSS of a bare Starlette app on the same uvicorn settings, and of a bare python."""
    spec = {"kind": "upload-floor", "dir": str(work), "http": options.http, "loop": options.loop}
    with process.started(process.python("-m", "bench.serve", json.dumps(spec)),
                         work / "floor.log") as server:
        port = int(server.wait_for_line(r"port (\d+)").group(1))
        process.wait_http_ok(port, "/v1/health", server)
        time.sleep(SETTLE_S)
        starlette = samples(options.runs, lambda: process.rss_mib(server.pid))
    with process.started(process.python("-c", "import time; print('up'); time.sleep(600)"),
                         work / "python.log") as bare:
        bare.wait_for_line("up")
        python = samples(options.runs, lambda: process.rss_mib(bare.pid))
    return {"starlette": starlette, "python": python}


class worker:  # noqa: N801 - used as a context manager, like contextlib's
    """`python -m trainfleet worker` on a CPU-only capability, for the block's duration."""

    def __init__(self, work: Path, url: str, name: str, poll_s: float, options: Options) -> None:
        self.dir = work / f"worker-{name}"
        self.dir.mkdir()
        (self.dir / "token").write_text(WORKER_TOKEN)
        (self.dir / "capability.json").write_text(json.dumps(
            {"hostname": workload.BENCH_HOST, "cuda": False, "gpus": []}))
        deny = ["--deny-jobs", "sleeper"] if name == "slow" else []
        self.argv = process.python(
            "-m", "trainfleet", "worker", "--receiver", url, "--workdir", str(self.dir),
            "--token-file", str(self.dir / "token"), "--worker-id", f"bench-{name}",
            "--capability-file", str(self.dir / "capability.json"),
            "--poll-interval", str(poll_s),
            "--heartbeat-interval", str(options.heartbeat_interval_s),
            "--shutdown-grace", "5", *deny)
        self.proc: process.Proc | None = None

    def __enter__(self) -> process.Proc:
        self.proc = process.Proc(self.argv, self.dir / "worker.log", cwd=self.dir)
        return self.proc

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop()


def windows(count: int, window_s: float, procs: list[process.Proc]) -> list[dict[str, Any]]:
    """For each process, `count` consecutive windows: CPU % of a core, and RSS at the end."""
    found: list[dict[str, Any]] = [{"cpu_pct": [], "rss_mib": []} for _ in procs]
    for _ in range(count):
        before = [process.cpu_seconds(p.pid) for p in procs]
        t0 = time.monotonic()
        time.sleep(window_s)
        elapsed = time.monotonic() - t0
        for proc, start, out in zip(procs, before, found, strict=True):
            out["cpu_pct"].append((process.cpu_seconds(proc.pid) - start) / elapsed * 100)
            out["rss_mib"].append(process.rss_mib(proc.pid))
    return found


def samples(count: int, read: Any, every_s: float = 0.2) -> list[float]:
    values = []
    for _ in range(count):
        values.append(float(read()))
        time.sleep(every_s)
    return values


def wait_for(check: Any, what: str, deadline_s: float = READY_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"footprint: gave up waiting for {what} after {deadline_s} s")
        time.sleep(0.1)
