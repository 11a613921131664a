"""Registration of the ComfyUI nodes (V3 schema API). Imported only inside ComfyUI (see the pack's __init__.py).

The API version is pinned to ``comfy_api.v0_0_2``, which ComfyUI 0.3.64 and 0.3.75 both ship. In both it still
re-exports ``latest``'s ``io``, ``ui`` and ``ComfyExtension`` (the same surface in the two releases); the versioned
name is the one meant to stay put when ``latest`` moves on. The host tests run 0.3.75 (no installable package
vendors 0.3.64); the 0.3.64 surface was checked in its source.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from . import annotate, janus, loaders, roles, sampler, utility
from .text_encode import JodiTextEncode

NODE_MODULES = [loaders, roles, sampler, utility, annotate, janus]


def node_list() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = [JodiTextEncode]
    for module in NODE_MODULES:
        nodes += list(module.NODES)
    return nodes


class JodiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()


async def comfy_entrypoint() -> ComfyExtension:
    return JodiExtension()


__all__ = ["comfy_entrypoint", "JodiExtension", "node_list"]
