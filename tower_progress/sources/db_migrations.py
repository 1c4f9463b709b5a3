"""Schema migrations for the daemon's own schema ``tower_progress``.

Migrations are the package's ``sql/NNNN_name.sql`` files, applied in version order, each once,
each in its own transaction, while holding a session advisory lock so that concurrent callers
(two daemons on one database, ``tower-progress migrate`` during a restart) serialize: the first
applies, the others find nothing left to do. Applied versions are recorded in
``tower_progress.schema_migrations``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Any fixed 64-bit key works; this one is "tower_pr" in ASCII.
ADVISORY_LOCK_KEY = 0x746F7765725F7072

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """A migration's SQL failed; its transaction was rolled back and later ones not tried."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """The migrations shipped in the package, in version order; duplicate versions are a bug."""
    found: dict[int, Migration] = {}
    for entry in resources.files("tower_progress").joinpath("sql").iterdir():
        match = _FILE_RE.match(entry.name)
        if match is None or not entry.is_file():
            continue
        version = int(match.group(1))
        if version in found:
            raise RuntimeError(f"two migrations with version {version:04d}: {entry.name}")
        found[version] = Migration(version, entry.name.removesuffix(".sql"), entry.read_text())
    return [found[v] for v in sorted(found)]


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations; return the names applied (empty when already up to date)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate_connection(conn)
    finally:
        await conn.close()


async def migrate_connection(conn: asyncpg.Connection) -> list[str]:
    """``migrate`` on an existing connection (which must not be inside a transaction)."""
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE SCHEMA IF NOT EXISTS tower_progress; "
            "CREATE TABLE IF NOT EXISTS tower_progress.schema_migrations ("
            " version integer PRIMARY KEY,"
            " name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = await conn.fetch("SELECT version, name FROM tower_progress.schema_migrations")
        applied = {row["version"]: row["name"] for row in rows}
        known = available_migrations()
        newer = sorted(set(applied) - {m.version for m in known})
        if newer:
            log.warning(
                "database has migrations this version does not know (%s); a newer "
                "tower-progress migrated it",
                ", ".join(applied[v] for v in newer),
            )
        done: list[str] = []
        for migration in known:
            if migration.version in applied:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO tower_progress.schema_migrations (version, name) "
                        "VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
            log.info("applied migration %s", migration.name)
            done.append(migration.name)
        return done
    finally:
        # A lost connection has released the lock already; do not hide the original error.
        with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError):
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
