"""What the benchmarks feed the product: manifests of tiny jobs, built in Python or as TOML."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from trainfleet.capability import Capability
from trainfleet.manifest import HostSpec, JobSpec, Manifest, ModelSpec, TrainerSpec

BENCH_HOST = "bench-cpu"  #: the hostname every benchmark client claims as
OTHER_HOST = "bench-elsewhere"
TRAINER = ("{python}", "-c", "pass")
MODELS = {
    "gbt": ModelSpec("gbt", {"lr": "float"}),
    "transformer": ModelSpec("transformer", {"epochs": "int"}),
    "sleeper": ModelSpec("sleeper", {}),
}
HOSTS = {BENCH_HOST: HostSpec(BENCH_HOST, None, ("transformer",))}
TOML_HEADER = f"""schema_version = 1
name = "bench"

[trainer]
command = {list(TRAINER)!r}
modes = ["realistic"]

[defaults]
max_attempts = 3

[models.gbt]
hyper = {{ lr = "float" }}
[models.transformer]
hyper = {{ epochs = "int" }}
[models.sleeper]
hyper = {{}}

[hosts.{BENCH_HOST}]
deny_jobs = ["transformer"]
""".replace("'", '"')


def cpu_capability(hostname: str = BENCH_HOST) -> Capability:
    """A CPU-only host, as a worker on it would describe itself."""
    return Capability(hostname=hostname, os="linux", cpu_count=4, ram_gib=16.0, cuda=False,
                      python="3.11.7", version="bench")


def eligible_job(i: int, max_attempts: int = 3) -> JobSpec:
    return JobSpec(name=f"j{i}", model="gbt", mode="realistic", hyper={"lr": 0.1}, seed=i,
                   max_attempts=max_attempts, manifest_index=i)


def ineligible_job(i: int, max_attempts: int = 3, priority: int = 0) -> JobSpec:
    """A job BENCH_HOST may not run, for one of three reasons in turn: CUDA, hosts, policy."""
    reason = (i // 2) % 3
    if reason == 0:
        return JobSpec(name=f"j{i}", model="gbt", mode="realistic", hyper={"lr": 0.2}, seed=i,
                       require_cuda=True, priority=priority, max_attempts=max_attempts,
                       manifest_index=i)
    if reason == 1:
        return JobSpec(name=f"j{i}", model="gbt", mode="realistic", hyper={"lr": 0.3}, seed=i,
                       allowed_hosts=(OTHER_HOST,), priority=priority, max_attempts=max_attempts,
                       manifest_index=i)
    return JobSpec(name=f"j{i}", model="transformer", mode="realistic", hyper={"epochs": 1},
                   seed=i, priority=priority, max_attempts=max_attempts, manifest_index=i)


def half_ineligible(n: int, *, ahead: bool = False, max_attempts: int = 3) -> list[JobSpec]:
    """n jobs, every other one ineligible for BENCH_HOST; `ahead` ranks the ineligible first."""
    return [
        ineligible_job(i, max_attempts, priority=1 if ahead else 0) if i % 2
        else eligible_job(i, max_attempts)
        for i in range(n)
    ]


def manifest(jobs: Iterable[JobSpec]) -> Manifest:
    return Manifest(name="bench", trainer=TrainerSpec(TRAINER, ("realistic",)), models=MODELS,
                    hosts=HOSTS, jobs=tuple(jobs), source="bench")


def toml_job(job: JobSpec) -> str:
    """One [[jobs]] table; only the fields the benchmark jobs set."""
    lines = ["[[jobs]]", f'name = "{job.name}"', f'model = "{job.model}"',
             f'mode = "{job.mode}"', f"seed = {job.seed}"]
    lines.append("hyper = { " + ", ".join(f"{k} = {v!r}" for k, v in job.hyper.items()) + " }")
    if job.require_cuda:
        lines.append("require_cuda = true")
    if job.allowed_hosts:
        lines.append("allowed_hosts = [" + ", ".join(f'"{h}"' for h in job.allowed_hosts) + "]")
    if job.priority:
        lines.append(f"priority = {job.priority}")
    return "\n".join(lines)


def manifest_toml(jobs: Iterable[JobSpec]) -> str:
    return TOML_HEADER + "\n" + "\n\n".join(toml_job(job) for job in jobs) + "\n"


def write_manifest(path: Path, jobs: Iterable[JobSpec]) -> Path:
    path.write_text(manifest_toml(jobs))
    return path
