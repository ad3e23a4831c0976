"""The operator's terminal: status, list, show, why, workers, logs, models, pull, cancel...

Standard library only. Every command takes --json; errors end as `error: ...`, exit 1.
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trainfleet import bundle
from trainfleet.client import Client, tls_context
from trainfleet.errors import ReceiverError, TrainfleetError

DEFAULT_RECEIVER = "http://127.0.0.1:8470"
SHA256_CHARS = frozenset("0123456789abcdef")
Handler = Callable[[argparse.Namespace, Client], int]


def add_commands(sub: Any, read_token: Callable[..., str | None]) -> None:
    """Register the operator commands on the `trainfleet` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--receiver", help=f"receiver URL (env: TRAINFLEET_RECEIVER; "
                        f"default: {DEFAULT_RECEIVER})")
    common.add_argument("--operator-token-file", type=Path,
                        help="operator token (env: TRAINFLEET_OPERATOR_TOKEN)")
    common.add_argument("--read-token-file", type=Path,
                        help="read token, for receivers that guard reads (env: "
                        "TRAINFLEET_READ_TOKEN)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    add_tls_client_arguments(common)

    def command(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=help)
        p.set_defaults(handler=_run(handler, read_token))
        return p

    command("status", status, "counts, live workers and recent failures")
    p = command("list", list_jobs, "one line per job")
    p.add_argument("--status")
    p.add_argument("--model")
    p.add_argument("--host")
    command("show", show, "everything about one job").add_argument("job")
    command("why", why, "why a job is not running: each live worker's blocking rules"
            ).add_argument("job")
    command("workers", workers, "workers with capability, last seen, current job, quarantine"
            ).add_argument("--release", metavar="HOST",
                           help="lift the host's quarantine (operator)")
    p = command("logs", logs, "a job's trainer log")
    p.add_argument("job")
    p.add_argument("--attempt", type=int)
    p.add_argument("--follow", "-f", action="store_true", help="stream while the job runs")
    p = command("models", models, "stored artifacts")
    p.add_argument("--model")
    p.add_argument("--kind", choices=["model", "checkpoint"], default="model",
                   help="which artifacts to list (default: model)")
    p = command("pull", pull, "download a job's (or an artifact's) bundle, verified")
    p.add_argument("ref", metavar="JOB|ARTIFACT")
    p.add_argument("-o", "--output", type=Path, default=Path("."), metavar="DIR")
    p.add_argument("--extract", action="store_true", help="unpack it safely into DIR")
    command("cancel", cancel, "cancel jobs (operator)").add_argument("jobs", nargs="+")
    command("requeue", requeue, "requeue failed or cancelled jobs (operator)"
            ).add_argument("jobs", nargs="+")
    command("reload", reload, "re-read the manifest (operator)")


def add_tls_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", type=Path, metavar="PEM",
                   help="trust this CA for an https:// receiver (env: TRAINFLEET_CA)")
    p.add_argument("--client-cert", type=Path, metavar="PEM",
                   help="client certificate for mutual TLS (env: TRAINFLEET_CLIENT_CERT)")
    p.add_argument("--client-key", type=Path, metavar="PEM",
                   help="its private key (env: TRAINFLEET_CLIENT_KEY)")


def tls_context_from(args: argparse.Namespace, environ: Mapping[str, str]) -> ssl.SSLContext | None:
    """The client's TLS context from --ca/--client-cert/--client-key or their env vars."""
    def path(flag: Path | None, variable: str) -> Path | None:
        return flag or (Path(environ[variable]) if environ.get(variable) else None)

    return tls_context(path(args.ca, "TRAINFLEET_CA"), path(args.client_cert,
                       "TRAINFLEET_CLIENT_CERT"), path(args.client_key, "TRAINFLEET_CLIENT_KEY"))


def _run(handler: Handler, read_token: Callable[..., str | None]) -> Any:
    def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
        url = args.receiver or environ.get("TRAINFLEET_RECEIVER") or DEFAULT_RECEIVER
        token = read_token(args.operator_token_file, environ, "TRAINFLEET_OPERATOR_TOKEN")
        reads = read_token(args.read_token_file, environ, "TRAINFLEET_READ_TOKEN")
        client = Client(url, operator_token=token, read_token=reads, retries=1, backoff_s=0.2,
                        ssl_context=tls_context_from(args, environ))
        return handler(args, client)

    return run


def _print_json(data: Any) -> int:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


def span(seconds: float) -> str:
    """A short human duration: 5s, 3m, 2h, 4d."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def ago(at: float | None) -> str:
    return "-" if at is None else span(time.time() - at)


def _progress(job: Mapping[str, Any]) -> str:
    progress = job.get("progress") or {}
    fraction = progress.get("fraction")
    text = f"{100 * fraction:.0f}%" if isinstance(fraction, int | float) else ""
    message = progress.get("message")
    return f"{text} {message}".strip() if message else text


def _checkpoint(job: Mapping[str, Any]) -> str:
    """The job's last checkpoint and its age: what a retry resumes from."""
    if not job.get("checkpoint_id"):
        off = " (checkpoint uploads off)" if job.get("checkpoint_interval_s") == 0 else ""
        return "-" + off
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["checkpoint_at"]))
    return f"{job['checkpoint_id']} (at {at}, {ago(job['checkpoint_at'])} ago)"


def _first_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


# -- reads -------------------------------------------------------------------


def status(args: argparse.Namespace, client: Client) -> int:
    health, jobs, fleet = client.health(), client.jobs(), client.workers()
    failures = sorted((j for j in jobs if j["status"] == "failed"),
                      key=lambda j: j["updated_at"], reverse=True)[:5]
    if args.json:
        return _print_json({"health": health, "workers": fleet, "failures": failures})
    counts = health["counts"]
    print(f"receiver {client.base_url}  manifest {health['manifest']}  "
          f"up {span(health['uptime_s'])}")
    print("jobs: " + "  ".join(f"{k} {v}" for k, v in counts.items() if v) or "no jobs")
    by_id = {j["job_id"]: j for j in jobs}
    live = [w for w in fleet if w["alive"]]
    print(f"\nworkers alive: {len(live)} of {len(fleet)}")
    for w in live:
        held = [by_id[j] for j in w["jobs"] if j in by_id]
        doing = ", ".join(f"{j['name']} {_progress(j)}".strip() for j in held) or "idle"
        print(f"  {w['hostname']:<16} {w['worker_id']:<24} {doing}")
    if failures:
        print("\nrecent failures:")
    for job in failures:
        print(f"  {job['job_id'][:12]}  {job['name']}: {_first_line(job['error'])}")
    return 0


def list_jobs(args: argparse.Namespace, client: Client) -> int:
    jobs = client.jobs(args.status, args.model, args.host)
    if args.json:
        return _print_json(jobs)
    if not jobs:
        print("no jobs match")
        return 0
    rows = [["ID", "NAME", "MODEL", "MODE", "STATUS", "TRIES", "HOST", "AGE", "PROGRESS"]]
    for j in jobs:
        status_text = j["status"] + (" (orphaned)" if j["orphaned"] else "")
        rows.append([j["job_id"][:12], j["name"], j["model"], j["mode"], status_text,
                     str(j["attempts"]), j["hostname"] or "-", ago(j["updated_at"]),
                     _progress(j) if j["status"] in ("claimed", "running") else ""])
    _table(rows)
    return 0


def show(args: argparse.Namespace, client: Client) -> int:
    job = client.job(args.job)
    if args.json:
        return _print_json(job)
    fields = ["job_id", "name", "model", "mode", "hyper", "split_recipe", "train_hosts", "seed",
              "status", "attempts", "max_attempts", "priority", "require_cuda", "prefer_cuda",
              "min_vram_gib", "min_ram_gib", "allowed_hosts", "hostname", "worker_id"]
    for name in fields:
        value = job[name]
        print(f"{name + ':':<15} {json.dumps(value) if isinstance(value, dict | list) else value}")
    for need in ("vram", "ram"):
        declared, effective = job[f"min_{need}_gib"], job.get(f"effective_{need}_gib")
        if effective is not None and effective > declared:
            print(f"{'needs ' + need + ':':<15} {effective:g} GiB effective (declared {declared:g};"
                  " raised after running out of memory)")
    if job.get("avoid_hosts"):
        print(f"{'avoiding:':<15} {', '.join(job['avoid_hosts'])} (failed there)")
    print(f"{'progress:':<15} {_progress(job) or '-'}")
    print(f"{'metrics:':<15} {json.dumps(job['metrics']) if job['metrics'] else '-'}")
    print(f"{'artifact:':<15} {job['artifact_id'] or '-'}")
    if job["artifact_path"]:
        print(f"{'path:':<15} {job['artifact_path']}")
    print(f"{'checkpoint:':<15} {_checkpoint(job)}")
    if job["error"]:
        print(f"{'error:':<15} {_first_line(job['error'])}")
    print("\nattempts:")
    for a in job["attempts_detail"]:
        end = time.strftime("%H:%M:%S", time.localtime(a["ended_at"])) if a["ended_at"] else "-"
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["started_at"]))
        cause = f" [{a['cause']}]" if a.get("cause") else ""
        if a.get("peak_vram_gib") is not None:  # declared vs what it used
            cause += f" peak {a['peak_vram_gib']:g} GiB VRAM (declared {job['min_vram_gib']:g})"
        print(f"  #{a['attempt']}  {a['hostname']} ({a['worker_id']})  {start} -> {end}  "
              f"{a['outcome'] or 'live'}{cause}  {_first_line(a['error'])}")
    print("\nhistory:")
    for e in job["history"]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        detail = " ".join(f"{k}={_first_line(str(v))}" for k, v in e["detail"].items())
        print(f"  {at}  {e['kind']:<10} {e['worker_id'] or ''} {detail}".rstrip())
    return 0


def why(args: argparse.Namespace, client: Client) -> int:
    answer = client.why(args.job)
    if args.json:
        return _print_json(answer)
    state = answer["status"]
    title = f"{answer['name']} ({answer['job_id'][:12]}) is {state}"
    if state not in ("pending", "unschedulable"):
        print(title)
        return 0
    print(f"{title}, waiting for {span(answer['waited_s'])}")
    if state == "unschedulable":
        print(f"  {answer.get('reason') or 'no worker seen in the fleet can run it'}; it is "
              "pending again as soon as a worker that can registers")
    if not answer["workers"]:
        print("  no worker is alive: start one with `trainfleet worker --receiver URL`")
    free = [w for w in answer["workers"] if not w["reasons"]]
    for w in answer["workers"]:
        verdict = "can take it" if not w["reasons"] else "cannot take it:"
        print(f"  {w['hostname']} ({w['worker_id']}) {verdict}")
        for reason in w["reasons"]:
            print(f"    - {reason}")
    expires = answer["preference_expires_at"]
    if expires is not None and expires > time.time():
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
        print(f"  the prefer_cuda grace ends at {when} (in {span(expires - time.time())}); "
              "then CPU hosts may take it")
    if free:
        print("  an eligible worker exists: the job will be claimed at its next poll, "
              "unless jobs of higher priority come first")
    return 0


def workers(args: argparse.Namespace, client: Client) -> int:
    if args.release:
        _operator(client, "release a host")
        released = client.release_host(args.release)
        if args.json:
            return _print_json(released)
        print(f"released {released['hostname']} from quarantine ({released['reason']})")
        return 0
    fleet = client.workers()
    if args.json:
        return _print_json(fleet)
    rows = [["HOST", "SLOT", "WORKER", "CORES", "RAM", "GPUS", "SEEN", "ALIVE", "RUNS"]]
    for w in fleet:  # one row per slot, a host's slots together
        cap = w["capability"]
        gpus = ", ".join(f"{g['name']} {g['vram_gib']:g}G" for g in cap.get("gpus", [])) or "-"
        names = w.get("job_names") or [j[:12] for j in w["jobs"]]
        if w.get("lent_to"):  # its GPU runs a sibling slot's job
            names = [*names, f"lent to {w['lent_to']}"]
        alive = "yes" if w["alive"] else "no"
        if w.get("quarantined_until"):
            alive += " (quarantined)"
        rows.append([w["hostname"], slot_name(w["worker_id"]), w["worker_id"],
                     str(cap.get("cpu_count", "?")), f"{cap.get('ram_gib', 0):g}G", gpus,
                     ago(w["last_seen"]), alive, ", ".join(names) or "-"])
    _table(rows)
    quarantined = {w["hostname"]: w for w in fleet if w.get("quarantined_until")}
    for host, w in sorted(quarantined.items()):
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w["quarantined_until"]))
        print(f"quarantined: {host} until {until}: {w['quarantine_reason']} "
              f"(lift with `trainfleet workers --release {host}`)")
    return 0


def slot_name(worker_id: str) -> str:
    """The slot a worker id names ("gpu0", "cpu1": what `--slots` appends), or "-"."""
    suffix = worker_id.rsplit("-", 1)[-1]
    return suffix if re.fullmatch(r"(gpu|cpu)\d+", suffix) else "-"


def logs(args: argparse.Namespace, client: Client) -> int:
    text = client.get_log(args.job, args.attempt)
    sys.stdout.write(text)
    if not args.follow:
        return 0
    shown = text
    while client.job(args.job)["status"] in ("claimed", "running"):
        time.sleep(2.0)
        text = client.get_log(args.job, args.attempt)
        sys.stdout.write(_new_part(shown, text))
        sys.stdout.flush()
        shown = text
    sys.stdout.write(_new_part(shown, client.get_log(args.job, args.attempt)))
    return 0


def _new_part(shown: str, text: str) -> str:
    """What `text` adds to `shown`; a tail window slides, so find the overlap."""
    if text.startswith(shown):
        return text[len(shown):]
    for cut in range(len(shown)):
        if text.startswith(shown[cut:]):
            return text[len(shown) - cut:]
    return text


def models(args: argparse.Namespace, client: Client) -> int:
    rows_in = client.models(args.model, args.kind)
    if args.json:
        return _print_json(rows_in)
    rows = [["ARTIFACT", "MODEL", "MODE", "SIZE", "JOB", "HOST", "PATH"]]
    for r in rows_in:
        rows.append([r["artifact_id"][:12], str(r.get("model")), str(r.get("mode")),
                     f"{r.get('size', 0) / 1e6:.1f}MB", (r.get("job_id") or "-")[:12],
                     str(r.get("host") or "-"), r["path"]])
    if len(rows) == 1:
        print("no artifacts stored" if args.kind == "model" else f"no {args.kind}s stored")
        return 0
    _table(rows)
    return 0


def pull(args: argparse.Namespace, client: Client) -> int:
    artifact_id = _artifact_of(client, args.ref)
    args.output.mkdir(parents=True, exist_ok=True)
    path = client.download(artifact_id, args.output / f"{artifact_id[:12]}.bundle")
    result: dict[str, Any] = {"artifact_id": artifact_id, "path": str(path)}
    if args.extract:
        target = args.output / artifact_id[:12]
        bundle.extract(path, target)
        result["extracted_to"] = str(target)
    if args.json:
        return _print_json(result)
    print(f"{path}  (sha256 verified)")
    if args.extract:
        print(f"extracted to {result['extracted_to']}")
    return 0


def _artifact_of(client: Client, ref: str) -> str:
    if len(ref) == 64 and set(ref) <= SHA256_CHARS and client.has_artifact(ref):
        return ref
    job = client.job(ref)
    if not job["artifact_id"]:
        raise TrainfleetError(f"job {job['name']} is {job['status']}: it has no artifact yet")
    return str(job["artifact_id"])


# -- the operator's calls ----------------------------------------------------


def _operator(client: Client, what: str) -> None:
    if not client.operator_token:
        raise TrainfleetError(f"{what} needs the operator token: set TRAINFLEET_OPERATOR_TOKEN "
                              "or pass --operator-token-file")


def cancel(args: argparse.Namespace, client: Client) -> int:
    _operator(client, "cancel")
    return _each(args, client.cancel, "cancelled")


def requeue(args: argparse.Namespace, client: Client) -> int:
    _operator(client, "requeue")
    return _each(args, client.requeue, "requeued")


def _each(args: argparse.Namespace, call: Callable[[str], dict[str, Any]], verb: str) -> int:
    done, failed = [], 0
    for ref in args.jobs:
        try:
            job = call(ref)
        except ReceiverError as exc:
            print(f"error: {ref}: {exc.message}", file=sys.stderr)
            failed += 1
            if exc.status in (401, 403):
                return 1
            continue
        done.append(job)
        if not args.json:
            print(f"{verb} {job['job_id'][:12]} {job['name']} (now {job['status']})")
    if args.json:
        _print_json(done)
    return 1 if failed else 0


def reload(args: argparse.Namespace, client: Client) -> int:
    _operator(client, "reload")
    result = client.reload_manifest()
    if args.json:
        return _print_json(result)
    print(", ".join(f"{k} {v}" for k, v in result.items()))
    return 0
