"""``tower-progress check``: one line per dependency, so an operator sees what is wrong.

Each check returns ``(name, ok, detail)`` and never raises: whatever goes wrong (a database
that refuses, an embedded server that cannot start, a ComfyUI that answers garbage) is one
line naming the reason. A missing GPU is reported as the normal "no GPU" state, not a failure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import asyncpg

from tower_progress.config import ComfyInstance, Settings
from tower_progress.sources.database import EmbeddedPostgres, EmbeddedPostgresError, SchemaError
from tower_progress.sources.db_retry import describe
from tower_progress.sources.db_table import describe_table
from tower_progress.sources.resources import GpuUnavailable, NvmlReader

Result = tuple[str, bool, str]
REQUIRED = ("id", "status")
_DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
    ValueError,
)


async def run_checks(settings: Settings) -> list[Result]:
    results: list[Result] = [("config", True, "settings are valid")]
    results.append(await _guarded("database", _database(settings)))
    for instance in settings.comfyui:
        results.append(await _guarded(f"comfyui {instance.name}", _comfyui(instance)))
    results.append(await _guarded("nvml", asyncio.to_thread(_nvml)))
    return results


async def _guarded(name: str, check: Awaitable[Result]) -> Result:
    """The check's result; a failure it did not foresee is still one line, not a traceback."""
    try:
        return await check
    except Exception as exc:
        return (name, False, f"check failed unexpectedly: {describe(exc)}")


async def _database(settings: Settings) -> Result:
    embedded: EmbeddedPostgres | None = None
    dsn = settings.database_url
    where = "embedded" if dsn is None else dsn.rsplit("@", 1)[-1]
    try:
        if dsn is None:
            embedded = EmbeddedPostgres()
            dsn = await asyncio.to_thread(embedded.start, Path(settings.state_dir) / "postgres")
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            info = await describe_table(conn, settings.jobs_table)
        finally:
            await conn.close()
        missing = [
            f"{field} ({settings.columns[field]})"
            for field in REQUIRED
            if settings.columns[field] not in info.columns
        ]
        if missing:
            return ("database", False, f"{info.display} lacks required {', '.join(missing)}")
        return ("database", True, f"{info.display} on {where}, {len(info.columns)} columns")
    except (EmbeddedPostgresError, SchemaError) as exc:
        return ("database", False, str(exc))
    except _DATABASE_ERRORS as exc:
        return ("database", False, f"{where}: {describe(exc)}")
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _comfyui(instance: ComfyInstance) -> Result:
    name = f"comfyui {instance.name}"
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{instance.url}/system_stats") as response,
        ):
            if response.status != 200:
                return (name, False, f"{instance.url}/system_stats answered {response.status}")
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return (name, False, f"{instance.url} unreachable: {exc or type(exc).__name__}")
    try:
        system = json.loads(body)["system"]
        version = system.get("comfyui_version", "unknown version")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = describe(exc)
        return (name, False, f"{instance.url}/system_stats is not ComfyUI's answer ({reason})")
    return (name, True, f"{instance.url} is ComfyUI {version}")


def _nvml() -> Result:
    reader = NvmlReader()
    try:
        count = reader.open()
    except GpuUnavailable as exc:
        return ("nvml", True, f"no GPU ({exc})")
    try:
        names = ", ".join(str(gpu.get("name")) for gpu in reader.read())
        return ("nvml", True, f"{count} GPU(s): {names}")
    except Exception as exc:
        return ("nvml", False, f"NVML read failed: {exc}")
    finally:
        reader.close()
