"""Bridge settings: which websocket client ids are the tower-progress watcher, and what they get.

Read once when ComfyUI imports the package, from the environment and from ``bridge.json`` in
the package folder; the environment wins key by key. JSON, not TOML, because ComfyUI may run
on a Python without ``tomllib``. The watcher id is a secret: whoever connects with it receives
every user's prompts, tracebacks included, so it must be long and is never logged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_CLIENT_ID = "TOWER_PROGRESS_BRIDGE_CLIENT_ID"
ENV_MATCH = "TOWER_PROGRESS_BRIDGE_MATCH"
ENV_MIRROR_PREVIEWS = "TOWER_PROGRESS_BRIDGE_MIRROR_PREVIEWS"
CONFIG_FILE_NAME = "bridge.json"

MIN_SECRET_LENGTH = 16
MATCH_MODES = ("exact", "prefix")
_FILE_KEYS = ("client_id", "match", "mirror_previews")
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting is present but unusable; the message names the setting and where it came from."""


@dataclass(frozen=True)
class BridgeConfig:
    """Validated settings.

    ``client_id`` is the watcher's id (``match="exact"``) or a prefix that every watcher id starts
    with (``match="prefix"``: the daemon connects as prefix + a fresh random suffix each time, so
    a half-open old socket can never take the new one's registration away).
    ``mirror_previews`` also copies binary frames (previews, progress text) to the watchers.
    """

    client_id: str
    match: str = "exact"
    mirror_previews: bool = False

    def __post_init__(self) -> None:
        problem = _client_id_problem(self.client_id) or _match_problem(self.match)
        if problem is not None:
            raise ConfigError(problem)

    def is_watcher(self, sid: str) -> bool:
        """Whether a websocket connected with ``sid`` is a watcher."""
        if self.match == "prefix":
            return sid.startswith(self.client_id)
        return sid == self.client_id


def load_config(environ: Mapping[str, str], folder: Path) -> BridgeConfig | None:
    """Settings from ``environ`` over ``folder/bridge.json``; None when no watcher id is set.

    A blank value counts as unset. Raises ConfigError for an unreadable or malformed file, an
    unknown key, or a bad value; the message names the setting and its origin, never the secret.
    """
    path = folder / CONFIG_FILE_NAME
    from_file = _read_file(path)
    client_id, client_id_origin = _setting(environ, ENV_CLIENT_ID, from_file, "client_id", path)
    if client_id is None:
        return None
    client_id = _require_str(client_id, "client_id", client_id_origin)
    problem = _client_id_problem(client_id)
    if problem is not None:
        raise ConfigError(f"{problem} (from {client_id_origin})")

    match, match_origin = _setting(environ, ENV_MATCH, from_file, "match", path)
    match = "exact" if match is None else _require_str(match, "match", match_origin).lower()
    problem = _match_problem(match)
    if problem is not None:
        raise ConfigError(f"{problem} (from {match_origin})")

    mirror, mirror_origin = _setting(
        environ, ENV_MIRROR_PREVIEWS, from_file, "mirror_previews", path
    )
    return BridgeConfig(client_id, match, _to_bool(mirror, mirror_origin))


def _client_id_problem(client_id: str) -> str | None:
    if len(client_id) < MIN_SECRET_LENGTH or any(c.isspace() for c in client_id):
        return (
            f"client_id must be a secret of at least {MIN_SECRET_LENGTH} characters without "
            f"whitespace (got {len(client_id)} characters)"
        )
    return None


def _match_problem(match: str) -> str | None:
    if match not in MATCH_MODES:
        return f"match {match!r} is not one of {', '.join(MATCH_MODES)}"
    return None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_FILE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(_FILE_KEYS)})")
    return values


def _setting(
    environ: Mapping[str, str], env_name: str, from_file: Mapping[str, Any], key: str, path: Path
) -> tuple[object, str]:
    """One setting's value (None when unset) and where it came from."""
    from_env = environ.get(env_name, "").strip()
    if from_env:
        return from_env, env_name
    value = from_file.get(key)
    if isinstance(value, str) and not value.strip():
        value = None
    return value, f"{path} key {key!r}"


def _require_str(value: object, key: str, origin: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} (from {origin}) must be a string, got {type(value).__name__}")
    return value.strip()


def _to_bool(value: object, origin: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise ConfigError(
        f"mirror_previews (from {origin}) must be true or false "
        f"(1/0, yes/no, on/off in the environment), got {value!r}"
    )
