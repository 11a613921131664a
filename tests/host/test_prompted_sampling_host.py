"""Text-conditioned sampling in the host: CLIPLoader -> Jodi Text Encode (positive, negative) -> Jodi Sampler.

The latents the host produces must equal a direct jodi_core.pipeline run given the same caption embeddings (taken
from the host's own Jodi Text Encode output), so the CONDITIONING hand-over between the nodes loses nothing; and the
prompt must change the result.
"""

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.host

DOMAINS = ("image", "lineart", "edge", "depth", "normal", "albedo", "segmentation", "openpose")
SETTINGS = dict(aspect="width x height", width=128, height=96, steps=2, cfg=4.5, seed=11, sampler="dpm++2m-flow",
                flow_shift=3.0, batch_size=1)


@pytest.fixture(autouse=True)
def _model_code():
    for module in ("jodi_core.loading", "jodi_core.dit.model", "jodi_core.dcae.model"):
        pytest.importorskip(module, reason=f"{module} not present yet")


def _graph(host_models, prompt: str, negative: str, name: str) -> dict:
    def encode(text, chi):
        return {"class_type": "JodiTextEncode",
                "inputs": {"clip": ["1", 0], "text": text, "complex_human_instruction": chi}}

    roles = {f"{d}_role": "generate" for d in DOMAINS}
    return {
        "1": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": host_models.gemma_file, "type": "lumina2", "device": "default"}},
        "2": encode(prompt, True),
        "3": encode(negative, False),  # the reference encodes negatives without the instruction prefix
        "4": {"class_type": "JodiModelLoader",
              "inputs": {"ckpt_name": host_models.jodi_file, "dtype": "fp32", "attention": "torch"}},
        "5": {"class_type": "JodiVAELoader", "inputs": {"vae_name": host_models.vae_file, "dtype": "fp32"}},
        "6": {"class_type": "JodiRoles", "inputs": roles},
        "7": {"class_type": "JodiSampler", "inputs": {
            "model": ["4", 0], "vae": ["5", 0], "roles": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
            **SETTINGS}},
        "8": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["7", 0], "name": f"{name}_latent"}},
        "9": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["2", 0], "name": f"{name}_pos"}},
        "10": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["3", 0], "name": f"{name}_neg"}},
    }


def test_prompted_sampling_matches_the_pipeline(comfy, host_models, probe_dir):
    from jodi_core.loading import load_dcae, load_jodi
    from jodi_core.pipeline import JodiPipeline

    comfy.run_prompt(_graph(host_models, "a red cat sleeping on a sofa", "blurry", "cat"))
    latent = load_file(probe_dir / "cat_latent.safetensors")["value.samples"]
    pos = load_file(probe_dir / "cat_pos.safetensors")
    neg = load_file(probe_dir / "cat_neg.safetensors")

    pipe = JodiPipeline(load_jodi(host_models.root / "diffusion_models" / host_models.jodi_file, dtype=torch.float32),
                        load_dcae(host_models.root / "vae" / host_models.vae_file, dtype=torch.float32))
    with torch.no_grad():
        ref = pipe(["generate"] * 8, SETTINGS["height"], SETTINGS["width"],
                   prompt_embeds=pos["value.0.0"][:, None], prompt_mask=pos["value.0.1.attention_mask"],
                   negative_embeds=neg["value.0.0"][:, None], steps=SETTINGS["steps"], cfg_scale=SETTINGS["cfg"],
                   flow_shift=SETTINGS["flow_shift"], sampler="dpmpp_2m", seed=SETTINGS["seed"], decode=False)
    assert latent.shape == ref.latents.shape  # (1, 8, 32, h, w) at the snapped bucket size
    torch.testing.assert_close(latent, ref.latents.float(), rtol=1e-4, atol=1e-4)

    # No negative connected: the "" caption the positive carries is the unconditional branch, as in the reference.
    graph = _graph(host_models, "a red cat sleeping on a sofa", "blurry", "cat_nonneg")
    del graph["7"]["inputs"]["negative"]
    comfy.run_prompt(graph)
    implicit = load_file(probe_dir / "cat_nonneg_latent.safetensors")["value.samples"]
    with torch.no_grad():
        ref = pipe(["generate"] * 8, SETTINGS["height"], SETTINGS["width"],
                   prompt_embeds=pos["value.0.0"][:, None], prompt_mask=pos["value.0.1.attention_mask"],
                   negative_embeds=pos["value.0.1.jodi_caption.null"][:, None], steps=SETTINGS["steps"],
                   cfg_scale=SETTINGS["cfg"], flow_shift=SETTINGS["flow_shift"], sampler="dpmpp_2m",
                   seed=SETTINGS["seed"], decode=False)
    torch.testing.assert_close(implicit, ref.latents.float(), rtol=1e-4, atol=1e-4)

    comfy.run_prompt(_graph(host_models, "mountains above a lake at sunset", "blurry", "lake"))
    other = load_file(probe_dir / "lake_latent.safetensors")["value.samples"]
    assert (other - latent).abs().max() > 1e-3, "the prompt did not change the result"
