"""Launching Debian's Chromium for the browser tests (Playwright cannot download browsers)."""

from __future__ import annotations

import shutil

import pytest
from playwright.async_api import Browser, Playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


async def launch_chromium(pw: Playwright) -> Browser:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium not on PATH: ./start.sh test installs it")
    return await pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
