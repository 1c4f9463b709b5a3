"""ComfySource against bad input, on real sockets: a scripted ComfyUI look-alike on 127.0.0.1.

Every malformed frame, body and failure must leave a log line that says which instance (and
prompt, where one is known) and what was wrong, must emit nothing, and must leave the job as
it was: a running prompt stays running at its step, a prompt whose history cannot be read
stays running until a readable answer comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from comfyui_watch import WATCHER_ID, Watch, running

from tower_progress.core.model import (
    ComfyMessage,
    HistoryEntry,
    QueueItem,
    QueueSnapshot,
    SourceStatus,
)
from tower_progress.simulate import workflows
from tower_progress.sources.comfyui import ComfyError, parse_queue

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]
SOURCE_LOG = "tower_progress.sources"
NAME = "box"
P = "0b8a6a3e-2f7e-4a7b-9d35-6c1f0e2b9a11"
Q = "7d4c1b2a-9e8f-4d6c-8b5a-3f2e1d0c9b88"
HANDSHAKE = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}


def frame(kind: str, **data: Any) -> str:
    return json.dumps({"type": kind, "data": data})


def progress(value: int) -> str:
    return frame("progress", value=value, max=20, prompt_id=P, node="3")


START = (
    frame("execution_start", prompt_id=P, timestamp=1_795_425_730_833),
    frame("execution_cached", nodes=[], prompt_id=P, timestamp=1_795_425_730_834),
    frame("executing", node="3", display_node="3", prompt_id=P),
    progress(5),
)


def item(number: int, prompt_id: str, *extra: Any) -> list[Any]:
    extra_data = {"client_id": WATCHER_ID, "create_time": 1_795_425_730_832}
    return [number, prompt_id, workflows.still(steps=20), extra_data, ["9"], *extra]


def queue_body(running: list[Any], pending: list[Any] | None = None) -> dict[str, Any]:
    return {"queue_running": running, "queue_pending": pending or []}


def history_body(prompt_id: str) -> dict[str, Any]:
    """What ComfyUI v0.8.0 answers for a prompt that succeeded (success_single.jsonl)."""
    return {
        prompt_id: {
            "prompt": item(7, prompt_id)[:5],
            "outputs": {"9": {"images": [{"filename": "still_00001_.png", "type": "output"}]}},
            "status": {
                "status_str": "success",
                "completed": True,
                "messages": [
                    ["execution_start", {"prompt_id": prompt_id, "timestamp": 1_795_425_730_833}],
                    ["execution_success", {"prompt_id": prompt_id, "timestamp": 1_795_425_734_762}],
                ],
            },
            "meta": {},
        }
    }


def system_stats(version: str) -> dict[str, Any]:
    """The parts of a ``GET /system_stats`` body the source reads (protocol §6)."""
    return {"system": {"os": "linux", "comfyui_version": version}, "devices": []}


def finished_jobs(*prompt_ids: str, has_more: bool = False) -> dict[str, Any]:
    """A ``GET /api/jobs?status=completed,failed`` page listing these prompts as completed."""
    jobs = [{"id": p, "status": "completed", "priority": 7, "outputs_count": 1} for p in prompt_ids]
    pagination = {"offset": 0, "limit": 200, "total": len(jobs), "has_more": has_more}
    return {"jobs": jobs, "pagination": pagination}


# --- scripted answers ----------------------------------------------------------------------


def body(value: Any) -> Answer:
    async def answer(_request: web.Request) -> web.StreamResponse:
        return web.json_response(value)

    return answer


def status(code: int) -> Answer:
    async def answer(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, text="Internal Server Error")

    return answer


def raw(data: bytes) -> Answer:
    async def answer(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=data, content_type="application/json")

    return answer


def reset() -> Answer:
    """Headers and half a body, then the connection is torn down."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "4096"})
        response.content_type = "application/json"
        await response.prepare(request)
        await response.write(b'{"queue_running": [[7, "')
        assert request.transport is not None
        request.transport.abort()
        return response

    return answer


class Scripted:
    """A ComfyUI look-alike whose websocket frames and HTTP answers each test scripts.

    ``/ws`` answers HTTP 503 while ``refusals`` last (one each), else sends a status handshake,
    then whatever is put in ``frames`` (None tears the connection down without a close frame);
    while ``deaf`` lasts (one each) a socket gets the handshake, then nothing, not even pongs.
    ``/queue``, ``/history/{id}``, ``/system_stats`` and ``/api/jobs`` (by default: ComfyUI
    0.8.0 with no jobs API) give their scripted answers in order, repeating the last;
    ``served`` counts the requests. A ``slow`` answer waits for teardown, far past the
    client's timeout.
    """

    def __init__(self) -> None:
        self.frames: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.refusals = 0
        self.deaf = 0
        self.queue: list[Answer] = [body(queue_body([]))]
        self.history: dict[str, list[Answer]] = {}
        self.interrupt: list[Answer] = [raw(b"")]
        self.system_stats: list[Answer] = [body(system_stats("0.8.0"))]
        self.jobs: list[Answer] = [status(404)]
        self.jobs_queries: list[dict[str, str]] = []
        self.served: Counter[str] = Counter()
        self.released = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/ws", self._websocket)
        self.app.router.add_get("/queue", self._queue)
        self.app.router.add_get("/history/{prompt_id}", self._history)
        self.app.router.add_post("/interrupt", self._interrupt)
        self.app.router.add_get("/system_stats", self._system_stats)
        self.app.router.add_get("/api/jobs", self._jobs)

    def slow(self) -> Answer:
        async def answer(_request: web.Request) -> web.StreamResponse:
            await self.released.wait()
            return web.json_response(queue_body([]))

        return answer

    def send(self, *frames: str | bytes | None) -> None:
        for each in frames:
            self.frames.put_nowait(each)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if self.refusals > 0:
            self.refusals -= 1
            return web.Response(status=503, text="Service Unavailable")
        deaf, self.deaf = self.deaf > 0, max(self.deaf - 1, 0)
        ws = web.WebSocketResponse(autoping=not deaf)
        await ws.prepare(request)
        await ws.send_str(json.dumps(HANDSHAKE))
        if deaf:
            await self.released.wait()
            return ws
        forward = asyncio.create_task(self._forward(request, ws))
        try:
            async for _ in ws:
                pass
        finally:
            forward.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forward
        return ws

    async def _forward(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        while True:
            data = await self.frames.get()
            if data is None:
                assert request.transport is not None
                request.transport.abort()
            elif isinstance(data, bytes):
                await ws.send_bytes(data)
            else:
                await ws.send_str(data)

    async def _serve(
        self, key: str, answers: list[Answer], request: web.Request
    ) -> web.StreamResponse:
        index = min(self.served[key], len(answers) - 1)
        self.served[key] += 1
        return await answers[index](request)

    async def _queue(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("/queue", self.queue, request)

    async def _history(self, request: web.Request) -> web.StreamResponse:
        prompt_id = request.match_info["prompt_id"]
        answers = self.history.get(prompt_id, [body({})])
        return await self._serve(f"/history/{prompt_id}", answers, request)

    async def _interrupt(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("/interrupt", self.interrupt, request)

    async def _system_stats(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("/system_stats", self.system_stats, request)

    async def _jobs(self, request: web.Request) -> web.StreamResponse:
        self.jobs_queries.append(dict(request.query))
        return await self._serve("/api/jobs", self.jobs, request)


@dataclass
class Box:
    """A scripted server and a watch of it; ``watching`` runs a source for the block."""

    server: Scripted
    url: str
    watch: Watch

    def watching(self, **knobs: float) -> contextlib.AbstractAsyncContextManager[None]:
        return running(self.watch.source(NAME, self.url, WATCHER_ID, **knobs))


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    server = Scripted()
    runner = web.AppRunner(server.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield Box(server, f"http://127.0.0.1:{runner.addresses[0][1]}", Watch({NAME: WATCHER_ID}))
    finally:
        server.released.set()
        await runner.cleanup()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Callable[[], list[tuple[str, str]]]:
    """The source's log lines so far, as (level, message)."""
    caplog.set_level(logging.DEBUG, logger=SOURCE_LOG)

    def lines() -> list[tuple[str, str]]:
        return [
            (r.levelname, r.getMessage())
            for r in caplog.records
            if r.name.startswith(SOURCE_LOG + ".comfyui")
        ]

    return lines


def cases(table: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Parameters from a table whose rows start with the case's id."""
    return [pytest.param(*row[1:], id=row[0]) for row in table]


def only_warning(lines: list[tuple[str, str]]) -> str:
    warnings = [message for level, message in lines if level == "WARNING"]
    assert len(warnings) == 1, warnings
    return warnings[0]


def running_job(watch: Watch) -> dict[str, Any]:
    job = watch.job(P)
    assert job is not None
    return job


# --- websocket frames ----------------------------------------------------------------------


def binary(event: int, *parts: bytes) -> bytes:
    return struct.pack(">I", event) + b"".join(parts)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF"
METADATA = json.dumps({"node_id": "3", "prompt_id": P, "image_type": "image/jpeg"}).encode()
BAD_FRAMES: list[tuple[str, str | bytes, str, str]] = [
    ("not-json", "not json {", "WARNING", "non-JSON text frame 'not json {' ignored"),
    ("json-list", "[1, 2]", "WARNING", "frame without type/data '[1, 2]' ignored"),
    (
        "no-data",
        '{"type": "progress"}',
        "WARNING",
        """frame without type/data '{"type": "progress"}' ignored""",
    ),
    (
        "type-not-string",
        '{"type": 7, "data": {}}',
        "WARNING",
        """frame without type/data '{"type": 7, "data": {}}' ignored""",
    ),
    (
        "data-not-object",
        '{"type": "status", "data": []}',
        "WARNING",
        """frame without type/data '{"type": "status", "data": []}' ignored""",
    ),
    (
        "custom-node-type",
        frame("crystools.monitor", cpu_utilization=3.5),
        "DEBUG",
        "message type 'crystools.monitor' ignored",
    ),
    (
        "unknown-type-with-prompt",
        frame("execution_paused", prompt_id=P),
        "DEBUG",
        "message type 'execution_paused' ignored",
    ),
    (
        "progress-value-string",
        frame("progress", value="6", max=20, prompt_id=P, node="3"),
        "WARNING",
        f"progress frame for prompt {P} ignored: 'value' is str, expected a number",
    ),
    (
        "progress-without-max",
        frame("progress", value=6, prompt_id=P, node="3"),
        "WARNING",
        f"progress frame for prompt {P} ignored: no 'max'",
    ),
    (
        "progress-prompt-id-number",
        frame("progress", value=6, max=20, prompt_id=42, node="3"),
        "WARNING",
        "progress frame ignored: 'prompt_id' is int, expected a non-empty string",
    ),
    (
        "success-timestamp-string",
        frame("execution_success", prompt_id=P, timestamp="now"),
        "WARNING",
        f"execution_success frame for prompt {P} ignored: 'timestamp' is str, expected a number",
    ),
    (
        "success-without-prompt-id",
        frame("execution_success", timestamp=1_795_425_734_762),
        "WARNING",
        "execution_success frame ignored: no 'prompt_id'",
    ),
    (
        "interrupted-node-type-number",
        frame("execution_interrupted", prompt_id=P, node_id="3", node_type=5),
        "WARNING",
        f"execution_interrupted frame for prompt {P} ignored: 'node_type' is int, "
        "expected a string",
    ),
    (
        "error-without-prompt-id",
        frame("execution_error", node_id="3", exception_message="boom"),
        "WARNING",
        "execution_error frame ignored: no 'prompt_id'",
    ),
    (
        "executing-node-list",
        frame("executing", node=["8"], prompt_id=P),
        "WARNING",
        f"executing frame for prompt {P} ignored: 'node' is list, expected a node id",
    ),
    (
        "executing-without-node",
        frame("executing", prompt_id=P),
        "WARNING",
        f"executing frame for prompt {P} ignored: no 'node'",
    ),
    (
        "executed-node-null",
        frame("executed", node=None, output={}, prompt_id=P),
        "WARNING",
        f"executed frame for prompt {P} ignored: 'node' is null, expected a node id",
    ),
    (
        "cached-nodes-string",
        frame("execution_cached", nodes="4", prompt_id=P),
        "WARNING",
        f"execution_cached frame for prompt {P} ignored: 'nodes' is str, expected a list",
    ),
    (
        "progress-state-nodes-list",
        frame("progress_state", nodes=[], prompt_id=P),
        "WARNING",
        f"progress_state frame for prompt {P} ignored: 'nodes' is list, expected an object",
    ),
    (
        "preview",
        binary(1, u32(1), JPEG),
        "DEBUG",
        f"binary event 1 of {8 + len(JPEG)} bytes ignored (previews are not progress)",
    ),
    (
        "progress-text",
        binary(3, u32(1), b"3", b"loading..."),
        "DEBUG",
        "binary event 3 of 19 bytes for node 3 ignored (previews are not progress)",
    ),
    (
        "preview-with-metadata",
        binary(4, u32(len(METADATA)), METADATA, JPEG),
        "DEBUG",
        f"binary event 4 of {8 + len(METADATA) + len(JPEG)} bytes for prompt {P} node 3 "
        "ignored (previews are not progress)",
    ),
    ("empty-binary", b"", "WARNING", "truncated binary frame of 0 bytes ignored"),
    ("two-bytes", b"\x00\x01", "WARNING", "truncated binary frame of 2 bytes ignored"),
    (
        "preview-header-cut",
        binary(1, b"\x00\x00"),
        "WARNING",
        "binary event 1 of 6 bytes ignored: truncated header",
    ),
    (
        "preview-unknown-image-type",
        binary(1, u32(9), JPEG),
        "WARNING",
        f"binary event 1 of {8 + len(JPEG)} bytes ignored: unknown image type 9",
    ),
    (
        "metadata-length-beyond-frame",
        binary(4, u32(500), b'{"node'),
        "WARNING",
        "binary event 4 of 14 bytes ignored: declares 500 header bytes, has 6",
    ),
    (
        "metadata-not-json",
        binary(4, u32(5), b"{nope", JPEG),
        "WARNING",
        f"binary event 4 of {13 + len(JPEG)} bytes ignored: preview metadata is not JSON",
    ),
    (
        "metadata-list",
        binary(4, u32(2), b"[]", JPEG),
        "WARNING",
        f"binary event 4 of {10 + len(JPEG)} bytes ignored: preview metadata is list",
    ),
    (
        "text-node-id-cut",
        binary(3, u32(40), b"3"),
        "WARNING",
        "binary event 3 of 9 bytes ignored: declares 40 header bytes, has 1",
    ),
    (
        "text-node-id-not-utf8",
        binary(3, u32(2), b"\xff\xfe", b"text"),
        "WARNING",
        "binary event 3 of 14 bytes ignored: node id is not UTF-8",
    ),
    (
        "unknown-binary-event",
        binary(9, b"\x00" * 12),
        "WARNING",
        "binary event 9 of 16 bytes ignored: unknown event type 9",
    ),
]


@pytest.mark.parametrize(("bad", "level", "message"), cases(BAD_FRAMES))
async def test_a_bad_frame_is_logged_and_changes_nothing(
    box: Box,
    logs: Callable[[], list[tuple[str, str]]],
    bad: str | bytes,
    level: str,
    message: str,
) -> None:
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)]))]
    async with box.watching():
        await watch.until("the first poll", lambda: watch.of_type(QueueSnapshot))
        server.send(*START)
        await watch.step(P, 5)
        before = logs()
        server.send(bad, progress(6))
        job = await watch.step(P, 6)
    expected = f"comfyui {NAME}: {message}"
    new = logs()[len(before) :]
    matching = [line for line in new if line[1].startswith(expected)]
    assert [line[0] for line in matching] == [level], new
    assert [line for line in new if line[0] != "DEBUG" and line not in matching] == []
    seen = [o.message for o in watch.of_type(ComfyMessage)]
    assert seen == [HANDSHAKE, *map(json.loads, START), json.loads(progress(6))]
    assert set(watch.views) == {f"comfy:{P}"}
    assert (job["state"], job["step"], job["steps"], job["stage"]) == ("running", 6, 20, "sampling")


@pytest.mark.parametrize(
    ("orphan", "message", "level", "expected"),
    [
        (
            frame("executing", node="8"),
            "executing node 8 without a prompt id (a reconnect frame): "
            "it belongs to the running prompt",
            "INFO",
            {
                "stage": "decoding",
                "node": {"id": "8", "class_type": "VAEDecode", "title": "VAE Decode"},
            },
        ),
        (
            frame("progress", value=6, max=20),
            "progress without a prompt id (ComfyUI before 2024)",
            "DEBUG",
            {"stage": "sampling", "step": 6, "steps": 20},
        ),
    ],
    ids=["executing", "progress"],
)
async def test_a_frame_without_prompt_id_goes_to_the_running_prompt_with_a_log_line(
    box: Box,
    logs: Callable[[], list[tuple[str, str]]],
    orphan: str,
    message: str,
    level: str,
    expected: dict[str, Any],
) -> None:
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)]))]
    async with box.watching():
        await watch.until("the graph from /queue", lambda: watch.of_type(QueueSnapshot))
        server.send(*START)
        await watch.step(P, 5)
        server.send(orphan)
        await watch.until("the orphan frame", lambda: len(watch.of_type(ComfyMessage)) == 6)
    job = running_job(watch)
    assert (level, f"comfyui {NAME}: {message}") in logs()
    assert set(watch.views) == {f"comfy:{P}"}
    assert {key: job[key] for key in expected} == expected
    assert job["state"] == "running"


# --- paced reading -------------------------------------------------------------------------


def progress_state(value: int) -> str:
    node = {"value": value, "max": 20, "state": "running", "node_id": "3", "display_node_id": "3"}
    return frame("progress_state", nodes={"3": node}, prompt_id=P)


def progress_seen(watch: Watch) -> list[int]:
    """The values of the ``progress`` messages the source passed on, in order."""
    messages = (o.message for o in watch.of_type(ComfyMessage))
    return [m["data"]["value"] for m in messages if m["type"] == "progress"]


async def test_unpaced_reading_passes_on_every_progress_even_when_read_at_once(box: Box) -> None:
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)]))]
    async with box.watching():
        await watch.until("the first poll", lambda: watch.of_type(QueueSnapshot))
        server.send(*START[:3], *(progress(step) for step in range(1, 11)))
        await watch.step(P, 10)
    assert progress_seen(watch) == list(range(1, 11))


async def test_paced_reading_passes_on_the_newest_progress_about_once_per_pace(box: Box) -> None:
    pace = 0.2
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)]))]
    loop = asyncio.get_running_loop()
    async with box.watching(read_pace_s=pace):
        await watch.until("the first poll", lambda: watch.of_type(QueueSnapshot))
        server.send(*START[:3])
        started = loop.time()
        for step in range(1, 20):
            server.send(progress(step), progress_state(step), binary(1, u32(1), JPEG))
            await asyncio.sleep(0.02)
        elapsed = loop.time() - started
        job = await watch.step(P, 19)
    seen = progress_seen(watch)
    assert seen == sorted(set(seen))
    assert seen[-1] == 19
    assert len(seen) - 1 <= elapsed / pace + 2, seen
    assert (job["state"], job["stage"], job["steps"]) == ("running", "sampling", 20)


async def test_paced_reading_reads_on_at_once_after_the_last_step_of_a_node(box: Box) -> None:
    pace = 2.0
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)]))]
    async with box.watching(read_pace_s=pace):
        await watch.until("the first poll", lambda: watch.of_type(QueueSnapshot))
        server.send(*START[:3], *(progress(step) for step in range(1, 21)))
        await watch.step(P, 20)
        server.send(frame("executing", node="8", display_node="8", prompt_id=P))
        await watch.until(
            "decoding", lambda: running_job(watch)["stage"] == "decoding", within_s=pace / 2
        )
    assert progress_seen(watch)[-1] == 20


async def test_paced_reading_keeps_up_with_a_stream_larger_than_one_read_per_pace(
    box: Box,
) -> None:
    """Megabyte previews: whatever waits in the kernel is read on, not one read per tick."""
    pace = 0.5
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)]))]
    preview = binary(1, u32(1), JPEG + bytes(1 << 20))
    async with box.watching(read_pace_s=pace):
        await watch.until("the first poll", lambda: watch.of_type(QueueSnapshot))
        server.send(*START[:3])
        for step in range(1, 20):
            server.send(progress(step), preview)
        server.send(frame("executing", node="8", display_node="8", prompt_id=P))
        await watch.until(
            "decoding", lambda: running_job(watch)["stage"] == "decoding", within_s=6 * pace
        )
    assert progress_seen(watch)[-1] == 19


async def test_paced_reading_never_holds_up_the_closing_handshake(box: Box) -> None:
    """Reading paused for an hour: stopping still reads ComfyUI's close frame at once (the
    source must stop within the 5 s ``running`` allows, against a 30 s close timeout); the
    progress left in the kernel is never passed on."""
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)]))]
    async with box.watching(read_pace_s=3600, close_timeout_s=30):
        await watch.until("the first poll", lambda: watch.of_type(QueueSnapshot))
        server.send(*START)
        await watch.step(P, 5)
        server.send(progress(6))
    assert progress_seen(watch) == [5]


def one_reconnect(watch: Watch, lines: list[tuple[str, str]]) -> str:
    """The detail of the one websocket close, after checking its statuses and warning."""
    statuses = watch.of_type(SourceStatus)
    assert [s.up for s in statuses] == [False, True, False, True]
    detail = statuses[2].detail or ""
    closed = f"comfyui {NAME}: websocket closed ({detail}); reconnecting in "
    assert [level for level, message in lines if message.startswith(closed)] == ["WARNING"]
    return detail


async def test_a_websocket_torn_down_mid_stream_is_reconnected_and_resynced(
    box: Box, logs: Callable[[], list[tuple[str, str]]]
) -> None:
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)]))]
    up = SourceStatus(f"comfyui:{NAME}", True)
    async with box.watching():
        server.send(*START)
        await watch.step(P, 5)
        server.send(None)
        await watch.until("a second connection", lambda: watch.observations.count(up) == 2)
        server.send(progress(6))
        await watch.step(P, 6)
        reconnected = len(watch.observations) - watch.observations[::-1].index(up)
        await watch.until(
            "a resync after the reconnect",
            lambda: [o for o in watch.observations[reconnected:] if isinstance(o, QueueSnapshot)],
        )
    assert one_reconnect(watch, logs()).startswith("closed: ")
    views = watch.history(P)
    assert {v["state"] for v in views} == {"running"}
    assert any(v["stale"] for v in views)
    assert not views[-1]["stale"]


async def test_a_socket_that_stops_answering_pings_is_closed_and_replaced(
    box: Box, logs: Callable[[], list[tuple[str, str]]]
) -> None:
    server, watch = box.server, box.watch
    server.deaf = 1
    server.queue = [body(queue_body([item(7, P)]))]
    up = SourceStatus(f"comfyui:{NAME}", True)
    async with box.watching(ping_interval_s=0.1, close_timeout_s=0.2):
        await watch.until("a second connection", lambda: watch.observations.count(up) == 2)
        server.send(*START)
        await watch.step(P, 5)
    detail = one_reconnect(watch, logs())
    assert detail.startswith("closed: sent 1011 (internal error) keepalive ping timeout")


async def test_a_url_that_can_never_work_is_reported_once_and_not_retried(
    logs: Callable[[], list[tuple[str, str]]],
) -> None:
    watch = Watch({NAME: WATCHER_ID})
    async with running(watch.source(NAME, "ftp://127.0.0.1:1")):
        await watch.until("the source giving up", lambda: len(watch.observations) == 2)
    assert watch.observations == [
        SourceStatus(f"comfyui:{NAME}", False, "connecting"),
        SourceStatus(f"comfyui:{NAME}", False, "invalid URL ftp://127.0.0.1:1"),
    ]
    [(level, message)] = logs()
    assert level == "ERROR"
    assert message.startswith(f"comfyui {NAME}: ftp://127.0.0.1:1 is not a usable URL: ")


# --- HTTP answers -------------------------------------------------------------------------

BAD_QUEUE: list[tuple[str, Answer, str]] = [
    ("http-500", status(500), "GET /queue answered HTTP 500"),
    ("http-503", status(503), "GET /queue answered HTTP 503"),
    (
        "cut-json",
        raw(b'{"queue_running": ['),
        """GET /queue answered non-JSON b'{"queue_running": ['""",
    ),
    ("not-utf8", raw(b"\x80\x81 queue"), "GET /queue answered non-JSON b'\\x80\\x81 queue'"),
    ("empty-body", raw(b""), "/queue body is NoneType, expected an object"),
    ("list-body", body([]), "/queue body is list, expected an object"),
    (
        "running-not-list",
        body({"queue_running": {}, "queue_pending": []}),
        "/queue queue_running is dict, expected a list",
    ),
    (
        "prompt-id-number",
        body(queue_body([[7, 1234, {}, {}, ["9"]]])),
        "/queue queue_running has a malformed item [7, 1234, {}, {}, ['9']]",
    ),
    (
        "number-string",
        body(queue_body([], [["7", Q, {}, {}, ["9"]]])),
        f"/queue queue_pending has a malformed item ['7', '{Q}', {{}}, {{}}, ['9']]",
    ),
    ("item-too-short", body(queue_body([[7]])), "/queue queue_running has a malformed item [7]"),
    ("reset-mid-body", reset(), "GET /queue failed: ClientPayloadError: "),
]


@pytest.mark.parametrize(("bad", "message"), cases(BAD_QUEUE))
async def test_a_bad_queue_answer_is_logged_and_changes_nothing(
    box: Box,
    logs: Callable[[], list[tuple[str, str]]],
    bad: Answer,
    message: str,
) -> None:
    server, watch = box.server, box.watch
    good = queue_body([item(7, P)], [item(9, Q)])
    server.queue = [body(good), bad, body(good)]
    async with box.watching():
        await watch.until("two snapshots", lambda: len(watch.of_type(QueueSnapshot)) >= 2)
    assert server.served["/queue"] >= 3
    assert watch.of_type(QueueSnapshot)[:2] == [parse_queue(NAME, good)] * 2
    assert watch.of_type(HistoryEntry) == []
    assert {v["state"] for v in watch.history(P)} == {"running"}
    assert {(v["state"], v["queue_position"]) for v in watch.history(Q)} == {("queued", 1)}
    assert only_warning(logs()).startswith(f"comfyui {NAME}: poll failed: {message}")
    assert ("INFO", f"comfyui {NAME}: polling works again") in logs()


async def test_a_queue_answer_slower_than_the_timeout_is_abandoned_and_polled_again(
    box: Box, logs: Callable[[], list[tuple[str, str]]]
) -> None:
    server, watch = box.server, box.watch
    good = queue_body([item(7, P)])
    server.queue = [server.slow(), body(good)]
    async with box.watching(http_timeout_s=0.3):
        await watch.until("a snapshot", lambda: watch.of_type(QueueSnapshot))
    assert watch.of_type(QueueSnapshot) == [parse_queue(NAME, good)]
    assert ("WARNING", f"comfyui {NAME}: poll failed: GET /queue got no answer within 0.3 s") in (
        logs()
    )


async def test_queue_items_with_extra_elements_are_read_by_index(
    box: Box,
) -> None:
    server, watch = box.server, box.watch
    graph = workflows.still(steps=20)
    server.queue = [
        body(
            queue_body(
                [
                    [
                        3,
                        P,
                        graph,
                        {"client_id": WATCHER_ID, "create_time": 1_795_425_730_832},
                        ["9"],
                        {},
                    ]
                ],
                [
                    [9, Q, graph, {}, ["9"], {"sensitive": 1}, "future"],
                    [5, "c3", graph, {"client_id": "other"}, ["9"], None],
                ],
            )
        )
    ]
    async with box.watching():
        snapshot = await watch.until("a snapshot", lambda: watch.of_type(QueueSnapshot))
    assert snapshot[0] == QueueSnapshot(
        NAME,
        (QueueItem(3.0, P, graph, WATCHER_ID, 1_795_425_730_832.0),),
        (QueueItem(5.0, "c3", graph, "other", None), QueueItem(9.0, Q, graph, None, None)),
    )
    assert [
        (v["state"], v["queue_position"]) for v in (watch.job(p) for p in (P, "c3", Q)) if v
    ] == [
        ("running", 0),
        ("queued", 1),
        ("queued", 2),
    ]


BAD_HISTORY: list[tuple[str, Answer, str]] = [
    ("http-500", status(500), f"GET /history/{P} answered HTTP 500"),
    ("cut-json", raw(b'{"0b8a'), f"""GET /history/{P} answered non-JSON b'{{"0b8a'"""),
    ("list-body", body([]), f"/history/{P} body is list, expected an object"),
    (
        "other-prompts-entry",
        body(history_body(Q)),
        f"/history/{P} answered other prompts' entries ['{Q}']",
    ),
    ("entry-string", body({P: "done"}), f"/history/{P} entry is str, expected an object"),
    ("status-string", body({P: {"status": "success"}}), f"/history/{P} status is str"),
    ("outputs-list", body({P: {"outputs": []}}), f"/history/{P} outputs is list"),
    ("prompt-object", body({P: {"prompt": {}}}), f"/history/{P} prompt is dict"),
    (
        "messages-object",
        body({P: {"status": {"status_str": "success", "messages": {}}}}),
        f"/history/{P} messages is dict",
    ),
    ("reset-mid-body", reset(), f"GET /history/{P} failed: ClientPayloadError: "),
]


@pytest.mark.parametrize(("bad", "message"), cases(BAD_HISTORY))
async def test_a_bad_history_answer_never_ends_the_job(
    box: Box,
    logs: Callable[[], list[tuple[str, str]]],
    bad: Answer,
    message: str,
) -> None:
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)])), body(queue_body([]))]
    server.history[P] = [bad, body(history_body(P))]
    async with box.watching():
        done = await watch.state(P, "completed")
    assert list(dict.fromkeys(v["state"] for v in watch.history(P))) == ["running", "completed"]
    assert done["outputs"] == ["still_00001_.png"]
    assert watch.of_type(HistoryEntry) == [HistoryEntry(NAME, P, history_body(P)[P])]
    assert only_warning(logs()).startswith(f"comfyui {NAME}: poll failed: prompt {P}: {message}")


async def test_one_unreadable_history_does_not_hold_up_another_prompts(
    box: Box, logs: Callable[[], list[tuple[str, str]]]
) -> None:
    server, watch = box.server, box.watch
    server.queue = [body(queue_body([item(7, P)], [item(9, Q)])), body(queue_body([]))]
    server.history[P] = [status(500)]
    server.history[Q] = [body(history_body(Q))]
    async with box.watching():
        await watch.state(Q, "completed")
        await watch.until("P's history asked 3 times", lambda: server.served[f"/history/{P}"] >= 3)
    assert {v["state"] for v in watch.history(P)} == {"running"}
    failure = f"comfyui {NAME}: poll failed: prompt {P}: GET /history/{P} answered HTTP 500"
    assert [line for line in logs() if line[1] == failure][:3] == [
        ("WARNING", failure),
        ("DEBUG", failure),
        ("DEBUG", failure),
    ]


async def test_cancel_reports_a_failing_comfyui_as_a_comfy_error(box: Box) -> None:
    server, watch = box.server, box.watch
    server.interrupt = [status(500)]
    source = watch.source(NAME, box.url)
    async with running(source):
        await watch.connected(NAME)
        with pytest.raises(
            ComfyError, match=rf"^ComfyUI {NAME}: POST /interrupt answered HTTP 500$"
        ):
            await source.cancel(P, running=True)
    assert server.served["/interrupt"] == 1


# --- a server that never answers ---------------------------------------------------------


async def test_a_silent_server_times_out_the_handshake_and_is_retried_until_it_answers(
    logs: Callable[[], list[tuple[str, str]]],
) -> None:
    accepted = asyncio.Queue[None]()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(None)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    watch = Watch({NAME: WATCHER_ID})
    answering = Scripted()
    answering.queue = [body(queue_body([item(7, P)]))]
    runner = web.AppRunner(answering.app)
    await runner.setup()
    try:
        async with running(watch.source(NAME, f"http://127.0.0.1:{port}", open_timeout_s=0.2)):
            for _ in range(3):
                await asyncio.wait_for(accepted.get(), 10)
            server.close()
            await server.wait_closed()
            silent_part = list(watch.observations)
            await web.TCPSite(runner, "127.0.0.1", port).start()
            await watch.state(P, "running")
    finally:
        server.close()
        answering.released.set()
        await runner.cleanup()
    assert silent_part == [SourceStatus(f"comfyui:{NAME}", False, "connecting")]
    assert watch.observations[1] == SourceStatus(f"comfyui:{NAME}", True)
    attempts = [line for line in logs() if "cannot connect" in line[1]]
    expected = (
        f"comfyui {NAME}: cannot connect to http://127.0.0.1:{port} "
        "(TimeoutError: timed out during opening handshake); retrying in "
    )
    assert [(level, message.startswith(expected)) for level, message in attempts[:3]] == [
        ("WARNING", True),
        ("DEBUG", True),
        ("DEBUG", True),
    ]
    assert ("INFO", f"comfyui {NAME}: connected to http://127.0.0.1:{port}") in logs()


# --- reconnect backoff --------------------------------------------------------------------

RETRY = re.compile(
    r"comfyui box: (?:cannot connect to \S+ \((?P<why>.*)\); retrying"
    r"|websocket closed \(.*\); reconnecting) in (?P<seconds>[0-9.e-]+) s$"
)


def waits(lines: list[tuple[str, str]]) -> list[tuple[str, str, float]]:
    """(level, what, seconds) of each reconnect wait the source logged."""
    found = []
    for level, message in lines:
        if match := RETRY.match(message):
            found.append((level, match["why"] or "closed", float(match["seconds"])))
    return found


async def test_reconnects_back_off_doubling_with_jitter_up_to_the_cap_and_reset_by_a_connection(
    box: Box, logs: Callable[[], list[tuple[str, str]]]
) -> None:
    server, watch = box.server, box.watch
    server.refusals = 6
    up = SourceStatus(f"comfyui:{NAME}", True)
    async with box.watching(initial_backoff_s=0.05, max_backoff_s=0.2):
        await watch.until("a connection", lambda: up in watch.observations)
        server.refusals = 2
        server.send(None)
        await watch.until("a second connection", lambda: watch.observations.count(up) == 2)
    refused = "InvalidStatus: server rejected WebSocket connection: HTTP 503"
    seen = waits(logs())
    assert [(level, what) for level, what, _ in seen] == [
        ("WARNING", refused),
        *[("DEBUG", refused)] * 5,
        ("WARNING", "closed"),
        ("WARNING", refused),
        ("DEBUG", refused),
    ]
    caps = [0.05, 0.1, 0.2, 0.2, 0.2, 0.2, 0.05, 0.05, 0.1]
    for (_, what, seconds), cap in zip(seen, caps, strict=True):
        assert cap / 2 * 0.99 <= seconds <= cap * 1.01, (what, seconds, cap)
    capped = [seconds for _, _, seconds in seen[2:6]]
    assert len(set(capped)) > 1, capped


# --- /system_stats and /api/jobs ----------------------------------------------------------


def left_the_queue(server: Scripted) -> None:
    """P runs and Q waits, then both are gone from /queue; P finished, Q was deleted."""
    server.queue = [body(queue_body([item(7, P)], [item(9, Q)])), body(queue_body([]))]
    server.history[P] = [body(history_body(P))]


async def outcomes(box: Box) -> None:
    """Watch until P is completed and Q canceled."""
    async with box.watching():
        await box.watch.state(P, "completed")
        await box.watch.state(Q, "canceled")


@pytest.mark.parametrize("has_more", [False, True], ids=["one-page", "more-pages"])
async def test_api_jobs_spares_a_history_read_for_each_prompt_without_an_entry(
    box: Box, logs: Callable[[], list[tuple[str, str]]], has_more: bool
) -> None:
    server = box.server
    left_the_queue(server)
    server.jobs = [body(finished_jobs(P, has_more=has_more))]
    await outcomes(box)
    assert (server.served[f"/history/{P}"], server.served[f"/history/{Q}"]) == (1, int(has_more))
    assert server.jobs_queries[0] == {
        "status": "completed,failed",
        "sort_by": "created_at",
        "sort_order": "desc",
        "limit": "200",
    }
    version = f"comfyui {NAME}: ComfyUI 0.8.0; outcomes from /api/jobs and /history"
    assert ("INFO", version) in logs()
    longer = (
        f"comfyui {NAME}: its history is longer than one /api/jobs page: outcomes from "
        "/history until the next connection"
    )
    assert (("INFO", longer) in logs()) is has_more
    assert [line for line in logs() if line[0] == "WARNING"] == []


async def test_one_prompt_in_question_is_read_from_history_without_a_jobs_page(
    box: Box,
) -> None:
    server = box.server
    server.queue = [body(queue_body([item(7, P)])), body(queue_body([]))]
    server.history[P] = [body(history_body(P))]
    async with box.watching():
        await box.watch.state(P, "completed")
    assert (server.served["/api/jobs"], server.served[f"/history/{P}"]) == (0, 1)


async def test_a_comfyui_without_api_jobs_is_asked_once_then_read_from_history(
    box: Box, logs: Callable[[], list[tuple[str, str]]]
) -> None:
    server = box.server
    left_the_queue(server)
    server.history[P] = [status(500), body(history_body(P))]
    await outcomes(box)
    assert server.served["/api/jobs"] == 1
    assert (server.served[f"/history/{P}"], server.served[f"/history/{Q}"]) == (2, 1)
    assert (
        "INFO",
        f"comfyui {NAME}: no /api/jobs (before ComfyUI 0.6.0): outcomes from /history",
    ) in logs()


async def test_a_comfyui_older_than_api_jobs_is_never_asked_for_it(
    box: Box, logs: Callable[[], list[tuple[str, str]]]
) -> None:
    server = box.server
    left_the_queue(server)
    server.system_stats = [body(system_stats("0.5.1"))]
    await outcomes(box)
    assert server.served["/api/jobs"] == 0
    assert server.served[f"/history/{Q}"] == 1
    assert ("INFO", f"comfyui {NAME}: ComfyUI 0.5.1; outcomes from /history") in logs()


BAD_JOBS: list[tuple[str, Answer, str]] = [
    ("http-500", status(500), "GET /api/jobs?"),
    ("list-body", body([]), "/api/jobs body is list, expected an object"),
    (
        "no-pagination",
        body({"jobs": []}),
        "/api/jobs pagination has no has_more flag: None",
    ),
    (
        "pending-job-listed",
        body({"jobs": [{"id": Q, "status": "pending"}], "pagination": {"has_more": False}}),
        f"/api/jobs lists a job that is not a finished one: {{'id': '{Q}', 'status': 'pending'}}",
    ),
    (
        "id-number",
        body({"jobs": [{"id": 5, "status": "completed"}], "pagination": {"has_more": False}}),
        "/api/jobs lists a job that is not a finished one: {'id': 5, 'status': 'completed'}",
    ),
    ("cut-json", raw(b'{"jobs": ['), "GET /api/jobs?"),
]


@pytest.mark.parametrize(("bad", "message"), cases(BAD_JOBS))
async def test_a_bad_api_jobs_answer_falls_back_to_history_for_that_poll(
    box: Box, logs: Callable[[], list[tuple[str, str]]], bad: Answer, message: str
) -> None:
    """The first poll's page is bad and both history reads fail; the next poll's good page
    settles Q without a second read of its own."""
    server = box.server
    left_the_queue(server)
    server.history[P] = [status(500), body(history_body(P))]
    server.history[Q] = [status(500), body({})]
    server.jobs = [bad, body(finished_jobs(P))]
    await outcomes(box)
    assert server.served["/api/jobs"] == 2
    assert (server.served[f"/history/{P}"], server.served[f"/history/{Q}"]) == (2, 1)
    warnings = [text for level, text in logs() if level == "WARNING"]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith(f"comfyui {NAME}: poll failed: {message}")
    assert warnings[0].endswith("; outcomes from /history")
    assert warnings[1:] == [
        f"comfyui {NAME}: poll failed: prompt {p}: GET /history/{p} answered HTTP 500"
        for p in (P, Q)
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (status(500), "GET /system_stats answered HTTP 500"),
        (body({"devices": []}), "/system_stats body has no system object: {'devices': []}"),
    ],
    ids=["http-500", "no-system"],
)
async def test_an_unreadable_system_stats_leaves_api_jobs_to_be_tried(
    box: Box, logs: Callable[[], list[tuple[str, str]]], bad: Answer, message: str
) -> None:
    server = box.server
    left_the_queue(server)
    server.system_stats = [bad]
    server.jobs = [body(finished_jobs(P))]
    await outcomes(box)
    assert (server.served["/system_stats"], server.served[f"/history/{Q}"]) == (1, 0)
    assert only_warning(logs()) == f"comfyui {NAME}: poll failed: {message}"
