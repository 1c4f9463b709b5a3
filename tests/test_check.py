"""``tower-progress check`` against real parts that fail: every failure is one ``FAIL`` line
naming the reason, exit code 1, and never a traceback.

The session database trusts local connections, so a wrong password cannot be refused; a role
that does not exist stands for the credentials the server turns away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from daemon_process import ComfyServer, daemon_env, free_port, run_cli

from tower_progress.simulate.server import FakeComfyUI


@pytest.fixture
async def comfy() -> AsyncIterator[ComfyServer]:
    server = await ComfyServer(FakeComfyUI(speed=0.02, seed=3)).start()
    yield server
    await server.stop()


async def check(env: dict[str, str]) -> list[str]:
    code, out, err = await run_cli("check", env=env)
    assert "Traceback" not in out + err, out + err
    assert code == 1, out + err
    return out.splitlines()


async def answering(body: bytes) -> web.AppRunner:
    async def system_stats(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/system_stats", system_stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


async def test_a_database_port_with_nothing_listening_is_one_line(
    home: Path, comfy: ComfyServer
) -> None:
    port = free_port()
    dsn = f"postgresql://tp:secret@127.0.0.1:{port}/tp"
    lines = await check(daemon_env(home, free_port(), database_url=dsn, comfyui_url=comfy.url))
    assert lines[1] == (
        f"FAIL database: 127.0.0.1:{port}/tp: ConnectionRefusedError: "
        f"[Errno 111] Connect call failed ('127.0.0.1', {port})"
    )
    assert [line[:4] for line in lines] == ["ok  ", "FAIL", "ok  ", "ok  "]


async def test_credentials_the_database_refuses_are_one_line(
    home: Path, comfy: ComfyServer, pg_dsn: str
) -> None:
    dsn = pg_dsn.replace("postgres:@", "tp_nobody:secret@", 1)
    lines = await check(daemon_env(home, free_port(), database_url=dsn, comfyui_url=comfy.url))
    where = dsn.rsplit("@", 1)[-1]
    assert lines[1] == (
        f'FAIL database: {where}: InvalidAuthorizationSpecificationError: role "tp_nobody" '
        "does not exist"
    )


async def test_a_state_directory_the_embedded_server_refuses_is_one_line(
    home: Path, comfy: ComfyServer
) -> None:
    (home / "file").write_text("not a directory")
    state = home / "file" / "state"
    env = daemon_env(home, free_port(), comfyui_url=comfy.url) | {
        "TOWER_PROGRESS_STATE_DIR": str(state)
    }
    lines = await check(env)
    assert (
        lines[1] == f"FAIL database: state directory {state}: [Errno 20] Not a directory: '{state}'"
    )


async def test_comfyui_down_is_one_line(home: Path, pg_dsn: str) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    lines = await check(daemon_env(home, free_port(), database_url=pg_dsn, comfyui_url=nowhere))
    assert lines[2].startswith(f"FAIL comfyui local: {nowhere} unreachable: Cannot connect to host")
    assert [line[:4] for line in lines] == ["ok  ", "ok  ", "FAIL", "ok  "]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>proxy error</html>", "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"),
        (b"[1, 2]", "TypeError: list indices must be integers or slices, not str"),
        (b'{"status": "ok"}', "KeyError: 'system'"),
        (b'{"system": "1.0"}', "AttributeError: 'str' object has no attribute 'get'"),
        (
            b"\x80\x81",
            "UnicodeDecodeError: 'utf-8' codec can't decode byte 0x80 in position 0: "
            "invalid start byte",
        ),
    ],
)
async def test_comfyui_answering_garbage_is_one_line(
    home: Path, pg_dsn: str, body: bytes, reason: str
) -> None:
    runner = await answering(body)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        lines = await check(daemon_env(home, free_port(), database_url=pg_dsn, comfyui_url=url))
    finally:
        await runner.cleanup()
    assert lines[2] == f"FAIL comfyui local: {url}/system_stats is not ComfyUI's answer ({reason})"
