"""ComfyUI's ``PromptQueue``: a heap of pending prompts, the running ones, and the history.

Plain data, no I/O: the server broadcasts a ``status`` frame after each change, as
``PromptServer.queue_updated`` does. ``pending`` is the raw heap array (what ``GET /queue``
returns); order by ``number`` then prompt id to get queue positions.
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass
from typing import Any

JsonDict = dict[str, Any]
MAXIMUM_HISTORY_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class QueuedPrompt:
    number: float
    prompt_id: str
    prompt: JsonDict
    extra_data: JsonDict
    outputs: tuple[str, ...]

    def as_list(self) -> list[Any]:
        """The 5-element item ``/queue`` and ``/history`` show."""
        return [
            self.number,
            self.prompt_id,
            copy.deepcopy(self.prompt),
            dict(self.extra_data),
            list(self.outputs),
        ]


class PromptQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, str, int, QueuedPrompt]] = []
        self._sequence = 0
        self._running: dict[int, QueuedPrompt] = {}
        self._task_counter = 0
        self._history: dict[str, JsonDict] = {}

    def put(self, item: QueuedPrompt) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (item.number, item.prompt_id, self._sequence, item))

    def get(self) -> tuple[QueuedPrompt, int] | None:
        """Move the first pending prompt to running; ``None`` when nothing is pending."""
        if not self._heap:
            return None
        item = heapq.heappop(self._heap)[3]
        task_id = self._task_counter
        self._task_counter += 1
        self._running[task_id] = item
        return item, task_id

    def task_done(self, task_id: int, outcome: JsonDict) -> QueuedPrompt:
        """Store the finished prompt in history (``outcome``: outputs, status, meta)."""
        item = self._running.pop(task_id)
        if len(self._history) > MAXIMUM_HISTORY_SIZE:
            self._history.pop(next(iter(self._history)))
        self._history[item.prompt_id] = {
            "prompt": item.as_list(),
            "outputs": outcome["outputs"],
            "status": outcome["status"],
            "meta": outcome["meta"],
        }
        return item

    @property
    def remaining(self) -> int:
        return len(self._heap) + len(self._running)

    @property
    def running(self) -> list[QueuedPrompt]:
        return list(self._running.values())

    @property
    def pending(self) -> list[QueuedPrompt]:
        """Pending prompts in heap-array order (not queue order)."""
        return [entry[3] for entry in self._heap]

    def is_running(self, prompt_id: str) -> bool:
        return any(item.prompt_id == prompt_id for item in self._running.values())

    def wipe(self) -> list[QueuedPrompt]:
        """Drop every pending prompt; returns what was dropped."""
        dropped = self.pending
        self._heap = []
        return dropped

    def delete(self, prompt_id: str) -> QueuedPrompt | None:
        """Drop the pending prompt ``prompt_id``; None when it is not pending."""
        for index, entry in enumerate(self._heap):
            if entry[1] == prompt_id:
                self._heap.pop(index)
                heapq.heapify(self._heap)
                return entry[3]
        return None

    def history(self, max_items: int | None = None, offset: int = -1) -> JsonDict:
        """ComfyUI's ``get_history``: the last ``max_items`` (oldest first) or from ``offset``."""
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        out: JsonDict = {}
        for index, (prompt_id, entry) in enumerate(self._history.items()):
            if index >= offset:
                out[prompt_id] = copy.deepcopy(entry)
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def history_entry(self, prompt_id: str) -> JsonDict | None:
        entry = self._history.get(prompt_id)
        return copy.deepcopy(entry) if entry is not None else None

    @property
    def history_items(self) -> dict[str, JsonDict]:
        """The history itself, read-only by convention (for ``/api/jobs``)."""
        return self._history

    def delete_history(self, prompt_id: str) -> None:
        self._history.pop(prompt_id, None)

    def wipe_history(self) -> None:
        self._history.clear()
