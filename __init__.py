"""ComfyUI entry point for ComfyUI-Jodi (node registration only).

ComfyUI imports this file as a package named after the pack's folder path. pytest also imports it while collecting
tests, where ComfyUI is absent, so the ComfyUI-only imports are guarded.
"""

import importlib.util
import os

# Served by ComfyUI at /extensions/<pack folder>/; the front end's node help panel reads
# web/docs/<node id>.md from there. A plain string, so it is set with or without ComfyUI.
WEB_DIRECTORY = "./web"


def _register_model_folders() -> None:
    """Add models/jodi and models/Janus-Pro to ComfyUI's model folders, keeping paths an extra_model_paths.yaml
    already gave them (ComfyUI reads the yaml before it imports custom nodes)."""
    import folder_paths

    for name in ("jodi", "Janus-Pro"):
        default = os.path.join(folder_paths.models_dir, name)
        paths, exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
        paths = list(paths) + ([default] if default not in paths else [])
        # An empty extension set means "every file"; Jodi checkpoints are ordinary weight files.
        exts = set(exts) or set(folder_paths.supported_pt_extensions)
        folder_paths.folder_names_and_paths[name] = (paths, exts)


if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    _register_model_folders()
    from .nodes.extension import comfy_entrypoint  # noqa: F401

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
