"""systemd notifications: exact datagrams on a real AF_UNIX socket the test binds."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tower_progress.sdnotify import Notifier, watchdog_interval, watchdog_loop


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and its ``$NOTIFY_SOCKET`` value."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def received(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(4096) for _ in range(count)]


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_every_message_on_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    try:
        assert notifier.enabled
        notifier.ready()
        notifier.status("3 jobs running,\n1 queued")
        notifier.watchdog()
        notifier.stopping()
    finally:
        notifier.close()
    assert received(sock, 4) == [
        b"READY=1",
        b"STATUS=3 jobs running, 1 queued",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]
    assert nothing_waiting(sock)


def test_abstract_socket() -> None:
    name = f"tower-progress-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        try:
            notifier.ready()
            notifier.status("ünïcode ✓")
        finally:
            notifier.close()
        assert received(sock, 2) == [b"READY=1", "STATUS=ünïcode ✓".encode()]


def test_unset_socket_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.status("anything")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()


def test_relative_address_is_refused_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "run/notify"})
    assert not notifier.enabled
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring NOTIFY_SOCKET='run/notify': neither an absolute path nor @abstract"
    ]


def test_vanished_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    try:
        notifier.ready()
    finally:
        notifier.close()
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert caplog.records[0].getMessage().startswith("systemd notification 'READY' not delivered")


def test_watchdog_interval_is_half_the_period() -> None:
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "42"}, pid=42) == 0.0005
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_PID": str(pid)}) is None


@pytest.mark.parametrize("value", ["", "0", "-5", "30s"])
def test_bad_watchdog_usec_is_ignored(value: str, caplog: pytest.LogCaptureFixture) -> None:
    assert watchdog_interval({"WATCHDOG_USEC": value}) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"ignoring WATCHDOG_USEC={value!r}: not a positive integer"
    ]


def test_from_env_carries_the_watchdog_interval(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})
    notifier.close()
    assert notifier.watchdog_interval == 5.0


async def test_watchdog_loop_pings_until_stopped(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    notifier = Notifier(path, watchdog_interval=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(notifier, stop))
    try:
        async with asyncio.timeout(10):
            pings = [await loop.sock_recv(sock, 4096) for _ in range(3)]
    finally:
        stop.set()
        await task
        notifier.close()
    assert pings == [b"WATCHDOG=1"] * 3


async def test_watchdog_loop_returns_when_no_watchdog_was_asked_for(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    notifier = Notifier(path)
    try:
        await watchdog_loop(notifier, asyncio.Event())
    finally:
        notifier.close()
    await watchdog_loop(Notifier(None, watchdog_interval=1.0), asyncio.Event())
    assert nothing_waiting(sock)
