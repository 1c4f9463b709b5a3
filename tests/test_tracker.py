"""Tracker behaviour over plain observations: joins, outcomes, stalls, milestones, limits."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tower_progress.core.model import (
    ComfyMessage,
    GpuSample,
    HistoryEntry,
    JobChanged,
    JobFinished,
    JobRemoved,
    JobRow,
    JobState,
    Milestone,
    QueueItem,
    QueueSnapshot,
    ResourceSample,
    ResourcesChanged,
    RowDeleted,
    SourceChanged,
    SourceStatus,
    Tick,
)
from tower_progress.core.status import StatusMap
from tower_progress.core.tracker import InstanceConfig, Tracker, TrackerConfig
from tower_progress.core.workflow import Workflow

T0 = 1_800_000_000.0
GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "width": 512}},
    "3": {"class_type": "KSampler", "inputs": {"steps": 10, "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}},
}


def msg(kind: str, **data: Any) -> ComfyMessage:
    return ComfyMessage("local", {"type": kind, "data": data})


def queue(running: list[str], pending: list[str], client_id: str | None = "other") -> QueueSnapshot:
    def item(n: int, pid: str) -> QueueItem:
        return QueueItem(float(n), pid, GRAPH, client_id)

    return QueueSnapshot(
        "local",
        tuple(item(i, p) for i, p in enumerate(running)),
        tuple(item(10 + i, p) for i, p in enumerate(pending)),
    )


def history(pid: str, terminal: str = "execution_success", **data: Any) -> HistoryEntry:
    messages = [
        ["execution_start", {"prompt_id": pid, "timestamp": int(T0 * 1000) + 100}],
        ["execution_cached", {"nodes": ["4"], "prompt_id": pid}],
        [terminal, {"prompt_id": pid, "timestamp": int(T0 * 1000) + 9000, **data}],
    ]
    entry = {
        "prompt": [1, pid, GRAPH, {}, ["9"]],
        "outputs": {"9": {"images": [{"filename": "x.png", "type": "output"}]}},
        "status": {"status_str": "success", "completed": True, "messages": messages},
    }
    return HistoryEntry("local", pid, entry)


def run_steps(tracker: Tracker, pid: str, steps: int, start: float, gap: float = 1.0) -> float:
    tracker.apply(msg("execution_start", prompt_id=pid, timestamp=int(start * 1000)), start)
    tracker.apply(msg("executing", node="3", prompt_id=pid), start)
    t = start
    for step in range(1, steps + 1):
        t = start + step * gap
        tracker.apply(msg("progress", value=step, max=10, node="3", prompt_id=pid), t)
    return t


def test_row_without_known_prompt_stays_pending() -> None:
    tracker = Tracker()
    events = tracker.apply(JobRow("7", "queued", prompt_id="p1", title="Shot 7"), T0)
    (changed,) = events
    assert isinstance(changed, JobChanged)
    assert changed.job["state"] == "pending"
    assert changed.job["title"] == "Shot 7"
    assert changed.job["status_raw"] == "queued"
    assert tracker.unresolved_prompts("local", T0) == []


def test_prompt_seen_before_its_row_is_merged_into_the_row_job() -> None:
    tracker = Tracker()
    tracker.apply(queue([], ["p1"]), T0)
    assert tracker.job("comfy:p1") is not None
    events = tracker.apply(JobRow("7", "queued", prompt_id="p1"), T0 + 1)
    assert JobRemoved("comfy:p1") in events
    job = tracker.job("7")
    assert job is not None
    assert (job["state"], job["queue_position"], job["prompt_id"]) == ("queued", 1, "p1")
    assert tracker.job("comfy:p1") is None


def test_comfy_success_waits_for_the_row_then_completes() -> None:
    tracker = Tracker()
    tracker.apply(JobRow("7", "processing", prompt_id="p1"), T0)
    tracker.apply(queue(["p1"], []), T0)
    tracker.apply(history("p1"), T0 + 10)
    job = tracker.job("7")
    assert job is not None
    assert (job["state"], job["stage"], job["percent"]) == ("running", "finalizing", 100.0)
    events = tracker.apply(JobRow("7", "done", prompt_id="p1"), T0 + 11)
    job = tracker.job("7")
    assert job is not None
    assert job["state"] == "completed"
    assert Milestone("7", 100, "completed") in events
    assert any(isinstance(e, JobFinished) for e in events)


def test_terminal_state_never_changes_back() -> None:
    tracker = Tracker()
    first = tracker.apply(JobRow("7", "failed", prompt_id=None), T0)
    assert sum(isinstance(e, JobFinished) for e in first) == 1
    later = tracker.apply(JobRow("7", "processing", prompt_id=None), T0 + 1)
    assert [e.job["state"] for e in later if isinstance(e, JobChanged)] == ["failed"]
    assert not any(isinstance(e, JobFinished | Milestone) for e in later)
    job = tracker.job("7")
    assert job is not None
    assert (job["state"], job["status_raw"]) == ("failed", "processing")


def test_unknown_status_is_kept_verbatim_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker()
    with caplog.at_level(logging.WARNING):
        tracker.apply(JobRow("1", "Awaiting-QA"), T0)
        tracker.apply(JobRow("2", "Awaiting-QA"), T0)
    assert [r.getMessage() for r in caplog.records] == [
        "job 1: unknown production status 'Awaiting-QA' kept verbatim"
    ]
    job = tracker.job("2")
    assert job is not None
    assert (job["state"], job["status_raw"]) == ("pending", "Awaiting-QA")


def test_status_map_is_configurable() -> None:
    config = TrackerConfig(status_map=StatusMap({"Awaiting-QA": JobState.COMPLETED}))
    tracker = Tracker(config)
    tracker.apply(JobRow("1", "awaiting-qa"), T0)
    job = tracker.job("1")
    assert job is not None
    assert job["state"] == "completed"


def test_history_before_last_progress_does_not_move_job_backwards() -> None:
    tracker = Tracker()
    tracker.apply(queue(["p1"], []), T0)
    t = run_steps(tracker, "p1", 5, T0)
    tracker.apply(history("p1"), t + 1)
    late = tracker.apply(msg("progress", value=6, max=10, node="3", prompt_id="p1"), t + 2)
    assert late == []
    job = tracker.job("comfy:p1")
    assert job is not None
    assert (job["state"], job["percent"]) == ("completed", 100.0)


def test_percent_never_decreases_and_milestones_fire_once() -> None:
    tracker = Tracker()
    tracker.apply(queue(["p1"], []), T0)
    events = []
    t = T0
    events += tracker.apply(msg("execution_start", prompt_id="p1"), t)
    events += tracker.apply(msg("execution_cached", nodes=["4", "5"], prompt_id="p1"), t)
    events += tracker.apply(msg("executing", node="3", prompt_id="p1"), t)
    for step in [*range(1, 11), 4, 10]:
        t += 1
        events += tracker.apply(msg("progress", value=step, max=10, node="3", prompt_id="p1"), t)
    percents = [e.job["percent"] for e in events if isinstance(e, JobChanged)]
    assert percents == sorted(percents)
    marks = [e.percent for e in events if isinstance(e, Milestone)]
    assert marks == [25, 50, 75]
    events = tracker.apply(msg("executing", node="8", prompt_id="p1"), t + 1)
    events += tracker.apply(msg("executing", node="9", prompt_id="p1"), t + 2)
    error = {"prompt_id": "p1", "node_id": "9", "exception_message": "disk full"}
    events += tracker.apply(msg("execution_error", **error), t + 3)
    events += tracker.apply(msg("execution_error", **error), t + 4)
    marks_after = [(e.percent, e.state) for e in events if isinstance(e, Milestone)]
    # failed at the writer: (0.15 + 0.05 + 0.65 + 0.08) / 0.97 done
    assert marks_after == [(90, "running"), (95, "failed")]


def test_progress_alone_is_emitted_at_most_every_interval_and_the_rest_at_once() -> None:
    tracker = Tracker(TrackerConfig(progress_interval_s=0.1))
    tracker.apply(queue(["p1"], []), T0)
    tracker.apply(msg("execution_start", prompt_id="p1"), T0)
    tracker.apply(msg("executing", node="3", prompt_id="p1"), T0)

    def steps_seen(events: list[Any]) -> list[int | None]:
        return [e.job["step"] for e in events if isinstance(e, JobChanged)]

    events: list[Any] = []
    for step in range(1, 9):
        t = T0 + step * 0.04
        events += tracker.apply(msg("progress", value=step, max=20, node="3", prompt_id="p1"), t)
    assert steps_seen(events) == [1, 4, 7]
    held = tracker.apply(Tick(), T0 + 0.5)
    assert steps_seen(held) == [8]
    assert tracker.apply(Tick(), T0 + 0.6) == []
    at_once = tracker.apply(msg("progress", value=9, max=20, node="3", prompt_id="p1"), T0 + 0.51)
    at_once += tracker.apply(msg("executing", node="8", prompt_id="p1"), T0 + 0.52)
    assert [(e.job["stage"], e.job["step"]) for e in at_once if isinstance(e, JobChanged)] == [
        ("decoding", None)
    ]


def test_progress_once_per_interval_is_not_held_back_by_jitter() -> None:
    tracker = Tracker(TrackerConfig(progress_interval_s=0.25))
    tracker.apply(queue(["p1"], []), T0)
    tracker.apply(msg("execution_start", prompt_id="p1"), T0)
    tracker.apply(msg("executing", node="3", prompt_id="p1"), T0)
    events: list[Any] = []
    for step, after in enumerate((0.248, 0.497, 0.749, 0.8, 0.98), start=1):
        progress = msg("progress", value=step, max=20, node="3", prompt_id="p1")
        events += tracker.apply(progress, T0 + after)
    assert [e.job["step"] for e in events if isinstance(e, JobChanged)] == [1, 2, 3, 5]


@pytest.mark.parametrize(
    ("outputs", "status", "frames_done"),
    [
        ({"9": {"gifs": [{"filename": "a.mp4", "type": "output"}]}}, "success", None),
        ({"9": {"images": [{"filename": "p.png", "type": "temp"}]}}, "error", 0),
        ({}, "success", 0),
    ],
    ids=["uncountable-video", "only-previews", "nothing-written"],
)
def test_frames_done_of_a_finished_job_is_never_a_guess(
    outputs: dict[str, Any], status: str, frames_done: int | None
) -> None:
    graph = {"9": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["8", 0]}}}
    tracker = Tracker()
    tracker.apply(QueueSnapshot("local", (QueueItem(1, "p1", graph, "other"),), ()), T0)
    entry = {"outputs": outputs, "status": {"status_str": status, "completed": True}}
    tracker.apply(HistoryEntry("local", "p1", entry), T0 + 1)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert (job["frames_total"], job["frames_done"]) == (None, frames_done)


def test_two_samplers_are_one_job_whose_percent_spans_both_passes() -> None:
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512}},
        "3": {"class_type": "KSampler", "inputs": {"steps": 10, "latent_image": ["5", 0]}},
        "10": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "scale_by": 2}},
        "11": {"class_type": "KSampler", "inputs": {"steps": 10, "latent_image": ["10", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0]}},
    }
    tracker = Tracker()
    tracker.apply(QueueSnapshot("local", (QueueItem(1, "p1", graph, "other"),), ()), T0)
    t = T0
    seen: list[tuple[str, int | None, float]] = []
    for node in ("4", "5", "3", "10", "11"):
        t += 1
        tracker.apply(msg("executing", node=node, prompt_id="p1"), t)
        if node in ("3", "11"):
            for step in (5, 10):
                t += 1
                tracker.apply(msg("progress", value=step, max=10, node=node, prompt_id="p1"), t)
                job = tracker.job("comfy:p1") or {}
                seen.append((job["node"]["id"], job["step"], job["percent"]))
    # Shares of the stages present: loading .15, preparing .05, sampling .65, decoding .08
    # (processing .03 for the upscale); the second pass denoises 4x the pixels: 4/5 of sampling.
    total = 0.15 + 0.05 + 0.65 + 0.08 + 0.03
    first, second = 0.65 / 5, 0.65 * 4 / 5
    expected = [
        ("3", 5, (0.20 + first / 2) / total),
        ("3", 10, (0.20 + first) / total),
        ("11", 5, (0.20 + first + 0.03 + second / 2) / total),
        ("11", 10, (0.20 + first + 0.03 + second) / total),
    ]
    assert seen == [(n, s, pytest.approx(100 * f, abs=0.05)) for n, s, f in expected]


def test_prompt_deleted_from_queue_is_canceled() -> None:
    tracker = Tracker()
    tracker.apply(queue(["p1"], ["p2"]), T0)
    tracker.apply(queue(["p1"], []), T0 + 1)
    assert tracker.unresolved_prompts("local", T0 + 1) == ["p2"]
    tracker.apply(HistoryEntry("local", "p2", None), T0 + 1)
    job = tracker.job("comfy:p2")
    assert job is not None
    assert job["state"] == "canceled"


def test_running_prompt_that_vanishes_is_lost_never_completed() -> None:
    tracker = Tracker()
    tracker.apply(SourceStatus("comfyui:local", True), T0)
    tracker.apply(queue(["p1"], ["p2"]), T0)
    run_steps(tracker, "p1", 3, T0)
    tracker.apply(SourceStatus("comfyui:local", False, "closed"), T0 + 5)
    stale = tracker.job("comfy:p1")
    assert stale is not None
    assert stale["stale"] is True
    tracker.apply(SourceStatus("comfyui:local", True), T0 + 30)
    tracker.apply(queue([], []), T0 + 30)
    assert sorted(tracker.unresolved_prompts("local", T0 + 30)) == ["p1", "p2"]
    tracker.apply(HistoryEntry("local", "p1", None), T0 + 30)
    tracker.apply(HistoryEntry("local", "p2", None), T0 + 30)
    for job_id in ("comfy:p1", "comfy:p2"):
        job = tracker.job(job_id)
        assert job is not None
        assert job["state"] == "lost"
        assert job["stale"] is False
    assert [(tracker.job(j) or {})["last_seen_at"] for j in ("comfy:p1", "comfy:p2")] == [
        "2027-01-15T08:00:03.000Z",
        "2027-01-15T08:00:00.000Z",
    ]


def reconnect(tracker: Tracker, at: float) -> None:
    tracker.apply(SourceStatus("comfyui:local", False, "closed"), at)
    tracker.apply(SourceStatus("comfyui:local", True), at + 1)


def running_and_waiting() -> Tracker:
    """p1 sampling, p2 queued behind it, the source up."""
    tracker = Tracker()
    tracker.apply(SourceStatus("comfyui:local", True), T0)
    tracker.apply(queue(["p1"], ["p2"]), T0)
    run_steps(tracker, "p1", 3, T0)
    return tracker


def state_of(tracker: Tracker, prompt_id: str) -> str:
    job = tracker.job(f"comfy:{prompt_id}")
    assert job is not None
    return str(job["state"])


@pytest.mark.parametrize("p1_finished", [False, True], ids=["p1-still-running", "p1-finished"])
def test_a_prompt_deleted_during_a_network_blip_is_canceled_not_lost(p1_finished: bool) -> None:
    tracker = running_and_waiting()
    reconnect(tracker, T0 + 5)
    if p1_finished:
        tracker.apply(queue([], []), T0 + 7)
        assert tracker.unresolved_prompts("local", T0 + 7) == ["p1", "p2"]
        tracker.apply(history("p1"), T0 + 7)
    else:
        tracker.apply(queue(["p1"], []), T0 + 7)
    assert tracker.unresolved_prompts("local", T0 + 7) == ["p2"]
    tracker.apply(HistoryEntry("local", "p2", None), T0 + 7)
    assert state_of(tracker, "p2") == "canceled"
    assert state_of(tracker, "p1") == ("completed" if p1_finished else "running")


def test_after_a_reconnect_a_vanished_prompt_waits_for_the_witness_answer() -> None:
    tracker = running_and_waiting()
    reconnect(tracker, T0 + 5)
    tracker.apply(HistoryEntry("local", "p2", None), T0 + 6)
    assert tracker.unresolved_prompts("local", T0 + 6) == []
    tracker.apply(queue([], []), T0 + 7)
    tracker.apply(HistoryEntry("local", "p2", None), T0 + 7)
    assert state_of(tracker, "p2") == "queued"
    assert tracker.unresolved_prompts("local", T0 + 8) == ["p1", "p2"]
    tracker.apply(history("p1"), T0 + 8)
    tracker.apply(HistoryEntry("local", "p2", None), T0 + 8)
    assert state_of(tracker, "p2") == "canceled"


def test_a_restart_shown_by_every_witness_gone_loses_what_was_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = Tracker()
    tracker.apply(SourceStatus("comfyui:local", True), T0)
    for n, done in enumerate(("d1", "d2", "d3")):
        tracker.apply(queue([done], []), T0 + n)
        tracker.apply(history(done), T0 + n + 0.5)
    tracker.apply(queue(["p1"], ["p2"]), T0 + 10)
    reconnect(tracker, T0 + 20)
    tracker.apply(queue([], ["new"]), T0 + 30)
    assert tracker.unresolved_prompts("local", T0 + 30) == ["d2", "d3", "p1", "p2"]
    with caplog.at_level(logging.INFO, logger="tower_progress.core.tracker"):
        for witness in ("d2", "p1"):
            tracker.apply(HistoryEntry("local", witness, None), T0 + 30)
        assert (state_of(tracker, "p1"), state_of(tracker, "p2")) == ("lost", "queued")
        events = tracker.apply(HistoryEntry("local", "d3", None), T0 + 30)
    assert [e.job["id"] for e in events if isinstance(e, JobChanged)] == ["comfy:p2"]
    assert [r.getMessage() for r in caplog.records] == [
        "prompt p1 vanished from ComfyUI local: lost",
        "ComfyUI local restarted: none of the prompts it held is there any more",
        "prompt p2 vanished from ComfyUI local: lost",
    ]
    lost = tracker.job("comfy:p2")
    assert lost is not None
    assert (lost["state"], lost["last_seen_at"]) == ("lost", "2027-01-15T08:00:10.000Z")
    assert [state_of(tracker, p) for p in ("d1", "d2", "d3", "new")] == [
        "completed",
        "completed",
        "completed",
        "queued",
    ]
    tracker.apply(queue([], []), T0 + 31)
    assert tracker.unresolved_prompts("local", T0 + 31) == ["new"]
    tracker.apply(HistoryEntry("local", "new", None), T0 + 31)
    assert state_of(tracker, "new") == "canceled"


def test_after_a_restart_a_step_without_a_prompt_id_is_not_the_lost_prompts() -> None:
    """p1 samples (its steps name no prompt, as some ComfyUI versions send them); three
    earlier prompts read from history later are the witnesses, all gone after the restart."""
    tracker = Tracker()
    tracker.apply(SourceStatus("comfyui:local", True), T0)
    tracker.apply(queue(["p1"], []), T0)
    run_steps(tracker, "p1", 3, T0)
    for n, done in enumerate(("d1", "d2", "d3")):
        tracker.apply(history(done), T0 + 4 + n)
    reconnect(tracker, T0 + 10)
    tracker.apply(queue([], []), T0 + 12)
    for done in ("d1", "d2", "d3"):
        tracker.apply(HistoryEntry("local", done, None), T0 + 12)
    assert state_of(tracker, "p1") == "lost"
    seen = (tracker.job("comfy:p1") or {})["last_seen_at"]
    assert tracker.apply(msg("progress", value=1, max=10, node="3"), T0 + 13) == []
    assert (tracker.job("comfy:p1") or {})["last_seen_at"] == seen


def test_rows_done_before_comfyui_says_so_leave_nothing_behind_once_let_go() -> None:
    """The production system marks each row completed while ComfyUI still runs the prompt
    (partial visibility: its end shows only in /history, read later). Once the cap lets those
    jobs go, their prompts go too: nothing is left running, nothing keeps /queue busy."""
    tracker = Tracker(TrackerConfig(finished_cap=2))
    for n in range(5):
        t = T0 + n
        tracker.apply(JobRow(str(n), "queued", prompt_id=f"p{n}"), t)
        tracker.apply(queue([f"p{n}"], [], client_id=None), t)
        node = {"value": 1, "max": 4, "state": "running", "node_id": "3", "display_node_id": "3"}
        tracker.apply(msg("progress_state", prompt_id=f"p{n}", nodes={"3": node}), t)
        tracker.apply(JobRow(str(n), "completed", prompt_id=f"p{n}"), t + 0.5)
    assert [job["id"] for job in tracker.jobs()] == ["3", "4"]
    tracker.apply(queue([], []), T0 + 6)
    tracker.apply(HistoryEntry("local", "p3", None), T0 + 6)
    tracker.apply(HistoryEntry("local", "p4", None), T0 + 6)
    assert tracker.needs_polling("local") is False
    assert tracker.unresolved_prompts("local", T0 + 7) == []


def _bridged_and_sampling(grace: float) -> Tracker:
    tracker = Tracker(
        TrackerConfig(
            instances={"local": InstanceConfig("watcher", bridge=True)}, finish_grace_s=grace
        )
    )
    tracker.apply(SourceStatus("comfyui:local", True), T0)
    tracker.apply(JobRow("7", "processing", prompt_id="p1"), T0)
    tracker.apply(queue(["p1"], []), T0)
    run_steps(tracker, "p1", 10, T0, gap=0.5)
    return tracker


def test_a_row_completed_before_comfyui_ends_waits_for_its_tail_within_the_grace() -> None:
    """The production system's update overtakes ComfyUI's last events: the job stays running
    until they come, and then finishes with its decoding span and outputs."""
    tracker = _bridged_and_sampling(grace=2.0)
    early = tracker.apply(JobRow("7", "completed", prompt_id="p1"), T0 + 5.1)
    assert not any(isinstance(e, JobFinished) for e in early)
    assert tracker.apply(Tick(), T0 + 6) == []
    assert (tracker.job("7") or {})["state"] == "running"
    tracker.apply(msg("executing", node="8", prompt_id="p1"), T0 + 6.2)
    output = {"images": [{"filename": "shot.png", "subfolder": "", "type": "output"}]}
    tracker.apply(msg("executing", node="9", prompt_id="p1"), T0 + 6.6)
    tracker.apply(msg("executed", node="9", output=output, prompt_id="p1"), T0 + 6.6)
    events = tracker.apply(msg("execution_success", prompt_id="p1"), T0 + 6.7)
    (finished,) = [e for e in events if isinstance(e, JobFinished)]
    assert (finished.job["state"], finished.job["outputs"]) == ("completed", ["shot.png"])
    assert finished.stage_seconds["decoding"] == pytest.approx(0.4)


@pytest.mark.parametrize("with_grace", [False, True])
def test_the_row_verdict_stands_once_the_grace_is_over_or_without_one(with_grace: bool) -> None:
    tracker = _bridged_and_sampling(grace=2.0 if with_grace else 0.0)
    events = tracker.apply(JobRow("7", "completed", prompt_id="p1"), T0 + 5.1)
    if with_grace:
        assert tracker.apply(Tick(), T0 + 7.0) == []
        events = tracker.apply(Tick(), T0 + 7.1)
    assert [e.job["state"] for e in events if isinstance(e, JobFinished)] == ["completed"]


def test_a_row_completed_while_comfyui_is_away_or_unseen_ends_at_once() -> None:
    tracker = _bridged_and_sampling(grace=2.0)
    tracker.apply(SourceStatus("comfyui:local", False, "closed"), T0 + 5.0)
    events = tracker.apply(JobRow("7", "completed", prompt_id="p1"), T0 + 5.1)
    assert [e.job["state"] for e in events if isinstance(e, JobFinished)] == ["completed"]
    partial = Tracker(TrackerConfig(finish_grace_s=2.0))
    partial.apply(SourceStatus("comfyui:local", True), T0)
    partial.apply(JobRow("8", "processing", prompt_id="p2"), T0)
    partial.apply(queue(["p2"], [], client_id=None), T0)
    events = partial.apply(JobRow("8", "completed", prompt_id="p2"), T0 + 1)
    assert [e.job["state"] for e in events if isinstance(e, JobFinished)] == ["completed"]


def test_unanswered_witnesses_keep_polling_often_until_one_answers() -> None:
    tracker = Tracker(TrackerConfig(instances={"local": InstanceConfig(client_id="me")}))
    tracker.apply(SourceStatus("comfyui:local", True), T0)
    mine = QueueItem(prompt_id="d1", number=1, graph=GRAPH, client_id="me")
    tracker.apply(QueueSnapshot("local", running=(mine,), pending=()), T0)
    tracker.apply(msg("execution_success", prompt_id="d1"), T0 + 1)
    assert tracker.needs_polling("local") is False
    reconnect(tracker, T0 + 5)
    tracker.apply(queue([], []), T0 + 7)
    assert tracker.unresolved_prompts("local", T0 + 7) == ["d1"]
    assert tracker.needs_polling("local") is True
    tracker.apply(history("d1"), T0 + 7)
    assert tracker.needs_polling("local") is False


def test_prompt_only_seen_on_the_websocket_is_not_resolved_too_early() -> None:
    tracker = Tracker()
    tracker.apply(msg("progress_state", prompt_id="p9", nodes={}), T0)
    tracker.apply(queue([], []), T0 + 1)
    assert tracker.unresolved_prompts("local", T0 + 1) == []
    tracker.apply(queue([], []), T0 + 5)
    assert tracker.unresolved_prompts("local", T0 + 5) == ["p9"]


def test_stall_is_flagged_with_idle_gpu_and_clears_on_progress() -> None:
    tracker = Tracker(TrackerConfig(stall_factor=5, stall_min_s=10))
    tracker.apply(ResourceSample(gpus=(GpuSample(0, "H100", utilization=2.0),)), T0)
    tracker.apply(queue(["p1"], []), T0)
    t = run_steps(tracker, "p1", 4, T0)
    tracker.apply(Tick(), t + 9)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert job["stalled"] is None
    (changed,) = tracker.apply(Tick(), t + 11)
    assert isinstance(changed, JobChanged)
    assert changed.job["stalled"] == {
        "since": changed.job["stalled"]["since"],
        "gpu_utilization": 2.0,
    }
    tracker.apply(msg("progress", value=5, max=10, node="3", prompt_id="p1"), t + 12)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert job["stalled"] is None


def test_queued_jobs_get_an_eta_from_the_running_job_and_priors() -> None:
    tracker = Tracker()
    tracker.apply(queue(["p1"], []), T0)
    t = run_steps(tracker, "p1", 10, T0)
    tracker.apply(history("p1"), t + 1)
    tracker.apply(queue(["p2"], ["p3"]), t + 2)
    run_steps(tracker, "p2", 5, t + 2)
    job = tracker.job("comfy:p3")
    assert job is not None
    assert job["queue_position"] == 1
    assert job["eta_s"] is not None and job["eta_s"] > 0


def test_finished_jobs_beyond_the_cap_are_removed() -> None:
    tracker = Tracker(TrackerConfig(finished_cap=10))
    events = []
    for i in range(12):
        events += tracker.apply(JobRow(str(i), "done"), T0 + i)
    removed = [e.id for e in events if isinstance(e, JobRemoved)]
    assert removed == ["0", "1"]
    assert len(tracker.jobs()) == 10


def test_a_let_go_job_stays_gone_until_its_row_changes() -> None:
    """The reconcile query returns recently finished rows every time: unchanged, they must not
    come back as jobs (and finish again) once the cap let them go."""
    tracker = Tracker(TrackerConfig(finished_cap=2, let_go_cap=3))
    for i in range(5):
        tracker.apply(JobRow(str(i), "done", updated_at=T0 + i), T0 + i)
    assert [job["id"] for job in tracker.jobs()] == ["3", "4"]
    for i in range(5):
        assert tracker.apply(JobRow(str(i), "done", updated_at=T0 + i), T0 + 10) == []
    assert [job["id"] for job in tracker.jobs()] == ["3", "4"]
    retried = tracker.apply(JobRow("1", "queued", updated_at=T0 + 20), T0 + 20)
    assert [e.job["state"] for e in retried if isinstance(e, JobChanged)] == ["pending"]
    events = tracker.apply(JobRow("5", "done", updated_at=T0 + 21), T0 + 21)
    events += tracker.apply(JobRow("6", "done", updated_at=T0 + 22), T0 + 22)
    events += tracker.apply(JobRow("7", "done", updated_at=T0 + 23), T0 + 23)
    assert [e.id for e in events if isinstance(e, JobRemoved)] == ["3", "4", "5"]
    # Only the newest three let-go rows are remembered: "0" is forgotten and comes back.
    again = tracker.apply(JobRow("0", "done", updated_at=T0), T0 + 30)
    finished = [e for e in again if isinstance(e, JobFinished)]
    assert [(e.job["id"], e.witnessed) for e in finished] == [("0", False)]
    assert tracker.apply(JobRow("4", "done", updated_at=T0 + 4), T0 + 30) == []


def test_row_deleted_removes_the_job() -> None:
    tracker = Tracker()
    tracker.apply(JobRow("1", "pending"), T0)
    assert tracker.apply(RowDeleted("1"), T0 + 1) == [JobRemoved("1")]
    assert tracker.apply(RowDeleted("1"), T0 + 2) == []


def test_sources_and_resources_events() -> None:
    tracker = Tracker()
    sample = ResourceSample(cpu_percent=12.5, gpu_status="no GPU")
    assert tracker.apply(sample, T0) == [ResourcesChanged(tracker.resources() or {})]
    assert tracker.apply(sample, T0 + 1) == []
    assert tracker.apply(SourceStatus("database", False, "refused"), T0) == [
        SourceChanged("database", False, "refused")
    ]
    assert tracker.sources()["database"]["up"] is False


def test_resources_read_stale_when_samples_stop_and_recover_when_they_return() -> None:
    tracker = Tracker(TrackerConfig(resources_stale_s=10.0))
    sample = ResourceSample(cpu_percent=5.0)

    def changes(events: list[Any]) -> list[SourceChanged]:
        return [e for e in events if isinstance(e, SourceChanged)]

    assert changes(tracker.apply(Tick(), T0)) == []
    tracker.apply(sample, T0)
    assert changes(tracker.apply(Tick(), T0 + 10)) == []
    assert changes(tracker.apply(Tick(), T0 + 11)) == [
        SourceChanged("resources", False, "stale: no sample for 11 s")
    ]
    assert changes(tracker.apply(Tick(), T0 + 12)) == []
    assert changes(tracker.apply(sample, T0 + 13)) == [SourceChanged("resources", True, None)]
    hung = SourceStatus("resources", False, "NVML call hung")
    assert changes(tracker.apply(hung, T0 + 14)) == [
        SourceChanged("resources", False, "NVML call hung")
    ]
    assert changes(tracker.apply(Tick(), T0 + 30)) == [
        SourceChanged("resources", False, "stale: no sample for 17 s")
    ]
    assert changes(tracker.apply(sample, T0 + 31)) == [
        SourceChanged("resources", False, "NVML call hung")
    ]
    assert tracker.sources()["resources"]["up"] is False


@pytest.mark.parametrize(
    ("client_id", "events", "visibility"),
    [
        ("someone-else", [], "full"),
        (None, [], "partial"),
        (None, ["progress"], "partial"),
        (None, ["execution_start", "executing"], "full"),
    ],
    ids=["owner-copied", "anonymous-queued", "anonymous-uncovered-version", "anonymous-covered"],
)
def test_bridge_visibility_follows_what_the_bridge_delivers(
    client_id: str | None, events: list[str], visibility: str
) -> None:
    """The bridge copies owners' messages on every ComfyUI, those of prompts without a client
    id only where it was checked: there the node events show, elsewhere only progress does."""
    config = TrackerConfig(instances={"local": InstanceConfig("me", bridge=True)})
    tracker = Tracker(config)
    tracker.apply(queue(["p1"], [], client_id=client_id), T0)
    for kind in events:
        data: dict[str, Any] = {"prompt_id": "p1"}
        if kind == "executing":
            data["node"] = "3"
        if kind == "progress":
            data.update(node="3", value=2, max=10)
        tracker.apply(msg(kind, **data), T0 + 1)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert job["visibility"] == visibility


@pytest.mark.parametrize(
    ("client_id", "visibility"), [("me", "full"), (None, "partial"), ("other", "coarse")]
)
def test_visibility_from_the_queue_item(client_id: str | None, visibility: str) -> None:
    tracker = Tracker(TrackerConfig(instances={"local": InstanceConfig("me")}))
    tracker.apply(queue([], ["p1"], client_id=client_id), T0)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert job["visibility"] == visibility


def test_throttled_progress_still_clears_a_stall_at_once_and_repeats_are_silent() -> None:
    tracker = Tracker(TrackerConfig(progress_interval_s=0.1, stall_min_s=1.0))
    tracker.apply(queue(["p1"], []), T0)
    t = run_steps(tracker, "p1", 3, T0, gap=0.04)
    (stalled,) = tracker.apply(Tick(), t + 2)
    assert isinstance(stalled, JobChanged) and stalled.job["stalled"] is not None
    resumed = tracker.apply(msg("progress", value=4, max=10, node="3", prompt_id="p1"), t + 2.01)
    assert [(e.job["step"], e.job["stalled"]) for e in resumed if isinstance(e, JobChanged)] == [
        (4, None)
    ]
    node = {"value": 4, "max": 10, "state": "running", "node_id": "3", "display_node_id": "3"}
    repeat = msg("progress_state", prompt_id="p1", nodes={"3": node})
    assert tracker.apply(repeat, t + 2.5) == []
    assert (tracker.job("comfy:p1") or {})["step"] == 4


def test_wall_clock_stepping_back_never_raises_and_keeps_progress() -> None:
    tracker = Tracker()
    tracker.apply(queue(["p1"], []), T0)
    t = run_steps(tracker, "p1", 3, T0)
    tracker.apply(msg("progress", value=4, max=10, node="3", prompt_id="p1"), t - 60)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert job["step"] == 4
    throttled = Tracker(TrackerConfig(progress_interval_s=0.1))
    throttled.apply(queue(["p1"], []), T0)
    t = run_steps(throttled, "p1", 3, T0)
    throttled.apply(msg("progress", value=4, max=10, node="3", prompt_id="p1"), t - 60)
    assert (throttled.job("comfy:p1") or {})["step"] == 4


def test_queued_job_eta_comes_from_the_workflow_prior() -> None:
    fingerprint = Workflow.from_graph(GRAPH).fingerprint
    runs = [
        {"loading": 2.0, "sampling": 20.0, "decoding": 3.0},
        {"loading": 4.0, "sampling": 30.0, "decoding": 5.0},
        {"sampling": 25.0, "decoding": 4.0},
    ]
    tracker = Tracker(priors={fingerprint: runs})
    tracker.apply(queue([], ["p1", "p2"]), T0)
    first, second = tracker.job("comfy:p1"), tracker.job("comfy:p2")
    assert first is not None and second is not None
    # Each stage's lower tercile over the runs that entered it: the fastest of two or three.
    assert first["eta_s"] == 2.0 + 20.0 + 3.0
    assert second["eta_s"] == 2 * (2.0 + 20.0 + 3.0)


def test_queued_eta_is_the_running_remainder_plus_the_expected_jobs_ahead_and_its_own() -> None:
    """p1 runs at exactly its prior's pace (30 s), so 15 s in its remainder is 15 s; p2 is a
    costlier workflow with a 50 s prior, p3 another run of p1's."""
    costly = {**GRAPH, "3": {**GRAPH["3"], "inputs": {**GRAPH["3"]["inputs"], "steps": 20}}}
    prior = {"loading": 4.0, "preparing": 1.0, "sampling": 20.0, "decoding": 3.0, "encoding": 2.0}
    priors = {
        Workflow.from_graph(GRAPH).fingerprint: [prior],
        Workflow.from_graph(costly).fingerprint: [{**prior, "sampling": 40.0}],
    }
    tracker = Tracker(priors=priors)
    p1 = QueueItem(1.0, "p1", GRAPH, "other")
    tracker.apply(QueueSnapshot("local", (p1,), ()), T0)
    tracker.apply(msg("execution_start", prompt_id="p1", timestamp=int(T0 * 1000)), T0)
    for node, t in (("4", T0), ("5", T0 + 4), ("3", T0 + 5)):
        tracker.apply(msg("executing", node=node, prompt_id="p1"), t)
    for step in range(1, 6):
        tracker.apply(
            msg("progress", value=step, max=10, node="3", prompt_id="p1"), T0 + 5 + 2 * step
        )
    pending = (QueueItem(2.0, "p2", costly, "other"), QueueItem(3.0, "p3", GRAPH, "other"))
    tracker.apply(QueueSnapshot("local", (p1,), pending), T0 + 15)
    views = [tracker.job(f"comfy:{p}") or {} for p in ("p1", "p2", "p3")]
    assert [(v["state"], v["queue_position"], v["eta_s"]) for v in views] == [
        ("running", 0, 15.0),
        ("queued", 1, 15.0 + 50.0),
        ("queued", 2, 15.0 + 50.0 + 30.0),
    ]


def test_unusable_history_is_ignored_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    fingerprint = Workflow.from_graph(GRAPH).fingerprint
    tracker = Tracker(priors={fingerprint: [{"sampling": -5.0}]})
    with caplog.at_level(logging.WARNING):
        tracker.apply(queue([], ["p1"]), T0)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert job["eta_s"] is None
    assert "ignoring unusable history" in caplog.text


def test_node_start_marker_is_not_a_sampler_step() -> None:
    tracker = Tracker()
    tracker.apply(queue(["p1"], []), T0)
    node = {"value": 0.0, "max": 1.0, "state": "running", "node_id": "3", "display_node_id": "3"}
    tracker.apply(msg("progress_state", prompt_id="p1", nodes={"3": node}), T0 + 1)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert (job["stage"], job["step"], job["steps"]) == ("sampling", None, None)


def test_older_comfyui_without_progress_state_or_success() -> None:
    """Pre-2024 servers: executing per node, no progress_state, no execution_success."""
    tracker = Tracker()
    tracker.apply(queue(["p1"], []), T0)
    tracker.apply(msg("execution_start", prompt_id="p1", timestamp=-5), T0)
    for i, node_id in enumerate(["4", "5", "3", "8"]):
        tracker.apply(msg("executing", node=node_id, prompt_id="p1"), T0 + i)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert (job["stage"], job["node"]["class_type"]) == ("decoding", "VAEDecode")
    # loading, preparing and sampling done; the graph has no processing node (3 % share)
    assert job["percent"] == pytest.approx(100 * (0.15 + 0.05 + 0.65) / 0.97, abs=0.1)
    tracker.apply(msg("executing", node=None, prompt_id="p1"), T0 + 5)
    entry = {"outputs": {}, "status": {"status_str": "success", "completed": True}}
    tracker.apply(HistoryEntry("local", "p1", entry), T0 + 6)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert (job["state"], job["started_at"]) == ("completed", "2027-01-15T08:00:00.000Z")


@pytest.mark.parametrize(
    "garbage",
    [
        {"type": "execution_cached", "data": {"nodes": "4", "prompt_id": "p1"}},
        {"type": "progress", "data": {"value": 1, "max": 10, "prompt_id": "p1"}},
        {"type": "progress", "data": {"value": "1", "max": 10, "prompt_id": "p1", "node": "3"}},
        {"type": "progress_state", "data": {"prompt_id": "p1", "nodes": {"3": "junk"}}},
        {"type": "progress_state", "data": {"prompt_id": "p1", "nodes": []}},
        {"type": "executed", "data": {"prompt_id": "p1", "output": {"images": []}}},
        {"type": "executed", "data": {"prompt_id": "p1", "node": "9", "output": "junk"}},
        {"type": "executing", "data": {"node": True, "prompt_id": "p1"}},
        {"type": "status", "data": "junk"},
        {"type": 7, "data": {}},
        {"type": "mystery", "data": {"prompt_id": "p1"}},
        {"type": "progress", "data": {"value": 1, "max": 10}},
    ],
)
def test_garbage_messages_change_nothing(garbage: dict[str, Any]) -> None:
    tracker = Tracker()
    tracker.apply(queue(["p1"], []), T0)
    before = tracker.job("comfy:p1")
    tracker.apply(ComfyMessage("local", garbage), T0 + 1)
    after = tracker.job("comfy:p1")
    assert before is not None and after is not None
    assert (after["state"], after["percent"], after["step"], after["outputs"]) == (
        before["state"],
        before["percent"],
        before["step"],
        before["outputs"],
    )


def test_history_with_garbage_messages_and_error_status() -> None:
    tracker = Tracker()
    tracker.apply(queue(["p1"], []), T0)
    entry = {
        "prompt": "junk",
        "outputs": "junk",
        "status": {"status_str": "error", "messages": ["junk", ["a", "b"], ["x", {}]]},
    }
    tracker.apply(HistoryEntry("local", "p1", entry), T0 + 1)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert job["state"] == "failed"
    assert job["error"] == {
        "message": "Execution failed",
        "node_id": None,
        "node_type": None,
        "exception_type": None,
    }


def test_history_absent_while_still_queued_changes_nothing() -> None:
    tracker = Tracker()
    tracker.apply(queue([], ["p1"]), T0)
    assert tracker.apply(HistoryEntry("local", "p1", None), T0 + 1) == []
    assert tracker.apply(HistoryEntry("other", "p9", None), T0 + 1) == []


def test_cancel_target_and_unresolved_row_prompts() -> None:
    tracker = Tracker()
    tracker.apply(JobRow("1", "queued", prompt_id="p1"), T0)
    tracker.apply(JobRow("2", "pending"), T0)
    assert tracker.prompt_target("1") is None
    assert tracker.prompt_target("nope") is None
    assert tracker.unresolved_prompts("local", T0) == []
    tracker.apply(queue([], ["p2"]), T0)
    assert tracker.unresolved_prompts("local", T0) == ["p1"]
    assert tracker.unresolved_prompts("elsewhere", T0) == []
    assert tracker.prompt_target("comfy:p2") == ("local", "p2", JobState.QUEUED)
    assert tracker.needs_polling("elsewhere") is True, "row 1's prompt p1 is nowhere yet"
    tracker.apply(queue([], ["p1", "p2"]), T0 + 1)
    assert tracker.needs_polling("local") is True, "p2 and p1 are seen only through /queue"
    assert tracker.needs_polling("elsewhere") is False


def test_prompts_seen_in_full_need_no_polling() -> None:
    tracker = Tracker(TrackerConfig(instances={"local": InstanceConfig(client_id="me")}))
    mine = QueueItem(prompt_id="p1", number=1, graph=GRAPH, client_id="me")
    tracker.apply(QueueSnapshot("local", running=(mine,), pending=()), T0)
    assert tracker.needs_polling("local") is False
    theirs = QueueItem(prompt_id="p2", number=2, graph=GRAPH, client_id="someone")
    tracker.apply(QueueSnapshot("local", running=(mine,), pending=(theirs,)), T0 + 1)
    assert tracker.needs_polling("local") is True
    tracker.apply(msg("execution_interrupted", prompt_id="p2"), T0 + 2)
    assert tracker.needs_polling("local") is False


def test_row_resubmitted_with_a_new_prompt_relinks() -> None:
    tracker = Tracker()
    tracker.apply(queue([], ["p1", "p2"]), T0)
    tracker.apply(JobRow("1", "queued", prompt_id="p1"), T0)
    events = tracker.apply(JobRow("1", "queued", prompt_id="p2"), T0 + 1)
    assert JobRemoved("comfy:p2") in events
    tracker.apply(queue([], ["p1", "p2"]), T0 + 2)
    assert {j["id"] for j in tracker.jobs()} == {"1", "comfy:p1"}


def test_row_jobs_go_stale_while_the_database_is_down() -> None:
    tracker = Tracker()
    tracker.apply(JobRow("1", "pending"), T0)
    tracker.apply(SourceStatus("database", False, "gone"), T0 + 1)
    job = tracker.job("1")
    assert job is not None
    assert job["stale"] is True


def test_a_job_that_ends_while_the_database_is_down_is_not_left_stale() -> None:
    """A final state is latched; marking it stale would grey the card out for ever."""
    tracker = Tracker()
    tracker.apply(SourceStatus("database", False, "gone"), T0)
    tracker.apply(JobRow("1", "completed"), T0 + 1)
    job = tracker.job("1")
    assert job is not None
    assert (job["state"], job["stale"]) == ("completed", False)


def test_queued_eta_unknown_while_running_job_has_no_estimate() -> None:
    tracker = Tracker()
    tracker.apply(queue([], ["p0"]), T0)
    tracker.apply(HistoryEntry("local", "p0", history("p0").entry), T0 + 10)
    tracker.apply(queue(["p1"], ["p2"]), T0 + 11)
    job = tracker.job("comfy:p2")
    assert job is not None
    assert job["eta_s"] is None


def test_pruned_finished_prompt_jobs_release_their_prompts() -> None:
    tracker = Tracker(TrackerConfig(finished_cap=10))
    for i in range(11):
        tracker.apply(queue([f"p{i}"], []), T0 + i)
        tracker.apply(history(f"p{i}"), T0 + i)
    assert tracker.job("comfy:p0") is None
    assert len(tracker.jobs()) == 10
    tracker.apply(JobRow("r", "queued", prompt_id="p5"), T0 + 20)
    tracker.apply(RowDeleted("r"), T0 + 21)
    assert tracker.job("comfy:p5") is None


def test_terminal_statuses_for_the_database() -> None:
    statuses = StatusMap({"Shipped": JobState.COMPLETED}).terminal_statuses()
    assert "shipped" in statuses and "done" in statuses and "processing" not in statuses


def test_queued_eta_without_history_scales_the_pace_of_other_workflows() -> None:
    tracker = Tracker()
    tracker.apply(queue(["p1"], []), T0)
    t = run_steps(tracker, "p1", 10, T0)
    tracker.apply(history("p1"), t)
    seconds_per_step = (T0 + 9.0 - (T0 + 0.1)) / 10
    bigger = {**GRAPH, "3": {"class_type": "KSampler", "inputs": {"steps": 40}}}
    item = QueueItem(20.0, "p2", bigger, "other")
    tracker.apply(QueueSnapshot("local", (), (item,)), t + 1)
    job = tracker.job("comfy:p2")
    assert job is not None
    assert job["eta_s"] == round(40 * seconds_per_step, 1)


def test_encoder_frames_and_speed_belong_to_the_node_running_now() -> None:
    graph = {
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 4}},
        "3": {"class_type": "KSampler", "inputs": {"steps": 10}},
        "8": {"class_type": "VAEDecodeTiled", "inputs": {}},
        "9": {"class_type": "VHS_VideoCombine", "inputs": {}},
    }
    tracker = Tracker()
    tracker.apply(QueueSnapshot("local", (QueueItem(1.0, "p1", graph, None),), ()), T0)
    tracker.apply(msg("executing", node="3", prompt_id="p1"), T0)
    for step in (1, 2, 3):
        tracker.apply(msg("progress", value=step, max=10, node="3", prompt_id="p1"), T0 + step)
    tracker.apply(msg("executing", node="8", prompt_id="p1"), T0 + 4)
    tracker.apply(msg("progress", value=2, max=4, node="8", prompt_id="p1"), T0 + 5)
    tracker.apply(msg("progress", value=4, max=4, node="8", prompt_id="p1"), T0 + 6)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert (job["stage"], job["frames_done"], job["frames_total"]) == ("decoding", 4, 4)
    assert job["velocity"]["steps_per_s"] is None
    assert job["velocity"]["frames_per_s"] == 2.0
    tracker.apply(msg("executing", node="9", prompt_id="p1"), T0 + 7)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert (job["stage"], job["frames_done"]) == ("encoding", None)
    assert job["velocity"]["frames_per_s"] is None


def test_without_the_graph_a_node_counting_many_ticks_is_a_sampler() -> None:
    tracker = Tracker()
    tracker.apply(msg("execution_start", prompt_id="p1"), T0)
    tracker.apply(msg("executing", node="3", prompt_id="p1"), T0)
    tracker.apply(msg("progress", value=4, max=20, node="3", prompt_id="p1"), T0 + 1)
    job = tracker.job("comfy:p1")
    assert job is not None
    assert (job["stage"], job["step"], job["steps"]) == ("sampling", 4, 20)
    assert [s["stage"] for s in job["stages"]] == ["loading", "sampling"]


def _busy_tracker() -> Tracker:
    """A row job running p1 three steps in, p2 queued behind it, both sources up, a sample."""
    tracker = Tracker(TrackerConfig(stall_factor=5, stall_min_s=10, resources_stale_s=60))
    tracker.apply(SourceStatus("database", True), T0)
    tracker.apply(SourceStatus("comfyui:local", True), T0)
    tracker.apply(ResourceSample(gpus=(GpuSample(0, "H100", utilization=2.0),)), T0)
    tracker.apply(JobRow("r1", "processing", prompt_id="p1", title="Shot 1"), T0)
    tracker.apply(queue(["p1"], ["p2"]), T0)
    run_steps(tracker, "p1", 3, T0)
    return tracker


def _state(tracker: Tracker) -> tuple[Any, ...]:
    return tracker.jobs(), tracker.resources(), tracker.sources()


Case = tuple[str, tuple[Any, ...], Any, float, set[str]]
# (id, observations applied first, the observation applied twice, seconds after T0, the kinds
# of event its first apply gives)
IDEMPOTENT: list[Case] = [
    ("row changed", (), JobRow("r1", "processing", "p1", "Shot 1b"), 5.0, {"JobChanged"}),
    ("row new", (), JobRow("r2", "queued", prompt_id="p9"), 5.0, {"JobChanged"}),
    ("row deleted", (), RowDeleted("r1"), 5.0, {"JobRemoved"}),
    ("queue grown", (), queue(["p1"], ["p2", "p3"]), 5.0, {"JobChanged"}),
    ("queue without the running prompt", (), queue([], ["p2"]), 5.0, set()),
    ("history success", (), history("p1"), 5.0, {"JobChanged", "Milestone"}),
    (
        "history error",
        (),
        history("p1", "execution_error", node_id="3", exception_message="x"),
        5.0,
        {"JobChanged", "JobFinished", "Milestone"},
    ),
    (
        "history absent: lost",
        (queue([], ["p2"]),),
        HistoryEntry("local", "p1", None),
        5.0,
        {"JobChanged", "JobFinished", "Milestone"},
    ),
    (
        "progress",
        (),
        msg("progress", value=4, max=10, node="3", prompt_id="p1"),
        5.0,
        {"JobChanged", "Milestone"},
    ),
    ("executed", (), msg("executed", node="9", output={}, prompt_id="p1"), 5.0, {"JobChanged"}),
    (
        "resources",
        (),
        ResourceSample(cpu_percent=40.0, gpus=(GpuSample(0, "H100", 90.0),)),
        5.0,
        {"ResourcesChanged"},
    ),
    (
        "database down",
        (),
        SourceStatus("database", False, "refused"),
        5.0,
        {"JobChanged", "SourceChanged"},
    ),
    (
        "comfyui down",
        (),
        SourceStatus("comfyui:local", False, "refused"),
        5.0,
        {"JobChanged", "SourceChanged"},
    ),
    ("tick, nothing due but the countdown", (), Tick(), 5.0, {"JobChanged"}),
    ("tick that flags the stall", (), Tick(), 20.0, {"JobChanged"}),
    ("tick that finds resources stale", (), Tick(), 200.0, {"JobChanged", "SourceChanged"}),
]


@pytest.mark.parametrize(
    ("before", "observation", "after", "kinds"),
    [c[1:] for c in IDEMPOTENT],
    ids=[c[0] for c in IDEMPOTENT],
)
def test_the_same_observation_twice_changes_nothing(
    before: tuple[Any, ...], observation: Any, after: float, kinds: set[str]
) -> None:
    tracker = _busy_tracker()
    now = T0 + after
    for earlier in before:
        tracker.apply(earlier, now)
    first = tracker.apply(observation, now)
    state = _state(tracker)
    assert tracker.apply(observation, now) == []
    assert _state(tracker) == state
    assert {type(e).__name__ for e in first} == kinds
