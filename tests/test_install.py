"""Service definitions and the installers on Linux: systemd units (verified by
systemd-analyze), the shell installers run with --dry-run and into a fake root against a live
receiver, and `trainfleet backup`. The Windows side is in test_install_windows.py."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import job, make_manifest, manifest_text
from tests.live import serving
from trainfleet import install
from trainfleet.backup import backup
from trainfleet.client import Client
from trainfleet.errors import TrainfleetError
from trainfleet.queue.sqlite import SqliteQueue
from trainfleet.receiver import ReceiverSettings

REPO = Path(__file__).parent.parent
SCRIPTS = REPO / "scripts"
VENV = Path(sys.prefix)
TF = VENV / "bin" / "trainfleet"
OPERATOR_TOKEN = "operator-secret"
RUN_AS = "daemon" if os.geteuid() == 0 else os.environ.get("USER") or "nobody"
needs_systemd = pytest.mark.skipif(
    not (shutil.which("systemd-analyze") and shutil.which("systemctl")),
    reason="systemd (systemd-analyze, systemctl) is not installed")


def trainfleet(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "trainfleet", *args], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout


def unit_keys(text: str) -> dict[str, dict[str, str]]:
    """A unit file's sections and keys (each key appears once in ours)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert key not in current, f"{key} twice"
            current[key] = value
    return sections


def verify(path: Path) -> None:
    """systemd-analyze verify passes with no warning at all."""
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


# -- systemd units --------------------------------------------------------------


@pytest.mark.parametrize(("arg", "word"), [
    ("/opt/tf/bin/trainfleet", "/opt/tf/bin/trainfleet"), ("/srv/my project", '"/srv/my project"'),
    ("50%", "50%%"), ("$HOME", "$$HOME"), ('say "hi"', '"say \\"hi\\""'), ("a\\b", '"a\\\\b"'),
])
def test_systemd_quote_escapes_what_systemd_would_expand(arg: str, word: str) -> None:
    assert install.systemd_quote(arg) == word


@needs_systemd
def test_worker_unit_passes_systemd_analyze_and_has_the_required_options(tmp_path: Path) -> None:
    workdir = tmp_path / "my project"
    text = trainfleet("install", "systemd-unit", "worker", "--exec", str(TF), "--user", "lab",
                      "--workdir", str(workdir), "--shutdown-grace", "45")
    path = tmp_path / install.WORKER_UNIT
    path.write_text(text)
    verify(path)
    unit = unit_keys(text)
    assert unit["Unit"]["After"] == "network-online.target"
    service = unit["Service"]
    assert service["ExecStart"] == (f"{TF} worker --config /etc/trainfleet/worker.toml "
                                    "--shutdown-grace 45")
    assert (service["User"], service["WorkingDirectory"]) == ("lab", str(workdir))
    assert (service["Restart"], service["KillSignal"], service["KillMode"]) == (
        "on-failure", "SIGTERM", "mixed")
    assert int(service["TimeoutStopSec"]) > 45
    for option in ("NoNewPrivileges", "PrivateTmp"):
        assert service[option] == "yes"
    assert service["ProtectSystem"] == "full"  # /etc read-only, /dev (GPUs) and /home left alone
    assert "PrivateDevices" not in service and "ProtectHome" not in service
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@needs_systemd
def test_receiver_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    text = trainfleet("install", "systemd-unit", "receiver", "--exec", str(TF), "--",
                      "--manifest", "/srv/lab/manifest.toml", "--host", "0.0.0.0",
                      "--operator-token-file", "/etc/trainfleet/operator.token",
                      "--require-worker-token")
    path = tmp_path / install.RECEIVER_UNIT
    path.write_text(text)
    verify(path)
    service = unit_keys(text)["Service"]
    assert service["ExecStart"].startswith(f"{TF} receiver --state-dir /var/lib/trainfleet "
                                           "--manifest /srv/lab/manifest.toml --host 0.0.0.0")
    assert service["StateDirectory"] == "trainfleet" and service["User"] == "trainfleet"
    assert service["ProtectSystem"] == "strict"


def test_worker_unit_refuses_root() -> None:
    done = subprocess.run([sys.executable, "-m", "trainfleet", "install", "systemd-unit",
                           "worker", "--exec", str(TF), "--user", "root", "--workdir", "/srv"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "must not run as root" in done.stderr


# -- the shell installers --------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Client]:
    """A live receiver; the operator's client to it."""
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(manifest_text([job("a")]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "rx",
                                operator_token=OPERATOR_TOKEN)
    with serving(settings) as (host, port):
        yield Client(f"http://{host}:{port}", operator_token=OPERATOR_TOKEN, retries=0)


def script(name: str, *args: str, venv: Path | None = VENV) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINFLEET_", "SUDO_"))}
    options = [] if venv is None else ["--venv", str(venv)]
    return subprocess.run(["bash", str(SCRIPTS / name), *options, *args],
                          capture_output=True, text=True, timeout=120, env=env)


def uninstall(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return script("uninstall-training-worker.sh", "--root", str(root), *args, venv=None)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def snapshot(root: Path) -> dict[str, str | bytes]:
    """Every file's bytes (a link's target) and mode, to prove a re-run changed nothing."""
    return {p: (os.readlink(root / p) if (root / p).is_symlink() else (root / p).read_bytes()
                + oct((root / p).stat().st_mode).encode()) for p in files_under(root)}


def test_worker_installer_dry_run_shows_everything_and_changes_nothing(tmp_path: Path) -> None:
    root, project = tmp_path / "root", tmp_path / "project"
    root.mkdir()
    project.mkdir()
    done = script("install-training-worker.sh", "--dry-run", "--root", str(root),
                  "--receiver", "http://pi:8470", "--code", "tfe_secret", "--user", RUN_AS,
                  "--workdir", str(project))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "self-test" in out and "tfe_secret" not in out and "--code <code>" in out
    assert f"would write {root}/etc/trainfleet/worker.toml (mode 600, owner {RUN_AS})" in out
    assert f"would write {root}/etc/systemd/system/trainfleet-worker.service" in out
    assert "    ExecStart=" in out and f"would run: systemctl --root={root} enable" in out
    assert files_under(root) == set()


@needs_systemd
def test_worker_installer_enrols_installs_and_reruns_idempotently(
    tmp_path: Path, receiver: Client
) -> None:
    root, project = tmp_path / "root", tmp_path / "project"
    project.mkdir()
    code = receiver.create_token(socket.gethostname(), enroll=True)["token"]
    argv = ["--root", str(root), "--receiver", receiver.base_url, "--code", code,
            "--user", RUN_AS, "--workdir", str(project)]
    first = script("install-training-worker.sh", *argv)
    assert first.returncode == 0, first.stderr + first.stdout
    assert files_under(root) == {"etc/trainfleet/worker.toml",
                                 "etc/systemd/system/trainfleet-worker.service",
                                 "etc/systemd/system/multi-user.target.wants/"
                                 "trainfleet-worker.service"}
    config = root / "etc/trainfleet/worker.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert config.owner() == RUN_AS
    written = tomllib.loads(config.read_text())
    assert written["receiver"] == receiver.base_url and written["workdir"] == str(project)
    assert written["state_dir"] == "/var/lib/trainfleet-worker"
    host = Client(receiver.base_url, worker_token=written["token"], retries=0)
    assert host.claim("w", {"hostname": socket.gethostname(), "os": "linux", "cpu_count": 2,
                            "ram_gib": 8, "cuda": False}) is not None
    unit = root / "etc/systemd/system/trainfleet-worker.service"
    assert unit.read_text() == trainfleet(
        "install", "systemd-unit", "worker", "--exec", str(TF), "--user", RUN_AS,
        "--workdir", str(project), "--shutdown-grace", "30")
    verify(unit)

    before = snapshot(root)
    again = script("install-training-worker.sh", *argv)  # the same command, the code spent
    assert again.returncode == 0, again.stderr
    assert "already enrolled" in again.stdout and f"unchanged: {unit}" in again.stdout
    assert snapshot(root) == before


def test_worker_installer_stops_when_the_self_test_fails(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "trainfleet"
    fake.write_text("#!/bin/sh\necho 'self-test: cuda: true, but no GPU is listed' >&2\nexit 1\n")
    fake.chmod(0o755)
    root = tmp_path / "root"
    done = script("install-training-worker.sh", "--root", str(root), "--code", "c",
                  "--receiver", "http://x", "--user", RUN_AS, venv=venv)
    assert done.returncode == 1
    assert "the self-test failed" in done.stderr and "no GPU is listed" in done.stderr
    assert not root.exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--user", "root"], "must not run as root"),
    (["--user", RUN_AS], "trainfleet token create"),  # no code and no config yet
    (["--user", RUN_AS, "--code"], "--code needs a value"),
    (["--bogus"], "unknown option --bogus"),
])
def test_worker_installer_explains_what_is_missing(tmp_path: Path, args: list[str],
                                                   needle: str) -> None:
    done = script("install-training-worker.sh", "--root", str(tmp_path / "root"),
                  "--workdir", str(tmp_path), *args)
    assert done.returncode != 0 and needle in done.stderr


@needs_systemd
def test_uninstaller_removes_what_the_installer_added_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    unit = units / install.WORKER_UNIT
    unit.write_text("[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    (units / "multi-user.target.wants" / install.WORKER_UNIT).symlink_to(
        f"/etc/systemd/system/{install.WORKER_UNIT}")
    (units / "other.service").write_text("[Service]\nExecStart=/bin/true\n")
    (root / "etc/trainfleet").mkdir()
    (root / "etc/trainfleet/worker.toml").write_text('token = "tfw_x"\n')
    (root / "etc/trainfleet/ca.pem").write_text("a CA the operator put here")
    spool = root / "var/lib/trainfleet-worker/spool"
    spool.mkdir(parents=True)
    (spool / "job-1.json").write_text("{}")

    dry = uninstall(root, "--dry-run")
    assert dry.returncode == 0 and f"would run: rm -f {unit}" in dry.stdout
    done = uninstall(root)
    assert done.returncode == 0, done.stderr
    assert files_under(root) == {"etc/systemd/system/other.service", "etc/trainfleet/ca.pem",
                                 "var/lib/trainfleet-worker/spool/job-1.json"}
    refused = uninstall(root, "--purge")
    assert refused.returncode == 1 and "not yet delivered" in refused.stderr
    forced = uninstall(root, "--purge", "--force")
    assert forced.returncode == 0 and not (root / "var/lib/trainfleet-worker").exists()


@needs_systemd
def test_receiver_installer_makes_a_token_and_a_unit_and_keeps_them(tmp_path: Path) -> None:
    root = tmp_path / "root"
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(manifest_text([job("a")]))
    argv = ["--root", str(root), "--manifest", str(manifest), "--host", "0.0.0.0"]
    dry = script("install-receiver.sh", "--dry-run", *argv)
    assert dry.returncode == 0, dry.stderr
    assert "would write" in dry.stdout and not root.exists()
    first = script("install-receiver.sh", *argv)
    assert first.returncode == 0, first.stderr
    token = root / "etc/trainfleet/operator.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o640 and len(token.read_text().strip()) == 64
    unit = root / "etc/systemd/system" / install.RECEIVER_UNIT
    verify(unit)
    exec_start = unit_keys(unit.read_text())["Service"]["ExecStart"]
    assert f"--manifest {manifest}" in exec_start and "--host 0.0.0.0" in exec_start
    assert "--require-worker-token" in exec_start and "--tls-cert" in first.stdout
    kept = token.read_text()
    again = script("install-receiver.sh", *argv)
    assert again.returncode == 0 and "keeping the operator token" in again.stdout
    assert token.read_text() == kept and f"unchanged: {unit}" in again.stdout


# -- backup --------------------------------------------------------------------------


def run_backup(dest: Path, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainfleet", "backup", str(dest),
                           "--state-dir", str(state)], capture_output=True, text=True, timeout=60)


def test_backup_copies_a_live_database_consistently(tmp_path: Path) -> None:
    state, shelf = tmp_path / "state", tmp_path / "backups"
    shelf.mkdir()
    state.mkdir()
    live = SqliteQueue(state / "queue.db")  # open and written to while it is copied
    try:
        live.sync_manifest(make_manifest([job("a"), job("b")]))
        done = run_backup(shelf, state)
        assert done.returncode == 0, done.stderr
        assert "integrity ok" in done.stdout
        named = run_backup(tmp_path / "named.db", state)
        assert named.returncode == 0 and (tmp_path / "named.db").is_file()
        again = run_backup(tmp_path / "named.db", state)
        assert again.returncode == 1 and "exists" in again.stderr
    finally:
        live.close()
    [copy] = shelf.glob("queue-*.db")
    restored = SqliteQueue(copy)
    try:
        assert sorted(j.name for j in restored.list_jobs()) == ["a", "b"]
    finally:
        restored.close()
    assert [p.name for p in shelf.iterdir()] == [copy.name]  # no partial file left


def test_backup_explains_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(TrainfleetError, match="no such database"):
        backup(tmp_path / "nope.db", tmp_path / "x.db")
    with pytest.raises(TrainfleetError, match="pg_dump"):
        backup(Path("postgresql://db/trainfleet"), tmp_path / "x.db")
