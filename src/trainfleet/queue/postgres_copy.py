"""Bulk copy into a PostgreSQL queue, for `trainfleet db migrate`: rows read from another
backend go in by COPY, converted by the target column's type, and come back out by primary
key so the caller can compare them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from trainfleet.errors import TrainfleetError
from trainfleet.queue.postgres import describe

COLUMNS = """
SELECT table_name, column_name, data_type, is_generated
FROM information_schema.columns WHERE table_schema = current_schema()
"""
PRIMARY_KEY = """
SELECT a.attname FROM pg_index AS i
JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
WHERE i.indrelid = %s::regclass AND i.indisprimary
ORDER BY array_position(i.indkey::int2[], a.attnum)
"""


def copy_tables(url: str, snapshot: Mapping[str, list[dict[str, Any]]]) -> None:
    """Load rows read from another backend into this empty database, in one transaction.

    Values are converted by the target column's type (JSON text to jsonb, 0/1 to boolean);
    a table or column with no place here is an error, and so is a target that holds jobs.
    """
    with psycopg.connect(url, connect_timeout=10) as conn:  # commits on leaving, or rolls back
        types = _column_types(conn)
        missing = [table for table in snapshot if table not in types]
        if missing:
            raise TrainfleetError(f"migrate: table(s) {', '.join(missing)} have no place in "
                                  "PostgreSQL; upgrade trainfleet")
        busy = [table for table in sorted(types) if table != "meta" and _count(conn, table)]
        if busy:
            raise TrainfleetError(f"--to: {describe(url)} already holds {', '.join(busy)}; "
                                  "migrate into an empty database")
        for table, rows in snapshot.items():
            if rows:
                _copy_rows(conn, table, rows, types[table])
        conn.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), max(id)) "
                     "FROM events HAVING count(*) > 0")


def _column_types(conn: psycopg.Connection[Any]) -> dict[str, dict[str, str | None]]:
    """Each table's columns and their types; None for a generated column (never written)."""
    types: dict[str, dict[str, str | None]] = {}
    for table, column, data_type, generated in conn.execute(COLUMNS):
        types.setdefault(table, {})[column] = None if generated == "ALWAYS" else data_type
    return types


def _count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
    found = row.fetchone()
    return int(found[0]) if found else 0


def _copy_rows(
    conn: psycopg.Connection[Any], table: str, rows: list[dict[str, Any]],
    types: Mapping[str, str | None],
) -> None:
    columns = list(rows[0])
    for column in columns:
        if types.get(column) is None:
            raise TrainfleetError(f"migrate: {table}.{column} has no place in PostgreSQL")
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    if table == "meta":  # the target's schema_version row stays its own
        conn.cursor().executemany(
            sql.SQL("INSERT INTO meta ({}) VALUES ({}) ON CONFLICT (key) DO UPDATE SET "
                    "value = excluded.value").format(
                names, sql.SQL(", ").join(sql.Placeholder() * len(columns))),
            [[row[c] for c in columns] for row in rows],
        )
        return
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table), names)
    with conn.cursor().copy(statement) as copy:
        for row in rows:
            copy.write_row([_convert(row[c], types[c]) for c in columns])


def _convert(value: Any, data_type: str | None) -> Any:
    if value is None:
        return None
    if data_type == "jsonb":
        return Jsonb(json.loads(value))
    if data_type == "boolean":
        return bool(value)
    return value


def read_tables(
    url: str, tables: list[str]
) -> dict[str, tuple[list[str], dict[tuple[Any, ...], dict[str, Any]]]]:
    """Each table's primary key columns and its rows by primary key (to compare a copy)."""
    found = {}
    with psycopg.connect(url, connect_timeout=10, row_factory=dict_row) as conn:
        for table in tables:
            key = [r["attname"] for r in conn.execute(PRIMARY_KEY, (table,))]
            rows = conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
            found[table] = (key, {tuple(r[k] for k in key): r for r in rows})
        if "meta" in found:
            found["meta"][1].pop(("schema_version",), None)
    return found
