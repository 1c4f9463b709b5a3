"""systemd service notifications (``sd_notify``) with the standard library only.

Under ``Type=notify`` systemd waits for ``READY=1`` before it considers the service started,
shows ``STATUS=`` in ``systemctl status``, restarts the service when ``WATCHDOG=1`` stops
arriving within ``WatchdogSec``, and knows a stop is orderly from ``STOPPING=1``. Outside
systemd (``$NOTIFY_SOCKET`` unset) every call is a no-op, so the daemon needs no special case.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from tower_progress.clock import wait_for_tick

log = logging.getLogger(__name__)


def watchdog_interval(env: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``, or None when not asked for.

    None when the variable is unset, or when ``$WATCHDOG_PID`` is set and names another process
    (the request was meant for a parent). A value that is not a positive integer is logged and
    ignored. ``pid`` defaults to this process.
    """
    raw_usec = env.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid is not None:
        own = os.getpid() if pid is None else pid
        if raw_pid.strip() != str(own):
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not a positive integer", raw_usec)
        return None
    return usec / 2_000_000


class Notifier:
    """Sends notifications to the socket systemd named in ``$NOTIFY_SOCKET``; a no-op without one.

    ``env`` (default: this process's environment) gives ``$NOTIFY_SOCKET``, a filesystem path or
    an abstract socket written with a leading ``@``, and the watchdog request read by
    :func:`watchdog_interval`. Each message opens its own socket, like ``sd_notify(3)``, so
    nothing stays open and nothing needs closing. Sending never raises: a lost notification is
    logged, because failing to tell systemd something must not take the service down (a missed
    watchdog ping will, on purpose).
    """

    def __init__(self, env: Mapping[str, str] = os.environ, pid: int | None = None) -> None:
        self.watchdog_interval = watchdog_interval(env, pid)
        self._address: str | None = None
        self._stopping = False
        address = env.get("NOTIFY_SOCKET")
        if not address:
            return
        if address[0] == "@":
            self._address = "\0" + address[1:]
        elif address[0] == "/":
            self._address = address
        else:
            log.warning(
                "ignoring NOTIFY_SOCKET=%r: neither an absolute path nor @abstract", address
            )

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        """One line for ``systemctl status``; newlines would end the assignment, so they go."""
        self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        """Say the shutdown has begun; only the first call sends."""
        if not self._stopping:
            self._stopping = True
            self._send("STOPPING=1")

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.warning("systemd notification %r not delivered: %s", message.split("=")[0], exc)


async def watchdog_loop(notifier: Notifier, stop: asyncio.Event) -> None:
    """Ping the watchdog every ``notifier.watchdog_interval`` seconds until ``stop`` is set.

    The pings come from the event loop itself, so a loop that is stuck (a blocking call, a busy
    coroutine) stops them and systemd restarts the service. They fall due on the loop clock's
    grid (:mod:`tower_progress.clock`), sharing a wake-up with the daemon's other timers.
    Returns at once when systemd asked for no watchdog.
    """
    interval = notifier.watchdog_interval
    if interval is None or not notifier.enabled:
        return
    notifier.watchdog()
    while not await wait_for_tick(stop, interval):
        notifier.watchdog()
