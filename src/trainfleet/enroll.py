"""`trainfleet token create|list|revoke` (the operator) and `trainfleet enroll` (a new host).

Standard library only. Enrolling trades a one-time code for the host's worker token and
writes it into the host's worker config file, readable by its owner only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trainfleet import config, console
from trainfleet.client import Client
from trainfleet.console import DEFAULT_RECEIVER
from trainfleet.errors import TrainfleetError
from trainfleet.tokens import parse_duration

ReadToken = Callable[..., str | None]


def add_commands(sub: Any, read_token: ReadToken) -> None:
    """Register `token ...` and `enroll` on the `trainfleet` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--receiver", help=f"receiver URL (env: TRAINFLEET_RECEIVER; "
                        f"default: {DEFAULT_RECEIVER})")
    common.add_argument("--operator-token-file", type=Path,
                        help="operator token (env: TRAINFLEET_OPERATOR_TOKEN)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    console.add_tls_client_arguments(common)

    token = sub.add_parser("token", help="per-host worker tokens and enrollment codes (operator)")
    tsub = token.add_subparsers(dest="token_command", required=True)
    p = tsub.add_parser("create", parents=[common], help="mint a host's worker token, or "
                        "(--enroll) a one-time enrollment code for it")
    p.add_argument("hostname", metavar="HOST", help="the host's name as its worker reports it")
    p.add_argument("--enroll", action="store_true", help="a one-time code for `trainfleet enroll`")
    p.add_argument("--ttl", type=_duration, metavar="TIME",
                   help="lifetime, e.g. 30m, 24h, 7d (default: 24h for a code, none for a token)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the token or code")
    p.set_defaults(handler=_operator(create, read_token))
    p = tsub.add_parser("list", parents=[common], help="hosts, kinds, last use, revocations")
    p.set_defaults(handler=_operator(list_tokens, read_token))
    p = tsub.add_parser("revoke", parents=[common], help="refuse a host at once; its running "
                        "jobs are requeued")
    p.add_argument("hostname", metavar="HOST")
    p.set_defaults(handler=_operator(revoke, read_token))
    add_enroll(sub)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _operator(handler: Callable[[argparse.Namespace, Client], int], read_token: ReadToken) -> Any:
    def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
        url = args.receiver or environ.get("TRAINFLEET_RECEIVER") or DEFAULT_RECEIVER
        token = read_token(args.operator_token_file, environ, "TRAINFLEET_OPERATOR_TOKEN")
        if not token:
            raise TrainfleetError("tokens need the operator token: set TRAINFLEET_OPERATOR_TOKEN "
                                  "or pass --operator-token-file")
        client = Client(url, operator_token=token, retries=1, backoff_s=0.2,
                        ssl_context=console.tls_context_from(args, environ))
        return handler(args, client)

    return run


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def _print_json(data: Any) -> int:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


# -- the operator's commands -------------------------------------------------


def create(args: argparse.Namespace, client: Client) -> int:
    made = client.create_token(args.hostname, enroll=args.enroll, ttl_s=args.ttl)
    if args.json:
        return _print_json(made)
    if args.quiet:
        print(made["token"])
        return 0
    host, expires = made["hostname"], _when(made["expires_at"])
    if args.enroll:
        print(f"enrollment code for host {host} (single use, expires {expires}):\n\n"
              f"  {made['token']}\n\non {host}, from the project's clone, run:\n"
              f"  trainfleet enroll --receiver {client.base_url} --code {made['token']}\n"
              f"or install the worker service in one go:\n"
              f"  sudo scripts/install-training-worker.sh --receiver {client.base_url} "
              f"--code {made['token']}")
    else:
        print(f"worker token for host {host} (id {made['token_id']}, expires {expires}); "
              f"it is shown only this once:\n\n  {made['token']}\n\n"
              f"put it in {host}'s worker.toml as token = \"...\", or in a file for "
              "`trainfleet worker --token-file`")
    return 0


def _state(row: Mapping[str, Any]) -> str:
    if row["revoked_at"] is not None:
        return "revoked"
    if row["kind"] == "enroll" and row["used_at"] is not None:
        return "used"
    return "active" if row["active"] else "expired"


def list_tokens(args: argparse.Namespace, client: Client) -> int:
    rows = client.tokens()
    if args.json:
        return _print_json(rows)
    if not rows:
        print("no tokens: create one with `trainfleet token create HOST --enroll`")
        return 0
    table = [["HOST", "KIND", "ID", "STATE", "CREATED", "EXPIRES", "LAST USED"]]
    for r in rows:
        last = r["used_at"] if r["kind"] == "enroll" else r["last_used_at"]
        table.append([r["hostname"], r["kind"], r["token_id"], _state(r), _when(r["created_at"]),
                      _when(r["expires_at"]), _when(last)])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def revoke(args: argparse.Namespace, client: Client) -> int:
    result = client.revoke_host(args.hostname)
    if args.json:
        return _print_json(result)
    print(f"revoked host {result['hostname']}: {result['revoked']} token(s) and code(s); "
          f"requeued {len(result['requeued'])} running job(s)")
    for job_id in result["requeued"]:
        print(f"  {job_id[:12]}")
    return 0


# -- on the new host ---------------------------------------------------------


def add_enroll(sub: Any) -> None:
    p = sub.add_parser("enroll", help="join this host to a fleet with a one-time code; writes "
                       "its worker token into the worker config file")
    p.add_argument("--receiver", help="receiver URL (env: TRAINFLEET_RECEIVER)")
    p.add_argument("--code", help="the code from `trainfleet token create HOST --enroll` "
                   "(env: TRAINFLEET_ENROLL_CODE)")
    p.add_argument("--config", type=Path, help="the worker config file to write (env: "
                   "TRAINFLEET_WORKER_CONFIG; default: /etc/trainfleet/worker.toml as root, "
                   "else ~/.config/trainfleet/worker.toml; "
                   r"%%PROGRAMDATA%%\trainfleet\worker.toml on Windows)")
    p.add_argument("--hostname", help="the name this host's worker claims as (default: the "
                   "system hostname)")
    p.add_argument("--workdir", type=Path, help="store the project checkout in the config")
    p.add_argument("--state-dir", type=Path, help="store the worker's state dir in the config")
    p.add_argument("--allow-jobs", type=_csv, metavar="a,b", help="store an allow list")
    p.add_argument("--deny-jobs", type=_csv, metavar="c", help="store a deny list")
    console.add_tls_client_arguments(p)
    p.set_defaults(handler=run_enroll)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def run_enroll(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    path = Path(args.config or environ.get(config.ENV_VAR) or config.default_path(environ))
    current = config.load(path) if path.is_file() else config.WorkerConfig()
    url = args.receiver or environ.get("TRAINFLEET_RECEIVER") or current.receiver
    code = args.code or environ.get("TRAINFLEET_ENROLL_CODE")
    if not url or not code:
        raise TrainfleetError("enroll needs --receiver URL and --code CODE (the code comes from "
                              "`trainfleet token create HOST --enroll` on the operator's side)")
    hostname = args.hostname or socket.gethostname()
    _check_writable(path)  # before the code is spent: a token that cannot be kept is lost
    tls = {"ca_file": args.ca, "client_cert": args.client_cert, "client_key": args.client_key}
    client = Client(url, retries=2, backoff_s=0.5, ssl_context=console.tls_context_from(
        args, environ))
    answer = client.enroll(code, hostname)
    updated = current.updated(
        receiver=url, token=answer["token"], workdir=_absolute(args.workdir),
        state_dir=_absolute(args.state_dir), allow_jobs=args.allow_jobs,
        deny_jobs=args.deny_jobs, **{k: _absolute(v) for k, v in tls.items()},
    )
    config.save(path, updated)
    print(f"enrolled host {answer['hostname']} with {url} (token id {answer['token_id']})")
    print(f"wrote {path} (owner-only); start the worker with: trainfleet worker"
          + ("" if args.config is None else f" --config {path}"))
    return 0


def _check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainfleetError(f"--config {path}: cannot create its directory: {exc}") from exc
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TrainfleetError(f"--config {path}: not writable by this user (run as root for "
                              "/etc/trainfleet, or pass --config PATH)")


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser().resolve()
