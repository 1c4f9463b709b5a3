"""Opt-in write-back of derived progress into the production jobs table.

Only the configured progress columns are ever written, and only on rows whose status is not
terminal: the guard is in the UPDATE's WHERE clause, so a row the producer has finished can
never be moved or touched, whatever races with it. Updates are rate-limited per job (latest
value wins, nothing stale is left unwritten) and skipped when nothing changed, so the NOTIFY
trigger does not echo no-op writes back to every listener.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import asyncpg

from tower_progress.clock import sleep_or_stop, wait_for_tick
from tower_progress.sources.db_retry import Backoff, describe, is_transient
from tower_progress.sources.db_rows import finite_float
from tower_progress.sources.db_table import (
    DEFAULT_TERMINAL_STATUSES,
    SchemaError,
    TableInfo,
    check_column_map,
    describe_table,
    quote_ident,
)

log = logging.getLogger(__name__)

PROGRESS_FIELDS = ("percent", "stage", "frames_done", "eta_s")
# The SQL type each value is sent as; the database then casts it to the column's own type.
_WIRE_TYPES = {"percent": "float8", "stage": "text", "frames_done": "int8", "eta_s": "float8"}
_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


@dataclass(frozen=True, slots=True)
class Progress:
    percent: float | None
    stage: str | None
    frames_done: int | None
    eta_s: float | None


class WriteBack:
    """Writes a job's progress into ``columns`` (progress field -> column) of the jobs table.

    ``update(job)`` takes the public job JSON on every change; ``run(stop)`` writes each job at
    most every ``min_interval`` seconds until ``stop`` is set. Fields without a column are not
    written. A missing column raises ``SchemaError`` from ``prepare()`` (and so from ``run``).
    """

    def __init__(
        self,
        *,
        dsn: str,
        jobs_table: str,
        columns: Mapping[str, str],
        id_column: str = "id",
        status_column: str = "status",
        terminal_statuses: Collection[str] = DEFAULT_TERMINAL_STATUSES,
        min_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
    ) -> None:
        if not columns:
            raise SchemaError("database.write_back: no progress columns configured")
        if min_interval <= 0:
            raise ValueError(f"min_interval must be > 0, got {min_interval}")
        mapped = check_column_map(columns, PROGRESS_FIELDS, "database.write_back")
        self._columns = {field: mapped[field] for field in PROGRESS_FIELDS if field in columns}
        self._dsn = dsn
        self._jobs_table = jobs_table
        self._id_column = id_column
        self._status_column = status_column
        self._terminal = sorted({s.lower() for s in terminal_statuses})
        self._min_interval = min_interval
        self._clock = clock
        self._backoff = Backoff(base=backoff_base, cap=backoff_cap)
        self._pool: asyncpg.Pool | None = None
        self._sql: str | None = None
        self._latest: dict[str, Progress] = {}
        self._written: dict[str, tuple[float, Progress]] = {}
        self._away = False

    def update(self, job: Mapping[str, object]) -> None:
        """Remember the job's latest progress (public job JSON); ``run`` writes it when due."""
        job_id = job.get("id")
        if not isinstance(job_id, str):
            log.warning("write_back: job without a string id ignored: %.200r", job)
            return
        stage, frames = job.get("stage"), job.get("frames_done")
        self._latest[job_id] = Progress(
            percent=finite_float(job.get("percent")),
            stage=stage if isinstance(stage, str) else None,
            frames_done=None if isinstance(frames, bool) or not isinstance(frames, int) else frames,
            eta_s=finite_float(job.get("eta_s")),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Prepare (retrying while the database is away), then write due jobs until ``stop``."""
        try:
            while self._sql is None:
                try:
                    await self.prepare()
                except _DATABASE_ERRORS as exc:
                    if not is_transient(exc):
                        raise
                    log.warning("write_back: database unavailable: %s", describe(exc))
                    if await sleep_or_stop(stop, self._backoff.next_delay()):
                        return
            tick = min(1.0, self._min_interval)
            while not await wait_for_tick(stop, tick):
                await self.write_due()
            await self.write_due()
        finally:
            await self.close()

    async def prepare(self) -> None:
        """Open the pool, read the table's shape and build the UPDATE."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=1)
        async with self._pool.acquire() as conn:
            info = await describe_table(conn, self._jobs_table)
        for key, column in (
            ("database.columns.id", self._id_column),
            ("database.columns.status", self._status_column),
            *((f"database.write_back.{f}", c) for f, c in self._columns.items()),
        ):
            if column not in info.columns:
                raise SchemaError(f"{key}: column {column!r} not found in {info.display}")
        self._sql = self._build_sql(info)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                async with asyncio.timeout(5.0):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    def _build_sql(self, info: TableInfo) -> str:
        sets, olds, news = [], [], []
        for index, (field, column) in enumerate(self._columns.items(), start=2):
            new = f"CAST(${index}::{_WIRE_TYPES[field]} AS {info.columns[column]})"
            sets.append(f"{quote_ident(column)} = {new}")
            olds.append(quote_ident(column))
            news.append(new)
        status = quote_ident(self._status_column)
        terminal_param = len(self._columns) + 2
        return (
            f"UPDATE {info.qualified} SET {', '.join(sets)} "
            f"WHERE {quote_ident(self._id_column)} = $1::text::{info.columns[self._id_column]} "
            f"AND ({status} IS NULL OR lower({status}::text) <> ALL(${terminal_param}::text[])) "
            f"AND ROW({', '.join(olds)}) IS DISTINCT FROM ROW({', '.join(news)})"
        )

    async def write_due(self) -> int:
        """Write every job whose latest progress is due; returns the number of rows updated."""
        sql, pool = self._sql, self._pool
        if sql is None or pool is None:
            raise RuntimeError("WriteBack.prepare() was not awaited")
        now = self._clock()
        for job_id in [j for j, (t, _) in self._written.items() if t < now - self._min_interval]:
            del self._written[job_id]
        updated = 0
        for job_id, progress in list(self._latest.items()):
            last = self._written.get(job_id)
            if last is not None and last[1] == progress:
                del self._latest[job_id]
                continue
            if last is not None and now - last[0] < self._min_interval:
                continue
            values = [getattr(progress, field) for field in self._columns]
            try:
                async with asyncio.timeout(10.0):
                    status = await pool.execute(sql, job_id, *values, self._terminal)
                updated += int(status.rsplit(" ", 1)[-1])
            except _DATABASE_ERRORS as exc:
                if is_transient(exc):
                    if not self._away:
                        log.warning("write_back: database unavailable: %s", describe(exc))
                        self._away = True
                    return updated
                log.warning("write_back: job %s not written: %s", job_id, describe(exc))
            if self._away:
                log.info("write_back: database writes resumed")
                self._away = False
            self._written[job_id] = (now, progress)
            self._latest.pop(job_id, None)
        return updated
