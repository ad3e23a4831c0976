"""A real receiver for tests: create_app(settings) in uvicorn on a thread, on a pre-bound port."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from trainfleet.receiver import ReceiverSettings, create_app

READY_DEADLINE_S = 10.0


@contextmanager
def serving(settings: ReceiverSettings, **options: Any) -> Iterator[tuple[str, int]]:
    """Run create_app(settings, **options) in uvicorn on a thread until the block ends."""
    with serving_app(create_app(settings, **options)) as address:
        yield address


@contextmanager
def serving_app(app: Any) -> Iterator[tuple[str, int]]:
    """Run this receiver app in uvicorn on a thread until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                http="h11", ws="none", lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                  name=f"receiver-{port}")
        thread.start()
        try:
            _wait_ready(f"http://{host}:{port}", thread)
            yield host, port
        finally:
            server.should_exit = True
            thread.join(READY_DEADLINE_S)
        assert not thread.is_alive(), "the receiver did not stop"
    finally:
        sock.close()


def _wait_ready(url: str, thread: threading.Thread) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + READY_DEADLINE_S
    while True:
        if not thread.is_alive():
            raise AssertionError("the receiver thread ended before it answered")
        try:
            with opener.open(f"{url}/v1/health", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer /v1/health in {READY_DEADLINE_S} s")
        time.sleep(0.02)
