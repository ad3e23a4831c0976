"""The Windows side, tested where PowerShell is not: the Scheduled Task XML against the
schema rules we rely on, the PowerShell installers' calls into the CLI, and the stop file
that stands in for SIGTERM under Task Scheduler."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import job
from tests.fleet import Fleet
from trainfleet import install

TASK = "{http://schemas.microsoft.com/windows/2004/02/mit/task}"
SCRIPTS = Path(__file__).parent.parent / "scripts"


def trainfleet(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "trainfleet", *args], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout


# -- the Windows Scheduled Task ---------------------------------------------------

#: The elements of the Task Scheduler schema we use, and the children each may have.
TASK_SCHEMA = {
    "Task": {"RegistrationInfo", "Triggers", "Principals", "Settings", "Actions"},
    "RegistrationInfo": {"Description", "URI"},
    "Triggers": {"BootTrigger"},
    "BootTrigger": {"Enabled", "Delay", "Repetition"},
    "Repetition": {"Interval", "StopAtDurationEnd"},
    "Principals": {"Principal"},
    "Principal": {"UserId", "LogonType", "RunLevel"},
    "Settings": {"MultipleInstancesPolicy", "DisallowStartIfOnBatteries",
                 "StopIfGoingOnBatteries", "AllowHardTerminate", "StartWhenAvailable",
                 "RunOnlyIfNetworkAvailable", "IdleSettings", "AllowStartOnDemand", "Enabled",
                 "Hidden", "RunOnlyIfIdle", "WakeToRun", "ExecutionTimeLimit", "Priority",
                 "RestartOnFailure"},
    "IdleSettings": {"StopOnIdleEnd", "RestartOnIdle"},
    "RestartOnFailure": {"Interval", "Count"},
    "Actions": {"Exec"},
    "Exec": {"Command", "Arguments", "WorkingDirectory"},
}


def _check_schema(element: ET.Element) -> None:
    name = element.tag.removeprefix(TASK)
    children = [child.tag.removeprefix(TASK) for child in element]
    assert set(children) <= TASK_SCHEMA.get(name, set()), (name, children)
    assert len(children) == len(set(children)), f"{name}: repeated child"
    for child in element:
        _check_schema(child)


def test_windows_task_xml_starts_at_boot_restarts_and_runs_the_worker(tmp_path: Path) -> None:
    out = tmp_path / "task.xml"
    trainfleet("install", "windows-task-xml", "--python", r"C:\Lab Tools\venv\Scripts\python.exe",
               "--config", r"C:\ProgramData\trainfleet\worker.toml",
               "--workdir", r"C:\Users\Ann\R&D <proj>", "--state-dir",
               r"C:\ProgramData\trainfleet\state", "--output", str(out))
    root = ET.fromstring(out.read_bytes())  # UTF-16, as its declaration says
    _check_schema(root)
    assert root.get("version") == "1.4"

    def text(path: str) -> str | None:
        return root.findtext(TASK + path.replace("/", "/" + TASK))  # namespaced path

    assert text("Triggers/BootTrigger/Enabled") == "true"
    assert text("Triggers/BootTrigger/Repetition/Interval") == "PT5M"
    assert text("Principals/Principal/UserId") == install.NETWORK_SERVICE
    assert text("Principals/Principal/LogonType") == "ServiceAccount"
    assert text("Settings/RestartOnFailure/Count") == "999"
    assert text("Settings/RestartOnFailure/Interval") == "PT1M"
    assert text("Settings/MultipleInstancesPolicy") == "IgnoreNew"
    assert text("Settings/ExecutionTimeLimit") == "PT0S"  # training may take days
    assert text("Settings/DisallowStartIfOnBatteries") == "false"
    assert text("Actions/Exec/Command") == r"C:\Lab Tools\venv\Scripts\python.exe"
    assert text("Actions/Exec/WorkingDirectory") == r"C:\Users\Ann\R&D <proj>"
    assert text("Actions/Exec/Arguments") == (
        r"-m trainfleet worker --config C:\ProgramData\trainfleet\worker.toml "
        r"--stop-file C:\ProgramData\trainfleet\state\stop "
        r"--log-file C:\ProgramData\trainfleet\state\worker.log --shutdown-grace 30")
    assert root.find(f"{TASK}Actions").get("Context") == "Worker"  # type: ignore[union-attr]


def test_task_arguments_quote_paths_with_spaces() -> None:
    xml = install.windows_task_xml("py.exe", r"C:\My Data\worker.toml", "C:\\w", r"C:\My Data")
    args = ET.fromstring(xml).findtext(f"{TASK}Actions/{TASK}Exec/{TASK}Arguments")
    assert args is not None and r'--config "C:\My Data\worker.toml"' in args
    assert r'--stop-file "C:\My Data\stop"' in args


def _cli_calls(script: str, command: str) -> list[str]:
    """The long options a PowerShell script passes to `trainfleet <command>`."""
    text = (SCRIPTS / script).read_text().replace("`\n", " ")
    calls = re.findall(rf"(?:trainfleet|Invoke-Trainfleet) {command} ([^\n]*)", text)
    return sorted({flag for call in calls for flag in re.findall(r"--[a-z-]+", call)})


def test_powershell_installers_call_the_cli_with_options_it_has(tmp_path: Path) -> None:
    xml_flags = _cli_calls("install-training-worker-windows.ps1", "install windows-task-xml")
    assert xml_flags == ["--config", "--output", "--python", "--shutdown-grace", "--state-dir",
                         "--user", "--workdir"]
    values = {"--shutdown-grace": "30", "--output": str(tmp_path / "t.xml")}
    argv = [part for flag in xml_flags for part in (flag, values.get(flag, "x"))]
    trainfleet("install", "windows-task-xml", *argv)
    enroll_flags = _cli_calls("install-training-worker-windows.ps1", "enroll")
    assert {"--receiver", "--code", "--hostname", "--config", "--workdir"} <= set(enroll_flags)
    enroll_help = trainfleet("enroll", "--help")
    assert all(flag in enroll_help for flag in enroll_flags)


@pytest.mark.parametrize("script", ["install-training-worker-windows.ps1",
                                    "uninstall-training-worker-windows.ps1"])
def test_powershell_scripts_are_balanced_and_support_whatif(script: str) -> None:
    """pwsh is not installable here (not in Debian's archive): a structural check instead,
    and a real parse wherever pwsh exists."""
    text = (SCRIPTS / script).read_text()
    assert "[CmdletBinding(SupportsShouldProcess = $true)]" in text
    code = re.sub(r"<#.*?#>|'[^']*'|\"(?:`.|[^\"`])*\"|#[^\n]*", "", text, flags=re.S)
    for open_, close in ("{}", "()", "[]"):
        assert code.count(open_) == code.count(close), (script, open_)
    assert "Set-StrictMode -Version Latest" in text
    if shutil.which("pwsh"):
        parse = ("$e = $null; [System.Management.Automation.Language.Parser]::ParseFile("
                 f"'{SCRIPTS / script}', [ref]$null, [ref]$e) | Out-Null; exit $e.Count")
        assert subprocess.run(["pwsh", "-NoProfile", "-Command", parse], timeout=120
                              ).returncode == 0


# -- the worker's service-side helpers ---------------------------------------------


def test_stop_file_requests_a_stop_and_is_removed(tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    stop.write_text("stale")  # left from before this start: must not stop the new worker
    asked = threading.Event()
    install.watch_stop_file(stop, asked.set)
    assert not stop.exists() and not asked.wait(1.5)
    stop.touch()
    assert asked.wait(10) and not stop.exists()


@pytest.mark.slow
def test_a_worker_stops_gracefully_when_its_stop_file_appears(tmp_path: Path) -> None:
    """What the Windows task relies on: the stop file acts as SIGTERM, and logs go to a file."""
    with Fleet(tmp_path) as fleet:
        receiver = fleet.receiver(fleet.manifest([job("long", hyper={"gate": "never"})]))
        stop, log = tmp_path / "stop", tmp_path / "logs" / "worker-file.log"
        worker = fleet.worker(receiver.url, "win", {"hostname": "win"}, "--stop-file", str(stop),
                              "--log-file", str(log))
        job_id = receiver.jobs_by_name()["long"]["job_id"]
        fleet.trainer_pid(job_id)
        stop.touch()
        assert worker.wait_exit(30) == 0
        after = receiver.wait_status(job_id, "pending")
        assert after["error"] == "worker shutting down" and after["attempts_charged"] == 0
        assert not stop.exists() and "stop file" in log.read_text()
