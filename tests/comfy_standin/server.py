"""``PromptServer`` as in ComfyUI v0.8.0 server.py, reduced to what the bridge touches.

Same attribute and method names, same routing: ``send_sync`` only enqueues (thread-safe), the
one ``publish_loop`` task sends in order, a ``None`` sid broadcasts, any other sid is delivered
only if that socket is connected. The websocket handler keeps v0.8.0's handshake, reconnect
frame, feature-flag negotiation and its duplicate-clientId behaviour. Differences, all outside
the bridge's reach: time and anonymous socket ids come from injected callables, previews are
opaque bytes instead of PIL images, and prompts are not validated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import aiohttp
from aiohttp import web

from .execution import PromptQueue
from .protocol import SERVER_FEATURES, BinaryEventTypes

log = logging.getLogger(__name__)

OUTPUT_NODE_TYPES = frozenset({"SaveImage", "PreviewImage", "SaveAnimatedWEBP", "SaveWEBM"})


async def send_socket_catch_exception(function: Callable[[Any], Any], message: Any) -> None:
    """Send, logging (not raising) the errors of a socket that went away."""
    try:
        await function(message)
    except (aiohttp.ClientError, ConnectionResetError, BrokenPipeError, ConnectionError) as err:
        log.warning("send error: %s", err)


class PromptServer:
    """The HTTP and websocket server; ``PromptServer.instance`` is the live one."""

    instance: ClassVar[PromptServer]

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        clock: Callable[[], int],
        new_sid: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        PromptServer.instance = self
        self.loop = loop
        self.clock = clock
        self.new_sid = new_sid
        self.messages: asyncio.Queue[tuple[Any, Any, Any]] = asyncio.Queue()
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        self.client_id: Any = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.number = 0
        self.prompt_queue = PromptQueue(self)
        self.app = web.Application()
        self.app.router.add_get("/ws", self.websocket_handler)
        self.app.router.add_post("/prompt", self.post_prompt)
        self.app.router.add_get("/queue", self.get_queue)
        self.app.router.add_get("/history", self.get_history)
        self.app.router.add_get("/history/{prompt_id}", self.get_history_prompt_id)

    async def websocket_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)
        else:
            sid = self.new_sid()
        self.sockets[sid] = ws
        self.sockets_metadata[sid] = {"feature_flags": {}}
        try:
            await self.send("status", {"status": self.get_queue_info(), "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                await self.send("executing", {"node": self.last_node_id}, sid)
            first_message = True
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except json.JSONDecodeError:
                    log.warning("invalid JSON received from client %s", sid)
                    continue
                if first_message and isinstance(data, dict) and data.get("type") == "feature_flags":
                    self.sockets_metadata[sid]["feature_flags"] = data.get("data", {})
                    await self.send("feature_flags", dict(SERVER_FEATURES), sid)
                first_message = False
        finally:
            self.sockets.pop(sid, None)
            self.sockets_metadata.pop(sid, None)
        return ws

    async def post_prompt(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if "number" in json_data:
            number: float = float(json_data["number"])
        else:
            number = self.number
            if json_data.get("front"):
                number = -number
            self.number += 1
        if "prompt" not in json_data:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        extra_data = json_data.get("extra_data", {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        extra_data["create_time"] = self.clock()
        outputs = [node for node, spec in prompt.items() if spec["class_type"] in OUTPUT_NODE_TYPES]
        self.prompt_queue.put((number, prompt_id, prompt, extra_data, outputs))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.prompt_queue.get_current_queue_volatile()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = request.rel_url.query.get("max_items")
        return web.json_response(
            self.prompt_queue.get_history(max_items=None if max_items is None else int(max_items))
        )

    async def get_history_prompt_id(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        return web.json_response(self.prompt_queue.get_history(prompt_id=prompt_id))

    def get_queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.prompt_queue.get_tasks_remaining()}}

    async def send(self, event: Any, data: Any, sid: Any = None) -> None:
        if event == BinaryEventTypes.UNENCODED_PREVIEW_IMAGE:
            await self.send_image(data, sid=sid)
        elif event == BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA:
            preview_image, metadata = data
            await self.send_image_with_metadata(preview_image, metadata, sid=sid)
        elif isinstance(data, bytes | bytearray):
            await self.send_bytes(event, data, sid)
        else:
            await self.send_json(event, data, sid)

    def encode_bytes(self, event: int, data: bytes | bytearray) -> bytearray:
        if not isinstance(event, int):
            raise RuntimeError(f"Binary event types must be integers, got {event}")
        message = bytearray(struct.pack(">I", event))
        message.extend(data)
        return message

    async def send_image(self, image_data: tuple[str, bytes, int], sid: Any = None) -> None:
        image_type, image, _max_size = image_data
        type_num = 2 if image_type == "PNG" else 1
        preview_bytes = struct.pack(">I", type_num) + image
        await self.send_bytes(BinaryEventTypes.PREVIEW_IMAGE, preview_bytes, sid=sid)

    async def send_image_with_metadata(
        self, image_data: tuple[str, bytes, int], metadata: dict[str, Any], sid: Any = None
    ) -> None:
        image_type, image, _max_size = image_data
        metadata["image_type"] = "image/png" if image_type == "PNG" else "image/jpeg"
        metadata_json = json.dumps(metadata).encode("utf-8")
        combined = bytearray(struct.pack(">I", len(metadata_json)))
        combined.extend(metadata_json)
        combined.extend(image)
        await self.send_bytes(BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA, combined, sid=sid)

    async def send_bytes(self, event: int, data: bytes | bytearray, sid: Any = None) -> None:
        message = self.encode_bytes(event, data)
        if sid is None:
            for ws in list(self.sockets.values()):
                await send_socket_catch_exception(ws.send_bytes, message)
        elif sid in self.sockets:
            await send_socket_catch_exception(self.sockets[sid].send_bytes, message)

    async def send_json(self, event: Any, data: Any, sid: Any = None) -> None:
        message = {"type": event, "data": data}
        if sid is None:
            for ws in list(self.sockets.values()):
                await send_socket_catch_exception(ws.send_json, message)
        elif sid in self.sockets:
            await send_socket_catch_exception(self.sockets[sid].send_json, message)

    def send_sync(self, event: Any, data: Any, sid: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.messages.put_nowait, (event, data, sid))

    def queue_updated(self) -> None:
        self.send_sync("status", {"status": self.get_queue_info()})

    async def publish_loop(self) -> None:
        while True:
            msg = await self.messages.get()
            await self.send(*msg)

    def send_progress_text(self, text: bytes | str, node_id: str, sid: Any = None) -> None:
        if isinstance(text, str):
            text = text.encode("utf-8")
        node_id_bytes = str(node_id).encode("utf-8")
        message = struct.pack(">I", len(node_id_bytes)) + node_id_bytes + text
        self.send_sync(BinaryEventTypes.TEXT, message, sid)
