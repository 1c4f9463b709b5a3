"""``prompt_worker`` as in ComfyUI v0.8.0 main.py: one thread runs the queued prompts in turn.

After each prompt it stores the history (``task_done``) and then, only for a prompt with a
client id, sends the final ``executing{node: null}``. ``on_done`` is the stand-in's addition:
it tells the test harness, from the worker thread, that a prompt's last send was made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .execution import ExecutionStatus, PromptExecutor, PromptQueue


def prompt_worker(
    q: PromptQueue,
    server_instance: Any,
    executor: PromptExecutor,
    on_done: Callable[[str], None],
) -> None:
    """Run prompts until the queue is stopped."""
    while (queue_item := q.get()) is not None:
        item, item_id = queue_item
        prompt_id = item[1]
        server_instance.last_prompt_id = prompt_id
        executor.execute(item[2], prompt_id, item[3], item[4])
        q.task_done(
            item_id,
            executor.history_result,
            status=ExecutionStatus(
                status_str="success" if executor.success else "error",
                completed=executor.success,
                messages=executor.status_messages,
            ),
        )
        if server_instance.client_id is not None:
            server_instance.send_sync(
                "executing", {"node": None, "prompt_id": prompt_id}, server_instance.client_id
            )
        on_done(prompt_id)
