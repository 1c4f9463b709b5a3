"""Which ComfyUI frames may wait, and which of those are worth passing on: sans-I/O.

While a sampler runs, ComfyUI sends a ``progress`` and a ``progress_state`` frame (and often
a preview) for every step, tens a second, and the page shows progress at most every
``progress_interval_s`` anyway. The websocket reader therefore stops reading while a node
counts its steps and reads what piled up once per interval, all at once; of such a burst only
the newest report of each kind is worth the tracker's time, since each supersedes the ones
before it. Everything else (a node starting or ending, an output, an error, the queue's
status) ends the wait and goes out at once, after the reports held before it, so the order
of what the tracker sees is the order ComfyUI sent it in.
"""

from __future__ import annotations

from typing import Any

from tower_progress.core.model import ComfyMessage

_Key = tuple[str, Any, Any]


class ProgressBurst:
    """Feed it every frame of one connection, in order; it says what to pass on now and
    whether reading may wait (``waiting``).

    A ``progress`` below its maximum starts a wait and is held as the newest of its prompt
    and node; ``progress_state`` and frames that carry no message (a preview, garbage) keep
    whatever wait is on; a ``progress_state`` during one is held too. Anything else, and a
    ``progress`` that reaches its maximum (the node ends next), releases what is held and
    ends the wait. With ``coalesce`` False (reading is not paced) every message goes on as it
    comes, and nothing is held.
    """

    def __init__(self, *, coalesce: bool = True) -> None:
        self._coalesce = coalesce
        self._held: dict[_Key, ComfyMessage] = {}
        self._sampling = False

    @property
    def waiting(self) -> bool:
        return self._sampling

    def feed(self, message: ComfyMessage | None) -> list[ComfyMessage]:
        """The messages to pass on now, in order."""
        if message is None:
            return []
        if not self._coalesce:
            return [message]
        kind = message.message["type"]
        data = message.message["data"]
        if kind == "progress":
            self._hold((kind, data.get("prompt_id"), data.get("node")), message)
            self._sampling = data["value"] < data["max"]
            return [] if self._sampling else self.drain()
        if kind == "progress_state" and self._sampling:
            self._hold((kind, data.get("prompt_id"), None), message)
            return []
        self._sampling = False
        return [*self.drain(), message]

    def drain(self) -> list[ComfyMessage]:
        """What is held, oldest first, each the newest of its kind; holds nothing after."""
        held = list(self._held.values())
        self._held.clear()
        return held

    def _hold(self, key: _Key, message: ComfyMessage) -> None:
        """Newest wins, in the place of the first of its kind since the last release."""
        self._held[key] = message
