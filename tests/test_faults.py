"""Faults end to end, on real processes: one daemon (``python -m tower_progress serve``) lives
through a storm: PostgreSQL killed and restarted, ComfyUI killed mid-sampling and restarted, a
websocket client that stops reading, a client sending 1000 malformed frames, ComfyUI sending
garbage between its real messages, and production rows with hostile values.

After each fault the daemon must answer ``/api/health`` with every source up again, no prompt
transition may be lost (every prompt's state is checked against the simulators' own
journal of what really happened), and a websocket client that lived through the fault
must hold the same picture as a fresh snapshot, without a gap in ``seq``. The tests run in file
order on one daemon (module-scoped); the last one checks that memory came back near the
baseline taken before the storm. The read-only state directory tests run daemons of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import pytest
import pytest_asyncio
from aiohttp import WSMsgType, web
from daemon_process import (
    ComfyServer,
    DaemonProcess,
    Watcher,
    daemon_env,
    free_port,
    own_mount,
)

from tower_progress.simulate import workflows
from tower_progress.simulate.producer import Kind, Producer
from tower_progress.simulate.server import FakeComfyUI
from tower_progress.sources.database import EmbeddedPostgres

pytestmark = pytest.mark.asyncio(loop_scope="module")

WATCHER_ID = "tower-progress-faults-4e1d7c"
TABLE = "faults.jobs"
SPEED = 0.02  # simulator durations x 0.02: a 512x512 step 1 ms, a 2048x2048 step 16 ms
TERMINAL = frozenset({"completed", "failed", "canceled", "lost"})
# What the daemon must show for a prompt, by the last thing that really happened to it.
EXPECTED_STATE = {
    "queued": "queued",
    "started": "running",
    "completed": "completed",
    "failed": "failed",
    "interrupted": "canceled",
    "deleted": "canceled",
}
RSS_SLACK = 16 << 20  # observed: +3 MiB


# --- ComfyUI that can crash and send junk -----------------------------------------------------


def junk_frames(prompt_id: str) -> list[str | bytes]:
    """What a broken ComfyUI or a broken link might deliver between real messages, aimed at
    the prompt that is running where a field can name one."""
    return [
        "this is not JSON",
        '{"type": "progress", "data": {"value": 3, "max": ',
        "[1, 2, 3]",
        '"status"',
        "null",
        '{"type": "progress"}',
        '{"data": {"value": 3, "max": 10}}',
        '{"type": 7, "data": {}}',
        '{"type": "progress", "data": "halfway"}',
        json.dumps({"type": "executing", "data": {"node": ["3"], "prompt_id": prompt_id}}),
        json.dumps({"type": "executing", "data": {"node": True, "prompt_id": prompt_id}}),
        json.dumps(
            {"type": "progress", "data": {"value": "x", "max": None, "prompt_id": prompt_id}}
        ),
        json.dumps({"type": "progress", "data": {"value": 5, "max": -1, "prompt_id": prompt_id}}),
        json.dumps({"type": "execution_start", "data": {"prompt_id": 12345}}),
        json.dumps({"type": "progress_state", "data": {"prompt_id": prompt_id, "nodes": [1]}}),
        json.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": "?"}}}}),
        '{"type": "progress", "data": {"prompt_id": "\\ud800"}}',
        "[" * 100_000 + "]" * 100_000,
        b"\x00\x01",
        b"\x00\x00\x00\x01\xff\xd8 not a jpeg",
    ]


class JunkProxy:
    """ComfyUI as the daemon sees it: forwards HTTP and websockets to a FakeComfyUI and, while
    ``junk`` is set, puts one malformed frame before every real websocket message and spoils
    every other ``/queue`` answer (truncated, or nested too deep). Only the daemon's paths
    are spoiled; the producer, like any other client, uses the ``/api/...`` aliases and gets
    the real thing. ``kill`` drops every connection at once, as a crashed process would, and
    stops listening."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.upstream = ""
        self.junk = False
        self.junk_sent = 0
        self._queue_answers = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._transports: set[asyncio.Transport] = set()
        self._relays: set[asyncio.Task[Any]] = set()

    async def start(self, upstream: str) -> None:
        self.upstream = upstream
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("GET", "/ws", self._websocket)
        app.router.add_route("GET", "/api/ws", self._websocket)
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def kill(self) -> None:
        for transport in self._transports:
            transport.abort()
        for relay in self._relays:
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            data=await request.read(),
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as answer:
            body = await answer.read()
        if self.junk and request.path == "/queue":
            self._queue_answers += 1
            if self._queue_answers % 4 == 1:
                body = body[: len(body) // 2]
            elif self._queue_answers % 4 == 3:
                body = b"[" * 100_000 + b"]" * 100_000
            self.junk_sent += self._queue_answers % 2
        return web.Response(status=answer.status, body=body, content_type="application/json")

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None and request.transport is not None
        self._transports.add(request.transport)
        down = web.WebSocketResponse(max_msg_size=0)
        await down.prepare(request)
        url = self.upstream.replace("http", "ws", 1) + request.path_qs
        try:
            async with self._session.ws_connect(url, max_msg_size=0) as up:
                relay = asyncio.create_task(self._relay_up(down, up))
                self._relays.add(relay)
                sent = 0
                spoil = not request.path.startswith("/api/")
                prompt_id = "none-yet"
                async for message in up:
                    if spoil and self.junk and message.type is WSMsgType.TEXT:
                        prompt_id = json.loads(message.data)["data"].get("prompt_id", prompt_id)
                        frames = junk_frames(prompt_id)
                        frame = frames[sent % len(frames)]
                        sent += 1
                        if isinstance(frame, bytes):
                            await down.send_bytes(frame)
                        else:
                            await down.send_str(frame)
                        self.junk_sent += 1
                    if message.type is WSMsgType.TEXT:
                        await down.send_str(message.data)
                    elif message.type is WSMsgType.BINARY:
                        await down.send_bytes(message.data)
                relay.cancel()
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self._transports.discard(request.transport)
        return down

    async def _relay_up(
        self, down: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse
    ) -> None:
        async for message in down:
            if message.type is WSMsgType.TEXT:
                await up.send_str(message.data)


class Comfy:
    """The simulator as a real process (``python -m tower_progress simulate``) behind a
    ``JunkProxy`` on a fixed port. ``crash`` kills it with SIGKILL and drops every connection
    of the proxy, as a crashed ComfyUI vanishes; ``start`` runs a new one, with an empty queue
    and history as a real restart has. Each run's ``--journal`` is what really happened."""

    def __init__(self, base: Path) -> None:
        self.proxy = JunkProxy(free_port())
        self.journals: list[Path] = []
        self._base = base
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    async def start(self) -> None:
        run = len(self.journals) + 1
        port, journal = free_port(), self._base / f"comfyui-{run}.jsonl"
        self.journals.append(journal)
        with (self._base / f"comfyui-{run}.log").open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tower_progress",
                "simulate",
                "--port",
                str(port),
                "--speed",
                str(SPEED),
                "--journal",
                str(journal),
                "--no-jobs",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        upstream = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                assert self._proc.returncode is None, f"simulator exited, see {log.name}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{upstream}/system_stats") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"simulator never answered, see {log.name}")
        await self.proxy.start(upstream)

    async def crash(self) -> None:
        await self.proxy.kill()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self.proxy = JunkProxy(self.proxy.port)

    def truth(self) -> dict[str, str]:
        """prompt id -> the state the daemon must show; prompts an instance still held when
        it crashed are ``lost``."""
        expected: dict[str, str] = {}
        for number, journal in enumerate(self.journals, start=1):
            crashed = number < len(self.journals)
            for line in journal.read_text().splitlines():
                transition = json.loads(line)
                expected[transition["prompt_id"]] = EXPECTED_STATE[transition["event"]]
            if crashed:
                for prompt_id, state in expected.items():
                    if state in ("queued", "running"):
                        expected[prompt_id] = "lost"
        return expected


# --- the rig: PostgreSQL we can kill, ComfyUI, the daemon, a producer, a watcher --------------


@dataclass
class Rig:
    base: Path
    postgres: EmbeddedPostgres
    dsn: str
    comfy: Comfy
    daemon: DaemonProcess
    producer: Producer
    watcher: Watcher
    baseline_rss: int = 0
    faults: list[str] = field(default_factory=list)

    async def run_jobs(self, *kinds: Kind, title: str | None = None) -> list[str]:
        """Submit jobs of ``kinds`` with the daemon's client id; wait until all settled."""
        ids = [
            await self.producer.submit(kind, client_id=WATCHER_ID, title=title) for kind in kinds
        ]
        await asyncio.wait_for(self.producer.settled(ids), 60)
        await self.watcher.until(lambda w: all(w.state(i) in TERMINAL for i in ids))
        return ids

    def kill_postgres(self) -> None:
        postmaster = psutil.Process(
            int((self.base / "pgdata/postmaster.pid").read_text().split()[0])
        )
        victims = [postmaster, *postmaster.children(recursive=True)]
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=10)

    async def metric(self, name: str) -> float:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.daemon.url}/metrics") as response,
        ):
            text = await response.text()
        for line in text.splitlines():
            if line.split(" ")[0].endswith(name):
                return float(line.split(" ")[1])
        raise AssertionError(f"{name} not in /metrics")

    async def assert_sound(self) -> None:
        """Daemon up with every source back, no transition lost, clients resynced."""
        await self.daemon.wait_healthy()
        rows = await self._rows()
        job_of = {row["comfyui_job_id"]: str(row["id"]) for row in rows if row["comfyui_job_id"]}
        truth = {
            job_of.get(prompt_id, f"comfy:{prompt_id}"): state
            for prompt_id, state in self.comfy.truth().items()
            if state in TERMINAL
        }
        await self.watcher.until(
            lambda w: all(w.state(job_id) in (state, None) for job_id, state in truth.items())
        )
        for job_id, state in truth.items():
            job = await self.daemon.get(f"/api/jobs/{job_id}")
            assert job["state"] == state, f"job {job_id}: {job['state']} != {state}"
        for row in rows:
            if row["status"] in ("completed", "failed", "canceled") and row["comfyui_job_id"]:
                assert truth[str(row["id"])] == row["status"], f"row {row['id']}"
        await self.assert_resynced(self.watcher)

    async def assert_resynced(self, watcher: Watcher) -> None:
        """``watcher``'s picture is a fresh snapshot's, and no ``seq`` was skipped."""
        async with Watcher(self.daemon.ws_url, self.daemon.origin, reconnect=False) as fresh:
            snapshot = fresh.jobs
        await watcher.until(lambda w: w.jobs == snapshot, within=15)
        assert watcher.gaps == []

    async def stored_states(self, job_ids: list[str]) -> list[str]:
        """The states history stored for ``job_ids``, once it has written them all (it
        writes in batches, about once a second)."""
        for _ in range(100):
            page = await self.daemon.get("/api/jobs?state=finished&limit=500")
            stored = {job["id"]: job["state"] for job in page["jobs"]}
            if all(job_id in stored for job_id in job_ids):
                return [stored[job_id] for job_id in job_ids]
            await asyncio.sleep(0.1)
        raise AssertionError(f"history never stored all of {job_ids}")

    async def _rows(self) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(f"SELECT id, status, comfyui_job_id FROM {TABLE}"))
        finally:
            await conn.close()


JOBS_TABLE_SQL = f"""
CREATE SCHEMA faults;
-- The reference columns, with what a careless production system allows: a NULL status and
-- a bigint frame count.
CREATE TABLE {TABLE} (
    id             bigserial PRIMARY KEY,
    title          text,
    status         text DEFAULT 'pending',
    comfyui_job_id text,
    total_frames   bigint,
    workflow       jsonb,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig() -> AsyncIterator[Rig]:
    base = Path(tempfile.mkdtemp(prefix="tp-faults-"))
    postgres = EmbeddedPostgres(runtime_dir=base / "run")
    dsn = await asyncio.to_thread(postgres.start, base / "pgdata")
    conn = await asyncpg.connect(dsn)
    await conn.execute(JOBS_TABLE_SQL)
    await conn.close()
    comfy = Comfy(base)
    await comfy.start()
    env = daemon_env(
        base,
        free_port(),
        database_url=dsn,
        jobs_table=TABLE,
        comfyui_url=comfy.url,
        comfyui_client_id=WATCHER_ID,
        reconcile_interval_s="2",
        finished_cap="40",
    )
    daemon = await DaemonProcess.start(env)
    producer = Producer(
        dsn=dsn, comfyui_url=f"{comfy.url}/api", table=TABLE, seed=17, poll_interval=0.3
    )
    try:
        await daemon.wait_healthy()
        async with Watcher(daemon.ws_url, daemon.origin) as watcher:
            rig = Rig(base, postgres, dsn, comfy, daemon, producer, watcher)
            await rig.run_jobs("still", "video", "two_pass", "failing", "still", "still")
            await rig.assert_sound()
            rig.baseline_rss = daemon.rss()
            yield rig
        assert await daemon.stop() == 0
    finally:
        await producer.close()
        await daemon.kill()
        await comfy.crash()
        await asyncio.to_thread(postgres.stop)
        shutil.rmtree(base, ignore_errors=True)


def stills(count: int) -> list[Kind]:
    return ["still"] * count


def long_still(steps: int) -> workflows.Graph:
    """A 2048x2048 still: 16 ms a step at ``SPEED``, 60 steps a second."""
    return workflows.still(steps=steps, width=2048, height=2048, seed=steps)


# --- the storm ------------------------------------------------------------------------------------


async def test_postgres_killed_and_restarted_mid_job(rig: Rig) -> None:
    job_id = await rig.producer.submit_workflow(
        long_still(250), title="across a database crash", client_id=WATCHER_ID
    )
    await rig.watcher.until(lambda w: (w.jobs.get(job_id) or {}).get("step") is not None)
    await asyncio.to_thread(rig.kill_postgres)
    await rig.watcher.until(lambda w: not w.sources["database"]["up"])
    status, health = await rig.daemon.health()
    assert (status, health["down"]) == (503, ["database"])
    await asyncio.to_thread(rig.postgres.start, rig.base / "pgdata")
    await rig.watcher.until(lambda w: w.sources["database"]["up"], within=60)
    await asyncio.wait_for(rig.producer.settled([job_id]), 60)
    await rig.watcher.until(lambda w: w.state(job_id) == "completed")
    assert rig.watcher.jobs[job_id]["stale"] is False
    after = await rig.run_jobs("still", "failing")
    await rig.assert_sound()
    stored = await rig.stored_states([job_id, *after])
    assert stored == ["completed", "completed", "failed"], "history written after the outage"
    rig.faults.append("postgres")


async def test_comfyui_killed_mid_sampling_loses_the_prompt_and_tracks_new_ones(rig: Rig) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"prompt": long_still(5000), "client_id": WATCHER_ID}
        async with session.post(f"{rig.comfy.url}/prompt", json=body) as response:
            prompt_id = (await response.json())["prompt_id"]
    conn = await asyncpg.connect(rig.dsn)
    try:
        job_id = str(
            await conn.fetchval(
                f"INSERT INTO {TABLE} (title, status, comfyui_job_id) "
                "VALUES ('lost in a crash', 'processing', $1) RETURNING id",
                prompt_id,
            )
        )
    finally:
        await conn.close()
    await rig.watcher.until(lambda w: ((w.jobs.get(job_id) or {}).get("step") or 0) >= 3)
    await rig.comfy.crash()
    await rig.watcher.until(lambda w: not w.sources["comfyui:local"]["up"])
    await rig.watcher.until(lambda w: w.jobs[job_id]["stale"] is True)
    await rig.comfy.start()
    await rig.watcher.until(lambda w: w.state(job_id) == "lost", within=60)
    assert rig.watcher.jobs[job_id]["last_seen_at"] is not None
    await rig.run_jobs("still", "video")
    await rig.assert_sound()
    rig.faults.append("comfyui")


async def test_a_client_that_stops_reading_does_not_hold_back_the_others(rig: Rig) -> None:
    """A tab on a laptop gone to sleep: its socket stops draining. Jobs with 30 KB titles
    make minutes of traffic in seconds (about 10 MB), far more than the socket buffers hold."""
    dropped = await rig.metric("websocket_clients_dropped_total")
    coalesced = await rig.metric("websocket_messages_coalesced_total")
    url, origin = rig.daemon.ws_url, rig.daemon.origin
    async with Watcher(url, origin, receive_buffer=4096) as stuck:
        stuck.reading.clear()
        done = await rig.run_jobs(*stills(24), title="a long title " * 2500)
        assert [rig.watcher.state(i) for i in done] == ["completed"] * 24
        assert sum(i in stuck.jobs for i in done) <= 1, "the stuck client read (almost) nothing"
        dropped = await rig.metric("websocket_clients_dropped_total") - dropped
        coalesced = await rig.metric("websocket_messages_coalesced_total") - coalesced
        assert (dropped, coalesced) != (0, 0), "the stuck client was neither coalesced nor dropped"
        stuck.reading.set()
        await rig.assert_resynced(stuck)
        assert len(stuck.close_codes) == dropped
    await rig.assert_sound()
    rig.faults.append("stuck client")


async def test_a_thousand_malformed_frames_are_each_answered_and_the_socket_stays_usable(
    rig: Rig,
) -> None:
    bad: list[str | bytes] = [
        "not json",
        "{",
        "[1, 2]",
        '"ping"',
        "{}",
        '{"type": 5}',
        '{"type": "launch"}',
        '{"type": "subscribe", "jobs": "all"}',
        '{"type": "subscribe", "jobs": [1, 2]}',
        '{"type": "' + "x" * 500 + '"}',
        b"\x00\x01binary",
        "[" * 30_000 + "]" * 30_000,
    ]
    frames = [frame for frame, _ in zip(cycle(bad), range(1000), strict=False)]
    async with Watcher(rig.daemon.ws_url, rig.daemon.origin, reconnect=False) as client:
        for frame in frames:
            await client.send(frame)
        await client.until(lambda c: len(c.errors) == 1000)
        await client.send('{"type": "ping"}')
        await client.until(lambda c: c.pongs == 1)
        [job_id] = await rig.run_jobs("still")
        await client.until(lambda c: c.state(job_id) == "completed")
        assert client.close_codes == [] and client.gaps == [] and client.snapshots == 1
    await rig.assert_sound()
    rig.faults.append("malformed client frames")


async def test_garbage_from_comfyui_between_real_messages_is_skipped(rig: Rig) -> None:
    lines_before = len(rig.daemon.log_lines())
    rig.comfy.proxy.junk = True
    try:
        ids = await rig.run_jobs("still", "video", "failing", "two_pass")
        partial = await rig.producer.submit("still", client_id=None)
        await asyncio.wait_for(rig.producer.settled([partial]), 60)
    finally:
        rig.comfy.proxy.junk = False
    # Reading is paced: the last junk may wait in the kernel until a clean job reads it through.
    assert await rig.run_jobs("still")
    assert rig.comfy.proxy.junk_sent >= 100
    for job_id in [*ids, partial]:
        percents = [update["percent"] for update in rig.watcher.history(job_id)]
        assert percents == sorted(percents), f"job {job_id} went backwards"
    assert [rig.watcher.state(i) for i in ids] == ["completed", "completed", "failed", "completed"]
    await rig.assert_sound()
    warnings = [line for line in rig.daemon.log_lines()[lines_before:] if " WARNING " in line]
    assert any("non-JSON text frame" in line for line in warnings)
    assert any("frame without type/data" in line for line in warnings)
    assert not any(" ERROR " in line for line in rig.daemon.log_lines()[lines_before:])
    rig.faults.append("comfyui garbage")


async def test_hostile_row_values_become_null_with_one_warning_each(rig: Rig) -> None:
    lines_before = len(rig.daemon.log_lines())
    conn = await asyncpg.connect(rig.dsn)
    try:
        ids = [
            str(row["id"])
            for row in await conn.fetch(
                f"INSERT INTO {TABLE} (title, status, total_frames) VALUES "
                "('null status', NULL, -5), ('huge frames', 'frobnicating', 1000000000000), "
                "('negative frames', 'queued', -5) RETURNING id"
            )
        ]
        await rig.watcher.until(lambda w: all(i in w.jobs for i in ids))
        for _ in range(3):
            await conn.execute(
                f"UPDATE {TABLE} SET title = title || '.' WHERE id = ANY($1::bigint[])",
                [int(i) for i in ids],
            )
        await rig.watcher.until(lambda w: all(w.jobs[i]["title"].endswith("...") for i in ids))
        jobs = [rig.watcher.jobs[i] for i in ids]
        assert [job["frames_total"] for job in jobs] == [None, None, None]
        assert [job["status_raw"] for job in jobs] == [None, "frobnicating", "queued"]
        assert [job["state"] for job in jobs] == ["pending", "pending", "pending"]
        await rig.assert_sound()
        warnings = [
            line
            for line in rig.daemon.log_lines()[lines_before:]
            if " WARNING " in line and any(f"job {i}: " in line for i in ids)
        ]
        assert len(warnings) == 5, "\n".join(warnings)
        assert sum("unknown production status 'frobnicating'" in line for line in warnings) == 1
        assert sum(f"job {ids[0]}: status=None" in line for line in warnings) == 1
        assert sum(f"job {ids[0]}: total_frames=-5" in line for line in warnings) == 1
        assert sum(f"job {ids[1]}: total_frames=1000000000000" in line for line in warnings) == 1
        assert sum(f"job {ids[2]}: total_frames=-5" in line for line in warnings) == 1
        await conn.execute(
            f"DELETE FROM {TABLE} WHERE id = ANY($1::bigint[])", [int(i) for i in ids]
        )
        await rig.watcher.until(lambda w: not any(i in w.jobs for i in ids))
    finally:
        await conn.close()
    rig.faults.append("hostile rows")


async def test_memory_returns_near_the_baseline_after_the_storm(rig: Rig) -> None:
    await rig.run_jobs(*stills(10))
    await rig.assert_sound()
    rss = rig.daemon.rss()
    assert rss < rig.baseline_rss + RSS_SLACK, (
        f"RSS {rss >> 20} MiB after {rig.faults}, {rig.baseline_rss >> 20} MiB before"
    )


# --- a read-only state directory ------------------------------------------------------------


@pytest.fixture
def home(home: Path) -> Iterator[Path]:
    """The shared home with its state directory made, made writable again afterwards."""
    (home / "state").mkdir()
    yield home
    (home / "state").chmod(0o755)


def read_only(directory: Path) -> Sequence[str]:
    """A wrapper under which ``directory`` is read-only for the daemon. As root (which
    ignores file modes) a read-only bind mount in a private mount namespace, which is what
    systemd's ``ProtectSystem=strict`` makes of a path outside ``ReadWritePaths``; otherwise
    mode 0555."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return ()
    return own_mount(directory, read_only=True)


async def test_read_only_state_dir_with_an_external_database_still_serves(
    home: Path, pg_dsn: str
) -> None:
    comfy = await ComfyServer(FakeComfyUI(speed=SPEED)).start()
    env = daemon_env(home, free_port(), database_url=pg_dsn, comfyui_url=comfy.url)
    daemon = await DaemonProcess.start(env, wrapper=read_only(home / "state"))
    try:
        assert (await daemon.wait_healthy())["status"] == "ok"
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
        await comfy.stop()
    assert list((home / "state").iterdir()) == []
    assert not [line for line in daemon.log_lines() if " ERROR " in line or " WARNING " in line]


async def test_read_only_state_dir_with_the_embedded_database_exits_with_one_line(
    home: Path,
) -> None:
    env = daemon_env(home, free_port())
    daemon = await DaemonProcess.start(env, wrapper=read_only(home / "state"))
    try:
        assert await asyncio.wait_for(daemon.proc.wait(), 30) == 1
    finally:
        await daemon.kill()
    lines = daemon.log_lines()
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, "\n".join(lines)
    assert f"cannot start: state directory {home / 'state'}: " in errors[0]
    assert "Read-only file system" in errors[0] or "Permission denied" in errors[0]
    assert not any("Traceback" in line for line in lines)


async def test_a_jobs_table_without_its_status_column_stops_start_up_with_one_line(
    home: Path, pg_dsn: str
) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS public.no_status_jobs")
        await conn.execute("CREATE TABLE public.no_status_jobs (id bigint PRIMARY KEY, title text)")
    finally:
        await conn.close()
    comfy = await ComfyServer(FakeComfyUI(speed=SPEED)).start()
    env = daemon_env(
        home,
        free_port(),
        database_url=pg_dsn,
        comfyui_url=comfy.url,
        jobs_table="public.no_status_jobs",
    )
    daemon = await DaemonProcess.start(env)
    try:
        assert await asyncio.wait_for(daemon.proc.wait(), 30) == 1
    finally:
        await daemon.kill()
        await comfy.stop()
    lines = daemon.log_lines()
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, "\n".join(lines)
    assert errors[0].endswith(
        "cannot start: database.columns.status: column 'status' not found in public.no_status_jobs"
    ), errors[0]
    assert not any("serving on" in line or "Traceback" in line for line in lines)
