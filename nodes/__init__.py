"""The ComfyUI nodes of ComfyUI-Jodi (V3 schema API). Imported only inside ComfyUI (see the pack's __init__.py)."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import ComfyExtension, io

from . import annotate, loaders, roles, sampler, utility
from .text_encode import JodiTextEncode

NODE_MODULES = [loaders, roles, sampler, utility, annotate]
if (Path(__file__).parent / "janus.py").is_file():  # the Janus nodes arrive in a later piece
    from . import janus

    NODE_MODULES.append(janus)


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
