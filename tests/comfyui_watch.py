"""A real Tracker behind real ComfySources, for the ComfyUI source tests.

``Watch.emit`` is what the daemon's pipeline does minus the hub: every observation is kept and
applied to the tracker, every job view it emits is kept, and waiters are woken. ``until`` waits
on those wake-ups (never on a clock) with a deadline that fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any, TypeVar

import aiohttp
import pytest

from tower_progress.core.model import JobChanged, JsonDict, Observation, SourceStatus
from tower_progress.core.tracker import InstanceConfig, Tracker, TrackerConfig
from tower_progress.sources.comfyui import ComfySource

T = TypeVar("T")
WATCHER_ID = "tower-progress-test-watcher"
# Small enough that a test never waits on the source's clocks, large enough for 2 cores.
FAST: dict[str, float] = {
    "busy_poll_s": 0.05,
    "idle_poll_s": 0.5,
    "http_timeout_s": 2.0,
    "open_timeout_s": 2.0,
    "initial_backoff_s": 0.05,
    "max_backoff_s": 0.2,
}


class Watch:
    def __init__(self, instances: Mapping[str, str | None], bridged: Collection[str] = ()) -> None:
        """``instances`` maps each ComfyUI instance name to the watcher's client id there;
        ``bridged`` names those configured with ``bridge = true``."""
        config = TrackerConfig(
            instances={n: InstanceConfig(c, n in bridged) for n, c in instances.items()}
        )
        self.tracker = Tracker(config)
        self.observations: list[Observation] = []
        self.views: dict[str, list[JsonDict]] = defaultdict(list)
        self._changed = asyncio.Event()

    def emit(self, observation: Observation) -> None:
        self.observations.append(observation)
        for event in self.tracker.apply(observation, time.time()):
            if isinstance(event, JobChanged):
                self.views[event.job["id"]].append(event.job)
        self._changed.set()

    def source(self, name: str, url: str, client_id: str = WATCHER_ID, **knobs: Any) -> ComfySource:
        return ComfySource(
            name=name,
            url=url,
            client_id=client_id,
            emit=self.emit,
            unresolved=self.tracker.unresolved_prompts,
            needs_polling=self.tracker.needs_polling,
            **(FAST | knobs),
        )

    def job(self, prompt_id: str) -> JsonDict | None:
        return self.tracker.job(f"comfy:{prompt_id}")

    def history(self, prompt_id: str) -> list[JsonDict]:
        """Every view of the prompt's job the tracker emitted, oldest first."""
        return self.views[f"comfy:{prompt_id}"]

    def of_type(self, kind: type[T]) -> list[T]:
        return [o for o in self.observations if isinstance(o, kind)]

    async def until(self, what: str, check: Callable[[], T | None], within_s: float = 15.0) -> T:
        """Wait until ``check()`` is truthy after some emit; returns its value."""
        deadline = asyncio.get_running_loop().time() + within_s
        while not (result := check()):
            self._changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self._changed.wait(), max(remaining, 0.0))
            except TimeoutError:
                pytest.fail(f"timed out waiting for {what}")
        return result

    async def connected(self, *instances: str) -> None:
        """Wait until every named instance's source is up (by its latest status)."""

        def up() -> bool:
            latest = {s.name: s.up for s in self.of_type(SourceStatus)}
            return all(latest.get(f"comfyui:{name}") for name in instances)

        await self.until(f"{', '.join(instances)} connected", up)

    async def stale(self, prompt_id: str) -> JsonDict:
        def marked() -> JsonDict | None:
            job = self.job(prompt_id)
            return job if job is not None and job["stale"] else None

        return await self.until(f"prompt {prompt_id} stale", marked)

    async def state(self, prompt_id: str, state: str, within_s: float = 15.0) -> JsonDict:
        def reached() -> JsonDict | None:
            job = self.job(prompt_id)
            return job if job is not None and job["state"] == state else None

        return await self.until(f"prompt {prompt_id} {state}", reached, within_s)

    async def step(self, prompt_id: str, at_least: int) -> JsonDict:
        def reached() -> JsonDict | None:
            job = self.job(prompt_id)
            step = job["step"] if job is not None else None
            return job if step is not None and step >= at_least else None

        return await self.until(f"prompt {prompt_id} at step {at_least}", reached)


@contextlib.asynccontextmanager
async def running(*sources: ComfySource) -> AsyncIterator[None]:
    """Run the sources for the block's duration; they must stop promptly after it."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop), name=s.source_name) for s in sources]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def submit(url: str, graph: JsonDict, client_id: str | None) -> str:
    """POST /prompt as a producer would; returns the prompt id."""
    body: JsonDict = {"prompt": graph}
    if client_id is not None:
        body["client_id"] = client_id
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/prompt", json=body) as response,
    ):
        answer = await response.json()
        assert response.status == 200, answer
        prompt_id: str = answer["prompt_id"]
        return prompt_id


async def get(url: str, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url + path) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def post(url: str, path: str, body: JsonDict) -> None:
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body) as response:
        assert response.status == 200, await response.text()
