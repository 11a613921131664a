"""Loader nodes: the Jodi DiT and the DC-AE, each wrapped in a ComfyUI ModelPatcher (loaded on use, offloaded when
ComfyUI needs the room, unloaded by 'Free model and node cache')."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from . import common, vocabulary

_DTYPE_TIP = (
    "Weight and compute precision. auto: what ComfyUI picks for this device (bf16 on recent GPUs, fp32 on CPU and "
    "with --cpu). fp16 may overflow with Jodi; use it only on GPUs without bf16."
)
WEIGHT_DTYPE_TIP = (
    "How the weights are stored, as in core's Load Diffusion Model. default: in the dtype above. fp8_e4m3fn / "
    "fp8_e5m2: in 8 bits (half of bf16's memory), cast to the dtype above when used; outputs differ slightly. "
    "fp8_e4m3fn_fast: also multiplies in fp8 on GPUs that can (Ada, Hopper and newer), else as fp8_e4m3fn."
)


def _validate(name: str, value, choices, dtype, attention, weight_dtype=None) -> "bool | str":
    """validate_inputs of both loaders; None is a linked input, checked when the node runs."""
    return vocabulary.validation([
        lambda: value is None or vocabulary.check_choice(name, value, choices()),
        lambda: dtype is None or vocabulary.check_choice("dtype", dtype, vocabulary.DTYPE_CHOICES),
        lambda: attention is None or vocabulary.check_choice("attention", attention, vocabulary.ATTENTION_CHOICES),
        lambda: weight_dtype is None or vocabulary.check_choice("weight_dtype", weight_dtype,
                                                                vocabulary.WEIGHT_DTYPE_CHOICES),
    ])


def weight_dtype_input() -> "io.Combo.Input":
    """Optional, so that workflows saved before it existed load with the default."""
    return io.Combo.Input("weight_dtype", options=list(vocabulary.WEIGHT_DTYPE_CHOICES), default="default",
                          optional=True, tooltip=WEIGHT_DTYPE_TIP)


class JodiModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiModelLoader",
            display_name="Load Jodi Model",
            category="Jodi/loaders",
            description=(
                "Loads a Jodi diffusion transformer (the official Jodi.pth or a .safetensors conversion; the "
                "configuration is read from the weights) from models/diffusion_models or models/jodi. "
                f"'{vocabulary.DEMO_MODEL_CHOICE}' is a tiny model shipped with the pack that runs on CPU."
            ),
            inputs=[
                io.Combo.Input(
                    "ckpt_name", options=common.dit_choices(), default=vocabulary.DEMO_MODEL_CHOICE,
                    tooltip="Jodi checkpoint file from models/diffusion_models or models/jodi (extra_model_paths.yaml "
                            "folders included), or the built-in demo model."),
                io.Combo.Input("dtype", options=list(vocabulary.DTYPE_CHOICES), default="auto", tooltip=_DTYPE_TIP),
                io.Combo.Input(
                    "attention", options=list(vocabulary.ATTENTION_CHOICES), default="auto",
                    tooltip="Linear-attention kernels. auto: fused Triton kernels on CUDA when Triton works, else "
                            "plain PyTorch. torch: always PyTorch (any device). triton: ask for the Triton kernels "
                            "(falls back to PyTorch with a warning where they cannot run)."),
                weight_dtype_input(),
            ],
            outputs=[common.JodiModel.Output(
                display_name="jodi_model", tooltip="The Jodi DiT, managed by ComfyUI (moved to the GPU when used).")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name=None, dtype=None, attention=None, weight_dtype=None):
        return _validate("ckpt_name", ckpt_name, common.dit_choices, dtype, attention, weight_dtype)

    @classmethod
    def fingerprint_inputs(cls, ckpt_name, dtype="auto", attention="auto", weight_dtype="default"):
        return (common.file_fingerprint(common.resolve_dit_path, ckpt_name), dtype, attention, weight_dtype)

    @classmethod
    def execute(cls, ckpt_name, dtype="auto", attention="auto", weight_dtype="default") -> io.NodeOutput:
        return io.NodeOutput(common.load_dit_patcher(ckpt_name, dtype, attention, weight_dtype))


class JodiVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiVAELoader",
            display_name="Load Jodi DC-AE",
            category="Jodi/loaders",
            description=(
                "Loads the DC-AE f32c32 autoencoder Jodi works in (mit-han-lab dc-ae-f32c32-sana-1.0 in its original "
                "or diffusers format) from models/vae. It encodes condition maps and decodes all 8 domains."
            ),
            inputs=[
                io.Combo.Input(
                    "vae_name", options=common.vae_choices(), default=vocabulary.DEMO_MODEL_CHOICE,
                    tooltip="DC-AE file from models/vae (e.g. dc-ae-f32c32-sana-1.0.safetensors), or the built-in "
                            "demo autoencoder that matches the demo model."),
                io.Combo.Input("dtype", options=list(vocabulary.DTYPE_CHOICES), default="auto", tooltip=_DTYPE_TIP),
                io.Combo.Input(
                    "attention", options=list(vocabulary.ATTENTION_CHOICES), default="auto", optional=True,
                    tooltip="Linear attention of the DC-AE. auto and torch: the reference's PyTorch matmuls (any "
                            "device). triton: the Triton linear-attention kernel on CUDA (float32 accumulation, "
                            "where the reference rounds bf16 products; not yet measured faster, hence not auto)."),
            ],
            outputs=[common.JodiVAE.Output(
                display_name="jodi_vae", tooltip="The DC-AE, managed by ComfyUI. Not a core VAE: use Jodi Decode.")],
        )

    @classmethod
    def validate_inputs(cls, vae_name=None, dtype=None, attention=None):
        return _validate("vae_name", vae_name, common.vae_choices, dtype, attention)

    @classmethod
    def fingerprint_inputs(cls, vae_name, dtype="auto", attention="auto"):
        return (common.file_fingerprint(common.resolve_vae_path, vae_name), dtype, attention)

    @classmethod
    def execute(cls, vae_name, dtype="auto", attention="auto") -> io.NodeOutput:
        return io.NodeOutput(common.load_vae_patcher(vae_name, dtype, attention))


NODES = [JodiModelLoader, JodiVAELoader]
