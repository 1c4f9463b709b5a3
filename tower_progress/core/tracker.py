"""The only place that decides what a job is: folds observations into jobs, returns events.

A job is a production_jobs row, a ComfyUI prompt, or both joined by the row's
``comfyui_job_id``. ``apply`` is deterministic in its inputs (``now`` is passed in), idempotent
(the same observation twice emits nothing the second time), and never moves a job backwards:
terminal states are latched and percent only grows while running.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tower_progress.core.eta import expected_duration, stage_prior
from tower_progress.core.job_view import PROGRESS, iso, render, volatile_free
from tower_progress.core.model import (
    ComfyMessage,
    Event,
    HistoryEntry,
    JobChanged,
    JobFinished,
    JobRemoved,
    JobRow,
    JobState,
    JsonDict,
    Milestone,
    Observation,
    QueueItem,
    QueueSnapshot,
    ResourceSample,
    ResourcesChanged,
    RowDeleted,
    SourceChanged,
    SourceStatus,
    Tick,
    Visibility,
)
from tower_progress.core.prompt import Prompt
from tower_progress.core.status import StatusMap

log = logging.getLogger(__name__)

MILESTONES = (25, 50, 75, 90)
# A prompt first seen on the websocket is only "gone" once a /queue taken this much later
# lacks it: a /queue request already in flight may predate the prompt.
_SNAPSHOT_GRACE_S = 3.0
# ComfyUI messages that only report how far a node is.
_PROGRESS_KINDS = frozenset({"progress", "progress_state"})
# How many prompts ComfyUI must still hold after a reconnect are asked about (one answer
# proves it did not restart; all of them gone prove it did).
_WITNESSES = 3
# The share of progress_interval_s by which an update may come early and still go out.
_SLACK = 0.1


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """What the tracker must know of a ComfyUI instance to judge visibility."""

    client_id: str | None = None
    bridge: bool = False


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    instances: Mapping[str, InstanceConfig] = field(
        default_factory=lambda: {"local": InstanceConfig()}
    )
    status_map: StatusMap = field(default_factory=StatusMap)
    finished_cap: int = 500
    stall_factor: float = 5.0
    stall_min_s: float = 20.0
    gpu_idle_percent: float = 10.0
    priors_per_workflow: int = 20
    resources_stale_s: float | None = None
    """With no resource sample for this long the ``resources`` source reads as down (stale),
    until samples come again; None never."""
    progress_interval_s: float = 0.0
    """A change of progress alone (percent, step, frames) is emitted at most this often per
    job; anything else at once. What is held back goes out with the next change or tick."""
    let_go_cap: int = 10_000
    """Finished jobs remembered after the cap let them go, so that the reconcile query's
    unchanged copy of their row does not bring them back (more than it returns at once)."""
    finish_grace_s: float = 0.0
    """A row marked completed while ComfyUI still reports its prompt in full as running keeps
    the job running this long, for ComfyUI's last events (decoding, saving, outputs) that the
    production system's update may overtake; then the row's verdict stands regardless."""


@dataclass
class _Instance:
    """``witnesses`` are asked about after a reconnect to tell a blip from a restart, which
    decides the fate of the ``in_flight`` prompts (those known when the connection came back)."""

    up: bool = False
    running: str | None = None
    snapshot_at: float | None = None
    snapshot_ids: frozenset[str] = frozenset()
    witnesses: set[str] = field(default_factory=set)
    in_flight: frozenset[str] = frozenset()


@dataclass
class Job:
    id: str
    row: JobRow | None = None
    prompt_id: str | None = None
    first_seen: float = 0.0
    final: JobState | None = None
    milestones: set[int] = field(default_factory=set)
    last_key: JsonDict | None = None
    last_view: JsonDict | None = None
    updated_at: float = 0.0
    row_ended_at: float | None = None


class Tracker:
    def __init__(
        self,
        config: TrackerConfig | None = None,
        priors: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
    ) -> None:
        self._config = config or TrackerConfig()
        self._jobs: dict[str, Job] = {}
        self._prompts: dict[str, Prompt] = {}
        self._prompt_job: dict[str, str] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._let_go: OrderedDict[str, int] = OrderedDict()
        self._instances = {name: _Instance() for name in self._config.instances}
        keep = self._config.priors_per_workflow
        self._runs: dict[str, list[Mapping[str, float]]] = {
            fp: list(runs)[:keep] for fp, runs in (priors or {}).items()
        }
        self._seconds_per_cost: list[float] = []
        self._resources: ResourceSample | None = None
        self._resources_at: float | None = None
        self._resources_late = False
        self._sampler_status = SourceStatus(_RESOURCES, True)
        self._resources_view: JsonDict | None = None
        self._sources: dict[str, JsonDict] = {}

    # --- read side (the web layer's StateView) --------------------------------------------

    def jobs(self) -> list[JsonDict]:
        return [job.last_view for job in self._jobs.values() if job.last_view is not None]

    def job(self, job_id: str) -> JsonDict | None:
        job = self._jobs.get(job_id)
        return job.last_view if job else None

    def resources(self) -> JsonDict | None:
        return self._resources_view

    def sources(self) -> dict[str, JsonDict]:
        return dict(self._sources)

    def prompt_target(self, job_id: str) -> tuple[str, str, JobState] | None:
        """(instance, prompt_id, ComfyUI-side state) of a job's prompt, for cancel."""
        job = self._jobs.get(job_id)
        prompt = self._prompts.get(job.prompt_id) if job and job.prompt_id else None
        if job is None or prompt is None:
            return None
        return prompt.instance, prompt.prompt_id, prompt.state

    def unresolved_prompts(self, instance: str, now: float) -> list[str]:
        """Prompts whose outcome must be read from ``/history`` after a ``/queue`` snapshot.

        Active prompts of this instance missing from the latest snapshot, and prompt ids of
        rows that ComfyUI has not shown yet (a short prompt can start and end between polls).
        After a reconnect, the witnesses come first, whatever their state: their answers tell
        whether the prompts that vanished meanwhile were deleted or wiped by a restart.
        """
        inst = self._instances.get(instance)
        if inst is None or inst.snapshot_at is None:
            return []
        wanted = sorted(inst.witnesses - inst.snapshot_ids)
        for job in self._jobs.values():
            if job.final is not None or job.prompt_id is None:
                continue
            prompt = self._prompts.get(job.prompt_id)
            if prompt is None:
                wanted.append(job.prompt_id)
            elif (
                prompt.instance == instance
                and not prompt.state.terminal
                and prompt.prompt_id not in inst.snapshot_ids
                and (prompt.in_snapshot or inst.snapshot_at - prompt.first_seen > _SNAPSHOT_GRACE_S)
            ):
                wanted.append(prompt.prompt_id)
        return list(dict.fromkeys(wanted))

    def needs_polling(self, instance: str) -> bool:
        """Whether ``/queue`` must be polled often: this instance has a prompt in flight that
        its websocket does not report in full, a row names a prompt no instance has shown
        yet, or witnesses of a reconnect are still unanswered. Prompts seen in full need no
        polling: their events arrive, and every change of the queue comes with a ``status``
        frame."""
        inst = self._instances.get(instance)
        if inst is not None and inst.witnesses:
            return True
        for job in self._jobs.values():
            if job.final is None and job.prompt_id and job.prompt_id not in self._prompts:
                return True
        return any(
            p.instance == instance and not p.state.terminal and p.visibility is not Visibility.FULL
            for p in self._prompts.values()
        )

    # --- write side ------------------------------------------------------------------------

    def apply(self, observation: Observation, now: float) -> list[Event]:
        """Fold one observation taken at ``now`` (epoch seconds); return what changed."""
        touched: list[str] = []
        events: list[Event] = []
        match observation:
            case JobRow():
                touched = self._row(observation, now, events)
            case RowDeleted(id=job_id):
                if job_id in self._jobs:
                    self._drop(job_id, events)
            case ComfyMessage():
                touched = self._message(observation, now)
            case QueueSnapshot():
                touched = self._snapshot(observation, now)
            case HistoryEntry():
                touched = self._history(observation, now)
            case ResourceSample():
                self._resources = observation
                self._resources_at = now
                if self._resources_late:
                    self._resources_late = False
                    self._source(self._sampler_status, now, events)
                view = _resources_view(observation)
                if view != self._resources_view:
                    self._resources_view = view
                    events.append(ResourcesChanged(view))
            case SourceStatus():
                if observation.name == _RESOURCES:
                    self._sampler_status = observation
                    self._resources_late = False
                touched = self._source(observation, now, events)
            case Tick():
                self._check_resources(now, events)
                touched = [j.id for j in self._jobs.values() if j.final is None]
        for job_id in dict.fromkeys(touched):
            self._emit(job_id, now, events)
        return events

    # --- rows ------------------------------------------------------------------------------

    def _row(self, row: JobRow, now: float, events: list[Event]) -> list[str]:
        job = self._jobs.get(row.id)
        if job is None:
            if self._let_go.pop(row.id, None) == hash(row):
                self._let_go[row.id] = hash(row)
                return []
            job = self._jobs[row.id] = Job(row.id, first_seen=now)
        self._config.status_map.check(row.status, row.id)
        touched = [row.id]
        if job.prompt_id != row.prompt_id:
            if job.prompt_id is not None and self._prompt_job.get(job.prompt_id) == row.id:
                del self._prompt_job[job.prompt_id]
            job.prompt_id = row.prompt_id
            if row.prompt_id is not None:
                other = self._prompt_job.get(row.prompt_id)
                self._prompt_job[row.prompt_id] = row.id
                if other is not None and other != row.id and other.startswith("comfy:"):
                    self._drop(other, events)
        job.row = row
        row_state = self._config.status_map.state(row.status)
        if row_state is None or not row_state.terminal:
            job.row_ended_at = None
        elif job.row_ended_at is None:
            job.row_ended_at = now
        return touched

    # --- ComfyUI ---------------------------------------------------------------------------

    def _prompt(self, instance: str, prompt_id: str, now: float) -> Prompt:
        prompt = self._prompts.get(prompt_id)
        if prompt is None:
            prompt = Prompt(prompt_id, instance, first_seen=now)
            self._prompts[prompt_id] = prompt
        if prompt_id not in self._prompt_job:
            job_id = f"comfy:{prompt_id}"
            self._jobs[job_id] = Job(job_id, prompt_id=prompt_id, first_seen=now)
            self._prompt_job[prompt_id] = job_id
        prompt.last_seen_at = now
        return prompt

    def _instance_config(self, instance: str) -> InstanceConfig:
        return self._config.instances.get(instance, InstanceConfig())

    def _prior(self, fingerprint: str) -> Mapping[str, float] | None:
        runs = self._runs.get(fingerprint)
        if not runs:
            return None
        try:
            return stage_prior(runs)
        except ValueError as exc:
            log.warning("workflow %s: ignoring unusable history (%s)", fingerprint, exc)
            self._runs.pop(fingerprint)
            return None

    def _message(self, obs: ComfyMessage, now: float) -> list[str]:
        message = obs.message
        kind = message.get("type")
        data = message.get("data")
        if not isinstance(kind, str) or not isinstance(data, Mapping):
            return []
        inst = self._instances.setdefault(obs.instance, _Instance())
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            if kind not in ("executing", "progress") or inst.running is None:
                return []
            prompt_id = inst.running
        prompt = self._prompt(obs.instance, prompt_id, now)
        if kind in (
            "execution_start",
            "execution_cached",
            "executing",
            "executed",
            "execution_success",
            "execution_error",
        ):
            prompt.visibility = Visibility.FULL
        elif prompt.visibility is Visibility.COARSE and kind in ("progress", "progress_state"):
            prompt.visibility = Visibility.PARTIAL
        node = data.get("node")
        if node is not None and (isinstance(node, bool) or not isinstance(node, str | int)):
            log.warning(
                "comfyui %s: %s with a node id of type %s ignored",
                obs.instance,
                kind,
                type(node).__name__,
            )
            return []
        node = None if node is None else str(node)
        before = prompt.progress_marks() if kind in _PROGRESS_KINDS else None
        if kind == "execution_start":
            inst.running = prompt_id
            prompt.mark_running(now, _ms(data.get("timestamp")))
        elif kind == "execution_cached":
            prompt.mark_running(now)
            prompt.cached(data.get("nodes"))
        elif kind == "executing":
            if node is None:
                if inst.running == prompt_id:
                    inst.running = None
                prompt.executing(None, now)
            else:
                inst.running = prompt_id
                prompt.executing(node, now)
        elif kind == "progress":
            value, maximum = _number(data.get("value")), _number(data.get("max"))
            if value is not None and maximum is not None:
                prompt.progress(node, value, maximum, now)
        elif kind == "progress_state":
            inst.running = prompt_id if not prompt.state.terminal else inst.running
            prompt.progress_state(data.get("nodes"), now)
        elif kind == "executed":
            prompt.executed(node, data.get("output"))
        elif kind == "execution_success":
            prompt.finish(JobState.COMPLETED, now, _ms(data.get("timestamp")))
        elif kind == "execution_error":
            if data.get("exception_type") != "ExecutionBlocked":
                prompt.fail(data, JobState.FAILED, now)
        elif kind == "execution_interrupted":
            prompt.fail(data, JobState.CANCELED, now)
        job_id = self._prompt_job[prompt_id]
        if before is not None and self._quiet_progress(job_id, before, prompt, now):
            return []
        return [job_id]

    def _quiet_progress(
        self, job_id: str, before: tuple[tuple[object, ...], ...], prompt: Prompt, now: float
    ) -> bool:
        """A progress frame not worth rendering the job for: it changed nothing (ComfyUI
        sends ``progress`` and ``progress_state`` for each step), or it only moved the job
        along within ``progress_interval_s`` of its last update and the job is not flagged
        stalled. What it held goes out with the next frame or ``Tick``."""
        job = self._jobs[job_id]
        if job.last_view is None:
            return False
        after = prompt.progress_marks()
        if after == before:
            return True
        return (
            after[0] == before[0]
            and job.last_view["stalled"] is None
            and self._within_interval(job, now)
        )

    def _snapshot(self, snap: QueueSnapshot, now: float) -> list[str]:
        inst = self._instances.setdefault(snap.instance, _Instance())
        inst.snapshot_at = now
        inst.snapshot_ids = frozenset(i.prompt_id for i in (*snap.running, *snap.pending))
        if inst.witnesses & inst.snapshot_ids:
            self._not_restarted(snap.instance, inst, min(inst.witnesses & inst.snapshot_ids))
        touched: list[str] = []
        for position, item in enumerate((*snap.running, *snap.pending)):
            prompt = self._prompt(snap.instance, item.prompt_id, now)
            self._adopt(prompt, item, now)
            prompt.in_snapshot = True
            if position < len(snap.running):
                prompt.mark_running(now)
            elif not prompt.state.terminal and prompt.state is not JobState.RUNNING:
                prompt.queue_position = position - len(snap.running) + 1
            touched.append(self._prompt_job[item.prompt_id])
        if not snap.running and inst.running is not None and inst.running not in inst.snapshot_ids:
            inst.running = None
        touched.extend(
            self._prompt_job[p.prompt_id]
            for p in self._prompts.values()
            if p.instance == snap.instance and p.state is JobState.QUEUED
        )
        return touched

    def _adopt(self, prompt: Prompt, item: QueueItem, now: float) -> None:
        prompt.number = item.number
        prompt.created_at = prompt.created_at or _ms(item.create_time)
        if prompt.workflow is None:
            prompt.client_id = item.client_id
            config = self._instance_config(prompt.instance)
            # The bridge copies every owner's messages on any ComfyUI; those of a prompt
            # without a client id only on versions it was checked against, which then shows
            # as full from its first node event.
            if prompt.visibility is not Visibility.FULL:
                if item.client_id and (config.bridge or item.client_id == config.client_id):
                    prompt.visibility = Visibility.FULL
                elif item.client_id is None:
                    prompt.visibility = Visibility.PARTIAL
            prompt.set_graph(item.graph, self._prior, now)

    def _history(self, obs: HistoryEntry, now: float) -> list[str]:
        inst = self._instances.get(obs.instance)
        touched: list[str] = []
        if inst is not None and inst.snapshot_at is not None and obs.prompt_id in inst.witnesses:
            if obs.entry is not None:
                self._not_restarted(obs.instance, inst, obs.prompt_id)
            else:
                inst.witnesses.discard(obs.prompt_id)
                if not inst.witnesses:
                    touched = self._restarted(obs.instance, inst, now)
        if obs.entry is not None:
            found = self._prompt(obs.instance, obs.prompt_id, now)
            found.history(obs.entry, self._prior, now)
            return [self._prompt_job[obs.prompt_id]]
        prompt = self._prompts.get(obs.prompt_id)
        if prompt is None or inst is None or prompt.state.terminal:
            return touched
        if prompt.prompt_id in inst.snapshot_ids:
            return touched
        if prompt.state is JobState.RUNNING:
            log.warning("prompt %s vanished from ComfyUI %s: lost", obs.prompt_id, obs.instance)
            prompt.finish(JobState.LOST, now, prompt.last_seen_at)
        elif inst.witnesses and prompt.prompt_id in inst.in_flight:
            return touched
        else:
            log.info("prompt %s left the queue of %s unrun: canceled", obs.prompt_id, obs.instance)
            prompt.finish(JobState.CANCELED, now)
        return [*touched, self._prompt_job[obs.prompt_id]]

    def _doubt(self, instance: str, inst: _Instance) -> None:
        """Back after a drop: a network blip or a restart (which wipes queue and history)?

        The witnesses are the prompts ComfyUI must still hold unless it restarted: the latest
        ones it started (running, or in its history since), never a lost one. With none, a
        vanished prompt is judged as before (deleted unless it was running).
        """
        mine = [p for p in self._prompts.values() if p.instance == instance]
        started = sorted(
            (p for p in mine if p.started_at is not None and p.state is not JobState.LOST),
            key=lambda p: (p.last_seen_at or 0.0, p.prompt_id),
            reverse=True,
        )
        inst.witnesses = {p.prompt_id for p in started[:_WITNESSES]}
        inst.in_flight |= {p.prompt_id for p in mine if not p.state.terminal}
        inst.snapshot_at = None

    def _not_restarted(self, instance: str, inst: _Instance, witness: str) -> None:
        log.info(
            "ComfyUI %s still holds prompt %s after the reconnect: no restart", instance, witness
        )
        inst.witnesses.clear()
        inst.in_flight = frozenset()

    def _restarted(self, instance: str, inst: _Instance, now: float) -> list[str]:
        """Every prompt in flight at the reconnect that the restarted ComfyUI lacks is lost."""
        log.warning("ComfyUI %s restarted: none of the prompts it held is there any more", instance)
        touched = []
        for prompt_id in sorted(inst.in_flight - inst.snapshot_ids):
            prompt = self._prompts.get(prompt_id)
            if prompt is None or prompt.state.terminal:
                continue
            log.warning("prompt %s vanished from ComfyUI %s: lost", prompt_id, instance)
            prompt.finish(JobState.LOST, now, prompt.last_seen_at)
            touched.append(self._prompt_job[prompt_id])
        inst.in_flight = frozenset()
        return touched

    # --- sources ---------------------------------------------------------------------------

    def _source(self, status: SourceStatus, now: float, events: list[Event]) -> list[str]:
        previous = self._sources.get(status.name)
        if previous is None or previous["up"] != status.up or previous["detail"] != status.detail:
            same = previous is not None and previous["up"] == status.up
            since = previous["since"] if previous is not None and same else iso(now)
            self._sources[status.name] = {"up": status.up, "detail": status.detail, "since": since}
            events.append(SourceChanged(status.name, status.up, status.detail))
        if status.name.startswith("comfyui:"):
            inst = self._instances.setdefault(status.name.removeprefix("comfyui:"), _Instance())
            if status.up and not inst.up:
                self._doubt(status.name.removeprefix("comfyui:"), inst)
            inst.up = status.up
        return [j.id for j in self._jobs.values() if j.final is None]

    def _check_resources(self, now: float, events: list[Event]) -> None:
        """Mark the sampler stale once its samples stop (a stuck thread, a starved loop)."""
        limit, last = self._config.resources_stale_s, self._resources_at
        if limit is None or last is None or self._resources_late or now - last <= limit:
            return
        self._resources_late = True
        detail = f"stale: no sample for {now - last:.0f} s"
        self._source(SourceStatus(_RESOURCES, False, detail), now, events)

    # --- emission --------------------------------------------------------------------------

    def _emit(self, job_id: str, now: float, events: list[Event]) -> None:
        job = self._jobs[job_id]
        prompt = self._prompts.get(job.prompt_id) if job.prompt_id else None
        state = job.final or self._state(job, prompt, now)
        stalled = self._stalled(prompt, state, now)
        stale = not state.terminal and self._stale(job, prompt)
        view = render(
            job_id=job.id,
            row=job.row,
            prompt=prompt,
            state=state,
            queue_eta=self._queue_eta(prompt, now),
            stalled=stalled,
            stale=stale,
            now=now,
            first_seen=job.first_seen,
        )
        key = volatile_free(view, now)
        if key == job.last_key or self._too_soon(job, key, now):
            return
        job.updated_at = now
        view["updated_at"] = iso(now)
        job.last_key, job.last_view = key, view
        events.append(JobChanged(view))
        percent = view["percent"]
        for mark in MILESTONES:
            if percent >= mark and mark not in job.milestones and not state.terminal:
                job.milestones.add(mark)
                events.append(Milestone(job.id, mark, state.value))
        if state.terminal and job.final is None:
            job.final = state
            events.append(
                Milestone(job.id, 100 if state is JobState.COMPLETED else int(percent), state.value)
            )
            self._finished_job(job, prompt, view, events)

    def _too_soon(self, job: Job, key: JsonDict, now: float) -> bool:
        """A progress-only change within ``progress_interval_s`` of the last emitted one (a
        wall clock stepped back does not hold it)."""
        last = job.last_key
        if last is None or not self._within_interval(job, now):
            return False
        return all(key[k] == last[k] for k in key if k not in PROGRESS)

    def _within_interval(self, job: Job, now: float) -> bool:
        """Whether ``now`` is too soon after the job's last update for progress alone. Within
        ``_SLACK`` of a whole interval counts as one, so that progress arriving once per
        interval (as from a reader paced to it) is never held back by a hair of jitter."""
        interval = self._config.progress_interval_s
        return 0 <= now - job.updated_at < interval * (1 - _SLACK)

    def _state(self, job: Job, prompt: Prompt | None, now: float) -> JobState:
        row_state = self._config.status_map.state(job.row.status) if job.row else None
        if row_state is JobState.COMPLETED and self._finishing(job, prompt, now):
            return JobState.RUNNING
        if row_state is not None and row_state.terminal:
            return row_state
        if prompt is None:
            return JobState.FAILED if row_state is JobState.FAILED else JobState.PENDING
        if prompt.state is JobState.COMPLETED and job.row is not None:
            return JobState.RUNNING
        return prompt.state

    def _finishing(self, job: Job, prompt: Prompt | None, now: float) -> bool:
        """Whether ComfyUI's tail of a job its row calls completed is still worth waiting for:
        its prompt runs, reported in full by an instance that is up, within the grace."""
        if prompt is None or prompt.state is not JobState.RUNNING or job.row_ended_at is None:
            return False
        inst = self._instances.get(prompt.instance)
        return (
            prompt.visibility is Visibility.FULL
            and inst is not None
            and inst.up
            and 0 <= now - job.row_ended_at < self._config.finish_grace_s
        )

    def _stale(self, job: Job, prompt: Prompt | None) -> bool:
        if prompt is not None and not prompt.state.terminal:
            inst = self._instances.get(prompt.instance)
            known = f"comfyui:{prompt.instance}" in self._sources
            return inst is not None and not inst.up and known
        if job.row is not None and "database" in self._sources:
            return not self._sources["database"]["up"]
        return False

    def _stalled(self, prompt: Prompt | None, state: JobState, now: float) -> JsonDict | None:
        if prompt is None or state is not JobState.RUNNING or prompt.last_progress is None:
            return None
        gap = prompt.expected_gap()
        if gap is None:
            return None
        limit = max(self._config.stall_factor * gap, self._config.stall_min_s)
        if now - prompt.last_progress <= limit:
            return None
        gpu = None
        if self._resources is not None and self._resources.gpus:
            utilization = self._resources.gpus[0].utilization
            if utilization is not None and utilization < self._config.gpu_idle_percent:
                gpu = utilization
        return {"since": iso(prompt.last_progress), "gpu_utilization": gpu}

    def _queue_eta(self, prompt: Prompt | None, now: float) -> float | None:
        """Seconds until a queued prompt should finish: the running remainder plus the jobs
        ahead and its own expected duration; None when any of them is unknown."""
        if prompt is None or prompt.state is not JobState.QUEUED or prompt.queue_position is None:
            return None
        same = [p for p in self._prompts.values() if p.instance == prompt.instance]
        running = [p for p in same if p.state is JobState.RUNNING]
        total = 0.0
        for p in running:
            remaining = p.remaining(now)
            if remaining is None:
                return None
            total += remaining
        ahead = sorted(
            (
                p
                for p in same
                if p.state is JobState.QUEUED
                and p.queue_position is not None
                and p.queue_position <= prompt.queue_position
            ),
            key=lambda p: p.queue_position or 0,
        )
        for p in ahead:
            expected = self._expected(p)
            if expected is None:
                return None
            total += expected
        return total

    def _expected(self, prompt: Prompt) -> float | None:
        """The prior of this workflow, else its cost at the median pace of recent jobs."""
        if prompt.prior:
            return expected_duration(prompt.prior)
        if not self._seconds_per_cost or prompt.workflow is None:
            return None
        ordered = sorted(self._seconds_per_cost)
        return ordered[len(ordered) // 2] * prompt.workflow.cost

    def _finished_job(
        self, job: Job, prompt: Prompt | None, view: JsonDict, events: list[Event]
    ) -> None:
        fingerprint = prompt.workflow.fingerprint if prompt and prompt.workflow else None
        seconds = prompt.stage_seconds() if prompt else {}
        if job.final is JobState.COMPLETED and prompt is not None:
            if fingerprint and seconds:
                runs = self._runs.setdefault(fingerprint, [])
                runs.insert(0, seconds)
                del runs[self._config.priors_per_workflow :]
            if prompt.started_at is not None and prompt.finished_at and prompt.workflow:
                duration = prompt.finished_at - prompt.started_at
                self._seconds_per_cost.append(duration / prompt.workflow.cost)
                del self._seconds_per_cost[:-50]
        events.append(JobFinished(view, fingerprint, seconds, witnessed=prompt is not None))
        self._finished[job.id] = None
        while len(self._finished) > self._config.finished_cap:
            oldest, _ = self._finished.popitem(last=False)
            row = self._jobs[oldest].row
            self._drop(oldest, events)
            if row is not None:
                self._let_go[oldest] = hash(row)
                while len(self._let_go) > self._config.let_go_cap:
                    self._let_go.popitem(last=False)

    def _drop(self, job_id: str, events: list[Event]) -> None:
        job = self._jobs.pop(job_id)
        self._finished.pop(job_id, None)
        if job.prompt_id is not None and self._prompt_job.get(job.prompt_id) == job_id:
            del self._prompt_job[job.prompt_id]
            prompt = self._prompts.get(job.prompt_id)
            # A row deleted while its prompt runs leaves the prompt to become its own job; a
            # finished job let go takes its prompt along, even one ComfyUI has not ended yet
            # (the production system said it was done first).
            if (
                prompt is None
                or prompt.state.terminal
                or job.final is not None
                or job_id.startswith("comfy:")
            ):
                self._prompts.pop(job.prompt_id, None)
        events.append(JobRemoved(job_id))


_RESOURCES = "resources"


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _ms(value: Any) -> float | None:
    number = _number(value)
    return number / 1000.0 if number is not None and number > 0 else None


def _resources_view(sample: ResourceSample) -> JsonDict:
    return asdict(sample)
