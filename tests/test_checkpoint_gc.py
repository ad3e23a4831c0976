"""Checkpoint pruning: the receiver deletes the checkpoints no job can resume from once unused
for the grace period, and nothing a job may still need. The queue on both backends, the local
and shared stores' deletes (tombstones, crash recovery, last row wins), real receivers on both
backends, an S3 store on moto that never prunes, and real receiver and worker processes."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import test_store_s3 as s3t
from tests.conftest import cpu, job, make_manifest, manifest_text
from tests.fleet import Fleet, wait_for
from tests.live import serving_app
from tests.test_checkpoint import CPU_A, STEP_TRAINER, step_receiver
from tests.test_fleet import SIGTERM_EXIT
from tests.test_store import gzip_bundle, index_rows, upload
from trainfleet import bundle
from trainfleet.cli import main
from trainfleet.client import Client
from trainfleet.errors import ArtifactNotFound, ReceiverError, TrainfleetError
from trainfleet.queue import open_queue
from trainfleet.queue.base import JobQueue, Status
from trainfleet.receiver import ReceiverSettings, create_app, pruning
from trainfleet.receiver.state import ReceiverState
from trainfleet.store import LocalStore, SharedStore
from trainfleet.store.shared import READS_TOMBSTONES as MARK

if sys.platform != "win32":
    import fcntl
    import resource
    import signal

T0 = 1_800_000_000.0
GRACE = 3600.0
OPERATOR_TOKEN = "gc-operator-token"

moto_url = s3t.moto_url  # test_store_s3's fixtures: a moto server on loopback, a fresh bucket
bucket = s3t.bucket


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def ckpt(n: int) -> str:
    return f"{n:064x}"


@contextmanager
def file_size_limit(index: Path, extra: int) -> Iterator[None]:
    """RLIMIT_FSIZE just past the index's size: the next append is cut short part-way (EFBIG
    after a short write), as a disk or a quota that fills up during the write cuts it."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (index.stat().st_size + extra, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


def hold_flock(path: Path) -> Callable[[], None]:
    """Take an exclusive flock on `path`, as another receiver would; its release, which may
    be called any number of times."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            os.close(fd)

    return release


@contextmanager
def holding_flock(path: Path) -> Iterator[None]:
    release = hold_flock(path)
    try:
        yield
    finally:
        release()


def flock_waiters(path: Path) -> int:
    """How many flock calls on `path` wait now (Linux: /proc/locks marks them `->`)."""
    inode = f":{path.stat().st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if " -> FLOCK " in line and inode in line)


posix_only = pytest.mark.skipif(sys.platform == "win32",
                                reason="RLIMIT_FSIZE, flock: POSIX only")
needs_proc_locks = pytest.mark.skipif(not Path("/proc/locks").exists(),
                                      reason="Linux: /proc/locks shows who waits for a flock")


# -- the queue (both backends) -------------------------------------------------


def test_in_use_are_every_jobs_artifact_and_the_checkpoints_of_jobs_not_completed(
    queue: JobQueue,
) -> None:
    names = ["running", "done", "failed", "cancelled", "untouched"]
    queue.sync_manifest(make_manifest([job(n, max_attempts=1) for n in names]), now=T0)
    assert queue.artifacts_in_use() == set()
    claims = {}
    for n in range(len(names)):
        claim = queue.claim_next(f"w{n}", cpu(f"h{n}"), now=T0 + 1)
        assert claim is not None
        claims[claim.job.name] = claim
    for n, name in enumerate(names[:4], start=1):
        queue.record_checkpoint(claims[name].job.job_id, claims[name].lease, ckpt(n), T0 + 2)
    running, done = claims["running"], claims["done"]
    queue.record_checkpoint(running.job.job_id, running.lease, ckpt(9), T0 + 3)  # the newer
    queue.complete(done.job.job_id, done.lease, ckpt(10), now=T0 + 4)
    queue.fail(claims["failed"].job.job_id, claims["failed"].lease, "boom", retryable=False,
               now=T0 + 4)
    queue.cancel(claims["cancelled"].job.job_id, now=T0 + 4)
    statuses = {j.name: j.status for j in queue.list_jobs()}
    assert statuses["done"] == Status.COMPLETED and statuses["failed"] == Status.FAILED
    assert statuses["cancelled"] == Status.CANCELLED
    # the running job's newer checkpoint, the completed job's model, and the checkpoints of
    # the failed and cancelled jobs (a requeue resumes from them); not ckpt(1) nor ckpt(2)
    assert queue.artifacts_in_use() == {ckpt(9), ckpt(10), ckpt(3), ckpt(4)}


# -- the filesystem stores --------------------------------------------------------

StoreFactory = Callable[..., LocalStore]


@pytest.fixture(params=["local", "shared"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Each filesystem store kind on one root, as a factory: a second call is a restart (or,
    for a shared store, another receiver)."""
    opened: list[LocalStore] = []

    def make(clock: Callable[[], float] = time.time) -> LocalStore:
        root = tmp_path / "models"
        store = LocalStore(root, clock) if request.param == "local" else SharedStore(root, clock)
        opened.append(store)
        return store

    yield make
    for store in opened:
        if isinstance(store, SharedStore):
            store.close()


def leftovers(root: Path) -> list[Path]:
    """What lies in the temp dirs: nothing once deletes and uploads are done."""
    return [p for p in (root / ".tmp").rglob("*") if p.name not in (".owner", MARK) and not (
        p.is_dir() and any(q.name == ".owner" for q in p.iterdir()))]


def test_the_grace_period_runs_from_the_last_use_by_the_stores_clock(
    open_store: StoreFactory,
) -> None:
    clock = Clock(T0)
    store = open_store(clock)
    checkpoint_id, data = gzip_bundle(b"step 1")
    model_id, model = gzip_bundle(b"final")
    assert upload(store, data, kind="checkpoint") and upload(store, model)
    assert store.path(checkpoint_id).stat().st_mtime == T0  # placed: its first use
    clock.at = T0 + GRACE - 1
    assert store.delete_if_unused(checkpoint_id, GRACE) is False
    assert store.mark_used(checkpoint_id) is True  # e.g. recorded again by its job
    clock.at = T0 + 2 * GRACE - 2
    assert store.delete_if_unused(checkpoint_id, GRACE) is False  # its row is older, not its use
    clock.at = T0 + 2 * GRACE - 1
    assert store.delete_if_unused(checkpoint_id, GRACE) is True
    clock.at = T0 + 100 * GRACE
    assert store.delete_if_unused(model_id, GRACE) is False  # a model is never deleted
    assert store.has(model_id)
    assert store.mark_used(checkpoint_id) is False  # gone: a use must upload it again


def test_a_delete_forgets_the_artifact_at_once_and_for_good(
    open_store: StoreFactory, tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    store = open_store()
    other = open_store() if isinstance(store, SharedStore) else store  # one owner: local
    gone, data = gzip_bundle(b"old checkpoint")
    kept, newer = gzip_bundle(b"new checkpoint")
    assert upload(store, data, kind="checkpoint") and upload(store, newer, kind="checkpoint")
    assert other.has(gone)
    folder = store.path(gone).parent
    assert other.delete_if_unused(gone, 0) is True
    for seen in (store, other):  # a shared store's other receivers too, at their next look
        assert not seen.has(gone)
        assert [r["artifact_id"] for r in seen.entries()] == [kept]
        with pytest.raises(ArtifactNotFound):
            seen.path(gone)
        assert seen.delete_if_unused(gone, 0) is False  # twice: nothing to do, no error
    assert not folder.exists() and leftovers(root) == []
    tombstone = index_rows(root)[-1]
    assert tombstone["artifact_id"] == gone and "deleted_at" in tombstone

    again = open_store()  # a restart reads the tombstone, and neither serves nor repairs it
    assert not again.has(gone) and again.has(kept)
    assert len(index_rows(root)) == 3

    assert upload(again, data, kind="checkpoint") is True  # the same bytes: stored anew
    assert index_rows(root)[-1]["artifact_id"] == gone and "deleted_at" not in index_rows(
        root)[-1]
    assert open_store().path(gone).read_bytes() == data


def test_a_crash_between_tombstone_and_removal_is_finished_at_the_next_start(
    open_store: StoreFactory, tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    store = open_store()
    gone, data = gzip_bundle(b"a checkpoint whose delete was cut short")
    assert upload(store, data, kind="checkpoint")
    folder = store.path(gone).parent
    with open(root / "index.jsonl", "a") as fh:  # the tombstone written, the bundle left
        fh.write(json.dumps({"artifact_id": gone, "model": "gbt", "mode": "realistic",
                             "kind": "checkpoint", "deleted_at": "2027-01-15T08:00:00+00:00",
                             "last_used_ns": store.path(gone).stat().st_mtime_ns}) + "\n")
    rows = len(index_rows(root))

    restarted = open_store()
    assert not restarted.has(gone) and restarted.entries() == []
    with pytest.raises(ArtifactNotFound):
        restarted.path(gone)
    assert not folder.exists() and leftovers(root) == []  # the delete is finished
    assert len(index_rows(root)) == rows  # not taken for an unindexed bundle and repaired

    assert upload(restarted, data, kind="checkpoint") is True  # uploaded again: served again
    assert restarted.path(gone).read_bytes() == data
    assert open_store().path(gone).read_bytes() == data


def test_a_bundle_stored_again_after_its_tombstone_without_a_row_is_kept_as_a_model(
    open_store: StoreFactory, tmp_path: Path,
) -> None:
    """A receiver of an earlier release (or one rolled back to) reads an id's first row and no
    tombstone: storing the bytes again after a delete, it places the bundle and appends no
    row. The next start must not take that bundle for a delete to finish."""
    root = tmp_path / "models"
    clock = Clock(time.time() - 3 * GRACE)  # before the earlier release's upload, below
    store = open_store(clock)
    again, data = gzip_bundle(b"deleted, then stored again by an earlier release")
    legacy, legacy_data = gzip_bundle(b"under a tombstone of the reverted first version")
    assert upload(store, data, kind="checkpoint") and upload(store, legacy_data,
                                                             kind="checkpoint")
    target, legacy_target = store.path(again), store.path(legacy)
    used_ns = target.stat().st_mtime_ns
    clock.at += 2 * GRACE
    assert store.delete_if_unused(again, GRACE) and not target.exists()
    assert index_rows(root)[-1]["last_used_ns"] == used_ns
    target.parent.mkdir()
    target.write_bytes(data)  # what the earlier release's upload leaves: no row
    with open(root / "index.jsonl", "a") as fh:  # a tombstone without last_used_ns
        fh.write(json.dumps({"artifact_id": legacy, "model": "gbt", "mode": "realistic",
                             "kind": "checkpoint", "deleted_at": "2026-11-28T16:00:00+00:00"})
                 + "\n")

    restarted = open_store()
    for artifact_id, path, content in ((again, target, data), (legacy, legacy_target,
                                                               legacy_data)):
        assert restarted.path(artifact_id).read_bytes() == content and path.exists()
        assert restarted.entry(artifact_id)["kind"] == "model"  # the safe kind: never pruned
        assert restarted.delete_if_unused(artifact_id, 0) is False
    assert [r["artifact_id"] for r in index_rows(root)[-2:]] == sorted([again, legacy])
    assert {r["artifact_id"] for r in open_store().entries()} == {again, legacy}


def test_a_deleted_folder_moved_aside_is_removed_by_the_next_start(tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = LocalStore(root)
    gone, data = gzip_bundle(b"moved aside, then the receiver stopped")
    assert upload(store, data, kind="checkpoint")
    folder = store.path(gone).parent
    folder.rename(root / ".tmp" / f"{gone}.0123abcd.deleted")
    assert LocalStore(root).purge_temp() == 1  # what the receiver's start does
    assert list((root / ".tmp").iterdir()) == []


def test_the_last_index_row_of_an_artifact_wins(
    open_store: StoreFactory, tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    store = open_store()
    artifact_id, data = gzip_bundle(b"indexed twice")
    assert upload(store, data, kind="checkpoint")
    reader = open_store()  # opened before the second row: a shared store refreshes
    with open(root / "index.jsonl", "a") as fh:
        fh.write(json.dumps({**index_rows(root)[0], "job_id": "job-2", "host": "cpu-b"}) + "\n")
    assert open_store().entry(artifact_id)["job_id"] == "job-2"
    if isinstance(reader, SharedStore):
        assert reader.entry(artifact_id)["job_id"] == "job-2"


def test_a_model_upload_makes_a_stored_checkpoint_a_model_for_good(
    open_store: StoreFactory, tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    store = open_store()
    both, data = gzip_bundle(b"a checkpoint and a model alike")
    assert upload(store, data, kind="checkpoint") is True
    assert upload(store, data, kind="model") is False  # already stored: re-kinded
    assert store.entry(both)["kind"] == "model"
    assert [r["kind"] for r in index_rows(root)] == ["checkpoint", "model"]
    assert upload(store, data, kind="checkpoint") is False  # never back
    assert store.mark_used(both, "checkpoint") is True
    assert len(index_rows(root)) == 2
    assert store.delete_if_unused(both, 0) is False
    restarted = open_store()
    assert restarted.entry(both)["kind"] == "model"
    assert restarted.delete_if_unused(both, 0) is False
    with open(root / "index.jsonl", "a") as fh:  # a checkpoint row after a model row
        fh.write(json.dumps({**index_rows(root)[0], "kind": "checkpoint"}) + "\n")
    assert open_store().entry(both)["kind"] == "model"  # every row must say checkpoint


def test_a_bundle_folder_linked_outside_the_root_is_not_deleted(tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "elsewhere"
    store = LocalStore(root)
    artifact_id, data = gzip_bundle(b"a checkpoint")
    assert upload(store, data, kind="checkpoint")
    folder = store.path(artifact_id).parent
    outside.mkdir()
    folder.rename(outside / artifact_id)
    folder.symlink_to(outside / artifact_id, target_is_directory=True)
    linked = LocalStore(root)
    with pytest.raises(TrainfleetError, match="not deleted"):
        linked.delete_if_unused(artifact_id, 0)
    assert (outside / artifact_id / "bundle.tar.gz").read_bytes() == data
    assert linked.has(artifact_id) and "deleted_at" not in index_rows(root)[-1]


def test_one_failed_deletion_is_logged_and_the_others_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(T0)
    store = LocalStore(tmp_path / "models", clock)
    queue = open_queue(f"sqlite:///{tmp_path / 'queue.db'}")
    refused, data = gzip_bundle(b"linked away")
    pruned, other = gzip_bundle(b"plain")
    assert upload(store, data, kind="checkpoint") and upload(store, other, kind="checkpoint")
    folder = store.path(refused).parent
    (tmp_path / "elsewhere").mkdir()
    folder.rename(tmp_path / "elsewhere" / refused)
    folder.symlink_to(tmp_path / "elsewhere" / refused, target_is_directory=True)
    clock.at += 2 * GRACE
    with caplog.at_level(logging.INFO, logger="trainfleet.receiver"):
        deleted = pruning.prune_checkpoints(store, queue, GRACE)
    assert [row["artifact_id"] for row in deleted] == [pruned]
    assert store.has(refused) and not store.has(pruned)
    assert any(refused[:12] in r.message and r.levelno == logging.ERROR for r in caplog.records)
    assert any(pruned[:12] in r.message and "job-1" in r.message and str(len(other))
               in r.message for r in caplog.records if r.levelno == logging.INFO)
    queue.close()


@posix_only
def test_a_cut_short_row_after_a_tombstone_leaves_no_torn_line_and_loses_no_upload(
    open_store: StoreFactory, tmp_path: Path,
) -> None:
    """A full disk cuts the live row of a re-upload after a delete part-way. The torn part
    is cut back off; the upload, acknowledged, is served by this receiver and after a restart
    (kept as a model, since its row never made it to disk)."""
    root = tmp_path / "models"
    store = open_store()
    x, data = gzip_bundle(b"a checkpoint deleted, then uploaded again")
    assert upload(store, data, kind="checkpoint")
    assert store.delete_if_unused(x, 0)
    before = (root / "index.jsonl").read_bytes()
    up = store.begin_upload(x, 1 << 20)
    up.write(data)  # streamed before the disk filled
    with file_size_limit(root / "index.jsonl", 20):
        assert up.commit(job_id="j", model="gbt", mode="realistic", host="h",
                         kind="checkpoint") is True
    assert (root / "index.jsonl").read_bytes() == before  # no torn line
    assert store.path(x).read_bytes() == data
    restarted = open_store()
    assert restarted.path(x).read_bytes() == data
    assert restarted.entry(x)["kind"] == "model"


@posix_only
def test_a_failed_append_leaves_nothing_for_the_next_row_to_be_glued_to(
    open_store: StoreFactory, tmp_path: Path,
) -> None:
    """The re-kind row of a model upload fails part-way (only logged); then a checkpoint
    deleted a moment before is uploaded again. Its live row must follow the tombstone whole,
    or the next start (and the other receivers) take the tombstone for the last word."""
    root = tmp_path / "models"
    store = open_store()
    keep, keep_data = gzip_bundle(b"some checkpoint")
    x, data = gzip_bundle(b"a checkpoint deleted, then uploaded again")
    assert upload(store, keep_data, kind="checkpoint") and upload(store, data, kind="checkpoint")
    assert store.delete_if_unused(x, 0)
    before = (root / "index.jsonl").read_bytes()
    with file_size_limit(root / "index.jsonl", 20):
        assert store.mark_used(keep, "model")  # the re-kind row fails part-way: logged only
    assert (root / "index.jsonl").read_bytes() == before
    assert upload(store, data, kind="checkpoint") is True
    assert [r.get("deleted_at") is None for r in index_rows(root)] == [True, True, False, True]
    assert open_store().path(x).read_bytes() == data


@posix_only
def test_a_torn_line_a_dead_receiver_left_does_not_swallow_the_next_row(
    tmp_path: Path,
) -> None:
    """A receiver killed mid-append leaves a torn line at the end of a shared index. The next
    row (here a tombstone) is not glued onto it: every receiver reads it."""
    root = tmp_path / "models"
    a, b = SharedStore(root), SharedStore(root)
    try:
        x, data = gzip_bundle(b"a checkpoint")
        assert upload(a, data, kind="checkpoint") and b.has(x)
        with open(root / "index.jsonl", "ab") as fh:
            fh.write(b'{"artifact_id": "')  # the dead receiver's torn line
        assert a.delete_if_unused(x, 0)
        assert not b.has(x), "the other receiver missed the tombstone"
        assert upload(b, data, kind="checkpoint") is True
        assert a.has(x)
    finally:
        a.close()
        b.close()
    assert LocalStore(root).path(x).read_bytes() == data


@posix_only
def test_nothing_is_deleted_while_a_receiver_of_an_earlier_release_shares_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """An earlier release reads no tombstone: it would answer that it holds what another
    receiver deleted (a worker then skips the upload, and a job names a missing artifact).
    Its temp dir lacks the mark this release leaves in its own."""
    root = tmp_path / "models"
    new = SharedStore(root)
    x, data = gzip_bundle(b"a checkpoint")
    assert upload(new, data, kind="checkpoint")
    bundle = new.path(x)
    earlier = root / ".tmp" / "earlier-receiver"
    earlier.mkdir()
    gone = root / ".tmp" / "stopped-earlier-receiver"  # an earlier one, stopped: no lock held
    gone.mkdir()
    (gone / ".owner").touch()
    try:
        with holding_flock(earlier / ".owner"):  # what an earlier release holds while it runs
            assert new.delete_if_unused(x, 0) is False
            assert new.delete_if_unused(x, 0) is False
            assert new.has(x)
            warned = [m for m in caplog.messages if "earlier-receiver, of an earlier" in m]
            assert len(warned) == 1 and "stopped-earlier" not in warned[0]
            # nor does a start finish a delete that a crash cut short meanwhile
            with open(root / "index.jsonl", "a") as fh:
                fh.write(json.dumps({**index_rows(root)[0], "deleted_at": "2027-01-01",
                                     "last_used_ns": bundle.stat().st_mtime_ns}) + "\n")
            restarted = SharedStore(root)
            assert not restarted.has(x) and bundle.exists()  # not served, not removed
            restarted.close()
        restarted = SharedStore(root)  # the earlier release stopped: the delete is finished
        assert not restarted.has(x) and not bundle.exists()
        restarted.close()
        assert upload(new, data, kind="checkpoint") is True
        assert new.delete_if_unused(x, 0) is True  # the earlier release is gone
    finally:
        new.close()


def _running_job(queue: JobQueue) -> Any:
    queue.sync_manifest(make_manifest([job("train")]), now=T0)
    claim = queue.claim_next("w", cpu("h"), now=T0)
    assert claim is not None
    return claim


def test_a_checkpoint_used_after_the_prune_listed_it_is_kept_however_late_the_delete(
    queue: JobQueue, tmp_path: Path,
) -> None:
    """The prune's delete loop reaches a checkpoint long after it read the jobs (a slow NFS, a
    host suspended mid-prune, an NTP step forward): by then the job may have recorded it again,
    after using it. The use is seen, whatever the clock says."""
    clock = Clock(T0)
    store = LocalStore(tmp_path / "models", clock)
    claim = _running_job(queue)
    old, old_data = gzip_bundle(b"old checkpoint")
    newer, newer_data = gzip_bundle(b"newer")
    for made, data in ((old, old_data), (newer, newer_data)):
        assert upload(store, data, kind="checkpoint")
        queue.record_checkpoint(claim.job.job_id, claim.lease, made, T0)  # `old` superseded
    clock.at = T0 + 2 * GRACE
    planned = pruning.plan(store, queue)
    assert [r["artifact_id"] for r in planned] == [old]
    # The trainer's next checkpoint has `old`'s bytes: the checkpoint route uses, then records.
    assert store.mark_used(old)
    queue.record_checkpoint(claim.job.job_id, claim.lease, old, T0 + 1)
    os.utime(store.path(old), (T0, T0))  # even if the use was stamped by a clock far behind
    assert pruning.delete_unused(store, planned, GRACE, monotonic=lambda: planned.read_mono) == []
    assert queue.get(claim.job.job_id).checkpoint_id == old and store.has(old)


@posix_only
def test_receivers_clocks_apart_do_not_delete_a_checkpoint_just_recorded(
    queue: JobQueue, tmp_path: Path,
) -> None:
    """Receiver B's clock runs more than the grace period behind A's. B uses a checkpoint (its
    mtime: B's now) and records it after A's prune read the jobs: A must not delete it."""
    root = tmp_path / "models"
    a_clock, b_clock = Clock(T0 + GRACE + 60), Clock(T0)
    a, b = SharedStore(root, a_clock), SharedStore(root, b_clock)
    try:
        claim = _running_job(queue)
        old, data = gzip_bundle(b"old checkpoint")
        assert upload(b, data, kind="checkpoint")
        b_clock.at -= 10
        planned = pruning.plan(a, queue)
        assert [r["artifact_id"] for r in planned] == [old]
        assert b.mark_used(old)
        queue.record_checkpoint(claim.job.job_id, claim.lease, old, T0)
        assert pruning.delete_unused(a, planned, GRACE) == []
        assert b.has(old) and a.has(old)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("step", ["wall", "monotonic"])
def test_a_prune_stops_once_grace_over_two_has_passed_since_it_read_the_jobs(
    queue: JobQueue, tmp_path: Path, step: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A checkpoint route was between its use (before the listing) and its record (after the
    jobs were read): no stamp moves after the listing, so only time tells. The prune drops its
    plan once grace/2 has passed by either clock (the next one carries on)."""
    clock, mono = Clock(T0), Clock(0.0)
    store = LocalStore(tmp_path / "models", clock)
    claim = _running_job(queue)
    old, data = gzip_bundle(b"old checkpoint")
    assert upload(store, data, kind="checkpoint")
    clock.at = T0 + GRACE - 10
    assert store.mark_used(old)  # the route's use; its record comes after the read
    planned = pruning.plan(store, queue, monotonic=mono)
    queue.record_checkpoint(claim.job.job_id, claim.lease, old, T0 + GRACE)
    if step == "wall":
        clock.at += GRACE / 2  # suspended mid-prune, or NTP stepped the clock forward
    else:
        mono.at += GRACE / 2  # a slow loop (the wall clock was stepped back meanwhile)
        clock.at += GRACE + 10  # (so that, by itself, the use looks old enough)
    with caplog.at_level(logging.INFO, logger="trainfleet.receiver"):
        assert pruning.delete_unused(store, planned, GRACE, monotonic=mono) == []
    assert store.has(old)
    assert any("checkpoint pruning stopped" in m and "next prune" in m for m in caplog.messages)


@posix_only
def test_a_full_disk_stops_the_prune_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Each delete appends a tombstone first: on a full disk none can be made."""
    clock = Clock(T0)
    root = tmp_path / "models"
    store = LocalStore(root, clock)
    queue = open_queue(f"sqlite:///{tmp_path / 'queue.db'}")
    made = [gzip_bundle(f"checkpoint {n}".encode()) for n in range(3)]
    for _, data in made:
        assert upload(store, data, kind="checkpoint")
    clock.at += 2 * GRACE
    before = (root / "index.jsonl").read_bytes()
    with caplog.at_level(logging.INFO, logger="trainfleet.receiver"), file_size_limit(
            root / "index.jsonl", 10):
        assert pruning.prune_checkpoints(store, queue, GRACE) == []
    assert (root / "index.jsonl").read_bytes() == before
    assert all(store.has(artifact_id) for artifact_id, _ in made)
    assert [r.levelno for r in caplog.records if "pruning" in r.message] == [logging.WARNING]
    assert "disk is full" in caplog.text
    queue.close()


# -- a real receiver, on both queue backends ---------------------------------------


@dataclass
class Lab:
    """A receiver serving on loopback, its state, and a client playing the workers."""

    state: ReceiverState
    client: Client
    url: str
    tmp_path: Path

    def claims(self) -> dict[str, dict[str, Any]]:
        """Claim every pending job, each by its own worker; by job name."""
        found = {}
        while (claim := self.client.claim(f"w{len(found)}", cpu(f"h{len(found)}").to_dict())):
            found[claim["job"]["name"]] = claim
        return found

    def bundle(self, content: str) -> bundle.Bundle:
        src = self.tmp_path / "src" / content
        src.mkdir(parents=True)
        (src / "state.json").write_text(json.dumps({"content": content}))
        return bundle.create(src, self.tmp_path / f"{content}.bundle")

    def upload(self, claim: dict[str, Any], made: bundle.Bundle, kind: str) -> bool:
        answer = self.client.upload(made.artifact_id, made.path, claim["job"]["job_id"],
                                    claim["lease"], attempt=claim["attempt"], kind=kind)
        return bool(answer["new"])

    def record(self, claim: dict[str, Any], made: bundle.Bundle) -> None:
        """What a worker does with a checkpoint: upload it (unless stored), record it."""
        if not self.client.has_artifact(made.artifact_id):
            self.upload(claim, made, "checkpoint")
        self.client.checkpoint(claim["job"]["job_id"], claim["lease"], made.artifact_id,
                               attempt=claim["attempt"])

    def complete(self, claim: dict[str, Any], made: bundle.Bundle) -> None:
        self.client.complete(claim["job"]["job_id"], claim["lease"], made.artifact_id, {},
                             attempt=claim["attempt"])

    def stored(self, kind: str = "checkpoint") -> set[str]:
        return {row["artifact_id"] for row in self.client.models(kind=kind)}

    def unused_for(self, seconds: float, *made: bundle.Bundle) -> None:
        """As if each was last used `seconds` ago (the bundle's mtime is its last use)."""
        for one in made:
            used_at = time.time() - seconds
            os.utime(self.state.store.local_path(one.artifact_id), (used_at, used_at))

    def metric(self, name: str) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.url}/metrics") as answer:
            text: str = answer.read().decode()
        return next(line.split()[1] for line in text.splitlines() if line.startswith(name + " "))


@contextmanager
def running(tmp_path: Path, db: str, jobs: list[dict[str, Any]], *,
            monotonic: Callable[[], float] = time.monotonic, **options: Any) -> Iterator[Lab]:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text(jobs))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state", db=db,
                                operator_token=OPERATOR_TOKEN, **{
                                    "sweep_interval_s": 3600.0, **options})
    app = create_app(settings, monotonic=monotonic)
    with serving_app(app) as (host, port):
        url = f"http://{host}:{port}"
        yield Lab(app.state.receiver, Client(url, operator_token=OPERATOR_TOKEN, retries=0),
                  url, tmp_path)


def test_the_prune_keeps_what_a_job_may_need_and_deletes_the_rest(
    tmp_path: Path, queue_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    names = ["train", "broken", "stopped", "done"]
    with running(tmp_path, queue_url, [job(n, max_attempts=1) for n in names]) as lab:
        claims = lab.claims()
        old, new, young = lab.bundle("old"), lab.bundle("new"), lab.bundle("young")
        failed, cancelled, finished = (lab.bundle(n) for n in ("failed", "cancelled", "fin"))
        model = lab.bundle("model")
        for made in (old, young, new):  # `young` superseded too, but used a moment ago
            lab.record(claims["train"], made)
        lab.record(claims["broken"], failed)
        lab.client.fail(claims["broken"]["job"]["job_id"], claims["broken"]["lease"], "boom",
                        False, "trainer_error", attempt=1)
        lab.record(claims["stopped"], cancelled)
        lab.client.cancel(claims["stopped"]["job"]["job_id"])
        lab.record(claims["done"], finished)
        lab.upload(claims["done"], model, "model")
        lab.complete(claims["done"], model)
        assert lab.state.prune_checkpoints() == 0  # everything used within the grace period

        lab.unused_for(2 * GRACE, old, new, failed, cancelled, finished, model)
        with caplog.at_level(logging.INFO, logger="trainfleet.receiver"):
            assert lab.state.prune_checkpoints() == 2
        # the superseded one and the completed job's go; the running job's current one, the
        # failed and the cancelled job's (a requeue resumes from them) and the model stay
        assert lab.stored() == {new.artifact_id, young.artifact_id, failed.artifact_id,
                                cancelled.artifact_id}
        assert lab.stored("model") == {model.artifact_id}
        for gone in (old, finished):
            assert any(gone.artifact_id[:12] in r.message and "deleted" in r.message
                       for r in caplog.records)
        assert lab.metric("trainfleet_checkpoints_pruned_total") == "2.0"
        assert float(lab.metric("trainfleet_checkpoint_bytes_pruned_total")) == (
            old.size + finished.size)

        lab.client.requeue(claims["broken"]["job"]["job_id"])  # resumes from what was kept
        again = lab.client.claim("w-again", cpu("h-again").to_dict())
        assert again is not None and again["resume_from"] == failed.artifact_id
        lab.client.download(failed.artifact_id, tmp_path / "resumed.bundle")
        store_root = lab.state.settings.store_root
    after = LocalStore(store_root)  # a restart brings nothing back
    assert {r["artifact_id"] for r in after.entries()} == {
        new.artifact_id, young.artifact_id, failed.artifact_id, cancelled.artifact_id,
        model.artifact_id}


def test_a_model_with_an_old_checkpoints_bytes_survives_its_jobs_completion(
    tmp_path: Path, queue_url: str,
) -> None:
    with running(tmp_path, queue_url, [job("uploads"), job("skips")]) as lab:
        claims = lab.claims()
        same, other_same = lab.bundle("same"), lab.bundle("other-same")
        later = [lab.bundle("later-1"), lab.bundle("later-2")]
        for name, made, then in (("uploads", same, later[0]), ("skips", other_same, later[1])):
            lab.record(claims[name], made)
            lab.record(claims[name], then)  # `made` is superseded
        lab.unused_for(2 * GRACE, same, other_same)

        # A model whose bytes are the old checkpoint's: the upload re-kinds it and uses it.
        assert lab.upload(claims["uploads"], same, "model") is False
        lab.complete(claims["uploads"], same)
        # A worker that skips the upload (HEAD: stored) and completes, while a prune that
        # planned before the completion runs: the completion is a use, under the store's lock.
        planned = pruning.plan(lab.state.store, lab.state.queue)
        assert other_same.artifact_id in {r["artifact_id"] for r in planned}
        lab.complete(claims["skips"], other_same)
        assert pruning.delete_unused(lab.state.store, planned, GRACE) == []

        lab.unused_for(2 * GRACE, same, other_same, *later)
        assert lab.state.prune_checkpoints() == 2  # the later checkpoints of completed jobs
        assert lab.stored("model") == {same.artifact_id}
        assert lab.stored("checkpoint") == {other_same.artifact_id}  # kept by the reference
        for made in (same, other_same):
            lab.client.download(made.artifact_id, tmp_path / f"{made.artifact_id}.bundle")


def test_a_checkpoint_used_again_while_a_prune_runs_is_kept(
    tmp_path: Path, queue_url: str,
) -> None:
    with running(tmp_path, queue_url, [job("train")]) as lab:
        claim = lab.claims()["train"]
        back, current, later = lab.bundle("back"), lab.bundle("current"), lab.bundle("later")
        lab.record(claim, back)
        lab.record(claim, current)
        lab.unused_for(2 * GRACE, back)
        planned = pruning.plan(lab.state.store, lab.state.queue)  # listed, jobs read
        assert [r["artifact_id"] for r in planned] == [back.artifact_id]
        # Now the trainer goes back to `back`'s bytes: the worker uploads them (the store
        # has them: 200) and records them, all between the prune's plan and its deletes.
        assert lab.upload(claim, back, "checkpoint") is False
        lab.client.checkpoint(claim["job"]["job_id"], claim["lease"], back.artifact_id,
                              attempt=1)
        assert pruning.delete_unused(lab.state.store, planned, GRACE) == []
        assert lab.client.job(claim["job"]["job_id"])["checkpoint_id"] == back.artifact_id
        lab.client.download(back.artifact_id, tmp_path / "back.bundle")

        # The same with the record alone (a worker that finds the bytes stored sends no PUT).
        lab.record(claim, later)
        lab.unused_for(2 * GRACE, back, current)
        planned = pruning.plan(lab.state.store, lab.state.queue)
        assert [r["artifact_id"] for r in planned] == [back.artifact_id, current.artifact_id]
        lab.record(claim, current)
        assert [r["artifact_id"] for r in pruning.delete_unused(
            lab.state.store, planned, GRACE)] == [back.artifact_id]
        assert lab.stored() == {current.artifact_id, later.artifact_id}


def test_recording_a_pruned_checkpoint_asks_for_it_again(tmp_path: Path, queue_url: str) -> None:
    with running(tmp_path, queue_url, [job("train")]) as lab:
        claim = lab.claims()["train"]
        first, second = lab.bundle("first"), lab.bundle("second")
        lab.record(claim, first)
        lab.record(claim, second)
        lab.unused_for(2 * GRACE, first)
        assert lab.state.prune_checkpoints() == 1
        with pytest.raises(ReceiverError) as refused:
            lab.client.checkpoint(claim["job"]["job_id"], claim["lease"], first.artifact_id,
                                  attempt=1)
        assert refused.value.status == 400
        assert f"artifact_id: {first.artifact_id} is not in the store; upload it first" == (
            refused.value.message)
        assert lab.client.job(claim["job"]["job_id"])["checkpoint_id"] == second.artifact_id
        assert lab.upload(claim, first, "checkpoint") is True  # the worker uploads it again
        lab.record(claim, first)
        assert lab.client.job(claim["job"]["job_id"])["checkpoint_id"] == first.artifact_id


def test_the_grace_period_is_the_bundles_last_use_on_the_receivers_wall_clock(
    tmp_path: Path, queue_url: str,
) -> None:
    # A bundle indexed long ago (by its row) but used just now: the row's age does not count.
    root = tmp_path / "state" / "models"
    artifact_id, data = gzip_bundle(b"stored in 2020, used today")
    (root / "gbt_realistic" / artifact_id).mkdir(parents=True)
    (root / "gbt_realistic" / artifact_id / "bundle.tar.gz").write_bytes(data)
    (root / "index.jsonl").write_text(json.dumps({
        "artifact_id": artifact_id, "job_id": None, "model": "gbt", "mode": "realistic",
        "kind": "checkpoint", "size": len(data), "host": None, "compression": "gzip",
        "stored_at": "2020-01-01T00:00:00+00:00"}) + "\n")
    mono = Clock(0.0)
    with running(tmp_path, queue_url, [job("train")], monotonic=mono) as lab:
        claim = lab.claims()["train"]
        superseded = lab.bundle("superseded")
        lab.record(claim, superseded)
        lab.record(claim, lab.bundle("current"))
        # The receiver's step-free clock (the database's, on PostgreSQL) runs ahead by days:
        # it is not the clock of last uses, so nothing is older than the grace period.
        mono.at += 100 * GRACE
        assert lab.state.prune_checkpoints() == 0
        assert artifact_id in lab.stored() and superseded.artifact_id in lab.stored()
        os.utime(lab.state.store.local_path(artifact_id), (time.time() - GRACE,) * 2)
        lab.unused_for(GRACE - 60, superseded)
        assert lab.state.prune_checkpoints() == 1
        assert artifact_id not in lab.stored() and superseded.artifact_id in lab.stored()


def test_keep_checkpoints_deletes_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="trainfleet.receiver"), running(
            tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [job("train")],
            keep_checkpoints=True) as lab:
        claim = lab.claims()["train"]
        made = [lab.bundle(f"step-{n}") for n in range(3)]
        for one in made:
            lab.record(claim, one)
        lab.unused_for(100 * GRACE, *made)
        assert not lab.state.prune_due()
        assert lab.state.prune_checkpoints() == 0
        assert lab.stored() == {one.artifact_id for one in made}
    assert "checkpoints: all kept (--keep-checkpoints)" in caplog.messages


def test_an_s3_store_never_prunes_and_says_so_at_start(
    tmp_path: Path, bucket: s3t.Bucket, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="trainfleet.receiver"), running(
            tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [job("train")], store=bucket.url,
            s3_endpoint_url=bucket.endpoint) as lab:
        claim = lab.claims()["train"]
        made = [lab.bundle(f"step-{n}") for n in range(3)]
        for one in made:
            lab.record(claim, one)
        lab.complete(claim, made[-1])
        assert not lab.state.prune_due()
        assert lab.state.prune_checkpoints() == 0
        assert pruning.prune_checkpoints(lab.state.store, lab.state.queue, 1e-9) == []
        assert lab.stored() == {one.artifact_id for one in made}
    started = [m for m in caplog.messages if m.startswith("checkpoints:")]
    assert started == ["checkpoints: all kept: pruning is not supported on an S3 store"]


def test_the_periodic_sweep_prunes_in_a_thread_at_most_once_per_prune_every_s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    mono = Clock(0.0)
    with caplog.at_level(logging.INFO, logger="trainfleet.receiver"), running(
            tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [job("train")], monotonic=mono,
            sweep_interval_s=0.05, prune_every_s=3600.0, stale_after_s=1e6) as lab:
        wait_for("the first sweep's prune, done", lambda: not (
            lab.state.prune_due() or lab.state.prune_running))
        claim = lab.claims()["train"]
        first, second, third = lab.bundle("first"), lab.bundle("second"), lab.bundle("third")
        lab.record(claim, first)
        lab.record(claim, second)
        lab.unused_for(2 * GRACE, first)
        mono.at += 3599.0
        assert not lab.state.prune_due() and lab.stored() == {first.artifact_id,
                                                             second.artifact_id}
        mono.at += 1.0
        wait_for("the next prune, done", lambda: lab.stored() == {second.artifact_id}
                 and not lab.state.prune_running)  # (its log lines come after the deletes)
        lab.record(claim, third)
        lab.unused_for(2 * GRACE, second)
        assert not lab.state.prune_due()
        mono.at += 3600.0
        wait_for("the prune after it, done", lambda: lab.stored() == {third.artifact_id}
                 and not lab.state.prune_running)
        deletions = [r for r in caplog.records if " deleted (" in r.message]
        assert [r.message[len("checkpoint "):][:12] for r in deletions] == [
            first.artifact_id[:12], second.artifact_id[:12]]
        port = lab.url.rsplit(":", 1)[1]  # the event loop runs in the thread receiver-PORT
        assert all(r.threadName != f"receiver-{port}" for r in deletions)
        assert lab.client.job(claim["job"]["job_id"])["checkpoint_id"] == third.artifact_id


@needs_proc_locks
def test_a_use_waiting_for_a_shared_stores_lock_does_not_hold_up_the_receiver(
    tmp_path: Path,
) -> None:
    """Another receiver holds the shared store's flock (or NFS stalls): the checkpoint call
    waits for it in a thread, and the receiver answers everything else meanwhile, HEAD on the
    store included."""
    shared = tmp_path / "shared"
    with running(tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [job("train")],
                 store=str(shared)) as lab:
        claim = lab.claims()["train"]
        made = lab.bundle("current")
        lab.upload(claim, made, "checkpoint")
        probe = Client(lab.url, retries=0, timeout_s=5.0)
        answers: list[dict[str, Any]] = []
        with holding_flock(shared / ".lock"):
            call = threading.Thread(target=lambda: answers.append(lab.client.checkpoint(
                claim["job"]["job_id"], claim["lease"], made.artifact_id, attempt=1)))
            call.start()
            wait_for("the checkpoint call waiting for the store's lock",
                     lambda: flock_waiters(shared / ".lock") == 1)
            assert probe.health()["ok"] and probe.has_artifact(made.artifact_id)
            assert not answers
        call.join(10)
        assert answers and answers[0]["checkpoint_id"] == made.artifact_id


@needs_proc_locks
def test_a_prune_runs_beside_the_stale_sweep_and_a_shutdown_stops_it_between_deletes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    shared, mono = tmp_path / "shared", Clock(0.0)
    with caplog.at_level(logging.INFO, logger="trainfleet.receiver"), running(
            tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [job("train")], monotonic=mono,
            store=str(shared), sweep_interval_s=0.05, prune_every_s=3600.0,
            stale_after_s=5000.0) as lab:
        wait_for("the first sweep's prune, done", lambda: not (
            lab.state.prune_due() or lab.state.prune_running))
        claim = lab.claims()["train"]
        job_id = claim["job"]["job_id"]
        made = [lab.bundle(f"step-{n}") for n in range(4)]
        for one in made:
            lab.record(claim, one)
        lab.unused_for(2 * GRACE, *made[:3])  # superseded and old: all three may go
        release = hold_flock(shared / ".lock")
        try:
            mono.at += 3600.0  # the next prune: it plans, then waits for the lock to delete
            wait_for("the prune waiting for the store's lock",
                     lambda: flock_waiters(shared / ".lock") == 1)
            mono.at += 2000.0  # the worker has been silent past stale_after_s
            wait_for("the stale sweep, while the prune waits",
                     lambda: lab.client.job(job_id)["status"] == "pending")
        except BaseException:
            release()
            raise

        def release_once_stopping() -> None:
            try:
                wait_for("the receiver stopping", lab.state.stopping.is_set)
            finally:
                release()

        releaser = threading.Thread(target=release_once_stopping)
        releaser.start()
        # leaving `running` stops the receiver: the prune finishes the delete it is in
    releaser.join(10)
    tombstones = [r for r in index_rows(shared) if "deleted_at" in r]
    assert len(tombstones) == 1 and tombstones[0]["artifact_id"] in {
        one.artifact_id for one in made[:3]}
    assert "checkpoint pruning stopped: the receiver is stopping" in caplog.messages


@pytest.mark.parametrize("value", ["0", "-1", "nan", "59"])
def test_a_grace_period_under_a_minute_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str,
) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    code = main(["receiver", "--manifest", str(manifest), "--state-dir", str(tmp_path / "s"),
                 "--checkpoint-grace", value], environ={})
    err = capsys.readouterr().err
    assert code == 1 and "error: --checkpoint-grace: expected a number of seconds >= 60" in err
    assert not (tmp_path / "s").exists()


# -- real receiver and worker processes -------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path) as f:
        f.trainer_path.write_text(STEP_TRAINER)
        yield f


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.slow
def test_a_trained_jobs_checkpoints_are_pruned_by_a_real_receiver(fleet: Fleet) -> None:
    receiver, job_id = step_receiver(fleet, interval_s=0.2, sweep_interval=0.2)
    worker = fleet.worker(receiver.url, "cpu-a", CPU_A)
    wait_for("three checkpoints recorded", lambda: sum(
        e["kind"] == "checkpoint" for e in receiver.job(job_id)["history"]) >= 3, timeout_s=30)
    (fleet.markers / "release").write_text("go")
    done = receiver.wait_status(job_id, "completed", timeout_s=30)
    assert worker.stop() == 0
    checkpoints = {r["artifact_id"] for r in receiver.client.models(kind="checkpoint")}
    assert len(checkpoints) >= 3 and done["checkpoint_id"] in checkpoints
    assert receiver.stop() in SIGTERM_EXIT
    log = receiver.log_path.read_text()
    assert ("checkpoints: those no job can resume from are deleted once unused for 3600 s"
            in log)

    long_ago = time.time() - 7200  # every bundle last used two hours ago (its mtime)
    for path in receiver.models_dir.glob("*/*/bundle.tar.*"):
        os.utime(path, (long_ago, long_ago))
    kept = fleet.restart(receiver, sweep_interval=0.2, checkpoint_grace=60,
                         keep_checkpoints=True)
    assert "checkpoints: all kept (--keep-checkpoints)" in kept.log_path.read_text()
    assert {r["artifact_id"] for r in kept.client.models(kind="checkpoint")} == checkpoints
    assert kept.stop() in SIGTERM_EXIT

    pruned = fleet.restart(kept, sweep_interval=0.2, checkpoint_grace=60)
    wait_for("the completed job's checkpoints pruned",
             lambda: pruned.client.models(kind="checkpoint") == [])
    [model] = pruned.client.models()
    assert model["artifact_id"] == done["artifact_id"]
    pruned.client.download(model["artifact_id"], fleet.root / "model.bundle")
    tombstones = {r["artifact_id"] for r in pruned.index_rows() if "deleted_at" in r}
    assert tombstones == checkpoints
    assert [p for p in receiver.models_dir.glob("*/*/bundle.tar.*")] == [
        Path(model["path"])]
    assert pruned.stop() in SIGTERM_EXIT


# -- the second review's gaps: each failed to catch a deliberate break --------------


def test_a_prune_running_between_the_routes_use_and_its_record_deletes_nothing_named(
    tmp_path: Path,
) -> None:
    """The checkpoint route marks the artifact used BEFORE the queue records it. A prune
    planned before the call runs its deletes exactly between the two (a hook on the real
    queue): the job must not end up naming a checkpoint the prune deleted. Swapping the
    route's order, or checking has() instead of marking, fails this."""
    with running(tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [job("train")]) as lab:
        claim = lab.claims()["train"]
        back, current = lab.bundle("back"), lab.bundle("current")
        lab.record(claim, back)
        lab.record(claim, current)
        lab.unused_for(2 * GRACE, back)
        planned = pruning.plan(lab.state.store, lab.state.queue)
        assert [r["artifact_id"] for r in planned] == [back.artifact_id]
        queue = lab.state.queue
        real = queue.record_checkpoint

        def prune_then_record(*args: Any, **kwargs: Any) -> Any:
            pruning.delete_unused(lab.state.store, planned, GRACE)
            return real(*args, **kwargs)

        queue.record_checkpoint = prune_then_record  # type: ignore[method-assign]
        try:
            with suppress(ReceiverError):  # a 400 "upload it first" is a fine answer
                lab.client.checkpoint(claim["job"]["job_id"], claim["lease"],
                                      back.artifact_id, attempt=1)
        finally:
            del queue.record_checkpoint
        named = lab.client.job(claim["job"]["job_id"])["checkpoint_id"]
        assert named != back.artifact_id or lab.state.store.has(back.artifact_id)


def test_a_delete_that_waited_grace_over_two_for_the_lock_checks_its_plan_again(
    tmp_path: Path,
) -> None:
    """A use made before the listing and recorded after the jobs were read: the delete then
    waits for another receiver's flock while the wall clock moves grace/2. Under the lock it
    must find its plan too old and delete nothing."""
    root = tmp_path / "models"
    clock = Clock(T0)
    store = SharedStore(root, clock)
    queue = open_queue(f"sqlite:///{tmp_path / 'q.db'}")
    try:
        claim = _running_job(queue)
        old, data = gzip_bundle(b"old checkpoint")
        assert upload(store, data, kind="checkpoint")  # its use: T0
        clock.at = T0 + GRACE - 10
        planned = pruning.plan(store, queue, monotonic=lambda: 0.0)
        queue.record_checkpoint(claim.job.job_id, claim.lease, old, T0 + GRACE)
        release = hold_flock(root / ".lock")
        out: list[list[dict[str, Any]]] = []
        deleting = threading.Thread(target=lambda: out.append(pruning.delete_unused(
            store, planned, GRACE, monotonic=lambda: 0.0)))
        deleting.start()
        try:
            wait_for("the delete waiting for the flock",
                     lambda: flock_waiters(root / ".lock") == 1)
            clock.at += GRACE / 2  # the wait lasted grace/2 by the wall clock
        finally:
            release()
        deleting.join(10)
        assert out == [[]] and store.has(old)
    finally:
        store.close()
        queue.close()
