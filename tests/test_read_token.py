"""A receiver started with a read token guards its reads; health and metrics stay open."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import job, manifest_text
from tests.live import serving
from trainfleet.receiver import ReceiverSettings

READ, OPERATOR, WORKER = "read-secret", "operator-secret", "worker-secret"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("read-token")
    manifest = root / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=root / "state",
                                read_token=READ, operator_token=OPERATOR, worker_token=WORKER)
    with serving(settings) as (host, port):
        yield f"http://{host}:{port}"


def status(url: str, path: str, method: str = "GET", **headers: str) -> int:
    request = urllib.request.Request(url + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/a", "/v1/jobs/a/why", "/v1/workers",
                                  "/v1/models"])
def test_reads_need_a_token(url: str, path: str) -> None:
    assert status(url, path) == 401
    assert status(url, path, **{"X-Read-Token": "wrong"}) == 401
    assert status(url, path, **{"X-Read-Token": READ}) == 200
    assert status(url, path, **{"X-Operator-Token": OPERATOR}) == 200
    assert status(url, path, **{"X-Worker-Token": WORKER}) == 200


def test_a_worker_token_may_check_for_an_artifact(url: str) -> None:
    path = "/v1/model/" + "a" * 64
    assert status(url, path, "HEAD") == 401
    assert status(url, path, "HEAD", **{"X-Worker-Token": WORKER}) == 404


def test_health_metrics_and_the_page_stay_open(url: str) -> None:
    assert status(url, "/v1/health") == 200
    assert status(url, "/metrics") == 200
    assert status(url, "/") == 200


def test_cli_reads_with_the_read_token(url: str, tmp_path: Path) -> None:
    def cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "trainfleet", "list", "--receiver", url],
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", **env})

    refused = cli({})
    assert refused.returncode == 1 and "X-Read-Token" in refused.stderr
    allowed = cli({"TRAINFLEET_READ_TOKEN": READ})
    assert allowed.returncode == 0 and " a " in allowed.stdout
