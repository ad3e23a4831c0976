"""The operator's CLI verbs as real subprocesses against a live receiver, and /metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import cpu, job, manifest_text
from tests.live import serving
from trainfleet import bundle
from trainfleet.client import Client
from trainfleet.receiver import ReceiverSettings

TOKEN = "op-token"


@dataclass
class Fleet:
    url: str
    client: Client
    done: dict[str, Any]  #: the completed job's claim
    running: dict[str, Any]  #: a claim that is heartbeating
    artifact_id: str
    tmp: Path

    def cli(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "TRAINFLEET_RECEIVER": self.url}
        if token is not None:
            env["TRAINFLEET_OPERATOR_TOKEN"] = token
        return subprocess.run([sys.executable, "-m", "trainfleet", *args], capture_output=True,
                              text=True, timeout=60, env=env)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A receiver holding one completed, one running, one failed and one CUDA-only job."""
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([
        job("done-job"), job("running-job"), job("broken-job", "mlp"),
        job("cuda-job", "transformer", require_cuda=True, prefer_cuda=True),
    ]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state",
                                operator_token=TOKEN)
    with serving(settings) as (host, port):
        url = f"http://{host}:{port}"
        client = Client(url, operator_token=TOKEN, retries=0)
        cap = cpu("cpu-a").to_dict()
        done = client.claim("w-a", cap)
        assert done is not None and done["job"]["name"] == "done-job"
        out = tmp_path / "out"
        out.mkdir()
        (out / "model.txt").write_text("weights\n")
        made = bundle.create(out, tmp_path / "b.bundle")
        done_id, lease = done["job"]["job_id"], done["lease"]
        client.heartbeat(done_id, lease, {"fraction": 0.5}, "epoch 1\n")
        client.upload(made.artifact_id, made.path, done_id, lease)
        client.upload_log(done_id, lease, 1, "epoch 1\nepoch 2\ntrained ok\n")
        client.complete(done_id, lease, made.artifact_id, {"accuracy": 0.97})
        running = client.claim("w-a", cap)
        assert running is not None
        client.heartbeat(running["job"]["job_id"], running["lease"],
                         {"fraction": 0.25, "message": "epoch 1/4"}, "step 1\n")
        broken = client.claim("w-b", cpu("cpu-b").to_dict())
        assert broken is not None and broken["job"]["name"] == "broken-job"
        client.fail(broken["job"]["job_id"], broken["lease"],
                    "Traceback...\nValueError: bad shapes", retryable=False, kind="trainer_error")
        yield Fleet(url, client, done, running, made.artifact_id, tmp_path)


def test_status_shows_counts_live_workers_and_recent_failures(fleet: Fleet) -> None:
    result = fleet.cli("status")
    assert result.returncode == 0, result.stderr
    assert "completed 1" in result.stdout and "failed 1" in result.stdout
    assert "running-job 25% epoch 1/4" in result.stdout
    assert "broken-job: ValueError: bad shapes" in result.stdout


def test_list_filters_and_prints_one_aligned_line_per_job(fleet: Fleet) -> None:
    result = fleet.cli("list")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "NAME", "MODEL", "MODE", "STATUS"]
    assert len(lines) == 5
    assert len({line.index(" gbt ") for line in lines if " gbt " in line}) == 1  # aligned
    failed = fleet.cli("list", "--status", "failed").stdout.splitlines()
    assert len(failed) == 2 and "broken-job" in failed[1]
    as_json = json.loads(fleet.cli("list", "--model", "mlp", "--json").stdout)
    assert [j["name"] for j in as_json] == ["broken-job"]


def test_show_gives_attempts_metrics_and_artifact_path(fleet: Fleet) -> None:
    result = fleet.cli("show", "done-job")
    assert result.returncode == 0, result.stderr
    assert fleet.artifact_id in result.stdout
    assert "bundle.tar" in result.stdout and '"accuracy": 0.97' in result.stdout
    assert "#1  cpu-a (w-a)" in result.stdout and "completed" in result.stdout
    by_prefix = fleet.cli("show", fleet.done["job"]["job_id"][:10], "--json")
    assert json.loads(by_prefix.stdout)["name"] == "done-job"


def test_why_lists_each_live_worker_with_every_blocking_rule(fleet: Fleet) -> None:
    result = fleet.cli("why", "cuda-job")
    assert result.returncode == 0, result.stderr
    assert "cuda-job" in result.stdout and "is pending" in result.stdout
    assert "cpu-a (w-a) cannot take it" in result.stdout
    assert "requires CUDA; cpu-a has no CUDA GPU" in result.stdout
    assert "cpu-b (w-b) cannot take it" in result.stdout
    answer = json.loads(fleet.cli("why", "cuda-job", "--json").stdout)
    assert {w["worker_id"] for w in answer["workers"]} == {"w-a", "w-b"}


def test_why_says_when_no_worker_is_alive(tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("lonely")]))
    with serving(ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "s")) as addr:
        result = subprocess.run(
            [sys.executable, "-m", "trainfleet", "why", "lonely", "--receiver",
             f"http://{addr[0]}:{addr[1]}"], capture_output=True, text=True, timeout=60)
    assert "no worker is alive" in result.stdout


def test_workers_show_capability_and_current_job(fleet: Fleet) -> None:
    result = fleet.cli("workers")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["HOST", "SLOT", "WORKER", "CORES", "RAM", "GPUS", "SEEN",
                                "ALIVE", "RUNS"]
    row = next(line for line in lines if line.startswith("cpu-a"))
    assert " 4 " in row and "16G" in row and "yes" in row
    assert row.rstrip().endswith(fleet.running["job"]["name"])  # what the slot runs, by name


def test_workers_show_a_slot_lent_to_a_siblings_job(fleet: Fleet) -> None:
    assert fleet.client.claim("w-a2", cpu("cpu-a").to_dict(), slot=1) is None  # nothing fits
    job_id, lease = fleet.running["job"]["job_id"], fleet.running["lease"]
    fleet.client.heartbeat(job_id, lease, lent_slots=["w-a2"])
    lines = fleet.cli("workers").stdout.splitlines()
    row = next(line for line in lines if " w-a2 " in line)
    assert row.rstrip().endswith(f"lent to {fleet.running['job']['name']}")
    holder = next(line for line in lines if " w-a " in line)
    assert holder.rstrip().endswith(fleet.running["job"]["name"])


def test_logs_prints_full_log_and_follow_streams_a_running_job(fleet: Fleet) -> None:
    assert fleet.cli("logs", "done-job").stdout == "epoch 1\nepoch 2\ntrained ok\n"
    job_id, lease = fleet.running["job"]["job_id"], fleet.running["lease"]
    env = {"PATH": "/usr/bin:/bin", "TRAINFLEET_RECEIVER": fleet.url}
    follow = subprocess.Popen([sys.executable, "-m", "trainfleet", "logs", "running-job",
                               "--follow"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(1.0)
        fleet.client.heartbeat(job_id, lease, None, "step 1\nstep 2\n")
        time.sleep(2.5)
        fleet.client.heartbeat(job_id, lease, None, "step 1\nstep 2\nstep 3\n")
        fleet.client.fail(job_id, lease, "stopped", retryable=False, kind="trainer_error")
        out, _ = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert follow.returncode == 0
    assert out == "step 1\nstep 2\nstep 3\n"


def test_models_and_pull_extract_verify_the_bundle(fleet: Fleet) -> None:
    listed = fleet.cli("models")
    assert fleet.artifact_id[:12] in listed.stdout and "done-job" not in listed.stdout
    target = fleet.tmp / "pulled"
    pulled = fleet.cli("pull", "done-job", "-o", str(target), "--extract")
    assert pulled.returncode == 0, pulled.stderr
    assert "sha256 verified" in pulled.stdout
    assert (target / fleet.artifact_id[:12] / "model.txt").read_text() == "weights\n"
    by_artifact = fleet.cli("pull", fleet.artifact_id, "-o", str(fleet.tmp / "again"))
    assert by_artifact.returncode == 0, by_artifact.stderr
    shutil.rmtree(target)


def test_operator_verbs_say_when_token_is_missing_or_wrong(fleet: Fleet) -> None:
    missing = fleet.cli("cancel", "cuda-job")
    assert missing.returncode == 1
    assert "cancel needs the operator token" in missing.stderr
    wrong = fleet.cli("requeue", "broken-job", token="nope")
    assert wrong.returncode == 1 and "X-Operator-Token: missing or wrong token" in wrong.stderr
    assert fleet.cli("reload", token="nope").returncode == 1
    assert fleet.client.job("cuda-job")["status"] == "pending"


def test_operator_verbs_cancel_requeue_reload(fleet: Fleet) -> None:
    cancelled = fleet.cli("cancel", "cuda-job", token=TOKEN)
    assert cancelled.returncode == 0 and "(now cancelled)" in cancelled.stdout
    requeued = fleet.cli("requeue", "broken-job", "cuda-job", token=TOKEN)
    assert requeued.returncode == 0 and requeued.stdout.count("(now pending)") == 2
    illegal = fleet.cli("requeue", "done-job", token=TOKEN)
    assert illegal.returncode == 1 and "cannot requeue" in illegal.stderr
    reloaded = fleet.cli("reload", "--json", token=TOKEN)
    assert json.loads(reloaded.stdout) == {"added": 0, "updated": 0, "unchanged": 4,
                                           "orphaned": 0}


def test_unknown_job_is_a_one_line_error(fleet: Fleet) -> None:
    result = fleet.cli("show", "no-such-job")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "not found" in result.stderr


def test_metrics_count_protocol_calls_and_parse_as_prometheus(fleet: Fleet) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{fleet.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert samples[("trainfleet_jobs", (("status", "completed"),))] == 1
    assert samples[("trainfleet_jobs", (("status", "failed"),))] == 1
    assert samples[("trainfleet_claims_total", ())] == 3
    assert samples[("trainfleet_heartbeats_total", ())] == 2
    assert samples[("trainfleet_completions_total", ())] == 1
    assert samples[("trainfleet_failures_total", (("kind", "trainer_error"),))] == 1
    assert samples[("trainfleet_upload_bytes_total", ())] > 0
    assert samples[("trainfleet_workers_live", ())] == 2
    claim_route = (("method", "POST"), ("route", "/v1/job/claim"))
    assert samples[("trainfleet_request_seconds_count", claim_route)] == 3
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                               capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
