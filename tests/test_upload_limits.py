"""Uploads that go silent time out (408); too many at once get 503 with Retry-After."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cpu, job, manifest_text
from tests.live import serving
from trainfleet.client import Client
from trainfleet.receiver import ReceiverSettings

BODY = gzip.compress(random.Random(7).randbytes(200_000))  # the store checks the magic
DIGEST = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, int, dict[str, str], Path]]:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state",
                                upload_idle_timeout_s=1.0, max_concurrent_uploads=1)
    with serving(settings) as (host, port):
        claim = Client(f"http://{host}:{port}", retries=0).claim("w", cpu().to_dict())
        assert claim is not None
        query = f"?job_id={claim['job']['job_id']}&lease={claim['lease']}"
        yield host, port, {"query": query}, settings.store_root


def _start_upload(host: str, port: int, query: str) -> http.client.HTTPConnection:
    """Announce the whole body, send only half of it, and leave the connection open."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("PUT", f"/v1/model/{DIGEST}{query}")
    conn.putheader("Content-Length", str(len(BODY)))
    conn.putheader("Content-Type", "application/octet-stream")
    conn.endheaders()
    conn.send(BODY[: len(BODY) // 2])
    return conn


def test_a_silent_upload_times_out_and_leaves_nothing(receiver: tuple) -> None:  # type: ignore[type-arg]
    host, port, params, store = receiver
    conn = _start_upload(host, port, params["query"])
    try:
        started = time.monotonic()
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 408, body
    assert b"nothing received for 1 s" in body
    assert time.monotonic() - started < 8
    assert list((store / ".tmp").iterdir()) == []
    assert not list(store.glob(f"*/{DIGEST}"))


def test_uploads_beyond_the_cap_get_503_with_retry_after(receiver: tuple) -> None:  # type: ignore[type-arg]
    host, port, params, _ = receiver
    first = _start_upload(host, port, params["query"])
    try:
        time.sleep(0.3)  # the first upload now holds the only slot
        second = http.client.HTTPConnection(host, port, timeout=10)
        second.request("PUT", f"/v1/model/{DIGEST}{params['query']}", body=BODY)
        answer = second.getresponse()
        answer.read()
        second.close()
        assert answer.status == 503
        assert answer.headers["Retry-After"] == "5"
        first.send(BODY[len(BODY) // 2:])
        done = first.getresponse()
        text = done.read()
        assert done.status == 201, text
    finally:
        first.close()
