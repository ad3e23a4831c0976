"""A receiver subprocess built from any ReceiverSettings, that tests may SIGKILL and restart.

`python -m tests.chaos.receiver SETTINGS_JSON` binds 127.0.0.1 (the port in the settings, 0
for a free one), prints "listening on URL" and serves create_app(settings) in uvicorn, as
`trainfleet receiver` does, but with every setting reachable, not only those with a flag.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tests.fleet import START_S, _listening, stop_process, wait_for
from trainfleet.client import Client
from trainfleet.errors import TrainfleetError
from trainfleet.receiver.settings import ReceiverSettings

REPO = Path(__file__).resolve().parents[2]
OPERATOR_TOKEN = "chaos-operator-token"


class ReceiverProcess:
    """One receiver subprocess at a time on fixed settings; restart() keeps the port."""

    def __init__(self, settings: ReceiverSettings, log_dir: Path,
                 fsize_bytes: int | None = None) -> None:
        self.settings = replace(settings, operator_token=settings.operator_token or
                                OPERATOR_TOKEN)
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0
        self.fsize_bytes = fsize_bytes  #: RLIMIT_FSIZE: writes past it fail with EFBIG

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def db_path(self) -> Path:
        return Path(self.settings.db_path)

    @property
    def store_root(self) -> Path:
        return self.settings.store_root

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"receiver-{self.starts}.log"

    def client(self, retries: int = 0) -> Client:
        return Client(self.url, operator_token=self.settings.operator_token, retries=retries,
                      timeout_s=10.0)

    def start(self) -> ReceiverProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        settings = replace(self.settings, port=self.port if self.url else 0)
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
        env["PYTHONPATH"] = str(REPO)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.receiver", json.dumps(data)], cwd=REPO,
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        if self.fsize_bytes:
            self._limit(self.proc.pid)
        proc, log_path = self.proc, self.log_path
        self.url = wait_for("the receiver to listen", lambda: _listening(proc, log_path), START_S)
        wait_for("the receiver's /v1/health", self._healthy, START_S)
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"receiver exited {self.proc.returncode}:\n{self.logs()}")
        try:
            return bool(self.client().health()["ok"])
        except TrainfleetError:
            return False

    def _limit(self, pid: int) -> None:
        # Set before the receiver writes any upload; Python ignores SIGXFSZ, so a write past
        # the limit fails with EFBIG instead of killing the process.
        import resource  # POSIX only

        resource.prlimit(pid, resource.RLIMIT_FSIZE, (self.fsize_bytes, self.fsize_bytes))

    def kill(self) -> None:
        """SIGKILL: no shutdown, no checkpoint, whatever was in flight is cut."""
        assert self.proc is not None
        assert stop_process(self.proc, signal.SIGKILL) == -signal.SIGKILL

    def stop(self) -> int:
        return 0 if self.proc is None else stop_process(self.proc)

    def restart(self) -> ReceiverProcess:
        return self.start()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(
            self.log_dir.glob("receiver-*.log")))


def main(argv: list[str]) -> int:
    import uvicorn

    from trainfleet.receiver import create_app

    data: dict[str, Any] = json.loads(argv[0])
    for key in ("manifest_path", "state_dir"):
        data[key] = Path(data[key])
    settings = ReceiverSettings(**data)
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", settings.port))
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
