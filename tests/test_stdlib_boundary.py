"""Workers need only the standard library: the server stack stays on the receiver's side.

Each check runs in a fresh interpreter, so what this test process imported cannot hide a leak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import job, manifest_text

WORKER_SIDE = [
    "trainfleet.worker",
    "trainfleet.client",
    "trainfleet.cli",
    "trainfleet.capability",
    "trainfleet.bundle",
    "trainfleet.manifest",
    "trainfleet.matching",
    "trainfleet.console",
    "trainfleet.demo",
    "trainfleet.failures",
    "trainfleet.trainer_process",
    "trainfleet.config",
    "trainfleet.enroll",
    "trainfleet.install",
    "trainfleet.backup",
    "trainfleet.tokens",
]
SERVER_SIDE = ["fastapi", "starlette", "uvicorn", "pydantic", "psycopg", "zstandard"]
NEEDS_SERVER_EXTRA = (
    "error: 'trainfleet receiver' needs the server extra: pip install 'trainfleet[server]'"
)

#: A sitecustomize that makes importing the named top-level packages fail, as if not installed.
BLOCKER = textwrap.dedent(
    """
    import os
    import sys

    BLOCKED = set(os.environ["TRAINFLEET_TEST_BLOCK"].split(","))


    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None


    sys.meta_path.insert(0, Blocker())
    """
)


def run_python(*args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60,
        env=env, cwd=cwd, check=False,
    )


def imported_server_modules(*modules: str) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        f"found = [m for m in sys.modules if m.partition('.')[0] in {SERVER_SIDE!r}]\n"
        "print(json.dumps(sorted(found)))\n"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    found: list[str] = json.loads(result.stdout)
    return found


@pytest.mark.parametrize("module", WORKER_SIDE)
def test_worker_side_module_imports_no_server_or_optional_package(module: str) -> None:
    assert imported_server_modules(module) == []


def test_worker_side_modules_together_import_no_server_or_optional_package() -> None:
    assert imported_server_modules(*WORKER_SIDE) == []


def test_the_check_would_see_a_server_package_if_one_were_imported() -> None:
    assert "fastapi" in imported_server_modules("trainfleet.receiver")


@pytest.mark.parametrize("blocked", ["fastapi", "uvicorn", "fastapi,starlette,pydantic,uvicorn"])
def test_receiver_without_the_server_extra_says_how_to_install_it_and_exits_1(
    tmp_path: Path, blocked: str
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(manifest_text([job("alpha")]))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TRAINFLEET_TEST_BLOCK": blocked,
    }
    probe = run_python("-c", f"import {blocked.split(',')[0]}", env=env)
    assert probe.returncode != 0 and "blocked" in probe.stderr, "the blocker is not active"

    state = tmp_path / "state"
    result = run_python("-m", "trainfleet", "receiver", "--manifest", str(manifest),
                        "--state-dir", str(state), "--port", "0", env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert NEEDS_SERVER_EXTRA in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not state.exists()
