"""Bridge settings and start-up: what gets installed, and the one line it logs either way.

Start-up tests load the package folder exactly as ComfyUI v0.8.0 loads a custom node, with the
stand-in's modules registered under ComfyUI's module names (``server``, ``execution``,
``comfyui_version``), as ComfyUI's own sys.path makes them importable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import comfy_standin.comfyui_version
import comfy_standin.execution
import comfy_standin.server
import pytest
from comfy_standin.custom_nodes import BRIDGE_FOLDER, import_bridge_package, load_custom_node
from comfy_standin.execution import PromptExecutor
from comfy_standin.server import PromptServer

import_bridge_package()

from comfyui_bridge.bridge import installed_bridge  # noqa: E402
from comfyui_bridge.config import (  # noqa: E402
    ENV_CLIENT_ID,
    ENV_MATCH,
    ENV_MIRROR_PREVIEWS,
    BridgeConfig,
    ConfigError,
    load_config,
)

SECRET = "tp-watch-0123456789abcdef0123"
PRISTINE_EXECUTOR = dict(vars(PromptExecutor))


def write_file(folder: Path, values: object) -> Path:
    path = folder / "bridge.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return folder


def test_nothing_configured_means_no_config(tmp_path: Path) -> None:
    assert load_config({}, tmp_path) is None
    assert load_config({ENV_CLIENT_ID: "  "}, write_file(tmp_path, {"client_id": ""})) is None


def test_environment_alone_configures_the_bridge(tmp_path: Path) -> None:
    environ = {ENV_CLIENT_ID: SECRET, ENV_MATCH: "Prefix", ENV_MIRROR_PREVIEWS: "yes"}
    assert load_config(environ, tmp_path) == BridgeConfig(SECRET, "prefix", True)


def test_file_alone_configures_the_bridge_with_defaults(tmp_path: Path) -> None:
    folder = write_file(tmp_path, {"client_id": SECRET})
    assert load_config({}, folder) == BridgeConfig(SECRET, "exact", False)


def test_environment_wins_key_by_key(tmp_path: Path) -> None:
    other = "tp-watch-ffffffffffffffffffff"
    folder = write_file(tmp_path, {"client_id": SECRET, "match": "prefix", "mirror_previews": True})
    assert load_config({ENV_CLIENT_ID: other}, folder) == BridgeConfig(other, "prefix", True)
    assert load_config({ENV_MIRROR_PREVIEWS: "off"}, folder) == BridgeConfig(
        SECRET, "prefix", False
    )


def test_watcher_matching() -> None:
    exact = BridgeConfig(SECRET)
    prefix = BridgeConfig(SECRET, match="prefix")
    assert exact.is_watcher(SECRET) and not exact.is_watcher(SECRET + "-1")
    assert prefix.is_watcher(SECRET + "-1") and not prefix.is_watcher("x" + SECRET)


@pytest.mark.parametrize(
    ("environ", "values", "message"),
    [
        ({ENV_CLIENT_ID: "short"}, None, f"at least 16 characters.*got 5.*from {ENV_CLIENT_ID}"),
        (
            {},
            {"client_id": "with some spaces in it"},
            "without whitespace.*bridge.json key 'client_id'",
        ),
        ({}, {"client_id": 1234567890123456789}, "client_id .*must be a string, got int"),
        ({}, {"client_id": SECRET, "mirror_preview": True}, "unknown key 'mirror_preview'"),
        ({}, [SECRET], "expected a JSON object, got list"),
        (
            {ENV_CLIENT_ID: SECRET, ENV_MATCH: "fuzzy"},
            None,
            f"'fuzzy' is not one of exact, prefix .*{ENV_MATCH}",
        ),
        (
            {ENV_CLIENT_ID: SECRET, ENV_MIRROR_PREVIEWS: "maybe"},
            None,
            "mirror_previews .* got 'maybe'",
        ),
        (
            {},
            {"client_id": SECRET, "mirror_previews": 1},
            "mirror_previews .*must be true or false",
        ),
    ],
)
def test_bad_settings_are_named_and_the_secret_is_not(
    tmp_path: Path, environ: dict[str, str], values: object, message: str
) -> None:
    if values is not None:
        write_file(tmp_path, values)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(environ, tmp_path)
    shown = str(caught.value)
    assert "with some spaces" not in shown and "1234567890123456789" not in shown


def test_a_file_that_is_not_json_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bridge.json").write_text('{"client_id": ', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bridge.json: not valid JSON \(Expecting value"):
        load_config({}, tmp_path)


def test_the_constructor_validates_too() -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        BridgeConfig("short")
    with pytest.raises(ConfigError, match="not one of"):
        BridgeConfig(SECRET, match="regex")


@pytest.fixture
def comfyui(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The stand-in under ComfyUI's module names; modules the load adds are removed after."""
    monkeypatch.setitem(sys.modules, "server", comfy_standin.server)
    monkeypatch.setitem(sys.modules, "execution", comfy_standin.execution)
    monkeypatch.setitem(sys.modules, "comfyui_version", comfy_standin.comfyui_version)
    for name in ("TOWER_PROGRESS_BRIDGE_CLIENT_ID", ENV_MATCH, ENV_MIRROR_PREVIEWS):
        monkeypatch.delenv(name, raising=False)
    before = set(sys.modules)
    yield monkeypatch
    for name in set(sys.modules) - before:
        del sys.modules[name]


def install_copy(custom_nodes: Path, settings: object = None) -> Path:
    """Copy the package folder into ``custom_nodes`` as the README says, with a bridge.json."""
    folder = custom_nodes / "comfyui_bridge"
    shutil.copytree(
        BRIDGE_FOLDER, folder, ignore=shutil.ignore_patterns("__pycache__", "bridge.json")
    )
    if settings is not None:
        write_file(folder, settings)
    return folder


def bridge_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.getMessage().startswith("tower-progress bridge:")
    ]


async def test_without_a_watcher_id_nothing_is_wrapped(
    comfyui: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    server = PromptServer(asyncio.get_running_loop(), clock=lambda: 1)
    caplog.set_level(logging.INFO)
    module = load_custom_node(install_copy(tmp_path))
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}
    assert "send_sync" not in vars(server) and "send_json" not in vars(server)
    assert dict(vars(PromptExecutor)) == PRISTINE_EXECUTOR
    [(level, line)] = bridge_lines(caplog)
    assert level == logging.INFO
    assert line == (
        f"tower-progress bridge: no watcher client id configured ({ENV_CLIENT_ID} or "
        f"{tmp_path / 'comfyui_bridge' / 'bridge.json'}), nothing installed"
    )


@pytest.mark.parametrize(("version", "covered"), [("0.8.0", True), ("0.8.1", False), (None, False)])
async def test_a_configured_bridge_installs_and_says_so_once(
    comfyui: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    version: str | None,
    covered: bool,
) -> None:
    if version is None:
        comfyui.delitem(sys.modules, "comfyui_version")
    else:
        fake = types.ModuleType("comfyui_version")
        fake.__dict__.update(__version__=version)
        comfyui.setitem(sys.modules, "comfyui_version", fake)
    comfyui.setenv(ENV_CLIENT_ID, SECRET)
    server = PromptServer(asyncio.get_running_loop(), clock=lambda: 1)
    caplog.set_level(logging.INFO)
    load_custom_node(install_copy(tmp_path))
    bridge = installed_bridge(server)
    assert bridge is not None
    try:
        assert bridge.covers_prompts_without_client_id is covered
        assert (dict(vars(PromptExecutor)) != PRISTINE_EXECUTOR) is covered
        [(level, line)] = bridge_lines(caplog)
        assert level == logging.INFO
        shown = version or "of unknown version"
        coverage = "covered" if covered else "not covered on this version"
        assert line == (
            f"tower-progress bridge: installed on ComfyUI {shown} (watcher id match: exact, "
            f"previews mirrored: no, prompts without client id: {coverage})"
        )
    finally:
        bridge.uninstall()


async def test_bridge_json_next_to_the_package_configures_it(
    comfyui: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    settings = {"client_id": SECRET, "match": "prefix", "mirror_previews": True}
    server = PromptServer(asyncio.get_running_loop(), clock=lambda: 1)
    caplog.set_level(logging.INFO)
    load_custom_node(install_copy(tmp_path, settings))
    bridge = installed_bridge(server)
    assert bridge is not None
    bridge.uninstall()
    [(_, line)] = bridge_lines(caplog)
    assert "(watcher id match: prefix, previews mirrored: yes," in line and SECRET not in line


async def test_a_bad_setting_installs_nothing_and_logs_one_error(
    comfyui: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    comfyui.setenv(ENV_MIRROR_PREVIEWS, "sometimes")
    server = PromptServer(asyncio.get_running_loop(), clock=lambda: 1)
    load_custom_node(install_copy(tmp_path, {"client_id": SECRET}))
    assert installed_bridge(server) is None and dict(vars(PromptExecutor)) == PRISTINE_EXECUTOR
    [(level, line)] = bridge_lines(caplog)
    assert level == logging.ERROR
    assert line == (
        "tower-progress bridge: bad configuration, nothing installed: mirror_previews (from "
        f"{ENV_MIRROR_PREVIEWS}) must be true or false (1/0, yes/no, on/off in the "
        "environment), got 'sometimes'"
    )


async def test_outside_comfyui_it_installs_nothing(
    comfyui: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    comfyui.delitem(sys.modules, "server")
    comfyui.setenv(ENV_CLIENT_ID, SECRET)
    load_custom_node(install_copy(tmp_path))
    [(level, line)] = bridge_lines(caplog)
    assert level == logging.ERROR
    assert line == (
        "tower-progress bridge: not running inside ComfyUI (No module named 'server'), "
        "nothing installed"
    )
    assert dict(vars(PromptExecutor)) == PRISTINE_EXECUTOR
