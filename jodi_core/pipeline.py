"""Jodi inference: roles and condition images in, sampled latents and post-processed maps of every domain out.

One pipeline serves the three jobs; the roles decide which:
- joint generation: every domain generated;
- controllable generation: the image generated from any subset of label maps given as conditions;
- perception: the image given as a condition, labels generated.

It reproduces ``app/jodi_pipeline.py`` of the reference (bucketed size, condition resize and centre crop, DC-AE
scaling, DPM-Solver++ with CFG ``[uncond, cond]`` and the prompt's mask on both halves, final role-1 replacement,
decode, resize back, clamp) and takes the exact shortcuts: ignored domains leave the sequence, and no CFG branch
runs when the caption is dropped anyway (perception) or no prompt is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from . import imaging, memory
from .domains import DOMAINS, NUM_DOMAINS, Role, RolePlan, get_domain, plan_roles, postprocess_with_index
from .memory import InsufficientMemoryError
from .ops import cast_workspace_bytes, compute_dtype
from .sampling import Interrupted, StepCallback, cfg_velocity, flow_timesteps, get_sampler

log = logging.getLogger(__name__)

__all__ = ["JodiPipeline", "JodiResult", "Interrupted", "InsufficientMemoryError"]

DCAE_SCALING_FACTOR = 0.41407

# Memory model of a run (bytes), for the check before it starts. Per output pixel and sample: each decoded map kept
# as float32 RGB, the segmentation class map (int64), and, while one map is post-processed, the decoded map plus the
# post-processing's own temporaries (at most about one more map; see domains.py).
MAP_BYTES_PER_PIXEL = 12
SEG_INDEX_BYTES_PER_PIXEL = 8
POSTPROCESS_BYTES_PER_PIXEL = 24
# DC-AE activations per working-size pixel, in units of its first stage's width times the element size: 7.4 measured
# for the f32c32 decoder (fp32, 512 px, CPU), whose full-resolution stages hold a few tensors of that width at once.
DCAE_ACTIVATION_FACTOR = 8


@dataclass
class JodiResult:
    latents: torch.Tensor  # (B, 8, C, h, w) float32, scaled, role-1 slots are the clean condition latents
    roles: torch.Tensor  # (B, 8) int64
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, 3, H, W) in [0, 1]
    seg_index: Optional[torch.Tensor] = None  # (B, H, W) int64, 12 classes
    height: int = 0
    width: int = 0


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, compute_dtype(module, p.dtype)  # not an fp8 storage dtype


def _check_finite(name: str, t: Optional[torch.Tensor]) -> None:
    if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values.")


def _batch_rows(name: str, t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{name} has {t.shape[0]} rows for a batch of {batch}; give one row (used for every sample) "
                     f"or one per sample.")


class JodiPipeline:
    """Run Jodi with the modules' current device and dtype (ComfyUI places them; plain users call ``.to``)."""

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, *, scaling_factor: float | None = None):
        self.transformer = transformer
        self.vae = vae
        cfg = getattr(vae, "config", None)
        dit_channels = getattr(getattr(transformer, "config", None), "in_channels", None)
        vae_channels = getattr(cfg, "latent_channels", None)
        if dit_channels is not None and vae_channels is not None and dit_channels != vae_channels:
            raise ValueError(f"This Jodi model works on {dit_channels} latent channels but the DC-AE makes "
                             f"{vae_channels}: load the DC-AE that belongs to the model.")
        self.scaling_factor = scaling_factor or getattr(cfg, "scaling_factor", None) or DCAE_SCALING_FACTOR

    # ---- geometry -----------------------------------------------------------------------------------------------

    @property
    def compression(self) -> int:
        return int(getattr(self.vae, "spatial_compression", 32))

    @property
    def base_size(self) -> int:
        """Pixel size of the training resolution (1024 for the real model), used to scale the aspect buckets."""
        cfg = getattr(self.transformer, "config", None)
        return int(getattr(cfg, "base_size", 32)) * getattr(cfg, "patch_size", 1) * self.compression

    def working_size(self, height: int, width: int, snap: bool = True) -> tuple[int, int]:
        if snap:
            return imaging.snap_to_bucket(height, width, self.base_size, self.compression)
        imaging.check_size(height, width, self.compression)
        return height, width

    def working_memory(self, batch: int, roles, height: int, width: int, use_cfg: bool, snap: bool = True) -> int:
        """Rough bytes of activations for one DiT step (hosts reserve this before loading the models): float32,
        about 12 live (rows, tokens, hidden) tensors in a block, for the domains that are not ignored in the first
        row, plus the compute-dtype copy of its largest fp8 weight, if any (:func:`ops.cast_workspace_bytes`).
        ``roles``: user roles or a :class:`RolePlan`; ``snap``: as for :meth:`working_size` (False: the DiT works at
        ``height x width`` itself)."""
        roles = plan_roles(roles).roles
        work_h, work_w = self.working_size(height, width, snap)
        active = int((roles[0] != Role.IGNORE).sum())
        tokens = active * (work_h // self.compression) * (work_w // self.compression) + 300
        hidden = int(getattr(getattr(self.transformer, "config", None), "hidden_size", 2240))
        rows = batch * (2 if use_cfg else 1)
        return rows * tokens * hidden * 4 * 12 + cast_workspace_bytes(self.transformer)

    def _dcae_activations(self, rows: int, height: int, width: int, tiled: bool,
                          tile_size: Optional[int] = None) -> int:
        """Rough peak bytes of one DC-AE pass over ``rows`` images of ``height x width`` pixels (``tile_size``: the
        tiles' side, default the DC-AE's), with the cast copy of its largest fp8 weight."""
        cfg = getattr(self.vae, "config", None)
        first_width = int(getattr(cfg, "width_list", (128,))[0])
        try:
            elem = _module_device_dtype(self.vae)[1].itemsize  # activations are in the compute dtype
        except (AttributeError, StopIteration):
            elem = 4
        h, w = height, width
        if tiled:  # one tile at a time, plus the float32 image and weights the tiles are blended into
            from .dcae.model import DEFAULT_TILE_SIZE

            tile = tile_size or DEFAULT_TILE_SIZE
            h, w = min(height, tile), min(width, tile)
        blend = rows * height * width * 4 * 4 if tiled and (h, w) != (height, width) else 0
        return rows * h * w * first_width * elem * DCAE_ACTIVATION_FACTOR + blend + cast_workspace_bytes(self.vae)

    @staticmethod
    def _device_of(module: Optional[torch.nn.Module], requested=None) -> torch.device:
        if requested is not None:
            return torch.device(requested)
        try:
            return next(module.parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")

    def memory_needs(
        self,
        batch: int,
        roles,
        height: int,
        width: int,
        use_cfg: bool,
        *,
        decode: bool = True,
        tiled_decode: bool = False,
        decode_rows: Optional[int] = None,
        decoded: Optional[Sequence[int]] = None,
        snap: bool = True,
        dit_device: "str | torch.device | None" = None,
        vae_device: "str | torch.device | None" = None,
        extra_host_bytes: int = 0,
        encode: bool = True,
        work_size: Optional[tuple[int, int]] = None,
        tile_size: Optional[int] = None,
    ) -> dict[torch.device, int]:
        """Estimated peak bytes per device of a whole run to a ``height x width`` output: encoding the conditions,
        sampling, then decoding and post-processing every map at the output size (all maps stay in RAM).

        ``roles``: user roles or a :class:`RolePlan`, or a latent's role tensor (taken as it is, for decoding).

        ``decode_rows``: samples decoded at once (default: the batch); ``decoded``: domain indices decoded (default:
        every domain that is not ignored); devices default to the modules' own; ``extra_host_bytes``: what the caller
        adds in RAM at the end (copies of the maps, say); ``encode``: count encoding the condition images (False for a
        decode alone); ``work_size``: the pixel size the latents have, where known (a finished latent), instead of
        the bucket of ``height x width``; ``tile_size``: the side of the decode's tiles. Rough by design: it is
        there to refuse runs that cannot fit, before they allocate anything."""
        if isinstance(roles, torch.Tensor):  # a latent's roles, which decoding takes as they are
            plan = RolePlan.from_table(roles.reshape(-1, NUM_DOMAINS))
        else:
            plan = plan_roles(roles, batch=batch)
        work_h, work_w = work_size or self.working_size(height, width, snap)
        f = self.compression
        host = torch.device("cpu")
        dit_dev, vae_dev = self._device_of(self.transformer, dit_device), self._device_of(self.vae, vae_device)
        channels = int(getattr(getattr(self.transformer, "config", None), "in_channels", 32))
        latents = batch * NUM_DOMAINS * channels * (work_h // f) * (work_w // f) * 4
        phases: list[dict[torch.device, int]] = []

        def phase(*parts: tuple[torch.device, int]) -> None:
            need: dict[torch.device, int] = {}
            for device, n in parts:
                need[device] = need.get(device, 0) + int(n)
            phases.append(need)

        if encode and plan.conditioned:  # encoding a condition image at the working size
            phase((vae_dev, self._dcae_activations(batch, work_h, work_w, False)), (host, latents))
        if self.transformer is not None:  # noise, the sampler's history and the model's output: a few latents
            phase((dit_dev, self.working_memory(batch, plan, height, width, use_cfg, snap) + 6 * latents),
                  (host, latents))
        if decoded is None:
            decoded = plan.active
        if decode and decoded:
            rows = min(batch, decode_rows or batch)
            out_px = height * width
            kept = batch * out_px * (MAP_BYTES_PER_PIXEL * len(decoded)
                                     + SEG_INDEX_BYTES_PER_PIXEL * (get_domain("segmentation").index in decoded))
            activations = self._dcae_activations(rows, work_h, work_w, tiled_decode, tile_size)
            decoded_map = rows * work_h * work_w * MAP_BYTES_PER_PIXEL  # float32, before the resize
            post = rows * out_px * POSTPROCESS_BYTES_PER_PIXEL
            if vae_dev.type == "cpu":
                phase((host, latents + kept + extra_host_bytes + max(activations, decoded_map + post)))
            else:  # resized on the device, post-processed in RAM
                phase((vae_dev, max(activations, decoded_map + rows * out_px * MAP_BYTES_PER_PIXEL)),
                      (host, latents + kept + extra_host_bytes + post))
        needs: dict[torch.device, int] = {}
        for need in phases:
            for device, n in need.items():
                needs[device] = max(needs.get(device, 0), n)
        return needs

    def check_memory(self, batch: int, roles, height: int, width: int, use_cfg: bool, **kwargs) -> None:
        """Raise :class:`InsufficientMemoryError` before a run whose :meth:`memory_needs` exceed the free memory of
        one of its devices (RAM, or CUDA memory after what the loaded models take)."""
        plan = plan_roles(roles, batch=batch)
        needs = self.memory_needs(batch, plan, height, width, use_cfg, **kwargs)
        memory.check_fits(needs, f"{width}x{height} output, {len(plan.active)} maps, batch {batch}")

    @staticmethod
    def uses_cfg(roles, has_prompt: bool, cfg_scale: float) -> bool:
        """Whether sampling runs a second, unconditional branch (:attr:`RolePlan.use_cfg`)."""
        return plan_roles(roles, has_prompt=has_prompt, cfg_scale=cfg_scale).use_cfg

    # ---- VAE -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
        """[0, 1] images ``(B, 3, H, W)`` -> scaled latents ``(B, C, H/f, W/f)`` in float32."""
        device, dtype = _module_device_dtype(self.vae)
        x = imaging.to_model_range(images.to(device=device, dtype=dtype))
        z = self.vae.encode(x, tiled=tiled) if tiled else self.vae.encode(x)
        return z.float() * self.scaling_factor

    @torch.no_grad()
    def decode_latents(
        self,
        latents: torch.Tensor,
        roles: torch.Tensor,
        height: int,
        width: int,
        *,
        tiled: bool = False,
        domains: Optional[list[int]] = None,
        tile_size: Optional[int] = None,
    ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Decode every non-ignored domain, resize to ``height x width``, clamp and post-process. ``tile_size``:
        tiles of that side (pixels, overlapping by a quarter) instead of the DC-AE's default ones."""
        if domains is None:
            domains = RolePlan.from_table(roles).active
        device, dtype = _module_device_dtype(self.vae)
        images: dict[str, torch.Tensor] = {}
        seg_index = None
        tiling = {"tile_size": tile_size, "overlap": tile_size // 4} if tiled and tile_size else {}
        for d in domains:
            z = latents[:, d].to(device=device, dtype=dtype) / self.scaling_factor
            x = self.vae.decode(z, tiled=tiled, **tiling) if tiled else self.vae.decode(z)
            x = imaging.resize(x.float(), height, width).clamp_(-1, 1).cpu()  # in place: x is at the output size
            images[DOMAINS[d].name], index = postprocess_with_index(d, x)
            del x
            if index is not None:
                seg_index = index
        return images, seg_index

    # ---- sampling --------------------------------------------------------------------------------------------------

    def prepare_conditions(
        self,
        roles: torch.Tensor,
        conditions: Optional[Mapping[str, torch.Tensor]],
        height: int,
        width: int,
        *,
        tiled: bool = False,
        fit: str = "crop",
    ) -> torch.Tensor:
        """Clean latents ``(B, 8, C, h, w)`` for the role-1 domains (zeros elsewhere, as the reference); ``fit``: how
        condition images are brought to ``height x width`` (:func:`imaging.fit_condition`)."""
        if fit not in imaging.CONDITION_FITS:
            raise ValueError(f"condition_fit must be one of {', '.join(imaging.CONDITION_FITS)}, got {fit!r}.")
        B = roles.shape[0]
        h, w = height // self.compression, width // self.compression
        channels = int(getattr(getattr(self.transformer, "config", None), "in_channels", 32))
        clean_x = torch.zeros(B, NUM_DOMAINS, channels, h, w)
        given = {get_domain(k).index: v for k, v in (conditions or {}).items() if v is not None}
        for d in range(NUM_DOMAINS):
            needed = roles[:, d] == Role.CONDITION
            if not needed.any():
                continue
            if d not in given:
                raise ValueError(
                    f"Domain {DOMAINS[d].name!r} has the role 'condition' but no {DOMAINS[d].name} image was given."
                )
            img = given[d]
            if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3:
                shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"The {DOMAINS[d].name} condition must be a (B, 3, H, W) image tensor, got {shape}.")
            if not img.is_floating_point():
                raise TypeError(f"The {DOMAINS[d].name} condition must be a float image in [0, 1], got {img.dtype} "
                                f"(divide 8-bit images by 255).")
            _check_finite(f"The {DOMAINS[d].name} condition image", img)
            img = imaging.fit_condition(img.float().clamp(0, 1), height, width, fit)
            # Encoded before the rows are matched: one image for all rows is encoded once.
            z = _batch_rows(f"The {DOMAINS[d].name} condition image", self.encode(img, tiled=tiled).cpu(), B)
            clean_x[:, d] = torch.where(needed[:, None, None, None], z, clean_x[:, d])
        return clean_x

    @staticmethod
    def make_noise(batch: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """Seeds ``seed, seed + 1, ...`` per sample on a CPU generator, so results do not depend on the device or on
        the batch size (sample ``i`` of a batch equals a batch of one with seed ``seed + i``). The seeds wrap around
        at 2**64, the generator's range, so the largest seed still takes a batch."""
        return JodiPipeline.noise_from_seeds([(int(seed) + i) % 2**64 for i in range(batch)], shape)

    @staticmethod
    def noise_from_seeds(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        """One CPU generator per sample, seeded with ``seeds[i]``: ``(len(seeds), *shape)`` float32."""
        noise = []
        for s in seeds:
            g = torch.Generator("cpu").manual_seed(int(s))
            noise.append(torch.randn((1, *shape), generator=g, dtype=torch.float32))
        return torch.cat(noise)

    def _caption_rows(self, name: str, embeds, batch: int) -> torch.Tensor:
        """``(B, 1, S, C)`` caption embeddings for ``batch`` rows; S and C must be the DiT's (300 Gemma-2 tokens)."""
        config = self.transformer.config
        S, C = config.model_max_length, config.caption_channels
        if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point() or embeds.dim() not in (3, 4):
            got = (f"{embeds.dtype} {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor)
                   else type(embeds).__name__)
            raise TypeError(f"{name} must be a float tensor (B, {S}, {C}), got {got}.")
        if embeds.dim() == 3:
            embeds = embeds[:, None]
        if tuple(embeds.shape[1:]) != (1, S, C):
            raise ValueError(f"{name} must have shape (B, {S}, {C}) for this model ({S} caption tokens of {C} "
                             f"channels, as Jodi Text Encode gives), got {tuple(embeds.shape)}.")
        _check_finite(name, embeds)
        return _batch_rows(name, embeds, batch)

    @staticmethod
    def _mask_rows(mask, tokens: int, batch: int) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.shape[-1] != tokens:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"prompt_mask must be (B, {tokens}) like the prompt embeddings, got {got}.")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("prompt_mask must hold only 0 (padding) and 1 (token).")
        return _batch_rows("prompt_mask", mask.long().reshape(-1, tokens), batch)

    @torch.no_grad()
    def sample(
        self,
        roles,
        clean_x: torch.Tensor,
        noise: torch.Tensor,
        *,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_mask: Optional[torch.Tensor] = None,
        negative_embeds: Optional[torch.Tensor] = None,
        steps: int = 20,
        cfg_scale: float = 4.5,
        flow_shift: float = 3.0,
        sampler: str = "dpmpp_2m",
        callback: Optional[StepCallback] = None,
        should_stop: Optional[Callable[[], bool]] = None,
    ) -> torch.Tensor:
        """Denoise ``noise (B, 8, C, h, w)``; returns the final latents with role-1 slots replaced by ``clean_x``.
        ``roles``: user roles or the run's :class:`RolePlan`."""
        B = noise.shape[0]
        plan = plan_roles(roles, batch=B, has_prompt=prompt_embeds is not None, cfg_scale=cfg_scale)
        device, dtype = _module_device_dtype(self.transformer)
        model = self.transformer
        use_cfg = plan.use_cfg
        if prompt_embeds is not None:
            prompt_embeds = self._caption_rows("prompt_embeds", prompt_embeds, B)
            if prompt_mask is None:
                prompt_mask = torch.ones(B, prompt_embeds.shape[-2], dtype=torch.long)
            prompt_mask = self._mask_rows(prompt_mask, prompt_embeds.shape[-2], B)
        if use_cfg:
            if negative_embeds is None:
                null = model.y_embedder.y_embedding.detach()
                negative_embeds = null[None, None].expand(B, 1, *null.shape)
            else:
                negative_embeds = self._caption_rows("negative_embeds", negative_embeds, B)
            # [uncond, cond]; the unconditional half uses the prompt's mask, as the reference does.
            y = torch.cat([negative_embeds.to(device, dtype), prompt_embeds.to(device, dtype)])
            mask = torch.cat([prompt_mask, prompt_mask]).to(device)  # prepare tiles the roles the same way
        else:
            y = None if prompt_embeds is None or plan.caption_dropped else prompt_embeds.to(device, dtype)
            mask = None if y is None else prompt_mask.to(device)
        ctx = model.prepare(plan, y, mask)
        clean = clean_x.to(device=device, dtype=torch.float32)
        clean_model = torch.cat([clean, clean]) if use_cfg else clean

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x, x]) if use_cfg else x
            timestep = (t * 1000).expand(x_in.shape[0]).to(torch.float32)
            v = model.forward_prepared(x_in, timestep, ctx, clean_x=clean_model).float()
            if use_cfg:
                v_uncond, v_cond = v.chunk(2)
                return cfg_velocity(v_uncond, v_cond, cfg_scale)
            return v

        timesteps = flow_timesteps(steps, flow_shift)
        x = get_sampler(sampler)(
            velocity, noise.to(device=device, dtype=torch.float32), timesteps, callback=callback, should_stop=should_stop
        )
        is_condition = (plan.roles == Role.CONDITION).to(device)[:, :, None, None, None]
        return torch.where(is_condition, clean, x)

    @torch.no_grad()
    def __call__(
        self,
        roles,
        height: int = 1024,
        width: int = 1024,
        *,
        conditions: Optional[Mapping[str, torch.Tensor]] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_mask: Optional[torch.Tensor] = None,
        negative_embeds: Optional[torch.Tensor] = None,
        steps: int = 20,
        cfg_scale: float = 4.5,
        flow_shift: float = 3.0,
        sampler: str = "dpmpp_2m",
        seed: int = 0,
        batch_size: int = 1,
        seeds: Optional[Sequence[int]] = None,
        snap_to_bucket: bool = True,
        callback: Optional[StepCallback] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        decode: bool = True,
        tiled_decode: bool = False,
        condition_fit: str = "crop",
        check_memory: bool = True,
    ) -> JodiResult:
        """``seeds``: one noise seed per sample (overrides ``seed``; the batch is ``len(seeds)``), for callers whose
        samples must not depend on how they are batched. ``condition_fit``: ``"crop"`` (the reference) or
        ``"stretch"`` (outputs line up with the condition images; see :func:`imaging.fit_condition`).
        ``check_memory``: refuse a run that cannot fit in the free memory before it starts (:meth:`check_memory`);
        hosts that check it themselves turn it off."""
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if not seeds or batch_size not in (1, len(seeds)):
                raise ValueError(f"seeds must hold one seed per sample; got {len(seeds)} for batch_size {batch_size}.")
            batch_size = len(seeds)
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}.")
        if not (cfg_scale >= 0 and cfg_scale == cfg_scale):
            raise ValueError(f"cfg_scale must be a non-negative number, got {cfg_scale!r}.")
        height, width = imaging.check_positive_size(height, width, "output")
        plan = plan_roles(roles)
        if plan.batch != 1 and batch_size not in (1, plan.batch):
            raise ValueError(f"Got {plan.batch} rows of roles but batch_size {batch_size}.")
        plan = plan_roles(plan, batch=batch_size if plan.batch == 1 else plan.batch,
                          has_prompt=prompt_embeds is not None, cfg_scale=cfg_scale)
        B = plan.batch
        work_h, work_w = self.working_size(height, width, snap_to_bucket)
        if check_memory:
            self.check_memory(B, plan, height, width, plan.use_cfg, decode=decode, tiled_decode=tiled_decode,
                              snap=snap_to_bucket)
        clean_x = self.prepare_conditions(plan.roles, conditions, work_h, work_w, fit=condition_fit)
        if seeds is not None and len(seeds) != B:
            raise ValueError(f"Got {len(seeds)} seeds for {B} rows of roles.")
        shape = tuple(clean_x.shape[1:])
        noise = self.make_noise(B, shape, seed) if seeds is None else self.noise_from_seeds(seeds, shape)
        latents = self.sample(
            plan,
            clean_x,
            noise,
            prompt_embeds=prompt_embeds,
            prompt_mask=prompt_mask,
            negative_embeds=negative_embeds,
            steps=steps,
            cfg_scale=cfg_scale,
            flow_shift=flow_shift,
            sampler=sampler,
            callback=callback,
            should_stop=should_stop,
        ).float()
        result = JodiResult(latents=latents.cpu(), roles=plan.roles, height=height, width=width)
        if decode:
            result.images, result.seg_index = self.decode_latents(
                latents, plan.roles, height, width, tiled=tiled_decode
            )
        return result
