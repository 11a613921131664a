"""Weight storage dtypes and cast-on-use layers, so jodi_core alone can keep its weights in fp8.

:data:`CastOps` is a layer namespace like ``torch.nn`` (or ComfyUI's ``comfy.ops.manual_cast``): its layers hold
their weights in any storage dtype and cast weight and bias to the input's dtype and device when they run. A Linear
or Conv2d may also hold a per-tensor ``scale_weight`` (ComfyUI's scaled-fp8 layout: real weight = stored weight *
scale). Models take it as their ``operations``; the loaders choose it for an fp8 ``weight_dtype``.

With ``fp8_compute`` set on a layer (``weight_dtype="fp8_e4m3fn_fast"``, the DiT's loader) and a GPU that has fp8
matmuls (:func:`fp8_matmul_supported`), Linear and 1x1 Conv2d layers quantise their input per tensor and run one
``torch._scaled_mm``; elsewhere they take the cast path and say so once in the log.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["WEIGHT_DTYPES", "FP8_DTYPES", "CastOps", "storage_dtype", "check_weight_dtype", "is_fp8",
           "fp8_matmul_supported", "compute_dtype"]

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_STORAGE = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def check_weight_dtype(weight_dtype: str) -> str:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"Unknown weight_dtype {weight_dtype!r}; expected one of {', '.join(WEIGHT_DTYPES)}.")
    return weight_dtype


def storage_dtype(weight_dtype: str) -> Optional[torch.dtype]:
    """The dtype the large weights are stored in for ``weight_dtype``; None for ``"default"`` (the compute dtype)."""
    return _STORAGE.get(check_weight_dtype(weight_dtype))


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


@functools.lru_cache(maxsize=None)
def _device_has_fp8_matmul(device: str) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    if torch.version.hip:  # AMD's fp8 GPUs use the fnuz formats, not e4m3fn
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)  # Ada and Hopper onwards


def fp8_matmul_supported(device: "torch.device | str") -> bool:
    """Whether ``device`` runs fp8 matmuls (``torch._scaled_mm`` on CUDA compute capability 8.9+)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return _device_has_fp8_matmul(str(device))


def compute_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype ``module`` computes in: that of its first floating parameter not stored in fp8 (norms, biases and
    embeddings always keep the compute dtype)."""
    for p in module.parameters():
        if p.is_floating_point() and not is_fp8(p.dtype):
            return p.dtype
    return default


def cast_workspace_bytes(module: Optional[nn.Module]) -> int:
    """Bytes of the compute-dtype copy that the layer with the largest fp8 weight makes of it while it runs (cast on
    use, scaled in place): what a host reserves beside the activations. 0 where no weight is stored in fp8."""
    if module is None:
        return 0
    size = torch.finfo(compute_dtype(module)).bits // 8
    return max((p.numel() * size for p in module.parameters() if is_fp8(p.dtype)), default=0)


_logged: set = set()


def _log_once(key, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(message, *args)


class _CastWeight:
    """Mixin of CastOps' Linear and Conv2d: weight (times ``scale_weight``) and bias in the input's dtype/device."""

    fp8_compute = False  # set per layer by the loader for weight_dtype "fp8_e4m3fn_fast"

    def _init_scale(self) -> None:
        # A persistent buffer slot: empty until a scaled checkpoint fills it, then it is saved with the weights.
        self.register_buffer("scale_weight", None)

    def cast_weight_bias(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None):
        """(weight, bias) in ``x``'s dtype and device; ``weight``: a view of the stored weight to cast instead."""
        stored = self.weight if weight is None else weight
        weight = stored.to(device=x.device, dtype=x.dtype)
        if self.scale_weight is not None:
            scale = self.scale_weight.to(device=x.device, dtype=x.dtype)
            # In place where the cast made a copy (fp8 -> bf16): one weight-sized temporary, not two (the 7B's text
            # head is 1.6 GiB in bf16).
            weight = weight.mul_(scale) if weight.data_ptr() != stored.data_ptr() else weight * scale
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return weight, bias

    def _linear(self, x: torch.Tensor, weight_2d: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` with ``weight_2d`` (out, in) the stored weight (a view of it for 1x1 convs)."""
        if self.fp8_compute:
            out = _fp8_linear(self, x, weight_2d)
            if out is not None:
                return out
        return F.linear(x, *self.cast_weight_bias(x, weight_2d))


def _fp8_linear(layer: _CastWeight, x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """One ``torch._scaled_mm`` with a per-tensor input scale; None where it cannot run (then the caller casts)."""
    if not fp8_matmul_supported(x.device):
        _log_once(("device", str(x.device)), "fp8 matmuls are not supported on %s: fp8 weights are cast to %s "
                  "for every matmul instead.", x.device, x.dtype)
        return None
    scale_w = layer.scale_weight
    out_features, in_features = weight.shape
    if (weight.dtype != torch.float8_e4m3fn or x.dtype not in (torch.bfloat16, torch.float16)
            or in_features % 16 or out_features % 16 or (scale_w is not None and scale_w.numel() != 1) or not x.numel()
            or torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))):
        _log_once(("shape", type(layer).__name__, in_features, out_features, x.dtype, weight.dtype),
                  "fp8 matmul skipped for a %s %dx%d (%s input, %s weight): cast path.", type(layer).__name__,
                  out_features, in_features, x.dtype, weight.dtype)
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    # Per-tensor input scale from this call's amax (one reduction, no calibration, no host sync), rounded up to a
    # power of two so that dividing by it in the input's 16-bit dtype is exact.
    amax = x2.abs().amax().float().clamp(min=1e-30)
    scale_x = torch.exp2(torch.ceil(torch.log2(amax / fp8_max)))
    xq = (x2 / scale_x.to(x2.dtype)).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn).contiguous()
    w = weight.to(x.device)
    scale_w = (torch.ones((), device=x.device) if scale_w is None else scale_w.to(x.device).float().reshape(()))
    bias = None if layer.bias is None else layer.bias.to(device=x.device, dtype=x.dtype)
    try:
        out = torch._scaled_mm(xq, w.t(), scale_a=scale_x, scale_b=scale_w, bias=bias, out_dtype=x.dtype)
    except RuntimeError as e:  # an unsupported layout or build: this layer casts from now on
        layer.fp8_compute = False
        _log_once(("error", str(e)[:80]), "fp8 matmul failed (%s); that layer casts its weights instead.", e)
        return None
    if isinstance(out, tuple):  # torch < 2.5 also returned the amax
        out = out[0]
    return out.reshape(*lead, out_features)


class CastOps:
    """Layers that keep their weights in any dtype (fp8 included) and compute in the input's dtype and device."""

    class Linear(_CastWeight, nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_scale()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._linear(x, self.weight)

    class Conv2d(_CastWeight, nn.Conv2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_scale()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight, bias = self.cast_weight_bias(x)
            return self._conv_forward(x, weight, bias)

        def pointwise_linear(self, x: torch.Tensor) -> torch.Tensor:
            """A 1x1 conv applied to token-major ``x (..., C_in)`` as one GEMM (and an fp8 one where enabled)."""
            if self.kernel_size != (1, 1) or self.stride != (1, 1) or self.groups != 1 or self.padding not in (
                    (0, 0), "valid"):
                raise ValueError("pointwise_linear needs a 1x1 conv with stride 1, no padding and one group.")
            return self._linear(x, self.weight.flatten(1))

    class LayerNorm(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = None if self.weight is None else self.weight.to(device=x.device, dtype=x.dtype)
            b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

    class GroupNorm(nn.GroupNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = None if self.weight is None else self.weight.to(device=x.device, dtype=x.dtype)
            b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
            return F.group_norm(x, self.num_groups, w, b, self.eps)

    class Embedding(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            # indices carry no float dtype: the table keeps the compute dtype (the loaders never store it in fp8)
            return F.embedding(ids, self.weight.to(ids.device), self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
