"""Eligibility and ordering of jobs for worker slots, as pure functions.

The single source of truth for "may this slot run this job, and if not, why":
each queue backend's claim query must agree with `explain`. Standard library only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from trainfleet.capability import Capability
from trainfleet.manifest import HostSpec


class Needs(Protocol):
    """The job fields the hard constraints read."""

    @property
    def model(self) -> str: ...
    @property
    def require_cuda(self) -> bool: ...
    @property
    def min_vram_gib(self) -> float: ...
    @property
    def min_ram_gib(self) -> float: ...
    @property
    def effective_vram_gib(self) -> float: ...
    @property
    def effective_ram_gib(self) -> float: ...
    @property
    def allowed_hosts(self) -> tuple[str, ...]: ...
    @property
    def gpus(self) -> int: ...


class JobLike(Needs, Protocol):
    """The job fields matching reads; JobSpec and the queue's Job both have them."""

    @property
    def priority(self) -> int: ...
    @property
    def prefer_cuda(self) -> bool: ...
    @property
    def prefer_wait_s(self) -> float: ...
    @property
    def manifest_index(self) -> int: ...
    @property
    def avoid_hosts(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Policy:
    """Which models a slot may run: an allow list (None = any) minus a deny list."""

    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()

    def allows(self, model: str) -> bool:
        return (self.allow is None or model in self.allow) and model not in self.deny


def merge_policy(
    host: HostSpec | None,
    allow_jobs: Iterable[str] | None = None,
    deny_jobs: Iterable[str] = (),
) -> Policy:
    """The manifest's host policy narrowed by the worker's own allow/deny lists."""
    allow: frozenset[str] | None = None
    if host is not None and host.allow_jobs is not None:
        allow = frozenset(host.allow_jobs)
    if allow_jobs is not None:
        own = frozenset(allow_jobs)
        allow = own if allow is None else allow & own
    deny = frozenset(deny_jobs) | frozenset(host.deny_jobs if host else ())
    return Policy(allow, deny)


@dataclass(frozen=True)
class Slot:
    """One place a job can run: a host's capability, the slot's own VRAM and its policy.

    `gpus_free` is how many GPUs of its host the slot can hand one job, each with `vram_gib`:
    in the registry, the host's GPU count (None means one for a CUDA slot, none for a CPU
    one). At claim time `free_vram` (see `offered`) says instead what each GPU the slot can
    give now has free, best first, so a job on N GPUs is held to the N-th best."""

    capability: Capability
    vram_gib: float
    policy: Policy = Policy()
    quarantine: str | None = None  #: "host quarantined until T: reason" while it is
    gpus_free: int | None = None
    free_vram: tuple[float, ...] | None = None  #: per GPU offered, best first (a claim's)

    @property
    def cuda(self) -> bool:
        return self.capability.cuda

    @property
    def hostname(self) -> str:
        return self.capability.hostname

    @property
    def gpus(self) -> int:
        """The GPUs this slot can offer one job (gpus_free, or its default)."""
        if self.free_vram is not None:
            return len(self.free_vram)
        if self.gpus_free is not None:
            return self.gpus_free
        return 1 if self.cuda else 0

    @property
    def best_vram(self) -> float:
        """What a job on at most one GPU is held to: the best GPU offered, else `vram_gib`."""
        return self.free_vram[0] if self.free_vram else self.vram_gib

    def room(self, gpus: int) -> float:
        """The VRAM each of `gpus` GPUs this slot offers has at least (the gpus-th best);
        the best GPU's for gpus <= 1 or more than it offers (the count rule fails those)."""
        if self.free_vram and 2 <= gpus <= len(self.free_vram):
            return self.free_vram[gpus - 1]
        return self.best_vram


def offered(
    slot: Slot,
    free_vram_gib: float | None = None,
    free_vram_per_gpu: Sequence[float] | None = None,
) -> Slot:
    """The slot as a claim offers it. `free_vram_per_gpu`: each GPU it can give now, by its
    free memory. Without it (older workers) `gpus_free` GPUs each with `free_vram_gib`
    (capped at the slot's total), which is the same offer as that list."""
    if free_vram_per_gpu is not None:
        offer = tuple(sorted((float(v) for v in free_vram_per_gpu), reverse=True))
        return dataclasses.replace(slot, free_vram=offer, gpus_free=len(offer))
    if free_vram_gib is None:
        return slot
    return dataclasses.replace(slot, vram_gib=min(slot.vram_gib, free_vram_gib))


def hard_reasons(job: Needs, slot: Slot) -> list[str]:
    """Every constraint of the job this slot fails, ignoring the soft preferences.

    Memory is checked against the job's effective needs: the declared ones, raised after
    an out-of-memory failure.
    """
    reasons = [slot.quarantine] if slot.quarantine else []
    cap = slot.capability
    if not slot.policy.allows(job.model):
        if slot.policy.allow is not None and job.model not in slot.policy.allow:
            allowed = ", ".join(sorted(slot.policy.allow)) or "nothing"
            reasons.append(
                f"host policy: {cap.hostname} only allows {allowed}, not {job.model!r}"
            )
        else:
            reasons.append(f"host policy: {cap.hostname} denies {job.model!r}")
    if job.require_cuda and not cap.cuda:
        reasons.append(f"requires CUDA; {cap.hostname} has no CUDA GPU")
    if job.gpus > slot.gpus and cap.cuda:  # a CPU slot already failed the CUDA rule
        reasons.append(f"needs {job.gpus} GPUs on one host, this slot can offer {slot.gpus}")
    vram, ram = job.effective_vram_gib, job.effective_ram_gib
    room = slot.room(job.gpus)
    if vram > room and slot.free_vram and 2 <= job.gpus <= slot.gpus:
        able = sum(1 for free in slot.free_vram if free >= vram)
        reasons.append(f"needs {job.gpus} GPUs with {vram:g} GiB free each"
                       f"{_raised(vram, job.min_vram_gib)}; this slot can offer {able}")
    elif vram > room:
        reasons.append(f"needs {vram:g} GiB VRAM{_raised(vram, job.min_vram_gib)}; "
                       f"the slot has {room:g} GiB")
    if ram > cap.ram_gib:
        reasons.append(f"needs {ram:g} GiB RAM{_raised(ram, job.min_ram_gib)}; "
                       f"{cap.hostname} has {cap.ram_gib:g} GiB")
    if job.allowed_hosts and cap.hostname not in job.allowed_hosts:
        reasons.append(
            f"allowed_hosts is {', '.join(job.allowed_hosts)}; this is {cap.hostname}"
        )
    return reasons


def _raised(effective: float, declared: float) -> str:
    return f" (raised from {declared:g} after running out of memory)" if effective > declared \
        else ""


def preference_reason(
    job: JobLike, slot: Slot, live_slots: Sequence[Slot], waited_s: float
) -> str | None:
    """Why a prefer_cuda job should still wait for a CUDA slot instead of this CPU slot."""
    if not job.prefer_cuda or slot.cuda or waited_s >= job.prefer_wait_s:
        return None
    able = [s.hostname for s in live_slots if s.cuda and not hard_reasons(job, s)]
    if not able:
        return None
    left_s = job.prefer_wait_s - waited_s
    return (
        f"prefers CUDA and live CUDA host(s) {', '.join(sorted(set(able)))} can run it; "
        f"CPU hosts may take it in {left_s:.0f} s"
    )


def avoidance_reason(
    job: JobLike, slot: Slot, live_slots: Sequence[Slot], waited_s: float
) -> str | None:
    """Why a job that failed on this slot's host should go to another live host that can
    run it; like the CUDA preference, it lapses after prefer_wait_s."""
    if slot.hostname not in job.avoid_hosts or waited_s >= job.prefer_wait_s:
        return None
    able = {s.hostname for s in live_slots
            if s.hostname not in job.avoid_hosts and not hard_reasons(job, s)}
    if not able:
        return None
    return (f"avoiding host {slot.hostname} after a failure there: {', '.join(sorted(able))} "
            f"can run it")


def explain(
    job: JobLike, slot: Slot, live_slots: Sequence[Slot] = (), waited_s: float = 0.0
) -> list[str]:
    """Every reason this slot may not take the job now; empty means eligible.

    `live_slots` are the live workers' slots (the CUDA preference looks only at the CUDA
    ones); `waited_s` is how long the job has been pending.
    """
    reasons = hard_reasons(job, slot)
    for soft in (preference_reason, avoidance_reason):
        reason = soft(job, slot, live_slots, waited_s)
        if reason:
            reasons.append(reason)
    return reasons


def unschedulable_reason(job: Needs, seen: Sequence[Slot]) -> str | None:
    """Why no slot ever seen in the fleet could run the job (hard rules only), one host at
    a time; None when one could, or when none was ever seen."""
    by_host: dict[str, list[str]] = {}
    for slot in seen:
        reasons = hard_reasons(job, slot)
        if not reasons:
            return None
        by_host.setdefault(slot.hostname, reasons)
    if not by_host:
        return None
    hosts = "; ".join(f"{host}: {', '.join(reasons)}" for host, reasons in sorted(by_host.items()))
    return f"no worker seen in the fleet can run it ({hosts})"


class Named(JobLike, Protocol):
    @property
    def name(self) -> str: ...


def reservation_reason(job: JobLike, slot: Slot, pending: Sequence[Named]) -> str | None:
    """Why a registry slot's host holds the job back (held_for): a pending job that ranks
    above it needs more GPUs and the host could run it with all its GPUs free. While the
    host is partly busy its claims take nothing else; once it is idle that job goes first.
    `pending` may hold any jobs; those that cannot hold this one are skipped."""
    if not slot.cuda or slot.gpus < 2:
        return None
    mine = rank_key(job, True)
    wider = [w for w in pending if w.gpus > max(job.gpus, 1) and rank_key(w, True) < mine]
    for wide in sorted(wider, key=lambda j: rank_key(j, True)):
        if not hard_reasons(wide, slot):
            return (f"held back for {wide.name!r} (ranked higher, needs {wide.gpus} GPUs): "
                    f"{slot.hostname} drains until it fits")
    return None


def explain_fleet(
    job: JobLike, slots: Mapping[str, Slot], waited_s: float = 0.0,
    pending: Sequence[Named] = (),
) -> dict[str, list[str]]:
    """For each live worker (by id), every reason it may not take the job now; with the
    `pending` jobs, also the reservation rule's (reservation_reason)."""
    live = list(slots.values())
    reasons = {worker_id: explain(job, slot, live, waited_s)
               for worker_id, slot in slots.items()}
    mine = rank_key(job, True)
    wider = [w for w in pending if w.gpus > max(job.gpus, 1) and rank_key(w, True) < mine]
    for worker_id, slot in slots.items() if wider else ():
        held = reservation_reason(job, slot, wider)
        if held:
            reasons[worker_id].append(held)
    return reasons


def is_eligible(
    job: JobLike, slot: Slot, live_slots: Sequence[Slot] = (), waited_s: float = 0.0
) -> bool:
    return not explain(job, slot, live_slots, waited_s)


def rank_key(job: JobLike, cuda_slot: bool) -> tuple[int, int, int]:
    """Sort key, best first: priority, then prefer_cuda on CUDA slots, then manifest order."""
    prefer = int(job.prefer_cuda) if cuda_slot else 0
    return (-job.priority, -prefer, job.manifest_index)


def reserves(slot: Slot, host_gpus: int | None) -> bool:
    """Whether a claim by this slot checks the reservation rule (`held_for`): only when its
    offer is narrower than its host, so CPU slots and single-GPU hosts never pay for it."""
    return slot.cuda and host_gpus is not None and host_gpus > slot.gpus


def whole_host(slot: Slot, host_gpus: int) -> Slot:
    """The slot with every GPU of its host free, each with the slot's total VRAM."""
    return dataclasses.replace(slot, free_vram=None, gpus_free=host_gpus)


def held_for(best: JobLike | None, wide: JobLike | None, slot: Slot) -> bool:
    """The reservation rule: a claim whose offer is narrower than its host takes nothing when
    `wide`, the best job the host could run with all its GPUs free, ranks above `best`, the
    best job the offer fits, and needs more GPUs than offered. The host then drains until
    the wide job fits: strict rank order, no backfill."""
    if wide is None or wide.gpus <= slot.gpus:
        return False
    return best is None or rank_key(wide, slot.cuda) < rank_key(best, slot.cuda)
