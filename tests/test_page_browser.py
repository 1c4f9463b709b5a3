"""The progress page in headless Chromium against the real app and hub on a real socket.

The tracker is stood in for by plain dicts behind the StateView methods; every change reaches
the page the way it does in production, as an event published through the real ``Hub``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from browser import launch_chromium
from playwright.async_api import (
    Browser,
    BrowserContext,
    Page,
    WebSocketRoute,
    async_playwright,
    expect,
)

from tower_progress.core.model import (
    Event,
    JobChanged,
    JsonDict,
    ResourcesChanged,
    SourceChanged,
)
from tower_progress.web.app import create_app, default_allowed_hosts, serve_socket
from tower_progress.web.hub import Hub
from tower_progress.web.metrics import Metrics

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
GIB = 2**30
TOKEN = "page-test-token"


def iso(offset_s: float = 0.0) -> str:
    """A time ``offset_s`` from now, read at the call: the page compares it with its clock."""
    t = datetime.now(UTC) + timedelta(seconds=offset_s)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job(job_id: str, state: str, **fields: Any) -> JsonDict:
    """A complete job in the public shape (DESIGN §4.1); ``fields`` override the defaults."""
    base: JsonDict = {
        "id": job_id,
        "title": f"Shot {job_id}",
        "state": state,
        "status_raw": None,
        "stage": state,
        "stage_label": state.capitalize(),
        "percent": 0.0,
        "step": None,
        "steps": None,
        "node": None,
        "frames_done": None,
        "frames_total": None,
        "velocity": {"percent_per_min": None, "steps_per_s": None, "frames_per_s": None},
        "eta_s": None,
        "eta_at": None,
        "queue_position": None,
        "prompt_id": f"prompt-{job_id}",
        "instance": "local",
        "visibility": "full",
        "error": None,
        "outputs": [],
        "created_at": iso(-600),
        "started_at": None,
        "updated_at": iso(),
        "finished_at": None,
        "elapsed_s": None,
        "stale": False,
        "stalled": None,
        "last_seen_at": None,
        "stages": [],
        "cached_nodes": [],
    }
    base.update(fields)
    return base


def sampling(job_id: str, percent: float, step: int, **fields: Any) -> JsonDict:
    """A job in its sampling stage, two minutes in; ``fields`` override the defaults."""
    running: JsonDict = {
        "stage": "sampling",
        "stage_label": "Sampling",
        "percent": percent,
        "step": step,
        "steps": 30,
        "node": {"id": "3", "class_type": "KSampler", "title": "KSampler"},
        "velocity": {"percent_per_min": 6.0, "steps_per_s": 0.5, "frames_per_s": None},
        "eta_s": 300.0,
        "eta_at": iso(300),
        "queue_position": 0,
        "started_at": iso(-120),
        "elapsed_s": 120.0,
    }
    return job(job_id, "running", **{**running, **fields})


RESOURCES: JsonDict = {
    "cpu_percent": 23.4,
    "ram_used": int(41.3 * GIB),
    "ram_total": int(125.7 * GIB),
    "comfyui_cpu_percent": 97.0,
    "comfyui_rss": int(18.2 * GIB),
    "gpu_status": "ok",
    "gpus": [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "utilization": 96.0,
            "vram_used": int(61.2 * GIB),
            "vram_total": int(79.6 * GIB),
            "temperature_c": 63.0,
            "power_w": 512.0,
            "power_limit_w": 700.0,
            "comfyui_vram": int(58.9 * GIB),
        }
    ],
}
OOM = {
    "message": "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
    "79.19 GiB of which 1.12 GiB is free.",
    "node_type": "KSampler",
    "exception_type": "torch.OutOfMemoryError",
}


@dataclass
class Board:
    """The tracker's picture as plain dicts behind the StateView methods."""

    jobs_by_id: dict[str, JsonDict] = field(default_factory=dict)
    latest_resources: JsonDict | None = None
    source_table: dict[str, JsonDict] = field(default_factory=dict)

    def jobs(self) -> list[JsonDict]:
        return list(self.jobs_by_id.values())

    def job(self, job_id: str) -> JsonDict | None:
        return self.jobs_by_id.get(job_id)

    def resources(self) -> JsonDict | None:
        return self.latest_resources

    def sources(self) -> dict[str, JsonDict]:
        return self.source_table


@dataclass
class Samples:
    """Progress history by job id; the page's other history needs are not exercised."""

    by_job: dict[str, list[JsonDict]] = field(default_factory=dict)

    async def finished_jobs(
        self, *, limit: int, before: str | None
    ) -> tuple[list[JsonDict], str | None]:
        return [], None

    async def job(self, job_id: str) -> JsonDict | None:
        return None

    async def samples(self, job_id: str) -> list[JsonDict]:
        return self.by_job.get(job_id, [])


@dataclass
class Cancels:
    """Records cancel calls; ``refuse`` maps a job id to the reason it cannot be canceled."""

    calls: list[str] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)

    async def cancel(self, job_id: str) -> str:
        self.calls.append(job_id)
        if job_id in self.refuse:
            raise ValueError(self.refuse[job_id])
        return "interrupted"


@dataclass
class Site:
    """The real app on 127.0.0.1; ``stop``/``start`` restart it on the same port, as a
    restarted daemon would come back, with whatever ``board`` holds by then."""

    board: Board
    history: Samples
    controls: Cancels
    token: str | None = None
    port: int = 0
    hub: Hub | None = None
    runner: web.AppRunner | None = None

    def url(self) -> str:
        query = f"?token={self.token}" if self.token else ""
        return f"http://127.0.0.1:{self.port}/{query}"

    async def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self.hub = Hub(self.board)
        app = create_app(
            hub=self.hub,
            state=self.board,
            history=self.history,
            controls=self.controls,
            metrics=Metrics(),
            token=self.token,
            allowed_hosts=default_allowed_hosts("127.0.0.1", self.port),
        )
        self.runner = await serve_socket(app, sock)

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()
        self.runner = None

    def publish(self, *events: Event) -> None:
        assert self.hub is not None
        self.hub.publish(events)

    def put(self, *jobs: JsonDict) -> None:
        for j in jobs:
            self.board.jobs_by_id[j["id"]] = j
        self.publish(*(JobChanged(j) for j in jobs))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await launch_chromium(pw)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def site() -> AsyncIterator[Site]:
    served = Site(Board(latest_resources=RESOURCES), Samples(), Cancels())
    await served.start()
    yield served
    if served.runner is not None:
        await served.stop()


@dataclass
class Tab:
    page: Page
    errors: list[str]


async def open_tab(
    browser: Browser, site: Site, *, width: int = 1280, height: int = 900, scheme: str = "light"
) -> tuple[BrowserContext, Tab]:
    context = await browser.new_context(
        viewport={"width": width, "height": height},
        color_scheme="dark" if scheme == "dark" else "light",
    )
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, Tab(page, errors)


@pytest_asyncio.fixture(loop_scope="module")
async def tab(browser: Browser, site: Site) -> AsyncIterator[Tab]:
    context, opened = await open_tab(browser, site)
    yield opened
    await context.close()
    assert opened.errors == []


async def go_live(tab: Tab, site: Site) -> None:
    await tab.page.goto(site.url())
    await expect(tab.page.locator("#conn")).to_have_attribute("data-state", "live")


async def test_card_moves_from_queue_to_running_to_finished(site: Site, tab: Tab) -> None:
    page = tab.page
    site.put(job("7", "queued", queue_position=1, eta_s=900.0, eta_at=iso(900)))
    await go_live(tab, site)
    queued = page.locator('#queue [data-job-id="7"]')
    await expect(queued.locator('[data-fact="position"] dd')).to_contain_text("#1")
    await expect(queued.locator('[data-fact="eta"] dd')).to_contain_text("in 15 min")
    await queued.evaluate("card => { card.dataset.seen = 'queued'; }")

    site.put(sampling("7", 40.0, 12))
    running = page.locator('#running [data-job-id="7"]')
    await expect(running.locator('[data-fact="step"] dd')).to_have_text("12 / 30")
    await expect(running).to_have_attribute("data-seen", "queued")
    await expect(running.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "40")
    await expect(running.locator('[data-fact="speed"] dd')).to_contain_text("2.0 s/step")
    await expect(page.locator('#queue [data-job-id="7"]')).to_have_count(0)
    await expect(page).to_have_title("40% Shot 7 · tower-progress")

    site.put(
        job(
            "7",
            "completed",
            stage="done",
            percent=100.0,
            started_at=iso(-125),
            finished_at=iso(),
            elapsed_s=125.0,
        )
    )
    row = page.locator('#finished [data-job-id="7"]')
    await expect(row.locator(".badge")).to_have_text("Completed")
    await expect(row.locator(".row-meta")).to_contain_text("took 2 min 05 s")
    await expect(page.locator("#running [data-job-id]")).to_have_count(0)
    await expect(page.locator("#running-empty")).to_be_visible()
    await expect(page).to_have_title("tower-progress")


async def test_stale_when_server_stops_then_resyncs_on_restart(site: Site, tab: Tab) -> None:
    page = tab.page
    site.put(sampling("7", 20.0, 6))
    await go_live(tab, site)
    bar = page.locator('#running [data-job-id="7"]').get_by_role("progressbar")
    await expect(bar).to_have_attribute("aria-valuenow", "20")
    await page.evaluate("window.sameDocument = true")

    await site.stop()
    await expect(page.locator("body")).to_have_class(re.compile(r"\bis-stale\b"), timeout=2000)
    await expect(page.locator("#stale-banner")).to_contain_text("Disconnected: last update")
    await expect(page.locator("#conn")).not_to_have_attribute("data-state", "live")
    assert (await page.title()).startswith("(stale) 20% Shot 7")

    site.board.jobs_by_id["7"] = sampling("7", 75.0, 22)
    await site.start()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=30_000)
    await expect(bar).to_have_attribute("aria-valuenow", "75")
    await expect(page.locator("body")).not_to_have_class(re.compile(r"\bis-stale\b"))
    await expect(page.locator("#stale-banner")).to_be_hidden()
    assert await page.evaluate("window.sameDocument") is True


async def test_seq_gap_forces_a_resync(site: Site, tab: Tab) -> None:
    page = tab.page
    connections: list[WebSocketRoute] = []
    dropped: list[str] = []
    warnings: list[str] = []
    page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)

    def proxy(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        first = not connections
        connections.append(ws)
        ws.on_message(server.send)

        def to_page(message: str | bytes) -> None:
            if first and not dropped and '"type":"job"' in str(message):
                dropped.append(str(message))
                return
            ws.send(message)

        server.on_message(to_page)

    await page.route_web_socket(re.compile(r"/ws(\?|$)"), proxy)
    await go_live(tab, site)
    site.put(job("8", "queued", queue_position=1))
    site.publish(ResourcesChanged(RESOURCES))

    await expect(page.locator('#queue [data-job-id="8"]')).to_be_visible()
    assert len(dropped) == 1 and '"id":"8"' in dropped[0]
    assert len(connections) == 2
    assert any("seq gap" in w for w in warnings), warnings
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")


async def test_failed_job_shows_its_error_and_filters_apply(site: Site, tab: Tab) -> None:
    page = tab.page
    site.put(
        job("5", "failed", stage="done", error=OOM, finished_at=iso(-60), elapsed_s=288.0),
        job("6", "completed", stage="done", percent=100.0, finished_at=iso(-30), elapsed_s=61.0),
        job("4", "canceled", stage="done", finished_at=iso(-90), elapsed_s=12.0),
    )
    await go_live(tab, site)
    failed = page.locator('#finished [data-job-id="5"]')
    await expect(failed.locator(".error-head")).to_have_text("torch.OutOfMemoryError in KSampler")
    await expect(failed.locator(".error-msg")).to_have_text(OOM["message"])
    await expect(page.locator("#finished > li")).to_have_count(3)
    ids = await page.locator("#finished > li").evaluate_all("rs => rs.map(r => r.dataset.jobId)")
    assert ids == ["6", "5", "4"]

    await page.get_by_role("button", name=re.compile(r"^Failed")).click()
    await expect(page.locator("#finished > li")).to_have_count(1)
    await expect(failed).to_be_visible()
    await page.get_by_role("button", name=re.compile(r"^Completed")).click()
    await expect(page.locator("#finished > li")).to_have_count(1)
    await expect(page.locator('#finished [data-job-id="6"]')).to_be_visible()
    await page.get_by_role("button", name=re.compile(r"^Lost")).click()
    await expect(page.locator("#finished > li")).to_have_count(0)
    await expect(page.locator("#finished-empty")).to_have_text("No lost jobs.")


async def test_cancel_asks_first_then_calls_the_api_with_the_token(
    browser: Browser,
) -> None:
    site = Site(Board(), Samples(), Cancels(refuse={"10": "job 10 is not in ComfyUI yet"}), TOKEN)
    await site.start()
    context, tab = await open_tab(browser, site)
    try:
        page = tab.page
        site.put(sampling("9", 50.0, 15), job("10", "queued", queue_position=1))
        await go_live(tab, site)
        card = page.locator('#running [data-job-id="9"]')
        await card.get_by_role("button", name="Cancel…").click()
        await expect(card.get_by_role("group", name="Confirm cancel")).to_be_visible()
        await expect(card.get_by_role("button", name="Keep")).to_be_focused()
        assert site.controls.calls == []

        await page.keyboard.press("Escape")
        await expect(card.get_by_role("group", name="Confirm cancel")).to_be_hidden()
        await expect(card.get_by_role("button", name="Cancel…")).to_be_focused()
        assert site.controls.calls == []

        await card.get_by_role("button", name="Cancel…").click()
        await card.get_by_role("button", name="Yes, cancel").click()
        await expect(card.locator(".cancel-msg")).to_have_text(
            "Interrupt sent: stops at the next step."
        )
        assert site.controls.calls == ["9"]

        queued = page.locator('#queue [data-job-id="10"]')
        await queued.get_by_role("button", name="Cancel…").click()
        await queued.get_by_role("button", name="Yes, cancel").click()
        await expect(queued.locator(".cancel-msg")).to_have_text(
            "Cancel failed: job 10 is not in ComfyUI yet"
        )
        await expect(queued.get_by_role("button", name="Cancel…")).to_be_visible()
        assert site.controls.calls == ["9", "10"]
    finally:
        await context.close()
        await site.stop()
    assert tab.errors == []


async def test_coarse_job_says_step_detail_is_unavailable(site: Site, tab: Tab) -> None:
    page = tab.page
    site.put(
        job(
            "c1",
            "running",
            stage="processing",
            stage_label="Running (step detail unavailable)",
            visibility="coarse",
            queue_position=0,
            started_at=iso(-200),
        )
    )
    await go_live(tab, site)
    card = page.locator('#running [data-job-id="c1"]')
    await expect(card.locator(".note-coarse")).to_contain_text("Step detail unavailable")
    bar = card.get_by_role("progressbar")
    await expect(bar).to_have_class(re.compile(r"\bindeterminate\b"))
    assert await bar.get_attribute("aria-valuenow") is None
    await expect(card.locator(".pct")).to_have_text("")
    await expect(card.locator('[data-fact="step"] dd')).to_be_hidden()
    await expect(page).to_have_title("running Shot c1 · tower-progress")


async def test_gauges_sources_and_job_warnings_follow_messages(site: Site, tab: Tab) -> None:
    page = tab.page
    site.put(
        sampling("w1", 30.0, 9, stalled={"since": iso(-200), "gpu_utilization": 2.0}),
        sampling("w2", 60.0, 18, stale=True),
    )
    await go_live(tab, site)
    await expect(page.locator(".gauge").first).to_contain_text("96%")
    stalled = page.locator('#running [data-job-id="w1"]')
    await expect(stalled.locator(".note-warn")).to_have_text(
        re.compile(r"^Stalled since .+: no progress for 3 min, GPU idle \(2%\)$")
    )
    stale = page.locator('#running [data-job-id="w2"]')
    await expect(stale).to_have_class(re.compile(r"\bis-stale\b"))
    await expect(stale.locator(".note-stale")).to_have_text(
        "Its source is down: last known state, not live."
    )

    no_gpu = {**RESOURCES, "gpus": [], "gpu_status": "no GPU", "cpu_percent": 55.0}
    site.board.latest_resources = no_gpu
    site.publish(
        ResourcesChanged(no_gpu), SourceChanged("database", up=False, detail="connection refused")
    )
    await expect(page.locator(".gauge")).to_have_count(3)
    await expect(page.locator(".gauge").first).to_contain_text("no GPU")
    await expect(page.get_by_role("meter", name="CPU")).to_have_attribute("aria-valuenow", "55")
    await expect(page.locator('[data-source="database"]')).to_have_class(re.compile(r"\bis-down\b"))
    await expect(page.locator('[data-source="database"] .source-detail')).to_have_text(
        re.compile(r"^down since .+: connection refused$")
    )


async def test_sparkline_starts_from_samples_and_extends_live(site: Site, tab: Tab) -> None:
    page = tab.page
    site.history.by_job["s1"] = [
        {"t": iso(-30), "percent": 5.0, "stage": "sampling", "step": 2},
        {"t": iso(-20), "percent": 12.0, "stage": "sampling", "step": 4},
        {"t": iso(-10), "percent": 20.0, "stage": "sampling", "step": 6},
    ]
    site.put(sampling("s1", 24.0, 7, updated_at=iso(-5)))
    await go_live(tab, site)
    points = """n => (document.querySelector('#running [data-job-id="s1"] .spark-line')
        ?.getAttribute('points') ?? '').trim().split(/\\s+/).length === n"""
    # three fetched samples, the snapshot's point, and the line carried on to "now"
    await page.wait_for_function(points, arg=5)
    site.put(sampling("s1", 28.0, 8, updated_at=iso(1)))
    await page.wait_for_function(points, arg=6)


async def test_notifies_when_a_job_finishes_while_hidden(browser: Browser, site: Site) -> None:
    context, tab = await open_tab(browser, site)
    try:
        page = tab.page
        await context.grant_permissions(["notifications"], origin=site.url().rstrip("/"))
        await page.add_init_script(
            """
            window.shown = [];
            const Real = window.Notification;
            window.Notification = new Proxy(Real, {
              construct(target, args) {
                window.shown.push(args);
                return Reflect.construct(target, args);
              },
            });
            Object.defineProperty(document, "hidden", {
              get: () => window.pretendHidden === true,
            });
            """
        )
        site.put(sampling("n1", 90.0, 27), sampling("n2", 10.0, 3))
        await go_live(tab, site)
        notify = page.get_by_role("button", name="Notify me")
        await notify.click()
        await expect(page.locator("#notify")).to_have_attribute("aria-pressed", "true")

        site.put(job("n1", "completed", stage="done", percent=100.0, finished_at=iso()))
        await expect(page.locator('#finished [data-job-id="n1"]')).to_be_visible()
        await page.evaluate("window.pretendHidden = true")
        site.put(job("n2", "failed", stage="done", error=OOM, finished_at=iso()))
        await page.wait_for_function("window.shown.length === 1")
        title, options = await page.evaluate("window.shown[0]")
        assert title == "Shot n2: Failed"
        assert options["body"] == OOM["message"]
    finally:
        await context.close()
    assert tab.errors == []


def demo(site: Site) -> None:
    """A realistic afternoon on a render box, for the layout checks and the screenshots."""
    board = site.board
    site.history.by_job["1042"] = [
        {"t": iso(-462 + 14 * i), "percent": 47.3 * (1 - (1 - i / 31) ** 2), "stage": "sampling"}
        for i in range(32)
    ]
    board.source_table.update(
        {
            name: {"up": True, "detail": None, "since": iso(-3600)}
            for name in ("comfyui:local", "database", "resources")
        }
    )
    for j in (
        sampling(
            "1042",
            47.3,
            17,
            title="Harbor at dusk, shot 12",
            frames_total=121,
            node={"id": "3", "class_type": "KSampler", "title": "KSampler (high noise)"},
            velocity={"percent_per_min": 6.1, "steps_per_s": 0.42, "frames_per_s": None},
            eta_s=520.0,
            eta_at=iso(520),
            started_at=iso(-462),
        ),
        job(
            "comfy:77aa3e1c",
            "running",
            title="Prompt 77aa3e1c",
            stage="processing",
            stage_label="Running (step detail unavailable)",
            visibility="coarse",
            instance="comfyui:b",
            queue_position=0,
            eta_s=1320.0,
            eta_at=iso(1320),
            started_at=iso(-200),
        ),
        job(
            "1043",
            "queued",
            title="Harbor at dusk, shot 13",
            queue_position=1,
            eta_s=1100.0,
            eta_at=iso(1100),
        ),
        job(
            "1044",
            "queued",
            title="Lighthouse interior, 4K upscale",
            queue_position=2,
            eta_s=1900.0,
            eta_at=iso(1900),
        ),
        job(
            "1040",
            "completed",
            title="Harbor at dusk, shot 11",
            stage="done",
            percent=100.0,
            finished_at=iso(-1396),
            elapsed_s=1004.0,
        ),
        job(
            "1039",
            "failed",
            title="Harbor at dusk, shot 10",
            stage="done",
            error=OOM,
            finished_at=iso(-2712),
            elapsed_s=288.0,
        ),
        job(
            "1038",
            "canceled",
            title="Test render",
            stage="done",
            finished_at=iso(-3236),
            elapsed_s=64.0,
        ),
    ):
        board.jobs_by_id[j["id"]] = j
    board.jobs_by_id["1042"]["frames_done"] = 0


async def test_phone_width_has_no_horizontal_scroll(browser: Browser, site: Site) -> None:
    demo(site)
    site.board.jobs_by_id["1039"]["title"] = "x" * 140
    site.board.jobs_by_id["1039"]["error"] = {**OOM, "message": "Traceback:" + "/very/long" * 40}
    context, tab = await open_tab(browser, site, width=375, height=800)
    try:
        await go_live(tab, site)
        await expect(tab.page.locator("#running .card")).to_have_count(2)
        width = await tab.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375
        ARTIFACTS.mkdir(exist_ok=True)
        await tab.page.screenshot(path=ARTIFACTS / "page-phone.png", full_page=True)
    finally:
        await context.close()
    assert tab.errors == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_screenshots_light_and_dark(browser: Browser, site: Site, scheme: str) -> None:
    demo(site)
    context, tab = await open_tab(browser, site, width=1100, height=1000, scheme=scheme)
    try:
        page = tab.page
        await go_live(tab, site)
        await expect(page.locator(".gauge")).to_have_count(4)
        await expect(page.locator("#finished > li")).to_have_count(3)
        background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        channels = [int(c) for c in re.findall(r"\d+", background)[:3]]
        assert (sum(channels) / 3 > 200) if scheme == "light" else (sum(channels) / 3 < 40)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=ARTIFACTS / f"page-{scheme}.png", full_page=True)
    finally:
        await context.close()
    assert tab.errors == []
