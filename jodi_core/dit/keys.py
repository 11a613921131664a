"""The Jodi DiT's checkpoint keys: recognising them, the official checkpoint's extra key, and reading the
:class:`~jodi_core.dit.model.JodiConfig` from key names, shapes and a file's metadata.

:class:`~jodi_core.dit.model.JodiTransformer` uses the reference's key names, so a state dict loads as it is once
the keys below are dropped. Model classes are imported on use: this module stays cheap to import for the loaders.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import TYPE_CHECKING, Mapping

import torch

from ..checkpoint import CheckpointError, read_metadata

if TYPE_CHECKING:  # pragma: no cover
    from .model import JodiConfig

__all__ = ["SIGNATURE_KEYS", "is_jodi_state_dict", "model_keys", "infer_jodi_config", "stored_jodi_settings"]

# Keys only a Jodi DiT has (Sana has one x_embedder and no role embedding).
SIGNATURE_KEYS = ("role_embedder.weight", "x_embedders.0.proj.weight")
# The reference's fixed sin-cos table, which older checkpoints persist; JodiTransformer computes it per latent grid.
OFFICIAL_ONLY_KEYS = ("pos_embed",)

# Cross-attention heads are invisible in the weights' shapes; known hidden sizes map to their head count
# (Sana/Jodi 1.6B and Sana 4.8B: 2240 -> 20 heads of 112; Sana 0.6B: 1152 -> 16 heads of 72).
KNOWN_CROSS_ATTENTION_HEADS = {2240: 20, 1152: 16}

# JodiConfig fields that shapes cannot tell; our own training writes them into the safetensors metadata.
SETTINGS_NOT_IN_SHAPES = ("base_size", "num_heads", "linear_head_dim", "pe_interpolation", "use_pe",
                          "y_norm_scale_factor")


def is_jodi_state_dict(sd: Mapping[str, object]) -> bool:
    return all(k in sd for k in SIGNATURE_KEYS)


def model_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with the keys JodiTransformer has no parameter for (:data:`OFFICIAL_ONLY_KEYS`) left out."""
    return {k: v for k, v in sd.items() if k not in OFFICIAL_ONLY_KEYS}


def infer_jodi_config(sd: Mapping[str, torch.Tensor], **overrides) -> "JodiConfig":
    """Infer the architecture from a state dict with the reference key names.

    Read from shapes: hidden_size, depth, num_domains, caption_channels, model_max_length, in_channels,
    patch_size and the MLP width. Not visible in shapes, so taken from ``overrides`` or defaults:
    ``num_heads`` (cross-attention; ``KNOWN_CROSS_ATTENTION_HEADS`` for known widths, otherwise
    ``hidden_size // linear_head_dim``), ``linear_head_dim`` (32), ``base_size`` (32), ``pe_interpolation``,
    ``use_pe`` and ``y_norm_scale_factor`` (the last only matters for initialisation).
    """
    from .model import JodiConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"Not a Jodi DiT state dict: the key {key!r} is missing.")
        return tuple(sd[key].shape)

    hidden = shape("domain_embedding")[1]
    num_domains = shape("domain_embedding")[0]
    embedders = {int(m.group(1)) for k in sd if (m := re.match(r"x_embedders\.(\d+)\.proj\.weight$", k))}
    if embedders != set(range(num_domains)):
        raise ValueError(
            f"domain_embedding has {num_domains} domains but x_embedders cover {sorted(embedders)}."
        )
    out_c, in_channels, patch, patch_w = shape("x_embedders.0.proj.weight")
    if out_c != hidden or patch != patch_w:
        raise ValueError(f"x_embedders.0.proj.weight has shape {(out_c, in_channels, patch, patch_w)}; "
                         f"expected ({hidden}, C, p, p).")
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.scale_shift_table$", k))})
    if depth == 0:
        raise ValueError("Not a Jodi DiT state dict: no blocks.{i}.scale_shift_table keys.")
    mlp_hidden = shape("blocks.0.mlp.point_conv.conv.weight")[1]
    ratio = mlp_hidden / hidden
    if int(hidden * ratio) != mlp_hidden:  # keep int(hidden * ratio) == mlp_hidden despite float rounding
        ratio = (mlp_hidden + 0.5) / hidden
    fields = dict(
        hidden_size=hidden,
        depth=depth,
        caption_channels=shape("y_embedder.y_proj.fc1.weight")[1],
        model_max_length=shape("y_embedder.y_embedding")[0],
        in_channels=in_channels,
        patch_size=patch,
        mlp_ratio=ratio,
        num_domains=num_domains,
    )
    final_out = shape("final_layers.0.linear.weight")[0]
    if final_out != patch * patch * in_channels:
        raise ValueError(
            f"final_layers.0.linear.weight outputs {final_out} channels; expected patch^2 * in_channels = "
            f"{patch * patch * in_channels}."
        )
    head_dim = overrides.get("linear_head_dim", JodiConfig.linear_head_dim)
    fields["num_heads"] = KNOWN_CROSS_ATTENTION_HEADS.get(hidden, max(1, hidden // head_dim))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(JodiConfig)}
    if unknown:
        raise ValueError(f"Unknown JodiConfig fields in overrides: {sorted(unknown)}.")
    fields.update(overrides)
    return JodiConfig(**fields).validate()


def stored_jodi_settings(path: "str | os.PathLike") -> dict:
    """The DiT settings that tensor shapes cannot tell (``base_size``, head counts, ...), from the file's metadata;
    empty for files without it (the released checkpoints)."""
    raw = read_metadata(path).get("config")
    if not raw:
        return {}
    try:
        stored = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{os.path.basename(str(path))}: its 'config' metadata is not valid JSON ({e}).") from e
    if not isinstance(stored, dict):
        return {}
    return {k: stored[k] for k in SETTINGS_NOT_IN_SHAPES if k in stored}
