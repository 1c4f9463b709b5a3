"""What the web layer needs from the rest of the daemon, as structural protocols.

The composition root hands in the tracker (``StateView``), the database (``HistoryView``, or
None when none is connected) and the cancel path (``Controls``); the web layer never imports
them, so it can be served and tested over any object with these methods.
"""

from __future__ import annotations

from typing import Protocol

from tower_progress.core.model import JsonDict


class StateView(Protocol):
    """The tracker's current picture; every method is synchronous and cheap."""

    def jobs(self) -> list[JsonDict]:
        """Active and recently finished jobs, each the full job JSON (DESIGN §4.1)."""
        ...

    def job(self, job_id: str) -> JsonDict | None: ...

    def resources(self) -> JsonDict | None:
        """The latest resource sample as JSON, None before the first one."""
        ...

    def sources(self) -> dict[str, JsonDict]:
        """Source name -> ``{"up": bool, "detail": str | None, "since": iso}``."""
        ...


class HistoryView(Protocol):
    """Finished jobs and progress samples from the database.

    Every method raises ``ConnectionError`` (or another ``OSError``) when the database cannot be
    reached; the API answers 503 then.
    """

    async def finished_jobs(
        self, *, limit: int, before: str | None
    ) -> tuple[list[JsonDict], str | None]:
        """Newest first: one page of at most ``limit`` jobs and the cursor of the next page.

        ``before`` is a cursor this method returned earlier; a malformed one raises
        ``ValueError`` with a message fit for the client.
        """
        ...

    async def job(self, job_id: str) -> JsonDict | None: ...

    async def samples(self, job_id: str) -> list[JsonDict]:
        """Progress over time: ``{"t": iso, "percent": float, "stage": str, "step": int|None}``."""
        ...


class Controls(Protocol):
    async def cancel(self, job_id: str) -> str:
        """Interrupt a running job or delete a waiting one; returns ``interrupted``/``deleted``.

        Raises ``LookupError`` for an unknown job and ``ValueError`` with a message for the
        client when the job cannot be canceled (finished, or not in ComfyUI).
        """
        ...


def public_sources(sources: dict[str, JsonDict]) -> dict[str, JsonDict]:
    """The fields of each source that clients see; anything else the tracker keeps stays in."""
    return {
        name: {"up": bool(s.get("up")), "detail": s.get("detail"), "since": s.get("since")}
        for name, s in sources.items()
    }
