"""One chaos scenario's world: a manifest, a receiver subprocess, chaos workers, their histories.

`Rig.close()` stops, by PID, every process it started (a stopped one is continued first)
and prints their log tails, which pytest shows when the test failed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.chaos import checker
from tests.chaos.history import History, Op, load, pair
from tests.chaos.receiver import REPO, ReceiverProcess
from tests.conftest import manifest_text
from tests.fleet import stop_process, wait_for
from trainfleet import manifest
from trainfleet.receiver.settings import ReceiverSettings


def jobs(count: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"name": f"j{i:05d}", "model": "gbt", "mode": "realistic", "seed": i, **fields}
            for i in range(count)]


class Rig:
    def __init__(self, root: Path, job_list: list[dict[str, Any]],
                 fsize_bytes: int | None = None, **settings: Any) -> None:
        self.root = root
        for name in ("logs", "histories", "workers"):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.manifest_path = root / "manifest.toml"
        self.write_manifest(job_list)
        self.job_ids = [spec.job_id for spec in manifest.load(self.manifest_path).jobs]
        self.receiver = ReceiverProcess(
            ReceiverSettings(manifest_path=self.manifest_path, state_dir=root / "state",
                             **settings), root / "logs", fsize_bytes)
        self.history = History(root / "histories" / "test.jsonl")  #: the test's own calls
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def write_manifest(self, job_list: list[dict[str, Any]]) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(manifest_text(job_list))
        os.replace(tmp, self.manifest_path)

    def start(self) -> Rig:
        self.receiver.start()
        return self

    def worker(self, name: str, *flags: str) -> subprocess.Popen[bytes]:
        """Start a chaos worker process (see tests.chaos.worker for its flags)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
        env["PYTHONPATH"] = str(REPO)
        argv = [sys.executable, "-m", "tests.chaos.worker", "--receiver", self.receiver.url,
                "--name", name, "--log", str(self.root / "histories" / f"{name}.jsonl"),
                "--workdir", str(self.root / "workers" / name), *flags]
        with open(self.root / "logs" / f"worker-{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def wait_workers(self, timeout_s: float) -> dict[str, int]:
        """Wait for every worker to exit by itself; their exit codes."""
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker {name} still runs after {timeout_s:g} s") from None
        return codes

    def ops(self) -> list[Op]:
        self.history.close()
        return pair(load(sorted((self.root / "histories").glob("*.jsonl"))))

    def check(self, allow_live: bool = False) -> checker.Report:
        return checker.check(self.ops(), self.receiver.db_path, self.receiver.store_root,
                             self.job_ids, allow_live=allow_live)

    def rows(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        """A read-only query of the live database."""
        conn = sqlite3.connect(f"file:{self.receiver.db_path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def statuses(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self.rows(
            "SELECT status, count(*) AS n FROM jobs GROUP BY status")}

    def wait_status(self, job_id: str, *statuses: str, timeout_s: float = 20.0) -> sqlite3.Row:
        def probe() -> sqlite3.Row | None:
            rows = self.rows("SELECT * FROM jobs WHERE job_id = ?", job_id)
            return rows[0] if rows and rows[0]["status"] in statuses else None

        return wait_for(f"job {job_id[:12]} to be {' or '.join(statuses)}", probe, timeout_s)

    def held_by(self, name: str, timeout_s: float = 20.0) -> str:
        """The id of a job that worker `name` holds (running) once it holds one."""
        def probe() -> str | None:
            rows = self.rows("SELECT job_id FROM jobs WHERE worker_id = ? AND status = "
                             "'running'", name)
            return rows[0]["job_id"] if rows else None

        return wait_for(f"worker {name} to run a job", probe, timeout_s)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            stop_process(proc, timeout_s=5)
        self.receiver.stop()
        for log_path in sorted((self.root / "logs").glob("*.log")):
            print(f"----- {log_path.name} -----\n{log_path.read_text(errors='replace')[-3000:]}")

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
