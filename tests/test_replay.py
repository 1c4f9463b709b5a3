"""Replay every real ComfyUI recording through the source parsers and the tracker.

Each recording is fed twice: with everything the submitter's socket saw (what the daemon sees
when it owns the prompt or the bridge is installed) and with only what an unrelated watcher
saw; both with the poller's recorded /queue and /history answers. The final job must match the
recording's ``.expected.json`` exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tower_progress.core.model import Event, JobChanged, Milestone
from tower_progress.core.tracker import InstanceConfig, Tracker, TrackerConfig
from tower_progress.sources.comfyui import parse_frame, parse_history, parse_queue

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui"
RECORDINGS = sorted(p.stem for p in FIXTURES.glob("*.jsonl"))
EPOCH = 1_795_425_000.0
STATES = {
    "success": "completed",
    "failed": "failed",
    "interrupted": "canceled",
    "canceled": "canceled",
}


@dataclass
class Replay:
    tracker: Tracker
    events: list[Event]

    def views(self, job_id: str) -> list[dict[str, Any]]:
        return [e.job for e in self.events if isinstance(e, JobChanged) and e.job["id"] == job_id]


def replay(name: str, role: str) -> Replay:
    lines = [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]
    clients = lines[0]["msg"]["clients"]
    tracker = Tracker(TrackerConfig(instances={"local": InstanceConfig(clients.get(role))}))
    events: list[Event] = []
    for line in lines:
        now = EPOCH + line["t"]
        if line["dir"] == "ws" and line.get("client") == role and line["kind"] == "text":
            message = parse_frame("local", json.dumps(line["msg"]))
            assert message is not None
            events += tracker.apply(message, now)
        elif line["dir"] == "http" and line.get("client") == "poller" and line["status"] == 200:
            path = line["path"]
            if path == "/queue":
                events += tracker.apply(parse_queue("local", line["body"]), now)
            elif path.startswith("/history/"):
                prompt_id = path.removeprefix("/history/")
                events += tracker.apply(parse_history("local", prompt_id, line["body"]), now)
    return Replay(tracker, events)


def expected(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    return data


CASES = [
    (name, role, prompt_id)
    for name in RECORDINGS
    for prompt_id, truth in expected(name)["prompts"].items()
    for role in ("submitter", "watcher")
    if role in truth["steps_seen_by_client"]
]


@pytest.mark.parametrize(("name", "role", "prompt_id"), CASES)
def test_recording_outcome(name: str, role: str, prompt_id: str) -> None:
    truth = expected(name)["prompts"][prompt_id]
    result = replay(name, role)
    job = result.tracker.job(f"comfy:{prompt_id}")
    assert job is not None
    assert job["state"] == STATES[truth["status"]]
    assert job["cached_nodes"] == truth["cached_nodes"]
    assert job["frames_total"] == truth["frames_total"]
    assert job["frames_done"] == truth["frames_output"]
    assert job["outputs"] == truth["outputs"]
    views = result.views(job["id"])
    steps_seen = max((v["step"] or 0 for v in views), default=0)
    assert steps_seen == truth["steps_seen_by_client"][role]
    if steps_seen:
        assert max(v["steps"] or 0 for v in views) == truth["steps_total"]
    percents = [v["percent"] for v in views]
    assert percents == sorted(percents)
    if truth["status"] == "success":
        assert job["percent"] == 100.0
        assert job["error"] is None
    if truth["status"] == "failed":
        assert job["error"]["node_type"] == truth["error_node_type"]
        assert job["error"]["exception_type"] == truth["error_exception_type"]
    if truth["status"] == "interrupted":
        assert job["error"]["node_type"] == truth["interrupted_node_type"]
        assert job["error"]["message"] == "Interrupted"
    finals = [e for e in result.events if isinstance(e, Milestone) and e.percent == 100]
    assert len([m for m in finals if m.id == job["id"]]) == (truth["status"] == "success")


@pytest.mark.parametrize(
    ("name", "role", "visibility"),
    [
        ("success_single", "submitter", "full"),
        ("success_single", "watcher", "coarse"),
        ("no_client_id", "watcher", "partial"),
        ("no_client_id", "submitter", "partial"),
    ],
)
def test_visibility(name: str, role: str, visibility: str) -> None:
    result = replay(name, role)
    (prompt_id,) = expected(name)["prompts"]
    job = result.tracker.job(f"comfy:{prompt_id}")
    assert job is not None
    assert job["visibility"] == visibility


def test_stage_sequence_of_full_run() -> None:
    result = replay("success_anim16", "submitter")
    (prompt_id,) = expected("success_anim16")["prompts"]
    job = result.tracker.job(f"comfy:{prompt_id}")
    assert job is not None
    stages = [s["stage"] for s in job["stages"]]
    assert stages == ["loading", "preparing", "sampling", "decoding", "processing", "encoding"]
    assert all(s["duration_s"] is not None for s in job["stages"])
    running = [v for v in result.views(job["id"]) if v["state"] == "running"]
    decoding = [v for v in running if v["stage"] == "decoding"]
    assert [v["frames_done"] for v in decoding][-1] == 16
    assert {v["frames_total"] for v in running} == {16}


def test_watcher_sees_coarse_run_without_frozen_steps() -> None:
    result = replay("success_single", "watcher")
    (prompt_id,) = expected("success_single")["prompts"]
    running = [v for v in result.views(f"comfy:{prompt_id}") if v["state"] == "running"]
    assert running
    assert {v["stage_label"] for v in running} == {"Running (step detail unavailable)"}
    assert {v["step"] for v in running} == {None}


def test_same_recording_twice_changes_nothing() -> None:
    result = replay("queue_three", "submitter")
    lines = (FIXTURES / "queue_three.jsonl").read_text().splitlines()
    late = EPOCH + 1000
    for raw in lines:
        line = json.loads(raw)
        if line["dir"] == "ws" and line.get("client") == "submitter" and line["kind"] == "text":
            message = parse_frame("local", json.dumps(line["msg"]))
            assert message is not None
            assert result.tracker.apply(message, late) == []


def test_queue_positions_follow_priority_not_heap_order() -> None:
    lines = [json.loads(x) for x in (FIXTURES / "queue_three.jsonl").read_text().splitlines()]
    recorded = next(
        line["body"]
        for line in lines
        if line["dir"] == "http" and line["path"] == "/queue" and line["body"]["queue_pending"]
    )
    item = recorded["queue_running"][0]
    heap = [[12, "p-c", *item[2:]], [10, "p-a", *item[2:]], [11, "p-b", *item[2:], ["extra"]]]
    tracker = Tracker()
    tracker.apply(parse_queue("local", {"queue_running": [item], "queue_pending": heap}), EPOCH)
    positions = {job["prompt_id"]: job["queue_position"] for job in tracker.jobs()}
    assert positions == {item[1]: 0, "p-a": 1, "p-b": 2, "p-c": 3}
    states = {job["prompt_id"]: job["state"] for job in tracker.jobs()}
    assert states == {item[1]: "running", "p-a": "queued", "p-b": "queued", "p-c": "queued"}
