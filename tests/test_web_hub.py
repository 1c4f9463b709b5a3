"""The websocket hub over real sockets, with the independent ``websockets`` client library."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from tower_progress.core.model import (
    JobChanged,
    JobFinished,
    JobRemoved,
    JsonDict,
    Milestone,
    ResourcesChanged,
    SourceChanged,
)
from tower_progress.web.app import serve_socket
from tower_progress.web.hub import Hub

NOW = datetime(2026, 1, 7, 12, 0, 0, tzinfo=UTC)


@dataclass
class Picture:
    """What the tracker would currently show: plain test data behind the StateView methods."""

    by_id: dict[str, JsonDict] = field(default_factory=dict)
    latest_resources: JsonDict | None = None
    source_table: dict[str, JsonDict] = field(default_factory=dict)

    def jobs(self) -> list[JsonDict]:
        return list(self.by_id.values())

    def job(self, job_id: str) -> JsonDict | None:
        return self.by_id.get(job_id)

    def resources(self) -> JsonDict | None:
        return self.latest_resources

    def sources(self) -> dict[str, JsonDict]:
        return self.source_table


def job(job_id: str, percent: float = 0.0, **extra: Any) -> JsonDict:
    return {"id": job_id, "state": "running", "percent": percent, **extra}


@asynccontextmanager
async def serving(hub: Hub) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/ws", hub.handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = await serve_socket(app, sock)
    try:
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def client(
    url: str, *, rcvbuf: int | None = None, **kw: Any
) -> AsyncIterator[ClientConnection]:
    """A websockets client; ``rcvbuf`` pins a small kernel receive buffer so that a client
    that stops reading pushes back on the server after kilobytes instead of megabytes."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", int(url.split(":")[2].split("/")[0])))
    async with connect(url, sock=sock, proxy=None, compression=None, **kw) as ws:
        yield ws


async def recv(ws: ClientConnection) -> JsonDict:
    message = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(message, str)
    decoded = json.loads(message)
    assert isinstance(decoded, dict)
    return decoded


async def publish_until(
    hub: Hub,
    pacer: ClientConnection,
    done: Callable[[], bool],
    update: Callable[[int], JsonDict],
) -> int:
    """Publish ``update(1)``, ``update(2)``, ... until ``done()``, each one read back by a
    client that keeps up (so the loop moves at the hub's pace); returns how many."""
    n = 0
    while not done():
        assert n < 5000, "the condition was never reached"
        n += 1
        hub.publish([JobChanged(update(n))])
        assert (await recv(pacer))["job"] == update(n)
    return n


@asynccontextmanager
async def fast_and_stuck(hub: Hub) -> AsyncIterator[tuple[ClientConnection, ClientConnection]]:
    """Two clients past their snapshot: one that reads as it goes, and one that does not read
    (yet) and whose 4 KiB receive buffer soon pushes back on the server."""
    async with (
        serving(hub) as url,
        client(url) as fast,
        client(url, rcvbuf=4096, max_queue=1) as stuck,
    ):
        await recv(fast)
        yield fast, stuck


async def read_through(ws: ClientConnection, last: Callable[[JsonDict], bool]) -> list[JsonDict]:
    """Skip the snapshot, then read up to and including the first message where ``last``."""
    assert (await recv(ws))["type"] == "snapshot"
    got = [await recv(ws)]
    while not last(got[-1]):
        got.append(await recv(ws))
    assert [m["seq"] for m in got] == list(range(2, 2 + len(got)))
    return got


class LogEvents(logging.Handler):
    """Sets an asyncio event when the hub logs a line containing a given phrase."""

    def __init__(self, **phrases: str) -> None:
        super().__init__(logging.DEBUG)
        self.phrases = phrases
        self.seen = {name: asyncio.Event() for name in phrases}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for name, phrase in self.phrases.items():
            if phrase in text:
                self.seen[name].set()


@contextmanager
def watch_hub_log(**phrases: str) -> Iterator[LogEvents]:
    logger = logging.getLogger("tower_progress.web.hub")
    handler = LogEvents(**phrases)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_snapshot_first_then_each_event_type_with_seq_one_apart() -> None:
    picture = Picture(
        by_id={"1": job("1", 12.5), "2": job("2", 0.0, state="queued")},
        latest_resources={"cpu_percent": 7.5, "gpus": []},
        source_table={
            "database": {"up": True, "detail": None, "since": "2026-01-07T11:00:00.000Z", "_x": 1}
        },
    )
    hub = Hub(picture, clock=lambda: NOW)
    async with serving(hub) as url, client(url) as ws:
        assert await recv(ws) == {
            "seq": 1,
            "type": "snapshot",
            "jobs": [job("1", 12.5), job("2", 0.0, state="queued")],
            "resources": {"cpu_percent": 7.5, "gpus": []},
            "sources": {
                "database": {"up": True, "detail": None, "since": "2026-01-07T11:00:00.000Z"}
            },
            "server_time": "2026-01-07T12:00:00.000Z",
        }
        picture.source_table["comfyui:main"] = {
            "up": False,
            "detail": "connection refused",
            "since": "2026-01-07T12:00:01.000Z",
        }
        hub.publish(
            [
                JobChanged(job("1", 50.0)),
                Milestone("1", 50, "running"),
                JobFinished(job("3", 100.0, state="completed"), "fp", {"sampling": 3.0}),
                JobRemoved("2"),
                ResourcesChanged({"cpu_percent": 9.0, "gpus": []}),
                SourceChanged("comfyui:main", False, "connection refused"),
            ]
        )
        assert [await recv(ws) for _ in range(5)] == [
            {"seq": 2, "type": "job", "job": job("1", 50.0)},
            {"seq": 3, "type": "milestone", "id": "1", "percent": 50, "state": "running"},
            {"seq": 4, "type": "job_removed", "id": "2"},
            {"seq": 5, "type": "resources", "cpu_percent": 9.0, "gpus": []},
            {
                "seq": 6,
                "type": "source",
                "name": "comfyui:main",
                "up": False,
                "detail": "connection refused",
                "since": "2026-01-07T12:00:01.000Z",
            },
        ]
        assert hub.stats().messages_sent == 6


async def test_seq_is_contiguous_across_events_and_replies() -> None:
    hub = Hub(Picture())
    async with serving(hub) as url, client(url) as ws:
        assert (await recv(ws))["seq"] == 1
        for batch in range(50):
            hub.publish([JobChanged(job(f"{batch}-{i}", float(i))) for i in range(10)])
            await ws.send('{"type":"ping"}')
        received = [await recv(ws) for _ in range(50 * 11)]
        assert [m["seq"] for m in received] == list(range(2, 2 + 50 * 11))
        assert sum(m["type"] == "pong" for m in received) == 50
        assert {m["job"]["id"] for m in received if m["type"] == "job"} == {
            f"{b}-{i}" for b in range(50) for i in range(10)
        }


async def test_slow_reader_ends_with_the_latest_state_and_fewer_messages() -> None:
    hub = Hub(Picture(), max_buffer=16 * 1024, send_timeout=60.0, batch_interval=0)
    filler = "x" * 8000
    async with fast_and_stuck(hub) as (fast, slow):
        published = await publish_until(
            hub,
            fast,
            lambda: hub.stats().messages_coalesced >= 50,
            lambda n: job("render", float(n), filler=filler),
        )
        published += 1
        last = job("render", float(published), state="completed", filler=filler)
        hub.publish([JobChanged(last)])
        assert (await recv(fast))["job"] == last

        got = await read_through(slow, lambda m: m["job"] == last)
        percents = [m["job"]["percent"] for m in got]
        assert percents == sorted(percents)
        assert len(got) < published
        assert len(got) + hub.stats().messages_coalesced == published


async def test_removal_drops_a_slow_clients_pending_update_of_that_job() -> None:
    hub = Hub(Picture(), max_buffer=16 * 1024, send_timeout=60.0, batch_interval=0)
    filler = "r" * 8000
    async with fast_and_stuck(hub) as (fast, slow):
        published = await publish_until(
            hub,
            fast,
            lambda: hub.stats().messages_coalesced >= 1,
            lambda n: job("render", float(n), filler=filler),
        )
        replaced = hub.stats().messages_coalesced
        hub.publish([JobRemoved("render")])
        assert await recv(fast) == {"seq": published + 2, "type": "job_removed", "id": "render"}
        assert hub.stats().messages_coalesced == replaced + 1

        got = await read_through(slow, lambda m: m["type"] == "job_removed")
        updates = [m for m in got if m["type"] == "job"]
        assert len(updates) + hub.stats().messages_coalesced == published


async def test_messages_over_64_kib_use_the_long_frame_header() -> None:
    big = job("big", 1.0, title="t" * 70_000)
    hub = Hub(Picture(by_id={"big": big}))
    async with serving(hub) as url, client(url) as ws:
        assert (await recv(ws))["jobs"] == [big]
        hub.publish([JobChanged(big)])
        assert await recv(ws) == {"seq": 2, "type": "job", "job": big}


@pytest.mark.parametrize(
    ("settings", "update", "blocked", "dropped"),
    [
        pytest.param(
            {"send_timeout": 0.5},
            lambda n: job("render", float(n), filler="y" * 8000),
            "blocked at seq",
            "send blocked for 0.5 s",
            id="send-timeout",
        ),
        pytest.param(
            {"send_timeout": 60.0, "max_queue": 8},
            lambda n: job(f"job-{n}", 1.0, filler="z" * 8000),
            "8 messages pending",
            "8 messages pending",
            id="queue-full",
        ),
    ],
)
async def test_client_that_stops_reading_is_dropped_while_another_keeps_receiving(
    settings: dict[str, Any], update: Callable[[int], JsonDict], blocked: str, dropped: str
) -> None:
    hub = Hub(Picture(), max_buffer=16 * 1024, batch_interval=0, **settings)
    with watch_hub_log(blocked=blocked, dropped=dropped) as log:
        async with fast_and_stuck(hub) as (fast, stuck):
            await publish_until(hub, fast, log.seen["blocked"].is_set, update)
            await asyncio.wait_for(log.seen["dropped"].wait(), 10)
            assert hub.stats().clients_dropped == 1

            hub.publish([JobChanged(job("after", 1.0))])
            assert (await recv(fast))["job"] == job("after", 1.0)
            with pytest.raises(ConnectionClosedError):
                while True:
                    await recv(stuck)
            assert stuck.close_code == 1006
            hub.publish([JobChanged(job("after", 2.0))])
            assert (await recv(fast))["job"] == job("after", 2.0)
            assert hub.stats().clients == 1


MALFORMED: list[tuple[str | bytes, str]] = [
    ("not json", "frame is not valid JSON"),
    ("[1, 2]", "frame must be a JSON object"),
    ("42", "frame must be a JSON object"),
    ("{}", 'frame needs a "type": ping or subscribe'),
    ('{"type": 7}', 'frame needs a "type": ping or subscribe'),
    ('{"type": "shout"}', "unknown message type 'shout': expected ping or subscribe"),
    (
        '{"type": "subscribe", "jobs": "1"}',
        'subscribe needs "jobs": a list of job ids, or null for all jobs',
    ),
    (
        '{"type": "subscribe", "jobs": [1]}',
        'subscribe needs "jobs": a list of job ids, or null for all jobs',
    ),
    (b"\x00\x01binary", "binary frames are not accepted: send JSON text"),
]


async def test_a_thousand_malformed_frames_get_errors_and_the_connection_stays_usable() -> None:
    hub = Hub(Picture())
    async with serving(hub) as url, client(url) as ws:
        await recv(ws)
        expected = []
        for i in range(1000):
            frame, message = MALFORMED[i % len(MALFORMED)]
            await ws.send(frame)
            expected.append({"seq": i + 2, "type": "error", "message": message})
        assert [await recv(ws) for _ in range(1000)] == expected
        await ws.send('{"type": "ping"}')
        assert await recv(ws) == {"seq": 1002, "type": "pong"}
        hub.publish([JobChanged(job("after", 1.0))])
        assert await recv(ws) == {"seq": 1003, "type": "job", "job": job("after", 1.0)}


async def test_oversized_frame_closes_with_1009() -> None:
    hub = Hub(Picture(), max_frame=64 * 1024)
    async with serving(hub) as url, client(url) as ws:
        await recv(ws)
        await ws.send('{"type":"ping","pad":"' + "p" * (64 * 1024) + '"}')
        with pytest.raises(ConnectionClosedError):
            await recv(ws)
        assert ws.close_code == 1009


async def test_protocol_pings_and_json_pings_are_both_answered() -> None:
    hub = Hub(Picture(), heartbeat=0.2)
    async with serving(hub) as url, client(url, ping_interval=None) as ws:
        await recv(ws)
        pong = await ws.ping()
        await asyncio.wait_for(pong, 10)
        await ws.send('{"type": "ping"}')
        assert await recv(ws) == {"seq": 2, "type": "pong"}


async def test_subscribe_limits_job_messages_until_cleared() -> None:
    hub = Hub(Picture())
    async with serving(hub) as url, client(url) as ws:
        await recv(ws)
        await ws.send('{"type": "subscribe", "jobs": ["a"]}')
        await ws.send('{"type": "ping"}')
        assert await recv(ws) == {"seq": 2, "type": "pong"}
        hub.publish(
            [
                JobChanged(job("b", 1.0)),
                JobChanged(job("a", 1.0)),
                Milestone("b", 25, "running"),
                JobRemoved("b"),
                ResourcesChanged({"cpu_percent": 1.0}),
            ]
        )
        assert [await recv(ws) for _ in range(2)] == [
            {"seq": 3, "type": "job", "job": job("a", 1.0)},
            {"seq": 4, "type": "resources", "cpu_percent": 1.0},
        ]
        await ws.send('{"type": "subscribe", "jobs": null}')
        await ws.send('{"type": "ping"}')
        assert await recv(ws) == {"seq": 5, "type": "pong"}
        hub.publish([JobChanged(job("b", 2.0))])
        assert await recv(ws) == {"seq": 6, "type": "job", "job": job("b", 2.0)}


async def test_unserializable_event_is_logged_and_the_rest_still_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub(Picture())
    async with serving(hub) as url, client(url) as ws:
        await recv(ws)
        hub.publish(
            [
                JobChanged(job("nan", float("nan"))),
                JobChanged({"title": "no id"}),
                JobChanged(job("ok", 3.0)),
            ]
        )
        assert await recv(ws) == {"seq": 2, "type": "job", "job": job("ok", 3.0)}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "job message for job nan not sent: Out of range float values are not JSON compliant",
        "job update without a string id dropped: id=None",
    ]


async def test_close_all_closes_every_client_with_1001_and_refuses_new_ones() -> None:
    hub = Hub(Picture())
    async with serving(hub) as url:
        async with client(url) as one, client(url) as two:
            await recv(one)
            await recv(two)
            hub.publish([JobChanged(job("last", 9.0))])
            await hub.close_all()
            for ws in (one, two):
                assert await recv(ws) == {"seq": 2, "type": "job", "job": job("last", 9.0)}
                with pytest.raises(ConnectionClosed):
                    await recv(ws)
                assert ws.close_code == 1001
        async with client(url) as late:
            with pytest.raises(ConnectionClosed):
                await recv(late)
            assert late.close_code == 1001
