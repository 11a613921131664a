"""ReLU linear attention (the LiteLA of Sana/Jodi) and its backend dispatcher.

All backends share one token-major signature::

    fn(q, k, v, key_mask=None, eps=1e-8) -> out

with ``q, k, v`` of shape ``(B, T, H, D)``, ``key_mask`` a ``(B, T)`` bool tensor (True = the key takes part; Jodi sets
False for the tokens of ignored domains) and ``out`` of shape ``(B, T, H, D)`` in ``q.dtype``. Per batch row and head::

    out_i = sum_j v_j (relu(k_j) . relu(q_i)) / (sum_j relu(k_j) . relu(q_i) + eps)

The torch reference accumulates and divides in float32 whatever the input dtype. The Triton backend lives in
``jodi_core.kernels.linear_attention`` and is imported lazily, only when it is first asked for, so importing this
module never touches Triton or a GPU.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

LinearAttentionFn = Callable[..., torch.Tensor]

ATTENTION_BACKENDS = ("auto", "triton", "torch")


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Torch reference of ReLU linear attention; see the module docstring for shapes and maths.

    Plain tensor code (no Python control flow on values), so it traces under ``torch.compile(fullgraph=True)``.
    """
    q32 = F.relu(q).float()
    k32 = F.relu(k).float()
    v32 = v.float()
    if key_mask is not None:
        # Masked keys vanish from both the numerator and the normaliser.
        k32 = k32 * key_mask[:, :, None, None].to(k32.dtype)
    kv = torch.einsum("bthd,bthe->bhde", k32, v32)  # (B, H, D, D)
    k_sum = k32.sum(dim=1)  # (B, H, D)
    num = torch.einsum("bthd,bhde->bthe", q32, kv)  # (B, T, H, D)
    den = torch.einsum("bthd,bhd->bth", q32, k_sum)  # (B, T, H)
    return (num / (den.unsqueeze(-1) + eps)).to(q.dtype)


def _load_triton() -> Optional[LinearAttentionFn]:
    try:
        from .kernels.linear_attention import linear_attention_triton
    except Exception as exc:  # ImportError, or a broken Triton install raising anything at import
        _warn_once("import", f"Triton linear attention is unavailable ({exc!r}); using the PyTorch path.")
        return None
    return linear_attention_triton


_BACKENDS: dict[str, Callable[[], Optional[LinearAttentionFn]]] = {
    "torch": lambda: linear_attention,
    "triton": _load_triton,
}
_resolved: dict[str, Optional[LinearAttentionFn]] = {}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def register_backend(name: str, loader: Callable[[], Optional[LinearAttentionFn]]) -> None:
    """Register a backend by name. ``loader()`` returns the function, or None when it cannot run here."""
    if not name or name == "auto":
        raise ValueError(f"Invalid attention backend name {name!r}.")
    _BACKENDS[name] = loader
    _resolved.pop(name, None)


def available_backends() -> tuple[str, ...]:
    return ("auto",) + tuple(_BACKENDS)


def check_backend(name: str) -> str:
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; expected one of {', '.join(available_backends())}.")
    return name


def _get(name: str) -> Optional[LinearAttentionFn]:
    if name not in _resolved:
        _resolved[name] = _BACKENDS[name]()
    return _resolved[name]


def resolve_backend(name: str, device: torch.device) -> tuple[str, LinearAttentionFn]:
    """Pick the backend that will run on ``device``: ``(name, fn)``.

    ``auto`` takes Triton only for CUDA tensors and only when its module imports; anything else runs the torch
    reference. An explicitly named backend that cannot load falls back to torch with one warning.
    """
    check_backend(name)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    fn = _get(name)
    if fn is None:
        return "torch", linear_attention
    return name, fn


def dispatch_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    """Run linear attention on the chosen backend.

    Inputs the backend rejects (TypeError/ValueError) run on torch for that call; out of memory and torch.compile
    tracing errors propagate; any other failure (a Triton compile or launch error) is reported once and turns the
    backend off for the rest of the process.
    """
    name, fn = resolve_backend(backend, q.device)
    if name == "torch":
        return linear_attention(q, k, v, key_mask, eps)
    try:
        return fn(q, k, v, key_mask, eps)
    except (TypeError, ValueError) as exc:
        # Inputs this backend does not take (e.g. another head dim): route them to torch, keep the backend.
        _warn_once(f"inputs:{name}:{exc}", f"The {name} linear attention does not take these inputs ({exc}); "
                   "using PyTorch for them.")
        return linear_attention(q, k, v, key_mask, eps)
    except Exception as exc:  # a compile or launch failure: the backend is unusable here
        from .kernels import must_propagate  # not at import: the kernels package stays unloaded on plain torch

        if must_propagate(exc):
            raise
        _warn_once(f"call:{name}", f"The {name} linear attention failed ({exc!r}); falling back to PyTorch for good.")
        _resolved[name] = None
        return linear_attention(q, k, v, key_mask, eps)
