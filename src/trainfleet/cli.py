"""`trainfleet ...`: the one entry point; reads flags and environment into settings.

Standard library only: the receiver is imported lazily inside its command.
Exit codes: 0 ok, 1 error (printed as `error: <message>`), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trainfleet import __version__, backup, config, console, enroll, install, migrate
from trainfleet.console import DEFAULT_RECEIVER
from trainfleet.errors import TrainfleetError

Handler = Callable[[argparse.Namespace, Mapping[str, str]], int]
MIN_CHECKPOINT_GRACE_S = 60.0  #: the shortest --checkpoint-grace (see run_receiver)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def read_token(path: Path | None, environ: Mapping[str, str], variable: str) -> str | None:
    """A token from a file (first line) or else the environment; never from a flag value."""
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise TrainfleetError(f"{path}: cannot read token file: {exc.strerror}") from exc
        if not token:
            raise TrainfleetError(f"{path}: token file is empty")
        return token
    return environ.get(variable) or None


# -- receiver ----------------------------------------------------------------


def add_receiver(sub: Any) -> None:
    p = sub.add_parser("receiver", help="run the receiver (needs the server extra)")
    p.add_argument("--manifest", type=Path, required=True, help="the training manifest (TOML)")
    p.add_argument("--state-dir", type=Path, default=Path("state"),
                   help="queue database, artifact store and logs (default: ./state)")
    p.add_argument("--db", help="queue database: PATH, sqlite:///PATH, or postgresql://... "
                   "to let several receivers share it (default: STATE_DIR/queue.db)")
    p.add_argument("--store", help="artifact store every receiver sees: a path (NFS, SMB) or "
                   "s3://bucket/prefix (needs the s3 extra; credentials the boto3 way, AWS_*); "
                   "default: STATE_DIR/models, this receiver's own")
    p.add_argument("--s3-endpoint-url", metavar="URL",
                   help="S3 endpoint for MinIO, Ceph or another S3-compatible server "
                   "(env: TRAINFLEET_S3_ENDPOINT_URL; default: AWS's, or AWS_ENDPOINT_URL)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8470,
                   help="port; 0 picks a free one (default: 8470)")
    p.add_argument("--operator-token-file", type=Path,
                   help="operator token (env: TRAINFLEET_OPERATOR_TOKEN); "
                   "without one, operator calls are refused")
    p.add_argument("--read-token-file", type=Path,
                   help="guard reads (jobs, workers, models, logs) with this token "
                   "(env: TRAINFLEET_READ_TOKEN); /v1/health and /metrics stay open")
    p.add_argument("--worker-token-file", type=Path,
                   help="token workers must send (env: TRAINFLEET_WORKER_TOKEN)")
    p.add_argument("--require-worker-token", action="store_true",
                   help="refuse worker calls without a shared or per-host token even before "
                   "any host is enrolled (then a bind beyond loopback needs no shared token)")
    p.add_argument("--stale-after", type=float, default=600.0, metavar="S",
                   help="requeue a job whose worker is silent this long (default: 600)")
    p.add_argument("--sweep-interval", type=float, default=30.0, metavar="S",
                   help="how often to look for silent workers (default: 30)")
    p.add_argument("--checkpoint-grace", type=float, default=3600.0, metavar="SECONDS",
                   help="delete a checkpoint no job can resume from once unused this long "
                   f"(default: 3600; at least {MIN_CHECKPOINT_GRACE_S:g})")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="never delete a checkpoint (the store keeps every one uploaded)")
    p.add_argument("--max-upload-bytes", type=int, default=64 << 30, metavar="N",
                   help="largest bundle accepted (default: 64 GiB)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this "
                   "certificate chain")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind with neither TLS nor a worker token")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=run_receiver)


def run_receiver(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        import uvicorn

        from trainfleet.receiver import ReceiverSettings, create_app
    except ImportError as exc:
        raise TrainfleetError(
            "'trainfleet receiver' needs the server extra: pip install 'trainfleet[server]'"
        ) from exc
    if not (math.isfinite(args.checkpoint_grace)
            and args.checkpoint_grace >= MIN_CHECKPOINT_GRACE_S):
        # Pruning is safe while a route's use of an artifact and its record in the queue are
        # far less than grace/2 apart (receiver/pruning.py): a few seconds would not hold that.
        raise TrainfleetError(
            f"--checkpoint-grace: expected a number of seconds >= {MIN_CHECKPOINT_GRACE_S:g}, "
            f"got {args.checkpoint_grace:g} (--keep-checkpoints keeps them all)")
    settings = ReceiverSettings(
        manifest_path=args.manifest, state_dir=args.state_dir, db=args.db, store=args.store,
        s3_endpoint_url=args.s3_endpoint_url or environ.get("TRAINFLEET_S3_ENDPOINT_URL") or None,
        host=args.host,
        port=args.port,
        operator_token=read_token(args.operator_token_file, environ, "TRAINFLEET_OPERATOR_TOKEN"),
        read_token=read_token(args.read_token_file, environ, "TRAINFLEET_READ_TOKEN"),
        worker_token=read_token(args.worker_token_file, environ, "TRAINFLEET_WORKER_TOKEN"),
        stale_after_s=args.stale_after, sweep_interval_s=args.sweep_interval,
        checkpoint_grace_s=args.checkpoint_grace, keep_checkpoints=args.keep_checkpoints,
        max_upload_bytes=args.max_upload_bytes, insecure=args.insecure,
        require_worker_token=args.require_worker_token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
    )
    problem = settings.tls_problem() or settings.bind_problem()
    if problem:
        raise TrainfleetError(problem)
    app = create_app(settings)
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"{settings.scheme}://{host if ':' not in host else f'[{host}]'}:{port}"
    print(f"trainfleet receiver {__version__} listening on {url}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False,
                            **_uvicorn_tls(settings))
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _uvicorn_tls(settings: Any) -> dict[str, Any]:
    """uvicorn's TLS options; client certificates are required when a client CA is set."""
    if not settings.tls_cert:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(settings.tls_cert),
                               "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca:
        options |= {"ssl_ca_certs": str(settings.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def _bind(host: str, port: int) -> socket.socket:
    """Bind before serving, so `--port 0` can report the port it got."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off only on connections whose socket
    # says TCP, and with Nagle on every answer written in two parts waits ~40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TrainfleetError(f"--host/--port: cannot bind {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)  # connections queue from now on, so "listening on" is true when printed
    sock.set_inheritable(True)
    return sock


# -- worker ------------------------------------------------------------------


def add_worker(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a worker daemon on this host")
    p.add_argument("--receiver", action="append", metavar="URL",
                   help="receiver URL; repeat it for receivers serving one fleet, tried in "
                   "order on connection errors (env: TRAINFLEET_RECEIVER, comma-separated; "
                   f"default: {DEFAULT_RECEIVER})")
    p.add_argument("--config", type=Path, help="worker config file (env: "
                   "TRAINFLEET_WORKER_CONFIG; default: ~/.config/trainfleet/worker.toml, then "
                   "/etc/trainfleet/worker.toml); flags and environment override it")
    p.add_argument("--token-file", type=Path, help="worker token (env: TRAINFLEET_WORKER_TOKEN)")
    p.add_argument("--workdir", type=Path,
                   help="the project checkout where the trainer command runs (default: .)")
    p.add_argument("--state-dir", type=Path,
                   help="spool, job outputs and worker id (default: WORKDIR/.trainfleet)")
    p.add_argument("--worker-id", help="default: HOSTNAME-<8 hex>, kept in the state dir")
    p.add_argument("--allow-jobs", type=_csv, metavar="a,b", help="only these models")
    p.add_argument("--deny-jobs", type=_csv, metavar="c", help="never these models")
    p.add_argument("--heartbeat-interval", type=float, default=30.0, metavar="S")
    p.add_argument("--poll-interval", type=float, default=10.0, metavar="S",
                   help="wait between claims when nothing is eligible")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                   help="on SIGTERM, how long the trainer gets before it is killed")
    p.add_argument("--once", action="store_true", help="run at most one job, then exit")
    p.add_argument("--max-jobs", type=int, metavar="N", help="exit after N jobs (per slot)")
    p.add_argument("--slots", default="auto", metavar="auto|N",
                   help="slots claiming and training at once: auto (default) = one per GPU, "
                   "each trainer seeing only its GPU (CUDA_VISIBLE_DEVICES); N = the first N "
                   "GPUs (N CPU slots on a host without CUDA). One slot uses the whole host")
    p.add_argument("--cpu-slots", type=int, default=0, metavar="K",
                   help="K more slots for CPU-only jobs, whose trainers see no GPU")
    p.add_argument("--capability-file", type=Path,
                   help="JSON object whose keys replace detected capability fields")
    p.add_argument("--stop-file", type=Path, help="stop as on SIGTERM when this file appears "
                   "(for Windows Scheduled Tasks)")
    p.add_argument("--log-file", type=Path, help="also log to this file (rotated at 10 MB)")
    console.add_tls_client_arguments(p)
    p.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from trainfleet.capability import detect
    from trainfleet.client import Client
    from trainfleet.worker import SlotGroup, Worker, WorkerSettings, plan_slots

    found = config.fill_worker_args(args, environ)
    if args.log_file:
        install.log_to_file(args.log_file)
    urls = receiver_urls(args.receiver, environ)
    url = urls[0]
    token = read_token(args.token_file, environ, "TRAINFLEET_WORKER_TOKEN") or found.token
    workdir = args.workdir.resolve()
    settings = WorkerSettings(
        receiver_url=url, workdir=workdir,
        state_dir=(args.state_dir or workdir / ".trainfleet").resolve(), token=token,
        worker_id=args.worker_id, allow_jobs=args.allow_jobs, deny_jobs=args.deny_jobs,
        heartbeat_interval_s=args.heartbeat_interval, poll_interval_s=args.poll_interval,
        once=args.once, max_jobs=args.max_jobs, capability_file=args.capability_file,
        shutdown_grace_s=args.shutdown_grace,
    )
    tls = console.tls_context_from(args, environ)

    def make_client() -> Client:
        return Client(url, worker_token=token, fallback_urls=urls[1:], ssl_context=tls)

    cap = detect(workdir, override_file=args.capability_file)
    plan = plan_slots(cap, args.slots, args.cpu_slots, environ.get("CUDA_VISIBLE_DEVICES"))
    worker: Worker | SlotGroup = Worker(settings, make_client(), cap)
    if len(plan) > 1:
        worker = SlotGroup.build(settings, make_client, cap, plan)
    worker.install_signal_handlers()
    if args.stop_file:
        install.watch_stop_file(args.stop_file, worker.request_stop)
    return worker.run()


def receiver_urls(flag: list[str] | str | None, environ: Mapping[str, str]) -> list[str]:
    """The receivers to use, in order: --receiver (repeatable), else the config file's or
    TRAINFLEET_RECEIVER (each may be comma-separated), else the default."""
    given = flag or environ.get("TRAINFLEET_RECEIVER") or DEFAULT_RECEIVER
    items = [given] if isinstance(given, str) else given
    return [url.strip() for item in items for url in item.split(",") if url.strip()]


# -- capability, manifest, demo ----------------------------------------------


def add_capability(sub: Any) -> None:
    p = sub.add_parser("capability", help="print what this host can do, as JSON")
    p.add_argument("--workdir", type=Path, default=Path("."))
    p.add_argument("--capability-file", type=Path, help="override file (JSON object)")
    p.set_defaults(handler=run_capability)


def run_capability(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from trainfleet import capability

    cap = capability.detect(args.workdir, override_file=args.capability_file)
    print(json.dumps(cap.to_dict(), indent=2))
    problems = capability.self_test(cap)
    for problem in problems:
        print(f"self-test: {problem}", file=sys.stderr)
    return 1 if problems else 0


def add_manifest(sub: Any) -> None:
    p = sub.add_parser("manifest", help="work with manifests")
    msub = p.add_subparsers(dest="manifest_command", required=True)
    check = msub.add_parser("check", help="validate a manifest and summarise its jobs")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=run_manifest_check)


def run_manifest_check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from trainfleet import manifest

    loaded = manifest.load(args.file)
    for job in loaded.jobs:
        print(f"{job.job_id[:12]}  {job.name:<28} {job.model:<12} {job.mode:<10} "
              f"{_constraints(job)}")
    print(f"{args.file}: ok, {len(loaded.jobs)} jobs over {len(loaded.models)} models")
    return 0


def _constraints(job: Any) -> str:
    parts = [f"priority={job.priority}"] if job.priority else []
    parts += [name for name in ("require_cuda", "prefer_cuda") if getattr(job, name)]
    parts += [f"{name}={getattr(job, name):g}" for name in ("min_vram_gib", "min_ram_gib")
              if getattr(job, name)]
    if job.allowed_hosts:
        parts.append("hosts=" + ",".join(job.allowed_hosts))
    return " ".join(parts) or "-"


def add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="a real fleet on loopback: receiver, two workers, training")
    p.add_argument("--manifest", type=Path, default=Path("etc/training_manifest.toml.example"))
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep the state here instead of a temporary directory")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from trainfleet.demo import run

    return run(args.manifest, keep=args.keep)


# -- entry point -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainfleet",
        description="Train each model of a project exactly once across a fleet of machines.",
    )
    parser.add_argument("--version", action="version", version=f"trainfleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_receiver, add_worker, add_capability, add_manifest, add_demo):
        add(sub)
    console.add_commands(sub, read_token)
    enroll.add_commands(sub, read_token)
    install.add_commands(sub)
    backup.add_command(sub)
    migrate.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    handler: Handler = args.handler
    try:
        return handler(args, environ)
    except TrainfleetError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `trainfleet list | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps interpreter exit quiet
        return 0
