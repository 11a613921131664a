"""Janus / Janus-Pro configuration: one dataclass per part, presets, and inference from a state dict.

Sizes that are visible in tensor shapes (widths, depths, vocabularies, channel multipliers) are always read from the
weights; only what shapes cannot tell (attention head counts, RoPE theta, norm eps) comes from config.json, with the
values of the released checkpoints as fallbacks.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

# Head counts are not visible in weight shapes; these are the released models' values keyed by width.
_VISION_HEADS_BY_WIDTH = {1024: 16, 768: 12, 1152: 16}
_LM_HEADS_BY_HIDDEN = {2048: 16, 4096: 32}


@dataclass
class SigLIPConfig:
    """The understanding encoder: a timm-style SigLIP ViT without class token (Janus uses SigLIP-L/16 at 384)."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_hidden: int = 4096
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass
class LlamaConfig:
    """The language model. Missing fields of Janus' partial ``language_config`` take the LLaMA defaults below."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 16384

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class VQConfig:
    """The generation tokenizer's decoder (LlamaGen VQ-16): codes -> 8-dim L2-normalised codebook -> image."""

    codebook_size: int = 16384
    codebook_dim: int = 8
    z_channels: int = 256
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # the decoder uses num_res_blocks + 1 per level, as the reference does
    out_channels: int = 3

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class JanusConfig:
    vision: SigLIPConfig = field(default_factory=SigLIPConfig)
    language: LlamaConfig = field(default_factory=LlamaConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    gen_head_hidden: int = 2048  # gen_head: Linear(hidden, gen_head_hidden) -> GELU -> Linear(.., codebook_size)
    gen_grid: int = 24  # image tokens per side in generation (384 / 16)

    @property
    def gen_image_tokens(self) -> int:
        return self.gen_grid**2

    @property
    def gen_image_size(self) -> int:
        return self.gen_grid * self.vq.downsample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> "JanusConfig":
        v, lm = self.vision, self.language
        if v.width % v.num_heads:
            raise ValueError(f"Vision width {v.width} is not divisible by its {v.num_heads} attention heads.")
        if v.image_size % v.patch_size:
            raise ValueError(f"Vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}.")
        if lm.hidden_size % lm.num_heads:
            raise ValueError(f"LM hidden_size {lm.hidden_size} is not divisible by num_heads {lm.num_heads}.")
        if lm.num_heads % lm.num_kv_heads:
            raise ValueError(f"LM num_heads {lm.num_heads} is not a multiple of num_kv_heads {lm.num_kv_heads}.")
        if lm.head_dim % 2:
            raise ValueError(f"LM head_dim {lm.head_dim} must be even for rotary embeddings.")
        if any(self.vq.base_channels * m % 32 for m in self.vq.channel_mult):
            raise ValueError(
                f"VQ decoder widths (base {self.vq.base_channels} x {self.vq.channel_mult}) "
                "must be multiples of 32 (GroupNorm with 32 groups)."
            )
        return self


JANUS_PRO_1B = JanusConfig()
JANUS_1_3B = JanusConfig()
JANUS_PRO_7B = JanusConfig(
    language=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_layers=30, num_heads=32, num_kv_heads=32),
    gen_head_hidden=4096,
)
PRESETS = {"janus-pro-1b": JANUS_PRO_1B, "janus-1.3b": JANUS_1_3B, "janus-pro-7b": JANUS_PRO_7B}


# ---------------------------------------------------------------------------------------------------------------------
# Inference from weights (original key layout; HF checkpoints are renamed to it first, see loading.py)
# ---------------------------------------------------------------------------------------------------------------------


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"The Janus checkpoint lacks the tensor {key!r}, so its configuration cannot be read.")
    return tuple(sd[key].shape)


def config_from_state_dict(sd: Mapping[str, torch.Tensor], hints: Mapping[str, Any] | None = None) -> JanusConfig:
    """Build the configuration from tensor shapes (original key layout) plus ``hints`` for what shapes cannot show.

    ``hints`` keys (all optional): vision_heads, lm_heads, lm_kv_heads, rms_norm_eps, rope_theta,
    max_position_embeddings, layer_norm_eps.
    """
    hints = dict(hints or {})
    vt = "vision_model.vision_tower."
    width, _, patch, _ = _shape(sd, vt + "patch_embed.proj.weight")
    num_patches = _shape(sd, vt + "pos_embed")[1]
    grid = int(round(num_patches**0.5))
    if grid * grid != num_patches:
        raise ValueError(f"Vision pos_embed has {num_patches} positions, not a square grid.")
    vision = SigLIPConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        depth=_count(sd, re.escape(vt) + r"blocks\.(\d+)\."),
        num_heads=int(hints.get("vision_heads") or _VISION_HEADS_BY_WIDTH.get(width, max(width // 64, 1))),
        mlp_hidden=_shape(sd, vt + "blocks.0.mlp.fc1.weight")[0],
        layer_norm_eps=float(hints.get("layer_norm_eps") or 1e-6),
    )

    lm = "language_model.model."
    vocab, hidden = _shape(sd, lm + "embed_tokens.weight")
    heads = int(hints.get("lm_heads") or _LM_HEADS_BY_HIDDEN.get(hidden, max(hidden // 128, 1)))
    head_dim = hidden // heads
    kv_out = _shape(sd, lm + "layers.0.self_attn.k_proj.weight")[0]
    language = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_shape(sd, lm + "layers.0.mlp.gate_proj.weight")[0],
        num_layers=_count(sd, re.escape(lm) + r"layers\.(\d+)\."),
        num_heads=heads,
        num_kv_heads=int(hints.get("lm_kv_heads") or max(kv_out // head_dim, 1)),
        rms_norm_eps=float(hints.get("rms_norm_eps") or 1e-6),
        rope_theta=float(hints.get("rope_theta") or 10000.0),
        max_position_embeddings=int(hints.get("max_position_embeddings") or 16384),
    )

    gv = "gen_vision_model."
    codebook_size, codebook_dim = _shape(sd, gv + "quantize.embedding.weight")
    z_channels = _shape(sd, gv + "post_quant_conv.weight")[0]
    num_levels = _count(sd, re.escape(gv) + r"decoder\.conv_blocks\.(\d+)\.")
    if num_levels == 0:
        raise ValueError("The Janus checkpoint has no VQ decoder blocks (gen_vision_model.decoder.conv_blocks.*).")
    # conv_blocks[0] is the lowest resolution (largest multiplier); each level's output width is base * mult.
    outs = [_shape(sd, f"{gv}decoder.conv_blocks.{i}.res.0.conv1.weight")[0] for i in range(num_levels)]
    base = outs[-1]
    if any(o % base for o in outs):
        raise ValueError(f"VQ decoder level widths {outs} are not multiples of the last level's {base}.")
    vq = VQConfig(
        codebook_size=codebook_size,
        codebook_dim=codebook_dim,
        z_channels=z_channels,
        base_channels=base,
        channel_mult=tuple(o // base for o in reversed(outs)),
        num_res_blocks=_count(sd, re.escape(gv) + r"decoder\.conv_blocks\.0\.res\.(\d+)\.") - 1,
        out_channels=_shape(sd, gv + "decoder.conv_out.weight")[0],
    )
    cfg = JanusConfig(
        vision=vision,
        language=language,
        vq=vq,
        gen_head_hidden=_shape(sd, "gen_head.output_mlp_projector.weight")[0],
        gen_grid=int(hints.get("gen_grid") or vision.grid),
    )
    return cfg.validate()


def hints_from_config_json(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Pick what shapes cannot show out of an original (``multi_modality``) or HF (``janus``) config.json."""
    hints: dict[str, Any] = {}
    text = cfg.get("language_config") or cfg.get("text_config") or {}
    for ours, theirs in (
        ("lm_heads", "num_attention_heads"),
        ("lm_kv_heads", "num_key_value_heads"),
        ("rms_norm_eps", "rms_norm_eps"),
        ("rope_theta", "rope_theta"),
        ("max_position_embeddings", "max_position_embeddings"),
    ):
        if text.get(theirs) is not None:
            hints[ours] = text[theirs]
    rope_params = text.get("rope_parameters") or {}
    if "rope_theta" not in hints and rope_params.get("rope_theta") is not None:
        hints["rope_theta"] = rope_params["rope_theta"]
    scaling = text.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {scaling} is not supported by this Janus implementation.")

    vision = cfg.get("vision_config") or {}
    params = vision.get("params", vision)  # original: {"cls": ..., "params": {...}}; HF: flat
    heads = params.get("num_attention_heads") or params.get("num_heads")
    if heads:
        hints["vision_heads"] = heads
    if params.get("layer_norm_eps"):
        hints["layer_norm_eps"] = params["layer_norm_eps"]
    return hints
