"""Build models from checkpoints: recognise what a state dict holds, check it, and load it strictly into a model
built on the meta device. Reading the files is :mod:`.checkpoint`'s job; each model's key names and config
inference sit beside it (:mod:`.dit.keys`, :mod:`.dcae.keys`, :mod:`.janus.keys`).

- Jodi: ``Jodi.pth`` (``{'state_dict': ...}``, read with ``weights_only=True``) or ``.safetensors``, in fp32, fp16 or
  bf16. ``pos_embed`` is dropped (it is computed); the config is inferred from tensor shapes.
- DC-AE: ``dc-ae-f32c32-sana-1.0`` in the original mit-han-lab key format or the diffusers format.
- Either may also be fp8, plain or in ComfyUI's scaled-fp8 layout, and either may be stored in fp8 at load time
  (``weight_dtype``; see :mod:`.fp8`).

Models take the checkpoint's tensors by assignment, so loading never holds a second full-precision copy in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from . import fp8, ops
from .dcae import keys as dcae_keys
from .dit import keys as dit_keys
from .checkpoint import CheckpointError, read_state_dict, weights_file
from .domains import NUM_DOMAINS

log = logging.getLogger(__name__)

__all__ = ["load_jodi", "load_dcae", "jodi_from_state_dict", "CheckpointError"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(dtype: "torch.dtype | str | None") -> Optional[torch.dtype]:
    """Accept a torch dtype, ``"fp32" | "fp16" | "bf16"``, or None/``"auto"`` (keep the checkpoint's dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("float", "fp").replace("bfloat16", "bf16")
    if key in ("auto", "default"):
        return None
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected auto, fp32, fp16 or bf16.")
    return DTYPES[key]


def resolve_device(requested: "str | torch.device", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a bare ``"cuda"`` means this process's ``local_rank`` GPU."""
    if str(requested) == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(requested)!r} requested but CUDA is not available.")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


# ---------------------------------------------------------------------------------------------------------------------
# What is this checkpoint?
# ---------------------------------------------------------------------------------------------------------------------

# Signature keys of model families people have in their ComfyUI folders, checked in order (most specific first: a
# diffusers ControlNet also has a UNet's down_blocks). Single files (prefixed), UNet/DiT-only files as in
# models/diffusion_models (bare), and diffusers files.
_FOREIGN_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a ControlNet", ("control_model.input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight")),
    ("Flux", ("double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
              "single_transformer_blocks.0.proj_mlp.weight")),
    ("SD3", ("joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
             "transformer_blocks.0.attn.add_q_proj.weight")),
    ("SDXL", ("conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.label_emb.0.0.weight",
              "label_emb.0.0.weight", "add_embedding.linear_1.weight")),
    ("Stable Diffusion 1.x/2.x", ("model.diffusion_model.input_blocks.0.0.weight", "input_blocks.0.0.weight",
                                  "down_blocks.0.resnets.0.conv1.weight")),
    ("an SD/SDXL VAE", ("encoder.down.0.block.0.conv1.weight", "first_stage_model.encoder.conv_in.weight")),
    ("a text encoder (Gemma/T5/CLIP)", ("model.embed_tokens.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
                                        "text_model.embeddings.token_embedding.weight", "shared.weight")),
)


def _foreign_family(sd: Mapping[str, torch.Tensor]) -> str | None:
    for family, keys in _FOREIGN_FAMILIES:
        if any(k in sd for k in keys):
            return family
    if "x_embedder.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "Sana (single-domain, not Jodi)"
    if any(k.startswith(("language_model.", "gen_vision_model.", "model.vqmodel.")) for k in sd):
        return "Janus"
    return None


def identify_checkpoint(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Name what a state dict holds: ``"jodi"``, ``"dcae"``, ``"dcae-diffusers"``, a foreign family, or None."""
    if dit_keys.is_jodi_state_dict(sd):
        return "jodi"
    dcae_format = dcae_keys.detect_key_format(sd)
    if dcae_format == "original":
        return "dcae"
    if dcae_format == "diffusers" and any(".attn.to_q" in k for k in sd):  # not a diffusers SD VAE
        return "dcae-diffusers"
    return _foreign_family(sd)


_KIND_LABELS = {
    "jodi": "a Jodi DiT (load it with Load Jodi Model / load_jodi)",
    "dcae": "a DC-AE autoencoder (load it with Load Jodi DC-AE / load_dcae)",
    "dcae-diffusers": "a DC-AE autoencoder in diffusers format (load it with Load Jodi DC-AE / load_dcae)",
}


def _kind_label(kind: str) -> str:
    if kind in _KIND_LABELS:
        return _KIND_LABELS[kind]
    return kind if kind.startswith(("a ", "an ")) else f"a {kind} checkpoint"


def expect_checkpoint(sd: Mapping[str, torch.Tensor], expected: tuple[str, ...], *, name: str, what: str) -> str:
    """Check that ``sd`` is one of the ``expected`` kinds; otherwise say what it looks like instead."""
    kind = identify_checkpoint(sd)
    if kind in expected:
        return kind
    if kind is not None:
        raise CheckpointError(f"{name} looks like {_kind_label(kind)}, not {what}.")
    sample = ", ".join(sorted(sd)[:5])
    raise CheckpointError(f"{name} is not {what}: its keys are not recognised (first keys: {sample}).")


# ---------------------------------------------------------------------------------------------------------------------
# Building and strict loading
# ---------------------------------------------------------------------------------------------------------------------


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without allocating or initialising its weights."""
    with torch.device("meta"):
        return factory()


def load_state_dict_strict(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    what: str,
    dtype: torch.dtype | None = None,
    device: "str | torch.device | None" = None,
) -> nn.Module:
    """Load ``sd`` into ``module`` with every key and shape checked, then report all problems at once.

    Tensors are assigned (``assign=True``), so a module built on the meta device takes the checkpoint's storage with
    no intermediate copy. Floating tensors are cast to ``dtype`` when given; buffers that the module does not persist
    are left as they are.
    """
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"The checkpoint does not match the {what} model:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
                lines.append(f"  {len(items)} {label}: {shown}")
        raise CheckpointError("\n".join(lines))

    converted = {}
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        if device is not None:
            v = v.to(device)
        converted[k] = v
    module.load_state_dict(converted, strict=True, assign=True)
    # Non-persistent buffers (none today) would still sit on meta: materialise them so the module is usable.
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise CheckpointError(f"The {what} model has a buffer {name!r} that the checkpoint cannot provide.")
    return module


LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_finite(sd: Mapping[str, torch.Tensor], *, name: str) -> None:
    """Fail on integer-quantised weights (int8 and friends: not a format these models load) and on NaN/inf weights
    (a sign of a broken conversion or a bad fp16 export). fp8 weights load (:mod:`.fp8`)."""
    for k, v in sd.items():
        if k.endswith(".comfy_quant"):  # ComfyUI's per-layer quantisation entries, checked by fp8.split_scales
            continue
        floating_ok = v.dtype in LOADABLE_DTYPES or ops.is_fp8(v.dtype)
        if (v.is_floating_point() and not floating_ok) or v.dtype in (torch.int8, torch.uint8):
            raise CheckpointError(f"{name}: tensor {k!r} is stored as {v.dtype}; quantised weights are not supported "
                                  f"(use an fp32, fp16, bf16 or fp8 file).")
        if has_nonfinite(v):
            raise CheckpointError(f"{name}: tensor {k!r} contains NaN or infinite values.")


def has_nonfinite(t: torch.Tensor) -> bool:
    """Whether a weight tensor of a loadable float dtype holds NaN or inf (other dtypes: False; fp8 is read from its
    bits, having no isfinite kernel)."""
    if ops.is_fp8(t.dtype):
        return fp8.fp8_nonfinite(t)
    return t.dtype in LOADABLE_DTYPES and not bool(torch.isfinite(t).all())


def _common_float_dtype(sd) -> torch.dtype:
    return fp8.compute_dtype_of(sd, None)


def jodi_from_state_dict(
    sd: dict,
    *,
    name: str = "state dict",
    dtype: "torch.dtype | str | None" = None,
    device: "torch.device | str" = "cpu",
    attention_backend: str = "auto",
    weight_dtype: str = "default",
    operations=None,
    **config_overrides,
):
    """Build a :class:`JodiTransformer` from a state dict with the reference key names.

    ``dtype``: the compute dtype (None: the file's); ``weight_dtype``: how the weights are stored
    (:data:`.ops.WEIGHT_DTYPES`; fp8 ones are cast to ``dtype`` on use, ``fp8_e4m3fn_fast`` also runs fp8 matmuls
    where the GPU has them); ``operations``: a host's layer namespace (e.g. ComfyUI's ``manual_cast``), which then
    does the casting.
    """
    from .dit.model import JodiConfig, JodiTransformer

    ops.check_weight_dtype(weight_dtype)
    sd, scales = fp8.split_scales(dit_keys.model_keys(sd), name=name)
    expect_checkpoint(sd, ("jodi",), name=name, what="a Jodi DiT")
    check_finite(sd, name=name)
    try:
        config = JodiConfig.from_state_dict(sd, **config_overrides)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from e
    if config.num_domains != NUM_DOMAINS:
        raise CheckpointError(f"{name} has {config.num_domains} domains; this pack knows the {NUM_DOMAINS} of Jodi "
                              f"(image + 7 labels).")
    dtype = parse_dtype(dtype) or _common_float_dtype(sd)
    operations = fp8.operations_for(weight_dtype, operations)
    model = build_on_meta(lambda: JodiTransformer(config, attention_backend=attention_backend, dtype=dtype,
                                                  operations=operations))
    fp8.load_weights(model, sd, scales, what="Jodi DiT", weight_dtype=weight_dtype, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def load_jodi(
    path: "str | os.PathLike",
    *,
    dtype: "torch.dtype | str | None" = None,
    device: "torch.device | str" = "cpu",
    attention_backend: str = "auto",
    weight_dtype: str = "default",
    operations=None,
    **config_overrides,
):
    """Load a Jodi DiT checkpoint; ``dtype=None`` keeps the file's dtype (an fp8 file's 16-bit one, else bf16).
    ``weight_dtype`` and ``operations``: see :func:`jodi_from_state_dict`.

    Settings that tensor shapes cannot tell (``base_size``: the latent size the model was trained at, and the head
    counts) come from ``config_overrides``, else from the file's metadata (written by :mod:`.jobs.train`), else the
    released model's values.
    """
    sd = read_state_dict(path)
    config_overrides = {**dit_keys.stored_jodi_settings(path), **config_overrides}
    return jodi_from_state_dict(
        sd, name=os.path.basename(str(path)), dtype=dtype, device=device, attention_backend=attention_backend,
        weight_dtype=weight_dtype, operations=operations, **config_overrides,
    )


def load_dcae(path: "str | os.PathLike", *, dtype: "torch.dtype | str | None" = None, device="cpu",
              attention_backend: str = "auto", weight_dtype: str = "default", operations=None):
    """Load a DC-AE checkpoint (original or diffusers key format); a folder means its ``model.safetensors``
    (or ``diffusion_pytorch_model.safetensors``). ``attention_backend``: ``auto | triton | torch``;
    ``weight_dtype`` and ``operations``: as for :func:`load_jodi`."""
    from .dit.attention import check_backend
    from .dcae.model import DCAE

    check_backend(attention_backend)
    ops.check_weight_dtype(weight_dtype)
    path = weights_file(path)
    sd = read_state_dict(path)
    name = os.path.basename(path)
    expect_checkpoint(sd, ("dcae", "dcae-diffusers"), name=name, what="a DC-AE")
    check_finite(sd, name=name)
    dtype = parse_dtype(dtype) or _common_float_dtype(sd)
    model = DCAE.from_state_dict(sd, dtype=dtype, device=device, name=name, weight_dtype=weight_dtype,
                                 operations=operations)
    model.config = dataclasses.replace(model.config, **dcae_keys.stored_dcae_settings(path))
    model.attention_backend = attention_backend
    return model.eval().requires_grad_(False)
