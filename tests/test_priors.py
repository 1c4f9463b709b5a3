"""ETA priors survive a daemon restart and make the ETA of a repeated workflow better early on.

A Wan 2.1 text-to-video workflow (the simulator's graph, run in ComfyUI v0.8.0's execution
order) is replayed as the daemon would observe it: the production row, ``/queue`` snapshots,
the websocket stream of a prompt submitted with the daemon's client id, ``/history`` and a
``Tick`` every second. Stage timings are H100-like and deterministic (seeded per-run jitter;
every run loads its models cold, as when other work evicted them in between). Three runs go
through a first Tracker whose ``JobFinished`` events are written by ``History`` to the real
PostgreSQL; then a new ``History`` (the restarted daemon) loads the priors into a new Tracker,
and a fourth run is replayed through it and through a Tracker without history.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from tower_progress.core.model import (
    ComfyMessage,
    HistoryEntry,
    JobChanged,
    JobFinished,
    JobRow,
    Observation,
    QueueItem,
    QueueSnapshot,
    SourceStatus,
    Tick,
)
from tower_progress.core.tracker import InstanceConfig, Tracker, TrackerConfig
from tower_progress.core.workflow import Workflow
from tower_progress.simulate import workflows
from tower_progress.simulate.graph import ExecutionOrder
from tower_progress.sources.database import History

T0 = 1_800_000_000.0
WATCHER_ID = "tower-progress-priors-test"
FRAMES = 49
STEPS = 20
OUTPUT_NODE = "50"
# Seconds per node on an H100 for Wan 2.1 14B fp8 at 832x480x49, before jitter.
NODE_SECONDS = {
    "UNETLoader": 24.0,
    "CLIPLoader": 9.0,
    "VAELoader": 1.2,
    "CLIPTextEncode": 1.5,
    "EmptyHunyuanLatentVideo": 0.05,
    "ModelSamplingSD3": 0.05,
}
STEP_SECONDS = 9.0
FRAME_SECONDS = 0.4
COMBINE_SECONDS = 4.0
STAGE_OF_CLASS = {
    "UNETLoader": "loading",
    "CLIPLoader": "loading",
    "VAELoader": "loading",
    "CLIPTextEncode": "preparing",
    "EmptyHunyuanLatentVideo": "preparing",
    "ModelSamplingSD3": "preparing",
    "KSampler": "sampling",
    "VAEDecodeTiled": "decoding",
    "VHS_VideoCombine": "encoding",
}
CHECKPOINTS = (0.1, 0.3)


def config() -> TrackerConfig:
    return TrackerConfig(instances={"local": InstanceConfig(client_id=WATCHER_ID)})


def wan_graph(unet: str) -> dict[str, Any]:
    graph = workflows.video(frames=FRAMES, steps=STEPS)
    graph["37"]["inputs"]["unet_name"] = unet
    return graph


def execution_order(graph: dict[str, Any]) -> list[str]:
    """The order ComfyUI v0.8.0 runs the nodes in, nothing cached."""
    order = ExecutionOrder(graph, is_cached=lambda _: False, is_output=lambda n: n == OUTPUT_NODE)
    order.add_outputs([OUTPUT_NODE])
    nodes = []
    while order:
        node = order.next()
        nodes.append(node)
        order.complete(node)
    return nodes


@dataclass
class Run:
    """One job's replay: what the daemon observes, when, and the truth to score against."""

    job_id: str
    observations: list[tuple[float, Observation]]
    started: float
    finished: float
    stage_seconds: dict[str, float]

    @property
    def duration(self) -> float:
        return self.finished - self.started


class Recorder:
    """Builds a run's observations in time order, with the daemon's one-second ticks."""

    def __init__(self, prompt_id: str) -> None:
        self.prompt_id = prompt_id
        self.items: list[tuple[float, Observation]] = []
        self.node_states: dict[str, dict[str, Any]] = {}

    def add(self, t: float, observation: Observation) -> None:
        self.items.append((t, observation))

    def ws(self, t: float, kind: str, **data: Any) -> None:
        self.add(t, ComfyMessage("local", {"type": kind, "data": data}))

    def progress_state(self, t: float, node: str, value: float, maximum: float, state: str) -> None:
        self.node_states[node] = {
            "value": value,
            "max": maximum,
            "state": state,
            "node_id": node,
            "prompt_id": self.prompt_id,
            "display_node_id": node,
            "parent_node_id": None,
            "real_node_id": node,
        }
        self.ws(
            t,
            "progress_state",
            prompt_id=self.prompt_id,
            nodes={k: dict(v) for k, v in self.node_states.items()},
        )

    def with_ticks(self) -> list[tuple[float, Observation]]:
        start, end = self.items[0][0], self.items[-1][0]
        ticks: list[tuple[float, Observation]] = [
            (float(second), Tick()) for second in range(int(start) + 1, int(end) + 1)
        ]
        return sorted(self.items + ticks, key=lambda item: item[0])


def later(t: float, seconds: float) -> float:
    """``t`` plus ``seconds`` on a millisecond grid, as ComfyUI's timestamps are."""
    return round(t + seconds, 3)


def ms(t: float) -> int:
    return round(t * 1000)


def make_run(graph: dict[str, Any], seed: int, start: float) -> Run:
    """A complete run of ``graph`` submitted at ``start``; jitter from ``seed``."""
    rng = random.Random(seed)
    job_id = f"priors-{uuid.uuid4().hex[:12]}"
    prompt_id = str(uuid.UUID(int=rng.getrandbits(128)))
    rec = Recorder(prompt_id)
    rec.add(start, SourceStatus("comfyui:local", True))
    rec.add(start, JobRow(job_id, "queued", prompt_id=prompt_id, title="Wan shot"))
    item = QueueItem(float(seed), prompt_id, graph, WATCHER_ID, create_time=start * 1000)
    rec.add(start + 0.2, QueueSnapshot("local", (), (item,)))
    t = start + 1.0
    rec.ws(t, "execution_start", prompt_id=prompt_id, timestamp=ms(t))
    rec.ws(t, "execution_cached", nodes=[], prompt_id=prompt_id, timestamp=ms(t))
    rec.add(t + 0.01, QueueSnapshot("local", (item,), ()))
    began = t
    stages: dict[str, float] = {}
    for node in execution_order(graph):
        class_type = graph[node]["class_type"]
        rec.progress_state(t, node, 0.0, 1.0, "running")
        rec.ws(t, "executing", node=node, display_node=node, prompt_id=prompt_id)
        node_start = t
        if class_type == "KSampler":
            for step in range(1, STEPS + 1):
                t = later(t, STEP_SECONDS * rng.uniform(0.9, 1.1))
                rec.progress_state(t, node, float(step), float(STEPS), "running")
                rec.ws(t, "progress", value=step, max=STEPS, prompt_id=prompt_id, node=node)
        elif class_type == "VAEDecodeTiled":
            for frame in range(1, FRAMES + 1):
                t = later(t, FRAME_SECONDS * rng.uniform(0.95, 1.05))
                rec.progress_state(t, node, float(frame), float(FRAMES), "running")
                rec.ws(t, "progress", value=frame, max=FRAMES, prompt_id=prompt_id, node=node)
        elif class_type == "VHS_VideoCombine":
            t = later(t, COMBINE_SECONDS * rng.uniform(0.9, 1.1))
        else:
            t = later(t, NODE_SECONDS[class_type] * rng.uniform(0.9, 1.1))
        rec.progress_state(t, node, 1.0, 1.0, "finished")
        stage = STAGE_OF_CLASS[class_type]
        stages[stage] = stages.get(stage, 0.0) + t - node_start
    output = {"gifs": [{"filename": "video_00001.mp4", "subfolder": "", "type": "output"}]}
    rec.ws(
        t,
        "executed",
        node=OUTPUT_NODE,
        display_node=OUTPUT_NODE,
        output=output,
        prompt_id=prompt_id,
    )
    rec.ws(t, "execution_success", prompt_id=prompt_id, timestamp=ms(t))
    rec.ws(t, "executing", node=None, prompt_id=prompt_id)
    entry = {
        "prompt": [seed, prompt_id, graph, {"client_id": WATCHER_ID}, [OUTPUT_NODE]],
        "outputs": {OUTPUT_NODE: output},
        "status": {
            "status_str": "success",
            "completed": True,
            "messages": [
                ["execution_start", {"prompt_id": prompt_id, "timestamp": ms(began)}],
                ["execution_cached", {"nodes": [], "prompt_id": prompt_id}],
                ["execution_success", {"prompt_id": prompt_id, "timestamp": ms(t)}],
            ],
        },
    }
    rec.add(t + 0.6, QueueSnapshot("local", (), ()))
    rec.add(t + 0.7, HistoryEntry("local", prompt_id, entry))
    rec.add(t + 1.5, JobRow(job_id, "done", prompt_id=prompt_id, title="Wan shot"))
    return Run(job_id, rec.with_ticks(), began, t, stages)


def replay(tracker: Tracker, run: Run) -> list[tuple[float, JobChanged | JobFinished]]:
    """Feed the run to ``tracker``; the run's job events with the time they were emitted."""
    events: list[tuple[float, JobChanged | JobFinished]] = []
    for t, observation in run.observations:
        for event in tracker.apply(observation, t):
            if isinstance(event, JobChanged | JobFinished) and event.job["id"] == run.job_id:
                events.append((t, event))
    return events


def job_views(tracker: Tracker, run: Run) -> list[tuple[float, dict[str, Any]]]:
    """The job messages a websocket client gets during the run, with their times."""
    return [(t, e.job) for t, e in replay(tracker, run) if isinstance(e, JobChanged)]


def finish_error_percent(views: list[tuple[float, dict[str, Any]]], run: Run) -> dict[float, float]:
    """|predicted finish - true finish| as % of the run's duration at each checkpoint, from
    the ``eta_at`` of the last job message a client had received by then."""
    errors: dict[float, float] = {}
    for checkpoint in CHECKPOINTS:
        at = run.started + checkpoint * run.duration
        last = [view for t, view in views if t <= at][-1]
        assert last["state"] == "running"
        predicted = datetime.fromisoformat(last["eta_at"]).timestamp()
        errors[checkpoint] = round(100 * abs(predicted - run.finished) / run.duration, 1)
    return errors


async def test_priors_survive_a_restart_and_shrink_the_early_eta_error(pg_dsn: str) -> None:
    graph = wan_graph(f"wan-priors-{uuid.uuid4().hex[:8]}.safetensors")
    fingerprint = Workflow.from_graph(graph).fingerprint
    earlier = [make_run(graph, seed, T0 + 1000.0 * seed) for seed in (1, 2, 3)]
    repeat = make_run(graph, 4, T0 + 4000.0)

    first_daemon = Tracker(config())
    history = await History.open(pg_dsn)
    try:
        for run in earlier:
            (finished,) = [e for _, e in replay(first_daemon, run) if isinstance(e, JobFinished)]
            assert finished.fingerprint == fingerprint
            assert finished.stage_seconds == pytest.approx(run.stage_seconds, abs=1e-4)
            assert history.record_finished(finished)
    finally:
        await history.close()

    restarted = await History.open(pg_dsn)
    try:
        priors = await restarted.load_priors()
    finally:
        await restarted.close()
    assert priors[fingerprint] == [
        pytest.approx(run.stage_seconds, abs=2e-3) for run in reversed(earlier)
    ]

    with_priors = job_views(Tracker(config(), priors), repeat)
    without = job_views(Tracker(config()), repeat)
    for views in (with_priors, without):
        assert (views[-1][1]["state"], views[-1][1]["percent"]) == ("completed", 100.0)
    queued_with = next(view for _, view in with_priors if view["state"] == "queued")
    queued_without = next(view for _, view in without if view["state"] == "queued")
    # The prior of three runs is each stage's lower tercile: the fastest of the three.
    expected = sum(
        min(run.stage_seconds[stage] for run in earlier) for stage in earlier[0].stage_seconds
    )
    assert queued_with["eta_s"] == pytest.approx(expected, abs=0.05)
    assert queued_without["eta_s"] is None

    assert repeat.duration == pytest.approx(242.419)
    error_with = finish_error_percent(with_priors, repeat)
    error_without = finish_error_percent(without, repeat)
    assert error_with == {0.1: 7.0, 0.3: 2.8}
    assert error_without == {0.1: 60.8, 0.3: 2.1}
    # Early on only the prior knows the sampling ahead; by 30 % the steps tell both as much.
    assert error_with[0.1] < error_without[0.1] / 5
