"""Jobs on several GPUs of one host (`gpus = N`): the manifest field, matching's rule, the
claim on both backends, unschedulable detection, and the registry's view of slots."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HEADER, gpu, job, make_manifest, manifest_text
from tests.fleet import Fleet, wait_for
from trainfleet import matching
from trainfleet.capability import Capability, Gpu
from trainfleet.errors import ManifestError
from trainfleet.manifest import loads
from trainfleet.queue.base import JobQueue, Status

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
    first = queue.claim_next("duo-gpu0", host("duo", 0), now=T0, gpus_free=1)
    assert first is not None and first.job.name == "one"  # "two" ranks first but cannot fit
    assert queue.claim_next("duo-gpu1", host("duo", 1), now=T0, gpus_free=0) is None
    wide = queue.claim_next("duo-gpu1", host("duo", 1), now=T0, gpus_free=2)
    assert wide is not None and wide.job.name == "two" and wide.job.gpus == 2


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
        job("wide", model="transformer", hyper={"gate": "wide"}, require_cuda=True, gpus=2,
            priority=1),
        job("single", model="transformer", hyper={"sleep_s": 0.1}, require_cuda=True)]))
    worker = fleet.worker(receiver.url, "duo", DUO, "--slots", "auto")
    jobs = receiver.jobs_by_name()
    wide = receiver.wait_status(jobs["wide"]["job_id"], "running")
    fleet.trainer_pid(wide["job_id"])
    holder = wide["worker_id"]
    others = {w["worker_id"]: w["last_seen"] for w in receiver.client.workers()
              if w["worker_id"] != holder}  # the sibling, if it polled before it was lent
    # Several heartbeats (0.5 s) span many polls (0.2 s): the sibling, lent to "wide",
    # asked for nothing, so "single" still waits.
    for _ in range(3):
        before = receiver.job(wide["job_id"])["heartbeat_at"]
        wait_for("a heartbeat", lambda b=before: receiver.job(wide["job_id"])["heartbeat_at"] > b)
    assert receiver.job(jobs["single"]["job_id"])["status"] == "pending"
    now = {w["worker_id"]: w for w in receiver.client.workers()}
    assert {w: now[w]["last_seen"] for w in now if w != holder} == others
    assert now[holder]["job_names"] == ["wide"]

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


def fake_nvidia_smi_switched(fleet: Fleet, used_mib: int) -> Path:
    """A bin dir whose nvidia-smi says each fleet trainer holds `used_mib` MiB, but only once
    MARKERS/vram-on exists; each such answer is noted in MARKERS/sampled."""
    bin_dir = fleet.root / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    markers = fleet.markers
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f"  *--query-compute-apps=pid,used_memory*) [ -f {markers}/vram-on ] || exit 0\n"
        f"    for f in {markers}/*.pid; do\n"
        f'    [ -f "$f" ] && echo "$(cat "$f"), {used_mib}"; done\n'
        f"    echo sampled >> {markers}/sampled ;;\n"
        '  *--query-gpu*) echo "0, Fake, 24576, 24576" ;;\n'
        "esac\n")
    script.chmod(0o755)
    return bin_dir


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_a_peak_reached_after_the_last_heartbeat_is_sent_with_complete(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bin_dir = fake_nvidia_smi_switched(fleet, used_mib=6451)  # 6.3 GiB
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
