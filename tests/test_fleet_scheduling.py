"""Failure-aware scheduling end to end: real workers diagnose real trainers' failures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import job
from tests.fleet import OPERATOR_TOKEN, Fleet, Receiver, pid_alive

CPU_A = {"hostname": "cpu-a", "cuda": False, "gpus": [], "ram_gib": 8, "cpu_count": 4}
CPU_B = {**CPU_A, "hostname": "cpu-b"}
GPU_SMALL = {"hostname": "gpu-small", "cuda": True, "cpu_count": 8, "ram_gib": 64,
             "gpus": [{"index": 0, "name": "Fake", "vram_gib": 24}]}
GPU_BIG = {**GPU_SMALL, "hostname": "gpu-big",
           "gpus": [{"index": 0, "name": "Fake", "vram_gib": 40}]}
CUDA_OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB "
            "(GPU 0; 23.65 GiB total capacity)")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and /proc")]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path) as f:
        yield f


def cli(receiver: Receiver, *args: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "TRAINFLEET_RECEIVER": receiver.url,
           "TRAINFLEET_OPERATOR_TOKEN": OPERATOR_TOKEN}
    done = subprocess.run([sys.executable, "-m", "trainfleet", *args], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_one_job(fleet: Fleet, receiver: Receiver, name: str, capability: dict[str, object]
                ) -> None:
    """A worker that claims one job, runs it, and exits."""
    worker = fleet.worker(receiver.url, name, capability, "--max-jobs", "1")
    assert worker.wait_exit(timeout_s=30) == 0


def test_same_error_on_two_hosts_fails_the_job_without_using_its_other_attempts(
    fleet: Fleet,
) -> None:
    receiver = fleet.receiver(fleet.manifest(
        [job("buggy", hyper={"fail": "ValueError: bad shape (3, 4)"}, max_attempts=5)]))
    job_id = receiver.jobs_by_name()["buggy"]["job_id"]

    run_one_job(fleet, receiver, "cpu-a", CPU_A)
    after_one = receiver.job(job_id)
    assert after_one["status"] == "pending" and after_one["avoid_hosts"] == ["cpu-a"]
    run_one_job(fleet, receiver, "cpu-b", CPU_B)

    failed = receiver.job(job_id)
    assert failed["status"] == "failed" and failed["attempts"] == 2
    assert failed["error"].splitlines()[-1] == \
        "same error on hosts cpu-a and cpu-b: ValueError: bad shape (<n>, <n>)"
    assert [(a["hostname"], a["cause"]) for a in failed["attempts_detail"]] == [
        ("cpu-a", "trainer_error"), ("cpu-b", "trainer_error")]
    assert "same error on hosts cpu-a and cpu-b" in cli(receiver, "show", "buggy")


def test_cuda_oom_sends_the_retry_to_a_gpu_with_more_memory(fleet: Fleet) -> None:
    receiver = fleet.receiver(fleet.manifest(
        [job("hungry", model="transformer", hyper={"fail": CUDA_OOM}, require_cuda=True,
             min_vram_gib=8, max_attempts=3)]))
    job_id = receiver.jobs_by_name()["hungry"]["job_id"]

    run_one_job(fleet, receiver, "gpu-small", GPU_SMALL)
    raised = receiver.job(job_id)
    assert raised["status"] == "pending" and raised["attempts_detail"][0]["cause"] == "cuda_oom"
    assert raised["min_vram_gib"] == 8 and raised["effective_vram_gib"] == 30
    [small] = receiver.client.why(job_id)["workers"]
    assert "needs 30 GiB VRAM (raised from 8 after running out of memory); the slot has 24 GiB" \
        in small["reasons"]
    assert "30 GiB effective (declared 8" in cli(receiver, "show", "hungry")

    run_one_job(fleet, receiver, "gpu-big", GPU_BIG)  # 40 GiB: may take it
    again = receiver.job(job_id)
    assert [a["hostname"] for a in again["attempts_detail"]] == ["gpu-small", "gpu-big"]
    assert again["effective_vram_gib"] == 50  # it ran out on 40 GiB too


def test_job_no_host_can_run_is_unschedulable_until_a_fitting_worker_comes(
    fleet: Fleet,
) -> None:
    receiver = fleet.receiver(fleet.manifest(
        [job("huge", model="transformer", hyper={"sleep_s": 0.1}, require_cuda=True,
             min_vram_gib=32)]), sweep_interval=0.5)
    job_id = receiver.jobs_by_name()["huge"]["job_id"]
    fleet.worker(receiver.url, "gpu-small", GPU_SMALL)  # polls, and can never run it

    receiver.wait_status(job_id, "unschedulable")  # the periodic check found it
    assert [j["name"] for j in receiver.client.jobs(status="unschedulable")] == ["huge"]
    why = cli(receiver, "why", "huge")
    assert "huge" in why and "is unschedulable" in why
    assert "no worker seen in the fleet can run it (gpu-small: needs 32 GiB VRAM; " \
        "the slot has 24 GiB)" in why

    fleet.worker(receiver.url, "gpu-big", GPU_BIG)
    done = receiver.wait_status(job_id, "completed")
    assert done["hostname"] == "gpu-big"
    assert "schedulable" in [event["kind"] for event in done["history"]]


def test_host_failing_three_jobs_alike_is_quarantined_until_released(fleet: Fleet) -> None:
    broken = [job(f"broken-{i}", hyper={"fail": f"RuntimeError: driver fault {'xyz'[i]}"},
                  max_attempts=1) for i in range(3)]
    receiver = fleet.receiver(fleet.manifest([*broken, job("fine", hyper={"sleep_s": 0.1})]))
    fine = receiver.jobs_by_name()["fine"]["job_id"]
    fleet.worker(receiver.url, "flaky", {**CPU_A, "hostname": "flaky"})

    for name in ("broken-0", "broken-1", "broken-2"):
        receiver.wait_status(receiver.jobs_by_name()[name]["job_id"], "failed")
    [flaky] = receiver.client.workers()
    assert flaky["quarantine_reason"] == \
        "its last 3 attempts failed on 3 different jobs with trainer_error"
    assert "quarantined: flaky until" in cli(receiver, "workers")
    [seen] = receiver.client.why(fine)["workers"]
    assert seen["reasons"][0].startswith("host quarantined until ")
    assert receiver.job(fine)["status"] == "pending"  # the worker polls, and gets 204s

    assert "released flaky from quarantine" in cli(receiver, "workers", "--release", "flaky")
    assert receiver.wait_status(fine, "completed")["hostname"] == "flaky"


def test_hung_trainer_of_a_live_worker_is_failed_as_stalled_and_stopped(fleet: Fleet) -> None:
    receiver = fleet.receiver(fleet.manifest(
        [job("hung", hyper={"gate": "never"}, stall_after_s=2, max_attempts=2)]),
        sweep_interval=0.5)  # the trainer reports step 0, then waits forever on its gate
    job_id = receiver.jobs_by_name()["hung"]["job_id"]
    worker = fleet.worker(receiver.url, "cpu-a", CPU_A, "--max-jobs", "2")
    first = fleet.trainer_pid(job_id, attempt=1)

    failed = receiver.wait_status(job_id, "failed", timeout_s=30)
    assert [a["outcome"] for a in failed["attempts_detail"]] == ["stalled", "stalled"]
    assert failed["error"].startswith("stalled: progress has not moved for ")
    assert "last progress: step 0" in failed["error"]
    assert worker.wait_exit(timeout_s=30) == 0  # each 409 stopped its trainer
    assert not pid_alive(first) and not pid_alive(fleet.trainer_pid(job_id, attempt=2))


# -- GPU slots ---------------------------------------------------------------

GPU_DUO = {"hostname": "gpu-duo", "cuda": True, "cpu_count": 16, "ram_gib": 64,
           "gpus": [{"index": 0, "name": "Fake", "vram_gib": 24},
                    {"index": 1, "name": "Fake", "vram_gib": 80}]}


def test_one_slot_per_gpu_each_trainer_seeing_only_its_gpu_plus_a_cpu_slot(
    fleet: Fleet,
) -> None:
    quick = {"sleep_s": 0.3}
    receiver = fleet.receiver(fleet.manifest([
        job("big", model="transformer", hyper=quick, require_cuda=True, min_vram_gib=40),
        job("small", model="transformer", hyper=quick, require_cuda=True, min_vram_gib=8),
        job("any-1", hyper=quick), job("any-2", hyper=quick), job("any-3", hyper=quick)]))
    worker = fleet.worker(receiver.url, "gpu-duo", GPU_DUO, "--slots", "auto",
                          "--cpu-slots", "1")
    jobs = receiver.jobs_by_name()
    for j in jobs.values():
        receiver.wait_status(j["job_id"], "completed", timeout_s=30)

    slots = {w["worker_id"].rsplit("-", 1)[1]: w for w in receiver.client.workers()}
    assert sorted(slots) == ["cpu0", "gpu0", "gpu1"]
    assert [slots[s]["slot_vram_gib"] for s in ("gpu0", "gpu1", "cpu0")] == [24, 80, 0]
    assert slots["cpu0"]["capability"]["cuda"] is False
    visible = {"gpu0": "0", "gpu1": "1", "cpu0": ""}
    for name, j in receiver.jobs_by_name().items():
        slot = j["worker_id"].rsplit("-", 1)[1]
        log = receiver.client.get_log(j["job_id"])
        assert f"CUDA_VISIBLE_DEVICES={visible[slot]}\n" in log, (name, slot)
    assert receiver.job(jobs["big"]["job_id"])["worker_id"].endswith("-gpu1")  # only 80 GiB
    assert not receiver.job(jobs["small"]["job_id"])["worker_id"].endswith("-cpu0")
    assert worker.stop() == 0  # SIGTERM stops every slot


def test_a_gpu_half_used_by_someone_else_gets_only_what_fits_its_free_memory(
    fleet: Fleet,
) -> None:
    receiver = fleet.receiver(fleet.manifest([
        job("needs-16", model="transformer", hyper={"sleep_s": 0.1}, require_cuda=True,
            min_vram_gib=16),
        job("needs-8", model="transformer", hyper={"sleep_s": 0.1}, require_cuda=True,
            min_vram_gib=8)]))
    half_used = {**GPU_SMALL, "gpus": [{"index": 0, "name": "Fake", "vram_gib": 24,
                                        "free_vram_gib": 10}]}
    run_one_job(fleet, receiver, "gpu-small", half_used)
    jobs = receiver.jobs_by_name()
    assert jobs["needs-8"]["status"] == "completed" and jobs["needs-16"]["status"] == "pending"
    [seen] = receiver.client.workers()
    assert seen["slot_vram_gib"] == 24


def test_worker_samples_the_trainers_peak_vram_and_an_oom_retry_needs_a_quarter_more(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bin_dir = fleet.fake_nvidia_smi({"GPU-0": 6451})  # 6.3 GiB
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    receiver = fleet.receiver(fleet.manifest([
        job("oom", model="transformer", hyper={"sleep_s": 1.5, "fail": CUDA_OOM},
            require_cuda=True, min_vram_gib=4, max_attempts=2)]))
    job_id = receiver.jobs_by_name()["oom"]["job_id"]

    run_one_job(fleet, receiver, "gpu-small", GPU_SMALL)
    failed = receiver.job(job_id)
    [attempt] = failed["attempts_detail"]
    assert attempt["cause"] == "cuda_oom" and attempt["peak_vram_gib"] == 6.3
    assert failed["effective_vram_gib"] == 7.88  # 1.25 x the peak, not x the 24 GiB GPU
    assert "peak 6.3 GiB VRAM (declared 4)" in cli(receiver, "show", "oom")
