"""What a submitted ComfyUI graph tells us before it runs: nodes, stages, cost, fingerprint.

A job's overall fraction is the weighted share of its nodes that are done. Each stage gets a
share of the job (from priors of the same workflow when there are some, defaults otherwise),
split between that stage's nodes; inside sampling the split follows each sampler's work, its
steps times the pixels of the latent it denoises (traced back through upscales and encodes), so
a two-pass workflow (base + hires pass, high/low noise) spans both passes in one percent and
the costlier pass gets the larger part of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from tower_progress.core.frames import frames_total, resolve_int
from tower_progress.core.model import Stage
from tower_progress.core.stages import DEFAULT_WEIGHTS, stage_of

# Inputs that change how long a node takes; they, with the node types, make the fingerprint.
COST_INPUTS = frozenset(
    {
        "steps",
        "width",
        "height",
        "length",
        "batch_size",
        "num_frames",
        "frame_count",
        "frame_load_cap",
        "start_at_step",
        "end_at_step",
        "tile_size",
        "scale_by",
        "upscale_method",
        "ckpt_name",
        "unet_name",
        "model_name",
    }
)


_DEFAULT_PIXELS = 512 * 512
_MAX_PIXELS = 16384 * 16384
_MAX_LINK_DEPTH = 16
# Inputs through which a latent or image reaches a sampler, tried in this order.
_IMAGE_INPUTS = ("latent_image", "samples", "latent", "pixels", "image", "images", "start_image")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node. ``work`` is its cost relative to the other nodes of its stage: for a sampler,
    steps times latent pixels in 512² units, else 1."""

    class_type: str
    title: str | None
    stage: Stage
    steps: int | None
    work: float = 1.0


def _size(graph: Mapping[str, Any], inputs: Mapping[str, Any]) -> int | None:
    width = resolve_int(graph, inputs.get("width"))
    height = resolve_int(graph, inputs.get("height"))
    if width and height and 0 < width * height <= _MAX_PIXELS:
        return width * height
    return None


def _scale(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 16:
        return float(value)
    return None


def _steps_run(graph: Mapping[str, Any], inputs: Mapping[str, Any]) -> int | None:
    """Steps a sampler runs: ``steps``, cut to ``start_at_step``..``end_at_step`` where a
    KSamplerAdvanced-style sampler runs only part of its schedule. None if unknown or none."""
    steps = resolve_int(graph, inputs.get("steps"))
    if steps is None:
        return None
    start = resolve_int(graph, inputs.get("start_at_step")) or 0
    end = resolve_int(graph, inputs.get("end_at_step"))
    run = min(steps, end if end is not None else steps) - max(start, 0)
    return run if run >= 1 else None


def _latent_pixels(
    graph: Mapping[str, Any], value: Any, seen: dict[str, float | None], depth: int = 0
) -> float | None:
    """Pixels of the image or latent a link carries: the first node upstream that sets a size
    (``width``/``height``), times the square of every ``scale_by`` on the way. None if unknown.

    ``seen`` holds each node's answer for one graph, so every node is visited once (a cycle
    or a node reached by many paths costs nothing more).
    """
    if not (isinstance(value, list) and len(value) == 2) or depth >= _MAX_LINK_DEPTH:
        return None
    node_id = str(value[0])
    if node_id in seen:
        return seen[node_id]
    seen[node_id] = None
    node = graph.get(node_id)
    inputs = node.get("inputs") if isinstance(node, Mapping) else None
    if not isinstance(inputs, Mapping):
        return None
    size = _size(graph, inputs)
    pixels = float(size) if size is not None else None
    if pixels is None:
        pixels = _upstream_pixels(graph, inputs, seen, depth + 1)
        scale = _scale(inputs.get("scale_by"))
        if pixels is not None and scale is not None:
            pixels *= scale * scale
    seen[node_id] = pixels
    return pixels


def _upstream_pixels(
    graph: Mapping[str, Any], inputs: Mapping[str, Any], seen: dict[str, float | None], depth: int
) -> float | None:
    for key in _IMAGE_INPUTS:
        pixels = _latent_pixels(graph, inputs.get(key), seen, depth)
        if pixels is not None:
            return pixels
    return None


@dataclass(frozen=True, slots=True)
class Workflow:
    """A parsed graph. ``cost`` is a unitless proxy for its work (the samplers' work times
    frames), used to scale the pace of other workflows when this one has no history of its
    own."""

    nodes: Mapping[str, NodeSpec]
    frames_total: int | None
    fingerprint: str
    cost: float

    @classmethod
    def from_graph(cls, graph: Any) -> Workflow:
        """Parse an API-format graph; malformed nodes are skipped, never fatal."""
        nodes: dict[str, NodeSpec] = {}
        graph = graph if isinstance(graph, Mapping) else {}
        cost: list[tuple[str, str, list[tuple[str, str]]]] = []
        pixels = 0
        latents: dict[str, float | None] = {}
        seen: dict[str, float | None] = {}
        for node_id, node in graph.items():
            if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
                continue
            class_type: str = node["class_type"]
            inputs = node.get("inputs")
            inputs = inputs if isinstance(inputs, Mapping) else {}
            meta = node.get("_meta")
            title = meta.get("title") if isinstance(meta, Mapping) else None
            stage = stage_of(class_type)
            steps = _steps_run(graph, inputs) if stage is Stage.SAMPLING else None
            nodes[str(node_id)] = NodeSpec(
                class_type, title if isinstance(title, str) else None, stage, steps
            )
            if steps is not None:
                latents[str(node_id)] = _upstream_pixels(graph, inputs, seen, 0)
            pixels = max(pixels, _size(graph, inputs) or 0)
            relevant = sorted(
                (k, json.dumps(v, sort_keys=True, default=str))
                for k, v in inputs.items()
                if k in COST_INPUTS and not isinstance(v, list)
            )
            cost.append((class_type, str(node_id), relevant))
        digest = hashlib.sha256(json.dumps(sorted(cost)).encode()).hexdigest()[:16]
        frames = frames_total(graph)
        for node_id, latent in latents.items():
            spec = nodes[node_id]
            area = (latent or pixels or _DEFAULT_PIXELS) / _DEFAULT_PIXELS
            nodes[node_id] = replace(spec, work=(spec.steps or 1) * area)
        sampling = sum(nodes[n].work for n in latents)
        work = max(sampling, 1.0) * (frames or 1)
        return cls(nodes=nodes, frames_total=frames, fingerprint=digest, cost=work)

    def weights(self, stage_seconds: Mapping[str, float] | None = None) -> dict[str, float]:
        """Each node's share of the whole job, summing to 1 over the graph's nodes.

        ``stage_seconds`` (a prior: stage name → expected seconds) replaces the default stage
        shares for the stages it covers.
        """
        by_stage: dict[Stage, list[str]] = {}
        for node_id, spec in self.nodes.items():
            by_stage.setdefault(spec.stage, []).append(node_id)
        shares: dict[Stage, float] = {}
        for stage in by_stage:
            prior = stage_seconds.get(stage.value) if stage_seconds else None
            shares[stage] = prior if prior is not None and prior > 0 else 0.0
        if sum(shares.values()) <= 0:
            shares = {stage: DEFAULT_WEIGHTS.get(stage, 0.05) for stage in by_stage}
        total = sum(shares.values())
        weights: dict[str, float] = {}
        for stage, node_ids in by_stage.items():
            share = shares[stage] / total if total > 0 else 0.0
            unit = {n: self.nodes[n].work for n in node_ids}
            unit_total = sum(unit.values())
            for node_id in node_ids:
                weights[node_id] = share * unit[node_id] / unit_total
        return weights
