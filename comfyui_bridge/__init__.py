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

install_into_comfyui(os.environ, Path(__file__).resolve().parent)
