"""Judges a chaos run: the clients' operation history, the final database and the store.

`check()` reports every broken promise of the README's guarantees; each list of the Report
names the jobs or files concerned, and an empty report is the only passing one. The database
is opened read-only, so the checker may run while a receiver still serves it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tests.chaos.history import Op

TERMINAL = {"completed", "failed", "cancelled"}
LIVE = {"claimed", "running"}
BUNDLE_NAMES = {"bundle.tar.zst", "bundle.tar.gz"}


@dataclass
class Report:
    """Violations found, one list per kind (empty: none), and figures about the run."""

    lost_jobs: list[str] = field(default_factory=list)
    lost_acks: list[str] = field(default_factory=list)
    double_completions: list[str] = field(default_factory=list)
    lease_overlaps: list[str] = field(default_factory=list)
    stale_accepts: list[str] = field(default_factory=list)
    over_limit: list[str] = field(default_factory=list)
    bad_artifacts: list[str] = field(default_factory=list)
    missing_artifacts: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    index_without_file: list[str] = field(default_factory=list)
    file_without_index: list[str] = field(default_factory=list)
    integrity: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def violations(self) -> dict[str, list[str]]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "figures" and getattr(self, f.name)}

    @property
    def ok(self) -> bool:
        return not self.violations()

    def summary(self) -> str:
        lines = [f"figures: {json.dumps(self.figures, sort_keys=True)}"]
        for name, found in self.violations().items():
            lines.append(f"{name}: {len(found)}")
            lines.extend(f"  - {item}" for item in found[:10])
        return "\n".join(lines)

    def assert_ok(self) -> None:
        assert self.ok, "chaos checker found violations:\n" + self.summary()


def check(ops: Iterable[Op], db_path: Path, store_root: Path, job_ids: Iterable[str],
          *, allow_live: bool = False) -> Report:
    """Every check at once: history, database (read-only) and store."""
    ops = list(ops)
    report = Report()
    db = read_database(db_path, report)
    check_history(ops, report, db.lease_attempts if db else None)
    if db is not None:
        check_database(db, list(job_ids), ops, report, allow_live=allow_live)
        completed = {j["artifact_id"] for j in db.jobs.values() if j["status"] == "completed"}
    else:
        completed = set()
    uploaded = {op.artifact_id for op in ops if op.ok and op.f == "upload" and op.artifact_id}
    check_store(store_root, completed | uploaded, report)
    outcomes = Counter(op.outcome for op in ops)
    report.figures.update(ops=len(ops), **{f"ops_{k}": v for k, v in sorted(outcomes.items())})
    return report


# -- history -----------------------------------------------------------------


def check_history(ops: list[Op], report: Report,
                  lease_attempts: dict[tuple[str, str], int] | None = None) -> None:
    """Fencing as the clients saw it: one holder at a time, no stale call accepted, one result."""
    accepted: dict[str, dict[str, list[Op]]] = defaultdict(lambda: defaultdict(list))
    for op in ops:
        if op.ok and op.job_id and op.lease:
            accepted[op.job_id][op.lease].append(op)
    for job_id, by_lease in accepted.items():
        _check_overlaps(job_id, by_lease, report)
        _check_stale(job_id, by_lease, report, lease_attempts or {})
        completing = {lease for lease, calls in by_lease.items()
                      if any(op.f == "complete" for op in calls)}
        if len(completing) > 1:
            report.double_completions.append(
                f"job {job_id[:12]}: completes accepted for {len(completing)} leases")


def _check_overlaps(job_id: str, by_lease: dict[str, list[Op]], report: Report) -> None:
    """Leases A and B interleave when some B call surely came after an A call and surely
    before another A call (surely: one's answer arrived before the other was sent)."""
    for a, a_calls in by_lease.items():
        a_first_done = min(op.done_ns for op in a_calls if op.done_ns is not None)
        a_last_invoked = max(op.invoked_ns for op in a_calls)
        for b, b_calls in by_lease.items():
            if a == b:
                continue
            inside = [op for op in b_calls if op.done_ns is not None
                      and op.invoked_ns > a_first_done and op.done_ns < a_last_invoked]
            if inside:
                report.lease_overlaps.append(
                    f"job {job_id[:12]}: lease {b[:8]} ({inside[0].f}) was accepted while "
                    f"lease {a[:8]} was held, and {a[:8]} was accepted again after it")


def _check_stale(job_id: str, by_lease: dict[str, list[Op]], report: Report,
                 lease_attempts: dict[tuple[str, str], int]) -> None:
    """No call with an older lease is accepted once a newer claim was acknowledged."""
    def attempt_of(lease: str, calls: list[Op]) -> int | None:
        numbers = [op.attempt for op in calls if op.f == "claim" and op.attempt is not None]
        return min(numbers) if numbers else lease_attempts.get((job_id, lease))

    claims = [(attempt_of(lease, calls), op) for lease, calls in by_lease.items()
              for op in calls if op.f == "claim"]
    for lease, calls in by_lease.items():
        mine = attempt_of(lease, calls)
        for newer_attempt, claim in claims:
            if claim.lease == lease or mine is None or newer_attempt is None:
                continue
            if newer_attempt <= mine or claim.done_ns is None:
                continue
            late = [op for op in calls if op.f != "claim" and op.invoked_ns > claim.done_ns]
            if late:
                report.stale_accepts.append(
                    f"job {job_id[:12]}: {late[0].f} with lease {lease[:8]} (attempt {mine}) "
                    f"accepted after attempt {newer_attempt} was claimed")


# -- database ----------------------------------------------------------------


@dataclass
class Database:
    jobs: dict[str, dict[str, Any]]
    attempts: dict[str, list[dict[str, Any]]]
    completed_events: Counter[str]
    event_kinds: dict[str, set[str]]

    @property
    def lease_attempts(self) -> dict[tuple[str, str], int]:
        """(job id, lease) -> the first attempt that lease was handed out for."""
        found: dict[tuple[str, str], int] = {}
        for job_id, rows in self.attempts.items():
            for row in rows:
                found.setdefault((job_id, row["lease"]), row["attempt"])
        return found


def read_database(db_path: Path, report: Report) -> Database | None:
    """The tables the checks need, read through a read-only connection after an integrity check."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        report.integrity.append(f"{db_path}: cannot open: {exc}")
        return None
    conn.row_factory = sqlite3.Row
    try:
        verdict = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if verdict != ["ok"]:
            report.integrity.extend(f"{db_path}: {line}" for line in verdict)
        jobs = {row["job_id"]: dict(row) for row in conn.execute("SELECT * FROM jobs")}
        attempts: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in conn.execute("SELECT * FROM attempts ORDER BY job_id, attempt"):
            attempts[row["job_id"]].append(dict(row))
        completed: Counter[str] = Counter()
        kinds: dict[str, set[str]] = defaultdict(set)
        for row in conn.execute("SELECT job_id, kind FROM events"):
            kinds[row["job_id"]].add(row["kind"])
            if row["kind"] == "completed":
                completed[row["job_id"]] += 1
    except sqlite3.Error as exc:
        report.integrity.append(f"{db_path}: cannot read: {exc}")
        return None
    finally:
        conn.close()
    report.figures["jobs"] = len(jobs)
    report.figures["status"] = dict(Counter(j["status"] for j in jobs.values()))
    return Database(jobs, attempts, completed, kinds)


def check_database(db: Database, job_ids: list[str], ops: list[Op], report: Report,
                   *, allow_live: bool = False) -> None:
    """Lost jobs and acknowledgements, double completions and budgets, from the final tables."""
    for job_id in job_ids:
        job = db.jobs.get(job_id)
        if job is None:
            report.lost_jobs.append(f"job {job_id[:12]}: in the manifest, not in the database")
        elif job["status"] in LIVE and not allow_live:
            report.lost_jobs.append(f"job {job_id[:12]}: still {job['status']} by "
                                    f"{job['worker_id']} at the end")
        elif job["status"] not in TERMINAL | LIVE | {"pending"}:
            report.lost_jobs.append(f"job {job_id[:12]}: unknown status {job['status']!r}")
    for job_id, job in db.jobs.items():
        rows = db.attempts.get(job_id, [])
        done = [r for r in rows if r["outcome"] == "completed"]
        if db.completed_events[job_id] > 1 or len(done) > 1:
            report.double_completions.append(
                f"job {job_id[:12]}: {db.completed_events[job_id]} 'completed' events, "
                f"{len(done)} completed attempts")
        if job["attempts_charged"] > job["max_attempts"]:
            report.over_limit.append(f"job {job_id[:12]}: {job['attempts_charged']} charged "
                                     f"attempts > max_attempts {job['max_attempts']}")
        if job["lost_count"] > job["max_lost"]:
            report.over_limit.append(f"job {job_id[:12]}: lost {job['lost_count']} times > "
                                     f"max_lost {job['max_lost']}")
        if len(rows) != job["attempts"]:
            report.lost_acks.append(f"job {job_id[:12]}: attempts = {job['attempts']} but "
                                    f"{len(rows)} attempt rows")
    for op in ops:
        if op.ok:
            problem = _unrecorded(op, db)
            if problem:
                report.lost_acks.append(f"job {str(op.job_id)[:12]}: {problem}")


def _unrecorded(op: Op, db: Database) -> str | None:
    """Why an acknowledged call is missing from the database, or None when it is there."""
    job = db.jobs.get(op.job_id or "")
    if op.f in ("claim", "heartbeat", "upload", "complete", "fail") and op.job_id:
        if job is None:
            return f"acknowledged {op.f} of a job the database does not have"
        leases = {r["lease"] for r in db.attempts.get(op.job_id, [])}
        if op.lease not in leases:
            return f"acknowledged {op.f} with lease {str(op.lease)[:8]} that no attempt has"
    if op.f == "complete" and job is not None:
        if job["status"] != "completed" or job["artifact_id"] != op.artifact_id:
            return (f"acknowledged complete with {str(op.artifact_id)[:12]}, but the job is "
                    f"{job['status']} with artifact {str(job['artifact_id'])[:12]}")
    if op.f == "fail" and job is not None:
        ended = [r for r in db.attempts.get(op.job_id or "", [])
                 if r["lease"] == op.lease and r["ended_at"] is not None]
        if not ended:
            return f"acknowledged fail, but no attempt of lease {str(op.lease)[:8]} ended"
    if op.f in ("cancel", "requeue") and op.job_id:
        kind = {"cancel": "cancelled", "requeue": "requeued"}[op.f]
        if kind not in db.event_kinds.get(op.job_id, set()):
            return f"acknowledged {op.f}, but the job has no '{kind}' event"
    return None


# -- store -------------------------------------------------------------------


def check_store(root: Path, needed: set[str | None], report: Report) -> None:
    """Every bundle hashes to its id and has one index row, and vice versa; no temp files."""
    tmp = root / ".tmp"
    if tmp.is_dir():
        report.temp_files.extend(str(p) for p in sorted(tmp.iterdir()))
    on_disk: dict[str, Path] = {}
    for path in sorted(root.glob("*/*/bundle.tar.*")):
        if path.name not in BUNDLE_NAMES:
            report.bad_artifacts.append(f"{path}: not a bundle name")
            continue
        artifact_id = path.parent.name
        on_disk[artifact_id] = path
        if sha256_file(path) != artifact_id:
            report.bad_artifacts.append(f"{path}: bytes do not hash to {artifact_id[:12]}")
    indexed = read_index(root / "index.jsonl", report)
    report.index_without_file.extend(f"index row {a[:12]}: no bundle file"
                                     for a in sorted(indexed - set(on_disk)))
    report.file_without_index.extend(f"{on_disk[a]}: no index row"
                                     for a in sorted(set(on_disk) - indexed))
    report.missing_artifacts.extend(f"artifact {a[:12]}: acknowledged or completed, not stored"
                                    for a in sorted(x for x in needed if x) if a not in on_disk)
    report.figures["artifacts"] = len(on_disk)


def read_index(path: Path, report: Report) -> set[str]:
    if not path.exists():
        return set()
    ids: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            ids.add(json.loads(line)["artifact_id"])
        except (ValueError, KeyError, TypeError):
            report.index_without_file.append(f"{path}:{number}: not an index row")
    return ids


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
