"""Per-host worker tokens over HTTP: minting, enrollment, host binding and revocation.

A real receiver in uvicorn on 127.0.0.1:0 (tests.live), driven through trainfleet.client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cpu, gpu, job, manifest_text
from tests.live import serving
from trainfleet import bundle
from trainfleet.client import Client
from trainfleet.errors import ReceiverError
from trainfleet.queue.sqlite import SqliteQueue
from trainfleet.receiver import ReceiverSettings
from trainfleet.tokens import TokenKind, hash_token, new_token, parse_duration

OPERATOR_TOKEN = "operator-secret"
SHARED_TOKEN = "shared-worker-secret"


@dataclass
class Rx:
    url: str
    settings: ReceiverSettings

    @property
    def operator(self) -> Client:
        return Client(self.url, operator_token=OPERATOR_TOKEN, retries=0, timeout_s=10.0)

    def worker(self, token: str | None) -> Client:
        return Client(self.url, worker_token=token, retries=0, timeout_s=10.0)

    def mint(self, hostname: str) -> str:
        """A worker token for `hostname`."""
        return str(self.operator.create_token(hostname)["token"])

    def claim(self, token: str | None, cap: Any, worker_id: str = "w") -> dict[str, Any]:
        claimed = self.worker(token).claim(worker_id, cap.to_dict())
        assert claimed is not None
        return claimed


Start = Callable[..., Rx]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """start(**settings): a fresh receiver with four jobs and an operator token."""
    with ExitStack() as stack:
        def start_(**overrides: Any) -> Rx:
            root = tmp_path / f"rx-{len(list(tmp_path.iterdir()))}"
            root.mkdir()
            manifest = root / "manifest.toml"
            manifest.write_text(manifest_text([job(n) for n in ("a", "b", "c", "d")]))
            settings = ReceiverSettings(**{"manifest_path": manifest, "state_dir": root / "state",
                                           "operator_token": OPERATOR_TOKEN, **overrides})
            host, port = stack.enter_context(serving(settings))
            return Rx(f"http://{host}:{port}", settings)

        yield start_


def refused(call: Callable[[], Any], status: int, *needles: str) -> str:
    """Run a call that must fail with this status; its message, which names the needles."""
    with pytest.raises(ReceiverError) as caught:
        call()
    assert caught.value.status == status, caught.value.message
    for needle in needles:
        assert needle in caught.value.message
    return caught.value.message


# -- the token format --------------------------------------------------------


def test_tokens_are_prefixed_random_and_stored_as_sha256() -> None:
    worker, code = new_token(TokenKind.WORKER), new_token(TokenKind.ENROLL)
    assert worker.startswith("tfw_") and len(worker) > 40 and code.startswith("tfe_")
    assert new_token(TokenKind.WORKER) != worker
    assert len(hash_token(worker)) == 64 and hash_token(worker) == hash_token(worker.encode())
    assert hash_token("caf\xe9") == hash_token(b"caf\xe9")  # a latin-1 header hashes, no error


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900),
                                               ("24h", 86400), ("1.5h", 5400), ("7d", 604800),
                                               ("2w", 1209600)])
def test_parse_duration_reads_the_usual_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1h", "24x", "h", "1 day"])
def test_parse_duration_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="24h"):
        parse_duration(text)


# -- who may call as a worker ------------------------------------------------


def test_worker_calls_stay_open_until_a_host_token_is_issued(start: Start) -> None:
    rx = start()
    rx.claim(None, cpu("cpu-a"))
    rx.operator.create_token("gpu-a", enroll=True)
    rx.claim(None, cpu("cpu-a"), "w2")  # a pending code alone changes nothing
    rx.mint("gpu-a")
    refused(lambda: rx.claim(None, cpu("cpu-a"), "w3"), 401, "X-Worker-Token: missing token")
    refused(lambda: rx.claim("tfw_guess", cpu("cpu-a"), "w3"), 401, "wrong token")


def test_require_worker_token_closes_worker_calls_before_any_enrollment(start: Start) -> None:
    rx = start(require_worker_token=True)
    refused(lambda: rx.claim(None, cpu()), 401, "missing token")
    rx.claim(rx.mint("cpu-a"), cpu("cpu-a"))


def test_require_worker_token_allows_a_bind_beyond_loopback(tmp_path: Path) -> None:
    settings = ReceiverSettings(manifest_path=tmp_path / "m.toml", state_dir=tmp_path,
                                host="0.0.0.0")
    problem = settings.bind_problem()
    assert problem is not None and "--require-worker-token" in problem
    assert ReceiverSettings(manifest_path=tmp_path / "m.toml", state_dir=tmp_path,
                            host="0.0.0.0", require_worker_token=True).bind_problem() is None


def test_host_token_claims_only_as_its_own_host(start: Start) -> None:
    rx = start()
    token = rx.mint("gpu-a")
    refused(lambda: rx.claim(token, cpu("cpu-b")), 403,
            "worker for host 'gpu-a' cannot claim as host 'cpu-b'")
    assert rx.claim(token, gpu("gpu-a"))["job"]["hostname"] == "gpu-a"


def test_host_token_cannot_touch_another_hosts_job(start: Start, tmp_path: Path) -> None:
    rx = start()
    mine, theirs = rx.mint("gpu-a"), rx.mint("cpu-b")
    claimed = rx.claim(theirs, cpu("cpu-b"))
    job_id, lease = claimed["job"]["job_id"], claimed["lease"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.bin").write_bytes(b"weights")
    made = bundle.create(out, tmp_path / "model.bundle")
    intruder = rx.worker(mine)
    message = "worker for host 'gpu-a' cannot touch job of host 'cpu-b'"
    refused(lambda: intruder.heartbeat(job_id, lease), 403, message)
    refused(lambda: intruder.fail(job_id, lease, "x", True, "trainer_error"), 403, message)
    refused(lambda: intruder.complete(job_id, lease, made.artifact_id, {}), 403, message)
    refused(lambda: intruder.upload(made.artifact_id, made.path, job_id, lease), 403, message)
    refused(lambda: intruder.upload_log(job_id, lease, 1, "log"), 403, message)
    after = rx.operator.job(job_id)
    assert after["status"] == "claimed" and not intruder.has_artifact(made.artifact_id)
    assert rx.worker(theirs).heartbeat(job_id, lease) == "continue"


def test_shared_token_still_serves_any_host_beside_host_tokens(start: Start) -> None:
    rx = start(worker_token=SHARED_TOKEN)
    token = rx.mint("gpu-a")
    rx.claim(SHARED_TOKEN, cpu("cpu-b"))
    rx.claim(token, gpu("gpu-a"))
    refused(lambda: rx.claim(None, cpu("cpu-b")), 401, "missing token")


def test_an_enrollment_code_is_not_a_worker_token(start: Start) -> None:
    rx = start()
    rx.mint("other")
    code = rx.operator.create_token("gpu-a", enroll=True)["token"]
    refused(lambda: rx.claim(code, gpu("gpu-a")), 401, "enrollment code", "trainfleet enroll")


# -- enrollment ----------------------------------------------------------------


def test_enroll_trades_a_code_once_for_a_working_token(start: Start) -> None:
    rx = start()
    before = time.time()
    made = rx.operator.create_token("gpu-a", enroll=True)
    assert made["kind"] == "enroll" and made["token"].startswith("tfe_")
    assert before + 86400 - 5 < made["expires_at"] < time.time() + 86400 + 5  # default 24h
    host = rx.worker(None)
    answer = host.enroll(made["token"], "gpu-a")
    assert answer["hostname"] == "gpu-a" and answer["token"].startswith("tfw_")
    assert rx.claim(answer["token"], gpu("gpu-a"))["job"]["hostname"] == "gpu-a"
    refused(lambda: host.enroll(made["token"], "gpu-a"), 403, "already used", "works once")


def test_enroll_refuses_unknown_codes_and_other_hostnames(start: Start) -> None:
    rx = start()
    code = rx.operator.create_token("gpu-a", enroll=True, ttl_s=600)["token"]
    host = rx.worker(None)
    refused(lambda: host.enroll("tfe_mistyped", "gpu-a"), 403, "not known")
    refused(lambda: host.enroll(code, "gpu-b"), 403, "for host 'gpu-a', not 'gpu-b'")
    assert host.enroll(code, "gpu-a")["hostname"] == "gpu-a"  # the refusal did not burn it


def test_enroll_refuses_an_expired_code(start: Start) -> None:
    rx = start()
    code = new_token(TokenKind.ENROLL)
    side = SqliteQueue(rx.settings.db_path)  # the receiver's own database, as a second writer
    try:
        side.create_token("gpu-a", TokenKind.ENROLL, hash_token(code),
                          expires_at=time.time() - 1)
    finally:
        side.close()
    refused(lambda: rx.worker(None).enroll(code, "gpu-a"), 403, "expired at",
            "trainfleet token create gpu-a --enroll")


# -- listing and revoking ------------------------------------------------------


def test_token_list_shows_hosts_kinds_and_last_use_but_no_secret(start: Start) -> None:
    rx = start()
    code = rx.operator.create_token("cpu-b", enroll=True)["token"]
    token = rx.mint("gpu-a")
    rx.claim(token, gpu("gpu-a"))
    rows = rx.operator.tokens()
    assert [(r["hostname"], r["kind"], r["active"]) for r in rows] == [
        ("cpu-b", "enroll", True), ("gpu-a", "worker", True)]
    assert rows[1]["last_used_at"] is not None and rows[0]["last_used_at"] is None
    text = json.dumps(rows)
    assert code not in text and token not in text and hash_token(token) not in text
    assert rows[1]["token_id"] == hash_token(token)[:12]


def test_revoked_host_is_refused_at_once_and_its_job_requeued(start: Start) -> None:
    rx = start()
    token = rx.mint("gpu-a")
    claimed = rx.claim(token, gpu("gpu-a"))
    job_id = claimed["job"]["job_id"]
    result = rx.operator.revoke_host("gpu-a")
    assert result == {"hostname": "gpu-a", "revoked": 1, "requeued": [job_id]}
    refused(lambda: rx.worker(token).heartbeat(job_id, claimed["lease"]), 401,
            "the token of host 'gpu-a' was revoked")
    job_now = rx.operator.job(job_id)
    assert job_now["status"] == "pending" and "revoked" in job_now["error"]
    [row] = rx.operator.tokens()
    assert row["revoked_at"] is not None and row["active"] is False
    refused(lambda: rx.operator.revoke_host("gpu-a"), 404, "no active token")


def test_token_calls_are_operator_calls(start: Start) -> None:
    rx = start()
    anonymous = Client(rx.url, retries=0)
    refused(lambda: anonymous.create_token("gpu-a"), 401, "X-Operator-Token")
    refused(lambda: anonymous.tokens(), 401, "X-Operator-Token")
    refused(lambda: anonymous.revoke_host("gpu-a"), 401, "X-Operator-Token")
    closed = start(operator_token=None)
    refused(lambda: closed.operator.create_token("gpu-a"), 403, "operator calls are disabled")


def test_token_requests_are_validated(start: Start) -> None:
    rx = start()
    refused(lambda: rx.operator.create_token("bad host/name"), 422, "hostname")
    refused(lambda: rx.operator.create_token("gpu-a", ttl_s=-5), 422, "ttl_s")


def test_openapi_describes_the_token_endpoints(start: Start) -> None:
    rx = start()
    paths = json.loads(rx.worker(None)._call("GET", "/openapi.json"))["paths"]
    assert {"/v1/tokens", "/v1/tokens/{hostname}/revoke", "/v1/enroll"} <= set(paths)
