"""Group commit on SQLite: the hot calls of one turn of the event loop share one COMMIT, and
none of them returns before it is done. Watched from a second connection to the same file,
which sees only what is committed."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cpu, job, make_manifest, manifest_text
from tests.live import serving_app
from trainfleet.client import Client
from trainfleet.errors import LeaseLost
from trainfleet.queue.base import Status
from trainfleet.queue.sqlite import SqliteQueue
from trainfleet.receiver import ReceiverSettings, create_app


def committed(path: Path) -> dict[str, str]:
    """Each job's status as a separate connection sees it: only what is committed."""
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, status FROM jobs").fetchall())


def run_script(script: str, path: Path) -> dict[str, Any]:
    """Run `script` on the database in a Python of its own (a file size limit must not
    reach this process); what it printed, as JSON."""
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def loaded(path: Path, count: int) -> SqliteQueue:
    queue = SqliteQueue(path)
    queue.sync_manifest(make_manifest([job(f"j{i}", seed=i) for i in range(count)]))
    return queue


def test_a_turns_claims_are_committed_together_before_any_returns(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    queue = loaded(path, 16)
    seen_inside: list[int] = []
    seen_on_return: list[int] = []

    async def claim(worker: str) -> str:
        async with queue.grouped():
            claimed = queue.claim_next(worker, cpu(worker))
            assert claimed is not None
            seen_inside.append(list(committed(path).values()).count("claimed"))
        seen_on_return.append(list(committed(path).values()).count("claimed"))
        return claimed.job.name

    async def main() -> list[str]:
        return await asyncio.gather(*(claim(f"w{i}") for i in range(16)))

    names = asyncio.run(main())
    assert sorted(names) == sorted(f"j{i}" for i in range(16))
    assert seen_inside == [0] * 16  # written, not yet committed: nobody was answered
    assert seen_on_return == [16] * 16  # one COMMIT made all sixteen durable at once
    assert queue.counts()["claimed"] == 16
    queue.close()


def test_a_failing_call_in_a_group_changes_nothing_and_spares_the_others(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    queue = loaded(path, 3)
    first = queue.claim_next("w0", cpu("w0"))
    assert first is not None
    outcomes: dict[str, object] = {}

    inside: list[dict[str, str]] = []

    async def claim(worker: str) -> None:
        async with queue.grouped():
            claimed = queue.claim_next(worker, cpu(worker))
            assert claimed is not None
            outcomes[worker] = claimed.job.name
            await asyncio.sleep(0)  # the others write meanwhile
            inside.append(committed(path))

    async def wrong_lease() -> None:
        try:
            async with queue.grouped():
                queue.complete(first.job.job_id, "not-the-lease", "e" * 64)
        except LeaseLost as exc:
            outcomes["wrong"] = exc

    async def main() -> None:
        await asyncio.gather(claim("w1"), wrong_lease(), claim("w2"))

    asyncio.run(main())
    assert isinstance(outcomes["wrong"], LeaseLost)
    # All three wrote in one group: the failure was rolled back to its savepoint alone.
    assert inside == [{"j0": "claimed", "j1": "pending", "j2": "pending"}] * 2
    assert committed(path) == {"j0": "claimed", "j1": "claimed", "j2": "claimed"}
    assert queue.get(first.job.job_id).status is Status.CLAIMED
    assert [e.kind for e in queue.history(first.job.job_id)].count("completed") == 0
    queue.close()


def test_a_write_outside_the_group_commits_it_first_even_from_a_thread(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    queue = loaded(path, 2)
    before: list[dict[str, str]] = []

    async def main() -> None:
        async with queue.grouped():
            claimed = queue.claim_next("w0", cpu("w0"))
            assert claimed is not None
            before.append(committed(path))
            # A thread inherits the request's context but is not part of its group: its
            # cancel is a transaction of its own, which first commits the open group.
            other = next(j for j in queue.list_jobs() if j.job_id != claimed.job.job_id)
            await asyncio.to_thread(queue.cancel, other.job_id)
            before.append(committed(path))

    asyncio.run(main())
    assert before[0] == {"j0": "pending", "j1": "pending"}
    assert before[1] == {"j0": "claimed", "j1": "cancelled"}
    queue.close()


def test_a_cancelled_request_does_not_cancel_the_commit_of_the_others(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    queue = loaded(path, 2)
    returned: list[str] = []

    async def claim(worker: str) -> None:
        async with queue.grouped():
            claimed = queue.claim_next(worker, cpu(worker))
            assert claimed is not None
        returned.append(worker)

    async def main() -> None:
        doomed = asyncio.create_task(claim("w0"))
        kept = asyncio.create_task(claim("w1"))
        await asyncio.sleep(0)  # both have written and wait for the COMMIT
        doomed.cancel()
        await kept
        with pytest.raises(asyncio.CancelledError):
            await doomed

    asyncio.run(main())
    assert returned == ["w1"]
    assert committed(path) == {"j0": "claimed", "j1": "claimed"}  # its write was kept
    queue.close()


FULL_DISK_AT_COMMIT = r"""
import asyncio, json, resource, signal, sqlite3, sys
from trainfleet.queue.sqlite import SqliteQueue
from trainfleet.receiver import ReceiverSettings, create_app
from tests.conftest import cpu

queue = SqliteQueue(sys.argv[1])
with sqlite3.connect(sys.argv[1]) as other:
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL is empty: the COMMIT grows it
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
errors = []

inside = []

async def claim(worker):
    try:
        async with queue.grouped():
            queue.claim_next(worker, cpu(worker))
            with sqlite3.connect(sys.argv[1]) as other:  # written, and not yet committed
                inside.append(other.execute(
                    "SELECT count(*) FROM jobs WHERE status = 'claimed'").fetchone()[0])
    except Exception as exc:
        errors.append(type(exc).__name__)

async def main():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    await asyncio.gather(*(claim(f"w{i}") for i in range(4)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

asyncio.run(main())
after = queue.claim_next("w9", cpu("w9"))  # the queue is usable again
print(json.dumps({"errors": errors, "inside": inside, "counts": queue.counts(),
                  "after": after.job.name}))
"""


def test_a_failed_commit_fails_every_member_and_keeps_nothing(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    loaded(path, 4).close()
    answer = run_script(FULL_DISK_AT_COMMIT, path)
    assert answer["inside"] == [0] * 4  # one group: the COMMIT was still to come
    assert answer["errors"] == ["OperationalError"] * 4  # the disk is full: all four told
    assert answer["counts"]["claimed"] == 1 and answer["after"] == "j0"  # j0 was pending again
    assert list(committed(path).values()).count("claimed") == 1


FULL_DISK_MID_WRITE = r"""
import asyncio, json, resource, signal, sqlite3, sys
from trainfleet.queue.sqlite import SqliteQueue
from trainfleet.receiver import ReceiverSettings, create_app
from tests.conftest import cpu

queue = SqliteQueue(sys.argv[1])
with sqlite3.connect(sys.argv[1]) as other:
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
queue._db.execute("PRAGMA cache_size = 1")  # the write spills pages to the WAL mid-statement
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
told = {}

async def claim(worker, full_disk=False):
    try:
        async with queue.grouped():
            if full_disk:
                resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
            try:
                queue.claim_next(worker, cpu(worker))
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        told[worker] = "ok"
    except Exception as exc:
        told[worker] = str(exc)

async def main():
    await asyncio.gather(claim("a"), claim("b", full_disk=True), claim("c"))

asyncio.run(main())
after = queue.claim_next("z", cpu("z"))
print(json.dumps({"told": told, "counts": queue.counts(), "after": after.job.name}))
"""


def test_a_write_that_fails_the_whole_transaction_fails_its_group_with_its_error(
    tmp_path: Path,
) -> None:
    """A full disk mid-statement makes SQLite roll back the whole transaction, not just the
    savepoint: every member so far is told the real error, and nothing of the group stays."""
    path = tmp_path / "q.db"
    loaded(path, 300).close()
    answer = run_script(FULL_DISK_MID_WRITE, path)
    assert answer["told"]["a"] == answer["told"]["b"] != "ok", answer
    assert "full" in answer["told"]["b"] or "disk" in answer["told"]["b"], answer
    assert "cannot commit" not in json.dumps(answer)
    # c wrote after the failure, in a group of its own, and was committed.
    assert answer["told"]["c"] == "ok"
    assert answer["counts"]["claimed"] == 2 and answer["after"] == "j1"
    assert sorted(committed(path).values()).count("claimed") == 2


def test_a_read_sees_only_what_is_committed_or_waits_for_it(tmp_path: Path) -> None:
    """A read outside the group commits it first; a grouped request that only reads waits
    for the group whose writes it saw."""
    path = tmp_path / "q.db"
    queue = loaded(path, 1)
    job_id = queue.list_jobs()[0].job_id
    seen: dict[str, object] = {}

    async def writer() -> None:
        async with queue.grouped():
            queue.claim_next("w0", cpu("w0"))

    async def outside_reader() -> None:
        seen["outside"] = queue.get(job_id).status.value
        seen["outside, committed"] = committed(path)["j0"]

    async def grouped_reader() -> None:
        async with queue.grouped():
            seen["grouped"] = queue.get(job_id).status.value
            seen["grouped, before its answer"] = committed(path)["j0"]
        seen["grouped, at its answer"] = committed(path)["j0"]

    async def canceller() -> None:
        async with queue.grouped():
            queue.cancel(job_id)

    async def main() -> None:
        await asyncio.gather(writer(), grouped_reader())
        await asyncio.gather(canceller(), outside_reader())

    asyncio.run(main())
    assert seen["grouped"] == "claimed"
    assert seen["grouped, before its answer"] == "pending"
    assert seen["grouped, at its answer"] == "claimed"
    assert seen["outside"] == "cancelled"  # it saw the group's write: committed first
    assert seen["outside, committed"] == "cancelled"
    queue.close()


def test_closing_the_queue_commits_the_open_group(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    queue = loaded(path, 1)

    async def main() -> str:
        async with queue.grouped():
            claimed = queue.claim_next("w0", cpu("w0"))
            assert claimed is not None
            queue.close()  # a receiver shutting down
        return committed(path)["j0"]

    assert asyncio.run(main()) == "claimed"


def test_the_receivers_hot_calls_share_commits_and_answer_only_committed_state(
    tmp_path: Path,
) -> None:
    """Sixteen workers at once through a real receiver: fewer COMMITs than calls, and every
    acknowledged completion is on disk with exactly one claim and one completion."""
    manifest = tmp_path / "jobs.toml"
    manifest.write_text(manifest_text([job(f"j{i}", seed=i) for i in range(49)]))
    app = create_app(ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state",
                                      worker_token="wt"))
    queue = app.state.receiver.queue
    statements: list[str] = []
    with serving_app(app) as (host, port):
        client = Client(f"http://{host}:{port}", worker_token="wt", retries=0)
        setup = client.claim("setup", cpu("setup").to_dict())
        assert setup is not None
        bundle = tmp_path / "b.tar.gz"
        bundle.write_bytes(gzip.compress(b"group commit", mtime=0))
        artifact = hashlib.sha256(bundle.read_bytes()).hexdigest()
        client.upload(artifact, bundle, setup["job"]["job_id"], setup["lease"])
        client.complete(setup["job"]["job_id"], setup["lease"], artifact, {})
        queue._db.set_trace_callback(statements.append)  # watched, not changed
        start = threading.Barrier(16)
        done: list[str] = []

        def work(n: int) -> None:
            worker = Client(f"http://{host}:{port}", worker_token="wt", retries=0)
            start.wait()
            for _ in range(3):
                claim = worker.claim(f"w{n}", cpu(f"w{n}").to_dict())
                assert claim is not None
                job_id, lease = claim["job"]["job_id"], claim["lease"]
                worker.heartbeat(job_id, lease)
                worker.complete(job_id, lease, artifact, {})
                done.append(job_id)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        queue._db.set_trace_callback(None)
    assert len(done) == len(set(done)) == 48
    commits = sum(s.strip().upper() == "COMMIT" for s in statements)
    assert 0 < commits < 3 * 48  # without group commit: one per call
    with sqlite3.connect(tmp_path / "state" / "queue.db") as db:
        rows = dict(db.execute(
            "SELECT job_id, count(*) FROM events WHERE kind = 'completed' GROUP BY job_id"))
        claims = dict(db.execute(
            "SELECT job_id, count(*) FROM events WHERE kind = 'claimed' GROUP BY job_id"))
    assert all(rows[job_id] == 1 and claims[job_id] == 1 for job_id in done)
