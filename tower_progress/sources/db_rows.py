"""Validation of production-jobs rows: raw column values in, a ``JobRow`` and its problems out.

The production table is not ours, so any value may be missing, NULL, out of range or of a type
we did not expect. ``validate_row`` is pure: it never raises and never drops a row that has an
id; every value it cannot use becomes None and is reported as a ``FieldProblem`` that the caller
logs once per job and field (``ProblemLog``).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from uuid import UUID

from tower_progress.core.model import JobRow

MAX_FRAMES = 100_000
# Timestamps outside [2000-01-01, 2100-01-01) are treated as absurd (this also catches
# PostgreSQL's +/-infinity, which asyncpg returns as datetime.max/min).
MIN_EPOCH = 946_684_800.0
MAX_EPOCH = 4_102_444_800.0

_VALUE_REPR_LIMIT = 80

_Reporter = Callable[[str, object, str], None]


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """A value that could not be used; ``value`` is a short repr for the log line."""

    field: str
    value: str
    reason: str


def validate_row(values: Mapping[str, object]) -> tuple[JobRow | None, tuple[FieldProblem, ...]]:
    """Turn raw values keyed by logical column name into a ``JobRow``.

    Absent keys (optional columns the table does not have) are None without a problem; NULL is
    normal for optional columns (``comfyui_job_id`` is NULL until submission) and reported only
    for ``status``. ``total_frames`` must be a whole number in 1..``MAX_FRAMES`` (0 means
    unknown and becomes None quietly). Timestamps become epoch seconds (naive ones are UTC).
    The row is None only when it has no usable id: nothing can address it.
    """
    problems: list[FieldProblem] = []

    def bad(field: str, value: object, reason: str) -> None:
        problems.append(FieldProblem(field, _short_repr(value), reason))

    job_id = _to_id(values.get("id"))
    if job_id is None:
        bad("id", values.get("id"), "no usable id; row skipped")
        return None, tuple(problems)

    status = values.get("status")
    status_value: str | None = None
    if status is None:
        bad("status", status, "NULL status")
    elif not isinstance(status, str):
        bad("status", status, "status is not text")
    elif not status.strip():
        bad("status", status, "empty status")
    else:
        status_value = status

    row = JobRow(
        id=job_id,
        status=status_value,
        prompt_id=_optional_text("comfyui_job_id", values.get("comfyui_job_id"), bad, uuid=True),
        title=_optional_text("title", values.get("title"), bad, uuid=False),
        total_frames=_frames(values.get("total_frames"), bad),
        created_at=_epoch("created_at", values.get("created_at"), bad),
        updated_at=_epoch("updated_at", values.get("updated_at"), bad),
    )
    return row, tuple(problems)


def _to_id(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int | UUID):
        return str(value)
    if isinstance(value, float | Decimal):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value == int(value) else str(value)
    return None


def _optional_text(field: str, value: object, bad: _Reporter, *, uuid: bool) -> str | None:
    if value is None:
        return None
    if uuid and isinstance(value, UUID):
        return str(value)
    if not isinstance(value, str):
        bad(field, value, "not text")
        return None
    return value if value.strip() else None


def _frames(value: object, bad: _Reporter) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        bad("total_frames", value, "not a number")
        return None
    if not math.isfinite(value) or value != int(value):
        bad("total_frames", value, "not a whole number")
        return None
    frames = int(value)
    if frames == 0:
        return None
    if frames < 0 or frames > MAX_FRAMES:
        bad("total_frames", value, f"outside 1..{MAX_FRAMES}")
        return None
    return frames


def _epoch(field: str, value: object, bad: _Reporter) -> float | None:
    if value is None:
        return None
    seconds: float
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        try:
            seconds = aware.timestamp()
        except (OverflowError, ValueError, OSError):
            bad(field, value, "not a representable time")
            return None
    elif isinstance(value, date):
        bad(field, value, "a date, not a timestamp")
        return None
    elif isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            bad(field, value, "not an ISO-8601 timestamp")
            return None
        return _epoch(field, parsed, bad)
    else:
        bad(field, value, "not a timestamp")
        return None
    if not math.isfinite(seconds) or not MIN_EPOCH <= seconds < MAX_EPOCH:
        bad(field, value, "outside 2000..2100")
        return None
    return seconds


def finite_float(value: object) -> float | None:
    """A finite int or float as float; None for anything else (bools, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _VALUE_REPR_LIMIT else text[: _VALUE_REPR_LIMIT - 3] + "..."


class ProblemLog:
    """Logs each row problem once per (job, field), remembering at most ``capacity`` of them.

    Rows are re-read on every notification and every reconcile; without this a bad value would
    be logged every 30 seconds for the life of the job.
    """

    def __init__(self, logger: logging.Logger, *, table: str, capacity: int = 10_000) -> None:
        self._logger = logger
        self._table = table
        self._capacity = capacity
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    def report(self, job_id: str | None, problems: Iterable[FieldProblem]) -> None:
        for problem in problems:
            key = (job_id or "", problem.field)
            if key in self._seen:
                self._seen.move_to_end(key)
                continue
            self._seen[key] = None
            if len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
            self._logger.warning(
                "%s: job %s: %s=%s: %s; using null",
                self._table,
                job_id if job_id is not None else "?",
                problem.field,
                problem.value,
                problem.reason,
            )
