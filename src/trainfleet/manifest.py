"""The training manifest: TOML -> Manifest/JobSpec/HostSpec, job ids and validation.

Loading never half-succeeds: every problem of a file is collected and raised
together as one ManifestError. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainfleet.errors import ManifestError

SCHEMA_VERSION = 1
MAX_GPUS = 64  #: the most GPUs one job may ask for (`gpus`)
HYPER_TYPES = ("int", "float", "str", "bool")
ID_FIELDS = ("model", "mode", "hyper", "split_recipe", "train_hosts", "seed")

#: Job fields that [defaults] or [models.X].defaults may set, with built-in defaults.
DEFAULTABLE: dict[str, Any] = {
    "priority": 0,
    "require_cuda": False,
    "prefer_cuda": False,
    "min_vram_gib": 0.0,
    "min_ram_gib": 0.0,
    "allowed_hosts": (),
    "max_attempts": 3,
    "max_lost": 5,
    "timeout_s": 86400.0,
    "prefer_wait_s": 3600.0,
    "stall_after_s": 0.0,
    "checkpoint_interval_s": 300.0,
    "gpus": None,  #: None: 1 when require_cuda, else 0
}
JOB_KEYS = {"name", "model", "mode", "hyper", "split_recipe", "train_hosts", "seed"} | set(
    DEFAULTABLE
)
TOP_KEYS = {"schema_version", "name", "trainer", "defaults", "models", "hosts", "jobs"}


@dataclass(frozen=True)
class TrainerSpec:
    command: tuple[str, ...]
    modes: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hyper: Mapping[str, str]  # key -> one of HYPER_TYPES
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HostSpec:
    """Host policy: an allow list (None = everything) and a deny list of model names."""

    hostname: str
    allow_jobs: tuple[str, ...] | None = None
    deny_jobs: tuple[str, ...] = ()

    def is_model_allowed(self, model: str) -> bool:
        if self.allow_jobs is not None and model not in self.allow_jobs:
            return False
        return model not in self.deny_jobs


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: str
    mode: str
    hyper: Mapping[str, Any]
    split_recipe: str | None = None
    train_hosts: tuple[str, ...] = ()
    seed: int = 0
    priority: int = 0
    require_cuda: bool = False
    prefer_cuda: bool = False
    min_vram_gib: float = 0.0
    min_ram_gib: float = 0.0
    allowed_hosts: tuple[str, ...] = ()
    max_attempts: int = 3  #: bounds trainer errors and timeouts
    max_lost: int = 5  #: bounds attempts lost with their worker
    timeout_s: float = 86400.0
    prefer_wait_s: float = 3600.0
    #: fail a live job whose progress has not moved for this long (0: never)
    stall_after_s: float = 0.0
    #: upload the trainer's newest checkpoint this often (and at shutdown); 0: never
    checkpoint_interval_s: float = 300.0
    #: GPUs of one host the job needs at once (0: a CPU job; >= 1 only with require_cuda)
    gpus: int = 0
    manifest_index: int = 0  #: position in the manifest; the last tie-breaker of claim order

    @property
    def job_id(self) -> str:
        return job_id_of(
            self.model, self.mode, self.hyper, self.split_recipe, self.train_hosts, self.seed
        )

    # A job fresh from the manifest needs what it declares; the queue may raise it later.
    @property
    def effective_vram_gib(self) -> float:
        return self.min_vram_gib

    @property
    def effective_ram_gib(self) -> float:
        return self.min_ram_gib

    @property
    def avoid_hosts(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class Manifest:
    name: str
    trainer: TrainerSpec
    models: Mapping[str, ModelSpec]
    hosts: Mapping[str, HostSpec]
    jobs: tuple[JobSpec, ...]
    source: str = "<manifest>"
    schema_version: int = SCHEMA_VERSION

    def host_policy(self, hostname: str) -> HostSpec:
        return self.hosts.get(hostname) or HostSpec(hostname)

    def is_model_allowed(self, hostname: str, model: str) -> bool:
        return self.host_policy(hostname).is_model_allowed(model)

    def job(self, name_or_id: str) -> JobSpec:
        for job in self.jobs:
            if name_or_id in (job.name, job.job_id):
                return job
        raise KeyError(name_or_id)


def job_id_of(
    model: str,
    mode: str,
    hyper: Mapping[str, Any],
    split_recipe: str | None,
    train_hosts: tuple[str, ...] | list[str],
    seed: int,
) -> str:
    """sha256 of the canonical JSON of the six identity fields: stable across machines."""
    identity = {
        "model": model,
        "mode": mode,
        "hyper": dict(hyper),
        "split_recipe": split_recipe,
        "train_hosts": list(train_hosts),
        "seed": seed,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def load(path: str | Path) -> Manifest:
    """Load and validate a manifest file; raise ManifestError with every problem found."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(str(path), [f"cannot read: {exc.strerror or exc}"]) from exc
    return loads(data, source=str(path))


def loads(text: str | bytes, source: str = "<manifest>") -> Manifest:
    """Parse and validate manifest text; raise ManifestError with every problem found."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(source, [f"not UTF-8 text: {exc}"]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(source, [f"TOML syntax error: {exc}"]) from exc
    except RecursionError as exc:  # tomllib recurses once per level of [ or {
        raise ManifestError(source, ["TOML syntax error: nested too deeply"]) from exc
    return _Validator(source).manifest(data)


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except RecursionError:  # a value nested nearly as deeply as tomllib allows
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        float(value)  # TOML integers are unbounded; floats are normalised with float()
    except OverflowError:
        return False
    return True


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


#: field -> (check, what was expected); used for defaults and job fields alike.
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "priority": (_is_int, "an integer"),
    "seed": (_is_int, "an integer"),
    "require_cuda": (lambda v: isinstance(v, bool), "true or false"),
    "prefer_cuda": (lambda v: isinstance(v, bool), "true or false"),
    "min_vram_gib": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "min_ram_gib": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "allowed_hosts": (_is_str_list, "a list of hostnames"),
    "train_hosts": (_is_str_list, "a list of strings"),
    "max_attempts": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_lost": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "timeout_s": (lambda v: _is_number(v) and v > 0, "a number of seconds > 0"),
    "prefer_wait_s": (lambda v: _is_number(v) and v >= 0, "a number of seconds >= 0"),
    "stall_after_s": (lambda v: _is_number(v) and v >= 0, "a number of seconds >= 0 (0: off)"),
    "checkpoint_interval_s": (lambda v: _is_number(v) and v >= 0,
                              "a number of seconds >= 0 (0: off)"),
    "gpus": (lambda v: _is_int(v) and 1 <= v <= MAX_GPUS, f"an integer from 1 to {MAX_GPUS}"),
    "split_recipe": (lambda v: isinstance(v, str), "a string"),
    "name": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
}
_FLOAT_FIELDS = {"min_vram_gib", "min_ram_gib", "timeout_s", "prefer_wait_s", "stall_after_s",
                 "checkpoint_interval_s"}
_HYPER_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": _is_int,
    "float": _is_number,
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
}


class _Validator:
    """Walks the parsed TOML once, collecting every problem before raising."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, where: str, expected: str, found: Any = None, *, show: bool = True) -> None:
        suffix = f", got {_show(found)}" if show else ""
        self.problems.append(f"{where}: expected {expected}{suffix}")

    def table(self, data: Any, where: str) -> dict[str, Any]:
        if isinstance(data, dict):
            return data
        self.problem(where, "a table", data)
        return {}

    def unknown_keys(self, data: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in sorted(set(data) - allowed):
            self.problems.append(
                f"{where}{key}: unknown field (expected one of {', '.join(sorted(allowed))})"
            )

    def fields(self, data: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Check and normalise known job fields (floats become float, lists tuples)."""
        good: dict[str, Any] = {}
        for key, value in data.items():
            rule = _FIELD_RULES.get(key)
            if rule is None:
                continue
            check, expected = rule
            if not check(value):
                self.problem(f"{where}{key}", expected, value)
            elif key in _FLOAT_FIELDS:
                good[key] = float(value)
            elif isinstance(value, list):
                good[key] = tuple(value)
            else:
                good[key] = value
        return good

    def manifest(self, data: dict[str, Any]) -> Manifest:
        self.unknown_keys(data, TOP_KEYS, "")
        version = data.get("schema_version")
        if not _is_int(version) or version != SCHEMA_VERSION:
            self.problem(
                "schema_version", f"{SCHEMA_VERSION} (the version this release reads)", version
            )
        name = data.get("name", Path(self.source).stem)
        if not isinstance(name, str):
            self.problem("name", "a string", name)
        trainer = self.trainer(data.get("trainer"))
        defaults = self.defaults(data.get("defaults", {}), "defaults.")
        models = self.models(data.get("models"))
        hosts = self.hosts(data.get("hosts", {}))
        jobs = self.jobs(data.get("jobs", []), trainer, models, defaults)
        if self.problems:
            raise ManifestError(self.source, self.problems)
        return Manifest(str(name), trainer, models, hosts, jobs, self.source, SCHEMA_VERSION)

    def trainer(self, data: Any) -> TrainerSpec:
        if data is None:
            self.problems.append("trainer: missing (expected a [trainer] table)")
            return TrainerSpec((), ())
        data = self.table(data, "trainer")
        self.unknown_keys(data, {"command", "modes"}, "trainer.")
        command, modes = data.get("command"), data.get("modes")
        if not (_is_str_list(command) and command):
            self.problem("trainer.command", "a non-empty list of strings", command)
            command = []
        if not (_is_str_list(modes) and modes and len(set(modes)) == len(modes)):
            self.problem("trainer.modes", "a non-empty list of distinct strings", modes)
            modes = []
        return TrainerSpec(tuple(command), tuple(modes))

    def defaults(self, data: Any, where: str) -> dict[str, Any]:
        data = self.table(data, where.rstrip("."))
        self.unknown_keys(data, set(DEFAULTABLE), where)
        return self.fields(data, where)

    def models(self, data: Any) -> dict[str, ModelSpec]:
        if data is None:
            self.problems.append("models: missing (expected at least one [models.NAME] table)")
            return {}
        models = {}
        for name, spec in self.table(data, "models").items():
            where = f"models.{name}"
            spec = self.table(spec, where)
            self.unknown_keys(spec, {"hyper", "defaults"}, where + ".")
            hyper = self.table(spec.get("hyper", {}), where + ".hyper")
            for key, kind in hyper.items():
                if kind not in HYPER_TYPES:
                    self.problem(f"{where}.hyper.{key}", f"one of {', '.join(HYPER_TYPES)}", kind)
            model_defaults = self.defaults(spec.get("defaults", {}), where + ".defaults.")
            models[name] = ModelSpec(name, dict(hyper), model_defaults)
        return models

    def hosts(self, data: Any) -> dict[str, HostSpec]:
        hosts = {}
        for hostname, spec in self.table(data, "hosts").items():
            where = f"hosts.{hostname}"
            spec = self.table(spec, where)
            self.unknown_keys(spec, {"allow_jobs", "deny_jobs"}, where + ".")
            allow, deny = spec.get("allow_jobs"), spec.get("deny_jobs", [])
            if allow is not None and not _is_str_list(allow):
                self.problem(where + ".allow_jobs", "a list of model names", allow)
                allow = None
            if not _is_str_list(deny):
                self.problem(where + ".deny_jobs", "a list of model names", deny)
                deny = []
            allow_t = tuple(allow) if allow is not None else None
            hosts[hostname] = HostSpec(hostname, allow_t, tuple(deny))
        return hosts

    def jobs(
        self,
        data: Any,
        trainer: TrainerSpec,
        models: Mapping[str, ModelSpec],
        defaults: Mapping[str, Any],
    ) -> tuple[JobSpec, ...]:
        if not isinstance(data, list):
            self.problem("jobs", "an array of [[jobs]] tables", data)
            return ()
        jobs: list[JobSpec] = []
        names: dict[str, str] = {}
        ids: dict[str, str] = {}
        for index, raw in enumerate(data):
            label = f"jobs[{index}]"
            if isinstance(raw, dict) and isinstance(raw.get("name"), str):
                label += f" {_show(raw['name'])}"
            job = self.job(raw, index, label, trainer, models, defaults)
            if job is None:
                continue
            if job.name in names:
                self.problems.append(f"{label}.name: duplicates the name of {names[job.name]}")
            elif job.job_id in ids:
                self.problems.append(
                    f"{label}: duplicates {ids[job.job_id]} (same model, mode, hyper, "
                    f"split_recipe, train_hosts and seed give the same job id)"
                )
            names.setdefault(job.name, label)
            ids.setdefault(job.job_id, label)
            jobs.append(job)
        return tuple(jobs)

    def job(
        self,
        raw: Any,
        index: int,
        label: str,
        trainer: TrainerSpec,
        models: Mapping[str, ModelSpec],
        defaults: Mapping[str, Any],
    ) -> JobSpec | None:
        before = len(self.problems)
        raw = self.table(raw, label)
        where = label + "."
        self.unknown_keys(raw, JOB_KEYS, where)
        for required in ("name", "model", "mode"):
            if required not in raw:
                self.problems.append(f"{where}{required}: missing (required)")
        model, mode = raw.get("model"), raw.get("mode")
        spec = models.get(model) if isinstance(model, str) else None
        if "model" in raw and spec is None:
            self.problem(where + "model", f"a model declared in [models] (not in {sorted(models)})",
                         model)
        if "mode" in raw and mode not in trainer.modes:
            self.problem(where + "mode", f"a mode in trainer.modes {list(trainer.modes)}", mode)
        values = dict(DEFAULTABLE)
        values.update(defaults)
        if spec is not None:
            values.update(spec.defaults)
        values.update(self.fields(raw, where))
        hyper = self.hyper(raw.get("hyper", {}), spec, where + "hyper")
        gpus = values["gpus"]
        if gpus is None:
            gpus = 1 if values["require_cuda"] else 0
        elif not values["require_cuda"]:
            self.problems.append(f"{where}gpus: gpus = {gpus} needs require_cuda = true "
                                 "(a job on GPUs must require CUDA)")
        if len(self.problems) > before:
            return None
        return JobSpec(
            name=values["name"],
            model=model,
            mode=mode,
            hyper=hyper,
            split_recipe=values.get("split_recipe"),
            train_hosts=values.get("train_hosts", ()),
            seed=values.get("seed", 0),
            priority=values["priority"],
            require_cuda=values["require_cuda"],
            prefer_cuda=values["prefer_cuda"],
            min_vram_gib=values["min_vram_gib"],
            min_ram_gib=values["min_ram_gib"],
            allowed_hosts=tuple(values["allowed_hosts"]),
            max_attempts=values["max_attempts"],
            max_lost=values["max_lost"],
            timeout_s=values["timeout_s"],
            prefer_wait_s=values["prefer_wait_s"],
            stall_after_s=values["stall_after_s"],
            checkpoint_interval_s=values["checkpoint_interval_s"],
            gpus=gpus,
            manifest_index=index,
        )

    def hyper(self, data: Any, spec: ModelSpec | None, where: str) -> dict[str, Any]:
        data = self.table(data, where)
        if spec is None:
            return {}
        hyper: dict[str, Any] = {}
        for key, value in data.items():
            kind = spec.hyper.get(key)
            if kind is None:
                declared = ", ".join(sorted(spec.hyper)) or "none"
                self.problems.append(
                    f"{where}.{key}: not declared by model {spec.name!r} (declared: {declared})"
                )
            elif kind in HYPER_TYPES and not _HYPER_CHECKS[kind](value):
                self.problem(f"{where}.{key}", f"a {kind} (declared by model {spec.name!r})", value)
            else:
                hyper[key] = float(value) if kind == "float" else value
        return hyper
