"""What ComfyUI has told us about one prompt, folded from websocket frames, /queue and /history.

``Prompt`` only ever moves forward: percent never decreases while running, a terminal outcome is
never replaced, and a late ``progress`` after ``/history`` reported the end changes nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tower_progress.core.eta import EtaEstimator
from tower_progress.core.frames import frames_in_output, output_files
from tower_progress.core.model import JobState, Stage, Visibility
from tower_progress.core.stages import DEFAULT_WEIGHTS
from tower_progress.core.workflow import Workflow

PriorLookup = Callable[[str], Mapping[str, float] | None]
_VELOCITY_POINTS = 12
# Decoders and video writers that tick once per frame show frames as they go.
_FRAME_STAGES = (Stage.DECODING, Stage.ENCODING)
# progress_state marks every node that starts as value 0 of max 1: not a sampler step.
_NODE_STARTED = (0.0, 1.0)
_TIMED_STAGES = (
    Stage.LOADING,
    Stage.PREPARING,
    Stage.SAMPLING,
    Stage.DECODING,
    Stage.ENCODING,
    Stage.PROCESSING,
)


def _ms(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value) / 1000.0
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _slope(points: deque[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    (t0, v0), (t1, v1) = points[0], points[-1]
    return (v1 - v0) / (t1 - t0) if t1 > t0 and v1 >= v0 else None


@dataclass
class StageSpan:
    stage: Stage
    started: float
    ended: float | None = None


@dataclass
class Prompt:
    """One ComfyUI prompt. Times are seconds on the tracker's clock (``now`` of each call)."""

    prompt_id: str
    instance: str
    first_seen: float
    visibility: Visibility = Visibility.COARSE
    state: JobState = JobState.QUEUED
    workflow: Workflow | None = None
    weights: dict[str, float] = field(default_factory=dict)
    client_id: str | None = None
    number: float | None = None
    queue_position: int | None = None
    in_snapshot: bool = False
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last_seen_at: float | None = None
    stage: Stage = Stage.QUEUED
    spans: list[StageSpan] = field(default_factory=list)
    current_node: str | None = None
    node_progress: dict[str, tuple[float, float]] = field(default_factory=dict)
    done_nodes: set[str] = field(default_factory=set)
    cached_nodes: list[str] = field(default_factory=list)
    step: int | None = None
    steps: int | None = None
    fraction: float = 0.0
    frames_done: int | None = None
    live_frames: int | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    eta: EtaEstimator | None = None
    eta_t: float = 0.0
    prior: Mapping[str, float] | None = None
    last_progress: float | None = None
    progress_gaps: deque[float] = field(default_factory=lambda: deque(maxlen=_VELOCITY_POINTS))
    step_points: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=_VELOCITY_POINTS)
    )
    frame_points: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=_VELOCITY_POINTS)
    )
    percent_points: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=_VELOCITY_POINTS)
    )

    # --- inputs ---------------------------------------------------------------------------

    def set_graph(self, graph: Any, priors: PriorLookup, now: float) -> None:
        """Learn the workflow (once) and its prior; re-stage a node that started before."""
        if self.workflow is not None or not isinstance(graph, Mapping) or not graph:
            return
        self.workflow = Workflow.from_graph(graph)
        prior = priors(self.workflow.fingerprint)
        self.prior = prior
        self.weights = self.workflow.weights(prior)
        spec = self.workflow.nodes.get(self.current_node) if self.current_node else None
        if spec is not None and not self.state.terminal:
            self._enter_stage(spec.stage, now)
            value, maximum = self.node_progress.get(self.current_node or "", (0.0, 1.0))
            if spec.stage is Stage.SAMPLING and value > 0:
                self.step, self.steps = int(value), int(maximum)
        self._refresh_fraction()
        if self.eta is not None and prior:
            self.eta = EtaEstimator(prior)
            self._feed_eta(now)

    def mark_running(self, now: float, started_at: float | None = None) -> None:
        if self.state.terminal:
            return
        if self.state is not JobState.RUNNING:
            self.state = JobState.RUNNING
            self.queue_position = 0
            self.started_at = started_at or self.started_at or now
            if self.stage in (Stage.QUEUED, Stage.PENDING):
                self._enter_stage(
                    Stage.PROCESSING if self.visibility is Visibility.COARSE else Stage.LOADING, now
                )
            self.eta = EtaEstimator(self.prior)
            self._feed_eta(now)
        elif started_at is not None:
            self.started_at = started_at

    def finish(self, state: JobState, now: float, finished_at: float | None = None) -> bool:
        """Record the outcome; returns False when the prompt had already ended."""
        if self.state.terminal:
            return False
        if self.started_at is None and state is not JobState.CANCELED:
            self.started_at = finished_at or now
        self.state = state
        self.finished_at = finished_at or now
        self.queue_position = None
        if state is JobState.COMPLETED:
            self.done_nodes.update(self.weights)
            self.fraction = 1.0
            self.step = self.steps = None
        self.current_node = None
        self._close_span(self.finished_at)
        self.stage = Stage.DONE
        return True

    def executing(self, node: str | None, now: float) -> None:
        if self.state.terminal:
            return
        self.mark_running(now)
        if self.current_node is not None and self.current_node != node:
            self.done_nodes.add(self.current_node)
        if node is None:
            self.current_node = None
        else:
            self._enter_node(node, now)
        self._refresh_fraction()
        self._feed_eta(now)

    def cached(self, nodes: Any) -> None:
        if not isinstance(nodes, list):
            return
        for node in nodes:
            node_id = str(node)
            if node_id not in self.cached_nodes:
                self.cached_nodes.append(node_id)
            self.done_nodes.add(node_id)
        self._refresh_fraction()
        self._feed_eta(self.eta_t)

    def progress(self, node: str | None, value: float, maximum: float, now: float) -> None:
        if self.state.terminal or maximum <= 0:
            return
        self.mark_running(now)
        node = node or self.current_node
        if node is None:
            return
        if node != self.current_node:
            if self.current_node is not None:
                self.done_nodes.add(self.current_node)
            self._enter_node(node, now)
        previous = self.node_progress.get(node)
        value = min(max(value, 0.0), maximum)
        if previous == (value, maximum):
            return
        self.node_progress[node] = (value, maximum)
        if previous is not None and self.last_progress is not None and value > previous[0]:
            self.progress_gaps.append(now - self.last_progress)
        self.last_progress = now
        stage = self._node_stage(node, maximum)
        if stage is not self.stage and (value, maximum) != _NODE_STARTED:
            self._enter_stage(stage, now)
        if stage is Stage.SAMPLING and (value, maximum) != _NODE_STARTED:
            if previous is not None and maximum != previous[1]:
                self.step_points.clear()
            self.step, self.steps = int(value), int(maximum)
            self.step_points.append((now, value))
        elif stage in _FRAME_STAGES and self._frames_total() == int(maximum):
            self.live_frames = int(value)
            self.frame_points.append((now, value))
        self._refresh_fraction()
        self._feed_eta(now)

    def progress_state(self, nodes: Any, now: float) -> None:
        if self.state.terminal or not isinstance(nodes, Mapping):
            return
        running: tuple[str, float, float] | None = None
        for key, info in nodes.items():
            if not isinstance(info, Mapping):
                continue
            node_id = _str(info.get("display_node_id")) or str(key)
            if info.get("state") == "finished":
                if node_id not in self.done_nodes:
                    self.done_nodes.add(node_id)
            elif info.get("state") == "running":
                value, maximum = info.get("value"), info.get("max")
                if isinstance(value, int | float) and isinstance(maximum, int | float):
                    running = (node_id, float(value), float(maximum))
        if running is not None:
            node_id, value, maximum = running
            self.progress(node_id, value, maximum, now)
        else:
            self._refresh_fraction()

    def executed(self, node: str | None, output: Any) -> None:
        if node is None or not isinstance(output, Mapping):
            return
        self.outputs[node] = output
        self.done_nodes.add(node)
        self._refresh_frames_done()

    def fail(self, data: Mapping[str, Any], state: JobState, now: float) -> bool:
        message = _str(data.get("exception_message"))
        if state is JobState.CANCELED:
            message = "Interrupted"
        node_id = _str(data.get("node_id"))
        self.error = {
            "message": (message or "Execution failed").strip(),
            "node_id": node_id,
            "node_type": _str(data.get("node_type")),
            "exception_type": _str(data.get("exception_type")),
        }
        return self.finish(state, now, _ms(data.get("timestamp")))

    def history(self, entry: Mapping[str, Any], priors: PriorLookup, now: float) -> None:
        """Fold a /history entry: the authoritative outcome, outputs and timings."""
        prompt = entry.get("prompt")
        if isinstance(prompt, list) and len(prompt) > 2:
            self.set_graph(prompt[2], priors, now)
        outputs = entry.get("outputs")
        if isinstance(outputs, Mapping):
            for node_id, output in outputs.items():
                self.executed(str(node_id), output)
        status = entry.get("status")
        status = status if isinstance(status, Mapping) else {}
        messages = status.get("messages")
        terminal: tuple[str, Mapping[str, Any]] | None = None
        for item in messages if isinstance(messages, list) else []:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], Mapping)):
                continue
            kind, data = item
            if kind == "execution_start":
                self.mark_running(now, _ms(data.get("timestamp")))
            elif kind == "execution_cached":
                self.cached(data.get("nodes"))
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                terminal = (kind, data)
        if terminal is None:
            if status.get("status_str") == "success" or status.get("completed") is True:
                self.finish(JobState.COMPLETED, now)
            elif status.get("status_str") == "error":
                self.fail({}, JobState.FAILED, now)
            return
        kind, data = terminal
        if kind == "execution_success":
            self.finish(JobState.COMPLETED, now, _ms(data.get("timestamp")))
        else:
            state = JobState.CANCELED if kind == "execution_interrupted" else JobState.FAILED
            self.fail(data, state, now)

    # --- derived --------------------------------------------------------------------------

    def percent(self) -> float:
        return round(100.0 * self.fraction, 1)

    def frames_total(self) -> int | None:
        return self._frames_total()

    def velocity(self) -> dict[str, float | None]:
        per_min = _slope(self.percent_points)
        steps = _slope(self.step_points)
        frames = _slope(self.frame_points)
        return {
            "percent_per_min": round(per_min * 60, 2) if per_min is not None else None,
            "steps_per_s": round(steps, 3) if steps is not None else None,
            "frames_per_s": round(frames, 3) if frames is not None else None,
        }

    def remaining(self, now: float) -> float | None:
        if self.state is not JobState.RUNNING or self.eta is None:
            return None
        remaining = self.eta.remaining(max(now, self.eta_t))
        return max(0.0, remaining) if remaining is not None else None

    def expected_gap(self) -> float | None:
        """Median time between progress ticks of the node running now."""
        if not self.progress_gaps:
            return None
        gaps = sorted(self.progress_gaps)
        return gaps[len(gaps) // 2]

    def stage_seconds(self) -> dict[str, float]:
        seconds: dict[str, float] = {}
        for span in self.spans:
            if span.ended is not None and span.stage in _TIMED_STAGES:
                seconds[span.stage.value] = seconds.get(span.stage.value, 0.0) + (
                    span.ended - span.started
                )
        return seconds

    def node_info(self) -> dict[str, Any] | None:
        if self.current_node is None:
            return None
        spec = self.workflow.nodes.get(self.current_node) if self.workflow else None
        return {
            "id": self.current_node,
            "class_type": spec.class_type if spec else None,
            "title": spec.title if spec else None,
        }

    def progress_marks(self) -> tuple[tuple[object, ...], tuple[object, ...]]:
        """What a progress message can change of this prompt's view, as (shape, position):
        equal marks before and after one mean it changed nothing; an equal shape means it
        only moved the job along."""
        node = self.current_node
        shape = (
            self.state,
            self.visibility,
            self.started_at,
            node,
            self.stage,
            len(self.spans),
            len(self.done_nodes),
            self.steps,
        )
        position = (self.node_progress.get(node) if node else None, self.fraction, self.step)
        return shape, (*position, self.live_frames)

    def output_files(self) -> list[str]:
        return [name for output in self.outputs.values() for name in output_files(output)]

    # --- internals ------------------------------------------------------------------------

    def _feed_eta(self, now: float) -> None:
        """Tell the estimator where the job is; time is clamped so a wall clock stepped back
        (NTP) is read as no time passing rather than an error."""
        if self.eta is None or self.state.terminal:
            return
        self.eta_t = max(self.eta_t, now)
        stage = self.stage.value if self.stage in _TIMED_STAGES else None
        self.eta.update(self.eta_t, self.fraction, stage)

    def _frames_total(self) -> int | None:
        return self.workflow.frames_total if self.workflow else None

    def _node_stage(self, node: str, maximum: float) -> Stage:
        spec = self.workflow.nodes.get(node) if self.workflow else None
        if spec is not None:
            return spec.stage
        return Stage.SAMPLING if maximum > 1 and self.stage is not Stage.DECODING else self.stage

    def _enter_node(self, node: str, now: float) -> None:
        self.current_node = node
        spec = self.workflow.nodes.get(node) if self.workflow else None
        stage = spec.stage if spec else self.stage
        self.progress_gaps.clear()
        self.last_progress = now
        self.live_frames = None
        self.frame_points.clear()
        if stage is not Stage.SAMPLING:
            self.step = self.steps = None
            self.step_points.clear()
        self._enter_stage(stage, now)

    def _enter_stage(self, stage: Stage, now: float) -> None:
        if stage is self.stage and self.spans:
            return
        self._close_span(now)
        self.stage = stage
        self.spans.append(StageSpan(stage, now))

    def _close_span(self, now: float) -> None:
        if self.spans and self.spans[-1].ended is None:
            self.spans[-1].ended = max(now, self.spans[-1].started)

    def _refresh_frames_done(self) -> None:
        counts = [
            n
            for n in (frames_in_output(o, self._frames_total()) for o in self.outputs.values())
            if n is not None
        ]
        if counts:
            self.frames_done = max(counts)

    def _refresh_fraction(self) -> None:
        if self.state.terminal:
            return
        if self.weights:
            fraction = sum(w for n, w in self.weights.items() if n in self.done_nodes)
            node = self.current_node
            if node is not None and node in self.weights and node not in self.done_nodes:
                value, maximum = self.node_progress.get(node, (0.0, 1.0))
                fraction += self.weights[node] * min(value / maximum, 1.0)
        else:
            fraction = self._fraction_by_stage()
        fraction = min(fraction, 0.999)
        if fraction > self.fraction:
            self.fraction = fraction
            if self.last_progress is not None:
                self.percent_points.append((self.last_progress, 100.0 * fraction))

    def _fraction_by_stage(self) -> float:
        """Without a graph: canonical stage order with default shares."""
        order = list(DEFAULT_WEIGHTS)
        if self.stage not in order:
            return self.fraction
        index = order.index(self.stage)
        before = sum(DEFAULT_WEIGHTS[s] for s in order[:index])
        within = 0.0
        if self.current_node is not None:
            value, maximum = self.node_progress.get(self.current_node, (0.0, 1.0))
            within = min(value / maximum, 1.0)
        return before + DEFAULT_WEIGHTS[self.stage] * within
