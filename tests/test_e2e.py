"""The walking skeleton, end to end on real parts: the simulator's fake ComfyUI and producer,
a real PostgreSQL, the daemon as ``serve`` runs it, a websocket client and headless Chromium.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import web
from browser import launch_chromium
from playwright.async_api import async_playwright, expect

from tower_progress import daemon
from tower_progress.config import ComfyInstance, Settings
from tower_progress.simulate.producer import Producer
from tower_progress.simulate.server import FakeComfyUI

WATCHER_ID = "tower-progress-e2e-watcher"
# Records the highest percent each card's progress bar ever showed.
MAX_PERCENT_RECORDER = """
window.maxPercent = {};
new MutationObserver((records) => {
  for (const r of records) {
    const bar = r.target;
    const card = bar.closest && bar.closest("[data-job-id]");
    const value = Number(bar.getAttribute("aria-valuenow"));
    if (card && bar.getAttribute("aria-valuenow") !== null) {
      const id = card.dataset.jobId;
      window.maxPercent[id] = Math.max(window.maxPercent[id] ?? 0, value);
    }
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["aria-valuenow"]});
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    url: str
    ws_url: str
    comfy_url: str
    producer: Producer


@pytest.fixture
async def stack(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Stack]:
    comfy = FakeComfyUI(speed=0.2, seed=7)
    comfy_runner = web.AppRunner(comfy.app)
    await comfy_runner.setup()
    comfy_port = free_port()
    await web.TCPSite(comfy_runner, "127.0.0.1", comfy_port).start()
    comfy_url = f"http://127.0.0.1:{comfy_port}"
    port = free_port()
    settings = Settings(
        port=port,
        database_url=pg_dsn,
        comfyui=(ComfyInstance("local", comfy_url, WATCHER_ID),),
        state_dir=tmp_path,
        resources_interval_s=0.5,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(settings, stop=stop))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if task.done():
                task.result()
            try:
                async with session.get(f"{url}/api/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        else:
            pytest.fail("daemon never became healthy")
    producer = Producer(dsn=pg_dsn, comfyui_url=comfy_url, seed=3)
    try:
        yield Stack(url, f"ws://127.0.0.1:{port}/ws", comfy_url, producer)
    finally:
        await producer.close()
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0
        await comfy.close()
        await comfy_runner.cleanup()


async def next_job(ws: Any, job_id: str, *, until: str) -> list[dict[str, Any]]:
    """Every update of ``job_id`` until one is in state ``until``."""
    seen: list[dict[str, Any]] = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if message["type"] == "job" and message["job"]["id"] == job_id:
            seen.append(message["job"])
            if message["job"]["state"] == until:
                return seen


async def test_produced_job_reaches_a_websocket_client_running_then_completed(
    stack: Stack,
) -> None:
    async with websockets.connect(stack.ws_url) as ws:
        snapshot = json.loads(await ws.recv())
        assert snapshot["type"] == "snapshot"
        assert snapshot["seq"] == 1
        job_id = await stack.producer.submit("still", client_id=WATCHER_ID, title="e2e still")
        running = await next_job(ws, job_id, until="running")
        updates = running + await next_job(ws, job_id, until="completed")
    sampling = [j for j in updates if j["step"] is not None]
    assert sampling, "no update carried a sampler step"
    assert {j["visibility"] for j in sampling} == {"full"}
    assert {j["steps"] for j in sampling} == {sampling[-1]["steps"]}
    assert [j["step"] for j in sampling] == sorted(j["step"] for j in sampling)
    done = updates[-1]
    assert (done["title"], done["percent"], done["stage"]) == ("e2e still", 100.0, "done")
    stages = [s["stage"] for s in done["stages"]]
    assert stages.index("sampling") < stages.index("decoding") < stages.index("encoding")
    percents = [j["percent"] for j in updates]
    assert percents == sorted(percents)


async def test_page_card_follows_the_job_to_its_last_running_percent_then_completed(
    stack: Stack,
) -> None:
    """The card's bar shows what the daemon sent: a socket of our own records each running
    update, and the highest percent the bar showed is the highest of those (floored, as the
    page does); then the job is listed as completed."""
    async with async_playwright() as pw, websockets.connect(stack.ws_url) as ws:
        browser = await launch_chromium(pw)
        try:
            page = await browser.new_page()
            await page.add_init_script(MAX_PERCENT_RECORDER)
            await page.goto(stack.url)
            await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
            job_id = await stack.producer.submit(
                "still", client_id=WATCHER_ID, title="browser still"
            )
            updates = await next_job(ws, job_id, until="completed")
            card = page.locator(f'article[data-job-id="{job_id}"]')
            finished = page.locator(f'li[data-job-id="{job_id}"]')
            await expect(finished).to_contain_text("Completed", timeout=30_000)
            await expect(card).to_have_count(0)
            shown = await page.evaluate(f"window.maxPercent[{json.dumps(job_id)}]")
        finally:
            await browser.close()
    running = [u["percent"] for u in updates if u["state"] == "running"]
    assert any(u["step"] for u in updates), "no update carried a sampler step"
    assert shown == math.floor(max(running)) > 0
