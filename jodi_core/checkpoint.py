"""Reading checkpoint files and loading them strictly into modules.

One place for the file formats (safetensors, torch pickles read with ``weights_only=True``), for recognising what a
state dict holds (so a user who picks an SDXL file in the Jodi loader gets told so), and for strict, copy-free
loading into modules built on the meta device.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Training checkpoints wrap the weights; the official Jodi.pth is ``{'state_dict': ..., 'state_dict_ema': ...}``
# (the plain weights come first, as the reference loads them; EMA-only files are read too).
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "state_dict_ema", "ema", "model_ema",
                 "ema_state_dict")
# Pickled data that torch's safe loader refuses by default although it only rebuilds arrays: the numpy RNG state
# the reference's training code stores next to the weights.
_NUMPY_DATA_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                       "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.ndarray", "numpy.dtype")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, of another model, or with wrong keys."""


def read_state_dict(path: "str | os.PathLike", *, device: "str | torch.device" = "cpu") -> dict[str, torch.Tensor]:
    """Read all tensors of a checkpoint file.

    ``.safetensors`` is memory-mapped; ``.pth/.pt/.bin/.ckpt`` go through ``torch.load(weights_only=True, mmap=True)``
    so no arbitrary code runs and a large file is not copied into memory before it is used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"Checkpoint file is empty (0 bytes): {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        sd = _read_safetensors(path, device)
    elif suffix in PICKLE_SUFFIXES:
        sd = _read_pickle(path, device)
    else:
        raise CheckpointError(
            f"Unsupported checkpoint extension {suffix!r} for {path.name}; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}."
        )
    if not sd:
        raise CheckpointError(f"Checkpoint {path.name} holds no tensors.")
    if all(k.startswith("module.") for k in sd):  # saved from a DataParallel / DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_metadata(path: "str | os.PathLike") -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (empty for other formats or files without any)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES or not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"Checkpoint {path.name} is corrupt or truncated (safetensors: {e}).") from e


def _read_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"Checkpoint {path.name} is corrupt or truncated (safetensors: {e}).") from e


def _read_pickle(path: Path, device) -> dict[str, torch.Tensor]:
    # Zip archives are memory-mapped; legacy (pre-1.6) files cannot be, but read just as safely.
    obj = load_pickle_safely(path, device=device, mmap=zipfile.is_zipfile(path))
    return unwrap_state_dict(obj, name=path.name)


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs Python objects beyond tensors, plain containers and numpy arrays: refused unread, since
    unpickling them could run any code. ``globals`` names what it asked for, where known."""

    def __init__(self, message: str, globals: Sequence[str] = ()):
        super().__init__(message)
        self.globals = tuple(globals)


def load_pickle_safely(path: "str | os.PathLike", *, device: "str | torch.device" = "cpu", mmap: bool = False,
                       numpy_arrays: bool = True):
    """``torch.load(weights_only=True)``: tensors and plain containers only, so no code in the file can run.

    ``numpy_arrays``: also rebuild numpy arrays (the numpy RNG state training code stores), through an allowlist of
    numpy's array and dtype types and nothing callable beyond them. Errors name the file and the cause; a refused
    file gets :class:`UnsafeCheckpointError`. No message passes on torch's advice to retry with
    ``weights_only=False``, which would run whatever the file holds.
    """
    path = Path(path)
    try:
        return torch.load(str(path), map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, zip errors) for bad files
        error = e
    blocking = _unsafe_globals(path) or _globals_named_in(error)
    if blocking and numpy_arrays and all(_is_numpy_data(g) for g in blocking):
        try:
            with torch.serialization.safe_globals(_numpy_data_types()):
                return torch.load(str(path), map_location=device, weights_only=True, mmap=mmap)
        except Exception as e:
            reason = load_error_reason(e)
            raise CheckpointError(f"Checkpoint {path.name} could not be read safely ({reason}).") from None
    if blocking:
        raise UnsafeCheckpointError(
            f"Checkpoint {path.name} holds pickled objects that cannot be read safely ({', '.join(blocking[:5])}"
            f"): loading them could run code, so it is refused. Save its state dict alone, e.g. as .safetensors, "
            f"and load that.", blocking) from None
    if _is_weights_only_refusal(error) and not _OPCODE_IN_MESSAGE.search(str(error)):  # (opcodes: not a torch file)
        raise UnsafeCheckpointError(
            f"Checkpoint {path.name} holds pickled data that cannot be read safely ({load_error_reason(error)}), so "
            f"it is refused. Save its state dict alone, e.g. as .safetensors, and load that.") from None
    # torch's own text is kept as the cause only where it carries no weights_only advice
    cause = None if _is_weights_only_refusal(error) else error
    raise CheckpointError(f"Checkpoint {path.name} is corrupt, truncated or not a torch file "
                          f"({load_error_reason(error)}).") from cause


# torch's refusal text suggests re-running with weights_only=False or allowlisting the class: both run the file's
# code. Our messages keep only what the file asked for.
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_OPCODE_IN_MESSAGE = re.compile(r"Unsupported operand (\d+)")


def _is_weights_only_refusal(error: BaseException) -> bool:
    return isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error).lower()


def _globals_named_in(error: BaseException) -> list[str]:
    return list(dict.fromkeys(_GLOBAL_IN_MESSAGE.findall(str(error)))) if _is_weights_only_refusal(error) else []


def load_error_reason(error: BaseException) -> str:
    """One line on why ``torch.load`` failed, without torch's hints (never "weights_only=False")."""
    if _is_weights_only_refusal(error):
        names = _globals_named_in(error)
        if names:
            return f"it asks for {', '.join(names[:5])}"
        opcode = _OPCODE_IN_MESSAGE.search(str(error))
        if opcode:
            return f"pickle instruction {opcode.group(1)}, which torch's tensor files do not use"
        return "pickled data other than tensors and plain containers"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _unsafe_globals(path: Path) -> list[str]:
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None or not zipfile.is_zipfile(path):
        return []
    try:
        return list(finder(str(path)))
    except Exception:  # a corrupt archive: reported by the caller
        return []


def _is_numpy_data(name: str) -> bool:
    return name in _NUMPY_DATA_GLOBALS or (name.startswith("numpy.dtypes.") and name.endswith("DType"))


def _numpy_data_types() -> list:
    """What rebuilding numpy arrays takes (array and dtype classes, the reconstruct function), nothing callable
    beyond that."""
    import importlib

    import numpy as np

    allowed = [np.ndarray, np.dtype]
    core = "numpy._core" if hasattr(np, "_core") else "numpy.core"  # numpy 2 deprecates numpy.core
    for attr in ("_reconstruct", "scalar"):
        allowed.append(getattr(importlib.import_module(f"{core}.multiarray"), attr))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def unwrap_state_dict(obj, *, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside a training checkpoint (``{'state_dict': ...}`` and friends)."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        # A wrapper key wins even next to loose tensors (a step counter, say): weights never sit under these names.
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name} does not contain a state dict (found {type(obj).__name__}).")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        nested = [k for k, v in obj.items() if isinstance(v, Mapping) and any(isinstance(x, torch.Tensor)
                                                                              for x in v.values())]
        if {"transformer", "dcae"} <= set(nested):
            raise CheckpointError(f"{name} is a training checkpoint of jodi_core.train; load the jodi.safetensors "
                                  f"and dcae.safetensors the run exported next to it.")
        hint = f"; tensors sit under {nested[:4]}" if nested else ""
        raise CheckpointError(f"{name} contains no tensors at its top level (keys: {sorted(map(str, obj))[:8]}"
                              f"{hint}).")
    return sd


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
    if "role_embedder.weight" in sd and "x_embedders.0.proj.weight" in sd:
        return "jodi"
    if "encoder.project_in.conv.weight" in sd and "decoder.project_in.main.conv.weight" in sd:
        return "dcae"
    if "encoder.conv_in.weight" in sd and "decoder.conv_in.weight" in sd and any(".attn.to_q" in k for k in sd):
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
    """Fail on quantised weights (fp8, int8: not a format these models load) and on NaN/inf weights (a sign of a
    broken conversion or a bad fp16 export)."""
    for k, v in sd.items():
        if (v.is_floating_point() and v.dtype not in LOADABLE_DTYPES) or v.dtype in (torch.int8, torch.uint8):
            raise CheckpointError(f"{name}: tensor {k!r} is stored as {v.dtype}; quantised weights are not supported "
                                  f"(use an fp32, fp16 or bf16 file).")
        if has_nonfinite(v):
            raise CheckpointError(f"{name}: tensor {k!r} contains NaN or infinite values.")


def has_nonfinite(t: torch.Tensor) -> bool:
    """Whether a weight tensor of a loadable float dtype holds NaN or inf (other dtypes: False; fp8 has no isfinite)."""
    return t.dtype in LOADABLE_DTYPES and not bool(torch.isfinite(t).all())
