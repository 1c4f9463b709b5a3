"""``tower-progress simulate``: a fake ComfyUI on host:port and a job producer feeding it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from tower_progress.simulate.producer import Producer
from tower_progress.simulate.server import FakeComfyUI, PromptTransition

_LOG = logging.getLogger(__name__)


async def run_simulator(
    stop: asyncio.Event,
    *,
    host: str,
    port: int,
    speed: float,
    dsn: str | None,
    jobs_interval: float,
    jobs_table: str = "public.production_jobs",
    watcher_client_id: str | None = None,
    journal: Path | None = None,
    bridge_client_id: str | None = None,
    bridge_previews: bool = False,
    produce: bool = True,
) -> None:
    """Serve ``FakeComfyUI`` and, unless ``produce`` is False, run a ``Producer`` until ``stop``.

    With ``dsn`` each produced job is a row in ``jobs_table`` too; without, the producer
    submits the same jobs with no rows and logs each one's submission and outcome.

    With ``watcher_client_id`` (the daemon's client id), half the produced jobs are submitted
    with it, so a demo shows every visibility level: full, partial and coarse.
    ``bridge_client_id`` runs the fake ComfyUI with the bridge installed for that watcher id
    (``bridge_previews``: it mirrors previews too), so every prompt is full for that client.

    ``jobs_table`` must exist with the reference columns
    (``sql/reference/production_jobs.sql``). If the producer stops with an error, everything
    is shut down and the error is raised. ``stop`` may be passed by position or keyword.

    With ``journal``, every prompt transition (queued, started, completed, failed,
    interrupted, deleted) is appended to that file as a JSON line the moment it happens, so
    what really happened survives even a killed simulator.
    """
    writer = _Journal(journal) if journal is not None else None
    sim = FakeComfyUI(
        speed=speed,
        bridge_client_id=bridge_client_id,
        bridge_previews=bridge_previews,
        on_transition=writer,
    )
    runner = web.AppRunner(sim.app, access_log=None)
    await runner.setup()
    producer: Producer | None = None
    producing: asyncio.Task[None] | None = None
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"
        bridged = " with the bridge installed" if bridge_client_id is not None else ""
        _LOG.info("fake ComfyUI listening on %s (speed %g)%s", url, speed, bridged)
        waiting: set[asyncio.Task[Any]] = {asyncio.create_task(stop.wait(), name="simulator-stop")}
        if produce:
            if dsn is None:
                _LOG.info("no database: jobs are submitted to the fake ComfyUI without rows")
            producer = Producer(
                dsn=dsn, comfyui_url=url, table=jobs_table, watcher_client_id=watcher_client_id
            )
            producing = asyncio.create_task(
                producer.run(interval=jobs_interval), name="simulator-producer"
            )
            waiting.add(producing)
        done, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if producing is not None and producing in done:
            producing.result()
    finally:
        if producer is not None:
            await producer.close()
        await sim.close()
        await runner.cleanup()
        if writer is not None:
            writer.close()
        _LOG.info("fake ComfyUI stopped")


class _Journal:
    """Appends each transition as a JSON line, written through at once; opened on first use."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: TextIO | None = None

    def __call__(self, transition: PromptTransition) -> None:
        if self._file is None:
            self._file = self._path.open("a", buffering=1)
        self._file.write(json.dumps(asdict(transition)) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
