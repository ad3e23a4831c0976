"""The SQL claim and matching.py agree: property tests over random jobs and workers."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import QueueFactory, make_manifest
from trainfleet import matching
from trainfleet.capability import Capability, Gpu
from trainfleet.failures import Cause

HOSTS = ["h1", "h2", "pi", "tiny"]
HOST_POLICY = '[hosts.pi]\ndeny_jobs = ["transformer"]\n[hosts.tiny]\nallow_jobs = ["gbt"]\n'
T0 = 1_000_000.0

base_job_fields = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["gbt", "mlp", "transformer"]),
        "mode": st.sampled_from(["realistic", "oracle"]),
        "priority": st.integers(-2, 2),
        "require_cuda": st.booleans(),
        "prefer_cuda": st.booleans(),
        "min_vram_gib": st.sampled_from([0.0, 8.0, 16.0, 40.0]),
        "min_ram_gib": st.sampled_from([0.0, 4.0, 32.0]),
        "allowed_hosts": st.lists(st.sampled_from(HOSTS), max_size=2, unique=True),
    }
)
# `gpus` is only valid on a CUDA job; None leaves the default (1 with require_cuda).
job_fields = st.tuples(base_job_fields, st.sampled_from([None, 1, 2, 3])).map(
    lambda pair: {**pair[0], **({"gpus": pair[1]} if pair[0]["require_cuda"] and pair[1]
                                else {})})


@st.composite
def capabilities(draw: st.DrawFn) -> Capability:
    cuda = draw(st.booleans())
    vram = draw(st.sampled_from([8.0, 24.0, 80.0]))
    gpus = tuple(Gpu(i, "G", vram) for i in range(draw(st.integers(1, 2)))) if cuda else ()
    return Capability(hostname=draw(st.sampled_from(HOSTS)), os="linux", cpu_count=4,
                      ram_gib=draw(st.sampled_from([2.0, 16.0, 64.0])), cuda=cuda, gpus=gpus)


def _manifest(fields: list[dict[str, Any]]) -> Any:
    jobs = [{"name": f"j{i}", "seed": i, **f} for i, f in enumerate(fields)]
    return make_manifest(jobs, HOST_POLICY)


FAILURES = [None, Cause.CUDA_OOM, Cause.RAM_OOM, Cause.TRAINER_ERROR]


# fresh_queue makes a new database per example, so sharing the fixture across examples is safe.
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    fields=st.lists(job_fields, min_size=1, max_size=12),
    cap=capabilities(),
    own_deny=st.lists(st.sampled_from(["gbt", "mlp"]), max_size=1),
    cuda_peer=st.booleans(),
    failure=st.sampled_from(FAILURES),
    fail_host=st.sampled_from(HOSTS),
    gpus_free=st.sampled_from([None, 0, 1, 2, 3]),
    # The offer of each GPU by its free memory (None: an older worker's gpus_free), and the
    # host's GPU count, which may make the claim hold back for a wider job.
    free_per_gpu=st.none() | st.lists(st.sampled_from([0.0, 8.0, 16.0, 20.0, 40.0, 80.0]),
                                      max_size=4),
    host_size=st.sampled_from([None, 1, 2, 3, 4]),
)
def test_claim_returns_the_best_job_matching_calls_eligible(
    fresh_queue: QueueFactory, fields: list[dict[str, Any]], cap: Capability,
    own_deny: list[str], cuda_peer: bool, failure: Cause | None, fail_host: str,
    gpus_free: int | None, free_per_gpu: list[float] | None, host_size: int | None,
) -> None:
    manifest = _manifest(fields)
    q = fresh_queue()  # a new database for each example
    q.sync_manifest(manifest, now=T0)
    live: list[matching.Slot] = []
    if failure is not None:  # a failed attempt raises needs and makes the job avoid its host
        failer = Capability(hostname=fail_host, os="linux", cpu_count=8, ram_gib=16.0,
                            cuda=True, gpus=(Gpu(0, "G", 24.0),))
        failed = q.claim_next("failer", failer, now=T0)
        if failed is not None:
            q.fail(failed.job.job_id, failed.lease, "x", now=T0, cause=failure)
        live.append(matching.Slot(failer, 24.0, matching.merge_policy(
            manifest.hosts.get(fail_host), None, ())))
    if cuda_peer:  # a live CUDA worker changes the prefer_cuda rule for CPU slots
        peer = Capability(hostname="h2", os="linux", cpu_count=8, ram_gib=64.0, cuda=True,
                          gpus=(Gpu(0, "G", 80.0),))
        q.claim_next("peer", peer, now=T0)
        live.append(matching.Slot(peer, 80.0, matching.merge_policy(
            manifest.hosts.get("h2"), None, ())))
    pending = q.list_jobs(status="pending")
    claim = q.claim_next("w", cap, own_deny=tuple(own_deny), now=T0 + 10, gpus_free=gpus_free,
                         free_vram_per_gpu=free_per_gpu, host_gpus=host_size)
    q.close()
    slot = matching.Slot(cap, cap.max_vram_gib,
                         matching.merge_policy(manifest.hosts.get(cap.hostname), None, own_deny),
                         gpus_free=gpus_free)
    offer = matching.offered(slot, None, free_per_gpu)
    # The registry's slots offer their host's GPUs (every GPU index any of its slots reported).
    host_gpus: dict[str, set[int]] = {}
    for known in [*live, slot]:
        host_gpus.setdefault(known.hostname, set()).update(g.index for g in known.capability.gpus)
    live = [dataclasses.replace(s, gpus_free=len(host_gpus[s.hostname]) or None) if s.cuda
            else s for s in live]
    live.append(slot)

    def best_for(some: matching.Slot) -> Any:
        eligible = [j for j in pending
                    if matching.is_eligible(j, some, live, T0 + 10 - j.pending_since)]
        return min(eligible, key=lambda j: matching.rank_key(j, cap.cuda), default=None)

    best = best_for(offer)
    if host_size is not None and matching.reserves(offer, host_size) and matching.held_for(
            best, best_for(matching.whole_host(slot, host_size)), offer):
        best = None  # held back for a wider job that ranks first
    if best is None:
        assert claim is None
        return
    assert claim is not None
    assert claim.job.job_id == best.job_id


# Jobs and offers of a multi-GPU host, so that the per-GPU offer and the reservation rule
# (matching.held_for) are exercised often: every job can run on the host with all its GPUs.
wide_job_fields = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["gbt", "mlp"]),
        "mode": st.just("realistic"),
        "priority": st.integers(-1, 1),
        "prefer_cuda": st.booleans(),
        "min_vram_gib": st.sampled_from([0.0, 8.0, 16.0, 24.0]),
        "gpus": st.sampled_from([0, 1, 2, 3, 4]),
    }
).map(lambda f: {**f, "require_cuda": True} if f["gpus"] else
      {k: v for k, v in f.items() if k != "gpus"})


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    fields=st.lists(wide_job_fields, min_size=1, max_size=8),
    free_per_gpu=st.lists(st.sampled_from([0.0, 7.9, 8.0, 16.0, 20.0, 24.0]), max_size=4),
    host_size=st.sampled_from([None, 4]),
)
def test_a_per_gpu_offer_and_the_reservation_agree_with_matching(
    fresh_queue: QueueFactory, fields: list[dict[str, Any]], free_per_gpu: list[float],
    host_size: int | None,
) -> None:
    quad = Capability(hostname="h1", os="linux", cpu_count=16, ram_gib=64.0, cuda=True,
                      gpus=tuple(Gpu(i, "G", 24.0) for i in range(4)))
    q = fresh_queue()
    q.sync_manifest(_manifest(fields), now=T0)
    pending = q.list_jobs(status="pending")
    claim = q.claim_next("w", quad, now=T0, free_vram_per_gpu=free_per_gpu, host_gpus=host_size)
    q.close()
    slot = matching.Slot(quad, 24.0)
    offer = matching.offered(slot, None, free_per_gpu)

    def best_for(some: matching.Slot) -> Any:
        eligible = [j for j in pending if matching.is_eligible(j, some)]
        return min(eligible, key=lambda j: matching.rank_key(j, True), default=None)

    best = best_for(offer)
    if host_size is not None and matching.reserves(offer, host_size) and matching.held_for(
            best, best_for(matching.whole_host(slot, host_size)), offer):
        best = None
    assert (claim and claim.job.job_id) == (best and best.job_id)
