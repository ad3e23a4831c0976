"""What a host can do (cores, RAM, CUDA GPUs, versions), detected without ever crashing.

Stdlib only: the worker imports it. torch is imported lazily, and only as a fallback GPU probe.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from trainfleet import __version__
from trainfleet.errors import BadRequest

T = TypeVar("T")

NVIDIA_SMI_QUERY = [
    "--query-gpu=index,name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
]
PROBE_TIMEOUT_S = 10.0
SELF_TEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Gpu:
    """One CUDA device, numbered as the trainer's CUDA runtime will number it."""

    index: int
    name: str
    vram_gib: float
    free_vram_gib: float | None = None


@dataclass(frozen=True)
class Capability:
    """What a host offers; the receiver matches jobs against it, so unknown means "cannot"."""

    hostname: str
    os: str
    cpu_count: int
    ram_gib: float
    cuda: bool
    gpus: tuple[Gpu, ...] = ()
    python: str = ""
    torch: str | None = None
    git_commit: str | None = None
    version: str = ""
    overridden: tuple[str, ...] = ()  #: keys replaced by an override file
    problems: tuple[tuple[str, str], ...] = ()  #: (probe, why its field is unknown)

    @property
    def max_vram_gib(self) -> float:
        return max((gpu.vram_gib for gpu in self.gpus), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["gpus"] = [asdict(gpu) for gpu in self.gpus]
        data["overridden"] = list(self.overridden)
        data["problems"] = dict(self.problems)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Capability:
        """Build a capability from untrusted JSON, reporting every bad field at once."""
        if not isinstance(data, Mapping):
            raise BadRequest(f"capability: expected an object, got {_show(data)}")
        errors: list[str] = []
        r = _FieldReader(data, "capability", errors)
        values = {
            "hostname": r.take("hostname", "a non-empty string"),
            "os": r.take("os", "a string", ""),
            "cpu_count": int(r.take("cpu_count", "an integer >= 1", 1)),
            "ram_gib": float(r.take("ram_gib", "a number >= 0", 0.0)),
            "cuda": r.take("cuda", "true or false", False),
            "gpus": _gpus_from(r.take("gpus", "a list of GPU objects", []), errors),
            "python": r.take("python", "a string", ""),
            "torch": r.take("torch", "a string or null", None),
            "git_commit": r.take("git_commit", "a string or null", None),
            "version": r.take("version", "a string", ""),
            "overridden": tuple(r.take("overridden", "a list of strings", [])),
            "problems": tuple(r.take("problems", "an object of strings", {}).items()),
        }
        if errors:
            raise BadRequest("\n".join(errors), detail=errors)
        return cls(**values)


OVERRIDABLE = frozenset(f.name for f in fields(Capability)) - {"overridden", "problems"}


def detect(
    workdir: Path | None = None,
    *,
    override_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Capability:
    """Probe this host; a failing probe leaves its field unknown and is listed in `problems`.

    External tools (nvidia-smi, git) are looked up on `environ`'s PATH, so a test or an
    operator can substitute them.
    """
    env = os.environ if environ is None else environ
    path = env.get("PATH", os.defpath)
    system = platform.system().lower() or "unknown"
    probes = _Probes()
    override = None if override_file is None else load_override(override_file)
    no_gpus: tuple[Gpu, ...] = ()
    if override is not None and {"gpus", "cuda"} <= override.keys():
        gpus = no_gpus  # both replaced: no probe (torch's, where nvidia-smi is absent, takes s)
    else:
        gpus = probes.run("gpus", lambda: _detect_gpus(path, env.get("CUDA_VISIBLE_DEVICES")),
                          no_gpus)
    cap = Capability(
        hostname=probes.run("hostname", _hostname, "unknown"),
        os=system,
        cpu_count=probes.run("cpu_count", _cpu_count, 1),
        ram_gib=probes.run("ram_gib", lambda: _gib(_ram_bytes(system)), 0.0),
        cuda=bool(gpus),
        gpus=gpus,
        python=platform.python_version(),
        torch=probes.run("torch", _torch_version, None),
        git_commit=probes.run("git_commit", lambda: _git_commit(workdir, path), None),
        version=__version__,
        problems=tuple(probes.problems),
    )
    if override_file is None or override is None:
        return cap
    return _apply_override(cap, override, override_file)


def load_override(path: Path) -> dict[str, Any]:
    """Read an operator's override file; a missing or malformed one is an error, never ignored."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadRequest(f"{path}: cannot read the override file: {exc}") from exc
    except ValueError as exc:
        raise BadRequest(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"{path}: expected a JSON object, got {_show(data)}")
    unknown = sorted(set(data) - OVERRIDABLE)
    if unknown:
        raise BadRequest(
            f"{path}: unknown key {', '.join(map(repr, unknown))}"
            f" (known: {', '.join(sorted(OVERRIDABLE))})"
        )
    return data


def self_test(cap: Capability, python: str = sys.executable) -> list[str]:
    """Problems that would make jobs fail on this host; an empty list means fine."""
    found = _interpreter_problems(python)
    if cap.cpu_count < 1:
        found.append(f"cpu_count: expected at least 1, got {cap.cpu_count}")
    if cap.cuda and not cap.gpus:
        found.append("cuda: true, but no GPU is listed, so CUDA jobs would fail here")
    return found


def parse_meminfo(text: str) -> int:
    """Total RAM in bytes from the text of /proc/meminfo."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "MemTotal":
            return int(value.split()[0]) * 1024
    raise ValueError("no MemTotal line in /proc/meminfo")


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """GPUs from `nvidia-smi --query-gpu=index,name,memory.total,memory.free` CSV in MiB.

    A GPU that does not report its total memory is kept with 0 GiB: it still runs CUDA jobs.
    """
    return tuple(_parse_gpu_line(line) for line in text.splitlines() if line.strip())


def visible_gpus(gpus: Sequence[Gpu], cuda_visible_devices: str | None) -> tuple[Gpu, ...]:
    """The GPUs CUDA_VISIBLE_DEVICES exposes, renumbered from 0 as CUDA numbers them.

    As in CUDA, the list ends at its first entry that is not a GPU index, so "" and "-1"
    hide every GPU. UUIDs cannot be matched against nvidia-smi indices here: they keep all.
    """
    if cuda_visible_devices is None:
        return tuple(gpus)
    tokens = [token.strip() for token in cuda_visible_devices.split(",")]
    if any(token.startswith(("GPU-", "MIG-")) for token in tokens):
        return tuple(gpus)
    by_index = {gpu.index: gpu for gpu in gpus}
    kept: list[Gpu] = []
    for token in tokens:
        gpu = by_index.get(int(token)) if token.isdecimal() else None
        if gpu is None or gpu in kept:
            break
        kept.append(gpu)
    return tuple(replace(gpu, index=i) for i, gpu in enumerate(kept))


class _Probes:
    """Runs each probe in isolation, so one broken tool costs one field, not the worker."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def run(self, name: str, probe: Callable[[], T], unknown: T) -> T:
        try:
            return probe()
        except Exception as exc:
            self.problems.append((name, str(exc) or type(exc).__name__))
            return unknown


def _hostname() -> str:
    name = socket.gethostname() or platform.node()
    if not name:
        raise OSError("the system reports no hostname")
    return name


def _cpu_count() -> int:
    """Cores this process may use: the affinity mask beats the machine total in containers."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    count = os.cpu_count()
    if count is None:
        raise OSError("os.cpu_count() cannot tell")
    return count


def _ram_bytes(system: str) -> int:
    if system == "linux":
        return parse_meminfo(Path("/proc/meminfo").read_text(encoding="ascii"))
    if system == "darwin":
        return int(_run_tool(["/usr/sbin/sysctl", "-n", "hw.memsize"]))
    if system == "windows":
        return _windows_ram_bytes()
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _MemoryStatusEx(ctypes.Structure):
    _fields_ = [
        ("dwLength", ctypes.c_ulong),
        ("dwMemoryLoad", ctypes.c_ulong),
        ("ullTotalPhys", ctypes.c_ulonglong),
        ("ullAvailPhys", ctypes.c_ulonglong),
        ("ullTotalPageFile", ctypes.c_ulonglong),
        ("ullAvailPageFile", ctypes.c_ulonglong),
        ("ullTotalVirtual", ctypes.c_ulonglong),
        ("ullAvailVirtual", ctypes.c_ulonglong),
        ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
    ]


def _windows_ram_bytes() -> int:
    if sys.platform != "win32":
        raise OSError("GlobalMemoryStatusEx exists only on Windows")
    status = _MemoryStatusEx()
    status.dwLength = ctypes.sizeof(status)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        raise ctypes.WinError()
    return int(status.ullTotalPhys)


def free_vram(environ: Mapping[str, str] | None = None) -> dict[int, float]:
    """Each GPU's free memory now, in GiB, by the index CUDA gives it here (nvidia-smi);
    empty when that cannot be read."""
    env = os.environ if environ is None else environ
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if smi is None:
        return {}
    try:
        gpus = parse_nvidia_smi(_run_tool([smi, *NVIDIA_SMI_QUERY]))
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    visible = visible_gpus(gpus, env.get("CUDA_VISIBLE_DEVICES"))
    return {gpu.index: gpu.free_vram_gib for gpu in visible if gpu.free_vram_gib is not None}


def most_vram_on_one_gpu_gib(pids: Sequence[int], environ: Mapping[str, str] | None = None
                             ) -> float | None:
    """The most GPU memory these processes hold together on any one GPU now, in GiB
    (nvidia-smi's compute apps, added up per GPU); None when that cannot be read. Per GPU,
    as a job's min_vram_gib is declared: a job on several GPUs often holds more on one of
    them (data-parallel rank 0), and its share of the total would understate what it needs."""
    env = os.environ if environ is None else environ
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if smi is None or not pids:
        return None
    query = ["--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"]
    wanted = set(pids)
    per_gpu: dict[str, float] = {}
    try:
        for line in _run_tool([smi, *query]).splitlines():
            if not line.strip():
                continue
            pid, gpu, used = (part.strip() for part in line.split(","))
            gib = _mib_to_gib(used)
            if int(pid) in wanted and gib is not None:
                per_gpu[gpu] = per_gpu.get(gpu, 0.0) + gib
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return round(max(per_gpu.values(), default=0.0), 3)


def _detect_gpus(path: str, cuda_visible_devices: str | None) -> tuple[Gpu, ...]:
    """nvidia-smi's view of the GPUs; torch's only where nvidia-smi is not installed."""
    smi = shutil.which("nvidia-smi", path=path)
    if smi is None:
        return _torch_gpus()
    gpus = parse_nvidia_smi(_run_tool([smi, *NVIDIA_SMI_QUERY]))
    return visible_gpus(gpus, cuda_visible_devices)


def _torch_gpus() -> tuple[Gpu, ...]:
    """GPUs as torch sees them, already filtered by this process's CUDA_VISIBLE_DEVICES."""
    if importlib.util.find_spec("torch") is None:
        return ()
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        return ()
    devices = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return tuple(
        Gpu(i, str(props.name), _gib(int(props.total_memory))) for i, props in enumerate(devices)
    )


def _parse_gpu_line(line: str) -> Gpu:
    try:
        index, rest = line.split(",", 1)
        name, total_mib, free_mib = rest.rsplit(",", 2)
        total = _mib_to_gib(total_mib)
        return Gpu(int(index), name.strip(), 0.0 if total is None else total, _mib_to_gib(free_mib))
    except ValueError as exc:
        raise ValueError(f"unexpected nvidia-smi line {line.strip()!r}") from exc


def _torch_version() -> str | None:
    """The installed torch's version, read from its metadata because importing it takes seconds."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(workdir: Path | None, path: str) -> str | None:
    """HEAD of the checkout in `workdir`; None when it is none (or git is not installed)."""
    git = shutil.which("git", path=path)
    if workdir is None or git is None:
        return None
    done = subprocess.run(
        [git, "-C", str(workdir), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _run_tool(argv: list[str]) -> str:
    """The tool's stdout; a nonzero exit becomes an error carrying its last words."""
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        last = f": {said[-1]}" if said else ""
        raise OSError(f"{Path(argv[0]).name} exited {done.returncode}{last}")
    return done.stdout


def _interpreter_problems(python: str) -> list[str]:
    try:
        done = subprocess.run(
            [python, "-c", "import sys"],
            capture_output=True,
            text=True,
            timeout=SELF_TEST_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"trainer interpreter {python}: cannot run: {exc}"]
    if done.returncode != 0:
        return [f"trainer interpreter {python}: exited {done.returncode}: {done.stderr.strip()}"]
    return []


def _apply_override(cap: Capability, override: Mapping[str, Any], path: Path) -> Capability:
    """Replace detected fields; a probe problem of a replaced field no longer matters."""
    data = cap.to_dict() | dict(override)
    data["overridden"] = sorted(override)
    data["problems"] = {probe: why for probe, why in cap.problems if probe not in override}
    try:
        return Capability.from_dict(data)
    except BadRequest as exc:
        lines = [f"{path}: {line}" for line in exc.message.splitlines()]
        raise BadRequest("\n".join(lines), detail=lines) from exc


def _gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 2)


def _mib_to_gib(text: str) -> float | None:
    """GiB from nvidia-smi's MiB; None for its "[N/A]" or "[Not Supported]" (unified memory)."""
    if text.strip().startswith("["):
        return None
    return round(float(text) / 1024, 2)


_REQUIRED: Any = object()


class _FieldReader:
    """Takes typed fields out of untrusted data, collecting errors so all are reported at once."""

    def __init__(self, data: Mapping[str, Any], where: str, errors: list[str]) -> None:
        self.data = data
        self.where = where
        self.errors = errors
        self.failed = False

    def take(self, key: str, expected: str, default: Any = _REQUIRED) -> Any:
        """The field's value; `default` when it is absent, or bad (and then an error is noted)."""
        if key not in self.data and default is not _REQUIRED:
            return default
        value = self.data.get(key)
        if _CHECKS[expected](value):
            return value
        shown = _show(value) if key in self.data else "nothing"
        self.errors.append(f"{self.where}.{key}: expected {expected}, got {shown}")
        self.failed = True
        return None if default is _REQUIRED else default


def _gpus_from(raw: list[Any], errors: list[str]) -> tuple[Gpu, ...]:
    gpus = (_gpu_from(item, i, errors) for i, item in enumerate(raw))
    return tuple(gpu for gpu in gpus if gpu is not None)


def _gpu_from(raw: Any, position: int, errors: list[str]) -> Gpu | None:
    where = f"capability.gpus[{position}]"
    if not isinstance(raw, Mapping):
        errors.append(f"{where}: expected an object, got {_show(raw)}")
        return None
    r = _FieldReader(raw, where, errors)
    index = int(r.take("index", "an integer >= 0", position))
    name = r.take("name", "a string", "")
    vram = r.take("vram_gib", "a number >= 0")
    free = r.take("free_vram_gib", "a number >= 0 or null", None)
    if r.failed:
        return None
    return Gpu(index, name, float(vram), None if free is None else float(free))


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    """An integer, or a float without a fraction: JSON does not tell 4 from 4.0."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value >= 0
    except OverflowError:  # a JSON integer too large for a float
        return False


#: The check behind each expectation, so an error message states exactly the rule applied.
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "a non-empty string": lambda v: isinstance(v, str) and v.strip() != "",
    "a string or null": lambda v: v is None or isinstance(v, str),
    "true or false": lambda v: isinstance(v, bool),
    "an integer >= 0": lambda v: _is_int(v) and v >= 0,
    "an integer >= 1": lambda v: _is_int(v) and v >= 1,
    "a number >= 0": _is_size,
    "a number >= 0 or null": lambda v: v is None or _is_size(v),
    "a list of GPU objects": lambda v: isinstance(v, list | tuple),
    "a list of strings": lambda v: (
        isinstance(v, list | tuple) and all(isinstance(item, str) for item in v)
    ),
    "an object of strings": lambda v: (
        isinstance(v, Mapping)
        and all(isinstance(key, str) and isinstance(item, str) for key, item in v.items())
    ),
}
