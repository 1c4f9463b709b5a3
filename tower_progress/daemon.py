"""The composition root: builds every collaborator from settings, runs them, stops them.

Data flows one way (DESIGN §2): sources emit observations into ``Pipeline.emit``, which folds
them through the tracker and hands the resulting events to the hub (browsers) and to history
(samples, priors). Every background task is owned by ``run`` and awaited at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from tower_progress.clock import wait_for_tick
from tower_progress.config import ComfyInstance, Settings
from tower_progress.core.model import (
    Event,
    JobChanged,
    JobFinished,
    JobRemoved,
    JobState,
    JsonDict,
    Observation,
    Tick,
)
from tower_progress.core.status import StatusMap
from tower_progress.core.tracker import InstanceConfig, Tracker, TrackerConfig
from tower_progress.sdnotify import Notifier, watchdog_loop
from tower_progress.simulate.runner import run_simulator
from tower_progress.sources.comfyui import ComfyError, ComfySource
from tower_progress.sources.database import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    History,
    JobTableListener,
    MigrationError,
    SchemaError,
    WriteBack,
    migrate,
)
from tower_progress.sources.db_retry import describe
from tower_progress.sources.db_supervisor import EmbeddedSupervisor
from tower_progress.sources.resources import ResourceSampler
from tower_progress.web.app import create_app, default_allowed_hosts, serve
from tower_progress.web.hub import Hub
from tower_progress.web.metrics import Metrics

log = logging.getLogger(__name__)

TICK_S = 1.0
SHUTDOWN_GRACE_S = 4.0
# How long a row marked completed waits for ComfyUI's own end of its prompt (a production
# system that learns of the end first can update the row before our websocket delivers it).
FINISH_GRACE_S = 2.0
_DATABASE_STARTUP_ERRORS = (
    EmbeddedPostgresError,
    MigrationError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


class StartupError(Exception):
    """The daemon cannot start for a reason the operator must fix (a read-only state
    directory, an unreachable database, a port in use); ``str()`` is one line naming it."""


@dataclass(frozen=True, slots=True)
class Simulation:
    """Run the bundled simulator next to the daemon (``--simulate``)."""

    port: int = 8188
    speed: float = 1.0
    jobs_interval_s: float = 6.0


class Pipeline:
    """Observations in, events out: the single path from sources to tracker to consumers."""

    def __init__(
        self,
        tracker: Tracker,
        hub: Hub,
        metrics: Metrics,
        history: History | None,
        write_back: WriteBack | None,
    ) -> None:
        self.tracker = tracker
        self._hub = hub
        self._metrics = metrics
        self._history = history
        self._write_back = write_back
        self._states: dict[str, str] = {}

    def emit(self, observation: Observation) -> None:
        now = time.time()
        events = self.tracker.apply(observation, now)
        if events:
            self._dispatch(events, now)

    def _dispatch(self, events: list[Event], now: float) -> None:
        self._hub.publish(events)
        self._metrics.observe(events)
        for event in events:
            if isinstance(event, JobChanged):
                job = event.job
                if job["state"] == JobState.RUNNING and self._history is not None:
                    self._history.record_sample(
                        job["id"], now, job["percent"], job["stage"], job["step"]
                    )
                if self._write_back is not None:
                    self._write_back.update(job)
                self._log_transition(job)
            elif isinstance(event, JobFinished) and self._history is not None:
                self._history.record_finished(event)
            elif isinstance(event, JobRemoved):
                self._states.pop(event.id, None)
                if self._history is not None:
                    self._history.forget(event.id)

    def _log_transition(self, job: JsonDict) -> None:
        """One INFO line per state change; progress itself is never logged."""
        state = job["state"]
        if self._states.get(job["id"]) == state:
            return
        self._states[job["id"]] = state
        error = job["error"]["message"] if job.get("error") else None
        log.info(
            "job %s prompt %s: %s%s",
            job["id"],
            job["prompt_id"],
            state,
            f" ({error})" if error else "",
        )


class Controls:
    """Cancel for the web layer: interrupt a running prompt, delete a waiting one."""

    def __init__(self, tracker: Tracker, sources: dict[str, ComfySource]) -> None:
        self._tracker = tracker
        self._sources = sources

    async def cancel(self, job_id: str) -> str:
        if self._tracker.job(job_id) is None:
            raise LookupError(job_id)
        target = self._tracker.prompt_target(job_id)
        if target is None:
            raise ValueError("this job has no ComfyUI prompt to cancel")
        instance, prompt_id, state = target
        if state.terminal:
            raise ValueError(f"the prompt already ended ({state.value})")
        source = self._sources.get(instance)
        if source is None:
            raise ValueError(f"ComfyUI instance {instance!r} is not configured")
        try:
            return await source.cancel(prompt_id, running=state is JobState.RUNNING)
        except ComfyError as exc:
            raise ValueError(str(exc)) from None


def tracker_config(settings: Settings) -> TrackerConfig:
    return TrackerConfig(
        instances={i.name: InstanceConfig(i.client_id, i.bridge) for i in settings.comfyui},
        status_map=StatusMap(settings.status_map),
        finished_cap=settings.finished_cap,
        stall_factor=settings.stall_factor,
        stall_min_s=settings.stall_min_s,
        progress_interval_s=settings.progress_interval_s,
        finish_grace_s=FINISH_GRACE_S,
        resources_stale_s=max(10.0, 5 * settings.resources_interval_s),
    )


async def _ticker(emit: Callable[[Observation], None], stop: asyncio.Event) -> None:
    """A ``Tick`` every second, so stalls are noticed without new input."""
    while not await wait_for_tick(stop, TICK_S):
        emit(Tick())


@dataclass(frozen=True, slots=True)
class Database:
    """An open database: its DSN, the migrations just applied, and for the embedded server
    the supervisor that restarts it (run as a worker)."""

    dsn: str
    applied: list[str]
    supervisor: EmbeddedSupervisor | None


@contextlib.asynccontextmanager
async def open_database(settings: Settings, *, simulated: bool = False) -> AsyncIterator[Database]:
    """The configured database, or the embedded one started in the state directory, with our
    migrations applied; the embedded server is stopped on exit. A simulation gets a database
    of its own so demo jobs never mix with real history."""
    embedded: EmbeddedPostgres | None = None
    dsn = settings.database_url
    data_dir = Path(settings.state_dir) / ("postgres-simulate" if simulated else "postgres")
    try:
        if dsn is None:
            embedded = EmbeddedPostgres()
            dsn = await asyncio.to_thread(embedded.start, data_dir)
        applied = await migrate(dsn)
    except _DATABASE_STARTUP_ERRORS as exc:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        if isinstance(exc, EmbeddedPostgresError):
            raise StartupError(str(exc)) from exc
        where = "embedded" if embedded is not None else _without_credentials(dsn or "")
        raise StartupError(f"database {where}: {describe(exc)}") from exc
    try:
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        supervisor = None if embedded is None else EmbeddedSupervisor(embedded, data_dir, dsn)
        yield Database(dsn, applied, supervisor)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def _without_credentials(dsn: str) -> str:
    return dsn.rsplit("@", 1)[-1]


async def run(
    settings: Settings, *, stop: asyncio.Event | None = None, simulation: Simulation | None = None
) -> int:
    """Run until SIGTERM/SIGINT or ``stop``; returns the process exit code: 0 after a stop,
    1 when a worker died (so that systemd's ``Restart=on-failure`` restarts the service).
    Raises ``StartupError`` when the database or the listening socket cannot be set up."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    notifier = Notifier()
    notifier.status("starting")
    try:
        async with open_database(settings, simulated=simulation is not None) as database:
            history = await History.open(database.dsn, retention_days=settings.history_days)
            try:
                healthy = await _serve(settings, database, history, notifier, stop, simulation)
            finally:
                await history.close()
    finally:
        notifier.stopping()
        log.info("tower-progress stopped")
    return 0 if healthy else 1


async def _serve(
    settings: Settings,
    database: Database,
    history: History,
    notifier: Notifier,
    stop: asyncio.Event,
    simulation: Simulation | None,
) -> bool:
    """Serve until ``stop``; False when a worker died."""
    dsn = database.dsn
    tracker = Tracker(tracker_config(settings), await history.load_priors())
    hub = Hub(tracker)
    metrics = Metrics()
    terminal = StatusMap(settings.status_map).terminal_statuses()
    write_back = (
        WriteBack(
            dsn=dsn,
            jobs_table=settings.jobs_table,
            id_column=settings.columns["id"],
            status_column=settings.columns["status"],
            columns=settings.write_back_columns,
            terminal_statuses=terminal,
        )
        if settings.write_back
        else None
    )
    pipeline = Pipeline(tracker, hub, metrics, history, write_back)
    workers: list[tuple[str, Callable[[asyncio.Event], Coroutine[Any, Any, None]]]] = []
    instances = settings.comfyui
    if simulation is not None:
        instances = (
            replace(instances[0], url=f"http://127.0.0.1:{simulation.port}"),
            *instances[1:],
        )
        workers.append(
            ("simulator", _simulator(simulation, dsn, settings.jobs_table, instances[0]))
        )
    sources = {i.name: _comfy_source(i, pipeline, settings.progress_interval_s) for i in instances}
    listener = JobTableListener(
        dsn=dsn,
        jobs_table=settings.jobs_table,
        columns=settings.columns,
        emit=pipeline.emit,
        reconcile_interval=settings.reconcile_interval_s,
        trigger=settings.trigger,
        terminal_statuses=terminal,
    )
    sampler = ResourceSampler(
        interval=settings.resources_interval_s,
        comfyui_port=_port_of(instances[0]),
        comfyui_pid=settings.comfyui_pid,
        emit=pipeline.emit,
    )
    workers += [
        ("database", listener.run),
        ("resources", sampler.run),
        ("history", history.run),
        ("ticker", functools.partial(_ticker, pipeline.emit)),
        ("watchdog", functools.partial(watchdog_loop, notifier)),
        *((f"comfyui:{name}", source.run) for name, source in sources.items()),
    ]
    if write_back is not None:
        workers.append(("write_back", write_back.run))
    if database.supervisor is not None:
        workers.append(("embedded database", database.supervisor.run))
    allowed = default_allowed_hosts(settings.host, settings.port) | set(settings.allowed_hosts)
    app = create_app(
        hub=hub,
        state=tracker,
        history=history,
        controls=Controls(tracker, sources),
        metrics=metrics,
        token=settings.token,
        allowed_hosts=allowed,
    )
    try:
        await listener.check()
    except SchemaError as exc:
        raise StartupError(str(exc)) from exc
    try:
        runner = await serve(app, settings.host, settings.port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {reason}") from exc
    tasks = [asyncio.create_task(fn(stop), name=name) for name, fn in workers]
    try:
        notifier.ready()
        notifier.status(f"serving http://{settings.host}:{settings.port}")
        log.info("tower-progress serving on http://%s:%d", settings.host, settings.port)
        return await _wait(stop, tasks)
    finally:
        stop.set()
        notifier.stopping()
        log.info("tower-progress stopping")
        await hub.close_all(1001)
        _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()


async def _wait(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> bool:
    """Return when ``stop`` is set: True, or False when a worker died (logged, and it stops
    the daemon: a half-working daemon would look alive to systemd)."""
    stopper = asyncio.create_task(stop.wait())
    pending: set[asyncio.Task[object]] = {stopper, *tasks}
    healthy = True
    while not stop.is_set():
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                log.error("worker %s died: %r", task.get_name(), task.exception())
                healthy = False
                stop.set()
    stopper.cancel()
    return healthy


def _comfy_source(instance: ComfyInstance, pipeline: Pipeline, pace_s: float) -> ComfySource:
    """Reading is paced to the interval at which progress goes to the page."""
    tracker = pipeline.tracker
    return ComfySource(
        name=instance.name,
        url=instance.url,
        client_id=instance.client_id,
        emit=pipeline.emit,
        unresolved=tracker.unresolved_prompts,
        needs_polling=tracker.needs_polling,
        read_pace_s=pace_s,
    )


def _port_of(instance: ComfyInstance) -> int | None:
    parts = urlsplit(instance.url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    return parts.port or (443 if parts.scheme == "https" else 80)


def _simulator(
    simulation: Simulation, dsn: str, jobs_table: str, instance: ComfyInstance
) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
    """The simulator in the first instance's place, bridged when that instance says so."""
    return functools.partial(
        run_simulator,
        host="127.0.0.1",
        port=simulation.port,
        speed=simulation.speed,
        dsn=dsn,
        jobs_table=jobs_table,
        jobs_interval=simulation.jobs_interval_s,
        watcher_client_id=instance.client_id,
        bridge_client_id=instance.client_id if instance.bridge else None,
    )
