"""ReLU linear attention (the LiteLA of Sana/Jodi) and the one registry of the backends that run it.

All backends share one token-major signature::

    fn(q, k, v, key_mask=None, eps=1e-8) -> out

with ``q, k, v`` of shape ``(B, T, H, D)``, ``key_mask`` a ``(B, T)`` bool tensor (True = the key takes part; Jodi sets
False for the tokens of ignored domains) and ``out`` of shape ``(B, T, H, D)`` in ``q.dtype``. Per batch row and head::

    out_i = sum_j v_j (relu(k_j) . relu(q_i)) / (sum_j relu(k_j) . relu(q_i) + eps)

The torch reference accumulates and divides in float32 whatever the input dtype.

Backends: the registry maps a name to a loader of its :class:`KernelSet` (linear attention, and optionally the DiT's
fused ops): ``triton`` (``jodi_core.kernels``, imported only when a model resolves it, so importing this module never
touches Triton or a GPU) and ``torch`` (the plain PyTorch code). A model resolves its choice once, when it is set up,
with :func:`resolve_backend` into an :class:`AttentionBackend` that its layers call; each model states what ``auto``
means for it. Every kernel call goes through :func:`run_kernel`, the one fallback policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

LinearAttentionFn = Callable[..., torch.Tensor]

AUTO = "auto"


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


def _runs_anywhere(*tensors: torch.Tensor) -> bool:
    return True


@dataclass(frozen=True)
class KernelSet:
    """One backend's implementations. ``linear_attention`` has the signature of :func:`linear_attention`; the fused
    ops (given all three or none) have those of ``jodi_core.kernels``; ``runs_on(*tensors)`` says whether the kernels
    can run on such tensors (elsewhere the torch code runs, which is no failure)."""

    linear_attention: LinearAttentionFn
    layernorm_modulate: Optional[Callable[..., torch.Tensor]] = None
    gate_residual: Optional[Callable[..., torch.Tensor]] = None
    dwconv_glu: Optional[Callable[..., torch.Tensor]] = None
    runs_on: Callable[..., bool] = _runs_anywhere

    def __post_init__(self):
        given = [op is not None for op in (self.layernorm_modulate, self.gate_residual, self.dwconv_glu)]
        if any(given) and not all(given):
            raise ValueError("A KernelSet gives the three fused ops (layernorm_modulate, gate_residual, dwconv_glu) "
                             "or none of them.")

    @property
    def fuses(self) -> bool:
        return self.dwconv_glu is not None


def _triton_kernels() -> KernelSet:
    from ..kernels import triton_kernels  # here, not at import: Triton loads only when a model resolves it

    return triton_kernels()


# name -> loader of its kernels (None: the plain torch code). Loaders may raise: the backend is then unavailable.
_REGISTRY: dict[str, Optional[Callable[[], KernelSet]]] = {"triton": _triton_kernels, "torch": None}
_loaded: dict[str, Optional[KernelSet]] = {}
_disabled: set[str] = set()  # kernels that failed to compile or launch: the torch code runs from then on
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def register_backend(name: str, loader: Callable[[], KernelSet]) -> None:
    """Register a backend by name. ``loader()`` returns its :class:`KernelSet`, or raises when it cannot run here."""
    if not name or name == AUTO:
        raise ValueError(f"Invalid attention backend name {name!r}.")
    _REGISTRY[name] = loader
    _loaded.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """The names a model accepts, ``auto`` first (the loaders' choices)."""
    return (AUTO,) + tuple(_REGISTRY)


def check_backend(name: str) -> str:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"Unknown attention backend {name!r}; expected one of {', '.join(backend_names())}.")
    return name


def _load(name: str) -> Optional[KernelSet]:
    if name not in _loaded:
        try:
            _loaded[name] = _REGISTRY[name]()
        except Exception as exc:  # ImportError, or a broken Triton install raising anything at import
            _warn_once(f"load:{name}", f"The {name} attention backend is unavailable ({exc!r}); using PyTorch.")
            _loaded[name] = None
    return _loaded[name]


def must_propagate(exc: BaseException) -> bool:
    """Errors a fallback must not swallow: out of memory (the caller, e.g. ComfyUI, frees models and retries) and
    torch.compile's tracing errors (raised while compiling the caller, not by the kernel)."""
    if isinstance(exc, torch.OutOfMemoryError) or type(exc).__module__.startswith("torch._dynamo"):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()  # Triton's launcher says it so


def run_kernel(op: str, kernel: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor], *args):
    """``kernel(*args)``, or ``reference(*args)`` (its torch definition) where the kernel cannot run: the one fallback
    policy of every backend and fused op.

    Out of memory and tracing errors propagate; inputs the kernel rejects (TypeError/ValueError) run on torch for
    this call; any other failure (a compile or launch error) is reported once and turns kernel ``op`` off for the
    rest of the process.
    """
    if op in _disabled:
        return reference(*args)
    try:
        return kernel(*args)
    except Exception as exc:
        if must_propagate(exc):
            raise
        if isinstance(exc, (TypeError, ValueError)):  # e.g. another head dim: these inputs only
            _warn_once(f"inputs:{op}:{exc}", f"The {op} kernel does not take these inputs ({exc}); using PyTorch "
                       "for them.")
        else:
            _disabled.add(op)
            _warn_once(f"failed:{op}", f"The {op} kernel failed ({exc!r}); using PyTorch from now on.")
        return reference(*args)


@dataclass(frozen=True)
class AttentionBackend:
    """A backend choice resolved for one model (:func:`resolve_backend`): what its linear attention and the DiT's
    fused ops run. ``name`` is the choice as given (``auto`` included); ``kernels`` None means the torch code."""

    name: str
    kernels: Optional[KernelSet] = None
    kernel_name: str = "torch"  # the registry entry ``kernels`` came from, for messages
    cuda_only: bool = False  # resolved from ``auto``: the kernels only for CUDA tensors

    def takes_kernels(self, t: torch.Tensor) -> bool:
        """Whether the kernels run on tensors like ``t`` (else the torch code does)."""
        if self.kernels is None or (self.cuda_only and not t.is_cuda):
            return False
        return self.kernels.runs_on(t)

    def linear_attention(self, q, k, v, key_mask: Optional[torch.Tensor] = None, eps: float = 1e-8) -> torch.Tensor:
        """:func:`linear_attention`, on this backend's kernel where it runs."""
        if not self.takes_kernels(q):
            return linear_attention(q, k, v, key_mask, eps)
        op = f"{self.kernel_name} linear_attention"
        return run_kernel(op, self.kernels.linear_attention, linear_attention, q, k, v, key_mask, eps)

    def fused_ops(self, x: torch.Tensor) -> Optional[KernelSet]:
        """The kernels for the DiT's fused ops on activations ``x``, or None for the model's plain torch code. CUDA
        tensors only, so the CPU path (and its parity with the reference) never depends on Triton."""
        kernels = self.kernels
        return kernels if kernels is not None and kernels.fuses and x.is_cuda else None


TORCH = AttentionBackend("torch")


def resolve_backend(name: str, *, auto: str) -> AttentionBackend:
    """Resolve a model's backend choice once, when the model is set up.

    ``auto`` is the model's own meaning of ``"auto"``; resolved from it, a backend with kernels runs them only on CUDA
    tensors, and is not even loaded without a CUDA device. A backend named explicitly runs its kernels wherever they
    can run. A backend that cannot load warns once and runs the torch code.
    """
    check_backend(name)
    chosen = check_backend(auto) if name == AUTO else name
    if _REGISTRY[chosen] is None or (name == AUTO and not torch.cuda.is_available()):
        return AttentionBackend(name)
    return AttentionBackend(name, _load(chosen), chosen, cuda_only=name == AUTO)


class AttentionSetting:
    """A model's ``attention_backend`` property: it reads as the name given, and setting it resolves the name once
    (``auto`` meaning the model's ``auto``) into the :class:`AttentionBackend` at ``model.attention``, also handed to
    the layers that hold one (the DC-AE's attention blocks); the DiT passes it to its blocks on each forward."""

    def __init__(self, auto: str):
        self.auto = check_backend(auto)

    def __get__(self, model, owner=None):
        return self if model is None else model.attention.name

    def __set__(self, model, name: str) -> None:
        attention = resolve_backend(name, auto=self.auto)
        for module in model.modules():
            if module is model or isinstance(getattr(module, "attention", None), AttentionBackend):
                module.attention = attention
