"""Write a random-weight SD 1.5 checkpoint and two ControlNets that ComfyUI's core loaders accept.

Run with the ComfyUI folder on the command line (it imports ComfyUI's own model classes, so it runs in its own
process, never inside pytest):

    python make_sd15_tiny.py <ComfyUI dir> <checkpoint path> <controlnet path> [<controlnet path> ...]

ComfyUI recognises SD 1.5 by channel width (320) and context width (768), not by depth, so one UNet level with one
res block and one transformer block is enough (comfyui_host.md §I). CLIP-L and the VAE have fixed configs; they
dominate the file size (~0.47 GB in fp16). Weights are 0.02 * randn (norm weights 1, biases 0).
"""

import sys

import torch


def _randomize(module: torch.nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            sd[name] = t
        elif name.endswith("bias"):
            sd[name] = torch.zeros_like(t)
        elif "norm" in name and t.ndim == 1:
            sd[name] = torch.ones_like(t)
        else:
            sd[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype)
    return sd


def main(comfy_dir: str, ckpt_path: str, *controlnet_paths: str) -> None:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cldm.cldm
    import comfy.ldm.models.autoencoder
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    unet_kwargs = dict(
        image_size=32, in_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1], num_heads=8,
        use_spatial_transformer=True, transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=1, context_dim=768, legacy=False, use_linear_in_transformer=False,
        operations=comfy.ops.disable_weight_init)
    unet = openaimodel.UNetModel(out_channels=4, **unet_kwargs)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    clip = comfy.sd1_clip.SDClipModel()

    sd = {}
    for prefix, module, seed in (("model.diffusion_model.", unet, 1), ("first_stage_model.", vae, 2),
                                 ("cond_stage_model.", clip, 3)):
        for key, t in _randomize(module, seed).items():
            sd[prefix + key] = t.half() if t.is_floating_point() else t
    save_file(sd, ckpt_path)

    for i, path in enumerate(controlnet_paths):
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, **unet_kwargs)
        cn = {k: (t.half() if t.is_floating_point() else t) for k, t in _randomize(net, 10 + i).items()}
        if path.endswith(".safetensors"):
            save_file(cn, path)
        else:
            torch.save(cn, path)


if __name__ == "__main__":
    main(*sys.argv[1:])
