"""Jobs on several GPUs of one host (`gpus = N`): the manifest field, matching's rule, the
claim on both backends, unschedulable detection, and the registry's view of slots."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.types.json import Jsonb

from tests.conftest import HEADER, gpu, job, make_manifest, manifest_text
from tests.fleet import Fleet, wait_for
from tests.live import serving
from tests.pg import Cluster
from trainfleet import matching
from trainfleet.capability import Capability, Gpu
from trainfleet.client import Client
from trainfleet.errors import ManifestError, ReceiverError
from trainfleet.manifest import loads
from trainfleet.queue.base import JobQueue, Status
from trainfleet.queue.postgres import CLAIMS, ORDER_CUDA, PostgresQueue
from trainfleet.receiver.settings import ReceiverSettings
from trainfleet.worker import SlotGroup, WorkerSettings, plan_slots

T0 = 1_000_000.0


def host(hostname: str, *indexes: int, vram_gib: float = 24.0) -> Capability:
    """A CUDA host (or one slot's view of it) with the GPUs of these indexes."""
    return Capability(hostname=hostname, os="linux", cpu_count=16, ram_gib=64.0, cuda=True,
                      gpus=tuple(Gpu(i, "Fake", vram_gib) for i in indexes))


# -- the manifest ------------------------------------------------------------


def test_gpus_defaults_to_one_for_cuda_jobs_and_none_for_cpu_jobs() -> None:
    cuda, plain, wide = make_manifest([job("cuda", require_cuda=True), job("plain"),
                                       job("wide", require_cuda=True, gpus=4)]).jobs
    assert (cuda.gpus, plain.gpus, wide.gpus) == (1, 0, 4)


def test_model_defaults_may_set_gpus() -> None:
    text_jobs = [job("t", model="transformer", require_cuda=True)]
    assert make_manifest(text_jobs).jobs[0].gpus == 1
    header = HEADER.replace('[models.transformer]\n',
                            '[models.transformer]\ndefaults = { gpus = 2 }\n')
    assert loads(manifest_text(text_jobs, header=header)).jobs[0].gpus == 2


@pytest.mark.parametrize("fields, fragment", [
    ({"gpus": 2}, "jobs[0] \"j\".gpus: gpus = 2 needs require_cuda = true"),
    ({"gpus": 0, "require_cuda": True}, "jobs[0] \"j\".gpus: expected an integer from 1 to 64"),
    ({"gpus": 65, "require_cuda": True}, "gpus: expected an integer from 1 to 64, got 65"),
    ({"gpus": 1.5, "require_cuda": True}, "gpus: expected an integer from 1 to 64"),
    ({"gpus": True, "require_cuda": True}, "gpus: expected an integer from 1 to 64"),
])
def test_bad_gpus_is_a_manifest_error_naming_the_field(
    fields: dict[str, object], fragment: str,
) -> None:
    with pytest.raises(ManifestError) as caught:
        make_manifest([job("j", **fields)])
    assert any(fragment in problem for problem in caught.value.problems), caught.value.problems


# -- matching ----------------------------------------------------------------


def test_a_job_on_two_gpus_needs_a_slot_that_can_offer_two() -> None:
    two = make_manifest([job("two", require_cuda=True, gpus=2)]).jobs[0]
    one_gpu = matching.Slot(host("h", 0), 24.0)
    assert matching.explain(two, one_gpu) == [
        "needs 2 GPUs on one host, this slot can offer 1"]
    assert matching.explain(two, matching.Slot(host("h", 0), 24.0, gpus_free=2)) == []
    busy = matching.Slot(host("h", 0), 24.0, gpus_free=0)  # lent to a sibling's job
    single = make_manifest([job("one", require_cuda=True)]).jobs[0]
    assert matching.explain(single, busy) == ["needs 1 GPUs on one host, this slot can offer 0"]
    cpu_job = make_manifest([job("cpu")]).jobs[0]
    assert matching.explain(cpu_job, busy) == []


def test_a_per_gpu_offer_holds_a_job_on_n_gpus_to_the_n_th_best() -> None:
    two = make_manifest([job("two", require_cuda=True, gpus=2, min_vram_gib=30)]).jobs[0]
    one = make_manifest([job("one", require_cuda=True, min_vram_gib=30)]).jobs[0]
    base = matching.Slot(host("h", 0, 1, 2), 80.0)
    uneven = matching.offered(base, None, [20.0, 40.0, 29.9])
    assert uneven.free_vram == (40.0, 29.9, 20.0) and uneven.gpus == 3
    assert matching.explain(two, uneven) == [
        "needs 2 GPUs with 30 GiB free each; this slot can offer 1"]
    assert matching.explain(one, uneven) == []
    assert matching.explain(two, matching.offered(base, None, [30.0, 31.0])) == []
    assert matching.explain(one, matching.offered(base, None, [])) == [
        "needs 1 GPUs on one host, this slot can offer 0"]
    # An older worker's single figure: gpus_free GPUs, each with it (capped at the total).
    older = matching.offered(matching.Slot(host("h", 0), 24.0, gpus_free=2), 30.0)
    assert (older.vram_gib, older.gpus, older.free_vram) == (24.0, 2, None)


def test_the_reservation_rule_holds_a_narrow_offer_for_a_higher_ranked_wider_job() -> None:
    one, two, low_two = make_manifest([
        job("one", require_cuda=True, priority=1), job("two", require_cuda=True, gpus=2,
                                                       priority=2),
        job("low-two", require_cuda=True, gpus=2)]).jobs
    narrow = matching.offered(matching.Slot(host("duo", 0), 24.0), None, [24.0])
    assert matching.reserves(narrow, 2) and not matching.reserves(narrow, 1)
    assert not matching.reserves(matching.offered(narrow, None, [24.0, 24.0]), 2)
    assert matching.held_for(one, two, narrow)  # "two" ranks first and needs both GPUs
    assert matching.held_for(None, two, narrow)
    assert not matching.held_for(one, low_two, narrow)  # ranks below "one"
    assert not matching.held_for(one, None, narrow)
    assert not matching.held_for(one, one, narrow)  # the best job fits the offer


def test_why_says_a_job_is_held_back_for_a_higher_ranked_wider_one() -> None:
    huge, two, one, low_two = make_manifest([
        job("huge", require_cuda=True, gpus=2, min_vram_gib=40, priority=3),  # fits no host
        job("two", require_cuda=True, gpus=2, priority=2), job("one", require_cuda=True),
        job("low-two", require_cuda=True, gpus=2, priority=-1)]).jobs
    pending = [huge, two, one, low_two]
    slots = {"duo-gpu0": matching.Slot(host("duo", 0), 24.0, gpus_free=2),
             "solo": matching.Slot(host("solo", 0), 24.0)}
    held = "held back for 'two' (ranked higher, needs 2 GPUs): duo drains until it fits"
    assert matching.explain_fleet(one, slots, pending=pending) == {
        "duo-gpu0": [held], "solo": []}
    assert matching.explain_fleet(two, slots, pending=pending) == {
        "duo-gpu0": [], "solo": ["needs 2 GPUs on one host, this slot can offer 1"]}
    assert matching.explain_fleet(one, slots) == {"duo-gpu0": [], "solo": []}


def test_a_job_wider_than_every_host_seen_is_unschedulable_with_the_reason() -> None:
    four = make_manifest([job("four", require_cuda=True, gpus=4)]).jobs[0]
    seen = [matching.Slot(host("duo", 0), 24.0, gpus_free=2),
            matching.Slot(host("duo", 1), 24.0, gpus_free=2)]
    assert matching.unschedulable_reason(four, seen) == (
        "no worker seen in the fleet can run it "
        "(duo: needs 4 GPUs on one host, this slot can offer 2)")
    seen.append(matching.Slot(host("quad", 0), 24.0, gpus_free=4))
    assert matching.unschedulable_reason(four, seen) is None


# -- the queue, both backends ------------------------------------------------


def test_claim_gives_a_multi_gpu_job_only_to_a_slot_offering_enough_gpus(
    queue: JobQueue,
) -> None:
    queue.sync_manifest(make_manifest([job("two", require_cuda=True, gpus=2, priority=5),
                                       job("one", require_cuda=True)]), now=T0)
    # One GPU of two offered: "two" ranks first and needs both, so the host drains for it
    # rather than start "one" on the free GPU (the reservation rule).
    assert queue.claim_next("duo-gpu0", host("duo", 0), now=T0, free_vram_per_gpu=[24.0],
                            host_gpus=2) is None
    assert queue.claim_next("duo-gpu1", host("duo", 1), now=T0, free_vram_per_gpu=[],
                            host_gpus=2) is None
    wide = queue.claim_next("duo-gpu1", host("duo", 1), now=T0, free_vram_per_gpu=[24.0, 24.0],
                            host_gpus=2)
    assert wide is not None and wide.job.name == "two" and wide.job.gpus == 2
    # Nothing wider is pending now: a one-GPU offer takes "one".
    one = queue.claim_next("duo-gpu0", host("duo", 0), now=T0, free_vram_per_gpu=[24.0],
                           host_gpus=2)
    assert one is not None and one.job.name == "one"


def test_an_older_worker_offering_one_gpu_is_not_held_back(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("two", require_cuda=True, gpus=2, priority=5),
                                       job("one", require_cuda=True)]), now=T0)
    first = queue.claim_next("duo-gpu0", host("duo", 0), now=T0, gpus_free=1)
    assert first is not None and first.job.name == "one"  # no host_gpus: no reservation


def test_the_reservation_holds_only_for_a_higher_ranked_job_the_host_can_run(
    queue: JobQueue,
) -> None:
    queue.sync_manifest(make_manifest([
        job("too-big", require_cuda=True, gpus=2, min_vram_gib=40, priority=9),  # never fits
        job("one", require_cuda=True, priority=5),
        job("two", require_cuda=True, gpus=2)]), now=T0)
    got = queue.claim_next("duo-gpu0", host("duo", 0), now=T0, free_vram_per_gpu=[24.0],
                           host_gpus=2)
    assert got is not None and got.job.name == "one"  # "two" ranks below it


def test_a_job_on_n_gpus_fits_the_n_th_best_free_figure(queue: JobQueue) -> None:
    # Four GPUs whose free memory differs a little, as nvidia-smi reports it: a job on all
    # four with 79 GiB each fits; one needing 79.2 GiB on each does not.
    queue.sync_manifest(make_manifest([
        job("greedy", require_cuda=True, gpus=4, min_vram_gib=79.2, priority=1),
        job("quad", require_cuda=True, gpus=4, min_vram_gib=79)]), now=T0)
    free = [79.1, 79.3, 79.2, 79.25]
    got = queue.claim_next("quad", host("quad", 0, 1, 2, 3, vram_gib=80.0), now=T0,
                           free_vram_per_gpu=free)
    assert got is not None and got.job.name == "quad"


def test_a_claim_with_no_gpus_free_still_takes_a_cpu_job(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("cuda", require_cuda=True, priority=1),
                                       job("cpu")]), now=T0)
    got = queue.claim_next("duo-gpu0", host("duo", 0), now=T0, gpus_free=0)
    assert got is not None and got.job.name == "cpu"


def test_job_wider_than_every_known_host_is_unschedulable_until_a_wide_host_comes(
    queue: JobQueue,
) -> None:
    queue.sync_manifest(make_manifest([job("four", require_cuda=True, gpus=4)]), now=T0)
    for index in (0, 1):  # a two-GPU host, one slot per GPU
        assert queue.claim_next(f"duo-gpu{index}", host("duo", index), now=T0,
                                gpus_free=2) is None
    marked = queue.reschedule(now=T0 + 1)
    [four] = queue.list_jobs()
    assert marked.unschedulable == (four.job_id,)
    assert four.status is Status.UNSCHEDULABLE
    assert four.error == ("no worker seen in the fleet can run it "
                          "(duo: needs 4 GPUs on one host, this slot can offer 2)")

    got = queue.claim_next("quad", host("quad", 0, 1, 2, 3), now=T0 + 2, gpus_free=4)
    assert got is not None and got.job.job_id == four.job_id  # made pending, then claimed


def test_the_held_claim_walks_the_cuda_index_in_both_picks(pg_cluster: Cluster) -> None:
    """CLAIM_HELD (a narrow offer on a wider host) picks the wide job and the claimed one
    each by walking jobs_pending_cuda, never sorting."""
    q = PostgresQueue(pg_cluster.fresh_schema())
    try:
        q.sync_manifest(make_manifest([job(f"j{i}", seed=i, require_cuda=True, gpus=1 + i % 2)
                                       for i in range(50)]), now=T0)
        params = {"lease": "x", "worker_id": "w", "hostname": "h", "now": T0, "cuda": True,
                  "vram": 24.0, "ram": 8.0, "gpus": 1, "allow": None, "deny": [],
                  "stale_after_s": 600.0, "hosts_md5": q._host_policies[0],
                  "free": Jsonb([24.0]), "host_gpus": 2, "wide_vram": 24.0}
        with q._connection() as conn:
            conn.execute("SET enable_seqscan = off")
            plan = "\n".join(row["QUERY PLAN"] for row in conn.execute(
                "EXPLAIN " + CLAIMS[True, ORDER_CUDA], params))
            conn.rollback()
    finally:
        q.close()
    assert plan.count("Index Scan using jobs_pending_cuda") == 2, plan
    assert "Sort" not in plan


def test_workers_name_the_jobs_each_slot_runs_and_count_the_hosts_gpus(
    queue: JobQueue,
) -> None:
    queue.sync_manifest(make_manifest([job("a", require_cuda=True), job("b")]), now=T0)
    queue.claim_next("duo-gpu0", host("duo", 0), now=T0)
    queue.claim_next("duo-gpu1", host("duo", 1), now=T0)
    queue.claim_next("solo", gpu("solo"), now=T0)
    slots = {w.worker_id: w for w in queue.workers(now=T0)}
    assert [slots[w].job_names for w in ("duo-gpu0", "duo-gpu1", "solo")] == [
        ("a",), ("b",), ()]
    assert [slots[w].host_gpus for w in ("duo-gpu0", "duo-gpu1", "solo")] == [2, 2, 1]
    assert slots["duo-gpu0"].to_dict()["job_names"] == ["a"]
    assert slots["duo-gpu0"].slot().gpus == 2  # why and unschedulable go by the host


def test_a_heartbeat_vouches_for_the_slots_its_job_borrowed_on_its_own_host(
    queue: JobQueue,
) -> None:
    for worker_id, cap in (("duo-gpu1", host("duo", 1)), ("far-gpu1", host("far", 1))):
        assert queue.claim_next(worker_id, cap, now=T0) is None  # registered, nothing yet
    queue.sync_manifest(make_manifest([job("wide", require_cuda=True, gpus=2)]), now=T0)
    claim = queue.claim_next("duo-gpu0", host("duo", 0), now=T0 + 1,
                             free_vram_per_gpu=[24.0, 24.0], host_gpus=2)
    assert claim is not None
    before = {w.worker_id: w for w in queue.workers(now=T0 + 2)}
    # An empty list changes nothing but the holder's own last_seen.
    queue.heartbeat(claim.job.job_id, claim.lease, now=T0 + 2)
    after = {w.worker_id: w for w in queue.workers(now=T0 + 2)}
    assert after["duo-gpu0"].last_seen == T0 + 2
    assert {w: dataclasses.replace(after[w], last_seen=0) for w in after} == {
        w: dataclasses.replace(before[w], last_seen=0) for w in before}
    assert after["duo-gpu1"] == before["duo-gpu1"] and after["far-gpu1"] == before["far-gpu1"]

    queue.heartbeat(claim.job.job_id, claim.lease, now=T0 + 50,
                    lent_slots=["duo-gpu1", "far-gpu1", "duo-gpu0", "nobody"])
    slots = {w.worker_id: w for w in queue.workers(now=T0 + 50)}
    assert (slots["duo-gpu1"].last_seen, slots["duo-gpu1"].lent_to) == (T0 + 50, "wide")
    assert slots["duo-gpu1"].to_dict()["lent_to"] == "wide" and slots["duo-gpu1"].jobs == ()
    # Another host's slot is not this worker's to vouch for; the holder is not lent.
    assert (slots["far-gpu1"].last_seen, slots["far-gpu1"].lent_to) == (T0, None)
    assert slots["duo-gpu0"].lent_to is None and "nobody" not in slots
    assert queue.get(claim.job.job_id).status == Status.RUNNING

    # The lent slot back on its own: its claim clears the loan.
    assert queue.claim_next("duo-gpu1", host("duo", 1), now=T0 + 51) is None
    assert {w.worker_id: w for w in queue.workers(now=T0 + 51)}["duo-gpu1"].lent_to is None
    # A loan shows only while the job is live.
    queue.heartbeat(claim.job.job_id, claim.lease, now=T0 + 52, lent_slots=["duo-gpu1"])
    assert {w.worker_id: w for w in queue.workers(now=T0 + 52)}["duo-gpu1"].lent_to == "wide"
    queue.complete(claim.job.job_id, claim.lease, "a" * 64, {}, now=T0 + 53)
    assert {w.worker_id: w for w in queue.workers(now=T0 + 53)}["duo-gpu1"].lent_to is None


def test_complete_records_the_peak_vram_on_the_attempt(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a", require_cuda=True, min_vram_gib=4)]), now=T0)
    claim = queue.claim_next("w", gpu(), now=T0)
    assert claim is not None
    queue.heartbeat(claim.job.job_id, claim.lease, now=T0 + 1, peak_vram_gib=2.0)
    queue.complete(claim.job.job_id, claim.lease, "a" * 64, {}, now=T0 + 2, peak_vram_gib=5.5)
    [attempt] = queue.attempts(claim.job.job_id)
    assert attempt.outcome == "completed" and attempt.peak_vram_gib == 5.5
    # A repeated complete (same lease and artifact) is a no-op, and a lower peak never wins.
    queue.complete(claim.job.job_id, claim.lease, "a" * 64, {}, now=T0 + 3, peak_vram_gib=1.0)
    assert queue.attempts(claim.job.job_id)[0].peak_vram_gib == 5.5


# -- the receiver ------------------------------------------------------------


def test_the_receiver_matches_a_per_gpu_offer_and_refuses_a_bad_one(tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([
        job("two", require_cuda=True, gpus=2, min_vram_gib=30, priority=1),
        job("one-a", require_cuda=True), job("one-b", require_cuda=True)]))
    duo = host("duo", 0, 1, vram_gib=80.0).to_dict()
    with serving(ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "s")) as addr:
        client = Client(f"http://{addr[0]}:{addr[1]}")
        for bad in ([-1.0], [24.0] * 65, ["x"]):
            with pytest.raises(ReceiverError) as refused:
                client.claim("duo", duo, free_vram_per_gpu=bad)  # type: ignore[arg-type]
            assert refused.value.status == 422 and "free_vram_per_gpu" in str(refused.value)
        with pytest.raises(ReceiverError) as refused:
            client.claim("duo", duo, free_vram_per_gpu=[40.0], host_gpus=-1)
        assert refused.value.status == 422 and "host_gpus" in str(refused.value)
        # 40 and 20 GiB free: "two" needs 30 on each, so the whole host takes "one-a".
        got = client.claim("duo", duo, free_vram_per_gpu=[20.0, 40.0], host_gpus=2)
        assert got is not None and got["job"]["name"] == "one-a"
        # One GPU of two offered: "one-b" is held back for "two", which ranks first.
        assert client.claim("duo", duo, free_vram_per_gpu=[40.0], host_gpus=2) is None
        got = client.claim("duo", duo, free_vram_per_gpu=[31.0, 40.0], host_gpus=2)
        assert got is not None and got["job"]["name"] == "two"


def test_the_receiver_takes_a_heartbeats_lent_slots_and_refuses_bad_ones(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("wide", require_cuda=True, gpus=2)]))
    with serving(ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "s")) as addr:
        client = Client(f"http://{addr[0]}:{addr[1]}")
        assert client.claim("duo-gpu1", host("duo", 1).to_dict(), free_vram_per_gpu=[],
                            host_gpus=2) is None
        got = client.claim("duo-gpu0", host("duo", 0).to_dict(),
                           free_vram_per_gpu=[24.0, 24.0], host_gpus=2)
        assert got is not None
        job_id, lease = got["job"]["job_id"], got["lease"]
        for bad in ([""], ["x" * 201], [f"w{i}" for i in range(65)]):
            with pytest.raises(ReceiverError) as refused:
                client.heartbeat(job_id, lease, lent_slots=bad)
            assert refused.value.status == 422 and "lent_slots" in str(refused.value)
        slots = {w["worker_id"]: w for w in client.workers()}
        assert slots["duo-gpu1"]["lent_to"] is None
        assert client.heartbeat(job_id, lease, lent_slots=["duo-gpu1"]) == "continue"
        slots = {w["worker_id"]: w for w in client.workers()}
        assert slots["duo-gpu1"]["lent_to"] == "wide"
        assert slots["duo-gpu0"]["lent_to"] is None and slots["duo-gpu0"]["job_names"] == ["wide"]


# -- end to end: a real worker daemon with fake GPUs --------------------------

DUO = {"hostname": "duo", "cuda": True, "cpu_count": 16, "ram_gib": 64,
       "gpus": [{"index": 0, "name": "Fake", "vram_gib": 24},
                {"index": 1, "name": "Fake", "vram_gib": 24}]}
SOLO = {"hostname": "solo", "cuda": True, "cpu_count": 8, "ram_gib": 64,
        "gpus": [{"index": 0, "name": "Fake", "vram_gib": 24}]}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path) as f:
        yield f


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_a_two_gpu_job_gets_both_gpus_and_its_borrowed_sibling_claims_nothing(
    fleet: Fleet,
) -> None:
    receiver = fleet.receiver(fleet.manifest([
        job("first", model="transformer", hyper={"gate": "first"}, require_cuda=True,
            priority=2),
        job("wide", model="transformer", hyper={"gate": "wide"}, require_cuda=True, gpus=2,
            priority=1),
        job("single", model="transformer", hyper={"sleep_s": 0.1}, require_cuda=True)]))
    worker = fleet.worker(receiver.url, "duo", DUO, "--slots", "auto")
    jobs = receiver.jobs_by_name()
    # While "first" runs, the other slot polls (held back for "wide"): both are registered.
    receiver.wait_status(jobs["first"]["job_id"], "running")
    wait_for("both slots registered", lambda: len(receiver.client.workers()) == 2 or None)
    fleet.release("first")
    wide = receiver.wait_status(jobs["wide"]["job_id"], "running")
    fleet.trainer_pid(wide["job_id"])
    holder = wide["worker_id"]
    [sibling] = [w["worker_id"] for w in receiver.client.workers() if w["worker_id"] != holder]

    def seen() -> float:
        return float({w["worker_id"]: w for w in receiver.client.workers()}[sibling]["last_seen"])

    # Several heartbeats (0.5 s) span many polls (0.2 s): the sibling, lent to "wide",
    # asks for nothing, so "single" still waits; the holder's heartbeats vouch for it.
    was = seen()
    for _ in range(3):
        before = receiver.job(wide["job_id"])["heartbeat_at"]
        wait_for("a heartbeat", lambda b=before: receiver.job(wide["job_id"])["heartbeat_at"] > b)
    assert receiver.job(jobs["single"]["job_id"])["status"] == "pending"
    now = {w["worker_id"]: w for w in receiver.client.workers()}
    assert now[sibling]["last_seen"] > was and now[sibling]["alive"]
    assert now[sibling]["lent_to"] == "wide" and now[sibling]["job_names"] == []
    assert now[holder]["job_names"] == ["wide"] and now[holder]["lent_to"] is None

    fleet.release("wide")
    receiver.wait_status(wide["job_id"], "completed")
    single = receiver.wait_status(jobs["single"]["job_id"], "completed")
    log = receiver.client.get_log(wide["job_id"])
    [devices] = [line.split("=", 1)[1] for line in log.splitlines()
                 if line.startswith("CUDA_VISIBLE_DEVICES=")]
    assert sorted(devices.split(",")) == ["0", "1"]  # two distinct devices
    assert f"CUDA_VISIBLE_DEVICES={single['worker_id'][-1]}\n" in receiver.client.get_log(
        single["job_id"])  # after it, one GPU again
    assert worker.stop() == 0


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_a_job_wider_than_the_fleet_is_unschedulable_and_why_says_so(fleet: Fleet) -> None:
    receiver = fleet.receiver(fleet.manifest([
        job("quad", model="transformer", hyper={"sleep_s": 0.1}, require_cuda=True, gpus=4)]),
        sweep_interval=0.5)
    fleet.worker(receiver.url, "duo", DUO, "--slots", "auto")
    job_id = receiver.jobs_by_name()["quad"]["job_id"]
    unschedulable = receiver.wait_status(job_id, "unschedulable")
    assert unschedulable["error"] == ("no worker seen in the fleet can run it "
                                      "(duo: needs 4 GPUs on one host, this slot can offer 2)")
    reasons = {w["worker_id"]: w["reasons"] for w in receiver.client.why(job_id)["workers"]}
    assert set(map(tuple, reasons.values())) == {
        ("needs 4 GPUs on one host, this slot can offer 2",)}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_a_wide_job_is_not_starved_by_a_stream_of_one_gpu_jobs(fleet: Fleet) -> None:
    quick = {"sleep_s": 0.1}
    receiver = fleet.receiver(fleet.manifest([
        job("first", model="transformer", hyper={"gate": "first"}, require_cuda=True,
            priority=2),
        job("wide", model="transformer", hyper=quick, require_cuda=True, gpus=2, priority=1),
        *(job(f"s{i}", model="transformer", hyper=quick, require_cuda=True)
          for i in range(4))]))
    worker = fleet.worker(receiver.url, "duo", DUO, "--slots", "auto")
    jobs = receiver.jobs_by_name()
    first = receiver.wait_status(jobs["first"]["job_id"], "running")
    # Several heartbeats (0.5 s) span many polls (0.2 s) of the other slot, whose GPU is
    # free: it is held back for "wide", so no one-GPU job starts meanwhile.
    for _ in range(3):
        before = receiver.job(first["job_id"])["heartbeat_at"]
        wait_for("a heartbeat", lambda b=before: receiver.job(first["job_id"])["heartbeat_at"] > b)
    assert {name: receiver.job(j["job_id"])["status"] for name, j in jobs.items()
            if name != "first"} == {"wide": "pending", **{f"s{i}": "pending" for i in range(4)}}
    why = receiver.client.why(jobs["s0"]["job_id"])
    assert {tuple(w["reasons"]) for w in why["workers"]} == {
        ("held back for 'wide' (ranked higher, needs 2 GPUs): duo drains until it fits",)}

    fleet.release("first")
    done = {name: receiver.wait_status(j["job_id"], "completed", timeout_s=30)
            for name, j in jobs.items()}
    started = {name: j["attempts_detail"][0]["started_at"] for name, j in done.items()}
    assert started["wide"] < min(started[f"s{i}"] for i in range(4))
    log = receiver.client.get_log(jobs["wide"]["job_id"])
    assert "CUDA_VISIBLE_DEVICES=0,1\n" in log or "CUDA_VISIBLE_DEVICES=1,0\n" in log
    assert worker.stop() == 0


QUAD = {"hostname": "quad", "cuda": True, "cpu_count": 16, "ram_gib": 64,
        "gpus": [{"index": i, "name": "Fake", "vram_gib": 80, "free_vram_gib": free}
                 for i, free in enumerate([79.1, 79.3, 79.2, 79.25])]}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_a_whole_host_worker_runs_a_job_on_the_gpus_with_the_most_free_memory(
    fleet: Fleet,
) -> None:
    # One slot over the whole host (--slots 1): it offers all four GPUs as nvidia-smi reads
    # them, a little apart; the job on two runs on the two with the most free memory.
    receiver = fleet.receiver(fleet.manifest([
        job("pair", model="transformer", hyper={"sleep_s": 0.1}, require_cuda=True, gpus=2,
            min_vram_gib=79)]))
    job_id = receiver.jobs_by_name()["pair"]["job_id"]
    worker = fleet.worker(receiver.url, "quad", QUAD, "--slots", "1", "--max-jobs", "1")
    assert worker.wait_exit(timeout_s=30) == 0
    assert receiver.job(job_id)["status"] == "completed"
    assert "CUDA_VISIBLE_DEVICES=1,3\n" in receiver.client.get_log(job_id)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_a_peak_reached_after_the_last_heartbeat_is_sent_with_complete(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bin_dir = fleet.fake_nvidia_smi({"GPU-0": 6451}, switched=True)  # 6.3 GiB
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    receiver = fleet.receiver(fleet.manifest([
        job("quick", model="transformer", hyper={"gate": "quick"}, require_cuda=True,
            min_vram_gib=4)]))
    job_id = receiver.jobs_by_name()["quick"]["job_id"]
    worker = fleet.worker(receiver.url, "solo", SOLO, "--max-jobs", "1",
                          "--heartbeat-interval", "600")  # one heartbeat, at the start
    receiver.wait_status(job_id, "running")
    (fleet.markers / "vram-on").touch()  # the trainer's memory grows after that heartbeat
    wait_for("a VRAM sample between heartbeats", (fleet.markers / "sampled").exists)
    fleet.release("quick")
    assert worker.wait_exit(timeout_s=30) == 0

    done = receiver.job(job_id)
    [attempt] = done["attempts_detail"]
    assert done["status"] == "completed" and attempt["peak_vram_gib"] == 6.3
    show = subprocess.run([sys.executable, "-m", "trainfleet", "show", "quick"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TRAINFLEET_RECEIVER": receiver.url})
    assert "completed peak 6.3 GiB VRAM (declared 4)" in show.stdout


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_a_two_gpu_jobs_peak_is_what_it_held_on_its_busiest_gpu(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nvidia-smi says the trainer holds 6.3 GiB on one GPU and 2 GiB on the other: the
    attempt's peak is 6.3 (per GPU, as min_vram_gib is declared), not the mean 4.15."""
    bin_dir = fleet.fake_nvidia_smi({"GPU-a": 6451, "GPU-b": 2048}, gpus=4,
                                    gpu_mib=(81920, 81000))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    receiver = fleet.receiver(fleet.manifest([
        job("pair", model="transformer", hyper={"gate": "pair"}, require_cuda=True, gpus=2,
            min_vram_gib=4)]))
    job_id = receiver.jobs_by_name()["pair"]["job_id"]
    worker = fleet.worker(receiver.url, "quad", QUAD, "--slots", "1", "--max-jobs", "1",
                          "--heartbeat-interval", "600")
    receiver.wait_status(job_id, "running")
    wait_for("a VRAM sample", (fleet.markers / "sampled").exists)
    fleet.release("pair")
    assert worker.wait_exit(timeout_s=30) == 0
    done = receiver.job(job_id)
    [attempt] = done["attempts_detail"]
    assert done["status"] == "completed" and attempt["peak_vram_gib"] == 6.3


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_a_slot_that_reached_max_jobs_lends_its_gpu_to_no_sibling(fleet: Fleet) -> None:
    receiver = fleet.receiver(fleet.manifest([
        job("first", model="transformer", hyper={"gate": "first"}, require_cuda=True,
            priority=2),
        job("wide", model="transformer", hyper={"sleep_s": 0.1}, require_cuda=True, gpus=2,
            priority=1)]))
    worker = fleet.worker(receiver.url, "duo", DUO, "--slots", "auto", "--max-jobs", "1")
    jobs = receiver.jobs_by_name()
    first = receiver.wait_status(jobs["first"]["job_id"], "running")
    holder = first["worker_id"]
    other = wait_for("the sibling slot's first claim", lambda: next(
        (w["worker_id"] for w in receiver.client.workers() if w["worker_id"] != holder), None))
    fleet.release("first")
    receiver.wait_status(first["job_id"], "completed")
    # The holder's loop has ended (--max-jobs 1); its GPU is no one's to borrow. The sibling
    # claims on, offering its own GPU only, so "wide" (2 GPUs) is never claimed.
    for _ in range(3):
        seen = {w["worker_id"]: w["last_seen"] for w in receiver.client.workers()}[other]
        wait_for("a claim by the sibling", lambda s=seen: {
            w["worker_id"]: w["last_seen"] for w in receiver.client.workers()}[other] > s)
    wide = receiver.job(jobs["wide"]["job_id"])
    assert wide["status"] in ("pending", "unschedulable") and wide["attempts"] == 0
    assert worker.stop() == 0


def test_slots_that_failed_their_self_test_or_stopped_are_out_of_the_pool(
    tmp_path: Path,
) -> None:
    """Real slots of a SlotGroup (no receiver answers: port 9 of loopback refuses): one
    cannot run its Python, so its self-test fails; the other passes it, claims once (--once)
    and stops. Neither is left in the pool for a sibling to borrow."""
    cap = host("duo", 0, 1)
    settings = WorkerSettings(receiver_url="http://127.0.0.1:9", workdir=tmp_path,
                              state_dir=tmp_path / "state", once=True)
    group = SlotGroup.build(settings, lambda: Client("http://127.0.0.1:9", retries=0), cap,
                            plan_slots(cap, "auto"))
    broken, good = group.workers
    broken.settings = dataclasses.replace(broken.settings,
                                          python=str(tmp_path / "no-such-python"))
    pool = good.pool
    assert pool is not None and pool is broken.pool
    assert pool.workers == []  # nobody is lendable before its self-test passed
    assert broken.run() == 1  # self-test failed
    assert pool.workers == []
    assert good.run() == 1  # --once against an unreachable receiver
    assert pool.workers == []
