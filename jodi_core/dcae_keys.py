"""State-dict key formats of the DC-AE and the conversion between them.

Two layouts of the same weights are in circulation:

- ``original``: the efficientvit ``DCAE`` keys of ``mit-han-lab/dc-ae-f32c32-sana-1.0`` (what Jodi loads), e.g.
  ``encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight``. :class:`jodi_core.dcae.DCAE` uses these names.
- ``diffusers``: ``AutoencoderDC`` of ``...-sana-1.0-diffusers``, e.g. ``encoder.down_blocks.3.0.attn.to_q.weight``.

The mapping is a table of key templates read in both directions. Two entries also reshape:

- the LiteMLA ``qkv`` 1x1 conv is split into thirds named ``to_q/to_k/to_v`` (2-D Linear weights). The thirds are
  *not* the queries, keys and values: the original layout is interleaved per head (``[q|k|v]`` of 32 channels each,
  96 per head), and diffusers re-concatenates the thirds before it splits heads, so a plain chunk/concat is exact;
- the attention output projection ``proj.conv`` (1x1 conv) becomes the Linear ``to_out``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import torch

__all__ = ["detect_key_format", "original_to_diffusers", "diffusers_to_original", "KEY_RULES"]

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


def detect_key_format(sd: Mapping[str, object]) -> str | None:
    """``"original"``, ``"diffusers"`` or None (not a DC-AE state dict)."""
    if "encoder.project_in.conv.weight" in sd and "decoder.project_in.main.conv.weight" in sd:
        return "original"
    if "encoder.conv_in.weight" in sd and "decoder.conv_in.weight" in sd:
        return "diffusers"
    return None


def _match(key: str, side: str) -> tuple[KeyRule, dict[str, str]] | None:
    for rule in KEY_RULES:
        m = rule.pattern(side).match(key)
        if m:
            return rule, m.groupdict()
    return None


def _fill(template: str, groups: Mapping[str, str], **extra: str) -> str:
    return template.format(**groups, **extra)


def _unmatched_error(keys: list[str], fmt: str) -> ValueError:
    shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
    return ValueError(f"{len(keys)} key(s) are not part of a DC-AE state dict in the {fmt} format: {shown}")


def original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientvit keys -> ``AutoencoderDC`` keys. Every key must be known; unknown keys raise ValueError."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        hit = _match(key, "original")
        if hit is None:
            unknown.append(key)
            continue
        rule, groups = hit
        if rule.kind == "qkv":
            # (3*inner, C, 1, 1) -> three (inner, C) Linear weights, in channel order
            for part, chunk in zip(_QKV_PARTS, value.flatten(1).chunk(3, dim=0)):
                out[_fill(rule.diffusers, groups, qkv=part)] = chunk
        elif rule.kind == "squeeze":
            out[_fill(rule.diffusers, groups)] = value.flatten(1)  # (C_out, C_in, 1, 1) -> (C_out, C_in)
        else:
            out[_fill(rule.diffusers, groups)] = value
    if unknown:
        raise _unmatched_error(sorted(unknown), "original (efficientvit)")
    return out


def diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``AutoencoderDC`` keys -> efficientvit keys. Every key must be known; unknown keys raise ValueError."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    qkv_groups: dict[str, dict[str, torch.Tensor]] = {}  # original qkv key -> {"q": ..., "k": ..., "v": ...}
    for key, value in sd.items():
        hit = _match(key, "diffusers")
        if hit is None:
            unknown.append(key)
            continue
        rule, groups = hit
        target = _fill(rule.original, groups)
        if rule.kind == "qkv":
            qkv_groups.setdefault(target, {})[groups["qkv"]] = value
        elif rule.kind == "squeeze":
            out[target] = value[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        else:
            out[target] = value
    if unknown:
        raise _unmatched_error(sorted(unknown), "diffusers (AutoencoderDC)")
    for target, parts in qkv_groups.items():
        if set(parts) != set(_QKV_PARTS):
            missing = sorted(set(_QKV_PARTS) - set(parts))
            raise ValueError(f"Incomplete attention weights for {target}: to_{'/to_'.join(missing)} missing.")
        # three (inner, C) Linear weights -> (3*inner, C, 1, 1) conv weight, thirds in q, k, v order
        out[target] = torch.cat([parts[p] for p in _QKV_PARTS], dim=0)[:, :, None, None]
    return out
