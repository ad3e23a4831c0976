"""The receiver's settings, built once at the edge (the CLI) and passed inward."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8470
PRUNE_EVERY_S = 600.0  #: the periodic sweep prunes checkpoints at most this often


@dataclass(frozen=True)
class ReceiverSettings:
    manifest_path: Path
    state_dir: Path
    db: str | None = None  #: queue database; default <state_dir>/queue.db
    #: Artifact store shared by several receivers (a path all of them see, or
    #: s3://bucket/prefix); default: this receiver's own <state_dir>/models.
    store: str | None = None
    s3_endpoint_url: str | None = None  #: for MinIO, Ceph or moto; default: boto3's own
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    operator_token: str | None = None
    worker_token: str | None = None
    read_token: str | None = None  #: when set, reads need it (or an operator or worker token)
    stale_after_s: float = 600.0
    sweep_interval_s: float = 30.0
    #: A checkpoint no job needs is deleted once unused this long (receiver/pruning.py).
    checkpoint_grace_s: float = 3600.0
    keep_checkpoints: bool = False  #: never delete a checkpoint (as before pruning existed)
    prune_every_s: float = PRUNE_EVERY_S
    max_upload_bytes: int = 64 << 30
    max_body_bytes: int = 1 << 20  #: JSON request bodies
    max_log_bytes: int = 16 << 20
    max_concurrent_uploads: int = 4  #: more at once get 503 + Retry-After
    upload_idle_timeout_s: float = 60.0  #: an upload silent this long gets 408
    upload_min_bytes_per_s: float = 64 << 10  #: past the first idle_s, slower on average: 408
    insecure: bool = False
    #: Worker calls need a token (shared or per-host) even before any host is enrolled.
    require_worker_token: bool = False
    tls_cert: Path | None = None  #: PEM certificate chain; with tls_key, serve HTTPS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  #: require client certificates signed by this CA

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def db_path(self) -> str:
        return self.db or str(self.state_dir / "queue.db")

    @property
    def store_is_s3(self) -> bool:
        return bool(self.store and self.store.startswith("s3://"))

    @property
    def store_root(self) -> Path:
        """The filesystem store's root (an S3 store has none: its `--store` is a URL)."""
        if self.store and not self.store_is_s3:
            return Path(self.store)
        return self.state_dir / "models"

    @property
    def logs_dir(self) -> Path:
        # Beside a shared filesystem store, so that every receiver serves every trainer log;
        # with an S3 store each receiver keeps the logs it was sent.
        if self.store and not self.store_is_s3:
            return self.store_root / ".logs"
        return self.state_dir / "logs"

    def tls_problem(self) -> str | None:
        """What is wrong with the TLS settings, naming the flag."""
        if bool(self.tls_cert) != bool(self.tls_key):
            return "--tls-cert and --tls-key: give both or neither"
        if self.tls_client_ca and not self.tls_cert:
            return "--tls-client-ca: needs --tls-cert and --tls-key (client certificates need TLS)"
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--tls-client-ca", self.tls_client_ca)):
            if path is not None and not path.is_file():
                return f"{flag}: {path} is not a readable file"
        return None

    def bind_problem(self) -> str | None:
        """Why this bind is refused: beyond loopback, workers must present a token."""
        if self.insecure or self.worker_token or self.require_worker_token or self.tls_cert:
            return None
        if is_loopback(self.host):
            return None
        return (
            f"--host {self.host}: refusing to listen beyond loopback with neither TLS nor a "
            "worker token (set --tls-cert/--tls-key, or --worker-token-file or "
            "TRAINFLEET_WORKER_TOKEN; or enrol hosts with per-host tokens and pass "
            "--require-worker-token; or pass --insecure)"
        )

    @property
    def open_to_workers(self) -> bool:
        """Whether worker calls may come without a token while no host token was ever issued
        (bind_problem has already vetted a bind beyond loopback)."""
        return not (self.worker_token or self.require_worker_token)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
