"""Test-only ComfyUI custom-node pack used by the host tests (never shipped, never imported by pytest).

* ``JodiTestSaveTensors``: an output node that writes whatever reaches it (a tensor, a dict of tensors, a
  CONDITIONING list, a dataclass such as the Jodi latent, ...) to ``<output>/jodi_probe/<name>.safetensors``
  so a test can compare numbers.
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


class _ProbeExtension(ComfyExtension):
    async def get_node_list(self):
        return [JodiTestSaveTensors]


async def comfy_entrypoint():
    return _ProbeExtension()
