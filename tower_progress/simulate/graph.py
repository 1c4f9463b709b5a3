"""Graph mechanics of a ComfyUI prompt: cache signatures and execution order.

``cache_keys`` gives every node a signature of its class, its widget values and (recursively)
its ancestors, like ComfyUI's ``CacheKeySetInputSignature``: two nodes with the same key
compute the same thing, whatever their ids. ``ExecutionOrder`` reproduces
``comfy_execution.graph.ExecutionList``: nodes are staged from the output nodes backwards,
cached nodes are never staged, and among the ready nodes an output node is picked first, then
one that unblocks an output, then one two steps from an output, else the first staged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

JsonDict = dict[str, Any]


def is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def cache_keys(prompt: JsonDict) -> dict[str, str]:
    """Node id -> signature for every node of ``prompt`` (broken links give unique keys)."""
    keys: dict[str, str] = {}
    visiting: set[str] = set()

    def key(node_id: str) -> str:
        known = keys.get(node_id)
        if known is not None:
            return known
        node = prompt.get(node_id)
        if not isinstance(node, dict) or node_id in visiting:
            return f"unresolvable:{node_id}"
        visiting.add(node_id)
        parts: list[Any] = [node.get("class_type")]
        inputs = node.get("inputs", {})
        for name in sorted(inputs):
            value = inputs[name]
            if is_link(value):
                parts.append([name, "link", key(value[0]), value[1]])
            else:
                parts.append([name, value])
        visiting.discard(node_id)
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
        keys[node_id] = digest.hexdigest()
        return keys[node_id]

    for node_id in prompt:
        key(node_id)
    return keys


class DependencyCycleError(Exception):
    """Nodes are left but none is ready: the graph has a cycle through ``node_id``."""

    def __init__(self, node_id: str, message: str) -> None:
        super().__init__(message)
        self.node_id = node_id


class ExecutionOrder:
    """Which node runs next; see the module docstring for the picking rule."""

    def __init__(
        self,
        prompt: JsonDict,
        *,
        is_cached: Callable[[str], bool],
        is_output: Callable[[str], bool],
    ) -> None:
        self._prompt = prompt
        self._is_cached = is_cached
        self._is_output = is_output
        self._pending: dict[str, None] = {}
        self._block_count: dict[str, int] = {}
        self._blocking: dict[str, dict[str, None]] = {}

    def add_outputs(self, outputs: Iterable[str]) -> None:
        for output in outputs:
            self._add(output)

    def _add(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, str]] = []
        while stack:
            current = stack.pop()
            if current in self._pending:
                continue
            self._pending[current] = None
            self._block_count[current] = 0
            self._blocking[current] = {}
            for value in self._prompt[current].get("inputs", {}).values():
                if is_link(value):
                    source = value[0]
                    if not self._is_cached(source):
                        stack.append(source)
                    links.append((source, current))
        for source, target in links:
            if self._is_cached(source):
                continue
            self._add(source)
            if target not in self._blocking[source]:
                self._blocking[source][target] = None
                self._block_count[target] += 1

    def __bool__(self) -> bool:
        return bool(self._pending)

    def next(self) -> str:
        ready = [node for node in self._pending if self._block_count[node] == 0]
        if not ready:
            first = next(iter(self._pending))
            raise DependencyCycleError(first, f"Dependency cycle detected at node {first}")
        for node in ready:
            if self._is_output(node):
                return node
        for node in ready:
            if any(self._is_output(blocked) for blocked in self._blocking[node]):
                return node
        for node in ready:
            for blocked in self._blocking[node]:
                if any(self._is_output(further) for further in self._blocking[blocked]):
                    return node
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self._pending[node_id]
        for blocked in self._blocking.pop(node_id):
            self._block_count[blocked] -= 1
