"""Test-only ComfyUI custom-node pack used by the host tests (never shipped, never imported by pytest).

* ``JodiTestSaveTensors``: an output node that writes whatever reaches it (a tensor, a dict of tensors, a
  CONDITIONING list, a dataclass such as the Jodi latent, ...) to ``<output>/jodi_probe/<name>.safetensors``
  so a test can compare numbers.
* ``JodiTestLowVram``: clones of the Jodi / Janus model patchers whose loads get at most ``budget_mb`` MB, so
  ComfyUI's own partial ("lowvram") load runs as on a GPU short of memory, on any device: layers beyond the budget
  stay on the offload device and are cast on use. Its ui output is the size of each model, so a test can check
  that the budget really is below it.
* If ``JODI_TEST_GEMMA_CONFIG`` holds a JSON dict, the size defaults of ComfyUI's Gemma-2-2B text encoder are
  replaced by it. ComfyUI's ``CLIPLoader`` builds Gemma-2 with a fixed config, so this is what lets a tiny
  random-weight Gemma-2 go through the real loading and encoding code instead of a 2.6 B-parameter model.
"""

import dataclasses
import functools
import json
import os

import torch
from safetensors.torch import save_file

import folder_paths
from comfy_api.latest import ComfyExtension, io

_gemma_overrides = os.environ.get("JODI_TEST_GEMMA_CONFIG")
if _gemma_overrides:
    import comfy.text_encoders.llama as _llama

    _overrides = json.loads(_gemma_overrides)
    _base = _llama.Gemma2_2B_Config
    _fields = {f.name for f in dataclasses.fields(_base)}
    # Sizes such as head_dim are plain class attributes, not dataclass fields: set those on a subclass.
    _tiny = type("JodiTestGemma2Config", (_base,), {k: v for k, v in _overrides.items() if k not in _fields})
    # Gemma2_2B.__init__ looks the config class up in the module at call time.
    _llama.Gemma2_2B_Config = functools.partial(_tiny, **{k: v for k, v in _overrides.items() if k in _fields})


def _flatten(value, prefix, out):
    if torch.is_tensor(value):
        out[prefix] = value.detach().cpu().contiguous()
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}", out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _flatten(getattr(value, f.name), f"{prefix}.{f.name}", out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}.{i}", out)
    elif isinstance(value, (bool, int, float)):
        out[prefix] = torch.tensor(value)


class JodiTestSaveTensors(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JodiTestSaveTensors",
            category="testing",
            inputs=[io.AnyType.Input("value"), io.String.Input("name", default="probe")],
            outputs=[],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, value, name):
        tensors = {}
        _flatten(value, "value", tensors)
        folder = os.path.join(folder_paths.get_output_directory(), "jodi_probe")
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
        return io.NodeOutput(ui={"text": [name, ",".join(sorted(tensors))]})


def _with_budget(patcher, budget: int):
    """A clone of ``patcher`` whose partial loads never hold more than ``budget`` bytes of weights."""
    clone = patcher.clone()
    partially_load = clone.partially_load

    def limited(device_to, extra_memory=0, force_patch_weights=False):
        room = max(0, budget - clone.model.model_loaded_weight_memory)
        return partially_load(device_to, min(extra_memory, room), force_patch_weights=force_patch_weights)

    clone.partially_load = limited
    return clone


_TYPES = (("model", "JODI_MODEL"), ("vae", "JODI_VAE"), ("janus", "JANUS_MODEL"))


class JodiTestLowVram(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JodiTestLowVram",
            category="testing",
            inputs=[io.Custom(t).Input(n, optional=True) for n, t in _TYPES]
            + [io.Float.Input("budget_mb", default=0.01, min=0.0, max=1e6)],
            outputs=[io.Custom(t).Output(display_name=n) for n, t in _TYPES],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, budget_mb, model=None, vae=None, janus=None):
        import comfy.model_management

        patchers = [model, vae, janus]
        # A clone shares its model's weights: were they loaded whole already, ComfyUI would keep them so.
        comfy.model_management.unload_all_models()
        sizes = [str(p.model_size()) if p is not None else "" for p in patchers]
        out = [_with_budget(p, int(budget_mb * 2**20)) if p is not None else None for p in patchers]
        return io.NodeOutput(*out, ui={"text": sizes})


class _ProbeExtension(ComfyExtension):
    async def get_node_list(self):
        return [JodiTestSaveTensors, JodiTestLowVram]


async def comfy_entrypoint():
    return _ProbeExtension()
