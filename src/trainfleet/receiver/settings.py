"""The receiver's settings, built once at the edge (the CLI) and passed inward."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8470


@dataclass(frozen=True)
class ReceiverSettings:
    manifest_path: Path
    state_dir: Path
    db: str | None = None  #: queue database; default <state_dir>/queue.db
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    operator_token: str | None = None
    worker_token: str | None = None
    stale_after_s: float = 600.0
    sweep_interval_s: float = 30.0
    max_upload_bytes: int = 64 << 30
    max_body_bytes: int = 1 << 20  #: JSON request bodies
    max_log_bytes: int = 16 << 20
    insecure: bool = False

    @property
    def db_path(self) -> str:
        return self.db or str(self.state_dir / "queue.db")

    @property
    def store_root(self) -> Path:
        return self.state_dir / "models"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def bind_problem(self) -> str | None:
        """Why this bind is refused: beyond loopback, workers must present a token."""
        if self.insecure or self.worker_token or is_loopback(self.host):
            return None
        return (
            f"--host {self.host}: refusing to listen beyond loopback without a worker token "
            "(set --worker-token-file or TRAINFLEET_WORKER_TOKEN, or pass --insecure)"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
