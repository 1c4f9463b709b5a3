"""The job producer and ``run_simulator`` against the simulator and a real embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from fixtures_util import Client, serve
from websockets.exceptions import ConnectionClosed

from tower_progress import cli
from tower_progress.simulate import workflows
from tower_progress.simulate.producer import Producer
from tower_progress.simulate.runner import run_simulator
from tower_progress.simulate.server import FakeComfyUI
from tower_progress.sources.database import EmbeddedPostgres

TRUTH = {
    "completed": "completed",
    "failed": "failed",
    "interrupted": "canceled",
    "deleted": "canceled",
}


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    base = Path(tempfile.mkdtemp(prefix="tp-sim-producer-"))
    server = EmbeddedPostgres(runtime_dir=base / "run")
    yield server.start(base / "pgdata")
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def table(pg_dsn: str) -> AsyncIterator[str]:
    """An empty copy of the reference production_jobs table, in a schema of its own."""
    conn = await asyncpg.connect(pg_dsn)
    schema = f"sim_{id(conn):x}"
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.execute(
        f"CREATE TABLE {schema}.production_jobs (LIKE public.production_jobs INCLUDING ALL)"
    )
    yield f"{schema}.production_jobs"
    await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    await conn.close()


async def rows(dsn: str, table: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY id")]
    finally:
        await conn.close()


def truth(sim: FakeComfyUI, prompt_id: str) -> str:
    return TRUTH[[t.event for t in sim.history_log if t.prompt_id == prompt_id][-1]]


async def test_run_submits_a_varied_mix_and_follows_every_job_to_its_end(
    pg_dsn: str, table: str
) -> None:
    sim = FakeComfyUI(speed=0.02, seed=5)
    async with serve(sim) as base, aiohttp.ClientSession() as http:
        producer = Producer(dsn=pg_dsn, comfyui_url=base, table=table, seed=9, poll_interval=0.2)
        try:
            async with asyncio.timeout(40):
                await producer.run(interval=0.02, count=8)
        finally:
            await producer.close()
        found = await rows(pg_dsn, table)
        assert len(found) == 8
        client_ids = set()
        for row in found:
            async with http.get(f"{base}/history/{row['comfyui_job_id']}") as response:
                entry = (await response.json()).get(row["comfyui_job_id"])
            assert row["status"] == truth(sim, row["comfyui_job_id"]), row
            if entry is not None:
                assert json.loads(row["workflow"]) == entry["prompt"][2]
                client_ids.add(entry["prompt"][3].get("client_id"))
        assert client_ids == {producer.client_id, None}
        by_status = {row["status"] for row in found}
        assert by_status == {"completed", "failed", "canceled"}
        failed = [row for row in found if row["status"] == "failed"]
        assert [row["error"].split(":")[0] for row in failed] == ["ImageUpscaleWithModel (node 10)"]
        assert "RuntimeError" in failed[0]["error"]
        videos = [row for row in found if row["title"].startswith("Video")]
        assert len(videos) == 3
        assert all(row["total_frames"] % 4 == 1 for row in videos)


async def test_a_rejected_workflow_fails_its_row_with_comfyuis_reason(
    pg_dsn: str, table: str
) -> None:
    sim = FakeComfyUI(speed=0.02, seed=1)
    async with serve(sim) as base:
        producer = Producer(dsn=pg_dsn, comfyui_url=base, table=table, seed=1)
        graph = workflows.still(steps=4)
        graph["3"]["inputs"]["steps"] = 0
        try:
            job_id = await producer.submit_workflow(graph, title="broken", total_frames=1)
        finally:
            await producer.close()
    [row] = await rows(pg_dsn, table)
    assert str(row["id"]) == job_id
    assert row["status"] == "failed"
    assert row["comfyui_job_id"] is None
    assert row["error"] == (
        "Prompt outputs failed validation; KSampler (3): Value 0 smaller than min of 1 (steps)"
    )
    assert sim.history_log == []


async def test_an_unreachable_comfyui_fails_the_row_instead_of_losing_it(
    pg_dsn: str, table: str
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    producer = Producer(dsn=pg_dsn, comfyui_url=f"http://127.0.0.1:{port}", table=table)
    try:
        await producer.submit("still", title="nowhere")
    finally:
        await producer.close()
    [row] = await rows(pg_dsn, table)
    assert (row["title"], row["status"]) == ("nowhere", "failed")
    assert row["error"].startswith("ComfyUI unreachable: ")


async def test_cancel_deletes_a_waiting_prompt_and_interrupts_a_running_one(
    pg_dsn: str, table: str
) -> None:
    sim = FakeComfyUI(speed=1.0, seed=2, step_seconds=0.2)
    async with serve(sim) as base:
        producer = Producer(
            dsn=pg_dsn, comfyui_url=base, table=table, client_id_mode="own", poll_interval=0.2
        )
        watcher = await Client.connect(base, producer.client_id + "-watch")
        try:
            running = await producer.submit("still")
            waiting = await producer.submit("still")
            await watcher.read_until(lambda f: f.type == "status" and _remaining(f) == 2)
            await producer.cancel(waiting)
            await producer.cancel(running)
            async with asyncio.timeout(20):
                await producer.settled()
        finally:
            await watcher.close()
            await producer.close()
    found = {str(row["id"]): row for row in await rows(pg_dsn, table)}
    assert {found[running]["status"], found[waiting]["status"]} == {"canceled"}
    events = {t.prompt_id: t.event for t in sim.history_log}
    assert events[found[waiting]["comfyui_job_id"]] == "deleted"
    assert events[found[running]["comfyui_job_id"]] == "interrupted"


def _remaining(frame: Any) -> int:
    remaining: int = frame.data["status"]["exec_info"]["queue_remaining"]
    return remaining


async def test_run_simulator_serves_and_produces_until_stopped(pg_dsn: str, table: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_simulator(
            stop,
            host="127.0.0.1",
            port=port,
            speed=0.02,
            dsn=pg_dsn,
            jobs_interval=0.05,
            jobs_table=table,
        )
    )
    conn = await asyncpg.connect(pg_dsn)
    schema = table.split(".")[0]
    await conn.execute(
        f"CREATE FUNCTION {schema}.announce() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_notify('{schema}', NEW.status); RETURN NEW; END $$; "
        f"CREATE TRIGGER announce AFTER UPDATE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {schema}.announce()"
    )
    completed = asyncio.Event()
    await conn.add_listener(
        schema, lambda *args: completed.set() if args[3] == "completed" else None
    )
    try:
        async with asyncio.timeout(30):
            await completed.wait()
        client = await Client.connect(f"http://127.0.0.1:{port}", "observer")
        await client.read()
        stop.set()
        await task
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await client.read()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    finally:
        stop.set()
        await conn.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


class Lines(logging.Handler):
    """The simulator's log lines as they come, with an event set on each."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.added = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.added.set()

    async def first(self, pattern: str) -> re.Match[str]:
        while True:
            self.added.clear()
            found = [m for line in self.lines if (m := re.fullmatch(pattern, line))]
            if found:
                return found[0]
            await self.added.wait()


@pytest.fixture
def simulator_lines(caplog: pytest.LogCaptureFixture) -> Iterator[Lines]:
    caplog.set_level(logging.INFO, logger="tower_progress.simulate")
    lines = Lines()
    logger = logging.getLogger("tower_progress.simulate")
    logger.addHandler(lines)
    yield lines
    logger.removeHandler(lines)


async def test_without_a_database_the_producer_runs_the_same_mix_and_logs_each_fate(
    simulator_lines: Lines,
) -> None:
    sim = FakeComfyUI(speed=0.02, seed=5)
    async with serve(sim) as base:
        producer = Producer(dsn=None, comfyui_url=base, seed=9, poll_interval=0.2)
        try:
            async with asyncio.timeout(40):
                await producer.run(interval=0.02, count=8)
        finally:
            await producer.close()
    submitted = [
        m.groups()
        for line in simulator_lines.lines
        if (m := re.fullmatch(r"job (\d+) \((.+)\) submitted as prompt (\S+), client id .+", line))
    ]
    assert [int(job) for job, _, _ in submitted] == list(range(1, 9))
    assert sum(title.startswith("Video") for _, title, _ in submitted) == 3
    fates = {
        m[1]: m[2]
        for line in simulator_lines.lines
        if (m := re.fullmatch(r"job \d+ \(prompt (\S+)\) (completed|failed|canceled)(: .*)?", line))
    }
    assert fates == {prompt_id: truth(sim, prompt_id) for _, _, prompt_id in submitted}
    assert set(fates.values()) == {"completed", "failed", "canceled"}


async def test_run_simulator_without_a_database_submits_and_runs_jobs(
    simulator_lines: Lines,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_simulator(stop, host="127.0.0.1", port=port, speed=0.02, dsn=None, jobs_interval=0.05)
    )
    try:
        async with asyncio.timeout(30):
            done = await simulator_lines.first(r"job (\d+) \(prompt (\S+)\) completed")
        job, prompt_id = done.groups()
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/history/{prompt_id}") as response,
        ):
            entry = (await response.json())[prompt_id]
        assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("success", True)
        assert entry["outputs"] != {}
        assert any(
            line.startswith(f"job {job} (") and f" submitted as prompt {prompt_id}, " in line
            for line in simulator_lines.lines
        )
        assert "no database: jobs are submitted to the fake ComfyUI without rows" in (
            simulator_lines.lines
        )
    finally:
        stop.set()
        await task


def test_simulate_refuses_a_bridge_client_id_that_is_no_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["simulate", "--bridge-client-id", "short"])
    assert exited.value.code == 2
    assert "argument --bridge-client-id: client_id must be a secret of at least 16 characters" in (
        capsys.readouterr().err
    )
