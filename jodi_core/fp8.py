"""fp8 checkpoints and fp8 weight storage at load time, for the DiT, the DC-AE and Janus.

Checkpoints may hold fp8 tensors in two layouts:

- plain: a weight stored as ``float8_e4m3fn`` / ``float8_e5m2`` is its real value;
- ComfyUI's scaled fp8: a ``scaled_fp8`` marker tensor (its dtype names the format) and, per quantised layer,
  ``<layer>.scale_weight`` (float32, one value): real weight = ``weight.float() * scale_weight``; an optional
  ``<layer>.scale_input`` serves ComfyUI's fp8 matmuls. Newer ComfyUI files name them ``weight_scale`` /
  ``input_scale`` with a ``comfy_quant`` entry per layer; per-tensor fp8 ones of those read the same way.

Loading (:func:`load_weights`) turns what the file holds into what the model stores: with ``weight_dtype="default"``
every weight in the compute dtype (fp8 ones dequantised); with an fp8 ``weight_dtype`` the weights of the Linear and
Conv2d layers in fp8 and everything else (norms, embeddings, biases, depthwise convs, tables) in the compute dtype.
Layers that can hold a scale (:class:`~jodi_core.ops.CastOps`, ComfyUI's scaled-fp8 ops) get a power-of-two
per-tensor scale, which uses the whole fp8 range and dequantises exactly; other host layers get a plain cast.
"""

from __future__ import annotations

import json
import math
from typing import Mapping, Optional

import torch
from torch import nn

from . import ops
from .checkpoint import CheckpointError

SCALED_FP8_MARKER = "scaled_fp8"
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
_QUANT_CONFIG_SUFFIX = ".comfy_quant"
_CAST_LAYERS = (ops.CastOps.Linear, ops.CastOps.Conv2d)

# Layers kept in the compute dtype under an fp8 weight_dtype, by model: the first and last layers of the image
# paths, which are tiny and carry the most error per parameter (measured on the demo model: tests/test_fp8.py).
KEEP_HIGH_PRECISION: dict[str, tuple[str, ...]] = {
    "Jodi DiT": ("x_embedders.", "final_layers."),
    "DC-AE": ("encoder.project_in.", "decoder.project_out."),
    "Janus": ("vision_model.vision_tower.patch_embed.", "gen_vision_model.decoder.conv_out."),
}


class Scales(dict):
    """Per-tensor scales read from a checkpoint: weight key -> scale, and ``inputs``: weight key -> input scale."""

    def __init__(self, weights=(), inputs=()):
        super().__init__(weights)
        self.inputs = dict(inputs)


# ---------------------------------------------------------------------------------------------------------------------
# Reading fp8 checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _quant_format(value: torch.Tensor, key: str, name: str) -> str:
    try:
        fmt = json.loads(bytes(value.to(torch.uint8).tolist()).decode("utf-8")).get("format", "")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{name}: {key!r} is not a readable quantisation entry ({e}).") from None
    if fmt not in ("float8_e4m3fn", "float8_e5m2"):
        raise CheckpointError(f"{name}: layer {key[: -len(_QUANT_CONFIG_SUFFIX)]!r} is quantised as {fmt!r}; only "
                              f"fp8 (float8_e4m3fn, float8_e5m2) with per-tensor scales is supported.")
    return fmt


def split_scales(sd: Mapping[str, torch.Tensor], *, name: str = "checkpoint") -> tuple[dict, Scales]:
    """``sd`` without the scaled-fp8 bookkeeping (marker, scales, quantisation entries), and the scales by weight key.

    A file without any of them comes back as it is (the same dict) with empty scales.
    """
    extra = [k for k in sd if k == SCALED_FP8_MARKER or k.endswith(("." + SCALED_FP8_MARKER, _QUANT_CONFIG_SUFFIX)
                                                                    + _WEIGHT_SCALE_SUFFIXES + _INPUT_SCALE_SUFFIXES)]
    if not extra:
        return sd, Scales()
    scales = Scales()
    rest = dict(sd)
    for key in extra:
        value = rest.pop(key)
        if key.endswith(_QUANT_CONFIG_SUFFIX):
            _quant_format(value, key, name)
        elif key.endswith(_WEIGHT_SCALE_SUFFIXES + _INPUT_SCALE_SUFFIXES):
            layer = key.rsplit(".", 1)[0]
            if not value.is_floating_point() or ops.is_fp8(value.dtype) or not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{name}: scale {key!r} must hold finite float values (it is {value.dtype}).")
            target = scales.inputs if key.endswith(_INPUT_SCALE_SUFFIXES) else scales
            target[f"{layer}.weight"] = value.float()
    return rest, scales


def join_scales(sd: dict, scales: Scales) -> dict:
    """The inverse of :func:`split_scales` (ComfyUI's names), for code that renames or drops keys in between."""
    for key, scale in scales.items():
        sd[key[: -len("weight")] + "scale_weight"] = scale
    for key, scale in scales.inputs.items():
        sd[key[: -len("weight")] + "scale_input"] = scale
    return sd


def has_fp8(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(ops.is_fp8(v.dtype) for v in sd.values())


def fp8_nonfinite(t: torch.Tensor) -> bool:
    """Whether an fp8 tensor holds NaN (or inf for e5m2), read from the bit patterns: fp8 has no isfinite kernel."""
    bits = t.reshape(-1).view(torch.uint8)
    if t.dtype == torch.float8_e4m3fn:  # no inf; NaN is S.1111.111
        return bool(((bits & 0x7F) == 0x7F).any())
    return bool(((bits & 0x7C) == 0x7C).any())  # e5m2: exponent all ones is inf or NaN


def _shaped(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A scale that broadcasts over ``weight``: one value, or one per output channel."""
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == weight.shape[0]:
        return scale.reshape(weight.shape[0], *([1] * (weight.dim() - 1)))
    raise CheckpointError(f"A scale of shape {tuple(scale.shape)} does not fit a weight of shape "
                          f"{tuple(weight.shape)}.")


def dequantize(value: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The real value of a stored tensor in ``dtype`` (scaled in float32 first)."""
    if scale is None:
        return value.to(dtype)
    return (value.float() * _shaped(scale, value)).to(dtype)


def dequantize_all(sd: dict, scales: Scales, dtype: Optional[torch.dtype] = None) -> dict:
    """Every fp8 or scaled tensor of ``sd`` in ``dtype`` (default: the file's other float dtype, else bf16); for key
    layouts that must be renamed or fused first (diffusers DC-AE, HF Janus)."""
    dtype = dtype or unquantized_dtype(sd) or torch.bfloat16
    return {k: dequantize(v, scales.get(k), dtype) if k in scales or ops.is_fp8(v.dtype) else v
            for k, v in sd.items()}


def unquantized_dtype(sd: Mapping[str, torch.Tensor]) -> Optional[torch.dtype]:
    """The one float dtype of the tensors that are not fp8, if there is one."""
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point() and not ops.is_fp8(v.dtype)}
    return dtypes.pop() if len(dtypes) == 1 else None


# ---------------------------------------------------------------------------------------------------------------------
# Storing weights in fp8
# ---------------------------------------------------------------------------------------------------------------------


def pow2_scale(amax: float, storage: torch.dtype) -> float:
    """The power of two that brings ``amax`` into (max/2, max] of ``storage``: full range, exact dequantisation."""
    fmax = torch.finfo(storage).max
    if not amax > 0 or not math.isfinite(amax):
        return 1.0
    return 2.0 ** math.ceil(math.log2(amax / fmax))


def quantize(value: torch.Tensor, storage: torch.dtype, *, scaled: bool
             ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``value`` (real values, any float dtype) in ``storage``, with its float32 scale when ``scaled``.
    Out-of-range values saturate (a plain cast to e4m3fn would turn them into NaN)."""
    fmax = torch.finfo(storage).max
    v = value.float()
    scale = None
    if scaled:
        scale = torch.tensor(pow2_scale(float(v.abs().amax()) if v.numel() else 0.0, storage))
        v = v / scale
    return v.clamp(-fmax, fmax).to(storage), scale


def fp8_layers(model: nn.Module, what: str) -> dict[str, nn.Module]:
    """Weight key -> layer of the weights an fp8 ``weight_dtype`` stores in fp8: Linear and Conv2d weights (host
    classes derive from torch's), except depthwise convs (tiny, one filter per channel) and
    :data:`KEEP_HIGH_PRECISION`."""
    keep = KEEP_HIGH_PRECISION.get(what, ())
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or name.startswith(keep) or name + "." in keep:
            continue
        if isinstance(module, nn.Conv2d) and module.groups == module.in_channels and module.in_channels > 1:
            continue
        out[f"{name}.weight" if name else "weight"] = module
    return out


def _slot(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has a ``name`` tensor slot: CastOps' buffer (maybe still None) or a host's parameter."""
    return name in module._buffers or isinstance(getattr(module, name, None), torch.Tensor)


def _stored(value: torch.Tensor, scale: Optional[torch.Tensor], storage: torch.dtype, scaled: bool):
    """(stored weight, its scale or None) for one fp8 layer, re-quantising only where the file's form differs."""
    if value.dtype == storage and (scale is None or (scaled and scale.numel() == 1)):
        return value, (None if scale is None else scale.reshape(()))
    return quantize(dequantize(value, scale, torch.float32), storage, scaled=scaled)


def prepare_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], scales: Scales, *, what: str,
                       weight_dtype: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What ``model`` (built on the meta device) loads: every tensor in its stored dtype, scale tensors added where
    its layers hold them (CastOps' scale slot is given a meta placeholder so the strict key check expects it)."""
    storage = ops.storage_dtype(weight_dtype)
    layers = fp8_layers(model, what) if storage is not None else {}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        layer = layers.get(key)
        if layer is None:
            scale = scales.get(key)
            floating = value.is_floating_point()
            out[key] = dequantize(value, scale, dtype) if floating else value
            continue
        prefix = key[: -len("weight")]
        scaled = _slot(layer, "scale_weight")
        stored, scale = _stored(value, scales.get(key), storage, scaled)
        out[key] = stored
        if scaled and (scale is not None or not isinstance(layer, _CAST_LAYERS)):
            out[prefix + "scale_weight"] = torch.ones(()) if scale is None else scale
            if getattr(layer, "scale_weight", None) is None:
                layer.scale_weight = torch.empty((), device="meta")
        if isinstance(getattr(layer, "scale_input", None), torch.Tensor):  # a host's fp8 matmul input scale
            out[prefix + "scale_input"] = scales.inputs.get(key, torch.ones(())).reshape(())
    # Host layers with scale parameters that hold a 16-bit weight (kept layers, or weight_dtype "default"): scale 1
    for key in _host_scale_slots(model):
        out.setdefault(key, torch.ones(()))
    return out


def _host_scale_slots(model: nn.Module) -> list[str]:
    """State-dict keys of the scale parameters of a host's layers (ComfyUI's scaled-fp8 ops)."""
    return [f"{name}.{slot}" if name else slot for name, module in model.named_modules()
            for slot in ("scale_weight", "scale_input") if isinstance(module._parameters.get(slot), torch.Tensor)]


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], scales: Scales, *, what: str,
                 weight_dtype: str = "default", dtype: Optional[torch.dtype], device) -> nn.Module:
    """Load ``sd`` strictly into ``model`` (built on meta) with the storage ``weight_dtype`` asks for; ``dtype``:
    the compute dtype (None: :func:`compute_dtype_of` the file).

    A file with neither fp8 tensors nor scales under ``"default"`` loads exactly as before: every float tensor
    cast to ``dtype`` (None: each keeps its own).
    """
    from .loading import load_state_dict_strict

    plain = not scales and not scales.inputs and not has_fp8(sd) and not _host_scale_slots(model)
    if weight_dtype == "default" and plain:
        return load_state_dict_strict(model, sd, what=what, dtype=dtype, device=device)
    dtype = compute_dtype_of(sd, dtype)
    sd = prepare_state_dict(model, sd, scales, what=what, weight_dtype=weight_dtype, dtype=dtype)
    load_state_dict_strict(model, sd, what=what, device=device)
    if weight_dtype == "fp8_e4m3fn_fast":
        enable_fp8_compute(model)
    return model


def enable_fp8_compute(model: nn.Module) -> int:
    """Turn on the fp8 matmul path of every CastOps layer whose weight is e4m3fn; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, _CAST_LAYERS) and module.weight.dtype == torch.float8_e4m3fn:
            module.fp8_compute = True
            count += 1
    return count


def operations_for(weight_dtype: str, operations=None):
    """The layer namespace a loader builds with: the host's, else CastOps for an fp8 ``weight_dtype``, else None
    (``torch.nn``, today's models)."""
    if operations is not None:
        return operations
    return ops.CastOps if ops.storage_dtype(weight_dtype) is not None else None


def compute_dtype_of(sd: Mapping[str, torch.Tensor], requested: Optional[torch.dtype]) -> torch.dtype:
    """The compute dtype for ``dtype=None``: the checkpoint's one float dtype; fp8 tensors and float32 scales do not
    count when there are others (an fp8 file computes in its 16-bit norms' dtype, else bf16)."""
    if requested is not None:
        return requested
    sd, _ = split_scales(sd)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(dtypes) == 1 and not ops.is_fp8(next(iter(dtypes))):
        return dtypes.pop()
    if not any(ops.is_fp8(d) for d in dtypes):
        return torch.float32
    return unquantized_dtype(sd) or torch.bfloat16
