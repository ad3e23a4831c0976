"""TLS and mutual TLS between workers and a real receiver, with a throwaway CA (trustme)."""

from __future__ import annotations

import datetime
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import cpu, job, manifest_text
from tests.fleet import stop_process
from trainfleet.client import Client, tls_context
from trainfleet.errors import ReceiverUnreachable, TrainfleetError

trustme = pytest.importorskip("trustme")


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_cert: Path  #: signed by a CA the receiver does not trust
    other_key: Path
    expired_cert: Path
    expired_key: Path


def _write(leaf: object, root: Path, name: str) -> tuple[Path, Path]:
    cert, key = root / f"{name}.pem", root / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))  # type: ignore[attr-defined]
    leaf.private_key_pem.write_to_path(str(key))  # type: ignore[attr-defined]
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    return Pki(
        root / "ca.pem",
        *_write(ca.issue_cert("127.0.0.1", "localhost"), root, "server"),
        *_write(ca.issue_cert("worker-a"), root, "client"),
        *_write(other_ca.issue_cert("worker-b"), root, "other"),
        *_write(ca.issue_cert("worker-c", not_before=past,
                              not_after=past + datetime.timedelta(days=1)), root, "expired"),
    )


@pytest.fixture(scope="module")
def receiver(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A receiver subprocess serving HTTPS and requiring client certificates from our CA."""
    root = tmp_path_factory.mktemp("receiver")
    manifest = root / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainfleet", "receiver", "--manifest", str(manifest),
         "--state-dir", str(root / "state"), "--port", "0", "--log-level", "warning",
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
         "--tls-client-ca", str(pki.ca)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "listening on https://" in line, line
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()


def _client(url: str, ca: Path | None, cert: Path | None = None,
            key: Path | None = None) -> Client:
    return Client(url, ssl_context=tls_context(ca, cert, key), retries=0, timeout_s=10)


def test_a_valid_client_certificate_is_accepted(receiver: str, pki: Pki) -> None:
    client = _client(receiver, pki.ca, pki.client_cert, pki.client_key)
    assert client.health()["ok"] is True
    claim = client.claim("w", cpu().to_dict())
    assert claim is not None and claim["job"]["name"] == "a"


@pytest.mark.parametrize("who", ["no certificate", "another CA", "expired"])
def test_other_clients_are_refused(receiver: str, pki: Pki, who: str) -> None:
    cert, key = {
        "no certificate": (None, None),
        "another CA": (pki.other_cert, pki.other_key),
        "expired": (pki.expired_cert, pki.expired_key),
    }[who]
    with pytest.raises(ReceiverUnreachable):
        _client(receiver, pki.ca, cert, key).health()


def test_worker_refuses_a_receiver_it_cannot_verify(receiver: str, pki: Pki) -> None:
    system_trust_only = Client(receiver, ssl_context=ssl.create_default_context(), retries=0)
    with pytest.raises(ReceiverUnreachable, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        system_trust_only.health()


def test_client_cert_without_key_is_a_clear_error(pki: Pki) -> None:
    with pytest.raises(TrainfleetError, match="--client-cert and --client-key"):
        tls_context(pki.ca, pki.client_cert, None)


def test_receiver_refuses_half_a_tls_setup(pki: Pki, tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    result = subprocess.run(
        [sys.executable, "-m", "trainfleet", "receiver", "--manifest", str(manifest),
         "--state-dir", str(tmp_path / "s"), "--port", "0", "--tls-cert", str(pki.server_cert)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "--tls-cert and --tls-key: give both or neither" in result.stderr


def test_tls_allows_a_public_bind_without_a_worker_token(pki: Pki, tmp_path: Path) -> None:
    from trainfleet.receiver.settings import ReceiverSettings

    settings = ReceiverSettings(manifest_path=tmp_path / "m.toml", state_dir=tmp_path,
                                host="0.0.0.0", tls_cert=pki.server_cert, tls_key=pki.server_key)
    assert settings.bind_problem() is None
    plain = ReceiverSettings(manifest_path=tmp_path / "m.toml", state_dir=tmp_path,
                             host="0.0.0.0")
    assert plain.bind_problem() is not None and "neither TLS nor" in plain.bind_problem()  # type: ignore[operator]
