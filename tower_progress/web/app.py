"""The aiohttp application: page, static files, websocket, JSON API and metrics (DESIGN §6).

Every request first passes the guard: a ``Host`` that is not ours gets 421 (DNS rebinding), a
foreign ``Origin`` on a websocket upgrade or a state-changing request gets 403, and when a token
is configured ``/ws``, ``/api`` and ``/metrics`` require it. Every error, ours or aiohttp's, is
answered as JSON ``{"error": message}``; a failure inside a handler is logged with its traceback
and answered 500 without one.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import socket
from collections.abc import Awaitable, Mapping
from functools import partial
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import TypeVar

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from tower_progress.core.model import JobState, JsonDict
from tower_progress.web.hub import Hub
from tower_progress.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tower_progress.web.metrics import Metrics
from tower_progress.web.ports import Controls, HistoryView, StateView, public_sources

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_STATES = ("active", "finished", "all")
_TERMINAL = frozenset(s.value for s in JobState if s.terminal)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\Z")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}
_dumps = partial(json.dumps, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class _Reject(Exception):
    """A request answered with an error status; ``message`` is safe to show the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def default_allowed_hosts(host: str, port: int) -> set[str]:
    """``Host`` values a browser sends for a server bound to ``host:port``.

    The loopback names always; the bind address itself unless it is a wildcard. Names people
    reach the box by (its hostname, a proxy's name) must be added by configuration.
    """
    names = {"127.0.0.1", "localhost", "[::1]"}
    if host not in ("", "0.0.0.0", "::"):
        names.add(f"[{host}]" if ":" in host else host)
    hosts = {f"{name}:{port}" for name in names}
    if port == 80:
        hosts |= names
    return {h.lower() for h in hosts}


def create_app(
    *,
    hub: Hub,
    state: StateView,
    history: HistoryView | None,
    controls: Controls,
    metrics: Metrics,
    token: str | None,
    allowed_hosts: set[str],
    static: Traversable | None = None,
) -> web.Application:
    """Build the application; ``static`` defaults to the page shipped in the package."""
    if token is not None and not token:
        raise ValueError("token must be a non-empty string or None")
    api = _Api(
        state=state,
        history=history,
        controls=controls,
        metrics=metrics,
        hub=hub,
        static=static if static is not None else files("tower_progress").joinpath("static"),
    )
    app = web.Application(
        middlewares=[_errors, _guard(token, frozenset(h.lower() for h in allowed_hosts))]
    )
    app.router.add_get("/", api.index)
    app.router.add_get("/static/{path:.+}", api.static)
    app.router.add_get("/ws", hub.handle)
    app.router.add_get("/api/jobs", api.jobs)
    app.router.add_get("/api/jobs/{id}", api.job)
    app.router.add_get("/api/jobs/{id}/samples", api.samples)
    app.router.add_post("/api/jobs/{id}/cancel", api.cancel)
    app.router.add_get("/api/health", api.health)
    app.router.add_get("/metrics", api.metrics)

    async def close_clients(_: web.Application) -> None:
        await hub.close_all()

    app.on_shutdown.append(close_clients)
    return app


async def serve(
    app: web.Application, host: str, port: int, *, shutdown_timeout: float = 3.0
) -> web.AppRunner:
    """Start serving on ``host:port``; ``await runner.cleanup()`` stops it (clients get 1001)."""
    runner = await _start_runner(app, shutdown_timeout)
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def serve_socket(
    app: web.Application, sock: socket.socket, *, shutdown_timeout: float = 3.0
) -> web.AppRunner:
    """Like ``serve``, on an already bound socket (socket activation, tests on port 0)."""
    runner = await _start_runner(app, shutdown_timeout)
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def _start_runner(app: web.Application, shutdown_timeout: float) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("tower_progress.web.access"),
        access_log_class=_AccessLog,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    return runner


class _AccessLog(AbstractAccessLogger):
    """One DEBUG line per request, path without its query string (it may carry the token)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s %d %.1f ms", request.method, request.path, response.status, time * 1000
        )


# --- middleware ---------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Reject as exc:
        return _error(exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = exc.headers.get(hdrs.ALLOW)
        return _error(exc.status, exc.reason, {hdrs.ALLOW: allow} if allow else None)
    except Exception:
        _LOG.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal server error")


def _guard(token: str | None, allowed_hosts: frozenset[str]) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get(hdrs.HOST, "").lower()
        if host not in allowed_hosts:
            _LOG.info("refused %s %s: Host %r is not ours", request.method, request.path, host)
            raise _Reject(421, "this server does not answer for that host name")
        origin = request.headers.get(hdrs.ORIGIN)
        changes_state = request.method not in _SAFE_METHODS or _is_upgrade(request)
        if origin is not None and changes_state and not _same_origin(origin, allowed_hosts):
            _LOG.info("refused %s %s: Origin %r", request.method, request.path, origin)
            raise _Reject(403, "cross-origin request refused")
        if token is not None and _needs_token(request.path) and not _authorized(request, token):
            raise _Reject(401, "a valid token is required", {hdrs.WWW_AUTHENTICATE: "Bearer"})
        return await handler(request)

    return guard


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def _same_origin(origin: str, allowed_hosts: frozenset[str]) -> bool:
    scheme, sep, netloc = origin.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https") and netloc.lower() in allowed_hosts


def _needs_token(path: str) -> bool:
    return path in ("/ws", "/metrics", "/api") or path.startswith("/api/")


def _authorized(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return hmac.compare_digest(given.strip().encode(), token.encode())
    query_token = request.query.get("token")
    if request.path == "/ws" and query_token is not None:
        return hmac.compare_digest(query_token.encode(), token.encode())
    return False


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers, dumps=_dumps)


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


# --- handlers -----------------------------------------------------------------------------


class _Api:
    def __init__(
        self,
        *,
        state: StateView,
        history: HistoryView | None,
        controls: Controls,
        metrics: Metrics,
        hub: Hub,
        static: Traversable,
    ) -> None:
        self._state = state
        self._history = history
        self._controls = controls
        self._metrics = metrics
        self._hub = hub
        self._static = static

    async def index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["path"])

    def _file(self, path: str) -> web.Response:
        parts = path.split("/")
        if not all(_SEGMENT.match(part) for part in parts):
            raise _Reject(404, "Not Found")
        node = self._static
        for part in parts:
            node = node.joinpath(part)
        if not node.is_file():
            raise _Reject(404, "Not Found")
        suffix = "." + parts[-1].rpartition(".")[2] if "." in parts[-1] else ""
        return web.Response(
            body=node.read_bytes(),
            headers={
                hdrs.CONTENT_TYPE: _CONTENT_TYPES.get(suffix.lower(), "application/octet-stream"),
                hdrs.CACHE_CONTROL: "no-cache",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def jobs(self, request: web.Request) -> web.Response:
        """Active jobs (whole, on the first page) and/or finished jobs, newest first.

        ``limit`` and ``cursor`` page through the finished ones; ``next_cursor`` is null on
        the last page.
        """
        query = request.query
        which = query.get("state", "all")
        if which not in _STATES:
            raise _Reject(400, "state must be one of: active, finished, all")
        limit = _limit(query.get("limit"))
        cursor = query.get("cursor")
        if cursor is not None and which == "active":
            raise _Reject(400, "cursor pages through finished jobs; not valid with state=active")
        jobs: list[JsonDict] = []
        if which != "finished" and cursor is None:
            jobs = [job for job in self._state.jobs() if job.get("state") not in _TERMINAL]
        next_cursor = None
        if which != "active":
            page, next_cursor = await self._finished(limit, cursor)
            jobs.extend(page)
        return _json({"jobs": jobs, "next_cursor": next_cursor})

    async def _finished(self, limit: int, cursor: str | None) -> tuple[list[JsonDict], str | None]:
        if self._history is None:
            return _recent_page(self._state.jobs(), limit, cursor)
        try:
            return await _from_history(self._history.finished_jobs(limit=limit, before=cursor))
        except ValueError as exc:
            raise _Reject(400, str(exc)) from exc

    async def job(self, request: web.Request) -> web.Response:
        job = await self._find(request.match_info["id"])
        if job is None:
            raise _Reject(404, "unknown job")
        return _json(job)

    async def samples(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        if self._history is None:
            raise _Reject(503, "no database connected: progress samples are not recorded")
        if await self._find(job_id) is None:
            raise _Reject(404, "unknown job")
        samples = await _from_history(self._history.samples(job_id))
        return _json({"id": job_id, "samples": samples})

    async def _find(self, job_id: str) -> JsonDict | None:
        job = self._state.job(job_id)
        if job is None and self._history is not None:
            job = await _from_history(self._history.job(job_id))
        return job

    async def cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        try:
            result = await self._controls.cancel(job_id)
        except LookupError as exc:
            raise _Reject(404, "unknown job") from exc
        except ValueError as exc:
            raise _Reject(409, str(exc)) from exc
        _LOG.info("job %s canceled from the web: %s", job_id, result)
        return _json({"id": job_id, "result": result})

    async def health(self, request: web.Request) -> web.Response:
        sources = public_sources(self._state.sources())
        down = sorted(name for name, source in sources.items() if not source["up"])
        if down:
            return _json({"status": "degraded", "down": down, "sources": sources}, status=503)
        return _json({"status": "ok", "sources": sources})

    async def metrics(self, request: web.Request) -> web.Response:
        text = self._metrics.render(
            jobs=self._state.jobs(),
            resources=self._state.resources(),
            sources=self._state.sources(),
            hub=self._hub.stats(),
        )
        return web.Response(body=text.encode(), headers={hdrs.CONTENT_TYPE: METRICS_CONTENT_TYPE})


async def _from_history(call: Awaitable[_T]) -> _T:
    try:
        return await call
    except OSError as exc:
        _LOG.warning("history query failed: %s", exc)
        raise _Reject(503, "database unavailable") from exc


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise _Reject(400, f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _recent_page(
    jobs: list[JsonDict], limit: int, cursor: str | None
) -> tuple[list[JsonDict], str | None]:
    """Paging over the tracker's recently finished jobs, for when there is no database."""
    finished = sorted((j for j in jobs if j.get("state") in _TERMINAL), key=_order, reverse=True)
    if cursor is not None:
        after = _decode_cursor(cursor)
        finished = [job for job in finished if _order(job) < after]
    page = finished[:limit]
    more = len(finished) > limit
    return page, _encode_cursor(_order(page[-1])) if more else None


def _order(job: JsonDict) -> tuple[str, str]:
    return (str(job.get("finished_at") or ""), str(job.get("id")))


def _encode_cursor(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(_dumps(list(key)).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise _Reject(400, "invalid cursor") from exc
    if not (isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) for k in key)):
        raise _Reject(400, "invalid cursor")
    return key[0], key[1]
