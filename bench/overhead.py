"""What the daemon costs a render box: CPU (% of one core) and RSS of ``tower-progress serve``.

Run: ``.venv/bin/python bench/overhead.py [--steady-s 60] [--jobs 600] [--churn 5000]
[--profile DIR]``.

The daemon runs as systemd would run it (``python -m tower_progress serve``, settings in its
environment) against a FakeComfyUI and a job producer in this process and an embedded
PostgreSQL started here. Next to it runs an idle reference, ``python -c "import asyncio;
asyncio.run(asyncio.Event().wait())"``, measured over the same windows: what any Python process
costs doing nothing. CPU is process CPU time over wall time (100 % = one core).

Phases, in order:

1. **idle**: ComfyUI connected, no job, 5 websocket clients.
2. **steady**: one job sampling at 20 steps/s (FakeComfyUI at real speed, a 512x512 step is
   50 ms) with 5 clients: the state the box is in for hours. Twice: submitted with the
   daemon's own client id (ComfyUI then sends the daemon every preview too), then by a
   production system with its own id, seen through the bridge installed in the fake ComfyUI
   (previews not mirrored, the bridge's default).
3. **hour**: an hour of a render farm compressed: ``--jobs`` jobs of the producer's mix (stills,
   videos, two-pass, failing, canceled; half submitted with the daemon's client id, half
   without) at ``--speed``, 3 clients.
4. **churn**: ``--churn`` more stills as fast as they go, with ``tracker.finished_cap`` at 100,
   RSS read after every 250 finished jobs: memory must stay flat once the cap is reached.

``--profile DIR`` runs the daemon under cProfile and writes ``DIR/daemon.prof`` and the top of
it by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import pstats
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import websockets
from aiohttp import web

from tower_progress.simulate import workflows
from tower_progress.simulate.producer import Producer
from tower_progress.simulate.server import FakeComfyUI
from tower_progress.sources.database import EmbeddedPostgres

WATCHER_ID = "tower-progress-bench-overhead"
# The steady job as the daemon's own (ComfyUI sends it the previews too) and as a production
# system's, seen through the bridge (which mirrors no previews by default).
STEADY = (
    ("1 job at 20 steps/s, 5 clients", WATCHER_ID),
    ("the same through the bridge", "render-farm-producer"),
)
IDLE_REFERENCE = "import asyncio; asyncio.run(asyncio.Event().wait())"
RSS_EVERY_JOBS = 250


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Meter:
    """CPU, wake-ups and RSS of one process, between ``start()`` and the readings.

    Wake-ups are the voluntary context switches of its main thread, where the event loop
    runs: each is one sleep in epoll ended by a timer or a socket (Linux's
    ``/proc/PID/task/PID/status``)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self._status = Path(f"/proc/{pid}/task/{pid}/status")
        self._wall = 0.0
        self._cpu = 0.0
        self._switches = 0
        self.peak_rss = 0

    def _cpu_seconds(self) -> float:
        times = self.proc.cpu_times()
        return float(times.user + times.system)

    def _voluntary_switches(self) -> int:
        for line in self._status.read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
        raise RuntimeError(f"{self._status} has no voluntary_ctxt_switches")

    def start(self) -> None:
        self._wall, self._cpu = time.monotonic(), self._cpu_seconds()
        self._switches = self._voluntary_switches()
        self.peak_rss = self.rss()

    def rss(self) -> int:
        rss = int(self.proc.memory_info().rss)
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def cpu_percent(self) -> float:
        return 100 * (self._cpu_seconds() - self._cpu) / (time.monotonic() - self._wall)

    def wakeups_per_s(self) -> float:
        return (self._voluntary_switches() - self._switches) / (time.monotonic() - self._wall)


@dataclass
class Row:
    phase: str
    seconds: float
    jobs: int
    cpu: float
    wakeups: float
    rss_start: int
    rss_end: int
    rss_peak: int
    idle_cpu: float
    idle_rss: int


class Clients:
    """``count`` websocket clients that read everything the daemon sends."""

    def __init__(self, url: str, origin: str, count: int) -> None:
        self._url, self._origin, self._count = url, origin, count
        self.messages = 0
        self.steps = 0
        self.stepping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Clients:
        ready = [asyncio.Event() for _ in range(self._count)]
        self._tasks = [asyncio.create_task(self._read(event)) for event in ready]
        await asyncio.gather(*(event.wait() for event in ready))
        return self

    async def __aexit__(self, *_: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(self, ready: asyncio.Event) -> None:
        async with websockets.connect(
            self._url, origin=websockets.Origin(self._origin), max_size=None
        ) as ws:
            ready.set()
            async for frame in ws:
                self.messages += 1
                if '"step":' in frame and '"step":null' not in frame:
                    self.steps += 1
                    self.stepping.set()


class Comfy:
    """A FakeComfyUI on a fixed port that can be replaced by one of another speed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._runner: web.AppRunner | None = None
        self._fake: FakeComfyUI | None = None

    async def serve(self, speed: float, *, bridge: bool = False) -> None:
        """Serve at ``speed``; with ``bridge``, the tower-progress bridge is installed for the
        daemon's id (previews not mirrored, its default)."""
        await self.stop()
        self._fake = FakeComfyUI(
            speed=speed, seed=1, bridge_client_id=WATCHER_ID if bridge else None
        )
        self._runner = web.AppRunner(self._fake.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._fake is not None and self._runner is not None:
            await self._fake.close()
            await self._runner.cleanup()
        self._fake = self._runner = None


@contextlib.contextmanager
def _database(base: Path) -> Iterator[str]:
    server = EmbeddedPostgres(runtime_dir=base / "run")
    try:
        yield server.start(base / "pgdata")
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def _process(
    argv: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _healthy(url: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if proc.returncode is not None:
                text = await asyncio.to_thread(log.read_text)
                raise SystemExit(f"daemon exited with {proc.returncode}:\n{text}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/api/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise SystemExit(f"daemon never became healthy:\n{await asyncio.to_thread(log.read_text)}")


async def _measure(
    name: str, daemon: Meter, idle: Meter, rows: list[Row], work: asyncio.Future[int] | float
) -> Row:
    """Measure both processes while ``work`` runs (a future giving a job count) or for that
    many seconds; RSS is read every second for the peak."""
    daemon.start()
    idle.start()
    rss_start, began = daemon.rss(), time.monotonic()
    if isinstance(work, float):
        work = asyncio.ensure_future(asyncio.sleep(work, result=0))
    while not work.done():
        await asyncio.wait([work], timeout=1.0)
        daemon.rss()
    row = Row(
        name,
        time.monotonic() - began,
        work.result(),
        daemon.cpu_percent(),
        daemon.wakeups_per_s(),
        rss_start,
        daemon.rss(),
        daemon.peak_rss,
        idle.cpu_percent(),
        idle.rss(),
    )
    rows.append(row)
    print(
        f"  {name}: {row.seconds:.0f} s, daemon {row.cpu:.2f} % CPU, "
        f"{row.wakeups:.1f} wake-ups/s, {row.rss_end >> 20} MiB"
    )
    return row


async def _steady_job(producer: Producer, seconds: float, client_id: str) -> str:
    """A 512x512 still long enough to sample at 20 steps/s for the whole window."""
    steps = int(seconds * 20) + 200
    graph = workflows.still(steps=steps, seed=3)
    return await producer.submit_workflow(graph, title="steady 20 steps/s", client_id=client_id)


async def _churn(producer: Producer, count: int, daemon: Meter, rss: list[int]) -> int:
    """``count`` small stills (4 steps, 512x512), RSS read after every ``RSS_EVERY_JOBS``."""
    done = 0
    while done < count:
        batch = min(RSS_EVERY_JOBS, count - done)
        ids = [
            await producer.submit_workflow(
                workflows.still(steps=4, seed=done + i), title=f"churn {done + i}"
            )
            for i in range(batch)
        ]
        await producer.settled(ids)
        done += batch
        rss.append(daemon.rss())
    return done


async def run(args: argparse.Namespace) -> list[Row]:
    base = Path(tempfile.mkdtemp(prefix="tp-bench-"))
    rows: list[Row] = []
    churn_rss: list[int] = []
    try:
        with _database(base) as dsn:
            comfy = Comfy(_free_port())
            await comfy.serve(1.0, bridge=True)
            port = _free_port()
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(base),
                "TOWER_PROGRESS_STATE_DIR": str(base / "state"),
                "TOWER_PROGRESS_PORT": str(port),
                "TOWER_PROGRESS_DATABASE_URL": dsn,
                "TOWER_PROGRESS_COMFYUI_URL": comfy.url,
                "TOWER_PROGRESS_COMFYUI_CLIENT_ID": WATCHER_ID,
                "TOWER_PROGRESS_FINISHED_CAP": "100",
            }
            argv = [sys.executable]
            if args.profile:
                argv += ["-m", "cProfile", "-o", str(Path(args.profile) / "daemon.prof")]
            argv += ["-m", "tower_progress", "serve"]
            url = f"http://127.0.0.1:{port}"
            log = base / "daemon.log"
            async with (
                _process(argv, env, log) as proc,
                _process([sys.executable, "-c", IDLE_REFERENCE], env, base / "idle.log") as ref,
            ):
                await _healthy(url, proc, log)
                daemon, idle = Meter(proc.pid), Meter(ref.pid)
                producer = Producer(dsn=dsn, comfyui_url=comfy.url, seed=7)
                ws_url, origin = f"ws://127.0.0.1:{port}/ws", url
                try:
                    async with Clients(ws_url, origin, 5) as clients:
                        print("measuring (the whole run takes a few minutes)")
                        await _measure("idle, 5 clients", daemon, idle, rows, args.idle_s)
                        for name, client_id in STEADY:
                            job = await _steady_job(producer, args.steady_s + 5, client_id)
                            await clients.stepping.wait()
                            steps = clients.steps
                            row = await _measure(name, daemon, idle, rows, args.steady_s)
                            rate = (clients.steps - steps) / 5 / row.seconds
                            print(f"  each client saw {rate:.1f} step updates/s")
                            await producer.cancel(job)
                            await producer.settled([job])
                            clients.stepping.clear()
                    await comfy.serve(args.speed)
                    await _healthy(url, proc, log)
                    async with Clients(ws_url, origin, 3):
                        hour = asyncio.ensure_future(_hour(producer, args.jobs, args.interval))
                        await _measure(f"{args.jobs} jobs (an hour)", daemon, idle, rows, hour)
                        churn = asyncio.ensure_future(
                            _churn(producer, args.churn, daemon, churn_rss)
                        )
                        await _measure(f"{args.churn} more stills", daemon, idle, rows, churn)
                finally:
                    await producer.close()
                    await comfy.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    _print(rows, churn_rss)
    if args.profile:
        _print_profile(Path(args.profile) / "daemon.prof")
    return rows


async def _hour(producer: Producer, jobs: int, interval: float) -> int:
    await producer.run(interval=interval, count=jobs)
    return jobs


def _print(rows: list[Row], churn_rss: list[int]) -> None:
    mib = 1 << 20
    print()
    print(
        f"{'phase':34} {'s':>5} {'jobs':>5} {'CPU %':>6} {'wake/s':>6} "
        f"{'RSS MiB start/end/peak':>23} {'idle CPU %':>10} {'idle RSS':>8}"
    )
    for r in rows:
        rss = f"{r.rss_start / mib:.1f}/{r.rss_end / mib:.1f}/{r.rss_peak / mib:.1f}"
        print(
            f"{r.phase:34} {r.seconds:5.0f} {r.jobs:5d} {r.cpu:6.2f} {r.wakeups:6.1f} "
            f"{rss:>23} {r.idle_cpu:10.2f} {r.idle_rss / mib:8.1f}"
        )
    if churn_rss:
        steps = ", ".join(f"{rss / mib:.1f}" for rss in churn_rss)
        print(f"\nRSS MiB after every {RSS_EVERY_JOBS} finished stills (cap 100): {steps}")


def _print_profile(path: Path) -> None:
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(str(path), stream=out).sort_stats(order).print_stats(25)
        print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle-s", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument("--steady-s", type=float, default=60.0, help="steady window, seconds")
    parser.add_argument("--jobs", type=int, default=600, help="jobs in the compressed hour")
    parser.add_argument("--speed", type=float, default=0.02, help="simulator time factor")
    parser.add_argument("--interval", type=float, default=0.15, help="seconds between jobs")
    parser.add_argument("--churn", type=int, default=5000, help="stills for the memory check")
    parser.add_argument("--profile", help="directory for the daemon's cProfile output")
    args = parser.parse_args()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
