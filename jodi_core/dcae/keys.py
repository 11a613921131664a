"""State-dict key formats of the DC-AE, the conversion between them, and the config that keys and shapes tell.

Two layouts of the same weights are in circulation:

- ``original``: the efficientvit ``DCAE`` keys of ``mit-han-lab/dc-ae-f32c32-sana-1.0`` (what Jodi loads), e.g.
  ``encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight``. :class:`~.model.DCAE` uses these names.
- ``diffusers``: ``AutoencoderDC`` of ``...-sana-1.0-diffusers``, e.g. ``encoder.down_blocks.3.0.attn.to_q.weight``.

The mapping is a table of key templates read in both directions. Two entries also reshape:

- the LiteMLA ``qkv`` 1x1 conv is split into thirds named ``to_q/to_k/to_v`` (2-D Linear weights). The thirds are
  *not* the queries, keys and values: the original layout is interleaved per head (``[q|k|v]`` of 32 channels each,
  96 per head), and diffusers re-concatenates the thirds before it splits heads, so a plain chunk/concat is exact;
- the attention output projection ``proj.conv`` (1x1 conv) becomes the Linear ``to_out``.

Model classes are imported on use: this module stays cheap to import for the loaders.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping

import torch

from ..checkpoint import read_metadata

if TYPE_CHECKING:  # pragma: no cover
    from .model import DCAEConfig

__all__ = [
    "detect_key_format",
    "original_to_diffusers",
    "diffusers_to_original",
    "original_keys",
    "infer_dcae_config",
    "stored_dcae_settings",
    "KEY_RULES",
]

# Placeholders in the templates: {s} stage, {i} op index inside a stage, {j} multi-scale branch, {p} weight|bias,
# {qkv} which third of a split qkv conv.
_PLACEHOLDERS = {"s": r"\d+", "i": r"\d+", "j": r"\d+", "p": r"weight|bias", "qkv": r"q|k|v"}


@dataclass(frozen=True)
class KeyRule:
    original: str
    diffusers: str
    kind: str = "rename"  # "rename" | "squeeze" (1x1 conv <-> Linear) | "qkv" (one conv <-> to_q/to_k/to_v)

    def pattern(self, side: str) -> re.Pattern:
        return _compile(self.original if side == "original" else self.diffusers)


@lru_cache(maxsize=None)
def _compile(template: str) -> re.Pattern:
    """A template such as ``encoder.stages.{s}.op_list.{i}.main.conv.{p}`` as a full-match regex with named groups."""
    regex = re.escape(template)
    for name, sub in _PLACEHOLDERS.items():
        regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>{sub})")
    return re.compile(regex + r"\Z")


def _block_rules(side: str, blocks: str) -> list[KeyRule]:
    """Rules for the ResBlock / EfficientViT ops inside ``{side}.stages`` (``{side}.{blocks}`` in diffusers)."""
    o = f"{side}.stages.{{s}}.op_list.{{i}}."
    d = f"{side}.{blocks}.{{s}}.{{i}}."
    return [
        # ResBlock: conv3x3 + SiLU, conv3x3 (no bias) + RMSNorm2d
        KeyRule(o + "main.conv1.conv.{p}", d + "conv1.{p}"),
        KeyRule(o + "main.conv2.conv.{p}", d + "conv2.{p}"),
        KeyRule(o + "main.conv2.norm.{p}", d + "norm.{p}"),
        # EfficientViT block, context half (LiteMLA)
        KeyRule(o + "context_module.main.qkv.conv.weight", d + "attn.to_{qkv}.weight", kind="qkv"),
        KeyRule(o + "context_module.main.aggreg.{j}.0.{p}", d + "attn.to_qkv_multiscale.{j}.proj_in.{p}"),
        KeyRule(o + "context_module.main.aggreg.{j}.1.{p}", d + "attn.to_qkv_multiscale.{j}.proj_out.{p}"),
        KeyRule(o + "context_module.main.proj.conv.weight", d + "attn.to_out.weight", kind="squeeze"),
        KeyRule(o + "context_module.main.proj.norm.{p}", d + "attn.norm_out.{p}"),
        # EfficientViT block, local half (GLUMBConv)
        KeyRule(o + "local_module.main.inverted_conv.conv.{p}", d + "conv_out.conv_inverted.{p}"),
        KeyRule(o + "local_module.main.depth_conv.conv.{p}", d + "conv_out.conv_depth.{p}"),
        KeyRule(o + "local_module.main.point_conv.conv.{p}", d + "conv_out.conv_point.{p}"),
        KeyRule(o + "local_module.main.point_conv.norm.{p}", d + "conv_out.norm.{p}"),
    ]


KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("encoder.project_in.conv.{p}", "encoder.conv_in.{p}"),
    *_block_rules("encoder", "down_blocks"),
    # strided 3x3 conv of the downsampling op (its pixel-unshuffle shortcut has no weights)
    KeyRule("encoder.stages.{s}.op_list.{i}.main.conv.{p}", "encoder.down_blocks.{s}.{i}.conv.{p}"),
    KeyRule("encoder.project_out.main.op_list.0.conv.{p}", "encoder.conv_out.{p}"),
    KeyRule("decoder.project_in.main.conv.{p}", "decoder.conv_in.{p}"),
    *_block_rules("decoder", "up_blocks"),
    # nearest-2x + 3x3 conv of the upsampling op
    KeyRule("decoder.stages.{s}.op_list.{i}.main.conv.conv.{p}", "decoder.up_blocks.{s}.{i}.conv.{p}"),
    KeyRule("decoder.project_out.op_list.0.{p}", "decoder.norm_out.{p}"),
    KeyRule("decoder.project_out.op_list.2.conv.{p}", "decoder.conv_out.{p}"),
)

_QKV_PARTS = ("q", "k", "v")


# Keys that tell the formats apart. diffusers' signature is shared by its SD VAEs (AutoencoderKL), so recognising a
# DC-AE among other checkpoints (jodi_core.loading.identify_checkpoint) also asks for an attention key.
SIGNATURE_KEYS = {
    "original": ("encoder.project_in.conv.weight", "decoder.project_in.main.conv.weight"),
    "diffusers": ("encoder.conv_in.weight", "decoder.conv_in.weight"),
}


def detect_key_format(sd: Mapping[str, object]) -> str | None:
    """``"original"``, ``"diffusers"`` or None (not a DC-AE state dict)."""
    for fmt, keys in SIGNATURE_KEYS.items():
        if all(k in sd for k in keys):
            return fmt
    return None


def original_keys(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``sd`` in the efficientvit layout that :class:`~.model.DCAE` uses, converted from diffusers keys where
    needed."""
    fmt = detect_key_format(sd)
    if fmt is None:
        raise ValueError("Not a DC-AE state dict: neither efficientvit nor diffusers AutoencoderDC keys found.")
    return diffusers_to_original(sd) if fmt == "diffusers" else sd


def _match(key: str, side: str) -> tuple[KeyRule, dict[str, str]] | None:
    for rule in KEY_RULES:
        m = rule.pattern(side).match(key)
        if m:
            return rule, m.groupdict()
    return None


def _fill(template: str, groups: Mapping[str, str], **extra: str) -> str:
    return template.format(**groups, **extra)


def _matched(sd: Mapping[str, torch.Tensor], side: str, fmt: str) -> list[tuple[torch.Tensor, KeyRule, dict]]:
    """``(value, rule, groups)`` for every key of ``sd``; ValueError naming the keys that no rule knows."""
    hits, unknown = [], []
    for key, value in sd.items():
        hit = _match(key, side)
        if hit is None:
            unknown.append(key)
        else:
            hits.append((value, *hit))
    if unknown:
        keys = sorted(unknown)
        shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
        raise ValueError(f"{len(keys)} key(s) are not part of a DC-AE state dict in the {fmt} format: {shown}")
    return hits


def original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientvit keys -> ``AutoencoderDC`` keys. Every key must be known; unknown keys raise ValueError."""
    out: dict[str, torch.Tensor] = {}
    for value, rule, groups in _matched(sd, "original", "original (efficientvit)"):
        if rule.kind == "qkv":
            # (3*inner, C, 1, 1) -> three (inner, C) Linear weights, in channel order
            for part, chunk in zip(_QKV_PARTS, value.flatten(1).chunk(3, dim=0)):
                out[_fill(rule.diffusers, groups, qkv=part)] = chunk
        elif rule.kind == "squeeze":
            out[_fill(rule.diffusers, groups)] = value.flatten(1)  # (C_out, C_in, 1, 1) -> (C_out, C_in)
        else:
            out[_fill(rule.diffusers, groups)] = value
    return out


def diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``AutoencoderDC`` keys -> efficientvit keys. Every key must be known; unknown keys raise ValueError."""
    out: dict[str, torch.Tensor] = {}
    qkv_groups: dict[str, dict[str, torch.Tensor]] = {}  # original qkv key -> {"q": ..., "k": ..., "v": ...}
    for value, rule, groups in _matched(sd, "diffusers", "diffusers (AutoencoderDC)"):
        target = _fill(rule.original, groups)
        if rule.kind == "qkv":
            qkv_groups.setdefault(target, {})[groups["qkv"]] = value
        elif rule.kind == "squeeze":
            out[target] = value[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        else:
            out[target] = value
    for target, parts in qkv_groups.items():
        if set(parts) != set(_QKV_PARTS):
            missing = sorted(set(_QKV_PARTS) - set(parts))
            raise ValueError(f"Incomplete attention weights for {target}: to_{'/to_'.join(missing)} missing.")
        # three (inner, C) Linear weights -> (3*inner, C, 1, 1) conv weight, thirds in q, k, v order
        out[target] = torch.cat([parts[p] for p in _QKV_PARTS], dim=0)[:, :, None, None]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Config inference (efficientvit keys)
# ---------------------------------------------------------------------------------------------------------------------

_STAGE_KEY = re.compile(r"(encoder|decoder)\.stages\.(\d+)\.op_list\.(\d+)\.(.+)\Z")
_QKV = "context_module.main.qkv.conv.weight"
_BRANCH_DEPTHWISE = "context_module.main.aggreg.0.0.weight"
_BRANCH_POINTWISE = "context_module.main.aggreg.0.1.weight"
_DEFAULT_HEAD_DIM = 32  # efficientvit's and diffusers' default


def _require(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"DC-AE state dict is missing {key!r}; cannot infer the model shape.")
    return sd[key]


def _op_kind(suffixes: set[str]) -> str:
    if "main.conv1.conv.weight" in suffixes:
        return "ResBlock"
    if _QKV in suffixes:
        return "EViTS5_GLU" if _BRANCH_DEPTHWISE in suffixes else "EViT_GLU"
    if "main.conv.weight" in suffixes:
        return "down"
    if "main.conv.conv.weight" in suffixes:
        return "up"
    raise ValueError(f"Unrecognised DC-AE op with keys {sorted(suffixes)[:4]}.")


def infer_dcae_config(sd: Mapping[str, torch.Tensor]) -> "DCAEConfig":
    """Read the config from efficientvit keys: stage/op indices give depths, op keys give types, shapes give widths."""
    from .model import DCAEConfig

    ops: dict[str, dict[int, dict[int, set[str]]]] = {"encoder": {}, "decoder": {}}
    for key in sd:
        m = _STAGE_KEY.match(key)
        if m:
            side, s, i, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            ops[side].setdefault(s, {}).setdefault(i, set()).add(suffix)
    n = len(ops["encoder"])
    if n == 0 or sorted(ops["encoder"]) != list(range(n)) or sorted(ops["decoder"]) != list(range(n)):
        raise ValueError(
            f"DC-AE state dict has encoder stages {sorted(ops['encoder'])} and decoder stages "
            f"{sorted(ops['decoder'])};"
            " expected the same contiguous stages in both."
        )
    widths: list[int] = []
    depths: dict[str, list[int]] = {"encoder": [], "decoder": []}
    types: dict[str, list[str]] = {"encoder": [], "decoder": []}
    attention: list[tuple[str, int]] = []  # (key prefix, width) of one LiteMLA block per attention stage
    expand = None
    for side in ("encoder", "decoder"):
        for s in range(n):
            stage = ops[side][s]
            kinds = [_op_kind(stage[i]) for i in sorted(stage)]
            if sorted(stage) != list(range(len(stage))):
                raise ValueError(f"{side} stage {s} has non-contiguous op indices {sorted(stage)}.")
            resample = "down" if side == "encoder" else "up"
            expected_resample = s < n - 1
            if side == "encoder":
                blocks, extra = kinds[:-1] if expected_resample else kinds, kinds[-1:] if expected_resample else []
            else:
                blocks, extra = kinds[1:] if expected_resample else kinds, kinds[:1] if expected_resample else []
            if extra != ([resample] if expected_resample else []) or resample in blocks or not blocks:
                raise ValueError(f"{side} stage {s} has an unexpected op layout {kinds}.")
            if len(set(blocks)) != 1:
                raise ValueError(f"{side} stage {s} mixes block types {blocks}; one type per stage is supported.")
            depths[side].append(len(blocks))
            types[side].append(blocks[0])
            first = 0 if side == "encoder" or not expected_resample else 1
            prefix = f"{side}.stages.{s}.op_list.{first}."
            if blocks[0] == "ResBlock":
                width = _require(sd, prefix + "main.conv1.conv.weight").shape[0]
            else:
                width = _require(sd, prefix + _QKV).shape[1]
                attention.append((prefix, int(width)))
                inverted = _require(sd, prefix + "local_module.main.inverted_conv.conv.weight").shape[0]
                expand = inverted / (2 * width)
                if prefix + _BRANCH_DEPTHWISE in sd:
                    kernel = sd[prefix + _BRANCH_DEPTHWISE].shape[-1]
                    if kernel != 5:
                        raise ValueError(f"{side} stage {s}: multi-scale kernel {kernel} (only 5 is supported).")
            if side == "encoder":
                widths.append(int(width))
            elif width != widths[s]:
                raise ValueError(f"Stage {s} width differs between encoder ({widths[s]}) and decoder ({width}).")
    latent = _require(sd, "encoder.project_out.main.op_list.0.conv.weight").shape[0]
    in_ch = _require(sd, "encoder.project_in.conv.weight").shape[1]
    return DCAEConfig(
        in_channels=int(in_ch),
        latent_channels=int(latent),
        width_list=tuple(widths),
        encoder_depth_list=tuple(depths["encoder"]),
        decoder_depth_list=tuple(depths["decoder"]),
        encoder_block_types=tuple(types["encoder"]),
        decoder_block_types=tuple(types["decoder"]),
        attention_head_dim=_infer_head_dim(sd, attention),
        expand_ratio=float(expand or 4.0),
    )


def _infer_head_dim(sd: Mapping[str, torch.Tensor], attention: list[tuple[str, int]]) -> int:
    """The LiteMLA head dim. As in efficientvit, a block of width C has ``C // head_dim`` heads and
    ``3 * heads * head_dim`` qkv rows, so C need not be a multiple of the head dim."""
    if not attention:
        return _DEFAULT_HEAD_DIM
    rows = [(width, sd[prefix + _QKV].shape[0]) for prefix, width in attention]
    # a multi-scale branch's grouped 1x1 conv has one group of head_dim channels per q/k/v slice; without one only
    # the qkv rows tell, and several dims can fit them (heads x dim = 1 x 32 = 2 x 16): then the reference's default
    from_branches = {int(sd[p + _BRANCH_POINTWISE].shape[1]) for p, _ in attention if p + _BRANCH_POINTWISE in sd}
    candidates = sorted(from_branches) or range(1, max(r for _, r in rows) + 1)
    fits = [d for d in candidates if all(r == 3 * (w // d) * d for w, r in rows)]
    if len(from_branches) <= 1 and _DEFAULT_HEAD_DIM in fits:
        return _DEFAULT_HEAD_DIM
    if len(fits) == 1:
        return fits[0]
    shapes = ", ".join(f"width {w}: {r} qkv rows" for w, r in rows)
    if not fits:
        raise ValueError(f"DC-AE attention weights fit no head dim (heads = width // head_dim, qkv rows = "
                         f"3 * heads * head_dim; {shapes}).")
    raise ValueError(f"DC-AE head dim cannot be told from the weights: {fits[:6]} all fit ({shapes}).")


def stored_dcae_settings(path: "str | os.PathLike") -> dict:
    """``scaling_factor`` from the file's metadata: a DC-AE trained by jodi_core.jobs.train carries its measured latent
    scale; empty for files without it."""
    scaling = read_metadata(path).get("scaling_factor")
    return {} if scaling is None else {"scaling_factor": float(scaling)}
