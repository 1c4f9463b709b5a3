"""Fixed-rate timers on one grid of the event loop's clock.

Every periodic timer of the daemon (the tracker's tick, the resource sampler, history flushes,
write-back, the embedded database's supervisor, systemd's watchdog ping, paced ComfyUI reads)
falls due on whole multiples of its interval on the loop's clock, not an interval after it last
ran. Timers whose intervals divide one another then fall due at the same instant and share one
wake-up of the process, which on a render box's virtual machine costs more than the work each
one does. The rate cannot drift either: a late tick does not push the
next ones back, and ticks missed by an overrun are skipped rather than run in a burst.
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
    when = next_tick(asyncio.get_running_loop().time(), interval)
    if not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(when):
                await stop.wait()
    return stop.is_set()
