"""One ComfyUI instance: its websocket stream plus ``/queue`` and ``/history`` polling.

The websocket (``websockets``' reconnecting ``connect`` iterator: capped exponential backoff
with jitter, reset after each success; client pings since ComfyUI sends none; no size limit)
feeds every text frame to the tracker as-is. Because ComfyUI routes a prompt's events only to
its submitter, ``/queue`` is polled on every ``status`` frame and every ``busy_poll_s`` while
prompts are active, then ``/history/{id}`` for prompts that left it (queue first, then history:
the other order can miss a prompt). Garbage from ComfyUI is logged with context and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import backoff
from websockets.exceptions import ConnectionClosed, InvalidURI

from tower_progress.core.model import (
    ComfyMessage,
    HistoryEntry,
    Observation,
    QueueItem,
    QueueSnapshot,
    SourceStatus,
)

log = logging.getLogger(__name__)

Emit = Callable[[Observation], None]
Resolver = Callable[[str, float], list[str]]


class ComfyError(Exception):
    """ComfyUI answered something we cannot use; the message says what and where."""


def parse_queue(instance: str, body: Any) -> QueueSnapshot:
    """A ``GET /queue`` body as a snapshot; pending sorted by priority number (heap order)."""
    if not isinstance(body, dict):
        raise ComfyError(f"/queue body is {type(body).__name__}, expected an object")

    def items(key: str) -> list[QueueItem]:
        raw = body.get(key, [])
        if not isinstance(raw, list):
            raise ComfyError(f"/queue {key} is {type(raw).__name__}, expected a list")
        parsed = []
        for entry in raw:
            if (
                not isinstance(entry, list)
                or len(entry) < 2
                or not isinstance(entry[1], str)
                or not isinstance(entry[0], int | float)
                or isinstance(entry[0], bool)
            ):
                log.warning("comfyui %s: skipping malformed /queue item %.200r", instance, entry)
                continue
            graph = entry[2] if len(entry) > 2 and isinstance(entry[2], dict) else {}
            extra = entry[3] if len(entry) > 3 and isinstance(entry[3], dict) else {}
            client_id = extra.get("client_id")
            create_time = extra.get("create_time")
            parsed.append(
                QueueItem(
                    number=float(entry[0]),
                    prompt_id=entry[1],
                    graph=graph,
                    client_id=client_id if isinstance(client_id, str) else None,
                    create_time=float(create_time)
                    if isinstance(create_time, int | float)
                    else None,
                )
            )
        return sorted(parsed, key=lambda i: (i.number, i.prompt_id))

    return QueueSnapshot(instance, tuple(items("queue_running")), tuple(items("queue_pending")))


def parse_history(instance: str, prompt_id: str, body: Any) -> HistoryEntry:
    if not isinstance(body, dict):
        raise ComfyError(f"/history/{prompt_id} body is {type(body).__name__}, expected an object")
    entry = body.get(prompt_id)
    if entry is not None and not isinstance(entry, dict):
        raise ComfyError(f"/history/{prompt_id} entry is {type(entry).__name__}")
    return HistoryEntry(instance, prompt_id, entry)


def parse_frame(instance: str, frame: str | bytes) -> ComfyMessage | None:
    """A websocket frame as a tracker input; None (after a log line) for anything else.

    Binary frames are previews and progress text: never a source of progress, so dropped.
    """
    if isinstance(frame, bytes):
        if len(frame) < 4:
            log.debug("comfyui %s: truncated binary frame of %d bytes", instance, len(frame))
        return None
    try:
        message = json.loads(frame)
    except ValueError:
        log.warning("comfyui %s: non-JSON text frame %.120r", instance, frame)
        return None
    if (
        not isinstance(message, dict)
        or not isinstance(message.get("type"), str)
        or not isinstance(message.get("data"), dict)
    ):
        log.warning("comfyui %s: frame without type/data %.120r", instance, frame)
        return None
    return ComfyMessage(instance, message)


def _retry_all(exc: Exception) -> Exception | None:
    """Reconnect after any failure but a URL that can never work."""
    return exc if isinstance(exc, InvalidURI) else None


class ComfySource:
    def __init__(
        self,
        *,
        name: str,
        url: str,
        client_id: str,
        emit: Emit,
        unresolved: Resolver,
        has_active: Callable[[str], bool],
        busy_poll_s: float = 1.5,
        idle_poll_s: float = 15.0,
        http_timeout_s: float = 10.0,
        max_backoff_s: float = 30.0,
        ping_interval_s: float = 20.0,
    ) -> None:
        self.name = name
        self._url = url.rstrip("/")
        self._ws_url = self._url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        self._emit = emit
        self._unresolved = unresolved
        self._has_active = has_active
        self._busy_poll_s = busy_poll_s
        self._idle_poll_s = idle_poll_s
        self._http_timeout = aiohttp.ClientTimeout(total=http_timeout_s)
        self._max_backoff_s = max_backoff_s
        self._ping_interval_s = ping_interval_s
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    @property
    def source_name(self) -> str:
        return f"comfyui:{self.name}"

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set; never raises because ComfyUI misbehaves."""
        async with aiohttp.ClientSession(timeout=self._http_timeout) as session:
            self._session = session
            tasks = [
                asyncio.create_task(self._watch(), name=f"{self.source_name}:ws"),
                asyncio.create_task(self._poll(), name=f"{self.source_name}:poll"),
            ]
            try:
                await stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._session = None

    # --- websocket -------------------------------------------------------------------------

    async def _watch(self) -> None:
        delays = functools.partial(
            backoff, initial_delay=1.0, min_delay=0.5, max_delay=self._max_backoff_s
        )
        self._emit(SourceStatus(self.source_name, False, "connecting"))
        async for ws in connect(
            self._ws_url,
            max_size=None,
            open_timeout=10,
            ping_interval=self._ping_interval_s,
            ping_timeout=self._ping_interval_s,
            process_exception=_retry_all,
            reconnect_delays=delays,
        ):
            opened = time.monotonic()
            log.info("comfyui %s: connected to %s", self.name, self._url)
            self._emit(SourceStatus(self.source_name, True))
            self._connected.set()
            self._wake.set()
            detail = await self._read(ws)
            self._connected.clear()
            log.warning("comfyui %s: websocket closed (%s); reconnecting", self.name, detail)
            self._emit(SourceStatus(self.source_name, False, detail))
            if time.monotonic() - opened < 5:
                await asyncio.sleep(random.uniform(0.2, 2.0))

    async def _read(self, ws: ClientConnection) -> str:
        try:
            async for frame in ws:
                message = parse_frame(self.name, frame)
                if message is None:
                    continue
                self._emit(message)
                if message.message["type"] == "status":
                    self._wake.set()
        except ConnectionClosed as exc:
            return f"closed: {exc}"
        return "closed by ComfyUI"

    # --- HTTP polling ----------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await self._connected.wait()
            interval = self._busy_poll_s if self._has_active(self.name) else self._idle_poll_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            if self._connected.is_set():
                await self.resync()

    async def resync(self) -> None:
        """Read ``/queue``, then ``/history`` of every prompt the tracker cannot place."""
        try:
            self._emit(parse_queue(self.name, await self._get("/queue")))
            for prompt_id in self._unresolved(self.name, time.time()):
                body = await self._get(f"/history/{prompt_id}")
                self._emit(parse_history(self.name, prompt_id, body))
        except (ComfyError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("comfyui %s: poll failed: %s", self.name, exc or type(exc).__name__)

    async def _get(self, path: str) -> Any:
        return await self._request("GET", path)

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None:
            raise ComfyError("not running")
        async with self._session.request(method, self._url + path, json=body) as response:
            if response.status >= 400:
                raise ComfyError(f"{method} {path} answered HTTP {response.status}")
            text = await response.text()
            if not text:
                return None
            try:
                return json.loads(text)
            except ValueError:
                raise ComfyError(f"{method} {path} answered non-JSON {text[:80]!r}") from None

    async def cancel(self, prompt_id: str, *, running: bool) -> str:
        """Interrupt a running prompt or delete a waiting one; production_jobs is untouched."""
        try:
            if running:
                await self._request("POST", "/interrupt", {"prompt_id": prompt_id})
                result = "interrupted"
            else:
                await self._request("POST", "/queue", {"delete": [prompt_id]})
                result = "deleted"
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ComfyError(f"ComfyUI {self.name} unreachable: {exc}") from None
        log.info("comfyui %s: prompt %s %s on request", self.name, prompt_id, result)
        self._wake.set()
        return result
