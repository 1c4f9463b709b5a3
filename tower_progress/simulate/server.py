"""A fake ComfyUI that a watcher cannot tell from a real ComfyUI v0.8.0 server.

Routes, bodies, message order and routing follow ``shared/comfyui-protocol.md`` and the real
recordings in tests/fixtures/comfyui: the ``/ws`` handshake (status with ``sid``, the
reconnect ``executing`` frame, feature-flag negotiation, the duplicate-client-id quirk),
``POST /prompt`` with ComfyUI's validation and 400 bodies, the heap-ordered ``/queue``,
``/history``, ``/api/jobs``, ``/interrupt`` (global or targeted, effective at the next step or
node), queue delete/clear, ``/free`` and ``/system_stats``; every route also under ``/api``.
One worker task runs prompts one at a time (``executor.PromptExecutor``); every message goes
through one ordered queue (``sockets.SocketHub``).

Bridge mode is this server with the tower-progress bridge installed: the real
``comfyui_bridge.bridge.Bridge``, wrapping the hub and the executor as it wraps ComfyUI's
``PromptServer`` and ``PromptExecutor``, so the watcher id receives every event of every
prompt and every other client and HTTP answer stays as without it (bridge notes §1).

``history_log`` records what really happened to each prompt, for tests that compare a
watcher's view with the truth: ``queued``, ``started``, then ``completed``, ``failed`` or
``interrupted`` (stored in history), or ``deleted`` (removed from the queue, never in history).
It keeps the newest ``HISTORY_LOG_LIMIT`` transitions, so a long demo run stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import logging
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from tower_progress.simulate.executor import PromptExecutor, RunState, Timing
from tower_progress.simulate.jobs import JobQuery, JobQueryError, find_job, list_jobs
from tower_progress.simulate.prompt_queue import PromptQueue, QueuedPrompt
from tower_progress.simulate.sockets import SocketHub
from tower_progress.simulate.validation import validate_prompt
from tower_progress.simulate.versions import Features

_LOG = logging.getLogger(__name__)
JsonDict = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TransitionEvent = Literal["queued", "started", "completed", "failed", "interrupted", "deleted"]

PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
SERVER_FEATURES: JsonDict = {
    "supports_preview_metadata": True,
    "max_upload_size": 104857600,
    "extension": {"manager": {"supports_v4": True}},
}
_GPU_NAME = "cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync"
_VRAM_TOTAL = 85_520_809_984
_VRAM_RESERVED = 503_316_480
_WORKING_SET = 2 << 30
_RAM_TOTAL = 135_090_417_664
HISTORY_LOG_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class PromptTransition:
    """One thing that happened to a prompt; ``time`` is wall-clock epoch seconds."""

    prompt_id: str
    event: TransitionEvent
    time: float


def _own_executor_class() -> type[PromptExecutor]:
    class BridgedPromptExecutor(PromptExecutor):
        """One server's own class: its bridge wraps these methods, no other server's."""

    return BridgedPromptExecutor


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_loopback(hostname: str | None) -> bool:
    if hostname is None:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        return False


@web.middleware
async def _origin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ComfyUI's ``origin_only_middleware``: a foreign Origin on a loopback Host gets 403."""
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host and origin:
        host_domain = host.lower()
        parsed_origin = urlsplit(origin.lower())
        parsed_host = urlsplit("//" + host_domain)
        origin_domain = parsed_origin.netloc
        with contextlib.suppress(ValueError):
            if parsed_origin.port is None:
                host_domain = parsed_host.hostname or ""
            if parsed_host.port is None:
                origin_domain = parsed_origin.hostname or ""
        mismatch = host_domain and origin_domain and host_domain != origin_domain
        if mismatch and _is_loopback(parsed_host.hostname):
            _LOG.warning("request with non matching host and origin %s != %s", host, origin)
            return web.Response(status=403)
    return await handler(request)


class _BadRequest(Exception):
    pass


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise _BadRequest(f"request body is not valid JSON: {exc}") from exc


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


class FakeComfyUI:
    """A ComfyUI v0.8.0 stand-in; serve ``app`` with aiohttp and ``await close()`` at the end.

    ``speed`` multiplies every duration (tests use e.g. 0.05). ``step_seconds`` is one sampler
    step of a 512x512 image, ``load_seconds`` a checkpoint load, ``frame_seconds`` decoding or
    encoding one 512x512 frame; larger latents and more frames cost proportionally more.
    ``seed`` makes ids, jitter and preview names reproducible. ``version`` switches the
    behaviours that changed between releases (``versions.Features``). ``preview_method`` is the
    server's ``--preview-method``: ``none`` sends no previews unless a prompt asks for them.
    ``bridge_client_id`` installs the bridge with that watcher id (exact match), and
    ``bridge_previews`` makes it mirror binary frames too; the bridge's own ``ConfigError``
    (a ValueError) rejects an id that is no secret. ``on_transition`` is called with each
    entry as it is added to ``history_log``.
    """

    def __init__(
        self,
        *,
        speed: float = 1.0,
        seed: int | None = None,
        step_seconds: float = 0.05,
        load_seconds: float = 0.5,
        frame_seconds: float = 0.01,
        version: str = "0.8.0",
        preview_method: str = "auto",
        bridge_client_id: str | None = None,
        bridge_previews: bool = False,
        on_transition: Callable[[PromptTransition], None] | None = None,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed!r}")
        for name, value in (
            ("step_seconds", step_seconds),
            ("load_seconds", load_seconds),
            ("frame_seconds", frame_seconds),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must not be negative, got {value!r}")
        if preview_method not in PREVIEW_METHODS:
            raise ValueError(
                f"preview_method must be one of {PREVIEW_METHODS}, got {preview_method!r}"
            )
        self._features = Features.for_version(version)
        self._rng = random.Random(seed)
        self._preview_method = preview_method
        self._state = RunState()
        self._queue = PromptQueue()
        self._hub = SocketHub()
        self._number = 0
        self._work = asyncio.Event()
        self._free_requests: dict[str, bool] = {}
        executor_class = PromptExecutor if bridge_client_id is None else _own_executor_class()
        self._executor = executor_class(
            timing=Timing(speed, step_seconds, load_seconds, frame_seconds),
            rng=self._rng,
            server=self._hub,
            state=self._state,
            progress_state=self._features.progress_state,
            cached_ui_needs_client_id=self._features.cached_ui_needs_client_id,
            previews_for=self._previews_for,
        )
        if bridge_client_id is not None:
            self._install_bridge(executor_class, bridge_client_id, bridge_previews)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.history_log: list[PromptTransition] = []
        self._on_transition = on_transition
        self._app = self._build_app()

    @property
    def app(self) -> web.Application:
        return self._app

    def _install_bridge(
        self, executor_class: type[PromptExecutor], client_id: str, previews: bool
    ) -> None:
        # Imported here: importing the package runs its ComfyUI start-up hook (one log line).
        from comfyui_bridge.bridge import Bridge
        from comfyui_bridge.config import BridgeConfig

        config = BridgeConfig(client_id, mirror_previews=previews)
        bridge = Bridge(self._hub, executor_class, config, self._features.version)
        bridge.install()
        _LOG.info(
            "bridge installed (previews mirrored: %s, prompts without client id: %s)",
            "yes" if previews else "no",
            "covered" if bridge.covers_prompts_without_client_id else "not covered",
        )

    async def flush(self) -> None:
        """Wait until every message queued so far has been written to its websockets.

        Only meaningful while the app is being served (the publisher runs).
        """
        await self._hub.flush()

    async def close(self) -> None:
        """Stop the worker and the publisher and close every websocket; idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._hub.close_all()

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[_origin_guard])
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/ws", self._websocket),
            ("GET", "/prompt", self._get_prompt),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_entry),
            ("POST", "/history", self._post_history),
            ("POST", "/interrupt", self._post_interrupt),
            ("POST", "/free", self._post_free),
            ("GET", "/system_stats", self._get_system_stats),
            ("GET", "/features", self._get_features),
        ]
        if self._features.jobs_api:
            routes += [
                ("GET", "/api/jobs", self._get_jobs),
                ("GET", "/api/jobs/{job_id}", self._get_job),
            ]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._guarded(handler))
            app.router.add_route(method, "/api" + path, self._guarded(handler))
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._shutdown)
        return app

    @staticmethod
    def _guarded(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except _BadRequest as exc:
                _LOG.warning("%s %s rejected: %s", request.method, request.path, exc)
                return _bad_request(str(exc))

        return guarded

    async def _start(self, _app: web.Application) -> None:
        self._tasks = [
            asyncio.create_task(self._hub.publish(), name="fake-comfyui-publish"),
            asyncio.create_task(self._worker(), name="fake-comfyui-worker"),
        ]

    async def _shutdown(self, _app: web.Application) -> None:
        await self.close()

    # --- state helpers ----------------------------------------------------------------------

    def _new_id(self) -> uuid.UUID:
        return uuid.UUID(int=self._rng.getrandbits(128), version=4)

    def _queue_info(self) -> JsonDict:
        return {"exec_info": {"queue_remaining": self._queue.remaining}}

    def _queue_updated(self) -> None:
        self._hub.send_sync("status", {"status": self._queue_info()}, None)

    def _transition(self, prompt_id: str, event: TransitionEvent) -> None:
        transition = PromptTransition(prompt_id, event, time.time())
        self.history_log.append(transition)
        if self._on_transition is not None:
            self._on_transition(transition)
        if len(self.history_log) > HISTORY_LOG_LIMIT:
            del self.history_log[: len(self.history_log) - HISTORY_LOG_LIMIT]
        _LOG.debug("prompt %s %s", prompt_id, event)

    def _previews_for(self, extra_data: JsonDict) -> bool:
        method = self._preview_method
        requested = extra_data.get("preview_method")
        if self._features.prompt_preview_method and requested in PREVIEW_METHODS:
            method = requested
        return method != "none"

    # --- worker -------------------------------------------------------------------------------

    async def _worker(self) -> None:
        """``main.prompt_worker``: take, execute, store history, announce; one at a time."""
        while True:
            self._apply_free_requests()
            taken = self._queue.get()
            if taken is None:
                self._work.clear()
                await self._work.wait()
                continue
            item, task_id = taken
            self._queue_updated()
            self._transition(item.prompt_id, "started")
            outcome = await self._executor.execute_async(
                item.prompt, item.prompt_id, item.extra_data, item.outputs
            )
            self._queue.task_done(task_id, outcome.history)
            self._transition(item.prompt_id, outcome.result)
            self._queue_updated()
            if self._hub.client_id is not None:
                done = {"node": None, "prompt_id": item.prompt_id}
                self._hub.send_sync("executing", done, self._hub.client_id)

    def _apply_free_requests(self) -> None:
        if self._free_requests.pop("unload_models", False):
            self._executor.unload_models()
        if self._free_requests.pop("free_memory", False):
            self._executor.unload_models()
            self._executor.reset_cache()

    # --- websocket ----------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId", "") or self._new_id().hex
        self._hub.register(sid, ws)
        try:
            await self._hub.send_now(sid, "status", {"status": self._queue_info(), "sid": sid})
            if self._hub.client_id == sid and self._hub.last_node_id is not None:
                await self._hub.send_now(sid, "executing", {"node": self._hub.last_node_id})
            first = True
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    first = await self._client_frame(sid, message.data, first)
        finally:
            self._hub.unregister(sid, ws)
        return ws

    async def _client_frame(self, sid: str, text: str, first: bool) -> bool:
        """Handle a text frame from a client; returns whether the next one is still 'first'."""
        try:
            frame = json.loads(text)
        except json.JSONDecodeError:
            _LOG.warning("invalid JSON from websocket client %s: %.200s", sid, text)
            return first
        negotiating = (
            first
            and self._features.progress_state
            and isinstance(frame, dict)
            and frame.get("type") == "feature_flags"
        )
        if negotiating:
            flags = frame.get("data")
            if self._hub.set_flags(sid, flags if isinstance(flags, dict) else {}):
                await self._hub.send_now(sid, "feature_flags", SERVER_FEATURES)
            else:
                _LOG.warning("feature flags from client %s after its id was taken over", sid)
        return False

    # --- /prompt ------------------------------------------------------------------------------

    async def _get_prompt(self, _request: web.Request) -> web.Response:
        return web.json_response(self._queue_info())

    async def _post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as exc:
            return self._prompt_rejected("invalid_prompt", "Invalid JSON body", str(exc))
        if not isinstance(body, dict):
            return self._prompt_rejected(
                "invalid_prompt", "Request body must be a JSON object", type(body).__name__
            )
        if "number" in body:
            try:
                number: float = float(body["number"])
            except (TypeError, ValueError):
                return self._prompt_rejected(
                    "invalid_prompt", "number must be a number", repr(body["number"])
                )
        else:
            number = -self._number if body.get("front") else self._number
            self._number += 1
        if "prompt" not in body:
            return self._prompt_rejected("no_prompt", "No prompt provided", "No prompt provided")
        prompt = copy.deepcopy(body["prompt"])
        prompt_id = str(body.get("prompt_id") or self._new_id())
        targets = body.get("partial_execution_targets")
        validation = validate_prompt(prompt, targets if isinstance(targets, list) else None)
        if not validation.ok:
            _LOG.info("prompt rejected: %s", validation.error)
            return web.json_response(
                {"error": validation.error, "node_errors": validation.node_errors}, status=400
            )
        extra = body.get("extra_data")
        extra_data: JsonDict = dict(extra) if isinstance(extra, dict) else {}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if self._features.create_time:
            extra_data["create_time"] = _now_ms()
        self._queue.put(QueuedPrompt(number, prompt_id, prompt, extra_data, validation.outputs))
        self._transition(prompt_id, "queued")
        self._queue_updated()
        self._work.set()
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": validation.node_errors}
        )

    @staticmethod
    def _prompt_rejected(kind: str, message: str, details: str) -> web.Response:
        _LOG.warning("POST /prompt rejected: %s: %s", message, details)
        error = {"type": kind, "message": message, "details": details, "extra_info": {}}
        return web.json_response({"error": error, "node_errors": {}}, status=400)

    # --- /queue, /history, /interrupt, /free ---------------------------------------------------

    async def _get_queue(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "queue_running": [item.as_list() for item in self._queue.running],
                "queue_pending": [item.as_list() for item in self._queue.pending],
            }
        )

    async def _post_queue(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise _BadRequest("POST /queue expects {'clear': true} or {'delete': [prompt ids]}")
        if body.get("clear"):
            for item in self._queue.wipe():
                self._transition(item.prompt_id, "deleted")
            self._queue_updated()
        deletions = body.get("delete")
        for prompt_id in deletions if isinstance(deletions, list) else []:
            last = len(self._queue.pending) == 1
            removed = self._queue.delete(prompt_id)
            if removed is not None:
                self._transition(removed.prompt_id, "deleted")
                if last:
                    self._queue_updated()
                self._queue_updated()
        return web.Response()

    async def _get_history(self, request: web.Request) -> web.Response:
        try:
            max_items = int(request.query["max_items"]) if "max_items" in request.query else None
            offset = int(request.query.get("offset", -1))
        except ValueError as exc:
            raise _BadRequest(f"max_items and offset must be integers: {exc}") from exc
        return web.json_response(self._queue.history(max_items, offset))

    async def _get_history_entry(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self._queue.history_entry(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise _BadRequest("POST /history expects {'clear': true} or {'delete': [prompt ids]}")
        if body.get("clear"):
            self._queue.wipe_history()
        for prompt_id in body.get("delete", []) if isinstance(body.get("delete"), list) else []:
            self._queue.delete_history(str(prompt_id))
        return web.Response()

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if prompt_id and self._features.targeted_interrupt:
            if self._queue.is_running(prompt_id):
                _LOG.info("interrupting prompt %s", prompt_id)
                self._state.interrupted = True
            else:
                _LOG.info("prompt %s is not currently running, skipping interrupt", prompt_id)
        else:
            _LOG.info("global interrupt (no prompt_id specified)")
            self._state.interrupted = True
        return web.Response()

    async def _post_free(self, request: web.Request) -> web.Response:
        """Unload models / drop the cache now when idle, else after the running prompt."""
        body = await _json_body(request)
        if isinstance(body, dict):
            for flag in ("unload_models", "free_memory"):
                if body.get(flag) is True:
                    self._free_requests[flag] = True
            if not self._queue.running:
                self._apply_free_requests()
        return web.Response()

    # --- /system_stats, /features, /api/jobs -------------------------------------------------

    async def _get_system_stats(self, _request: web.Request) -> web.Response:
        torch_used = self._executor.loaded_bytes + (_WORKING_SET if self._queue.running else 0)
        vram_free = _VRAM_TOTAL - _VRAM_RESERVED - torch_used
        return web.json_response(
            {
                "system": {
                    "os": self._features.system_os,
                    "ram_total": _RAM_TOTAL,
                    "ram_free": _RAM_TOTAL - (4 << 30) - self._executor.loaded_bytes // 4,
                    "comfyui_version": self._features.version,
                    "required_frontend_version": "1.35.9",
                    "installed_templates_version": "0.7.67",
                    "required_templates_version": "0.7.67",
                    "python_version": sys.version,
                    "pytorch_version": "2.9.1+cu130",
                    "embedded_python": False,
                    "argv": ["main.py", "--preview-method", self._preview_method],
                },
                "devices": [
                    {
                        "name": _GPU_NAME,
                        "type": "cuda",
                        "index": 0,
                        "vram_total": _VRAM_TOTAL,
                        "vram_free": vram_free,
                        "torch_vram_total": torch_used,
                        "torch_vram_free": torch_used // 10,
                    }
                ],
            }
        )

    async def _get_features(self, _request: web.Request) -> web.Response:
        return web.json_response(SERVER_FEATURES)

    async def _get_jobs(self, request: web.Request) -> web.Response:
        try:
            query = JobQuery.parse(request.query)
        except JobQueryError as exc:
            raise _BadRequest(str(exc)) from exc
        body = list_jobs(query, self._queue.running, self._queue.pending, self._queue.history_items)
        return web.json_response(body)

    async def _get_job(self, request: web.Request) -> web.Response:
        job = find_job(
            request.match_info["job_id"],
            self._queue.running,
            self._queue.pending,
            self._queue.history_items,
        )
        if job is None:
            return web.json_response({"error": "Job not found"}, status=404)
        return web.json_response(job)
