"""The real ComfyUI recordings in tests/fixtures/comfyui (format: its README.md), and a small
harness to serve the simulator on 127.0.0.1 and talk to it over real websockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect

from tower_progress.simulate.server import FakeComfyUI

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui"
# The order the scenarios were recorded in, one after another in one server process.
RECORDED_ORDER = (
    "idle_http_and_handshake",
    "success_single",
    "success_anim16",
    "rerun_cached",
    "error_node",
    "interrupt_sampling",
    "queue_three",
    "no_client_id",
    "validation_error",
    "reconnect_midrun",
)


@dataclass(frozen=True)
class Line:
    """One recorded line; ``index`` is its position in the file (arrival order)."""

    index: int
    raw: dict[str, Any]

    @property
    def dir(self) -> str:
        return str(self.raw["dir"])

    @property
    def kind(self) -> str:
        return str(self.raw["kind"])

    @property
    def client(self) -> str | None:
        return self.raw.get("client")

    @property
    def msg(self) -> Any:
        return self.raw.get("msg")

    @property
    def is_text_frame(self) -> bool:
        return self.dir == "ws" and self.kind == "text"

    def frame_type(self) -> str | None:
        return str(self.msg["type"]) if self.is_text_frame else None


@dataclass(frozen=True)
class Recording:
    name: str
    lines: tuple[Line, ...]

    @classmethod
    def load(cls, name: str) -> Recording:
        text = (FIXTURES / f"{name}.jsonl").read_text()
        lines = tuple(Line(i, json.loads(raw)) for i, raw in enumerate(text.splitlines()))
        return cls(name, lines)

    @cached_property
    def expected(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((FIXTURES / f"{self.name}.expected.json").read_text())
        return result

    @property
    def header(self) -> dict[str, Any]:
        header: dict[str, Any] = self.lines[0].msg
        return header

    def http(self, method: str | None = None, path: str | None = None) -> list[Line]:
        return [
            line
            for line in self.lines
            if line.dir == "http"
            and (method is None or line.raw["method"] == method)
            and (path is None or line.raw["path"] == path)
        ]

    def accepted_prompts(self) -> list[Line]:
        """The ``POST /prompt`` lines answered 200, in order."""
        return [line for line in self.http("POST", "/prompt") if line.raw["status"] == 200]

    def final_body(self, path: str) -> Any:
        """The last recorded non-empty answer to ``GET path``."""
        bodies = [line.raw["body"] for line in self.http("GET", path) if line.raw["body"]]
        return bodies[-1] if bodies else None

    def segments(self, role: str) -> list[list[Line]]:
        """What ``role`` received, one list per connection (a reconnect starts a new one)."""
        segments: list[list[Line]] = []
        for line in self.lines:
            if line.client != role:
                continue
            if line.dir == "meta" and line.kind == "open":
                segments.append([])
            elif line.dir == "ws":
                segments[-1].append(line)
        return segments


@contextlib.asynccontextmanager
async def serve(sim: FakeComfyUI) -> AsyncIterator[str]:
    """Serve ``sim`` on a free 127.0.0.1 port; yields its base URL, closes everything after."""
    runner = web.AppRunner(sim.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await sim.close()
        await runner.cleanup()


@dataclass
class Frame:
    """A received websocket frame: a JSON text message, or a binary frame's event type."""

    message: dict[str, Any] | None = None
    event: int | None = None
    metadata: dict[str, Any] | None = None
    size: int = 0

    @classmethod
    def parse(cls, data: str | bytes) -> Frame:
        if isinstance(data, str):
            message: dict[str, Any] = json.loads(data)
            return cls(message=message, size=len(data))
        event = int.from_bytes(data[:4], "big")
        metadata = None
        if event == 4:
            length = int.from_bytes(data[4:8], "big")
            metadata = json.loads(data[8 : 8 + length])
        return cls(event=event, metadata=metadata, size=len(data))

    @classmethod
    def recorded(cls, line: Line) -> Frame:
        if line.kind == "text":
            return cls(message=line.msg)
        return cls(event=line.msg["event"], metadata=line.msg.get("metadata"))

    @property
    def type(self) -> str | None:
        return str(self.message["type"]) if self.message is not None else None

    @property
    def data(self) -> dict[str, Any]:
        assert self.message is not None
        data: dict[str, Any] = self.message["data"]
        return data


@dataclass
class Client:
    """One websocket connection; everything it reads is kept in ``frames``, in order."""

    ws: ClientConnection
    frames: list[Frame] = field(default_factory=list)

    @classmethod
    async def connect(cls, base: str, client_id: str | None) -> Client:
        url = base.replace("http://", "ws://") + "/ws"
        if client_id is not None:
            url += f"?clientId={client_id}"
        return cls(await connect(url, max_size=None, max_queue=None))

    async def read(self) -> Frame:
        frame = Frame.parse(await self.ws.recv())
        self.frames.append(frame)
        return frame

    async def read_until(self, accept: Callable[[Frame], bool]) -> Frame:
        while not accept(frame := await self.read()):
            pass
        return frame

    async def drain(self) -> list[Frame]:
        """Read every frame the server wrote before it answered our ping, then stop.

        Frames before the pong are already buffered when the pong arrives, so a receive
        started then completes within one loop step if, and only if, one is left.
        """
        pong = asyncio.ensure_future(await self.ws.ping())
        while True:
            receive = asyncio.ensure_future(self.ws.recv())
            await asyncio.wait({receive, pong}, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                await asyncio.sleep(0)
            if receive.done():
                self.frames.append(Frame.parse(receive.result()))
                continue
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receive
            return self.frames

    async def close(self) -> None:
        await self.ws.close()
