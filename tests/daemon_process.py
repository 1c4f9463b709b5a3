"""The daemon as a real process, for lifecycle and fault tests.

``DaemonProcess`` runs ``python -m tower_progress`` with settings in its environment only (no
config file is read), stdout and stderr in files, and knows its own embedded PostgreSQL so that
a failed test never leaves one running. ``Watcher`` is a page-like websocket client: it keeps
its own picture of the jobs from the snapshot and every update, checks that ``seq`` never
skips, and reconnects for a fresh snapshot when the daemon drops it, as the page does.
``ComfyServer`` serves a ``FakeComfyUI`` in the test's event loop; ``own_mount`` gives the daemon
a state directory it can see go read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import websockets
from aiohttp import web
from websockets.exceptions import ConnectionClosed

from tower_progress.simulate.server import FakeComfyUI

JsonDict = dict[str, Any]
REPO = Path(__file__).resolve().parent.parent
HEALTH_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def daemon_env(home: Path, port: int, **settings: str) -> dict[str, str]:
    """A clean environment: PATH, ``HOME`` (where the logs go), the state directory
    ``HOME/state``, and ``TOWER_PROGRESS_<KEY>`` for each of ``settings``.

    Nothing of the test's own environment leaks in (no ``XDG_RUNTIME_DIR``, no stray
    ``TOWER_PROGRESS_*``), so the process sees exactly what a service manager would give it.
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TOWER_PROGRESS_STATE_DIR": str(home / "state"),
        "TOWER_PROGRESS_PORT": str(port),
    }
    env.update({f"TOWER_PROGRESS_{key.upper()}": value for key, value in settings.items()})
    return env


def own_mount(directory: Path, *, read_only: bool = False) -> list[str]:
    """A wrapper (as root) that runs its command in a private mount namespace where
    ``directory`` is a bind mount of itself, read-only if asked; later mounts on it stay in
    that namespace."""
    options = "-o ro " if read_only else ""
    script = f'mount --bind {options}"$0" "$0" && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        script,
        str(directory),
    ]


async def run_cli(*args: str, env: Mapping[str, str], within: float = 60) -> tuple[int, str, str]:
    """Run ``tower-progress ARGS`` to completion: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tower_progress",
        *args,
        env=dict(env),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class DaemonProcess:
    """One ``tower-progress serve`` process; ``await stop()`` or ``kill()`` it when done."""

    proc: asyncio.subprocess.Process
    port: int
    state_dir: Path
    stdout_path: Path
    stderr_path: Path

    @classmethod
    async def start(
        cls, env: Mapping[str, str], *args: str, wrapper: Sequence[str] = ()
    ) -> DaemonProcess:
        """Start ``serve ARGS`` with ``env`` (see ``daemon_env``); logs go to ``$HOME``.

        ``wrapper`` is a command that execs its arguments (so the pid stays the daemon's).
        """
        state_dir = Path(env["TOWER_PROGRESS_STATE_DIR"])
        logs = Path(env["HOME"])
        stdout_path, stderr_path = logs / "daemon.out", logs / "daemon.err"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *wrapper,
                sys.executable,
                "-m",
                "tower_progress",
                "serve",
                *args,
                env=dict(env),
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        return cls(proc, int(env["TOWER_PROGRESS_PORT"]), state_dir, stdout_path, stderr_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[str]:
        return self.stderr_path.read_text(errors="replace").splitlines()

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    async def health(self, headers: Mapping[str, str] | None = None) -> tuple[int, JsonDict]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{self.url}/api/health", headers=headers) as response,
        ):
            return response.status, await response.json()

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> Any:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(f"{self.url}{path}", headers=headers) as response,
        ):
            response.raise_for_status()
            return await response.json()

    async def wait_healthy(
        self, within: float = HEALTH_TIMEOUT_S, headers: Mapping[str, str] | None = None
    ) -> JsonDict:
        """Poll ``/api/health`` until it answers 200; fails with the log if the process dies."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        last = "no answer"
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode}:\n" + "\n".join(self.log_lines())
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                status, body = await self.health(headers)
                if status == 200:
                    return body
                last = f"{status} {body}"
            await asyncio.sleep(0.05)
        raise AssertionError(f"daemon not healthy after {within} s ({last}):\n" + self.tail())

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_lines()[-lines:])

    def postmaster_pids(self) -> set[int]:
        """The embedded PostgreSQL's processes (postmaster and children), if one runs."""
        pids: set[int] = set()
        for pid_file in self.state_dir.glob("postgres*/postmaster.pid"):
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
                pids |= {postmaster.pid, *(c.pid for c in postmaster.children(recursive=True))}
        return pids

    async def stop(self, within: float = 5.0) -> int:
        """SIGTERM, then the exit code; fails (and kills) after ``within`` seconds."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"no exit {within} s after SIGTERM:\n{self.tail()}") from None

    async def kill(self) -> None:
        """Kill the process if it still runs, and an embedded PostgreSQL it left behind."""
        leftovers = self.postmaster_pids()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for pid in leftovers:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


class ComfyServer:
    """A ``FakeComfyUI`` served on 127.0.0.1 in this event loop."""

    def __init__(self, fake: FakeComfyUI, port: int | None = None) -> None:
        self.fake = fake
        self.port = port or free_port()
        self._runner = web.AppRunner(fake.app, access_log=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ComfyServer:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        await self.fake.close()
        await self._runner.cleanup()


@dataclass
class Watcher:
    """A page-like client of the daemon's ``/ws``; use as ``async with Watcher(...)``.

    ``jobs`` is its picture of every job, built only from what the socket said. ``gaps``
    lists every ``seq`` that skipped within one connection (there must be none), ``close_codes``
    how each connection ended, ``errors`` the ``error`` messages it was sent. Clearing
    ``reading`` makes it stop reading; with a small ``receive_buffer`` (bytes) the daemon then
    soon sees a client whose socket does not drain.
    """

    url: str
    origin: str
    reconnect: bool = True
    receive_buffer: int | None = None
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    jobs: dict[str, JsonDict] = field(default_factory=dict)
    updates: dict[str, list[JsonDict]] = field(default_factory=dict)
    resources: int = 0
    sources: dict[str, JsonDict] = field(default_factory=dict)
    snapshots: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pongs: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _task: asyncio.Task[None] | None = None
    _ws: Any = None

    async def __aenter__(self) -> Watcher:
        self.reading.set()
        self._task = asyncio.create_task(self._run(), name="watcher")
        await self.until(lambda w: w.snapshots > 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.reconnect = False
        self.reading.set()
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def send(self, frame: str | bytes) -> None:
        await self._ws.send(frame)

    async def until(self, predicate: Callable[[Watcher], bool], within: float = 30.0) -> None:
        """Wait until ``predicate(self)`` holds after some message (or already does)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), within)
            except TimeoutError:
                states = {job_id: job["state"] for job_id, job in self.jobs.items()}
                raise AssertionError(f"watcher waited {within} s; jobs: {states}") from None

    def state(self, job_id: str) -> str | None:
        job = self.jobs.get(job_id)
        return None if job is None else str(job["state"])

    def history(self, job_id: str) -> list[JsonDict]:
        """Every update of the job this watcher received, in order."""
        return self.updates.get(job_id, [])

    def _connect(self) -> websockets.connect:
        if self.receive_buffer is None:
            return websockets.connect(self.url, origin=websockets.Origin(self.origin))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.connect(("127.0.0.1", int(self.url.split(":")[2].split("/")[0])))
        sock.setblocking(False)
        return websockets.connect(
            self.url, origin=websockets.Origin(self.origin), sock=sock, max_queue=1
        )

    async def _run(self) -> None:
        while True:
            async with self._connect() as ws:
                self._ws = ws
                expected = 1
                try:
                    while True:
                        await self.reading.wait()
                        message = json.loads(await ws.recv())
                        if message["seq"] != expected:
                            self.gaps.append((expected, message["seq"]))
                        expected = message["seq"] + 1
                        self._apply(message)
                        async with self._changed:
                            self._changed.notify_all()
                except ConnectionClosed:
                    pass
                self.close_codes.append(ws.close_code)
            async with self._changed:
                self._changed.notify_all()
            if not self.reconnect:
                return
            await asyncio.sleep(0.1)

    def _apply(self, message: JsonDict) -> None:
        match message["type"]:
            case "snapshot":
                self.snapshots += 1
                self.jobs = {job["id"]: job for job in message["jobs"]}
                self.sources = dict(message["sources"])
            case "job":
                job = message["job"]
                self.jobs[job["id"]] = job
                self.updates.setdefault(job["id"], []).append(job)
            case "job_removed":
                self.jobs.pop(message["id"], None)
            case "source":
                self.sources[message["name"]] = {
                    key: message[key] for key in ("up", "detail", "since")
                }
            case "error":
                self.errors.append(message["message"])
            case "pong":
                self.pongs += 1
            case "resources":
                self.resources += 1
