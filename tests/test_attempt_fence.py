"""Worker mutations may name their attempt; a lease from another attempt is fenced (409)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cpu, job, manifest_text
from tests.live import serving
from trainfleet.client import Client
from trainfleet.errors import LeaseLost
from trainfleet.receiver import ReceiverSettings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "s")
    with serving(settings) as (host, port):
        yield Client(f"http://{host}:{port}", retries=0)


def test_calls_naming_the_right_attempt_are_accepted(client: Client) -> None:
    claim = client.claim("w", cpu().to_dict())
    assert claim is not None
    job_id, lease = claim["job"]["job_id"], claim["lease"]
    assert client.heartbeat(job_id, lease, attempt=claim["attempt"]) == "continue"
    done = client.fail(job_id, lease, "boom", True, "trainer_error", attempt=1)
    assert done["status"] == "pending"


def test_a_call_naming_another_attempt_is_fenced_and_writes_nothing(client: Client) -> None:
    claim = client.claim("w", cpu().to_dict())
    assert claim is not None
    job_id, lease = claim["job"]["job_id"], claim["lease"]
    before = client.job(job_id)
    for call in (lambda: client.heartbeat(job_id, lease, {"fraction": 0.5}, attempt=2),
                 lambda: client.fail(job_id, lease, "boom", True, "trainer_error", attempt=2),
                 lambda: client.complete(job_id, lease, "a" * 64, {}, attempt=2)):
        with pytest.raises(LeaseLost, match="attempt 2"):
            call()
    after = client.job(job_id)
    assert (after["status"], after["progress"], after["history"]) == (
        before["status"], before["progress"], before["history"])
