"""A job producer that behaves like a render farm's production system.

For each job it inserts a ``production_jobs`` row (``pending``), submits the workflow to
ComfyUI, stores the ``prompt_id`` in ``comfyui_job_id`` and sets ``queued`` (or ``failed``
with the 400 error). A follower then learns each prompt's fate the way such systems do: its
own websocket (client id ``producer-…``, so it hears the start and end of the prompts it
submitted with that id) and ``/queue`` + ``/history`` polling for all of them; it moves the
row to ``processing``, then ``completed``, ``failed`` (with the error text) or ``canceled``.
Status only moves forward and never leaves a terminal status, whatever order the updates
race in. Without a database the producer submits and follows the same jobs with no rows,
numbering them itself and logging each job's submission and fate at INFO instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import re
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import aiohttp
import asyncpg

from tower_progress.simulate import workflows
from tower_progress.sources.db_retry import Backoff

_LOG = logging.getLogger(__name__)
JsonDict = dict[str, Any]
ClientIdMode = Literal["mixed", "own", "none"]
Kind = Literal["still", "video", "two_pass", "failing"]
KINDS: tuple[Kind, ...] = ("still", "video", "two_pass", "failing")
# What run() submits, in turn; "cancel" is a video the producer cancels shortly after.
MIX: tuple[Kind | Literal["cancel"], ...] = (
    "still",
    "video",
    "still",
    "two_pass",
    "cancel",
    "still",
    "failing",
    "video",
)
TERMINAL = ("completed", "failed", "canceled")
_EARLIER = {
    "queued": ("pending",),
    "processing": ("pending", "queued"),
    **{status: ("pending", "queued", "processing") for status in TERMINAL},
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VIDEO_LENGTHS = (17, 25, 33, 49, 65, 81, 97, 121)
_OUTCOME_EVENTS = frozenset(
    {"execution_start", "execution_success", "execution_error", "execution_interrupted"}
)


class _Mode(Enum):
    FROM_MODE = "from client_id_mode"


FROM_MODE = _Mode.FROM_MODE


def quote_table(table: str) -> str:
    """``schema.table`` or ``table`` as a quoted SQL identifier; ValueError when malformed."""
    parts = table.split(".")
    if len(parts) > 2 or not all(_IDENTIFIER.match(part) for part in parts):
        raise ValueError(f"table {table!r} is not a plain [schema.]table name")
    return ".".join(f'"{part}"' for part in parts)


@dataclass
class _Job:
    job_id: int
    prompt_id: str
    status: str = "queued"
    cancel_requested: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)


class Producer:
    """Inserts, submits and follows jobs; ``await close()`` when done.

    ``client_id_mode``: ``own`` submits every prompt with the producer's client id, ``none``
    with none, ``mixed`` picks per job; with a ``watcher_client_id`` (the daemon's id),
    ``mixed`` submits half the jobs with it, as a production system that wants full
    visibility would. ``poll_interval`` is the ``/queue`` + ``/history`` polling period;
    websocket events and status frames trigger a poll at once. ``dsn`` None: no database,
    no rows (see the module docstring).
    """

    def __init__(
        self,
        *,
        dsn: str | None,
        comfyui_url: str,
        table: str = "public.production_jobs",
        seed: int | None = None,
        client_id_mode: ClientIdMode = "mixed",
        poll_interval: float = 1.0,
        watcher_client_id: str | None = None,
    ) -> None:
        if client_id_mode not in ("mixed", "own", "none"):
            raise ValueError(f"client_id_mode must be mixed, own or none, got {client_id_mode!r}")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
        self._dsn = dsn
        self._url = comfyui_url.rstrip("/")
        self._table = quote_table(table)
        self._rng = random.Random(seed)
        self._mode = client_id_mode
        self._watcher_client_id = watcher_client_id
        self._poll_interval = poll_interval
        self.client_id = f"producer-{uuid.UUID(int=self._rng.getrandbits(128)).hex[:16]}"
        self._pool: asyncpg.Pool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._row_less_ids = itertools.count(1)
        self._fate_level = logging.DEBUG if dsn is not None else logging.INFO
        self._jobs: dict[str, _Job] = {}  # prompt id -> job, until the job settles
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._submitted = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def _started(self) -> tuple[asyncpg.Pool | None, aiohttp.ClientSession]:
        async with self._start_lock:
            if self._closed:
                raise RuntimeError("the producer is closed")
            if self._session is None:
                if self._dsn is not None:
                    self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=2)
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
                self._spawn(self._follow_socket(self._session), "producer-socket")
                self._spawn(self._poll_loop(self._pool, self._session), "producer-poll")
            return self._pool, self._session

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _LOG.error("producer task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Cancel and await every background task, then close the HTTP session and pool."""
        self._closed = True
        async with self._start_lock:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._session is not None:
                await self._session.close()
            if self._pool is not None:
                await self._pool.close()

    # --- submitting -----------------------------------------------------------------------------

    async def run(self, *, interval: float, count: int | None = None) -> None:
        """Submit the ``MIX`` of jobs about every ``interval`` seconds (jittered).

        With ``count``, return once that many jobs were submitted and all of them settled;
        without, run until cancelled. A database or ComfyUI outage is logged and the next
        job is tried after the interval.
        """
        if interval < 0:
            raise ValueError(f"interval must not be negative, got {interval!r}")
        if count is not None and count < 0:
            raise ValueError(f"count must not be negative, got {count!r}")
        submitted: list[str] = []
        while count is None or len(submitted) < count:
            kind = MIX[self._submitted % len(MIX)]
            self._submitted += 1
            try:
                job_id = await self.submit("video" if kind == "cancel" else kind)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                _LOG.warning("could not submit a %s job: %s", kind, exc)
            else:
                submitted.append(job_id)
                if kind == "cancel":
                    self._spawn(self._cancel_later(job_id, interval / 2), f"cancel-{job_id}")
            if count is None or len(submitted) < count:
                await asyncio.sleep(interval * self._rng.uniform(0.5, 1.5))
        await self.settled(submitted)

    async def submit(
        self,
        kind: Kind,
        *,
        client_id: str | _Mode | None = FROM_MODE,
        title: str | None = None,
    ) -> str:
        """Insert and submit one job of ``kind`` (see ``KINDS``); returns the row id.

        ``client_id`` defaults to what ``client_id_mode`` picks; pass one (say the daemon's)
        or None to choose.
        """
        graph, frames, default_title = self._workflow(kind)
        if client_id is FROM_MODE:
            client_id = self._pick_client_id()
        assert not isinstance(client_id, _Mode)
        return await self.submit_workflow(
            graph, title=title or default_title, total_frames=frames, client_id=client_id
        )

    def _pick_client_id(self) -> str | None:
        if self._mode != "mixed":
            return self.client_id if self._mode == "own" else None
        draw = self._rng.random()
        if self._watcher_client_id is None:
            return self.client_id if draw < 0.5 else None
        if draw < 0.5:
            return self._watcher_client_id
        return self.client_id if draw < 0.75 else None

    def _workflow(self, kind: str) -> tuple[workflows.Graph, int, str]:
        rng = self._rng
        seed = rng.randrange(2**32)
        match kind:
            case "still":
                steps = rng.choice((20, 25, 30))
                size = rng.choice((512, 768, 1024))
                batch = rng.choice((1, 1, 1, 4))
                graph = workflows.still(steps, size, size, batch, seed=seed, prefix=kind)
                return graph, batch, f"Still {size}x{size}, {steps} steps, batch {batch}"
            case "video":
                length = rng.choice(_VIDEO_LENGTHS)
                steps = rng.choice((20, 30))
                graph = workflows.video(length, steps, seed=seed, prefix=kind)
                frames = workflows.decoded_frames(length)
                return graph, frames, f"Video {frames} frames, {steps} steps"
            case "two_pass":
                graph = workflows.two_pass(30, 6, seed=seed, prefix=kind)
                return graph, 1, "SDXL base + refiner, 30 steps"
            case "failing":
                graph = workflows.failing(12, seed=seed, prefix=kind)
                return graph, 1, "Upscaled still (upscaler fails)"
        raise ValueError(f"unknown job kind {kind!r}: use one of {', '.join(KINDS)}")

    async def submit_workflow(
        self,
        graph: workflows.Graph,
        *,
        title: str,
        total_frames: int | None = None,
        client_id: str | None = None,
    ) -> str:
        """Insert a row for ``graph``, submit it, record the outcome; returns the row id."""
        pool, session = await self._started()
        job_id = await self._insert(pool, graph, title, total_frames)
        body: JsonDict = {"prompt": graph}
        if client_id is not None:
            body["client_id"] = client_id
        try:
            async with session.post(f"{self._url}/prompt", json=body) as response:
                answer = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            _LOG.warning("job %s: submitting to ComfyUI failed: %s", job_id, exc)
            await self._update(pool, job_id, None, "failed", f"ComfyUI unreachable: {exc}")
            return str(job_id)
        if status != 200 or not isinstance(answer, dict) or "prompt_id" not in answer:
            error = rejection_text(answer)
            _LOG.info("job %s: ComfyUI rejected the workflow: %s", job_id, error)
            await self._update(pool, job_id, None, "failed", error)
            return str(job_id)
        prompt_id = str(answer["prompt_id"])
        self._jobs[prompt_id] = _Job(job_id, prompt_id)
        await self._update(pool, job_id, prompt_id, "queued")
        owner = client_id or "none"
        if client_id is not None and client_id == self._watcher_client_id:
            owner = "the daemon's"
        _LOG.log(
            self._fate_level,
            "job %s (%s) submitted as prompt %s, client id %s",
            job_id,
            title,
            prompt_id,
            owner,
        )
        self._wake.set()
        return str(job_id)

    async def _insert(
        self, pool: asyncpg.Pool | None, graph: workflows.Graph, title: str, frames: int | None
    ) -> int:
        """The new row's id; without a database, the next number of our own."""
        if pool is None:
            return next(self._row_less_ids)
        job_id: int = await pool.fetchval(
            f"INSERT INTO {self._table} (title, status, total_frames, workflow) "
            "VALUES ($1, 'pending', $2, $3::jsonb) RETURNING id",
            title,
            frames,
            json.dumps(graph),
        )
        return job_id

    async def _update(
        self,
        pool: asyncpg.Pool | None,
        job_id: int,
        prompt_id: str | None,
        status: str,
        error: str | None = None,
    ) -> None:
        if pool is None:
            return
        await pool.execute(
            f"UPDATE {self._table} SET status = $2, error = COALESCE($3, error), "
            "comfyui_job_id = COALESCE($4, comfyui_job_id), updated_at = now() "
            "WHERE id = $1 AND status = ANY($5::text[])",
            job_id,
            status,
            error,
            prompt_id,
            list(_EARLIER[status]),
        )

    # --- canceling ----------------------------------------------------------------------------

    async def _cancel_later(self, job_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.cancel(job_id)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            _LOG.warning("job %s: canceling failed: %s", job_id, exc)

    async def cancel(self, job_id: str) -> None:
        """Cancel an open job: delete its prompt while pending, interrupt it while running."""
        job = next((j for j in self._jobs.values() if str(j.job_id) == job_id), None)
        if job is None:
            return
        _, session = await self._started()
        job.cancel_requested = True
        for _ in range(5):
            running, pending = await self._queue_ids(session)
            if job.prompt_id in pending:
                await self._post(session, "/queue", {"delete": [job.prompt_id]})
            elif job.prompt_id in running:
                await self._post(session, "/interrupt", {"prompt_id": job.prompt_id})
                return
            else:
                return

    async def _post(self, session: aiohttp.ClientSession, path: str, body: JsonDict) -> None:
        async with session.post(f"{self._url}{path}", json=body) as response:
            response.raise_for_status()

    # --- following ----------------------------------------------------------------------------

    async def settled(self, job_ids: list[str] | None = None) -> None:
        """Wait until the given jobs (default: every job still open) are terminal."""
        wanted = None if job_ids is None else set(job_ids)
        jobs = [j for j in self._jobs.values() if wanted is None or str(j.job_id) in wanted]
        for job in jobs:
            await job.settled.wait()

    async def _follow_socket(self, session: aiohttp.ClientSession) -> None:
        """The producer's own websocket: start and end of its prompts, status frames."""
        url = f"{self._url}/ws?clientId={self.client_id}".replace("http", "ws", 1)
        backoff = Backoff(base=0.5, cap=15.0, rng=self._rng)
        while True:
            try:
                async with session.ws_connect(url, heartbeat=20.0, max_msg_size=0) as ws:
                    backoff.reset()
                    self._wake.set()
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            self._on_message(json.loads(message.data))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                _LOG.warning("producer websocket to %s failed: %s", url, exc)
            await asyncio.sleep(backoff.next_delay())

    def _on_message(self, message: Any) -> None:
        """Queue changes and the start and end of our prompts trigger a poll at once."""
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "status" or kind in _OUTCOME_EVENTS:
            self._wake.set()

    async def _poll_loop(self, pool: asyncpg.Pool | None, session: aiohttp.ClientSession) -> None:
        backoff = Backoff(base=0.5, cap=15.0, rng=self._rng)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._poll(pool, session)
            except (aiohttp.ClientError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
                delay = backoff.next_delay()
                _LOG.warning("producer poll failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
            else:
                backoff.reset()

    async def _queue_ids(self, session: aiohttp.ClientSession) -> tuple[set[str], set[str]]:
        async with session.get(f"{self._url}/queue") as response:
            response.raise_for_status()
            queue = await response.json()
        running = {str(item[1]) for item in queue.get("queue_running", [])}
        pending = {str(item[1]) for item in queue.get("queue_pending", [])}
        return running, pending

    async def _poll(self, pool: asyncpg.Pool | None, session: aiohttp.ClientSession) -> None:
        """Queue first, then history for prompts that left it (the other order can miss one)."""
        open_jobs = list(self._jobs.values())
        if not open_jobs:
            return
        running, pending = await self._queue_ids(session)
        for job in open_jobs:
            if job.prompt_id in running:
                await self._advance(pool, job, "processing")
            elif job.prompt_id not in pending:
                async with session.get(f"{self._url}/history/{job.prompt_id}") as response:
                    response.raise_for_status()
                    history = await response.json()
                entry = history.get(job.prompt_id)
                if entry is None:
                    status = "canceled" if job.cancel_requested else "failed"
                    error = None if job.cancel_requested else "prompt vanished from ComfyUI"
                    await self._advance(pool, job, status, error)
                else:
                    await self._advance(pool, job, *outcome(entry))

    async def _advance(
        self, pool: asyncpg.Pool | None, job: _Job, status: str, error: str | None = None
    ) -> None:
        if job.status == status:
            return
        await self._update(pool, job.job_id, job.prompt_id, status, error)
        job.status = status
        level = self._fate_level if status in TERMINAL else logging.DEBUG
        _LOG.log(
            level,
            "job %s (prompt %s) %s%s",
            job.job_id,
            job.prompt_id,
            status,
            f": {error}" if error else "",
        )
        if status in TERMINAL:
            job.settled.set()
            del self._jobs[job.prompt_id]


def outcome(entry: JsonDict) -> tuple[str, str | None]:
    """Row status and error text for a ComfyUI history entry."""
    for event, data in reversed(entry.get("status", {}).get("messages", [])):
        if event == "execution_interrupted":
            return "canceled", None
        if event == "execution_error":
            message = str(data.get("exception_message", "")).strip()
            return "failed", (
                f"{data.get('node_type')} (node {data.get('node_id')}): "
                f"{data.get('exception_type')}: {message}"
            )
        if event == "execution_success":
            return "completed", None
    return "failed", "ComfyUI stored the prompt without an outcome"


def rejection_text(answer: Any) -> str:
    """One line from a ``POST /prompt`` 400 body: the error and each node's first problem."""
    if not isinstance(answer, dict) or not isinstance(answer.get("error"), dict):
        return f"ComfyUI rejected the workflow: {answer!r}"[:500]
    error = answer["error"]
    parts = [str(error.get("message", "rejected"))]
    for node_id, node in (answer.get("node_errors") or {}).items():
        for problem in node.get("errors", [])[:1]:
            parts.append(
                f"{node.get('class_type')} ({node_id}): {problem.get('message')} "
                f"({problem.get('details')})"
            )
    return "; ".join(parts)
