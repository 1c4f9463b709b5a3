"""Latency from a committed jobs-row change to the listener's emit: LISTEN/NOTIFY vs polling.

Run: ``.venv/bin/python bench/notify_latency.py [--changes N] [--rows N] [--gap-ms N]
[--database-url DSN]``.

Without ``--database-url`` an embedded PostgreSQL is started in a temporary directory and
removed afterwards; with one, migrations are applied there and the bench works in a scratch
schema that it drops at the end.

A writer makes ``--changes`` changes, one every ``--gap-ms`` milliseconds: every fifth an
INSERT of a new row, the rest UPDATEs of existing rows round robin, each writing a unique
marker into ``title`` and ``updated_at = clock_timestamp()`` in its own autocommit statement.
Two observers run at the same time, in the same event loop:

- ``JobTableListener`` with the NOTIFY trigger (its periodic reconcile pushed out of the run);
- a 1-second polling loop, the usual alternative: ``SELECT ... WHERE updated_at > watermark``
  (with 2 s of overlap for late commits), then the same emit.

Latency is measured from just before the change is sent (the statement commits on its own,
so the figure includes the commit) to the moment the observer emits a row carrying the
marker; the ``(commit ack)`` row is the writer's own round trip, the floor under both.
``missed`` counts changes that an observer never emitted (a poller does not see a change
overwritten before its next poll).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tower_progress.core.model import JobRow, Observation, SourceStatus
from tower_progress.sources.database import EmbeddedPostgres, JobTableListener, migrate

SCHEMA = "bench_notify"
TABLE = f"{SCHEMA}.production_jobs"
POLL_INTERVAL_S = 1.0


@dataclass
class Observer:
    """When each marker was first emitted, as ``time.perf_counter()`` seconds."""

    name: str
    seen: dict[str, float] = field(default_factory=dict)

    def saw(self, title: str | None) -> None:
        if title is not None and title.startswith("m") and title not in self.seen:
            self.seen[title] = time.perf_counter()


async def prepare(dsn: str, rows: int) -> None:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        await conn.execute(
            f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, title text, "
            "status text NOT NULL DEFAULT 'processing', comfyui_job_id text, "
            "total_frames integer, created_at timestamptz NOT NULL DEFAULT now(), "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        await conn.execute(f"CREATE INDEX ON {TABLE} (updated_at)")
        await conn.executemany(f"INSERT INTO {TABLE} (title) VALUES ($1)", [("x",)] * rows)
    finally:
        await conn.close()


async def poller(dsn: str, observer: Observer, stop: asyncio.Event) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        watermark = await conn.fetchval(f"SELECT max(updated_at) FROM {TABLE}")
        while not stop.is_set():
            rows = await conn.fetch(
                f"SELECT title, updated_at FROM {TABLE} "
                "WHERE updated_at > $1::timestamptz - interval '2 seconds' ORDER BY updated_at",
                watermark,
            )
            for row in rows:
                observer.saw(row["title"])
                watermark = max(watermark, row["updated_at"])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)
    finally:
        await conn.close()


async def writer(
    dsn: str, changes: int, rows: int, gap_s: float, committed: Observer
) -> dict[str, float]:
    """Make the changes; return marker -> perf_counter just before each was sent.

    ``committed`` records when each statement's commit was acknowledged, for reference.
    """
    sent: dict[str, float] = {}
    conn = await asyncpg.connect(dsn)
    rng = random.Random(7)
    try:
        for n in range(changes):
            marker = f"m{n}"
            await asyncio.sleep(gap_s * rng.uniform(0.5, 1.5))
            sent[marker] = time.perf_counter()
            if n % 5 == 4:
                await conn.execute(f"INSERT INTO {TABLE} (title) VALUES ($1)", marker)
            else:
                await conn.execute(
                    f"UPDATE {TABLE} SET title = $1, updated_at = clock_timestamp() WHERE id = $2",
                    marker,
                    n % rows + 1,
                )
            committed.saw(marker)
    finally:
        await conn.close()
    return sent


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def run(dsn: str, changes: int, rows: int, gap_s: float) -> None:
    await prepare(dsn, rows)
    notify = Observer("LISTEN/NOTIFY")
    polled = Observer(f"poll every {POLL_INTERVAL_S:g} s")
    committed = Observer("(commit ack)")
    up = asyncio.Event()

    def emit(observation: Observation) -> None:
        if isinstance(observation, JobRow):
            notify.saw(observation.title)
        elif isinstance(observation, SourceStatus) and observation.up:
            up.set()

    stop = asyncio.Event()
    listener = JobTableListener(
        dsn=dsn, jobs_table=TABLE, columns={}, emit=emit, reconcile_interval=3600.0
    )
    tasks = [
        asyncio.create_task(listener.run(stop)),
        asyncio.create_task(poller(dsn, polled, stop)),
    ]
    try:
        await asyncio.wait_for(up.wait(), 30)
        sent = await writer(dsn, changes, rows, gap_s, committed)
        await asyncio.sleep(POLL_INTERVAL_S + 0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    inserts = sum(1 for n in range(changes) if n % 5 == 4)
    print(
        f"{changes} changes ({inserts} inserts, {changes - inserts} updates) over {rows} rows, "
        f"one every {gap_s * 1000:g} ms on average"
    )
    print(f"{'':18} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'missed':>7}")
    for observer in (notify, polled, committed):
        latencies = [(observer.seen[m] - t) * 1000 for m, t in sent.items() if m in observer.seen]
        missed = changes - len(latencies)
        if not latencies:
            print(f"{observer.name:18} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {missed:>7}")
            continue
        figures = [percentile(latencies, q) for q in (50, 90, 99)] + [max(latencies)]
        print(f"{observer.name:18} " + " ".join(f"{v:8.1f}" for v in figures) + f" {missed:>7}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--changes", type=int, default=400)
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--gap-ms", type=float, default=25.0)
    parser.add_argument("--database-url", help="default: a temporary embedded PostgreSQL")
    args = parser.parse_args(argv)
    if args.changes < 1 or args.rows < 1 or args.gap_ms <= 0:
        parser.error("--changes and --rows must be >= 1, --gap-ms > 0")
    if args.database_url:
        try:
            asyncio.run(run(args.database_url, args.changes, args.rows, args.gap_ms / 1000))
        finally:
            asyncio.run(drop_schema(args.database_url))
        return 0
    base = Path(tempfile.mkdtemp(prefix="tp-bench-notify-"))
    server = EmbeddedPostgres(runtime_dir=base / "run")
    try:
        dsn = server.start(base / "pgdata")
        asyncio.run(run(dsn, args.changes, args.rows, args.gap_ms / 1000))
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


async def drop_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    finally:
        await conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
