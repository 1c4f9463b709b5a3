"""Websocket fan-out: publish-to-receipt latency and memory of ``web.Hub`` against a naive hub.

Run: ``.venv/bin/python bench/fanout.py [--seconds 5] [--clients 1,50,500] [--jobs 50]
[--hz 10] [--stuck-seconds 20] [--batch-interval 0.02]``.

The server runs in its own process (the hub, and the naive design on another route), a fresh
one per measurement; all clients run in this process as raw asyncio protocols. ``--jobs`` jobs
each publish an update ``--hz`` times a second, staggered, one ``publish`` call per update as
the daemon makes them; every job message (about 1.1 KB, the DESIGN §4.1 fields) ends with
``bench_t``, ``time.monotonic()`` just before ``publish``. Latency is receipt time minus
``bench_t`` (one system-wide clock for both processes). The first second is warm-up.

Both ends share the machine's two cores, and parsing every frame of 500 clients in Python would
cost this process more than the server spends: so every client drains its socket, but at most
50 of them (every n-th in connection order, which is the order the server writes in) parse
frames and record latencies.

- **hub**: ``tower_progress.web.hub.Hub``: serialize once, one batched write per client at most
  every ``batch_interval``, coalescing bounded queues for clients that fall behind.
- **naive**: ``json.dumps`` per client per message into an unbounded ``asyncio.Queue``, drained
  by one task per client with one ``send_str`` per message.

``delivered``: the share of (updates x recording clients) that arrived within the run plus one
second (the hub delivers fewer than all only when a client falls behind and gets the latest
state of each job instead). CPU: each process's CPU time over wall time (100 % = one core).

Memory per client: server RSS after ``max(clients)`` idle clients got their snapshot, minus RSS
before, divided by the count. Stuck client: one client that never reads (4 KiB receive buffer)
next to one that does, while the same load runs for ``--stuck-seconds``: server RSS growth. The
hub caps it (``max_buffer``) and disconnects the client once blocked for its send timeout
(10 s, counted from when the kernel buffers are full); the naive hub queues without end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import multiprocessing
import os
import resource
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tower_progress.core.model import Event, JobChanged, JsonDict
from tower_progress.web.app import serve
from tower_progress.web.hub import Hub

WARMUP_S = 1.0
DRAIN_S = 1.0
RECORDING_CLIENTS = 50


# --- server process -----------------------------------------------------------------------


def job_template(index: int) -> JsonDict:
    """A running job with every field of DESIGN §4.1 filled in, as big as a real one."""
    return {
        "id": f"job-{index:04d}",
        "title": f"Anime episode 12, shot {index:03d}: city street at dusk, rain",
        "state": "running",
        "status_raw": "rendering",
        "stage": "sampling",
        "stage_label": "Sampling",
        "percent": 0.0,
        "step": 0,
        "steps": 30,
        "node": {"id": "3", "class_type": "KSampler", "title": "KSampler (main pass)"},
        "frames_done": None,
        "frames_total": 121,
        "velocity": {"percent_per_min": 12.5, "steps_per_s": 0.42, "frames_per_s": None},
        "eta_s": 312.4,
        "eta_at": "2026-01-07T12:05:12.400Z",
        "queue_position": 0,
        "prompt_id": f"5f0c2f7e-3b1c-4d8e-9a51-{index:012d}",
        "instance": "main",
        "visibility": "full",
        "error": None,
        "outputs": [],
        "created_at": "2026-01-07T11:58:00.000Z",
        "started_at": "2026-01-07T11:59:40.000Z",
        "updated_at": "2026-01-07T12:00:00.000Z",
        "finished_at": None,
        "elapsed_s": 20.0,
        "stale": False,
        "stalled": None,
        "last_seen_at": None,
        "stages": [
            {"stage": "loading", "started_at": "2026-01-07T11:59:40.000Z", "duration_s": 8.1},
            {"stage": "preparing", "started_at": "2026-01-07T11:59:48.100Z", "duration_s": 1.2},
            {"stage": "sampling", "started_at": "2026-01-07T11:59:49.300Z", "duration_s": None},
        ],
        "cached_nodes": ["4", "5", "6"],
    }


@dataclass
class Farm:
    """The jobs the benchmark updates; also the StateView both hubs take snapshots from."""

    count: int
    current: dict[str, JsonDict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i in range(self.count):
            template = job_template(i)
            self.current[template["id"]] = template

    def update(self, index: int, tick: int) -> JsonDict:
        job_id = f"job-{index:04d}"
        job = {
            **self.current[job_id],
            "percent": round(tick * 0.01 % 100, 2),
            "step": tick % 30,
            "bench_t": time.monotonic(),
        }
        self.current[job_id] = job
        return job

    def jobs(self) -> list[JsonDict]:
        return list(self.current.values())

    def job(self, job_id: str) -> JsonDict | None:
        return self.current.get(job_id)

    def resources(self) -> JsonDict | None:
        return None

    def sources(self) -> dict[str, JsonDict]:
        return {}


class NaiveHub:
    """The obvious design: per-client ``json.dumps``, unbounded queue, one send per message."""

    def __init__(self, farm: Farm) -> None:
        self._farm = farm
        self._clients: dict[web.WebSocketResponse, tuple[asyncio.Queue[str], list[int]]] = {}

    def queued(self) -> int:
        return sum(queue.qsize() for queue, _ in self._clients.values())

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, JobChanged):
                payload = {"type": "job", "job": event.job}
                for queue, seq in self._clients.values():
                    seq[0] += 1
                    queue.put_nowait(json.dumps({"seq": seq[0], **payload}))

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        queue: asyncio.Queue[str] = asyncio.Queue()
        seq = [1]
        queue.put_nowait(json.dumps({"seq": 1, "type": "snapshot", "jobs": self._farm.jobs()}))
        self._clients[ws] = (queue, seq)
        sender = asyncio.create_task(self._send(ws, queue))
        try:
            async for _ in ws:
                pass
        finally:
            del self._clients[ws]
            sender.cancel()
            await asyncio.wait([sender])
        return ws

    async def _send(self, ws: web.WebSocketResponse, queue: asyncio.Queue[str]) -> None:
        while True:
            await ws.send_str(await queue.get())


class BenchServer:
    def __init__(self, jobs: int, hz: float, batch_interval: float) -> None:
        self._farm = Farm(jobs)
        self._hz = hz
        self._ticks = [0] * jobs
        self.hub = Hub(self._farm, batch_interval=batch_interval)
        self.naive = NaiveHub(self._farm)

    async def run(self, request: web.Request) -> web.Response:
        """Publish for ``seconds`` to one design; answers the count and the CPU it took."""
        mode = request.query["mode"]
        warmup = float(request.query.get("warmup", 0))
        seconds = float(request.query["seconds"])
        publish = self.hub.publish if mode == "hub" else self.naive.publish
        await self._publish(publish, warmup)
        cpu0, wall0 = os.times(), time.monotonic()
        published = await self._publish(publish, seconds)
        cpu = os.times()
        wall = time.monotonic() - wall0
        return web.json_response(
            {
                "since": wall0,
                "published": published,
                "user": (cpu.user - cpu0.user) / wall,
                "system": (cpu.system - cpu0.system) / wall,
                "wall": wall,
            }
        )

    async def _publish(self, publish: Callable[[list[Event]], None], seconds: float) -> int:
        jobs = self._farm.count
        period = 1.0 / self._hz
        start = time.monotonic()
        due = [start + i * period / jobs for i in range(jobs)]
        published = 0
        while (now := time.monotonic()) < start + seconds:
            for i in range(jobs):
                if due[i] <= now:
                    self._ticks[i] += 1
                    publish([JobChanged(self._farm.update(i, self._ticks[i]))])
                    due[i] += period
                    published += 1
            await asyncio.sleep(max(0.0, min(due) - time.monotonic()))
        return published

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "rss": _rss(),
                "hub_dropped": self.hub.stats().clients_dropped,
                "naive_queued": self.naive.queued(),
            }
        )


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def server_main(port_out: Connection, jobs: int, hz: float, batch_interval: float) -> None:
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_serve(port_out, jobs, hz, batch_interval))


async def _serve(port_out: Connection, jobs: int, hz: float, batch_interval: float) -> None:
    bench = BenchServer(jobs, hz, batch_interval)
    app = web.Application()
    app.router.add_get("/ws", bench.hub.handle)
    app.router.add_get("/naive", bench.naive.handle)
    app.router.add_post("/run", bench.run)
    app.router.add_get("/stats", bench.stats)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runner = await serve(app, "127.0.0.1", port)
    port_out.send(port)
    await asyncio.get_running_loop().run_in_executor(None, port_out.recv)
    await runner.cleanup()


# --- client side --------------------------------------------------------------------------


@dataclass
class Recorder:
    """(publish time, latency) of updates published at or after ``since`` (monotonic s)."""

    since: float = float("inf")
    latencies: list[tuple[float, float]] = field(default_factory=list)


class Receiver(asyncio.Protocol):
    """A websocket client that only reads, at the least CPU per message Python allows.

    It walks the frame headers and looks for ``bench_t`` only in the last bytes of each
    payload, where the job JSON ends with it, so that it never scans the bulk of the stream.
    """

    def __init__(self, path: str, port: int, recorder: Recorder | None) -> None:
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
        self._recorder = recorder
        self._buf = bytearray()
        self._upgraded = False
        self.snapshot = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self._buf
        buf += data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(bytes(buf[:end]).decode())
            del buf[: end + 4]
            self._upgraded = True
        if self._recorder is None:
            if buf and not self.snapshot.done():
                self.snapshot.set_result(None)
            buf.clear()
            return
        pos, size = 0, len(buf)
        stamps = []
        while size - pos >= 2:
            short = buf[pos + 1]
            if short < 126:
                start = pos + 2
                end = start + short
            elif short == 126:
                start = pos + 4
                end = start + (buf[pos + 2] << 8 | buf[pos + 3])
            else:
                start = pos + 10
                end = start + int.from_bytes(buf[pos + 2 : pos + 10])
            if end > size:
                break
            mark = buf.rfind(b'"bench_t":', max(start, end - 48), end)
            if mark >= 0:
                stamps.append(buf[mark + 10 : end - 2])
            elif not self.snapshot.done():
                self.snapshot.set_result(None)
            pos = end
        del buf[:pos]
        recorder = self._recorder
        since = recorder.since
        recorder.latencies.extend((t, now - t) for t in map(float, stamps) if t >= since)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.snapshot.done():
            self.snapshot.set_exception(ConnectionError(f"closed before the snapshot: {exc}"))


async def connect_all(
    path: str, port: int, count: int, recorder: Recorder, every: int = 1
) -> list[Receiver]:
    """``count`` clients; every ``every``-th one (in connection order, which is the order
    the server writes in) records latencies, the others only drain their socket."""
    loop = asyncio.get_running_loop()
    receivers: list[Receiver] = []
    for i in range(count):
        records = recorder if i % every == 0 else None
        _, receiver = await loop.create_connection(
            partial(Receiver, path, port, records), "127.0.0.1", port
        )
        receivers.append(receiver)
    await asyncio.gather(*(r.snapshot for r in receivers))
    return receivers


def close_all(receivers: list[Receiver]) -> None:
    for receiver in receivers:
        if receiver.transport is not None:
            receiver.transport.close()


@dataclass
class Server:
    """A fresh server process per measurement, so that one run's garbage is not the next's."""

    jobs: int
    hz: float
    batch_interval: float
    port: int = 0

    async def __aenter__(self) -> Server:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._process = ctx.Process(
            target=server_main, args=(child, self.jobs, self.hz, self.batch_interval)
        )
        self._process.start()
        self.port = await asyncio.get_running_loop().run_in_executor(None, self._pipe.recv)
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        self._pipe.send("stop")
        await asyncio.get_running_loop().run_in_executor(None, self._process.join)

    async def run(self, mode: str, seconds: float, warmup: float = 0.0) -> dict[str, Any]:
        query = f"mode={mode}&seconds={seconds}&warmup={warmup}"
        url = f"http://127.0.0.1:{self.port}/run?{query}"
        async with self.session.post(url) as response:
            result: dict[str, Any] = await response.json()
            return result

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"http://127.0.0.1:{self.port}/stats") as response:
            result: dict[str, Any] = await response.json()
            return result


def path_of(mode: str) -> str:
    return "/ws" if mode == "hub" else "/naive"


async def latency_run(args: argparse.Namespace, mode: str, clients: int) -> dict[str, Any]:
    async with Server(args.jobs, args.hz, args.batch_interval) as server:
        recorder = Recorder()
        every = max(1, clients // RECORDING_CLIENTS)
        receivers = await connect_all(path_of(mode), server.port, clients, recorder, every)
        cpu0, wall0 = time.process_time(), time.monotonic()
        recorder.since = time.monotonic() + WARMUP_S
        run = await server.run(mode, args.seconds, warmup=WARMUP_S)
        await asyncio.sleep(DRAIN_S)
        client_cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        close_all(receivers)
    lat = sorted(latency for t, latency in recorder.latencies if t >= run["since"])
    expected = run["published"] * len(range(0, clients, every))
    return {
        "mode": mode,
        "clients": clients,
        "updates_per_s": run["published"] / run["wall"],
        "p50": _pct(lat, 0.50),
        "p99": _pct(lat, 0.99),
        "max": lat[-1] if lat else float("nan"),
        "delivered": len(lat) / expected if expected else float("nan"),
        "server_cpu": run["user"] + run["system"],
        "server_sys": run["system"],
        "client_cpu": client_cpu,
    }


async def memory_per_client(args: argparse.Namespace, mode: str, clients: int) -> float:
    async with Server(args.jobs, args.hz, args.batch_interval) as server:
        before = (await server.stats())["rss"]
        receivers = await connect_all(path_of(mode), server.port, clients, Recorder())
        after = (await server.stats())["rss"]
        close_all(receivers)
    return float(after - before) / clients


async def stuck_client(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    async with Server(args.jobs, args.hz, args.batch_interval) as server:
        healthy = await connect_all(path_of(mode), server.port, 1, Recorder())
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", server.port))
        stuck.sendall(
            f"GET {path_of(mode)} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n".encode()
        )
        base = (await server.stats())["rss"]
        publishing = asyncio.create_task(server.run(mode, args.stuck_seconds))
        peak = 0
        while not publishing.done():
            await asyncio.wait([publishing], timeout=0.5)
            peak = max(peak, (await server.stats())["rss"] - base)
        await publishing
        final = await server.stats()
        stuck.close()
        close_all(healthy)
    return {
        "mode": mode,
        "peak": peak,
        "end": final["rss"] - base,
        "dropped": final["hub_dropped"],
        "queued": final["naive_queued"],
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f} MiB"


async def main(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.clients.split(",")]
    print(
        f"{args.jobs} jobs x {args.hz:g} Hz, {args.seconds:g} s measured after {WARMUP_S:g} s "
        f"warm-up, {os.cpu_count()} CPUs"
    )
    print()
    print(
        f"{'design':<6} {'clients':>7} {'updates/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'delivered':>9} {'server CPU (sys)':>16} {'client CPU':>10}"
    )
    for clients in counts:
        for mode in ("hub", "naive"):
            r = await latency_run(args, mode, clients)
            print(
                f"{r['mode']:<6} {r['clients']:>7} {r['updates_per_s']:>9.0f} "
                f"{r['p50'] * 1000:>8.1f} {r['p99'] * 1000:>8.1f} {r['max'] * 1000:>8.1f} "
                f"{r['delivered']:>9.1%} {r['server_cpu']:>10.0%} ({r['server_sys']:>3.0%}) "
                f"{r['client_cpu']:>10.0%}"
            )
    print()
    most = max(counts)
    for mode in ("hub", "naive"):
        per_client = await memory_per_client(args, mode, most)
        print(
            f"{mode:<6} server memory per idle client ({most} clients): {per_client / 1024:.1f} KiB"
        )
    print()
    for mode in ("hub", "naive"):
        s = await stuck_client(args, mode)
        print(
            f"{mode:<6} one client never reading for {args.stuck_seconds:g} s: server RSS "
            f"+{_mib(s['peak'])} at peak, +{_mib(s['end'])} at the end; "
            + (
                f"disconnected: {s['dropped']}"
                if mode == "hub"
                else f"messages still queued: {s['queued']}"
            )
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,50,500")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--stuck-seconds", type=float, default=20.0)
    parser.add_argument("--batch-interval", type=float, default=0.02, help="Hub batch_interval")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
