"""The one family of trainfleet errors; each class knows its HTTP status.

TrainfleetError
 +-- ManifestError            (422) the manifest is invalid; message names file, job and field
 +-- BadRequest               (400) a request field is wrong
 |    +-- DigestMismatch      (400) uploaded bytes do not hash to the artifact id
 +-- Unauthorized             (401) a token is missing or wrong
 +-- Forbidden                (403) operator calls on a receiver without an operator token
 +-- NotFound                 (404)
 |    +-- JobNotFound
 |    +-- ArtifactNotFound
 +-- Conflict                 (409)
 |    +-- LeaseLost           the lease is not the job's current one: stop that job
 |    +-- AmbiguousJobId      a prefix matches several jobs
 |    +-- IllegalTransition   e.g. requeue of a completed job
 +-- PayloadTooLarge          (413)
 +-- ReceiverUnreachable      (client side) connection failed after retries
 +-- ReceiverError            (client side) the receiver answered with an error status

Stdlib only: workers, the client and the CLI import it.
"""

from __future__ import annotations

from typing import Any


class TrainfleetError(Exception):
    """Base class; `status` is the HTTP status the receiver answers with."""

    status = 500

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

    def __init__(self, header: str) -> None:
        super().__init__(f"{header}: missing or wrong token", detail={"header": header})


class Forbidden(TrainfleetError):
    status = 403


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


class ReceiverUnreachable(TrainfleetError):
    status = 503


class ReceiverError(TrainfleetError):
    """An error answer from the receiver, carrying its status and message."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message, detail)
        self.status = status
