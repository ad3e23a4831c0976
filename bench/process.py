"""Processes a benchmark starts: spawned on loopback, watched through /proc, always stopped.

Every process is stopped by its PID: SIGTERM, a grace period, then SIGKILL; children it left
behind (a worker's trainer) are killed the same way.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  #: the checkout, so `-m bench.…` imports anywhere
READY_DEADLINE_S = 20.0
STOP_GRACE_S = 15.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Proc:
    """One started process, its output going to a file in the benchmark's temp dir."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=child_env(env), cwd=cwd,
        )
        self.pid = self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, pattern: str, deadline_s: float = READY_DEADLINE_S) -> re.Match[str]:
        """The first match of `pattern` in the process's output, waited for with a deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + deadline_s
        while True:
            found = regex.search(self.output())
            if found:
                return found
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.argv[:4]} exited {self.popen.returncode}:\n"
                                   f"{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[:4]}: no {pattern!r} in {deadline_s} s:\n"
                                   f"{self.output()[-3000:]}")
            time.sleep(0.02)

    def children(self) -> list[int]:
        """PIDs of this process's children (e.g. a worker's trainer)."""
        found: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*/children"):
            try:
                found += [int(pid) for pid in task.read_text().split()]
            except OSError:
                pass
        return found

    def stop(self) -> int | None:
        """SIGTERM, wait up to STOP_GRACE_S, then SIGKILL; children left behind are killed."""
        children = self.children()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pid in children:
            _kill_if_alive(pid)
        self._log.close()
        return self.popen.returncode


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours (or `env`), with the checkout on PYTHONPATH."""
    found = dict(os.environ if env is None else env)
    found["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), found.get("PYTHONPATH")]))
    return found


def _kill_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def started(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[Proc]:
    """A process for the duration of the block, stopped in any case."""
    proc = Proc(argv, log_path, env, cwd)
    try:
        yield proc
    finally:
        proc.stop()


def python(*args: str) -> list[str]:
    """argv for this interpreter, unbuffered, so output lines arrive while it runs."""
    return [sys.executable, "-u", *args]


def wait_http_ok(port: int, path: str, proc: Proc, deadline_s: float = READY_DEADLINE_S) -> None:
    """Poll GET path on 127.0.0.1:port until it answers 200, with a deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.argv[:4]} exited {proc.popen.returncode}:\n"
                               f"{proc.output()[-3000:]}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"127.0.0.1:{port}{path} did not answer in {deadline_s} s")
        time.sleep(0.05)


# -- /proc readings ------------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    """A `VmRSS`-style field of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far, user + system, all its threads (10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class PeakRss:
    """Samples a process's RSS on a thread; `peak_mib` is the largest seen (and VmHWM's)."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        self.pid = pid
        self.every_s = every_s
        self.before_mib = rss_mib(pid)
        self.hwm_reset = reset_peak(pid)
        self.sampled_mib = self.before_mib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name=f"rss-{pid}")

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sampled_mib = max(self.sampled_mib, rss_mib(self.pid))
            except (OSError, KeyError):
                return

    @property
    def peak_mib(self) -> float:
        if not self.hwm_reset:
            return self.sampled_mib
        try:
            return max(self.sampled_mib, status_kib(self.pid, "VmHWM") / 1024)
        except (OSError, KeyError):
            return self.sampled_mib

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.before_mib
