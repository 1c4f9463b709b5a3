"""Give the watcher socket every prompt's websocket events, changing nothing for anyone else.

The mechanism was proven on a real ComfyUI v0.8.0 (see the project's comfyui-bridge-notes.md):

* Prompts with a client id: ``send_sync`` marks a message whose sid is the running prompt's owner
  (``server.client_id`` at send time). The mark is a ``str`` subclass whose value is the owner's
  id, so ComfyUI's own ``sid in self.sockets`` delivery is untouched; ``send_json`` and
  ``send_bytes``, which run in ``publish_loop``, write a marked message to the owner and then to
  each connected watcher. The watcher therefore sees exactly the owner's order.
* Prompts without a client id (only on ComfyUI versions this was checked against): the executor
  runs with a *copy* of ``extra_data`` whose client id is a random per-process sentinel, so ComfyUI
  produces the events it normally suppresses. Sends addressed to the sentinel are re-routed to
  what ComfyUI does for ``client_id=None`` plus the watchers: ``add_message(broadcast=False)``,
  ``executing`` and ``executed`` (the sends guarded by ``client_id is not None``) go to the
  watchers only; everything else is broadcast as before. The side effects of a non-None client
  id are undone: ``last_node_id`` after each ``executing``, ``client_id`` after the final
  ``executing{node: null}``, and, where the version has the quirk, the history UI of cached
  output nodes.

``send_sync`` only decides the route: it runs in whatever thread calls it and never touches a
socket. Terminal ``logs``, the handshake ``status`` and the ``feature_flags`` reply are never
copied (the last two do not pass through ``send_sync`` at all).
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

from .config import BridgeConfig

log = logging.getLogger(__name__)

NEVER_COPIED = frozenset({"logs"})
_GUARDED_SENDS = frozenset({"executing", "executed"})
_INSTALLED_ATTR = "__tower_progress_bridge__"
_ABSENT = object()


@dataclass(frozen=True)
class VersionTraits:
    """What the no-client-id part must undo on one checked ComfyUI version.

    ``cached_ui_needs_client_id``: the history result gets a cached output node's UI only when
    the prompt has a client id (v0.8.0 ``execute``, cached branch; fixed upstream later).
    """

    cached_ui_needs_client_id: bool


CHECKED_VERSIONS: Mapping[str, VersionTraits] = MappingProxyType(
    {"0.8.0": VersionTraits(cached_ui_needs_client_id=True)}
)


class BridgeError(RuntimeError):
    """The bridge cannot be installed on this server; nothing was changed."""


class _OwnerSid(str):
    """The running prompt's owner id, marked when sent: copy this message to the watchers."""

    __slots__ = ()


class _WatchersOnly(str):
    """Send this message to the watchers only. Its value is the sentinel, which no socket has."""

    __slots__ = ()


def installed_bridge(server: Any) -> Bridge | None:
    """The bridge installed on ``server``, if any, from whichever copy of this package."""
    return cast("Bridge | None", getattr(getattr(server, "send_sync", None), _INSTALLED_ATTR, None))


class Bridge:
    """Wraps one PromptServer instance and, on checked versions, the PromptExecutor class.

    ``comfyui_version`` is ``comfyui_version.__version__`` (None when unknown); prompts without a
    client id are covered only when it is in CHECKED_VERSIONS. Install once per process, at
    custom-node import time, before the prompt worker starts.
    """

    def __init__(
        self,
        server: Any,
        executor_class: type,
        config: BridgeConfig,
        comfyui_version: str | None,
    ) -> None:
        self._server = server
        self._executor_class: Any = executor_class
        self._config = config
        self._traits = CHECKED_VERSIONS.get(comfyui_version) if comfyui_version else None
        self._sentinel = "tower-progress-anon-" + secrets.token_hex(16)
        self._to_watchers = _WatchersOnly(self._sentinel)
        self._in_add_message = threading.local()
        self._started_nodes: set[str] = set()
        self._output_nodes: set[str] = set()
        self._restore: list[Callable[[], None]] = []

    @property
    def covers_prompts_without_client_id(self) -> bool:
        """Whether this ComfyUI version gets the no-client-id part."""
        return self._traits is not None

    def install(self) -> None:
        """Wrap the server's send methods (and the executor on checked versions).

        Raises BridgeError, having changed nothing, when a bridge is already installed on this
        server or ComfyUI lacks a method the mechanism relies on.
        """
        if installed_bridge(self._server) is not None:
            raise BridgeError("a tower-progress bridge is already installed on this server")
        self._check_surface()
        server = self._server
        self._patch(server, "send_sync", self._wrap_send_sync(server.send_sync))
        self._patch(server, "send_json", self._wrap_send(server.send_json))
        self._patch(server, "send_bytes", self._wrap_send(server.send_bytes))
        if self._traits is not None:
            cls = self._executor_class
            self._patch(cls, "add_message", self._wrap_add_message(cls.add_message))
            self._patch(cls, "execute_async", self._wrap_execute_async(cls.execute_async))

    def uninstall(self) -> None:
        """Put back what install replaced (valid while nothing else wrapped them since)."""
        while self._restore:
            self._restore.pop()()

    def _check_surface(self) -> None:
        missing = [
            f"PromptServer.{name}"
            for name in ("send_sync", "send_json", "send_bytes", "sockets", "client_id")
            if not hasattr(self._server, name)
        ]
        if self._traits is not None:
            missing += [
                f"PromptExecutor.{name}"
                for name in ("add_message", "execute_async")
                if not hasattr(self._executor_class, name)
            ]
        if missing:
            raise BridgeError(f"this ComfyUI has no {', '.join(missing)}")

    def _patch(self, owner: Any, name: str, replacement: object) -> None:
        """Set ``owner.name``, remembering how to put back what ``owner`` itself had."""
        previous = vars(owner).get(name, _ABSENT)
        setattr(owner, name, replacement)

        def restore() -> None:
            if previous is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, previous)

        self._restore.append(restore)

    def _wrap_send_sync(self, original: Callable[..., None]) -> Callable[..., None]:
        server = self._server
        sentinel = self._sentinel
        copy_binary = self._config.mirror_previews
        route_sentinel = self._route_sentinel
        undo_sentinel_effects = self._undo_sentinel_effects

        @functools.wraps(original)
        def send_sync(event: Any, data: Any, sid: Any = None) -> None:
            if sid is None:
                original(event, data, sid)
            elif sid == sentinel:
                original(event, data, route_sentinel(event, data))
                if event == "executing":
                    undo_sentinel_effects(data)
            elif (
                isinstance(sid, str)
                and sid == server.client_id
                and (copy_binary or not isinstance(event, int))
                and event not in NEVER_COPIED
            ):
                original(event, data, _OwnerSid(sid))
            else:
                original(event, data, sid)

        setattr(send_sync, _INSTALLED_ATTR, self)
        return send_sync

    def _route_sentinel(self, event: Any, data: Any) -> str | None:
        """Where ComfyUI would send this with ``client_id=None``, the watchers added."""
        broadcast = getattr(self._in_add_message, "broadcast", None)
        if broadcast is not None:
            return None if broadcast else self._to_watchers
        if event not in _GUARDED_SENDS:
            return None
        node = data.get("node") if isinstance(data, dict) else None
        if node is not None:
            (self._started_nodes if event == "executing" else self._output_nodes).add(node)
        return self._to_watchers

    def _undo_sentinel_effects(self, data: Any) -> None:
        self._server.last_node_id = None
        if isinstance(data, dict) and data.get("node") is None:
            self._server.client_id = None

    def _watchers(self, owner: str | None) -> list[str]:
        """Connected watcher sids other than ``owner``; runs in publish_loop only."""
        sockets = self._server.sockets
        config = self._config
        if config.match == "exact":
            watcher = config.client_id
            return [watcher] if watcher != owner and watcher in sockets else []
        return [sid for sid in list(sockets) if sid != owner and config.is_watcher(sid)]

    def _wrap_send(
        self, original: Callable[..., Awaitable[None]]
    ) -> Callable[..., Awaitable[None]]:
        watchers = self._watchers

        @functools.wraps(original)
        async def send(event: Any, data: Any, sid: Any = None) -> None:
            kind = type(sid)
            if kind is _OwnerSid:
                owner = str(sid)
                await original(event, data, owner)
                for watcher in watchers(owner):
                    await original(event, data, watcher)
            elif kind is _WatchersOnly:
                for watcher in watchers(None):
                    await original(event, data, watcher)
            else:
                await original(event, data, sid)

        return send

    def _wrap_add_message(self, original: Callable[..., Any]) -> Callable[..., Any]:
        in_add_message = self._in_add_message

        @functools.wraps(original)
        def add_message(
            executor: Any, event: Any, data: Any, broadcast: Any, *args: Any, **kwargs: Any
        ) -> Any:
            in_add_message.broadcast = bool(broadcast)
            try:
                return original(executor, event, data, broadcast, *args, **kwargs)
            finally:
                in_add_message.broadcast = None

        return add_message

    def _wrap_execute_async(
        self, original: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        bridge = self

        @functools.wraps(original)
        async def execute_async(
            executor: Any,
            prompt: Any,
            prompt_id: Any,
            extra_data: Any = None,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            given = {} if extra_data is None else extra_data
            if given.get("client_id") is not None:
                return await original(executor, prompt, prompt_id, given, *args, **kwargs)
            with_sentinel = {**given, "client_id": bridge._sentinel}
            bridge._started_nodes.clear()
            bridge._output_nodes.clear()
            try:
                result = await original(executor, prompt, prompt_id, with_sentinel, *args, **kwargs)
                bridge._correct_history(executor, prompt_id)
                return result
            except BaseException:
                bridge._server.client_id = None
                raise
            finally:
                bridge._started_nodes.clear()
                bridge._output_nodes.clear()

        return execute_async

    def _correct_history(self, executor: Any, prompt_id: Any) -> None:
        """Drop cached output nodes' UI, which ComfyUI records only for prompts with a client id.

        A cached node gets ``executed`` without ``executing``.
        """
        if self._traits is None or not self._traits.cached_ui_needs_client_id:
            return
        cached = self._output_nodes - self._started_nodes
        result = getattr(executor, "history_result", None)
        if not cached or not isinstance(result, dict):
            return
        for section in ("outputs", "meta"):
            entries = result.get(section)
            if isinstance(entries, dict):
                for node in cached:
                    entries.pop(node, None)
        log.debug("prompt %s: left cached nodes %s out of history", prompt_id, sorted(cached))
