"""DC-AE f32c32: parity with the official efficientvit DCAE on the golden fixtures, config inference, key formats,
input checks and tiling."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from jodi_core.checkpoint import CheckpointError
from jodi_core.dcae.model import (
    DC_AE_F32C32_SANA_1_0,
    DCAE,
    DCAEConfig,
    LiteMLA,
    _tiled,
)
from jodi_core.dcae.keys import KEY_RULES, detect_key_format, diffusers_to_original, original_to_diffusers


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights_meta(fixtures_dir):
    return json.loads((fixtures_dir / "dcae_tiny_weights.json").read_text())


@pytest.fixture(scope="module")
def tiny_sd(fixtures_dir):
    return load_file(str(fixtures_dir / "dcae_tiny_weights.safetensors"))


@pytest.fixture(scope="module")
def cases(fixtures_dir):
    meta = json.loads((fixtures_dir / "dcae_tiny_cases.json").read_text())
    return meta, load_file(str(fixtures_dir / "dcae_tiny_cases.safetensors"))


@pytest.fixture(scope="module")
def tiny_model(tiny_sd, weights_meta):
    """Built from the official config stored with the fixture (not inferred from the weights), loaded strictly."""
    model = DCAE(_config_from_reference(weights_meta["tiny_config"]))
    model.load_state_dict(tiny_sd, strict=True)
    return model.eval()


def _config_from_reference(ref: dict) -> DCAEConfig:
    """Our config from the official config dict stored next to the fixture weights."""
    enc, dec = ref["encoder"], ref["decoder"]
    assert enc["width_list"] == dec["width_list"]
    # the structural options this implementation hard-wires (the sana-1.0 layout)
    assert (enc["norm"], enc["act"], dec["norm"], dec["act"]) == ("rms2d", "silu", "rms2d", "silu")
    assert (enc["downsample_block_type"], enc["downsample_shortcut"], enc["out_shortcut"]) == (
        "Conv", "averaging", "averaging")
    assert (dec["upsample_block_type"], dec["upsample_shortcut"], dec["in_shortcut"]) == (
        "InterpolateConv", "duplicating", "duplicating")
    assert (enc["out_norm"], enc["out_act"], dec["out_norm"], dec["out_act"]) == (None, None, "rms2d", "relu")
    assert not ref["use_quant_conv"] and not enc["double_latent"]
    return DCAEConfig(
        in_channels=ref["in_channels"],
        latent_channels=ref["latent_channels"],
        width_list=enc["width_list"],
        encoder_depth_list=enc["depth_list"],
        decoder_depth_list=dec["depth_list"],
        encoder_block_types=enc["block_type"],
        decoder_block_types=dec["block_type"],
        scaling_factor=ref["scaling_factor"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Fixture parity
# ---------------------------------------------------------------------------------------------------------------------


def test_config_from_fixture_matches_reference_config(tiny_sd, weights_meta):
    expected = _config_from_reference(weights_meta["tiny_config"])
    assert DCAEConfig.from_state_dict(tiny_sd) == expected
    model = DCAE(expected, device="meta")
    shapes = {k: tuple(v.shape) for k, v in tiny_sd.items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_real_model_layout_on_meta(weights_meta):
    """The real dc-ae-f32c32-sana-1.0 key list infers to the preset, and the preset has exactly those keys/shapes."""
    real = weights_meta["real_model"]
    assert _config_from_reference(real["config"]) == DC_AE_F32C32_SANA_1_0
    shapes = {k: tuple(v) for k, v in real["state_dict_shapes"].items()}
    sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert DCAEConfig.from_state_dict(sd) == DC_AE_F32C32_SANA_1_0
    model = DCAE(device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == real["num_parameters"]
    # the diffusers layout of the real model infers to the same config
    assert DCAEConfig.from_state_dict(original_to_diffusers(sd)) == DC_AE_F32C32_SANA_1_0
    assert model.spatial_compression == 32 and model.latent_channels == 32


@pytest.mark.parametrize("widths, head_dim, heads", [((12, 24, 48), 32, 1), ((10, 20, 40), 24, 1)])
def test_head_dim_from_qkv_shapes_without_multiscale_branch(widths, head_dim, heads):
    """Without a multi-scale branch only the qkv rows (3 * (width // head_dim) * head_dim, as efficientvit) tell the
    head dim; the width need not be a multiple of it."""
    config = DCAEConfig(width_list=widths, latent_channels=8, encoder_depth_list=(1, 1, 1),
                        decoder_depth_list=(1, 1, 1), encoder_block_types=("ResBlock", "ResBlock", "EViT_GLU"),
                        decoder_block_types=("ResBlock", "ResBlock", "EViT_GLU"), attention_head_dim=head_dim)
    sd = DCAE(config, device="meta").state_dict()
    assert sd["encoder.stages.2.op_list.0.context_module.main.qkv.conv.weight"].shape[0] == 3 * heads * head_dim
    assert DCAEConfig.from_state_dict(sd) == config
    assert DCAEConfig.from_state_dict(original_to_diffusers(sd)) == config


def test_head_dim_that_the_weights_cannot_tell_is_an_error():
    # 40 channels as 5 heads of 8 or 8 heads of 5 (and more) give the same qkv rows; 32 does not fit
    config = DCAEConfig(width_list=(10, 20, 40), latent_channels=8, encoder_depth_list=(1, 1, 1),
                        decoder_depth_list=(1, 1, 1), encoder_block_types=("ResBlock", "ResBlock", "EViT_GLU"),
                        decoder_block_types=("ResBlock", "ResBlock", "EViT_GLU"), attention_head_dim=8)
    with pytest.raises(ValueError, match="head dim cannot be told"):
        DCAEConfig.from_state_dict(DCAE(config, device="meta").state_dict())


def _record_attention_forms(model: torch.nn.Module, monkeypatch) -> list[str]:
    names = {m: n for n, m in model.named_modules() if isinstance(m, LiteMLA)}
    seen: list[str] = []
    for form in ("_linear", "_quadratic"):
        original = getattr(LiteMLA, form)

        def wrapped(self, qkv, _original=original, _form=form):
            seen.append(f"{names[self]}: {_form[1:]} (H*W={qkv.shape[-2] * qkv.shape[-1]})")
            return _original(self, qkv)

        monkeypatch.setattr(LiteMLA, form, wrapped)
    return seen


def test_fixture_parity_every_case(tiny_model, cases, monkeypatch):
    """latent within 1e-4, recon within 2e-5 (fixture README); taps within 1e-4 relative to their magnitude."""
    meta, tensors = cases
    assert meta["scaling_factor"] == tiny_model.scaling_factor
    assert len(meta["cases"]) >= 2
    for case in meta["cases"]:
        name = case["name"]
        image, latent, recon = (tensors[f"{name}.{k}"] for k in ("image", "latent", "recon"))
        assert list(image.shape) == case["image_shape"] and list(latent.shape) == case["latent_shape"]

        taps: dict[str, torch.Tensor] = {}
        hooks = [tiny_model.decoder.project_in.register_forward_hook(
            lambda m, i, o: taps.__setitem__("dec.project_in", o))]
        for s in range(tiny_model.config.num_stages):
            for side, stages in (("enc", tiny_model.encoder.stages), ("dec", tiny_model.decoder.stages)):
                hooks.append(stages[s].register_forward_hook(
                    lambda m, i, o, key=f"{side}.stage{s}": taps.__setitem__(key, o)))
        forms = _record_attention_forms(tiny_model, monkeypatch)
        try:
            with torch.no_grad():
                z = tiny_model.encode(image)
                enc_forms = list(forms)
                forms.clear()
                r = tiny_model.decode(latent)  # decode the reference latent so the two halves are checked apart
        finally:
            for h in hooks:
                h.remove()
            monkeypatch.undo()

        torch.testing.assert_close(z, latent, atol=1e-4, rtol=0, msg=lambda m: f"case {name} latent: {m}")
        torch.testing.assert_close(r, recon, atol=2e-5, rtol=0, msg=lambda m: f"case {name} recon: {m}")
        tap_names = [k for k in tensors if k.startswith(f"{name}.tap.")]
        for key in tap_names:
            ref = tensors[key]
            got = taps[key[len(f"{name}.tap."):]]
            tol = 1e-4 * max(1.0, ref.abs().max().item())
            torch.testing.assert_close(got, ref, atol=tol, rtol=0, msg=lambda m: f"{key}: {m}")

        # the linear/quadratic switch picks the reference's form in every recorded block
        ours = enc_forms + forms
        for line in case["litemla_forms"]:  # e.g. "encoder.stages.4.op_list.0.context_module.main: quadratic (H*W=16)"
            assert line in ours, (line, ours)


def test_linear_and_quadratic_forms_agree():
    """The two LiteMLA forms are the same algebra (per-head [q|k|v] interleave included)."""
    torch.manual_seed(1)
    attn = LiteMLA(64, dim=32, scales=(5,))
    qkv = torch.randn(2, 6 * 64, 4, 6)
    lin = attn._linear(qkv)
    quad = attn._quadratic(qkv)
    torch.testing.assert_close(lin, quad, atol=1e-5, rtol=1e-5)
    # and a brute-force softmax-free attention with heads read as contiguous 96-channel groups
    B, N = 2, 24
    g = qkv.reshape(B, -1, 96, N)
    q, k, v = F.relu(g[:, :, :32]), F.relu(g[:, :, 32:64]), g[:, :, 64:]
    scores = torch.einsum("bhdm,bhdn->bhmn", k, q)  # (key m, query n)
    expected = torch.einsum("bhdm,bhmn->bhdn", v, scores) / (scores.sum(dim=2, keepdim=True) + 1e-15)
    torch.testing.assert_close(lin, expected, atol=1e-5, rtol=1e-5)


def test_form_switch_boundary(monkeypatch):
    """The reference takes the linear form only when H*W > head dim (32): 4x8 is quadratic, 3x11 linear."""
    attn = LiteMLA(32, dim=32, scales=(5,))
    model = torch.nn.Module()
    model.attn = attn
    seen = _record_attention_forms(model, monkeypatch)
    with torch.no_grad():
        attn(torch.randn(1, 32, 4, 8))
        attn(torch.randn(1, 32, 3, 11))
        attn(torch.randn(1, 32, 1, 1))
    assert seen == ["attn: quadratic (H*W=32)", "attn: linear (H*W=33)", "attn: quadratic (H*W=1)"]


# ---------------------------------------------------------------------------------------------------------------------
# Loading and key formats
# ---------------------------------------------------------------------------------------------------------------------


def test_key_round_trip_every_key(tiny_sd):
    assert detect_key_format(tiny_sd) == "original"
    diff = original_to_diffusers(tiny_sd)
    assert detect_key_format(diff) == "diffusers"
    back = diffusers_to_original(diff)
    assert set(back) == set(tiny_sd)
    for k, v in tiny_sd.items():
        assert torch.equal(back[k], v), k
    # every key is claimed by exactly one rule on each side, so the table cannot shadow itself
    for key in tiny_sd:
        assert sum(bool(r.pattern("original").match(key)) for r in KEY_RULES) == 1, key
    for key in diff:
        assert sum(bool(r.pattern("diffusers").match(key)) for r in KEY_RULES) == 1, key
    # spot checks against the documented names
    assert "encoder.down_blocks.3.0.attn.to_q.weight" in diff
    q, k, v = (diff[f"encoder.down_blocks.3.0.attn.to_{p}.weight"] for p in "qkv")
    full = tiny_sd["encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight"]
    assert torch.equal(torch.cat([q, k, v])[:, :, None, None], full) and q.shape == (32, 32)
    assert diff["decoder.norm_out.weight"] is tiny_sd["decoder.project_out.op_list.0.weight"]


def test_unknown_and_incomplete_keys_are_reported(tiny_sd):
    with pytest.raises(ValueError, match="encoder.stages.0.op_list.0.main.extra.weight"):
        original_to_diffusers({**tiny_sd, "encoder.stages.0.op_list.0.main.extra.weight": torch.zeros(1)})
    diff = original_to_diffusers(tiny_sd)
    del diff["decoder.up_blocks.5.0.attn.to_k.weight"]
    with pytest.raises(ValueError, match="to_k missing"):
        diffusers_to_original(diff)


def test_from_state_dict_strict_errors(tiny_sd):
    extra = {**tiny_sd, "decoder.stages.0.op_list.1.main.conv1.conv.extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected"):
        DCAE.from_state_dict(extra)
    missing = {k: v for k, v in tiny_sd.items() if k != "decoder.stages.2.op_list.1.main.conv2.norm.bias"}
    with pytest.raises(CheckpointError, match="conv2.norm.bias"):
        DCAE.from_state_dict(missing)
    bad_shape = dict(tiny_sd)
    bad_shape["decoder.project_out.op_list.0.bias"] = torch.zeros(9)
    with pytest.raises(CheckpointError, match="shape"):
        DCAE.from_state_dict(bad_shape)
    with pytest.raises(CheckpointError, match="not a DC-AE|looks like"):
        DCAE.from_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})


def test_from_state_dict_dtype_and_no_meta_left(tiny_sd):
    model = DCAE.from_state_dict(tiny_sd, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert not model.training
    built = DCAE(DCAEConfig.from_state_dict(tiny_sd), dtype=torch.float16)
    assert {p.dtype for p in built.parameters()} == {torch.float16}


@pytest.mark.parametrize(
    "dtype, latent_rel, recon_abs",
    # measured worst case over both fixture cases: bf16 latent 0.0095 x max|latent|, recon 0.036; fp16 0.0015, 0.0051
    [(torch.bfloat16, 0.02, 0.08), (torch.float16, 0.004, 0.015)],
    ids=["bf16", "fp16"],
)
def test_half_precision_close_to_fp32(tiny_sd, cases, dtype, latent_rel, recon_abs):
    """Half-precision weights and activations (the reference pipeline runs bf16): agreement within rounding."""
    meta, tensors = cases
    model = DCAE.from_state_dict(tiny_sd, dtype=dtype)
    for case in meta["cases"]:
        name = case["name"]
        latent = tensors[f"{name}.latent"]
        with torch.no_grad():
            z = model.encode(tensors[f"{name}.image"].to(dtype))
            r = model.decode(latent.to(dtype))
        assert z.dtype == dtype and r.dtype == dtype
        assert (z.float() - latent).abs().max() < latent_rel * latent.abs().max(), name
        assert (r.float() - tensors[f"{name}.recon"]).abs().max() < recon_abs, name


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="3-channel images, got 4 channels"):
        tiny_model.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=re.escape("64x70")):
        tiny_model.encode(torch.zeros(1, 3, 64, 70))
    with pytest.raises(ValueError, match=re.escape("48x64")):
        tiny_model.encode(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match="shape"):
        tiny_model.encode(torch.zeros(3, 64, 64))
    with pytest.raises(TypeError, match="floating"):
        tiny_model.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="bfloat16 tensor but the model weights are torch.float32"):
        tiny_model.decode(torch.zeros(1, 32, 2, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="32 latent channels, got 16"):
        tiny_model.decode(torch.zeros(1, 16, 2, 2))
    with pytest.raises(ValueError, match="decode got a latent with NaN"):
        tiny_model.decode(torch.full((1, 32, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="encode got an image with NaN"):
        tiny_model.encode(torch.full((1, 3, 64, 64), float("inf")))
    with pytest.raises(ValueError, match="shape"):
        tiny_model.decode(torch.zeros(2, 8, 32, 2, 2))
    with pytest.raises(ValueError, match="tile_size 100"):
        tiny_model.decode(torch.zeros(1, 32, 2, 2), tile_size=100)
    with pytest.raises(ValueError, match="overlap 128"):
        tiny_model.encode(torch.zeros(1, 3, 64, 64), tile_size=128, overlap=128)
    with pytest.raises(ValueError, match="width 16 is smaller than the head dim 32"):
        DCAEConfig(width_list=(8, 16, 32, 32, 16, 64), decoder_block_types=("ResBlock",) * 6,
                   encoder_block_types=("ResBlock",) * 4 + ("EViTS5_GLU",) * 2)
    with pytest.raises(ValueError, match="6 stages"):
        DCAEConfig(encoder_depth_list=(1, 1))


def test_channels_last_gives_the_same_result(tiny_sd, cases):
    """channels_last weights and inputs (faster convs on GPUs) go through the same maths."""
    _, tensors = cases
    model = DCAE.from_state_dict(tiny_sd).to(memory_format=torch.channels_last)
    with torch.no_grad():
        z = model.encode(tensors["b.image"].contiguous(memory_format=torch.channels_last))
        r = model.decode(tensors["b.latent"].contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(z, tensors["b.latent"], atol=1e-4, rtol=0)
    torch.testing.assert_close(r, tensors["b.recon"], atol=2e-5, rtol=0)


def test_batched_domain_decode_and_scaling(tiny_model):
    """(B*8, 32, h, w) decodes in one call exactly like one domain at a time; scaled helpers apply 0.41407."""
    torch.manual_seed(3)
    z = torch.randn(2 * 8, 32, 2, 3) * 5
    with torch.no_grad():
        together = tiny_model.decode(z)
        apart = torch.cat([tiny_model.decode(z[i : i + 1]) for i in range(z.shape[0])])
        assert together.shape == (16, 3, 64, 96)
        torch.testing.assert_close(together, apart, atol=2e-5, rtol=0)
        img = together[:2].clamp(-1, 1)
        torch.testing.assert_close(tiny_model.encode_scaled(img), tiny_model.encode(img) * 0.41407)
        torch.testing.assert_close(tiny_model.decode_scaled(z[:2]), tiny_model.decode(z[:2] / 0.41407))


# ---------------------------------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------------------------------


def test_tiling_blend_is_exact_for_local_ops():
    """With a position-independent op every tile agrees, so the normalised cross-fade must return the untiled result
    (any weight that does not sum to one, any uncovered or misplaced pixel would show)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 17)
    up = lambda t: F.interpolate(t, scale_factor=4, mode="nearest") * 2 + 1  # noqa: E731
    for tile, overlap in ((4, 2), (5, 0), (6, 3), (16, 8), (32, 4)):
        torch.testing.assert_close(_tiled(up, x, tile, overlap, 4, 3), up(x), atol=1e-6, rtol=1e-6)
    img = torch.randn(1, 3, 96, 160)
    down = lambda t: F.avg_pool2d(t, 32)  # noqa: E731
    for tile, overlap in ((64, 32), (32, 0), (96, 64)):
        tiled = _tiled(down, img, tile, overlap, 1 / 32, 3, align=32)
        torch.testing.assert_close(tiled, down(img), atol=1e-6, rtol=1e-6)


def test_tiling_cross_fade_has_no_seam():
    """A context-dependent op (output shifted by the tile's own mean, like global attention) gives each tile a
    different offset. Without overlap the tiles meet at a hard step; with overlap the step is spread over the ramp."""
    x = torch.linspace(0, 4, 64).repeat(1, 1, 8, 1)  # smooth ramp along W, neighbour step 0.063
    op = lambda t: t + t.mean()  # noqa: E731
    hard = _tiled(op, x, 16, 0, 1, 1)
    soft = _tiled(op, x, 16, 8, 1, 1)
    step = lambda y: (y[..., 1:] - y[..., :-1]).abs().max().item()  # noqa: E731
    assert step(x) < 0.07
    assert step(hard) > 0.9  # the tile means differ by ~1 between neighbours: a visible seam
    assert step(soft) < 0.25  # mean jump / ramp + the ramp's own slope


def test_tiled_matches_untiled_on_tiny_model(tiny_model):
    """Tiled vs whole-image coding on the tiny fixture model (random weights, 256x320 smooth image).

    Tiles that cover the image are bit-identical to the untiled path. With 192-pixel tiles the tiles' global
    attention sees less context than the full image, which a random-weight model amplifies; measured max/mean abs
    difference: decode 0.49 / 0.040 with overlap 96 vs 0.76 / 0.045 with overlap 0 (evenly spread tiles still share
    128 px along H and 64 px along W then; outputs span about +-2), encode 8.75 / 1.62 vs 10.2 / 1.81 (latents span
    about +-38). The bounds below sit ~40% above the overlap-96 numbers, and the overlap must reduce the mean error.
    """
    H, W = 256, 320
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    img = torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy - xx), xx * yy])[None]
    with torch.no_grad():
        z = tiny_model.encode(img)
        r = tiny_model.decode(z)
        assert torch.equal(tiny_model.encode(img, tiled=True), z)  # default 1024 tile covers it
        assert torch.equal(tiny_model.decode(z, tile_size=320, overlap=64), r)
        zt = tiny_model.encode(img, tile_size=192, overlap=96)
        rt = tiny_model.decode(z, tile_size=192, overlap=96)
        zt0 = tiny_model.encode(img, tile_size=192, overlap=0)
        rt0 = tiny_model.decode(z, tile_size=192, overlap=0)
    assert zt.shape == z.shape and rt.shape == r.shape
    assert (rt - r).abs().max() < 0.7 and (rt - r).abs().mean() < 0.056
    assert (zt - z).abs().max() < 12.2 and (zt - z).abs().mean() < 2.3
    assert (rt - r).abs().mean() < (rt0 - r).abs().mean()
    assert (zt - z).abs().mean() < (zt0 - z).abs().mean()


# ---------------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_fixture_and_runs_bf16(tiny_sd, cases):
    """fp32 on CUDA (TF32 off) reproduces the CPU fixtures; bf16 on CUDA, whole and tiled, stays close."""
    meta, tensors = cases
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = DCAE.from_state_dict(tiny_sd, device="cuda")
        with torch.no_grad():
            for case in meta["cases"]:
                name = case["name"]
                z = model.encode(tensors[f"{name}.image"].cuda()).cpu()
                r = model.decode(tensors[f"{name}.latent"].cuda()).cpu()
                torch.testing.assert_close(z, tensors[f"{name}.latent"], atol=1e-4, rtol=0)
                # cuDNN sums in another order than the CPU convs
                torch.testing.assert_close(r, tensors[f"{name}.recon"], atol=2e-4, rtol=0)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    model16 = DCAE.from_state_dict(tiny_sd, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        z = model16.encode(tensors["b.image"].cuda().bfloat16()).float().cpu()
        r = model16.decode(tensors["b.latent"].cuda().bfloat16()).float().cpu()
        rt = model16.decode(tensors["b.latent"].cuda().bfloat16(), tile_size=64, overlap=32).float().cpu()
    assert (z - tensors["b.latent"]).abs().max() < 0.05 * tensors["b.latent"].abs().max()
    assert (r - tensors["b.recon"]).abs().max() < 0.1
    assert rt.shape == r.shape and torch.isfinite(rt).all()
