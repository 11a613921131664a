"""The embedded demo: a tiny Jodi + DC-AE trained on the synthetic world, and the ``python -m jodi_core demo`` run.

The demo model needs no text encoder (it was trained with every caption dropped, so it always uses its stored null
embedding; prompts have no effect on it). When its weights are not shipped (a checkout before the demo model
landed), the demo falls back to tiny random weights and says so: the pipeline still runs end to end, but the maps
mean nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from ..domains import DOMAIN_NAMES, Role

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parents[1] / "assets" / "demo"  # jodi_core/assets/demo
DEMO_DIT = DEMO_DIR / "jodi_demo_dit.safetensors"
DEMO_VAE = DEMO_DIR / "jodi_demo_dcae.safetensors"
DEMO_SIZE = 64  # pixels; the demo model's training resolution


def demo_model_paths() -> tuple[Path, Path]:
    """(DiT, DC-AE) files of the shipped demo model; FileNotFoundError if this checkout has none."""
    if not (DEMO_DIT.is_file() and DEMO_VAE.is_file()):
        raise FileNotFoundError(f"The demo model is not shipped in this checkout ({DEMO_DIT.name}, {DEMO_VAE.name}).")
    return DEMO_DIT, DEMO_VAE


def tiny_random_models(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random Jodi (hidden 64, depth 2) and a 4-stage DC-AE (f8): the pipeline's smallest real shapes."""
    from ..dcae.model import DCAE, DCAEConfig
    from ..dit.model import JodiConfig, JodiTransformer

    torch.manual_seed(seed)
    dit = JodiTransformer(
        JodiConfig(hidden_size=64, depth=2, num_heads=2, caption_channels=32, in_channels=8, base_size=8),
        dtype=dtype,
    )
    _init_random(dit, seed)
    vae = DCAE(
        DCAEConfig(
            latent_channels=8,
            width_list=(8, 16, 32, 32),
            encoder_depth_list=(1, 1, 1, 1),
            decoder_depth_list=(1, 1, 1, 1),
            encoder_block_types=("ResBlock", "ResBlock", "EViTS5_GLU", "EViTS5_GLU"),
            decoder_block_types=("ResBlock", "ResBlock", "EViTS5_GLU", "EViTS5_GLU"),
        ),
        dtype=dtype,
    )
    _init_random(vae, seed + 1)
    return dit.eval(), vae.eval()


def _init_random(module: torch.nn.Module, seed: int) -> None:
    """Seeded fan-in scaled values for every floating tensor, so no path is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            fan_in = max(1, t[0].numel()) if t.dim() > 1 else t.numel()
            t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)


def load_demo_models(device="cpu", dtype: Optional[torch.dtype] = None):
    """(transformer, vae, trained): the shipped demo model, or tiny random weights when it is absent."""
    from ..loading import load_dcae, load_jodi

    try:
        dit_path, vae_path = demo_model_paths()
    except FileNotFoundError:
        log.warning("No trained demo model in this checkout: using tiny random weights (outputs are noise).")
        dit, vae = tiny_random_models()
        return dit.to(device), vae.to(device), False
    dtype = dtype or torch.float32
    return load_jodi(dit_path, dtype=dtype, device=device), load_dcae(vae_path, dtype=dtype, device=device), True


def demo_scene(index: int = 10_000, size: int = DEMO_SIZE) -> dict[str, torch.Tensor]:
    """A held-out synthetic scene: domain name -> (1, 3, H, W) in [0, 1]."""
    from ..data.synthetic import SyntheticConfig, SyntheticWorld

    sample = SyntheticWorld(SyntheticConfig(height=size, width=size, seed=12345))[index]
    return {k: torch.from_numpy(v).permute(2, 0, 1)[None].float() for k, v in sample.domains.items()}


def make_grid(rows: list[tuple[str, dict[str, torch.Tensor], set[str]]], cell: int = 128):
    """A labelled PIL grid: one row per task, one column per domain; given conditions are framed."""
    from PIL import Image, ImageDraw

    label_h, title_w = 16, 150
    grid = Image.new("RGB", (title_w + cell * len(DOMAIN_NAMES), label_h + cell * len(rows)), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(DOMAIN_NAMES):
        draw.text((title_w + c * cell + 4, 2), name, fill=(230, 230, 230))
    for r, (title, images, given) in enumerate(rows):
        y0 = label_h + r * cell
        draw.text((4, y0 + cell // 2 - 6), title, fill=(230, 230, 230))
        for c, name in enumerate(DOMAIN_NAMES):
            if name not in images:
                continue
            x = (images[name][0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(x).resize((cell - 4, cell - 4), Image.NEAREST)
            x0 = title_w + c * cell
            grid.paste(tile, (x0 + 2, y0 + 2))
            if name in given:
                draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(255, 200, 0), width=2)
    return grid


def run_demo(out: "str | Path" = "jodi_demo.png", *, device: str = "cpu", steps: int = 20, seed: int = 0) -> Path:
    """Joint generation, controllable generation (from a depth + edge map) and perception of an unseen scene."""
    from ..pipeline import JodiPipeline

    start = time.perf_counter()
    dit, vae, trained = load_demo_models(device)
    pipe = JodiPipeline(dit, vae)
    size = DEMO_SIZE
    scene = demo_scene(size=size)
    G, C, I = Role.GENERATE, Role.CONDITION, Role.IGNORE

    joint = pipe([G] * 8, size, size, steps=steps, seed=seed)
    control_roles = [G, I, C, C, I, I, I, I]  # image from edge + depth
    control = pipe(control_roles, size, size, conditions={"edge": scene["edge"], "depth": scene["depth"]},
                   steps=steps, seed=seed)
    control.images.update({"edge": scene["edge"], "depth": scene["depth"]})
    perception = pipe([C] + [G] * 7, size, size, conditions={"image": scene["image"]}, steps=steps, seed=seed)
    perception.images["image"] = scene["image"]

    rows = [
        ("joint generation", joint.images, set()),
        ("controllable (edge+depth)", control.images, {"edge", "depth"}),
        ("perception", perception.images, {"image"}),
        ("ground truth (unseen)", scene, set()),
    ]
    out = Path(out)
    make_grid(rows).save(out)
    elapsed = time.perf_counter() - start
    kind = "demo model" if trained else "TINY RANDOM WEIGHTS (no trained demo model in this checkout)"
    print(f"Wrote {out} ({kind}; {steps} steps, {elapsed:.1f} s on {device}).")
    return out
