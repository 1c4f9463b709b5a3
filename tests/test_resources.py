"""Resource sampler: NVML parsing against a real H100 recording, the sampler loop, psutil.

The NVML recording replaces the GPU (this machine has none) through a reader that serves its
lines; everything else is real: the sampler loop, psutil, listening sockets, processes, and the
real pynvml whose ``nvmlInit`` fails here the way it does on any GPU-less box.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pynvml
import pytest

from tower_progress.clock import next_tick
from tower_progress.core.model import GpuSample, Observation, ResourceSample, SourceStatus
from tower_progress.sources.resources import (
    NO_GPU,
    NVML_FAILED,
    NVML_HUNG,
    GpuUnavailable,
    NvmlReader,
    RawGpu,
    ResourceSampler,
    find_listening_pid,
    parse_gpu,
)

FIXTURE = Path(__file__).parent / "fixtures" / "nvml" / "nvml-h100.jsonl"
LINES: list[dict[str, Any]] = [
    json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()
]
RECORDED_PID = 406
H100 = "NVIDIA H100 80GB HBM3"
UP = SourceStatus("resources", True)
GUARD_S = 20.0

_O = TypeVar("_O")


def _nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


HAS_NVML = _nvml_works()


# --- parsing ------------------------------------------------------------------------------


def test_fixture_is_the_full_recording() -> None:
    assert len(LINES) == 38
    assert [line["phase"] for line in LINES].count("load") == 22


def test_first_idle_line_parses_exactly() -> None:
    assert parse_gpu(0, LINES[0]["gpus"][0], RECORDED_PID) == GpuSample(
        index=0,
        name=H100,
        utilization=0.0,
        memory_utilization=0.0,
        vram_used=503_316_480,
        vram_total=85_520_809_984,
        temperature_c=32.0,
        power_w=69.953,
        power_limit_w=700.0,
        fan_percent=None,
        comfyui_vram=None,
    )


def test_loaded_line_parses_exactly() -> None:
    line = LINES[20]
    assert (line["t"], line["phase"]) == (11.094, "load")
    assert parse_gpu(0, line["gpus"][0], RECORDED_PID) == GpuSample(
        index=0,
        name=H100,
        utilization=100.0,
        memory_utilization=42.0,
        vram_used=1_523_384_320,
        vram_total=85_520_809_984,
        temperature_c=47.0,
        power_w=456.365,
        power_limit_w=700.0,
        fan_percent=None,
        comfyui_vram=1_010_827_264,
    )


@pytest.mark.parametrize("number", range(len(LINES)))
def test_every_recorded_line(number: int) -> None:
    raw = LINES[number]["gpus"][0]
    sample = parse_gpu(0, raw, RECORDED_PID)
    assert sample.name == H100
    assert sample.utilization == raw["utilization"]["gpu"]
    assert sample.memory_utilization == raw["utilization"]["memory"]
    assert sample.vram_used == raw["memory"]["used"]
    assert sample.vram_total == 85_520_809_984
    assert sample.temperature_c == raw["temperature_c"]
    assert sample.power_w == raw["power_mw"] / 1000
    assert sample.power_limit_w == 700.0
    assert raw["fan_percent"] == {"error": "NVMLError_NotSupported", "str": "Not Supported"}
    assert sample.fan_percent is None
    expected_vram = {0: None, 19: 1_010_827_264, 30: 742_391_808}
    since = max(k for k in expected_vram if k <= number)
    assert sample.comfyui_vram == expected_vram[since]


def test_comfyui_vram_needs_a_known_listed_pid() -> None:
    loaded = LINES[20]["gpus"][0]
    assert parse_gpu(0, loaded, None).comfyui_vram is None
    assert parse_gpu(0, loaded, RECORDED_PID + 1).comfyui_vram is None
    twice = {
        **loaded,
        "compute_procs": [
            {"pid": RECORDED_PID, "used_gpu_memory": 1000},
            {"pid": 7, "used_gpu_memory": 5},
            {"pid": RECORDED_PID, "used_gpu_memory": 24},
        ],
    }
    assert parse_gpu(0, twice, RECORDED_PID).comfyui_vram == 1024


def test_refused_fields_are_none_and_the_rest_ships() -> None:
    refused = {"error": "NVMLError_NoPermission", "str": "Insufficient Permissions"}
    raw = {
        **LINES[20]["gpus"][0],
        "utilization": refused,
        "memory": refused,
        "power_mw": refused,
        "compute_procs": refused,
    }
    assert parse_gpu(3, raw, RECORDED_PID) == GpuSample(
        index=3,
        name=H100,
        temperature_c=47.0,
        power_limit_w=700.0,
    )


def test_every_field_refused_still_gives_a_sample() -> None:
    lost = {"error": "NVMLError_GpuIsLost", "str": "GPU is lost"}
    raw = {field: lost for field in LINES[0]["gpus"][0]}
    assert parse_gpu(1, raw, RECORDED_PID) == GpuSample(index=1, name="GPU 1")


def test_malformed_values_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    raw = {
        **LINES[0]["gpus"][0],
        "temperature_c": "hot",
        "power_mw": -5,
        "memory": {"total": 1024, "used": True},
    }
    with caplog.at_level(logging.WARNING, logger="tower_progress.sources.resources"):
        sample = parse_gpu(0, raw)
    assert (sample.temperature_c, sample.power_w, sample.vram_used) == (None, None, None)
    assert sample.vram_total == 1024
    assert sample.power_limit_w == 700.0
    assert sorted(r.getMessage() for r in caplog.records) == [
        "GPU 0: ignoring malformed NVML value for memory.used: True",
        "GPU 0: ignoring malformed NVML value for power_mw: -5",
        "GPU 0: ignoring malformed NVML value for temperature_c: 'hot'",
    ]


# --- scheduling ---------------------------------------------------------------------------


def test_next_tick_stays_on_the_grid_and_skips_missed_ticks() -> None:
    assert next_tick(100.0, 2.0) == 102.0
    assert next_tick(101.999, 2.0) == 102.0
    assert next_tick(102.0, 2.0) == 104.0
    assert next_tick(102.3, 2.0) == 104.0
    assert next_tick(107.5, 2.0) == 108.0
    assert next_tick(1_000_000.1, 0.5) == 1_000_000.5


def test_timers_whose_intervals_divide_each_other_fall_due_together() -> None:
    for now in (0.0, 0.1, 3.7, 12_345.678, 98_765.999_999):
        second = next_tick(now, 1.0)
        quarters = [now]
        while quarters[-1] < second:
            quarters.append(next_tick(quarters[-1], 0.25))
        assert quarters[-1] == second
        assert next_tick(now, 0.1) > now


# --- sampler loop driven by the recording -------------------------------------------------


class RecordedNvml:
    """Serves the H100 recording line by line, the ComfyUI pid rewritten to ``pid``."""

    def __init__(
        self, pid: int, block_read: int | None = None, fail_read: int | None = None
    ) -> None:
        self._pid = pid
        self._block_read = block_read
        self._fail_read = fail_read
        self.release = threading.Event()
        self.opened = 0
        self.closed = 0
        self.reads = 0

    def open(self) -> int:
        self.opened += 1
        return 1

    def read(self) -> list[RawGpu]:
        self.reads += 1
        if self.reads == self._block_read:
            self.release.wait()
        if self.reads == self._fail_read:
            raise RuntimeError("driver said no")
        return [self.gpu(self.reads - 1)]

    def close(self) -> None:
        self.closed += 1

    def gpu(self, number: int) -> RawGpu:
        raw = dict(LINES[number % len(LINES)]["gpus"][0])
        raw["compute_procs"] = [
            {**proc, "pid": self._pid if proc["pid"] == RECORDED_PID else proc["pid"]}
            for proc in raw["compute_procs"]
        ]
        return raw


class Recorder:
    """The sampler's ``emit``: keeps everything and lets the test wait for the next match."""

    def __init__(self) -> None:
        self.seen: list[Observation] = []
        self._queue: asyncio.Queue[Observation] = asyncio.Queue()

    def emit(self, observation: Observation) -> None:
        self.seen.append(observation)
        self._queue.put_nowait(observation)

    async def next(self, kind: type[_O], match: Callable[[_O], bool] = lambda _: True) -> _O:
        while True:
            observation = await self._queue.get()
            if isinstance(observation, kind) and match(observation):
                return observation

    def samples(self) -> list[ResourceSample]:
        return [o for o in self.seen if isinstance(o, ResourceSample)]

    def statuses(self) -> list[SourceStatus]:
        return [o for o in self.seen if isinstance(o, SourceStatus)]


@asynccontextmanager
async def running(sampler: ResourceSampler) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(sampler.run(stop))
    try:
        async with asyncio.timeout(GUARD_S):
            yield
    finally:
        stop.set()
        await task


async def test_sampler_replays_the_recording() -> None:
    nvml = RecordedNvml(os.getpid())
    recorder = Recorder()
    sampler = ResourceSampler(
        interval=0.002, comfyui_pid=os.getpid(), emit=recorder.emit, nvml=nvml, nvml_timeout=10
    )
    async with running(sampler):
        await recorder.next(ResourceSample, lambda _: len(recorder.samples()) == len(LINES))
    samples = recorder.samples()
    expected = [(parse_gpu(0, nvml.gpu(n), os.getpid()),) for n in range(len(samples))]
    assert [s.gpus for s in samples] == expected
    assert {s.gpu_status for s in samples} == {"ok"}
    assert samples[0].gpus[0].vram_used == 503_316_480
    assert samples[0].gpus[0].comfyui_vram is None
    assert samples[20].gpus[0].power_w == 456.365
    assert samples[20].gpus[0].comfyui_vram == 1_010_827_264
    assert samples[37].gpus[0].comfyui_vram == 742_391_808
    assert all(s.gpus[0].fan_percent is None for s in samples)
    assert recorder.statuses() == [UP]
    assert recorder.seen[1] == UP
    assert (nvml.opened, nvml.closed) == (1, 1)


async def test_hung_nvml_marks_source_down_and_psutil_goes_on() -> None:
    nvml = RecordedNvml(os.getpid(), block_read=2)
    recorder = Recorder()
    sampler = ResourceSampler(interval=0.01, emit=recorder.emit, nvml=nvml, nvml_timeout=0.05)
    try:
        async with running(sampler):
            down = await recorder.next(SourceStatus, lambda s: not s.up)
            assert down == SourceStatus(
                "resources", False, "NVML call did not return within 0.05 s; GPU readings paused"
            )
            for _ in range(3):
                hung = await recorder.next(ResourceSample)
                assert hung.gpu_status == NVML_HUNG
                assert hung.gpus == ()
                assert hung.cpu_percent is not None
                assert hung.ram_total == psutil.virtual_memory().total
            assert nvml.reads == 2
            nvml.release.set()
            await recorder.next(SourceStatus, lambda s: s.up)
            back = await recorder.next(ResourceSample)
            assert back.gpu_status == "ok"
            assert back.gpus[0].name == H100
    finally:
        nvml.release.set()
    assert recorder.statuses() == [UP, down, UP]
    statuses = [s.gpu_status for s in recorder.samples()]
    first_hung = statuses.index(NVML_HUNG)
    assert statuses[:first_hung] == ["ok"]
    assert nvml.closed == 1


async def test_failed_read_marks_source_down_until_the_next_good_one() -> None:
    nvml = RecordedNvml(os.getpid(), fail_read=2)
    recorder = Recorder()
    sampler = ResourceSampler(interval=0.005, emit=recorder.emit, nvml=nvml)
    async with running(sampler):
        await recorder.next(SourceStatus, lambda s: s.up)
        failed = await recorder.next(ResourceSample)
        await recorder.next(SourceStatus, lambda s: s.up)
    assert (failed.gpu_status, failed.gpus) == (NVML_FAILED, ())
    assert recorder.statuses() == [
        UP,
        SourceStatus("resources", False, "NVML read failed: RuntimeError: driver said no"),
        UP,
    ]
    assert [s.gpu_status for s in recorder.samples()[:3]] == ["ok", NVML_FAILED, "ok"]


async def test_zero_gpus_is_no_gpu() -> None:
    class NoDevices(RecordedNvml):
        def open(self) -> int:
            self.opened += 1
            return 0

    nvml = NoDevices(os.getpid())
    recorder = Recorder()
    sampler = ResourceSampler(interval=0.005, emit=recorder.emit, nvml=nvml)
    async with running(sampler):
        await recorder.next(ResourceSample, lambda _: len(recorder.samples()) == 3)
    assert {(s.gpu_status, s.gpus) for s in recorder.samples()} == {(NO_GPU, ())}
    assert (nvml.opened, nvml.reads, nvml.closed) == (1, 0, 1)
    assert recorder.statuses() == [UP]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval must be > 0 seconds, got 0"):
        ResourceSampler(interval=0, emit=lambda _: None)
    with pytest.raises(ValueError, match="nvml_timeout must be > 0 seconds, got -1"):
        ResourceSampler(emit=lambda _: None, nvml_timeout=-1)


# --- real pynvml --------------------------------------------------------------------------


@pytest.mark.skipif(HAS_NVML, reason="this machine has a working NVML; the no-GPU path needs none")
async def test_no_gpu_is_a_normal_state_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        pynvml.nvmlInit()
    with pytest.raises(GpuUnavailable, match="NVMLError_LibraryNotFound"):
        NvmlReader().open()
    recorder = Recorder()
    sampler = ResourceSampler(interval=0.005, emit=recorder.emit)
    with caplog.at_level(logging.INFO, logger="tower_progress.sources.resources"):
        async with running(sampler):
            await recorder.next(ResourceSample, lambda _: len(recorder.samples()) == 4)
    assert {(s.gpu_status, s.gpus) for s in recorder.samples()} == {(NO_GPU, ())}
    assert recorder.statuses() == [UP]
    about_nvml = [r for r in caplog.records if "NVML" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in about_nvml] == [
        (
            logging.INFO,
            "NVML unavailable (NVMLError_LibraryNotFound: NVML Shared Library Not Found): "
            'resources show "no GPU"',
        )
    ]


@pytest.mark.skipif(not HAS_NVML, reason="no NVML library or GPU on this machine")
async def test_real_gpu_is_read() -> None:
    reader = NvmlReader()
    count = reader.open()
    try:
        raw = reader.read()
    finally:
        reader.close()
    assert count >= 1
    assert len(raw) == count
    for index, entry in enumerate(raw):
        gpu = parse_gpu(index, entry)
        assert gpu.name
        assert gpu.vram_total is not None and gpu.vram_total > 0
        assert gpu.vram_used is not None and 0 <= gpu.vram_used <= gpu.vram_total
        assert gpu.utilization is not None and 0 <= gpu.utilization <= 100
        assert entry["memory"]["version"] in (1, 2)
    recorder = Recorder()
    sampler = ResourceSampler(interval=0.05, emit=recorder.emit)
    async with running(sampler):
        sample = await recorder.next(ResourceSample)
    assert sample.gpu_status == "ok"
    assert len(sample.gpus) == count
    assert recorder.statuses() == [UP]


# --- psutil -------------------------------------------------------------------------------


async def test_system_readings_are_in_range() -> None:
    recorder = Recorder()
    sampler = ResourceSampler(interval=0.02, emit=recorder.emit)
    async with running(sampler):
        await recorder.next(ResourceSample, lambda _: len(recorder.samples()) == 3)
    total = psutil.virtual_memory().total
    for sample in recorder.samples():
        assert sample.cpu_percent is not None and 0.0 <= sample.cpu_percent <= 100.0
        assert sample.ram_total == total
        assert sample.ram_used is not None and 0 < sample.ram_used <= total
        assert (sample.comfyui_cpu_percent, sample.comfyui_rss) == (None, None)


async def test_comfyui_found_by_its_listening_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert find_listening_pid(port) == os.getpid()
        recorder = Recorder()
        sampler = ResourceSampler(interval=0.02, comfyui_port=port, emit=recorder.emit)
        async with running(sampler):
            await recorder.next(ResourceSample, lambda _: len(recorder.samples()) == 3)
            assert sampler.comfyui_pid == os.getpid()
    first, *later = recorder.samples()
    assert first.comfyui_cpu_percent is None
    assert first.comfyui_rss is not None and first.comfyui_rss > 0
    for sample in later:
        assert sample.comfyui_cpu_percent is not None and sample.comfyui_cpu_percent >= 0.0
        assert sample.comfyui_rss is not None and sample.comfyui_rss > 0


async def test_nothing_listening_means_unknown(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        assert find_listening_pid(port) is None
        recorder = Recorder()
        sampler = ResourceSampler(interval=0.005, comfyui_port=port, emit=recorder.emit)
        with caplog.at_level(logging.INFO, logger="tower_progress.sources.resources"):
            async with running(sampler):
                await recorder.next(ResourceSample, lambda _: len(recorder.samples()) == 5)
    assert {(s.comfyui_cpu_percent, s.comfyui_rss) for s in recorder.samples()} == {(None, None)}
    assert sampler.comfyui_pid is None
    assert [r.getMessage() for r in caplog.records if "listens" in r.getMessage()] == [
        f"no process listens on port {port}; ComfyUI unknown"
    ]


LISTENER = (
    "import socket, sys\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


@asynccontextmanager
async def listener(port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """A separate process listening on ``port``, like ComfyUI; gone when the block ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LISTENER,
        str(port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert await proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        proc.stdin.close()
        await proc.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_comfyui_restart_is_followed_to_the_new_pid() -> None:
    port = free_port()
    recorder = Recorder()
    sampler = ResourceSampler(interval=0.01, comfyui_port=port, emit=recorder.emit)
    async with running(sampler):
        async with listener(port) as first:
            await recorder.next(ResourceSample, lambda s: s.comfyui_rss is not None)
            assert sampler.comfyui_pid == first.pid
        await recorder.next(ResourceSample, lambda s: s.comfyui_rss is None)
        assert sampler.comfyui_pid is None
        async with listener(port) as second:
            await recorder.next(ResourceSample, lambda s: s.comfyui_rss is not None)
            assert sampler.comfyui_pid == second.pid
    assert first.pid != second.pid


async def test_explicit_pid_is_used_and_not_reattached_after_exit() -> None:
    recorder = Recorder()
    sampler = ResourceSampler(interval=0.01, comfyui_pid=os.getpid(), emit=recorder.emit)
    async with running(sampler):
        sample = await recorder.next(ResourceSample)
    assert sample.comfyui_rss is not None and sample.comfyui_rss > 0
    assert sampler.comfyui_pid == os.getpid()

    async with listener(free_port()) as gone:
        pass
    recorder = Recorder()
    sampler = ResourceSampler(interval=0.005, comfyui_pid=gone.pid, emit=recorder.emit)
    async with running(sampler):
        await recorder.next(ResourceSample, lambda _: len(recorder.samples()) == 3)
    assert {(s.comfyui_cpu_percent, s.comfyui_rss) for s in recorder.samples()} == {(None, None)}
    assert sampler.comfyui_pid is None
