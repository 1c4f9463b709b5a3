"""``/metrics`` in the Prometheus text exposition format 0.0.4, written by hand.

The format is a few lines per sample; writing it here keeps ``prometheus_client`` (and its
process-global registry) out of the runtime dependencies. Gauges are read from the current
state on every scrape; the only state kept here is the stage-duration histogram, fed with the
tracker's ``JobFinished`` events.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeGuard

from tower_progress.core.model import Event, JobFinished, JobState, JsonDict
from tower_progress.web.hub import HubStats
from tower_progress.web.ports import public_sources

_LOG = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_PREFIX = "tower_progress_"
_TERMINAL = frozenset(s.value for s in JobState if s.terminal)

# resources key -> (metric, help)
_HOST_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("cpu_percent", "cpu_percent", "Host CPU utilization, percent."),
    ("ram_used", "memory_used_bytes", "Host memory in use."),
    ("ram_total", "memory_total_bytes", "Host memory installed."),
    ("comfyui_cpu_percent", "comfyui_cpu_percent", "CPU used by ComfyUI, percent of one core."),
    ("comfyui_rss", "comfyui_memory_rss_bytes", "Resident memory of ComfyUI."),
)
# resources["gpus"][i] key -> (metric, help); labelled by gpu index and name
_GPU_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("utilization", "gpu_utilization_percent", "GPU utilization, percent."),
    ("memory_utilization", "gpu_memory_utilization_percent", "GPU memory bandwidth, percent."),
    ("vram_used", "gpu_memory_used_bytes", "GPU memory in use."),
    ("vram_total", "gpu_memory_total_bytes", "GPU memory installed."),
    ("comfyui_vram", "gpu_comfyui_memory_bytes", "GPU memory held by ComfyUI."),
    ("temperature_c", "gpu_temperature_celsius", "GPU temperature."),
    ("power_w", "gpu_power_watts", "GPU power draw."),
    ("power_limit_w", "gpu_power_limit_watts", "GPU power limit."),
    ("fan_percent", "gpu_fan_percent", "GPU fan speed, percent."),
)

Labels = Mapping[str, str]


class _Histogram:
    __slots__ = ("count", "counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.count = 0
        self.total = 0.0


class Metrics:
    """Stage-duration histograms plus a renderer for everything else.

    The daemon calls ``observe`` with the same event lists it gives the hub.
    """

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError(f"histogram buckets must be increasing and non-empty: {buckets}")
        self._bounds = tuple(float(b) for b in buckets)
        self._stages: dict[str, _Histogram] = {}

    def observe(self, events: Iterable[Event]) -> None:
        for event in events:
            if not isinstance(event, JobFinished):
                continue
            for stage, seconds in event.stage_seconds.items():
                if not _is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
                    _LOG.warning(
                        "job %s: stage %s duration %r is not a duration, not recorded",
                        event.job.get("id"),
                        stage,
                        seconds,
                    )
                    continue
                hist = self._stages.get(stage)
                if hist is None:
                    hist = self._stages[stage] = _Histogram(len(self._bounds))
                for i, bound in enumerate(self._bounds):
                    if seconds <= bound:
                        hist.counts[i] += 1
                        break
                hist.count += 1
                hist.total += seconds

    def render(
        self,
        *,
        jobs: list[JsonDict],
        resources: JsonDict | None,
        sources: dict[str, JsonDict],
        hub: HubStats,
    ) -> str:
        out: list[str] = []
        self._render_jobs(out, jobs)
        self._render_stages(out)
        _family(out, "websocket_clients", "gauge", "Connected websocket clients.")
        _sample(out, "websocket_clients", {}, hub.clients)
        for name, value, help_text in (
            ("websocket_messages_sent_total", hub.messages_sent, "Messages written to clients."),
            (
                "websocket_messages_coalesced_total",
                hub.messages_coalesced,
                "Messages replaced by a newer one before a slow client got them.",
            ),
            (
                "websocket_clients_dropped_total",
                hub.clients_dropped,
                "Clients disconnected for not reading.",
            ),
        ):
            _family(out, name, "counter", help_text)
            _sample(out, name, {}, value)
        _family(out, "source_up", "gauge", "1 when the source is connected and fresh, else 0.")
        for name, source in sorted(public_sources(sources).items()):
            _sample(out, "source_up", {"source": name}, source["up"])
        _render_resources(out, resources or {})
        return "\n".join(out) + "\n"

    def _render_jobs(self, out: list[str], jobs: list[JsonDict]) -> None:
        by_state = dict.fromkeys((s.value for s in JobState), 0)
        for job in jobs:
            state = job.get("state")
            if isinstance(state, str):
                by_state[state] = by_state.get(state, 0) + 1
        _family(out, "jobs", "gauge", "Jobs the tracker holds, by state (finished: recent only).")
        for state, count in by_state.items():
            _sample(out, "jobs", {"state": state}, count)
        active = [j for j in jobs if j.get("state") not in _TERMINAL]
        _family(out, "job_progress_percent", "gauge", "Progress of each active job, percent.")
        for job in active:
            _sample(out, "job_progress_percent", {"job": str(job.get("id"))}, job.get("percent"))
        _family(out, "job_eta_seconds", "gauge", "Expected seconds until each active job ends.")
        for job in active:
            _sample(out, "job_eta_seconds", {"job": str(job.get("id"))}, job.get("eta_s"))

    def _render_stages(self, out: list[str]) -> None:
        name = "stage_duration_seconds"
        _family(out, name, "histogram", "Seconds finished jobs spent in each stage.")
        for stage, hist in sorted(self._stages.items()):
            cumulative = 0
            for bound, count in zip(self._bounds, hist.counts, strict=True):
                cumulative += count
                _sample(out, name + "_bucket", {"stage": stage, "le": _number(bound)}, cumulative)
            _sample(out, name + "_bucket", {"stage": stage, "le": "+Inf"}, hist.count)
            _sample(out, name + "_sum", {"stage": stage}, hist.total)
            _sample(out, name + "_count", {"stage": stage}, hist.count)


def _render_resources(out: list[str], resources: JsonDict) -> None:
    for key, name, help_text in _HOST_GAUGES:
        _family(out, name, "gauge", help_text)
        _sample(out, name, {}, resources.get(key))
    gpus = [g for g in resources.get("gpus") or () if isinstance(g, dict)]
    for key, name, help_text in _GPU_GAUGES:
        _family(out, name, "gauge", help_text)
        for gpu in gpus:
            labels = {"gpu": str(gpu.get("index")), "name": str(gpu.get("name"))}
            _sample(out, name, labels, gpu.get(key))


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {_PREFIX}{name} {help_text}")
    out.append(f"# TYPE {_PREFIX}{name} {kind}")


def _sample(out: list[str], name: str, labels: Labels, value: object) -> None:
    """One sample line; a value that is not a number (null: unknown) is left out."""
    if not _is_number(value):
        return
    text = _number(value)
    if labels:
        pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        out.append(f"{_PREFIX}{name}{{{pairs}}} {text}")
    else:
        out.append(f"{_PREFIX}{name} {text}")


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float)


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
