"""History in the daemon's own schema: progress samples, stage durations, finished jobs.

Writes never block the caller and never wait for the database: ``record_sample`` and
``record_finished`` append to a bounded in-memory buffer that a background task flushes in
batches. While the database is away the buffer holds up to ``buffer_limit`` entries; beyond
that the oldest are dropped, counted in ``dropped`` and logged (never silently). Retries back
off with jitter and a cap. Reads (priors, samples, finished jobs) go straight to the pool and
raise when the database is away; the caller decides what to show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from tower_progress.clock import next_tick, sleep_or_stop
from tower_progress.core.model import JobFinished, JsonDict
from tower_progress.sources.db_history_entries import (
    Entry,
    Finished,
    Sample,
    decode_cursor,
    encode_cursor,
    make_finished,
    make_sample,
)
from tower_progress.sources.db_retry import Backoff, describe, is_transient

log = logging.getLogger(__name__)

_MAX_PAGE = 1000
# OSError includes TimeoutError.
_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
_PRUNE_CHUNK = 5000


class DatabaseUnavailable(ConnectionError):
    """A history read could not reach the database (an ``OSError``, so callers that treat
    unreachable backends alike need nothing special)."""


_FINISHED_COLUMNS = (
    "job_id",
    "title",
    "state",
    "started_at",
    "finished_at",
    "duration_s",
    "instance",
    "prompt_id",
    "error",
    "job",
)
_FINISHED_VALUES = (
    f"INSERT INTO tower_progress.finished_jobs ({', '.join(_FINISHED_COLUMNS)}) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], "
    "$5::timestamptz[], $6::double precision[], $7::text[], $8::text[], $9::jsonb[], "
    "$10::jsonb[]) ON CONFLICT (job_id) DO "
)
_FINISHED_INSERT = _FINISHED_VALUES + "NOTHING"
_FINISHED_UPSERT = (
    _FINISHED_VALUES
    + "UPDATE SET "
    + ", ".join(f"{column} = EXCLUDED.{column}" for column in _FINISHED_COLUMNS[1:])
)


class History:
    """Buffered writer and reader of ``tower_progress`` history tables on an asyncpg pool.

    Run ``run(stop)`` as a task and ``await close()`` at shutdown (it flushes). Reads raise
    ``DatabaseUnavailable`` (an ``OSError``) when the database cannot be reached.
    ``min_sample_interval`` is enforced per job on the sample timestamps even though callers
    are expected to rate-limit already.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        min_sample_interval: float = 2.0,
        buffer_limit: int = 10_000,
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        retention_days: float = 30.0,
        prune_interval: float = 3600.0,
        clock: Callable[[], float] = time.time,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        close_timeout: float = 5.0,
        io_timeout: float = 10.0,
        owns_pool: bool = False,
    ) -> None:
        if buffer_limit < 1 or batch_size < 1 or flush_interval <= 0 or prune_interval <= 0:
            raise ValueError("buffer_limit, batch_size, flush_interval, prune_interval must be > 0")
        self._pool = pool
        self._min_interval = min_sample_interval
        self._buffer_limit = buffer_limit
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retention = timedelta(days=retention_days)
        self._io_timeout = io_timeout
        self._owns_pool = owns_pool
        self._prune_interval = prune_interval
        self._clock = clock
        self._close_timeout = close_timeout
        self._backoff = Backoff(base=backoff_base, cap=backoff_cap)
        self._buffer: deque[Entry] = deque()
        self._last_sample: OrderedDict[str, float] = OrderedDict()
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._dropped = 0
        self._dropped_reported = 0
        self._away = False

    @property
    def pending(self) -> int:
        """Entries buffered and not yet written."""
        return len(self._buffer)

    @property
    def dropped(self) -> int:
        """Entries lost to buffer overflow since start (a metric; each episode is logged)."""
        return self._dropped

    # --- writes -------------------------------------------------------------------------

    def record_sample(
        self, job_id: str, t: float, percent: float | None, stage: str | None, step: int | None
    ) -> bool:
        """Buffer one progress sample (``t`` in epoch seconds); False when skipped.

        Skipped when the job's previous sample is less than ``min_sample_interval`` older, or
        when a value is unusable (logged).
        """
        sample = make_sample(job_id, t, percent, stage, step)
        if isinstance(sample, str):
            log.warning("history: job %s: sample skipped: %s", job_id, sample)
            return False
        last = self._last_sample.get(job_id)
        if last is not None and t - last < self._min_interval:
            return False
        self._last_sample[job_id] = t
        self._last_sample.move_to_end(job_id)
        while len(self._last_sample) > self._buffer_limit:
            self._last_sample.popitem(last=False)
        self._append(sample)
        return True

    def forget(self, job_id: str) -> None:
        """The job left the tracker (capped, deleted, merged into its row): stop rating its
        samples, so the per-job bookkeeping lives no longer than the job."""
        self._last_sample.pop(job_id, None)

    def record_finished(self, event: JobFinished) -> bool:
        """Buffer a finished job and, when it has a fingerprint, its stage durations."""
        entry, problems = make_finished(event, self._clock())
        for problem in problems:
            log.warning("history: job %s: %s", event.job.get("id"), problem)
        if entry is None:
            return False
        self._last_sample.pop(entry.job_id, None)
        self._append(entry)
        return True

    def _append(self, entry: Entry) -> None:
        self._buffer.append(entry)
        if len(self._buffer) > self._buffer_limit:
            self._buffer.popleft()
            self._count_dropped(1)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    def _count_dropped(self, count: int) -> None:
        if self._dropped == self._dropped_reported:
            log.warning(
                "history: buffer full (%d entries); dropping the oldest until the database "
                "accepts writes again",
                self._buffer_limit,
            )
        self._dropped += count

    # --- background flushing and pruning -------------------------------------------------

    @classmethod
    async def open(cls, dsn: str, **options: Any) -> History:
        """A History on its own small pool (closed by ``close()``); ``options`` as for init.

        The pool connects lazily, so this works while the database is away.
        """
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2)
        return cls(pool, owns_pool=True, **options)

    async def run(self, stop: asyncio.Event) -> None:
        """Flush on every tick of ``flush_interval`` (``tower_progress.clock``; sooner when a
        batch is full) and prune on a timer, until ``stop`` is set; then make one last flush
        attempt. Never raises for the database.
        """
        relay = asyncio.create_task(self._relay_stop(stop), name="history-stop-relay")
        try:
            await self._loop(stop)
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
        await self._final_flush()

    async def close(self) -> None:
        """Write what is still buffered (bounded by ``close_timeout``); close an owned pool."""
        await self._final_flush()
        if self._owns_pool:
            try:
                async with asyncio.timeout(self._close_timeout):
                    await self._pool.close()
            except TimeoutError:
                self._pool.terminate()

    async def _final_flush(self) -> None:
        if not self._buffer:
            return
        try:
            async with asyncio.timeout(self._close_timeout):
                await self.flush()
        except TimeoutError:
            log.error("history: flush at shutdown timed out")
        except _DATABASE_ERRORS as exc:
            log.error("history: flush at shutdown failed: %s", describe(exc))
        if self._buffer:
            log.error("history: %d entries not written at shutdown", len(self._buffer))

    async def _relay_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def flush(self) -> None:
        """Write everything buffered now; raises when the database is away (entries kept)."""
        async with self._flush_lock:
            while self._buffer:
                batch = self._take(self._batch_size)
                try:
                    await self._write(batch)
                except BaseException as exc:
                    self._requeue(batch)
                    if isinstance(exc, Exception) and not is_transient(exc):
                        await self._write_one_by_one(self._take(len(batch)))
                        continue
                    raise

    def _take(self, count: int) -> list[Entry]:
        return [self._buffer.popleft() for _ in range(min(count, len(self._buffer)))]

    def _requeue(self, batch: list[Entry]) -> None:
        self._buffer.extendleft(reversed(batch))
        overflow = len(self._buffer) - self._buffer_limit
        if overflow > 0:
            for _ in range(overflow):
                self._buffer.popleft()
            self._count_dropped(overflow)

    async def _write_one_by_one(self, batch: list[Entry]) -> None:
        """Isolate an entry the database rejects (it is logged and dropped, the rest written)."""
        for index, entry in enumerate(batch):
            try:
                await self._write([entry])
            except Exception as exc:
                if is_transient(exc):
                    self._requeue(batch[index:])
                    raise
                log.error("history: job %s: entry rejected: %s", entry.job_id, describe(exc))
                self._dropped += 1
                self._dropped_reported += 1

    def _report_recovery(self) -> None:
        if self._away:
            log.info("history: database writes resumed")
            self._away = False
        if self._dropped != self._dropped_reported:
            log.warning(
                "history: %d entries were dropped while the database was away",
                self._dropped - self._dropped_reported,
            )
            self._dropped_reported = self._dropped

    async def _write(self, batch: list[Entry]) -> None:
        async with asyncio.timeout(self._io_timeout):
            await self._write_batch(batch)
        self._report_recovery()

    async def _write_batch(self, batch: list[Entry]) -> None:
        """One statement per table, whatever the batch size: a batch of a thousand finished
        jobs is three round trips, not thousands (which outlasted ``io_timeout`` on a busy
        box and was retried for ever). Later entries win, as they would in separate batches:
        a job finished twice keeps its last row, each of its stages its last duration. A job
        the tracker did not see run is only added, never written over what history knows."""
        samples = [e for e in batch if isinstance(e, Sample)]
        every = [e for e in batch if isinstance(e, Finished)]
        finished = list({f.job_id: f for f in every}.values())
        durations = {
            (f.job_id, stage): (f.fingerprint, seconds, f.finished_at)
            for f in every
            if f.fingerprint is not None
            for stage, seconds in f.stage_seconds
        }
        async with self._pool.acquire() as conn, conn.transaction():
            if samples:
                await conn.execute(
                    "INSERT INTO tower_progress.progress_samples (job_id, t, percent, stage, step) "
                    "SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::real[], $4::text[], "
                    "$5::integer[]) ON CONFLICT (job_id, t) DO NOTHING",
                    [s.job_id for s in samples],
                    [s.t for s in samples],
                    [s.percent for s in samples],
                    [s.stage for s in samples],
                    [s.step for s in samples],
                )
            for witnessed in (True, False):
                rows = [f for f in finished if f.witnessed is witnessed]
                if rows:
                    await conn.execute(
                        _FINISHED_UPSERT if witnessed else _FINISHED_INSERT,
                        *([getattr(f, column) for f in rows] for column in _FINISHED_COLUMNS),
                    )
            if durations:
                await conn.execute(
                    "INSERT INTO tower_progress.stage_durations "
                    "(job_id, stage, fingerprint, seconds, finished_at) "
                    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], "
                    "$4::double precision[], $5::timestamptz[]) "
                    "ON CONFLICT (job_id, stage) DO UPDATE SET "
                    "fingerprint = EXCLUDED.fingerprint, seconds = EXCLUDED.seconds, "
                    "finished_at = EXCLUDED.finished_at",
                    [job_id for job_id, _ in durations],
                    [stage for _, stage in durations],
                    [v[0] for v in durations.values()],
                    [v[1] for v in durations.values()],
                    [v[2] for v in durations.values()],
                )

    async def _loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_tick(loop.time(), self._flush_interval)):
                    await self._wake.wait()
            self._wake.clear()
            if stop.is_set():
                return
            try:
                await self.flush()
                if loop.time() >= next_prune:
                    next_prune = loop.time() + self._prune_interval
                    await self.prune()
            except Exception as exc:
                if not is_transient(exc):
                    log.error("history: write failed: %s", describe(exc))
                elif not self._away:
                    log.warning(
                        "history: database unavailable (%s); buffering up to %d entries",
                        describe(exc),
                        self._buffer_limit,
                    )
                    self._away = True
                await sleep_or_stop(stop, self._backoff.next_delay())
                continue
            self._backoff.reset()

    async def prune(self) -> int:
        """Delete history older than the retention; returns rows deleted."""
        cutoff = datetime.fromtimestamp(self._clock(), UTC) - self._retention
        total = 0
        for table, column in (
            ("progress_samples", "t"),
            ("stage_durations", "finished_at"),
            ("finished_jobs", "finished_at"),
        ):
            while True:
                async with self._pool.acquire() as conn:
                    status = await conn.execute(
                        f"DELETE FROM tower_progress.{table} WHERE ctid = ANY(ARRAY("
                        f"SELECT ctid FROM tower_progress.{table} WHERE {column} < $1 "
                        f"LIMIT {_PRUNE_CHUNK}))",
                        cutoff,
                    )
                deleted = int(status.rsplit(" ", 1)[-1])
                total += deleted
                if deleted < _PRUNE_CHUNK:
                    break
        if total:
            log.debug("history: pruned %d rows older than %s", total, cutoff.isoformat())
        return total

    # --- reads --------------------------------------------------------------------------

    async def load_priors(
        self, limit_per_fingerprint: int = 20
    ) -> dict[str, list[dict[str, float]]]:
        """Fingerprint -> stage seconds of its previous runs, newest run first."""
        rows = await self._fetch(
            "WITH runs AS ("
            " SELECT fingerprint, job_id, max(finished_at) AS finished_at"
            " FROM tower_progress.stage_durations GROUP BY fingerprint, job_id),"
            " ranked AS ("
            " SELECT fingerprint, job_id, row_number() OVER ("
            "  PARTITION BY fingerprint ORDER BY finished_at DESC, job_id DESC) AS run_rank"
            " FROM runs)"
            " SELECT r.fingerprint, r.run_rank, d.stage, d.seconds"
            " FROM ranked r JOIN tower_progress.stage_durations d"
            " ON d.fingerprint = r.fingerprint AND d.job_id = r.job_id"
            " WHERE r.run_rank <= $1 ORDER BY r.fingerprint, r.run_rank, d.stage",
            limit_per_fingerprint,
        )
        priors: dict[str, list[dict[str, float]]] = {}
        for row in rows:
            runs = priors.setdefault(row["fingerprint"], [])
            if len(runs) < row["run_rank"]:
                runs.append({})
            runs[-1][row["stage"]] = _round(row["seconds"])
        return priors

    async def samples(self, job_id: str) -> list[dict[str, Any]]:
        """The job's progress samples, oldest first (written ones; see ``flush``)."""
        rows = await self._fetch(
            "SELECT t, percent, stage, step FROM tower_progress.progress_samples "
            "WHERE job_id = $1 ORDER BY t",
            job_id,
        )
        return [
            {
                "t": row["t"].astimezone(UTC).isoformat(),
                "percent": None if row["percent"] is None else _round(row["percent"]),
                "stage": row["stage"],
                "step": row["step"],
            }
            for row in rows
        ]

    async def finished_jobs(
        self, *, limit: int, before: str | None = None
    ) -> tuple[list[JsonDict], str | None]:
        """Finished jobs newest first; returns the page and the cursor of the next (or None).

        ``before`` is a cursor from a previous page; a malformed one raises ``ValueError``.
        """
        if not 1 <= limit <= _MAX_PAGE:
            raise ValueError(f"limit must be in 1..{_MAX_PAGE}, got {limit}")
        after_t, after_id = decode_cursor(before) if before is not None else (None, None)
        rows = await self._fetch(
            "SELECT job_id, finished_at, job::text AS job FROM tower_progress.finished_jobs "
            "WHERE $1::timestamptz IS NULL OR (finished_at, job_id) < ($1, $2::text) "
            "ORDER BY finished_at DESC, job_id DESC LIMIT $3",
            after_t,
            after_id,
            limit + 1,
        )
        page = rows[:limit]
        cursor = None
        if len(rows) > limit:
            last = page[-1]
            cursor = encode_cursor(last["finished_at"], last["job_id"])
        return [json.loads(row["job"]) for row in page], cursor

    async def job(self, job_id: str) -> JsonDict | None:
        """The stored final state of a finished job, or None."""
        rows = await self._fetch(
            "SELECT job::text AS job FROM tower_progress.finished_jobs WHERE job_id = $1", job_id
        )
        return dict(json.loads(rows[0]["job"])) if rows else None

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        try:
            async with asyncio.timeout(self._io_timeout):
                return await self._pool.fetch(sql, *args)
        except _DATABASE_ERRORS as exc:
            if is_transient(exc):
                raise DatabaseUnavailable(describe(exc)) from exc
            raise


def _round(value: float) -> float:
    # real columns come back as float4 widened to float8 (45.3 -> 45.29999923706055).
    return round(value, 3)
