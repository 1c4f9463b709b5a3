"""The websocket side of ComfyUI's ``PromptServer``: sockets by client id, one ordered outbox.

Every message goes through one queue and one publish task, as ``send_sync`` ->
``publish_loop`` -> ``send`` does, so the order is global; a broadcast awaits each socket in
turn. The registry keeps ComfyUI's duplicate-client-id quirk on purpose: registering a second
socket under an id replaces the first without closing it, and unregistering the first later
removes the second, which then stays open but receives nothing (protocol §1).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import WSCloseCode, web

_LOG = logging.getLogger(__name__)
JsonDict = dict[str, Any]


def encode(event: str, data: JsonDict) -> str:
    return json.dumps({"type": event, "data": data})


class SocketHub:
    """Sockets by sid, their negotiated feature flags, and the ordered publish queue."""

    def __init__(self) -> None:
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._flags: dict[str, JsonDict] = {}
        self._open: set[web.WebSocketResponse] = set()
        self._outbox: asyncio.Queue[tuple[str | None, str | bytes]] = asyncio.Queue()

    def register(self, sid: str, ws: web.WebSocketResponse) -> None:
        self._sockets[sid] = ws
        self._flags[sid] = {}
        self._open.add(ws)

    def unregister(self, sid: str, ws: web.WebSocketResponse) -> None:
        """``ws`` closed: forget ``sid``, whichever socket holds it now (see module docstring)."""
        self._sockets.pop(sid, None)
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

    def send(self, event: str, data: JsonDict, sid: str | None) -> None:
        """Queue a JSON message for ``sid`` (None: every socket registered when it is sent)."""
        self._outbox.put_nowait((sid, encode(event, data)))

    def send_bytes(self, frame: bytes, sid: str | None) -> None:
        self._outbox.put_nowait((sid, frame))

    async def send_now(self, sid: str, event: str, data: JsonDict) -> None:
        """Send straight to ``sid``, bypassing the queue (handshake frames and flag replies)."""
        ws = self._sockets.get(sid)
        if ws is not None:
            await _deliver(sid, ws, encode(event, data))

    async def publish(self) -> None:
        """The publish loop: runs until cancelled."""
        while True:
            sid, payload = await self._outbox.get()
            if sid is None:
                for target, ws in list(self._sockets.items()):
                    await _deliver(target, ws, payload)
            else:
                target_ws = self._sockets.get(sid)
                if target_ws is not None:
                    await _deliver(sid, target_ws, payload)
            self._outbox.task_done()

    async def flush(self) -> None:
        """Wait until every message queued so far has been handed to its sockets."""
        await self._outbox.join()

    async def close_all(self) -> None:
        """Close every open socket, registered or orphaned, with 1001 (going away)."""
        sockets = list(self._open)
        self._sockets.clear()
        self._flags.clear()
        self._open.clear()
        for ws in sockets:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


async def _deliver(sid: str, ws: web.WebSocketResponse, payload: str | bytes) -> None:
    try:
        if isinstance(payload, bytes):
            await ws.send_bytes(payload)
        else:
            await ws.send_str(payload)
    except (ConnectionError, RuntimeError) as exc:
        _LOG.warning("send to websocket client %s failed: %s", sid, exc)
