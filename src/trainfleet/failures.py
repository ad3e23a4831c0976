"""What went wrong with a trainer, read from its exit status and the tail of its output.

Pure functions, standard library only: the worker classifies, the queue decides.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import StrEnum


class Cause(StrEnum):
    CUDA_OOM = "cuda_oom"  #: the GPU ran out of memory
    RAM_OOM = "ram_oom"  #: Python raised MemoryError
    KILLED = "killed"  #: SIGKILL from outside: usually the kernel's OOM killer
    SIGNAL = "signal"  #: ended by another signal (segfault, abort...)
    TIMEOUT = "timeout"  #: ran past the job's timeout_s
    TRAINER_ERROR = "trainer_error"  #: an ordinary non-zero exit


@dataclass(frozen=True)
class Diagnosis:
    cause: Cause
    signature: str | None  #: the normalised last error line: equal on two hosts = same bug

    @property
    def out_of_memory(self) -> bool:
        return self.cause in (Cause.CUDA_OOM, Cause.RAM_OOM, Cause.KILLED)


CUDA_OOM = re.compile(
    r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation"
    r"|CUDA error: out of memory"
)
ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))\b:?(.*)$")
#: What varies between two runs of the same bug: numbers, addresses, paths, quoted values.
NOISE = [
    (re.compile(r"0x[0-9a-fA-F]+"), "0x?"),
    (re.compile(r"(?<!\w)(?:/[\w.@+-]+)+"), "<path>"),  # not "Input/output"
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
]


def diagnose(returncode: int | None, output_tail: str, timed_out: bool = False) -> Diagnosis:
    """Classify a failed attempt; the signature names the error independent of host."""
    signature = error_signature(output_tail)
    if timed_out:
        return Diagnosis(Cause.TIMEOUT, signature)
    if CUDA_OOM.search(output_tail):
        return Diagnosis(Cause.CUDA_OOM, signature)
    if signature and signature.startswith("MemoryError"):
        return Diagnosis(Cause.RAM_OOM, signature)
    killed_by = _signal_of(returncode)
    if killed_by == signal.SIGKILL:
        return Diagnosis(Cause.KILLED, signature)
    if killed_by is not None:
        return Diagnosis(Cause.SIGNAL, signature or f"signal {killed_by.name}")
    return Diagnosis(Cause.TRAINER_ERROR, signature)


def error_signature(output_tail: str) -> str | None:
    """The last `SomeError: message` line, with run-specific details masked."""
    for line in reversed(output_tail.splitlines()):
        match = ERROR_LINE.match(line)
        if match:
            text = f"{match.group(1)}:{match.group(2)}".strip().rstrip(":")
            for pattern, mask in NOISE:
                text = pattern.sub(mask, text)
            return text[:300]
    return None


def _signal_of(returncode: int | None) -> signal.Signals | None:
    """The signal that ended the process: -N from subprocess, or 128+N from a shell."""
    if returncode is None:
        return None
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        return signal.Signals(number) if number else None
    except ValueError:
        return None
