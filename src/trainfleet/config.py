"""The worker's configuration file (TOML): where it lives, reading it, and writing it privately.

Standard library only. tomllib reads; the few flat keys are written by `dump`, because the
standard library has no TOML writer. Flags and environment override what the file says.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

from trainfleet.errors import TrainfleetError

log = logging.getLogger("trainfleet.worker")

FILENAME = "worker.toml"
ENV_VAR = "TRAINFLEET_WORKER_CONFIG"
HEADER = (
    "# trainfleet worker configuration (written by `trainfleet enroll`).\n"
    "# Keep it private: `token` lets its holder act as this host. Flags and environment\n"
    "# override these values; see docs/operator-guide.md.\n"
)
PATH_KEYS = ("workdir", "state_dir", "ca_file", "client_cert", "client_key", "capability_file")
LIST_KEYS = ("allow_jobs", "deny_jobs")


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to find and join its receiver; None means "not set here"."""

    receiver: str | None = None
    token: str | None = None
    workdir: Path | None = None  #: the project checkout where the trainer runs
    state_dir: Path | None = None  #: spool, job outputs, worker id
    allow_jobs: tuple[str, ...] | None = None
    deny_jobs: tuple[str, ...] | None = None
    ca_file: Path | None = None  #: CA bundle for an https receiver
    client_cert: Path | None = None  #: client certificate for mutual TLS
    client_key: Path | None = None
    capability_file: Path | None = None  #: capability override (JSON)

    def updated(self, **values: Any) -> WorkerConfig:
        """A copy with the given values replaced; None values leave a key as it is."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


KEYS = tuple(f.name for f in fields(WorkerConfig))


def default_path(
    environ: Mapping[str, str], platform: str = sys.platform, is_root: bool | None = None
) -> PurePath:
    """Where `enroll` writes by default: system-wide for root (and on Windows), else per user."""
    if platform == "win32":
        return PureWindowsPath(environ.get("PROGRAMDATA") or r"C:\ProgramData",
                               "trainfleet", FILENAME)
    if is_root is None:
        is_root = os.geteuid() == 0
    if is_root:
        return Path("/etc/trainfleet") / FILENAME
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")).expanduser()
                                                 / ".config")
    return Path(base) / "trainfleet" / FILENAME


def search_paths(environ: Mapping[str, str], platform: str = sys.platform) -> list[PurePath]:
    """Where a worker without --config looks, first match wins: $TRAINFLEET_WORKER_CONFIG,
    the user's file, then the system-wide one (a service account reads the latter)."""
    found: list[PurePath] = [Path(environ[ENV_VAR])] if environ.get(ENV_VAR) else []
    if platform == "win32":
        return [*found, default_path(environ, platform)]
    return [*found, default_path(environ, platform, is_root=False),
            default_path(environ, platform, is_root=True)]


def find(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The file a worker reads: the explicit one (which must exist), or the first found."""
    if explicit is not None:
        if not explicit.is_file():
            raise TrainfleetError(f"--config {explicit}: no such file")
        return explicit
    for candidate in search_paths(environ):
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def load(path: Path) -> WorkerConfig:
    """Read a config file; an unknown key or a wrong type is an error naming the file and key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TrainfleetError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TrainfleetError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise TrainfleetError(f"{path}: unknown key {', '.join(unknown)} "
                              f"(known: {', '.join(KEYS)})")
    return WorkerConfig(**{key: _value(path, key, value) for key, value in data.items()})


def _value(path: Path, key: str, value: Any) -> Any:
    if key in LIST_KEYS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TrainfleetError(f"{path}: {key}: expected a list of model names, got {value!r}")
        return tuple(value)
    if not isinstance(value, str) or not value:
        raise TrainfleetError(f"{path}: {key}: expected a non-empty string, got {value!r}")
    if key in PATH_KEYS:
        return path.parent / Path(value).expanduser()  # relative: to the file's directory
    return value


def dump(config: WorkerConfig) -> str:
    """The config as TOML, keys in a fixed order, unset keys left out."""
    lines = [HEADER]
    for key in KEYS:
        value = getattr(config, key)
        if value is None:
            continue
        if isinstance(value, tuple):
            lines.append(f"{key} = [{', '.join(quote(v) for v in value)}]\n")
        else:
            lines.append(f"{key} = {quote(str(value))}\n")
    return "".join(lines)


def quote(text: str) -> str:
    """A TOML basic string: backslash, quote and every control character escaped."""
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def save(path: Path, config: WorkerConfig) -> None:
    """Write the file atomically, readable by its owner only (0600 on POSIX).

    The temp file is created 0600, so the token is never readable by others, not even for a
    moment. On Windows the installer restricts the file's ACL to the service account.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if sys.platform != "win32":
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dump(config))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


#: worker flag (argparse dest) -> (config key, the flag's environment variable)
WORKER_FLAGS = {
    "receiver": ("receiver", "TRAINFLEET_RECEIVER"),
    "workdir": ("workdir", None),
    "state_dir": ("state_dir", None),
    "allow_jobs": ("allow_jobs", None),
    "deny_jobs": ("deny_jobs", None),
    "capability_file": ("capability_file", None),
    "ca": ("ca_file", "TRAINFLEET_CA"),
    "client_cert": ("client_cert", "TRAINFLEET_CLIENT_CERT"),
    "client_key": ("client_key", "TRAINFLEET_CLIENT_KEY"),
}


def fill_worker_args(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerConfig:
    """Give each worker flag set neither on the command line nor in its environment variable
    the config file's value (flag > environment > file > default); the config it read."""
    path = find(args.config, environ)
    found = WorkerConfig() if path is None else load(path)
    if path is not None and exposed(path):
        log.warning("%s is readable by other users; it holds a token: chmod 600 it", path)
    for dest, (key, variable) in WORKER_FLAGS.items():
        if getattr(args, dest, None) is None and not (variable and environ.get(variable)):
            setattr(args, dest, getattr(found, key))
    args.workdir = args.workdir or Path(".")
    args.deny_jobs = args.deny_jobs or ()
    return found


def exposed(path: Path) -> bool:
    """Whether group or others may read the file (POSIX); a token there should not be."""
    if sys.platform == "win32":
        return False
    return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
