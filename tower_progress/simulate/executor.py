"""Runs one prompt the way ComfyUI v0.8.0's ``PromptExecutor.execute_async`` does.

Messages and their routing follow ``execution.py``, ``main.py`` and ``comfy_execution/
progress.py``: ``execution_start`` and ``execution_cached`` first; per node a
``progress_state`` marking it running, ``executing`` (only with a client id), the node's
progress ticks (``progress_state``, binary event 4, ``progress``, binary event 1), an
``executed`` for nodes with UI output, and a ``progress_state`` marking it finished; then
``execution_success``, or ``execution_error``/``execution_interrupted``. Prompts without a
client id broadcast progress, ``progress_state``, legacy previews and interrupts, and send
nothing else. ``execute_async``, ``add_message`` and ``history_result`` keep ComfyUI's names
and signatures, and every send reads the owner from ``server.client_id`` at send time, so the
tower-progress bridge wraps them as it wraps the real ones.

Nodes do no real work: each class's ``Behaviour`` sleeps for a cost derived from ``Timing``
(model loads once per model then cached, sampler steps scaled by latent size with jitter,
decode/encode proportional to frames) and passes shapes along (latents, image counts), so
frame counts and output files come out as a real run's would. Three inputs that a real
ComfyUI ignores act as fault knobs: ``fail`` (any node raises RuntimeError),
``fail_at_frame`` (a decoder runs out of GPU memory at that frame) and ``preview_every``
(a sampler previews every n-th step).
"""

from __future__ import annotations

import asyncio
import random
import string
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tower_progress.simulate.catalog import MODEL_FILE, NODES, Behaviour, NodeSpec
from tower_progress.simulate.graph import (
    DependencyCycleError,
    ExecutionOrder,
    cache_keys,
    is_link,
)
from tower_progress.simulate.media import (
    PREVIEW_IMAGE,
    PREVIEW_IMAGE_WITH_METADATA,
    preview_jpeg,
    preview_payload,
    preview_payload_with_metadata,
)

JsonDict = dict[str, Any]
Result = Literal["completed", "failed", "interrupted"]

_EXECUTION_FRAMES = (
    '  File "ComfyUI/execution.py", line 518, in execute\n'
    "    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data("
    "prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, "
    "pre_execute_cb=pre_execute_cb, v3_data=v3_data)\n",
    '  File "ComfyUI/execution.py", line 329, in get_output_data\n'
    "    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, "
    "input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb="
    "execution_block_cb, pre_execute_cb=pre_execute_cb, v3_data=v3_data)\n",
    '  File "ComfyUI/execution.py", line 303, in _async_map_node_over_list\n'
    "    await process_inputs(input_dict, i)\n",
    '  File "ComfyUI/execution.py", line 291, in process_inputs\n    result = f(**inputs)\n',
)
_OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked "
    "before you might have accidentally set the batch_size to a large number."
)
_VIDEO_LATENT_FACTORS = {"EmptyHunyuanLatentVideo": 4}
_OUTPUT_DIR = "/opt/ComfyUI/output"


class Server(Protocol):
    """What the executor uses of ``PromptServer``: the running prompt's owner and node (which
    the websocket handshake reads for the reconnect ``executing`` frame) and the ordered
    message queue."""

    client_id: str | None
    last_node_id: str | None

    def send_sync(self, event: str | int, data: Any, sid: str | None = None) -> None: ...

    def supports_preview_metadata(self, sid: str | None) -> bool: ...


@dataclass(slots=True)
class RunState:
    """``model_management``'s interrupt flag: ``POST /interrupt`` sets it, the executor clears
    it when a prompt starts and checks it at each step and node."""

    interrupted: bool = False


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds for the unit costs, all multiplied by ``speed``."""

    speed: float = 1.0
    step_seconds: float = 0.05
    load_seconds: float = 0.5
    frame_seconds: float = 0.01


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the prompt ended and the history fields ``outputs``, ``status``, ``meta``."""

    result: Result
    history: JsonDict


@dataclass(frozen=True, slots=True)
class Resource:
    """A model, CLIP, VAE or conditioning: only its kind and name matter here."""

    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Latent:
    width: int
    height: int
    batch: int
    frames: int = 1  # latent frames
    temporal_factor: int = 1

    @property
    def decoded_frames(self) -> int:
        return self.batch * ((self.frames - 1) * self.temporal_factor + 1)


@dataclass(frozen=True, slots=True)
class Images:
    count: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class _Cached:
    outputs: tuple[Any, ...]
    ui: JsonDict | None


class _Interrupted(Exception):
    pass


class _NodeFailure(Exception):
    """A node raised: ``exception_type`` as ComfyUI's ``full_type_name`` would name it."""

    def __init__(self, exception_type: str, message: str, frames: list[str]) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message
        self.frames = frames


class _SimulatedError(Exception):
    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


@dataclass(slots=True)
class _Run:
    prompt_id: str
    prompt: JsonDict
    previews: bool
    progress: dict[str, JsonDict] = field(default_factory=dict)
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    outputs: JsonDict = field(default_factory=dict)
    meta: JsonDict = field(default_factory=dict)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _full_type_name(exc: BaseException) -> str:
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _pixel_scale(width: int, height: int) -> float:
    return max(0.25, width * height / (512 * 512))


class PromptExecutor:
    """Executes prompts one at a time; keeps the node cache, loaded models and file counters.

    ``cached_ui_needs_client_id``: v0.8.0's quirk, a cached output node's UI reaches the
    history only for a prompt with a client id (bridge notes §4).
    """

    def __init__(
        self,
        *,
        timing: Timing,
        rng: random.Random,
        server: Server,
        state: RunState,
        progress_state: bool,
        cached_ui_needs_client_id: bool,
        previews_for: Callable[[JsonDict], bool],
    ) -> None:
        self._timing = timing
        self._rng = rng
        self._server = server
        self._state = state
        self._progress_state = progress_state
        self._cached_ui_needs_client_id = cached_ui_needs_client_id
        self._previews_for = previews_for
        self._cache: dict[str, _Cached] = {}
        self._loaded: dict[tuple[str, str], int] = {}
        self._counters: dict[tuple[str, str], int] = {}
        self.status_messages: list[list[Any]] = []
        self.history_result: JsonDict = {}

    @property
    def loaded_bytes(self) -> int:
        """GPU memory the loaded models occupy."""
        return sum(self._loaded.values())

    def unload_models(self) -> None:
        self._loaded.clear()

    def reset_cache(self) -> None:
        self._cache.clear()

    async def execute_async(
        self,
        prompt: JsonDict,
        prompt_id: str,
        extra_data: JsonDict,
        execute_outputs: tuple[str, ...],
    ) -> Outcome:
        """Run one prompt; ``history_result`` then holds its ``outputs`` and ``meta``."""
        client_id = extra_data.get("client_id")
        self._server.client_id = client_id if isinstance(client_id, str) else None
        self._state.interrupted = False
        self.status_messages = []
        run = _Run(prompt_id, prompt, self._previews_for(extra_data))
        self.history_result = {"outputs": run.outputs, "meta": run.meta}
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)

        keys = cache_keys(prompt)
        wanted = set(keys.values())
        self._cache = {key: value for key, value in self._cache.items() if key in wanted}
        cached = [node_id for node_id in prompt if keys[node_id] in self._cache]
        run.values.update({node_id: self._cache[keys[node_id]].outputs for node_id in cached})
        self.add_message(
            "execution_cached", {"nodes": cached, "prompt_id": prompt_id}, broadcast=False
        )
        order = ExecutionOrder(
            prompt,
            is_cached=lambda node_id: keys[node_id] in self._cache,
            is_output=lambda node_id: NODES[prompt[node_id]["class_type"]].output_node,
        )
        order.add_outputs(execute_outputs)
        result: Result = "completed"
        while order:
            try:
                node_id = order.next()
            except DependencyCycleError as cycle:
                result = "failed"
                error = _NodeFailure(_full_type_name(cycle), f"{cycle}\n", [])
                self._report_failure(run, cycle.node_id, error, keys)
                break
            try:
                await self._execute_node(run, node_id, keys[node_id])
            except _Interrupted:
                result = "interrupted"
                self.add_message(
                    "execution_interrupted", self._failure_info(run, node_id), broadcast=True
                )
                break
            except _NodeFailure as failure:
                result = "failed"
                self._report_failure(run, node_id, failure, keys)
                break
            order.complete(node_id)
        else:
            self.add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)
        self._server.last_node_id = None
        status = {
            "status_str": "success" if result == "completed" else "error",
            "completed": result == "completed",
            "messages": self.status_messages,
        }
        return Outcome(result, {"outputs": run.outputs, "status": status, "meta": run.meta})

    def add_message(self, event: str, data: JsonDict, broadcast: bool) -> None:
        """Recorded for history; sent to the prompt's client, or to all when ``broadcast``."""
        data = {**data, "timestamp": _now_ms()}
        self.status_messages.append([event, data])
        if self._server.client_id is not None or broadcast:
            self._server.send_sync(event, data, self._server.client_id)

    def _failure_info(self, run: _Run, node_id: str) -> JsonDict:
        return {
            "prompt_id": run.prompt_id,
            "node_id": node_id,
            "node_type": run.prompt[node_id]["class_type"],
            "executed": list(run.executed),
        }

    def _report_failure(
        self, run: _Run, node_id: str, failure: _NodeFailure, keys: dict[str, str]
    ) -> None:
        node = run.prompt[node_id]
        current_inputs = {
            name: [repr(run.values[value[0]][value[1]]) if self._has_run(run, value) else value]
            for name, value in node.get("inputs", {}).items()
        }
        data = {
            **self._failure_info(run, node_id),
            "exception_message": failure.message,
            "exception_type": failure.exception_type,
            "traceback": failure.frames,
            "current_inputs": current_inputs,
            "current_outputs": [n for n in run.prompt if keys[n] in self._cache],
        }
        self.add_message("execution_error", data, broadcast=False)

    def _send_progress_state(self, run: _Run) -> None:
        if not self._progress_state:
            return
        nodes = {
            node_id: {
                **entry,
                "node_id": node_id,
                "prompt_id": run.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, entry in run.progress.items()
        }
        self._server.send_sync(
            "progress_state", {"prompt_id": run.prompt_id, "nodes": nodes}, self._server.client_id
        )

    def _finish_progress(self, run: _Run, node_id: str) -> None:
        """A node that never started (a cached one) gets ComfyUI's integer default entry."""
        entry = run.progress.setdefault(node_id, {"value": 0, "max": 1, "state": "pending"})
        entry.update(value=entry["max"], state="finished")
        self._send_progress_state(run)

    @staticmethod
    def _has_run(run: _Run, value: Any) -> bool:
        return is_link(value) and value[0] in run.values

    @staticmethod
    def _input_value(run: _Run, link: list[Any]) -> Any:
        source, slot = link
        return run.values[source][slot]

    async def _execute_node(self, run: _Run, node_id: str, key: str) -> None:
        node = run.prompt[node_id]
        client = self._server.client_id
        cached = self._cache.get(key)
        if cached is not None:
            if client is not None:
                executed = {
                    "node": node_id,
                    "display_node": node_id,
                    "output": cached.ui,
                    "prompt_id": run.prompt_id,
                }
                self._server.send_sync("executed", executed, client)
            recorded = client is not None or not self._cached_ui_needs_client_id
            if cached.ui is not None and recorded:
                self._record_ui(run, node_id, cached.ui)
            self._finish_progress(run, node_id)
            run.values[node_id] = cached.outputs
            return

        run.progress[node_id] = {"value": 0.0, "max": 1.0, "state": "running"}
        self._send_progress_state(run)
        if client is not None:
            self._server.last_node_id = node_id
            executing = {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id}
            self._server.send_sync("executing", executing, client)
        if self._state.interrupted:
            raise _Interrupted
        spec = NODES[node["class_type"]]
        raw = node.get("inputs", {})
        inputs = {
            name: self._input_value(run, value) if is_link(value) else value
            for name, value in raw.items()
        }
        try:
            outputs, ui = await self._behave(run, node_id, spec, inputs)
        except (_Interrupted, asyncio.CancelledError):
            raise
        except _SimulatedError as exc:
            raise _NodeFailure(
                exc.exception_type, f"{exc}\n", [*_EXECUTION_FRAMES, _node_frame(spec)]
            ) from exc
        except Exception as exc:
            frames = [*_EXECUTION_FRAMES, *traceback.format_tb(exc.__traceback__)]
            raise _NodeFailure(_full_type_name(exc), f"{exc}\n", frames) from exc
        if ui is not None:
            self._record_ui(run, node_id, ui)
            if client is not None:
                executed = {
                    "node": node_id,
                    "display_node": node_id,
                    "output": ui,
                    "prompt_id": run.prompt_id,
                }
                self._server.send_sync("executed", executed, client)
        self._finish_progress(run, node_id)
        run.values[node_id] = outputs
        self._cache[key] = _Cached(outputs, ui)
        run.executed.append(node_id)

    def _record_ui(self, run: _Run, node_id: str, ui: JsonDict) -> None:
        run.outputs[node_id] = ui
        run.meta[node_id] = {
            "node_id": node_id,
            "display_node": node_id,
            "parent_node": None,
            "real_node_id": node_id,
        }

    async def _tick(
        self, run: _Run, node_id: str, value: int, maximum: int, preview: bool = False
    ) -> None:
        """``ProgressBar.update_absolute`` through ComfyUI's progress hook."""
        if self._state.interrupted:
            raise _Interrupted
        entry = run.progress[node_id]
        entry.update(value=min(value, maximum), max=maximum)
        self._send_progress_state(run)
        client = self._server.client_id
        with_metadata = self._server.supports_preview_metadata(client)
        jpeg = preview_jpeg(f"{run.prompt_id} node {node_id} step {value}") if preview else None
        if jpeg is not None and with_metadata:
            metadata = {
                "node_id": node_id,
                "prompt_id": run.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
                "image_type": "image/jpeg",
            }
            payload = preview_payload_with_metadata(jpeg, metadata)
            self._server.send_sync(PREVIEW_IMAGE_WITH_METADATA, payload, client)
        progress = {"value": value, "max": maximum, "prompt_id": run.prompt_id, "node": node_id}
        self._server.send_sync("progress", progress, client)
        if jpeg is not None and not with_metadata:
            self._server.send_sync(PREVIEW_IMAGE, preview_payload(jpeg), client)

    async def _spend(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds * self._timing.speed * self._rng.uniform(0.9, 1.1))

    async def _behave(
        self, run: _Run, node_id: str, spec: NodeSpec, inputs: JsonDict
    ) -> tuple[tuple[Any, ...], JsonDict | None]:
        timing = self._timing
        if inputs.get("fail") is True:
            await self._spend(timing.frame_seconds)
            raise _SimulatedError(
                "RuntimeError", f"simulated failure: the workflow set 'fail' on {spec.class_type}"
            )
        match spec.behaviour:
            case Behaviour.LOADER:
                return await self._load(spec, inputs), None
            case Behaviour.ENCODE:
                await self._spend(timing.step_seconds / 2)
                return (Resource("CONDITIONING", str(inputs.get("text", ""))[:40]),), None
            case Behaviour.LATENT:
                return (self._empty_latent(spec, inputs),), None
            case Behaviour.PATCH:
                return (inputs["model"],), None
            case Behaviour.SAMPLER:
                return (await self._sample(run, node_id, spec, inputs),), None
            case Behaviour.DECODE:
                return (await self._decode(run, node_id, spec, inputs),), None
            case Behaviour.IMAGE_OP:
                images: Images = inputs["image"]
                await self._spend(timing.frame_seconds * images.count / 5)
                width = int(inputs.get("width", 0)) or images.width
                height = int(inputs.get("height", 0)) or images.height
                return (Images(images.count, width, height),), None
            case Behaviour.UPSCALE:
                return (await self._upscale(run, node_id, inputs["image"]),), None
            case _:
                return await self._save(run, node_id, spec, inputs)

    async def _load(self, spec: NodeSpec, inputs: JsonDict) -> tuple[Any, ...]:
        name = next(
            str(inputs[i.name]) for i in spec.inputs if i.type == MODEL_FILE and i.name in inputs
        )
        seconds = self._timing.load_seconds * spec.load_weight
        if (spec.class_type, name) in self._loaded:
            seconds *= 0.05
        await self._spend(seconds)
        self._loaded[(spec.class_type, name)] = spec.vram_bytes
        return tuple(Resource(kind, name) for kind in spec.outputs)

    @staticmethod
    def _empty_latent(spec: NodeSpec, inputs: JsonDict) -> Latent:
        width, height = int(inputs["width"]), int(inputs["height"])
        batch = int(inputs["batch_size"])
        factor = _VIDEO_LATENT_FACTORS.get(spec.class_type)
        if factor is None:
            return Latent(width, height, batch)
        return Latent(width, height, batch, (int(inputs["length"]) - 1) // factor + 1, factor)

    async def _sample(self, run: _Run, node_id: str, spec: NodeSpec, inputs: JsonDict) -> Latent:
        latent: Latent = inputs["latent_image"]
        steps = int(inputs["steps"])
        ticks = steps
        if spec.class_type == "KSamplerAdvanced":
            start = int(inputs.get("start_at_step", 0))
            ticks = max(0, min(int(inputs.get("end_at_step", 10000)), steps) - start)
        every = max(1, int(inputs.get("preview_every", 1)))
        cost = (
            self._timing.step_seconds
            * _pixel_scale(latent.width, latent.height)
            * latent.frames
            * latent.batch
        )
        for step in range(1, ticks + 1):
            await self._spend(cost)
            await self._tick(run, node_id, step, steps, run.previews and step % every == 0)
        return latent

    async def _decode(self, run: _Run, node_id: str, spec: NodeSpec, inputs: JsonDict) -> Images:
        latent: Latent = inputs["samples"]
        frames = latent.decoded_frames
        per_frame = self._timing.frame_seconds * _pixel_scale(latent.width, latent.height)
        fail_at = int(inputs.get("fail_at_frame", 0))
        if spec.reports_progress:
            for frame in range(1, frames + 1):
                await self._spend(per_frame)
                self._out_of_memory_at(frame, fail_at)
                await self._tick(run, node_id, frame, frames)
        else:
            done = fail_at if 0 < fail_at <= frames else frames
            await self._spend(per_frame * done)
            self._out_of_memory_at(done, fail_at)
        return Images(frames, latent.width, latent.height)

    def _out_of_memory_at(self, frame: int, fail_at: int) -> None:
        """The ``fail_at_frame`` knob: a CUDA OOM, after which ComfyUI unloads every model."""
        if frame == fail_at:
            self.unload_models()
            raise _SimulatedError("torch.OutOfMemoryError", f"Allocation on device \n{_OOM_TIPS}")

    async def _upscale(self, run: _Run, node_id: str, images: Images) -> Images:
        per_frame = 2 * self._timing.frame_seconds * _pixel_scale(images.width, images.height)
        for frame in range(1, images.count + 1):
            await self._spend(per_frame)
            await self._tick(run, node_id, frame, images.count)
        return Images(images.count, images.width * 4, images.height * 4)

    def _counters_for(self, prefix: str, count: int) -> tuple[str, str, range]:
        """ComfyUI's ``get_save_image_path``: subfolder, name and the next free counters."""
        subfolder, _, name = prefix.rpartition("/")
        start = self._counters.get((subfolder, name), 1)
        self._counters[(subfolder, name)] = start + count
        return subfolder, name, range(start, start + count)

    def _files(
        self, prefix: str, count: int, extension: str, kind: str = "output"
    ) -> list[JsonDict]:
        subfolder, name, counters = self._counters_for(prefix, count)
        return [
            {"filename": f"{name}_{counter:05}_.{extension}", "subfolder": subfolder, "type": kind}
            for counter in counters
        ]

    async def _save(
        self, run: _Run, node_id: str, spec: NodeSpec, inputs: JsonDict
    ) -> tuple[tuple[Any, ...], JsonDict | None]:
        images: Images = inputs["images"]
        prefix = str(inputs.get("filename_prefix", "ComfyUI"))
        frame_seconds = self._timing.frame_seconds * _pixel_scale(images.width, images.height)
        match spec.behaviour:
            case Behaviour.SAVE_IMAGES:
                await self._spend(frame_seconds * images.count / 2)
                return (), {"images": self._files(prefix, images.count, "png")}
            case Behaviour.PREVIEW_IMAGES:
                await self._spend(frame_seconds * images.count / 4)
                suffix = "".join(self._rng.choices(string.ascii_lowercase, k=5))
                files = self._files(f"ComfyUI_temp_{suffix}", images.count, "png", "temp")
                return (), {"images": files}
            case Behaviour.SAVE_ANIMATION:
                await self._spend(frame_seconds * images.count)
                extension = "webm" if spec.class_type == "SaveWEBM" else "webp"
                return (), {"images": self._files(prefix, 1, extension), "animated": [True]}
            case _:
                return await self._combine_video(run, node_id, images, prefix, inputs)

    async def _combine_video(
        self, run: _Run, node_id: str, images: Images, prefix: str, inputs: JsonDict
    ) -> tuple[tuple[Any, ...], JsonDict | None]:
        """Video Helper Suite's VHS_VideoCombine: encodes frame by frame, one ``gifs`` entry."""
        per_frame = self._timing.frame_seconds * _pixel_scale(images.width, images.height)
        for frame in range(1, images.count + 1):
            await self._spend(per_frame)
            await self._tick(run, node_id, frame, images.count)
        video_format = str(inputs.get("format", "image/gif"))
        extension = video_format.rpartition("-")[2] if "-" in video_format else video_format[6:]
        saved = bool(inputs.get("save_output", True))
        subfolder, name, counters = self._counters_for(prefix, 1)
        stem = f"{name}_{counters[0]:05}"
        folder = "/".join(part for part in (_OUTPUT_DIR, subfolder) if part)
        fullpath = f"{folder}/{stem}.{extension}"
        gif = {
            "filename": f"{stem}.{extension}",
            "subfolder": subfolder,
            "type": "output" if saved else "temp",
            "format": video_format,
            "frame_rate": float(inputs.get("frame_rate", 8.0)),
            "workflow": f"{stem}.png",
            "fullpath": fullpath,
        }
        return ((saved, [f"{folder}/{stem}.png", fullpath]),), {"gifs": [gif]}


def _node_frame(spec: NodeSpec) -> str:
    return (
        '  File "tower_progress/simulate/executor.py", in simulated node\n'
        f"    {spec.class_type} ({spec.behaviour.value})\n"
    )
