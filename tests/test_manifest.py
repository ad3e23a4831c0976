"""The manifest loader against real TOML files: defaults, job ids and every rejection rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainfleet.errors import ManifestError
from trainfleet.manifest import HostSpec, Manifest, job_id_of, load, loads

BASE = """\
schema_version = 1
name = "demo"

[trainer]
command = ["python", "train.py"]
modes = ["realistic", "oracle"]

[models.gbt]
hyper = { lr = "float", n = "int", loss = "str", early_stop = "bool" }

[models.mlp]
hyper = { lr = "float" }
"""

GOOD_JOB = 'name = "ok"\nmodel = "gbt"\nmode = "realistic"\n'


def job_text(name: str, model: str = "gbt", mode: str = "realistic", extra: str = "") -> str:
    return f'name = "{name}"\nmodel = "{model}"\nmode = "{mode}"\n{extra}'


def manifest_text(*jobs: str, base: str = BASE) -> str:
    return base + "".join(f"\n[[jobs]]\n{job}" for job in jobs)


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "training_manifest.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def rejection(tmp_path: Path, text: str | bytes) -> ManifestError:
    """Load `text` from a real file and return the ManifestError it must raise."""
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        load(path)
    assert caught.value.source == str(path)
    return caught.value


def assert_problem(error: ManifestError, *fragments: str) -> str:
    """One line of the message names the file and contains every fragment."""
    lines = str(error).splitlines()
    assert len(lines) == len(error.problems)
    for line in lines:
        if line.startswith(f"{error.source}: ") and all(f in line for f in fragments):
            return line
    raise AssertionError(f"no line of {lines!r} contains all of {fragments!r}")


def bad_second_job(extra: str, model: str = "gbt", mode: str = "realistic") -> str:
    """A manifest whose jobs[1] is named "bad" and carries `extra`."""
    return manifest_text(GOOD_JOB, job_text("bad", model, mode, extra))


def only_job(text: str) -> Any:
    (job,) = loads(text).jobs
    return job


# --- loading and defaults -------------------------------------------------------------------


def test_minimal_manifest_loads_from_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, manifest_text(GOOD_JOB))
    manifest = load(path)
    assert isinstance(manifest, Manifest)
    assert manifest.source == str(path)
    assert manifest.name == "demo"
    assert manifest.trainer.command == ("python", "train.py")
    assert manifest.trainer.modes == ("realistic", "oracle")
    assert [(j.name, j.model, j.mode) for j in manifest.jobs] == [("ok", "gbt", "realistic")]


def test_minimal_manifest_loads_from_text_and_from_utf8_bytes() -> None:
    text = manifest_text(GOOD_JOB)
    from_text = loads(text)
    from_bytes = loads(text.encode("utf-8"))
    assert from_text.source == "<manifest>"
    assert [j.job_id for j in from_text.jobs] == [j.job_id for j in from_bytes.jobs]


def test_manifest_without_jobs_loads_with_no_jobs() -> None:
    assert loads(BASE).jobs == ()


def test_manifest_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = write(tmp_path, manifest_text(GOOD_JOB).replace('name = "demo"\n', ""))
    assert load(path).name == "training_manifest"


def test_unreadable_file_raises_manifest_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ManifestError) as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}: cannot read")


def test_priority_defaults_to_zero() -> None:
    assert only_job(manifest_text(GOOD_JOB)).priority == 0


def test_built_in_defaults_apply_when_nothing_sets_a_field() -> None:
    job = only_job(manifest_text(GOOD_JOB))
    assert (job.require_cuda, job.prefer_cuda) == (False, False)
    assert (job.min_vram_gib, job.min_ram_gib) == (0.0, 0.0)
    assert job.allowed_hosts == ()
    assert job.max_attempts == 3
    assert (job.timeout_s, job.prefer_wait_s) == (86400.0, 3600.0)
    assert (job.split_recipe, job.train_hosts, job.seed, job.hyper) == (None, (), 0, {})


def test_global_defaults_override_built_ins() -> None:
    base = BASE + "\n[defaults]\npriority = 5\nmax_attempts = 7\n"
    job = only_job(manifest_text(GOOD_JOB, base=base))
    assert (job.priority, job.max_attempts) == (5, 7)


def test_model_defaults_override_global_defaults() -> None:
    base = BASE + "\n[defaults]\npriority = 5\nmax_attempts = 7\n"
    base += "\n[models.gbt.defaults]\npriority = 9\n"
    job = only_job(manifest_text(GOOD_JOB, base=base))
    assert (job.priority, job.max_attempts) == (9, 7)


def test_model_defaults_apply_only_to_that_model() -> None:
    base = BASE + "\n[models.gbt.defaults]\npriority = 9\n"
    manifest = loads(manifest_text(GOOD_JOB, job_text("net", "mlp"), base=base))
    assert [j.priority for j in manifest.jobs] == [9, 0]


def test_job_field_overrides_model_and_global_defaults() -> None:
    base = BASE + "\n[defaults]\npriority = 5\n\n[models.gbt.defaults]\npriority = 9\n"
    job = only_job(manifest_text(job_text("ok", extra="priority = -2\n"), base=base))
    assert job.priority == -2


def test_float_fields_written_as_integers_become_floats() -> None:
    job = only_job(manifest_text(job_text("ok", extra="min_vram_gib = 8\ntimeout_s = 60\n")))
    assert job.min_vram_gib == 8.0 and isinstance(job.min_vram_gib, float)
    assert job.timeout_s == 60.0 and isinstance(job.timeout_s, float)


def test_list_fields_become_tuples() -> None:
    extra = 'allowed_hosts = ["gpu-a"]\ntrain_hosts = ["cpu-a", "cpu-b"]\n'
    job = only_job(manifest_text(job_text("ok", extra=extra)))
    assert job.allowed_hosts == ("gpu-a",)
    assert job.train_hosts == ("cpu-a", "cpu-b")


def test_jobs_keep_their_manifest_position() -> None:
    manifest = loads(manifest_text(GOOD_JOB, job_text("net", "mlp")))
    assert [j.manifest_index for j in manifest.jobs] == [0, 1]
    assert manifest.job("net").model == "mlp"


# --- job ids ------------------------------------------------------------------------------

PINNED_JOB = job_text(
    "pinned",
    extra='hyper = { lr = 0.1, n = 100 }\nsplit_recipe = "time-80-20"\n'
    'train_hosts = ["gpu-a"]\nseed = 7\n',
)


def test_job_id_is_pinned_to_the_sha256_of_its_canonical_identity() -> None:
    # Hard-coded on purpose: a change here changes every job id of every deployed queue.
    job = only_job(manifest_text(PINNED_JOB))
    assert job.job_id == "ed76130b8c1611c94ba5d9d2a36ffc7812c125c9e0f0741d396425b5c421c79a"


def test_job_id_with_default_identity_fields_is_pinned() -> None:
    job = only_job(manifest_text(job_text("p", extra="hyper = { lr = 0.1, n = 100 }\nseed = 7\n")))
    assert job.job_id == "1a96ea2621a4e17d4a7d13dfcaca76dc0a52b8ac924a2ec34c22161a26e0c356"
    assert job.job_id == job_id_of("gbt", "realistic", {"n": 100, "lr": 0.1}, None, [], 7)


def test_job_ids_are_stable_across_two_loads(tmp_path: Path) -> None:
    path = write(tmp_path, manifest_text(PINNED_JOB, GOOD_JOB, job_text("net", "mlp")))
    first, second = load(path), load(path)
    assert [j.job_id for j in first.jobs] == [j.job_id for j in second.jobs]


def test_same_model_and_mode_with_different_hyper_get_different_ids() -> None:
    manifest = loads(
        manifest_text(
            job_text("a", extra="hyper = { lr = 0.1 }\n"),
            job_text("b", extra="hyper = { lr = 0.2 }\n"),
        )
    )
    a, b = manifest.jobs
    assert a.job_id != b.job_id


@pytest.mark.parametrize(
    "extra",
    ['split_recipe = "kfold-5"\n', 'train_hosts = ["gpu-a"]\n', "seed = 1\n"],
    ids=["split_recipe", "train_hosts", "seed"],
)
def test_each_other_identity_field_changes_the_id(extra: str) -> None:
    manifest = loads(manifest_text(GOOD_JOB, job_text("changed", extra=extra)))
    a, b = manifest.jobs
    assert a.job_id != b.job_id


def test_name_priority_and_constraints_do_not_change_the_id() -> None:
    plain = only_job(manifest_text(job_text("a", extra="hyper = { lr = 0.1 }\n")))
    extra = (
        "hyper = { lr = 0.1 }\npriority = 10\nrequire_cuda = true\nprefer_cuda = true\n"
        'min_vram_gib = 24\nmin_ram_gib = 64\nallowed_hosts = ["gpu-a"]\nmax_attempts = 9\n'
        "timeout_s = 60\nprefer_wait_s = 0\n"
    )
    decorated = only_job(manifest_text(job_text("a-renamed", extra=extra)))
    assert decorated.job_id == plain.job_id


def test_int_for_a_float_hyper_gives_the_same_id_as_the_float() -> None:
    as_int = only_job(manifest_text(job_text("a", extra="hyper = { lr = 1 }\n")))
    as_float = only_job(manifest_text(job_text("a", extra="hyper = { lr = 1.0 }\n")))
    assert as_int.hyper == {"lr": 1.0} and isinstance(as_int.hyper["lr"], float)
    assert as_int.job_id == as_float.job_id


def test_int_and_float_of_the_same_value_in_one_manifest_are_duplicates(tmp_path: Path) -> None:
    text = manifest_text(
        job_text("a", extra="hyper = { lr = 1 }\n"), job_text("b", extra="hyper = { lr = 1.0 }\n")
    )
    assert_problem(rejection(tmp_path, text), 'jobs[1] "b"', "duplicates", 'jobs[0] "a"')


# --- rejections ---------------------------------------------------------------------------


def test_unknown_top_level_key_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, manifest_text(GOOD_JOB, base="owner = 'me'\n" + BASE))
    assert_problem(error, "owner", "unknown field")


def test_unknown_job_field_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job("gpu_count = 2\n"))
    assert_problem(error, 'jobs[1] "bad".gpu_count', "unknown field")


def test_unknown_field_in_defaults_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, manifest_text(GOOD_JOB, base=BASE + "\n[defaults]\nseed = 3\n"))
    assert_problem(error, "defaults.seed", "unknown field")


def test_unknown_model_is_rejected_listing_the_declared_ones(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job("", model="xgb"))
    assert_problem(error, 'jobs[1] "bad".model', "not in", "gbt", "mlp", '"xgb"')


def test_unknown_mode_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job("", mode="cheating"))
    assert_problem(error, 'jobs[1] "bad".mode', "mode", '"cheating"')


def test_missing_required_job_field_is_rejected(tmp_path: Path) -> None:
    text = manifest_text(GOOD_JOB, 'name = "bad"\nmodel = "gbt"\n')
    assert_problem(rejection(tmp_path, text), 'jobs[1] "bad".mode', "missing")


def test_hyper_key_not_declared_by_the_model_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job("hyper = { depth = 3 }\n", model="mlp"))
    assert_problem(error, 'jobs[1] "bad".hyper.depth', "not declared", "'mlp'")


def test_string_for_a_float_hyper_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job('hyper = { lr = "fast" }\n'))
    assert_problem(error, 'jobs[1] "bad".hyper.lr', "expected a float", '"fast"')


def test_bool_for_an_int_hyper_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job("hyper = { n = true }\n"))
    assert_problem(error, 'jobs[1] "bad".hyper.n', "expected a int", "true")


@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", "true"), ("n", "1.5"), ("loss", "3"), ("early_stop", "1"), ("lr", "[0.1]")],
)
def test_hyper_value_of_any_other_wrong_type_is_rejected(
    tmp_path: Path, key: str, value: str
) -> None:
    error = rejection(tmp_path, bad_second_job(f"hyper = {{ {key} = {value} }}\n"))
    assert_problem(error, f'jobs[1] "bad".hyper.{key}', "expected a")


def test_model_declaring_an_unknown_hyper_type_is_rejected_not_crashed(tmp_path: Path) -> None:
    base = BASE.replace('hyper = { lr = "float" }', 'hyper = { lr = "double", d = ["int"] }')
    text = manifest_text(
        GOOD_JOB, job_text("bad", "mlp", extra="hyper = { lr = 1, d = 2 }\n"), base=base
    )
    error = rejection(tmp_path, text)
    assert_problem(error, "models.mlp.hyper.lr", '"double"')
    assert_problem(error, "models.mlp.hyper.d", '["int"]')


def test_two_jobs_identical_in_content_are_rejected_as_duplicates(tmp_path: Path) -> None:
    error = rejection(tmp_path, manifest_text(GOOD_JOB, job_text("bad")))
    assert_problem(error, 'jobs[1] "bad"', "duplicates", 'jobs[0] "ok"', "same job id")


def test_two_jobs_with_the_same_name_are_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, manifest_text(GOOD_JOB, job_text("ok", "mlp")))
    assert_problem(error, 'jobs[1] "ok".name', "duplicates the name", 'jobs[0] "ok"')


def test_negative_min_vram_gib_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job("min_vram_gib = -1\n"))
    assert_problem(error, 'jobs[1] "bad".min_vram_gib', "expected a number >= 0", "got -1")


def test_negative_min_ram_gib_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job("min_ram_gib = -0.5\n"))
    assert_problem(error, 'jobs[1] "bad".min_ram_gib', "expected a number >= 0", "got -0.5")


def test_non_numeric_resource_is_rejected_showing_the_value(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job('min_vram_gib = "lots"\n'))
    line = assert_problem(error, 'jobs[1] "bad".min_vram_gib')
    assert line == f'{error.source}: jobs[1] "bad".min_vram_gib: expected a number >= 0, got "lots"'


def test_integer_too_large_for_a_float_field_is_rejected_not_crashed(tmp_path: Path) -> None:
    huge = "9" * 400
    text = manifest_text(
        GOOD_JOB, job_text("bad", extra=f"min_ram_gib = {huge}\nhyper = {{ lr = {huge} }}\n")
    )
    error = rejection(tmp_path, text)
    assert_problem(error, 'jobs[1] "bad".min_ram_gib', "a number >= 0")
    assert_problem(error, 'jobs[1] "bad".hyper.lr', "a float")


def test_max_attempts_zero_is_rejected(tmp_path: Path) -> None:
    error = rejection(tmp_path, bad_second_job("max_attempts = 0\n"))
    assert_problem(error, 'jobs[1] "bad".max_attempts', "an integer >= 1", "got 0")


def test_invalid_value_in_defaults_is_rejected(tmp_path: Path) -> None:
    base = BASE + "\n[models.gbt.defaults]\nmax_attempts = 0\n"
    error = rejection(tmp_path, manifest_text(GOOD_JOB, base=base))
    assert_problem(error, "models.gbt.defaults.max_attempts", "an integer >= 1")


def test_schema_version_2_is_rejected(tmp_path: Path) -> None:
    text = manifest_text(GOOD_JOB, base=BASE.replace("schema_version = 1", "schema_version = 2"))
    assert_problem(rejection(tmp_path, text), "schema_version", "expected 1", "got 2")


def test_missing_schema_version_is_rejected(tmp_path: Path) -> None:
    text = manifest_text(GOOD_JOB, base=BASE.replace("schema_version = 1\n", ""))
    assert_problem(rejection(tmp_path, text), "schema_version", "expected 1", "got null")


def test_boolean_schema_version_is_rejected(tmp_path: Path) -> None:
    text = manifest_text(GOOD_JOB, base=BASE.replace("schema_version = 1", "schema_version = true"))
    assert_problem(rejection(tmp_path, text), "schema_version", "expected 1", "got true")


def test_missing_trainer_is_rejected(tmp_path: Path) -> None:
    base = BASE.replace('[trainer]\ncommand = ["python", "train.py"]\n', "")
    base = base.replace('modes = ["realistic", "oracle"]\n', "")
    error = rejection(tmp_path, base)
    assert_problem(error, "trainer: missing", "[trainer]")


@pytest.mark.parametrize(
    "command",
    ['"python train.py"', "[]", '["python", 3]'],
    ids=["string", "empty-list", "non-string-item"],
)
def test_bad_trainer_command_is_rejected(tmp_path: Path, command: str) -> None:
    text = manifest_text(GOOD_JOB, base=BASE.replace('["python", "train.py"]', command))
    assert_problem(rejection(tmp_path, text), "trainer.command", "a non-empty list of strings")


def test_duplicate_trainer_modes_are_rejected(tmp_path: Path) -> None:
    base = BASE.replace('["realistic", "oracle"]', '["realistic", "realistic"]')
    assert_problem(rejection(tmp_path, base), "trainer.modes", "distinct strings")


def test_host_allow_jobs_that_is_not_a_list_is_rejected(tmp_path: Path) -> None:
    base = BASE + '\n[hosts.gpu-a]\nallow_jobs = "gbt"\n'
    assert_problem(rejection(tmp_path, base), "hosts.gpu-a.allow_jobs", "a list of model names")


def test_host_deny_jobs_that_is_not_a_list_is_rejected(tmp_path: Path) -> None:
    base = BASE + "\n[hosts.gpu-a]\ndeny_jobs = { gbt = true }\n"
    assert_problem(rejection(tmp_path, base), "hosts.gpu-a.deny_jobs", "a list of model names")


def test_unknown_host_field_is_rejected(tmp_path: Path) -> None:
    base = BASE + "\n[hosts.gpu-a]\nmax_jobs = 2\n"
    assert_problem(rejection(tmp_path, base), "hosts.gpu-a.max_jobs", "unknown field")


def test_toml_syntax_error_keeps_line_and_column(tmp_path: Path) -> None:
    text = manifest_text(GOOD_JOB) + "priority = = 3\n"
    error = rejection(tmp_path, text)
    line_number = text.splitlines().index("priority = = 3") + 1
    assert_problem(error, "TOML syntax error", f"line {line_number}", "column 12")


def test_non_utf8_bytes_are_rejected(tmp_path: Path) -> None:
    data = manifest_text(GOOD_JOB).encode("utf-8").replace(b"demo", b"d\xffmo")
    assert_problem(rejection(tmp_path, data), "not UTF-8")


def test_deep_nesting_only_raises_manifest_error_at_any_depth(tmp_path: Path) -> None:
    # tomllib recurses per level; both the parser and the message must survive any depth.
    for depth in range(50, 1500, 25):
        nested = "[" * depth + "]" * depth
        with pytest.raises(ManifestError):
            loads(BASE.replace('["python", "train.py"]', nested))


def test_all_problems_of_a_file_are_reported_together(tmp_path: Path) -> None:
    text = manifest_text(
        GOOD_JOB,
        job_text("bad", extra="min_vram_gib = -1\n"),
        job_text("worse", model="xgb"),
        base="owner = 'me'\n" + BASE,
    )
    error = rejection(tmp_path, text)
    assert len(error.problems) == 3
    assert_problem(error, "owner", "unknown field")
    assert_problem(error, 'jobs[1] "bad".min_vram_gib')
    assert_problem(error, 'jobs[2] "worse".model', "not in")
    assert error.detail == str(error).splitlines()


# --- host policy --------------------------------------------------------------------------

HOSTS = """
[hosts.gpu-a]
allow_jobs = ["gbt"]

[hosts.cpu-a]
deny_jobs = ["mlp"]

[hosts.both]
allow_jobs = ["gbt", "mlp"]
deny_jobs = ["mlp"]
"""


def test_host_spec_allow_jobs_admits_only_listed_models() -> None:
    host = HostSpec("gpu-a", allow_jobs=("gbt",))
    assert host.is_model_allowed("gbt")
    assert not host.is_model_allowed("mlp")


def test_host_spec_deny_jobs_excludes_listed_models() -> None:
    host = HostSpec("cpu-a", deny_jobs=("mlp",))
    assert host.is_model_allowed("gbt")
    assert not host.is_model_allowed("mlp")


def test_host_spec_deny_wins_over_allow() -> None:
    assert not HostSpec("both", allow_jobs=("mlp",), deny_jobs=("mlp",)).is_model_allowed("mlp")


def test_host_spec_with_empty_allow_list_admits_nothing() -> None:
    assert not HostSpec("idle", allow_jobs=()).is_model_allowed("gbt")


def test_manifest_hosts_are_loaded_into_host_specs() -> None:
    manifest = loads(manifest_text(GOOD_JOB, base=BASE + HOSTS))
    assert manifest.hosts["gpu-a"] == HostSpec("gpu-a", ("gbt",), ())
    assert manifest.hosts["cpu-a"] == HostSpec("cpu-a", None, ("mlp",))


def test_manifest_is_model_allowed_follows_each_host_policy() -> None:
    manifest = loads(manifest_text(GOOD_JOB, base=BASE + HOSTS))
    assert manifest.is_model_allowed("gpu-a", "gbt")
    assert not manifest.is_model_allowed("gpu-a", "mlp")
    assert manifest.is_model_allowed("cpu-a", "gbt")
    assert not manifest.is_model_allowed("cpu-a", "mlp")
    assert manifest.is_model_allowed("both", "gbt")
    assert not manifest.is_model_allowed("both", "mlp")


def test_manifest_allows_every_model_on_an_unknown_host() -> None:
    manifest = loads(manifest_text(GOOD_JOB, base=BASE + HOSTS))
    assert manifest.is_model_allowed("never-seen", "gbt")
    assert manifest.is_model_allowed("never-seen", "mlp")
    assert manifest.host_policy("never-seen") == HostSpec("never-seen")


# --- properties ---------------------------------------------------------------------------

HYPER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "lr": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**6), 10**6)),
    "n": st.integers(-(2**63), 2**63 - 1),
    "loss": st.text(alphabet="abcxyz-_ 0189", max_size=8),
    "early_stop": st.booleans(),
}
MODEL_HYPER = {"gbt": ("lr", "n", "loss", "early_stop"), "mlp": ("lr",)}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


@st.composite
def job_fields(draw: st.DrawFn) -> dict[str, Any]:
    model = draw(st.sampled_from(sorted(MODEL_HYPER)))
    keys = draw(st.lists(st.sampled_from(MODEL_HYPER[model]), unique=True))
    fields: dict[str, Any] = {
        "model": model,
        "mode": draw(st.sampled_from(["realistic", "oracle"])),
        "hyper": {key: draw(HYPER_VALUES[key]) for key in keys},
        "seed": draw(st.integers(0, 3)),
    }
    if draw(st.booleans()):
        fields["split_recipe"] = draw(st.sampled_from(["time-80-20", "kfold-5"]))
    if draw(st.booleans()):
        fields["train_hosts"] = draw(st.lists(st.sampled_from(["a", "b"]), max_size=2))
    if draw(st.booleans()):
        fields["priority"] = draw(st.integers(-5, 5))
    if draw(st.booleans()):
        fields["min_vram_gib"] = draw(st.integers(0, 80))
    return fields


def identity(fields: dict[str, Any]) -> str:
    """Content key with float hypers normalised, as the loader does; -0.0 stays distinct."""
    hyper = {k: float(v) if k == "lr" else v for k, v in fields["hyper"].items()}
    ident = [
        fields["model"],
        fields["mode"],
        hyper,
        fields.get("split_recipe"),
        fields.get("train_hosts", []),
        fields["seed"],
    ]
    return json.dumps(ident, sort_keys=True)


@st.composite
def valid_manifests(draw: st.DrawFn) -> tuple[str, list[str]]:
    """TOML text of a valid manifest, and its job names in order."""
    unique: dict[str, dict[str, Any]] = {}
    for fields in draw(st.lists(job_fields(), max_size=12)):
        unique.setdefault(identity(fields), fields)
    names = [f"job-{index}" for index in range(len(unique))]
    parts = [BASE]
    if draw(st.booleans()):
        parts.append("[defaults]\npriority = 1\nmax_attempts = 2\n")
    for name, fields in zip(names, unique.values(), strict=True):
        parts.append("[[jobs]]")
        parts.append(f"name = {toml_value(name)}")
        parts.extend(f"{key} = {toml_value(value)}" for key, value in fields.items())
    return "\n".join(parts) + "\n", names


@settings(max_examples=200, deadline=None)
@given(valid_manifests())
def test_random_valid_manifests_load_with_stable_ids(case: tuple[str, list[str]]) -> None:
    text, names = case
    first, second = loads(text), loads(text)
    assert [j.name for j in first.jobs] == names
    ids = [j.job_id for j in first.jobs]
    assert ids == [j.job_id for j in second.jobs]
    assert len(set(ids)) == len(ids)


TOML_KEYS = sorted(
    {
        "schema_version",
        "name",
        "model",
        "mode",
        "hyper",
        "priority",
        "seed",
        "min_vram_gib",
        "max_attempts",
        "allowed_hosts",
        "train_hosts",
        "command",
        "modes",
        "allow_jobs",
        "deny_jobs",
        "lr",
        "n",
        "defaults",
        "trainer",
        "jobs",
        "models",
        "hosts",
    }
)
TOML_VALUES = st.one_of(
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(
        [
            "true",
            "false",
            '""',
            '"gbt"',
            '"realistic"',
            "[]",
            "{}",
            "[[]]",
            "inf",
            "nan",
            "-0",
            "1979-05-27T07:32:00Z",
            "{ lr = 1 }",
            '["a", 1]',
            "[{}]",
            '"int"',
            '"float"',
            "9" * 400,
        ]
    ),
    st.text(max_size=10),
)
TOML_LINES = st.one_of(
    st.sampled_from(
        [
            "[[jobs]]",
            "[trainer]",
            "[defaults]",
            "[models.gbt]",
            "[models.x.hyper]",
            "[models.gbt.defaults]",
            "[hosts.h]",
            "[jobs]",
            "[[models]]",
            "",
            "][",
        ]
    ),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(TOML_KEYS), TOML_VALUES),
    st.builds(lambda k, v: f"{k} = {v}", st.text(max_size=6), TOML_VALUES),
    st.text(max_size=20),
)


WELL_FORMED_VALUES = st.one_of(
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(
        [
            "true",
            "false",
            '""',
            '"gbt"',
            '"mlp"',
            '"realistic"',
            '"oracle"',
            "[]",
            "{}",
            "[[]]",
            "[{}]",
            '["a", 1]',
            '["gbt"]',
            "{ lr = 1 }",
            "{ n = 2.5 }",
            '{ lr = "fast" }',
            '"int"',
            '"float"',
            "1979-05-27T07:32:00Z",
            "-0",
            "9" * 400,
        ]
    ),
    st.text(max_size=10).map(lambda text: json.dumps(text, ensure_ascii=False)),
)


@st.composite
def well_formed_documents(draw: st.DrawFn) -> str:
    """Parseable TOML: random known keys and values in [[jobs]], [hosts.*] and [models.*]."""
    parts = [draw(st.sampled_from([BASE, manifest_text(GOOD_JOB), BASE.replace("1", "2")]))]
    headers = st.sampled_from(
        [
            "[[jobs]]",
            "[[jobs]]",
            "[hosts.h{i}]",
            "[models.m{i}]",
            "[models.m{i}.hyper]",
            "[models.m{i}.defaults]",
        ]
    )
    for index in range(draw(st.integers(0, 6))):
        parts.append(draw(headers).format(i=index))
        keys = draw(st.lists(st.sampled_from(TOML_KEYS), unique=True, max_size=6))
        parts.extend(f"{key} = {draw(WELL_FORMED_VALUES)}" for key in keys)
    return "\n".join(parts) + "\n"


def loads_or_manifest_error(data: str | bytes) -> None:
    try:
        loads(data, source="fuzz.toml")
    except ManifestError as exc:
        assert exc.problems and str(exc).startswith("fuzz.toml: ")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_random_text_only_ever_raises_manifest_error(text: str) -> None:
    loads_or_manifest_error(text)


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_random_bytes_only_ever_raise_manifest_error(data: bytes) -> None:
    loads_or_manifest_error(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["", BASE, manifest_text(GOOD_JOB)]), st.lists(TOML_LINES, max_size=25))
def test_toml_like_fragments_only_ever_raise_manifest_error(prefix: str, lines: list[str]) -> None:
    loads_or_manifest_error(prefix + "\n".join(lines))


@settings(max_examples=200, deadline=None)
@given(well_formed_documents())
def test_well_formed_toml_with_random_fields_only_ever_raises_manifest_error(text: str) -> None:
    loads_or_manifest_error(text)
