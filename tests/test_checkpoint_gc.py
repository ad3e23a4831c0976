"""Checkpoint garbage collection: the receiver's sweep deletes the checkpoints no job can resume
from any more, once past a grace period; models, and the checkpoints of jobs not completed,
stay. The queue (both backends), each store's delete (local, shared, S3 on moto) and a real
receiver."""

from __future__ import annotations

import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests import test_store_s3 as s3t
from tests.conftest import cpu, job, make_manifest, manifest_text
from tests.fleet import wait_for
from tests.live import serving_app
from tests.test_store import gzip_bundle, index_rows, upload
from trainfleet import bundle
from trainfleet.cli import main
from trainfleet.client import Client
from trainfleet.errors import BadRequest, TrainfleetError
from trainfleet.queue import open_queue
from trainfleet.queue.base import JobQueue, Status
from trainfleet.receiver import ReceiverSettings, create_app
from trainfleet.receiver.pruning import prunable, prune_checkpoints
from trainfleet.store import LocalStore, SharedStore

T0 = 1_000_000.0
GRACE = 3600.0
BAD_IDS = ["", "a" * 63, "A" * 64, "../" + "a" * 61, "a" * 64 + "/..", "g" * 64]

moto_url = s3t.moto_url  # test_store_s3's fixtures: a moto server on loopback, a fresh bucket
bucket = s3t.bucket


def ckpt(n: int) -> str:
    return f"{n:x}" * 64 if n < 16 else f"{n:064x}"


# -- the queue (both backends) -------------------------------------------------


def test_checkpoints_in_use_are_those_of_jobs_not_completed(queue: JobQueue) -> None:
    names = ["running", "done", "failed", "cancelled", "none"]
    queue.sync_manifest(make_manifest([job(n, max_attempts=1) for n in names]), now=T0)
    assert queue.checkpoints_in_use() == set()
    claims = {}
    for n in range(len(names)):
        claim = queue.claim_next(f"w{n}", cpu(f"h{n}"), now=T0 + 1)
        assert claim is not None
        claims[claim.job.name] = claim
    for n, name in enumerate(names[:4], start=1):
        queue.record_checkpoint(claims[name].job.job_id, claims[name].lease, ckpt(n), T0 + 2)
    running = claims["running"]
    queue.record_checkpoint(running.job.job_id, running.lease, ckpt(9), T0 + 3)  # the newer
    queue.complete(claims["done"].job.job_id, claims["done"].lease, ckpt(10), now=T0 + 4)
    queue.fail(claims["failed"].job.job_id, claims["failed"].lease, "boom", retryable=False,
               now=T0 + 4)
    queue.cancel(claims["cancelled"].job.job_id, now=T0 + 4)
    statuses = {j.name: j.status for j in queue.list_jobs()}
    assert statuses["failed"] == Status.FAILED and statuses["cancelled"] == Status.CANCELLED
    assert statuses["done"] == Status.COMPLETED
    # the running job's newer one; a failed or cancelled job may be requeued and resume
    assert queue.checkpoints_in_use() == {ckpt(9), ckpt(3), ckpt(4)}


# -- what may go ---------------------------------------------------------------


def test_only_old_checkpoints_not_in_use_are_prunable() -> None:
    def row(n: int, kind: str = "checkpoint", stored_at: Any = "1970-01-12T13:46:40+00:00"
            ) -> dict[str, Any]:
        return {"artifact_id": ckpt(n), "kind": kind, "stored_at": stored_at}  # T0

    rows = [row(1), row(2), row(3, kind="model"), row(4, stored_at=None),
            row(5, stored_at="yesterday"), row(6, stored_at="1970-01-12T13:46:40"),
            row(7, stored_at="1970-01-12T14:46:40+00:00")]  # T0 + 3600
    def ids(found: list[dict[str, Any]]) -> list[str]:
        return [r["artifact_id"] for r in found]

    assert ids(prunable(rows, {ckpt(2)}, T0 + GRACE, GRACE)) == [ckpt(1)]
    assert ids(prunable(rows, {ckpt(2)}, T0 + GRACE - 1, GRACE)) == []
    assert ids(prunable(rows, set(), T0 + 2 * GRACE, GRACE)) == [ckpt(1), ckpt(2), ckpt(7)]


# -- the local store -------------------------------------------------------------


def test_a_local_delete_removes_the_bundle_for_good_and_twice_is_fine(tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = LocalStore(root)
    gone, data = gzip_bundle(b"step 1")
    kept, other = gzip_bundle(b"step 2")
    assert upload(store, data, kind="checkpoint") and upload(store, other, kind="checkpoint")
    folder = store.path(gone).parent
    assert store.delete(gone) is True
    assert not store.has(gone) and not folder.exists()
    assert [r["artifact_id"] for r in store.entries()] == [kept]
    assert store.delete(gone) is False  # already gone: no error
    assert list((root / ".tmp").iterdir()) == []  # the bundle moved aside was unlinked
    tombstone = index_rows(root)[-1]
    assert tombstone["artifact_id"] == gone and "deleted_at" in tombstone

    again = LocalStore(root)  # a restart reads the tombstone and does not repair a row
    assert not again.has(gone) and again.has(kept)
    assert [r["artifact_id"] for r in again.entries()] == [kept]
    assert again.delete(gone) is False

    assert upload(again, data, kind="model") is True  # the same bytes again: a new row
    assert LocalStore(root).entry(gone)["kind"] == "model"


@pytest.mark.parametrize("artifact_id", BAD_IDS)
def test_a_malformed_id_is_refused_by_every_filesystem_store(
    tmp_path: Path, artifact_id: str
) -> None:
    for store in (LocalStore(tmp_path / "local"), SharedStore(tmp_path / "shared")):
        with pytest.raises(BadRequest, match="sha256"):
            store.delete(artifact_id)


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
    assert linked.has(artifact_id)
    with pytest.raises(TrainfleetError, match="not deleted"):
        linked.delete(artifact_id)
    assert (outside / artifact_id / "bundle.tar.gz").read_bytes() == data
    assert linked.has(artifact_id)


# -- the shared store --------------------------------------------------------------


def test_a_deletion_on_a_shared_store_is_seen_by_the_other_receivers(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    one, two = SharedStore(root), SharedStore(root)
    gone, data = gzip_bundle(b"old checkpoint")
    kept, other = gzip_bundle(b"new checkpoint")
    assert upload(one, data, kind="checkpoint") and upload(one, other, kind="checkpoint")
    assert two.has(gone)
    assert two.delete(gone) is True
    assert not one.has(gone) and [r["artifact_id"] for r in one.entries()] == [kept]
    assert one.delete(gone) is False  # both pruned: the second finds it gone
    third = SharedStore(root)  # started afterwards: reads the tombstone from the index
    assert not third.has(gone) and third.has(kept)
    assert upload(third, data, kind="checkpoint") is True  # stored anew, seen anew
    assert one.has(gone) and two.has(gone)
    for store in (one, two, third):
        store.close()


# -- the S3 store (moto) -------------------------------------------------------------


def test_an_s3_delete_removes_bundle_and_row_and_other_receivers_follow(
    bucket: s3t.Bucket,
) -> None:
    one, two = bucket.store(), bucket.store()
    gone, data = s3t.bundle_bytes(1 << 20)
    kept, other = s3t.bundle_bytes(1 << 20)
    assert s3t.stream(one, data, kind="checkpoint") and s3t.stream(one, other)
    assert two.has(gone)  # cached by the second receiver now
    assert one.delete(gone) is True
    assert not [key for key in bucket.keys() if gone in key]
    assert not one.has(gone)
    assert [r["artifact_id"] for r in two.entries()] == [kept]  # a listing drops the cache
    assert not two.has(gone)
    assert two.delete(gone) is False and one.delete(gone) is False
    for artifact_id in BAD_IDS:
        with pytest.raises(BadRequest, match="sha256"):
            one.delete(artifact_id)


def test_an_s3_row_whose_bundle_is_already_gone_is_deleted_again(bucket: s3t.Bucket) -> None:
    store = bucket.store()
    artifact_id, data = s3t.bundle_bytes(1 << 20)
    assert s3t.stream(store, data, kind="checkpoint")
    [bundle_key] = [key for key in bucket.keys() if key.endswith("bundle.tar.gz")]
    bucket.s3.delete_object(Bucket=bucket.name, Key=bundle_key)  # a receiver stopped here
    assert store.delete(artifact_id) is True
    assert bucket.keys() == []


# -- the prune step on real parts ----------------------------------------------------


def test_one_failed_deletion_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalStore(tmp_path / "models")
    queue = open_queue(f"sqlite:///{tmp_path / 'queue.db'}")
    refused, data = gzip_bundle(b"linked away")
    pruned, other = gzip_bundle(b"plain")
    assert upload(store, data, kind="checkpoint") and upload(store, other, kind="checkpoint")
    folder = store.path(refused).parent
    (tmp_path / "elsewhere").mkdir()
    folder.rename(tmp_path / "elsewhere" / refused)
    folder.symlink_to(tmp_path / "elsewhere" / refused, target_is_directory=True)
    with caplog.at_level(logging.INFO, logger="trainfleet.receiver"):
        deleted = prune_checkpoints(store, queue, time.time() + 2 * GRACE, GRACE)
    assert [row["artifact_id"] for row in deleted] == [pruned]
    assert store.has(refused) and not store.has(pruned)
    assert any(refused[:12] in r.message and r.levelno == logging.ERROR for r in caplog.records)
    queue.close()


# -- a real receiver ----------------------------------------------------------------


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def make_bundle(tmp_path: Path, name: str, content: str) -> bundle.Bundle:
    src = tmp_path / name
    src.mkdir()
    (src / "state.json").write_text(content)
    return bundle.create(src, tmp_path / f"{name}.bundle")


def test_the_sweep_keeps_only_the_checkpoints_a_job_can_still_resume_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("train", max_attempts=1),
                                       job("broken", max_attempts=1)]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state",
                                sweep_interval_s=3600.0, checkpoint_grace_s=GRACE)
    # Rows are stamped by the host's clock: the receiver's starts there, and its monotonic
    # part is stepped past the grace period.
    mono = Clock(0.0)
    app = create_app(settings, wall=Clock(time.time()), monotonic=mono)
    state = app.state.receiver
    old, new, failed = (make_bundle(tmp_path, n, n) for n in ("old", "new", "failed"))
    model = make_bundle(tmp_path, "model", "the result")
    with serving_app(app) as (host, port):
        url = f"http://{host}:{port}"
        client = Client(url, retries=0)
        claims = {}
        for worker in ("w1", "w2"):
            claim = client.claim(worker, cpu(worker).to_dict())
            assert claim is not None
            claims[claim["job"]["name"]] = claim
        train, broken = claims["train"], claims["broken"]
        for made in (old, new):
            record(client, train, made)
        record(client, broken, failed)
        client.fail(broken["job"]["job_id"], broken["lease"], "boom", False, "trainer_error",
                    attempt=1)
        client.upload(model.artifact_id, model.path, train["job"]["job_id"], train["lease"],
                      attempt=1)

        state.sweep()  # all younger than the grace period, the superseded one too
        assert stored(client) == {old.artifact_id, new.artifact_id, failed.artifact_id}

        mono.at += 2 * GRACE
        with caplog.at_level(logging.INFO, logger="trainfleet.receiver"):
            state.sweep()
        assert stored(client) == {new.artifact_id, failed.artifact_id}
        assert any(old.artifact_id[:12] in r.message and r.levelno == logging.INFO
                   for r in caplog.records)

        client.complete(train["job"]["job_id"], train["lease"], model.artifact_id, {},
                        attempt=1)
        state.sweep()  # the completed job's model is its result: its checkpoint goes
        assert stored(client) == {failed.artifact_id}
        assert [r["artifact_id"] for r in client.models()] == [model.artifact_id]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{url}/metrics") as answer:
            assert "trainfleet_checkpoints_pruned_total 2.0" in answer.read().decode()
        requeued = state.queue.requeue(broken["job"]["job_id"])  # resumes from what is kept
        assert requeued.checkpoint_id == failed.artifact_id
    after = LocalStore(settings.store_root)  # and a restart brings nothing back
    assert {r["artifact_id"] for r in after.entries()} == {model.artifact_id,
                                                           failed.artifact_id}


def test_the_periodic_sweep_prunes_in_its_own_time(tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("train")]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state",
                                sweep_interval_s=0.05, checkpoint_grace_s=GRACE)
    mono = Clock(0.0)
    old, new = (make_bundle(tmp_path, n, n) for n in ("old", "new"))
    with serving_app(create_app(settings, wall=Clock(time.time()), monotonic=mono)) as (
            host, port):
        client = Client(f"http://{host}:{port}", retries=0)
        claim = client.claim("w1", cpu().to_dict())
        assert claim is not None
        record(client, claim, old)
        record(client, claim, new)
        assert stored(client) == {old.artifact_id, new.artifact_id}
        mono.at += 2 * GRACE  # the worker is silent as long: its job is swept, and kept
        wait_for("the periodic sweep to prune the superseded checkpoint",
                 lambda: stored(client) == {new.artifact_id})
        assert client.job(claim["job"]["job_id"])["checkpoint_id"] == new.artifact_id


def record(client: Client, claim: dict[str, Any], made: bundle.Bundle) -> None:
    job_id, lease = claim["job"]["job_id"], claim["lease"]
    client.upload(made.artifact_id, made.path, job_id, lease, attempt=1, kind="checkpoint")
    client.checkpoint(job_id, lease, made.artifact_id, attempt=1)


def stored(client: Client) -> set[str]:
    return {row["artifact_id"] for row in client.models(kind="checkpoint")}


def test_a_negative_grace_period_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    code = main(["receiver", "--manifest", str(manifest), "--state-dir", str(tmp_path / "s"),
                 "--checkpoint-grace", "-1"], environ={})
    assert code == 1 and "--checkpoint-grace" in capsys.readouterr().err
