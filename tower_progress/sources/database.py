"""The PostgreSQL source: public entry point for the daemon and the CLI.

The implementation is split by responsibility: ``db_embedded`` (embedded server),
``db_migrations`` (our schema), ``db_table`` (the configured production table and its NOTIFY
trigger), ``db_rows`` (row validation), ``db_listener`` (LISTEN/NOTIFY + reconcile),
``db_history`` (samples, stage durations, finished jobs) and ``db_writeback`` (opt-in progress
columns in the production table).
"""

import asyncpg

from tower_progress.sources.db_embedded import EmbeddedPostgres, EmbeddedPostgresError
from tower_progress.sources.db_history import History
from tower_progress.sources.db_listener import JobTableListener
from tower_progress.sources.db_migrations import MigrationError, migrate
from tower_progress.sources.db_rows import validate_row
from tower_progress.sources.db_table import (
    CHANNEL,
    DEFAULT_TERMINAL_STATUSES,
    SchemaError,
    describe_table,
    ensure_trigger,
)
from tower_progress.sources.db_writeback import WriteBack

__all__ = [
    "CHANNEL",
    "DEFAULT_TERMINAL_STATUSES",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "History",
    "JobTableListener",
    "MigrationError",
    "SchemaError",
    "WriteBack",
    "install_trigger",
    "migrate",
    "validate_row",
]


async def install_trigger(dsn: str, jobs_table: str, id_column: str = "id") -> bool:
    """Install the NOTIFY trigger on ``jobs_table`` now (``migrate``/start-up, with the
    privileges of that connection); ``JobTableListener(trigger=True)`` also does this on every
    connect. False (logged) when it cannot be installed; ``SchemaError`` for a bad table/column.
    """
    conn = await asyncpg.connect(dsn)
    try:
        return await ensure_trigger(conn, await describe_table(conn, jobs_table), id_column)
    finally:
        await conn.close()
