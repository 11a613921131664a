"""One Jodi run from node inputs: checks, captions, memory management, the jodi_core pipeline, decoding.

Shared by Jodi Sampler, Jodi Decode and the one-node shortcuts so that they behave identically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..jodi_core import imaging
from ..jodi_core.domains import DOMAIN_NAMES, SEG12_CLASSES, plan_roles
from . import common, layouts, map_conventions, payloads, vocabulary

log = logging.getLogger(__name__)

MAX_STEPS = 1000
MAX_CFG = 100.0
MAX_BATCH = 64


@dataclass
class RunSettings:
    aspect: str = vocabulary.ASPECT_AUTO
    width: int = 1024
    height: int = 1024
    steps: int = 20
    cfg: float = 4.5
    seed: int = 0
    sampler: str = "dpm++2m-flow"
    flow_shift: float = 3.0
    batch_size: int = 1
    condition_fit: str = imaging.ALIGNED_FIT

    def check(self) -> "RunSettings":
        vocabulary.check_choice("aspect", self.aspect, vocabulary.ASPECT_CHOICES)
        vocabulary.check_choice("condition_fit", self.condition_fit, imaging.CONDITION_FITS)
        vocabulary.check_choice("sampler", self.sampler, tuple(vocabulary.SAMPLERS))
        self.steps = vocabulary.check_number("steps", self.steps, 1, MAX_STEPS, integer=True)
        self.cfg = vocabulary.check_number("cfg", self.cfg, 0.0, MAX_CFG)
        self.seed = vocabulary.check_number("seed", self.seed, 0, vocabulary.MAX_SEED, integer=True)
        self.flow_shift = vocabulary.check_number("flow_shift", self.flow_shift, 0.01, 100.0)
        self.batch_size = vocabulary.check_number("batch_size", self.batch_size, 1, MAX_BATCH, integer=True)
        if self.aspect in (vocabulary.ASPECT_AUTO, vocabulary.ASPECT_CUSTOM):
            vocabulary.check_number("width", self.width, 32, 8192, integer=True)
            vocabulary.check_number("height", self.height, 32, 8192, integer=True)
        return self


def check_combo_inputs(**values) -> "bool | str":
    """validate_inputs body for the combos the server does not check (None = linked, checked at run time)."""
    tables = {
        "aspect": vocabulary.ASPECT_CHOICES, "sampler": tuple(vocabulary.SAMPLERS), "mask_class": SEG12_CLASSES,
        "unconnected_labels": ("ignore", "generate"), "condition_fit": imaging.CONDITION_FITS,
    }
    try:
        for name, value in values.items():
            if value is not None and name in tables:
                vocabulary.check_choice(name, value, tables[name])
    except ValueError as e:
        return str(e)
    return True


def _captions(model: torch.nn.Module, positive, negative):
    if positive is None:
        if negative is not None:
            log.warning("Jodi: a negative prompt without a positive one has no effect (no CFG runs); ignoring it.")
        return None, None, None
    from .text_encode import caption_from_conditioning, null_from_conditioning

    emb, mask = caption_from_conditioning(positive, "positive")
    if negative is not None:
        neg = caption_from_conditioning(negative, "negative")[0]
    else:  # the reference's default: "" through Gemma (else the pipeline falls back to the model's stored null)
        neg = null_from_conditioning(positive)
    channels = getattr(getattr(model, "config", None), "caption_channels", None)
    for what, t in (("positive", emb), ("negative", neg)):
        if t is not None and channels is not None and t.shape[-1] != channels:
            raise ValueError(
                f"The {what} caption has {t.shape[-1]} channels but this Jodi model takes {channels}: encode it with "
                "Jodi Text Encode and the Gemma-2-2B-IT text encoder that belongs to the model."
            )
    return emb, mask, neg


def sample(model_patcher, vae_patcher, roles: payloads.RolesPayload, settings: RunSettings, positive=None,
           negative=None, decode: bool = False, tiled: bool = False):
    """Run the sampler; returns (LatentPayload, JodiResult). With ``decode``, the result's images hold the generated
    domains decoded and the condition images as given (fitted to the output size)."""
    from ..jodi_core.pipeline import JodiPipeline

    common.check_patcher(model_patcher, "model", "Load Jodi Model")
    common.check_patcher(vae_patcher, "vae", "Load Jodi DC-AE")
    if not isinstance(roles, payloads.RolesPayload):
        raise TypeError(f"roles must come from Jodi Roles / Conditions, got {type(roles).__name__}.")
    settings.check()
    common.interrupt_check()

    transformer, vae = common.unwrap(model_patcher), common.unwrap(vae_patcher)
    emb, mask, neg = _captions(transformer, positive, negative)
    batch = roles.batch_size(settings.batch_size)
    plan = plan_roles(roles.roles, batch, has_prompt=emb is not None, cfg_scale=settings.cfg)
    conditions = roles.condition_tensors()
    pipe = JodiPipeline(transformer, vae)
    height, width = vocabulary.resolve_size(settings.aspect, settings.width, settings.height,
                                            roles.first_condition_size(), pipe.base_size, pipe.compression)
    # Only what the run made is decoded: condition slots would be the VAE round trip of the user's own input.
    wanted = list(plan.generated)
    needs = pipe.memory_needs(
        batch, plan, height, width, plan.use_cfg, decode=decode, tiled_decode=tiled, decode_rows=1,
        decoded=wanted, dit_device=model_patcher.load_device, vae_device=vae_patcher.load_device,
        extra_host_bytes=node_copies(batch, height, width, len(wanted), len(conditions)) if decode else 0)
    what = f"{width}x{height} output, {len(wanted)} maps, batch {batch}"
    common.check_memory(needs, what, host_only=True)  # before anything is loaded or allocated
    common.load_for_run(model_patcher, vae_patcher, common.device_need(needs, model_patcher, vae_patcher))
    common.check_memory(needs, what)  # the GPU's free memory is known once the models are in place

    reporter = common.StepReporter(settings.steps, pipe, plan.roles[0])
    result = pipe(
        plan, height, width, conditions=conditions, prompt_embeds=emb, prompt_mask=mask,
        negative_embeds=neg, steps=settings.steps, cfg_scale=settings.cfg, flow_shift=settings.flow_shift,
        sampler=vocabulary.SAMPLERS[settings.sampler], seed=settings.seed, batch_size=batch, callback=reporter,
        decode=False, condition_fit=settings.condition_fit, check_memory=False,
    )
    latent = payloads.LatentPayload(result.latents.float().cpu(), result.roles.cpu(), height, width)
    if decode:
        result.images, result.seg_index = decode_samples(vae_patcher, latent, tiled=tiled, domains=wanted,
                                                         checked=True)
        for name, image in conditions.items():
            fitted = imaging.fit_condition(image, height, width, settings.condition_fit)
            result.images[name] = fitted.expand(latent.batch, -1, -1, -1)
        if result.seg_index is None and "segmentation" in conditions:
            seg_image = layouts.bchw_to_image(result.images["segmentation"])
            result.seg_index = map_conventions.seg_index_from_image(seg_image)
    return latent, result


def decode(vae_patcher, latent: payloads.LatentPayload, tiled: bool = False):
    """Decode every present domain; returns (images dict name -> (B, 3, H, W), seg_index (B, H, W) or None)."""
    common.check_patcher(vae_patcher, "vae", "Load Jodi DC-AE")
    if not isinstance(latent, payloads.LatentPayload):
        raise TypeError(f"jodi_latent must come from Jodi Sampler, got {type(latent).__name__}.")
    return decode_samples(vae_patcher, latent, tiled=tiled)


def node_copies(batch: int, height: int, width: int, maps: int, conditions: int = 0) -> int:
    """RAM the nodes add to the pipeline's maps at the output size: an IMAGE per map socket (black ones too), the
    class-index image and mask, the batch concatenation of the decoded maps, and each condition image fitted to the
    output size and converted back to an IMAGE."""
    pixels = batch * height * width
    joined = maps if batch > 1 else 0
    return pixels * (12 * len(DOMAIN_NAMES) + 16 + 12 * joined + 24 * conditions)


def decode_samples(vae_patcher, latent: payloads.LatentPayload, tiled: bool = False, domains=None,
                   checked: bool = False):
    """The decode loop of Jodi Decode and the shortcuts: one sample at a time (bounds the decoder's memory), with a
    progress bar and interrupt between samples. ``domains``: indices to decode (default: every present one).
    ``checked``: the caller has already checked that the decode fits in memory."""
    from ..jodi_core.pipeline import JodiPipeline

    pipe = JodiPipeline(None, common.unwrap(vae_patcher))
    if checked:
        common.load_fully([vae_patcher])
    else:
        decoded = [DOMAIN_NAMES.index(n) for n in latent.present()] if domains is None else list(domains)
        needs = pipe.memory_needs(
            latent.batch, latent.roles, latent.height, latent.width, False, tiled_decode=tiled, decode_rows=1,
            decoded=decoded, vae_device=vae_patcher.load_device,
            extra_host_bytes=node_copies(latent.batch, latent.height, latent.width, len(decoded)))
        what = f"{latent.width}x{latent.height} output, {len(decoded)} maps, batch {latent.batch}"
        common.check_memory(needs, what, host_only=True)
        common.load_fully([vae_patcher], common.device_need(needs, vae_patcher))
        common.check_memory(needs, what)
    progress = common.Progress(interruptible=False)  # checked before each sample instead
    parts: list[tuple[dict, Optional[torch.Tensor]]] = []
    for b in range(latent.batch):
        common.interrupt_check()
        parts.append(pipe.decode_latents(latent.samples[b:b + 1], latent.roles[b:b + 1], latent.height, latent.width,
                                         tiled=tiled, domains=domains))
        progress(b + 1, latent.batch)
    if len(parts) == 1:  # torch.cat would copy every map
        return parts[0]
    images = {name: torch.cat([p[0][name] for p in parts]) for name in parts[0][0]}
    seg = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
    return images, seg


def map_outputs(images: dict, seg_index: Optional[torch.Tensor], batch: int, height: int, width: int,
                mask_class: str, domains=DOMAIN_NAMES) -> list:
    """The maps as IMAGE outputs in domain order (black for domains the run did not produce), then the class-index
    image and the chosen class's MASK."""
    vocabulary.check_choice("mask_class", mask_class, SEG12_CLASSES)
    out = []
    for name in domains:
        img = images.get(name)
        out.append(layouts.bchw_to_image(img) if img is not None else layouts.blank_image(batch, height, width))
    if seg_index is None:
        out.append(layouts.blank_image(batch, height, width))
        out.append(torch.zeros(batch, height, width))
    else:
        out.append(layouts.index_to_index_image(seg_index))
        out.append(layouts.class_mask(seg_index, SEG12_CLASSES.index(mask_class)))
    return out
