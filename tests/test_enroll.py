"""Enrolling a host: the worker config file, and the whole flow against a live receiver
(operator mints a code, the host enrols, its worker trains, refusals, revocation)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path, PureWindowsPath

import pytest

from tests.conftest import job
from tests.fleet import Fleet, Receiver, wait_for
from trainfleet import config
from trainfleet.cli import build_parser
from trainfleet.errors import TrainfleetError
from trainfleet.queue.sqlite import SqliteQueue
from trainfleet.tokens import TokenKind, hash_token, new_token

TRICKY = 'C:\\Program Files\\"lab"\ttab\nnewline \u00e9\u4e2d\x7f#not a comment'


# -- the config file -----------------------------------------------------------


def test_config_round_trips_through_tomllib_with_awkward_values(tmp_path: Path) -> None:
    made = config.WorkerConfig(
        receiver="https://pi.lab:8470", token=TRICKY, workdir=tmp_path / "my project",
        state_dir=tmp_path / "state", allow_jobs=("gbt", 'we"ird'), deny_jobs=(),
        ca_file=tmp_path / "ca.pem",
    )
    text = config.dump(made)
    assert tomllib.loads(text)["token"] == TRICKY
    path = tmp_path / "worker.toml"
    config.save(path, made)
    assert config.load(path) == made


def test_config_is_written_owner_only_and_atomically(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "trainfleet" / "worker.toml"
    old_umask = os.umask(0)  # even a permissive umask must not expose the token
    try:
        config.save(path, config.WorkerConfig(token="tfw_one"))
        config.save(path, config.WorkerConfig(token="tfw_two"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.load(path).token == "tfw_two" and not config.exposed(path)
    assert [p.name for p in path.parent.iterdir()] == ["worker.toml"]  # no temp file left
    path.chmod(0o644)
    assert config.exposed(path)


@pytest.mark.parametrize(("text", "needle"), [
    ('receiver = "x"\ncolour = "blue"\n', "unknown key colour"),
    ("allow_jobs = \"gbt\"\n", "allow_jobs: expected a list"),
    ("token = 3\n", "token: expected a non-empty string"),
    ("token = \n", "not valid TOML"),
])
def test_config_errors_name_the_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    with pytest.raises(TrainfleetError, match=needle) as caught:
        config.load(path)
    assert str(path) in caught.value.message


def test_config_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "worker.toml"
    path.parent.mkdir()
    path.write_text('workdir = "../project"\nstate_dir = "/var/lib/x"\n')
    loaded = config.load(path)
    assert loaded.workdir == tmp_path / "conf" / ".." / "project"
    assert loaded.state_dir == Path("/var/lib/x")


def test_config_default_locations() -> None:
    env = {"HOME": "/home/ann", "XDG_CONFIG_HOME": "/home/ann/.cfg"}
    assert config.default_path(env, "linux", is_root=True) == Path("/etc/trainfleet/worker.toml")
    assert config.default_path(env, "linux", is_root=False) == Path(
        "/home/ann/.cfg/trainfleet/worker.toml")
    assert config.default_path({"HOME": "/home/ann"}, "linux", is_root=False) == Path(
        "/home/ann/.config/trainfleet/worker.toml")
    assert config.default_path({"PROGRAMDATA": "D:\\Data"}, "win32") == PureWindowsPath(
        "D:\\Data\\trainfleet\\worker.toml")
    found = config.search_paths(env | {"TRAINFLEET_WORKER_CONFIG": "/srv/w.toml"}, "linux")
    assert [str(p) for p in found] == ["/srv/w.toml", "/home/ann/.cfg/trainfleet/worker.toml",
                                       "/etc/trainfleet/worker.toml"]


def test_worker_flags_and_environment_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    config.save(path, config.WorkerConfig(
        receiver="http://from-file:1", token="tfw_file", workdir=tmp_path / "wd",
        deny_jobs=("transformer",), ca_file=tmp_path / "ca.pem"))
    args = build_parser().parse_args(["worker", "--config", str(path), "--workdir", "/flag"])
    found = config.fill_worker_args(args, {"TRAINFLEET_CA": "/env/ca.pem"})
    assert found.token == "tfw_file" and args.receiver == "http://from-file:1"
    assert args.workdir == Path("/flag") and args.deny_jobs == ("transformer",)
    assert args.ca is None  # the environment's CA wins; tls_context_from reads it
    args = build_parser().parse_args(["worker", "--config", str(path)])
    config.fill_worker_args(args, {"TRAINFLEET_RECEIVER": "http://from-env:2"})
    assert args.receiver is None and args.ca == tmp_path / "ca.pem"
    assert args.allow_jobs is None and args.workdir == tmp_path / "wd"


def test_a_worker_without_any_config_file_keeps_todays_defaults(tmp_path: Path) -> None:
    args = build_parser().parse_args(["worker"])
    found = config.fill_worker_args(args, {"HOME": str(tmp_path)})
    assert found == config.WorkerConfig() and args.workdir == Path(".")
    assert args.deny_jobs == () and args.receiver is None
    args = build_parser().parse_args(["worker", "--config", str(tmp_path / "missing.toml")])
    with pytest.raises(TrainfleetError, match="no such file"):
        config.fill_worker_args(args, {})


# -- the flow against a live receiver ------------------------------------------


def cli(*args: str, fleet: Fleet) -> subprocess.CompletedProcess[str]:
    """`python -m trainfleet ...` as the operator or the host runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    env["TRAINFLEET_OPERATOR_TOKEN"] = fleet.operator_token_file.read_text().strip()
    return subprocess.run([sys.executable, "-m", "trainfleet", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=fleet.root)


def mint_code(fleet: Fleet, receiver: Receiver, host: str) -> str:
    made = cli("token", "create", host, "--enroll", "--ttl", "1h", "-q",
               "--receiver", receiver.url, fleet=fleet)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def enroll(fleet: Fleet, receiver: Receiver, code: str, host: str,
           path: Path) -> subprocess.CompletedProcess[str]:
    return cli("enroll", "--receiver", receiver.url, "--code", code, "--hostname", host,
               "--config", str(path), "--workdir", str(fleet.project),
               "--state-dir", str(fleet.root / "host-state"), fleet=fleet)


@pytest.mark.slow
def test_enrolled_host_trains_and_a_revoked_one_is_stopped(tmp_path: Path) -> None:
    with Fleet(tmp_path) as fleet:
        manifest = fleet.manifest([job("quick"), job("gated", hyper={"gate": "g"})])
        receiver = fleet.receiver(manifest)
        path = tmp_path / "host" / "worker.toml"
        code = mint_code(fleet, receiver, "gpu-a")
        joined = enroll(fleet, receiver, code, "gpu-a", path)
        assert joined.returncode == 0, joined.stderr
        assert "enrolled host gpu-a" in joined.stdout
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        written = tomllib.loads(path.read_text())
        assert written["receiver"] == receiver.url and written["token"].startswith("tfw_")
        assert written["workdir"] == str(fleet.project)

        cap = {"hostname": "gpu-a"}
        once = fleet.worker(receiver.url, "gpu-a", cap, "--config", str(path), "--once")
        assert once.wait_exit(30) == 0
        quick = receiver.jobs_by_name()["quick"]
        assert quick["status"] == "completed" and quick["hostname"] == "gpu-a"

        again = enroll(fleet, receiver, code, "gpu-a", tmp_path / "again.toml")
        assert again.returncode == 1 and "already used" in again.stderr
        assert not (tmp_path / "again.toml").exists()
        other = enroll(fleet, receiver, mint_code(fleet, receiver, "gpu-a"), "gpu-b",
                       tmp_path / "b.toml")
        assert other.returncode == 1 and "for host 'gpu-a', not 'gpu-b'" in other.stderr

        worker = fleet.worker(receiver.url, "gpu-a2", cap, "--config", str(path))
        gated = receiver.jobs_by_name()["gated"]["job_id"]
        pid = fleet.trainer_pid(gated)
        revoked = cli("token", "revoke", "gpu-a", "--receiver", receiver.url, fleet=fleet)
        assert revoked.returncode == 0, revoked.stderr
        assert "requeued 1 running job(s)" in revoked.stdout and gated[:12] in revoked.stdout
        assert "revoked" in receiver.job(gated)["error"]
        assert worker.wait_exit(30) == 1  # its next heartbeat is refused: trainer stopped
        wait_for("the revoked host's trainer to stop", lambda: not _alive(pid))
        assert "was revoked" in worker.log_path.read_text()
        assert receiver.job(gated)["status"] == "pending"
        listed = cli("token", "list", "--receiver", receiver.url, fleet=fleet)
        assert listed.returncode == 0
        rows = {tuple(line.split()[:4]) for line in listed.stdout.splitlines()[1:]}
        states = {(host, kind, state) for host, kind, _, state in rows}
        assert states == {("gpu-a", "worker", "revoked"), ("gpu-a", "enroll", "used"),
                          ("gpu-a", "enroll", "revoked")}


def test_enroll_refuses_an_expired_code_with_a_clear_message(tmp_path: Path) -> None:
    with Fleet(tmp_path) as fleet:
        receiver = fleet.receiver(fleet.manifest([job("a")]))
        code = new_token(TokenKind.ENROLL)
        side = SqliteQueue(receiver.state_dir / "queue.db")  # a code that expired a minute ago
        try:
            side.create_token("gpu-a", TokenKind.ENROLL, hash_token(code),
                              expires_at=time.time() - 60)
        finally:
            side.close()
        result = enroll(fleet, receiver, code, "gpu-a", tmp_path / "w.toml")
        assert result.returncode == 1
        assert result.stderr.startswith("error: enrollment refused: the code expired at")
        assert "trainfleet token create gpu-a --enroll" in result.stderr


def test_token_commands_need_the_operator_token(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "trainfleet", "token", "list"],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ["PATH"]})
    assert result.returncode == 1 and "TRAINFLEET_OPERATOR_TOKEN" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "trainfleet", "token", "create", "h", "--ttl",
                          "soon"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "24h" in bad.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
