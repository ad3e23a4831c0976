"""The one family of trainfleet errors; each class knows its HTTP status.

TrainfleetError
 +-- ManifestError            (422) the manifest is invalid; message names file, job and field
 +-- BadRequest               (400) a request field is wrong
 |    +-- DigestMismatch      (400) uploaded bytes do not hash to the artifact id
 +-- Unauthorized             (401) a token is missing or wrong
 +-- Forbidden                (403) operator calls on a receiver without an operator token
 |    +-- EnrollmentRefused  an enrollment code is unknown, used, expired or for another host
 |    +-- WrongHost          a per-host worker token used for another host's claim or job
 +-- NotFound                 (404)
 |    +-- JobNotFound
 |    +-- ArtifactNotFound
 +-- Conflict                 (409)
 |    +-- LeaseLost           the lease is not the job's current one: stop that job
 |    +-- AmbiguousJobId      a prefix matches several jobs
 |    +-- IllegalTransition   e.g. requeue of a completed job
 +-- RequestTimeout           (408) an upload went silent
 +-- PayloadTooLarge          (413)
 +-- ServiceBusy              (503) too many uploads at once; retry after a pause
 +-- DatabaseUnavailable      (503) the queue's database server cannot be reached; retry
 +-- InsufficientStorage      (507) the store's disk is full (or a file size limit was hit)
 +-- ReceiverUnreachable      (client side) connection failed after retries
 +-- ReceiverError            (client side) the receiver answered with an error status

Stdlib only: workers, the client and the CLI import it.
"""

from __future__ import annotations

from typing import Any


class TrainfleetError(Exception):
    """Base class; `status` is the HTTP status the receiver answers with."""

    status = 500
    headers: dict[str, str] = {}  #: extra response headers, e.g. Retry-After

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "detail": self.detail}


class ManifestError(TrainfleetError):
    status = 422

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {p}" for p in problems]
        super().__init__("\n".join(lines), detail=lines)


class BadRequest(TrainfleetError):
    status = 400


class DigestMismatch(BadRequest):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"sha256: uploaded bytes hash to {actual}, not {expected}",
            detail={"expected": expected, "actual": actual},
        )


class Unauthorized(TrainfleetError):
    status = 401

    def __init__(self, header: str, reason: str = "missing or wrong token") -> None:
        super().__init__(f"{header}: {reason}", detail={"header": header})


class Forbidden(TrainfleetError):
    status = 403


class EnrollmentRefused(Forbidden):
    """`reason` (unknown, used, expired, revoked, hostname) says which rule refused the code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"enrollment refused: {message}", detail={"reason": reason})
        self.reason = reason


class WrongHost(Forbidden):
    def __init__(self, token_host: str, other_host: str, what: str = "touch job of host") -> None:
        super().__init__(
            f"worker for host {token_host!r} cannot {what} {other_host!r}",
            detail={"token_host": token_host, "host": other_host},
        )


class NotFound(TrainfleetError):
    status = 404


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found", detail={"job_id": job_id})


class ArtifactNotFound(NotFound):
    def __init__(self, artifact_id: str) -> None:
        super().__init__(
            f"artifact {artifact_id!r} not in the store", detail={"artifact_id": artifact_id}
        )


class Conflict(TrainfleetError):
    status = 409


class LeaseLost(Conflict):
    def __init__(self, job_id: str, reason: str = "lease is not the job's current one") -> None:
        super().__init__(f"job {job_id}: {reason}", detail={"job_id": job_id})


class AmbiguousJobId(Conflict):
    def __init__(self, prefix: str, candidates: list[str]) -> None:
        super().__init__(
            f"job id prefix {prefix!r} matches {len(candidates)} jobs",
            detail={"candidates": candidates},
        )


class IllegalTransition(Conflict):
    def __init__(self, job_id: str, status: str, action: str) -> None:
        super().__init__(
            f"job {job_id} is {status}: cannot {action}",
            detail={"job_id": job_id, "status": status},
        )


class PayloadTooLarge(TrainfleetError):
    status = 413

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            f"body: larger than the limit of {limit_bytes} bytes",
            detail={"max_bytes": limit_bytes},
        )


class DatabaseUnavailable(TrainfleetError):
    status = 503


class InsufficientStorage(TrainfleetError):
    """The store could not write an upload for lack of space; nothing was kept, retry later."""

    status = 507

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(
            f"{what}: insufficient storage ({reason}); nothing was kept, retry once space "
            "is freed", detail={"reason": reason},
        )


class RequestTimeout(TrainfleetError):
    """The client stopped sending the body it announced (a slow or stuck upload)."""

    status = 408


class ServiceBusy(TrainfleetError):
    """Too much of something at once (uploads); the client should retry after a pause."""

    status = 503
    headers = {"Retry-After": "5"}


class ReceiverUnreachable(TrainfleetError):
    status = 503


class ReceiverError(TrainfleetError):
    """An error answer from the receiver, carrying its status and message."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message, detail)
        self.status = status
