"""The receiver's HTTP API, against a real uvicorn on a socket bound to 127.0.0.1:0.

Worker and operator calls go through trainfleet.client.Client; raw http.client requests
cover what the client cannot express (missing or odd headers, bad bodies, status codes).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cpu, gpu, job, manifest_text
from tests.live import serving
from trainfleet import __version__, bundle
from trainfleet.client import Client
from trainfleet.errors import LeaseLost, ReceiverError
from trainfleet.manifest import job_id_of
from trainfleet.receiver import ReceiverSettings

OPERATOR_TOKEN = "operator-secret-token"
WORKER_TOKEN = "worker-secret-token"
JOBS = [job("alpha"), job("beta", model="mlp")]


# -- a real receiver -------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    settings: ReceiverSettings
    host: str
    port: int
    cap: dict[str, Any] = field(default_factory=lambda: cpu().to_dict())

    @property
    def manifest_path(self) -> Path:
        return self.settings.manifest_path

    @property
    def models_dir(self) -> Path:
        return self.settings.store_root

    def client(
        self, worker_token: str | None = WORKER_TOKEN, operator_token: str | None = OPERATOR_TOKEN
    ) -> Client:
        return Client(self.url, worker_token=worker_token, operator_token=operator_token,
                      timeout_s=10.0, retries=0)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, Any] | None = None,
        worker_token: str | None = WORKER_TOKEN,
    ) -> Answer:
        """One raw request; `body` is JSON unless it is bytes or an iterable of chunks."""
        all_headers: dict[str, Any] = {}
        if worker_token is not None:
            all_headers["X-Worker-Token"] = worker_token
        data: Any = body
        if body is not None and not isinstance(body, bytes | Iterator):
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers |= headers or {}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=data, headers=all_headers)
            response = conn.getresponse()
            with response:
                return Answer(response.status, response.headers, response.read())
        finally:
            conn.close()

    def claim(self, cap: dict[str, Any] | None = None, worker_id: str = "w-1") -> dict[str, Any]:
        claimed = self.client().claim(worker_id, cap or self.cap)
        assert claimed is not None
        return claimed


Start = Callable[..., Receiver]


def launch(
    stack: ExitStack, root: Path, jobs: list[dict[str, Any]] | None = None, **overrides: Any
) -> Receiver:
    """A receiver with its own manifest and state dir under `root`, stopped with `stack`."""
    root.mkdir()
    manifest_path = root / "manifest.toml"
    manifest_path.write_text(manifest_text(JOBS if jobs is None else jobs))
    values: dict[str, Any] = {
        "manifest_path": manifest_path, "state_dir": root / "state",
        "operator_token": OPERATOR_TOKEN, "worker_token": WORKER_TOKEN,
        "max_upload_bytes": 1 << 20, "max_body_bytes": 64 << 10, "max_log_bytes": 64 << 10,
    }
    settings = ReceiverSettings(**(values | overrides))
    host, port = stack.enter_context(serving(settings))
    return Receiver(f"http://{host}:{port}", settings, host, port)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """start(jobs=..., **settings): a fresh receiver for this test."""
    with ExitStack() as stack:
        count = 0

        def start_(jobs: list[dict[str, Any]] | None = None, **overrides: Any) -> Receiver:
            nonlocal count
            count += 1
            return launch(stack, tmp_path / f"receiver-{count}", jobs, **overrides)

        yield start_


@pytest.fixture
def rx(start: Start) -> Receiver:
    """A fresh receiver with both an operator and a worker token configured."""
    return start()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    """One receiver for the tests whose calls are all refused: they check it stays unchanged."""
    with ExitStack() as stack:
        yield launch(stack, tmp_path_factory.mktemp("shared") / "receiver")


@pytest.fixture(scope="module")
def shared_no_operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    """A receiver without an operator token: operator calls must fail closed."""
    with ExitStack() as stack:
        root = tmp_path_factory.mktemp("no-operator") / "receiver"
        yield launch(stack, root, operator_token=None)


@pytest.fixture
def made_bundle(tmp_path: Path) -> bundle.Bundle:
    src = tmp_path / "output"
    src.mkdir()
    (src / "model.txt").write_text("weights: 1 2 3\n")
    (src / "metrics.json").write_text('{"rmse": 0.1}\n')
    return bundle.create(src, tmp_path / "model.bundle")


def model_path(b: bundle.Bundle, job_ref: str, lease: str) -> str:
    return f"/v1/model/{b.artifact_id}?job_id={job_ref}&lease={lease}"


def octets(data: bytes) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}


def assert_store_empty(r: Receiver) -> None:
    """No bundle directory, no temp file and no index row."""
    assert [p for p in r.models_dir.iterdir() if p.is_dir() and p.name != ".tmp"] == []
    assert list((r.models_dir / ".tmp").iterdir()) == []
    index = r.models_dir / "index.jsonl"
    assert not index.exists() or index.read_text() == ""
    assert r.request("GET", "/v1/models").json() == {"models": []}


def assert_error(answer: Answer, status: int, *needles: str) -> dict[str, Any]:
    """A JSON `{"error", "detail"}` answer with this status whose message names `needles`."""
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error", "detail"}
    assert isinstance(body["error"], str) and body["error"]
    for needle in needles:
        assert needle in body["error"]
    return dict(body)


# -- health, openapi, docs -------------------------------------------------


def test_health_answers_ok_with_version_backend_and_counts(shared: Receiver) -> None:
    health = shared.client().health()
    assert health["ok"] is True
    assert health["version"] == __version__
    assert health["backend"] == "sqlite"
    assert health["counts"]["pending"] == 2
    assert sum(health["counts"].values()) == 2
    assert health["uptime_s"] >= 0


def test_openapi_lists_every_route_of_the_protocol(shared: Receiver) -> None:
    answer = shared.request("GET", "/openapi.json")
    assert answer.status == 200
    paths = answer.json()["paths"]
    expected = {
        "/v1/job/claim": {"post"},
        "/v1/job/{job_ref}/heartbeat": {"post"},
        "/v1/job/{job_ref}/complete": {"post"},
        "/v1/job/{job_ref}/fail": {"post"},
        "/v1/job/{job_ref}/checkpoint": {"post"},
        "/v1/model/{artifact_id}": {"put", "head", "get"},
        "/v1/job/{job_ref}/log": {"put"},
        "/v1/jobs/{job_ref}/log": {"get"},
        "/v1/jobs": {"get"},
        "/v1/jobs/{job_ref}": {"get"},
        "/v1/workers": {"get"},
        "/v1/job/{job_ref}/cancel": {"post"},
        "/v1/job/{job_ref}/requeue": {"post"},
        "/v1/manifest/reload": {"post"},
        "/v1/health": {"get"},
        "/v1/models": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    schemes = answer.json()["components"]["securitySchemes"]
    assert {s["name"] for s in schemes.values()} == {"X-Worker-Token", "X-Operator-Token",
                                                     "X-Read-Token"}

    def headers_of(path: str, method: str) -> set[str]:
        return {schemes[name]["name"] for s in paths[path][method].get("security", [])
                for name in s}

    upload_answers = set(paths["/v1/model/{artifact_id}"]["put"]["responses"])
    assert {"201", "200", "408", "413", "503", "507"} <= upload_answers
    assert headers_of("/v1/job/claim", "post") == {"X-Worker-Token"}
    assert headers_of("/v1/job/{job_ref}/cancel", "post") == {"X-Operator-Token"}
    assert headers_of("/v1/health", "get") == set()
    assert headers_of("/v1/jobs", "get") == {"X-Read-Token", "X-Operator-Token", "X-Worker-Token"}


def test_docs_page_renders_as_html(shared: Receiver) -> None:
    answer = shared.request("GET", "/docs")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    assert b"/openapi.json" in answer.body


# -- worker token ----------------------------------------------------------

LEASE = "0" * 32
WORKER_CALLS: list[tuple[str, str, Any]] = [
    ("POST", "/v1/job/claim", {"worker_id": "w-1", "capability": cpu().to_dict()}),
    ("POST", "/v1/job/alpha/heartbeat", {"lease": LEASE}),
    ("POST", "/v1/job/alpha/complete", {"lease": LEASE, "artifact_id": "a" * 64}),
    ("POST", "/v1/job/alpha/fail", {"lease": LEASE, "error": "boom"}),
    ("PUT", f"/v1/model/{'a' * 64}?job_id=alpha&lease={LEASE}", b"bytes"),
    ("PUT", f"/v1/job/alpha/log?lease={LEASE}&attempt=1", b"log text"),
]


@pytest.mark.parametrize("token", [None, "wrong-token", WORKER_TOKEN + "x", ""])
@pytest.mark.parametrize(("method", "path", "body"), WORKER_CALLS,
                         ids=[f"{m} {p.split('?')[0]}" for m, p, _ in WORKER_CALLS])
def test_worker_call_without_the_right_token_is_refused_with_401_naming_the_header(
    shared: Receiver, method: str, path: str, body: Any, token: str | None
) -> None:
    answer = shared.request(method, path, body, worker_token=token)
    error = assert_error(answer, 401, "X-Worker-Token")
    assert error["detail"] == {"header": "X-Worker-Token"}
    assert shared.client().health()["counts"]["pending"] == 2


@pytest.mark.parametrize(
    "raw_token",
    ["tökén".encode("latin-1"), "☃-token".encode(), b"\xff\xfe\x80",
     (WORKER_TOKEN + "é").encode()],
    ids=["latin-1", "utf-8", "high-bytes", "right-token-plus-utf-8"],
)
def test_worker_token_with_non_ascii_bytes_is_refused_with_401_not_500(
    shared: Receiver, raw_token: bytes
) -> None:
    body = {"worker_id": "w-1", "capability": shared.cap}
    answer = shared.request("POST", "/v1/job/claim", body, headers={"X-Worker-Token": raw_token},
                        worker_token=None)
    assert_error(answer, 401, "X-Worker-Token")


def test_client_with_the_right_worker_token_gets_through(rx: Receiver) -> None:
    assert rx.claim()["job"]["name"] == "alpha"
    with pytest.raises(ReceiverError) as caught:
        rx.client(worker_token="nope").claim("w-2", rx.cap)
    assert caught.value.status == 401
    assert "X-Worker-Token" in caught.value.message


# -- operator token --------------------------------------------------------

OPERATOR_CALLS = ["/v1/job/alpha/cancel", "/v1/job/alpha/requeue", "/v1/manifest/reload"]


@pytest.mark.parametrize("token", [None, "wrong-token", WORKER_TOKEN, ""])
@pytest.mark.parametrize("path", OPERATOR_CALLS)
def test_operator_call_without_the_right_token_is_refused_with_401(
    shared: Receiver, path: str, token: str | None
) -> None:
    headers = {} if token is None else {"X-Operator-Token": token}
    answer = shared.request("POST", path, headers=headers)
    error = assert_error(answer, 401, "X-Operator-Token")
    assert error["detail"] == {"header": "X-Operator-Token"}
    assert shared.client().health()["counts"]["pending"] == 2


@pytest.mark.parametrize("token", [None, OPERATOR_TOKEN, "anything"])
@pytest.mark.parametrize("path", OPERATOR_CALLS)
def test_operator_call_on_a_receiver_without_an_operator_token_is_refused_with_403(
    shared_no_operator: Receiver, path: str, token: str | None
) -> None:
    headers = {} if token is None else {"X-Operator-Token": token}
    answer = shared_no_operator.request("POST", path, headers=headers)
    assert_error(answer, 403, "operator calls are disabled")
    assert shared_no_operator.client().health()["counts"]["pending"] == 2


def test_operator_client_calls_pass_with_the_operator_token(rx: Receiver) -> None:
    assert rx.client().cancel("alpha")["status"] == "cancelled"
    assert rx.client().requeue("alpha")["status"] == "pending"
    assert rx.client().reload_manifest() == {"added": 0, "updated": 0, "unchanged": 2,
                                             "orphaned": 0}


# -- the protocol, end to end through the client ---------------------------


def test_full_protocol_round_trip_through_the_client(
    rx: Receiver, made_bundle: bundle.Bundle, tmp_path: Path
) -> None:
    c = rx.client()
    claimed = c.claim("w-1", rx.cap, slot=0, deny_jobs=["mlp"])
    assert claimed is not None
    job_id, lease = claimed["job"]["job_id"], claimed["lease"]
    assert claimed["job"]["name"] == "alpha"
    assert claimed["job"]["status"] == "claimed"
    assert claimed["attempt"] == 1
    assert len(lease) >= 16
    assert claimed["command"] == ["{python}", "trainer.py", "--out", "{output_dir}"]
    assert claimed["timeout_s"] == 86400.0
    assert 0 < claimed["heartbeat_interval_s"] <= 30.0
    assert c.workers()[0]["jobs"] == [job_id]

    progress = {"fraction": 0.5, "step": 5, "message": "half way"}
    assert c.heartbeat(job_id, lease, progress, log_tail="step 5\n") == "continue"
    running = c.job(job_id)
    assert running["status"] == "running"
    assert running["progress"] == progress
    assert running["worker_id"] == "w-1" and running["hostname"] == "cpu-a"

    sent: list[tuple[int, int]] = []
    stored = c.upload(made_bundle.artifact_id, made_bundle.path, job_id, lease,
                      progress=lambda done, total: sent.append((done, total)))
    assert stored == {"artifact_id": made_bundle.artifact_id, "size": made_bundle.size,
                      "new": True}
    assert sent[-1] == (made_bundle.size, made_bundle.size)
    again = c.upload(made_bundle.artifact_id, made_bundle.path, job_id, lease)
    assert again == {**stored, "new": False}
    assert c.has_artifact(made_bundle.artifact_id) is True
    assert c.has_artifact("f" * 64) is False

    done = c.complete(job_id, lease, made_bundle.artifact_id, {"rmse": 0.125})
    assert done["status"] == "completed"
    assert done["artifact_id"] == made_bundle.artifact_id
    assert done["metrics"] == {"rmse": 0.125}
    assert c.complete(job_id, lease, made_bundle.artifact_id, {"rmse": 0.125}) == done

    detail = c.job(job_id[:8])
    kinds = [event["kind"] for event in detail["history"]]
    assert kinds == ["added", "claimed", "started", "completed"]
    assert [(a["attempt"], a["worker_id"], a["hostname"], a["outcome"])
            for a in detail["attempts_detail"]] == [(1, "w-1", "cpu-a", "completed")]
    artifact_path = Path(detail["artifact_path"])
    assert artifact_path.read_bytes() == made_bundle.path.read_bytes()
    assert artifact_path.is_relative_to(rx.models_dir)

    dest = c.download(made_bundle.artifact_id, tmp_path / "downloads" / "copy.bundle")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == made_bundle.artifact_id
    models = c.models()
    assert rx.request("GET", "/v1/models").json() == {"models": models}
    assert c.models(model="mlp") == []
    assert [(m["artifact_id"], m["job_id"], m["model"], m["mode"], m["size"]) for m in models] == [
        (made_bundle.artifact_id, job_id, "gbt", "realistic", made_bundle.size)
    ]
    assert models[0]["path"] == str(artifact_path)

    assert c.health()["counts"]["completed"] == 1
    assert c.workers()[0]["jobs"] == []
    assert [j["name"] for j in c.jobs(status="completed")] == ["alpha"]
    assert [j["name"] for j in c.jobs(model="mlp")] == ["beta"]


def test_upload_answers_201_when_new_and_200_when_already_stored(
    rx: Receiver, made_bundle: bundle.Bundle
) -> None:
    claimed = rx.claim()
    data = made_bundle.path.read_bytes()
    path = model_path(made_bundle, claimed["job"]["job_id"], claimed["lease"])
    first = rx.request("PUT", path, data, headers=octets(data))
    assert first.status == 201
    assert first.json() == {"artifact_id": made_bundle.artifact_id, "size": len(data),
                            "new": True}
    second = rx.request("PUT", path, data, headers=octets(data))
    assert second.status == 200
    assert second.json()["new"] is False
    head = rx.request("HEAD", f"/v1/model/{made_bundle.artifact_id}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert rx.request("HEAD", f"/v1/model/{'e' * 64}").status == 404


def test_a_failed_attempt_is_retried_then_fails_for_good(rx: Receiver) -> None:
    c = rx.client()
    first = rx.claim()
    job_id = first["job"]["job_id"]
    retried = c.fail(job_id, first["lease"], "trainer exited 1", True, "trainer_error")
    assert retried["status"] == "pending"
    assert retried["error"] == "trainer exited 1"
    second = rx.claim()
    assert (second["job"]["job_id"], second["attempt"]) == (job_id, 2)
    final = c.fail(job_id, second["lease"], "trainer exited 1 again", True, "trainer_error")
    assert final["status"] == "failed"  # the manifest allows 2 attempts
    outcomes = [a["outcome"] for a in c.job(job_id)["attempts_detail"]]
    assert outcomes == ["trainer_error", "trainer_error"]


# -- claim -----------------------------------------------------------------


def test_claim_with_nothing_eligible_answers_204_and_the_client_returns_none(
    start: Start,
) -> None:
    r = start(jobs=[job("big", model="transformer", require_cuda=True)])
    assert r.client().claim("w-cpu", cpu().to_dict()) is None
    answer = r.request("POST", "/v1/job/claim", {"worker_id": "w-cpu", "capability": r.cap})
    assert (answer.status, answer.body) == (204, b"")
    claimed = r.client().claim("w-gpu", gpu().to_dict())
    assert claimed is not None and claimed["job"]["name"] == "big"


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("ram_gib", "lots"), ("cpu_count", 0), ("cuda", "yes"), ("hostname", "")],
)
def test_claim_with_an_invalid_capability_is_refused_naming_the_field(
    shared: Receiver, field_name: str, value: Any
) -> None:
    with pytest.raises(ReceiverError) as caught:
        shared.client().claim("w-1", {**shared.cap, field_name: value})
    assert 400 <= caught.value.status < 500
    assert f"capability.{field_name}" in caught.value.message
    assert shared.client().health()["counts"]["pending"] == 2


def test_claim_with_a_capability_that_is_not_an_object_is_refused(shared: Receiver) -> None:
    answer = shared.request("POST", "/v1/job/claim", {"worker_id": "w-1", "capability": [1, 2]})
    assert_error(answer, 422, "capability")


def test_request_body_with_an_unknown_field_is_refused_with_422_naming_it(rx: Receiver) -> None:
    claimed = rx.claim()
    job_id, lease = claimed["job"]["job_id"], claimed["lease"]
    answer = rx.request("POST", f"/v1/job/{job_id}/heartbeat",
                        {"lease": lease, "status": "completed"})
    error = assert_error(answer, 422, "status")
    assert error["detail"][0]["loc"] == ["body", "status"]
    assert rx.client().job(job_id)["status"] == "claimed"

    answer = rx.request("POST", "/v1/job/claim",
                        {"worker_id": "w-2", "capability": rx.cap, "attempt": 7})
    assert_error(answer, 422, "attempt")


def test_request_body_that_is_not_json_is_refused_with_422(shared: Receiver) -> None:
    answer = shared.request("POST", "/v1/job/claim", b"{not json",
                        headers={"Content-Type": "application/json"})
    assert_error(answer, 422)


def test_request_body_over_max_body_bytes_is_refused_with_413(shared: Receiver) -> None:
    big = {"worker_id": "w-1", "capability": shared.cap, "deny_jobs": ["x" * 100] * 1000}
    answer = shared.request("POST", "/v1/job/claim", big)
    error = assert_error(answer, 413, "body")
    assert error["detail"] == {"max_bytes": 64 << 10}
    assert shared.client().health()["counts"]["pending"] == 2


def test_streamed_request_body_over_max_body_bytes_is_refused_with_413(
    shared: Receiver,
) -> None:
    """Without a Content-Length the limit is enforced while the body streams in."""
    data = json.dumps({"worker_id": "w-1", "capability": shared.cap,
                       "deny_jobs": ["x" * 100] * 1000}).encode()
    chunks = iter([data[i:i + 8192] for i in range(0, len(data), 8192)])
    answer = shared.request("POST", "/v1/job/claim", chunks,
                            headers={"Content-Type": "application/json"})
    error = assert_error(answer, 413, "body")
    assert error["detail"] == {"max_bytes": 64 << 10}
    assert shared.client().health()["counts"]["pending"] == 2


# -- job ids in paths ------------------------------------------------------


@functools.cache
def twin_seeds() -> tuple[int, int]:
    """Two seeds whose gbt/realistic job ids share their first 8 hex digits (birthday search)."""
    seen: dict[str, int] = {}
    for seed in range(2_000_000):
        prefix = job_id_of("gbt", "realistic", {}, None, (), seed)[:8]
        if prefix in seen:
            return seen[prefix], seed
        seen[prefix] = seed
    raise AssertionError("no two job ids share 8 hex digits")


def twin_jobs() -> list[dict[str, Any]]:
    seed_a, seed_b = twin_seeds()
    return [job("twin-a", seed=seed_a), job("twin-b", seed=seed_b),
            job("solo", model="mlp", priority=5, seed=7)]


Twins = tuple[Receiver, str, str, str]


def twins_of(r: Receiver) -> Twins:
    ids = {j["name"]: j["job_id"] for j in r.client().jobs()}
    return r, ids["twin-a"], ids["twin-b"], ids["solo"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twins]:
    """A receiver whose twin-a and twin-b ids share 8 hex digits; and solo's id (read only)."""
    with ExitStack() as stack:
        yield twins_of(launch(stack, tmp_path_factory.mktemp("twins") / "receiver",
                              twin_jobs()))


def test_unique_job_id_prefix_of_eight_hex_digits_resolves(twins: Twins) -> None:
    r, a, b, solo = twins
    assert r.client().job(solo[:8])["name"] == "solo"
    assert r.client().job(solo[:8].upper())["name"] == "solo"
    assert r.client().job(solo)["name"] == "solo"
    common = next(i for i in range(64) if a[i] != b[i])
    assert r.client().job(a[:common + 1])["name"] == "twin-a"
    assert r.client().job(b[:common + 1])["name"] == "twin-b"


def test_ambiguous_job_id_prefix_answers_409_with_the_candidates(twins: Twins) -> None:
    r, a, b, _solo = twins
    assert a[:8] == b[:8]
    error = assert_error(r.request("GET", f"/v1/jobs/{a[:8]}"), 409, a[:8])
    assert sorted(error["detail"]["candidates"]) == sorted([a, b])
    answer = r.request("POST", f"/v1/job/{a[:8]}/cancel",
                       headers={"X-Operator-Token": OPERATOR_TOKEN})
    assert_error(answer, 409, a[:8])
    assert {j["status"] for j in r.client().jobs()} == {"pending"}


@pytest.mark.parametrize("ref", ["deadbeef0", "0123456", "not-a-job", "g" * 8])
def test_unknown_job_ref_answers_404(twins: Twins, ref: str) -> None:
    r = twins[0]
    assert all(not j["job_id"].startswith(ref) for j in r.client().jobs())
    error = assert_error(r.request("GET", f"/v1/jobs/{ref}"), 404, ref)
    assert error["detail"] == {"job_id": ref}
    answer = r.request("POST", f"/v1/job/{ref}/heartbeat", {"lease": LEASE})
    assert_error(answer, 404)
    assert {j["status"] for j in r.client().jobs()} == {"pending"}


def test_job_id_prefix_and_job_name_work_in_worker_and_operator_paths(start: Start) -> None:
    r, a, _b, solo = twins_of(start(jobs=twin_jobs()))
    c = r.client()
    claimed = r.claim()
    assert claimed["job"]["job_id"] == solo
    assert c.heartbeat(solo[:8], claimed["lease"]) == "continue"
    assert c.job("solo")["status"] == "running"
    assert c.cancel("twin-a")["job_id"] == a
    assert c.job(a)["status"] == "cancelled"
    assert c.heartbeat(solo[:8], claimed["lease"]) == "continue"


# -- uploads ---------------------------------------------------------------


def test_upload_with_a_wrong_digest_is_refused_with_400_and_stores_nothing(
    rx: Receiver, made_bundle: bundle.Bundle
) -> None:
    claimed = rx.claim()
    data = made_bundle.path.read_bytes()
    wrong = "0" * 64
    path = f"/v1/model/{wrong}?job_id={claimed['job']['job_id']}&lease={claimed['lease']}"
    error = assert_error(rx.request("PUT", path, data, headers=octets(data)), 400, "sha256")
    assert error["detail"] == {"expected": wrong, "actual": made_bundle.artifact_id}
    assert_store_empty(rx)
    assert rx.client().has_artifact(wrong) is False
    assert rx.client().has_artifact(made_bundle.artifact_id) is False


def test_upload_of_bytes_that_are_not_a_bundle_is_refused_with_400(rx: Receiver) -> None:
    claimed = rx.claim()
    data = b"plain text, not a compressed tar\n"
    digest = hashlib.sha256(data).hexdigest()
    path = f"/v1/model/{digest}?job_id={claimed['job']['job_id']}&lease={claimed['lease']}"
    assert_error(rx.request("PUT", path, data, headers=octets(data)), 400, "body")
    assert_store_empty(rx)


def test_upload_over_max_upload_bytes_is_refused_with_413_and_stores_nothing(
    start: Start, tmp_path: Path
) -> None:
    r = start(max_upload_bytes=4096)
    claimed = r.claim()
    job_id, lease = claimed["job"]["job_id"], claimed["lease"]
    big = tmp_path / "big.bundle"
    big.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 40)
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    with pytest.raises(ReceiverError) as caught:
        r.client().upload(digest, big, job_id, lease)
    assert caught.value.status == 413
    assert caught.value.detail == {"max_bytes": 4096}
    assert_store_empty(r)

    data = big.read_bytes()
    chunks = iter([data[i:i + 1000] for i in range(0, len(data), 1000)])
    answer = r.request("PUT", f"/v1/model/{digest}?job_id={job_id}&lease={lease}", chunks,
                       headers={"Content-Type": "application/octet-stream"})
    assert_error(answer, 413, "body")
    assert_store_empty(r)
    assert r.client().job(job_id)["status"] == "claimed"


@pytest.mark.parametrize("lease", ["wrong-lease", "0" * 32])
def test_upload_with_a_wrong_lease_is_refused_with_409_and_stores_nothing(
    rx: Receiver, made_bundle: bundle.Bundle, lease: str
) -> None:
    job_id = rx.claim()["job"]["job_id"]
    data = made_bundle.path.read_bytes()
    answer = rx.request("PUT", model_path(made_bundle, job_id, lease), data,
                        headers=octets(data))
    assert_error(answer, 409, job_id)
    with pytest.raises(LeaseLost) as caught:
        rx.client().upload(made_bundle.artifact_id, made_bundle.path, job_id, lease)
    assert caught.value.status == 409
    assert_store_empty(rx)


def test_upload_with_the_stale_lease_of_a_requeued_job_is_refused_with_409(
    rx: Receiver, made_bundle: bundle.Bundle
) -> None:
    first = rx.claim()
    job_id = first["job"]["job_id"]
    rx.client().cancel(job_id)
    rx.client().requeue(job_id)
    with pytest.raises(LeaseLost):
        rx.client().upload(made_bundle.artifact_id, made_bundle.path, job_id, first["lease"])
    assert_store_empty(rx)


def test_complete_naming_an_artifact_not_in_the_store_is_refused_with_400(
    rx: Receiver,
) -> None:
    claimed = rx.claim()
    job_id = claimed["job"]["job_id"]
    with pytest.raises(ReceiverError) as caught:
        rx.client().complete(job_id, claimed["lease"], "c" * 64, {})
    assert caught.value.status == 400
    assert "artifact_id" in caught.value.message
    after = rx.client().job(job_id)
    assert (after["status"], after["artifact_id"]) == ("claimed", None)


def test_calls_with_a_stale_lease_after_cancel_or_requeue_answer_409_and_change_nothing(
    rx: Receiver, made_bundle: bundle.Bundle
) -> None:
    c = rx.client()
    first = rx.claim()
    job_id, stale = first["job"]["job_id"], first["lease"]
    c.upload(made_bundle.artifact_id, made_bundle.path, job_id, stale)
    c.cancel(job_id)
    cancelled = c.job(job_id)

    with pytest.raises(LeaseLost):
        c.complete(job_id, stale, made_bundle.artifact_id, {})
    with pytest.raises(LeaseLost):
        c.fail(job_id, stale, "late", True, "trainer_error")
    assert c.job(job_id) == cancelled

    c.requeue(job_id)
    second = rx.claim(worker_id="w-2")
    assert (second["job"]["job_id"], second["attempt"]) == (job_id, 2)
    assert second["lease"] != stale
    before = c.job(job_id)
    with pytest.raises(LeaseLost):
        c.heartbeat(job_id, stale, {"fraction": 0.9})
    with pytest.raises(LeaseLost):
        c.complete(job_id, stale, made_bundle.artifact_id, {})
    with pytest.raises(LeaseLost):
        c.fail(job_id, stale, "late", False, "trainer_error")
    answer = rx.request("POST", f"/v1/job/{job_id}/heartbeat", {"lease": stale})
    assert_error(answer, 409, job_id)
    assert c.job(job_id) == before
    assert before["status"] == "claimed" and before["worker_id"] == "w-2"
    assert c.heartbeat(job_id, second["lease"]) == "continue"


# -- operator calls --------------------------------------------------------


def test_cancel_of_a_running_job_makes_the_next_heartbeat_answer_cancel(rx: Receiver) -> None:
    c = rx.client()
    claimed = rx.claim()
    job_id, lease = claimed["job"]["job_id"], claimed["lease"]
    assert c.heartbeat(job_id, lease) == "continue"
    cancelled = c.cancel(job_id)
    assert cancelled["status"] == "cancelled"
    assert c.heartbeat(job_id, lease) == "cancel"
    assert c.job(job_id)["status"] == "cancelled"
    assert c.workers()[0]["jobs"] == []
    kinds = [event["kind"] for event in c.job(job_id)["history"]]
    assert kinds[-1] == "cancelled"


def test_requeue_of_a_completed_job_is_refused_with_409(
    rx: Receiver, made_bundle: bundle.Bundle
) -> None:
    c = rx.client()
    claimed = rx.claim()
    job_id, lease = claimed["job"]["job_id"], claimed["lease"]
    c.upload(made_bundle.artifact_id, made_bundle.path, job_id, lease)
    c.complete(job_id, lease, made_bundle.artifact_id, {})
    with pytest.raises(ReceiverError) as caught:
        c.requeue(job_id)
    assert caught.value.status == 409
    assert caught.value.detail == {"job_id": job_id, "status": "completed"}
    with pytest.raises(ReceiverError) as caught:
        c.cancel(job_id)
    assert caught.value.status == 409
    assert c.job(job_id)["status"] == "completed"


def test_requeue_of_a_pending_job_is_refused_with_409(rx: Receiver) -> None:
    with pytest.raises(ReceiverError) as caught:
        rx.client().requeue("beta")
    assert caught.value.status == 409


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (manifest_text([job("alpha", model="nope")]), "model"),
        ("this is = not [valid toml", "TOML syntax error"),
        (manifest_text([job("alpha"), job("alpha", seed=1)]), "duplicates the name"),
    ],
    ids=["unknown-model", "toml-syntax", "duplicate-name"],
)
def test_reload_with_an_invalid_manifest_answers_422_and_keeps_the_queue(
    rx: Receiver, text: str, needle: str
) -> None:
    c = rx.client()
    before = c.jobs()
    rx.manifest_path.write_text(text)
    with pytest.raises(ReceiverError) as caught:
        c.reload_manifest()
    assert caught.value.status == 422
    assert str(rx.manifest_path) in caught.value.message
    assert needle in caught.value.message
    assert isinstance(caught.value.detail, list) and caught.value.detail
    assert c.jobs() == before
    assert c.claim("w-1", rx.cap)["command"] == [  # type: ignore[index]
        "{python}", "trainer.py", "--out", "{output_dir}"
    ]


def test_reload_after_adding_a_job_reports_one_added(rx: Receiver) -> None:
    rx.manifest_path.write_text(manifest_text([*JOBS, job("delta", model="transformer")]))
    result = rx.client().reload_manifest()
    assert result == {"added": 1, "updated": 0, "unchanged": 2, "orphaned": 0}
    assert [j["name"] for j in rx.client().jobs()] == ["alpha", "beta", "delta"]
    assert rx.client().reload_manifest() == {"added": 0, "updated": 0, "unchanged": 3,
                                             "orphaned": 0}


# -- logs ------------------------------------------------------------------


def test_log_put_for_the_current_attempt_is_returned_by_get(rx: Receiver) -> None:
    c = rx.client()
    claimed = rx.claim()
    job_id, lease = claimed["job"]["job_id"], claimed["lease"]
    text = "epoch 1 loss 0.5\nepoch 2 loss 0.25 ✓\n"
    c.upload_log(job_id, lease, 1, text)
    assert c.get_log(job_id) == text
    assert c.get_log(job_id[:8], attempt=1) == text
    assert c.get_log("alpha") == text
    assert_error(rx.request("GET", f"/v1/jobs/{job_id}/log?attempt=2"), 404, "attempt")


def test_log_get_before_any_upload_returns_the_heartbeat_tail(rx: Receiver) -> None:
    c = rx.client()
    assert_error(rx.request("GET", "/v1/jobs/alpha/log"), 404, "attempt")
    claimed = rx.claim()
    job_id, lease = claimed["job"]["job_id"], claimed["lease"]
    assert_error(rx.request("GET", f"/v1/jobs/{job_id}/log"), 404, "no log")
    c.heartbeat(job_id, lease, log_tail="step 1\nstep 2\n")
    assert c.get_log(job_id) == "step 1\nstep 2\n"
    c.heartbeat(job_id, lease, log_tail="step 3\n")
    assert c.get_log(job_id) == "step 3\n"
    c.upload_log(job_id, lease, 1, "the full log\n")
    assert c.get_log(job_id) == "the full log\n"


def test_log_put_with_a_wrong_lease_answers_409_and_stores_nothing(rx: Receiver) -> None:
    c = rx.client()
    claimed = rx.claim()
    job_id = claimed["job"]["job_id"]
    with pytest.raises(LeaseLost):
        c.upload_log(job_id, "0" * 32, 1, "forged\n")
    with pytest.raises(LeaseLost):
        c.upload_log(job_id, claimed["lease"], 2, "wrong attempt\n")
    answer = rx.request("PUT", f"/v1/job/{job_id}/log?lease=nope&attempt=1", b"forged",
                        headers={"Content-Type": "text/plain"})
    assert_error(answer, 409, job_id)
    assert not (rx.settings.logs_dir / job_id).exists()


def test_log_of_an_ended_attempt_is_still_accepted_for_its_lease(rx: Receiver) -> None:
    c = rx.client()
    first = rx.claim()
    job_id = first["job"]["job_id"]
    c.fail(job_id, first["lease"], "exit 1", True, "trainer_error")
    c.upload_log(job_id, first["lease"], 1, "attempt one\n")
    second = rx.claim()
    c.upload_log(job_id, second["lease"], 2, "attempt two\n")
    assert c.get_log(job_id, attempt=1) == "attempt one\n"
    assert c.get_log(job_id) == "attempt two\n"
    with pytest.raises(LeaseLost):
        c.upload_log(job_id, first["lease"], 2, "crossed\n")


# -- errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/no-such-route", 404),
        ("GET", "/nowhere", 404),
        ("DELETE", "/v1/health", 405),
        ("GET", "/v1/jobs/not-a-job", 404),
        ("GET", f"/v1/model/{'d' * 64}", 404),
        ("GET", "/v1/model/not-hex", 422),
        ("GET", "/v1/jobs?status=bogus", 400),
        ("GET", "/v1/jobs/alpha/log?attempt=0", 422),
        ("POST", "/v1/job/claim", 422),
    ],
)
def test_error_responses_are_json_with_error_and_detail(
    shared: Receiver, method: str, path: str, status: int
) -> None:
    assert_error(shared.request(method, path), status)


def test_hostile_inputs_get_a_4xx_json_answer_never_a_5xx(shared: Receiver) -> None:
    """A 5xx is a bug; none of these may change anything either."""
    cap = shared.cap
    probes: Iterable[tuple[str, str, Any]] = [
        ("POST", "/v1/job/claim", {"worker_id": "", "capability": cap}),
        ("POST", "/v1/job/claim", {"worker_id": "w", "capability": {**cap, "gpus": [1]}}),
        ("POST", "/v1/job/claim", {"worker_id": "w", "capability": cap, "slot": -1}),
        ("POST", "/v1/job/claim", {"worker_id": "w", "capability": {**cap, "ram_gib": 1e999}}),
        ("POST", "/v1/job/claim", []),
        ("POST", "/v1/job/alpha/heartbeat", {"lease": ""}),
        ("POST", "/v1/job/alpha/heartbeat", {"lease": "x"}),
        ("POST", "/v1/job/alpha/heartbeat", {"lease": "x", "progress": {"fraction": 2}}),
        ("POST", "/v1/job/alpha/complete", {"lease": "x", "artifact_id": "../etc"}),
        ("POST", "/v1/job/alpha/fail", {"lease": "x", "error": "e", "kind": "lost_worker"}),
        ("PUT", f"/v1/job/{'z' * 201}/log?lease=x&attempt=1", b""),
        ("PUT", "/v1/model/..%2F..%2Fetc?job_id=alpha&lease=x", b""),
        ("GET", "/v1/jobs/alpha/log?attempt=99999999", None),
        ("GET", "/v1/jobs/%00", None),
    ]
    for method, path, body in probes:
        answer = shared.request(method, path, body)
        assert 400 <= answer.status < 500, (method, path, answer.status, answer.body)
        assert set(answer.json()) == {"error", "detail"}, (method, path)
    assert shared.client().health()["counts"]["pending"] == 2
