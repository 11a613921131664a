"""Load the published Jodi and DC-AE checkpoints as they are.

- Jodi: ``Jodi.pth`` (``{'state_dict': ...}``, read with ``weights_only=True``) or ``.safetensors``, in fp32, fp16 or
  bf16. ``pos_embed`` is dropped (it is computed); the config is inferred from tensor shapes.
- DC-AE: ``dc-ae-f32c32-sana-1.0`` in the original mit-han-lab key format or the diffusers format.

Models are built on the meta device and take the checkpoint's tensors by assignment, so loading never holds a
second full-precision copy in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

import torch

from .checkpoint import (
    CheckpointError,
    build_on_meta,
    check_finite,
    expect_checkpoint,
    load_state_dict_strict,
    read_metadata,
    read_state_dict,
)
from .domains import NUM_DOMAINS

log = logging.getLogger(__name__)

__all__ = ["load_jodi", "load_dcae", "jodi_from_state_dict", "CheckpointError"]

# JodiConfig fields that shapes cannot tell; our own training writes them into the safetensors metadata.
_JODI_HIDDEN_FIELDS = ("base_size", "num_heads", "linear_head_dim", "pe_interpolation", "use_pe", "y_norm_scale_factor")

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


def _common_float_dtype(sd) -> torch.dtype:
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def jodi_from_state_dict(
    sd: dict,
    *,
    name: str = "state dict",
    dtype: "torch.dtype | str | None" = None,
    device: "torch.device | str" = "cpu",
    attention_backend: str = "auto",
    **config_overrides,
):
    """Build a :class:`JodiTransformer` from a state dict with the reference key names."""
    from .transformer import JodiConfig, JodiTransformer

    sd = dict(sd)
    sd.pop("pos_embed", None)
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
    model = build_on_meta(lambda: JodiTransformer(config, attention_backend=attention_backend, dtype=dtype))
    load_state_dict_strict(model, sd, what="Jodi DiT", dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def load_jodi(
    path: "str | os.PathLike",
    *,
    dtype: "torch.dtype | str | None" = None,
    device: "torch.device | str" = "cpu",
    attention_backend: str = "auto",
    **config_overrides,
):
    """Load a Jodi DiT checkpoint; ``dtype=None`` keeps the file's dtype.

    Settings that tensor shapes cannot tell (``base_size``: the latent size the model was trained at, and the head
    counts) come from ``config_overrides``, else from the file's metadata (written by :mod:`jodi_core.train`), else
    the released model's values.
    """
    sd = read_state_dict(path)
    config_overrides = {**stored_jodi_settings(path), **config_overrides}
    return jodi_from_state_dict(
        sd, name=os.path.basename(str(path)), dtype=dtype, device=device, attention_backend=attention_backend,
        **config_overrides,
    )


def weights_file(path: "str | os.PathLike") -> str:
    """``path`` itself, or for a model folder (the DC-AE's, original or diffusers) the weights file inside it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    for candidate in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
        if os.path.isfile(os.path.join(path, candidate)):
            return os.path.join(path, candidate)
    raise CheckpointError(f"No model.safetensors or diffusion_pytorch_model.safetensors in folder {path}.")


def load_dcae(path: "str | os.PathLike", *, dtype: "torch.dtype | str | None" = None, device="cpu",
              attention_backend: str = "auto"):
    """Load a DC-AE checkpoint (original or diffusers key format); a folder means its ``model.safetensors``
    (or ``diffusion_pytorch_model.safetensors``). ``attention_backend``: ``auto | triton | torch``."""
    from .attention import check_backend
    from .dcae import DCAE

    check_backend(attention_backend)
    path = weights_file(path)
    sd = read_state_dict(path)
    name = os.path.basename(path)
    expect_checkpoint(sd, ("dcae", "dcae-diffusers"), name=name, what="a DC-AE")
    check_finite(sd, name=name)
    dtype = parse_dtype(dtype) or _common_float_dtype(sd)
    model = DCAE.from_state_dict(sd, dtype=dtype, device=device, name=name)
    model.config = dataclasses.replace(model.config, **stored_dcae_settings(path))
    model.attention_backend = attention_backend
    return model.eval().requires_grad_(False)


def stored_dcae_settings(path) -> dict:
    """``scaling_factor`` from the file's metadata: a DC-AE trained by jodi_core.train carries its measured latent
    scale; empty for files without it."""
    scaling = read_metadata(path).get("scaling_factor")
    return {} if scaling is None else {"scaling_factor": float(scaling)}


def stored_jodi_settings(path) -> dict:
    """The DiT settings that tensor shapes cannot tell (``base_size``, head counts, ...), from the file's metadata;
    empty for files without it (the released checkpoints)."""
    stored = _stored_config(path)
    return {k: stored[k] for k in _JODI_HIDDEN_FIELDS if k in stored}


def _stored_config(path) -> dict:
    raw = read_metadata(path).get("config")
    if not raw:
        return {}
    try:
        stored = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{os.path.basename(str(path))}: its 'config' metadata is not valid JSON ({e}).") from e
    return stored if isinstance(stored, dict) else {}
