"""End to end: a production_jobs row committed -> the daemon's websocket client gets the job.

Run: ``.venv/bin/python bench/notify_latency.py [--changes N] [--rows N] [--gap-ms N]
[--database-url DSN]``.

Without ``--database-url`` an embedded PostgreSQL is started in a temporary directory and
removed afterwards; with one, the bench works in a scratch schema that it drops at the end
(the daemons apply tower-progress's migrations there, as they do at every start).

Two real daemons run side by side, each its own ``python -m tower_progress serve`` process
configured only through ``TOWER_PROGRESS_*`` variables, as a service manager would start it,
on the same PostgreSQL and the same idle fake ComfyUI (served by this process):

- ``NOTIFY``: the default set-up, watching ``bench_notify.jobs_notify`` with the NOTIFY trigger
  (``database.trigger = true``, default 30 s reconcile);
- ``poll 1 s``: the seed design's 1-second polling loop as the same daemon runs it, watching
  ``bench_notify.jobs_poll`` with ``database.trigger = false`` and
  ``database.reconcile_interval_s = 1``: every second it SELECTs the active rows and pushes
  them through the same listener -> tracker -> hub path.

Both tables have the reference ``production_jobs`` shape. A writer makes ``--changes``
changes, one every ``--gap-ms`` milliseconds on average: every fifth an INSERT of a new row,
the rest UPDATEs of existing rows round robin, each writing a unique marker into ``title``
(and ``updated_at = clock_timestamp()``). Each change goes to both tables in one autocommit
statement, so both daemons see the very same commit. One websocket client per daemon notes
when the first ``job`` message carrying each marker arrives.

Latency is reported from the commit (the moment the writer's statement returned, i.e. the
commit was acknowledged) and from just before the statement was sent (commit included); the
``commit round trip`` row is the writer's own send -> acknowledgement time. ``missed`` counts
changes a daemon never reported: a poll does not see a change overwritten before its next
query.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import websockets
from aiohttp import web

from tower_progress.simulate.server import FakeComfyUI
from tower_progress.sources.database import EmbeddedPostgres

SCHEMA = "bench_notify"
NOTIFY_TABLE = f"{SCHEMA}.jobs_notify"
POLL_TABLE = f"{SCHEMA}.jobs_poll"
POLL_INTERVAL_S = 1.0
GOAL_P99_MS = 20.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Clock:
    """When each marker was first seen, as ``time.perf_counter()`` seconds."""

    seen: dict[str, float] = field(default_factory=dict)

    def saw(self, marker: str, at: float) -> None:
        self.seen.setdefault(marker, at)


@dataclass
class Daemon:
    """One ``tower-progress serve`` process and where its log goes."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    log: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def prepare(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        for table in (NOTIFY_TABLE, POLL_TABLE):
            await conn.execute(
                f"CREATE TABLE {table} (id bigserial PRIMARY KEY, title text, "
                "status text NOT NULL DEFAULT 'processing', comfyui_job_id text, "
                "total_frames integer, created_at timestamptz NOT NULL DEFAULT now(), "
                "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
            await conn.executemany(
                f"INSERT INTO {table} (id, title) VALUES ($1, 'seed')",
                [(n,) for n in range(1, rows + 1)],
            )
    finally:
        await conn.close()


async def drop_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def idle_comfyui() -> AsyncIterator[str]:
    comfy = FakeComfyUI(seed=1)
    runner = web.AppRunner(comfy.app)
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await comfy.close()
        await runner.cleanup()


async def start_daemon(
    name: str, base: Path, dsn: str, comfy_url: str, table: str, *, trigger: bool
) -> Daemon:
    home = base / name
    home.mkdir()
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TOWER_PROGRESS_STATE_DIR": str(home / "state"),
        "TOWER_PROGRESS_PORT": str(port),
        "TOWER_PROGRESS_DATABASE_URL": dsn,
        "TOWER_PROGRESS_JOBS_TABLE": table,
        "TOWER_PROGRESS_DATABASE_TRIGGER": "true" if trigger else "false",
        "TOWER_PROGRESS_COMFYUI_URL": comfy_url,
        "TOWER_PROGRESS_COMFYUI_CLIENT_ID": f"bench-{name}",
        "TOWER_PROGRESS_LOG_LEVEL": "WARNING",
    }
    if not trigger:
        env["TOWER_PROGRESS_RECONCILE_INTERVAL_S"] = str(POLL_INTERVAL_S)
    log = home / "daemon.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tower_progress",
            "serve",
            env=env,
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    return Daemon(name, proc, port, log)


async def wait_healthy(daemon: Daemon) -> None:
    """Until ``/api/health`` answers 200 (database and ComfyUI connected)."""
    url = f"http://127.0.0.1:{daemon.port}/api/health"
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if daemon.proc.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    tail = daemon.log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"daemon {daemon.name} did not become healthy; its log ends:\n{tail}")


async def stop_daemon(daemon: Daemon) -> None:
    if daemon.proc.returncode is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(daemon.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            daemon.proc.kill()
            await daemon.proc.wait()


async def watch(daemon: Daemon, clock: Clock, ready: asyncio.Event) -> None:
    """Note the arrival of every ``job`` message whose title is a marker; runs until cancelled."""
    async with websockets.connect(daemon.ws_url, max_size=None) as ws:
        snapshot = json.loads(await ws.recv())
        if snapshot.get("type") != "snapshot":
            raise RuntimeError(f"{daemon.name}: first message is not a snapshot: {snapshot!r}")
        ready.set()
        async for raw in ws:
            at = time.perf_counter()
            message = json.loads(raw)
            if message.get("type") == "job":
                title = message["job"].get("title") or ""
                if title.startswith("m"):
                    clock.saw(title, at)


async def write(dsn: str, changes: int, rows: int, gap_s: float, sent: Clock, acked: Clock) -> None:
    """Commit the changes, each to both tables in one statement."""
    insert = (
        f"WITH a AS (INSERT INTO {NOTIFY_TABLE} (id, title) VALUES ($1, $2)) "
        f"INSERT INTO {POLL_TABLE} (id, title) VALUES ($1, $2)"
    )
    update = (
        f"WITH a AS (UPDATE {NOTIFY_TABLE} SET title = $2, updated_at = clock_timestamp() "
        f"WHERE id = $1) UPDATE {POLL_TABLE} SET title = $2, updated_at = clock_timestamp() "
        "WHERE id = $1"
    )
    rng = random.Random(7)
    next_id = rows
    conn = await asyncpg.connect(dsn)
    try:
        for n in range(changes):
            marker = f"m{n}"
            if n % 5 == 4:
                next_id += 1
                sql, row_id = insert, next_id
            else:
                sql, row_id = update, n % rows + 1
            await asyncio.sleep(gap_s * rng.uniform(0.5, 1.5))
            sent.saw(marker, time.perf_counter())
            await conn.execute(sql, row_id, marker)
            acked.saw(marker, time.perf_counter())
    finally:
        await conn.close()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latencies_ms(start: Clock, end: Clock, markers: Sequence[str]) -> list[float]:
    return [
        (end.seen[m] - start.seen[m]) * 1000 for m in markers if m in end.seen and m in start.seen
    ]


def line(label: str, latencies: Sequence[float], missed: int) -> str:
    if not latencies:
        return f"{label:34} " + " ".join(f"{'-':>8}" for _ in range(4)) + f" {missed:>7}"
    figures = [percentile(latencies, q) for q in (50, 90, 99)] + [max(latencies)]
    return f"{label:34} " + " ".join(f"{v:8.1f}" for v in figures) + f" {missed:>7}"


async def run(dsn: str, changes: int, rows: int, gap_s: float) -> None:
    await prepare(dsn, rows)
    sent, acked = Clock(), Clock()
    clocks = {"notify": Clock(), "poll": Clock()}
    base = Path(tempfile.mkdtemp(prefix="tp-bench-daemons-"))
    daemons: list[Daemon] = []
    watchers: list[asyncio.Task[None]] = []
    try:
        async with idle_comfyui() as comfy_url:
            daemons = [
                await start_daemon("notify", base, dsn, comfy_url, NOTIFY_TABLE, trigger=True),
                await start_daemon("poll", base, dsn, comfy_url, POLL_TABLE, trigger=False),
            ]
            await asyncio.gather(*(wait_healthy(d) for d in daemons))
            ready = [asyncio.Event() for _ in daemons]
            watchers = [
                asyncio.create_task(watch(d, clocks[d.name], r), name=f"watch-{d.name}")
                for d, r in zip(daemons, ready, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), START_TIMEOUT_S)
            await write(dsn, changes, rows, gap_s, sent, acked)
            await asyncio.sleep(POLL_INTERVAL_S + 1.0)
            for task in watchers:
                if task.done():
                    task.result()
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.gather(*(stop_daemon(d) for d in daemons))
        shutil.rmtree(base, ignore_errors=True)
    report(changes, rows, gap_s, sent, acked, clocks)


def report(
    changes: int, rows: int, gap_s: float, sent: Clock, acked: Clock, clocks: dict[str, Clock]
) -> None:
    markers = [f"m{n}" for n in range(changes)]
    inserts = sum(1 for n in range(changes) if n % 5 == 4)
    print(
        f"{changes} changes ({inserts} inserts, {changes - inserts} updates) over {rows} rows, "
        f"one every {gap_s * 1000:g} ms on average; commit -> websocket `job` message"
    )
    print(f"{'':34} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'missed':>7}")
    poll = f"poll {POLL_INTERVAL_S:g} s"
    for label, start, end in (
        ("NOTIFY, from commit", acked, clocks["notify"]),
        ("NOTIFY, from send", sent, clocks["notify"]),
        (f"{poll}, from commit", acked, clocks["poll"]),
        (f"{poll}, from send", sent, clocks["poll"]),
        ("commit round trip (send -> ack)", sent, acked),
    ):
        values = latencies_ms(start, end, markers)
        print(line(label, values, changes - len(values)))
    notify = latencies_ms(acked, clocks["notify"], markers)
    if len(notify) < changes:
        print(f"goal: NOTIFY p99 from commit < {GOAL_P99_MS:g} ms: MISSED (changes not delivered)")
        return
    p99 = percentile(notify, 99)
    verdict = "met" if p99 < GOAL_P99_MS else "MISSED"
    print(f"goal: NOTIFY p99 from commit < {GOAL_P99_MS:g} ms: {p99:.1f} ms, {verdict}")


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


if __name__ == "__main__":
    raise SystemExit(main())
