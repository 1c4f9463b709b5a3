"""History entries: what ``History`` buffers, built and checked from plain values (pure).

Everything that can be wrong with a sample or a finished job is found here, before the entry
is buffered, so the database only ever sees values it accepts.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tower_progress.core.model import JobFinished
from tower_progress.sources.db_rows import finite_float

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Sample:
    job_id: str
    t: datetime
    percent: float | None
    stage: str | None
    step: int | None


@dataclass(frozen=True, slots=True)
class Finished:
    job_id: str
    fingerprint: str | None
    stage_seconds: tuple[tuple[str, float], ...]
    title: str | None
    state: str
    started_at: datetime | None
    finished_at: datetime
    duration_s: float | None
    instance: str | None
    prompt_id: str | None
    error: str | None
    job: str
    witnessed: bool = True


Entry = Sample | Finished


def make_sample(
    job_id: object, t: object, percent: object, stage: object, step: object
) -> Sample | str:
    """A ``Sample`` (``t`` in epoch seconds), or a one-line reason it cannot be stored."""
    if not isinstance(job_id, str) or not job_id:
        return "no job id"
    when = to_datetime(t) if not isinstance(t, str) else None
    if when is None:
        return f"bad time {t!r}"
    pct = finite_float(percent)
    if percent is not None and pct is None:
        return f"bad percent {percent!r}"
    if stage is not None and not isinstance(stage, str):
        return f"bad stage {stage!r}"
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        return f"bad step {step!r}"
    return Sample(job_id, when, pct, stage, step)


def make_finished(event: JobFinished, now: float) -> tuple[Finished | None, list[str]]:
    """A ``Finished`` from the event (``now`` stands in for a missing ``finished_at``).

    Returns the entry (None when the job has no id) and the problems found; a stage with bad
    seconds is left out, the rest kept.
    """
    job = event.job
    job_id = job.get("id")
    if not isinstance(job_id, str) or not job_id:
        return None, [f"finished job without an id: {_short(repr(job))}"]
    problems = []
    finished_at = to_datetime(job.get("finished_at")) or datetime.fromtimestamp(now, UTC)
    started_at = to_datetime(job.get("started_at"))
    duration = finite_float(job.get("elapsed_s"))
    if duration is None and started_at is not None:
        duration = (finished_at - started_at).total_seconds()
    stages: list[tuple[str, float]] = []
    for stage, seconds in event.stage_seconds.items():
        value = finite_float(seconds)
        if value is None or value < 0:
            problems.append(f"stage {stage} has bad seconds {seconds!r}")
        else:
            stages.append((stage, value))
    error = job.get("error")
    entry = Finished(
        job_id=job_id,
        fingerprint=event.fingerprint,
        stage_seconds=tuple(stages),
        title=_text(job.get("title")),
        state=_text(job.get("state")) or "unknown",
        started_at=started_at,
        finished_at=finished_at,
        duration_s=duration,
        instance=_text(job.get("instance")),
        prompt_id=_text(job.get("prompt_id")),
        error=None if error is None else json.dumps(error, default=str),
        job=json.dumps(job, default=str),
        witnessed=event.witnessed,
    )
    return entry, problems


def encode_cursor(finished_at: datetime, job_id: str) -> str:
    """Opaque keyset cursor: the exact (finished_at, job_id) of the last row shown."""
    micros = (finished_at - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}:{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of ``encode_cursor``; ``ValueError`` for anything it did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        micros, job_id = raw.split(":", 1)
        return _EPOCH + timedelta(microseconds=int(micros)), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise ValueError(f"invalid cursor {cursor[:40]!r}") from exc


def to_datetime(value: object) -> datetime | None:
    """ISO-8601 text or epoch seconds to an aware datetime (naive is UTC); None otherwise."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    seconds = finite_float(value)
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."
