"""Run one scenario against the stand-in over real sockets and keep every byte each client got.

A scenario: start the server on 127.0.0.1, optionally install something on it (the bridge),
connect the roles' websockets one by one (each after the previous one's handshake), post every
prompt, then start the worker. Posting everything before the worker starts makes the order of
all frames deterministic, so two runs (with and without the bridge) can be compared byte for
byte. At each ``Hold`` step and at the end, a broadcast marker is sent and every connected
client is read up to it, so the harness never waits on time, only on frames.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .execution import PromptExecutor
from .main import prompt_worker
from .script import PromptScript
from .server import PromptServer

CLOCK_START = 1_795_425_700_000
MARKER_TYPE = "standin_marker"
SCENARIO_TIMEOUT_S = 60

Frame = tuple[str, str | bytes]
Installer = Callable[[PromptServer], Callable[[], None]]


@dataclass(frozen=True)
class Role:
    """A websocket client: ``client_id`` None connects without one (the server assigns it)."""

    name: str
    client_id: str | None
    feature_flags: bool = False


@dataclass(frozen=True)
class Submission:
    """A prompt to POST, with the client id to submit it under (None: no client id)."""

    script: PromptScript
    client_id: str | None


@dataclass
class RunResult:
    """Every frame per role (raw text or bytes, markers included) and every HTTP body."""

    frames: dict[str, list[Frame]] = field(default_factory=dict)
    http: dict[str, bytes] = field(default_factory=dict)
    last_node_id_at_hold: dict[str, str | None] = field(default_factory=dict)
    client_id_after: Any = None
    last_node_id_after: Any = None


def is_marker(frame: Frame) -> bool:
    kind, payload = frame
    return (
        kind == "text"
        and isinstance(payload, str)
        and payload.startswith(f'{{"type": "{MARKER_TYPE}"')
    )


class _Client:
    def __init__(self, role: Role, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.role = role
        self.ws = ws
        self.frames: list[Frame] = []
        self._markers: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None

    async def handshake(self) -> None:
        self.frames.append(await self._receive())
        if self.role.feature_flags:
            await self.ws.send_json(
                {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
            )
            self.frames.append(await self._receive())
        self._reader = asyncio.create_task(self._read(), name=f"reader-{self.role.name}")

    async def marker(self, name: str) -> None:
        await self._marker_event(name).wait()

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            await self._reader

    async def _receive(self) -> Frame:
        msg = await self.ws.receive()
        if msg.type == aiohttp.WSMsgType.TEXT:
            return ("text", msg.data)
        if msg.type == aiohttp.WSMsgType.BINARY:
            return ("binary", msg.data)
        raise ConnectionError(f"{self.role.name}: socket ended during the handshake ({msg.type})")

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.frames.append(("binary", msg.data))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                frame: Frame = ("text", msg.data)
                self.frames.append(frame)
                if is_marker(frame):
                    self._marker_event(json.loads(msg.data)["data"]["name"]).set()

    def _marker_event(self, name: str) -> asyncio.Event:
        return self._markers.setdefault(name, asyncio.Event())


class _Worker:
    """The prompt worker thread plus the two things it reports: holds and finished prompts."""

    def __init__(self, server: PromptServer, scripts: Mapping[str, PromptScript]) -> None:
        self._loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._release = threading.Event()
        executor = PromptExecutor(server, scripts, self._hold)
        self._thread = threading.Thread(
            target=prompt_worker,
            args=(server.prompt_queue, server, executor, self._done),
            name="standin-prompt-worker",
            daemon=True,
        )
        self._queue = server.prompt_queue

    def start(self) -> None:
        self._thread.start()

    def release(self) -> None:
        self._release.set()

    async def stop(self) -> None:
        self._queue.stop()
        self._release.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    def _hold(self, name: str) -> None:
        self._release.clear()
        self._loop.call_soon_threadsafe(self.events.put_nowait, ("hold", name))
        self._release.wait()

    def _done(self, prompt_id: str) -> None:
        self._loop.call_soon_threadsafe(self.events.put_nowait, ("done", prompt_id))


async def run_scenario(
    roles: Sequence[Role],
    submissions: Sequence[Submission],
    *,
    install: Installer | None = None,
    drop_at_hold: Mapping[str, str] | None = None,
) -> RunResult:
    """Run the scenario; ``drop_at_hold`` maps a hold name to a role whose socket closes there."""
    async with asyncio.timeout(SCENARIO_TIMEOUT_S):
        return await _run(roles, submissions, install, drop_at_hold or {})


async def _run(
    roles: Sequence[Role],
    submissions: Sequence[Submission],
    install: Installer | None,
    drop_at_hold: Mapping[str, str],
) -> RunResult:
    anon_ids = (f"{n:032x}" for n in itertools.count(1))
    clock = itertools.count(CLOCK_START)
    server = PromptServer(
        asyncio.get_running_loop(), clock=lambda: next(clock), new_sid=lambda: next(anon_ids)
    )
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    publisher = asyncio.create_task(server.publish_loop(), name="standin-publish-loop")
    uninstall = install(server) if install is not None else None
    worker = _Worker(server, {s.script.prompt_id: s.script for s in submissions})
    clients: dict[str, _Client] = {}
    result = RunResult()
    try:
        async with aiohttp.ClientSession() as session:
            try:
                for role in roles:
                    clients[role.name] = await _connect(session, base, role)
                await _play(
                    server, session, base, submissions, worker, clients, drop_at_hold, result
                )
            finally:
                for client in clients.values():
                    await client.close()
                for name, client in clients.items():
                    result.frames[name] = client.frames
    finally:
        await worker.stop()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await runner.cleanup()
        if uninstall is not None:
            uninstall()
    return result


async def _connect(session: aiohttp.ClientSession, base: str, role: Role) -> _Client:
    query = f"?clientId={role.client_id}" if role.client_id is not None else ""
    ws = await session.ws_connect(f"{base}/ws{query}", max_msg_size=0)
    client = _Client(role, ws)
    await client.handshake()
    return client


async def _play(
    server: PromptServer,
    session: aiohttp.ClientSession,
    base: str,
    submissions: Sequence[Submission],
    worker: _Worker,
    clients: dict[str, _Client],
    drop_at_hold: Mapping[str, str],
    result: RunResult,
) -> None:
    connected = dict(clients)
    for submission in submissions:
        body: dict[str, Any] = {
            "prompt": submission.script.graph,
            "prompt_id": submission.script.prompt_id,
        }
        if submission.client_id is not None:
            body["client_id"] = submission.client_id
        async with session.post(f"{base}/prompt", json=body) as response:
            response.raise_for_status()
            result.http[f"post:{submission.script.prompt_id}"] = await response.read()
    result.http["queue:before"] = await _get(session, f"{base}/queue")
    worker.start()
    remaining = len(submissions)
    while remaining:
        kind, name = await worker.events.get()
        if kind == "done":
            remaining -= 1
            continue
        await _flush(server, connected, f"hold:{name}")
        result.http[f"queue:{name}"] = await _get(session, f"{base}/queue")
        result.last_node_id_at_hold[name] = server.last_node_id
        if name in drop_at_hold:
            await connected.pop(drop_at_hold[name]).close()
        worker.release()
    await _flush(server, connected, "end")
    for submission in submissions:
        prompt_id = submission.script.prompt_id
        result.http[f"history:{prompt_id}"] = await _get(session, f"{base}/history/{prompt_id}")
    result.http["history"] = await _get(session, f"{base}/history")
    result.http["queue:after"] = await _get(session, f"{base}/queue")
    result.client_id_after = server.client_id
    result.last_node_id_after = server.last_node_id


async def _flush(server: PromptServer, clients: Mapping[str, _Client], name: str) -> None:
    """Broadcast a marker behind everything already queued and read every client up to it."""
    server.send_sync(MARKER_TYPE, {"name": name}, None)
    await asyncio.gather(*(client.marker(name) for client in clients.values()))


async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.read()
