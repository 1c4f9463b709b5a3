"""Frame counts: how many a workflow will produce, and how many its outputs hold.

Totals come from the graph's latent, image and video source nodes (protocol §7): a video latent
of ``length`` frames with temporal compression ``k`` decodes to ``((length-1)//k)*k+1`` frames,
and ``batch_size`` multiplies. Inputs may be links to primitive nodes; links are followed. A
node that repeats, splits or selects frames makes the count unknown. Anything unknown is None:
a guess is never shown as a fact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# class_type -> (frame input, temporal compression k); batch_size multiplies when present.
FRAME_SOURCES: Mapping[str, tuple[str, int]] = {
    "EmptyLatentImage": ("batch_size", 1),
    "EmptySD3LatentImage": ("batch_size", 1),
    "EmptyHunyuanLatentVideo": ("length", 4),
    "HunyuanImageToVideo": ("length", 4),
    "WanImageToVideo": ("length", 4),
    "WanFunControlToVideo": ("length", 4),
    "WanFirstLastFrameToVideo": ("length", 4),
    "WanVaceToVideo": ("length", 4),
    "WanVideoEmptyEmbeds": ("num_frames", 4),
    "WanVideoImageToVideoEncode": ("num_frames", 4),
    "EmptyLTXVLatentVideo": ("length", 8),
    "LTXVImgToVideo": ("length", 8),
    "EmptyCosmosLatentVideo": ("length", 8),
    "EmptyMochiLatentVideo": ("length", 6),
    "ADE_EmptyLatentImageLarge": ("batch_size", 1),
    "VHS_LoadVideo": ("frame_load_cap", 1),
    "VHS_LoadVideoPath": ("frame_load_cap", 1),
}
# Nodes that change how many frames flow past them: with one in the graph the count at the
# writer is not the sources' count, so it is unknown.
BATCH_CHANGERS = frozenset(
    {
        "RepeatLatentBatch",
        "RepeatImageBatch",
        "LatentBatch",
        "ImageBatch",
        "LatentFromBatch",
        "ImageFromBatch",
        "RebatchLatents",
        "RebatchImages",
        "ReplaceVideoLatentFrames",
        "VHS_SelectEveryNthImage",
        "VHS_SelectEveryNthLatent",
        "VHS_SplitImages",
        "VHS_SplitLatents",
        "VHS_MergeImages",
        "VHS_MergeLatents",
        "VHS_DuplicateImages",
        "VHS_DuplicateLatents",
        "VHS_GetImageCount",
    }
)
GENERIC_FRAME_INPUTS = ("num_frames", "frame_count", "length")
_VALUE_KEYS = ("value", "int", "number", "Value")
MAX_FRAMES = 100_000
_MAX_LINK_DEPTH = 8


def _node(graph: Mapping[str, Any], node_id: str) -> Mapping[str, Any] | None:
    node = graph.get(node_id)
    return node if isinstance(node, Mapping) else None


def resolve_int(graph: Mapping[str, Any], value: Any, depth: int = 0) -> int | None:
    """An integer input value, following ``[node_id, slot]`` links into primitive nodes: a
    node whose one numeric or linked input is its value (a node with operands beside it
    computes something else)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list) and len(value) == 2 and depth < _MAX_LINK_DEPTH:
        source = _node(graph, str(value[0]))
        inputs = source.get("inputs") if source else None
        if isinstance(inputs, Mapping):
            operands = [k for k, v in inputs.items() if _operand(v)]
            key = operands[0] if len(operands) == 1 else None
            if key in _VALUE_KEYS:
                return resolve_int(graph, inputs[key], depth + 1)
    return None


def _operand(value: Any) -> bool:
    return isinstance(value, int | float | list) and not isinstance(value, bool)


def _decoded(length: int, k: int) -> int:
    return ((length - 1) // k) * k + 1 if k > 1 else length


def frames_total(graph: Mapping[str, Any]) -> int | None:
    """Frames one output of this workflow gets, from its frame source nodes; None if unknown."""
    best: int | None = None
    nodes = [node for node in graph.values() if isinstance(node, Mapping)]
    if any(node.get("class_type") in BATCH_CHANGERS for node in nodes):
        return None
    for node in nodes:
        class_type = node.get("class_type")
        inputs = node.get("inputs")
        if not isinstance(class_type, str) or not isinstance(inputs, Mapping):
            continue
        spec = FRAME_SOURCES.get(class_type)
        if spec is None:
            name = next((n for n in GENERIC_FRAME_INPUTS if n in inputs), None)
            if name is None or not ("Latent" in class_type or "Video" in class_type):
                continue
            spec = (name, 1)
        name, k = spec
        count = resolve_int(graph, inputs.get(name))
        if count is None or count < 1:
            continue
        frames = _decoded(count, k)
        if name != "batch_size":
            batch = resolve_int(graph, inputs.get("batch_size"))
            if batch is not None and batch > 0:
                frames *= batch
        if frames <= MAX_FRAMES and (best is None or frames > best):
            best = frames
    return best


def frames_in_output(output: Any, frames_per_video: int | None) -> int | None:
    """Frames one output node wrote, from its ``executed``/history ``output`` dict.

    Still images count one each; an animated image or a video file counts ``frames_per_video``
    (the workflow's total), since ComfyUI reports no frame count for them. Temp previews are
    not outputs. None when the output holds nothing countable.
    """
    if not isinstance(output, Mapping):
        return None
    animated_flags = output.get("animated")
    animated = isinstance(animated_flags, list) and any(flag is True for flag in animated_flags)
    total = 0
    counted = False
    for key in ("images", "gifs", "videos", "video"):
        items = output.get(key)
        if not isinstance(items, list):
            continue
        files = [i for i in items if isinstance(i, Mapping) and i.get("type") != "temp"]
        if not files:
            continue
        is_video = animated or key != "images"
        if is_video:
            if frames_per_video is None:
                continue
            total += frames_per_video * len(files)
        else:
            total += len(files)
        counted = True
    return total if counted else None


def output_files(output: Any) -> list[str]:
    """File names an output node wrote (temp previews excluded)."""
    names: list[str] = []
    if not isinstance(output, Mapping):
        return names
    for key in ("images", "gifs", "videos", "video"):
        items = output.get(key)
        if isinstance(items, list):
            names.extend(
                str(i["filename"])
                for i in items
                if isinstance(i, Mapping) and "filename" in i and i.get("type") != "temp"
            )
    return names
