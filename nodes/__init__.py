"""The ComfyUI nodes of ComfyUI-Jodi. ComfyUI registers them through ``extension.comfy_entrypoint``.

Nothing here imports ComfyUI, so the ComfyUI-free modules (vocabulary, layouts, map_conventions, payloads) import
without a host.
"""
