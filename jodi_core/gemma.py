"""Turn a Hugging Face ``gemma-2-2b-it`` folder into the single file ComfyUI's ``CLIPLoader`` (type lumina2) loads.

Jodi's captions come from gemma-2-2b-it, the instruction-tuned model. Lumina Image 2.0 uses the base gemma-2-2b;
both have the same shapes, so ComfyUI would load either without complaint, but only the -it weights give the
embeddings Jodi was trained on.

What ComfyUI needs and the Hugging Face folder does not provide as such:
- one file instead of shards (ComfyUI reads one state dict; the key names ``model.embed_tokens.weight``,
  ``model.layers.N.*``, ``model.norm.weight`` are already the ones it expects);
- the tokenizer inside the file: the sentencepiece model bytes as a uint8 tensor named ``spiece_model``.
The weights are written in bfloat16, the precision the reference runs Gemma in.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, find_weight_files, iter_shards

log = logging.getLogger(__name__)

__all__ = ["convert_gemma", "load_hf_gemma_state_dict", "SPIECE_KEY"]

SPIECE_KEY = "spiece_model"
# Present in Gemma-2 blocks only (Gemma-1 has no post-norms, Gemma-3 adds q_norm/k_norm).
_GEMMA2_MARKER = "model.layers.0.post_feedforward_layernorm.weight"
_GEMMA3_MARKER = "model.layers.0.self_attn.q_norm.weight"
_DROPPED_PREFIXES = ("lm_head.",)  # tied to the embedding; the encoder never uses it


def load_hf_gemma_state_dict(
    folder: "str | os.PathLike", dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Merge the shards of a Hugging Face Gemma-2 folder into one state dict, floating tensors cast to ``dtype``."""
    folder = Path(folder)
    files = find_weight_files(folder)
    if not files:
        raise FileNotFoundError(
            f"{folder} holds no Hugging Face weights (model.safetensors[.index.json] or "
            "pytorch_model.bin[.index.json]); download google/gemma-2-2b-it and pass its folder")
    merged: dict[str, torch.Tensor] = {}
    for shard in iter_shards(folder, files):
        for key, tensor in shard.items():
            if not key.startswith(_DROPPED_PREFIXES):
                merged[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        del shard  # keep at most one shard in float32 at a time
    return merged


def _check_gemma2(sd: dict[str, torch.Tensor], folder: Path) -> None:
    if _GEMMA3_MARKER in sd:
        raise CheckpointError(f"{folder} is a Gemma-3 model; Jodi needs Gemma-2-2B-IT (google/gemma-2-2b-it)")
    if _GEMMA2_MARKER not in sd or "model.embed_tokens.weight" not in sd or "model.norm.weight" not in sd:
        raise CheckpointError(
            f"{folder} does not look like a Gemma-2 decoder (missing {_GEMMA2_MARKER}, model.embed_tokens.weight or"
            " model.norm.weight); Jodi needs Gemma-2-2B-IT (google/gemma-2-2b-it)")
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("model_type") not in (None, "gemma2"):
            raise CheckpointError(f"{config_path}: model_type is {config.get('model_type')!r}, expected 'gemma2'")
        hidden = config.get("hidden_size")
        if hidden is not None and sd["model.embed_tokens.weight"].shape[1] != hidden:
            raise CheckpointError(
                f"{folder}: embedding width {sd['model.embed_tokens.weight'].shape[1]} != hidden_size {hidden}")
    # The -it tokenizer config carries a chat template, the base model's does not: a cheap hint, not a proof.
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file() and "chat_template" not in json.loads(tok_config.read_text()):
        log.warning("%s has no chat template: this may be the base gemma-2-2b. Jodi was trained with gemma-2-2b-it.",
                    folder)


def convert_gemma(
    hf_folder: "str | os.PathLike", out_path: "str | os.PathLike", *, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write ``out_path`` (.safetensors): the merged Gemma-2 weights in ``dtype`` plus the ``spiece_model`` tensor."""
    from safetensors.torch import save_file

    folder, out_path = Path(hf_folder), Path(out_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face folder not found: {folder}")
    if out_path.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {out_path.name}")
    spiece_path = folder / "tokenizer.model"
    if not spiece_path.is_file() or spiece_path.stat().st_size == 0:
        raise FileNotFoundError(
            f"{spiece_path} is missing: ComfyUI tokenizes Gemma with the sentencepiece model stored in the file")

    sd = load_hf_gemma_state_dict(folder, dtype)
    _check_gemma2(sd, folder)
    spiece = spiece_path.read_bytes()
    vocab_rows = sd["model.embed_tokens.weight"].shape[0]
    try:
        import sentencepiece

        pieces = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    except ImportError:  # optional check only
        pieces = None
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError on a bad proto
        raise CheckpointError(f"{spiece_path} is not a valid sentencepiece model: {e}") from e
    if pieces is not None and pieces > vocab_rows:
        raise CheckpointError(f"{spiece_path} has {pieces} pieces but the embedding has only {vocab_rows} rows")
    sd[SPIECE_KEY] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt", "source": folder.name})
    tmp.replace(out_path)  # never leave a truncated file under the final name
    log.info("wrote %s (%d tensors, %s)", out_path, len(sd), dtype)
    return out_path
