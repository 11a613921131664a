"""ReLU linear attention: torch reference against the quadratic definition, masks, dtypes, dispatcher, compile."""

import logging

import pytest
import torch

from jodi_core.dit import attention as attn
from jodi_core.dit.attention import KernelSet, linear_attention, resolve_backend


def _qkv(B=2, T=37, H=3, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(3)]


def _quadratic(q, k, v, key_mask=None, eps=1e-8):
    """Definition in float64: out_i = sum_j v_j (k_j . q_i) / (sum_j k_j . q_i + eps), ReLU on q and k."""
    q, k, v = q.double().relu(), k.double().relu(), v.double()
    scores = torch.einsum("bihd,bjhd->bhij", q, k)  # (B, H, Tq, Tk)
    if key_mask is not None:
        scores = scores * key_mask[:, None, None, :].double()
    num = torch.einsum("bhij,bjhd->bihd", scores, v)
    den = scores.sum(-1).permute(0, 2, 1)[..., None]  # (B, T, H, 1)
    return num / (den + eps)


def test_matches_quadratic_definition_with_mask():
    q, k, v = _qkv()
    mask = torch.rand(2, 37, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[1, :20] = False  # different masks per row
    out = linear_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _quadratic(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear_attention(q, k, v).double(), _quadratic(q, k, v), atol=1e-5, rtol=1e-5)


def test_masked_keys_do_not_contribute():
    q, k, v = _qkv()
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[:, 5:11] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:11], v2[:, 5:11] = 100.0, -100.0
    torch.testing.assert_close(linear_attention(q, k, v, mask), linear_attention(q, k2, v2, mask), atol=1e-6, rtol=0)


def test_non_contiguous_views_like_the_model():
    """The model hands in q, k, v as strided views of one qkv projection."""
    B, T, H, D = 2, 19, 2, 32
    qkv = torch.randn(B, T, 3 * H * D)
    q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
    assert not q.is_contiguous()
    torch.testing.assert_close(linear_attention(q, k, v).double(), _quadratic(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_accumulates_in_fp32(dtype):
    q, k, v = _qkv(T=300, dtype=dtype)
    out = linear_attention(q, k, v)
    assert out.dtype == dtype
    exact = _quadratic(q, k, v)  # from the same rounded inputs
    # Only the final rounding to the storage dtype remains: well inside one ulp of the output range.
    ulp = torch.finfo(dtype).eps
    assert ((out.double() - exact).abs() <= ulp * exact.abs() + 1e-6).all()


def test_eps_guards_all_zero_denominator():
    q, k, v = _qkv(B=1, T=4, H=1)
    mask = torch.zeros(1, 4, dtype=torch.bool)  # every key masked: 0 / (0 + eps)
    out = linear_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and (out == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the backend registry and of the fallback state, so tests may register and break backends."""
    monkeypatch.setattr(attn, "_REGISTRY", dict(attn._REGISTRY))
    monkeypatch.setattr(attn, "_loaded", {})
    monkeypatch.setattr(attn, "_disabled", set())
    monkeypatch.setattr(attn, "_warned", set())
    return attn


def test_auto_on_cpu_is_torch():
    backend = resolve_backend("auto", auto="triton")
    q, k, v = _qkv(T=3)
    assert backend.name == "auto" and not backend.takes_kernels(q)
    assert torch.equal(backend.linear_attention(q, k, v), linear_attention(q, k, v))
    assert resolve_backend("torch", auto="triton").kernels is None


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'"):
        resolve_backend("flash", auto="torch")
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'"):
        resolve_backend("auto", auto="flash")


def test_one_list_of_names_for_models_and_loaders():
    from pack_modules import pack_module

    assert attn.backend_names() == ("auto", "triton", "torch") == pack_module("nodes.vocabulary").ATTENTION_CHOICES


def test_failing_backend_warns_once_and_falls_back(registry, caplog):
    calls = []

    def broken(q, k, v, key_mask=None, eps=1e-8):
        calls.append(1)
        raise RuntimeError("kernel compile failed")

    registry.register_backend("broken", lambda: KernelSet(linear_attention=broken))
    backend = resolve_backend("broken", auto="torch")
    q, k, v = _qkv(T=5)
    with caplog.at_level(logging.WARNING, logger="jodi_core.dit.attention"):
        a = backend.linear_attention(q, k, v)
        b = backend.linear_attention(q, k, v)
    torch.testing.assert_close(a, linear_attention(q, k, v), atol=0, rtol=0)
    torch.testing.assert_close(b, a, atol=0, rtol=0)
    assert len(calls) == 1  # disabled after the first failure
    assert sum("kernel compile failed" in r.getMessage() for r in caplog.records) == 1


def test_unimportable_triton_falls_back(registry, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_kernels(name, *args, **kwargs):
        if "kernels" in name or name == "triton":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kernels)
    q, k, v = _qkv(T=5)
    with caplog.at_level(logging.WARNING, logger="jodi_core.dit.attention"):
        backend = resolve_backend("triton", auto="torch")
        out = backend.linear_attention(q, k, v)
        resolve_backend("triton", auto="torch").linear_attention(q, k, v)
    assert backend.name == "triton" and backend.kernels is None
    torch.testing.assert_close(out, linear_attention(q, k, v), atol=0, rtol=0)
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1


def test_auto_takes_the_models_choice_on_cuda_only(registry, monkeypatch):
    import types

    sentinel = lambda q, k, v, key_mask=None, eps=1e-8: q  # noqa: E731
    kernels = KernelSet(linear_attention=sentinel)
    registry.register_backend("fast", lambda: kernels)
    cuda, cpu = types.SimpleNamespace(is_cuda=True), types.SimpleNamespace(is_cuda=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto = resolve_backend("auto", auto="fast")
    assert auto.kernels is kernels and auto.takes_kernels(cuda) and not auto.takes_kernels(cpu)
    assert resolve_backend("fast", auto="torch").takes_kernels(cpu)  # named: wherever its kernels run
    assert resolve_backend("auto", auto="torch").kernels is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(attn, "_REGISTRY", {**attn._REGISTRY, "fast": lambda: pytest.fail("loaded without CUDA")})
    assert resolve_backend("auto", auto="fast").kernels is None  # no CUDA device: nothing to load


def test_compiles_without_graph_breaks():
    """The torch path is plain tensor code: dynamo traces it (and the dispatcher on CPU) as one graph."""
    torch._dynamo.reset()
    q, k, v = _qkv(T=9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 3] = False
    ref = linear_attention(q, k, v, mask)
    compiled = torch.compile(linear_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, mask), ref, atol=1e-6, rtol=0)
    auto = resolve_backend("auto", auto="triton")
    compiled = torch.compile(lambda a, b, c, m: auto.linear_attention(a, b, c, m), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, mask), ref, atol=1e-6, rtol=0)


def test_dit_block_compiles_as_one_graph():
    """A whole DiT block (adaLN, linear attention with a key mask, cross-attention, GLUMBConv) has no graph break."""
    from jodi_core.dit.layers import JodiBlock

    torch._dynamo.reset()
    block = JodiBlock(64, 2, 160, 32).eval()
    torch.nn.init.normal_(block.scale_shift_table, std=0.125)  # the model initialises it, a lone block does not
    N, L, h, w, C = 2, 3, 4, 5, 64
    x = torch.randn(N, L, h * w, C)
    cond = torch.randn(N, L, 6, C) * 0.1
    key_mask = torch.ones(N, L * h * w, dtype=torch.bool)
    key_mask[1, : h * w] = False
    kv = block.cross_attn.caption_kv(torch.randn(N, 7, C))
    bias = torch.zeros(N, 1, 1, 7)
    bias[0, ..., 4:] = -10000.0
    with torch.no_grad():
        ref = block(x, cond, (h, w), key_mask, kv, bias, resolve_backend("torch", auto="torch"))
        compiled = torch.compile(block, fullgraph=True, backend="eager")
        auto = resolve_backend("auto", auto="triton")
        torch.testing.assert_close(compiled(x, cond, (h, w), key_mask, kv, bias, auto), ref, atol=1e-5, rtol=0)


def test_rejected_inputs_fall_back_per_call_but_broken_backends_turn_off(registry):
    calls = []

    def picky(q, k, v, key_mask=None, eps=1e-8):
        calls.append(q.shape[-1])
        if q.shape[-1] != 32:
            raise ValueError("head dim must be 32")
        raise RuntimeError("compile failed")

    registry.register_backend("picky", lambda: KernelSet(linear_attention=picky))
    backend = resolve_backend("picky", auto="torch")
    q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))
    torch.testing.assert_close(backend.linear_attention(q, k, v), linear_attention(q, k, v))
    assert "picky linear_attention" not in registry._disabled  # still enabled after a rejected input

    q, k, v = (torch.randn(1, 5, 2, 32) for _ in range(3))
    torch.testing.assert_close(backend.linear_attention(q, k, v), linear_attention(q, k, v))
    assert "picky linear_attention" in registry._disabled  # a real failure turns it off
    backend.linear_attention(q, k, v)
    assert calls == [16, 32]


def test_out_of_memory_propagates_and_keeps_the_backend(registry):
    def hungry(q, k, v, key_mask=None, eps=1e-8):
        raise torch.OutOfMemoryError("CUDA out of memory")

    registry.register_backend("hungry", lambda: KernelSet(linear_attention=hungry))
    q, k, v = (torch.randn(1, 5, 2, 32) for _ in range(3))
    with pytest.raises(torch.OutOfMemoryError):
        resolve_backend("hungry", auto="torch").linear_attention(q, k, v)
    assert not registry._disabled


def test_one_fallback_policy_for_every_kernel(registry, caplog):
    """run_kernel is the fallback of the attention and of the fused ops alike: one warning per broken kernel."""
    def failing(*args):
        raise RuntimeError("launch failed")

    with caplog.at_level(logging.WARNING, logger="jodi_core.dit.attention"):
        for _ in range(3):
            assert attn.run_kernel("triton some_op", failing, lambda x: x + 1, 1) == 2
            assert attn.run_kernel("triton other_op", failing, lambda x: x + 2, 1) == 3
    assert registry._disabled == {"triton some_op", "triton other_op"}
    assert [r.getMessage().count("launch failed") for r in caplog.records] == [1, 1]


def test_a_kernel_set_gives_all_fused_ops_or_none():
    with pytest.raises(ValueError, match="or none of them"):
        KernelSet(linear_attention=linear_attention, dwconv_glu=lambda *a: a[0])


def test_models_resolve_their_backend_once_when_it_is_set(monkeypatch):
    """The choice is resolved when ``attention_backend`` is set, never per forward; the DC-AE's blocks share it."""
    from jodi_core.dcae.model import LiteMLA
    from jodi_core.jobs.demo import tiny_random_models

    dit, vae = tiny_random_models()
    calls = []
    real = attn.resolve_backend
    monkeypatch.setattr(attn, "resolve_backend", lambda *a, **k: calls.append(a) or real(*a, **k))
    dit.attention_backend, vae.attention_backend = "torch", "auto"
    assert calls == [("torch",), ("auto",)] and (dit.attention_backend, vae.attention_backend) == ("torch", "auto")
    blocks = [m for m in vae.modules() if isinstance(m, LiteMLA)]
    assert blocks and all(m.attention is vae.attention for m in blocks)
    C = dit.config.in_channels
    with torch.no_grad():
        dit(torch.randn(1, 8, C, 2, 2), torch.tensor([500.0]), None, torch.zeros(1, 8, dtype=torch.long))
        vae.decode(torch.randn(1, C, 2, 2))
    assert len(calls) == 2


def test_each_model_states_its_auto():
    from jodi_core.dcae import model as dcae
    from jodi_core.dit import model as transformer

    assert transformer.JodiTransformer.attention_backend.auto == transformer.AUTO_ATTENTION == "triton"
    assert dcae.DCAE.attention_backend.auto == dcae.AUTO_ATTENTION == "torch"  # the reference's matmuls
