"""Websocket fan-out of tracker events to browsers (DESIGN §6).

Every event is serialized once; each client gets the same bytes behind its own
``{"seq":N,`` prefix. ``publish`` only serializes and appends to a batch; a flush, at most every
``batch_interval`` seconds (at once when the last one is older; the window shrinks in
proportion below ``_FULL_WINDOW_CLIENTS`` clients, where batching saves little and latency
matters most), hands the batch to every
client and writes each client's frames in a single ``transport.write``. aiohttp's writer costs a
system call per frame, which at hundreds of clients is the whole CPU budget; a server frame
(RFC 6455 §5.2) is a 2-10 byte header plus the payload, and with compression off aiohttp's
writer keeps no per-message state, so the frames are built here. Control frames (ping, pong,
close) still go through aiohttp; every write is a whole frame, so they interleave safely.

A client whose socket buffer passes ``max_buffer`` bytes is *blocked*: nothing more is written
and its messages wait in its queue, keyed for coalescing: a newer update of a job (or of the
resources, or of a source) replaces the pending older one in place, so a client that falls
behind receives the latest state of everything rather than a backlog. One task waits for the
buffer to drain. Blocked longer than ``send_timeout``, or with more than ``max_queue`` messages
pending, the client is disconnected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from tower_progress.core.model import (
    Event,
    JobChanged,
    JobRemoved,
    JsonDict,
    Milestone,
    ResourcesChanged,
    SourceChanged,
)
from tower_progress.web.ports import StateView, public_sources

_LOG = logging.getLogger(__name__)

_TEXT_FIN = 0x81
_LEN16 = struct.Struct("!BBH").pack
_LEN64 = struct.Struct("!BBQ").pack
_PONG = b'"type":"pong"}'
_SHUTDOWN_REASON = b"server shutting down"


# Clients from which the full batch window applies; fewer get a proportionally shorter one.
_FULL_WINDOW_CLIENTS = 100


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class HubStats:
    """Counters since start, for ``/metrics``."""

    clients: int
    messages_sent: int
    messages_coalesced: int
    clients_dropped: int


class _Message:
    """One server message, serialized once for every client.

    ``body`` is the JSON object without its opening brace. ``key`` is what it coalesces on: a
    pending message with the same key is replaced; a message that never coalesces gets a key of
    its own. ``supersedes`` names a pending key that this message makes pointless (a removed job's
    last update).
    """

    __slots__ = ("body", "job_id", "key", "supersedes")

    def __init__(
        self,
        body: bytes,
        *,
        key: Hashable | None = None,
        job_id: str | None = None,
        supersedes: Hashable | None = None,
    ) -> None:
        self.body = body
        self.key: Hashable = object() if key is None else key
        self.job_id = job_id
        self.supersedes = supersedes


class _Client:
    __slots__ = (
        "drainer",
        "dropped",
        "jobs",
        "peer",
        "queue",
        "room",
        "seq",
        "transport",
        "writer",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        writer: AbstractStreamWriter,
        peer: str,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.writer = writer
        self.peer = peer
        self.queue: dict[Hashable, _Message] = {}
        self.seq = 0
        self.jobs: frozenset[str] | None = None
        self.drainer: asyncio.Task[None] | None = None
        self.dropped = False
        self.room = asyncio.Event()


class Hub:
    """Connected websocket clients; ``publish`` fans tracker events out to them.

    ``handle`` is the aiohttp handler for ``GET /ws`` (access checks happen before it, in the
    app). ``publish`` is synchronous and cheap; ``batch_interval`` bounds how often the clients
    are written to, trading at most that much latency for one write per client per batch.
    """

    def __init__(
        self,
        state: StateView,
        *,
        max_queue: int = 256,
        send_timeout: float = 10.0,
        max_buffer: int = 1 << 20,
        max_frame: int = 64 * 1024,
        heartbeat: float | None = 30.0,
        close_timeout: float = 2.0,
        batch_interval: float = 0.02,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self._state = state
        self._max_queue = max_queue
        self._send_timeout = send_timeout
        self._max_buffer = max_buffer
        self._max_frame = max_frame
        self._heartbeat = heartbeat
        self._close_timeout = close_timeout
        self._batch_interval = batch_interval
        self._clock = clock
        self._clients: dict[_Client, None] = {}
        self._batch: list[_Message] = []
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush = -math.inf
        self._closing = False
        self._sent = 0
        self._coalesced = 0
        self._dropped = 0

    def stats(self) -> HubStats:
        return HubStats(
            clients=len(self._clients),
            messages_sent=self._sent,
            messages_coalesced=self._coalesced,
            clients_dropped=self._dropped,
        )

    # --- publishing ---------------------------------------------------------------------------

    def publish(self, events: Iterable[Event]) -> None:
        """Queue the events for every client; ``JobFinished`` is not a client message.

        Only serialization happens here; the fan-out to clients runs in the next flush.
        """
        if not self._clients:
            return
        batch = self._batch
        for event in events:
            message = self._message(event)
            if message is not None:
                batch.append(message)
        if batch:
            self._schedule_flush()

    def _message(self, event: Event) -> _Message | None:
        match event:
            case JobChanged(job=job):
                job_id = job.get("id")
                if not isinstance(job_id, str):
                    _LOG.error("job update without a string id dropped: id=%r", job_id)
                    return None
                return _encode({"type": "job", "job": job}, key=("job", job_id), job_id=job_id)
            case JobRemoved(id=job_id):
                return _encode(
                    {"type": "job_removed", "id": job_id},
                    job_id=job_id,
                    supersedes=("job", job_id),
                )
            case Milestone(id=job_id, percent=percent, state=state):
                return _encode(
                    {"type": "milestone", "id": job_id, "percent": percent, "state": state},
                    job_id=job_id,
                )
            case ResourcesChanged(resources=resources):
                return _encode({"type": "resources", **resources}, key="resources")
            case SourceChanged(name=name, up=up, detail=detail):
                since = public_sources(self._state.sources()).get(name, {}).get("since")
                payload = {
                    "type": "source",
                    "name": name,
                    "up": up,
                    "detail": detail,
                    "since": since,
                }
                return _encode(payload, key=("source", name))
        return None

    # --- sending ------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        loop = asyncio.get_running_loop()
        window = self._batch_interval * min(1.0, len(self._clients) / _FULL_WINDOW_CLIENTS)
        wait = self._last_flush + window - loop.time()
        if wait > 0:
            self._flush_handle = loop.call_later(wait, self._flush)
        else:
            self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand the batch to every client and write what each one can take now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._last_flush = asyncio.get_running_loop().time()
        batch = self._batch
        self._batch = []
        for client in self._clients:
            if client.dropped:
                continue
            if client.queue or client.drainer is not None:
                self._enqueue(client, batch)
                if client.drainer is None and not client.dropped:
                    pending = client.queue
                    client.queue = {}
                    client.room.set()
                    self._write(client, pending.values())
            elif batch:
                jobs = client.jobs
                if jobs is None:
                    self._write(client, batch)
                else:
                    self._write(client, [m for m in batch if m.job_id is None or m.job_id in jobs])

    def _enqueue(self, client: _Client, batch: list[_Message]) -> None:
        """Add to a client's queue, replacing pending messages the new ones make obsolete."""
        queue = client.queue
        jobs = client.jobs
        for m in batch:
            if jobs is not None and m.job_id is not None and m.job_id not in jobs:
                continue
            if m.supersedes is not None and queue.pop(m.supersedes, None) is not None:
                self._coalesced += 1
            if m.key in queue:
                self._coalesced += 1
            elif client.drainer is not None and len(queue) >= self._max_queue:
                self._drop(client, f"not reading: {self._max_queue} messages pending")
                return
            queue[m.key] = m

    def _write(self, client: _Client, messages: Iterable[_Message]) -> None:
        transport = client.transport
        if client.ws.closed or transport.is_closing():
            return
        seq = client.seq
        parts: list[bytes] = []
        append = parts.append
        for m in messages:
            seq += 1
            prefix = b'{"seq":%d,' % seq
            size = len(prefix) + len(m.body)
            if size < 126:
                append(bytes((_TEXT_FIN, size)) + prefix)
            elif size < 65536:
                append(_LEN16(_TEXT_FIN, 126, size) + prefix)
            else:
                append(_LEN64(_TEXT_FIN, 127, size) + prefix)
            append(m.body)
        if not parts:
            return
        self._sent += seq - client.seq
        client.seq = seq
        transport.write(b"".join(parts))
        if transport.get_write_buffer_size() > self._max_buffer:
            _LOG.debug("websocket client %s blocked at seq %d", client.peer, seq)
            client.drainer = asyncio.create_task(self._await_drain(client))

    async def _await_drain(self, client: _Client) -> None:
        try:
            async with asyncio.timeout(self._send_timeout):
                await client.writer.drain()
        except TimeoutError:
            self._drop(client, f"not reading: send blocked for {self._send_timeout:g} s")
            return
        except ConnectionError:
            return
        finally:
            client.drainer = None
        _LOG.debug("websocket client %s unblocked", client.peer)
        if client.queue:
            self._schedule_flush()

    def _drop(self, client: _Client, reason: str) -> None:
        if client.dropped:
            return
        client.dropped = True
        client.queue.clear()
        client.room.set()
        self._dropped += 1
        _LOG.warning("websocket client %s disconnected: %s", client.peer, reason)
        client.transport.abort()

    # --- connections --------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """Serve one websocket: snapshot first, then events, answering the client's frames."""
        ws = web.WebSocketResponse(
            heartbeat=self._heartbeat,
            max_msg_size=self._max_frame,
            compress=False,
            timeout=self._close_timeout,
        )
        writer = await ws.prepare(request)
        transport = request.transport
        if self._closing or transport is None:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=_SHUTDOWN_REASON)
            return ws
        transport.set_write_buffer_limits(high=self._max_buffer)
        peer = _peer(transport)
        client = _Client(ws, transport, writer, peer)
        if self._batch:
            self._flush()
        if not self._enqueue_snapshot(client):
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"snapshot failed")
            return ws
        self._clients[client] = None
        self._schedule_flush()
        _LOG.debug("websocket client %s connected (%d clients)", peer, len(self._clients))
        try:
            await self._read(client)
        finally:
            del self._clients[client]
            if client.drainer is not None:
                client.drainer.cancel()
                await asyncio.wait([client.drainer])
            _LOG.debug("websocket client %s left after seq %d", peer, client.seq)
        return ws

    def _enqueue_snapshot(self, client: _Client) -> bool:
        """Queue the snapshot as the client's first message; the queue is its only holder."""
        snapshot = _encode(
            {
                "type": "snapshot",
                "jobs": self._state.jobs(),
                "resources": self._state.resources(),
                "sources": public_sources(self._state.sources()),
                "server_time": _iso(self._clock()),
            }
        )
        if snapshot is None:
            return False
        client.queue[snapshot.key] = snapshot
        return True

    async def _read(self, client: _Client) -> None:
        async for frame in client.ws:
            if frame.type is WSMsgType.TEXT:
                reply = self._answer(client, frame.data)
            elif frame.type is WSMsgType.BINARY:
                reply = _error("binary frames are not accepted: send JSON text")
            else:
                _LOG.info("websocket client %s closed: %s", client.peer, client.ws.exception())
                return
            if reply is not None:
                await self._reply(client, reply)

    async def _reply(self, client: _Client, reply: _Message) -> None:
        """Queue an answer, waiting while the queue is full: a client that floods us with
        frames is slowed down to the pace at which it reads the answers."""
        while len(client.queue) >= self._max_queue and not client.dropped:
            client.room.clear()
            await client.room.wait()
        if client.dropped:
            return
        client.queue[reply.key] = reply
        self._schedule_flush()

    def _answer(self, client: _Client, text: str) -> _Message | None:
        try:
            frame: Any = json.loads(text)
        except (ValueError, RecursionError):
            return _error("frame is not valid JSON")
        if not isinstance(frame, dict):
            return _error("frame must be a JSON object")
        kind = frame.get("type")
        if kind == "ping":
            return _Message(_PONG)
        if kind == "subscribe":
            jobs = frame.get("jobs")
            if jobs is None:
                client.jobs = None
            elif isinstance(jobs, list) and all(isinstance(j, str) for j in jobs):
                client.jobs = frozenset(jobs)
            else:
                return _error('subscribe needs "jobs": a list of job ids, or null for all jobs')
            return None
        if isinstance(kind, str) and len(kind) <= 40:
            return _error(f"unknown message type {kind!r}: expected ping or subscribe")
        return _error('frame needs a "type": ping or subscribe')

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY) -> None:
        """Send what is pending, then close every client; new connections are refused."""
        self._closing = True
        self._flush()
        closing = []
        for client in list(self._clients):
            client.room.set()
            if client.drainer is not None:
                self._drop(client, "server shutting down while the client was not reading")
            elif not client.dropped:
                closing.append(client.ws.close(code=code, message=_SHUTDOWN_REASON, drain=False))
        await asyncio.gather(*closing, return_exceptions=True)


def _encode(
    payload: JsonDict,
    *,
    key: Hashable | None = None,
    job_id: str | None = None,
    supersedes: Hashable | None = None,
) -> _Message | None:
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        body = text[1:].encode()
    except (TypeError, ValueError) as exc:
        _LOG.error("%s message for job %s not sent: %s", payload["type"], job_id or "-", exc)
        return None
    return _Message(body, key=key, job_id=job_id, supersedes=supersedes)


def _error(message: str) -> _Message:
    return _Message(b'"type":"error","message":' + json.dumps(message).encode() + b"}")


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
