"""failures.diagnose: each cause, and signatures that match across hosts."""

from __future__ import annotations

import pytest

from trainfleet.failures import Cause, diagnose, error_signature

TRACEBACK = """Traceback (most recent call last):
  File "/home/ana/project/train.py", line 41, in <module>
    main()
ValueError: shapes (32, 10) and (12,) not aligned: 10 (dim 1) != 12 (dim 0)
"""


@pytest.mark.parametrize(
    ("returncode", "tail", "cause"),
    [
        (1, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", Cause.CUDA_OOM),
        (1, "torch.OutOfMemoryError: CUDA out of memory.", Cause.CUDA_OOM),
        (1, "Traceback...\nMemoryError", Cause.RAM_OOM),
        (-9, "epoch 3", Cause.KILLED),
        (137, "epoch 3", Cause.KILLED),
        (-11, "", Cause.SIGNAL),
        (1, TRACEBACK, Cause.TRAINER_ERROR),
        (2, "usage: train.py", Cause.TRAINER_ERROR),
    ],
)
def test_each_cause_is_recognised(returncode: int, tail: str, cause: Cause) -> None:
    assert diagnose(returncode, tail).cause == cause


def test_timeout_wins_over_what_the_output_says() -> None:
    assert diagnose(-15, "CUDA out of memory", timed_out=True).cause == Cause.TIMEOUT


def test_out_of_memory_covers_gpu_ram_and_the_oom_killer() -> None:
    assert diagnose(1, "CUDA out of memory").out_of_memory
    assert diagnose(-9, "").out_of_memory
    assert not diagnose(1, TRACEBACK).out_of_memory


def test_signature_masks_what_differs_between_hosts() -> None:
    other_host = TRACEBACK.replace("/home/ana", "/srv/lab").replace("(32, 10)", "(64, 10)")
    assert error_signature(TRACEBACK) == error_signature(other_host)
    assert error_signature(TRACEBACK) == (
        "ValueError: shapes (<n>, <n>) and (<n>,) not aligned: <n> (dim <n>) != <n> (dim <n>)"
    )
    assert error_signature("KeyError: 'lr'") != error_signature("ValueError: bad")


def test_only_absolute_paths_are_masked_not_words_with_a_slash() -> None:
    tail = "OSError: [Errno 5] Input/output error: '/mnt/nfs/shard-3.bin'"
    assert error_signature(tail) == "OSError: [Errno <n>] Input/output error: <str>"
    assert error_signature("IOError: cannot read /data/x.bin") == \
        "IOError: cannot read <path>"


def test_no_error_line_means_no_signature() -> None:
    assert error_signature("epoch 1\nepoch 2\n") is None
    assert diagnose(-11, "").signature == "signal SIGSEGV"
