"""Resource sampler: system and ComfyUI-process load from psutil, per-GPU readings from NVML.

Three parts, split so the arithmetic is testable without a GPU:

- :func:`parse_gpu` is pure: one raw per-GPU reading (the dict shape recorded in
  ``tests/fixtures/nvml/nvml-h100.jsonl``) becomes a :class:`GpuSample`.
- :class:`NvmlReader` is thin and blocking: it calls pynvml and produces those raw dicts.
- :class:`ResourceSampler` is the async fixed-rate loop: it runs the reader off the event loop
  with a timeout, adds psutil readings, and emits ``ResourceSample``/``SourceStatus`` observations.

No GPU or no NVML library is a normal state (``gpu_status == "no GPU"``), not an error.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import psutil
import pynvml

from tower_progress.clock import wait_for_tick
from tower_progress.core.model import GpuSample, Observation, ResourceSample, SourceStatus

log = logging.getLogger(__name__)

RawGpu = dict[str, Any]
"""One GPU's raw reading: a field NVML refused is ``{"error": "<NVMLError class>", "str": ...}``."""

SOURCE_NAME = "resources"
GPU_OK = "ok"
NO_GPU = "no GPU"
NVML_HUNG = "NVML not responding"
NVML_FAILED = "NVML error"

_T = TypeVar("_T")
_RESOLVE_BACKOFF_CAP_S = 30.0


class GpuUnavailable(Exception):
    """NVML cannot be used on this machine (no library, no driver, no GPU): a normal state."""


class GpuReader(Protocol):
    """Blocking access to GPU readings; every method may block on a wedged driver."""

    def open(self) -> int:
        """Initialise and return the GPU count; raise :class:`GpuUnavailable` when there is none."""
        ...

    def read(self) -> list[RawGpu]:
        """One raw reading per GPU, in index order; a refused field is an error marker."""
        ...

    def close(self) -> None: ...


# --- parsing (pure) -----------------------------------------------------------------------


def parse_gpu(index: int, raw: Mapping[str, Any], comfyui_pid: int | None = None) -> GpuSample:
    """Turn one raw per-GPU reading into a :class:`GpuSample`.

    A refused field (an ``{"error": ...}`` marker) becomes None and the rest of the sample stays.
    A malformed value (wrong type, negative) also becomes None, with a warning naming it.
    Power is converted from milliwatts to watts. ``vram_used`` is whatever the reader put in
    ``memory.used``; :class:`NvmlReader` documents which NVML call that is.
    ``comfyui_vram`` sums the compute-process entries whose pid is ``comfyui_pid``; it is None
    when that pid is not listed, because NVML may report pids from another pid namespace (a
    container), so absence from the list does not prove the process holds no memory.
    """
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        if not _refused(name):
            _malformed(index, "name", name)
        name = f"GPU {index}"
    utilization = _section(index, raw, "utilization")
    memory = _section(index, raw, "memory")
    power_mw = _number(index, "power_mw", raw.get("power_mw"))
    power_limit_mw = _number(index, "power_limit_mw", raw.get("power_limit_mw"))
    return GpuSample(
        index=index,
        name=name,
        utilization=_number(index, "utilization.gpu", utilization.get("gpu")),
        memory_utilization=_number(index, "utilization.memory", utilization.get("memory")),
        vram_used=_integer(index, "memory.used", memory.get("used")),
        vram_total=_integer(index, "memory.total", memory.get("total")),
        temperature_c=_number(index, "temperature_c", raw.get("temperature_c")),
        power_w=None if power_mw is None else power_mw / 1000,
        power_limit_w=None if power_limit_mw is None else power_limit_mw / 1000,
        fan_percent=_number(index, "fan_percent", raw.get("fan_percent")),
        comfyui_vram=_process_vram(index, raw.get("compute_procs"), comfyui_pid),
    )


def _refused(value: object) -> bool:
    return isinstance(value, Mapping) and "error" in value


def _malformed(index: int, field: str, value: object) -> None:
    log.warning("GPU %d: ignoring malformed NVML value for %s: %r", index, field, value)


def _section(index: int, raw: Mapping[str, Any], field: str) -> Mapping[str, Any]:
    value = raw.get(field)
    if isinstance(value, Mapping) and not _refused(value):
        return value
    if value is not None and not _refused(value):
        _malformed(index, field, value)
    return {}


def _number(index: int, field: str, value: object) -> float | None:
    if value is None or _refused(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _malformed(index, field, value)
        return None
    if value < 0:
        _malformed(index, field, value)
        return None
    return float(value)


def _integer(index: int, field: str, value: object) -> int | None:
    if value is None or _refused(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _malformed(index, field, value)
        return None
    return value


def _process_vram(index: int, procs: object, pid: int | None) -> int | None:
    if pid is None or procs is None or _refused(procs):
        return None
    if not isinstance(procs, Sequence) or isinstance(procs, str):
        _malformed(index, "compute_procs", procs)
        return None
    found = False
    total = 0
    for entry in procs:
        if not isinstance(entry, Mapping):
            _malformed(index, "compute_procs", entry)
            continue
        if entry.get("pid") != pid:
            continue
        used = _integer(index, "compute_procs.used_gpu_memory", entry.get("used_gpu_memory"))
        if used is not None:
            found = True
            total += used
    return total if found else None


# --- NVML reader (blocking) ---------------------------------------------------------------


class NvmlReader:
    """Reads every GPU through pynvml; blocking, so callers run it off the event loop.

    Memory: ``nvmlDeviceGetMemoryInfo_v2`` when the driver has it, because v1 counts memory the
    driver reserves for itself as "used" (~480 MiB on an idle H100 where nvidia-smi shows 0),
    which would show a busy card where none is. When v2 is refused the reader falls back to v1
    for good and logs that once; the raw ``memory`` dict carries ``"version"`` to say which.
    Temperature likewise prefers ``nvmlDeviceGetTemperatureV`` over the deprecated call.
    Power limit is the enforced limit (what nvidia-smi shows as the cap).
    Each refused field is logged once per GPU and error class (DEBUG for NotSupported, which is
    normal, e.g. the fan of a data-centre GPU; WARNING otherwise).
    """

    def __init__(self) -> None:
        self._count = 0
        self._memory_v2 = hasattr(pynvml, "nvmlMemory_v2")
        self._temperature_v = hasattr(pynvml, "nvmlDeviceGetTemperatureV")
        self._reported: set[tuple[int, str, str]] = set()

    def open(self) -> int:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(f"{type(exc).__name__}: {exc}") from exc
        try:
            self._count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            self.close()
            raise GpuUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return self._count

    def read(self) -> list[RawGpu]:
        return [self._read_one(index) for index in range(self._count)]

    def close(self) -> None:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.warning("nvmlShutdown failed: %s: %s", type(exc).__name__, exc)

    def _read_one(self, index: int) -> RawGpu:
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as exc:
            marker = self._marker(index, "handle", exc)
            return {field: marker for field in _RAW_FIELDS}
        raw: RawGpu = {
            "name": self._call(index, "name", lambda: _text(pynvml.nvmlDeviceGetName(handle))),
            "uuid": self._call(index, "uuid", lambda: _text(pynvml.nvmlDeviceGetUUID(handle))),
            "utilization": self._call(index, "utilization", lambda: _utilization(handle)),
            "memory": self._call(index, "memory", lambda: self._memory(handle)),
            "temperature_c": self._call(index, "temperature_c", lambda: self._temperature(handle)),
            "power_mw": self._call(
                index, "power_mw", lambda: pynvml.nvmlDeviceGetPowerUsage(handle)
            ),
            "power_limit_mw": self._call(
                index, "power_limit_mw", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)
            ),
            "fan_percent": self._call(
                index, "fan_percent", lambda: pynvml.nvmlDeviceGetFanSpeed(handle)
            ),
            "compute_procs": self._call(index, "compute_procs", lambda: _processes(handle)),
        }
        return raw

    def _call(self, index: int, field: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except pynvml.NVMLError as exc:
            return self._marker(index, field, exc)

    def _marker(self, index: int, field: str, exc: Exception) -> dict[str, str]:
        kind = type(exc).__name__
        if (index, field, kind) not in self._reported:
            self._reported.add((index, field, kind))
            level = (
                logging.DEBUG if isinstance(exc, pynvml.NVMLError_NotSupported) else logging.WARNING
            )
            log.log(level, "GPU %d: NVML refused %s: %s: %s", index, field, kind, exc)
        return {"error": kind, "str": str(exc)}

    def _memory(self, handle: Any) -> dict[str, int]:
        if self._memory_v2:
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
            except pynvml.NVMLError as exc:
                self._memory_v2 = False
                log.info(
                    "nvmlDeviceGetMemoryInfo_v2 unavailable (%s); VRAM used now includes "
                    "driver-reserved memory",
                    type(exc).__name__,
                )
            else:
                return {
                    "total": info.total,
                    "used": info.used,
                    "free": info.free,
                    "reserved": info.reserved,
                    "version": 2,
                }
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"total": info.total, "used": info.used, "free": info.free, "version": 1}

    def _temperature(self, handle: Any) -> int:
        if self._temperature_v:
            try:
                return int(pynvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU))
            except pynvml.NVMLError as exc:
                self._temperature_v = False
                log.info("nvmlDeviceGetTemperatureV unavailable (%s)", type(exc).__name__)
        return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))


_RAW_FIELDS = (
    "name",
    "uuid",
    "utilization",
    "memory",
    "temperature_c",
    "power_mw",
    "power_limit_mw",
    "fan_percent",
    "compute_procs",
)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _utilization(handle: Any) -> dict[str, int]:
    rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
    return {"gpu": rates.gpu, "memory": rates.memory}


def _processes(handle: Any) -> list[dict[str, int | None]]:
    return [
        {"pid": proc.pid, "used_gpu_memory": proc.usedGpuMemory}
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    ]


# --- ComfyUI process (psutil) -------------------------------------------------------------


def find_listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (lowest pid if several), or None.

    Mapping a socket to its pid needs read access to the owner's ``/proc/<pid>/fd``: as a
    different unprivileged user the owner stays unknown, so configure the pid explicitly there.
    """
    pids = {
        conn.pid
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
        and conn.laddr
        and conn.laddr.port == port
        and conn.pid is not None
    }
    return min(pids) if pids else None


class _ComfyProcess:
    """Follows the ComfyUI process: an explicit pid first, then whoever listens on the port.

    When the process exits it is looked up again at once, then with capped, jittered
    exponential backoff while nothing is found (a port scan reads every process's fds); finding
    it resets the backoff. An explicit pid without a port is not reattached after it exits: the
    number may be reused by an unrelated process.
    """

    def __init__(self, port: int | None, pid: int | None, base_delay: float) -> None:
        self._port = port
        self._explicit_pid = pid
        self._base_delay = base_delay
        self._proc: psutil.Process | None = None
        self._fresh = False
        self._failures = 0
        self._next_attempt = math.inf if port is None and pid is None else -math.inf
        self._complained = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def sample(self, now: float) -> tuple[float | None, int | None]:
        """CPU percent (of one core, like top) and RSS; CPU is None on the first reading."""
        if self._proc is None and now >= self._next_attempt:
            await self._resolve(now)
        proc = self._proc
        if proc is None:
            return None, None
        try:
            if not proc.is_running():
                raise psutil.NoSuchProcess(proc.pid)
            with proc.oneshot():
                cpu = proc.cpu_percent(interval=None)
                rss = int(proc.memory_info().rss)
        except psutil.NoSuchProcess:
            log.info("ComfyUI process %d exited", proc.pid)
            self._proc = None
            self._failures = 0
            self._next_attempt = now if self._port is not None else math.inf
            return None, None
        except psutil.Error as exc:
            self._complain(logging.WARNING, f"ComfyUI process {proc.pid} cannot be read: {exc}")
            self._proc = None
            self._retry_later(now)
            return None, None
        self._complained = False
        self._failures = 0
        if self._fresh:
            self._fresh = False
            return None, rss
        return cpu, rss

    async def _resolve(self, now: float) -> None:
        pid, self._explicit_pid = self._explicit_pid, None
        if pid is None and self._port is not None:
            pid = await asyncio.to_thread(find_listening_pid, self._port)
        if pid is None:
            self._complain(
                logging.INFO, f"no process listens on port {self._port}; ComfyUI unknown"
            )
        else:
            try:
                proc = psutil.Process(pid)
                proc.cpu_percent(interval=None)
            except psutil.Error as exc:
                self._complain(logging.WARNING, f"ComfyUI process {pid} cannot be read: {exc}")
            else:
                self._proc = proc
                self._fresh = True
                log.info("following ComfyUI process %d", pid)
                return
        self._retry_later(now)

    def _retry_later(self, now: float) -> None:
        if self._port is None:
            self._next_attempt = math.inf
            return
        delay = min(_RESOLVE_BACKOFF_CAP_S, self._base_delay * 2 ** min(self._failures, 32))
        self._failures += 1
        self._next_attempt = now + delay * random.uniform(0.5, 1.0)

    def _complain(self, level: int, message: str) -> None:
        """Log the first failure of a streak, not every retry; a good reading ends the streak."""
        if not self._complained:
            self._complained = True
            log.log(level, "%s", message)


# --- GPU side: one call in flight at a time, with a timeout ------------------------------


def _in_daemon_thread(fn: Callable[[], _T]) -> asyncio.Future[_T]:
    """Run ``fn`` in a fresh daemon thread and return a future for its result.

    Not ``asyncio.to_thread``: its executor is joined when the loop closes and when the
    interpreter exits, so one NVML call hung in the driver would keep the daemon from exiting.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except Exception as exc:
            deliver = functools.partial(_set_exception, future, exc)
        else:
            deliver = functools.partial(_set_result, future, result)
        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:
            log.debug("NVML call returned after the event loop closed")

    threading.Thread(target=target, name="nvml", daemon=True).start()
    return future


def _set_result(future: asyncio.Future[_T], result: _T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


class _GpuPoller:
    """Owns the reader: opens it once, reads it, closes it; never more than one call pending.

    ``problem`` is None while NVML answers (or is simply absent) and a one-line reason while a
    call hangs or a read fails; the sampler turns it into the source's up/down status.
    """

    def __init__(self, reader: GpuReader, timeout: float) -> None:
        self._reader = reader
        self._timeout = timeout
        self._opened = False
        self._unusable: str | None = None
        self._pending: asyncio.Future[Any] | None = None
        self._status = GPU_OK
        self.problem: str | None = None

    async def poll(self, comfyui_pid: int | None) -> tuple[tuple[GpuSample, ...], str]:
        """This tick's GPU samples and ``gpu_status``."""
        if self._pending is not None:
            if not self._pending.done():
                return (), self._status
            late, self._pending = self._pending, None
            if not self._opened:
                self._settle_open(late)
            elif not late.cancelled() and late.exception() is not None:
                log.debug("late NVML call failed: %s", late.exception())
        if self._unusable is not None:
            return (), self._unusable
        if not self._opened:
            opened = await self._call(self._reader.open)
            if opened is None:
                return (), self._status
            self._settle_open(opened)
            if self._unusable is not None:
                return (), self._unusable
        reading = await self._call(self._reader.read)
        if reading is None:
            return (), self._status
        try:
            raw = reading.result()
        except Exception as exc:
            self._fail(f"NVML read failed: {type(exc).__name__}: {exc}", NVML_FAILED)
            return (), self._status
        self._recover()
        return tuple(parse_gpu(i, entry, comfyui_pid) for i, entry in enumerate(raw)), GPU_OK

    async def close(self) -> None:
        if self._pending is not None and not self._pending.done():
            log.warning("an NVML call is still hung at shutdown; skipping nvmlShutdown")
            return
        if not self._opened:
            return
        self._opened = False
        closing = await self._call(self._reader.close)
        if closing is None:
            log.warning("nvmlShutdown did not return within %g s", self._timeout)
        elif (error := closing.exception()) is not None:
            log.warning("nvmlShutdown failed: %s: %s", type(error).__name__, error)

    async def _call(self, fn: Callable[[], _T]) -> asyncio.Future[_T] | None:
        """The finished future, or None when the call is still running after the timeout."""
        future = _in_daemon_thread(fn)
        try:
            done, _ = await asyncio.wait({future}, timeout=self._timeout)
        except asyncio.CancelledError:
            future.cancel()
            raise
        if done:
            return future
        self._pending = future
        self._fail(
            f"NVML call did not return within {self._timeout:g} s; GPU readings paused",
            NVML_HUNG,
        )
        return None

    def _settle_open(self, opened: asyncio.Future[int]) -> None:
        """Record the one and only init's outcome; any failure leaves NVML unused for good."""
        self._recover()
        if opened.cancelled():
            self._unusable = NVML_FAILED
            return
        error = opened.exception()
        if isinstance(error, GpuUnavailable):
            self._unusable = NO_GPU
            log.info('NVML unavailable (%s): resources show "no GPU"', error)
        elif error is not None:
            self._unusable = NVML_FAILED
            log.warning(
                "NVML init failed, GPU readings disabled: %s: %s", type(error).__name__, error
            )
        else:
            self._opened = True
            count = opened.result()
            if count <= 0:
                self._unusable = NO_GPU
                log.info('NVML reports no GPU: resources show "no GPU"')
            else:
                log.info("NVML ready: %d GPU(s)", count)

    def _fail(self, detail: str, status: str) -> None:
        if self.problem != detail:
            log.warning("%s", detail)
        self.problem = detail
        self._status = status

    def _recover(self) -> None:
        if self.problem is not None:
            log.info("NVML answers again")
        self.problem = None
        self._status = GPU_OK


# --- sampler ------------------------------------------------------------------------------


class ResourceSampler:
    """Emits a ``ResourceSample`` every ``interval`` seconds (on the loop clock's grid, see
    ``tower_progress.clock``) until ``stop`` is set.

    psutil gives system CPU % and RAM (used = total - available, what is really taken) and the
    ComfyUI process's CPU % and RSS (the pid listening on ``comfyui_port``, or ``comfyui_pid``).
    NVML calls run in a thread with ``nvml_timeout``: a hung call marks the source down
    (``SourceStatus("resources", False, detail)``) while psutil sampling continues, and no new
    NVML call starts until the hung one returns. ``SourceStatus("resources", True)`` is emitted
    once sampling works, and again after each recovery. NVML is initialised once and shut down
    when ``run`` ends; ``run`` returns within ``nvml_timeout`` of ``stop`` being set.
    """

    def __init__(
        self,
        *,
        interval: float = 2.0,
        comfyui_port: int | None = None,
        comfyui_pid: int | None = None,
        emit: Callable[[Observation], None],
        nvml: GpuReader | None = None,
        nvml_timeout: float = 5.0,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        if not nvml_timeout > 0:
            raise ValueError(f"nvml_timeout must be > 0 seconds, got {nvml_timeout!r}")
        self._interval = interval
        self._emit = emit
        self._process = _ComfyProcess(comfyui_port, comfyui_pid, interval)
        self._gpu = _GpuPoller(NvmlReader() if nvml is None else nvml, nvml_timeout)
        self._last_status: SourceStatus | None = None

    @property
    def comfyui_pid(self) -> int | None:
        """The ComfyUI process currently followed, if any."""
        return self._process.pid

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        psutil.cpu_percent(interval=None)
        try:
            while not await wait_for_tick(stop, self._interval):
                await self._sample(loop.time())
        finally:
            await self._gpu.close()

    async def _sample(self, now: float) -> None:
        comfyui_cpu, comfyui_rss = await self._process.sample(now)
        gpus, gpu_status = await self._gpu.poll(self._process.pid)
        memory = psutil.virtual_memory()
        self._emit(
            ResourceSample(
                cpu_percent=psutil.cpu_percent(interval=None),
                ram_used=int(memory.total - memory.available),
                ram_total=int(memory.total),
                comfyui_cpu_percent=comfyui_cpu,
                comfyui_rss=comfyui_rss,
                gpus=gpus,
                gpu_status=gpu_status,
            )
        )
        status = SourceStatus(SOURCE_NAME, self._gpu.problem is None, self._gpu.problem)
        if status != self._last_status:
            self._last_status = status
            self._emit(status)
