"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, a free loopback port.

PostgreSQL refuses to run as root, so under root the server runs as the `postgres` user
(`runuser -u postgres --`). The cluster is stopped (`pg_ctl stop -m fast`) and its directory
removed by `stop()`. Missing binaries are an error, never a skip: CI installs Debian's
`postgresql`.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

READY_DEADLINE_S = 30.0
SUPERUSER = "postgres"
DATABASE = "trainfleet"


def find_bindir() -> Path:
    """The newest PostgreSQL server's bin directory (Debian keeps it off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """One running PostgreSQL server; `url()` names a database, optionally a schema in it."""

    def __init__(self, *, durable: bool = False, settings: tuple[str, ...] = ()) -> None:
        self.bindir = find_bindir()
        self.settings = settings  #: more `name=value` server settings (bench/postgres_profile.py)
        self.root = Path(tempfile.mkdtemp(prefix="trainfleet-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "server.log"
        self.port = 0
        self.durable = durable  #: fsync on: for benchmarks; tests run without it
        self._schemas = itertools.count(1)
        self._as_owner: list[str] = []

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> Cluster:
        self.socket_dir.mkdir()
        self._as_owner = _owner_prefix(self.root, self.socket_dir)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        for _ in range(5):  # the port was free a moment ago; another process may take it
            self.port = free_port()
            if self._start_server():
                break
        else:
            raise RuntimeError(f"PostgreSQL did not start:\n{self._log_tail()}")
        self._wait_ready()
        self.admin(f"CREATE DATABASE {DATABASE}", dbname="postgres")
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        if self.data.exists():
            subprocess.run([*self._as_owner, str(self.bindir / "pg_ctl"), "stop", "-D",
                            str(self.data), "-m", "fast", "-w", "-t", "30"],
                           capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- names ----------------------------------------------------------------

    def url(self, dbname: str = DATABASE, schema: str | None = None) -> str:
        """A postgresql:// URL over loopback TCP; with `schema`, its search_path is set."""
        url = f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"
        if schema is None:
            return url
        return url + "?options=" + urllib.parse.quote(f"-csearch_path={schema}")

    def fresh_schema(self) -> str:
        """A new, empty schema in the test database; the URL whose tables live there."""
        name = f"t{os.getpid()}_{next(self._schemas)}"
        self.admin(f"CREATE SCHEMA {name}")
        return self.url(schema=name)

    def fresh_database(self, prefix: str = "db") -> str:
        name = f"{prefix}{os.getpid()}_{next(self._schemas)}"
        self.admin(f"CREATE DATABASE {name}", dbname="postgres")
        return self.url(name)

    def admin(self, sql: str, dbname: str = DATABASE) -> None:
        """Run one statement as the superuser, outside any transaction."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.encode())

    # --- plumbing -------------------------------------------------------------

    def _start_server(self) -> bool:
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1",
                   f"-c unix_socket_directories={self.socket_dir}", "-c max_connections=200",
                   "-c shared_buffers=64MB"]
        if not self.durable:  # a throwaway cluster: a crash may lose it, so skip the syncs
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        options += [f"-c {setting}" for setting in self.settings]
        done = subprocess.run(
            [*self._as_owner, str(self.bindir / "pg_ctl"), "start", "-D", str(self.data),
             "-l", str(self.log_path), "-o", " ".join(options), "-w", "-t", "30"],
            capture_output=True, check=False,
        )
        return done.returncode == 0

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        while True:
            done = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", SUPERUSER, "-t", "2"], capture_output=True, check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL not ready in {READY_DEADLINE_S} s:\n"
                                   f"{self._log_tail()}")
            time.sleep(0.05)

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as_owner, str(self.bindir / tool), *args],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no server log)"


def _owner_prefix(*paths: Path) -> list[str]:
    """Under root: give the cluster's dirs to `postgres` and run its tools as that user."""
    if os.geteuid() != 0:
        return []
    user = pwd.getpwnam(SUPERUSER)
    for path in paths:
        os.chown(path, user.pw_uid, user.pw_gid)
    return ["runuser", "-u", SUPERUSER, "--"]
