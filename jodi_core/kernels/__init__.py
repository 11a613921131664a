"""Optional Triton kernels for the Jodi DiT.

Nothing here imports Triton at module import time: each kernel module imports it when it is itself imported, and the
callers (``jodi_core.attention``'s dispatcher, the fused-op wrappers) import those modules lazily. Every fused op has a
PyTorch function of the same signature that computes the same thing, used on CPU, without Triton, or after a kernel
fails to compile.

Modules:
- ``linear_attention``: ReLU linear attention (LiteLA) in two deterministic kernels (state, then apply).
- ``dwconv_glu``: SiLU -> depthwise 3x3 conv -> value * SiLU(gate), the memory-bound middle of GLUMBConv.
- ``layernorm_modulate``: LayerNorm without affine fused with the adaLN ``x * (1 + scale) + shift``.
- ``gate_residual``: the gated residual ``x + gate * y`` of the DiT blocks.
"""

from __future__ import annotations

import importlib.util
import logging
import os

logger = logging.getLogger(__name__)


_importable: dict[str, bool] = {}  # a plain dict cache: torch.compile traces it without warnings


def _triton_importable() -> bool:
    if "triton" not in _importable:
        ok = importlib.util.find_spec("triton") is not None
        if ok:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
            except Exception as exc:  # a broken install can raise anything at import
                logger.info("Triton is installed but does not import (%r).", exc)
                ok = False
        _importable["triton"] = ok
    return _importable["triton"]


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), e.g. in the CPU tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Whether Triton kernels can run here: Triton imports, and a CUDA device or the interpreter is there.

    Cheap after the first call (cached) and never raises.
    """
    try:
        if not _triton_importable():
            return False
        if interpreter_enabled():
            return True
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # never let a probe break the caller
        return False


def tensors_supported(*tensors) -> bool:
    """Whether these tensors live where the kernels can run (CUDA, or anywhere under the interpreter)."""
    if interpreter_enabled():
        return True
    return all(t.is_cuda for t in tensors)


FUSED_BACKENDS = ("auto", "triton", "torch")
_failed: set[str] = set()


def use_triton(name: str, backend: str, *tensors) -> bool:
    """Whether fused op ``name`` should take its Triton path for these tensors under ``backend``.

    ``auto`` and ``triton`` both take Triton only where it can run (CUDA or the interpreter) and only until a
    kernel of that op has failed once; ``torch`` never does.
    """
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(FUSED_BACKENDS)}.")
    if backend == "torch" or name in _failed:
        return False
    return triton_available() and tensors_supported(*tensors)


def must_propagate(exc: BaseException) -> bool:
    """Errors a fallback must not swallow: out of memory (the caller, e.g. ComfyUI, frees models and retries) and
    torch.compile's tracing errors (raised while compiling the caller, not by the kernel)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or type(exc).__module__.startswith("torch._dynamo"):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()  # Triton's launcher says it so


_warned_inputs: set[tuple[str, str]] = set()


def kernel_failed(name: str, exc: Exception) -> None:
    """Handle an exception from fused op ``name``'s Triton path; the caller then runs the torch path.

    Out of memory and tracing errors are re-raised; inputs the kernel rejects (ValueError/TypeError) go to torch for
    this call only; anything else is a compile or launch failure: warn once, use torch from now on.
    """
    if must_propagate(exc):
        raise exc
    if isinstance(exc, (ValueError, TypeError)):
        if (name, str(exc)) not in _warned_inputs:
            _warned_inputs.add((name, str(exc)))
            logger.warning("Triton kernel %s does not take these inputs (%s); using PyTorch for them.", name, exc)
        return
    if name not in _failed:
        _failed.add(name)
        logger.warning("Triton kernel %s failed (%r); using the PyTorch path from now on.", name, exc)
