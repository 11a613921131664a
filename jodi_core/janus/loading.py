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
import os
import re
from pathlib import Path

import torch

from .. import fp8, ops
from ..checkpoint import CheckpointError, find_weight_files, iter_shards
from ..loading import build_on_meta, identify_checkpoint
from .config import config_from_state_dict, hints_from_config_json
from .keys import detect_layout, to_original_layout
from .model import JanusModel
from .processor import JANUS_1_ROLES, PRO_ROLES, ImagePreprocessConfig, JanusProcessor, JanusTokenizer

log = logging.getLogger(__name__)


def read_janus_state_dict(folder: "str | Path") -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the folder in the ORIGINAL key layout, and the layout they were stored in ("original"/"hf")."""
    folder = Path(folder)
    files = find_weight_files(folder, any_name=True)
    if not files:
        listing = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "(empty)"
        raise CheckpointError(
            f"No Janus weights (model.safetensors / pytorch_model.bin, maybe sharded) in {folder}: {listing}.")
    sd: dict[str, torch.Tensor] = {}
    for shard in iter_shards(folder, files):
        sd.update(shard)
    sd, scales = fp8.split_scales(sd, name=folder.name)  # scaled fp8: scales travel under ComfyUI's names
    layout = detect_layout(sd)
    if layout is None:
        kind = identify_checkpoint(sd)
        what = f"looks like {kind}" if kind else f"has unrecognised keys (e.g. {', '.join(sorted(sd)[:3])})"
        raise CheckpointError(f"{folder.name} is not a Janus checkpoint: it {what}.")
    if scales and layout == "hf":  # vision q/k/v are fused on renaming: one scale cannot follow
        sd, scales = fp8.dequantize_all(sd, scales), fp8.Scales()
    return fp8.join_scales(to_original_layout(sd, layout, name=folder.name), scales), layout

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
    *,
    weight_dtype: str = "default",
    operations=None,
) -> JanusModel:
    """Build a ready-to-run JanusModel (with ``.processor`` / ``.tokenizer``) from a model folder.

    dtype: None keeps the checkpoint's floating dtype. device: None means CPU. roles: the chat roles; by default
    Janus-Pro's ``("<|User|>", "<|Assistant|>")``, or ``("User", "Assistant")`` when the folder is named Janus-1.3B.
    weight_dtype / operations: fp8 storage of the Linear and Conv2d weights and a host's layer namespace, as for
    :func:`jodi_core.loading.load_jodi` (``fp8_e4m3fn_fast`` stores e4m3fn; fp8 matmuls are the DiT's only).
    """
    ops.check_weight_dtype(weight_dtype)
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
    sd, scales = fp8.split_scales(sd, name=folder.name)
    cfg = config_from_state_dict(sd, hints_from_config_json(cfg_json))
    if tokenizer.vocab_size > cfg.language.vocab_size:
        raise ValueError(
            f"tokenizer.json has {tokenizer.vocab_size} tokens but the model's vocabulary is {cfg.language.vocab_size}: "
            "the tokenizer belongs to another model."
        )
    if dtype is None:
        dtype = sd["language_model.model.embed_tokens.weight"].dtype
        dtype = fp8.compute_dtype_of(sd, None) if ops.is_fp8(dtype) else dtype
    operations = fp8.operations_for(weight_dtype, operations)
    model = build_on_meta(lambda: JanusModel(cfg, operations=operations or torch.nn))
    storage = "fp8_e4m3fn" if weight_dtype == "fp8_e4m3fn_fast" else weight_dtype
    fp8.load_weights(model, sd, scales, what="Janus", weight_dtype=storage, dtype=dtype,
                     device=device if device is not None else "cpu")
    model.eval().requires_grad_(False)
    image_cfg = ImagePreprocessConfig.from_json(folder / "preprocessor_config.json", cfg.vision.image_size)
    model.processor = JanusProcessor(
        tokenizer, image_cfg, cfg.vision.num_patches, roles=roles or _default_roles(folder)
    )
    model.folder_name = Path(os.path.abspath(folder)).name  # names its captions in a dataset (jodi_core.captioning)
    log.info(
        "Loaded Janus (%s layout) from %s: LM %d layers x %d, dtype %s, weights %s.",
        layout, folder, cfg.language.num_layers, cfg.language.hidden_size, dtype, weight_dtype,
    )  # fmt: skip
    return model

