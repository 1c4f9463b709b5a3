"""Plain data shared by every layer: job states and stages, observations in, events out.

Observations are what the sources saw; events are what the tracker decided. Both are frozen
dataclasses over plain values, so the core can be driven from tests without any I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

JsonDict = dict[str, Any]


class JobState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    LOST = "lost"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELED, JobState.LOST})


class Stage(StrEnum):
    """Where a job is in its pipeline; the order of members is the canonical pipeline order."""

    PENDING = "pending"
    QUEUED = "queued"
    LOADING = "loading"
    PREPARING = "preparing"
    SAMPLING = "sampling"
    DECODING = "decoding"
    ENCODING = "encoding"
    PROCESSING = "processing"
    FINALIZING = "finalizing"
    DONE = "done"


class Visibility(StrEnum):
    """How much of a job's ComfyUI stream the daemon can see (DESIGN §5)."""

    FULL = "full"
    PARTIAL = "partial"
    COARSE = "coarse"


# --- observations -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRow:
    """One row of the production jobs table, already validated: bad values are None."""

    id: str
    status: str | None
    prompt_id: str | None = None
    title: str | None = None
    total_frames: int | None = None
    created_at: float | None = None
    updated_at: float | None = None


@dataclass(frozen=True, slots=True)
class RowDeleted:
    id: str


@dataclass(frozen=True, slots=True)
class ComfyMessage:
    """One text frame from a ComfyUI websocket, as the raw ``{"type", "data"}`` dict."""

    instance: str
    message: JsonDict


@dataclass(frozen=True, slots=True)
class QueueItem:
    number: float
    prompt_id: str
    graph: JsonDict
    client_id: str | None
    create_time: float | None = None


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """A parsed ``GET /queue``: ``pending`` is sorted by priority number (queue order)."""

    instance: str
    running: tuple[QueueItem, ...]
    pending: tuple[QueueItem, ...]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """A ``GET /history/{id}`` answer; ``entry`` is None when ComfyUI answered ``{}``."""

    instance: str
    prompt_id: str
    entry: JsonDict | None


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    name: str
    utilization: float | None = None
    memory_utilization: float | None = None
    vram_used: int | None = None
    vram_total: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    fan_percent: float | None = None
    comfyui_vram: int | None = None


@dataclass(frozen=True, slots=True)
class ResourceSample:
    cpu_percent: float | None = None
    ram_used: int | None = None
    ram_total: int | None = None
    comfyui_cpu_percent: float | None = None
    comfyui_rss: int | None = None
    gpus: tuple[GpuSample, ...] = ()
    gpu_status: str = "no GPU"


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """A source went up or down; ``name`` is ``database``, ``resources`` or ``comfyui:<name>``."""

    name: str
    up: bool
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed with no input: lets the tracker notice stalls."""


Observation = (
    JobRow
    | RowDeleted
    | ComfyMessage
    | QueueSnapshot
    | HistoryEntry
    | ResourceSample
    | SourceStatus
    | Tick
)


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobChanged:
    job: JsonDict


@dataclass(frozen=True, slots=True)
class JobRemoved:
    id: str


@dataclass(frozen=True, slots=True)
class Milestone:
    id: str
    percent: int
    state: str


@dataclass(frozen=True, slots=True)
class ResourcesChanged:
    resources: JsonDict


@dataclass(frozen=True, slots=True)
class SourceChanged:
    name: str
    up: bool
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class JobFinished:
    """A job reached a terminal state; carries what history needs to learn ETA priors.

    ``stage_seconds`` maps stage name to seconds spent in it (cached nodes excluded).
    ``witnessed`` is False for a row that was already terminal when the tracker first saw it
    with no ComfyUI prompt (after a restart, say): its view knows less than history may.
    """

    job: JsonDict
    fingerprint: str | None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    witnessed: bool = True


Event = JobChanged | JobRemoved | Milestone | ResourcesChanged | SourceChanged | JobFinished
