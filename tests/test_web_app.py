"""The HTTP side of the web layer on a real socket: API, guard, static files and metrics."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from tower_progress.core.model import JobFinished, JsonDict
from tower_progress.web.app import create_app, default_allowed_hosts, serve_socket
from tower_progress.web.hub import Hub
from tower_progress.web.metrics import Metrics

TOKEN = "s3cret-token-value"


def job(job_id: str, state: str, finished_at: str | None = None, **extra: Any) -> JsonDict:
    return {"id": job_id, "state": state, "finished_at": finished_at, **extra}


ACTIVE = [
    job("run", "running", percent=42.5, eta_s=90.0),
    job("wait", "queued", percent=0, eta_s=None),
    job("new", "pending", percent=0),
]
FINISHED = [
    job("f1", "completed", "2026-01-07T10:00:00.000Z"),
    job("f2", "failed", "2026-01-07T11:00:00.000Z"),
    job("f3", "canceled", "2026-01-07T12:00:00.000Z"),
]


@dataclass
class Tracked:
    """The tracker's picture as plain test data behind the StateView methods."""

    jobs_list: list[JsonDict] = field(default_factory=lambda: ACTIVE + FINISHED)
    latest_resources: JsonDict | None = None
    source_table: dict[str, JsonDict] = field(default_factory=dict)

    def jobs(self) -> list[JsonDict]:
        return list(self.jobs_list)

    def job(self, job_id: str) -> JsonDict | None:
        return next((j for j in self.jobs_list if j["id"] == job_id), None)

    def resources(self) -> JsonDict | None:
        return self.latest_resources

    def sources(self) -> dict[str, JsonDict]:
        return self.source_table


@dataclass
class Archive:
    """A database's finished jobs as a list, newest first; cursors are list offsets."""

    finished: list[JsonDict]
    samples_by_job: dict[str, list[JsonDict]] = field(default_factory=dict)
    down: bool = False

    async def finished_jobs(
        self, *, limit: int, before: str | None
    ) -> tuple[list[JsonDict], str | None]:
        self._check()
        if before is not None and not before.isdigit():
            raise ValueError("cursor is not an offset")
        start = int(before or 0)
        end = start + limit
        return self.finished[start:end], str(end) if end < len(self.finished) else None

    async def job(self, job_id: str) -> JsonDict | None:
        self._check()
        return next((j for j in self.finished if j["id"] == job_id), None)

    async def samples(self, job_id: str) -> list[JsonDict]:
        self._check()
        return self.samples_by_job.get(job_id, [])

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("connection refused")


class Canceler:
    """Cancel outcomes by job id, in the shape the Controls contract promises."""

    async def cancel(self, job_id: str) -> str:
        if job_id == "run":
            return "interrupted"
        if job_id == "wait":
            return "deleted"
        if job_id == "f1":
            raise ValueError("job f1 already finished")
        if job_id == "boom":
            raise RuntimeError("internal detail that must not leak")
        raise LookupError(job_id)


@dataclass
class Server:
    base: str
    port: int
    state: Tracked
    metrics: Metrics
    hub: Hub

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def serving(
    *,
    token: str | None = None,
    history: Archive | None = None,
    state: Tracked | None = None,
    static: Path | None = None,
) -> AsyncIterator[Server]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    tracked = state or Tracked()
    hub = Hub(tracked)
    metrics = Metrics()
    app = create_app(
        hub=hub,
        state=tracked,
        history=history,
        controls=Canceler(),
        metrics=metrics,
        token=token,
        allowed_hosts=default_allowed_hosts("127.0.0.1", port),
        static=static,
    )
    runner = await serve_socket(app, sock)
    try:
        yield Server(f"http://127.0.0.1:{port}", port, tracked, metrics, hub)
    finally:
        await runner.cleanup()


async def fetch(
    method: str, url: str, *, headers: dict[str, str] | None = None
) -> tuple[int, Any, Mapping[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json(), response.headers
        return response.status, await response.text(), response.headers


async def get_json(url: str, **kw: Any) -> tuple[int, Any]:
    status, body, _ = await fetch("GET", url, **kw)
    return status, body


# --- /api/jobs ----------------------------------------------------------------------------


async def test_jobs_filter_by_state_without_a_database() -> None:
    async with serving() as srv:
        assert await get_json(f"{srv.base}/api/jobs?state=active") == (
            200,
            {"jobs": ACTIVE, "next_cursor": None},
        )
        newest_first = [FINISHED[2], FINISHED[1], FINISHED[0]]
        assert await get_json(f"{srv.base}/api/jobs?state=finished") == (
            200,
            {"jobs": newest_first, "next_cursor": None},
        )
        assert await get_json(f"{srv.base}/api/jobs") == (
            200,
            {"jobs": ACTIVE + newest_first, "next_cursor": None},
        )


async def test_finished_jobs_page_with_limit_and_cursor_without_a_database() -> None:
    async with serving() as srv:
        status, first = await get_json(f"{srv.base}/api/jobs?state=finished&limit=2")
        assert status == 200
        assert first["jobs"] == [FINISHED[2], FINISHED[1]]
        assert isinstance(first["next_cursor"], str)
        status, second = await get_json(
            f"{srv.base}/api/jobs?state=all&limit=2&cursor={first['next_cursor']}"
        )
        assert (status, second) == (200, {"jobs": [FINISHED[0]], "next_cursor": None})


async def test_finished_jobs_come_from_the_database_when_there_is_one() -> None:
    archived = [job(f"old{i}", "completed", f"2026-01-0{6 - i}T00:00:00.000Z") for i in range(5)]
    async with serving(history=Archive(archived)) as srv:
        assert await get_json(f"{srv.base}/api/jobs?state=finished&limit=2") == (
            200,
            {"jobs": archived[:2], "next_cursor": "2"},
        )
        assert await get_json(f"{srv.base}/api/jobs?limit=2") == (
            200,
            {"jobs": ACTIVE + archived[:2], "next_cursor": "2"},
        )
        assert await get_json(f"{srv.base}/api/jobs?state=finished&limit=2&cursor=4") == (
            200,
            {"jobs": archived[4:], "next_cursor": None},
        )
        assert await get_json(f"{srv.base}/api/jobs?state=finished&cursor=x") == (
            400,
            {"error": "cursor is not an offset"},
        )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("state=done", "state must be one of: active, finished, all"),
        ("limit=0", "limit must be an integer from 1 to 500"),
        ("limit=501", "limit must be an integer from 1 to 500"),
        ("limit=ten", "limit must be an integer from 1 to 500"),
        ("limit=-1", "limit must be an integer from 1 to 500"),
        (
            "state=active&cursor=abc",
            "cursor pages through finished jobs; not valid with state=active",
        ),
        ("state=finished&cursor=not-base64!", "invalid cursor"),
        ("state=finished&cursor=WzFd", "invalid cursor"),
    ],
)
async def test_bad_job_queries_get_400(query: str, message: str) -> None:
    async with serving() as srv:
        assert await get_json(f"{srv.base}/api/jobs?{query}") == (400, {"error": message})


async def test_database_down_gets_503() -> None:
    async with serving(history=Archive([], down=True)) as srv:
        assert await get_json(f"{srv.base}/api/jobs?state=finished") == (
            503,
            {"error": "database unavailable"},
        )
        assert await get_json(f"{srv.base}/api/jobs/nowhere") == (
            503,
            {"error": "database unavailable"},
        )


# --- one job, samples, cancel -------------------------------------------------------------


async def test_one_job_from_the_tracker_then_the_database_else_404() -> None:
    archived = job("old", "completed", "2026-01-01T00:00:00.000Z")
    async with serving(history=Archive([archived])) as srv:
        assert await get_json(f"{srv.base}/api/jobs/run") == (200, ACTIVE[0])
        assert await get_json(f"{srv.base}/api/jobs/old") == (200, archived)
        assert await get_json(f"{srv.base}/api/jobs/ghost") == (404, {"error": "unknown job"})


async def test_samples_need_a_database_and_a_known_job() -> None:
    points = [
        {"t": "2026-01-07T12:00:00.000Z", "percent": 10.0, "stage": "sampling", "step": 3},
        {"t": "2026-01-07T12:00:02.000Z", "percent": 20.0, "stage": "sampling", "step": 6},
    ]
    async with serving() as srv:
        assert await get_json(f"{srv.base}/api/jobs/run/samples") == (
            503,
            {"error": "no database connected: progress samples are not recorded"},
        )
    async with serving(history=Archive([], {"run": points})) as srv:
        assert await get_json(f"{srv.base}/api/jobs/run/samples") == (
            200,
            {"id": "run", "samples": points},
        )
        assert await get_json(f"{srv.base}/api/jobs/ghost/samples") == (
            404,
            {"error": "unknown job"},
        )


@pytest.mark.parametrize(
    ("job_id", "status", "body"),
    [
        ("run", 200, {"id": "run", "result": "interrupted"}),
        ("wait", 200, {"id": "wait", "result": "deleted"}),
        ("ghost", 404, {"error": "unknown job"}),
        ("f1", 409, {"error": "job f1 already finished"}),
        ("boom", 500, {"error": "internal server error"}),
    ],
)
async def test_cancel_maps_outcomes_to_statuses(job_id: str, status: int, body: JsonDict) -> None:
    async with serving() as srv:
        got_status, got_body, _ = await fetch("POST", f"{srv.base}/api/jobs/{job_id}/cancel")
        assert (got_status, got_body) == (status, body)


async def test_a_failing_handler_is_logged_with_traceback_and_answered_without_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as srv:
        status, body, _ = await fetch("POST", f"{srv.base}/api/jobs/boom/cancel")
    assert (status, body) == (500, {"error": "internal server error"})
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "POST /api/jobs/boom/cancel failed"
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_unknown_routes_and_methods_are_json_errors() -> None:
    async with serving() as srv:
        assert await get_json(f"{srv.base}/nope") == (404, {"error": "Not Found"})
        status, body, headers = await fetch("DELETE", f"{srv.base}/api/jobs")
        assert (status, body) == (405, {"error": "Method Not Allowed"})
        assert headers["Allow"] == "GET,HEAD"


# --- health ---------------------------------------------------------------------------------


async def test_health_is_503_with_detail_when_a_source_is_down() -> None:
    db = {"up": True, "detail": None, "since": "2026-01-07T09:00:00.000Z"}
    comfy = {"up": False, "detail": "connection refused", "since": "2026-01-07T11:59:00.000Z"}
    state = Tracked(source_table={"database": db})
    async with serving(state=state) as srv:
        assert await get_json(f"{srv.base}/api/health") == (
            200,
            {"status": "ok", "sources": {"database": db}},
        )
        state.source_table["comfyui:main"] = {**comfy, "_internal": 1.0}
        assert await get_json(f"{srv.base}/api/health") == (
            503,
            {
                "status": "degraded",
                "down": ["comfyui:main"],
                "sources": {"database": db, "comfyui:main": comfy},
            },
        )


# --- guard ----------------------------------------------------------------------------------


async def test_foreign_host_gets_421_and_our_names_pass() -> None:
    async with serving() as srv:
        for host in ("evil.example", f"evil.example:{srv.port}", f"127.0.0.2:{srv.port}"):
            assert await get_json(f"{srv.base}/api/health", headers={"Host": host}) == (
                421,
                {"error": "this server does not answer for that host name"},
            )
        for host in (f"127.0.0.1:{srv.port}", f"LOCALHOST:{srv.port}", f"[::1]:{srv.port}"):
            status, _ = await get_json(f"{srv.base}/api/health", headers={"Host": host})
            assert status == 200
        status, _ = await get_json(f"{srv.base}/", headers={"Host": "evil.example"})
        assert status == 421


async def test_foreign_origin_gets_403_on_websocket_and_post() -> None:
    async with serving() as srv:
        ws_url = f"ws://127.0.0.1:{srv.port}/ws"
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url, origin=Origin("http://evil.example"), proxy=None)
        assert refused.value.response.status_code == 403
        async with connect(ws_url, origin=Origin(f"http://{srv.host}"), proxy=None) as ws:
            assert '"type":"snapshot"' in str(await ws.recv())

        cancel = f"{srv.base}/api/jobs/run/cancel"
        for origin in ("http://evil.example", "null", f"http://{srv.host}.evil.example"):
            status, body, _ = await fetch("POST", cancel, headers={"Origin": origin})
            assert (status, body) == (403, {"error": "cross-origin request refused"})
        status, body, _ = await fetch("POST", cancel, headers={"Origin": f"http://{srv.host}"})
        assert (status, body) == (200, {"id": "run", "result": "interrupted"})
        status, _ = await get_json(f"{srv.base}/api/health", headers={"Origin": "http://x.example"})
        assert status == 200


async def test_token_is_required_on_ws_api_and_metrics_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(token=TOKEN) as srv:
        for path in ("/api/jobs", "/api/health", "/metrics", f"/api/jobs?token={TOKEN}"):
            status, body, headers = await fetch("GET", srv.base + path)
            assert (status, body) == (401, {"error": "a valid token is required"})
            assert headers["WWW-Authenticate"] == "Bearer"
            wrong = {"Authorization": "Bearer nope"}
            assert (await get_json(srv.base + path, headers=wrong))[0] == 401
            assert (await get_json(srv.base + path, headers=bearer))[0] == 200
        status, _, _ = await fetch("POST", f"{srv.base}/api/jobs/run/cancel")
        assert status == 401

        ws_url = f"ws://127.0.0.1:{srv.port}/ws"
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url, proxy=None)
        assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            await connect(ws_url + "?token=wrong", proxy=None)
        async with connect(f"{ws_url}?token={TOKEN}", proxy=None) as ws:
            assert '"type":"snapshot"' in str(await ws.recv())
        async with connect(ws_url, additional_headers=bearer, proxy=None) as ws:
            assert '"type":"snapshot"' in str(await ws.recv())
    server_side = [r for r in caplog.records if not r.name.startswith("websockets")]
    assert server_side
    assert not [r for r in server_side if TOKEN in r.getMessage()]


# --- static files ---------------------------------------------------------------------------


async def test_page_and_static_files_are_served_without_a_token(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>tower</title>")
    (tmp_path / "progress.js").write_text("export {};")
    (tmp_path / "icons").mkdir()
    (tmp_path / "icons" / "dot.svg").write_text("<svg/>")
    (tmp_path.parent / "secret.txt").write_text("no")
    async with serving(token=TOKEN, static=tmp_path) as srv:
        status, body, headers = await fetch("GET", f"{srv.base}/?token={TOKEN}")
        assert (status, body) == (200, "<!doctype html><title>tower</title>")
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["Referrer-Policy"] == "no-referrer"
        status, body, headers = await fetch("GET", f"{srv.base}/static/progress.js")
        assert (status, body, headers["Content-Type"]) == (
            200,
            "export {};",
            "text/javascript; charset=utf-8",
        )
        status, body, headers = await fetch("GET", f"{srv.base}/static/icons/dot.svg")
        assert (status, body, headers["Content-Type"]) == (200, "<svg/>", "image/svg+xml")
        for path in ("/static/missing.css", "/static/%2e%2e/secret.txt", "/static/.hidden"):
            assert await get_json(srv.base + path) == (404, {"error": "Not Found"})


async def test_the_page_shipped_in_the_package_is_the_default() -> None:
    index = files("tower_progress").joinpath("static").joinpath("index.html")
    async with serving() as srv:
        status, body, _ = await fetch("GET", f"{srv.base}/")
    if index.is_file():
        assert (status, body) == (200, index.read_text())
    else:
        assert (status, body) == (404, {"error": "Not Found"})


# --- metrics --------------------------------------------------------------------------------


async def test_metrics_parse_and_carry_exact_values() -> None:
    state = Tracked(
        latest_resources={
            "cpu_percent": 12.5,
            "ram_used": 8_000_000_000,
            "ram_total": 64_000_000_000,
            "comfyui_cpu_percent": None,
            "comfyui_rss": 3_000_000_000,
            "gpus": [
                {
                    "index": 0,
                    "name": 'NVIDIA H100 "SXM"',
                    "utilization": 97.0,
                    "vram_used": 60_000_000_000,
                    "vram_total": 80_000_000_000,
                    "temperature_c": 71.0,
                    "power_w": None,
                }
            ],
            "gpu_status": "ok",
        },
        source_table={
            "database": {"up": True, "detail": None, "since": "x"},
            "comfyui:main": {"up": False, "detail": "refused", "since": "y"},
        },
    )
    async with serving(state=state) as srv:
        srv.metrics.observe(
            [
                JobFinished(FINISHED[0], "fp", {"sampling": 42.0, "loading": 0.5}),
                JobFinished(FINISHED[1], "fp", {"sampling": 700.0, "decoding": -1.0}),
            ]
        )
        async with connect(f"ws://127.0.0.1:{srv.port}/ws", proxy=None) as ws:
            await ws.recv()
            status, text, headers = await fetch("GET", f"{srv.base}/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(metric: str, **labels: str) -> float:
        return samples[("tower_progress_" + metric, tuple(sorted(labels.items())))]

    assert value("jobs", state="running") == 1
    assert value("jobs", state="queued") == 1
    assert value("jobs", state="pending") == 1
    assert value("jobs", state="completed") == 1
    assert value("jobs", state="lost") == 0
    assert value("job_progress_percent", job="run") == 42.5
    assert value("job_progress_percent", job="wait") == 0
    assert value("job_eta_seconds", job="run") == 90.0
    assert ("tower_progress_job_eta_seconds", (("job", "wait"),)) not in samples
    assert ("tower_progress_job_progress_percent", (("job", "f1"),)) not in samples
    assert value("stage_duration_seconds_bucket", stage="sampling", le="30.0") == 0
    assert value("stage_duration_seconds_bucket", stage="sampling", le="60.0") == 1
    assert value("stage_duration_seconds_bucket", stage="sampling", le="1200.0") == 2
    assert value("stage_duration_seconds_bucket", stage="sampling", le="+Inf") == 2
    assert value("stage_duration_seconds_count", stage="sampling") == 2
    assert value("stage_duration_seconds_sum", stage="sampling") == 742.0
    assert value("stage_duration_seconds_bucket", stage="loading", le="1.0") == 1
    assert not [k for k in samples if ("stage", "decoding") in k[1]]
    assert value("websocket_clients") == 1
    assert value("websocket_messages_sent_total") == 1
    assert value("websocket_messages_coalesced_total") == 0
    assert value("websocket_clients_dropped_total") == 0
    assert value("source_up", source="database") == 1
    assert value("source_up", source="comfyui:main") == 0
    assert value("cpu_percent") == 12.5
    assert value("memory_used_bytes") == 8e9
    assert value("memory_total_bytes") == 64e9
    assert value("comfyui_memory_rss_bytes") == 3e9
    assert ("tower_progress_comfyui_cpu_percent", ()) not in samples
    gpu = {"gpu": "0", "name": 'NVIDIA H100 "SXM"'}
    assert value("gpu_utilization_percent", **gpu) == 97.0
    assert value("gpu_memory_used_bytes", **gpu) == 6e10
    assert value("gpu_memory_total_bytes", **gpu) == 8e10
    assert value("gpu_temperature_celsius", **gpu) == 71.0
    assert ("tower_progress_gpu_power_watts", tuple(sorted(gpu.items()))) not in samples


# --- shutdown -------------------------------------------------------------------------------


async def test_stopping_the_runner_closes_websockets_with_1001() -> None:
    async with serving() as srv:
        ws = await connect(f"ws://127.0.0.1:{srv.port}/ws", proxy=None)
        await ws.recv()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1001
