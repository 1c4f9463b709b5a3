"""``PromptExecutor`` and ``PromptQueue`` as in ComfyUI v0.8.0 execution.py.

The executor keeps v0.8.0's ``execute``/``execute_async``/``add_message`` and, for every call it
replays, the exact guard the real code has: ``add_message`` sends when ``client_id is not None
or broadcast``; ``executing`` and ``executed`` only when ``client_id is not None``; progress,
progress_state, previews and nodes' own sends always, to ``server.client_id``. The history
result has v0.8.0's quirk: a cached output node's UI is recorded only for prompts with a
client id.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .protocol import BinaryEventTypes, supports_feature
from .script import (
    FAILURE_EVENTS,
    PREVIEW_MAX_SIZE,
    Direct,
    Executed,
    Executing,
    Hold,
    Message,
    ProgressState,
    ProgressText,
    PromptScript,
    Step,
    Tick,
)

QueueItem = tuple[Any, ...]


class ExecutionStatus(NamedTuple):
    status_str: str
    completed: bool
    messages: list[tuple[str, dict[str, Any]]]


class PromptExecutor:
    """Replays each prompt's script through v0.8.0's guards; ``hold`` serves ``Hold`` steps."""

    def __init__(
        self,
        server: Any,
        scripts: Mapping[str, PromptScript],
        hold: Callable[[str], None],
    ) -> None:
        self.server = server
        self.scripts = scripts
        self.hold = hold
        self.status_messages: list[tuple[str, dict[str, Any]]] = []
        self.success = True
        self.history_result: dict[str, Any] = {}

    def add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": self.server.clock()}
        self.status_messages.append((event, data))
        if self.server.client_id is not None or broadcast:
            self.server.send_sync(event, data, self.server.client_id)

    def execute(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        extra_data: dict[str, Any] | None = None,
        execute_outputs: list[str] | None = None,
    ) -> None:
        asyncio.run(self.execute_async(prompt, prompt_id, extra_data or {}, execute_outputs or []))

    async def execute_async(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        extra_data: dict[str, Any] | None = None,
        execute_outputs: list[str] | None = None,
    ) -> None:
        extra_data = {} if extra_data is None else extra_data
        if "client_id" in extra_data:
            self.server.client_id = extra_data["client_id"]
        else:
            self.server.client_id = None
        self.status_messages = []
        self.success = True
        ui_outputs: dict[str, dict[str, Any]] = {}
        for step in self.scripts[prompt_id].steps:
            self._replay(step, prompt_id, ui_outputs)
        self.history_result = {
            "outputs": {node: ui["output"] for node, ui in ui_outputs.items()},
            "meta": {node: ui["meta"] for node, ui in ui_outputs.items()},
        }
        self.server.last_node_id = None

    def _replay(self, step: Step, prompt_id: str, ui_outputs: dict[str, dict[str, Any]]) -> None:
        server = self.server
        match step:
            case Message(event, data, broadcast):
                self.add_message(event, data, broadcast=broadcast)
                if event in FAILURE_EVENTS:
                    self.success = False
            case Executing(node, display_node):
                if server.client_id is not None:
                    server.last_node_id = display_node
                    message = {"node": node, "display_node": display_node, "prompt_id": prompt_id}
                    server.send_sync("executing", message, server.client_id)
            case Executed(node, display_node, output, cached):
                ui = {"meta": _meta(node, display_node), "output": output}
                message = {
                    "node": node,
                    "display_node": display_node,
                    "output": output,
                    "prompt_id": prompt_id,
                }
                if cached:
                    if server.client_id is not None:
                        server.send_sync("executed", message, server.client_id)
                        if output is not None:
                            ui_outputs[node] = ui
                else:
                    ui_outputs[node] = ui
                    if server.client_id is not None:
                        server.send_sync("executed", message, server.client_id)
            case ProgressState(data):
                server.send_sync("progress_state", data, server.client_id)
            case Tick(state, progress, preview):
                self._tick(state, progress, preview, prompt_id)
            case Direct(event, data):
                server.send_sync(event, data, server.client_id)
            case ProgressText(node, text):
                server.send_progress_text(text, node, server.client_id)
            case Hold(name):
                self.hold(name)

    def _tick(
        self,
        state: dict[str, Any],
        progress: dict[str, Any],
        preview: bytes | None,
        prompt_id: str,
    ) -> None:
        """main.py hijack_progress.hook with progress.py WebUIProgressHandler.update_handler."""
        server = self.server
        server.send_sync("progress_state", state, server.client_id)
        image = None if preview is None else ("JPEG", preview, PREVIEW_MAX_SIZE)
        with_metadata = supports_feature(
            server.sockets_metadata, server.client_id, "supports_preview_metadata"
        )
        if image is not None and with_metadata:
            node = progress["node"]
            metadata = {
                "node_id": node,
                "prompt_id": prompt_id,
                "display_node_id": node,
                "parent_node_id": None,
                "real_node_id": node,
            }
            server.send_sync(
                BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA, (image, metadata), server.client_id
            )
        server.send_sync("progress", progress, server.client_id)
        if image is not None and not with_metadata:
            server.send_sync(BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, image, server.client_id)


def _meta(node: str, display_node: str) -> dict[str, Any]:
    return {
        "node_id": node,
        "display_node": display_node,
        "parent_node": None,
        "real_node_id": node,
    }


class PromptQueue:
    """Pending heap, running items and history, as in v0.8.0; ``stop`` ends a waiting ``get``."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.task_counter = 0
        self.queue: list[QueueItem] = []
        self.currently_running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.stopped = False

    def put(self, item: QueueItem) -> None:
        with self.mutex:
            heapq.heappush(self.queue, item)
            self.server.queue_updated()
            self.not_empty.notify()

    def get(self) -> tuple[QueueItem, int] | None:
        with self.not_empty:
            while not self.queue and not self.stopped:
                self.not_empty.wait()
            if self.stopped:
                return None
            item = heapq.heappop(self.queue)
            i = self.task_counter
            self.currently_running[i] = copy.deepcopy(item)
            self.task_counter += 1
            self.server.queue_updated()
            return item, i

    def stop(self) -> None:
        with self.mutex:
            self.stopped = True
            self.not_empty.notify_all()

    def task_done(
        self, item_id: int, history_result: dict[str, Any], status: ExecutionStatus
    ) -> None:
        with self.mutex:
            prompt = self.currently_running.pop(item_id)
            self.history[prompt[1]] = {
                "prompt": prompt,
                "outputs": {},
                "status": copy.deepcopy(status._asdict()),
            }
            self.history[prompt[1]].update(history_result)
            self.server.queue_updated()

    def get_current_queue_volatile(self) -> tuple[list[QueueItem], list[QueueItem]]:
        with self.mutex:
            return list(self.currently_running.values()), copy.copy(self.queue)

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            return len(self.queue) + len(self.currently_running)

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None
    ) -> dict[str, Any]:
        with self.mutex:
            if prompt_id is None:
                items = list(self.history.items())
                if max_items is not None:
                    items = items[-max_items:]
                return copy.deepcopy(dict(items))
            if prompt_id in self.history:
                return {prompt_id: copy.deepcopy(self.history[prompt_id])}
            return {}
