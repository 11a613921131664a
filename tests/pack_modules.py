"""The pack's ComfyUI-free node modules (nodes.vocabulary, nodes.layouts, ...) for tests without a host.

ComfyUI imports the pack as a package named after its folder, and nodes/ reaches jodi_core relatively; ``nodes``
is also the name of ComfyUI's own module. So the repo root is loaded here as a package of its own, the way ComfyUI
loads it: without comfy_api its __init__ registers nothing and imports no node module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "comfyui_jodi_without_host"


def pack_module(name: str):
    """``pack_module("nodes.vocabulary")``: that module of the pack (its own copy of jodi_core behind it)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.{name}")
