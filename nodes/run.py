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
from ..jodi_core.memory import format_bytes
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
    # The step (with the condition images' encoding before it) and the decode are separate phases, each with its own
    # load: ComfyUI makes room for the DiT's activations, then for the decoder's, offloading the DiT if it must.
    step_needs = pipe.memory_needs(batch, plan, height, width, plan.use_cfg, decode=False,
                                   dit_device=model_patcher.load_device, vae_device=vae_patcher.load_device)
    what = f"{width}x{height} output, {len(wanted)} maps, batch {batch}"
    # Before anything is loaded or allocated; the decode counts its smallest tiles, which it falls back to.
    decode_floor = (decode_needs(vae_patcher, batch, plan, height, width, pipe.working_size(height, width), wanted,
                                 tiled=True, conditions=len(conditions), tile_size=tile_sizes()[-1])
                    if decode else {})
    common.check_memory(common.merge_needs(step_needs, decode_floor), what, host_only=True)
    reporter = common.StepReporter(settings.steps, pipe, plan.roles[0])
    step_models = [model_patcher]
    if plan.conditioned or reporter.preview_domain is not None:  # encoding conditions, decoding previews
        step_models.append(vae_patcher)
    if reporter.preview_domain is not None:  # one map of one sample, between steps
        step_needs = common.merge_needs(step_needs, decode_needs(
            vae_patcher, 1, plan.roles[:1], height, width, pipe.working_size(height, width), [reporter.preview_domain],
            tiled=False))
    common.load_models(step_models, common.device_need(step_needs, *step_models))
    common.check_memory(step_needs, what)  # the GPU's free memory is known once the models are in place

    result = pipe(
        plan, height, width, conditions=conditions, prompt_embeds=emb, prompt_mask=mask,
        negative_embeds=neg, steps=settings.steps, cfg_scale=settings.cfg, flow_shift=settings.flow_shift,
        sampler=vocabulary.SAMPLERS[settings.sampler], seed=settings.seed, batch_size=batch, callback=reporter,
        decode=False, condition_fit=settings.condition_fit, check_memory=False,
    )
    latent = payloads.LatentPayload(result.latents.float().cpu(), result.roles.cpu(), height, width)
    if decode:
        result.images, result.seg_index = decode_samples(vae_patcher, latent, tiled=tiled, domains=wanted,
                                                         conditions=len(conditions))
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


def decode_needs(vae_patcher, batch: int, roles, height: int, width: int, work_size: tuple[int, int], domains,
                 tiled: bool, conditions: int = 0, tile_size: Optional[int] = None) -> dict:
    """Estimated peak per device of decoding ``domains`` of ``batch`` samples whose latents have ``work_size``
    pixels, one sample and one domain at a time, to ``height x width`` maps, with the nodes' copies of them."""
    from ..jodi_core.pipeline import JodiPipeline

    pipe = JodiPipeline(None, common.unwrap(vae_patcher))
    return pipe.memory_needs(
        batch, roles, height, width, False, decode=True, encode=False, tiled_decode=tiled, decode_rows=1,
        decoded=list(domains), work_size=tuple(work_size), vae_device=vae_patcher.load_device,
        extra_host_bytes=node_copies(batch, height, width, len(domains), conditions), tile_size=tile_size)


def tile_sizes() -> tuple[int, ...]:
    """Tile sides (pixels) a decode short of memory goes down through: the DC-AE's own (1024), then halves, as core's
    VAE Decode falls back to tiles of 512 px."""
    from ..jodi_core.dcae.model import DEFAULT_TILE_SIZE

    return DEFAULT_TILE_SIZE, DEFAULT_TILE_SIZE // 2, DEFAULT_TILE_SIZE // 4


def decode_samples(vae_patcher, latent: payloads.LatentPayload, tiled: bool = False, domains=None,
                   conditions: int = 0):
    """The decode loop of Jodi Decode and the shortcuts: one sample and one domain at a time (bounds the decoder's
    memory), with a progress bar and interrupt between samples. ``domains``: indices to decode (default: every
    present one); ``conditions``: condition images the caller keeps beside the maps (for the RAM estimate).

    Like core's VAE Decode, a decode that does not fit runs in tiles, smaller ones until it fits: when its estimate
    exceeds what is free once the DC-AE is loaded, or when it runs out of memory anyway. ``tiled`` starts at tiles."""
    from ..jodi_core.pipeline import JodiPipeline

    pipe = JodiPipeline(None, common.unwrap(vae_patcher))
    decoded = [DOMAIN_NAMES.index(n) for n in latent.present()] if domains is None else list(domains)
    work_size = tuple(d * pipe.compression for d in latent.samples.shape[-2:])
    ways = ([] if tiled else [None]) + list(tile_sizes())  # None: whole; else the tiles' side

    def needs(way: Optional[int]) -> dict:
        return decode_needs(vae_patcher, latent.batch, latent.roles, latent.height, latent.width, work_size,
                            decoded, way is not None, conditions, tile_size=way)

    what = f"{latent.width}x{latent.height} output, {len(decoded)} maps, batch {latent.batch}"
    common.check_memory(needs(ways[-1]), what, host_only=True)  # the smallest tiles are the least it can take
    common.load_models([vae_patcher], common.device_need(needs(ways[0]), vae_patcher))
    vae_device = torch.device(vae_patcher.load_device)
    fitting = [w for w in ways if common.fits({vae_device: needs(w).get(vae_device, 0)})]  # the decoder's device
    way = fitting[0] if fitting else ways[-1]
    if way != ways[0]:
        log.info("Jodi: decoding %s in %d px tiles: %s needs about %s on %s, more than is free.", what, way,
                 "an untiled decode" if ways[0] is None else f"one in {ways[0]} px tiles",
                 format_bytes(common.device_need(needs(ways[0]), vae_patcher)), vae_device)
    common.check_memory(needs(way), what)
    progress = common.Progress(interruptible=False)  # checked before each sample instead
    parts: list[tuple[dict, Optional[torch.Tensor]]] = []
    for b in range(latent.batch):
        common.interrupt_check()
        part = _decode_one(pipe, latent, b, way, domains)
        while part is None:  # out of memory: the next smaller tiles
            way = ways[ways.index(way) + 1]
            log.warning("Jodi: ran out of memory decoding %s; decoding in %d px tiles.", what, way)
            part = _decode_one(pipe, latent, b, way, domains)
        parts.append(part)
        progress(b + 1, latent.batch)
    if len(parts) == 1:  # torch.cat would copy every map
        return parts[0]
    images = {name: torch.cat([p[0][name] for p in parts]) for name in parts[0][0]}
    seg = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
    return images, seg


def _decode_one(pipe, latent: payloads.LatentPayload, b: int, way: Optional[int], domains):
    """Sample ``b`` decoded whole (``way`` None) or in tiles of side ``way``; None when it ran out of memory and
    smaller tiles are left to try."""
    import comfy.model_management as mm

    try:
        return pipe.decode_latents(latent.samples[b:b + 1], latent.roles[b:b + 1], latent.height, latent.width,
                                   tiled=way is not None, domains=domains, tile_size=way)
    except mm.OOM_EXCEPTION:
        if way == tile_sizes()[-1]:
            raise
    # Outside the except block, so that the tensors its traceback holds can be freed first (as core's VAE does).
    getattr(mm, "soft_empty_cache", lambda: None)()
    return None


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
