"""One ComfyUI instance: its websocket stream plus ``/queue``, ``/api/jobs`` and ``/history``
polling.

The websocket (``websockets``' reconnecting ``connect`` iterator, fed our own capped exponential
backoff with jitter, reset after each success; client pings since ComfyUI sends none; no size
limit; no permessage-deflate, which would cost both ends CPU on every progress frame for a few
hundred bytes saved) feeds every text frame to the tracker. While a sampler counts its steps,
the socket is read once per ``read_pace_s`` rather than once per frame, and of what piled up
only the newest progress goes on (``comfyui_burst``): tens of wake-ups a second cost more
than the daemon's work, and progress goes to the page no more often anyway. Because ComfyUI
routes a prompt's events only to its submitter, ``/queue`` is polled on every ``status``
frame and every ``busy_poll_s`` while prompts are in flight that the websocket does not
report in full, then the outcome of prompts that left it (queue first, then history: the
other order can miss a prompt): one ``/api/jobs`` page where ComfyUI has it tells which have
a history entry, read from ``/history/{id}``. Garbage from ComfyUI is logged with context and
skipped; a body that cannot be trusted is never turned into an observation, so a malformed
answer can delay a job's update but never end it wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import random
import sys
import termios
import time
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import quote

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidURI

from tower_progress.clock import next_tick
from tower_progress.core.model import (
    ComfyMessage,
    HistoryEntry,
    Observation,
    SourceStatus,
)
from tower_progress.sources.comfyui_burst import ProgressBurst
from tower_progress.sources.comfyui_wire import (
    JOBS_API_SINCE,
    ComfyError,
    FinishedJobs,
    parse_finished_jobs,
    parse_frame,
    parse_history,
    parse_queue,
    parse_version,
)

log = logging.getLogger(__name__)

__all__ = ["ComfyError", "ComfySource", "parse_frame", "parse_history", "parse_queue"]

Emit = Callable[[Observation], None]
Resolver = Callable[[str, float], list[str]]

# A connection that closes sooner than this counts as a failed attempt for the backoff.
_STABLE_S = 5.0
# The newest finished jobs asked for at once: far more than finish between two polls.
_FINISHED_JOBS = "/api/jobs?status=completed,failed&sort_by=created_at&sort_order=desc&limit=200"
# A page of finished jobs costs far more than one /history read; it pays off only for several
# prompts at once, and only while ComfyUI's whole history fits on it.
_PAGE_WORTH = 2


class ComfySource:
    """Watches one ComfyUI instance for the tracker.

    ``unresolved`` and ``needs_polling`` are the tracker's answers (prompts whose outcome must
    be read from history; whether this instance has prompts in flight that its websocket does
    not report in full). Timeouts and backoff bounds are in seconds: ``open_timeout_s`` for a
    websocket handshake, ``close_timeout_s`` for its closing one (a dead connection found by
    its pings waits this long, as ComfyUI will not answer), ``http_timeout_s`` for a whole
    HTTP request; ``read_pace_s`` paces reading while a sampler runs (0: every frame as it
    comes), so a step's progress can reach the tracker up to this late; reconnects wait a
    jittered ``initial_backoff_s`` doubling up to ``max_backoff_s``, reset by a connection
    that stays up.
    """

    def __init__(
        self,
        *,
        name: str,
        url: str,
        client_id: str,
        emit: Emit,
        unresolved: Resolver,
        needs_polling: Callable[[str], bool],
        busy_poll_s: float = 1.5,
        idle_poll_s: float = 15.0,
        http_timeout_s: float = 10.0,
        open_timeout_s: float = 10.0,
        close_timeout_s: float = 2.0,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        ping_interval_s: float = 20.0,
        read_pace_s: float = 0.0,
    ) -> None:
        self.name = name
        self._url = url.rstrip("/")
        watcher = quote(client_id, safe="")
        self._ws_url = self._url.replace("http", "ws", 1) + f"/ws?clientId={watcher}"
        self._emit = emit
        self._unresolved = unresolved
        self._needs_polling = needs_polling
        self._busy_poll_s = busy_poll_s
        self._idle_poll_s = idle_poll_s
        self._http_timeout_s = http_timeout_s
        self._open_timeout_s = open_timeout_s
        self._close_timeout_s = close_timeout_s
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._ping_interval_s = ping_interval_s
        self._read_pace_s = read_pace_s
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._connect_failing = False
        self._failure = ""
        self._stats_due = False
        self._jobs_api = True
        self._poll_problems: set[str] = set()

    @property
    def source_name(self) -> str:
        return f"comfyui:{self.name}"

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set; never raises because ComfyUI misbehaves."""
        timeout = aiohttp.ClientTimeout(total=self._http_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
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

    def _backoff(self, attempt: int) -> float:
        """Seconds before reconnect ``attempt`` (1-based): capped doubling, equal jitter."""
        cap = min(self._max_backoff_s, self._initial_backoff_s * 2.0 ** min(attempt - 1, 32))
        return random.uniform(cap / 2, cap)

    def _delays(self) -> Generator[float]:
        """The waits between the reconnect attempts of one outage (the library restarts this
        after each connection), each logged with the failure before it: an outage's first at
        WARNING, the rest at DEBUG."""
        for attempt in itertools.count(1):
            delay = self._backoff(attempt)
            level = logging.DEBUG if self._connect_failing else logging.WARNING
            self._connect_failing = True
            log.log(
                level,
                "comfyui %s: cannot connect to %s (%s); retrying in %.3g s",
                self.name,
                self._url,
                self._failure,
                delay,
            )
            yield delay

    def _retry(self, exc: Exception) -> Exception | None:
        """Reconnect after any failure but a URL that can never work."""
        if isinstance(exc, InvalidURI):
            return exc
        self._failure = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return None

    async def _watch(self) -> None:
        """Connect, read, reconnect; a cancel closes the connection with its handshake (up to
        ``close_timeout_s``) before it ends the task, rather than leaving that to the library's
        generator at garbage collection."""
        self._emit(SourceStatus(self.source_name, False, "connecting"))
        quick_closes = 0
        try:
            async for ws in connect(
                self._ws_url,
                max_size=None,
                compression=None,
                open_timeout=self._open_timeout_s,
                close_timeout=self._close_timeout_s,
                ping_interval=self._ping_interval_s,
                ping_timeout=self._ping_interval_s,
                process_exception=self._retry,
                reconnect_delays=self._delays,
            ):
                self._connect_failing = False
                opened = time.monotonic()
                log.info("comfyui %s: connected to %s", self.name, self._url)
                self._stats_due, self._jobs_api = True, True
                self._emit(SourceStatus(self.source_name, True))
                self._connected.set()
                self._wake.set()
                try:
                    detail = await self._read(ws)
                except asyncio.CancelledError:
                    await ws.close()
                    raise
                self._connected.clear()
                quick_closes = quick_closes + 1 if time.monotonic() - opened < _STABLE_S else 0
                wait = self._backoff(quick_closes) if quick_closes else 0.0
                log.warning(
                    "comfyui %s: websocket closed (%s); reconnecting in %.3g s",
                    self.name,
                    detail,
                    wait,
                )
                self._emit(SourceStatus(self.source_name, False, detail))
                await asyncio.sleep(wait)
        except InvalidURI as exc:
            log.error("comfyui %s: %s is not a usable URL: %s", self.name, self._url, exc)
            self._emit(SourceStatus(self.source_name, False, f"invalid URL {self._url}"))

    async def _read(self, ws: ClientConnection) -> str:
        """Read one connection until it closes; say how it closed.

        Once the frames that came in one read are all parsed (the loop's next turn), what the
        burst holds goes out, and while a sampler runs reading pauses until the next tick of
        the pace, unless more is already waiting in the kernel: then reading goes on, so a
        stream faster than one read per tick (large previews) never falls behind."""
        loop = asyncio.get_running_loop()
        burst = ProgressBurst(coalesce=self._read_pace_s > 0)
        pacer = _Pacer(ws, self._read_pace_s)
        settle: asyncio.Handle | None = None

        def pass_on(messages: list[ComfyMessage]) -> None:
            for message in messages:
                self._emit(message)
                if message.message["type"] == "status":
                    self._wake.set()

        def settled() -> None:
            nonlocal settle
            settle = None
            pass_on(burst.drain())
            if burst.waiting:
                pacer.pause()

        try:
            async for frame in ws:
                pass_on(burst.feed(parse_frame(self.name, frame)))
                if not burst.waiting:
                    pacer.resume()
                if settle is None:
                    settle = loop.call_soon(settled)
        except ConnectionClosed as exc:
            return f"closed: {exc}"
        finally:
            pacer.close()
            if settle is not None:
                settle.cancel()
            pass_on(burst.drain())
        return "closed by ComfyUI"

    # --- HTTP polling ----------------------------------------------------------------------

    async def _poll(self) -> None:
        """Poll on each wake-up or interval while connected. ``asyncio.timeout``, not
        ``wait_for``: on Python 3.11 the latter swallows a cancel that lands as the wake-up
        does, and the task would then wait forever for a connection."""
        while True:
            await self._connected.wait()
            interval = self._busy_poll_s if self._needs_polling(self.name) else self._idle_poll_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._connected.is_set():
                await self.resync()

    async def resync(self) -> None:
        """Read ``/queue``, then the outcome of every prompt the tracker cannot place.

        A connection's first poll reads ``/system_stats``: ComfyUI's version says whether it
        has ``/api/jobs`` (a 404 says so too, once per connection). Where it has, and several
        prompts are in question (a resync after a reconnect), one page of its finished jobs
        lists the prompts with a history entry: one that is not listed on a complete page has
        none (deleted, or wiped by a restart) without a request of its own; the others are read
        from ``/history/{id}`` for their outputs and messages. Once the history outgrows one
        page, the page settles nothing and is not asked again on this connection.

        A failed ``/queue`` skips the rest (outcomes are only meaningful after a snapshot); a
        failed jobs page falls back to ``/history``; a failed history read skips only that
        prompt. Each is retried on the next poll, so nothing is lost.
        """
        problems: list[str] = []
        if self._stats_due:
            self._stats_due = False
            await self._learn_version(problems)
        try:
            snapshot = parse_queue(self.name, await self._get("/queue"))
        except ComfyError as exc:
            problems.append(str(exc))
        else:
            self._emit(snapshot)
            wanted = self._unresolved(self.name, time.time())
            page_worth = len(wanted) >= _PAGE_WORTH
            finished = await self._finished(problems) if page_worth else None
            for prompt_id in wanted:
                if finished is not None and finished.complete and prompt_id not in finished.ids:
                    self._emit(HistoryEntry(self.name, prompt_id, None))
                    continue
                try:
                    body = await self._get(f"/history/{prompt_id}")
                    self._emit(parse_history(self.name, prompt_id, body))
                except ComfyError as exc:
                    problems.append(f"prompt {prompt_id}: {exc}")
        self._report(problems)

    async def _learn_version(self, problems: list[str]) -> None:
        try:
            version = parse_version(await self._get("/system_stats"))
        except ComfyError as exc:
            problems.append(str(exc))
            return
        if version is not None and version < JOBS_API_SINCE:
            self._jobs_api = False
        log.info(
            "comfyui %s: ComfyUI %s; outcomes from %s",
            self.name,
            ".".join(map(str, version)) if version else "of unknown version",
            "/api/jobs and /history" if self._jobs_api else "/history",
        )

    async def _finished(self, problems: list[str]) -> FinishedJobs | None:
        """The newest finished jobs, or None where ``/api/jobs`` is missing or failed."""
        if not self._jobs_api:
            return None
        try:
            page = parse_finished_jobs(await self._get(_FINISHED_JOBS))
        except ComfyError as exc:
            if exc.status == 404:
                self._jobs_api = False
                log.info(
                    "comfyui %s: no /api/jobs (before ComfyUI 0.6.0): outcomes from /history",
                    self.name,
                )
            else:
                problems.append(f"{exc}; outcomes from /history")
            return None
        if not page.complete:
            self._jobs_api = False
            log.info(
                "comfyui %s: its history is longer than one /api/jobs page: outcomes from "
                "/history until the next connection",
                self.name,
            )
        return page

    def _report(self, problems: list[str]) -> None:
        """Each poll failure once at WARNING, its repeats at DEBUG, the recovery at INFO."""
        for problem in problems:
            level = logging.DEBUG if problem in self._poll_problems else logging.WARNING
            log.log(level, "comfyui %s: poll failed: %s", self.name, problem)
        if self._poll_problems and not problems:
            log.info("comfyui %s: polling works again", self.name)
        self._poll_problems = set(problems)

    async def _get(self, path: str) -> Any:
        return await self._request("GET", path)

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer (None for an empty body); every failure as a ComfyError."""
        if self._session is None:
            raise ComfyError("not running")
        try:
            async with self._session.request(method, self._url + path, json=body) as response:
                if response.status >= 400:
                    raise ComfyError(
                        f"{method} {path} answered HTTP {response.status}", response.status
                    )
                raw = await response.read()
        except TimeoutError:
            raise ComfyError(
                f"{method} {path} got no answer within {self._http_timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise ComfyError(f"{method} {path} failed: {type(exc).__name__}: {exc}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise ComfyError(f"{method} {path} answered non-JSON {raw[:80]!r}") from None

    async def cancel(self, prompt_id: str, *, running: bool) -> str:
        """Interrupt a running prompt or delete a waiting one; production_jobs is untouched."""
        try:
            if running:
                await self._request("POST", "/interrupt", {"prompt_id": prompt_id})
                result = "interrupted"
            else:
                await self._request("POST", "/queue", {"delete": [prompt_id]})
                result = "deleted"
        except ComfyError as exc:
            raise ComfyError(f"ComfyUI {self.name}: {exc}") from None
        log.info("comfyui %s: prompt %s %s on request", self.name, prompt_id, result)
        self._wake.set()
        return result


class _Pacer:
    """Pauses a connection's reading until the next tick of ``pace_s`` (the frames meanwhile
    wait in the kernel, then come in one read), or until told to read on. It never pauses
    while the kernel holds unread bytes for the socket, nor where it cannot tell; a pace of
    0 never pauses."""

    def __init__(self, ws: ClientConnection, pace_s: float) -> None:
        self._transport = ws.transport
        sock = self._transport.get_extra_info("socket")
        self._fd: int | None = sock.fileno() if sock is not None else None
        self._pace_s = pace_s
        self._handle: asyncio.TimerHandle | None = None

    def pause(self) -> None:
        if self._pace_s <= 0 or self._handle is not None or self._unread() != 0:
            return
        self._transport.pause_reading()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_at(next_tick(loop.time(), self._pace_s), self._read_on)

    def resume(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._read_on()

    def close(self) -> None:
        """Read on for good: the closing handshake must not wait for a tick."""
        self.resume()

    def _read_on(self) -> None:
        self._handle = None
        self._transport.resume_reading()

    def _unread(self) -> int | None:
        """Bytes the kernel holds for the socket (``FIONREAD``); None when unknown."""
        if self._fd is None:
            return None
        try:
            raw = fcntl.ioctl(self._fd, termios.FIONREAD, bytes(4))
        except OSError:
            return None
        return int.from_bytes(raw, sys.byteorder, signed=True)
