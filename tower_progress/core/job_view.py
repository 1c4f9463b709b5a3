"""The public JSON shape of a job (DESIGN §4.1), rendered from its row and its prompt."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tower_progress.core.model import JobRow, JobState, JsonDict, Stage, Visibility
from tower_progress.core.prompt import Prompt
from tower_progress.core.stages import LABELS

# Fields that change with the clock alone; they do not make a job "changed".
VOLATILE = frozenset({"updated_at", "elapsed_s", "eta_s", "eta_at", "velocity"})
# Fields that move with every step; a change of these alone may wait a little (tracker).
PROGRESS = frozenset({"percent", "step", "frames_done", "eta_bucket"})
_ETA_BUCKET_S = 10.0


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def volatile_free(view: JsonDict, now: float) -> JsonDict:
    """The job minus clock-driven fields, plus the ETA rounded so that drift alone is quiet."""
    key = {k: v for k, v in view.items() if k not in VOLATILE}
    eta = view.get("eta_s")
    key["eta_bucket"] = round((now + eta) / _ETA_BUCKET_S) if eta is not None else None
    return key


def render(
    *,
    job_id: str,
    row: JobRow | None,
    prompt: Prompt | None,
    state: JobState,
    queue_eta: float | None,
    stalled: JsonDict | None,
    stale: bool,
    now: float,
    first_seen: float,
) -> JsonDict:
    p = prompt
    stage = _stage(state, p)
    started = p.started_at if p else None
    finished = p.finished_at if p and state.terminal else None
    if state.terminal and finished is None:
        finished = row.updated_at if row and row.updated_at else now
    percent = _percent(state, p)
    running_eta = p.remaining(now) if p and state is JobState.RUNNING else None
    if stage is Stage.FINALIZING:
        running_eta = None
    eta = running_eta if state is JobState.RUNNING else queue_eta
    end = finished if finished is not None else now
    frames_total = (
        row.total_frames if row and row.total_frames else (p.frames_total() if p else None)
    )
    frames_done = p.frames_done if p else None
    if p is not None and p.live_frames is not None and state is JobState.RUNNING:
        frames_done = p.live_frames
    elif frames_done is None and p is not None and p.state.terminal:
        # Nothing written is 0 frames; outputs that cannot be counted are unknown.
        wrote = bool(p.output_files())
        frames_done = None if p.state is JobState.LOST or wrote else 0
    sampling = p is not None and stage is Stage.SAMPLING and state is JobState.RUNNING
    view: dict[str, Any] = {
        "id": job_id,
        "title": (row.title if row and row.title else None)
        or (f"Prompt {p.prompt_id[:8]}" if p else f"Job {job_id}"),
        "state": state.value,
        "status_raw": row.status if row else None,
        "stage": stage.value,
        "stage_label": _label(stage, state, p),
        "percent": percent,
        "step": p.step if sampling and p else None,
        "steps": p.steps if sampling and p else None,
        "node": p.node_info() if p and state is JobState.RUNNING else None,
        "frames_done": frames_done,
        "frames_total": frames_total,
        "velocity": p.velocity() if p and state is JobState.RUNNING else _no_velocity(),
        "eta_s": round(eta, 1) if eta is not None else None,
        "eta_at": iso(now + eta) if eta is not None else None,
        "queue_position": _queue_position(state, p),
        "prompt_id": p.prompt_id if p else (row.prompt_id if row else None),
        "instance": p.instance if p else None,
        "visibility": p.visibility.value if p else None,
        "error": p.error if p and state in (JobState.FAILED, JobState.CANCELED) else None,
        "outputs": p.output_files() if p else [],
        "created_at": iso(
            (row.created_at if row else None) or (p.created_at if p else None) or first_seen
        ),
        "started_at": iso(started),
        "updated_at": None,
        "finished_at": iso(finished),
        "elapsed_s": round(end - started, 1) if started is not None else None,
        "stale": stale,
        "stalled": stalled,
        "last_seen_at": iso(p.last_seen_at) if p and state is JobState.LOST else None,
        "stages": _timeline(p),
        "cached_nodes": list(p.cached_nodes) if p else [],
    }
    return view


def _stage(state: JobState, p: Prompt | None) -> Stage:
    if state is JobState.PENDING:
        return Stage.PENDING
    if state is JobState.QUEUED:
        return Stage.QUEUED
    if state.terminal:
        return Stage.DONE
    if p is not None and p.state is JobState.COMPLETED:
        return Stage.FINALIZING
    return p.stage if p is not None else Stage.PROCESSING


def _label(stage: Stage, state: JobState, p: Prompt | None) -> str:
    if state.terminal:
        return state.value.capitalize()
    if stage is Stage.PROCESSING and p is not None and p.visibility is Visibility.COARSE:
        return "Running (step detail unavailable)"
    return LABELS[stage]


def _percent(state: JobState, p: Prompt | None) -> float:
    if state is JobState.COMPLETED or (p is not None and p.state is JobState.COMPLETED):
        return 100.0
    return p.percent() if p is not None else 0.0


def _queue_position(state: JobState, p: Prompt | None) -> int | None:
    if state is JobState.RUNNING:
        return 0
    if state is JobState.QUEUED and p is not None:
        return p.queue_position
    return None


def _timeline(p: Prompt | None) -> list[JsonDict]:
    if p is None:
        return []
    return [
        {
            "stage": span.stage.value,
            "started_at": iso(span.started),
            "duration_s": round(span.ended - span.started, 3) if span.ended is not None else None,
        }
        for span in p.spans
    ]


def _no_velocity() -> dict[str, float | None]:
    return {"percent_per_min": None, "steps_per_s": None, "frames_per_s": None}
