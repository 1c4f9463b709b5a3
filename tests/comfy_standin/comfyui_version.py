"""The ComfyUI version this stand-in imitates (ComfyUI's own ``comfyui_version`` module)."""

__version__ = "0.8.0"
