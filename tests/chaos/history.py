"""Operation histories: every client call is an `invoke` followed by `ok`, `fail` or `unknown`.

An event is a plain dict, so worker subprocesses can append theirs to a JSONL file (one
write per line: a SIGKILL loses no line already written) and the checker merges the files of
every process. Times are CLOCK_MONOTONIC nanoseconds, which all processes of a machine share.

- ok: the receiver accepted the call (2xx).
- fail: it refused it (4xx), which by contract changed nothing.
- unknown: no answer (connection lost, 5xx after retries, the process died): it may or may
  not have taken effect, at any time after its invoke.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from trainfleet.client import Client
from trainfleet.errors import LeaseLost, ReceiverError, ReceiverUnreachable

T = TypeVar("T")

INVOKE, OK, FAIL, UNKNOWN = "invoke", "ok", "fail", "unknown"
OP_FIELDS = ("job_id", "lease", "attempt", "artifact_id")


@dataclass(frozen=True)
class Op:
    """One call, its invoke and its completion paired."""

    process: str
    f: str  #: claim, heartbeat, upload, complete, fail, cancel, requeue
    outcome: str  #: ok, fail or unknown
    invoked_ns: int
    done_ns: int | None  #: None when unknown: it may take effect any time after its invoke
    job_id: str | None = None
    lease: str | None = None
    attempt: int | None = None
    artifact_id: str | None = None
    value: Any = None  #: what the call answered: an action, a status, an error message

    @property
    def ok(self) -> bool:
        return self.outcome == OK


class History:
    """A thread-safe recorder of operations; with `path`, each event is also appended there."""

    def __init__(self, path: Path | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._fd = None if path is None else os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def invoke(self, process: str, f: str, **fields: Any) -> Call:
        call = Call(self, process, f, next(self._ids))
        self._add({"type": INVOKE, "process": process, "id": call.id, "f": f, **fields})
        return call

    def ops(self) -> list[Op]:
        with self._lock:
            return pair(list(self.events))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _add(self, event: dict[str, Any]) -> None:
        event["t"] = time.monotonic_ns()
        with self._lock:
            self.events.append(event)
            if self._fd is not None:
                os.write(self._fd, (json.dumps(event) + "\n").encode())


class Call:
    """An invoked operation awaiting its completion."""

    def __init__(self, history: History, process: str, f: str, id_: int) -> None:
        self.history = history
        self.process = process
        self.f = f
        self.id = id_

    def ok(self, **fields: Any) -> None:
        self._done(OK, fields)

    def fail(self, error: str, **fields: Any) -> None:
        self._done(FAIL, {"value": error, **fields})

    def unknown(self, error: str, **fields: Any) -> None:
        self._done(UNKNOWN, {"value": error, **fields})

    def _done(self, outcome: str, fields: dict[str, Any]) -> None:
        self.history._add({"type": outcome, "process": self.process, "id": self.id, "f": self.f,
                           **fields})


def load(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The events of several JSONL history files; a torn last line (a kill mid-write) is cut."""
    events = []
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def pair(events: Iterable[dict[str, Any]]) -> list[Op]:
    """Pair each invoke with its completion; one without a completion is unknown."""
    invokes: dict[tuple[str, int], dict[str, Any]] = {}
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for event in events:
        key = (event["process"], event["id"])
        (invokes if event["type"] == INVOKE else done)[key] = event
    ops = []
    for key, inv in invokes.items():
        end = done.get(key, {"type": UNKNOWN, "value": "no completion (the process died?)"})
        fields = {name: end.get(name, inv.get(name)) for name in OP_FIELDS}
        ops.append(Op(
            process=inv["process"], f=inv["f"], outcome=end["type"], invoked_ns=inv["t"],
            done_ns=end["t"] if end["type"] != UNKNOWN else None, value=end.get("value"),
            **fields,
        ))
    return sorted(ops, key=lambda op: op.invoked_ns)


class RecordingClient:
    """trainfleet's Client, with each worker or operator call recorded in a History."""

    def __init__(self, client: Client, history: History, process: str) -> None:
        self.client = client
        self.history = history
        self.process = process

    def claim(self, worker_id: str, capability: dict[str, Any]) -> dict[str, Any] | None:
        answer = self._record("claim", {}, lambda: self.client.claim(worker_id, capability))
        return answer

    def heartbeat(self, job_id: str, lease: str, attempt: int) -> str:
        return self._record("heartbeat", {"job_id": job_id, "lease": lease, "attempt": attempt},
                            lambda: self.client.heartbeat(job_id, lease))

    def upload(self, job_id: str, lease: str, attempt: int, artifact_id: str,
               path: Path) -> dict[str, Any]:
        fields = {"job_id": job_id, "lease": lease, "attempt": attempt, "artifact_id": artifact_id}
        return self._record("upload", fields,
                            lambda: self.client.upload(artifact_id, path, job_id, lease))

    def complete(self, job_id: str, lease: str, attempt: int, artifact_id: str) -> dict[str, Any]:
        fields = {"job_id": job_id, "lease": lease, "attempt": attempt, "artifact_id": artifact_id}
        return self._record("complete", fields, lambda: self.client.complete(
            job_id, lease, artifact_id, {"by": self.process}))

    def fail(self, job_id: str, lease: str, attempt: int, kind: str,
             retryable: bool = True) -> dict[str, Any]:
        fields = {"job_id": job_id, "lease": lease, "attempt": attempt}
        return self._record("fail", fields, lambda: self.client.fail(
            job_id, lease, f"{kind} by {self.process}", retryable, kind))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._record("cancel", {"job_id": job_id}, lambda: self.client.cancel(job_id))

    def _record(self, f: str, fields: dict[str, Any], call: Callable[[], T]) -> T:
        pending = self.history.invoke(self.process, f, **fields)
        try:
            answer = call()
        except (LeaseLost, ReceiverError) as exc:
            pending.fail(f"{exc.status}: {exc.message}")
            raise
        except ReceiverUnreachable as exc:
            pending.unknown(exc.message)
            raise
        except BaseException as exc:
            pending.unknown(repr(exc))
            raise
        pending.ok(**_answer_fields(f, answer))
        return answer


def _answer_fields(f: str, answer: Any) -> dict[str, Any]:
    """What an ok answer adds to the op: a claim's job, lease and attempt; others' status."""
    if f == "claim":
        if answer is None:
            return {"value": None}
        return {"job_id": answer["job"]["job_id"], "lease": answer["lease"],
                "attempt": answer["attempt"], "value": "claimed"}
    if isinstance(answer, dict):
        return {"value": answer.get("status") or answer.get("new")}
    return {"value": answer}
