"""The websocket side of ComfyUI's ``PromptServer``: sockets by client id, one ordered outbox.

Same names and routing as ComfyUI v0.8.0 server.py, so that the tower-progress bridge
(``comfyui_bridge``) can be installed on it exactly as on a real server: ``send_sync`` only
enqueues, the one ``publish`` task hands each message to ``send_json`` or ``send_bytes``
(looked up at send time, as the bridge wraps them), a ``None`` sid broadcasts and any other sid
is delivered only if that socket is connected; ``client_id`` and ``last_node_id`` are the
running prompt's owner and node. Order is therefore global; a broadcast awaits each socket in
turn. The registry keeps ComfyUI's duplicate-client-id quirk on purpose: registering a second
socket under an id replaces the first without closing it, and unregistering the first later
removes the second, which then stays open but receives nothing (protocol §1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any

from aiohttp import WSCloseCode, web

_LOG = logging.getLogger(__name__)
JsonDict = dict[str, Any]


def encode(event: str, data: JsonDict) -> str:
    return json.dumps({"type": event, "data": data})


class SocketHub:
    """Sockets by sid, their negotiated feature flags, the running prompt's owner, the outbox."""

    def __init__(self) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self._flags: dict[str, JsonDict] = {}
        self._open: set[web.WebSocketResponse] = set()
        self._outbox: asyncio.Queue[tuple[str | int, Any, str | None]] = asyncio.Queue()

    def register(self, sid: str, ws: web.WebSocketResponse) -> None:
        self.sockets[sid] = ws
        self._flags[sid] = {}
        self._open.add(ws)

    def unregister(self, sid: str, ws: web.WebSocketResponse) -> None:
        """``ws`` closed: forget ``sid``, whichever socket holds it now (see module docstring)."""
        self.sockets.pop(sid, None)
        self._flags.pop(sid, None)
        self._open.discard(ws)

    def set_flags(self, sid: str, flags: JsonDict) -> bool:
        """Store a client's feature flags; False when ``sid`` is no longer registered."""
        if sid not in self._flags:
            return False
        self._flags[sid] = flags
        return True

    def supports_preview_metadata(self, sid: str | None) -> bool:
        return sid is not None and bool(
            self._flags.get(sid, {}).get("supports_preview_metadata", False)
        )

    def send_sync(self, event: str | int, data: Any, sid: str | None = None) -> None:
        """Queue a message for ``sid`` (None: every socket registered when it is sent).

        A str ``event`` is a JSON message with ``data`` its dict; an int is a binary event type
        with ``data`` the payload after the 4-byte type.
        """
        self._outbox.put_nowait((event, data, sid))

    async def send_json(self, event: str, data: JsonDict, sid: str | None = None) -> None:
        await self._deliver(encode(event, data), sid)

    async def send_bytes(self, event: int, data: bytes, sid: str | None = None) -> None:
        await self._deliver(struct.pack(">I", event) + data, sid)

    async def send_now(self, sid: str, event: str, data: JsonDict) -> None:
        """Send straight to ``sid``, bypassing the queue (handshake frames and flag replies)."""
        ws = self.sockets.get(sid)
        if ws is not None:
            await _send(sid, ws, encode(event, data))

    async def publish(self) -> None:
        """The publish loop: runs until cancelled."""
        while True:
            event, data, sid = await self._outbox.get()
            if isinstance(event, int):
                await self.send_bytes(event, data, sid)
            else:
                await self.send_json(event, data, sid)
            self._outbox.task_done()

    async def flush(self) -> None:
        """Wait until every message queued so far has been handed to its sockets."""
        await self._outbox.join()

    async def close_all(self) -> None:
        """Close every open socket, registered or orphaned, with 1001 (going away)."""
        sockets = list(self._open)
        self.sockets.clear()
        self._flags.clear()
        self._open.clear()
        for ws in sockets:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def _deliver(self, payload: str | bytes, sid: str | None) -> None:
        if sid is None:
            for target, ws in list(self.sockets.items()):
                await _send(target, ws, payload)
        else:
            target_ws = self.sockets.get(sid)
            if target_ws is not None:
                await _send(sid, target_ws, payload)


async def _send(sid: str, ws: web.WebSocketResponse, payload: str | bytes) -> None:
    try:
        if isinstance(payload, bytes):
            await ws.send_bytes(payload)
        else:
            await ws.send_str(payload)
    except (ConnectionError, RuntimeError) as exc:
        _LOG.warning("send to websocket client %s failed: %s", sid, exc)
