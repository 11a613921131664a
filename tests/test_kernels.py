"""Triton kernels (jodi_core.kernels) against float64 PyTorch references.

On CPU the kernels run in Triton's interpreter: the checks below run in one subprocess started with
``TRITON_INTERPRET=1`` (the variable must be set before Triton is imported, and this pytest process may already have
imported it), which reports per-check results as JSON. With a CUDA device the same checks run compiled, on larger
shapes (``pytest -m gpu``).

Shapes are chosen so that token counts, widths and channel counts are not multiples of any block size.
Two interpreter artefacts (Triton 3.8) shape the tolerances: its fp32 -> bf16 conversion truncates instead of rounding
to nearest (1 ulp), and its 16-bit ``tl.dot`` is wrong, so the state kernel takes its float32 path there (the
compiled 16-bit path is covered by the GPU run).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# Checks (shared by the interpreter run and the GPU run). Each takes (device, big) and raises AssertionError.
# ---------------------------------------------------------------------------------------------------------------------

_RTOL = {torch.float32: 2e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    o, r = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    atol = 1e-5 * float(r.abs().max()) + 1e-30
    bad = (o - r).abs() > atol + _RTOL[dtype] * r.abs()
    rel = float((o - r).norm() / (r.norm() + 1e-30))
    err = float((o - r).abs().max())
    assert not bad.any(), f"{what}: {int(bad.sum())}/{o.numel()} elements off; max err {err:.3g}"
    assert rel < _RTOL[dtype], f"{what}: relative error {rel:.3g}"


def _make_mask(kind: str, B: int, T: int, device) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "random":
        return torch.rand(B, T, device=device) > 0.3
    if kind == "domains":  # whole token ranges ignored, a different set per row (Jodi's role-2 domains)
        m = torch.ones(B, T, dtype=torch.bool, device=device)
        m[0, T // 3 : 2 * T // 3] = False
        m[-1, : T // 2] = False
        return m
    if kind == "rowoff":  # one row has no key at all: its output is 0 / eps = 0
        m = torch.rand(B, T, device=device) > 0.5
        m[-1] = False
        return m
    raise ValueError(kind)


def _qkv(B, T, H, D, dtype, device):
    # Three strided views of one (B, T, 3, H, D) tensor, as the DiT's qkv Linear produces.
    qkv = torch.randn(B, T, 3, H, D, device=device).to(dtype)
    return qkv.unbind(2)


def check_linear_attention(device, big, dtype_name, T, mask_kind):
    from jodi_core.dit.attention import linear_attention
    from jodi_core.kernels.linear_attention import linear_attention_triton

    dtype = _DTYPES[dtype_name]
    B, H, D = (2, 8, 32) if big else (2, 3, 32)
    T = T * 16 if big else T
    q, k, v = _qkv(B, T, H, D, dtype, device)
    mask = _make_mask(mask_kind, B, T, device)
    out = linear_attention_triton(q, k, v, mask)
    ref = linear_attention(q.double(), k.double(), v.double(), mask)
    _assert_close(out, ref, dtype, f"linear attention {dtype_name} T={T} mask={mask_kind}")
    assert out.is_contiguous()
    if mask_kind == "rowoff":
        assert (out[-1] == 0).all(), "a row with every key masked must give zeros"
    # Same-dtype torch path: the same function up to float32 summation order and one output rounding.
    same = linear_attention(q, k, v, mask)
    ulp = _RTOL[dtype] * same.double().abs() + 1e-5 * float(same.double().abs().max())
    assert ((out.double() - same.double()).abs() <= 2 * ulp).all(), "differs from the torch path by > 1 ulp"


def check_linear_attention_splits(device, big):
    """One chunk (long loop per program) and one chunk per token block give the same answer."""
    from jodi_core.dit.attention import linear_attention
    from jodi_core.kernels import linear_attention as mod

    B, T, H, D = (2, 5000, 4, 32) if big else (1, 300, 2, 32)
    q, k, v = _qkv(B, T, H, D, torch.float32, device)
    mask = _make_mask("random", B, T, device)
    ref = linear_attention(q.double(), k.double(), v.double(), mask)
    saved = mod._TARGET_STATE_PROGRAMS
    try:
        for target in (1, 10**9):
            mod._TARGET_STATE_PROGRAMS = target
            n_split, per = mod._num_splits(B, H, T)
            assert (target == 1) == (n_split == 1), (target, n_split)
            _assert_close(mod.linear_attention_triton(q, k, v, mask), ref, torch.float32, f"{n_split} chunks")
    finally:
        mod._TARGET_STATE_PROGRAMS = saved


def check_linear_attention_head_dims(device, big):
    from jodi_core.dit.attention import linear_attention
    from jodi_core.kernels.linear_attention import linear_attention_triton

    for D in (16, 64):
        q, k, v = _qkv(2, 77, 2, D, torch.float16, device)
        mask = _make_mask("random", 2, 77, device)
        ref = linear_attention(q.double(), k.double(), v.double(), mask)
        _assert_close(linear_attention_triton(q, k, v, mask), ref, torch.float16, f"head dim {D}")


def check_linear_attention_deterministic(device, big):
    from jodi_core.kernels.linear_attention import linear_attention_triton

    T = 4099 if big else 333
    q, k, v = _qkv(2, T, 3, 32, torch.bfloat16, device)
    mask = _make_mask("random", 2, T, device)
    a = linear_attention_triton(q, k, v, mask)
    b = linear_attention_triton(q, k, v, mask)
    assert torch.equal(a, b), "two identical calls differ"


def check_linear_attention_empty(device, big):
    from jodi_core.kernels.linear_attention import linear_attention_triton

    q = torch.randn(2, 0, 3, 32, device=device)
    assert linear_attention_triton(q, q, q).shape == (2, 0, 3, 32)


def check_dwconv_glu(device, big, dtype_name, layout, with_bias):
    from jodi_core.kernels.dwconv_glu import dwconv_glu_torch, dwconv_glu_triton

    dtype = _DTYPES[dtype_name]
    B, M, H, W = (3, 300, 33, 45) if big else (2, 70, 5, 19)
    x = torch.randn(B, 2 * M, H, W, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(2 * M, 1, 3, 3, device=device) / 3).to(dtype)
    b = torch.randn(2 * M, device=device).to(dtype) if with_bias else None
    ref = dwconv_glu_torch(x.double(), w.double(), None if b is None else b.double())
    _assert_close(dwconv_glu_triton(x, w, b), ref, dtype, f"dwconv_glu {dtype_name} {layout} bias={with_bias}")
    # Other tilings on a smaller image, row blocks that split it (the last one partial) included.
    if dtype_name == "bf16":
        x, w = x[:1, : 2 * 20, :, :7], w[: 2 * 20]
        b = None if b is None else b[: 2 * 20]
        ref = dwconv_glu_torch(x.double(), w.double(), None if b is None else b.double())
        for bx, bc, rows in ((4, 16, 2), (8, 32, 3)):
            out = dwconv_glu_triton(x, w, b, block_x=bx, block_c=bc, rows=rows)
            _assert_close(out, ref, dtype, f"dwconv_glu {dtype_name} block_x={bx} block_c={bc} rows={rows}")


def check_dwconv_glu_tiny_images(device, big):
    from jodi_core.kernels.dwconv_glu import dwconv_glu_torch, dwconv_glu_triton

    for H, W in ((1, 1), (1, 7), (6, 1), (2, 17)):
        x = torch.randn(2, 10, H, W, device=device)
        w, b = torch.randn(10, 1, 3, 3, device=device), torch.randn(10, device=device)
        _assert_close(dwconv_glu_triton(x, w, b), dwconv_glu_torch(x.double(), w.double(), b.double()),
                      torch.float32, f"dwconv_glu {H}x{W}")


def check_layernorm_modulate(device, big, dtype_name):
    from jodi_core.kernels.layernorm_modulate import layernorm_modulate_torch, layernorm_modulate_triton

    dtype = _DTYPES[dtype_name]
    N, L, T, C = (2, 3, 130, 2240) if big else (2, 3, 7, 100)
    x = (torch.randn(N, L, T, C, device=device) * 3 + 1).to(dtype)
    mod = torch.randn(N, L, 6, C, device=device).to(dtype)
    shift, scale, *_ = mod.unsqueeze(3).unbind(2)  # strided (N, L, 1, C) views, as in the DiT block
    out = layernorm_modulate_triton(x, shift, scale, 1e-6)
    ref = layernorm_modulate_torch(x.double(), shift.double(), scale.double(), 1e-6)
    _assert_close(out, ref, dtype, f"layernorm_modulate {dtype_name}")


def check_gate_residual(device, big, dtype_name):
    from jodi_core.kernels.gate_residual import gate_residual_torch, gate_residual_triton

    dtype = _DTYPES[dtype_name]
    N, L, T, C = (2, 3, 130, 2240) if big else (2, 3, 7, 100)
    x = torch.randn(N, L, T, C, device=device).to(dtype)
    y = torch.randn(N, L * T, C, device=device).to(dtype).view(N, L, T, C)
    mod = torch.randn(N, L, 6, C, device=device).to(dtype)
    gate = mod.unsqueeze(3).unbind(2)[2]  # strided (N, L, 1, C) view
    ref = gate_residual_torch(x.double(), gate.double(), y.double())
    _assert_close(gate_residual_triton(x, gate, y), ref, dtype, f"gate_residual {dtype_name}")


def check_fused_dispatch(device, big):
    """The fused ops of the ``triton`` backend take the kernel where it runs."""
    from jodi_core.dit import attention
    from jodi_core.kernels.dwconv_glu import dwconv_glu, dwconv_glu_triton
    from jodi_core.kernels.layernorm_modulate import layernorm_modulate, layernorm_modulate_triton

    kernels = attention.resolve_backend("triton", auto="torch").kernels
    assert (kernels.dwconv_glu, kernels.layernorm_modulate) == (dwconv_glu, layernorm_modulate)
    x = torch.randn(2, 8, 4, 5, device=device)
    w, b = torch.randn(8, 1, 3, 3, device=device), torch.randn(8, device=device)
    assert torch.equal(dwconv_glu(x, w, b), dwconv_glu_triton(x, w, b))
    y = torch.randn(2, 5, 16, device=device)
    s = torch.randn(2, 1, 16, device=device)
    assert torch.equal(layernorm_modulate(y, s, s * 2), layernorm_modulate_triton(y, s, s * 2))
    from jodi_core.kernels.gate_residual import gate_residual, gate_residual_triton

    assert torch.equal(gate_residual(y, s, y * 2), gate_residual_triton(y, s, y * 2))
    assert torch.equal(gate_residual(y, s[..., :1], y), y + s[..., :1] * y)  # other broadcasts: torch path


class _CountKernelCalls:
    """Counts the Triton attention calls that returned, so a silent fallback to torch cannot pass a comparison."""

    def __enter__(self):
        import dataclasses

        from jodi_core.dit import attention

        self.kernels = attention.resolve_backend("triton", auto="torch").kernels
        assert self.kernels is not None, "the Triton linear attention cannot run here"
        self.calls = 0

        def counted(*args, **kwargs):
            out = self.kernels.linear_attention(*args, **kwargs)
            self.calls += 1
            return out

        # Models resolving "triton" inside the block get the counting kernel.
        attention._loaded["triton"] = dataclasses.replace(self.kernels, linear_attention=counted)
        return self

    def __exit__(self, *exc):
        from jodi_core.dit import attention

        attention._loaded["triton"] = self.kernels


def check_dit_backends(device, big, dtype_name):
    """The whole DiT with ``attention_backend='triton'`` against ``'torch'``: one batch, a different role set per row
    (joint; perception with two ignored domains), a padded caption. On CUDA the fused ops run too; under the
    interpreter the attention kernel alone (the fused ops take CUDA tensors only).

    fp32: equal up to summation order. 16-bit: Triton is no less accurate than torch against the fp32 model, and
    the two agree within bf16/fp16 tolerance."""
    from jodi_core.jobs.demo import tiny_random_models

    dtype = _DTYPES[dtype_name]
    dit32, _ = tiny_random_models(seed=3)
    dit32 = dit32.to(device)
    h, w = (12, 20) if big else (3, 5)
    N, S = 2, dit32.config.model_max_length
    C = dit32.config.in_channels
    x = torch.randn(N, 8, C, h, w, device=device)
    clean = torch.randn(N, 8, C, h, w, device=device)
    y = torch.randn(N, 1, S, dit32.config.caption_channels, device=device)
    mask = torch.ones(N, S, device=device)
    mask[1, 5:] = 0
    role = torch.tensor([[0] * 8, [1, 0, 0, 2, 0, 2, 0, 0]], device=device)
    t = torch.tensor([700.0, 300.0], device=device)

    def run(model, backend, dt):
        model.attention_backend = backend
        with torch.no_grad():
            return model(x.to(dt), t, y.to(dt), role, mask, clean.to(dt)).double()

    reference = run(dit32, "torch", torch.float32)
    model = dit32 if dtype == torch.float32 else dit32.to(dtype)
    with _CountKernelCalls() as kernel:
        ours = run(model, "triton", dtype)
    assert kernel.calls == dit32.config.depth, f"the kernel ran {kernel.calls} times for {dit32.config.depth} blocks"
    _assert_backends_agree(ours, run(model, "torch", dtype), reference, dtype, "DiT")


def _assert_backends_agree(ours, plain, reference, dtype, what):
    """fp32: equal up to summation order; 16-bit: ours no less accurate than torch against the fp32 model, and the
    two within the dtype's tolerance."""
    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    if dtype == torch.float32:
        assert rel(ours, plain) < 1e-5, f"{what} fp32 triton vs torch: relative error {rel(ours, plain):.3g}"
        return
    err_ours, err_plain = rel(ours, reference), rel(plain, reference)
    assert err_ours <= 1.5 * err_plain + 1e-3, f"{what}: triton {err_ours:.3g} vs torch {err_plain:.3g} against fp32"
    err = rel(ours, plain)
    assert err < 2 * _RTOL[dtype], f"{what} {dtype} triton vs torch: relative error {err:.3g}"


def check_dcae_backends(device, big, dtype_name):
    """The DC-AE's LiteMLA on the Triton kernel against its reference matmuls, encode and decode."""
    from jodi_core.jobs.demo import tiny_random_models

    dtype = _DTYPES[dtype_name]
    _, vae32 = tiny_random_models(seed=5)
    vae32 = vae32.to(device)
    size = (200, 328) if big else (48, 80)  # attention over 50 x 82 / 12 x 20 positions: not block multiples
    image = torch.rand(2, 3, *size, device=device) * 2 - 1
    latent = torch.randn(2, vae32.latent_channels, size[0] // 8, size[1] // 8, device=device)

    def run(model, backend, dt):
        model.attention_backend = backend
        with torch.no_grad():
            return model.encode(image.to(dt)).double(), model.decode(latent.to(dt)).double()

    reference = run(vae32, "torch", torch.float32)
    model = vae32 if dtype == torch.float32 else vae32.to(dtype)
    with _CountKernelCalls() as kernel:
        ours = run(model, "triton", dtype)
    assert kernel.calls > 0, "the DC-AE never ran the kernel"
    plain = run(model, "torch", dtype)
    for i, what in enumerate(("DC-AE encode", "DC-AE decode")):
        _assert_backends_agree(ours[i], plain[i], reference[i], dtype, what)


LA_CASES = [
    (dt, T, mk)
    for dt in ("fp32", "bf16", "fp16")
    for T, mk in ((1, "none"), (64, "random"), (65, "domains"), (200, "rowoff"), (333, "random"))
]
DW_CASES = [
    ("fp32", "contiguous", True), ("bf16", "channels_last", True), ("fp16", "channels_last", False),
]
LN_CASES = ["fp32", "bf16", "fp16"]


def all_checks():
    """name -> zero-argument-but-(device, big) callable."""
    import functools

    checks = {}
    for dt, T, mk in LA_CASES:
        checks[f"la-{dt}-T{T}-{mk}"] = functools.partial(check_linear_attention, dtype_name=dt, T=T, mask_kind=mk)
    checks["la-splits"] = check_linear_attention_splits
    checks["la-head-dims"] = check_linear_attention_head_dims
    checks["la-deterministic"] = check_linear_attention_deterministic
    checks["la-empty"] = check_linear_attention_empty
    for dt, layout, bias in DW_CASES:
        checks[f"dw-{dt}-{layout}-bias{int(bias)}"] = functools.partial(
            check_dwconv_glu, dtype_name=dt, layout=layout, with_bias=bias
        )
    checks["dw-tiny-images"] = check_dwconv_glu_tiny_images
    for dt in LN_CASES:
        checks[f"ln-{dt}"] = functools.partial(check_layernorm_modulate, dtype_name=dt)
    for dt in LN_CASES:
        checks[f"gr-{dt}"] = functools.partial(check_gate_residual, dtype_name=dt)
    checks["fused-dispatch"] = check_fused_dispatch
    for dt in ("fp32", "bf16"):
        checks[f"dit-{dt}"] = functools.partial(check_dit_backends, dtype_name=dt)
        checks[f"dcae-{dt}"] = functools.partial(check_dcae_backends, dtype_name=dt)
    return checks


def run_checks(device: str, big: bool) -> dict[str, str]:
    """Run every check; map name -> '' (passed) or the failure text."""
    results = {}
    for name, fn in all_checks().items():
        torch.manual_seed(hash(name) % 2**31)
        try:
            fn(device, big)
            results[name] = ""
        except Exception:
            results[name] = traceback.format_exc(limit=3)
    return results


CHECK_NAMES = list(all_checks())

# ---------------------------------------------------------------------------------------------------------------------
# CPU: the interpreter run
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    path = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, __file__, "--interpret"], env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_kernel_interpreted(interpreter_results, name):
    assert name in interpreter_results, f"check {name} did not run"
    if interpreter_results[name]:
        pytest.fail(interpreter_results[name])


# ---------------------------------------------------------------------------------------------------------------------
# CPU: no Triton needed
# ---------------------------------------------------------------------------------------------------------------------


def test_import_is_cheap_and_probe_never_raises():
    code = (
        "import sys, jodi_core.kernels as k, jodi_core.kernels.dwconv_glu, jodi_core.kernels.layernorm_modulate\n"
        "import jodi_core.kernels.gate_residual\n"
        "assert 'triton' not in sys.modules, 'importing the kernels package imported triton'\n"
        "print(type(k.triton_available()).__name__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "bool"


def test_fused_ops_fall_back_to_torch_exactly_on_cpu():
    from jodi_core.kernels import interpreter_enabled
    from jodi_core.kernels.dwconv_glu import dwconv_glu, dwconv_glu_torch
    from jodi_core.kernels.gate_residual import gate_residual, gate_residual_torch
    from jodi_core.kernels.layernorm_modulate import layernorm_modulate, layernorm_modulate_torch

    if interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is set in this process")
    x = torch.randn(2, 8, 4, 5, dtype=torch.bfloat16)
    w, b = torch.randn(8, 1, 3, 3, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    assert torch.equal(dwconv_glu(x, w, b), dwconv_glu_torch(x, w, b))
    y, s = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 1, 16)
    assert torch.equal(layernorm_modulate(y, s, s), layernorm_modulate_torch(y, s, s))
    assert torch.equal(gate_residual(y, s, y), gate_residual_torch(y, s, y))
    # The torch definitions are the reference op sequences.
    import torch.nn.functional as F

    z = F.conv2d(F.silu(x), w, b, padding=1, groups=8)
    assert torch.equal(dwconv_glu_torch(x, w, b), z[:, :4] * F.silu(z[:, 4:]))


def _fused_op_cases():
    """(module name, wrapper args): inputs every fused op accepts on its Triton path."""
    y, s = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 1, 16)
    x = torch.randn(2, 8, 4, 5)
    return {
        "dwconv_glu": (x, torch.randn(8, 1, 3, 3), torch.randn(8)),
        "layernorm_modulate": (y, s, s),
        "gate_residual": (y, s, y),
    }


@pytest.mark.parametrize("op", ["dwconv_glu", "layernorm_modulate", "gate_residual"])
def test_fused_op_failures_fall_back_or_propagate(monkeypatch, caplog, op):
    """A compile/launch failure warns once and turns the op's kernel off; a rejected input goes to torch for that
    call only; out of memory propagates (ComfyUI frees models and retries) and leaves the kernel on."""
    import importlib

    import jodi_core.kernels as kernels
    from jodi_core.dit import attention

    module = importlib.import_module(f"jodi_core.kernels.{op}")
    args = _fused_op_cases()[op]
    wrapper, reference = getattr(module, op), getattr(module, f"{op}_torch")
    expected = reference(*args)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(kernels, "tensors_supported", lambda *t: True)
    monkeypatch.setattr(attention, "_disabled", set())
    monkeypatch.setattr(attention, "_warned", set())
    key = f"triton {op}"
    calls = []

    def raising(error):
        def kernel(*a, **kw):
            calls.append(type(error).__name__)
            raise error
        return kernel

    monkeypatch.setattr(module, f"{op}_triton", raising(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        wrapper(*args)
    monkeypatch.setattr(module, f"{op}_triton", raising(RuntimeError("Triton Error [CUDA]: out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        wrapper(*args)
    assert key not in attention._disabled

    monkeypatch.setattr(module, f"{op}_triton", raising(ValueError("rows too long")))
    assert torch.equal(wrapper(*args), expected)
    assert key not in attention._disabled and calls[-1] == "ValueError"

    monkeypatch.setattr(module, f"{op}_triton", raising(RuntimeError("PTX compile failed")))
    with caplog.at_level(logging.WARNING, logger="jodi_core.dit.attention"):
        assert torch.equal(wrapper(*args), expected)
        assert torch.equal(wrapper(*args), expected)  # no second attempt, no second warning
    assert key in attention._disabled
    assert calls == ["OutOfMemoryError", "RuntimeError", "ValueError", "RuntimeError"]
    assert sum("PTX compile failed" in r.getMessage() for r in caplog.records) == 1


def test_bad_inputs_raise_clear_errors():
    pytest.importorskip("triton")
    from jodi_core.kernels.dwconv_glu import dwconv_glu
    from jodi_core.kernels.linear_attention import linear_attention_triton, supports

    q = torch.randn(1, 4, 2, 32)
    assert not supports(*(torch.randn(1, 4, 2, 48),) * 3)
    assert not supports(q, q, q.half())
    with pytest.raises(ValueError, match="same shape"):
        linear_attention_triton(q, q[:, :3], q)
    with pytest.raises(ValueError, match="head dims"):
        linear_attention_triton(*(torch.randn(1, 4, 2, 48),) * 3)
    with pytest.raises(TypeError, match="float16"):
        linear_attention_triton(*(q.double(),) * 3)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        linear_attention_triton(q, q, q, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        linear_attention_triton(q, q, q, torch.ones(1, 4))
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(ValueError, match="CUDA"):
            linear_attention_triton(q, q, q)
    with pytest.raises(ValueError, match="weight must have shape"):
        dwconv_glu(torch.randn(1, 8, 3, 3), torch.randn(8, 1, 5, 5), None)
    with pytest.raises(ValueError, match="even channel"):
        dwconv_glu(torch.randn(1, 7, 3, 3), torch.randn(7, 1, 3, 3), None)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the same checks compiled, larger shapes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_results():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set")
    pytest.importorskip("triton")
    # Poison the caching allocator so that an unwritten output element shows up as NaN.
    junk = torch.full((1 << 28,), float("nan"), device="cuda")
    del junk
    return run_checks("cuda", big=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CHECK_NAMES)
def test_kernel_gpu(gpu_results, name):
    if gpu_results[name]:
        pytest.fail(gpu_results[name])


@pytest.mark.gpu
def test_attention_dispatcher_uses_triton_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from jodi_core.dit.attention import resolve_backend
    from jodi_core.dit.model import AUTO_ATTENTION

    backend = resolve_backend("auto", auto=AUTO_ATTENTION)  # the DiT's auto
    assert backend.kernel_name == "triton"
    q, k, v = _qkv(2, 1000, 4, 32, torch.bfloat16, "cuda")
    mask = _make_mask("domains", 2, 1000, "cuda")
    from jodi_core.kernels.linear_attention import linear_attention_triton

    assert torch.equal(backend.linear_attention(q, k, v, mask), linear_attention_triton(q, k, v, mask))


if __name__ == "__main__" and "--interpret" in sys.argv:
    torch.set_num_threads(1)
    res = run_checks("cpu", big=False)
    print("RESULTS " + json.dumps(res))
