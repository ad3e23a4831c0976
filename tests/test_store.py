"""The local artifact store: verified uploads, the on-disk layout, the index and its repair."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

import pytest

from tests.conftest import cpu, job, manifest_text
from tests.live import serving
from trainfleet import bundle
from trainfleet.client import Client
from trainfleet.errors import (
    ArtifactNotFound,
    BadRequest,
    DigestMismatch,
    PayloadTooLarge,
    ReceiverError,
)
from trainfleet.receiver import ReceiverSettings
from trainfleet.store import LocalStore

MB = 1 << 20


def gzip_bundle(content: bytes) -> tuple[str, bytes]:
    data = gzip.compress(content, mtime=0)
    return hashlib.sha256(data).hexdigest(), data


def upload(
    store: LocalStore,
    data: bytes,
    artifact_id: str | None = None,
    *,
    model: str = "gbt",
    mode: str = "realistic",
    max_bytes: int = MB,
    chunk: int = 100,
    kind: str = "model",
) -> bool:
    """Stream `data` in chunks, as the receiver does with a request body."""
    artifact_id = artifact_id or hashlib.sha256(data).hexdigest()
    with store.begin_upload(artifact_id, max_bytes) as up:
        for start in range(0, len(data), chunk):
            up.write(data[start : start + chunk])
        return up.commit(job_id="job-1", model=model, mode=mode, host="cpu-a", kind=kind)


def index_rows(root: Path) -> list[dict[str, Any]]:
    text = (root / "index.jsonl").read_text() if (root / "index.jsonl").exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_upload_creates_the_layout_and_one_index_row(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "models")
    artifact_id, data = gzip_bundle(b"weights" * 1000)
    assert upload(store, data) is True
    expected = tmp_path / "models" / "gbt_realistic" / artifact_id / "bundle.tar.gz"
    assert store.has(artifact_id)
    assert store.path(artifact_id) == expected
    assert expected.read_bytes() == data
    assert files_under(tmp_path / "models") == [
        f"gbt_realistic/{artifact_id}/bundle.tar.gz",
        "index.jsonl",
    ]
    [row] = index_rows(tmp_path / "models")
    assert row == store.entry(artifact_id) == store.entries()[0]
    assert set(row) == {
        "artifact_id",
        "job_id",
        "model",
        "mode",
        "kind",
        "size",
        "host",
        "compression",
        "stored_at",
    }
    assert (row["artifact_id"], row["job_id"], row["host"]) == (artifact_id, "job-1", "cpu-a")
    assert (row["model"], row["mode"], row["size"]) == ("gbt", "realistic", len(data))
    assert row["compression"] == "gzip"


@pytest.mark.skipif(not bundle.zstd_available(), reason="zstandard not installed")
def test_a_real_zstd_bundle_is_stored_as_tar_zst(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.bin").write_bytes(b"\x01" * 4096)
    made = bundle.create(tmp_path / "out", tmp_path / "b", compression="zstd")
    store = LocalStore(tmp_path / "models")
    assert upload(store, made.path.read_bytes(), made.artifact_id, model="mlp", mode="oracle")
    assert store.path(made.artifact_id).name == "bundle.tar.zst"
    assert store.entry(made.artifact_id)["compression"] == "zstd"


def test_store_reloads_its_index(tmp_path: Path) -> None:
    artifact_id, data = gzip_bundle(b"a")
    upload(LocalStore(tmp_path), data)
    again = LocalStore(tmp_path)
    assert again.has(artifact_id)
    assert again.entry(artifact_id)["job_id"] == "job-1"
    assert len(index_rows(tmp_path)) == 1


def test_wrong_digest_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _, data = gzip_bundle(b"real")
    claimed = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DigestMismatch):
        upload(store, data, claimed)
    assert not store.has(claimed)
    assert files_under(tmp_path) == []  # no bundle, no temp file, no index
    assert [p.name for p in tmp_path.iterdir()] == [".tmp"]


def test_over_max_bytes_raises_and_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    artifact_id, data = gzip_bundle(bytes(range(256)) * 40)
    up = store.begin_upload(artifact_id, max_bytes=len(data) - 1)
    with pytest.raises(PayloadTooLarge):
        for start in range(0, len(data), 64):
            up.write(data[start : start + 64])
    assert files_under(tmp_path) == []
    with pytest.raises(ValueError, match="finished"):
        up.commit(job_id="j", model="gbt", mode="realistic", host="h")
    assert not store.has(artifact_id)


def test_second_upload_of_a_stored_artifact_is_not_rewritten(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    artifact_id, data = gzip_bundle(b"same bytes")
    assert upload(store, data) is True
    before = store.path(artifact_id).stat()
    assert upload(store, data, model="other", mode="mode") is False
    after = store.path(artifact_id).stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert store.path(artifact_id).read_bytes() == data
    assert after.st_mtime_ns >= before.st_mtime_ns  # only its last use moves (pruning)
    assert len(index_rows(tmp_path)) == 1
    assert files_under(tmp_path) == [f"gbt_realistic/{artifact_id}/bundle.tar.gz", "index.jsonl"]


def test_concurrent_commits_of_one_artifact_store_it_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _, data = gzip_bundle(b"raced")
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(upload(store, data))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert len(index_rows(tmp_path)) == 1
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_purge_temp_removes_leftovers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / ".tmp" / "crashed.part").write_bytes(b"half an upload")
    (tmp_path / ".tmp" / "another.part").write_bytes(b"")
    assert LocalStore(tmp_path).purge_temp() == 2
    assert store.purge_temp() == 0
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_aborted_upload_leaves_no_temp_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    artifact_id, data = gzip_bundle(b"x")
    with pytest.raises(RuntimeError):
        with store.begin_upload(artifact_id, MB) as up:
            up.write(data)
            raise RuntimeError("client went away")
    up.abort()  # idempotent
    assert files_under(tmp_path) == []


def test_index_is_repaired_from_bundles_on_disk(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    kept_id, kept = gzip_bundle(b"kept")
    lost_id, lost = gzip_bundle(b"lost")
    upload(store, kept)
    upload(store, lost, model="mlp_small", mode="oracle")
    rows = index_rows(tmp_path)
    # As if the receiver crashed between the rename and the index append:
    (tmp_path / "index.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows if r["artifact_id"] == kept_id)
    )
    repaired = LocalStore(tmp_path)
    assert repaired.has(lost_id) and repaired.has(kept_id)
    row = repaired.entry(lost_id)
    assert (row["model"], row["mode"], row["job_id"], row["host"]) == (
        "mlp_small",
        "oracle",
        None,
        None,
    )
    assert (row["size"], row["compression"]) == (len(lost), "gzip")
    assert [r["artifact_id"] for r in index_rows(tmp_path)] == [kept_id, lost_id]
    assert len(index_rows(LocalStore(tmp_path).root)) == 2  # repaired once, not again


DISK_FULL_AT_INDEX = """
import json, resource, sys
from pathlib import Path
from trainfleet.store import LocalStore
store = LocalStore(Path(sys.argv[1]))
data = bytes.fromhex(sys.argv[2])
# The index is already past this limit and a bundle is not: only the row append fails (EFBIG).
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
import hashlib
artifact_id = hashlib.sha256(data).hexdigest()
with store.begin_upload(artifact_id, 1 << 20) as up:
    up.write(data)
    placed = up.commit(job_id="job-9", model="gbt", mode="realistic", host="cpu-a")
print(json.dumps({"placed": placed, "has": store.has(artifact_id),
                  "size": store.entry(artifact_id)["size"]}))
"""


def test_a_full_disk_at_the_index_append_still_serves_the_artifact(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for n in range(5):
        upload(store, gzip_bundle(f"earlier {n}".encode())[1])
    assert (tmp_path / "index.jsonl").stat().st_size > 1024
    artifact_id, data = gzip_bundle(b"stored while the disk was full")
    done = subprocess.run([sys.executable, "-c", DISK_FULL_AT_INDEX, str(tmp_path), data.hex()],
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == {"placed": True, "has": True, "size": len(data)}
    assert "index row of" in done.stderr and artifact_id not in (
        tmp_path / "index.jsonl").read_text()
    repaired = LocalStore(tmp_path)  # the next start writes the missing row
    assert repaired.entry(artifact_id)["size"] == len(data)
    assert artifact_id in (tmp_path / "index.jsonl").read_text()


def test_torn_last_index_line_is_dropped_and_repaired(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    artifact_id, data = gzip_bundle(b"torn")
    upload(store, data)
    line = (tmp_path / "index.jsonl").read_text()
    (tmp_path / "index.jsonl").write_text(line[: len(line) // 2])  # crash mid-append
    repaired = LocalStore(tmp_path)
    assert repaired.entry(artifact_id)["model"] == "gbt"
    assert [r["artifact_id"] for r in index_rows(tmp_path)] == [artifact_id]


@pytest.mark.parametrize(
    "artifact_id", ["", "abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65, "../" + "0" * 61]
)
def test_bad_artifact_id_is_refused(tmp_path: Path, artifact_id: str) -> None:
    with pytest.raises(BadRequest, match="^sha256: "):
        LocalStore(tmp_path).begin_upload(artifact_id, MB)
    assert list((tmp_path / ".tmp").iterdir()) == []


@pytest.mark.parametrize("field", ["model", "mode"])
@pytest.mark.parametrize("value", ["", ".", "..", "../up", "a/b", "a\\b", "sp ace", "é"])
def test_unsafe_model_or_mode_is_refused(tmp_path: Path, field: str, value: str) -> None:
    store = LocalStore(tmp_path)
    _, data = gzip_bundle(b"x")
    with pytest.raises(BadRequest, match=f"^{field}: "):
        names = {"model": "gbt", "mode": "realistic", field: value}
        upload(store, data, model=names["model"], mode=names["mode"])
    assert files_under(tmp_path) == []


def test_non_bundle_bytes_are_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(BadRequest, match="not a zstd or gzip"):
        upload(store, b"plain text, not a bundle")
    assert files_under(tmp_path) == []


def test_unknown_artifact_is_not_found(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ArtifactNotFound):
        store.path("0" * 64)
    with pytest.raises(ArtifactNotFound):
        store.entry("0" * 64)
    assert not store.has("0" * 64)


def test_entries_filter_by_model(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    upload(store, gzip_bundle(b"1")[1], model="gbt")
    upload(store, gzip_bundle(b"2")[1], model="mlp")
    upload(store, gzip_bundle(b"3")[1], model="gbt", mode="oracle")
    assert len(store.entries()) == 3
    assert {(r["model"], r["mode"]) for r in store.entries("gbt")} == {
        ("gbt", "realistic"),
        ("gbt", "oracle"),
    }
    assert store.entries("transformer") == []


# -- artifact kinds ----------------------------------------------------------


def test_rows_carry_their_kind_and_rows_from_before_kinds_are_models(tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = LocalStore(root)
    model_id, model = gzip_bundle(b"final")
    checkpoint_id, checkpoint = gzip_bundle(b"epoch 3")
    assert upload(store, model) is True
    assert upload(store, checkpoint, kind="checkpoint") is True
    assert {r["artifact_id"]: r["kind"] for r in index_rows(root)} == {
        model_id: "model", checkpoint_id: "checkpoint"}
    old_id, old = gzip_bundle(b"written by an older receiver")
    with open(root / "index.jsonl", "a") as fh:  # a row as older receivers wrote it
        fh.write(json.dumps({"artifact_id": old_id, "model": "gbt", "mode": "realistic",
                             "compression": "gzip", "stored_at": "2020-01-01T00:00:00"}) + "\n")
    (root / "gbt_realistic" / old_id).mkdir()
    (root / "gbt_realistic" / old_id / "bundle.tar.gz").write_bytes(old)
    reopened = LocalStore(root)
    assert reopened.entry(old_id)["kind"] == "model"
    assert reopened.entry(checkpoint_id)["kind"] == "checkpoint"
    assert reopened.location(model_id) == str(reopened.path(model_id))


def test_an_unknown_kind_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "models")
    artifact_id, data = gzip_bundle(b"weights")
    with pytest.raises(BadRequest, match="^kind: expected one of model, checkpoint"):
        upload(store, data, kind="bogus")
    assert not store.has(artifact_id)
    assert files_under(tmp_path / "models") == []


def test_the_api_records_kind_lists_models_by_default_and_refuses_a_bogus_kind(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state")
    with serving(settings) as (host, port):
        url = f"http://{host}:{port}"
        client = Client(url, retries=0)
        claim = client.claim("w-1", cpu().to_dict())
        assert claim is not None
        artifact_id, data = gzip_bundle(b"mid-training state")
        query = {"job_id": claim["job"]["job_id"], "lease": claim["lease"]}

        def put(kind: str) -> tuple[int, dict[str, Any]]:
            target = f"{url}/v1/model/{artifact_id}?" + urlencode({**query, "kind": kind})
            request = Request(target, data=data, method="PUT",
                              headers={"Content-Type": "application/octet-stream"})
            try:
                with urlopen(request) as answer:
                    return answer.status, json.loads(answer.read())
            except HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, answer = put("bogus")
        assert status == 422 and "kind" in answer["error"], answer
        assert not (tmp_path / "state" / "models" / "index.jsonl").exists()
        assert put("checkpoint")[0] == 201
        assert client.models() == []  # models only, by default
        [row] = client.models(kind="checkpoint")
        assert row["artifact_id"] == artifact_id and row["kind"] == "checkpoint"
        assert index_rows(tmp_path / "state" / "models")[0]["kind"] == "checkpoint"
        with pytest.raises(ReceiverError, match="kind") as refused:
            client.models(kind="bogus")
        assert refused.value.status == 422
        env = {"PATH": "/usr/bin:/bin", "TRAINFLEET_RECEIVER": url}
        listed = [subprocess.run([sys.executable, "-m", "trainfleet", "models", *flags],
                                 capture_output=True, text=True, timeout=60, env=env)
                  for flags in (["--json"], ["--kind", "checkpoint", "--json"])]
        assert [p.returncode for p in listed] == [0, 0], [p.stderr for p in listed]
        assert json.loads(listed[0].stdout) == []
        assert [r["artifact_id"] for r in json.loads(listed[1].stdout)] == [artifact_id]
