"""A real fleet on loopback for end-to-end tests: receiver and worker subprocesses, a tiny trainer.

Everything lives under one tmp dir; `Fleet.close()` stops, by PID, every process it started
(SIGTERM, a bounded wait, then SIGKILL) and any trainer a killed worker left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from tests.conftest import manifest_text
from trainfleet.client import Client
from trainfleet.errors import TrainfleetError

T = TypeVar("T")

PYTHON = sys.executable
START_S = 30.0  #: how long a receiver may take to listen and answer /v1/health
STOP_S = 10.0  #: how long a process gets after SIGTERM before SIGKILL
OPERATOR_TOKEN = "operator-secret-for-tests"
LISTENING = re.compile(r"listening on (http://\S+)")

# Every model takes the trainer's knobs; each job uses the ones it needs.
TRAINER_HYPER = (
    '{ sleep_s = "float", gate = "str", fail = "str", output = "str", size_kib = "int",'
    ' ignore_sigterm = "bool" }'
)
HEADER = f"""
schema_version = 1
name = "fleet"
[trainer]
command = ["{{python}}", "trainer.py", "--model", "{{model}}", "--mode", "{{mode}}",
           "--seed", "{{seed}}", "--hyper", "{{hyper_json}}", "--out", "{{output_dir}}"]
modes = ["realistic", "oracle"]
[defaults]
max_attempts = 3
[models.gbt]
hyper = {TRAINER_HYPER}
[models.mlp]
hyper = {TRAINER_HYPER}
[models.transformer]
hyper = {TRAINER_HYPER}
"""

# The trainer of the worker contract. Its hyper says what to do:
#   sleep_s   train this long (default 0; 120 when a gate is set)
#   gate      ...or until MARKERS/release-<gate> exists, so a test decides when training ends
#   fail      exit 3 with this line on stderr instead of writing a model
#   output    the seed of the output bytes: two jobs with the same value train bit-identical
#   size_kib  how big model.bin is (default 4)
#   ignore_sigterm  a stubborn trainer: only SIGKILL stops it
# It leaves MARKERS/<job_id>-<attempt>.pid when it starts and .done when it finished.
TRAINER = '''\
import argparse, json, os, random, signal, sys, time
from pathlib import Path

MARKERS = Path({markers!r})


def write_json(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


parser = argparse.ArgumentParser()
for flag in ("--model", "--mode", "--seed", "--hyper", "--out"):
    parser.add_argument(flag, required=True)
args = parser.parse_args()
hyper = json.loads(Path(args.hyper).read_text())
if hyper.get("ignore_sigterm"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
tag = os.environ["TRAINFLEET_JOB_ID"] + "-" + os.environ["TRAINFLEET_ATTEMPT"]
progress = Path(os.environ["TRAINFLEET_PROGRESS_FILE"])
(MARKERS / (tag + ".pid")).write_text(str(os.getpid()))
write_json(progress, {{"fraction": 0.0, "step": 0, "message": "starting"}})
print("training", args.model, args.mode, "seed", args.seed, flush=True)
print("CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), flush=True)

gate = hyper.get("gate")
deadline = time.monotonic() + hyper.get("sleep_s", 120.0 if gate else 0.0)
while time.monotonic() < deadline:
    if gate and (MARKERS / ("release-" + gate)).exists():
        break
    time.sleep(0.05)

if hyper.get("fail"):
    print(hyper["fail"], file=sys.stderr, flush=True)
    sys.exit(3)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
identity = hyper.get("output") or json.dumps(
    [args.model, args.mode, args.seed, hyper], sort_keys=True)
rng = random.Random(identity)
(out / "model.bin").write_bytes(rng.randbytes(hyper.get("size_kib", 4) * 1024))
write_json(out / "metrics.json", {{"score": rng.random()}})
write_json(progress, {{"fraction": 1.0, "step": 1, "message": "done"}})
(MARKERS / (tag + ".done")).write_text("done")
'''


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 20.0,
             interval_s: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout_s: float = STOP_S) -> int:
    """Signal one process by PID, wait up to timeout_s, then SIGKILL it; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie awaiting its parent's wait counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return sys.platform != "linux"
    return stat.rpartition(")")[2].split()[0] != "Z"


def _clean_environ() -> dict[str, str]:
    """Our environment without TRAINFLEET_* settings that would leak into the fleet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn(argv: list[str], log_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, cwd=cwd, env=_clean_environ(), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT,
        )


class Receiver:
    """A `trainfleet receiver` subprocess, listening and healthy once constructed."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, manifest: Path,
                 state_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.manifest = manifest
        self.port = int(url.rsplit(":", 1)[1])
        self.state_dir = state_dir
        self.log_path = log_path
        self.client = Client(url, operator_token=OPERATOR_TOKEN, retries=0, timeout_s=10.0)

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return stop_process(self.proc, sig)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.client.job(job_id)

    def jobs_by_name(self) -> dict[str, dict[str, Any]]:
        return {job["name"]: job for job in self.client.jobs()}

    def wait_status(self, job_id: str, *statuses: str, timeout_s: float = 20.0
                    ) -> dict[str, Any]:
        """Poll the job until its status is one of `statuses`; the job resource."""
        def probe() -> dict[str, Any] | None:
            job = self.client.job(job_id)
            return job if job["status"] in statuses else None

        return wait_for(f"job {job_id[:12]} to be {' or '.join(statuses)}", probe, timeout_s)

    def index_rows(self) -> list[dict[str, Any]]:
        path = self.models_dir / "index.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Worker:
    """A `trainfleet worker` subprocess with its own state dir and capability file."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, state_dir: Path,
                 log_path: Path) -> None:
        self.proc = proc
        self.name = name
        self.state_dir = state_dir
        self.log_path = log_path

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def worker_id(self) -> str:
        return wait_for(f"worker {self.name}'s id",
                        lambda: _read(self.state_dir / "worker_id").strip())

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_S) -> int:
        return stop_process(self.proc, sig, timeout_s)

    def wait_exit(self, timeout_s: float) -> int:
        """The exit code of a worker that should end by itself (--once, --max-jobs)."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.name} still runs after {timeout_s:g} s") from None


class Fleet:
    """Builds and owns one test's fleet: the project with its trainer, manifests, processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.project = root / "project"  # the workers' --workdir, holding trainer.py
        self.markers = root / "markers"
        self.logs = root / "logs"
        for path in (self.project, self.markers, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        self.trainer_path = self.project / "trainer.py"
        self.trainer_path.write_text(TRAINER.format(markers=str(self.markers)))
        self.operator_token_file = root / "operator.token"
        self.operator_token_file.write_text(OPERATOR_TOKEN + "\n")
        self._workers: list[subprocess.Popen[bytes]] = []
        self._receivers: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- building -----------------------------------------------------------

    def manifest(self, jobs: list[dict[str, Any]], hosts: str = "",
                 name: str = "manifest.toml") -> Path:
        path = self.root / name
        path.write_text(manifest_text(jobs, hosts, header=HEADER))
        return path

    def capability_file(self, name: str, capability: dict[str, Any]) -> Path:
        path = self.root / f"capability-{name}.json"
        path.write_text(json.dumps(capability))
        return path

    # --- processes ----------------------------------------------------------

    def receiver(self, manifest: Path, state_dir: Path | None = None, port: int = 0,
                 **options: Any) -> Receiver:
        """Start a receiver (options become flags: stale_after=2 -> --stale-after 2, and
        keep_checkpoints=True -> --keep-checkpoints; False leaves the flag out)."""
        state_dir = state_dir or self.root / "state"
        self._count += 1
        log_path = self.logs / f"receiver-{self._count}.log"
        argv = [PYTHON, "-m", "trainfleet", "receiver", "--manifest", str(manifest),
                "--state-dir", str(state_dir), "--port", str(port),
                "--operator-token-file", str(self.operator_token_file), "--log-level", "info"]
        for key, value in options.items():
            if value is False:
                continue
            argv.append(f"--{key.replace('_', '-')}")
            if value is not True:  # True: a flag that takes no value
                argv.append(str(value))
        proc = _spawn(argv, log_path, self.root)
        self._receivers.append(proc)
        url = wait_for("the receiver's 'listening on' line",
                       lambda: _listening(proc, log_path), START_S)
        receiver = Receiver(proc, url, manifest, state_dir, log_path)
        wait_for("the receiver's /v1/health", lambda: _healthy(receiver), START_S)
        return receiver

    def restart(self, receiver: Receiver, **options: Any) -> Receiver:
        """A new receiver on a stopped one's manifest, state dir and port."""
        assert receiver.proc.poll() is not None, "stop the receiver first"
        return self.receiver(receiver.manifest, receiver.state_dir, receiver.port, **options)

    def worker(self, receiver_url: str, name: str, capability: dict[str, Any],
               *flags: str, state_dir: Path | None = None) -> Worker:
        """Start a worker whose capability is overridden by `capability`."""
        state_dir = state_dir or self.root / "workers" / name
        self._count += 1
        log_path = self.logs / f"worker-{name}-{self._count}.log"
        argv = [PYTHON, "-m", "trainfleet", "worker", "--receiver", receiver_url,
                "--workdir", str(self.project), "--state-dir", str(state_dir),
                "--capability-file", str(self.capability_file(name, capability)),
                "--poll-interval", "0.2", "--heartbeat-interval", "0.5", *flags]
        proc = _spawn(argv, log_path, self.root)
        self._workers.append(proc)
        return Worker(proc, name, state_dir, log_path)

    # --- the trainer's markers ----------------------------------------------

    def release(self, gate: str) -> None:
        """Let every trainer waiting on `gate` finish its training."""
        (self.markers / f"release-{gate}").write_text("go")

    def trainer_pid(self, job_id: str, attempt: int = 1, timeout_s: float = 20.0) -> int:
        """The PID of the trainer of that attempt, once it has started."""
        path = self.markers / f"{job_id}-{attempt}.pid"
        return int(wait_for(f"the trainer of {job_id[:12]} attempt {attempt}",
                            lambda: _read(path).strip(), timeout_s))

    def trainer_finished(self, job_id: str, attempt: int = 1) -> bool:
        return (self.markers / f"{job_id}-{attempt}.done").exists()

    def kill_trainer(self, pid: int) -> None:
        """SIGKILL a trainer by PID, but only if that PID still runs our trainer script."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if str(self.trainer_path).encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- a fake nvidia-smi ----------------------------------------------------

    def fake_nvidia_smi(self, held_mib: dict[str, int], gpus: int = 1,
                        gpu_mib: tuple[int, int] = (24576, 24576), switched: bool = False
                        ) -> Path:
        """A bin dir (put it first on PATH) whose nvidia-smi lists `gpus` GPUs of `gpu_mib`
        (total, free) and says each running fleet trainer holds `held_mib[uuid]` MiB on each
        GPU named. `switched`: it says so only once MARKERS/vram-on exists. Each answer that
        named a trainer is noted in MARKERS/sampled."""
        bin_dir = self.root / "bin"
        bin_dir.mkdir(exist_ok=True)
        held = "; ".join(f'echo "$(cat "$f"), {uuid}, {mib}"' for uuid, mib in held_mib.items())
        gate = f"[ -f {self.markers}/vram-on ] || exit 0; " if switched else ""
        listing = "; ".join(f'echo "{i}, Fake, {gpu_mib[0]}, {gpu_mib[1]}"' for i in range(gpus))
        script = bin_dir / "nvidia-smi"
        script.write_text(
            "#!/bin/sh\n"
            'case "$*" in\n'
            f"  *--query-compute-apps=pid,gpu_uuid,used_memory*) {gate}\n"
            f'    for f in {self.markers}/*.pid; do [ -f "$f" ] || continue; {held}\n'
            f"      echo sampled >> {self.markers}/sampled; done ;;\n"
            f"  *--query-gpu*) {listing} ;;\n"
            "esac\n")
        script.chmod(0o755)
        return bin_dir

    # --- teardown -----------------------------------------------------------

    def close(self) -> None:
        """Stop every process this fleet started, and any trainer a killed worker orphaned.

        Workers go first: one whose receiver is gone would sit out its client's backoff.
        The processes' log tails are printed: pytest shows them when the test failed.
        """
        for group in (self._workers, self._receivers):
            for proc in group:
                if proc.poll() is None:
                    proc.terminate()
            for proc in group:
                stop_process(proc)
        for pid_file in self.markers.glob("*.pid"):
            pid = _read(pid_file).strip()
            if pid.isdigit():
                self.kill_trainer(int(pid))
        for log_path in sorted(self.logs.glob("*.log")):
            text = log_path.read_text(errors="replace")[-6000:]
            print(f"----- {log_path.name} -----\n{text}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _listening(proc: subprocess.Popen[bytes], log_path: Path) -> str | None:
    match = LISTENING.search(_read(log_path))
    if match:
        return match.group(1)
    if proc.poll() is not None:
        raise AssertionError(f"receiver exited {proc.returncode}:\n{_read(log_path)}")
    return None


def _healthy(receiver: Receiver) -> bool:
    if receiver.proc.poll() is not None:
        raise AssertionError(f"receiver exited {receiver.proc.returncode}:\n"
                             f"{_read(receiver.log_path)}")
    try:
        return bool(receiver.client.health()["ok"])
    except TrainfleetError:
        return False
