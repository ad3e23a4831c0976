"""The example trainer (examples/trainer/run.py) and the canonical example manifest.

The trainer runs as a real subprocess, exactly as a worker would start it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from trainfleet import manifest

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "examples" / "trainer" / "run.py"
MANIFEST = ROOT / "etc" / "training_manifest.toml.example"
ID_FIELDS = ("model", "mode", "hyper", "split_recipe", "train_hosts", "seed")
DEMO_HOSTS = {"demo-cpu-a": 8, "demo-cpu-b": 2}  # hostname -> RAM GiB; both CPU-only


def run_trainer(tmp_path: Path, *args: str, hyper: dict | None = None) -> tuple:
    """Run the trainer; return (completed process, output dir, progress file)."""
    hyper_file = tmp_path / "hyper.json"
    hyper_file.write_text(json.dumps(hyper or {}))
    out = tmp_path / "out"
    progress = tmp_path / "progress.json"
    env = {**os.environ, "TRAINFLEET_PROGRESS_FILE": str(progress)}
    cmd = [sys.executable, str(TRAINER), "--hyper", str(hyper_file), "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    return proc, out, progress


def assert_trained(proc: subprocess.CompletedProcess, out: Path, progress: Path) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.pkl").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["n_train"] > 0 and metrics["n_test"] > 0
    assert metrics["train_seconds"] >= 0
    assert json.loads(progress.read_text())["fraction"] == 1.0
    return metrics


def test_gbt_realistic_trains(tmp_path: Path) -> None:
    args = ("--model", "gbt", "--mode", "realistic", "--seed", "0")
    proc, out, progress = run_trainer(tmp_path, *args, hyper={"lr": 0.2, "n_estimators": 5})
    metrics = assert_trained(proc, out, progress)
    assert (metrics["model"], metrics["mode"]) == ("gbt", "realistic")
    assert metrics["accuracy"] > 0.5
    assert metrics["n_train"] + metrics["n_test"] == 1797  # an honest, disjoint split
    assert "boosting round 5/5" in proc.stdout


def test_mlp_oracle_trains(tmp_path: Path) -> None:
    args = ("--model", "mlp", "--mode", "oracle", "--seed", "0", "--job-id", "abc")
    hyper = {"hidden": 16, "lr": 0.01, "epochs": 3}
    proc, out, progress = run_trainer(tmp_path, *args, hyper=hyper)
    metrics = assert_trained(proc, out, progress)
    assert (metrics["model"], metrics["mode"], metrics["job_id"]) == ("mlp", "oracle", "abc")
    assert metrics["n_train"] == metrics["n_test"]  # scored on its own training rows
    assert "epoch 3/3" in proc.stdout


def test_same_seed_same_accuracy(tmp_path: Path) -> None:
    args = ("--model", "gbt", "--mode", "realistic", "--seed", "7")
    hyper = {"lr": 0.3, "n_estimators": 3}
    runs = []
    for attempt in ("a", "b"):
        (tmp_path / attempt).mkdir()
        proc, out, progress = run_trainer(tmp_path / attempt, *args, hyper=hyper)
        runs.append(assert_trained(proc, out, progress))
    assert runs[0]["accuracy"] == runs[1]["accuracy"]


def test_empty_split_recipe_and_train_hosts_accepted(tmp_path: Path) -> None:
    args = ("--model", "mlp", "--mode", "realistic", "--seed", "0")
    empty = ("--split-recipe", "", "--train-hosts", "")
    proc, out, progress = run_trainer(tmp_path, *args, *empty, hyper={"epochs": 2})
    metrics = assert_trained(proc, out, progress)
    assert (metrics["split_recipe"], metrics["train_hosts"]) == ("random", [])


def test_unknown_model_exits_2(tmp_path: Path) -> None:
    proc, _, _ = run_trainer(tmp_path, "--model", "svm", "--mode", "realistic", "--seed", "0")
    assert proc.returncode == 2
    assert "--model" in proc.stderr and "svm" in proc.stderr


def test_unknown_hyper_key_exits_2(tmp_path: Path) -> None:
    args = ("--model", "gbt", "--mode", "realistic", "--seed", "0")
    proc, _, _ = run_trainer(tmp_path, *args, hyper={"depth": 3})
    assert proc.returncode == 2
    assert "--hyper" in proc.stderr and "depth" in proc.stderr


def test_transformer_without_torch_exits_2(tmp_path: Path) -> None:
    """Where torch is installed, the trainer runs with torch hidden (an import of it fails)."""
    hyper_file = tmp_path / "hyper.json"
    hyper_file.write_text("{}")
    out = tmp_path / "out"
    argv = [str(TRAINER), "--model", "transformer", "--mode", "realistic", "--seed", "0",
            "--hyper", str(hyper_file), "--out", str(out)]
    hide_torch = ("import runpy, sys; sys.modules['torch'] = None; "
                  f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide_torch], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "transformer needs torch" in proc.stderr
    assert not out.exists()


# --- the transformer (torch; CI installs the CPU build: .ci/run) -----------------


def run_transformer(tmp_path: Path, name: str, epochs: int, *args: str) -> tuple:
    """The transformer trainer as a worker starts it (on the CPU here); (process, out dir)."""
    pytest.importorskip("torch")
    hyper = tmp_path / f"{name}.json"
    hyper.write_text(json.dumps({"epochs": epochs, "batch_size": 128}))
    out = tmp_path / name
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    proc = subprocess.run(
        [sys.executable, str(TRAINER), "--model", "transformer", "--mode", "realistic",
         "--seed", "5", "--hyper", str(hyper), "--out", str(out), *args],
        capture_output=True, text=True, env=env, timeout=300)
    return proc, out


@pytest.mark.slow
def test_transformer_trains_and_resumes_as_if_never_stopped(tmp_path: Path) -> None:
    """Same seed, same model bytes; and a run resumed from its epoch-1 checkpoint ends with
    the very model of an uninterrupted one (dropout's generator is in the checkpoint too)."""
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    first, first_out = run_transformer(tmp_path, "first", 1, "--checkpoint-dir", str(ckpt))
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["transformer.pt"]  # no temp file left
    resumed, resumed_out = run_transformer(
        tmp_path, "resumed", 2, "--resume-from", str(ckpt / "transformer.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch 1/2" in resumed.stdout and "epoch 1/2 " not in resumed.stdout
    whole, whole_out = run_transformer(tmp_path, "whole", 2)
    again, again_out = run_transformer(tmp_path, "again", 2)
    assert whole.returncode == again.returncode == 0, whole.stderr + again.stderr
    model = (whole_out / "model.pt").read_bytes()
    assert (again_out / "model.pt").read_bytes() == model
    assert (resumed_out / "model.pt").read_bytes() == model
    metrics = json.loads((whole_out / "metrics.json").read_text())
    assert metrics["model"] == "transformer" and metrics["device"] == "cpu"
    assert metrics["accuracy"] == json.loads((resumed_out / "metrics.json").read_text())[
        "accuracy"]
    assert metrics["accuracy"] > 0.2  # ten classes: better than chance after two epochs


class _PlantInTorch:
    """Unpickling this makes a directory: proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_transformer_loads_a_planted_checkpoint_as_data_and_refuses_it(tmp_path: Path) -> None:
    """A checkpoint comes from another host: a pickle in it must not run here."""
    import pickle

    marker = tmp_path / "code-ran"
    planted = tmp_path / "transformer.pt"
    planted.write_bytes(pickle.dumps({"net": _PlantInTorch(marker), "epoch": 1}))
    proc, out = run_transformer(tmp_path, "out", 2, "--resume-from", str(planted))
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr
    assert "--resume-from:" in proc.stderr and "not a transformer checkpoint" in proc.stderr
    assert not (out / "model.pt").exists()


# --- the example manifest -----------------------------------------------------


def manifest_data() -> dict:
    return tomllib.loads(MANIFEST.read_text(encoding="utf-8"))


def test_manifest_jobs_are_declared_named_and_distinct() -> None:
    data = manifest_data()
    jobs = data["jobs"]
    assert data["schema_version"] == 1 and len(jobs) >= 12
    names = [job["name"] for job in jobs]
    assert len(names) == len(set(names))
    identities = [json.dumps({f: job.get(f) for f in ID_FIELDS}, sort_keys=True) for job in jobs]
    assert len(identities) == len(set(identities))
    for job in jobs:
        assert job["model"] in data["models"], job["name"]
        assert job["mode"] in data["trainer"]["modes"], job["name"]


def test_manifest_hyper_values_match_declared_types() -> None:
    data = manifest_data()
    kinds = {"int": int, "float": float}
    for job in data["jobs"]:
        declared = data["models"][job["model"]]["hyper"]
        for key, value in job.get("hyper", {}).items():
            assert key in declared, (job["name"], key)
            assert type(value) is kinds[declared[key]], (job["name"], key, value)


def test_manifest_uses_every_job_field() -> None:
    fields = {
        "name", "model", "mode", "hyper", "split_recipe", "train_hosts", "seed", "priority",
        "require_cuda", "prefer_cuda", "min_vram_gib", "min_ram_gib", "allowed_hosts",
    }  # fmt: skip
    used = {key for job in manifest_data()["jobs"] for key in job}
    assert fields <= used


def demo_can_run(job: dict, model_defaults: dict) -> bool:
    """Whether one of the two CPU-only demo workers may take this job."""
    merged = {**model_defaults, **job}
    if merged.get("require_cuda") or merged.get("min_vram_gib", 0) > 0:
        return False
    allowed = merged.get("allowed_hosts") or list(DEMO_HOSTS)
    return any(
        host in allowed and merged.get("min_ram_gib", 0) <= ram for host, ram in DEMO_HOSTS.items()
    )


def test_manifest_demo_trains_cpu_jobs_and_leaves_transformers_pending() -> None:
    data = manifest_data()
    for job in data["jobs"]:
        defaults = data["models"][job["model"]].get("defaults", {})
        expected = job["model"] != "transformer"
        assert demo_can_run(job, defaults) is expected, job["name"]


def test_manifest_loads_with_the_manifest_module() -> None:
    loaded = manifest.load(MANIFEST)
    assert loaded.name == "digits-baselines"
    assert len(loaded.jobs) == len(manifest_data()["jobs"])
    assert all(job.require_cuda for job in loaded.jobs if job.model == "transformer")


def test_manifest_command_runs_the_trainer(tmp_path: Path) -> None:
    """Fill the manifest's command as a worker would, for a job without split/hosts."""
    data = manifest_data()
    job = next(j for j in data["jobs"] if j["name"] == "mlp-oracle-h64")
    hyper_file = tmp_path / "hyper.json"
    hyper_file.write_text(json.dumps(job["hyper"]))
    values = {
        "python": sys.executable, "model": job["model"], "mode": job["mode"],
        "seed": str(job["seed"]), "hyper_json": str(hyper_file),
        "output_dir": str(tmp_path / "out"), "split_recipe": "", "train_hosts": "",
        "checkpoint_dir": str(tmp_path), "resume_from": "",
    }  # fmt: skip
    cmd = [part.format(**values) for part in data["trainer"]["command"]]
    env = {**os.environ, "TRAINFLEET_PROGRESS_FILE": str(tmp_path / "progress.json")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert_trained(proc, tmp_path / "out", tmp_path / "progress.json")
