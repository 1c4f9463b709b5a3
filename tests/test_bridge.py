"""The bridge gives the watcher every event of every prompt and changes nothing for anyone else.

Each scenario replays real v0.8.0 executions (tests/fixtures/comfyui) on the stand-in, over real
websockets on 127.0.0.1, once without and once with the bridge. Every other socket (the
submitter, an unrelated watcher, an anonymous one) and every HTTP answer must be byte for byte
the same; the watcher W must get exactly the owner's stream (for a prompt without a client id:
the stream its owner would have got had it had one).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from comfy_standin.custom_nodes import import_bridge_package
from comfy_standin.execution import PromptExecutor
from comfy_standin.harness import (
    Frame,
    Installer,
    Role,
    RunResult,
    Submission,
    is_marker,
    run_scenario,
)
from comfy_standin.script import (
    FIXTURES,
    SCRIPTED_RECORDINGS,
    Direct,
    Executed,
    Executing,
    Message,
    ProgressText,
    PromptScript,
    Tick,
    load_recording,
    preview_image,
)
from comfy_standin.server import PromptServer

import_bridge_package()

from comfyui_bridge.bridge import Bridge, BridgeError, installed_bridge  # noqa: E402
from comfyui_bridge.config import BridgeConfig  # noqa: E402

WATCHER_ID = "tp-watch-3f9a1c0e5b7d42a8b6c1d0e9f8a7b6c5"
OTHERS = ("submitter", "watcher", "anon")
PRISTINE_EXECUTOR = dict(vars(PromptExecutor))


@pytest.fixture(autouse=True)
def executor_left_pristine() -> Iterator[None]:
    assert dict(vars(PromptExecutor)) == PRISTINE_EXECUTOR
    yield
    assert dict(vars(PromptExecutor)) == PRISTINE_EXECUTOR


def with_bridge(config: BridgeConfig, version: str | None = "0.8.0") -> Installer:
    def install(server: PromptServer) -> Callable[[], None]:
        bridge = Bridge(server, PromptExecutor, config, version)
        bridge.install()
        return bridge.uninstall

    return install


def roles(
    recording_ids: dict[str, str | None], *, submitter_flags: bool, with_watcher: bool = True
) -> list[Role]:
    listed = [
        Role("submitter", recording_ids["submitter"], submitter_flags),
        Role("watcher", recording_ids["watcher"]),
        Role("anon", None),
    ]
    return [*listed, Role("W", WATCHER_ID)] if with_watcher else listed


def scripted(
    name: str, *, hold: bool = False
) -> tuple[dict[str, str | None], list[PromptScript], bool]:
    """Client ids, scripts (the first held after its first node starts) and feature flags."""
    recording = load_recording(FIXTURES / f"{name}.jsonl")
    scripts = [script for script, _ in recording.submissions()]
    if hold:
        first = scripts[0]
        scripts[0] = first.with_hold("running", before=first.index_of(Executing) + 1)
    return recording.client_ids, scripts, recording.feature_flags["submitter"]


def submit(scripts: Sequence[PromptScript], client_id: str | None) -> list[Submission]:
    return [Submission(script, client_id) for script in scripts]


def after_handshake(frames: list[Frame], role: Role) -> list[Frame]:
    """Drop the handshake status and, if negotiated, the feature_flags reply."""
    return frames[2:] if role.feature_flags else frames[1:]


def text_only(frames: list[Frame]) -> list[Frame]:
    return [frame for frame in frames if frame[0] == "text"]


def types_of(frames: list[Frame]) -> list[str]:
    return [
        json.loads(payload)["type"] if isinstance(payload, str) else f"binary {payload[3]}"
        for _, payload in frames
    ]


def assert_others_unchanged(
    plain: RunResult, bridged: RunResult, names: Sequence[str] = OTHERS
) -> None:
    for name in names:
        assert bridged.frames[name] == plain.frames[name], name
    assert bridged.http == plain.http
    assert (bridged.client_id_after, bridged.last_node_id_after) == (
        plain.client_id_after,
        plain.last_node_id_after,
    )


@pytest.mark.parametrize("mirror", [True, False], ids=["mirror", "no-mirror"])
@pytest.mark.parametrize("name", SCRIPTED_RECORDINGS)
async def test_prompts_with_client_id_are_copied_to_the_watcher(name: str, mirror: bool) -> None:
    ids, scripts, flags = scripted(name, hold=True)
    cast = roles(ids, submitter_flags=flags)
    submissions = submit(scripts, ids["submitter"])
    plain = await run_scenario(cast, submissions)
    bridged = await run_scenario(
        cast, submissions, install=with_bridge(BridgeConfig(WATCHER_ID, mirror_previews=mirror))
    )
    assert_others_unchanged(plain, bridged)
    owner_stream = after_handshake(plain.frames["submitter"], cast[0])
    expected = owner_stream if mirror else text_only(owner_stream)
    assert after_handshake(bridged.frames["W"], cast[3]) == expected
    assert set(types_of(plain.frames["W"])) == {"status", "standin_marker"}


@pytest.mark.parametrize("name", SCRIPTED_RECORDINGS)
async def test_prompts_without_client_id_reach_the_watcher_as_if_it_owned_them(name: str) -> None:
    ids, scripts, _ = scripted(name, hold=True)
    cast = roles(ids, submitter_flags=False)
    reference = await run_scenario(cast, submit(scripts, ids["submitter"]))
    plain = await run_scenario(cast, submit(scripts, None))
    bridged = await run_scenario(
        cast, submit(scripts, None), install=with_bridge(BridgeConfig(WATCHER_ID))
    )
    assert_others_unchanged(plain, bridged)
    assert bridged.last_node_id_at_hold == plain.last_node_id_at_hold == {"running": None}
    assert bridged.client_id_after is None
    owner_stream = after_handshake(reference.frames["submitter"], cast[0])
    assert after_handshake(bridged.frames["W"], cast[3]) == owner_stream
    received = types_of(bridged.frames["W"])
    assert received.count("execution_start") == len(scripts)
    assert received.count("execution_interrupted") == int(name == "interrupt_sampling")


async def test_a_cached_rerun_without_client_id_keeps_its_stock_history() -> None:
    ids, scripts, _ = scripted("rerun_cached")
    cached_id = scripts[1].prompt_id
    cast = roles(ids, submitter_flags=False)
    with_owner = await run_scenario(cast, submit(scripts, ids["submitter"]))
    bridged = await run_scenario(
        cast, submit(scripts, None), install=with_bridge(BridgeConfig(WATCHER_ID))
    )
    owner_entry = json.loads(with_owner.http[f"history:{cached_id}"])[cached_id]
    bridged_entry = json.loads(bridged.http[f"history:{cached_id}"])[cached_id]
    assert list(owner_entry["outputs"]) == list(owner_entry["meta"]) == ["9"]
    assert bridged_entry["outputs"] == bridged_entry["meta"] == {}
    assert "executed" in types_of(bridged.frames["W"])


async def test_a_prompt_submitted_by_the_watcher_reaches_it_once() -> None:
    ids, scripts, _ = scripted("success_single", hold=True)
    cast = roles(ids, submitter_flags=True)
    submissions = submit(scripts, WATCHER_ID)
    plain = await run_scenario(cast, submissions)
    bridged = await run_scenario(
        cast, submissions, install=with_bridge(BridgeConfig(WATCHER_ID, mirror_previews=True))
    )
    assert_others_unchanged(plain, bridged, names=(*OTHERS, "W"))
    assert types_of(bridged.frames["W"]).count("execution_start") == 1


@pytest.mark.parametrize("owner", ["submitter", None], ids=["client-id", "no-client-id"])
async def test_an_absent_watcher_changes_nothing_and_logs_nothing(
    owner: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    ids, scripts, flags = scripted("queue_three", hold=True)
    cast = roles(ids, submitter_flags=flags, with_watcher=False)
    submissions = submit(scripts, ids[owner] if owner else None)
    plain = await run_scenario(cast, submissions)
    caplog.clear()
    bridged = await run_scenario(
        cast, submissions, install=with_bridge(BridgeConfig(WATCHER_ID, mirror_previews=True))
    )
    assert_others_unchanged(plain, bridged)
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("owner", ["submitter", None], ids=["client-id", "no-client-id"])
async def test_a_watcher_that_disconnects_mid_run_costs_nothing(
    owner: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    ids, scripts, flags = scripted("success_single", hold=True)
    cast = roles(ids, submitter_flags=flags)
    submissions = submit(scripts, ids[owner] if owner else None)
    plain = await run_scenario(cast, submissions, drop_at_hold={"running": "W"})
    bridged = await run_scenario(
        cast,
        submissions,
        install=with_bridge(BridgeConfig(WATCHER_ID, mirror_previews=True)),
        drop_at_hold={"running": "W"},
    )
    assert_others_unchanged(plain, bridged)
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
    w_frames = bridged.frames["W"]
    assert is_marker(w_frames[-1]) and "hold:running" in str(w_frames[-1][1])
    if owner is not None:
        owner_frames = after_handshake(plain.frames["submitter"], cast[0])
        assert after_handshake(w_frames, cast[3]) == owner_frames[: len(w_frames) - 1]


@pytest.mark.parametrize("version", ["0.8.1", "0.3.64", None])
async def test_other_versions_copy_owner_messages_only(version: str | None) -> None:
    ids, scripts, flags = scripted("rerun_cached")
    cast = roles(ids, submitter_flags=flags)
    install = with_bridge(BridgeConfig(WATCHER_ID, mirror_previews=True), version)
    with_owner = submit(scripts, ids["submitter"])
    plain = await run_scenario(cast, with_owner)
    bridged = await run_scenario(cast, with_owner, install=install)
    assert_others_unchanged(plain, bridged)
    assert after_handshake(bridged.frames["W"], cast[3]) == after_handshake(
        plain.frames["submitter"], cast[0]
    )
    without_owner = submit(scripts, None)
    plain = await run_scenario(cast, without_owner)
    bridged = await run_scenario(cast, without_owner, install=install)
    assert_others_unchanged(plain, bridged, names=(*OTHERS, "W"))
    assert "execution_start" not in types_of(bridged.frames["W"])


async def test_prefix_mode_copies_to_every_watcher_connection() -> None:
    ids, scripts, flags = scripted("error_node")
    prefix = "tp-watch-prefix-7c4e2a91d0b3"
    first, second = Role("W1", prefix + "-a1"), Role("W2", prefix + "-b2")
    cast = [*roles(ids, submitter_flags=flags, with_watcher=False), first, second]
    install = with_bridge(BridgeConfig(prefix, match="prefix", mirror_previews=True))

    submissions = submit(scripts, ids["submitter"])
    plain = await run_scenario(cast, submissions)
    bridged = await run_scenario(cast, submissions, install=install)
    assert_others_unchanged(plain, bridged)
    owner_stream = after_handshake(plain.frames["submitter"], cast[0])
    assert after_handshake(bridged.frames["W1"], first) == owner_stream
    assert after_handshake(bridged.frames["W2"], second) == owner_stream

    submissions = submit(scripts, first.client_id)
    plain = await run_scenario(cast, submissions)
    bridged = await run_scenario(cast, submissions, install=install)
    assert_others_unchanged(plain, bridged, names=(*OTHERS, "W1"))
    assert after_handshake(bridged.frames["W2"], second) == after_handshake(
        plain.frames["W1"], first
    )

    reference = await run_scenario(cast, submit(scripts, ids["submitter"]))
    bridged = await run_scenario(cast, submit(scripts, None), install=install)
    owner_stream = after_handshake(reference.frames["submitter"], cast[0])
    assert after_handshake(bridged.frames["W1"], first) == owner_stream
    assert after_handshake(bridged.frames["W2"], second) == owner_stream


CUSTOM_PROMPT_ID = "6c1d2e3f-4a5b-4c6d-8e7f-90a1b2c3d4e5"
CUSTOM_GRAPH: dict[str, Any] = {
    "1": {"class_type": "StreamingTextNode", "inputs": {"seed": 7}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "custom"}},
}


def custom_script() -> PromptScript:
    """A node's own sends: a custom event, progress text, terminal logs, ExecutionBlocked."""
    pid = CUSTOM_PROMPT_ID

    def state(value: int, status: str) -> dict[str, Any]:
        node = {
            "value": value,
            "max": 3,
            "state": status,
            "node_id": "1",
            "prompt_id": pid,
            "display_node_id": "1",
            "parent_node_id": None,
            "real_node_id": "1",
        }
        return {"prompt_id": pid, "nodes": {"1": node}}

    blocked = {
        "prompt_id": pid,
        "node_id": "1",
        "node_type": "StreamingTextNode",
        "executed": [],
        "exception_message": "Execution Blocked: waiting for input",
        "exception_type": "ExecutionBlocked",
        "traceback": [],
        "current_inputs": [],
        "current_outputs": [],
    }
    output = {"images": [{"filename": "custom_00001_.png", "subfolder": "", "type": "output"}]}
    steps = (
        Message("execution_start", {"prompt_id": pid}, False),
        Message("execution_cached", {"nodes": [], "prompt_id": pid}, False),
        Executing("1", "1"),
        Direct("streaming_text.status", {"node": "1", "text": "warming up"}),
        ProgressText("1", "first tokens"),
        Direct("logs", {"entries": [{"t": "12:00:00", "m": "loading\n"}], "size": None}),
        Tick(
            state(1, "running"),
            {"value": 1, "max": 3, "prompt_id": pid, "node": "1"},
            preview_image("custom-1", 900),
        ),
        Direct("execution_error", blocked),
        Tick(state(3, "running"), {"value": 3, "max": 3, "prompt_id": pid, "node": "1"}),
        Executing("2", "2"),
        Executed("2", "2", output, cached=False),
        Message("execution_success", {"prompt_id": pid}, False),
    )
    return PromptScript(pid, CUSTOM_GRAPH, ("2",), steps)


CUSTOM_IDS: dict[str, str | None] = {
    "submitter": "0d6f3b2a9c8e4f71a5b4c3d2e1f0a9b8",
    "watcher": "9e8d7c6b5a4f43e2d1c0b9a8f7e6d5c4",
}


@pytest.mark.parametrize("mirror", [True, False], ids=["mirror", "no-mirror"])
async def test_nodes_own_sends_are_copied_except_terminal_logs(mirror: bool) -> None:
    cast = roles(CUSTOM_IDS, submitter_flags=False)
    submissions = [Submission(custom_script(), CUSTOM_IDS["submitter"])]
    plain = await run_scenario(cast, submissions)
    bridged = await run_scenario(
        cast, submissions, install=with_bridge(BridgeConfig(WATCHER_ID, mirror_previews=mirror))
    )
    assert_others_unchanged(plain, bridged)
    owner_stream = [
        frame
        for frame in after_handshake(plain.frames["submitter"], cast[0])
        if types_of([frame]) != ["logs"] and (mirror or frame[0] == "text")
    ]
    assert after_handshake(bridged.frames["W"], cast[3]) == owner_stream
    copied = set(types_of(bridged.frames["W"]))
    assert {"streaming_text.status", "execution_error", "executed"} <= copied
    assert ("binary 3" in copied) is mirror and ("binary 1" in copied) is mirror
    assert "logs" not in copied


async def test_nodes_own_sends_without_client_id_are_broadcast_as_before() -> None:
    cast = roles(CUSTOM_IDS, submitter_flags=False)
    reference = await run_scenario(cast, [Submission(custom_script(), CUSTOM_IDS["submitter"])])
    submissions = [Submission(custom_script(), None)]
    plain = await run_scenario(cast, submissions)
    bridged = await run_scenario(cast, submissions, install=with_bridge(BridgeConfig(WATCHER_ID)))
    assert_others_unchanged(plain, bridged)
    assert {"streaming_text.status", "logs", "binary 3"} <= set(types_of(plain.frames["anon"]))
    assert after_handshake(bridged.frames["W"], cast[3]) == after_handshake(
        reference.frames["submitter"], cast[0]
    )


async def test_the_executor_sees_a_copy_and_side_effects_are_undone() -> None:
    server = PromptServer(asyncio.get_running_loop(), clock=lambda: 1)
    script = custom_script()
    executor = PromptExecutor(server, {script.prompt_id: script}, hold=lambda name: None)
    bridge = Bridge(server, PromptExecutor, BridgeConfig(WATCHER_ID), "0.8.0")
    bridge.install()
    try:
        extra_data = {"create_time": 1}
        await executor.execute_async(CUSTOM_GRAPH, script.prompt_id, extra_data, ["2"])
        assert extra_data == {"create_time": 1}
        assert server.last_node_id is None
        sentinel = server.client_id
        assert isinstance(sentinel, str) and sentinel.startswith("tower-progress-anon-")
        server.send_sync("executing", {"node": None, "prompt_id": script.prompt_id}, sentinel)
        assert server.client_id is None
        assert [event for event, _ in executor.status_messages] == [
            "execution_start",
            "execution_cached",
            "execution_success",
        ]
    finally:
        bridge.uninstall()
    assert "send_sync" not in vars(server) and installed_bridge(server) is None


async def test_a_second_bridge_on_the_same_server_is_refused() -> None:
    server = PromptServer(asyncio.get_running_loop(), clock=lambda: 1)
    first = Bridge(server, PromptExecutor, BridgeConfig(WATCHER_ID), "0.8.0")
    first.install()
    try:
        wrapped = server.send_sync
        with pytest.raises(BridgeError, match="already installed"):
            Bridge(server, PromptExecutor, BridgeConfig(WATCHER_ID), "0.8.0").install()
        assert server.send_sync is wrapped and installed_bridge(server) is first
    finally:
        first.uninstall()


async def test_a_server_without_the_expected_methods_is_left_alone() -> None:
    server = PromptServer(asyncio.get_running_loop(), clock=lambda: 1)

    class OldExecutor:
        def execute(self) -> None:
            """An executor from before execute_async existed."""

    with pytest.raises(
        BridgeError, match=r"PromptExecutor\.add_message, PromptExecutor\.execute_async"
    ):
        Bridge(server, OldExecutor, BridgeConfig(WATCHER_ID), "0.8.0").install()
    assert "send_sync" not in vars(server)
