"""tower-progress bridge: a ComfyUI custom-node package with no nodes.

Importing it (ComfyUI does, at start-up) installs the bridge described in README.md: the
configured watcher websocket receives every prompt's events while every other client and every
HTTP answer stays as it would be without it.
"""

import os
from pathlib import Path

from .entry import install_into_comfyui

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

# ComfyUI loads a custom node under its folder's path; imported by its package name (the
# simulator's bridge mode, tower-progress itself) it only lends its modules.
if __name__ != "comfyui_bridge":
    install_into_comfyui(os.environ, Path(__file__).resolve().parent)
