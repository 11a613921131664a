"""ComfyUI entry point for ComfyUI-Jodi (node registration only).

ComfyUI imports this file as a package named after the pack's folder path. pytest also imports it while collecting
tests, where ComfyUI is absent, so the ComfyUI-only imports are guarded.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
