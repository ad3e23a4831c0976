"""Group commit on SQLite: the hot calls of one turn of the event loop share one COMMIT, and
none of them returns before it is done. Watched from a second connection to the same file,
which sees only what is committed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cpu, job, make_manifest
from trainfleet.errors import LeaseLost
from trainfleet.queue.base import Status
from trainfleet.queue.sqlite import SqliteQueue


def committed(path: Path) -> dict[str, str]:
    """Each job's status as a separate connection sees it: only what is committed."""
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, status FROM jobs").fetchall())


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

    async def claim(worker: str) -> None:
        async with queue.grouped():
            claimed = queue.claim_next(worker, cpu(worker))
            assert claimed is not None
            outcomes[worker] = claimed.job.name

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
from tests.conftest import cpu

queue = SqliteQueue(sys.argv[1])
with sqlite3.connect(sys.argv[1]) as other:
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL is empty: the COMMIT grows it
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
errors = []

async def claim(worker):
    try:
        async with queue.grouped():
            queue.claim_next(worker, cpu(worker))
    except Exception as exc:
        errors.append(type(exc).__name__)

async def main():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    await asyncio.gather(*(claim(f"w{i}") for i in range(4)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

asyncio.run(main())
after = queue.claim_next("w9", cpu("w9"))  # the queue is usable again
print(json.dumps({"errors": errors, "counts": queue.counts(), "after": after.job.name}))
"""


def test_a_failed_commit_fails_every_member_and_keeps_nothing(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    loaded(path, 4).close()
    done = subprocess.run([sys.executable, "-c", FULL_DISK_AT_COMMIT, str(path)],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["errors"] == ["OperationalError"] * 4  # the disk is full: all four told
    assert answer["counts"]["claimed"] == 1 and answer["after"] == "j0"  # j0 was pending again
    assert list(committed(path).values()).count("claimed") == 1
