"""ComfyUI start-up glue: read the settings, find ComfyUI's server and executor, install.

Never raises: a bridge that cannot be installed logs one line and leaves ComfyUI untouched.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path

from .bridge import Bridge, BridgeError
from .config import CONFIG_FILE_NAME, ENV_CLIENT_ID, ConfigError, load_config

log = logging.getLogger(__name__)


def install_into_comfyui(environ: Mapping[str, str], folder: Path) -> Bridge | None:
    """Install the bridge into the running ComfyUI; the installed bridge, or None.

    ``folder`` is the package folder holding the optional ``bridge.json``. ComfyUI's own
    modules (``server``, ``execution``, ``comfyui_version``) are imported by name, as every
    custom node does, so this must run inside ComfyUI after its PromptServer exists.
    """
    try:
        config = load_config(environ, folder)
    except ConfigError as exc:
        log.error("tower-progress bridge: bad configuration, nothing installed: %s", exc)
        return None
    if config is None:
        log.info(
            "tower-progress bridge: no watcher client id configured (%s or %s), nothing installed",
            ENV_CLIENT_ID,
            folder / CONFIG_FILE_NAME,
        )
        return None
    try:
        server_module = importlib.import_module("server")
        execution_module = importlib.import_module("execution")
    except ImportError as exc:
        log.error("tower-progress bridge: not running inside ComfyUI (%s), nothing installed", exc)
        return None
    server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    executor_class = getattr(execution_module, "PromptExecutor", None)
    if server is None or not isinstance(executor_class, type):
        log.error(
            "tower-progress bridge: ComfyUI's PromptServer.instance or PromptExecutor "
            "is missing, nothing installed"
        )
        return None
    version = _comfyui_version()
    bridge = Bridge(server, executor_class, config, version)
    try:
        bridge.install()
    except BridgeError as exc:
        log.error("tower-progress bridge: %s, nothing installed", exc)
        return None
    log.info(
        "tower-progress bridge: installed on ComfyUI %s (watcher id match: %s, previews "
        "mirrored: %s, prompts without client id: %s)",
        version or "of unknown version",
        config.match,
        "yes" if config.mirror_previews else "no",
        "covered" if bridge.covers_prompts_without_client_id else "not covered on this version",
    )
    return bridge


def _comfyui_version() -> str | None:
    try:
        module = importlib.import_module("comfyui_version")
    except ImportError:
        return None
    version = getattr(module, "__version__", None)
    return version if isinstance(version, str) else None
