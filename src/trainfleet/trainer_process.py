"""The trainer child process: its own process group, never outliving its worker for long.

On Linux the trainer gets SIGKILL when its worker dies (PR_SET_PDEATHSIG); anything
else left in its process group is found through a record in the worker's state dir
and ended at the next worker start. Standard library only.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

RECORD = "trainer.json"
_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], log_path: Path, state_dir: Path,
) -> subprocess.Popen[bytes]:
    """Start the trainer in a new process group, output appended to `log_path`."""
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=sys.platform != "win32",
            creationflags=_NEW_PROCESS_GROUP,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    _write_record(state_dir, child.pid, env["TRAINFLEET_JOB_ID"])
    return child


def signal_group(child: subprocess.Popen[bytes], kill: bool) -> None:
    """SIGTERM (or SIGKILL) the trainer's whole process group."""
    try:
        if sys.platform == "win32":
            if kill:
                child.kill()
            else:
                child.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            os.killpg(child.pid, signal.SIGKILL if kill else signal.SIGTERM)
    except OSError:
        pass  # already gone


def finished(state_dir: Path) -> None:
    """The trainer has been reaped: forget its record."""
    (state_dir / RECORD).unlink(missing_ok=True)


def reap_leftovers(state_dir: Path) -> list[int]:
    """Kill what is left of a trainer whose worker died; the pids killed.

    Only processes in the recorded process group that carry the recorded job's
    TRAINFLEET_JOB_ID are touched, so a reused pid is never mistaken for ours.
    """
    path = state_dir / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        pgid, marker = int(record["pid"]), f"TRAINFLEET_JOB_ID={record['job_id']}".encode()
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return []
    killed = []
    for pid in _group_members(pgid):
        if marker in _environ(pid).split(b"\0"):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    path.unlink(missing_ok=True)
    return killed


def _write_record(state_dir: Path, pid: int, job_id: str) -> None:
    tmp = state_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps({"pid": pid, "job_id": job_id}), encoding="utf-8")
    os.replace(tmp, state_dir / RECORD)


def members(child: subprocess.Popen[bytes]) -> list[int]:
    """The trainer's process and every process it started, still alive (POSIX)."""
    return _group_members(child.pid)


def _group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid`, read from /proc (empty where there is no /proc)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""
