"""DC-AE parity with diffusers ``AutoencoderDC`` (an independent implementation, test-time only) on tiny random
configs with the f32c32-sana structure, loading the weights in both key formats."""

import pytest
import torch

from jodi_core.dcae.model import DCAE, DCAEConfig
from jodi_core.dcae.keys import detect_key_format, diffusers_to_original, original_to_diffusers

diffusers = pytest.importorskip("diffusers")

BLOCKS = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
MULTISCALES = ((), (), (), (5,), (5,), (5,))
# (widths, encoder depths, decoder depths, head dim, multiscale per stage): the sana layout [ResBlock x3, EViT x3]
# with tiny widths; the second config also varies depths, head dim and width ratios; the third has attention stages
# of width 48 with head dim 32 (efficientvit: 48 // 32 = 1 head, a total dim of 32), with and without a multi-scale
# branch, so the head dim must be read from the branch and the qkv shapes, not from the width.
CONFIGS = {
    "sana_layout": ((8, 16, 32, 32, 32, 64), (1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 1, 1), 32, MULTISCALES),
    "deeper_heads16": ((8, 16, 16, 32, 32, 64), (2, 1, 1, 2, 1, 2), (1, 2, 1, 1, 2, 1), 16, MULTISCALES),
    "width48_heads32": ((6, 12, 24, 48, 48, 96), (1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 1, 1), 32,
                        ((), (), (), (), (5,), (5,))),
}


def _block_types(multiscales):
    return ("ResBlock",) * 3 + tuple("EViTS5_GLU" if m else "EViT_GLU" for m in multiscales[3:])


def _tiny_diffusers(widths, enc_depths, dec_depths, head_dim, multiscales, seed=0):
    model = diffusers.AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=head_dim,
        encoder_block_types=BLOCKS,
        decoder_block_types=BLOCKS,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=enc_depths,
        decoder_layers_per_block=dec_depths,
        encoder_qkv_multiscales=multiscales,
        decoder_qkv_multiscales=multiscales,
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    # diffusers' init leaves norms at identity; random norms, biases and fan-in scaled weights exercise every path
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_autoencoder_dc_both_formats(name):
    widths, enc_depths, dec_depths, head_dim, multiscales = CONFIGS[name]
    ref = _tiny_diffusers(widths, enc_depths, dec_depths, head_dim, multiscales)
    diff_sd = ref.state_dict()
    assert detect_key_format(diff_sd) == "diffusers"

    orig_sd = diffusers_to_original(diff_sd)
    assert detect_key_format(orig_sd) == "original"
    expected_cfg = DCAEConfig(
        width_list=widths,
        encoder_depth_list=enc_depths,
        decoder_depth_list=dec_depths,
        encoder_block_types=_block_types(multiscales),
        decoder_block_types=_block_types(multiscales),
        attention_head_dim=head_dim,
    )
    assert DCAEConfig.from_state_dict(orig_sd) == expected_cfg
    assert DCAEConfig.from_state_dict(diff_sd) == expected_cfg

    from_orig = DCAE.from_state_dict(orig_sd)
    from_diff = DCAE.from_state_dict(diff_sd)
    # the forward table, read the other way, reproduces diffusers' own keys and shapes
    back = original_to_diffusers(from_orig.state_dict())
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in diff_sd.items()}
    for k, v in back.items():
        assert torch.equal(v, diff_sd[k]), k

    torch.manual_seed(5)
    # 128x160 runs the 4x5 stage (H*W = 20 <= head dim) in the quadratic form and the larger ones linearly
    image = torch.rand(2, 3, 128, 160) * 2 - 1
    with torch.no_grad():
        z_ref = ref.encode(image).latent
        latent = torch.randn_like(z_ref) * z_ref.std()
        x_ref = ref.decode(latent).sample
        for ours in (from_orig, from_diff):
            z = ours.encode(image)
            torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(ours.decode(latent), x_ref, atol=1e-4, rtol=0)
    assert z_ref.abs().max() > 1 and x_ref.std() > 0.1  # not a degenerate comparison


def test_diffusers_model_accepts_converted_original_weights(fixtures_dir):
    """The fixture's efficientvit weights, converted, load strictly into a matching AutoencoderDC and decode alike."""
    from safetensors.torch import load_file

    sd = load_file(str(fixtures_dir / "dcae_tiny_weights.safetensors"))
    ours = DCAE.from_state_dict(sd)
    ref = _tiny_diffusers(*CONFIGS["sana_layout"])
    ref.load_state_dict(original_to_diffusers(sd), strict=True)
    torch.manual_seed(6)
    latent = torch.randn(1, 32, 3, 4) * 8
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(latent), ref.decode(latent).sample, atol=1e-4, rtol=0)
