"""Fixed-rate timers on one grid of the event loop's clock.

Every periodic timer of the daemon (the tracker's tick, the resource sampler, history flushes,
write-back, the embedded database's supervisor, systemd's watchdog ping, paced ComfyUI reads)
falls due on whole multiples of its interval on the loop's clock, not an interval after it last
ran. Timers whose intervals divide one another then fall due at the same instant and share one
wake-up of the process, which on a render box's virtual machine costs more than the work each
one does. The rate cannot drift either: a late tick does not push the next ones back, and
ticks missed by an overrun are skipped rather than run in a burst. Waits that are not periodic
(a jittered backoff) use ``sleep_or_stop``; both end as soon as the daemon's stop event is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import math


def next_tick(now: float, interval: float) -> float:
    """The first multiple of ``interval`` later than ``now``."""
    tick = (math.floor(now / interval) + 1) * interval
    return tick if tick > now else tick + interval


async def wait_for_tick(stop: asyncio.Event, interval: float) -> bool:
    """Sleep until the next tick of ``interval`` or until ``stop`` is set; True when stopping."""
    return await _sleep_until(stop, next_tick(asyncio.get_running_loop().time(), interval))


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True as soon as ``stop`` is set (also when already set)."""
    return await _sleep_until(stop, asyncio.get_running_loop().time() + max(0.0, seconds))


async def _sleep_until(stop: asyncio.Event, when: float) -> bool:
    if not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(when):
                await stop.wait()
    return stop.is_set()
