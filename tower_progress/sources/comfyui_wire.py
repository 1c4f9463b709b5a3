"""ComfyUI's wire data, parsed and checked: websocket frames, ``/queue``, ``/history``,
``/api/jobs`` and ``/system_stats``.

Pure functions over decoded bodies: every field is checked against what ComfyUI v0.8.0 sends
(protocol §3, §4, §6), and anything else raises ``ComfyError`` or is logged and dropped, so a
malformed answer can delay a job's update but never end it wrongly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tower_progress.core.model import ComfyMessage, HistoryEntry, QueueItem, QueueSnapshot

log = logging.getLogger(__name__)

Check = Callable[[Any], bool]

_PREVIEW_IMAGE, _TEXT, _PREVIEW_WITH_METADATA = 1, 3, 4
_IMAGE_TYPES = (1, 2)


class ComfyError(Exception):
    """ComfyUI answered something we cannot use; the message says what and where, ``status``
    the HTTP status when that was the problem."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


JOBS_API_SINCE = (0, 6, 0)
_FINISHED = ("completed", "failed")


@dataclass(frozen=True, slots=True)
class FinishedJobs:
    """One page of ``GET /api/jobs?status=completed,failed``: the prompts ComfyUI holds a
    history entry for; ``complete`` when no page follows, so a prompt not listed has none."""

    ids: frozenset[str]
    complete: bool


def parse_version(body: Any) -> tuple[int, ...] | None:
    """``system.comfyui_version`` of a ``GET /system_stats`` body as numbers (``0.8.0`` is
    ``(0, 8, 0)``); None when it is missing or not a release number (a fork, a dev build)."""
    system = body.get("system") if isinstance(body, dict) else None
    if not isinstance(system, dict):
        raise ComfyError(f"/system_stats body has no system object: {body!r:.120}")
    version = system.get("comfyui_version")
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return tuple(int(part) for part in match.groups()) if match else None


def parse_finished_jobs(body: Any) -> FinishedJobs:
    """A ``GET /api/jobs?status=completed,failed`` page; anything else listed (a server that
    ignored the filter) or malformed fails it whole, as a wrong "not listed" would end a job."""
    where = "/api/jobs"
    if not isinstance(body, dict):
        raise ComfyError(f"{where} body is {type(body).__name__}, expected an object")
    jobs, pagination = body.get("jobs"), body.get("pagination")
    if not isinstance(jobs, list):
        raise ComfyError(f"{where} jobs is {type(jobs).__name__}, expected a list")
    if not isinstance(pagination, dict) or not isinstance(pagination.get("has_more"), bool):
        raise ComfyError(f"{where} pagination has no has_more flag: {pagination!r:.120}")
    ids = []
    for job in jobs:
        if (
            not isinstance(job, dict)
            or not _is_id(job.get("id"))
            or job.get("status") not in _FINISHED
        ):
            raise ComfyError(f"{where} lists a job that is not a finished one: {job!r:.200}")
        ids.append(job["id"])
    return FinishedJobs(frozenset(ids), complete=not pagination["has_more"])


def parse_queue(instance: str, body: Any) -> QueueSnapshot:
    """A ``GET /queue`` body as a snapshot; pending sorted by priority number (heap order).

    Items are read by index 0-4 (newer servers may add elements). A malformed item fails the
    whole body: a snapshot missing a prompt would make the tracker think it vanished.
    """
    if not isinstance(body, dict):
        raise ComfyError(f"/queue body is {type(body).__name__}, expected an object")

    def items(key: str) -> list[QueueItem]:
        raw = body.get(key, [])
        if not isinstance(raw, list):
            raise ComfyError(f"/queue {key} is {type(raw).__name__}, expected a list")
        parsed = []
        for entry in raw:
            if (
                not isinstance(entry, list)
                or len(entry) < 2
                or not _is_id(entry[1])
                or not _is_number(entry[0])
            ):
                raise ComfyError(f"/queue {key} has a malformed item {entry!r:.200}")
            graph = entry[2] if len(entry) > 2 and isinstance(entry[2], dict) else {}
            extra = entry[3] if len(entry) > 3 and isinstance(entry[3], dict) else {}
            client_id = extra.get("client_id")
            create_time = extra.get("create_time")
            parsed.append(
                QueueItem(
                    number=float(entry[0]),
                    prompt_id=entry[1],
                    graph=graph,
                    client_id=client_id if isinstance(client_id, str) else None,
                    create_time=float(create_time)
                    if isinstance(create_time, int | float) and not isinstance(create_time, bool)
                    else None,
                )
            )
        return sorted(parsed, key=lambda i: (i.number, i.prompt_id))

    return QueueSnapshot(instance, tuple(items("queue_running")), tuple(items("queue_pending")))


def parse_history(instance: str, prompt_id: str, body: Any) -> HistoryEntry:
    """A ``GET /history/{id}`` body; ``{}`` (unknown, unfinished or deleted) gives no entry.

    Anything else that lacks this prompt's entry, or whose entry is not laid out like
    ComfyUI's, is an error rather than "no entry": the latter would end the job.
    """
    where = f"/history/{prompt_id}"
    if not isinstance(body, dict):
        raise ComfyError(f"{where} body is {type(body).__name__}, expected an object")
    if not body:
        return HistoryEntry(instance, prompt_id, None)
    entry = body.get(prompt_id)
    if entry is None:
        raise ComfyError(f"{where} answered other prompts' entries {sorted(body)!r:.120}")
    if not isinstance(entry, dict):
        raise ComfyError(f"{where} entry is {type(entry).__name__}, expected an object")
    status = entry.get("status")
    for value, check, what in (
        (status, _is_dict, "status"),
        (entry.get("outputs"), _is_dict, "outputs"),
        (entry.get("prompt"), _is_list, "prompt"),
        (status.get("messages") if isinstance(status, dict) else None, _is_list, "messages"),
    ):
        if value is not None and not check(value):
            raise ComfyError(f"{where} {what} is {type(value).__name__}")
    return HistoryEntry(instance, prompt_id, entry)


# --- websocket frames ---------------------------------------------------------------------


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_node(value: Any) -> bool:
    return _is_id(value) or (isinstance(value, int) and not isinstance(value, bool))


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


# field -> (check, what it must be, presence): "required" present and not null, "nullable"
# present but maybe null (``executing.node`` null means the prompt ended), "optional" neither.
_Presence = Literal["required", "nullable", "optional"]
_Rule = tuple[Check, str, _Presence]
_PROMPT_ID: _Rule = (_is_id, "a non-empty string", "required")
_OPTIONAL_PROMPT_ID: _Rule = (_is_id, "a non-empty string", "optional")
_TIMESTAMP: _Rule = (_is_number, "a number", "optional")
_NODE: _Rule = (_is_node, "a node id", "required")
_OPTIONAL_NODE: _Rule = (_is_node, "a node id", "optional")
_OPTIONAL_TEXT: _Rule = (_is_str, "a string", "optional")
_NUMBER: _Rule = (_is_number, "a number", "required")
_FIELDS: dict[str, dict[str, _Rule]] = {
    "status": {"status": (_is_dict, "an object", "optional")},
    "feature_flags": {},
    "execution_start": {"prompt_id": _PROMPT_ID, "timestamp": _TIMESTAMP},
    "execution_cached": {
        "prompt_id": _PROMPT_ID,
        "nodes": (_is_list, "a list", "required"),
        "timestamp": _TIMESTAMP,
    },
    "executing": {"prompt_id": _OPTIONAL_PROMPT_ID, "node": (_is_node, "a node id", "nullable")},
    "executed": {
        "prompt_id": _PROMPT_ID,
        "node": _NODE,
        "output": (_is_dict, "an object", "optional"),
    },
    "progress": {
        "prompt_id": _OPTIONAL_PROMPT_ID,
        "node": _OPTIONAL_NODE,
        "value": _NUMBER,
        "max": _NUMBER,
    },
    "progress_state": {"prompt_id": _PROMPT_ID, "nodes": (_is_dict, "an object", "required")},
    "execution_success": {"prompt_id": _PROMPT_ID, "timestamp": _TIMESTAMP},
    "execution_error": {
        "prompt_id": _PROMPT_ID,
        "node_id": _OPTIONAL_NODE,
        "node_type": _OPTIONAL_TEXT,
        "exception_type": _OPTIONAL_TEXT,
        "exception_message": _OPTIONAL_TEXT,
        "timestamp": _TIMESTAMP,
    },
    "execution_interrupted": {
        "prompt_id": _PROMPT_ID,
        "node_id": _OPTIONAL_NODE,
        "node_type": _OPTIONAL_TEXT,
        "timestamp": _TIMESTAMP,
    },
}


def _field_problem(kind: str, data: Mapping[str, Any]) -> str | None:
    for name, (check, what, presence) in _FIELDS[kind].items():
        if name not in data:
            if presence != "optional":
                return f"no {name!r}"
            continue
        value = data[name]
        if value is None:
            if presence == "required":
                return f"{name!r} is null, expected {what}"
        elif not check(value):
            return f"{name!r} is {type(value).__name__}, expected {what}"
    return None


def parse_frame(instance: str, frame: str | bytes) -> ComfyMessage | None:
    """A websocket frame as a tracker input; None (after a log line) for anything else.

    Binary frames (previews, progress text) are never a source of progress: they are checked,
    logged and dropped. Message types we do not know (custom nodes broadcast their own) are
    dropped quietly; a known type with a missing or wrongly typed field is dropped loudly.
    """
    if isinstance(frame, bytes):
        _binary(instance, frame)
        return None
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError):
        log.warning("comfyui %s: non-JSON text frame %.120r ignored", instance, frame)
        return None
    if (
        not isinstance(message, dict)
        or not isinstance(message.get("type"), str)
        or not isinstance(message.get("data"), dict)
    ):
        log.warning("comfyui %s: frame without type/data %.120r ignored", instance, frame)
        return None
    kind, data = message["type"], message["data"]
    if kind not in _FIELDS:
        log.debug("comfyui %s: message type %r ignored", instance, kind)
        return None
    problem = _field_problem(kind, data)
    prompt_id = data.get("prompt_id")
    if problem is not None:
        log.warning(
            "comfyui %s: %s frame%s ignored: %s; frame %.200r",
            instance,
            kind,
            f" for prompt {prompt_id}" if _is_id(prompt_id) else "",
            problem,
            frame,
        )
        return None
    if prompt_id is None and kind == "executing" and data.get("node") is not None:
        log.info(
            "comfyui %s: executing node %s without a prompt id (a reconnect frame): "
            "it belongs to the running prompt",
            instance,
            data["node"],
        )
    elif prompt_id is None and kind == "progress":
        log.debug("comfyui %s: progress without a prompt id (ComfyUI before 2024)", instance)
    return ComfyMessage(instance, message)


def _binary(instance: str, frame: bytes) -> None:
    if len(frame) < 4:
        log.warning("comfyui %s: truncated binary frame of %d bytes ignored", instance, len(frame))
        return
    event = int.from_bytes(frame[:4], "big")
    problem, about = _binary_problem(event, frame[4:])
    if problem is not None:
        log.warning(
            "comfyui %s: binary event %d of %d bytes ignored: %s",
            instance,
            event,
            len(frame),
            problem,
        )
    else:
        log.debug(
            "comfyui %s: binary event %d of %d bytes%s ignored (previews are not progress)",
            instance,
            event,
            len(frame),
            about,
        )


def _binary_problem(event: int, payload: bytes) -> tuple[str | None, str]:
    """What is wrong with a binary frame's payload (or None), and whom it is about."""
    if event not in (_PREVIEW_IMAGE, _TEXT, _PREVIEW_WITH_METADATA):
        return f"unknown event type {event}", ""
    if len(payload) < 4:
        return "truncated header", ""
    head = int.from_bytes(payload[:4], "big")
    if event == _PREVIEW_IMAGE:
        return (None if head in _IMAGE_TYPES else f"unknown image type {head}"), ""
    if len(payload) < 4 + head:
        return f"declares {head} header bytes, has {len(payload) - 4}", ""
    header = payload[4 : 4 + head]
    if event == _TEXT:
        try:
            return None, f" for node {header.decode()}"
        except UnicodeDecodeError:
            return "node id is not UTF-8", ""
    try:
        metadata = json.loads(header)
    except (ValueError, RecursionError):
        return "preview metadata is not JSON", ""
    if not isinstance(metadata, dict):
        return f"preview metadata is {type(metadata).__name__}", ""
    return None, f" for prompt {metadata.get('prompt_id')} node {metadata.get('node_id')}"


# --- the source ---------------------------------------------------------------------------
