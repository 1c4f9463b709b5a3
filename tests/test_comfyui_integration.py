"""The real ComfySource and Tracker against the simulator's FakeComfyUI on 127.0.0.1.

Each visibility level (DESIGN §5), the bridge installed, a ComfyUI restart mid-sampling, a
network blip, interrupts, queue deletes and clears, and two instances at once. The simulator
runs fast (20 ms sampler steps) and every wait is on what the source emitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from comfyui_watch import WATCHER_ID, Watch, get, post, running, submit
from fixtures_util import Client, Frame

from tower_progress.core.model import SourceStatus
from tower_progress.simulate import workflows
from tower_progress.simulate.server import FakeComfyUI
from tower_progress.sources.comfyui import ComfySource

OTHER_CLIENT = "someone-elses-browser-tab"
LONG = 2000  # sampler steps of a prompt the test ends itself (40 s if left alone)


@dataclass
class Served:
    """A FakeComfyUI served on 127.0.0.1; ``stop`` is what a ComfyUI shutdown looks like."""

    sim: FakeComfyUI
    runner: web.AppRunner
    port: int
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.sim.close()
            await self.runner.cleanup()


Start = Callable[..., Awaitable[Served]]


@pytest.fixture
async def comfyui() -> AsyncIterator[Start]:
    """Starts fast FakeComfyUIs (``await comfyui(seed, port=0, version="0.8.0",
    bridge=False)``; with ``bridge`` the bridge is installed for WATCHER_ID); all stopped at
    teardown."""
    started: list[Served] = []

    async def start(
        seed: int, port: int = 0, version: str = "0.8.0", bridge: bool = False
    ) -> Served:
        sim = FakeComfyUI(
            seed=seed,
            step_seconds=0.02,
            load_seconds=0.05,
            frame_seconds=0.005,
            version=version,
            bridge_client_id=WATCHER_ID if bridge else None,
        )
        runner = web.AppRunner(sim.app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        served = Served(sim, runner, runner.addresses[0][1])
        started.append(served)
        return served

    yield start
    for served in started:
        await served.stop()


@dataclass
class Local:
    watch: Watch
    server: Served
    source: ComfySource


@pytest.fixture
async def local(comfyui: Start) -> AsyncIterator[Local]:
    """One FakeComfyUI, watched by a connected source that feeds a Tracker."""
    watch = Watch({"local": WATCHER_ID})
    server = await comfyui(seed=1)
    source = watch.source("local", server.url)
    async with running(source):
        await watch.connected("local")
        yield Local(watch, server, source)


def states(watch: Watch, prompt_id: str) -> list[str]:
    """The job's distinct states in the order it went through them."""
    return list(dict.fromkeys(view["state"] for view in watch.history(prompt_id)))


@pytest.mark.parametrize(
    ("client_id", "visibility"),
    [(WATCHER_ID, "full"), (None, "partial")],
    ids=["own-client-id", "no-client-id"],
)
async def test_sampler_steps_are_seen_with_full_and_partial_visibility(
    local: Local, client_id: str | None, visibility: str
) -> None:
    watch = local.watch
    prompt_id = await submit(local.server.url, workflows.still(steps=20), client_id)
    done = await watch.state(prompt_id, "completed")
    sampling = [v for v in watch.history(prompt_id) if v["step"] is not None]
    steps = [v["step"] for v in sampling]
    # Never backwards; a step may show twice when something else changed meanwhile (a /queue
    # poll landing mid-step can move the ETA).
    assert steps == sorted(steps)
    assert set(steps) == set(range(1, 21))
    assert {(v["steps"], v["visibility"], v["stage"]) for v in sampling} == {
        (20, visibility, "sampling")
    }
    assert states(watch, prompt_id)[-2:] == ["running", "completed"]
    assert (done["percent"], done["visibility"], done["instance"]) == (100.0, visibility, "local")
    assert done["outputs"] == ["still_00001_.png"]


async def test_another_clients_prompt_is_seen_coarsely_from_queue_and_history(
    local: Local,
) -> None:
    watch, url = local.watch, local.server.url
    ahead = await submit(url, workflows.still(steps=40), OTHER_CLIENT)
    await watch.state(ahead, "running")
    prompt_id = await submit(url, workflows.still(prefix="coarse"), OTHER_CLIENT)
    queued = await watch.state(prompt_id, "queued")
    busy = await watch.state(prompt_id, "running")
    done = await watch.state(prompt_id, "completed")
    assert (queued["queue_position"], busy["queue_position"]) == (1, 0)
    assert busy["stage_label"] == "Running (step detail unavailable)"
    views = watch.history(prompt_id)
    assert {v["visibility"] for v in views} == {"coarse"}
    assert {(v["step"], v["steps"]) for v in views} == {(None, None)}
    assert states(watch, prompt_id) == ["queued", "running", "completed"]
    assert (done["outputs"], done["percent"]) == (["coarse_00001_.png"], 100.0)
    assert done["started_at"] is not None and done["finished_at"] is not None


async def sampling_and_waiting(
    watch: Watch, url: str, waiting_client: str | None
) -> tuple[str, str]:
    """A long prompt of the watcher's seen sampling, and a short one seen queued behind it."""
    sampling = await submit(url, workflows.still(steps=LONG), WATCHER_ID)
    waiting = await submit(url, workflows.still(steps=5), waiting_client)
    await watch.step(sampling, 3)
    await watch.state(waiting, "queued")
    return sampling, waiting


@dataclass
class BridgeRun:
    watch: Watch
    prompt_ids: list[str]
    plain: list[Any]
    http: list[Any]


def normalised(value: Any, prompt_ids: list[str]) -> Any:
    """``value`` with prompt ids numbered by ``prompt_ids`` and times left out."""
    text = json.dumps(value)
    for number, prompt_id in enumerate(prompt_ids):
        text = text.replace(prompt_id, f"prompt-{number}")
    times = {"timestamp", "create_time", "execution_start_time", "execution_end_time"}

    def strip(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: strip(v) for k, v in item.items() if k not in times}
        if isinstance(item, list):
            return [strip(v) for v in item]
        return item

    return strip(json.loads(text))


def frame_view(frame: Frame) -> Any:
    return frame.message if frame.message is not None else ("binary", frame.event, frame.size)


async def run_with_and_without_bridge(comfyui: Start, *, bridge: bool) -> BridgeRun:
    """A foreign client's prompt, one without a client id, then its fully cached re-run, each
    waited for in turn, watched by the daemon's source and by a plain browser-like socket."""
    watch = Watch({"local": WATCHER_ID}, bridged={"local"} if bridge else ())
    server = await comfyui(seed=12, bridge=bridge)
    url = server.url
    plain = await Client.connect(url, "a-plain-browser-tab")
    anonymous = workflows.still(steps=8, seed=2, prefix="anon")
    prompt_ids: list[str] = []
    async with running(watch.source("local", url)):
        await watch.connected("local")
        for graph, client_id in (
            (workflows.still(steps=8, prefix="foreign"), OTHER_CLIENT),
            (anonymous, None),
            (anonymous, None),
        ):
            prompt_id = await submit(url, graph, client_id)
            await watch.state(prompt_id, "completed")
            prompt_ids.append(prompt_id)
        http = [await get(url, f"/history/{p}") for p in prompt_ids]
        http += [await get(url, f"/api/jobs/{p}") for p in prompt_ids]
        await server.sim.flush()
        frames = await plain.drain()
    await plain.close()
    return BridgeRun(
        watch,
        prompt_ids,
        normalised([frame_view(f) for f in frames], prompt_ids),
        normalised(http, prompt_ids),
    )


async def test_with_the_bridge_every_prompt_is_full_and_other_clients_see_no_difference(
    comfyui: Start,
) -> None:
    stock = await run_with_and_without_bridge(comfyui, bridge=False)
    bridged = await run_with_and_without_bridge(comfyui, bridge=True)

    for run, visibilities in ((stock, ["coarse", "partial"]), (bridged, ["full", "full"])):
        for prompt_id, visibility in zip(run.prompt_ids, visibilities, strict=False):
            assert {v["visibility"] for v in run.watch.history(prompt_id)} == {visibility}
    for prompt_id in bridged.prompt_ids[:2]:
        views = bridged.watch.history(prompt_id)
        sampling = [v for v in views if v["step"] is not None]
        steps = [v["step"] for v in sampling]
        assert steps == sorted(steps)
        assert set(steps) == set(range(1, 9))
        assert {(v["steps"], v["stage"]) for v in sampling} == {(8, "sampling")}
        done = views[-1]
        assert (done["state"], done["percent"]) == ("completed", 100.0)
        assert [s["stage"] for s in done["stages"]][-3:] == ["sampling", "decoding", "encoding"]
    rerun = bridged.watch.job(bridged.prompt_ids[2])
    assert rerun is not None
    assert (rerun["state"], rerun["visibility"]) == ("completed", "full")
    assert {v["step"] for v in stock.watch.history(stock.prompt_ids[0])} == {None}

    assert bridged.plain == stock.plain
    assert bridged.http == stock.http
    kinds = {f["type"] if isinstance(f, dict) else tuple(f[:2]) for f in bridged.plain}
    assert kinds == {"status", "progress", "progress_state", ("binary", 1)}
    assert bridged.http[2]["prompt-2"]["outputs"] == {}


async def test_a_restarted_comfyui_leaves_its_prompts_lost_never_completed(
    comfyui: Start,
) -> None:
    watch = Watch({"local": WATCHER_ID})
    first = await comfyui(seed=3)
    async with running(watch.source("local", first.url)):
        await watch.connected("local")
        sampling, waiting = await sampling_and_waiting(watch, first.url, None)
        await first.stop()
        outage = await watch.stale(sampling)
        assert (await watch.stale(waiting))["state"] == "queued"
        assert (outage["state"], outage["step"] is not None) == ("running", True)
        restarted = await comfyui(seed=4, port=first.port)
        assert restarted.port == first.port
        lost = await watch.state(sampling, "lost")
        await watch.state(waiting, "lost")
    assert states(watch, sampling)[-2:] == ["running", "lost"]
    assert states(watch, waiting) == ["queued", "lost"]
    assert lost["stale"] is False
    assert lost["last_seen_at"] is not None
    ups = [s.up for s in watch.of_type(SourceStatus)]
    assert ups[:3] == [False, True, False]
    assert ups[-1] is True


@dataclass
class Relay:
    """A TCP relay on 127.0.0.1 to ``upstream``: what a network between daemon and ComfyUI does.

    ``cut`` drops every connection and refuses new ones until ``mend``: a blip, ComfyUI and its
    queue untouched.
    """

    upstream: int
    port: int = 0
    refusing: bool = False
    _server: asyncio.Server | None = None
    _links: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.refusing = True
        for writer in self._writers:
            writer.transport.abort()

    def mend(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.cut()
        await asyncio.gather(*self._links, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for each in (writer, up_writer):
                each.transport.abort()
                self._writers.discard(each)
            await asyncio.gather(*pipes, return_exceptions=True)
            self._links.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


async def test_a_prompt_deleted_during_a_network_blip_is_canceled_not_lost(
    comfyui: Start,
) -> None:
    watch = Watch({"local": WATCHER_ID})
    server = await comfyui(seed=5)
    relay = Relay(server.port)
    await relay.start()
    try:
        async with running(watch.source("local", relay.url)):
            await watch.connected("local")
            ahead, waiting = await sampling_and_waiting(watch, server.url, OTHER_CLIENT)
            relay.cut()
            assert (await watch.stale(waiting))["state"] == "queued"
            await post(server.url, "/queue", {"delete": [waiting]})
            relay.mend()
            canceled = await watch.state(waiting, "canceled")
            await watch.step(ahead, watch.history(ahead)[-1]["step"] + 1)
    finally:
        await relay.close()
    assert states(watch, waiting) == ["queued", "canceled"]
    assert (canceled["stale"], canceled["started_at"]) == (False, None)
    assert watch.history(ahead)[-1]["state"] == "running"
    assert [s.up for s in watch.of_type(SourceStatus)][:3] == [False, True, False]


@pytest.mark.parametrize(
    ("client_id", "visibility"),
    [(WATCHER_ID, "full"), (None, "partial"), (OTHER_CLIENT, "coarse")],
    ids=["own-client-id", "no-client-id", "other-client-id"],
)
async def test_interrupt_through_the_source_cancels_the_running_prompt(
    local: Local, client_id: str | None, visibility: str
) -> None:
    watch, url = local.watch, local.server.url
    prompt_id = await submit(url, workflows.still(steps=LONG), client_id)
    await watch.state(prompt_id, "running")
    assert await local.source.cancel(prompt_id, running=True) == "interrupted"
    canceled = await watch.state(prompt_id, "canceled")
    entry = (await get(url, f"/history/{prompt_id}"))[prompt_id]
    kind, truth = entry["status"]["messages"][-1]
    assert kind == "execution_interrupted"
    assert canceled["visibility"] == visibility
    assert canceled["error"] == {
        "message": "Interrupted",
        "node_id": truth["node_id"],
        "node_type": truth["node_type"],
        "exception_type": None,
    }
    assert states(watch, prompt_id)[-2:] == ["running", "canceled"]


async def test_deleting_a_waiting_prompt_cancels_it_and_leaves_the_running_one(
    local: Local,
) -> None:
    watch, url = local.watch, local.server.url
    ahead = await submit(url, workflows.still(steps=LONG), OTHER_CLIENT)
    prompt_id = await submit(url, workflows.still(steps=5), WATCHER_ID)
    await watch.state(ahead, "running")
    await watch.state(prompt_id, "queued")
    assert await local.source.cancel(prompt_id, running=False) == "deleted"
    canceled = await watch.state(prompt_id, "canceled")
    assert states(watch, prompt_id) == ["queued", "canceled"]
    assert (canceled["started_at"], canceled["queue_position"]) == (None, None)
    assert watch.history(ahead)[-1]["state"] == "running"
    log = local.server.sim.history_log
    assert [t.event for t in log if t.prompt_id == prompt_id] == ["queued", "deleted"]


async def test_clearing_the_queue_cancels_every_waiting_prompt(local: Local) -> None:
    watch, url = local.watch, local.server.url
    ahead = await submit(url, workflows.still(steps=LONG), WATCHER_ID)
    waiting = [
        await submit(url, workflows.still(steps=5), client)
        for client in (WATCHER_ID, None, OTHER_CLIENT)
    ]
    await watch.state(ahead, "running")
    for prompt_id in waiting:
        await watch.state(prompt_id, "queued")
    await post(url, "/queue", {"clear": True})
    for prompt_id in waiting:
        await watch.state(prompt_id, "canceled")
    assert [states(watch, p) for p in waiting] == [["queued", "canceled"]] * 3
    assert watch.history(ahead)[-1]["state"] == "running"


@pytest.mark.parametrize(
    ("version", "outcomes_from"),
    [("0.8.0", "/api/jobs and /history"), ("0.5.0", "/history")],
    ids=["with-api-jobs", "before-api-jobs"],
)
async def test_outcomes_are_the_same_with_and_without_api_jobs(
    comfyui: Start, caplog: pytest.LogCaptureFixture, version: str, outcomes_from: str
) -> None:
    caplog.set_level(logging.INFO, logger="tower_progress.sources.comfyui")
    watch = Watch({"local": WATCHER_ID})
    server = await comfyui(seed=6, version=version)
    async with running(watch.source("local", server.url)):
        await watch.connected("local")
        done = await submit(server.url, workflows.still(steps=3), OTHER_CLIENT)
        finished = await watch.state(done, "completed")
        ahead, waiting = await sampling_and_waiting(watch, server.url, OTHER_CLIENT)
        await post(server.url, "/queue", {"delete": [waiting]})
        await watch.state(waiting, "canceled")
        await post(server.url, "/interrupt", {"prompt_id": ahead})
        interrupted = await watch.state(ahead, "canceled")
    assert finished["outputs"] == ["still_00001_.png"]
    assert states(watch, waiting) == ["queued", "canceled"]
    assert (interrupted["error"] or {})["message"] == "Interrupted"
    assert f"comfyui local: ComfyUI {version}; outcomes from {outcomes_from}" in caplog.messages


async def test_two_instances_feed_one_tracker_each_job_naming_its_instance(
    comfyui: Start,
) -> None:
    watch = Watch({"a": WATCHER_ID, "b": WATCHER_ID})
    server_a, server_b = await comfyui(seed=8), await comfyui(seed=9)
    async with running(watch.source("a", server_a.url), watch.source("b", server_b.url)):
        await watch.connected("a", "b")
        on_a = await submit(server_a.url, workflows.still(steps=10), WATCHER_ID)
        on_b = await submit(server_b.url, workflows.still(steps=10), None)
        done_a = await watch.state(on_a, "completed")
        done_b = await watch.state(on_b, "completed")
    assert on_a != on_b
    assert (done_a["instance"], done_a["visibility"]) == ("a", "full")
    assert (done_b["instance"], done_b["visibility"]) == ("b", "partial")
    assert {v["instance"] for v in watch.history(on_a)} == {"a"}
    assert {v["instance"] for v in watch.history(on_b)} == {"b"}


async def test_one_instance_down_marks_only_its_own_jobs_stale(comfyui: Start) -> None:
    watch = Watch({"a": WATCHER_ID, "b": WATCHER_ID})
    server_a, server_b = await comfyui(seed=10), await comfyui(seed=11)
    async with running(watch.source("a", server_a.url), watch.source("b", server_b.url)):
        await watch.connected("a", "b")
        on_a = await submit(server_a.url, workflows.still(steps=40), WATCHER_ID)
        on_b = await submit(server_b.url, workflows.still(steps=LONG), WATCHER_ID)
        await watch.step(on_a, 1)
        await watch.step(on_b, 1)
        await server_b.stop()
        stale_b = await watch.stale(on_b)
        done_a = await watch.state(on_a, "completed")
    assert (stale_b["instance"], stale_b["state"]) == ("b", "running")
    assert done_a["instance"] == "a"
    assert not any(v["stale"] for v in watch.history(on_a))
