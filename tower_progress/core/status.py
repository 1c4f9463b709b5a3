"""The production system's own status strings, mapped onto job states through a table.

The table is configurable; an unknown status is kept verbatim on the job (``status_raw``) and
logged once per distinct string, never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tower_progress.core.model import JobState

log = logging.getLogger(__name__)

DEFAULT_STATUS_MAP: Mapping[str, JobState] = {
    "pending": JobState.PENDING,
    "new": JobState.PENDING,
    "created": JobState.PENDING,
    "waiting": JobState.PENDING,
    "queued": JobState.QUEUED,
    "submitted": JobState.QUEUED,
    "scheduled": JobState.QUEUED,
    "processing": JobState.RUNNING,
    "rendering": JobState.RUNNING,
    "running": JobState.RUNNING,
    "started": JobState.RUNNING,
    "in_progress": JobState.RUNNING,
    "done": JobState.COMPLETED,
    "completed": JobState.COMPLETED,
    "complete": JobState.COMPLETED,
    "success": JobState.COMPLETED,
    "succeeded": JobState.COMPLETED,
    "finished": JobState.COMPLETED,
    "error": JobState.FAILED,
    "failed": JobState.FAILED,
    "failure": JobState.FAILED,
    "cancelled": JobState.CANCELED,
    "canceled": JobState.CANCELED,
    "aborted": JobState.CANCELED,
}


class StatusMap:
    """Case-insensitive status → state lookup; extra entries override the defaults."""

    def __init__(self, extra: Mapping[str, JobState] | None = None) -> None:
        self._map = {k.lower(): v for k, v in {**DEFAULT_STATUS_MAP, **(extra or {})}.items()}
        self._unknown: set[str] = set()

    def state(self, status: str | None) -> JobState | None:
        return self._map.get(status.strip().lower()) if status else None

    def check(self, status: str | None, job_id: str) -> None:
        """Log an unknown status the first time it is seen."""
        if status and self.state(status) is None and status not in self._unknown:
            self._unknown.add(status)
            log.warning("job %s: unknown production status %r kept verbatim", job_id, status)

    def terminal_statuses(self) -> list[str]:
        return sorted(k for k, v in self._map.items() if v.terminal)
