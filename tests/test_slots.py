"""How `--slots` and `--cpu-slots` divide a host into slots, and what each slot sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cpu
from tests.test_capability import fake_nvidia_smi, posix_only, write_script
from trainfleet.capability import Capability, Gpu, free_vram, most_vram_on_one_gpu_gib
from trainfleet.errors import TrainfleetError
from trainfleet.worker import plan_slots

DUO = Capability(hostname="duo", os="linux", cpu_count=16, ram_gib=64.0, cuda=True,
                 gpus=(Gpu(0, "A", 24.0), Gpu(1, "B", 80.0)))


def test_auto_makes_one_slot_per_gpu_and_cpu_slots_come_after() -> None:
    plan = plan_slots(DUO, "auto", cpu_slots=1)
    assert [(s.name, s.visible_devices) for s in plan] == [("gpu0", "0"), ("gpu1", "1"),
                                                          ("cpu0", "")]
    assert plan[1].narrow(DUO).gpus == (Gpu(1, "B", 80.0),)
    assert plan[1].narrow(DUO).max_vram_gib == 80.0
    cpu_view = plan[2].narrow(DUO)
    assert cpu_view.cuda is False and cpu_view.gpus == () and cpu_view.ram_gib == 64.0


def test_a_number_takes_the_first_gpus_or_makes_cpu_slots_on_a_cpu_host() -> None:
    assert [s.name for s in plan_slots(DUO, "1")] == ["gpu0"]
    assert [s.name for s in plan_slots(cpu(), "3")] == ["cpu0", "cpu1", "cpu2"]
    assert [s.name for s in plan_slots(cpu(), "auto", cpu_slots=1)] == ["cpu0", "cpu1"]


def test_a_worker_limited_to_some_gpus_hands_its_slots_the_same_devices() -> None:
    plan = plan_slots(DUO, "auto", inherited_devices="2,3")
    assert [s.visible_devices for s in plan] == ["2", "3"]


@pytest.mark.parametrize("slots, message", [("3", "this host has 2 GPU"),
                                            ("0", "expected auto or a number"),
                                            ("many", "expected auto or a number")])
def test_impossible_slot_counts_are_refused(slots: str, message: str) -> None:
    with pytest.raises(TrainfleetError, match=message):
        plan_slots(DUO, slots)


@posix_only
def test_free_vram_is_read_per_gpu_as_cuda_numbers_them(tmp_path: Path) -> None:
    two = "0, NVIDIA H200, 143771, 143000\\n1, NVIDIA GeForce RTX 4090, 24564, 10240\\n"
    environ = fake_nvidia_smi(tmp_path, two)
    assert free_vram(environ) == {0: pytest.approx(139.65, abs=0.01), 1: 10.0}
    assert free_vram({**environ, "CUDA_VISIBLE_DEVICES": "1"}) == {0: 10.0}


@posix_only
def test_free_vram_is_unknown_without_a_working_nvidia_smi(tmp_path: Path) -> None:
    assert free_vram({"PATH": str(tmp_path)}) == {}
    assert free_vram(fake_nvidia_smi(tmp_path, "no driver\\n", exit_code=1)) == {}


@posix_only
def test_vram_held_is_added_up_per_gpu_and_the_most_on_one_gpu_counts(tmp_path: Path) -> None:
    """A job on two GPUs holding 6 GiB on one and 2 on the other needs 6 per GPU, not 4."""
    bin_dir = tmp_path / "bin"
    write_script(bin_dir / "nvidia-smi",
                 'case "$*" in *--query-compute-apps=pid,gpu_uuid,used_memory*) ;; '
                 '*) exit 9 ;; esac\n'
                 "printf '101, GPU-a, 4096\\n102, GPU-a, 2048\\n101, GPU-b, 2048\\n"
                 "999, GPU-b, 40000\\n103, GPU-c, [N/A]\\n'")
    environ = {"PATH": str(bin_dir)}
    assert most_vram_on_one_gpu_gib([101, 102], environ) == 6.0  # GPU-a: 4 + 2; GPU-b: 2
    assert most_vram_on_one_gpu_gib([101], environ) == 4.0
    assert most_vram_on_one_gpu_gib([102, 103], environ) == 2.0  # [N/A] counts as unknown
    assert most_vram_on_one_gpu_gib([5], environ) == 0.0
    assert most_vram_on_one_gpu_gib([101], {"PATH": str(tmp_path)}) is None  # no nvidia-smi
