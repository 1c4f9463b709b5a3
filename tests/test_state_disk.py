"""The state directory's disk going read-only under a running daemon with the embedded
PostgreSQL (the default set-up), and coming back, on real processes.

The daemon runs in a private mount namespace in which its state directory is a bind mount of
itself. ``mount -o remount,bind,ro`` of that mount is refused with EBUSY while PostgreSQL holds
files in it open for writing (the kernel's rule for read-only bind remounts), so the disk goes
read-only the other way a path can: a read-only bind mount stacked on it, which every new
lookup through the state directory sees; unmounting it brings the writable disk back.
PostgreSQL goes on serving from files it has open until its next checkpoint, which the test
brings forward: the checkpointer PANICs on ``global/pg_control`` (Read-only file system),
crash recovery PANICs the same way, and the postmaster stays up refusing every connection "in
recovery mode", also once the disk is writable again. The daemon's supervisor must notice,
kill it, retry the start while the disk refuses, and bring it back without a daemon restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest
from daemon_process import (
    ComfyServer,
    DaemonProcess,
    Watcher,
    daemon_env,
    free_port,
    own_mount,
)

from tower_progress.simulate import workflows
from tower_progress.simulate.server import FakeComfyUI

WATCHER_ID = "tower-progress-state-disk-8d2f41"
SPEED = 0.02
# The supervisor calls a server hung after 30 s of refused connections; history and the
# listener retry with backoff capped at 60 s and 30 s.
OUTAGE_S = 120.0

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")),
    reason="needs root, unshare and nsenter to make the state disk read-only under the daemon",
)


@pytest.fixture
def home(home: Path) -> Path:
    """The shared home with its state directory made."""
    (home / "state").mkdir()
    return home


@pytest.fixture
async def comfy() -> AsyncIterator[ComfyServer]:
    server = await ComfyServer(FakeComfyUI(speed=SPEED, seed=23)).start()
    yield server
    await server.stop()


async def in_namespace_of(daemon: DaemonProcess, *command: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        "--target",
        str(daemon.proc.pid),
        "--mount",
        "--",
        *command,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, f"{command}: {err.decode()}"


async def submit(comfy: ComfyServer, seed: int) -> str:
    body = {"prompt": workflows.still(steps=12, seed=seed), "client_id": WATCHER_ID}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{comfy.url}/prompt", json=body) as response,
    ):
        return f"comfy:{(await response.json())['prompt_id']}"


async def finish(watcher: Watcher, comfy: ComfyServer, *seeds: int) -> list[str]:
    ids = [await submit(comfy, seed) for seed in seeds]
    await watcher.until(lambda w: all(w.state(i) == "completed" for i in ids))
    return ids


async def stored(daemon: DaemonProcess, job_ids: list[str], within: float) -> list[str]:
    """The states history holds for ``job_ids`` once it holds them all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        page = await daemon.get("/api/jobs?state=finished&limit=500")
        states = {job["id"]: job["state"] for job in page["jobs"]}
        if all(i in states for i in job_ids):
            return [states[i] for i in job_ids]
        await asyncio.sleep(0.2)
    raise AssertionError(f"history never stored all of {job_ids}:\n{daemon.tail()}")


async def checkpoint(daemon: DaemonProcess) -> None:
    """Ask for the checkpoint PostgreSQL would make on its own within minutes; it PANICs."""
    conn = await asyncpg.connect(
        f"postgresql://postgres@/postgres?host={daemon.state_dir}/postgres"
    )
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await conn.execute("CHECKPOINT")
    conn.terminate()


def transitions(watcher: Watcher, job_id: str) -> list[str]:
    states: list[str] = []
    for update in watcher.history(job_id):
        if not states or states[-1] != update["state"]:
            states.append(update["state"])
    return states


@needs_namespaces
async def test_state_disk_read_only_at_runtime_the_embedded_database_is_restarted(
    home: Path, comfy: ComfyServer
) -> None:
    env = daemon_env(home, free_port(), comfyui_url=comfy.url, comfyui_client_id=WATCHER_ID)
    state = home / "state"
    daemon = await DaemonProcess.start(env, wrapper=own_mount(state))
    try:
        await daemon.wait_healthy(within=90)
        async with Watcher(daemon.ws_url, daemon.origin) as watcher:
            await watcher.until(lambda w: w.sources.get("database", {}).get("up") is True)
            before = await finish(watcher, comfy, 1)
            assert await stored(daemon, before, within=30) == ["completed"]
            first_line = len(daemon.log_lines())

            await in_namespace_of(daemon, "mount", "--bind", "-o", "ro", str(state), str(state))
            await checkpoint(daemon)
            await watcher.until(lambda w: not w.sources["database"]["up"])
            during = await finish(watcher, comfy, 2, 3, 4)
            await watcher.until(
                lambda w: any("did not restart" in line for line in daemon.log_lines()),
                within=OUTAGE_S,
            )
            during += await finish(watcher, comfy, 5)

            await in_namespace_of(daemon, "umount", str(state))
            await watcher.until(lambda w: w.sources["database"]["up"], within=OUTAGE_S)
            assert await stored(daemon, before + during, within=OUTAGE_S) == ["completed"] * 5
            assert watcher.gaps == [] and watcher.snapshots == 1 and watcher.close_codes == []
            seen = {tuple(transitions(watcher, i)) for i in during}
            assert seen <= {("queued", "running", "completed"), ("running", "completed")}, seen
            truth = {t.prompt_id: t.event for t in comfy.fake.history_log}
            assert [truth[i.removeprefix("comfy:")] for i in during] == ["completed"] * 4
            assert (await daemon.health())[1]["status"] == "ok"
        lines = daemon.log_lines()[first_line:]
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    noisy = [line for line in lines if " WARNING " in line or " ERROR " in line]
    assert len(noisy) <= 6, "\n".join(noisy)
    text = "\n".join(lines)
    assert "embedded PostgreSQL is down: it refused connections for " in text, text
    assert f"embedded PostgreSQL did not restart: state directory {state}: " in text, text
    assert "Read-only file system" in text
    assert "embedded PostgreSQL restarted after " in text, text
    assert "history: database writes resumed" in text, text
    assert daemon.postmaster_pids() == set()


async def test_an_embedded_postmaster_that_dies_is_started_again(
    home: Path, comfy: ComfyServer
) -> None:
    env = daemon_env(home, free_port(), comfyui_url=comfy.url, comfyui_client_id=WATCHER_ID)
    daemon = await DaemonProcess.start(env)
    try:
        await daemon.wait_healthy(within=90)
        async with Watcher(daemon.ws_url, daemon.origin) as watcher:
            await watcher.until(lambda w: w.sources.get("database", {}).get("up") is True)
            first_line = len(daemon.log_lines())
            victims = [psutil.Process(pid) for pid in daemon.postmaster_pids()]
            for victim in victims:
                with contextlib.suppress(psutil.NoSuchProcess):
                    victim.send_signal(signal.SIGKILL)
            psutil.wait_procs(victims, timeout=10)
            await watcher.until(lambda w: not w.sources["database"]["up"])
            during = await finish(watcher, comfy, 6)
            await watcher.until(lambda w: w.sources["database"]["up"], within=OUTAGE_S)
            assert await stored(daemon, during, within=OUTAGE_S) == ["completed"]
            assert watcher.gaps == [] and watcher.snapshots == 1
        lines = daemon.log_lines()[first_line:]
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
    text = "\n".join(lines)
    assert "embedded PostgreSQL is down: its postmaster exited; restarting it" in text, text
    assert "embedded PostgreSQL restarted" in text, text
    assert not any("Traceback" in line for line in lines), text
