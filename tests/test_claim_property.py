"""The SQL claim and matching.py agree: property tests over random jobs and workers."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import QueueFactory, make_manifest
from trainfleet import matching
from trainfleet.capability import Capability, Gpu

HOSTS = ["h1", "h2", "pi", "tiny"]
HOST_POLICY = '[hosts.pi]\ndeny_jobs = ["transformer"]\n[hosts.tiny]\nallow_jobs = ["gbt"]\n'
T0 = 1_000_000.0

job_fields = st.fixed_dictionaries(
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


@st.composite
def capabilities(draw: st.DrawFn) -> Capability:
    cuda = draw(st.booleans())
    gpus = (Gpu(0, "G", draw(st.sampled_from([8.0, 24.0, 80.0]))),) if cuda else ()
    return Capability(hostname=draw(st.sampled_from(HOSTS)), os="linux", cpu_count=4,
                      ram_gib=draw(st.sampled_from([2.0, 16.0, 64.0])), cuda=cuda, gpus=gpus)


def _manifest(fields: list[dict[str, Any]]) -> Any:
    jobs = [{"name": f"j{i}", "seed": i, **f} for i, f in enumerate(fields)]
    return make_manifest(jobs, HOST_POLICY)


# fresh_queue makes a new database per example, so sharing the fixture across examples is safe.
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    fields=st.lists(job_fields, min_size=1, max_size=12),
    cap=capabilities(),
    own_deny=st.lists(st.sampled_from(["gbt", "mlp"]), max_size=1),
    cuda_peer=st.booleans(),
)
def test_claim_returns_the_best_job_matching_calls_eligible(
    fresh_queue: QueueFactory, fields: list[dict[str, Any]], cap: Capability,
    own_deny: list[str], cuda_peer: bool
) -> None:
    manifest = _manifest(fields)
    q = fresh_queue()  # a new database for each example
    q.sync_manifest(manifest, now=T0)
    peer_slots: list[matching.Slot] = []
    taken = None
    if cuda_peer:  # a live CUDA worker changes the prefer_cuda rule for CPU slots
        peer = Capability(hostname="h2", os="linux", cpu_count=8, ram_gib=64.0, cuda=True,
                          gpus=(Gpu(0, "G", 80.0),))
        peer_claim = q.claim_next("peer", peer, now=T0)
        taken = peer_claim.job.job_id if peer_claim else None
        peer_slots = [matching.Slot(peer, 80.0, matching.merge_policy(
            manifest.hosts.get("h2"), None, ()))]
    claim = q.claim_next("w", cap, own_deny=tuple(own_deny), now=T0 + 10)
    q.close()
    slot = matching.Slot(cap, cap.max_vram_gib,
                         matching.merge_policy(manifest.hosts.get(cap.hostname), None, own_deny))
    cuda_slots = peer_slots if not cap.cuda else []
    eligible = [
        j for j in manifest.jobs
        if j.job_id != taken and matching.is_eligible(j, slot, cuda_slots, 10.0)
    ]
    if not eligible:
        assert claim is None
        return
    best = min(eligible, key=lambda j: matching.rank_key(j, cap.cuda))
    assert claim is not None
    assert claim.job.job_id == best.job_id
