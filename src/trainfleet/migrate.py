"""`trainfleet db upgrade` and `trainfleet db migrate`: the queue database's schema, and moving a
lab's queue from SQLite to PostgreSQL without losing a row.

Standard library at import: the backends are imported inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainfleet.errors import TrainfleetError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
Rows = list[dict[str, Any]]


def add_commands(sub: Any) -> None:
    p = sub.add_parser("db", help="the queue database: upgrade its schema, migrate it")
    dsub = p.add_subparsers(dest="db_command", required=True)
    up = dsub.add_parser("upgrade", help="create the schema, or bring an older one up to date")
    up.add_argument("--db", required=True, metavar="URL",
                    help="sqlite:///PATH (or PATH) or postgresql://USER@HOST/DB")
    up.set_defaults(handler=run_upgrade)
    mig = dsub.add_parser("migrate", help="copy every job, attempt, event, worker and token "
                          "from SQLite into an empty PostgreSQL database, then compare them")
    mig.add_argument("--from", dest="source", required=True, metavar="URL",
                     help="the SQLite queue: sqlite:///PATH or PATH (stop its receiver first)")
    mig.add_argument("--to", dest="target", required=True, metavar="URL",
                     help="the PostgreSQL database: postgresql://USER@HOST/DB")
    mig.set_defaults(handler=run_migrate)


def run_upgrade(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    before, after = upgrade(args.db)
    if before == after:
        print(f"{_show(args.db)}: schema version {after}, up to date")
    else:
        was = "no schema" if before is None else f"schema version {before}"
        print(f"{_show(args.db)}: {was} -> schema version {after}")
    return 0


def run_migrate(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    report = migrate(args.source, args.target)
    for table, count in report.counts.items():
        print(f"{table:<9} {count:>8} rows copied, identical")
    print(f"{report.jobs} jobs compared one by one: identical. "
          f"Start the receivers with --db {_show(args.target)}")
    return 0


# -- schema ------------------------------------------------------------------


def schema_version(db: str) -> int | None:
    """The database's schema version; None when it has no trainfleet schema (yet)."""
    if db.startswith(POSTGRES_SCHEMES):
        import psycopg

        from trainfleet.queue.postgres import read_schema_version

        with psycopg.connect(db, connect_timeout=10) as conn:
            return read_schema_version(conn)
    path = _sqlite_path(db)
    if not path.exists():
        return None
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            return None
    return None if row is None else int(row[0])


def upgrade(db: str) -> tuple[int | None, int]:
    """Create or upgrade the schema (as opening the queue does); versions before and after."""
    from trainfleet.queue import open_queue

    before = schema_version(db)
    open_queue(db).close()
    after = schema_version(db)
    assert after is not None
    return before, after


# -- SQLite -> PostgreSQL ----------------------------------------------------


@dataclass(frozen=True)
class MigrateReport:
    counts: dict[str, int]  #: rows copied, by table; equal on both sides
    jobs: int  #: jobs compared field by field


def migrate(source: str, target: str) -> MigrateReport:
    """Copy a SQLite queue into an empty PostgreSQL one in one transaction, then prove the
    copy: equal row counts, and every row (every job) equal field by field."""
    if not target.startswith(POSTGRES_SCHEMES):
        raise TrainfleetError(f"--to: expected a postgresql:// URL, got {_show(target)}")
    if source.startswith(POSTGRES_SCHEMES) or "://" in source.removeprefix("sqlite:///"):
        raise TrainfleetError(f"--from: expected a SQLite database, got {_show(source)}")
    from trainfleet.queue import open_queue
    from trainfleet.queue.postgres_copy import copy_tables, read_tables

    path = _sqlite_path(source)
    if not path.exists():
        raise TrainfleetError(f"--from: {path}: no such database")
    open_queue(str(path)).close()  # brings an older SQLite schema up to date first
    snapshot = _read_sqlite(path)
    open_queue(target).close()  # creates the PostgreSQL schema
    copy_tables(target, snapshot)
    copied = read_tables(target, list(snapshot))
    counts = {}
    for table, rows in snapshot.items():
        key_columns, by_key = copied[table]
        _compare(table, rows, key_columns, by_key)
        counts[table] = len(rows)
    return MigrateReport(counts, len(snapshot.get("jobs", [])))


def _read_sqlite(path: Path) -> dict[str, Rows]:
    """Every row of every table, read in one transaction: one consistent snapshot."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.row_factory = sqlite3.Row
        conn.execute("BEGIN")
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        snapshot = {t: [dict(r) for r in conn.execute(f'SELECT * FROM "{t}"')] for t in tables}
        conn.execute("COMMIT")
    snapshot["meta"] = [r for r in snapshot.get("meta", []) if r["key"] != "schema_version"]
    return snapshot


def _compare(table: str, source: Rows, key_columns: list[str],
             copied: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    """Every source row is in the copy under its primary key, with equal values."""
    if len(copied) != len(source):
        raise TrainfleetError(f"migrate: {table}: {len(source)} rows in SQLite, "
                              f"{len(copied)} in PostgreSQL")
    for row in source:
        key = tuple(row[column] for column in key_columns)
        other = copied.get(key)
        if other is None:
            raise TrainfleetError(f"migrate: {table} {key}: missing in PostgreSQL")
        for column, value in row.items():
            if not _same(value, other.get(column)):
                raise TrainfleetError(f"migrate: {table} {key}.{column}: {value!r} in SQLite, "
                                      f"{other.get(column)!r} in PostgreSQL")


def _same(sqlite_value: Any, pg_value: Any) -> bool:
    if isinstance(pg_value, dict | list) and isinstance(sqlite_value, str):
        return bool(json.loads(sqlite_value) == pg_value)
    if isinstance(pg_value, bool):
        return sqlite_value is not None and bool(sqlite_value) == pg_value
    return bool(sqlite_value == pg_value)


def _sqlite_path(db: str) -> Path:
    return Path(db.removeprefix("sqlite:///"))


def _show(db: str) -> str:
    """A database URL fit to print: without its password."""
    if not db.startswith(POSTGRES_SCHEMES):
        return db
    from trainfleet.queue.postgres import describe

    return describe(db)
