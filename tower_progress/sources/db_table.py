"""The configured production jobs table: its shape, the SQL we run on it, its NOTIFY trigger.

The table name and column map come from configuration; they are checked against
``information_schema.columns`` at start-up and only ever appear in SQL as quoted identifiers.
Values always travel as query parameters. Row ids are compared through a cast of the text
form to the id column's own type, so the primary-key index is used whatever the id type is.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tower_progress.sources.db_retry import describe, is_transient

log = logging.getLogger(__name__)

CHANNEL = "tower_progress"
TRIGGER_NAME = "tower_progress_notify"
TRIGGER_FUNCTION = "tower_progress.notify_job_change"

REQUIRED_FIELDS = ("id", "status")
OPTIONAL_FIELDS = ("comfyui_job_id", "title", "total_frames", "created_at", "updated_at")
JOB_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

DEFAULT_TERMINAL_STATUSES = frozenset(
    {
        "done",
        "complete",
        "completed",
        "success",
        "succeeded",
        "finished",
        "error",
        "errored",
        "failed",
        "failure",
        "canceled",
        "cancelled",
        "aborted",
    }
)


Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"


class SchemaError(Exception):
    """The configured table or a required column does not exist; the message is one line."""


def quote_ident(name: str) -> str:
    """Quote an identifier for SQL text; the only way configured names enter a statement."""
    if not name or "\x00" in name:
        raise SchemaError(f"invalid SQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """Quote a string literal for DDL, where parameters are not allowed."""
    if "\x00" in text:
        raise SchemaError(f"invalid SQL literal {text!r}")
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A table as the database describes it: ``columns`` maps column name to SQL type."""

    oid: int
    schema: str
    name: str
    columns: Mapping[str, str]

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"


async def describe_table(conn: Connection, jobs_table: str) -> TableInfo:
    """Look up ``jobs_table`` (PostgreSQL name syntax, schema-qualified or on the search path)."""
    try:
        found = await conn.fetchrow(
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = pg_catalog.to_regclass($1)",
            jobs_table,
        )
    except asyncpg.InvalidNameError as exc:
        raise SchemaError(f"database.jobs_table: invalid table name {jobs_table!r}") from exc
    if found is None:
        raise SchemaError(f"database.jobs_table: table {jobs_table!r} does not exist")
    rows = await conn.fetch(
        "SELECT c.column_name, pg_catalog.format_type(a.atttypid, a.atttypmod) AS sql_type "
        "FROM information_schema.columns c "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = $1 AND a.attname = c.column_name "
        "WHERE c.table_schema = $2 AND c.table_name = $3 ORDER BY c.ordinal_position",
        found["oid"],
        found["nspname"],
        found["relname"],
    )
    return TableInfo(
        oid=found["oid"],
        schema=found["nspname"],
        name=found["relname"],
        columns={row["column_name"]: row["sql_type"] for row in rows},
    )


def check_column_map(columns: Mapping[str, str], known: Sequence[str], key: str) -> dict[str, str]:
    """Complete a logical -> physical map with defaults (same name); reject unknown fields."""
    unknown = sorted(set(columns) - set(known))
    if unknown:
        raise SchemaError(f"{key}: unknown field {unknown[0]!r} (known: {', '.join(known)})")
    mapped = {field: columns.get(field, field) for field in known}
    for field, physical in mapped.items():
        if not isinstance(physical, str) or not physical:
            raise SchemaError(f"{key}.{field}: column name must be a non-empty string")
    return mapped


@dataclass(frozen=True, slots=True)
class JobTable:
    """The jobs table resolved against the database: only columns that exist are mapped."""

    info: TableInfo
    columns: Mapping[str, str]
    missing: tuple[str, ...]

    @classmethod
    def resolve(cls, info: TableInfo, column_map: Mapping[str, str]) -> JobTable:
        """Raise ``SchemaError`` for a missing required column; drop missing optional ones."""
        mapped = check_column_map(column_map, JOB_FIELDS, "database.columns")
        for field in REQUIRED_FIELDS:
            if mapped[field] not in info.columns:
                raise SchemaError(
                    f"database.columns.{field}: column {mapped[field]!r} "
                    f"not found in {info.display}"
                )
        present = {f: c for f, c in mapped.items() if c in info.columns}
        missing = tuple(f"{f} ({mapped[f]})" for f in OPTIONAL_FIELDS if f not in present)
        return cls(info=info, columns=present, missing=missing)

    def col(self, field: str) -> str:
        return quote_ident(self.columns[field])

    @property
    def id_type(self) -> str:
        return self.info.columns[self.columns["id"]]

    @property
    def recency_field(self) -> str | None:
        for field in ("updated_at", "created_at"):
            if field in self.columns:
                return field
        return None

    def _select(self) -> str:
        parts = []
        for field in self.columns:
            expr = f"{self.col(field)}::text" if field == "id" else self.col(field)
            parts.append(f"{expr} AS {quote_ident(field)}")
        return f"SELECT {', '.join(parts)} FROM {self.info.qualified}"

    def by_ids_sql(self) -> str:
        """Rows whose id is in ``$1`` (text[]), cast to the id type so the index is used."""
        return f"{self._select()} WHERE {self.col('id')} = ANY($1::text[]::{self.id_type}[])"

    def reconcile_query(
        self, *, terminal_statuses: Collection[str], active_window: float, limit: int
    ) -> tuple[str, list[object]]:
        """Non-terminal rows plus rows touched within ``active_window`` seconds, newest first."""
        status = self.col("status")
        where = f"{status} IS NULL OR lower({status}::text) <> ALL($1::text[])"
        order = f"{self.col('id')} DESC"
        args: list[object] = [sorted(s.lower() for s in terminal_statuses)]
        recency = self.recency_field
        if recency is not None:
            where += f" OR {self.col(recency)} >= now() - make_interval(secs => $2)"
            order = f"{self.col(recency)} DESC NULLS LAST, {order}"
            args.append(float(active_window))
        args.append(limit)
        sql = f"{self._select()} WHERE {where} ORDER BY {order} LIMIT ${len(args)}"
        return sql, args


async def ensure_trigger(conn: Connection, info: TableInfo, id_column: str) -> bool:
    """Make sure the NOTIFY trigger is on the table; True when it is in place.

    Idempotent and cheap when already installed (a catalog read, no lock). Replacing it takes
    a brief lock on the production table, bounded by ``lock_timeout``; when the trigger cannot
    be installed (no privilege, lock busy, migrations missing) the reason is logged and the
    caller relies on the reconcile poll alone.
    """
    if id_column not in info.columns:
        raise SchemaError(f"database.columns.id: column {id_column!r} not found in {info.display}")
    current = await conn.fetchrow(
        "SELECT t.tgfoid = pg_catalog.to_regprocedure($3) AS same_function, "
        "t.tgargs, t.tgenabled, t.tgtype FROM pg_catalog.pg_trigger t "
        "WHERE t.tgrelid = $1 AND t.tgname = $2",
        info.oid,
        TRIGGER_NAME,
        f"{TRIGGER_FUNCTION}()",
    )
    # tgtype 29 = ROW | INSERT | DELETE | UPDATE, AFTER.
    if (
        current is not None
        and current["same_function"]
        and bytes(current["tgargs"]) == id_column.encode() + b"\x00"
        and current["tgenabled"] != "D"
        and current["tgtype"] == 29
    ):
        return True
    ddl = (
        f"DROP TRIGGER IF EXISTS {quote_ident(TRIGGER_NAME)} ON {info.qualified}; "
        f"CREATE TRIGGER {quote_ident(TRIGGER_NAME)} "
        f"AFTER INSERT OR UPDATE OR DELETE ON {info.qualified} "
        f"FOR EACH ROW EXECUTE FUNCTION {TRIGGER_FUNCTION}({quote_literal(id_column)})"
    )
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '5s'")
            await conn.execute(ddl)
    except asyncpg.PostgresError as exc:
        if is_transient(exc):
            raise
        log.warning(
            "NOTIFY trigger not installed on %s (%s); relying on the reconcile poll",
            info.display,
            describe(exc),
        )
        return False
    log.info("installed NOTIFY trigger %s on %s", TRIGGER_NAME, info.display)
    return True
