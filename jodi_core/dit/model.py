"""The Jodi diffusion transformer (arXiv 2505.19084): one linear DiT that denoises 8 domains jointly.

The model takes a latent stack ``x (N, 8, 32, h, w)`` (DC-AE f32c32 latents of image, lineart, edge, depth, normal,
albedo, segmentation, openpose), a role per domain (0 generate, 1 condition, 2 ignore), the timestep ``1000 * t`` and
a Gemma-2 caption embedding, and predicts the rectified-flow velocity ``noise - x0`` of every domain.

Two entry points:
- ``forward(x, timestep, y, role, mask, clean_x)`` reproduces the reference ``Jodi.forward`` call, CFG tiling and
  garbage outputs of role-1/role-2 slots included.
- ``prepare(role, y, mask)`` once per sampling run, then ``forward_prepared(x, timestep, ctx)`` per step: the caption
  projection and the per-block caption K/V are computed once, domains ignored in every row are dropped from the token
  sequence, and final layers run only for generated domains. Non-ignored slots equal ``forward`` up to summation order.

Deliberate differences from the reference (each tested):
- the positional embedding is computed for the actual (h, w) grid (the reference caches it by token count only and
  reuses a stale embedding when a grid follows its transpose);
- ``mask=None`` means every caption token is valid (the reference raises without xformers);
- a 4-D ``(B, 1, 1, S)`` mask also works when the batch is CFG-doubled (the reference crashes there);
- linear attention accumulates in float32 for every input dtype (the reference rounds its matmuls to bf16 in bf16).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn as nn

from .attention import AttentionSetting
from ..domains import Role, RolePlan
from .layers import (
    CAPTION_MASK_BIAS,
    CaptionEmbedder,
    FinalLayer,
    JodiBlock,
    PatchEmbed,
    RMSNorm,
    RoleEmbedding,
    TimestepEmbedder,
    sincos_pos_embed_2d,
)
from .keys import infer_jodi_config

# What ``attention_backend="auto"`` means for the DiT: the Triton kernels (linear attention and the fused ops) on CUDA
# tensors, where they are faster and accumulate in float32; the torch code elsewhere.
AUTO_ATTENTION = "triton"


@dataclass
class JodiConfig:
    """Architecture of a Jodi DiT; field names follow the reference config.

    ``base_size`` (= reference ``input_size / patch_size``) sets the span of the positional embedding; it is not
    stored in checkpoints (32 for the released 1024 px model).
    """

    hidden_size: int = 2240
    depth: int = 20
    num_heads: int = 20
    caption_channels: int = 2304
    in_channels: int = 32
    patch_size: int = 1
    mlp_ratio: float = 2.5
    linear_head_dim: int = 32
    num_domains: int = 8
    model_max_length: int = 300
    base_size: int = 32
    pe_interpolation: float = 1.0
    y_norm_scale_factor: float = 0.01
    use_pe: bool = True

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def validate(self) -> "JodiConfig":
        for name in ("hidden_size", "depth", "num_heads", "caption_channels", "in_channels", "patch_size",
                     "linear_head_dim", "num_domains", "model_max_length", "base_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"JodiConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("mlp_ratio", "pe_interpolation"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"JodiConfig.{name} must be a positive number, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads} (cross-attention)."
            )
        if self.hidden_size % self.linear_head_dim:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by linear_head_dim {self.linear_head_dim}."
            )
        if self.use_pe and self.hidden_size % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by 4 for the 2-D positional embedding."
            )
        if self.mlp_hidden_size <= 0:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP for hidden_size {self.hidden_size}.")
        return self

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides) -> "JodiConfig":
        """The architecture of a state dict with the reference keys (:func:`.keys.infer_jodi_config`)."""
        return infer_jodi_config(sd, **overrides)


# Jodi_1600M_P1_D20: the released model (configs/inference.yaml), 1024 px base resolution.
JODI_1600M_P1_D20 = JodiConfig(hidden_size=2240, depth=20, num_heads=20, caption_channels=2304, base_size=32)


@dataclass
class JodiContext:
    """Per-sampling-run state computed by ``JodiTransformer.prepare``; constant across denoising steps.

    ``active`` lists the domains that take part in the token sequence, ``generated`` those whose output is computed
    (role 0 in some row). Tensors over domains are indexed by position in ``active``.
    """

    rows: int
    role: torch.Tensor  # (N, L) int64, all domains
    active: tuple[int, ...]
    generated: tuple[int, ...]
    r: torch.Tensor  # (N, La, C) role + domain embedding of active domains
    r0: torch.Tensor  # (N, La, 6, C) its adaLN projection
    condition: Optional[torch.Tensor]  # (N, La) bool, role 1; None if no active slot is a condition
    ignore: Optional[torch.Tensor]  # (N, La) bool, role 2; None if no active slot is ignored
    caption_kv: list  # per block: (K, V), each (N, heads, S, head_dim)
    caption_bias: Optional[torch.Tensor]  # (N, 1, 1, S) additive mask bias; None when every token is valid
    y_tokens: torch.Tensor  # (N, S, C) projected, normalised caption


class JodiTransformer(nn.Module):
    """Jodi DiT. Submodule names equal the reference state-dict keys (``pos_embed`` is computed, never stored).

    Args:
        config: the architecture (default: the released ``JODI_1600M_P1_D20``).
        attention_backend: ``"auto" | "triton" | "torch"`` (or a name registered in ``jodi_core.dit.attention``); also
            a property that may be set at any time, resolved then into ``self.attention``, which the blocks run.
            ``auto`` (:data:`AUTO_ATTENTION`) and ``triton`` use the Triton kernels on CUDA (linear attention,
            LayerNorm+modulate, SiLU+depthwise-conv+GLU, gated residual) and fall back to torch where they cannot
            run; ``torch`` never uses them.
        dtype, device, operations: as in ComfyUI's ``comfy/ldm`` models; ``operations`` supplies Linear/Conv2d
            (default ``torch.nn``). On the meta device no weights are initialised.

    ``check_inputs`` (attribute, default True) enables the value checks (NaN/inf, role range), which cost one host
    synchronisation per call.
    """

    attention_backend = AttentionSetting(auto=AUTO_ATTENTION)

    def __init__(
        self,
        config: Optional[JodiConfig] = None,
        *,
        attention_backend: str = "auto",
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        config = dataclasses.replace(config or JODI_1600M_P1_D20).validate()
        self.config = config
        self.attention_backend = attention_backend
        self.check_inputs = True  # value checks (NaN, role range) cost one host sync per call
        operations = operations or nn
        kw = dict(dtype=dtype, device=device, operations=operations)
        C, L = config.hidden_size, config.num_domains

        self.x_embedders = nn.ModuleList(
            PatchEmbed(config.patch_size, config.in_channels, C, **kw) for _ in range(L)
        )
        self.t_embedder = TimestepEmbedder(C, **kw)
        self.t_block = nn.Sequential(nn.SiLU(), operations.Linear(C, 6 * C, bias=True, dtype=dtype, device=device))
        self.y_embedder = CaptionEmbedder(config.caption_channels, C, config.model_max_length, **kw)
        self.attention_y_norm = RMSNorm(C, scale_factor=config.y_norm_scale_factor, dtype=dtype, device=device)
        self.role_embedder = RoleEmbedding(len(Role), C, dtype=dtype, device=device)
        self.role_block = nn.Sequential(nn.SiLU(), operations.Linear(C, 6 * C, bias=True, dtype=dtype, device=device))
        self.domain_embedding = nn.Parameter(torch.empty(L, C, dtype=dtype, device=device))
        self.blocks = nn.ModuleList(
            JodiBlock(C, config.num_heads, config.mlp_hidden_size, config.linear_head_dim, **kw)
            for _ in range(config.depth)
        )
        self.final_layers = nn.ModuleList(
            FinalLayer(C, config.patch_size, config.out_channels, **kw) for _ in range(L)
        )
        self._pos_cache: dict = {}
        if not self.domain_embedding.is_meta:  # on meta (checkpoint loading) random init would be wasted work
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Random init of the tensors that the Linear/Conv layers do not initialise themselves (tests, demos)."""
        C, Cc = self.config.hidden_size, self.config.caption_channels
        for block in self.blocks:
            block.scale_shift_table.normal_(std=C**-0.5)
        for layer in self.final_layers:
            layer.scale_shift_table.normal_(std=C**-0.5)
        self.domain_embedding.normal_(std=0.02)
        self.role_embedder.weight.normal_(std=1.0)
        self.y_embedder.y_embedding.normal_(std=Cc**-0.5)

    # -----------------------------------------------------------------------------------------------------------------
    # Helpers
    # -----------------------------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.domain_embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.domain_embedding.device

    def pos_embed(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Positional embedding ``(h*w, C)`` for an h x w token grid, cached per (h, w, device, dtype)."""
        key = (h, w, str(device), dtype)
        pe = self._pos_cache.get(key)
        if pe is None:
            cfg = self.config
            pe = sincos_pos_embed_2d(cfg.hidden_size, h, w, cfg.base_size, cfg.pe_interpolation)
            pe = pe.to(device=device, dtype=dtype)
            if len(self._pos_cache) >= 16:
                self._pos_cache.clear()
            self._pos_cache[key] = pe
        return pe

    def _check_role(self, role: torch.Tensor) -> torch.Tensor:
        L = self.config.num_domains
        if not isinstance(role, torch.Tensor):
            raise TypeError(f"role must be a tensor of shape (B, {L}), got {type(role).__name__}.")
        if role.dim() != 2 or role.shape[1] != L:
            raise ValueError(f"role must have shape (B, {L}) (one role per domain), got {tuple(role.shape)}.")
        if role.is_floating_point() or role.is_complex() or role.dtype == torch.bool:
            raise TypeError(f"role must be an integer tensor (0 generate, 1 condition, 2 ignore), got {role.dtype}.")
        if self.check_inputs:
            bad = (role < 0) | (role > 2)
            if bool(bad.any()):
                raise ValueError(
                    f"role value {int(role[bad][0])} is outside {{0, 1, 2}} (0 generate, 1 condition, 2 ignore)."
                )
        return role.long()

    def _check_finite(self, name: str, t: Optional[torch.Tensor]) -> None:
        if self.check_inputs and t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values.")

    def _check_mask(self, mask: Optional[torch.Tensor], rows: int, role_rows: int) -> Optional[torch.Tensor]:
        """Return the caption mask as ``(rows, S)`` bool, tiling a mask given for the un-doubled CFG batch."""
        if mask is None:
            return None
        S = self.config.model_max_length
        if mask.dim() == 4 and mask.shape[1:3] == (1, 1):
            mask = mask[:, 0, 0]  # training layout (B, 1, 1, S)
        if mask.dim() != 2 or mask.shape[1] != S:
            raise ValueError(f"mask must have shape (B, {S}) or (B, 1, 1, {S}), got {tuple(mask.shape)}.")
        if mask.shape[0] != rows:
            if 2 * mask.shape[0] == rows:
                mask = mask.repeat(2, 1)  # same tiling as role under CFG
            elif mask.shape[0] == 1:
                mask = mask.expand(rows, S)
            else:
                raise ValueError(f"mask has {mask.shape[0]} rows for a batch of {rows} (or {role_rows} roles).")
        if mask.is_floating_point():
            self._check_finite("mask", mask)
        return mask != 0

    def _check_caption(self, y: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
        if y is None:
            return None
        S, Cc = self.config.model_max_length, self.config.caption_channels
        if y.dim() == 4 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 3 or y.shape[1:] != (S, Cc):
            raise ValueError(f"y must have shape (B, 1, {S}, {Cc}) or (B, {S}, {Cc}), got {tuple(y.shape)}.")
        if y.shape[0] != rows:
            raise ValueError(f"y has {y.shape[0]} rows but the batch has {rows}.")
        self._check_finite("y", y)
        return y

    # -----------------------------------------------------------------------------------------------------------------
    # Per-run preparation
    # -----------------------------------------------------------------------------------------------------------------

    def prepare(
        self,
        role: "RolePlan | torch.Tensor",
        y: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        *,
        prune: bool = True,
    ) -> JodiContext:
        """Compute everything that does not depend on x or the timestep.

        ``role``: the run's :class:`RolePlan`, or a ``(N, 8)`` role tensor (planned here); ``y (N, 1, S, Cc)`` (or
        ``(N, S, Cc)``, or ``None`` for the stored null caption with every token valid); ``mask (N, S)`` or
        ``(N, 1, 1, S)``, ``None`` = all valid. If ``y`` has twice the rows of the roles (a CFG batch), roles and mask
        are tiled ``[r0..rR-1, r0..rR-1]`` as the reference does.
        With ``prune`` the domains ignored in every row are dropped from the sequence, and caption tokens padded in
        every row are dropped from the end (their softmax weight is exactly 0 in the reference too).
        """
        plan = role if isinstance(role, RolePlan) else RolePlan.from_table(self._check_role(role))
        role, drop = plan.roles, plan.drops_caption
        rows = role.shape[0] if y is None else y.shape[0]
        if rows != role.shape[0]:
            if rows != 2 * role.shape[0]:
                raise ValueError(f"y has {rows} rows but role has {role.shape[0]} (expected equal, or twice for CFG).")
            role, drop = role.repeat(2, 1), drop.repeat(2)
        y = self._check_caption(y, rows)
        mask = self._check_mask(mask, rows, role.shape[0])
        device, dtype = self.device, self.dtype
        role = role.to(device)
        L = self.config.num_domains

        active = plan.active if prune else tuple(range(L))
        if not active:
            raise ValueError("Every domain is ignored in every row; at least one domain must take part.")
        generated = plan.generated if prune else active
        idx = torch.tensor(active, device=device)
        role_a = role.index_select(1, idx)  # (N, La)

        r = self.role_embedder(role_a) + self.domain_embedding.index_select(0, idx)[None]  # (N, La, C)
        r0 = self.role_block(r).unflatten(-1, (6, -1))  # (N, La, 6, C)
        condition = role_a == Role.CONDITION
        ignore = role_a == Role.IGNORE
        condition = condition if bool(condition.any()) else None
        ignore = ignore if bool(ignore.any()) else None

        # Caption: the plan's caption-dropping rows take the null caption with every token valid.
        if y is None:
            y = self.y_embedder.y_embedding.to(dtype)[None].expand(rows, -1, -1)
            drop, mask = None, None
        else:
            y = y.to(device=device, dtype=dtype)
            drop = drop.to(device)
            if mask is not None:
                mask = mask.to(device) | drop[:, None]
        y_tokens = self.attention_y_norm(self.y_embedder(y, drop))  # (N, S, C)
        caption_bias = None
        if mask is not None and not bool(mask.all()):
            if prune and bool(mask.any(1).all()):
                # Trailing tokens padded in every row get weight exp(-10000) == 0 in the softmax: drop them.
                # (A row with no valid token attends uniformly to all S tokens, so then nothing is dropped.)
                used = int(mask.any(0).nonzero().max()) + 1
                mask, y_tokens = mask[:, :used], y_tokens[:, :used]
            if not bool(mask.all()):
                caption_bias = ((~mask).to(dtype) * CAPTION_MASK_BIAS)[:, None, None, :]  # (N, 1, 1, S)
        caption_kv = [block.cross_attn.caption_kv(y_tokens) for block in self.blocks]
        return JodiContext(
            rows=rows, role=role, active=active, generated=generated, r=r, r0=r0, condition=condition,
            ignore=ignore, caption_kv=caption_kv, caption_bias=caption_bias, y_tokens=y_tokens,
        )

    # -----------------------------------------------------------------------------------------------------------------
    # Forward
    # -----------------------------------------------------------------------------------------------------------------

    def _check_latents(self, x: torch.Tensor, rows: int, clean_x: Optional[torch.Tensor]):
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(
                f"x must have shape (B, {cfg.num_domains}, {cfg.in_channels}, h, w), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}."
            )
        N, L, Cin, H, W = x.shape
        if L != cfg.num_domains or Cin != cfg.in_channels:
            raise ValueError(
                f"x must have {cfg.num_domains} domains of {cfg.in_channels} channels, got shape {tuple(x.shape)}."
            )
        if H % cfg.patch_size or W % cfg.patch_size or H == 0 or W == 0:
            raise ValueError(f"Latent size {H}x{W} must be a positive multiple of the patch size {cfg.patch_size}.")
        if N != rows:
            raise ValueError(f"x has {N} rows but the roles/captions were given for {rows}.")
        self._check_finite("x", x)
        if clean_x is not None:
            if clean_x.dim() != 5 or clean_x.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"clean_x has shape {tuple(clean_x.shape)}; its latent size must match x {tuple(x.shape)}."
                )
            if clean_x.shape[0] != N:
                if 2 * clean_x.shape[0] != N:
                    raise ValueError(f"clean_x has {clean_x.shape[0]} rows for a batch of {N}.")
                clean_x = clean_x.repeat(2, 1, 1, 1, 1)
        return clean_x

    def _check_timestep(self, timestep, rows: int) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=self.device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(rows)
        if t.dim() != 1 or t.shape[0] != rows:
            raise ValueError(f"timestep must have shape ({rows},) or be a scalar, got {tuple(t.shape)}.")
        self._check_finite("timestep", t.float())
        return t

    def forward_prepared(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        ctx: JodiContext,
        clean_x: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One denoising evaluation with a prepared context: ``x (N, 8, 32, h, w)`` -> velocity ``(N, 8, 32, h, w)``.

        Slots of domains outside ``ctx.generated`` are returned as zeros.
        """
        clean_x = self._check_latents(x, ctx.rows, clean_x)
        if ctx.condition is not None:
            if clean_x is None:
                raise ValueError("Some domains have role 1 (condition) but clean_x was not given.")
            cond_idx = [d for i, d in enumerate(ctx.active) if bool(ctx.condition[:, i].any())]
            self._check_finite("clean_x (condition slots)", clean_x[:, cond_idx])
        t = self._check_timestep(timestep, ctx.rows)
        return self._run(x, t, ctx, clean_x)

    def _run(self, x: torch.Tensor, timestep: torch.Tensor, ctx: JodiContext, clean_x: Optional[torch.Tensor]):
        cfg = self.config
        dtype, device = self.dtype, self.device
        N, L, Cin, H, W = x.shape
        p = cfg.patch_size
        h, w = H // p, W // p
        T, C = h * w, cfg.hidden_size
        active = ctx.active
        La = len(active)
        idx = torch.tensor(active, device=device)

        x_a = x.to(device=device, dtype=dtype).index_select(1, idx)  # (N, La, Cin, H, W)
        if ctx.condition is not None:
            clean_a = clean_x.to(device=device, dtype=dtype).index_select(1, idx)
            x_a = torch.where(ctx.condition[:, :, None, None, None], clean_a, x_a)

        tokens = torch.stack([self.x_embedders[d](x_a[:, i]) for i, d in enumerate(active)], dim=1)  # (N, La, T, C)
        if cfg.use_pe:
            tokens = tokens + self.pos_embed(h, w, device, dtype)
        key_mask = None
        if ctx.ignore is not None:
            tokens = tokens.masked_fill(ctx.ignore[:, :, None, None], 0.0)
            key_mask = (~ctx.ignore)[:, :, None].expand(N, La, T).reshape(N, La * T)

        # The timestep is rounded to the model dtype first (the reference casts it; in bf16 999.67 -> 1000).
        t = self.t_embedder(timestep.to(dtype), dtype)  # (N, C)
        t0 = self.t_block(t).unflatten(-1, (6, C))  # (N, 6, C)
        cond = t0[:, None] + ctx.r0  # (N, La, 6, C)

        for block, kv in zip(self.blocks, ctx.caption_kv):
            tokens = block(tokens, cond, (h, w), key_mask, kv, ctx.caption_bias, self.attention)

        out = x.new_zeros((N, L, cfg.out_channels, H, W), dtype=dtype, device=device)
        final_cond = t[:, None] + ctx.r  # (N, La, C): raw t + r, not the projections
        for i, d in enumerate(active):
            if d not in ctx.generated:
                continue
            o = self.final_layers[d](tokens[:, i], final_cond[:, i])  # (N, T, p*p*Cout)
            out[:, d] = self._unpatchify(o, h, w)
        return out

    def _unpatchify(self, o: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.out_channels
        N = o.shape[0]
        if p == 1:
            return o.transpose(1, 2).reshape(N, c, h, w)
        o = o.reshape(N, h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", o).reshape(N, c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: Optional[torch.Tensor],
        role: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        clean_x: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The reference call ``model(x, timestep, y, role=role, mask=mask, clean_x=clean_x)``; all slots computed.

        ``x (N, 8, 32, h, w)``, ``timestep (N,)`` = 1000 t, ``y (N, 1, S, Cc)`` or None (null caption),
        ``role (R, 8)`` and ``clean_x (R, 8, 32, h, w)`` with R = N, or R = N / 2 for a CFG batch (tiled).
        """
        role = self._check_role(role)
        N = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 0
        if role.shape[0] != N:
            if 2 * role.shape[0] != N:
                raise ValueError(f"role has {role.shape[0]} rows for a batch of {N} (expected {N} or {N // 2}).")
            role = role.repeat(2, 1)  # CFG: [r0..rR-1, r0..rR-1]
        ctx = self.prepare(role, y, mask, prune=False)
        return self.forward_prepared(x, timestep, ctx, clean_x)
