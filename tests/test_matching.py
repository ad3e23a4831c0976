"""matching.py: each eligibility rule, its explanation, the preference grace and the order."""

from __future__ import annotations

from tests.conftest import cpu, gpu, job, make_manifest
from trainfleet import matching
from trainfleet.manifest import HostSpec, JobSpec


def spec(**fields: object) -> JobSpec:
    return make_manifest([job("j", **fields)]).jobs[0]


def slot(cap: object = None, vram: float | None = None, policy: matching.Policy | None = None,
         ) -> matching.Slot:
    capability = cap or cpu()
    return matching.Slot(capability, capability.max_vram_gib if vram is None else vram,  # type: ignore[union-attr]
                         policy or matching.Policy())


def test_plain_job_is_eligible_everywhere() -> None:
    assert matching.explain(spec(), slot()) == []
    assert matching.explain(spec(), slot(gpu())) == []


def test_each_constraint_gives_its_own_reason() -> None:
    reasons = matching.explain(
        spec(require_cuda=True, min_vram_gib=16.0, min_ram_gib=32.0, allowed_hosts=["gpu-z"]),
        slot(cpu("cpu-a", ram_gib=8.0)),
    )
    assert len(reasons) == 4
    assert any("requires CUDA" in r for r in reasons)
    assert any("16 GiB VRAM" in r and "0 GiB" in r for r in reasons)
    assert any("32 GiB RAM" in r and "8 GiB" in r for r in reasons)
    assert any("allowed_hosts is gpu-z" in r for r in reasons)


def test_vram_is_the_slot_not_the_host() -> None:
    assert matching.explain(spec(min_vram_gib=16.0), slot(gpu(vram_gib=24.0), vram=8.0))
    assert not matching.explain(spec(min_vram_gib=16.0), slot(gpu(vram_gib=24.0)))


def test_merge_policy_narrows_host_allow_with_worker_allow_and_unions_denies() -> None:
    host = HostSpec("h", allow_jobs=("gbt", "mlp"), deny_jobs=("x",))
    policy = matching.merge_policy(host, allow_jobs=("mlp", "transformer"), deny_jobs=("y",))
    assert policy.allow == frozenset({"mlp"})
    assert policy.deny == frozenset({"x", "y"})
    assert matching.merge_policy(None).allows("anything")


def test_policy_reasons_name_allow_and_deny() -> None:
    only_mlp = matching.Policy(allow=frozenset({"mlp"}))
    no_gbt = matching.Policy(deny=frozenset({"gbt"}))
    [allow_reason] = matching.explain(spec(), slot(policy=only_mlp))
    [deny_reason] = matching.explain(spec(), slot(policy=no_gbt))
    assert "only allows mlp" in allow_reason
    assert "denies 'gbt'" in deny_reason


def test_prefer_cuda_waits_only_while_a_live_cuda_slot_could_run_it() -> None:
    job_spec = spec(prefer_cuda=True, prefer_wait_s=100.0)
    able = [slot(gpu())]
    busy_elsewhere = [slot(gpu(), policy=matching.Policy(deny=frozenset({"gbt"})))]
    [reason] = matching.explain(job_spec, slot(), live_slots=able, waited_s=40.0)
    assert "prefers CUDA" in reason and "gpu-a" in reason and "60 s" in reason
    assert matching.is_eligible(job_spec, slot(), live_slots=able, waited_s=100.0)
    assert matching.is_eligible(job_spec, slot(), live_slots=busy_elsewhere, waited_s=0.0)
    assert matching.is_eligible(job_spec, slot(), live_slots=[], waited_s=0.0)
    assert matching.is_eligible(job_spec, slot(gpu()), live_slots=able, waited_s=0.0)


def test_rank_puts_priority_first_then_prefer_cuda_on_cuda_slots_then_order() -> None:
    jobs = make_manifest([job("a"), job("b", prefer_cuda=True), job("c", priority=1)]).jobs
    cpu_order = [j.name for j in sorted(jobs, key=lambda j: matching.rank_key(j, False))]
    cuda_order = [j.name for j in sorted(jobs, key=lambda j: matching.rank_key(j, True))]
    assert cpu_order == ["c", "a", "b"]
    assert cuda_order == ["c", "b", "a"]


class _AfterFailures:
    """A manifest job as the queue sees it after failures: raised needs, avoided hosts."""

    def __init__(self, spec: JobSpec, avoid_hosts: tuple[str, ...] = (),
                 raised_vram_gib: float = 0.0, raised_ram_gib: float = 0.0) -> None:
        self._spec = spec
        self.avoid_hosts = avoid_hosts
        self.effective_vram_gib = max(spec.min_vram_gib, raised_vram_gib)
        self.effective_ram_gib = max(spec.min_ram_gib, raised_ram_gib)

    def __getattr__(self, name: str) -> object:
        return getattr(self._spec, name)


def test_raised_needs_are_checked_and_explained_as_raised() -> None:
    failed = _AfterFailures(spec(min_vram_gib=8.0), raised_vram_gib=30.0)
    [reason] = matching.explain(failed, slot(gpu(vram_gib=24.0)))  # type: ignore[arg-type]
    assert "needs 30 GiB VRAM (raised from 8 after running out of memory)" in reason
    assert matching.is_eligible(failed, slot(gpu(vram_gib=40.0)))  # type: ignore[arg-type]


def test_job_avoids_the_host_it_failed_on_while_another_live_host_can_run_it() -> None:
    failed = _AfterFailures(spec(prefer_wait_s=100.0), avoid_hosts=("cpu-a",))
    here, elsewhere = slot(cpu("cpu-a")), slot(cpu("cpu-b"))
    [reason] = matching.explain(failed, here, [here, elsewhere], 10.0)  # type: ignore[arg-type]
    assert reason == "avoiding host cpu-a after a failure there: cpu-b can run it"
    assert matching.is_eligible(failed, elsewhere, [here, elsewhere], 10.0)  # type: ignore[arg-type]
    # alone in the fleet, or after prefer_wait_s, the failed host may take it again
    assert matching.is_eligible(failed, here, [here], 10.0)  # type: ignore[arg-type]
    assert matching.is_eligible(failed, here, [here, elsewhere], 100.0)  # type: ignore[arg-type]
    too_small = slot(cpu("cpu-b", ram_gib=1.0))
    needy = _AfterFailures(spec(min_ram_gib=4.0), avoid_hosts=("cpu-a",))
    assert matching.is_eligible(needy, here, [here, too_small], 0.0)  # type: ignore[arg-type]
