"""The simulator against every real ComfyUI v0.8.0 recording.

Each recording is replayed against a fresh ``FakeComfyUI`` on 127.0.0.1: the same sockets
(submitter, watcher, anon, ...) open with fresh client ids, the recorded POST bodies are sent
in order (a recorded interrupt or disconnect waits for the same sampler step), and then each
socket's stream is compared with what the real server sent it: the same message types in the
same order with the same node ids, progress values and maxima, cached node lists, error node
types and exception types, and output file names. Ids, timestamps and timings are ignored,
and so is where ``status`` frames fall (their order against other frames is a race in ComfyUI
too): their count and last value must match. Every message, history entry, job and
``/system_stats`` answer must also have the recording's shape: the same keys in the same
order and the same value types, all the way down. The node cache carries over between the
recordings (they came from one server process), so each replay first runs the prompt the
real server ran last before it.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from fixtures_util import RECORDED_ORDER, Client, Frame, Line, Recording, serve

from tower_progress.simulate.server import FakeComfyUI

# Scenarios whose recorded action lands mid-sampling run at full speed so the action is still
# mid-sampling here; the rest run fast.
SPEEDS = {"interrupt_sampling": 1.0, "reconnect_midrun": 1.0}
DEFAULT_SPEED = 0.1


@dataclass(frozen=True)
class Ticks:
    """Consecutive progress ticks of one node: values, which ones had a preview, and how."""

    node: str
    maximum: float
    values: tuple[float, ...]
    previews: tuple[float, ...]
    preview_event: int | None
    others: tuple[Any, ...]

    def accepts(self, live: Ticks) -> bool:
        """Whether ``live`` is the same run of ticks, allowing for where it was cut off."""
        values = live.values
        consecutive = all(b - a == 1 for a, b in itertools.pairwise(values))
        same_start = (values[0] == 1) == (self.values[0] == 1)
        full = self.values[-1] == self.maximum
        same_end = (values[-1] == live.maximum) == full and values[-1] >= self.values[-1]
        complete = self.values[0] == 1 and full
        previews_match = (
            (self.previews, self.preview_event) == (live.previews, live.preview_event)
            if complete
            else self.preview_event in (None, live.preview_event) or not live.previews
        )
        return (
            (self.node, self.maximum, self.others) == (live.node, live.maximum, live.others)
            and consecutive
            and same_start
            and same_end
            and previews_match
        )


@dataclass
class Stream:
    tokens: list[Any]
    statuses: list[int]


def _states(data: dict[str, Any], skip: str | None = None) -> tuple[Any, ...]:
    return tuple(
        (node_id, entry["state"], float(entry["value"]), float(entry["max"]))
        for node_id, entry in data["nodes"].items()
        if node_id != skip
    )


def _token(frame: Frame) -> Any:
    if frame.message is None:
        return ("binary", frame.event)
    kind, data = frame.type, frame.data
    match kind:
        case "status":
            return ("hello", data["status"]["exec_info"]["queue_remaining"])
        case "execution_cached":
            return (kind, tuple(data["nodes"]))
        case "executing":
            return (kind, data["node"], "prompt_id" in data)
        case "executed":
            return (kind, data["node"], data["output"])
        case "execution_error":
            fields = ("node_id", "node_type", "exception_type", "executed")
            return (kind, *(str(data[f]) for f in fields))
        case "execution_interrupted":
            return (kind, data["node_id"], data["node_type"], tuple(data["executed"]))
        case "progress_state":
            return (kind, _states(data))
        case "progress":
            return (kind, data["node"], data["value"], data["max"])
        case "feature_flags":
            return (kind, str(data))
        case _:
            return (kind,)


def _tick_at(items: list[Frame], i: int) -> tuple[tuple[Any, ...], int] | None:
    """A tick starting at ``items[i]``: [progress_state] [binary 4] progress [binary 1]."""
    j = i
    state = items[j] if items[j].type == "progress_state" else None
    j += state is not None
    preview = None
    if j < len(items) and items[j].event == 4:
        preview, j = 4, j + 1
    if j >= len(items) or items[j].type != "progress":
        return None
    progress = items[j].data
    node, value = progress["node"], progress["value"]
    if state is not None and float(state.data["nodes"][node]["value"]) != float(value):
        return None
    j += 1
    if j < len(items) and items[j].event == 1:
        preview, j = 1, j + 1
    others = _states(state.data, skip=node) if state is not None else None
    return (node, float(progress["max"]), float(value), preview, others), j - i


def stream(frames: list[Frame]) -> Stream:
    """Tokens (ticks grouped) plus the queue counts of the non-handshake status frames."""
    items: list[Frame] = []
    statuses: list[int] = []
    for frame in frames:
        if frame.type == "status" and "sid" not in frame.data:
            statuses.append(frame.data["status"]["exec_info"]["queue_remaining"])
        else:
            items.append(frame)
    tokens: list[Any] = []
    i = 0
    while i < len(items):
        tick = _tick_at(items, i)
        if tick is None:
            tokens.append(_token(items[i]))
            i += 1
            continue
        (node, maximum, value, preview, others), used = tick
        i += used
        last = tokens[-1] if tokens else None
        if isinstance(last, Ticks) and (last.node, last.maximum) == (node, maximum):
            tokens[-1] = Ticks(
                node,
                maximum,
                (*last.values, value),
                (*last.previews, value) if preview else last.previews,
                last.preview_event or preview,
                last.others if last.others else others or (),
            )
        else:
            tokens.append(
                Ticks(node, maximum, (value,), (value,) if preview else (), preview, others or ())
            )
    return Stream(tokens, statuses)


def assert_same_stream(label: str, recorded: Stream, live: Stream) -> None:
    tokens = [
        rec if isinstance(rec, Ticks) and isinstance(got, Ticks) and rec.accepts(got) else got
        for rec, got in zip(recorded.tokens, live.tokens, strict=False)
    ] + live.tokens[len(recorded.tokens) :]
    assert tokens == recorded.tokens, label
    assert len(live.statuses) == len(recorded.statuses), f"{label}: status frame count"
    assert live.statuses[-1:] == recorded.statuses[-1:], f"{label}: last queue count"


def shape(value: Any) -> Any:
    """``value``'s keys (in order) and value types, recursively, values themselves left out
    (ids, timestamps, timings); a list is the set of its items' shapes."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return ["list", *sorted({json.dumps(shape(item)) for item in value})]
    return type(value).__name__


def shapes(frames: list[Frame]) -> dict[str, set[str]]:
    """Every distinct shape each message type (each binary event: of its metadata) came in."""
    found: dict[str, set[str]] = defaultdict(set)
    for frame in frames:
        if frame.message is None:
            found[f"binary {frame.event}"].add(json.dumps(shape(frame.metadata)))
        else:
            found[frame.type or ""].add(json.dumps(shape(frame.message)))
    return dict(found)


def history_view(entry: dict[str, Any]) -> dict[str, Any]:
    keep = ("nodes", "node_id", "node_type", "exception_type", "executed")
    status = entry["status"]
    return {
        "status_str": status["status_str"],
        "completed": status["completed"],
        "messages": [
            (event, {k: v for k, v in data.items() if k in keep})
            for event, data in status["messages"]
        ],
        "outputs": entry["outputs"],
        "meta": entry["meta"],
        "graph": entry["prompt"][2],
        "extra_data": sorted(entry["prompt"][3]),
        "outputs_to_execute": entry["prompt"][4],
    }


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    error = job.get("execution_error")
    return {
        "keys": sorted(job),
        "status": job["status"],
        "outputs_count": job["outputs_count"],
        "preview_output": job.get("preview_output"),
        "error": error and (error["node_type"], error["exception_type"]),
        "history": history_view(
            {
                "status": job["execution_status"],
                "outputs": job["outputs"],
                "meta": {},
                "prompt": [0, "", job["workflow"]["prompt"], job["workflow"]["extra_data"], []],
            }
        ),
    }


def primer_prompt(name: str) -> dict[str, Any] | None:
    """The last prompt the recording server ran before ``name`` (what its cache held)."""
    for previous in reversed(RECORDED_ORDER[: RECORDED_ORDER.index(name)]):
        accepted = Recording.load(previous).accepted_prompts()
        if accepted:
            prompt: dict[str, Any] = accepted[-1].raw["req"]["prompt"]
            return prompt
    return None


async def prime(base: str, http: aiohttp.ClientSession, name: str) -> None:
    prompt = primer_prompt(name)
    if prompt is None:
        return
    primer = await Client.connect(base, "primer")
    async with http.post(f"{base}/prompt", json={"prompt": prompt, "client_id": "primer"}) as r:
        assert r.status == 200
    await primer.read_until(lambda f: f.type == "executing" and f.data["node"] is None)
    await primer.close()


class Monitor:
    """A socket of its own that tells when the queue has drained (status 0 after busy)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def drained(self) -> None:
        busy = False
        while True:
            frame = await self._client.read()
            if frame.type == "status":
                remaining = frame.data["status"]["exec_info"]["queue_remaining"]
                if remaining:
                    busy = True
                elif busy:
                    return


def _drained_before(rec: Recording, since: Line | None, line: Line) -> bool:
    """Whether the recorded queue emptied between ``since`` (a POST /prompt) and ``line``."""
    if since is None:
        return False
    return any(
        other.frame_type() == "status"
        and other.msg["data"]["status"]["exec_info"]["queue_remaining"] == 0
        for other in rec.lines[since.index : line.index]
    )


def _trigger(rec: Recording, line: Line) -> tuple[str, int] | None:
    """The sampler tick the submitter had seen when a mid-run action was recorded."""
    for earlier in reversed(rec.lines[: line.index]):
        if earlier.client != "submitter":
            continue
        if earlier.frame_type() == "progress":
            return earlier.msg["data"]["node"], earlier.msg["data"]["value"]
        if earlier.frame_type() in ("status", "executing") or earlier.kind == "open":
            return None
    return None


def _final_closes(rec: Recording) -> set[int]:
    """Indexes of the close lines at the end of a recording (sockets closed when done)."""
    closes: set[int] = set()
    for line in reversed(rec.lines):
        if line.dir == "meta" and line.kind == "close":
            closes.add(line.index)
        elif line.dir != "meta":
            break
    return closes


class Replay:
    def __init__(
        self, rec: Recording, sim: FakeComfyUI, base: str, http: aiohttp.ClientSession
    ) -> None:
        self.rec = rec
        self.sim = sim
        self.base = base
        self.http = http
        self.ids: dict[str, str] = {}
        self.open: dict[str, Client] = {}
        self.connections: dict[str, list[Client]] = {}
        self.accepted: list[tuple[Line, str]] = []
        self.last_post: Line | None = None
        self.numbers: list[float] = []

    def map_id(self, recorded: str) -> str:
        return self.ids.setdefault(recorded, uuid.uuid4().hex)

    async def run(self, monitor: Monitor) -> None:
        finals = _final_closes(self.rec)
        for line in self.rec.lines[1:]:
            if line.dir == "meta" and line.kind == "open":
                recorded_id = line.msg["client_id"]
                client_id = self.map_id(recorded_id) if recorded_id else None
                client = await Client.connect(self.base, client_id)
                self.open[str(line.client)] = client
                self.connections.setdefault(str(line.client), []).append(client)
            elif line.dir == "ws_sent":
                await self.open[str(line.client)].ws.send(json.dumps(line.msg))
            elif line.dir == "meta" and line.kind == "close" and line.index not in finals:
                client = self.open.pop(str(line.client))
                if not await self.wait_for_trigger(line):
                    await self.sim.flush()
                    await client.drain()
                await client.close()
            elif line.dir == "http" and line.raw["method"] == "POST":
                await self.post(line, monitor)
            elif line.dir == "http" and self.rec.name == "idle_http_and_handshake":
                await self.compare_get(line)

    async def wait_for_trigger(self, line: Line) -> bool:
        """Read the submitter up to the recorded tick, if ``line`` was recorded mid-run."""
        trigger = _trigger(self.rec, line)
        if trigger is None:
            return False
        submitter = self.open.get("submitter") or self.connections["submitter"][-1]
        await submitter.read_until(
            lambda f: f.type == "progress" and (f.data["node"], f.data["value"]) == trigger
        )
        return True

    async def post(self, line: Line, monitor: Monitor) -> None:
        path, req = line.raw["path"], line.raw["req"]
        if path == "/prompt":
            if _drained_before(self.rec, self.last_post, line):
                await monitor.drained()
            if isinstance(req, dict) and "client_id" in req:
                req = {**req, "client_id": self.map_id(req["client_id"])}
        else:
            await self.wait_for_trigger(line)
        kwargs: dict[str, Any] = {} if req is None else {"json": req}
        async with self.http.post(self.base + path, **kwargs) as response:
            status = response.status
            body: Any = await response.json() if status != 200 or path == "/prompt" else ""
            if not body:
                assert await response.text() == "", path
        assert status == line.raw["status"], path
        if path == "/prompt" and status == 200:
            assert body["node_errors"] == line.raw["body"]["node_errors"]
            self.accepted.append((line, body["prompt_id"]))
            self.last_post = line
            self.numbers.append(body["number"])
            first = self.accepted[0][0].raw["body"]["number"]
            assert body["number"] - self.numbers[0] == line.raw["body"]["number"] - first
        else:
            assert body == line.raw["body"], path

    async def compare_get(self, line: Line) -> None:
        path = line.raw["path"]
        async with self.http.get(self.base + path) as response:
            body = await response.json()
            assert response.status == line.raw["status"], path
        if path == "/system_stats":
            recorded = copy.deepcopy(line.raw["body"])
            for device in recorded["devices"]:
                device["index"] = 0  # recorded on a CPU box; the simulator is a CUDA one
            assert shape(body) == shape(recorded)
        else:
            assert body == line.raw["body"], path


@pytest.mark.parametrize("name", RECORDED_ORDER)
async def test_replay_matches_recording(name: str) -> None:
    rec = Recording.load(name)
    sim = FakeComfyUI(speed=SPEEDS.get(name, DEFAULT_SPEED), seed=RECORDED_ORDER.index(name))
    async with asyncio.timeout(30), serve(sim) as base, aiohttp.ClientSession() as http:
        await prime(base, http, name)
        monitor = Monitor(await Client.connect(base, "monitor"))
        replay = Replay(rec, sim, base, http)
        await replay.run(monitor)
        if replay.accepted:
            await monitor.drained()
        await sim.flush()

        for role, connections in replay.connections.items():
            recorded_segments = rec.segments(role)
            assert len(connections) == len(recorded_segments), role
            for index, (client, recorded) in enumerate(
                zip(connections, recorded_segments, strict=True)
            ):
                frames = await client.drain() if client in replay.open.values() else client.frames
                live = stream(frames)
                recorded_frames = [Frame.recorded(line) for line in recorded]
                expected = stream(recorded_frames)
                assert_same_stream(f"{name} {role} #{index}", expected, live)
                assert shapes(frames) == shapes(recorded_frames), f"{name} {role} #{index}"

        for line, prompt_id in replay.accepted:
            recorded_id = line.raw["body"]["prompt_id"]
            async with http.get(f"{base}/history/{prompt_id}") as response:
                entry = (await response.json())[prompt_id]
            recorded_entry = rec.final_body(f"/history/{recorded_id}")[recorded_id]
            assert history_view(entry) == history_view(recorded_entry)
            assert shape(entry) == shape(recorded_entry)
            async with http.get(f"{base}/api/jobs/{prompt_id}") as response:
                job = await response.json()
            recorded_job = rec.final_body(f"/api/jobs/{recorded_id}")
            assert job_view(job) == job_view(recorded_job)
            assert shape(job) == shape(recorded_job)
        for client in replay.open.values():
            await client.close()
