"""What the stand-in executor replays: the calls a real v0.8.0 execution made for one prompt.

Each step is one call the real code makes from the worker thread; the executor applies v0.8.0's
own guards and routing to it, so the same script yields what ComfyUI would send for a prompt
with a client id, without one, or with a bridge installed. ``load_recording`` derives scripts
from a real recording: the submitter of a prompt with a client id received every send the
execution made, in order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ADD_MESSAGE_EVENTS = frozenset(
    {
        "execution_start",
        "execution_cached",
        "execution_success",
        "execution_error",
        "execution_interrupted",
    }
)
FAILURE_EVENTS = frozenset({"execution_error", "execution_interrupted"})
PREVIEW_MAX_SIZE = 512
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "comfyui"
SCRIPTED_RECORDINGS = (
    "success_single",
    "success_anim16",
    "rerun_cached",
    "error_node",
    "interrupt_sampling",
    "queue_three",
)
"""Recordings whose every prompt has a client id, so that its owner saw the whole execution."""


@dataclass(frozen=True)
class Message:
    """``PromptExecutor.add_message(event, data, broadcast)``; data without its timestamp."""

    event: str
    data: dict[str, Any]
    broadcast: bool


@dataclass(frozen=True)
class Executing:
    """``execute``: a node starts (sent only when ``client_id is not None``)."""

    node: str
    display_node: str


@dataclass(frozen=True)
class Executed:
    """``execute``: a node's UI output; ``cached`` is the cached-output branch."""

    node: str
    display_node: str
    output: Any
    cached: bool


@dataclass(frozen=True)
class ProgressState:
    """``WebUIProgressHandler._send_progress_state`` outside a progress tick."""

    data: dict[str, Any]


@dataclass(frozen=True)
class Tick:
    """``hijack_progress.hook``: progress_state, [event 4], progress, [event 1]."""

    state: dict[str, Any]
    progress: dict[str, Any]
    preview: bytes | None = None


@dataclass(frozen=True)
class Direct:
    """A node's own ``server.send_sync(event, data, server.client_id)``."""

    event: str
    data: Any


@dataclass(frozen=True)
class ProgressText:
    """A node's ``server.send_progress_text(text, node, server.client_id)``."""

    node: str
    text: str


@dataclass(frozen=True)
class Hold:
    """Test-only: the worker stops here until the harness releases it."""

    name: str


Step = Message | Executing | Executed | ProgressState | Tick | Direct | ProgressText | Hold


@dataclass(frozen=True)
class PromptScript:
    """One prompt: its id, graph, output nodes and the calls its execution makes."""

    prompt_id: str
    graph: dict[str, Any]
    outputs: tuple[str, ...]
    steps: tuple[Step, ...]

    def with_hold(self, name: str, before: int) -> PromptScript:
        """A copy that holds the worker before step ``before``."""
        steps = (*self.steps[:before], Hold(name), *self.steps[before:])
        return replace(self, steps=steps)

    def index_of(self, step_type: type, occurrence: int = 0) -> int:
        """Position of the ``occurrence``-th step of ``step_type``."""
        positions = [i for i, step in enumerate(self.steps) if isinstance(step, step_type)]
        return positions[occurrence]


@dataclass(frozen=True)
class RecordedFrame:
    """One frame a recorded socket received: parsed JSON, or a binary summary."""

    text: dict[str, Any] | None = None
    binary: dict[str, Any] | None = None


@dataclass(frozen=True)
class RecordedPost:
    """An accepted POST /prompt: the prompt id, its graph and the client id it was sent with."""

    prompt_id: str
    graph: dict[str, Any]
    client_id: str | None


@dataclass(frozen=True)
class Recording:
    """A recording's clients, accepted prompts, frames per role and final history entries."""

    name: str
    client_ids: dict[str, str | None]
    feature_flags: dict[str, bool]
    posts: tuple[RecordedPost, ...]
    frames: dict[str, list[RecordedFrame]]
    history: dict[str, dict[str, Any]]

    def submissions(self) -> list[tuple[PromptScript, str | None]]:
        """Each prompt as a script, with the client id it was submitted under.

        The owner's socket received every send the execution made, so its frames are the
        script. Raises ValueError for a prompt without an owner socket (submitted without a
        client id) or for frames that v0.8.0 cannot have produced.
        """
        submissions = []
        for post in self.posts:
            role = next(
                (
                    r
                    for r, cid in self.client_ids.items()
                    if cid is not None and cid == post.client_id
                ),
                None,
            )
            if role is None:
                raise ValueError(
                    f"{self.name}: prompt {post.prompt_id} has no recorded owner socket"
                )
            frames = _prompt_frames(self.frames[role], post.prompt_id)
            steps = _steps(self.name, post.prompt_id, frames)
            outputs = tuple(self.history[post.prompt_id]["prompt"][4])
            submissions.append(
                (PromptScript(post.prompt_id, post.graph, outputs, steps), post.client_id)
            )
        return submissions


def preview_image(seed: str, length: int) -> bytes:
    """Deterministic stand-in for an encoded preview of ``length`` bytes."""
    return hashlib.shake_256(seed.encode()).digest(length)


def load_recording(path: Path) -> Recording:
    """Parse a recording file (format: tests/fixtures/comfyui/README.md)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    header = rows[0]["msg"]
    client_ids: dict[str, str | None] = dict(header["clients"])
    frames: dict[str, list[RecordedFrame]] = {role: [] for role in client_ids}
    posts: list[RecordedPost] = []
    history: dict[str, dict[str, Any]] = {}
    for row in rows[1:]:
        if row["dir"] == "ws":
            frames.setdefault(row["client"], []).append(_recorded_frame(row))
        elif row["dir"] == "http" and row["status"] == 200:
            if row["method"] == "POST" and row["path"] == "/prompt":
                request = row["req"]
                posts.append(
                    RecordedPost(
                        row["body"]["prompt_id"], request["prompt"], request.get("client_id")
                    )
                )
            elif row["path"].startswith("/history/") and row["body"]:
                history.update(row["body"])
    return Recording(
        name=path.stem,
        client_ids=client_ids,
        feature_flags=dict(header["feature_flags_sent"]),
        posts=tuple(posts),
        frames=frames,
        history=history,
    )


def _recorded_frame(row: dict[str, Any]) -> RecordedFrame:
    if row["kind"] == "text":
        return RecordedFrame(text=row["msg"])
    return RecordedFrame(binary=row["msg"])


def _prompt_frames(frames: list[RecordedFrame], prompt_id: str) -> list[RecordedFrame]:
    """The owner's frames of one prompt, without status frames and the final executing."""
    selected: list[RecordedFrame] = []
    current: str | None = None
    for frame in frames:
        if frame.text is not None:
            data = frame.text["data"]
            current = data.get("prompt_id", current) if isinstance(data, dict) else current
            if frame.text["type"] in ("status", "feature_flags") or current != prompt_id:
                continue
            if frame.text["type"] == "executing" and data["node"] is None:
                continue
        elif current != prompt_id:
            continue
        selected.append(frame)
    return selected


def _steps(name: str, prompt_id: str, frames: list[RecordedFrame]) -> tuple[Step, ...]:
    steps: list[Step] = []
    started: set[str] = set()
    i = 0
    while i < len(frames):
        message = frames[i].text
        if message is None:
            raise ValueError(f"{name}: binary frame outside a progress tick at {i}")
        kind, data = message["type"], message["data"]
        i += 1
        if kind in ADD_MESSAGE_EVENTS:
            body = {key: value for key, value in data.items() if key != "timestamp"}
            steps.append(Message(kind, body, broadcast=kind == "execution_interrupted"))
        elif kind == "executing":
            started.add(data["node"])
            steps.append(Executing(data["node"], data["display_node"]))
        elif kind == "executed":
            cached = data["node"] not in started
            steps.append(Executed(data["node"], data["display_node"], data["output"], cached))
        elif kind == "progress_state":
            tick, i = _tick(name, prompt_id, data, frames, i)
            steps.append(tick if tick is not None else ProgressState(data))
        else:
            raise ValueError(f"{name}: unexpected {kind!r} from the executor")
    return tuple(steps)


def _tick(
    name: str, prompt_id: str, state: dict[str, Any], frames: list[RecordedFrame], i: int
) -> tuple[Tick | None, int]:
    """A tick starting after ``state``, or None when no progress frame follows it."""
    preview_length: int | None = None
    if i < len(frames) and frames[i].binary is not None:
        binary = frames[i].binary
        assert binary is not None
        if binary["event"] != 4:
            raise ValueError(f"{name}: event {binary['event']} before a progress frame")
        preview_length = binary["image_bytes"]
        i += 1
    following = frames[i].text if i < len(frames) else None
    if following is None or following["type"] != "progress":
        if preview_length is not None:
            raise ValueError(f"{name}: preview without a progress frame")
        return None, i
    progress = following["data"]
    i += 1
    if i < len(frames) and frames[i].binary is not None:
        binary = frames[i].binary
        assert binary is not None
        if binary["event"] != 1:
            raise ValueError(f"{name}: event {binary['event']} after a progress frame")
        preview_length = binary["bytes"] - 8
        i += 1
    preview = None
    if preview_length is not None:
        preview = preview_image(
            f"{prompt_id}:{progress['node']}:{progress['value']}", preview_length
        )
    return Tick(state, progress, preview), i


def binary_summary(frame: bytes) -> dict[str, Any]:
    """A binary frame as the recordings summarise it: event, format, length, image size (and
    event 4's metadata)."""
    event = int.from_bytes(frame[0:4], "big")
    second = int.from_bytes(frame[4:8], "big")
    summary: dict[str, Any] = {
        "event": event,
        "format": second,
        "bytes": len(frame),
    }
    if event == 1:
        summary["image_bytes"] = len(frame) - 8
    elif event == 4:
        summary["metadata"] = json.loads(frame[8 : 8 + second])
        summary["image_bytes"] = len(frame) - 8 - second
    return summary
