"""The hot lane (receiver/hot_routes.py) answers claim, heartbeat and complete exactly as
FastAPI does: two real receivers, one with the lane and one without, get the same requests
(good ones and every kind of bad one) and must give the same statuses and bodies."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, Depends
from fastapi.routing import APIRoute

from tests.conftest import cpu, job, manifest_text
from tests.live import serving
from trainfleet.client import Client
from trainfleet.receiver import ReceiverSettings, hot_routes, routes

WORKER_TOKEN = "worker-secret-token"
JSON = {"Content-Type": "application/json"}
#: Fields that differ between two receivers by nature: a lease is random, times are now.
VOLATILE = ("lease", "claimed_at", "heartbeat_at", "created_at", "updated_at", "pending_since",
            "progress_at", "checkpoint_at")
Exchange = tuple[int, str, Any]


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "<volatile>" if k in VOLATILE else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


class Both:
    """The same request to the receiver with the lane and to the one without."""

    def __init__(self, ports: tuple[int, int]) -> None:
        self.ports = ports

    def send(self, method: str, path: str, body: bytes | None = None,
             headers: list[tuple[str, str]] | None = None) -> tuple[Exchange, Exchange]:
        lean, full = (self._one(port, method, path, body, headers) for port in self.ports)
        return lean, full

    def _one(self, port: int, method: str, path: str, body: bytes | None,
             headers: list[tuple[str, str]] | None) -> Exchange:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers or []:
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders(body)
            answer = conn.getresponse()
            raw = answer.read()
            parsed = json.loads(raw) if raw else None
            return answer.status, answer.getheader("Content-Type") or "", _masked(parsed)
        finally:
            conn.close()

    def same(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             token: str | None = WORKER_TOKEN, content_type: str | None = "application/json",
             extra: list[tuple[str, str]] | None = None) -> Exchange:
        """Send to both; the answers must match. The lane's answer (masked) is returned."""
        headers = [] if content_type is None else [("Content-Type", content_type)]
        if token is not None:
            headers.append(("X-Worker-Token", token))
        headers += extra or []
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        lean, full = self.send(method, path, data, headers)
        assert lean == full, f"{method} {path}: the lane answered {lean}, FastAPI {full}"
        return lean


@pytest.fixture
def both(tmp_path: Path) -> Iterator[Both]:
    manifest = tmp_path / "jobs.toml"
    manifest.write_text(manifest_text([job("alpha"), job("beta", model="mlp"), job("gamma")]))
    with ExitStack() as stack:
        ports = []
        for name, lane in (("lean", True), ("full", False)):
            settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / name,
                                        worker_token=WORKER_TOKEN, max_body_bytes=4096)
            ports.append(stack.enter_context(serving(settings, hot_lane=lane))[1])
        yield Both((ports[0], ports[1]))


def _claim_body(worker: str = "w1", **more: Any) -> dict[str, Any]:
    return {"worker_id": worker, "capability": cpu().to_dict(), **more}


def _error(answer: Exchange, status: int, *names: str) -> None:
    """A JSON error of that status whose message names each of `names`."""
    code, content_type, body = answer
    assert (code, content_type) == (status, "application/json"), answer
    assert set(body) == {"error", "detail"}, body
    for name in names:
        assert name in body["error"], body


def test_claim_refusals_match_fastapi(both: Both) -> None:
    claim = "/v1/job/claim"
    _error(both.same("POST", claim, _claim_body(), token=None), 401, "X-Worker-Token")
    _error(both.same("POST", claim, _claim_body(), token="wrong"), 401, "wrong token")
    _error(both.same("POST", claim, _claim_body(), extra=[("X-Worker-Token", WORKER_TOKEN)]),
           401, "more than once")
    # The body is read first: bad JSON is a 422 even before the token is looked at.
    _error(both.same("POST", claim, raw=b'{"worker_id": ', token=None), 422, "body")
    _error(both.same("POST", claim, raw=b"\xff\xfe"), 422, "JSON decode error")
    _error(both.same("POST", claim, _claim_body(), content_type="text/plain"), 422, "body")
    _error(both.same("POST", claim, _claim_body(), content_type=None), 422, "body")
    assert both.same("POST", claim, _claim_body(), content_type=(
        "application/vnd.trainfleet+json; charset=utf-8"))[0] == 200  # +json is JSON: claimed
    _error(both.same("POST", claim, raw=b""), 422, "body: Field required")
    _error(both.same("POST", claim, raw=b"[1, 2]"), 422, "body")
    _error(both.same("POST", claim, {"capability": cpu().to_dict()}), 422, "body.worker_id")
    _error(both.same("POST", claim, _claim_body(attempts=7)), 422, "body.attempts")
    _error(both.same("POST", claim, _claim_body(slot_vram_gib="lots")), 422,
           "body.slot_vram_gib")
    _error(both.same("POST", claim, raw=b'{"pad": "' + b"x" * 5000 + b'"}'), 413)
    # Not the lane's: other methods and a trailing slash go on to FastAPI, alike.
    assert both.same("GET", claim)[0] == 405
    assert both.same("POST", claim + "/", _claim_body())[0] in (307, 404, 405)


def test_a_cycle_and_its_refusals_match_fastapi(both: Both, tmp_path: Path) -> None:
    lean_claim, full_claim = _claims(both)
    assert _masked(lean_claim) == _masked(full_claim)
    assert lean_claim["job"]["name"] == "alpha" and lean_claim["attempt"] == 1
    lean_lease, full_lease = lean_claim["lease"], full_claim["lease"]
    job_id = lean_claim["job"]["job_id"]
    beat = f"/v1/job/{job_id}/heartbeat"
    done = f"/v1/job/{job_id}/complete"

    _error(both.same("POST", beat, {"lease": "x"}, token=None), 401)
    _error(both.same("POST", "/v1/job/nosuchjob/heartbeat", {"lease": "x"}), 404, "nosuchjob")
    _error(both.same("POST", "/v1/job/" + "n" * 201 + "/heartbeat", {"lease": "x"}), 422,
           "path.job_ref")
    _error(both.same("POST", beat, {"lease": "not-the-lease"}), 409)
    _error(both.same("POST", beat, {"progress": {"fraction": 0.5}}), 422, "body.lease")
    _error(both.same("POST", beat, raw=b"{"), 422, "body")
    # Each receiver is sent its own lease: wrong attempt, then right.
    lean, full = _each(both, "POST", beat, [{"lease": lean_lease, "attempt": 2},
                                            {"lease": full_lease, "attempt": 2}])
    assert lean == full and lean[0] == 409, (lean, full)
    lean, full = _each(both, "POST", beat, [
        {"lease": lean_lease, "attempt": 1, "progress": {"fraction": 0.5, "message": "m"}},
        {"lease": full_lease, "attempt": 1, "progress": {"fraction": 0.5, "message": "m"}}])
    assert lean == full == (200, "application/json", {"action": "continue"}), (lean, full)

    artifact = "0" * 64
    lean, full = _each(both, "POST", done, [{"lease": lean_lease, "artifact_id": artifact},
                                            {"lease": full_lease, "artifact_id": artifact}])
    assert lean == full and lean[0] == 400 and "not in the store" in lean[2]["error"]
    _error(both.same("POST", done, {"lease": "x", "artifact_id": "short"}), 422,
           "body.artifact_id")
    bundle = tmp_path / "tiny.bundle"
    bundle.write_bytes(gzip.compress(b"hot lane", mtime=0))
    artifact = hashlib.sha256(bundle.read_bytes()).hexdigest()
    for port, lease in zip(both.ports, (lean_lease, full_lease), strict=True):
        client = Client(f"http://127.0.0.1:{port}", worker_token=WORKER_TOKEN, retries=0)
        client.upload(artifact, bundle, job_id, lease)
    _error(both.same("POST", done, {"lease": "stale", "artifact_id": artifact}), 409)
    bodies = [{"lease": lease, "artifact_id": artifact, "metrics": {"accuracy": 0.9}}
              for lease in (lean_lease, full_lease)]
    lean, full = _each(both, "POST", done, bodies)
    assert lean == full and lean[0] == 200 and lean[2]["status"] == "completed", (lean, full)
    assert _each(both, "POST", done, bodies) == (lean, full)  # a repeat is a no-op
    _error(both.same("POST", beat, {"lease": "stale"}), 409)


def test_metrics_and_openapi_match_fastapi(both: Both) -> None:
    both.same("POST", "/v1/job/claim", _claim_body())
    both.same("POST", "/v1/job/nosuchjob/complete", {"lease": "x", "artifact_id": "0" * 64})
    labels = []
    for port in both.ports:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        labels.append(sorted(re.findall(r"^trainfleet_request_seconds_count\{(.*)\} ", text,
                                        re.MULTILINE)))
    assert labels[0] == labels[1]
    assert 'method="POST",route="/v1/job/claim"' in labels[0]
    assert 'method="POST",route="/v1/job/{job_ref}/complete"' in labels[0]
    lean, full = both.send("GET", "/openapi.json")
    assert lean == full and lean[0] == 200
    assert "/v1/job/{job_ref}/heartbeat" in lean[2]["paths"]


def _claims(both: Both) -> tuple[dict[str, Any], dict[str, Any]]:
    """A claim on each receiver, unmasked (each lease is needed), checked for bytes alike:
    the same length and content type once the lease and times are masked."""
    answers = []
    for port in both.ports:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/job/claim", body=json.dumps(_claim_body()),
                     headers={**JSON, "X-Worker-Token": WORKER_TOKEN})
        response = conn.getresponse()
        assert (response.status, response.getheader("Content-Type")) == (200, "application/json")
        answers.append(json.loads(response.read()))
        conn.close()
    return answers[0], answers[1]


def _each(both: Both, method: str, path: str, bodies: list[dict[str, Any]]
          ) -> tuple[Exchange, Exchange]:
    """A different body to each receiver (its own lease); both answers, masked."""
    answers = []
    for port, body in zip(both.ports, bodies, strict=True):
        headers = [("Content-Type", "application/json"), ("X-Worker-Token", WORKER_TOKEN)]
        answers.append(both._one(port, method, path, json.dumps(body).encode(), headers))
    return answers[0], answers[1]


def test_the_lane_refuses_a_hot_route_declared_otherwise() -> None:
    """Another dependency on claim in routes.py would be skipped by the lane: it says so."""
    router = APIRouter()
    router.add_api_route("/v1/job/claim", routes.claim, methods=["POST"],
                         dependencies=[Depends(routes.operator_auth)])
    changed = router.routes[0]
    assert isinstance(changed, APIRoute)
    with pytest.raises(RuntimeError, match="hot_routes.py does not serve /v1/job/claim"):
        hot_routes._check(changed, routes.claim, [routes.worker_auth], path_params=0)
    as_declared = next(r for r in routes.router.routes
                       if isinstance(r, APIRoute) and r.path == "/v1/job/claim")
    hot_routes._check(as_declared, routes.claim, [routes.worker_auth], path_params=0)
