"""What a failed attempt teaches the queue about the job's next one. Pure functions.

Every backend calls `after_failure` inside its fail transaction, so both decide alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainfleet.failures import Cause

HEADROOM = 1.25  #: a raised requirement is this much above what ran out
QUARANTINE_AFTER = 3  #: a host's last this many attempts failed alike: quarantine it
QUARANTINE_FIRST_S = 600.0  #: the first cool-off; each later one doubles


@dataclass(frozen=True)
class Failure:
    """One failed attempt, as the worker diagnosed it and the queue knows its slot."""

    cause: Cause | None  #: None when an older worker sent no diagnosis
    signature: str | None
    hostname: str
    slot_vram_gib: float  #: the VRAM of the slot it failed on
    host_ram_gib: float
    peak_vram_gib: float | None = None  #: the trainer's peak, when the worker sampled it


@dataclass(frozen=True)
class Verdict:
    raised_vram_gib: float
    raised_ram_gib: float
    avoid_hosts: tuple[str, ...]
    code_bug: str | None  #: the error that fails the job at once, or None


def after_failure(
    failure: Failure,
    raised_vram_gib: float,
    raised_ram_gib: float,
    avoid_hosts: tuple[str, ...],
    same_signature_hosts: tuple[str, ...],
) -> Verdict:
    """The job's raised requirements, avoided hosts and whether it is a code bug now.

    `same_signature_hosts` are the other hosts where an attempt since the last requeue
    ended as an ordinary trainer error with this failure's signature.
    """
    vram, ram = raised_vram_gib, raised_ram_gib
    if failure.cause is Cause.CUDA_OOM:
        used = failure.peak_vram_gib if failure.peak_vram_gib else failure.slot_vram_gib
        vram = max(vram, round(HEADROOM * used, 2))
    elif failure.cause in (Cause.RAM_OOM, Cause.KILLED):
        # The trainer outgrew what this host could give it: its next host needs more RAM.
        ram = max(ram, round(HEADROOM * failure.host_ram_gib, 2))
    avoid = avoid_hosts if failure.hostname in avoid_hosts else (*avoid_hosts, failure.hostname)
    return Verdict(vram, ram, avoid, _code_bug(failure, same_signature_hosts))


def _code_bug(failure: Failure, others: tuple[str, ...]) -> str | None:
    """The same ordinary error on two hosts is in the code or data, not in a host."""
    if failure.cause is not Cause.TRAINER_ERROR or not failure.signature:
        return None
    other = next((h for h in others if h != failure.hostname), None)
    if other is None:
        return None
    return f"same error on hosts {other} and {failure.hostname}: {failure.signature}"


@dataclass(frozen=True)
class HostAttempt:
    """One of a host's latest ended attempts."""

    job_id: str
    cause: str | None  #: None for a completed or lost attempt: it breaks the streak
    signature: str | None


#: Causes that say the job was too big for its slot, not that the host is faulty: the retry
#: already raises the job's need, and a GPU shared with someone's notebook is handled by
#: free-VRAM placement. Quarantining for these took good GPUs away in the simulated lab.
JOB_SIZED = frozenset({Cause.CUDA_OOM.value, Cause.RAM_OOM.value})


def quarantine_reason(
    recent: list[HostAttempt], bug_elsewhere: bool, k: int = QUARANTINE_AFTER
) -> str | None:
    """Why the host should be quarantined, when its last `k` attempts failed on `k`
    different jobs with the same cause; None otherwise.

    `bug_elsewhere`: one of their error signatures also failed on another host, so the
    trouble is in the code, not in this host.
    """
    causes = {a.cause for a in recent[:k]}
    if len(recent) < k or len(causes) != 1 or None in causes or bug_elsewhere:
        return None
    if causes & JOB_SIZED:
        return None
    if len({a.job_id for a in recent[:k]}) < k:
        return None
    return f"its last {k} attempts failed on {k} different jobs with {recent[0].cause}"


def cool_off_s(quarantines_before: int) -> float:
    """How long a host stays quarantined: QUARANTINE_FIRST_S, doubling each time."""
    return QUARANTINE_FIRST_S * 2.0 ** min(quarantines_before, 20)
