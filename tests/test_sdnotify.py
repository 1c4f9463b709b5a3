"""systemd integration: notifications (exact datagrams on a real AF_UNIX socket the test binds)
and the unit file (its required settings, and ``systemd-analyze verify`` where installed)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
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
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready()
    notifier.status("3 jobs running,\n1 queued")
    notifier.watchdog()
    notifier.stopping()
    notifier.stopping()
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
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        notifier.status("ünïcode ✓")
        assert received(sock, 2) == [b"READY=1", "STATUS=ünïcode ✓".encode()]


def test_unset_socket_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.status("anything")
    notifier.watchdog()
    notifier.stopping()


def test_relative_address_is_refused_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "run/notify"})
    assert not notifier.enabled
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring NOTIFY_SOCKET='run/notify': neither an absolute path nor @abstract"
    ]


def test_vanished_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready()
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


def test_notifier_carries_the_watchdog_interval(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}
    assert Notifier(env, pid=7).watchdog_interval == 5.0
    assert Notifier(env, pid=8).watchdog_interval is None


async def test_watchdog_loop_pings_until_stopped(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert notifier.watchdog_interval == 0.01
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(notifier, stop))
    try:
        async with asyncio.timeout(10):
            pings = [await loop.sock_recv(sock, 4096) for _ in range(3)]
    finally:
        stop.set()
        await task
    assert pings == [b"WATCHDOG=1"] * 3


async def test_watchdog_loop_returns_when_no_watchdog_was_asked_for(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    await watchdog_loop(Notifier({"NOTIFY_SOCKET": path}), asyncio.Event())
    await watchdog_loop(Notifier({"WATCHDOG_USEC": "2000000"}), asyncio.Event())
    assert nothing_waiting(sock)


# --- the unit file ------------------------------------------------------------------------

UNIT = Path(__file__).parent.parent / "systemd" / "tower-progress.service"
EXEC = "/opt/tower-progress/.venv/bin/tower-progress"


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section -> key -> every value given, in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number} is not key=value in a section: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_file_has_the_required_settings() -> None:
    unit = unit_sections(UNIT.read_text())
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert all(len(values) == 1 for values in unit["Service"].values())
    required = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "ExecStart": f"{EXEC} serve --config /etc/tower-progress/config.toml",
        "Restart": "on-failure",
        "RestartSec": "2",
        "RestartPreventExitStatus": "2",
        "TimeoutStopSec": "10",
        "User": "tower-progress",
        "Group": "tower-progress",
        "DynamicUser": "no",
        "StateDirectory": "tower-progress",
        "EnvironmentFile": "-/etc/tower-progress/env",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: service.get(key) for key in required} == required
    assert service["MemoryMax"].endswith("G") and int(service["MemoryMax"][:-1]) >= 1
    hides_what_nvml_or_psutil_need = (
        "PrivateDevices",
        "ProtectClock",
        "DeviceAllow",
        "DevicePolicy",
        "ProcSubset",
        "ProtectProc",
    )
    assert [key for key in hides_what_nvml_or_psutil_need if key in service] == []
    assert unit["Install"] == {"WantedBy": ["multi-user.target"]}


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    entry_point = Path(sys.executable).parent / "tower-progress"
    binary = entry_point if entry_point.exists() else Path(sys.executable)
    text = UNIT.read_text()
    assert text.count(EXEC) == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(EXEC, str(binary)))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    about_unit = [
        line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line
    ]
    assert (result.returncode, about_unit) == (0, [])
