"""What a submitted ComfyUI graph tells us before it runs: nodes, stages, cost, fingerprint.

A job's overall fraction is the weighted share of its nodes that are done. Each stage gets a
share of the job (from priors of the same workflow when there are some, defaults otherwise),
split between that stage's nodes; inside sampling the split follows each sampler's step count,
so a two-pass workflow (base + refiner, high/low noise) spans both passes in one percent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class NodeSpec:
    class_type: str
    title: str | None
    stage: Stage
    steps: int | None


@dataclass(frozen=True, slots=True)
class Workflow:
    """A parsed graph. ``cost`` is a unitless proxy for its work (sampler steps times frames times
    pixels in 512² units), used to scale the pace of other workflows when this one has no
    history of its own."""

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
        for node_id, node in graph.items():
            if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
                continue
            class_type: str = node["class_type"]
            inputs = node.get("inputs")
            inputs = inputs if isinstance(inputs, Mapping) else {}
            meta = node.get("_meta")
            title = meta.get("title") if isinstance(meta, Mapping) else None
            stage = stage_of(class_type)
            steps = resolve_int(graph, inputs.get("steps")) if stage is Stage.SAMPLING else None
            if steps is not None and steps < 1:
                steps = None
            nodes[str(node_id)] = NodeSpec(
                class_type, title if isinstance(title, str) else None, stage, steps
            )
            width = resolve_int(graph, inputs.get("width"))
            height = resolve_int(graph, inputs.get("height"))
            if width and height and 0 < width * height <= _MAX_PIXELS:
                pixels = max(pixels, width * height)
            relevant = sorted(
                (k, json.dumps(v, sort_keys=True, default=str))
                for k, v in inputs.items()
                if k in COST_INPUTS and not isinstance(v, list)
            )
            cost.append((class_type, str(node_id), relevant))
        digest = hashlib.sha256(json.dumps(sorted(cost)).encode()).hexdigest()[:16]
        frames = frames_total(graph)
        steps = sum(spec.steps or 0 for spec in nodes.values())
        work = max(steps, 1) * (frames or 1) * (pixels or _DEFAULT_PIXELS) / _DEFAULT_PIXELS
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
            unit = {n: float(self.nodes[n].steps or 1) for n in node_ids}
            unit_total = sum(unit.values())
            for node_id in node_ids:
                weights[node_id] = share * unit[node_id] / unit_total
        return weights
