"""The S3 artifact store against moto's standalone S3 server on loopback (no real S3 here):
streamed multipart uploads, nothing published before the digest is verified, two receivers on
one bucket, and a real receiver, worker and `trainfleet pull` on `--store s3://...`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from tests.conftest import cpu, job, manifest_text
from tests.fleet import Fleet, stop_process, wait_for
from tests.live import serving
from tests.pg import free_port
from trainfleet.client import Client
from trainfleet.errors import ArtifactNotFound, BadRequest, DigestMismatch, PayloadTooLarge
from trainfleet.receiver import ReceiverSettings, create_app
from trainfleet.store.s3 import MIN_PART_BYTES, S3Store, StoreUnavailable

MB = 1 << 20
PART = MIN_PART_BYTES  #: the smallest part S3 (and moto) accepts, so a few MiB make parts
CPU_A = {"hostname": "cpu-a", "cuda": False, "gpus": [], "ram_gib": 8, "cpu_count": 4}
GZIP_MAGIC = b"\x1f\x8b\x08\x00"  #: what the store sniffs; the rest need not be a real bundle


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's standalone S3 server in a subprocess on a free loopback port, stopped by PID."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "moto's server exited"
            try:
                with opener.open(f"{url}/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("moto's server did not answer in 30 s") from None
                time.sleep(0.1)
        yield url
    finally:
        stop_process(proc)


class Bucket:
    """A fresh bucket on the moto server, and raw boto3 calls to look into it."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.name = f"t-{uuid.uuid4().hex[:12]}"
        self.url = f"s3://{self.name}/fleet/models"
        self.s3 = boto3.client("s3", endpoint_url=endpoint)
        self.s3.create_bucket(Bucket=self.name)

    def store(self, **options: Any) -> S3Store:
        return S3Store(self.url, endpoint_url=self.endpoint, part_bytes=PART, **options)

    def keys(self) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=self.name).get("Contents", [])
        return sorted(obj["Key"] for obj in listed)

    def multiparts(self) -> list[dict[str, Any]]:
        uploads: list[dict[str, Any]] = self.s3.list_multipart_uploads(
            Bucket=self.name).get("Uploads", [])
        return uploads

    def read(self, key: str) -> bytes:
        data: bytes = self.s3.get_object(Bucket=self.name, Key=key)["Body"].read()
        return data


@pytest.fixture
def bucket(moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """Credentials the boto3 way, from AWS_* (moto takes any), and no stray config."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return Bucket(moto_url)


class Conflicts:
    """S3's answer while another conditional write on a key is in flight: 409
    ConditionalRequestConflict to the next `times` index writes. moto never sends it, so a
    botocore before-send hook answers for S3 (and counts the writes); every other call
    goes to the moto server."""

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ConditionalRequestConflict'
            b"</Code><Message>A conflicting conditional operation is currently in progress"
            b"</Message></Error>")

    def __init__(self, store: S3Store, times: int) -> None:
        self.times = times
        self.writes = 0
        store._s3.meta.events.register("before-send.s3.PutObject", self.answer)

    def answer(self, request: Any, **_: Any) -> AWSResponse | None:
        if "/index/" not in request.url:
            return None
        self.writes += 1
        if self.times == 0:
            return None
        self.times -= 1
        body = self.BODY

        class Raw:
            def stream(self, **_: Any) -> Iterator[bytes]:
                yield body

        return AWSResponse(request.url, 409, {"Content-Type": "application/xml"}, Raw())


def bundle_bytes(size: int) -> tuple[str, bytes]:
    data = GZIP_MAGIC + os.urandom(size - len(GZIP_MAGIC))
    return hashlib.sha256(data).hexdigest(), data


def stream(store: S3Store, data: bytes, artifact_id: str | None = None, *,
           max_bytes: int = 64 * MB, kind: str = "model", host: str = "cpu-a") -> bool:
    artifact_id = artifact_id or hashlib.sha256(data).hexdigest()
    with store.begin_upload(artifact_id, max_bytes) as up:
        for start in range(0, len(data), 64 << 10):
            up.write(data[start:start + (64 << 10)])
        return up.commit(job_id="job-1", model="gbt", mode="realistic", host=host, kind=kind)


# -- the store itself ---------------------------------------------------------


def test_an_upload_streams_in_parts_and_is_published_only_at_commit(bucket: Bucket) -> None:
    store = bucket.store()
    artifact_id, data = bundle_bytes(11 * MB + 123)
    with store.begin_upload(artifact_id, 64 * MB) as up:
        for start in range(0, len(data), 64 << 10):
            up.write(data[start:start + (64 << 10)])
            assert up.buffered < PART  # never more than a part held in memory
        assert up.parts_sent == 2  # two full parts went out while the body streamed in
        [pending] = bucket.multiparts()
        assert pending["Key"] == up.tmp_key and up.tmp_key.startswith("fleet/models/.tmp/")
        assert bucket.keys() == []  # nothing visible before the digest is checked
        assert not store.has(artifact_id)
        assert up.commit(job_id="job-1", model="gbt", mode="realistic", host="cpu-a") is True
    final = f"fleet/models/gbt_realistic/{artifact_id}/bundle.tar.gz"
    assert bucket.keys() == [final, f"fleet/models/index/{artifact_id}.json"]
    assert bucket.multiparts() == []  # completed, copied, and the temp key deleted
    assert bucket.read(final) == data
    row = store.entry(artifact_id)
    assert row["size"] == len(data) and row["kind"] == "model" and row["compression"] == "gzip"
    assert json.loads(bucket.read(f"fleet/models/index/{artifact_id}.json")) == row
    assert store.location(artifact_id) == f"s3://{bucket.name}/{final}"
    assert store.local_path(artifact_id) is None
    body = store.open(artifact_id)
    try:
        assert body.read() == data
    finally:
        body.close()


def test_a_small_upload_is_one_short_part(bucket: Bucket) -> None:
    store = bucket.store()
    artifact_id, data = bundle_bytes(1000)
    assert stream(store, data) is True
    assert store.has(artifact_id) and bucket.multiparts() == []
    assert stream(store, data) is False  # already stored: not published again


def test_a_digest_mismatch_aborts_the_multipart_and_publishes_nothing(bucket: Bucket) -> None:
    store = bucket.store()
    _, data = bundle_bytes(6 * MB)
    claimed = "ab" * 32
    with store.begin_upload(claimed, 64 * MB) as up:
        for start in range(0, len(data), MB):
            up.write(data[start:start + MB])
        assert up.parts_sent == 1 and len(bucket.multiparts()) == 1
        with pytest.raises(DigestMismatch):
            up.commit(job_id="j", model="gbt", mode="realistic", host="h")
    assert bucket.multiparts() == [] and bucket.keys() == []
    assert not store.has(claimed)


def test_an_oversize_upload_is_refused_mid_stream_and_aborted(bucket: Bucket) -> None:
    store = bucket.store()
    artifact_id, data = bundle_bytes(7 * MB)
    with store.begin_upload(artifact_id, 6 * MB) as up:
        with pytest.raises(PayloadTooLarge):
            for start in range(0, len(data), MB):
                up.write(data[start:start + MB])
        assert up.size > 6 * MB and up.parts_sent == 1
    assert bucket.multiparts() == [] and bucket.keys() == []


def test_a_client_that_goes_away_leaves_nothing(bucket: Bucket) -> None:
    store = bucket.store()
    artifact_id, data = bundle_bytes(6 * MB)
    with pytest.raises(ConnectionResetError), store.begin_upload(artifact_id, 64 * MB) as up:
        up.write(data)
        assert len(bucket.multiparts()) == 1
        raise ConnectionResetError("the worker went away")
    assert bucket.multiparts() == [] and bucket.keys() == []


@pytest.mark.parametrize(("field", "value"), [("model", "../x"), ("kind", "bogus")])
def test_bad_fields_publish_nothing(bucket: Bucket, field: str, value: str) -> None:
    store = bucket.store()
    artifact_id, data = bundle_bytes(6 * MB)
    fields = {"job_id": "j", "model": "gbt", "mode": "realistic", "host": "h", "kind": "model",
              field: value}
    with store.begin_upload(artifact_id, 64 * MB) as up:
        up.write(data)
        with pytest.raises(BadRequest, match=f"^{field}: "):
            up.commit(**fields)
    assert bucket.multiparts() == [] and bucket.keys() == []


def test_two_stores_on_one_bucket_see_each_others_artifacts(bucket: Bucket) -> None:
    one, two = bucket.store(), bucket.store()
    first, data = bundle_bytes(2 * MB)
    assert not two.has(first) and two.entries() == []
    assert stream(one, data, host="a") is True
    assert two.has(first) and two.entry(first)["host"] == "a"
    body = two.open(first)
    try:
        assert body.read() == data
    finally:
        body.close()
    assert stream(two, data, host="b") is False  # one row, written by the first
    second, more = bundle_bytes(3 * MB)
    assert stream(two, more, host="b") is True
    assert {row["artifact_id"] for row in one.entries()} == {first, second}
    index = [key for key in bucket.keys() if "/index/" in key]
    assert len(index) == 2


def test_a_receiver_that_raced_past_the_check_does_not_rewrite_the_index(
    bucket: Bucket,
) -> None:
    one, two = bucket.store(), bucket.store()
    artifact_id, data = bundle_bytes(1000)
    assert stream(one, data, host="a") is True
    # The other receiver verified the same bytes and got to the copy at the same moment:
    # its index write is conditional (If-None-Match), so the first row stays.
    tmp_key = "fleet/models/.tmp/raced"
    bucket.s3.put_object(Bucket=bucket.name, Key=tmp_key, Body=data)
    row = {**one.entry(artifact_id), "host": "b"}
    assert two._publish(tmp_key, row) is False
    assert json.loads(bucket.read(f"fleet/models/index/{artifact_id}.json"))["host"] == "a"


def test_an_index_write_in_conflict_is_retried_not_taken_for_published(
    bucket: Bucket,
) -> None:
    store = bucket.store()
    artifact_id, data = bundle_bytes(1000)
    conflicts = Conflicts(store, times=2)  # the other write in flight failed: no row yet
    assert stream(store, data) is True
    assert conflicts.writes == 3
    assert bucket.store().entry(artifact_id)["host"] == "cpu-a"
    assert bucket.multiparts() == [] and not [key for key in bucket.keys() if "/.tmp/" in key]


def test_an_index_write_in_conflict_then_lost_answers_with_the_winners_row(
    bucket: Bucket,
) -> None:
    one, two = bucket.store(), bucket.store()
    artifact_id, data = bundle_bytes(1000)
    assert stream(one, data, host="a") is True  # the write that was in flight won
    tmp_key = "fleet/models/.tmp/raced"
    bucket.s3.put_object(Bucket=bucket.name, Key=tmp_key, Body=data)
    conflicts = Conflicts(two, times=1)
    assert two._publish(tmp_key, {**one.entry(artifact_id), "host": "b"}) is False
    assert conflicts.writes == 2 and two.entry(artifact_id)["host"] == "a"


def test_an_index_write_that_stays_in_conflict_is_a_retryable_503(bucket: Bucket) -> None:
    store = bucket.store()
    artifact_id, data = bundle_bytes(1000)
    Conflicts(store, times=1000)
    with pytest.raises(StoreUnavailable) as raised:
        stream(store, data)
    assert raised.value.status == 503 and raised.value.headers["Retry-After"]
    assert not store.has(artifact_id) and bucket.multiparts() == []
    assert not [key for key in bucket.keys() if "/index/" in key or "/.tmp/" in key]


def test_the_loser_of_a_race_for_another_model_removes_its_copy(bucket: Bucket) -> None:
    one, two = bucket.store(), bucket.store()
    artifact_id, data = bundle_bytes(1000)
    assert stream(one, data, host="a") is True  # as model gbt, mode realistic
    tmp_key = "fleet/models/.tmp/raced"
    bucket.s3.put_object(Bucket=bucket.name, Key=tmp_key, Body=data)
    row = {**one.entry(artifact_id), "model": "other", "host": "b"}
    assert two._publish(tmp_key, row) is False
    assert [key for key in bucket.keys() if not key.startswith("fleet/models/.tmp/")] == [
        f"fleet/models/gbt_realistic/{artifact_id}/bundle.tar.gz",
        f"fleet/models/index/{artifact_id}.json",
    ]


def test_a_listing_fetches_index_rows_at_once_and_caches_a_bounded_number(
    bucket: Bucket,
) -> None:
    writer, ids = bucket.store(), set()
    for n in range(5):
        artifact_id, data = bundle_bytes(1000 + n)
        assert stream(writer, data) is True
        ids.add(artifact_id)
    reader = bucket.store(row_cache=3)
    # The first four index reads wait for each other: one after another, they never meet.
    meeting, gets = threading.Barrier(4, timeout=20), []

    def get_object(**_: Any) -> None:
        gets.append(1)
        if len(gets) <= 4:
            meeting.wait()

    reader._s3.meta.events.register("before-call.s3.GetObject", get_object)
    assert {row["artifact_id"] for row in reader.entries()} == ids
    assert not meeting.broken and len(gets) == 5
    assert len(reader._rows) == 3  # bounded: the least recently used rows went
    assert {row["artifact_id"] for row in reader.entries()} == ids  # read again as needed
    assert len(reader._rows) == 3


def test_an_upload_whose_completion_answer_was_lost_leaves_no_temp_object(
    bucket: Bucket,
) -> None:
    store = bucket.store()
    artifact_id, data = bundle_bytes(6 * MB)
    with store.begin_upload(artifact_id, 64 * MB) as up:
        up.write(data)
        # S3 completed the multipart upload, but its answer never reached the receiver.
        bucket.s3.complete_multipart_upload(
            Bucket=bucket.name, Key=up.tmp_key, UploadId=up.upload_id,
            MultipartUpload={"Parts": up._parts})
        assert bucket.keys() == [up.tmp_key]
    assert bucket.keys() == [] and bucket.multiparts() == []


def test_kinds_are_recorded_and_filtered_by_the_reader(bucket: Bucket) -> None:
    store = bucket.store()
    model_id, model = bundle_bytes(1000)
    checkpoint_id, checkpoint = bundle_bytes(2000)
    stream(store, model)
    stream(store, checkpoint, kind="checkpoint")
    kinds = {row["artifact_id"]: row["kind"] for row in bucket.store().entries()}
    assert kinds == {model_id: "model", checkpoint_id: "checkpoint"}


def test_unknown_and_malformed_ids_are_not_found(bucket: Bucket) -> None:
    store = bucket.store()
    assert not store.has("cd" * 32) and not store.has("../etc")
    with pytest.raises(ArtifactNotFound):
        store.entry("cd" * 32)
    with pytest.raises(ArtifactNotFound):
        store.open("cd" * 32)
    with pytest.raises(BadRequest, match="^sha256: "):
        store.begin_upload("../x", MB)


def test_purge_temp_aborts_only_old_abandoned_multiparts(bucket: Bucket) -> None:
    store = bucket.store()
    artifact_id, data = bundle_bytes(6 * MB)
    crashed = store.begin_upload(artifact_id, 64 * MB)
    crashed.write(data)  # a receiver died here: its multipart upload stays open
    assert len(bucket.multiparts()) == 1
    assert bucket.store().purge_temp() == 0  # young: maybe another receiver's live upload
    assert len(bucket.multiparts()) == 1
    assert bucket.store().purge_temp(older_than_s=-60) == 1
    assert bucket.multiparts() == []


def test_purge_temp_aborts_an_abandoned_copy_at_a_bundle_key_and_only_ours(
    bucket: Bucket,
) -> None:
    store = bucket.store()
    keys = [f"fleet/models/gbt_realistic/{'ab' * 32}/bundle.tar.gz",  # a copy over 4 GiB
            "fleet/models/notes.txt", f"elsewhere/gbt_realistic/{'ab' * 32}/bundle.tar.gz"]
    for key in keys:
        bucket.s3.create_multipart_upload(Bucket=bucket.name, Key=key)
    # (moto reports every upload as initiated in 2010, so the default age says nothing here)
    assert store.purge_temp(older_than_s=-60) == 1
    assert sorted(upload["Key"] for upload in bucket.multiparts()) == sorted(keys[1:])


def test_an_unreachable_bucket_is_refused_at_start(bucket: Bucket) -> None:
    with pytest.raises(Exception, match="--store s3://no-such-bucket-here/x: the bucket"):
        S3Store("s3://no-such-bucket-here/x", endpoint_url=bucket.endpoint)
    with pytest.raises(BadRequest, match="^--store: "):
        S3Store("s3://Bad_Bucket/x", endpoint_url=bucket.endpoint)


# -- a real receiver, worker and `trainfleet pull` on the S3 store ---------------


def test_a_fleet_on_an_s3_store_trains_uploads_and_pulls(bucket: Bucket, tmp_path: Path) -> None:
    with Fleet(tmp_path) as fleet:
        # 9 MiB of random weights: two parts of the receiver's 8 MiB.
        manifest = fleet.manifest([job("a", hyper={"size_kib": 9 * 1024})])
        receiver = fleet.receiver(manifest, store=bucket.url, s3_endpoint_url=bucket.endpoint)
        job_id = receiver.jobs_by_name()["a"]["job_id"]
        worker = fleet.worker(receiver.url, "cpu-a", CPU_A, "--once")
        done = receiver.wait_status(job_id, "completed", timeout_s=60)
        assert worker.wait_exit(30) == 0
        artifact_id = done["artifact_id"]
        assert done["artifact_path"].startswith(f"s3://{bucket.name}/fleet/models/gbt_realistic/")
        assert f"fleet/models/index/{artifact_id}.json" in bucket.keys()
        assert bucket.multiparts() == []
        env = {"PATH": os.environ["PATH"], "TRAINFLEET_RECEIVER": receiver.url}
        listed = subprocess.run([sys.executable, "-m", "trainfleet", "models", "--json"],
                                capture_output=True, text=True, timeout=60, env=env)
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert row["artifact_id"] == artifact_id and row["kind"] == "model"
        assert row["path"] == done["artifact_path"]
        out = tmp_path / "pulled"
        pulled = subprocess.run([sys.executable, "-m", "trainfleet", "pull", "a", "-o", str(out)],
                                capture_output=True, text=True, timeout=60, env=env)
        assert pulled.returncode == 0, pulled.stderr
        [path] = out.glob("*.bundle")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact_id
        with urllib.request.urlopen(f"{receiver.url}/v1/model/{artifact_id}") as answer:
            assert int(answer.headers["Content-Length"]) == path.stat().st_size
            assert answer.headers["Content-Disposition"] == (
                f'attachment; filename="{artifact_id[:12]}-bundle.tar.zst"'
                if path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
                else f'attachment; filename="{artifact_id[:12]}-bundle.tar.gz"')


def test_a_worker_that_goes_away_mid_upload_leaves_no_multipart(
    bucket: Bucket, tmp_path: Path,
) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state",
                                store=bucket.url, s3_endpoint_url=bucket.endpoint)
    with serving(settings) as (host, port):
        claim = Client(f"http://{host}:{port}", retries=0).claim("w-1", cpu().to_dict())
        assert claim is not None
        artifact_id, data = bundle_bytes(20 * MB)
        target = (f"/v1/model/{artifact_id}?job_id={claim['job']['job_id']}"
                  f"&lease={claim['lease']}")
        with socket.create_connection((host, port)) as sock:
            sock.sendall(f"PUT {target} HTTP/1.1\r\nHost: {host}\r\n"
                         "Content-Type: application/octet-stream\r\n"
                         f"Content-Length: {len(data)}\r\n\r\n".encode())
            sock.sendall(data[:12 * MB])  # one 8 MiB part goes out while the body streams
            wait_for("the first part", lambda: bucket.multiparts(), 30)
        wait_for("the multipart upload to be aborted", lambda: bucket.multiparts() == [], 30)
        assert bucket.keys() == []


async def asgi(app: Any, method: str, target: str, receive: Any,
               headers: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[int, bytes]:
    """One request to the ASGI app itself, as uvicorn would make it: (status, body)."""
    path, _, query = target.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "root_path": "", "headers": list(headers),
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    answer: dict[str, Any] = {"body": b""}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["body"]


def test_a_cancelled_upload_aborts_its_multipart_in_a_thread(
    bucket: Bucket, tmp_path: Path,
) -> None:
    """A request cancelled mid-body (a client gone, a server stopping) must not make the
    multipart upload's abort, a network call, on the event loop."""
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    app = create_app(ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state",
                                      store=bucket.url, s3_endpoint_url=bucket.endpoint))
    state = app.state.receiver
    aborted_in: list[threading.Thread] = []
    state.store._s3.meta.events.register(
        "before-call.s3.AbortMultipartUpload",
        lambda **_: aborted_in.append(threading.current_thread()))
    artifact_id, data = bundle_bytes(20 * MB)

    async def scenario() -> None:
        claim_body = json.dumps({"worker_id": "w-1", "capability": cpu().to_dict()}).encode()

        async def claim_receive() -> dict[str, Any]:
            return {"type": "http.request", "body": claim_body, "more_body": False}

        status, body = await asgi(app, "POST", "/v1/job/claim", claim_receive,
                                  ((b"content-type", b"application/json"),))
        assert status == 200, body
        claim = json.loads(body)
        sent, never = False, asyncio.Event()

        async def body_then_silence() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data[:12 * MB], "more_body": True}
            await never.wait()  # the rest never comes: the request is cancelled meanwhile
            raise AssertionError("unreachable")

        target = (f"/v1/model/{artifact_id}?job_id={claim['job']['job_id']}"
                  f"&lease={claim['lease']}")
        headers = ((b"content-type", b"application/octet-stream"),
                   (b"content-length", str(len(data)).encode()))
        upload = asyncio.create_task(asgi(app, "PUT", target, body_then_silence, headers))
        while not await asyncio.to_thread(bucket.multiparts):  # one 8 MiB part went out
            assert not upload.done(), upload
            await asyncio.sleep(0.05)
        upload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await upload

    try:
        asyncio.run(scenario())
    finally:
        state.queue.close()
        state.store.close()
    assert bucket.multiparts() == [] and bucket.keys() == []
    assert len(aborted_in) == 1 and aborted_in[0] is not threading.main_thread()
