"""The worker's and client's parts that need no receiver: real files, loopback only."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from trainfleet.capability import Capability
from trainfleet.client import Client
from trainfleet.errors import ReceiverUnreachable, TrainfleetError
from trainfleet.worker import Worker, WorkerSettings, fill_command, read_progress

TEMPLATE = [
    "{python}", "run.py", "--model", "{model}", "--seed={seed}", "--split", "{split_recipe}",
    "--hosts", "{train_hosts}", "--out", "{output_dir}", '{"literal": "braces"}',
]  # fmt: skip


def closed_port() -> int:
    """A loopback port nothing listens on: bound by us, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def make_worker(state_dir: Path) -> Worker:
    settings = WorkerSettings(
        receiver_url="http://127.0.0.1:1", workdir=state_dir, state_dir=state_dir
    )
    cap = Capability(hostname="box", os="linux", cpu_count=2, ram_gib=4.0, cuda=False)
    return Worker(settings, Client(settings.receiver_url), capability=cap)


def test_fill_command_substitutes_placeholders_and_leaves_other_braces() -> None:
    values = {
        "python": "/usr/bin/python3",
        "model": "gbt",
        "seed": "7",
        "split_recipe": "",
        "train_hosts": "pi-a,pi-b",
        "output_dir": "/state/jobs/ab/1/out",
    }
    assert fill_command(TEMPLATE, values) == [
        "/usr/bin/python3", "run.py", "--model", "gbt", "--seed=7", "--split", "",
        "--hosts", "pi-a,pi-b", "--out", "/state/jobs/ab/1/out", '{"literal": "braces"}',
    ]  # fmt: skip


def test_fill_command_names_an_unknown_placeholder() -> None:
    with pytest.raises(TrainfleetError, match=r"command\[1\] '--lr=\{lr\}'.*\{lr\}"):
        fill_command(["{python}", "--lr={lr}"], {"python": "python3"})


def test_worker_id_survives_a_restart(tmp_path: Path) -> None:
    first = make_worker(tmp_path / "state")
    second = make_worker(tmp_path / "state")
    assert first.worker_id == second.worker_id
    assert first.worker_id.startswith("box-")
    assert make_worker(tmp_path / "other").worker_id != first.worker_id


@pytest.mark.parametrize(
    "content",
    [
        None,  # the trainer has not written it yet
        b'{"fraction": 0.4, "st',  # caught mid-write
        b"[0.4]",
        b"\xff\xfe not utf-8",
        b'{"fraction": "lots", "step": true, "eta": 3}',
        b'{"fraction": NaN}',
    ],
)
def test_read_progress_turns_garbage_into_none(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "progress.json"
    if content is not None:
        path.write_bytes(content)
    assert read_progress(path) is None


def test_read_progress_keeps_only_known_keys(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    path.write_text('{"fraction": 0.4, "step": 4, "message": "epoch 4/10", "loss": 0.1}')
    assert read_progress(path) == {"fraction": 0.4, "step": 4, "message": "epoch 4/10"}


def test_client_gives_up_quickly_on_a_closed_port() -> None:
    client = Client(f"http://127.0.0.1:{closed_port()}", retries=1, backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(ReceiverUnreachable, match="cannot reach the receiver"):
        client.health()
    assert time.monotonic() - started < 5
