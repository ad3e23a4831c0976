"""Host detection against real files and tiny fake external tools (nvidia-smi, interpreters)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainfleet import __version__
from trainfleet.capability import (
    Capability,
    Gpu,
    detect,
    load_override,
    parse_meminfo,
    parse_nvidia_smi,
    self_test,
    visible_gpus,
)
from trainfleet.errors import BadRequest

posix_only = pytest.mark.skipif(os.name == "nt", reason="the fake tools are shell scripts")

TWO_GPUS = "0, NVIDIA H200, 143771, 143000\n1, NVIDIA GeForce RTX 4090, 24564, [N/A]\n"


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def fake_nvidia_smi(tmp_path: Path, stdout: str, exit_code: int = 0) -> dict[str, str]:
    """An environ whose PATH holds only an nvidia-smi that answers the GPU query with `stdout`."""
    bin_dir = tmp_path / "bin"
    write_script(
        bin_dir / "nvidia-smi",
        'case "$*" in *--query-gpu=index,name,memory.total,memory.free*) ;; *) exit 9 ;; esac\n'
        f"printf '{stdout}'\nexit {exit_code}",
    )
    return {"PATH": str(bin_dir)}


def make_cap(**changes: Any) -> Capability:
    base = Capability("gpu-a", "linux", 8, 31.2, True, (Gpu(0, "NVIDIA H200", 140.4, 139.6),))
    return replace(base, **changes)


def test_detect_reports_sane_values_for_this_host(tmp_path: Path) -> None:
    cap = detect(tmp_path)

    assert cap.hostname
    assert cap.os == platform.system().lower()
    assert cap.cpu_count >= 1
    assert cap.ram_gib > 0
    assert cap.cuda == bool(cap.gpus)
    assert cap.python == platform.python_version()
    assert cap.version == __version__
    assert cap.git_commit is None
    assert "ram_gib" not in dict(cap.problems)
    json.dumps(cap.to_dict())


@posix_only
def test_fake_nvidia_smi_with_two_gpus_means_cuda(tmp_path: Path) -> None:
    cap = detect(tmp_path, environ=fake_nvidia_smi(tmp_path, TWO_GPUS))

    assert cap.cuda is True
    assert cap.gpus == (
        Gpu(0, "NVIDIA H200", 140.4, 139.65),
        Gpu(1, "NVIDIA GeForce RTX 4090", 23.99, None),
    )
    assert cap.max_vram_gib == 140.4
    assert "gpus" not in dict(cap.problems)


@posix_only
def test_cuda_visible_devices_keeps_listed_gpus_renumbered(tmp_path: Path) -> None:
    environ = fake_nvidia_smi(tmp_path, TWO_GPUS) | {"CUDA_VISIBLE_DEVICES": "1"}

    cap = detect(tmp_path, environ=environ)

    assert cap.gpus == (Gpu(0, "NVIDIA GeForce RTX 4090", 23.99, None),)


@posix_only
@pytest.mark.parametrize("hidden", ["", "-1"])
def test_cuda_visible_devices_can_hide_every_gpu(tmp_path: Path, hidden: str) -> None:
    environ = fake_nvidia_smi(tmp_path, TWO_GPUS) | {"CUDA_VISIBLE_DEVICES": hidden}

    cap = detect(tmp_path, environ=environ)

    assert (cap.cuda, cap.gpus, cap.problems) == (False, (), ())


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("1,0", ["NVIDIA GeForce RTX 4090", "NVIDIA H200"]),
        ("0,-1,1", ["NVIDIA H200"]),
        ("0,7", ["NVIDIA H200"]),
        ("GPU-8f2c0d1e-aaaa-bbbb-cccc-000000000000", ["NVIDIA H200", "NVIDIA GeForce RTX 4090"]),
    ],
)
def test_visible_gpus_follows_cuda_rules(value: str, names: list[str]) -> None:
    kept = visible_gpus(parse_nvidia_smi(TWO_GPUS), value)

    assert [gpu.name for gpu in kept] == names
    assert [gpu.index for gpu in kept] == list(range(len(names)))


@posix_only
def test_failing_nvidia_smi_means_no_cuda_and_a_problem(tmp_path: Path) -> None:
    environ = fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed: no driver\\n", exit_code=1)

    cap = detect(tmp_path, environ=environ)

    assert (cap.cuda, cap.gpus) == (False, ())
    assert dict(cap.problems)["gpus"] == "nvidia-smi exited 1: NVIDIA-SMI has failed: no driver"
    assert cap.hostname and cap.ram_gib > 0


@posix_only
def test_garbled_nvidia_smi_output_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    cap = detect(tmp_path, environ=fake_nvidia_smi(tmp_path, "0, Some GPU, lots, 1\\n"))

    assert cap.cuda is False
    assert "unexpected nvidia-smi line" in dict(cap.problems)["gpus"]


def test_missing_nvidia_smi_is_not_a_problem(tmp_path: Path) -> None:
    cap = detect(tmp_path, environ={"PATH": str(tmp_path)})

    assert "gpus" not in dict(cap.problems)


def test_parse_nvidia_smi_keeps_commas_in_names() -> None:
    gpus = parse_nvidia_smi("3, Tesla V100-SXM2-16GB, rev 2, 16384, 1024\n\n")

    assert gpus == (Gpu(3, "Tesla V100-SXM2-16GB, rev 2", 16.0, 1.0),)


def test_parse_nvidia_smi_keeps_gpus_without_memory_figures() -> None:
    gpus = parse_nvidia_smi("0, NVIDIA GB10, [N/A], [Not Supported]\n")

    assert gpus == (Gpu(0, "NVIDIA GB10", 0.0, None),)


def test_parse_meminfo_reads_mem_total_in_bytes() -> None:
    text = "MemTotal:       16318412 kB\nMemFree:         1000000 kB\n"

    assert parse_meminfo(text) == 16318412 * 1024
    with pytest.raises(ValueError, match="MemTotal"):
        parse_meminfo("MemFree: 1 kB\n")


@posix_only
def test_override_file_replaces_keys_and_records_them(tmp_path: Path) -> None:
    override = tmp_path / "capability.json"
    override.write_text(
        json.dumps(
            {
                "cuda": True,
                "gpus": [{"index": 0, "name": "Fake", "vram_gib": 24}],
                "ram_gib": 64,
                "hostname": "gpu-a",
            }
        ),
        encoding="utf-8",
    )
    environ = fake_nvidia_smi(tmp_path, "broken\\n", exit_code=1)

    cap = detect(tmp_path, override_file=override, environ=environ)

    assert (cap.hostname, cap.ram_gib, cap.cuda) == ("gpu-a", 64.0, True)
    assert cap.gpus == (Gpu(0, "Fake", 24.0),)
    assert cap.overridden == ("cuda", "gpus", "hostname", "ram_gib")
    assert "gpus" not in dict(cap.problems)
    assert cap.cpu_count >= 1


@posix_only
@pytest.mark.parametrize(("override", "probed"), [
    ({"cuda": False, "gpus": []}, False),  # both replaced: nothing to probe
    ({"gpus": []}, True),                  # cuda still follows what the probe finds
    ({"ram_gib": 64}, True),
])
def test_the_gpu_probe_runs_only_when_the_override_leaves_it_something_to_decide(
    tmp_path: Path, override: dict[str, Any], probed: bool,
) -> None:
    """Where nvidia-smi is absent the probe imports torch, which takes seconds: a worker
    whose override file names its GPUs (the demo's) does not pay for it."""
    marker = tmp_path / "probed"
    bin_dir = tmp_path / "bin"
    write_script(bin_dir / "nvidia-smi",
                 f"touch {marker}\nprintf '0, Fake, 24576, 24000\\n'")
    (tmp_path / "capability.json").write_text(json.dumps(override), encoding="utf-8")

    cap = detect(tmp_path, override_file=tmp_path / "capability.json",
                 environ={"PATH": str(bin_dir)})

    assert marker.exists() == probed
    assert cap.cuda == probed and len(cap.gpus) == (1 if "gpus" not in override else 0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "expected a JSON object, got [1, 2]"),
        ('{"cuda": true, "vram": 24}', "unknown key 'vram'"),
        ('{"cuda": tru', "not valid JSON"),
    ],
)
def test_bad_override_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    override = tmp_path / "capability.json"
    override.write_text(content, encoding="utf-8")

    with pytest.raises(BadRequest) as caught:
        load_override(override)

    assert caught.value.message.startswith(f"{override}: ")
    assert message in caught.value.message


def test_missing_override_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="cannot read the override file"):
        detect(tmp_path, override_file=tmp_path / "absent.json")


def test_override_with_a_bad_value_names_file_and_field(tmp_path: Path) -> None:
    override = tmp_path / "capability.json"
    override.write_text('{"ram_gib": "lots"}', encoding="utf-8")

    with pytest.raises(BadRequest) as caught:
        detect(tmp_path, override_file=override)

    assert caught.value.message == (
        f'{override}: capability.ram_gib: expected a number >= 0, got "lots"'
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hostname": ""}, 'capability.hostname: expected a non-empty string, got ""'),
        ({"hostname": None}, "capability.hostname: expected a non-empty string, got null"),
        ({"cpu_count": 0}, "capability.cpu_count: expected an integer >= 1, got 0"),
        ({"cpu_count": True}, "capability.cpu_count: expected an integer >= 1, got true"),
        ({"ram_gib": -1}, "capability.ram_gib: expected a number >= 0, got -1"),
        ({"cuda": "yes"}, 'capability.cuda: expected true or false, got "yes"'),
        ({"gpus": {}}, "capability.gpus: expected a list of GPU objects, got {}"),
        ({"gpus": [3]}, "capability.gpus[0]: expected an object, got 3"),
        (
            {"gpus": [{"name": "a", "vram_gib": 8}, {"name": "b"}]},
            "capability.gpus[1].vram_gib: expected a number >= 0, got nothing",
        ),
        ({"torch": 2}, "capability.torch: expected a string or null, got 2"),
        ({"problems": {"gpus": 1}}, "capability.problems: expected an object of strings"),
    ],
)
def test_from_dict_errors_name_the_field(changes: dict[str, object], message: str) -> None:
    data = make_cap().to_dict() | changes

    with pytest.raises(BadRequest) as caught:
        Capability.from_dict(data)

    assert message in caught.value.message


def test_from_dict_reports_every_bad_field_at_once() -> None:
    with pytest.raises(BadRequest) as caught:
        Capability.from_dict({"cpu_count": "many", "cuda": 1})

    assert caught.value.detail == [
        "capability.hostname: expected a non-empty string, got nothing",
        'capability.cpu_count: expected an integer >= 1, got "many"',
        "capability.cuda: expected true or false, got 1",
    ]


def test_from_dict_fills_defaults_and_ignores_unknown_keys() -> None:
    cap = Capability.from_dict({"hostname": "pi", "ram_gib": 4, "later_field": [1]})

    assert cap == Capability("pi", "", 1, 4.0, False)
    assert cap.max_vram_gib == 0.0


sizes = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
short_text = st.text(max_size=12)
gpus = st.builds(
    Gpu,
    index=st.integers(0, 15),
    name=short_text,
    vram_gib=sizes,
    free_vram_gib=st.none() | sizes,
)
capabilities = st.builds(
    Capability,
    hostname=st.text(min_size=1, max_size=20).filter(str.strip),
    os=st.sampled_from(["linux", "windows", "darwin", "freebsd"]),
    cpu_count=st.integers(1, 512),
    ram_gib=sizes,
    cuda=st.booleans(),
    gpus=st.lists(gpus, max_size=4).map(tuple),
    python=short_text,
    torch=st.none() | short_text,
    git_commit=st.none() | st.text("0123456789abcdef", min_size=40, max_size=40),
    version=short_text,
    overridden=st.lists(short_text, max_size=3).map(tuple),
    problems=st.dictionaries(short_text, short_text, max_size=3).map(lambda d: tuple(d.items())),
)


@given(capabilities)
def test_capability_round_trips_through_json(cap: Capability) -> None:
    assert Capability.from_dict(json.loads(json.dumps(cap.to_dict()))) == cap


def git(workdir: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(workdir), "-c", "user.name=t", "-c", "user.email=t@example.org",
         "-c", "commit.gpgsign=false", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_detected_in_a_checkout(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "first")

    assert detect(tmp_path).git_commit == git(tmp_path, "rev-parse", "HEAD")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_none_outside_a_checkout(tmp_path: Path) -> None:
    empty_repo = tmp_path / "fresh"
    empty_repo.mkdir()
    git(empty_repo, "init", "-q")

    for workdir in (tmp_path, empty_repo, None):
        cap = detect(workdir)
        assert cap.git_commit is None
        assert "git_commit" not in dict(cap.problems)


def test_self_test_passes_a_consistent_host() -> None:
    assert self_test(make_cap()) == []


def test_self_test_finds_a_broken_interpreter_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-python"

    found = self_test(make_cap(), python=str(missing))

    assert len(found) == 1
    assert found[0].startswith(f"trainer interpreter {missing}: cannot run")


@posix_only
def test_self_test_finds_an_interpreter_that_fails(tmp_path: Path) -> None:
    broken = write_script(tmp_path / "python", "echo 'no encodings module' >&2\nexit 3")

    assert self_test(make_cap(), python=str(broken)) == [
        f"trainer interpreter {broken}: exited 3: no encodings module"
    ]


def test_self_test_finds_inconsistent_capabilities() -> None:
    found = self_test(make_cap(cpu_count=0, gpus=()))

    assert found == [
        "cpu_count: expected at least 1, got 0",
        "cuda: true, but no GPU is listed, so CUDA jobs would fail here",
    ]
