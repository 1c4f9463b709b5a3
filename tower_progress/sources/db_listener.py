"""Push source for the production jobs table: LISTEN/NOTIFY plus a reconcile poll.

One dedicated connection LISTENs on ``tower_progress``; every notification names a row id and
the row is reloaded (notifications are coalesced per id and reloaded in batches). A reconcile
query, right after every (re)connect and every ``reconcile_interval`` seconds, re-emits all
non-terminal rows and rows touched within ``active_window`` seconds: it catches whatever was
missed while disconnected, and is the only feed where the trigger could not be installed.
Rows that were emitted before and have since disappeared are reported as ``RowDeleted``.

Losing the connection emits ``SourceStatus("database", False, ...)`` once, then the listener
reconnects with capped, jittered backoff (reset after a good session), re-LISTENs, reconciles
and emits ``SourceStatus("database", True)``. ``run`` returns only when ``stop`` is set; it
raises only ``SchemaError`` (the configured table does not match) or what ``emit`` raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Collection, Iterable, Mapping

import asyncpg

from tower_progress.clock import sleep_or_stop
from tower_progress.core.model import Observation, RowDeleted, SourceStatus
from tower_progress.sources.db_retry import Backoff, describe
from tower_progress.sources.db_rows import ProblemLog, validate_row
from tower_progress.sources.db_table import (
    CHANNEL,
    DEFAULT_TERMINAL_STATUSES,
    JobTable,
    describe_table,
    ensure_trigger,
)

log = logging.getLogger(__name__)

SOURCE_NAME = "database"
APPLICATION_NAME = "tower-progress listener"
_RELOAD_BATCH = 500


class _ConnectionLost(Exception):
    pass


# Anything the database can throw at a session is survived by reconnecting; only SchemaError
# (raised by us, not asyncpg) and errors from ``emit`` leave ``run``.
_DATABASE_AWAY = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class JobTableListener:
    """Feeds ``JobRow``/``RowDeleted``/``SourceStatus`` observations to ``emit``.

    ``columns`` maps logical fields (``id``, ``status``, ``comfyui_job_id``, ``title``,
    ``total_frames``, ``created_at``, ``updated_at``) to the table's column names; unmapped
    fields default to their own name. ``terminal_statuses`` are the producer's final statuses
    (compared case-insensitively). ``emit`` is called from the event loop and must not block.
    """

    def __init__(
        self,
        *,
        dsn: str,
        jobs_table: str,
        columns: Mapping[str, str],
        emit: Callable[[Observation], None],
        reconcile_interval: float = 30.0,
        trigger: bool = True,
        active_window: float = 3600.0,
        terminal_statuses: Collection[str] = DEFAULT_TERMINAL_STATUSES,
        reconcile_limit: int = 5000,
        max_pending: int = 10_000,
        query_timeout: float = 15.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        if reconcile_interval <= 0 or active_window < 0 or reconcile_limit < 1:
            raise ValueError("reconcile_interval > 0, active_window >= 0, reconcile_limit >= 1")
        self._dsn = dsn
        self._jobs_table = jobs_table
        self._column_map = dict(columns)
        self._emit = emit
        self._reconcile_interval = reconcile_interval
        self._trigger = trigger
        self._active_window = active_window
        self._terminal = frozenset(s.lower() for s in terminal_statuses)
        self._reconcile_limit = reconcile_limit
        self._max_pending = max_pending
        self._query_timeout = query_timeout
        self._backoff = Backoff(base=backoff_base, cap=backoff_cap)
        self._wake = asyncio.Event()
        self._pending: dict[str, None] = {}
        self._overflowed = False
        self._seen: set[str] = set()
        self._up: bool | None = None
        self._table: JobTable | None = None
        self._problems: ProblemLog | None = None
        self._limit_warned = False

    async def run(self, stop: asyncio.Event) -> None:
        relay = asyncio.create_task(self._relay_stop(stop), name="db-listener-stop-relay")
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                except _ConnectionLost:
                    self._set_down("connection lost")
                except _DATABASE_AWAY as exc:
                    self._set_down(describe(exc))
                if stop.is_set():
                    break
                delay = self._backoff.next_delay()
                log.debug("database listener: reconnecting in %.2f s", delay)
                if await sleep_or_stop(stop, delay):
                    break
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay

    async def check(self) -> None:
        """Read the jobs table's columns once, before serving: ``SchemaError`` (one line) for a
        missing table or required column. A database that cannot be reached is left to
        ``run``, which waits for it."""
        try:
            conn = await self._connect()
        except _DATABASE_AWAY:
            return
        try:
            await self._resolve(conn)
        except _DATABASE_AWAY:
            return
        finally:
            await _close(conn)

    async def _relay_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self._dsn,
            timeout=self._query_timeout,
            server_settings={"application_name": APPLICATION_NAME},
        )

    async def _session(self, stop: asyncio.Event) -> None:
        conn = await self._connect()
        lost = asyncio.Event()

        def on_terminate(_conn: object) -> None:
            lost.set()
            self._wake.set()

        conn.add_termination_listener(on_terminate)
        try:
            table = await self._resolve(conn)
            triggered = (
                await ensure_trigger(conn, table.info, table.columns["id"])
                if self._trigger
                else False
            )
            await conn.add_listener(CHANNEL, self._on_notify)
            await self._reconcile(conn, table)
            self._set_up(triggered)
            self._backoff.reset()
            await self._serve(conn, table, stop, lost)
        finally:
            await _close(conn)

    async def _serve(
        self, conn: asyncpg.Connection, table: JobTable, stop: asyncio.Event, lost: asyncio.Event
    ) -> None:
        loop = asyncio.get_running_loop()
        next_reconcile = loop.time() + self._reconcile_interval
        while not stop.is_set():
            self._wake.clear()
            if lost.is_set():
                raise _ConnectionLost
            if self._overflowed or loop.time() >= next_reconcile:
                self._overflowed = False
                await self._reconcile(conn, table)
                next_reconcile = loop.time() + self._reconcile_interval
                continue
            if self._pending:
                await self._reload_pending(conn, table)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_reconcile - loop.time())):
                    await self._wake.wait()

    async def _resolve(self, conn: asyncpg.Connection) -> JobTable:
        info = await describe_table(conn, self._jobs_table)
        table = JobTable.resolve(info, self._column_map)
        if self._table is None or self._table.missing != table.missing:
            for missing in table.missing:
                log.warning("%s has no column for %s; that field stays null", info.display, missing)
        if self._problems is None:
            self._problems = ProblemLog(log, table=info.display)
        self._table = table
        return table

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            if not isinstance(payload, str):
                raise TypeError("payload is not text")
            message = json.loads(payload)
            row_id = message["id"]
            if not isinstance(row_id, str):
                raise TypeError("id is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring malformed notification on %s: %s: %.200r", CHANNEL, exc, payload)
            return
        if self._is_other_table(message):
            return
        if row_id in self._pending:
            return
        if len(self._pending) >= self._max_pending:
            if not self._overflowed:
                log.warning(
                    "more than %d row changes pending; falling back to a full reconcile",
                    self._max_pending,
                )
            self._pending.clear()
            self._overflowed = True
        else:
            self._pending[row_id] = None
        self._wake.set()

    def _is_other_table(self, message: dict[str, object]) -> bool:
        """Notifications name their table; another daemon's table shares the channel."""
        table = self._table
        if table is None or "schema" not in message:
            return False
        return (message["schema"], message.get("table")) != (table.info.schema, table.info.name)

    async def _reload_pending(self, conn: asyncpg.Connection, table: JobTable) -> None:
        ids = list(self._pending)[:_RELOAD_BATCH]
        for row_id in ids:
            del self._pending[row_id]
        try:
            found = self._emit_rows(await self._fetch_ids(conn, table, ids))
        except asyncpg.DataError as exc:
            log.warning("could not reload rows %s: %s; reconciling", ids[:5], describe(exc))
            self._overflowed = True
            return
        for row_id in ids:
            if row_id not in found:
                self._seen.discard(row_id)
                self._emit(RowDeleted(row_id))

    async def _reconcile(self, conn: asyncpg.Connection, table: JobTable) -> None:
        sql, args = table.reconcile_query(
            terminal_statuses=self._terminal,
            active_window=self._active_window,
            limit=self._reconcile_limit,
        )
        rows = await conn.fetch(sql, *args, timeout=self._query_timeout)
        if len(rows) >= self._reconcile_limit and not self._limit_warned:
            self._limit_warned = True
            log.warning(
                "%s: more than %d active rows; reconcile sees only the newest %d",
                table.info.display,
                self._reconcile_limit,
                self._reconcile_limit,
            )
        current = self._emit_rows(rows)
        gone = sorted(self._seen - current)
        for start in range(0, len(gone), _RELOAD_BATCH):
            chunk = gone[start : start + _RELOAD_BATCH]
            still_there = self._emit_rows(await self._fetch_ids(conn, table, chunk))
            for row_id in chunk:
                if row_id not in still_there:
                    self._emit(RowDeleted(row_id))
        self._seen = current

    async def _fetch_ids(
        self, conn: asyncpg.Connection, table: JobTable, ids: list[str]
    ) -> list[asyncpg.Record]:
        return await conn.fetch(table.by_ids_sql(), ids, timeout=self._query_timeout)

    def _emit_rows(self, rows: Iterable[asyncpg.Record]) -> set[str]:
        emitted: set[str] = set()
        problems = self._problems
        for record in rows:
            row, issues = validate_row(dict(record.items()))
            if issues and problems is not None:
                problems.report(row.id if row is not None else None, issues)
            if row is None:
                continue
            emitted.add(row.id)
            self._seen.add(row.id)
            self._emit(row)
        return emitted

    def _set_up(self, triggered: bool) -> None:
        if self._up is not True:
            log.info(
                "database listener connected to %s (%s)",
                self._table.info.display if self._table is not None else self._jobs_table,
                "NOTIFY trigger" if triggered else "reconcile poll only",
            )
            self._emit(SourceStatus(SOURCE_NAME, True))
        self._up = True

    def _set_down(self, detail: str) -> None:
        if self._up is not False:
            log.warning("database listener: %s; reconnecting", detail)
            self._emit(SourceStatus(SOURCE_NAME, False, detail))
        else:
            log.debug("database listener: still down: %s", detail)
        self._up = False


async def _close(conn: asyncpg.Connection) -> None:
    if conn.is_closed():
        return
    try:
        async with asyncio.timeout(2.0):
            await conn.close()
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()
