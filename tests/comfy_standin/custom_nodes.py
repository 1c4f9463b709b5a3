"""Load a custom-node package the way ComfyUI v0.8.0 does (nodes.py ``load_custom_node``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
BRIDGE_FOLDER = REPO_ROOT / "comfyui_bridge"


def load_custom_node(folder: Path, module_name: str | None = None) -> ModuleType:
    """Execute ``folder/__init__.py`` as a package and register it in ``sys.modules``.

    ComfyUI names the module after the folder's full path (dots replaced by ``_x_``); pass
    ``module_name`` to register it under a plain name instead.
    """
    name = module_name or str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"{folder} is not a Python package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_bridge_package() -> ModuleType:
    """The repo's ``comfyui_bridge`` as an importable package (it is on no sys.path entry).

    Imported under its package name, its ``__init__`` installs nothing and logs nothing;
    only a load under its folder's path, as ComfyUI does, installs.
    """
    return sys.modules.get("comfyui_bridge") or load_custom_node(BRIDGE_FOLDER, "comfyui_bridge")
