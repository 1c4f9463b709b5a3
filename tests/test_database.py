"""PostgreSQL source against a real embedded PostgreSQL (one server for the whole session).

Every test works in its own schema so tests cannot see each other's rows. Waits are on the
emit queue or on a database condition, never on a fixed sleep; the listener's periodic
reconcile is pushed out to an hour so that a change can only arrive the way a test means it to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tower_progress.core.model import JobFinished, JobRow, Observation, RowDeleted, SourceStatus
from tower_progress.sources.database import (
    EmbeddedPostgres,
    History,
    JobTableListener,
    SchemaError,
    WriteBack,
    install_trigger,
    migrate,
)
from tower_progress.sources.db_embedded import EmbeddedPostgresError
from tower_progress.sources.db_history import DatabaseUnavailable
from tower_progress.sources.db_migrations import available_migrations
from tower_progress.sources.db_retry import is_transient

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
T0_EPOCH = T0.timestamp()
OLD = datetime(2025, 1, 1, tzinfo=UTC)
WAIT_S = 15.0
ALL_MIGRATIONS = [m.name for m in available_migrations()]


async def test_session_database_has_every_migration(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT name FROM tower_progress.schema_migrations ORDER BY version")
    assert [r["name"] for r in rows] == ALL_MIGRATIONS


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


@pytest.fixture
async def schema(conn: asyncpg.Connection) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    await conn.execute(f"CREATE SCHEMA {name}")
    yield name
    await conn.execute(f"DROP SCHEMA {name} CASCADE")


REFERENCE_LIKE = """
CREATE TABLE {table} (
    id             bigserial PRIMARY KEY,
    title          text,
    status         text        NOT NULL DEFAULT 'pending',
    comfyui_job_id text,
    total_frames   integer,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
)"""


class Feed:
    """The listener's emit callback: a queue the test awaits."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Observation] = asyncio.Queue()

    def emit(self, observation: Observation) -> None:
        self.queue.put_nowait(observation)

    async def next(self) -> Observation:
        async with asyncio.timeout(WAIT_S):
            return await self.queue.get()

    async def until(self, wanted: Observation) -> list[Observation]:
        """Everything emitted up to and including ``wanted``."""
        seen: list[Observation] = []
        while not seen or seen[-1] != wanted:
            seen.append(await self.next())
        return seen

    def drained(self) -> list[Observation]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


UP = SourceStatus("database", True)


@asynccontextmanager
async def running(
    worker: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker(stop))
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await task


def listener(dsn: str, table: str, feed: Feed, **options: Any) -> JobTableListener:
    options.setdefault("reconcile_interval", 3600.0)
    options.setdefault("backoff_cap", 0.2)
    options.setdefault("backoff_base", 0.05)
    return JobTableListener(
        dsn=dsn, jobs_table=table, columns=options.pop("columns", {}), emit=feed.emit, **options
    )


def row(job_id: int | str, status: str | None, **fields: Any) -> JobRow:
    fields.setdefault("created_at", T0_EPOCH)
    fields.setdefault("updated_at", T0_EPOCH)
    return JobRow(id=str(job_id), status=status, **fields)


async def wait_until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll a database condition: another session's lock state has no event to wait on."""
    async with asyncio.timeout(WAIT_S):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def insert_job(conn: asyncpg.Connection, table: str, job_id: int, status: str) -> None:
    await conn.execute(
        f"INSERT INTO {table} (id, status, created_at, updated_at) VALUES ($1, $2, $3, $3)",
        job_id,
        status,
        T0,
    )


async def terminate_listener(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'tower-progress listener' AND pid <> pg_backend_pid()"
        )
    )


# --- migrations ---------------------------------------------------------------------------


async def test_migrations_applied_once_by_two_concurrent_callers(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    database = f"mig_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE DATABASE {database}")
    dsn = pg_dsn.replace("/postgres?", f"/{database}?")
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock(x'746F7765725F7072'::bigint)")
        first = asyncio.create_task(migrate(dsn))
        second = asyncio.create_task(migrate(dsn))

        async def both_waiting() -> bool:
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            return bool(waiting == 2)

        await wait_until(both_waiting)
        await holder.execute("SELECT pg_advisory_unlock(x'746F7765725F7072'::bigint)")
        results = sorted(await asyncio.gather(first, second), key=len)
        assert results == [[], ALL_MIGRATIONS]
        recorded = await holder.fetch(
            "SELECT version, name FROM tower_progress.schema_migrations ORDER BY version"
        )
        assert [(r["version"], r["name"]) for r in recorded] == [
            (1, "0001_history"),
            (2, "0002_notify_trigger"),
        ]
        assert await migrate(dsn) == []
    finally:
        await holder.close()
        await conn.execute(f"DROP DATABASE {database} WITH (FORCE)")


# --- listener -----------------------------------------------------------------------------


async def test_insert_update_delete_arrive_through_notify(
    pg_dsn: str, conn: asyncpg.Connection, schema: str
) -> None:
    table = f"{schema}.production_jobs"
    await conn.execute(REFERENCE_LIKE.format(table=table))
    await conn.execute(
        f"INSERT INTO {table} (id, title, status, total_frames, created_at, updated_at) VALUES "
        "(1, 'old', 'done', 10, $1, $1), (2, 'active', 'processing', 48, $2, $2)",
        OLD,
        T0,
    )
    feed = Feed()
    async with running(listener(pg_dsn, table, feed).run):
        assert await feed.until(UP) == [
            row(2, "processing", title="active", total_frames=48),
            UP,
        ]
        await conn.execute(
            f"INSERT INTO {table} (id, title, comfyui_job_id, created_at, updated_at) "
            "VALUES (3, 'new', NULL, $1, $1)",
            T0,
        )
        assert await feed.next() == row(3, "pending", title="new")
        await conn.execute(
            f"UPDATE {table} SET status = 'rendering', comfyui_job_id = 'p-3', "
            "updated_at = $1 WHERE id = 3",
            T0 + timedelta(seconds=2),
        )
        assert await feed.next() == row(
            3, "rendering", title="new", prompt_id="p-3", updated_at=T0_EPOCH + 2
        )
        await conn.execute(f"DELETE FROM {table} WHERE id = 3")
        assert await feed.next() == RowDeleted("3")
    assert feed.drained() == []


async def test_change_missed_while_disconnected_arrives_through_reconcile(
    pg_dsn: str, conn: asyncpg.Connection, schema: str
) -> None:
    table = f"{schema}.jobs"
    await conn.execute(REFERENCE_LIKE.format(table=table))
    await conn.execute(
        f"INSERT INTO {table} (id, status, created_at, updated_at) VALUES "
        "(1, 'processing', $1, $1), (2, 'queued', $1, $1), (3, 'queued', $1, $1)",
        T0,
    )
    feed = Feed()
    async with running(listener(pg_dsn, table, feed).run):
        assert await feed.until(UP) == [
            row(3, "queued"),
            row(2, "queued"),
            row(1, "processing"),
            UP,
        ]
        # Triggers are off for this session, so these changes send no NOTIFY: only the
        # reconcile after the reconnect can deliver them.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(f"UPDATE {table} SET status = 'failed' WHERE id = 1")
        await conn.execute(f"DELETE FROM {table} WHERE id = 2")
        await conn.execute("RESET session_replication_role")
        assert await terminate_listener(conn) == 1
        down = await feed.next()
        assert isinstance(down, SourceStatus) and not down.up and down.detail
        assert await feed.until(UP) == [row(3, "queued"), row(1, "failed"), RowDeleted("2"), UP]


async def test_listener_survives_garbage_notifications(
    pg_dsn: str, conn: asyncpg.Connection, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = f"{schema}.jobs"
    await conn.execute(REFERENCE_LIKE.format(table=table))
    feed = Feed()
    async with running(listener(pg_dsn, table, feed).run):
        assert await feed.until(UP) == [UP]
        await conn.execute("SELECT pg_notify('tower_progress', 'not json')")
        await conn.execute("""SELECT pg_notify('tower_progress', '{"op": "INSERT"}')""")
        await conn.execute(
            "SELECT pg_notify('tower_progress', "
            """'{"id": "9", "op": "DELETE", "schema": "elsewhere", "table": "jobs"}')"""
        )
        await insert_job(conn, table, 5, "queued")
        assert await feed.next() == row(5, "queued")
    assert feed.drained() == []
    malformed = [r for r in caplog.records if "malformed notification" in r.getMessage()]
    assert len(malformed) == 2


async def test_missing_optional_columns_stay_null_and_are_logged_once(
    pg_dsn: str, conn: asyncpg.Connection, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = f"{schema}.jobs"
    await conn.execute(f"CREATE TABLE {table} (job_key text PRIMARY KEY, state text)")
    await conn.execute(f"INSERT INTO {table} VALUES ('a', 'queued'), ('b', 'done')")
    feed = Feed()
    jobs = listener(pg_dsn, table, feed, columns={"id": "job_key", "status": "state"})
    with caplog.at_level(logging.WARNING, logger="tower_progress.sources.db_listener"):
        async with running(jobs.run):
            assert await feed.until(UP) == [JobRow("a", "queued"), UP]
            assert await terminate_listener(conn) == 1
            await feed.until(UP)
            await conn.execute(f"UPDATE {table} SET state = 'done' WHERE job_key = 'a'")
            assert await feed.next() == JobRow("a", "done")
    missing = sorted(r.getMessage() for r in caplog.records if "has no column" in r.getMessage())
    assert missing == [
        f"{schema}.jobs has no column for {field}; that field stays null"
        for field in (
            "comfyui_job_id (comfyui_job_id)",
            "created_at (created_at)",
            "title (title)",
            "total_frames (total_frames)",
            "updated_at (updated_at)",
        )
    ]


async def test_missing_required_column_or_table_raises_schema_error(
    pg_dsn: str, conn: asyncpg.Connection, schema: str
) -> None:
    await conn.execute(f"CREATE TABLE {schema}.jobs (id bigint PRIMARY KEY, title text)")
    for table, columns, message in (
        (
            f"{schema}.jobs",
            {},
            f"database.columns.status: column 'status' not found in {schema}.jobs",
        ),
        (f"{schema}.jobs", {"id": "job_id"}, "database.columns.id: column 'job_id' not found"),
        (f"{schema}.nope", {}, f"database.jobs_table: table '{schema}.nope' does not exist"),
    ):
        feed = Feed()
        jobs = listener(pg_dsn, table, feed, columns=columns)
        with pytest.raises(SchemaError) as raised:
            await jobs.run(asyncio.Event())
        assert str(raised.value).startswith(message)
        assert "\n" not in str(raised.value)


async def test_hostile_values_give_exact_rows_and_one_warning_per_job_and_field(
    pg_dsn: str, conn: asyncpg.Connection, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = f'{schema}."Odd Jobs"'
    await conn.execute(
        f"CREATE TABLE {table} (id text PRIMARY KEY, status text, total_frames bigint, "
        "title text, updated_at timestamp)"
    )
    await conn.execute(
        f"INSERT INTO {table} VALUES ('job-a', NULL, -5, 't', $1), "
        "('job-b', 'Never Seen Before', 1000000000000, NULL, $1), "
        "('job-c', 'queued', 24, NULL, 'infinity')",
        T0.replace(tzinfo=None),
    )
    feed = Feed()
    with caplog.at_level(logging.WARNING, logger="tower_progress.sources.db_listener"):
        async with running(listener(pg_dsn, table, feed).run):
            assert await feed.until(UP) == [
                JobRow("job-c", "queued", total_frames=24),
                JobRow("job-b", "Never Seen Before", updated_at=T0_EPOCH),
                JobRow("job-a", None, title="t", updated_at=T0_EPOCH),
                UP,
            ]
            await conn.execute(f"UPDATE {table} SET title = 't2' WHERE id = 'job-a'")
            assert await feed.next() == JobRow("job-a", None, title="t2", updated_at=T0_EPOCH)
    warnings = sorted(r.getMessage() for r in caplog.records if ": job " in r.getMessage())
    assert warnings == [
        f"{schema}.Odd Jobs: job job-a: status=None: NULL status; using null",
        f"{schema}.Odd Jobs: job job-a: total_frames=-5: outside 1..100000; using null",
        f"{schema}.Odd Jobs: job job-b: total_frames=1000000000000: outside 1..100000; using null",
        f"{schema}.Odd Jobs: job job-c: updated_at=datetime.datetime(9999, 12, 31, 23, 59, 59, "
        "999999): outside 2000..2100; using null",
    ]


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (asyncpg.exceptions.AdminShutdownError, True),
        (asyncpg.exceptions.TooManyConnectionsError, True),
        (asyncpg.exceptions.PostgresIOError, True),
        (asyncpg.exceptions.DeadlockDetectedError, True),
        (asyncpg.exceptions.SerializationError, True),
        (asyncpg.exceptions.UndefinedColumnError, False),
        (asyncpg.exceptions.InsufficientPrivilegeError, False),
        (asyncpg.exceptions.LockNotAvailableError, False),
    ],
)
def test_only_errors_that_go_away_by_themselves_are_retried(
    error: type[asyncpg.PostgresError], transient: bool
) -> None:
    assert is_transient(error("boom")) is transient


async def test_trigger_install_is_idempotent_and_never_blocks_the_producer(
    pg_dsn: str, conn: asyncpg.Connection, schema: str
) -> None:
    table = f"{schema}.jobs"
    await conn.execute(REFERENCE_LIKE.format(table=table))
    assert await install_trigger(pg_dsn, table) is True
    query = "SELECT oid FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal"
    first = await conn.fetch(query, table)
    assert await install_trigger(pg_dsn, table, "id") is True
    assert await conn.fetch(query, table) == first and len(first) == 1
    # A producer role with no rights on our schema still writes, and still notifies.
    role = f"producer_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    await conn.execute(f"GRANT ALL ON {table}, {schema}.jobs_id_seq TO {role}")
    heard: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener("tower_progress", lambda *args: heard.put_nowait(args[3]))
    producer = await asyncpg.connect(pg_dsn, user=role)
    try:
        await producer.execute(f"INSERT INTO {table} (id, status) VALUES (77, 'queued')")
    finally:
        await producer.close()
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    async with asyncio.timeout(WAIT_S):
        payload = await heard.get()
    assert payload == (f'{{"id" : "77", "op" : "INSERT", "schema" : "{schema}", "table" : "jobs"}}')


async def test_listener_without_trigger_relies_on_reconcile(
    pg_dsn: str, conn: asyncpg.Connection, schema: str
) -> None:
    table = f"{schema}.jobs"
    await conn.execute(REFERENCE_LIKE.format(table=table))
    feed = Feed()
    jobs = listener(pg_dsn, table, feed, trigger=False, reconcile_interval=0.1)
    async with running(jobs.run):
        assert await feed.until(UP) == [UP]
        await insert_job(conn, table, 4, "queued")
        assert await feed.next() == row(4, "queued")
    assert (
        await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass", table)
        == 0
    )


# --- history ------------------------------------------------------------------------------


def finished(
    job_id: str, finished_at: datetime, fingerprint: str | None, **stages: float
) -> JobFinished:
    job = {
        "id": job_id,
        "title": f"title {job_id}",
        "state": "completed",
        "started_at": (finished_at - timedelta(seconds=30)).isoformat(),
        "finished_at": finished_at.isoformat(),
        "elapsed_s": 30.0,
        "instance": "local",
        "prompt_id": f"p-{job_id}",
        "error": None,
    }
    return JobFinished(job=job, fingerprint=fingerprint, stage_seconds=dict(stages))


@pytest.fixture
async def history_pool(pg_dsn: str, conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    await conn.execute(
        "TRUNCATE tower_progress.progress_samples, tower_progress.stage_durations, "
        "tower_progress.finished_jobs"
    )
    pool = await asyncpg.create_pool(pg_dsn, min_size=0, max_size=2)
    yield pool
    await pool.close()


async def test_priors_survive_a_restart_newest_first(
    pg_dsn: str, history_pool: asyncpg.Pool
) -> None:
    history = History(history_pool)
    for index, seconds in enumerate((10.0, 11.0, 12.5)):
        assert history.record_finished(
            finished(
                f"a{index}", T0 + timedelta(minutes=index), "fp-a", loading=3.0, sampling=seconds
            )
        )
    assert history.record_finished(finished("b0", T0, "fp-b", sampling=7.25))
    assert history.record_finished(finished("c0", T0, None, sampling=1.0))
    await history.close()

    restarted = await History.open(pg_dsn)
    try:
        assert await restarted.load_priors(limit_per_fingerprint=2) == {
            "fp-a": [{"loading": 3.0, "sampling": 12.5}, {"loading": 3.0, "sampling": 11.0}],
            "fp-b": [{"sampling": 7.25}],
        }
        assert await restarted.job("a2") == {
            **finished("a2", T0 + timedelta(minutes=2), "fp-a").job
        }
        assert await restarted.job("missing") is None
    finally:
        await restarted.close()


async def test_samples_round_trip_with_minimum_interval(history_pool: asyncpg.Pool) -> None:
    history = History(history_pool, min_sample_interval=2.0)
    taken = [
        history.record_sample("j1", T0_EPOCH + dt, pct, stage, step)
        for dt, pct, stage, step in (
            (0.0, 0.0, "loading", None),
            (1.0, 5.0, "loading", None),
            (2.0, 12.5, "sampling", 3),
            (3.9, 15.0, "sampling", 4),
            (4.0, 45.3, "sampling", 13),
        )
    ]
    assert taken == [True, False, True, False, True]
    assert history.record_sample("j1", float("nan"), 1.0, None, None) is False
    assert history.record_sample("j1", T0_EPOCH + 9, 50.0, None, -1) is False
    await history.flush()
    assert history.pending == 0
    assert await history.samples("j1") == [
        {"t": "2026-03-01T12:00:00+00:00", "percent": 0.0, "stage": "loading", "step": None},
        {"t": "2026-03-01T12:00:02+00:00", "percent": 12.5, "stage": "sampling", "step": 3},
        {"t": "2026-03-01T12:00:04+00:00", "percent": 45.3, "stage": "sampling", "step": 13},
    ]
    assert await history.samples("other") == []


async def test_a_job_the_tracker_did_not_see_run_never_overwrites_history(
    history_pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    history = History(history_pool)
    history.record_finished(finished("seen", T0, "fp", sampling=12.0))
    await history.flush()
    late = finished("seen", T0 + timedelta(hours=1), None)
    late.job["title"] = "from the row alone"
    history.record_finished(replace(late, witnessed=False))
    history.record_finished(replace(finished("new", T0, None), witnessed=False))
    await history.flush()
    rows = await conn.fetch(
        "SELECT job_id, title, finished_at FROM tower_progress.finished_jobs ORDER BY job_id"
    )
    assert [tuple(r) for r in rows] == [("new", "title new", T0), ("seen", "title seen", T0)]
    assert (await history.load_priors())["fp"] == [{"sampling": 12.0}]


async def test_a_forgotten_job_keeps_no_sample_clock(history_pool: asyncpg.Pool) -> None:
    history = History(history_pool, min_sample_interval=2.0)
    assert history.record_sample("comfy:p1", T0_EPOCH, 5.0, "sampling", 1)
    assert not history.record_sample("comfy:p1", T0_EPOCH + 1, 6.0, "sampling", 2)
    history.forget("comfy:p1")
    history.forget("never-seen")
    assert history.record_sample("comfy:p1", T0_EPOCH + 1, 6.0, "sampling", 2)
    assert history.pending == 2


async def test_finished_jobs_keyset_pagination(history_pool: asyncpg.Pool) -> None:
    history = History(history_pool)
    for job_id, minute in (("j1", 1), ("j2", 2), ("j3", 3), ("j4", 3), ("j5", 5)):
        history.record_finished(finished(job_id, T0 + timedelta(minutes=minute), None))
    await history.flush()
    pages, cursor = [], None
    while True:
        page, cursor = await history.finished_jobs(limit=2, before=cursor)
        pages.append([job["id"] for job in page])
        if cursor is None:
            break
    assert pages == [["j5", "j4"], ["j3", "j2"], ["j1"]]
    with pytest.raises(ValueError, match="invalid cursor"):
        await history.finished_jobs(limit=2, before="%%%")
    with pytest.raises(ValueError, match="limit"):
        await history.finished_jobs(limit=0)


async def test_a_large_batch_is_written_whole_and_a_job_finished_twice_keeps_its_last(
    history_pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    history = History(history_pool, batch_size=5000)
    for index in range(1500):
        history.record_finished(
            finished(f"j{index}", T0, "fp-big", loading=1.0, sampling=float(index))
        )
    again = finished("j7", T0 + timedelta(minutes=1), "fp-big", sampling=99.0)
    again.job["title"] = "second"
    history.record_finished(again)
    history.record_sample("j1", T0_EPOCH, 10.0, "sampling", 2)
    await history.flush()
    assert history.pending == 0
    assert await conn.fetchval("SELECT count(*) FROM tower_progress.finished_jobs") == 1500
    assert await conn.fetchval("SELECT count(*) FROM tower_progress.stage_durations") == 3000
    assert await conn.fetchval("SELECT count(*) FROM tower_progress.progress_samples") == 1
    assert await conn.fetchrow(
        "SELECT title, finished_at FROM tower_progress.finished_jobs WHERE job_id = 'j7'"
    ) == ("second", T0 + timedelta(minutes=1))
    stages = await conn.fetch(
        "SELECT stage, seconds FROM tower_progress.stage_durations WHERE job_id = 'j7' "
        "ORDER BY stage"
    )
    assert [tuple(r) for r in stages] == [("loading", 1.0), ("sampling", 99.0)]
    assert (await history.load_priors(limit_per_fingerprint=1))["fp-big"] == [
        {"loading": 1.0, "sampling": 99.0}
    ]


async def test_prune_deletes_only_what_is_older_than_the_retention(
    history_pool: asyncpg.Pool,
) -> None:
    now = T0_EPOCH + 40 * 86400
    history = History(history_pool, retention_days=30, clock=lambda: now)
    history.record_sample("old", T0_EPOCH, 1.0, None, None)
    history.record_sample("new", now - 60, 1.0, None, None)
    history.record_finished(finished("old", T0, "fp", sampling=1.0))
    history.record_finished(finished("new", T0 + timedelta(days=20), "fp", sampling=2.0))
    await history.flush()
    assert await history.prune() == 3
    assert await history.samples("old") == []
    assert len(await history.samples("new")) == 1
    assert await history.load_priors() == {"fp": [{"sampling": 2.0}]}
    assert (await history.finished_jobs(limit=10))[0][0]["id"] == "new"


async def test_writes_while_the_database_is_away_are_buffered_bounded_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = await asyncpg.create_pool(
        "postgresql://postgres@/postgres?host=/nonexistent-tower-progress", min_size=0
    )
    history = History(pool, buffer_limit=3)
    try:
        for index in range(5):
            assert history.record_sample(f"j{index}", T0_EPOCH, 1.0, None, None)
        assert (history.pending, history.dropped) == (3, 2)
        with pytest.raises(OSError):
            await history.flush()
        assert (history.pending, history.dropped) == (3, 2)
        with pytest.raises(DatabaseUnavailable):
            await history.samples("j1")
        full = [r for r in caplog.records if "buffer full" in r.getMessage()]
        assert len(full) == 1
    finally:
        await pool.close()


# --- write-back ---------------------------------------------------------------------------


async def test_write_back_updates_progress_columns_but_never_a_terminal_row(
    pg_dsn: str, conn: asyncpg.Connection, schema: str
) -> None:
    table = f"{schema}.jobs"
    await conn.execute(
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, status text, title text, "
        "pct numeric(5,1), stage_name text, frames int, eta int, updated_at timestamptz)"
    )
    await conn.execute(
        f"INSERT INTO {table} (id, status, title, updated_at) VALUES "
        "(1, 'processing', 'a', $1), (2, 'done', 'b', $1), (3, 'Cancelled', 'c', $1)",
        T0,
    )
    clock = [1000.0]
    writer = WriteBack(
        dsn=pg_dsn,
        jobs_table=table,
        columns={"percent": "pct", "stage": "stage_name", "frames_done": "frames", "eta_s": "eta"},
        min_interval=5.0,
        clock=lambda: clock[0],
    )
    await writer.prepare()
    try:
        progress = {"percent": 42.26, "stage": "sampling", "frames_done": 10, "eta_s": 61.6}
        for job_id in ("1", "2", "3"):
            writer.update({"id": job_id, **progress})
        assert await writer.write_due() == 1

        async def table_rows() -> list[tuple[Any, ...]]:
            return [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY id")]

        after_first = [
            (1, "processing", "a", Decimal("42.3"), "sampling", 10, 62, T0),
            (2, "done", "b", None, None, None, None, T0),
            (3, "Cancelled", "c", None, None, None, None, T0),
        ]
        assert await table_rows() == after_first
        writer.update({"id": "1", **progress, "percent": 50.0})
        clock[0] += 1.0
        assert await writer.write_due() == 0
        assert await table_rows() == after_first
        await conn.execute(f"UPDATE {table} SET status = 'failed' WHERE id = 1")
        clock[0] += 5.0
        assert await writer.write_due() == 0
        assert (await table_rows())[0] == (
            1,
            "failed",
            "a",
            Decimal("42.3"),
            "sampling",
            10,
            62,
            T0,
        )
    finally:
        await writer.close()


async def test_write_back_missing_column_is_a_schema_error(
    pg_dsn: str, conn: asyncpg.Connection, schema: str
) -> None:
    await conn.execute(f"CREATE TABLE {schema}.jobs (id bigint PRIMARY KEY, status text)")
    writer = WriteBack(dsn=pg_dsn, jobs_table=f"{schema}.jobs", columns={"percent": "pct"})
    try:
        with pytest.raises(SchemaError, match=r"^database\.write_back\.percent: column 'pct'"):
            await writer.prepare()
    finally:
        await writer.close()


# --- embedded server lifecycle ------------------------------------------------------------


@pytest.fixture
def state_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="tp-embedded-"))
    yield base / "state"
    shutil.rmtree(base, ignore_errors=True)


async def test_database_stopped_and_restarted_mid_run(state_dir: Path) -> None:
    server = EmbeddedPostgres()
    dsn = await asyncio.to_thread(server.start, state_dir / "pgdata")
    try:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        await conn.execute(
            "INSERT INTO production_jobs (id, status, total_frames, created_at, updated_at) "
            "VALUES (1, 'processing', 96, $1, $1)",
            T0,
        )
        feed = Feed()
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2)
        history = History(pool, flush_interval=0.05, backoff_base=0.05, backoff_cap=0.2)
        jobs = listener(dsn, "production_jobs", feed)
        async with running(jobs.run), running(history.run):
            assert await feed.until(UP) == [row(1, "processing", total_frames=96), UP]
            await conn.execute("SET session_replication_role = replica")
            await conn.execute("UPDATE production_jobs SET status = 'completed' WHERE id = 1")
            await conn.close()

            await asyncio.to_thread(server.stop)
            down = await feed.next()
            assert isinstance(down, SourceStatus) and not down.up and down.detail
            assert history.record_sample("1", T0_EPOCH, 10.0, "sampling", 3)

            assert await asyncio.to_thread(server.start, state_dir / "pgdata") == dsn
            assert await feed.until(UP) == [row(1, "completed", total_frames=96), UP]
            await history.flush()
            assert await history.samples("1") == [
                {"t": "2026-03-01T12:00:00+00:00", "percent": 10.0, "stage": "sampling", "step": 3}
            ]
            assert (history.pending, history.dropped) == (0, 0)
        await history.close()
        await pool.close()
    finally:
        await asyncio.to_thread(server.stop)

    again = EmbeddedPostgres()
    dsn = await asyncio.to_thread(again.start, state_dir / "pgdata")
    try:
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT status FROM production_jobs WHERE id = 1") == "completed"
        assert await migrate(dsn) == []
        await conn.close()
    finally:
        await asyncio.to_thread(again.stop)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root could widen its home's permissions")
def test_root_refuses_a_data_dir_under_its_home() -> None:
    home = Path(pwd.getpwuid(0).pw_dir)
    mode = home.stat().st_mode
    with pytest.raises(EmbeddedPostgresError, match=f"is under {home}: as root"):
        EmbeddedPostgres().start(home / ".tower-progress-test" / "pgdata")
    assert home.stat().st_mode == mode
    assert not (home / ".tower-progress-test").exists()


ORDINARY_USER_SCRIPT = """
import asyncio, os, sys
from pathlib import Path
import asyncpg
from tower_progress.sources.database import EmbeddedPostgres

async def main() -> None:
    server = EmbeddedPostgres()
    dsn = await asyncio.to_thread(server.start, Path(sys.argv[1]))
    try:
        conn = await asyncpg.connect(dsn)
        print(await conn.fetchval("SELECT to_regclass('public.production_jobs')::text"))
        await conn.close()
    finally:
        await asyncio.to_thread(server.stop)
    print(os.environ["XDG_RUNTIME_DIR"])

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the rest of this module runs as that user")
def test_embedded_runs_as_an_ordinary_user(state_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    state_dir.mkdir(parents=True)
    state_dir.parent.chmod(0o755)
    os.chown(state_dir, nobody.pw_uid, nobody.pw_gid)
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            ORDINARY_USER_SCRIPT,
            str(state_dir / "pgdata"),
        ],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo), "HOME": str(state_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["production_jobs", str(state_dir / "run")]
    assert (state_dir / "pgdata").stat().st_uid == nobody.pw_uid
