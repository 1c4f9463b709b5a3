"""The PostgreSQL source: public entry point for the daemon and the CLI.

The implementation is split by responsibility: ``db_embedded`` (embedded server),
``db_migrations`` (our schema), ``db_table`` (the configured production table and its NOTIFY
trigger), ``db_rows`` (row validation), ``db_listener`` (LISTEN/NOTIFY + reconcile),
``db_history`` (samples, stage durations, finished jobs) and ``db_writeback`` (opt-in progress
columns in the production table).
"""

from tower_progress.sources.db_embedded import EmbeddedPostgres, EmbeddedPostgresError
from tower_progress.sources.db_history import History
from tower_progress.sources.db_listener import JobTableListener
from tower_progress.sources.db_migrations import MigrationError, migrate
from tower_progress.sources.db_rows import validate_row
from tower_progress.sources.db_table import CHANNEL, DEFAULT_TERMINAL_STATUSES, SchemaError
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
    "migrate",
    "validate_row",
]
