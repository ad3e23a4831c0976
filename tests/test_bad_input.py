"""Hostile input against a live receiver: each gets a 4xx and changes nothing.

"Nothing" is checked, not assumed: the database's rows and every file under the test's root
are snapshotted before a probe and compared after it. The malicious tar corpus goes through
the real `trainfleet pull --extract` in a subprocess, against bundles uploaded for real.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cpu, job, manifest_text
from tests.fleet import wait_for
from tests.live import serving
from trainfleet import bundle
from trainfleet.client import Client
from trainfleet.receiver import ReceiverSettings

WORKER_TOKEN = "worker-token-for-bad-input"
OPERATOR_TOKEN = "operator-token-for-bad-input"
MAX_UPLOAD = 1 << 20
IDLE_S = 1.0
BIG_ID = "a" * 10 * 1024  # a 10 KiB id


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Rx:
    """A live receiver with a claimed job ("alpha"), its lease and the test's root."""

    root: Path
    settings: ReceiverSettings
    host: str
    port: int
    job_id: str
    lease: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self) -> Client:
        return Client(self.url, worker_token=WORKER_TOKEN, operator_token=OPERATOR_TOKEN,
                      retries=0, timeout_s=10)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=15)

    def request(self, method: str, target: str, body: bytes | dict[str, Any] | None = None,
                headers: list[tuple[str, str | bytes]] | None = None,
                worker_token: bool = True) -> Answer:
        """One request with exactly these headers (repeats allowed), sent as given."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        sent: list[tuple[str, str | bytes]] = []
        if worker_token:
            sent.append(("X-Worker-Token", WORKER_TOKEN))
        if isinstance(body, dict):
            sent.append(("Content-Type", "application/json"))
        sent += headers or []
        with closing(self.connect()) as conn:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in sent:
                conn.putheader(name, value)
            if data is not None and not any(n.lower() == "content-length" for n, _ in sent):
                conn.putheader("Content-Length", str(len(data)))
            conn.endheaders(data)
            response = conn.getresponse()
            return Answer(response.status, response.read(), dict(response.getheaders()))

    def snapshot(self) -> dict[str, Any]:
        """Every row of the database and every file under the root (the database files
        themselves excepted: a read may checkpoint the WAL)."""
        conn = sqlite3.connect(f"file:{self.settings.db_path}?mode=ro", uri=True)
        try:
            tables = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                      for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE "
                                               "type = 'table' ORDER BY name")}
        finally:
            conn.close()
        files = {}
        for path in sorted(self.root.rglob("*")):
            if path.name.startswith("queue.db") or path.is_dir():
                continue
            files[str(path.relative_to(self.root))] = hashlib.sha256(path.read_bytes()).digest()
        return {"tables": tables, "files": files}


def settings_for(root: Path, **overrides: Any) -> ReceiverSettings:
    manifest = root / "manifest.toml"
    manifest.write_text(manifest_text([job("alpha"), job("beta", model="mlp")]))
    values: dict[str, Any] = {
        "manifest_path": manifest, "state_dir": root / "state",
        "operator_token": OPERATOR_TOKEN, "worker_token": WORKER_TOKEN,
        "max_upload_bytes": MAX_UPLOAD, "max_body_bytes": 64 << 10,
    }
    fields = {f.name for f in dataclasses.fields(ReceiverSettings)}
    if "upload_idle_timeout_s" in fields:
        values["upload_idle_timeout_s"] = IDLE_S
    return ReceiverSettings(**(values | overrides))


@pytest.fixture(scope="module")
def rx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rx]:
    """One receiver for the whole module: every probe must leave it exactly as it was."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "outside").mkdir()  # a neighbour of the state dir that nothing may touch
    settings = settings_for(root)
    with ExitStack() as stack:
        host, port = stack.enter_context(serving(settings))
        claim = Client(f"http://{host}:{port}", worker_token=WORKER_TOKEN).claim(
            "w-1", cpu().to_dict())
        assert claim is not None
        yield Rx(root, settings, host, port, claim["job"]["job_id"], claim["lease"])


@pytest.fixture
def unchanged(rx: Rx) -> Iterator[None]:
    """The probe in the test must leave database and files exactly as they were."""
    before = rx.snapshot()
    yield
    # A refused upload may still be unwinding its temp file when the answer arrives.
    wait_for("the receiver to settle", lambda: rx.snapshot() == before, timeout_s=5)


def assert_4xx_json(answer: Answer, *statuses: int) -> dict[str, Any]:
    assert answer.status in statuses, (answer.status, answer.body[:300])
    body = answer.json()
    assert set(body) == {"error", "detail"} and body["error"], body
    return dict(body)


def gzip_bytes(seed: str, size: int = 256) -> tuple[str, bytes]:
    data = gzip.compress(seed.encode() * (size // len(seed) + 1), mtime=0)
    return hashlib.sha256(data).hexdigest(), data


def upload_target(rx: Rx, artifact_id: str, **query: str) -> str:
    params = {"job_id": rx.job_id, "lease": rx.lease} | query
    return f"/v1/model/{artifact_id}?{urllib.parse.urlencode(params)}"


# -- uploads -----------------------------------------------------------------


def test_upload_with_a_wrong_digest_is_refused(rx: Rx, unchanged: None) -> None:
    _, data = gzip_bytes("real")
    claimed, _ = gzip_bytes("claimed")
    answer = rx.request("PUT", upload_target(rx, claimed), data)
    assert "hash to" in assert_4xx_json(answer, 400)["error"]


def test_truncated_upload_leaves_nothing(rx: Rx, unchanged: None) -> None:
    artifact_id, data = gzip_bytes("truncated", 200_000)
    with closing(socket.create_connection((rx.host, rx.port))) as sock:
        sock.sendall(
            f"PUT {upload_target(rx, artifact_id)} HTTP/1.1\r\nHost: x\r\n"
            f"X-Worker-Token: {WORKER_TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data[: len(data) // 2])
        sock.shutdown(socket.SHUT_WR)  # the client goes away mid-body
        sock.settimeout(10)
        reply = read_reply(sock)
    assert reply == b"" or reply.split(b" ")[1].startswith(b"4"), reply[:200]


def test_upload_over_the_limit_by_its_honest_content_length_is_refused(
    rx: Rx, unchanged: None
) -> None:
    artifact_id, _ = gzip_bytes("honest")
    answer = rx.request("PUT", upload_target(rx, artifact_id), b"x" * (MAX_UPLOAD + 1))
    assert_4xx_json(answer, 413)


def test_chunked_upload_over_the_limit_is_refused_while_streaming(
    rx: Rx, unchanged: None
) -> None:
    artifact_id, _ = gzip_bytes("chunked")
    with closing(rx.connect()) as conn:
        conn.putrequest("PUT", upload_target(rx, artifact_id))
        conn.putheader("X-Worker-Token", WORKER_TOKEN)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"\x1f\x8b" + b"z" * (64 << 10)
        try:
            for _ in range(MAX_UPLOAD // len(chunk) + 2):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # refused mid-stream
        response = conn.getresponse()
        answer = Answer(response.status, response.read(), dict(response.getheaders()))
    assert_4xx_json(answer, 413)


def test_upload_sending_more_than_its_content_length_stores_nothing(
    rx: Rx, unchanged: None
) -> None:
    """A lying (small) Content-Length: only that much is the body, and its digest is wrong."""
    big = b"\x1f\x8b" + os.urandom(MAX_UPLOAD + 1000)
    artifact_id = hashlib.sha256(big).hexdigest()
    with closing(socket.create_connection((rx.host, rx.port))) as sock:
        sock.settimeout(10)
        sock.sendall(
            f"PUT {upload_target(rx, artifact_id)} HTTP/1.1\r\nHost: x\r\n"
            f"X-Worker-Token: {WORKER_TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode())
        try:
            sock.sendall(big)
        except OSError:  # the receiver hung up on the bytes past the body
            pass
        reply = read_reply(sock)
    # The first 1000 bytes were the whole body, and they do not hash to the id.
    assert reply == b"" or (reply.split(b" ")[1] == b"400" and b"hash to" in reply), reply[:300]


def test_upload_announcing_more_than_the_limit_is_refused_before_any_body(
    rx: Rx, unchanged: None
) -> None:
    artifact_id, data = gzip_bytes("lying-large")
    answer = rx.request("PUT", upload_target(rx, artifact_id), data,
                        headers=[("Content-Length", str(MAX_UPLOAD * 4))])
    assert_4xx_json(answer, 413)


def read_reply(sock: socket.socket) -> bytes:
    """One whole HTTP answer from a raw socket (b"" when it was closed without one)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
        return head + b"\r\n\r\n" + body
    except ConnectionResetError:
        return data


def start_upload(rx: Rx, artifact_id: str, size: int) -> socket.socket:
    sock = socket.create_connection((rx.host, rx.port))
    sock.sendall(
        f"PUT {upload_target(rx, artifact_id)} HTTP/1.1\r\nHost: x\r\n"
        f"X-Worker-Token: {WORKER_TOKEN}\r\nContent-Length: {size}\r\n\r\n\x1f\x8b".encode())
    return sock


def test_an_upload_that_goes_silent_is_cut_with_408(rx: Rx, unchanged: None) -> None:
    artifact_id, _ = gzip_bytes("silent")
    with closing(start_upload(rx, artifact_id, 100_000)) as sock:
        for _ in range(3):  # a few slow bytes, each within the idle timeout
            time.sleep(IDLE_S / 3)
            sock.sendall(b"z")
        started = time.monotonic()
        sock.settimeout(IDLE_S * 10)
        reply = read_reply(sock)
    assert reply.split(b" ")[1] == b"408", reply[:300]
    assert time.monotonic() - started < IDLE_S * 5


def test_a_slow_drip_upload_is_cut_before_long(rx: Rx, unchanged: None) -> None:
    artifact_id, _ = gzip_bytes("drip")
    with closing(start_upload(rx, artifact_id, 100_000)) as sock:
        sock.settimeout(IDLE_S / 2)
        deadline = time.monotonic() + IDLE_S * 6
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"z")  # a byte per half idle timeout: never idle, never done
                reply = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return  # cut without an answer: cut all the same
            assert reply == b"" or reply.split(b" ")[1].startswith(b"4"), reply[:300]
            return
        pytest.fail(f"the receiver still waits on a 2 bytes/s upload after {IDLE_S * 6:g} s")


# -- paths and ids -------------------------------------------------------------

PATH_PROBES = [
    ("GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd"),
    ("GET", "/v1/jobs/%2e%2e"),
    ("GET", "/v1/jobs/%2e%2e%2f%2e%2e%2fstate%2fqueue.db"),
    ("GET", "/v1/jobs/alpha%00"),
    ("GET", f"/v1/jobs/{BIG_ID}"),
    ("GET", "/v1/jobs/alpha/log?attempt=-1"),
    ("GET", "/v1/model/..%2F..%2Fstate%2Fqueue.db"),
    ("GET", "/v1/model/%2e%2e"),
    ("GET", f"/v1/model/{BIG_ID}"),
    ("HEAD", "/v1/model/..%2Fmanifest.toml"),
    ("POST", "/v1/job/..%2Falpha/heartbeat"),
    ("POST", "/v1/job/%2e%2e/heartbeat"),
    ("POST", "/v1/job/alpha%00/heartbeat"),
    ("POST", f"/v1/job/{BIG_ID}/heartbeat"),
    ("POST", "/v1/job/..%2F..%2Foutside/complete"),
    ("PUT", "/v1/model/..%2F..%2Foutside%2Fx?job_id=alpha&lease=x"),
    ("PUT", f"/v1/model/{'b' * 64}?job_id=..%2F..%2Foutside&lease=x"),
    ("PUT", f"/v1/model/{'b' * 64}?job_id={BIG_ID}&lease=x"),
    ("PUT", f"/v1/model/{'b' * 64}?job_id=alpha&lease={BIG_ID}"),
    ("PUT", f"/v1/model/{'b' * 64}?job_id=alpha%00&lease=x"),
    ("PUT", "/v1/job/..%2F..%2Foutside/log?lease=x&attempt=1"),
    ("PUT", f"/v1/job/alpha/log?lease=x&attempt={'9' * 1000}"),
]


@pytest.mark.parametrize(("method", "target"), PATH_PROBES,
                         ids=[f"{m} {t[:60]}" for m, t in PATH_PROBES])
def test_path_and_id_abuse_gets_a_4xx_and_touches_nothing(
    rx: Rx, unchanged: None, method: str, target: str
) -> None:
    body: bytes | dict[str, Any] | None = None
    if method == "POST":
        body = {"lease": rx.lease, "artifact_id": "b" * 64} if target.endswith(
            "complete") else {"lease": rx.lease}
    elif method == "PUT":
        body = b"\x1f\x8bdata"
    answer = rx.request(method, target, body)
    assert 400 <= answer.status < 500, (answer.status, answer.body[:300])
    if method != "HEAD":
        assert_4xx_json(answer, answer.status)


@pytest.mark.parametrize("target", [b"/v1/jobs/alpha\x00", b"/v1/jobs/../../etc/passwd",
                                    b"/v1/jobs/" + b"a" * 70_000, b"/v1/jobs/\xff\xfe"])
def test_raw_hostile_request_lines_get_a_4xx(rx: Rx, unchanged: None, target: bytes) -> None:
    """Bytes no client library would send: the HTTP parser or the app must refuse them."""
    with closing(socket.create_connection((rx.host, rx.port))) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 4"), reply[:200]


# -- bodies --------------------------------------------------------------------

MASS_ASSIGNMENT = [
    ("/v1/job/claim", {"worker_id": "w-2", "capability": {"hostname": "h"},
                       "status": "completed"}),
    ("/v1/job/alpha/heartbeat", {"lease": "{lease}", "attempts": 99}),  # the job's counter
    ("/v1/job/alpha/heartbeat", {"lease": "{lease}", "status": "completed"}),
    ("/v1/job/alpha/complete", {"lease": "{lease}", "artifact_id": "b" * 64,
                                "worker_id": "someone-else"}),
    ("/v1/job/alpha/fail", {"lease": "{lease}", "error": "e", "attempts_charged": 0}),
    ("/v1/job/alpha/fail", {"lease": "{lease}", "error": "e", "kind": "lost_worker"}),
]


@pytest.mark.parametrize(("path", "body"), MASS_ASSIGNMENT,
                         ids=["claim-status", "heartbeat-attempts", "heartbeat-status",
                              "complete-worker_id", "fail-attempts_charged", "fail-lost_worker"])
def test_bodies_with_extra_or_forbidden_fields_are_refused(
    rx: Rx, unchanged: None, path: str, body: dict[str, Any]
) -> None:
    body = {k: rx.lease if v == "{lease}" else v for k, v in body.items()}
    answer = rx.request("POST", path, body)
    assert_4xx_json(answer, 422)


ODD_LEASES = ["\u00e9t\u00e9", "a\x00b", "lease with spaces"]


@pytest.mark.parametrize("lease", ODD_LEASES, ids=["non-ascii", "nul", "spaces"])
@pytest.mark.parametrize("path", ["heartbeat", "complete", "fail", "checkpoint"])
def test_a_lease_that_no_claim_hands_out_is_a_422_naming_it(
    rx: Rx, unchanged: None, path: str, lease: str
) -> None:
    body: dict[str, Any] = {"lease": lease, "artifact_id": "b" * 64, "error": "e"}
    if path == "heartbeat":
        body = {"lease": lease}
    elif path == "fail":
        body = {"lease": lease, "error": "e"}
    answer = rx.request("POST", f"/v1/job/alpha/{path}", body)
    assert "lease" in json.dumps(assert_4xx_json(answer, 422))


@pytest.mark.parametrize("lease", ODD_LEASES, ids=["non-ascii", "nul", "spaces"])
def test_an_upload_with_an_odd_lease_is_a_422_naming_it(
    rx: Rx, unchanged: None, lease: str
) -> None:
    artifact_id, data = gzip_bytes("odd lease")
    answer = rx.request("PUT", upload_target(rx, artifact_id, lease=lease), data)
    assert "lease" in json.dumps(assert_4xx_json(answer, 422))


HUGE = int("9" * 400)  # valid JSON, too large for a float
NUMBERS = [
    {"worker_id": "w-2", "capability": {"hostname": "h", "ram_gib": HUGE}},
    {"worker_id": "w-2", "capability": {"hostname": "h", "gpus": [{"vram_gib": HUGE}]}},
    {"worker_id": "w-2", "capability": {"hostname": "h", "ram_gib": -1}},
    {"worker_id": "w-2", "capability": {"hostname": "h", "cpu_count": 2.5}},
    {"worker_id": "w-2", "capability": {"hostname": "h"}, "slot_vram_gib": HUGE},
    {"worker_id": "w-2", "capability": {"hostname": "h"}, "slot": HUGE},
]


@pytest.mark.parametrize("body", NUMBERS, ids=["ram-huge", "vram-huge", "ram-negative",
                                               "cpus-fraction", "slot-vram-huge", "slot-huge"])
def test_numbers_out_of_range_are_refused_not_a_500(
    rx: Rx, unchanged: None, body: dict[str, Any]
) -> None:
    assert_4xx_json(rx.request("POST", "/v1/job/claim", body), 400, 422)


# -- token headers -------------------------------------------------------------

TOKEN_PROBES = {
    "worker-latin-1": ("X-Worker-Token", ["tökén".encode("latin-1")]),
    "worker-utf-8": ("X-Worker-Token", [(WORKER_TOKEN + "☃").encode()]),
    "worker-right-then-wrong": ("X-Worker-Token", [WORKER_TOKEN, "wrong"]),
    "worker-wrong-then-right": ("X-Worker-Token", ["wrong", WORKER_TOKEN]),
    "worker-right-twice": ("X-Worker-Token", [WORKER_TOKEN, WORKER_TOKEN]),
    "operator-non-ascii": ("X-Operator-Token", [b"\xff\xfe" + OPERATOR_TOKEN.encode()]),
    "operator-right-then-wrong": ("X-Operator-Token", [OPERATOR_TOKEN, "wrong"]),
    "operator-wrong-then-right": ("X-Operator-Token", ["wrong", OPERATOR_TOKEN]),
}


@pytest.mark.parametrize("case", list(TOKEN_PROBES))
def test_odd_or_repeated_token_headers_get_401(rx: Rx, unchanged: None, case: str) -> None:
    header, values = TOKEN_PROBES[case]
    headers: list[tuple[str, str | bytes]] = [(header, v) for v in values]
    if header == "X-Worker-Token":
        answer = rx.request("POST", "/v1/job/claim",
                            {"worker_id": "w-2", "capability": cpu().to_dict()},
                            headers=headers, worker_token=False)
    else:
        answer = rx.request("POST", "/v1/job/beta/cancel", headers=headers)
    assert header in assert_4xx_json(answer, 401)["error"]


@pytest.mark.parametrize("param", ["token", "X-Worker-Token", "worker_token"])
def test_a_token_in_the_query_string_is_not_accepted(
    rx: Rx, unchanged: None, param: str
) -> None:
    query = urllib.parse.urlencode({param: WORKER_TOKEN})
    answer = rx.request("POST", f"/v1/job/claim?{query}",
                        {"worker_id": "w-2", "capability": cpu().to_dict()}, worker_token=False)
    assert_4xx_json(answer, 401)


# -- a malicious tar corpus through `trainfleet pull --extract` -----------------


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]],
           fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A gzip tar (a valid bundle to the store) with a harmless file first."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for info, data in [(file_member("ok.txt", b"fine"), b"fine"), *members]:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def file_member(name: str, data: bytes, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def special(name: str, kind: bytes, **fields: Any) -> tuple[tarfile.TarInfo, None]:
    return file_member(name, b"", type=kind, **fields), None


def bomb() -> bytes:
    """A header declaring a member past the extraction cap (64 GiB), then a little data."""
    header = file_member("bomb.bin", b"", size=65 << 30).tobuf(tarfile.GNU_FORMAT)
    return gzip.compress(header + bytes(1 << 20), mtime=0)


def corpus(outside: Path) -> dict[str, tuple[bytes, str]]:
    """case -> (bundle bytes, a fragment the CLI's error must name)."""
    pax = file_member("innocent.txt", b"x")
    pax.pax_headers = {"path": "../pax-escape.txt"}
    return {
        "traversal": (tar_gz([(file_member("../escape.txt", b"x"), b"x")]), "../escape.txt"),
        "nested-traversal": (tar_gz([(file_member("a/../../escape.txt", b"x"), b"x")]),
                             "escape.txt"),
        "long-name-traversal": (tar_gz([(file_member("d/" * 60 + "../" * 70 + "x", b"x"),
                                         b"x")]), ".."),
        "pax-path-traversal": (tar_gz([(pax, b"x")], fmt=tarfile.PAX_FORMAT), "pax-escape"),
        "absolute": (tar_gz([(file_member(str(outside / "abs.txt"), b"x"), b"x")]),
                     "absolute"),
        "drive-letter": (tar_gz([(file_member("C:/escape.txt", b"x"), b"x")]), "C:/escape"),
        "symlink-escape": (tar_gz([special("link", tarfile.SYMTYPE, linkname=str(outside)),
                                   (file_member("link/pwned.txt", b"x"), b"x")]), "symlink"),
        "hardlink-escape": (tar_gz([special("hard", tarfile.LNKTYPE, linkname="/etc/passwd")]),
                            "hardlink"),
        "hardlink-relative": (tar_gz([special("hard", tarfile.LNKTYPE,
                                              linkname="../outside/x")]), "hardlink"),
        "char-device": (tar_gz([special("null", tarfile.CHRTYPE, devmajor=1, devminor=3)]),
                        "device"),
        "block-device": (tar_gz([special("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)]),
                         "device"),
        "fifo": (tar_gz([special("pipe", tarfile.FIFOTYPE)]), "fifo"),
        "decompression-bomb": (bomb(), "bomb.bin"),
        "not-a-tar": (gzip.compress(os.urandom(4096), mtime=0), "not a readable tar"),
    }


@pytest.fixture(scope="module")
def stored_corpus(rx: Rx) -> dict[str, tuple[str, str]]:
    """Upload every malicious bundle as an artifact of the claimed job: case -> (id, needle)."""
    stored = {}
    outside = rx.root / "outside"
    for case, (data, needle) in corpus(outside).items():
        path = rx.root / "corpus" / f"{case}.bundle"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        artifact_id = bundle.sha256_file(path)
        rx.client().upload(artifact_id, path, rx.job_id, rx.lease)
        stored[case] = (artifact_id, needle)
    return stored


@pytest.mark.parametrize("case", sorted(corpus(Path("/outside"))))
def test_pull_extract_refuses_a_malicious_bundle_and_writes_nothing_outside(
    rx: Rx, stored_corpus: dict[str, tuple[str, str]], unchanged: None, case: str,
    tmp_path: Path
) -> None:
    artifact_id, needle = stored_corpus[case]
    out = tmp_path / "pulled"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    env["TRAINFLEET_RECEIVER"] = rx.url
    done = subprocess.run(
        [sys.executable, "-m", "trainfleet", "pull", artifact_id, "-o", str(out), "--extract"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("error: ") and needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # Only the verified download is left: no extracted tree, no staging dir, no link.
    assert sorted(p.name for p in out.iterdir()) == [f"{artifact_id[:12]}.bundle"]
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))
    assert list((rx.root / "outside").iterdir()) == []
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "pax-escape.txt").exists()
