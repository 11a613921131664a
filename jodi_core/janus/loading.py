"""Load a Janus / Janus-Pro model folder: weights (original deepseek layout or the HF-converted layout; safetensors or
torch pickles, single file or sharded with an index json), config.json, tokenizer.json, preprocessor_config.json.

Typical folders:
  original:  config.json, pytorch_model.bin (or pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json),
             tokenizer.json, preprocessor_config.json, ...
  converted: config.json (model_type "janus"), model.safetensors (or model-0000k-of-0000n.safetensors + index), ...
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoint import CheckpointError, build_on_meta, identify_checkpoint, load_state_dict_strict, read_state_dict
from .config import config_from_state_dict, hints_from_config_json
from .model import JanusModel
from .processor import JANUS_1_ROLES, PRO_ROLES, ImagePreprocessConfig, JanusProcessor, JanusTokenizer

log = logging.getLogger(__name__)

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

# ---------------------------------------------------------------------------------------------------------------------
# Key layouts. Ours is the original one; these tables rename whole-key prefixes/segments between the two.
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder, checked against its index json when there is one."""
    for index_name in _INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e}).") from e
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder.name}: shard(s) listed in {index_name} are missing: {', '.join(missing)}.")
            return [folder / s for s in shards]
    for name in _SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    candidates = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if candidates:
        return candidates
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "(empty)"
    raise CheckpointError(f"No Janus weights (model.safetensors / pytorch_model.bin, maybe sharded) in {folder}: {listing}.")


def read_janus_state_dict(folder: "str | Path") -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the folder in the ORIGINAL key layout, and the layout they were stored in ("original"/"hf")."""
    folder = Path(folder)
    files = find_weight_files(folder)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_state_dict(f))
    for index_name in _INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            expected = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            absent = [k for k in expected if k not in sd]
            if absent:
                raise CheckpointError(
                    f"{folder.name}: {len(absent)} tensor(s) listed in {index_name} are not in the shards "
                    f"(truncated download?), e.g. {absent[0]!r}."
                )
    if "language_model.model.embed_tokens.weight" in sd:
        layout = "original"
    elif "model.language_model.embed_tokens.weight" in sd:
        layout = "hf"
        if "lm_head.weight" not in sd:  # an export with tied embeddings
            log.info("%s has no lm_head.weight; using the tied input embeddings.", folder.name)
            sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
        sd = hf_to_original(sd)
    else:
        kind = identify_checkpoint(sd)
        what = f"looks like {kind}" if kind else f"has unrecognised keys (e.g. {', '.join(sorted(sd)[:3])})"
        raise CheckpointError(f"{folder.name} is not a Janus checkpoint: it {what}.")
    # Older LLaMA exports also persist the rotary inv_freq buffer, which is recomputed here.
    for key in [k for k in sd if k.startswith(_DROPPED_ORIGINAL) or k.endswith("rotary_emb.inv_freq")]:
        del sd[key]
    return sd, layout


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from e


def _default_roles(folder: Path) -> tuple[str, str]:
    """Janus-1.3B was tuned with plain "User"/"Assistant" roles, Janus-Pro with "<|User|>"/"<|Assistant|>"."""
    name = folder.name.lower()
    roles = JANUS_1_ROLES if re.search(r"janus[-_]?1[._]?3b", name) and "pro" not in name else PRO_ROLES
    log.info("Janus: chat roles %s for folder %r (Janus-1.3B is told apart by its folder name).", roles, folder.name)
    return roles


def load_janus(
    folder: "str | Path",
    dtype: torch.dtype | None = None,
    device: "str | torch.device | None" = None,
    roles: tuple[str, str] | None = None,
) -> JanusModel:
    """Build a ready-to-run JanusModel (with ``.processor`` / ``.tokenizer``) from a model folder.

    dtype: None keeps the checkpoint's floating dtype. device: None means CPU. roles: the chat roles; by default
    Janus-Pro's ``("<|User|>", "<|Assistant|>")``, or ``("User", "Assistant")`` when the folder is named Janus-1.3B.
    """
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"load_janus expects the model folder, not a file: {folder} (use {folder.parent}).")
    if not folder.is_dir():
        raise FileNotFoundError(f"Janus model folder not found: {folder}")
    # Tokenizer first: a folder without one is unusable, and this check costs nothing.
    tokenizer = JanusTokenizer(folder / "tokenizer.json")
    cfg_json = _read_json(folder / "config.json")
    model_type = cfg_json.get("model_type")
    if model_type not in (None, "multi_modality", "janus"):
        raise CheckpointError(f"{folder.name}/config.json describes a {model_type!r} model, not Janus.")

    sd, layout = read_janus_state_dict(folder)
    cfg = config_from_state_dict(sd, hints_from_config_json(cfg_json))
    if tokenizer.vocab_size > cfg.language.vocab_size:
        raise ValueError(
            f"tokenizer.json has {tokenizer.vocab_size} tokens but the model's vocabulary is {cfg.language.vocab_size}: "
            "the tokenizer belongs to another model."
        )
    if dtype is None:
        dtype = sd["language_model.model.embed_tokens.weight"].dtype
    model = build_on_meta(lambda: JanusModel(cfg))
    load_state_dict_strict(model, sd, what="Janus", dtype=dtype, device=device if device is not None else "cpu")
    model.eval().requires_grad_(False)
    image_cfg = ImagePreprocessConfig.from_json(folder / "preprocessor_config.json", cfg.vision.image_size)
    model.processor = JanusProcessor(
        tokenizer, image_cfg, cfg.vision.num_patches, roles=roles or _default_roles(folder)
    )
    log.info(
        "Loaded Janus (%s layout) from %s: LM %d layers x %d, dtype %s.",
        layout, folder, cfg.language.num_layers, cfg.language.hidden_size, dtype,
    )  # fmt: skip
    return model

