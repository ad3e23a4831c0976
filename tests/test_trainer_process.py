"""A worker killed with SIGKILL leaves no trainer behind for long."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import job
from tests.fleet import Fleet, pid_alive, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG and /proc are Linux features")

# A trainer that starts a helper process (as data loaders do) and then trains forever.
TRAINER = '''\
import subprocess, sys, time
from pathlib import Path
markers = Path({markers!r})
helper = subprocess.Popen(["sleep", "300"])
(markers / "trainer.pid").write_text(str(__import__("os").getpid()))
(markers / "helper.pid").write_text(str(helper.pid))
time.sleep(300)
'''
CPU = {"hostname": "cpu-a", "cuda": False, "gpus": [], "ram_gib": 8, "cpu_count": 2}


def _pid(path: Path) -> int | None:
    return int(path.read_text()) if path.exists() and path.read_text() else None


def test_trainer_dies_with_its_worker_and_leftovers_are_reaped_at_next_start(
    tmp_path: Path,
) -> None:
    with Fleet(tmp_path) as fleet:
        fleet.trainer_path.write_text(TRAINER.format(markers=str(fleet.markers)))
        receiver = fleet.receiver(fleet.manifest([job("forever")]))
        state_dir = tmp_path / "worker-state"
        first = fleet.worker(receiver.url, "cpu-a", CPU, state_dir=state_dir)
        trainer = wait_for("the trainer", lambda: _pid(fleet.markers / "trainer.pid"))
        helper = wait_for("its helper", lambda: _pid(fleet.markers / "helper.pid"))
        try:
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            wait_for("the trainer to die with its worker",
                     lambda: True if not pid_alive(trainer) else None, 10)
            assert pid_alive(helper)  # not a child of the worker: survives, for now
            second = fleet.worker(receiver.url, "cpu-a", CPU, state_dir=state_dir)
            wait_for("the next worker start to end the helper",
                     lambda: True if not pid_alive(helper) else None, 20)
            assert second.proc.poll() is None
        finally:
            if pid_alive(helper) and b"sleep" in Path(f"/proc/{helper}/cmdline").read_bytes():
                os.kill(helper, signal.SIGKILL)
