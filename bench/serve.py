"""One server process for a benchmark: the real receiver or a bare Starlette floor.

`python -m bench.serve '<json spec>'` binds 127.0.0.1:0 first, prints `port <n>`, and serves
until SIGTERM. Every app gets the same uvicorn settings, so only the app differs.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn

from bench import floor


def build_app(spec: dict[str, Any]) -> Any:
    kind = spec["kind"]
    if kind == "receiver":
        return _receiver(spec)
    if kind == "claim-floor":
        queue = floor.RawQueue(Path(spec["db"]), spec.get("synchronous", "FULL"))
        queue.load(int(spec["jobs"]))
        return floor.claim_app(queue)
    if kind == "upload-floor":
        return floor.upload_app(Path(spec["dir"]))
    raise SystemExit(f"unknown server kind {kind!r}")


def _receiver(spec: dict[str, Any]) -> Any:
    from trainfleet.receiver import ReceiverSettings, create_app

    settings = ReceiverSettings(
        manifest_path=Path(spec["manifest"]), state_dir=Path(spec["state_dir"]),
        operator_token=spec["operator_token"], worker_token=spec["worker_token"],
    )
    app = create_app(settings)
    synchronous = spec.get("synchronous", "FULL")
    if synchronous.upper() != "FULL":
        # A what-if the product has no setting for: the queue's one connection, reached
        # from outside. Results say so next to every figure it touches.
        queue = app.state.receiver.queue
        queue._synchronous = synchronous.upper()  # what a heartbeat restores after its commit
        queue._db.execute(f"PRAGMA synchronous = {synchronous}")
    return app


def bind(spec: dict[str, Any]) -> socket.socket:
    """The receiver's socket exactly as `trainfleet receiver` binds it; a floor's with
    IPPROTO_TCP, so asyncio turns Nagle off on its connections (the floor has no handicap)."""
    if spec["kind"] == "receiver":
        from trainfleet.cli import _bind

        return _bind("127.0.0.1", 0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    app = build_app(spec)
    sock = bind(spec)
    print(f"port {sock.getsockname()[1]}", flush=True)
    # The settings of `trainfleet receiver` (cli.run_receiver), with http and loop chosen.
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            http=spec.get("http", "auto"), loop=spec.get("loop", "auto"))
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
