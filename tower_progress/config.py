"""Settings from a TOML file overridden by ``TOWER_PROGRESS_*`` environment variables.

Every setting is declared once in ``SPECS`` (its TOML key, environment variable, default, and a
parser that says what is allowed), so the README table, validation and error messages agree.
A bad value raises ``ConfigError`` whose message is one line naming the key, the value and
what is allowed; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tower_progress.core.model import JobState

DEFAULT_CONFIG_PATH = Path("/etc/tower-progress/config.toml")
JOB_COLUMNS = (
    "id",
    "status",
    "comfyui_job_id",
    "title",
    "total_frames",
    "created_at",
    "updated_at",
)
WRITE_BACK_FIELDS = ("percent", "stage", "frames_done", "eta_s")


class ConfigError(Exception):
    """A setting has a value that is not allowed; ``str()`` is the one-line message."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"config error: {key} = {value!r} is not allowed: {allowed}")
        self.key = key


@dataclass(frozen=True, slots=True)
class ComfyInstance:
    name: str
    url: str
    client_id: str
    bridge: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8330
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    database_url: str | None = None
    jobs_table: str = "public.production_jobs"
    columns: Mapping[str, str] = field(default_factory=lambda: {c: c for c in JOB_COLUMNS})
    trigger: bool = True
    reconcile_interval_s: float = 30.0
    history_days: int = 30
    write_back: bool = False
    write_back_columns: Mapping[str, str] = field(default_factory=dict)
    comfyui: tuple[ComfyInstance, ...] = ()
    status_map: Mapping[str, JobState] = field(default_factory=dict)
    finished_cap: int = 500
    stall_factor: float = 5.0
    stall_min_s: float = 20.0
    progress_interval_s: float = 0.25
    resources_interval_s: float = 2.0
    comfyui_pid: int | None = None
    state_dir: Path = Path()
    log_level: str = "INFO"

    def redacted(self) -> dict[str, Any]:
        """Settings safe to log: secrets and credentials replaced."""
        return {
            "host": self.host,
            "port": self.port,
            "token": "***" if self.token else None,
            "database": _redact_url(self.database_url) if self.database_url else "embedded",
            "jobs_table": self.jobs_table,
            "comfyui": [f"{c.name}={c.url}" for c in self.comfyui],
            "state_dir": str(self.state_dir),
        }


# --- parsers: each returns the value or raises ValueError with "what is allowed" ----------


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = int(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not low <= number <= high or isinstance(value, float):
            raise ValueError(f"an integer from {low} to {high}")
        return number

    return parse


def _float_range(low: float, high: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not low <= number <= high:
            raise ValueError(f"a number from {low:g} to {high:g}")
        return number

    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError("true or false")


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("an IP address or host name")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", value):
            raise ValueError("an IP address or host name") from None
    return value


def _http_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("an http:// or https:// URL such as http://127.0.0.1:8188")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL such as http://127.0.0.1:8188")
    return value.rstrip("/")


def _pg_url(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or urlsplit(value).scheme not in ("postgres", "postgresql"):
        raise ValueError("a postgresql:// URL, or empty for the embedded database")
    return value


def _identifier(value: Any) -> str:
    pattern = r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?"
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise ValueError("a table name, optionally schema-qualified (schema.table)")
    return value


def _column(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", value):
        raise ValueError("a column name")
    return value


def _client_id(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", value):
        raise ValueError("1-128 letters, digits, '_', '.', ':' or '-'")
    return value


def _token(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) < 16:
        raise ValueError("a secret of at least 16 characters")
    return value


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("DEBUG, INFO, WARNING or ERROR")
    return value.upper()


def _hosts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("a list of host[:port] strings")
    return tuple(value)


def _optional_pid(value: Any) -> int | None:
    return None if value in (None, "", 0) else _int_range(1, 2**22)(value)


@dataclass(frozen=True, slots=True)
class Spec:
    key: str
    env: str
    attr: str
    parse: Callable[[Any], Any]
    help: str


SPECS: tuple[Spec, ...] = (
    Spec(
        "server.host",
        "TOWER_PROGRESS_HOST",
        "host",
        _host,
        "address to bind; anything but loopback needs a token",
    ),
    Spec("server.port", "TOWER_PROGRESS_PORT", "port", _int_range(1, 65535), "port to bind"),
    Spec(
        "server.token",
        "TOWER_PROGRESS_TOKEN",
        "token",
        _token,
        "bearer token for /ws, /api, /metrics (≥16 chars)",
    ),
    Spec(
        "server.allowed_hosts",
        "TOWER_PROGRESS_ALLOWED_HOSTS",
        "allowed_hosts",
        _hosts,
        "extra Host header values to accept (comma-separated in env)",
    ),
    Spec(
        "database.url",
        "TOWER_PROGRESS_DATABASE_URL",
        "database_url",
        _pg_url,
        "PostgreSQL URL; empty = embedded PostgreSQL in the state directory",
    ),
    Spec(
        "database.jobs_table",
        "TOWER_PROGRESS_JOBS_TABLE",
        "jobs_table",
        _identifier,
        "the production jobs table, schema-qualified allowed",
    ),
    Spec(
        "database.trigger",
        "TOWER_PROGRESS_DATABASE_TRIGGER",
        "trigger",
        _bool,
        "install the NOTIFY trigger (false = reconcile polling only)",
    ),
    Spec(
        "database.reconcile_interval_s",
        "TOWER_PROGRESS_RECONCILE_INTERVAL_S",
        "reconcile_interval_s",
        _float_range(1, 3600),
        "seconds between reconcile queries",
    ),
    Spec(
        "database.history_days",
        "TOWER_PROGRESS_HISTORY_DAYS",
        "history_days",
        _int_range(1, 3650),
        "days of samples and finished jobs to keep",
    ),
    Spec(
        "database.write_back",
        "TOWER_PROGRESS_WRITE_BACK",
        "write_back",
        _bool,
        "write derived progress into [database.write_back_columns]",
    ),
    Spec(
        "tracker.finished_cap",
        "TOWER_PROGRESS_FINISHED_CAP",
        "finished_cap",
        _int_range(10, 100_000),
        "finished jobs kept in memory (older ones stay in the database)",
    ),
    Spec(
        "tracker.stall_factor",
        "TOWER_PROGRESS_STALL_FACTOR",
        "stall_factor",
        _float_range(1.5, 1000),
        "stalled after this many typical step times without progress",
    ),
    Spec(
        "tracker.stall_min_s",
        "TOWER_PROGRESS_STALL_MIN_S",
        "stall_min_s",
        _float_range(1, 86400),
        "never stalled before this many seconds without progress",
    ),
    Spec(
        "tracker.progress_interval_s",
        "TOWER_PROGRESS_PROGRESS_INTERVAL_S",
        "progress_interval_s",
        _float_range(0, 10),
        "seconds between two progress-only updates of one job (0: every step)",
    ),
    Spec(
        "resources.interval_s",
        "TOWER_PROGRESS_RESOURCES_INTERVAL_S",
        "resources_interval_s",
        _float_range(0.1, 600),
        "seconds between CPU/GPU samples",
    ),
    Spec(
        "resources.comfyui_pid",
        "TOWER_PROGRESS_COMFYUI_PID",
        "comfyui_pid",
        _optional_pid,
        "ComfyUI's pid (default: found by its port)",
    ),
    Spec(
        "state_dir",
        "TOWER_PROGRESS_STATE_DIR",
        "state_dir",
        lambda v: Path(str(v)),
        "embedded database and state; default $STATE_DIRECTORY or $XDG_STATE_HOME/tower-progress",
    ),
    Spec("log_level", "TOWER_PROGRESS_LOG_LEVEL", "log_level", _log_level, "logging level"),
)
COMFY_SPECS: tuple[Spec, ...] = (
    Spec(
        "comfyui.url",
        "TOWER_PROGRESS_COMFYUI_URL",
        "url",
        _http_url,
        "ComfyUI base URL (first instance)",
    ),
    Spec(
        "comfyui.client_id",
        "TOWER_PROGRESS_COMFYUI_CLIENT_ID",
        "client_id",
        _client_id,
        "the daemon's own websocket client id (secret when the bridge is used)",
    ),
    Spec(
        "comfyui.name",
        "TOWER_PROGRESS_COMFYUI_NAME",
        "name",
        _client_id,
        "instance name shown on job cards",
    ),
    Spec(
        "comfyui.bridge",
        "TOWER_PROGRESS_COMFYUI_BRIDGE",
        "bridge",
        _bool,
        "the tower-progress bridge is installed in this ComfyUI",
    ),
)


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _parse(spec: Spec, value: Any, key: str | None = None) -> Any:
    try:
        return spec.parse(value)
    except ValueError as exc:
        raise ConfigError(key or spec.key, value, str(exc)) from None


def default_state_dir(env: Mapping[str, str], euid: int | None = None) -> Path:
    """``$STATE_DIRECTORY`` (systemd), else ``$XDG_STATE_HOME/tower-progress``; as root with
    neither, ``/var/lib/tower-progress``, because the embedded PostgreSQL runs as its own
    user and cannot enter ``/root``."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "tower-progress"
    if (os.geteuid() if euid is None else euid) == 0 or not env.get("HOME"):
        return Path("/var/lib/tower-progress")
    return Path(env["HOME"]) / ".local/state/tower-progress"


def load(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (``path``, else the default path when it exists), then the env."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is None and env.get("TOWER_PROGRESS_CONFIG"):
        path = Path(env["TOWER_PROGRESS_CONFIG"])
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError("--config", str(path), f"a readable file ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", str(path), f"valid TOML ({exc})") from None
    values: dict[str, Any] = {"state_dir": default_state_dir(env)}
    for spec in SPECS:
        raw = env.get(spec.env)
        if raw is not None:
            values[spec.attr] = _parse(spec, raw, spec.env)
        else:
            found = _lookup(data, spec.key)
            if found is not None:
                values[spec.attr] = _parse(spec, found)
    columns = {c: c for c in JOB_COLUMNS}
    columns.update(_column_table(data, "database.columns", JOB_COLUMNS))
    values["columns"] = columns
    values["write_back_columns"] = _column_table(
        data, "database.write_back_columns", WRITE_BACK_FIELDS
    )
    for name, column in values["write_back_columns"].items():
        if column in columns.values():
            raise ConfigError(
                f"database.write_back_columns.{name}",
                column,
                "a column the daemon does not read (not one of [database.columns])",
            )
    values["status_map"] = _status_map(data)
    values["comfyui"] = _instances(data, env)
    settings = Settings(**values)
    _check_bind(settings)
    if settings.write_back and not settings.write_back_columns:
        raise ConfigError(
            "database.write_back", True, "true only with a [database.write_back_columns] table"
        )
    return settings


def _column_table(data: Mapping[str, Any], key: str, keys: tuple[str, ...]) -> dict[str, str]:
    """A TOML table mapping some of ``keys`` to column names."""
    table = _lookup(data, key) or {}
    if not isinstance(table, Mapping):
        raise ConfigError(key, table, "a table of name = column")
    result: dict[str, str] = {}
    for name, column in table.items():
        if name not in keys:
            raise ConfigError(f"{key}.{name}", column, f"one of the keys {', '.join(keys)}")
        try:
            result[name] = _column(column)
        except ValueError as exc:
            raise ConfigError(f"{key}.{name}", column, str(exc)) from None
    return result


def _status_map(data: Mapping[str, Any]) -> dict[str, JobState]:
    table = _lookup(data, "tracker.status_map") or {}
    if not isinstance(table, Mapping):
        raise ConfigError("tracker.status_map", table, "a table of status = state")
    states = ", ".join(s.value for s in JobState)
    result: dict[str, JobState] = {}
    for status, state in table.items():
        if state not in {s.value for s in JobState}:
            raise ConfigError(f"tracker.status_map.{status}", state, f"one of {states}")
        result[str(status)] = JobState(state)
    return result


def _instances(data: Mapping[str, Any], env: Mapping[str, str]) -> tuple[ComfyInstance, ...]:
    tables = data.get("comfyui", [{}])
    if isinstance(tables, Mapping):
        tables = [tables]
    if (
        not isinstance(tables, list)
        or not tables
        or not all(isinstance(t, Mapping) for t in tables)
    ):
        raise ConfigError("comfyui", tables, "one or more [[comfyui]] tables")
    default_id = f"tower-progress-{socket.gethostname()}"
    instances: list[ComfyInstance] = []
    for index, table in enumerate(tables):
        values: dict[str, Any] = {
            "name": "local" if index == 0 else f"comfyui{index + 1}",
            "url": "http://127.0.0.1:8188",
            "client_id": default_id,
            "bridge": False,
        }
        for spec in COMFY_SPECS:
            field_name = spec.key.split(".")[1]
            raw = env.get(spec.env) if index == 0 else None
            if raw is not None:
                values[spec.attr] = _parse(spec, raw, spec.env)
            elif field_name in table:
                values[spec.attr] = _parse(
                    spec, table[field_name], f"comfyui[{index}].{field_name}"
                )
        instances.append(ComfyInstance(**values))
    names = [i.name for i in instances]
    if len(set(names)) != len(names):
        raise ConfigError("comfyui[].name", names, "distinct names")
    return tuple(instances)


def _check_bind(settings: Settings) -> None:
    loopback = settings.host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(settings.host).is_loopback
    if not loopback and settings.token is None:
        raise ConfigError(
            "server.host", settings.host, "a loopback address unless server.token is set"
        )


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url
