"""`trainfleet backup DEST`: a consistent copy of the queue database while the receiver runs.

Standard library only. SQLite's online backup API copies a live WAL database page by page
under a read transaction, so the copy is a snapshot of committed state, never a torn file.
The artifact store and logs are plain files (a bundle's bytes never change; pruning
deletes old checkpoints): copy them with any tool.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from trainfleet.errors import TrainfleetError


def add_command(sub: Any) -> None:
    p = sub.add_parser("backup", help="copy the receiver's queue database safely, even while "
                       "it runs (SQLite online backup)")
    p.add_argument("dest", type=Path, metavar="DEST",
                   help="a file, or a directory to hold queue-<time>.db")
    p.add_argument("--state-dir", type=Path, default=Path("state"),
                   help="the receiver's state dir (default: ./state)")
    p.add_argument("--db", type=Path, help="the database file (default: STATE_DIR/queue.db)")
    p.set_defaults(handler=run_backup)


def run_backup(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    source = args.db or args.state_dir / "queue.db"
    dest = args.dest
    if dest.is_dir():
        dest = dest / time.strftime("queue-%Y%m%d-%H%M%S.db")
    copied = backup(source, dest)
    print(f"backed up {source} to {copied} ({copied.stat().st_size} bytes, integrity ok)")
    return 0


def backup(source: Path, dest: Path) -> Path:
    """Copy the database at `source` to `dest` atomically and check the copy's integrity."""
    if str(source).startswith(("postgresql:", "postgres:")):
        raise TrainfleetError("backup: a PostgreSQL queue is backed up with pg_dump")
    if not source.is_file():
        raise TrainfleetError(f"backup: {source}: no such database file")
    if dest.exists():
        raise TrainfleetError(f"backup: {dest} exists; choose a new name or a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        with closing(sqlite3.connect(source, timeout=60.0)) as src, \
                closing(sqlite3.connect(partial)) as out:
            src.backup(out)
            verdict = out.execute("PRAGMA integrity_check").fetchone()[0]
        if verdict != "ok":
            raise TrainfleetError(f"backup: the copy fails its integrity check: {verdict}")
        os.replace(partial, dest)
    except sqlite3.Error as exc:
        raise TrainfleetError(f"backup: {source}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return dest
