"""Jodi Text Encode in the real host against the reference caption computed with HF Gemma2Model (SDPA path).

The Gemma file is the output of ``convert_gemma`` (bf16) and goes through core ``CLIPLoader`` (type lumina2), so
this also checks that a converted file loads: keys recognised as Gemma-2-2B, tokenizer read from ``spiece_model``.
ComfyUI computes Gemma in float32 from the bf16 weights, except that its RMSNorm rounds ``1 + w`` to bf16. The
exact check therefore runs HF on the same bf16 weights with that rounding reproduced (round_like_comfy_bf16_);
a second check shows the rounding moves the result less than the reference's own bf16 computation does.
"""

import copy


import pytest
import torch
from safetensors.torch import load_file

from .tiny_models import load_hf_reference, reference_caption, round_like_comfy_bf16_

pytestmark = pytest.mark.host

PROMPTS = {
    "short": "a red cat sleeping on a sofa",
    "weights_and_flags": "A busy street at night, (neon:1.2) signs --ar 16:9",
    "long": "mountains above a lake at sunset " * 60,
    "empty": "",  # without the CHI prefix this is the reference's null caption
}


@pytest.fixture(scope="module")
def hf_reference(host_models):
    tokenizer, encoder = load_hf_reference(host_models.gemma_hf, attn="sdpa")
    round_like_comfy_bf16_(encoder)
    return tokenizer, encoder


def _graph(host_models, text: str, chi: bool, name: str, with_core: bool = False) -> dict:
    graph = {
        "1": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": host_models.gemma_file, "type": "lumina2", "device": "default"}},
        "2": {"class_type": "JodiTextEncode",
              "inputs": {"clip": ["1", 0], "text": text, "complex_human_instruction": chi}},
        "3": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["2", 0], "name": name}},
    }
    if with_core:  # the stock Lumina encode from the same CLIP object, after ours
        graph["4"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": text}}
        graph["5"] = {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["4", 0], "name": name + "_core"}}
    return graph


@pytest.mark.parametrize("chi", [True, False], ids=["chi", "no-chi"])
@pytest.mark.parametrize("key", list(PROMPTS))
def test_matches_hf_sdpa_reference(comfy, host_models, hf_reference, probe_dir, key, chi):
    name = f"te_{key}_{int(chi)}"
    comfy.run_prompt(_graph(host_models, PROMPTS[key], chi, name))
    out = load_file(probe_dir / f"{name}.safetensors")
    emb, mask = out["value.0.0"], out["value.0.1.attention_mask"]
    assert emb.shape == (1, 300, 48) and emb.dtype == torch.float32
    assert mask.shape == (1, 300)
    assert bool(out["value.0.1.jodi_caption.chi"]) is chi

    ref_emb, ref_mask, _ = reference_caption(*hf_reference, PROMPTS[key], chi=chi)
    assert torch.equal(mask.long(), ref_mask.long())
    err = (emb - ref_emb).abs().max().item()
    assert err < 1e-4, f"max abs error {err:.2e} vs HF SDPA (embedding scale {ref_emb.abs().max():.2f})"
    # The attached unconditional caption is the reference's null caption: "" without the prefix.
    null_ref = reference_caption(*hf_reference, "", chi=False)[0]
    assert (out["value.0.1.jodi_caption.null"] - null_ref).abs().max().item() < 1e-4


def test_norm_rounding_is_below_the_reference_precision(comfy, host_models, probe_dir):
    """Against plain float32 HF, ComfyUI is off by less than the reference's own bf16 Gemma run is."""
    text = PROMPTS["short"]
    comfy.run_prompt(_graph(host_models, text, True, "te_precision"))
    ours = load_file(probe_dir / "te_precision.safetensors")["value.0.0"]
    tokenizer, fp32 = load_hf_reference(host_models.gemma_hf, attn="sdpa")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)  # the reference loads Gemma with torch_dtype=bfloat16
    exact = reference_caption(tokenizer, fp32, text)[0]
    ref_bf16 = reference_caption(tokenizer, bf16, text)[0]
    ours_gap = (ours - exact).abs().max().item()
    ref_gap = (ref_bf16 - exact).abs().max().item()
    assert 0 < ours_gap < ref_gap, f"ComfyUI vs fp32: {ours_gap:.3g}, reference bf16 vs fp32: {ref_gap:.3g}"


def test_final_norm_route_and_users_clip_untouched(comfy, host_models, hf_reference, probe_dir):
    """Ours is the last state after the final norm; the stock encode (layer -2, no norm) still works afterwards."""
    text = PROMPTS["short"]
    comfy.run_prompt(_graph(host_models, text, False, "te_core", with_core=True))
    core = load_file(probe_dir / "te_core_core.safetensors")["value.0.0"]  # (1, L, 48), BOS + tokens, no padding
    tokenizer, encoder = hf_reference
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states
    # ComfyUI's Lumina default is the output of the second-to-last block, before the final norm.
    torch.testing.assert_close(core, hidden[-2].float(), rtol=1e-4, atol=1e-4)
    ours = load_file(probe_dir / "te_core.safetensors")["value.0.0"]
    n = ids.shape[1]
    torch.testing.assert_close(ours[:, :n], hidden[-1][:, :n].float(), rtol=1e-4, atol=1e-4)
