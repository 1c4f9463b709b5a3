"""The daemon as systemd runs it: a real ``python -m tower_progress`` process configured only
through its environment, against a FakeComfyUI served by the test and a real PostgreSQL.

Start-up and SIGTERM (clients closed with 1001, exit 0 within 5 s, the embedded PostgreSQL
stopped), ``sd_notify`` datagrams, ``check`` and ``migrate``, and what the logs say and do not
say (no per-step lines at INFO, no secrets at any level).
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path

import asyncpg
import psutil
import pytest
import websockets
from comfyui_watch import submit
from daemon_process import ComfyServer, DaemonProcess, Watcher, daemon_env, free_port, run_cli
from websockets.exceptions import ConnectionClosed

from tower_progress.simulate import workflows
from tower_progress.simulate.producer import Producer
from tower_progress.simulate.server import FakeComfyUI
from tower_progress.sources.db_migrations import available_migrations

WATCHER_ID = "tower-progress-lifecycle-5c1e9a"
TOKEN = "lifecycle-token-3b6f0d2a9c1e77"
DB_PASSWORD = "Db-Passw0rd-71c4e9b2"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ")


@pytest.fixture
async def comfy() -> AsyncIterator[ComfyServer]:
    """A FakeComfyUI at real speed: a 512x512 sampler step takes 50 ms (20 steps/s)."""
    server = await ComfyServer(FakeComfyUI(speed=1.0, seed=11)).start()
    yield server
    await server.stop()


@pytest.fixture
def secret_dsn(pg_dsn: str) -> str:
    """The session database's URL with a password in it (local trust auth ignores it), so a
    leak of the URL into any output can be caught."""
    assert "postgres:@" in pg_dsn
    return pg_dsn.replace("postgres:@", f"postgres:{DB_PASSWORD}@", 1)


@pytest.fixture
async def started() -> AsyncIterator[list[DaemonProcess]]:
    """Daemons a test starts; any still running at the end are killed with their database."""
    daemons: list[DaemonProcess] = []
    yield daemons
    for daemon in daemons:
        await daemon.kill()


def notifications(sock: socket.socket) -> list[str]:
    received = []
    while True:
        try:
            received.append(sock.recv(4096).decode())
        except BlockingIOError:
            return received


async def start_with_secrets(
    home: Path, comfy: ComfyServer, dsn: str, started: list[DaemonProcess], **settings: str
) -> DaemonProcess:
    """A healthy daemon with every secret set: a token, a database password, a watcher id."""
    env = daemon_env(
        home,
        free_port(),
        database_url=dsn,
        comfyui_url=comfy.url,
        comfyui_client_id=WATCHER_ID,
        token=TOKEN,
        **settings,
    )
    daemon = await DaemonProcess.start(env)
    started.append(daemon)
    await daemon.wait_healthy(headers=BEARER)
    return daemon


def running(pid: int) -> bool:
    """Alive and not a zombie (a dead process its parent, often init, has not reaped yet)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_no_secret(text: str) -> None:
    for secret in (TOKEN, DB_PASSWORD, WATCHER_ID):
        assert secret not in text, f"secret {secret!r} leaked:\n" + "\n".join(
            line for line in text.splitlines() if secret in line
        )


async def test_sigterm_closes_clients_with_1001_notifies_systemd_and_stops_embedded_postgres(
    home: Path, comfy: ComfyServer, started: list[DaemonProcess]
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(home / "notify.sock"))
    notify.setblocking(False)
    env = daemon_env(home, free_port(), comfyui_url=comfy.url, comfyui_client_id=WATCHER_ID) | {
        "NOTIFY_SOCKET": str(home / "notify.sock"),
        "WATCHDOG_USEC": "400000",
    }
    daemon = await DaemonProcess.start(env)
    started.append(daemon)
    await daemon.wait_healthy()
    postgres = daemon.postmaster_pids()
    assert postgres, "the embedded PostgreSQL should run in the state directory"
    async with websockets.connect(
        daemon.ws_url,
        origin=websockets.Origin(daemon.origin),
        user_agent_header=BROWSER_UA,
    ) as ws:
        assert '"type":"snapshot"' in str(await ws.recv())
        daemon.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
    assert await asyncio.wait_for(daemon.proc.wait(), 5) == 0
    still_there = [pid for pid in postgres if running(pid)]
    assert still_there == [], f"postgres processes left: {still_there}"
    assert not list(daemon.state_dir.glob("postgres/postmaster.pid"))
    sent = notifications(notify)
    notify.close()
    assert sent.count("READY=1") == 1 and sent.count("STOPPING=1") == 1
    ready, stopping = sent.index("READY=1"), sent.index("STOPPING=1")
    assert ready < stopping == len(sent) - 1
    assert "WATCHDOG=1" in sent[ready:stopping]
    assert daemon.stdout() == ""
    lines = daemon.log_lines()
    assert all(LOG_LINE.match(line) for line in lines), "every stderr line is a log line"
    assert any("embedded PostgreSQL stopped" in line for line in lines)
    assert lines[-1].endswith("tower-progress stopped")


async def blocked_on(conn: asyncpg.Connection, relation: str) -> None:
    """Until some session waits for a lock on ``relation`` (polling the database: nothing
    else can tell)."""
    query = (
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
        "WHERE c.relname = $1 AND NOT l.granted"
    )
    for _ in range(400):
        if await conn.fetchval(query, relation):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing ever waited for {relation}")


async def test_sigterm_still_writes_a_finished_job_the_database_was_holding_up(
    home: Path, comfy: ComfyServer, pg_dsn: str, started: list[DaemonProcess]
) -> None:
    """History's write of a finished job waits on a lock another session holds; SIGTERM comes
    first, the lock goes only once the shutdown has begun (STOPPING=1): the job is written
    before the daemon exits 0 within 5 s."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(home / "notify.sock"))
    notify.setblocking(False)
    env = daemon_env(
        home, free_port(), database_url=pg_dsn, comfyui_url=comfy.url, comfyui_client_id=WATCHER_ID
    ) | {"NOTIFY_SOCKET": str(home / "notify.sock")}
    daemon = await DaemonProcess.start(env)
    started.append(daemon)
    await daemon.wait_healthy()
    locker = await asyncpg.connect(pg_dsn)
    try:
        holding = locker.transaction()
        await holding.start()
        await locker.execute("LOCK TABLE tower_progress.finished_jobs IN EXCLUSIVE MODE")
        async with Watcher(daemon.ws_url, daemon.origin) as watcher:
            prompt_id = await submit(comfy.url, workflows.still(steps=3), WATCHER_ID)
            job_id = f"comfy:{prompt_id}"
            await watcher.until(lambda w: w.state(job_id) == "completed")
        await blocked_on(locker, "finished_jobs")
        daemon.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        while (await asyncio.wait_for(loop.sock_recv(notify, 4096), 5)) != b"STOPPING=1":
            pass
        await holding.rollback()
        assert await asyncio.wait_for(daemon.proc.wait(), 5) == 0
        stored = await locker.fetchrow(
            "SELECT state, prompt_id FROM tower_progress.finished_jobs WHERE job_id = $1", job_id
        )
    finally:
        await locker.close()
        notify.close()
    assert stored is not None and tuple(stored) == ("completed", prompt_id)
    assert not [line for line in daemon.log_lines() if " ERROR " in line]


async def test_info_logs_no_progress_lines_and_no_secrets_while_a_job_samples(
    home: Path, comfy: ComfyServer, secret_dsn: str, pg_dsn: str, started: list[DaemonProcess]
) -> None:
    daemon = await start_with_secrets(
        home, comfy, secret_dsn, started, resources_interval_s="0.25", progress_interval_s="0"
    )
    producer = Producer(dsn=pg_dsn, comfyui_url=comfy.url, seed=5)
    url = f"{daemon.ws_url}?token={TOKEN}"
    try:
        async with Watcher(url, daemon.origin) as watcher:
            # Start-up lines (ComfyUI's process found, NVML's verdict) come with the first
            # resource samples; what follows is steady state.
            await watcher.until(lambda w: w.resources >= 3)
            quiet_from = len(daemon.log_lines())
            graph = workflows.still(steps=80, seed=1)
            job_id = await producer.submit_workflow(
                graph, title="steady state", total_frames=1, client_id=WATCHER_ID
            )
            await watcher.until(lambda w: w.state(job_id) == "completed", within=60)
            steps = {update["step"] for update in watcher.history(job_id)} - {None}
    finally:
        await producer.close()
    assert len(steps) >= 60, "the job should have reported its sampler steps to clients"
    assert await daemon.stop() == 0
    lines = daemon.log_lines()[quiet_from:]
    about_job = [i for i, line in enumerate(lines) if f" job {job_id} prompt " in line]
    states = [lines[i].rsplit(": ", 1)[1] for i in about_job]
    assert states == list(dict.fromkeys(states)), "one line per state change"
    assert states[-2:] == ["running", "completed"]
    running, completed = about_job[-2:]
    assert lines[running + 1 : completed] == [], "nothing is logged while a job samples"
    assert [line for line in lines if " INFO " not in line] == [], "no warning in a calm run"
    assert_no_secret("\n".join(daemon.log_lines()))


async def test_debug_logs_carry_no_secret(
    home: Path, comfy: ComfyServer, secret_dsn: str, pg_dsn: str, started: list[DaemonProcess]
) -> None:
    daemon = await start_with_secrets(home, comfy, secret_dsn, started, log_level="DEBUG")
    producer = Producer(dsn=pg_dsn, comfyui_url=comfy.url, seed=6)
    try:
        async with Watcher(f"{daemon.ws_url}?token={TOKEN}", daemon.origin) as watcher:
            job_id = await producer.submit_workflow(
                workflows.still(steps=8, seed=2), title="debug", client_id=WATCHER_ID
            )
            await watcher.until(lambda w: w.state(job_id) == "completed")
    finally:
        await producer.close()
    assert (await daemon.get(f"/api/jobs/{job_id}", headers=BEARER))["state"] == "completed"
    assert await daemon.stop() == 0
    text = daemon.stderr_path.read_text()
    assert " DEBUG " in text and "/api/jobs/" in text, "the access log is on at DEBUG"
    assert_no_secret(text)


async def test_check_prints_one_line_per_dependency_and_fails_on_unreachable_comfyui(
    home: Path, comfy: ComfyServer, secret_dsn: str
) -> None:
    env = daemon_env(home, free_port(), database_url=secret_dsn, comfyui_url=comfy.url)
    code, out, err = await run_cli("check", env=env)
    assert code == 0, out + err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok   config",
        "ok   database",
        "ok   comfyui local",
        "ok   nvml",
    ]
    assert lines[2] == f"ok   comfyui local: {comfy.url} is ComfyUI 0.8.0"
    assert "public.production_jobs" in lines[1]
    assert_no_secret(out + err)

    nowhere = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run_cli("check", env=env | {"TOWER_PROGRESS_COMFYUI_URL": nowhere})
    assert code == 1
    lines = out.splitlines()
    assert [line[:4] for line in lines] == ["ok  ", "ok  ", "FAIL", "ok  "]
    assert lines[2].startswith(f"FAIL comfyui local: {nowhere} unreachable: ")
    assert_no_secret(out + err)


async def test_migrate_applies_every_migration_once_and_reports_it(home: Path, pg_dsn: str) -> None:
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("DROP DATABASE IF EXISTS tp_lifecycle_migrate")
        await admin.execute("CREATE DATABASE tp_lifecycle_migrate")
        dsn = pg_dsn.replace(
            "postgres:@/postgres?", f"postgres:{DB_PASSWORD}@/tp_lifecycle_migrate?"
        )
        env = daemon_env(home, free_port(), database_url=dsn)
        names = [m.name for m in available_migrations()]

        code, out, err = await run_cli("migrate", env=env)
        assert code == 0, out + err
        assert out.splitlines()[0] == f"migrations applied: {', '.join(names)}"
        assert out.splitlines()[1].startswith("database: /tp_lifecycle_migrate?host=")
        code, out, err = await run_cli("migrate", env=env)
        assert code == 0, out + err
        assert out.splitlines()[0] == "migrations applied: none (up to date)"
        assert_no_secret(out + err)

        conn = await asyncpg.connect(dsn)
        try:
            recorded = await conn.fetch(
                "SELECT name FROM tower_progress.schema_migrations ORDER BY version"
            )
        finally:
            await conn.close()
        assert [row["name"] for row in recorded] == names
    finally:
        await admin.execute("DROP DATABASE IF EXISTS tp_lifecycle_migrate WITH (FORCE)")
        await admin.close()


async def test_two_daemons_starting_at_once_apply_each_migration_once(
    home: Path, pg_dsn: str, comfy: ComfyServer, started: list[DaemonProcess]
) -> None:
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP DATABASE IF EXISTS tp_lifecycle_two")
    await admin.execute("CREATE DATABASE tp_lifecycle_two")
    dsn = pg_dsn.replace("/postgres?", "/tp_lifecycle_two?")
    holder = await asyncpg.connect(dsn)
    try:
        reference = files("tower_progress") / "sql" / "reference" / "production_jobs.sql"
        await holder.execute(reference.read_text(encoding="utf-8"))
        await holder.execute("SELECT pg_advisory_lock(x'746F7765725F7072'::bigint)")
        daemons = []
        for name in ("a", "b"):
            (home / name).mkdir()
            env = daemon_env(home / name, free_port(), database_url=dsn, comfyui_url=comfy.url)
            daemons.append(await DaemonProcess.start(env))
        started.extend(daemons)
        for _ in range(600):
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            if waiting == 2:
                break
            await asyncio.sleep(0.05)
        assert waiting == 2, "both daemons should wait for the migration lock"
        await holder.execute("SELECT pg_advisory_unlock(x'746F7765725F7072'::bigint)")
        for daemon in daemons:
            assert (await daemon.wait_healthy())["status"] == "ok"
        recorded = await holder.fetch(
            "SELECT name FROM tower_progress.schema_migrations ORDER BY version"
        )
        assert [row["name"] for row in recorded] == [m.name for m in available_migrations()]
        applied = [
            [line for line in daemon.log_lines() if "applied migrations: " in line]
            for daemon in daemons
        ]
        assert sorted(len(lines) for lines in applied) == [0, 1]
        for daemon in daemons:
            assert await daemon.stop() == 0
    finally:
        await holder.close()
        await admin.execute("DROP DATABASE IF EXISTS tp_lifecycle_two WITH (FORCE)")
        await admin.close()


async def test_migrate_reports_an_unreachable_database_in_one_line(home: Path) -> None:
    dsn = f"postgresql://tower:{DB_PASSWORD}@127.0.0.1:{free_port()}/render"
    code, out, err = await run_cli("migrate", env=daemon_env(home, free_port(), database_url=dsn))
    assert code == 1
    assert out == ""
    assert err.splitlines() == [err.strip()]
    assert err.startswith("migrate failed: database 127.0.0.1:")
    assert_no_secret(out + err)
