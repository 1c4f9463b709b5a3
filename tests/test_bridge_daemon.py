"""The daemon's side of the bridge: what the watcher socket of a bridged ComfyUI receives, read
through the daemon's wire parsers and tracker, gives full detail for other clients' prompts
and for prompts without a client id; without the bridge the same socket sees almost nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from comfy_standin.custom_nodes import import_bridge_package
from comfy_standin.execution import PromptExecutor
from comfy_standin.harness import Role, RunResult, Submission, run_scenario
from comfy_standin.script import FIXTURES, load_recording
from comfy_standin.server import PromptServer

from tower_progress.core.model import JobChanged
from tower_progress.core.tracker import InstanceConfig, Tracker, TrackerConfig
from tower_progress.sources.comfyui import parse_frame, parse_history, parse_queue

import_bridge_package()

from comfyui_bridge.bridge import Bridge  # noqa: E402
from comfyui_bridge.config import BridgeConfig  # noqa: E402

WATCHER_ID = "tp-daemon-6b1f0c2d9e8a47f3a5c4b3d2e1f0a9b8"
T0 = 1_795_425_700.0


async def run(name: str, *, bridge: bool, with_client_id: bool) -> tuple[RunResult, list[str]]:
    recording = load_recording(FIXTURES / f"{name}.jsonl")
    scripts = [script for script, _ in recording.submissions()]
    owner = recording.client_ids["submitter"] if with_client_id else None
    cast = [Role("submitter", recording.client_ids["submitter"]), Role("daemon", WATCHER_ID)]

    def install(server: PromptServer) -> Any:
        installed = Bridge(server, PromptExecutor, BridgeConfig(WATCHER_ID), "0.8.0")
        installed.install()
        return installed.uninstall

    result = await run_scenario(
        cast, [Submission(s, owner) for s in scripts], install=install if bridge else None
    )
    return result, [s.prompt_id for s in scripts]


def track(result: RunResult, prompt_ids: list[str], *, bridge: bool) -> tuple[Tracker, list[Any]]:
    tracker = Tracker(TrackerConfig(instances={"local": InstanceConfig(WATCHER_ID, bridge)}))
    views: list[Any] = []
    tracker.apply(parse_queue("local", json.loads(result.http["queue:before"])), T0)
    for t, (kind, payload) in enumerate(result.frames["daemon"]):
        message = parse_frame("local", payload) if kind == "text" else None
        if message is not None:
            events = tracker.apply(message, T0 + t * 0.01)
            views += [e.job for e in events if isinstance(e, JobChanged)]
    for prompt_id in prompt_ids:
        body = json.loads(result.http[f"history:{prompt_id}"])
        tracker.apply(parse_history("local", prompt_id, body), T0 + 100)
    return tracker, views


@pytest.mark.parametrize("with_client_id", [True, False], ids=["other-client", "no-client-id"])
async def test_bridged_watcher_socket_gives_full_detail(with_client_id: bool) -> None:
    result, (prompt_id,) = await run("success_single", bridge=True, with_client_id=with_client_id)
    tracker, views = track(result, [prompt_id], bridge=True)
    job = tracker.job(f"comfy:{prompt_id}")
    assert job is not None
    assert (job["state"], job["visibility"], job["percent"]) == ("completed", "full", 100.0)
    assert job["outputs"] == ["single_00001_.png"]
    steps = [v["step"] for v in views if v["step"] is not None]
    assert steps == sorted(steps)
    assert sorted(set(steps)) == list(range(1, 21))
    assert [s["stage"] for s in job["stages"]][-2:] == ["decoding", "encoding"]


async def test_without_the_bridge_the_same_socket_sees_no_prompt() -> None:
    result, (prompt_id,) = await run("success_single", bridge=False, with_client_id=True)
    types = {json.loads(p)["type"] for kind, p in result.frames["daemon"] if kind == "text"}
    assert types <= {"status", "standin_marker"}
    tracker, views = track(result, [], bridge=False)
    job = tracker.job(f"comfy:{prompt_id}")
    assert job is not None
    assert (job["state"], job["visibility"]) == ("queued", "coarse")
    assert [v["step"] for v in views] == []
