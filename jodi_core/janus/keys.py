"""Janus state-dict key layouts: the original deepseek one (which :class:`~jodi_core.janus.model.JanusModel` uses) and
the HF-converted one of ``JanusForConditionalGeneration``, and the conversion between them. The config that shapes
tell is read in :mod:`.config`.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import torch

from ..checkpoint import CheckpointError

log = logging.getLogger(__name__)

__all__ = ["original_to_hf", "hf_to_original", "detect_layout", "to_original_layout"]

# Ours is the original layout; these tables rename whole-key prefixes/segments between the two.
_VT = "vision_model.vision_tower."
_HF_V = "model.vision_model."

# (original prefix, HF prefix); ``{i}`` is a block/level index. First match wins, so specific rules come first.
_PREFIX_RULES = (
    (_VT + "patch_embed.proj.", _HF_V + "embeddings.patch_embedding."),
    (_VT + "norm.", _HF_V + "post_layernorm."),
    (_VT + "blocks.{i}.norm1.", _HF_V + "encoder.layers.{i}.layer_norm1."),
    (_VT + "blocks.{i}.norm2.", _HF_V + "encoder.layers.{i}.layer_norm2."),
    (_VT + "blocks.{i}.attn.proj.", _HF_V + "encoder.layers.{i}.self_attn.projection_layer."),
    (_VT + "blocks.{i}.mlp.", _HF_V + "encoder.layers.{i}.mlp."),
    ("aligner.layers.0.", "model.aligner.fc1."),
    ("aligner.layers.2.", "model.aligner.hidden_layers.0."),
    ("gen_aligner.layers.0.", "model.generation_aligner.fc1."),
    ("gen_aligner.layers.2.", "model.generation_aligner.hidden_layers.0."),
    ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
    ("gen_head.vision_head.", "model.generation_head.vision_head."),
    ("gen_embed.", "model.generation_embeddings."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    # VQ model: the decoder's conv_blocks[0] is the lowest resolution in both layouts (HF keeps the list index).
    ("gen_vision_model.decoder.conv_blocks.{i}.res.", "model.vqmodel.decoder.up.{i}.block."),
    ("gen_vision_model.decoder.conv_blocks.{i}.", "model.vqmodel.decoder.up.{i}."),
    ("gen_vision_model.encoder.conv_blocks.{i}.res.", "model.vqmodel.encoder.down.{i}.block."),
    ("gen_vision_model.encoder.conv_blocks.{i}.", "model.vqmodel.encoder.down.{i}."),
    ("gen_vision_model.decoder.mid.0.", "model.vqmodel.decoder.mid.block_1."),
    ("gen_vision_model.decoder.mid.1.", "model.vqmodel.decoder.mid.attn_1."),
    ("gen_vision_model.decoder.mid.2.", "model.vqmodel.decoder.mid.block_2."),
    ("gen_vision_model.encoder.mid.0.", "model.vqmodel.encoder.mid.block_1."),
    ("gen_vision_model.encoder.mid.1.", "model.vqmodel.encoder.mid.attn_1."),
    ("gen_vision_model.encoder.mid.2.", "model.vqmodel.encoder.mid.block_2."),
    ("gen_vision_model.", "model.vqmodel."),
)
_DROPPED_ORIGINAL = (
    _VT + "attn_pool.",  # MAP head, unused by Janus (HF drops it too)
    "gen_vision_model.encoder.",  # image -> codes, not needed to generate
    "gen_vision_model.quant_conv.",
    "gen_vision_model.quantize.codebook_used",  # training statistics
)


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_TO_HF = [(_template_regex(o), h) for o, h in _PREFIX_RULES]
_TO_ORIGINAL = [(_template_regex(h), o) for o, h in _PREFIX_RULES]


def _rename(key: str, rules, what: str) -> str:
    for rx, template in rules:
        m = rx.match(key)
        if m:
            prefix = template.replace("{i}", m.group("i")) if "i" in rx.groupindex else template
            return prefix + key[m.end() :]
    raise CheckpointError(f"Unknown key in {what} Janus state dict: {key!r}")


def original_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout state dict to the HF ``JanusForConditionalGeneration`` layout (fused qkv split)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_VT + "attn_pool.") or key == "gen_vision_model.quantize.codebook_used":
            continue  # HF's conversion drops these too
        m = re.match(r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{_HF_V}encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(2)}"] = part.contiguous()
        elif key == _VT + "pos_embed":
            out[_HF_V + "embeddings.position_embedding.weight"] = value[0]  # (1, N, C) -> (N, C)
        else:
            out[_rename(key, _TO_HF, "an original")] = value
    return out


def hf_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF-converted Janus state dict to the original layout (q/k/v fused back into qkv)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif key == _HF_V + "embeddings.position_embedding.weight":
            out[_VT + "pos_embed"] = value[None]
        else:
            out[_rename(key, _TO_ORIGINAL, "an HF")] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"Vision layer {layer} has only {sorted(parts)} of the q/k/v {kind} tensors.")
        out[f"{_VT}blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str | None:
    """``"original"``, ``"hf"`` or None (not a Janus state dict)."""
    if "language_model.model.embed_tokens.weight" in sd:
        return "original"
    if "model.language_model.embed_tokens.weight" in sd:
        return "hf"
    return None


def to_original_layout(sd: dict[str, torch.Tensor], layout: str, *, name: str) -> dict[str, torch.Tensor]:
    """``sd`` (of ``layout``) in the original layout, without the tensors JanusModel has no use for."""
    if layout == "hf":
        if "lm_head.weight" not in sd:  # an export with tied embeddings
            log.info("%s has no lm_head.weight; using the tied input embeddings.", name)
            sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
        sd = hf_to_original(sd)
    # Older LLaMA exports also persist the rotary inv_freq buffer, which is recomputed here.
    for key in [k for k in sd if k.startswith(_DROPPED_ORIGINAL) or k.endswith("rotary_emb.inv_freq")]:
        del sd[key]
    return sd
