"""One ComfyUI instance: its websocket stream plus ``/queue`` and ``/history`` polling.

The websocket (``websockets``' reconnecting ``connect`` iterator, fed our own capped
exponential backoff with jitter, reset after each success; client pings since ComfyUI sends
none; no size limit) feeds every text frame to the tracker. Because ComfyUI routes a prompt's
events only to its submitter, ``/queue`` is polled on every ``status`` frame and every
``busy_poll_s`` while prompts are active, then ``/history/{id}`` for prompts that left it (queue
first, then history: the other order can miss a prompt). Garbage from ComfyUI is logged with
context and skipped; a body that cannot be trusted is never turned into an observation, so a
malformed answer can delay a job's update but never end it wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
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
Check = Callable[[Any], bool]

# A connection that closes sooner than this counts as a failed attempt for the backoff.
_STABLE_S = 5.0
_PREVIEW_IMAGE, _TEXT, _PREVIEW_WITH_METADATA = 1, 3, 4
_IMAGE_TYPES = (1, 2)


class ComfyError(Exception):
    """ComfyUI answered something we cannot use; the message says what and where."""


def parse_queue(instance: str, body: Any) -> QueueSnapshot:
    """A ``GET /queue`` body as a snapshot; pending sorted by priority number (heap order).

    Items are read by index 0-4 (newer servers may add elements). A malformed item fails the
    whole body: a snapshot missing a prompt would make the tracker think it vanished.
    """
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
                or not _is_id(entry[1])
                or not _is_number(entry[0])
            ):
                raise ComfyError(f"/queue {key} has a malformed item {entry!r:.200}")
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
                    if isinstance(create_time, int | float) and not isinstance(create_time, bool)
                    else None,
                )
            )
        return sorted(parsed, key=lambda i: (i.number, i.prompt_id))

    return QueueSnapshot(instance, tuple(items("queue_running")), tuple(items("queue_pending")))


def parse_history(instance: str, prompt_id: str, body: Any) -> HistoryEntry:
    """A ``GET /history/{id}`` body; ``{}`` (unknown, unfinished or deleted) gives no entry.

    Anything else that lacks this prompt's entry, or whose entry is not laid out like
    ComfyUI's, is an error rather than "no entry": the latter would end the job.
    """
    where = f"/history/{prompt_id}"
    if not isinstance(body, dict):
        raise ComfyError(f"{where} body is {type(body).__name__}, expected an object")
    if not body:
        return HistoryEntry(instance, prompt_id, None)
    entry = body.get(prompt_id)
    if entry is None:
        raise ComfyError(f"{where} answered other prompts' entries {sorted(body)!r:.120}")
    if not isinstance(entry, dict):
        raise ComfyError(f"{where} entry is {type(entry).__name__}, expected an object")
    status = entry.get("status")
    for value, check, what in (
        (status, _is_dict, "status"),
        (entry.get("outputs"), _is_dict, "outputs"),
        (entry.get("prompt"), _is_list, "prompt"),
        (status.get("messages") if isinstance(status, dict) else None, _is_list, "messages"),
    ):
        if value is not None and not check(value):
            raise ComfyError(f"{where} {what} is {type(value).__name__}")
    return HistoryEntry(instance, prompt_id, entry)


# --- websocket frames ---------------------------------------------------------------------


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_node(value: Any) -> bool:
    return _is_id(value) or (isinstance(value, int) and not isinstance(value, bool))


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


# field -> (check, what it must be, presence): "required" present and not null, "nullable"
# present but maybe null (``executing.node`` null means the prompt ended), "optional" neither.
_Presence = Literal["required", "nullable", "optional"]
_Rule = tuple[Check, str, _Presence]
_PROMPT_ID: _Rule = (_is_id, "a non-empty string", "required")
_OPTIONAL_PROMPT_ID: _Rule = (_is_id, "a non-empty string", "optional")
_TIMESTAMP: _Rule = (_is_number, "a number", "optional")
_NODE: _Rule = (_is_node, "a node id", "required")
_OPTIONAL_NODE: _Rule = (_is_node, "a node id", "optional")
_OPTIONAL_TEXT: _Rule = (_is_str, "a string", "optional")
_NUMBER: _Rule = (_is_number, "a number", "required")
_FIELDS: dict[str, dict[str, _Rule]] = {
    "status": {"status": (_is_dict, "an object", "optional")},
    "feature_flags": {},
    "execution_start": {"prompt_id": _PROMPT_ID, "timestamp": _TIMESTAMP},
    "execution_cached": {
        "prompt_id": _PROMPT_ID,
        "nodes": (_is_list, "a list", "required"),
        "timestamp": _TIMESTAMP,
    },
    "executing": {"prompt_id": _OPTIONAL_PROMPT_ID, "node": (_is_node, "a node id", "nullable")},
    "executed": {
        "prompt_id": _PROMPT_ID,
        "node": _NODE,
        "output": (_is_dict, "an object", "optional"),
    },
    "progress": {
        "prompt_id": _OPTIONAL_PROMPT_ID,
        "node": _OPTIONAL_NODE,
        "value": _NUMBER,
        "max": _NUMBER,
    },
    "progress_state": {"prompt_id": _PROMPT_ID, "nodes": (_is_dict, "an object", "required")},
    "execution_success": {"prompt_id": _PROMPT_ID, "timestamp": _TIMESTAMP},
    "execution_error": {
        "prompt_id": _PROMPT_ID,
        "node_id": _OPTIONAL_NODE,
        "node_type": _OPTIONAL_TEXT,
        "exception_type": _OPTIONAL_TEXT,
        "exception_message": _OPTIONAL_TEXT,
        "timestamp": _TIMESTAMP,
    },
    "execution_interrupted": {
        "prompt_id": _PROMPT_ID,
        "node_id": _OPTIONAL_NODE,
        "node_type": _OPTIONAL_TEXT,
        "timestamp": _TIMESTAMP,
    },
}


def _field_problem(kind: str, data: Mapping[str, Any]) -> str | None:
    for name, (check, what, presence) in _FIELDS[kind].items():
        if name not in data:
            if presence != "optional":
                return f"no {name!r}"
            continue
        value = data[name]
        if value is None:
            if presence == "required":
                return f"{name!r} is null, expected {what}"
        elif not check(value):
            return f"{name!r} is {type(value).__name__}, expected {what}"
    return None


def parse_frame(instance: str, frame: str | bytes) -> ComfyMessage | None:
    """A websocket frame as a tracker input; None (after a log line) for anything else.

    Binary frames (previews, progress text) are never a source of progress: they are checked,
    logged and dropped. Message types we do not know (custom nodes broadcast their own) are
    dropped quietly; a known type with a missing or wrongly typed field is dropped loudly.
    """
    if isinstance(frame, bytes):
        _binary(instance, frame)
        return None
    try:
        message = json.loads(frame)
    except ValueError:
        log.warning("comfyui %s: non-JSON text frame %.120r ignored", instance, frame)
        return None
    if (
        not isinstance(message, dict)
        or not isinstance(message.get("type"), str)
        or not isinstance(message.get("data"), dict)
    ):
        log.warning("comfyui %s: frame without type/data %.120r ignored", instance, frame)
        return None
    kind, data = message["type"], message["data"]
    if kind not in _FIELDS:
        log.debug("comfyui %s: message type %r ignored", instance, kind)
        return None
    problem = _field_problem(kind, data)
    prompt_id = data.get("prompt_id")
    if problem is not None:
        log.warning(
            "comfyui %s: %s frame%s ignored: %s; frame %.200r",
            instance,
            kind,
            f" for prompt {prompt_id}" if _is_id(prompt_id) else "",
            problem,
            frame,
        )
        return None
    if prompt_id is None and kind == "executing" and data.get("node") is not None:
        log.info(
            "comfyui %s: executing node %s without a prompt id (a reconnect frame): "
            "it belongs to the running prompt",
            instance,
            data["node"],
        )
    elif prompt_id is None and kind == "progress":
        log.debug("comfyui %s: progress without a prompt id (ComfyUI before 2024)", instance)
    return ComfyMessage(instance, message)


def _binary(instance: str, frame: bytes) -> None:
    if len(frame) < 4:
        log.warning("comfyui %s: truncated binary frame of %d bytes ignored", instance, len(frame))
        return
    event = int.from_bytes(frame[:4], "big")
    problem, about = _binary_problem(event, frame[4:])
    if problem is not None:
        log.warning(
            "comfyui %s: binary event %d of %d bytes ignored: %s",
            instance,
            event,
            len(frame),
            problem,
        )
    else:
        log.debug(
            "comfyui %s: binary event %d of %d bytes%s ignored (previews are not progress)",
            instance,
            event,
            len(frame),
            about,
        )


def _binary_problem(event: int, payload: bytes) -> tuple[str | None, str]:
    """What is wrong with a binary frame's payload (or None), and whom it is about."""
    if event not in (_PREVIEW_IMAGE, _TEXT, _PREVIEW_WITH_METADATA):
        return f"unknown event type {event}", ""
    if len(payload) < 4:
        return "truncated header", ""
    head = int.from_bytes(payload[:4], "big")
    if event == _PREVIEW_IMAGE:
        return (None if head in _IMAGE_TYPES else f"unknown image type {head}"), ""
    if len(payload) < 4 + head:
        return f"declares {head} header bytes, has {len(payload) - 4}", ""
    header = payload[4 : 4 + head]
    if event == _TEXT:
        try:
            return None, f" for node {header.decode()}"
        except UnicodeDecodeError:
            return "node id is not UTF-8", ""
    try:
        metadata = json.loads(header)
    except ValueError:
        return "preview metadata is not JSON", ""
    if not isinstance(metadata, dict):
        return f"preview metadata is {type(metadata).__name__}", ""
    return None, f" for prompt {metadata.get('prompt_id')} node {metadata.get('node_id')}"


# --- the source ---------------------------------------------------------------------------


class ComfySource:
    """Watches one ComfyUI instance for the tracker.

    ``unresolved`` and ``has_active`` are the tracker's answers (prompts whose outcome must be
    read from history; whether this instance has prompts in flight). Timeouts and backoff
    bounds are in seconds: ``open_timeout_s`` for a websocket handshake, ``http_timeout_s`` for
    a whole HTTP request; reconnects wait a jittered ``initial_backoff_s`` doubling up to
    ``max_backoff_s``, reset by a connection that stays up.
    """

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
        open_timeout_s: float = 10.0,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        ping_interval_s: float = 20.0,
    ) -> None:
        self.name = name
        self._url = url.rstrip("/")
        watcher = quote(client_id, safe="")
        self._ws_url = self._url.replace("http", "ws", 1) + f"/ws?clientId={watcher}"
        self._emit = emit
        self._unresolved = unresolved
        self._has_active = has_active
        self._busy_poll_s = busy_poll_s
        self._idle_poll_s = idle_poll_s
        self._http_timeout_s = http_timeout_s
        self._open_timeout_s = open_timeout_s
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._ping_interval_s = ping_interval_s
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._connect_failing = False
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
        attempt = 0
        while True:
            attempt += 1
            yield self._backoff(attempt)

    def _retry(self, exc: Exception) -> Exception | None:
        """Reconnect after any failure but a URL that can never work; log an outage once."""
        if isinstance(exc, InvalidURI):
            return exc
        level = logging.DEBUG if self._connect_failing else logging.WARNING
        self._connect_failing = True
        log.log(
            level,
            "comfyui %s: cannot connect to %s (%s); retrying",
            self.name,
            self._url,
            f"{type(exc).__name__}: {exc}".rstrip(": "),
        )
        return None

    async def _watch(self) -> None:
        self._emit(SourceStatus(self.source_name, False, "connecting"))
        quick_closes = 0
        try:
            async for ws in connect(
                self._ws_url,
                max_size=None,
                open_timeout=self._open_timeout_s,
                ping_interval=self._ping_interval_s,
                ping_timeout=self._ping_interval_s,
                process_exception=self._retry,
                reconnect_delays=self._delays,
            ):
                self._connect_failing = False
                opened = time.monotonic()
                log.info("comfyui %s: connected to %s", self.name, self._url)
                self._emit(SourceStatus(self.source_name, True))
                self._connected.set()
                self._wake.set()
                detail = await self._read(ws)
                self._connected.clear()
                log.warning("comfyui %s: websocket closed (%s); reconnecting", self.name, detail)
                self._emit(SourceStatus(self.source_name, False, detail))
                if time.monotonic() - opened < _STABLE_S:
                    quick_closes += 1
                    await asyncio.sleep(self._backoff(quick_closes))
                else:
                    quick_closes = 0
        except InvalidURI as exc:
            log.error("comfyui %s: %s is not a usable URL: %s", self.name, self._url, exc)
            self._emit(SourceStatus(self.source_name, False, f"invalid URL {self._url}"))

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
        """Read ``/queue``, then ``/history`` of every prompt the tracker cannot place.

        A failed ``/queue`` skips the history reads (their answers are only meaningful after
        a snapshot); a failed history read skips only that prompt. Either is retried on the
        next poll, so nothing is lost.
        """
        problems: list[str] = []
        try:
            snapshot = parse_queue(self.name, await self._get("/queue"))
        except ComfyError as exc:
            problems.append(str(exc))
        else:
            self._emit(snapshot)
            for prompt_id in self._unresolved(self.name, time.time()):
                try:
                    body = await self._get(f"/history/{prompt_id}")
                    self._emit(parse_history(self.name, prompt_id, body))
                except ComfyError as exc:
                    problems.append(f"prompt {prompt_id}: {exc}")
        self._report(problems)

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
                    raise ComfyError(f"{method} {path} answered HTTP {response.status}")
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
        except ValueError:
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
