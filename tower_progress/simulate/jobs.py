"""``/api/jobs`` (ComfyUI v0.6.0+, ``comfy_execution/jobs.py``): queue and history as job dicts.

Status is ``pending``, ``in_progress``, ``completed`` or ``failed``; ``failed`` covers errors
and interrupts alike. Keys whose value is None are left out, as ComfyUI prunes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tower_progress.simulate.prompt_queue import QueuedPrompt

JsonDict = dict[str, Any]
STATUSES = ("pending", "in_progress", "completed", "failed")
SORT_KEYS = ("created_at", "execution_duration")
_PREVIEWABLE = frozenset({"images", "video", "audio"})
_THREE_D = (".obj", ".fbx", ".gltf", ".glb")


class JobQueryError(ValueError):
    """A query parameter of ``GET /api/jobs`` is not acceptable; the message says which."""


@dataclass(frozen=True, slots=True)
class JobQuery:
    statuses: tuple[str, ...] = STATUSES
    sort_by: str = "created_at"
    descending: bool = True
    limit: int | None = None
    offset: int = 0
    workflow_id: str | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> JobQuery:
        statuses: tuple[str, ...] = STATUSES
        if query.get("status"):
            statuses = tuple(s.strip() for s in query["status"].split(",") if s.strip())
            unknown = [s for s in statuses if s not in STATUSES]
            if unknown:
                raise JobQueryError(f"Invalid status {unknown[0]!r}: use {', '.join(STATUSES)}")
        sort_by = query.get("sort_by", "created_at")
        if sort_by not in SORT_KEYS:
            raise JobQueryError(f"Invalid sort_by {sort_by!r}: use {', '.join(SORT_KEYS)}")
        order = query.get("sort_order", "desc")
        if order not in ("asc", "desc"):
            raise JobQueryError(f"Invalid sort_order {order!r}: use asc or desc")
        return cls(
            statuses=statuses,
            sort_by=sort_by,
            descending=order == "desc",
            limit=_non_negative(query, "limit"),
            offset=_non_negative(query, "offset") or 0,
            workflow_id=query.get("workflow_id") or None,
        )


def _non_negative(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise JobQueryError(f"Invalid {name} {raw!r}: must be an integer") from None
    if value < 0:
        raise JobQueryError(f"Invalid {name} {raw!r}: must not be negative")
    return value


def _pruned(values: JsonDict) -> JsonDict:
    return {key: value for key, value in values.items() if value is not None}


def _workflow_id(extra_data: JsonDict) -> str | None:
    workflow = extra_data.get("extra_pnginfo", {}).get("workflow", {})
    value = workflow.get("id") if isinstance(workflow, dict) else None
    return value if isinstance(value, str) else None


def queued_job(item: QueuedPrompt, status: str) -> JsonDict:
    return _pruned(
        {
            "id": item.prompt_id,
            "status": status,
            "priority": item.number,
            "create_time": item.extra_data.get("create_time"),
            "outputs_count": 0,
            "workflow_id": _workflow_id(item.extra_data),
        }
    )


def history_job(prompt_id: str, entry: JsonDict, *, full: bool) -> JsonDict:
    number, _, prompt, extra_data, _ = entry["prompt"][:5]
    status_info = entry.get("status") or {}
    start = end = error = None
    for event, data in status_info.get("messages", []):
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if event == "execution_error":
                error = data
    count, preview = outputs_summary(entry.get("outputs", {}))
    job = _pruned(
        {
            "id": prompt_id,
            "status": "failed" if status_info.get("status_str") == "error" else "completed",
            "priority": number,
            "create_time": extra_data.get("create_time"),
            "execution_start_time": start,
            "execution_end_time": end,
            "execution_error": error,
            "outputs_count": count,
            "preview_output": preview,
            "workflow_id": _workflow_id(extra_data),
        }
    )
    if full:
        job["outputs"] = entry.get("outputs", {})
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def outputs_summary(outputs: JsonDict) -> tuple[int, JsonDict | None]:
    """How many output files there are, and the one the frontend would preview."""
    count = 0
    preview: JsonDict | None = None
    fallback: JsonDict | None = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if preview is None and _previewable(media_type, item):
                    enriched = {**item, "nodeId": node_id, "mediaType": media_type}
                    if item.get("type") == "output":
                        preview = enriched
                    elif fallback is None:
                        fallback = enriched
    return count, preview or fallback


def _previewable(media_type: str, item: JsonDict) -> bool:
    fmt = str(item.get("format", ""))
    filename = str(item.get("filename", "")).lower()
    return (
        media_type in _PREVIEWABLE
        or fmt.startswith(("video/", "audio/"))
        or filename.endswith(_THREE_D)
    )


def find_job(
    prompt_id: str,
    running: Iterable[QueuedPrompt],
    pending: Iterable[QueuedPrompt],
    history: Mapping[str, JsonDict],
) -> JsonDict | None:
    if prompt_id in history:
        return history_job(prompt_id, history[prompt_id], full=True)
    for item in running:
        if item.prompt_id == prompt_id:
            return queued_job(item, "in_progress")
    for item in pending:
        if item.prompt_id == prompt_id:
            return queued_job(item, "pending")
    return None


def list_jobs(
    query: JobQuery,
    running: Iterable[QueuedPrompt],
    pending: Iterable[QueuedPrompt],
    history: Mapping[str, JsonDict],
) -> JsonDict:
    """The ``GET /api/jobs`` body: filtered, sorted, paginated jobs."""
    jobs: list[JsonDict] = []
    if "in_progress" in query.statuses:
        jobs += [queued_job(item, "in_progress") for item in running]
    if "pending" in query.statuses:
        jobs += [queued_job(item, "pending") for item in pending]
    for prompt_id, entry in history.items():
        failed = (entry.get("status") or {}).get("status_str") == "error"
        if ("failed" if failed else "completed") in query.statuses:
            jobs.append(history_job(prompt_id, entry, full=False))
    if query.workflow_id:
        jobs = [job for job in jobs if job.get("workflow_id") == query.workflow_id]

    def sort_key(job: JsonDict) -> float:
        if query.sort_by == "execution_duration":
            start, end = job.get("execution_start_time"), job.get("execution_end_time")
            return float(end - start) if start and end else 0.0
        return float(job.get("create_time", 0))

    jobs.sort(key=sort_key, reverse=query.descending)
    total = len(jobs)
    page = jobs[query.offset :]
    if query.limit is not None:
        page = page[: query.limit]
    return {
        "jobs": page,
        "pagination": {
            "offset": query.offset,
            "limit": query.limit,
            "total": total,
            "has_more": query.offset + len(page) < total,
        },
    }
