"""``tower-progress check``: one line per dependency, so an operator sees what is wrong.

Each check returns ``(name, ok, detail)`` and never raises; a missing GPU is reported as the
normal "no GPU" state, not a failure.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import asyncpg

from tower_progress.config import ComfyInstance, Settings
from tower_progress.sources.database import EmbeddedPostgres, SchemaError
from tower_progress.sources.db_table import describe_table
from tower_progress.sources.resources import GpuUnavailable, NvmlReader

Result = tuple[str, bool, str]
REQUIRED = ("id", "status")


async def run_checks(settings: Settings) -> list[Result]:
    results: list[Result] = [("config", True, "settings are valid")]
    results.append(await _database(settings))
    for instance in settings.comfyui:
        results.append(await _comfyui(instance))
    results.append(await asyncio.to_thread(_nvml))
    return results


async def _database(settings: Settings) -> Result:
    embedded: EmbeddedPostgres | None = None
    try:
        dsn = settings.database_url
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
        where = "embedded" if embedded else dsn.rsplit("@", 1)[-1]
        return ("database", True, f"{info.display} on {where}, {len(info.columns)} columns")
    except (OSError, asyncpg.PostgresError, SchemaError, TimeoutError) as exc:
        return ("database", False, str(exc) or type(exc).__name__)
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
            body = await response.json(content_type=None)
        system = body.get("system", {}) if isinstance(body, dict) else {}
        version = system.get("comfyui_version", "unknown version")
        return (name, True, f"{instance.url} is ComfyUI {version}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return (name, False, f"{instance.url} unreachable: {exc or type(exc).__name__}")


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
