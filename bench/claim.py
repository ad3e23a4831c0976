"""Figure 1: the claim cycle over HTTP through the real receiver, against two floors.

Each run starts a fresh receiver and a fresh floor with `claim_jobs` jobs each, lets W clients
(bench.loadgen, its own process) loop claim → heartbeat → complete against them in turns of
SLICE_S, stops both, and checks in each database that every job acknowledged completed
exactly once.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from bench import floor, measure, process, workload
from bench.options import Options
from trainfleet.client import Client

WORKER_TOKEN = "bench-worker-token"
OPERATOR_TOKEN = "bench-operator-token"
LOADGEN_GRACE_S = 120.0
SLICE_S = 1.0  #: ours and the floor take turns this long, so noise hits both alike


def run(options: Options, work: Path) -> dict[str, Any]:
    manifest = workload.write_manifest(
        work / "claim.toml", (workload.eligible_job(i) for i in range(options.claim_jobs + 1)))
    per_w: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for w in options.claim_workers:
        ours, floors = [], []
        for r in range(options.runs):
            found = paired_once(options, manifest, w, work / f"w{w}-{r}", ours_first=r % 2 == 0)
            ours.append(found[0])
            floors.append(found[1])
        per_w[w] = (ours, floors)
    raws = [raw_floor_once(options, work / f"raw-{r}") for r in range(options.runs)]
    return {"rows": _rows(per_w, raws), "runs": _details(per_w, raws)}


def _rows(per_w: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]]]],
          raws: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for w, (ours, floors) in per_w.items():
        def pick(runs: list[dict[str, Any]], key: str) -> list[float]:
            return [r[key] for r in runs]

        rows.append(measure.row(
            "claim", f"claim cycle W={w}", "jobs/s", pick(ours, "jobs_per_s"),
            {"starlette+sqlite": pick(floors, "jobs_per_s"),
             "raw sqlite": pick(raws, "jobs_per_s")}))
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
            rows.append(measure.row(
                "claim", f"claim {label} W={w}", "ms", pick(ours, key),
                {"starlette+sqlite": pick(floors, key), "raw sqlite": pick(raws, key)},
                higher_is_better=False))
        rows.append(measure.row(
            "claim", f"double completions W={w}", "jobs", pick(ours, "double_completions"),
            {"starlette+sqlite": pick(floors, "double_completions")}, higher_is_better=False,
            note="summed over runs in the goals; must be 0"))
    return rows


def _details(per_w: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]]]],
             raws: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **{f"W={w}": {"ours": ours, "starlette+sqlite": floors}
           for w, (ours, floors) in per_w.items()},
        "raw sqlite": raws,
    }


# -- one run of each ---------------------------------------------------------------------


def paired_once(options: Options, manifest: Path, workers: int, work: Path,
                ours_first: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The real receiver (create_app + uvicorn, tokens on) and the Starlette + SQLite floor,
    each in its own process, driven in alternating slices by one load generator."""
    work.mkdir(parents=True)
    ours_spec = {"kind": "receiver", "manifest": str(manifest), "state_dir": str(work / "state"),
                 "worker_token": WORKER_TOKEN, "operator_token": OPERATOR_TOKEN,
                 "http": options.http, "loop": options.loop, "synchronous": options.synchronous}
    floor_spec = {"kind": "claim-floor", "db": str(work / "floor.db"), "jobs": options.claim_jobs,
                  "http": options.http, "loop": options.loop, "synchronous": options.synchronous}
    with (process.started(process.python("-m", "bench.serve", json.dumps(ours_spec)),
                          work / "ours.log") as ours_server,
          process.started(process.python("-m", "bench.serve", json.dumps(floor_spec)),
                          work / "floor.log") as floor_server):
        ours_port, floor_port = start_server(ours_server), start_server(floor_server)
        artifact_id = upload_one_artifact(ours_port, work)
        targets: list[dict[str, Any]] = [
            {"port": ours_port, "token": WORKER_TOKEN, "artifact_id": artifact_id},
            {"port": floor_port}]
        order = [0, 1] if ours_first else [1, 0]
        with (process.PeakRss(ours_server.pid, every_s=0.05) as ours_rss,
              process.PeakRss(floor_server.pid, every_s=0.05) as floor_rss):
            found = run_loadgen_targets(options, [targets[i] for i in order], workers, work)
        ours, floor_ = found[order.index(0)], found[order.index(1)]
    ours.update(check_receiver_db(work / "state" / "queue.db", ours["completed"] + 1))
    ours.update(rss_before_mib=ours_rss.before_mib, rss_peak_mib=ours_rss.peak_mib)
    queue = floor.RawQueue(work / "floor.db", options.synchronous)
    checked = queue.verify()
    queue.close()
    exactly_once = (checked["completed"] == floor_["completed"]
                    and not checked["left_claimed"] and not checked["double_completions"])
    floor_.update(double_completions=checked["double_completions"],
                  exactly_once=int(exactly_once),
                  rss_before_mib=floor_rss.before_mib, rss_peak_mib=floor_rss.peak_mib)
    return ours, floor_


def raw_floor_once(options: Options, work: Path) -> dict[str, Any]:
    """The same statements in process, one thread, no HTTP."""
    work.mkdir(parents=True)
    queue = floor.RawQueue(work / "raw.db", options.synchronous)
    queue.load(options.claim_jobs)
    raw = floor.raw_cycle(queue, options.claim_seconds)
    checked = queue.verify()
    queue.close()
    return {**_summary(raw), "double_completions": checked["double_completions"]}


# -- plumbing ----------------------------------------------------------------------------


def start_server(server: process.Proc) -> int:
    port = int(server.wait_for_line(r"port (\d+)").group(1))
    process.wait_http_ok(port, "/v1/health", server)
    return port


def upload_one_artifact(port: int, work: Path) -> str:
    """Claim one job, upload a tiny bundle under its lease and complete it: every later
    completion names this artifact, which the store then holds."""
    client = Client(f"http://127.0.0.1:{port}", worker_token=WORKER_TOKEN, retries=0)
    claim = client.claim("bench-setup", workload.cpu_capability().to_dict())
    if claim is None:
        raise RuntimeError("claim benchmark: no job to set up with")
    bundle = work / "tiny.bundle"
    bundle.write_bytes(gzip.compress(b"trainfleet bench", mtime=0))
    artifact_id = hashlib.sha256(bundle.read_bytes()).hexdigest()
    job_id, lease = claim["job"]["job_id"], claim["lease"]
    client.upload(artifact_id, bundle, job_id, lease)
    client.complete(job_id, lease, artifact_id, {})
    return artifact_id


def run_loadgen_targets(options: Options, targets: list[dict[str, Any]], workers: int,
                        work: Path) -> list[dict[str, Any]]:
    """bench.loadgen in its own process, driving `targets` in turn; a summary for each."""
    spec = {"targets": targets, "workers": workers, "duration_s": options.claim_seconds,
            "slice_s": SLICE_S}
    with process.started(process.python("-m", "bench.loadgen", json.dumps(spec)),
                         work / "loadgen.log") as gen:
        limit = (options.claim_seconds or 60.0) * len(targets) + LOADGEN_GRACE_S
        gen.popen.wait(timeout=limit)
    lines = gen.output().strip().splitlines()
    if gen.popen.returncode != 0 or not lines:
        raise RuntimeError(f"loadgen exited {gen.popen.returncode}:\n{gen.output()[-3000:]}")
    answers: list[dict[str, Any]] = json.loads(lines[-1])["targets"]
    for answer in answers:
        if answer["errors"]:
            raise RuntimeError(f"loadgen errors ({len(answer['errors'])}): "
                               f"{answer['errors'][:3]}")
    return [_summary(answer) for answer in answers]


def run_loadgen(options: Options, port: int, workers: int, artifact_id: str | None,
                token: str | None, work: Path) -> dict[str, Any]:
    """One server driven for claim_seconds by W clients: jobs/s, claim p50/p99/max."""
    target = {"port": port, "token": token, "artifact_id": artifact_id}
    return run_loadgen_targets(options, [target], workers, work)[0]


def _summary(answer: dict[str, Any]) -> dict[str, Any]:
    latencies = measure.latency_summary(answer["claim_latencies_s"])
    found = {"completed": answer["completed"], "elapsed_s": answer["elapsed_s"],
             "jobs_per_s": answer["completed"] / answer["elapsed_s"], **latencies}
    if "client_cpu_pct" in answer:  # the load generator's own CPU: is the client the limit?
        found["client_cpu_pct"] = answer["client_cpu_pct"]
    return found


def check_receiver_db(path: Path, acknowledged: int) -> dict[str, int]:
    """Exactly once, from the database itself: one claim and one completion per finished job."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        def one(sql: str) -> int:
            return int(db.execute(sql).fetchone()[0])

        found = {
            "db_completed": one("SELECT count(*) FROM jobs WHERE status = 'completed'"),
            "completed_events": one("SELECT count(*) FROM events WHERE kind = 'completed'"),
            "double_completions": one(
                "SELECT count(*) FROM (SELECT job_id FROM events WHERE kind = 'completed' "
                "GROUP BY job_id HAVING count(*) > 1)"),
            "double_claims": one("SELECT count(*) FROM attempts WHERE attempt > 1"),
            "left_live": one("SELECT count(*) FROM jobs WHERE status IN ('claimed', 'running')"),
        }
    finally:
        db.close()
    found["acknowledged"] = acknowledged
    found["exactly_once"] = int(
        found["db_completed"] == acknowledged == found["completed_events"]
        and not found["double_completions"] and not found["double_claims"]
        and not found["left_live"])
    return found
