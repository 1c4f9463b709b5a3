"""The ComfyUI stand-in reproduces the real v0.8.0 recordings it is built from.

The bridge tests are only as good as the stand-in, so it is checked against the real server:
replaying each recording's prompts gives every socket (submitter, unrelated watcher, anon) the
frames the real server sent it, in order, with the same fields, binary event types and sizes;
and the same history entries. Timestamps and status frames are left out: the former are the
stand-in's clock, the latter race with the HTTP posts in the real recordings (the stand-in posts
everything before its worker starts).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from comfy_standin.harness import Frame, Role, RunResult, Submission, is_marker, run_scenario
from comfy_standin.script import (
    FIXTURES,
    SCRIPTED_RECORDINGS,
    Executed,
    Executing,
    Message,
    ProgressState,
    RecordedFrame,
    Recording,
    binary_summary,
    load_recording,
)


def roles_of(recording: Recording) -> list[Role]:
    return [
        Role(name, client_id, recording.feature_flags.get(name, False))
        for name, client_id in recording.client_ids.items()
    ]


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    data = message["data"]
    if isinstance(data, dict):
        data = {key: value for key, value in data.items() if key != "timestamp"}
    return {"type": message["type"], "data": data}


def recorded_view(frames: list[RecordedFrame]) -> list[dict[str, Any]]:
    view = []
    for frame in frames:
        if frame.text is not None:
            if frame.text["type"] != "status":
                view.append(comparable(frame.text))
        else:
            assert frame.binary is not None
            keys = ("event", "format", "bytes", "metadata", "image_bytes")
            view.append({key: frame.binary[key] for key in keys if key in frame.binary})
    return view


def standin_view(frames: list[Frame]) -> list[dict[str, Any]]:
    view = []
    for kind, payload in frames:
        if is_marker((kind, payload)):
            continue
        if isinstance(payload, str):
            message = json.loads(payload)
            if message["type"] != "status":
                view.append(comparable(message))
        else:
            view.append(binary_summary(payload))
    return view


def history_view(entry: dict[str, Any]) -> dict[str, Any]:
    _number, prompt_id, graph, extra_data, outputs = entry["prompt"][:5]
    status = entry["status"]
    return {
        "prompt": [
            prompt_id,
            graph,
            {k: v for k, v in extra_data.items() if k != "create_time"},
            outputs,
        ],
        "outputs": entry["outputs"],
        "meta": entry["meta"],
        "status_str": status["status_str"],
        "completed": status["completed"],
        "messages": [
            [event, comparable({"type": event, "data": data})["data"]]
            for event, data in status["messages"]
        ],
    }


def recorded_type(frame: RecordedFrame) -> str:
    if frame.text is not None:
        return str(frame.text["type"])
    assert frame.binary is not None
    return f"binary {frame.binary['event']}"


async def replay(recording: Recording) -> RunResult:
    submissions = [Submission(script, client_id) for script, client_id in recording.submissions()]
    return await run_scenario(roles_of(recording), submissions)


@pytest.mark.parametrize("name", SCRIPTED_RECORDINGS)
async def test_every_socket_gets_what_the_real_server_sent(name: str) -> None:
    recording = load_recording(FIXTURES / f"{name}.jsonl")
    result = await replay(recording)
    for role in recording.client_ids:
        assert standin_view(result.frames[role]) == recorded_view(recording.frames[role]), role


@pytest.mark.parametrize("name", SCRIPTED_RECORDINGS)
async def test_history_matches_the_real_server(name: str) -> None:
    recording = load_recording(FIXTURES / f"{name}.jsonl")
    result = await replay(recording)
    for script, _ in recording.submissions():
        body = json.loads(result.http[f"history:{script.prompt_id}"])
        expected = history_view(recording.history[script.prompt_id])
        assert history_view(body[script.prompt_id]) == expected


async def test_prompt_without_client_id_is_half_broadcast_as_recorded() -> None:
    real = load_recording(FIXTURES / "no_client_id.jsonl")
    real_types = {
        role: {recorded_type(frame) for frame in frames} for role, frames in real.frames.items()
    }
    script = load_recording(FIXTURES / "rerun_cached.jsonl").submissions()[0][0]
    result = await run_scenario(roles_of(real), [Submission(script, None)])
    for role, frames in result.frames.items():
        types = {
            json.loads(payload)["type"] if isinstance(payload, str) else f"binary {payload[3]}"
            for kind, payload in frames
            if not is_marker((kind, payload))
        }
        assert types == real_types[role] == {"status", "progress_state", "progress", "binary 1"}


def test_scripts_keep_the_calls_of_a_cached_rerun() -> None:
    recording = load_recording(FIXTURES / "rerun_cached.jsonl")
    full, cached, partial = (script for script, _ in recording.submissions())
    assert [type(step) for step in cached.steps] == [
        Message,
        Message,
        Executed,
        ProgressState,
        Message,
    ]
    assert cached.steps[2] == Executed(
        "9",
        "9",
        {"images": [{"filename": "rerun_00001_.png", "subfolder": "", "type": "output"}]},
        True,
    )
    assert [step.node for step in partial.steps if isinstance(step, Executing)] == ["8", "9"]
    assert not any(isinstance(step, Executed) and step.cached for step in full.steps)


def test_a_prompt_without_owner_socket_cannot_be_scripted() -> None:
    recording = load_recording(FIXTURES / "no_client_id.jsonl")
    with pytest.raises(ValueError, match="no recorded owner socket"):
        recording.submissions()
