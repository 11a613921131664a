"""A tiny random Janus model folder for tests: weights (original or HF layout) + config.json + tokenizer.json +
preprocessor_config.json. Needs torch, safetensors and tokenizers only (no transformers), so the ComfyUI host tests
can use it too::

    from janus_tiny import write_tiny_janus
    folder = write_tiny_janus(tmp_path / "Janus-Tiny", layout="original", seed=0)

Tiny sizes: vision 16x16 pixels / patch 4 (16 image tokens), width 32, 2 blocks; LM hidden 64, 2 layers, 4 heads
(2 KV heads), vocab 320; VQ codebook 32 x 8, decoder widths 64 -> 32 (16 codes -> 8x8 images).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from jodi_core.janus.config import JanusConfig, LlamaConfig, SigLIPConfig, VQConfig
from jodi_core.janus.keys import original_to_hf
from jodi_core.janus.model import JanusModel
from jodi_core.janus.processor import BEGIN_OF_IMAGE, BOS, END_OF_IMAGE, EOS, IMAGE, PAD, SYSTEM_PROMPT

TINY_VOCAB = 320
TINY_CONFIG = JanusConfig(
    vision=SigLIPConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_hidden=64),
    language=LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=512,
    ),
    vq=VQConfig(codebook_size=32, codebook_dim=8, z_channels=32, base_channels=32, channel_mult=(1, 2), num_res_blocks=1),
    gen_head_hidden=64,
    gen_grid=4,
)  # fmt: skip

_CORPUS = [
    SYSTEM_PROMPT,
    "Describe this image in detail. What is in the picture? A cat sitting on a red chair next to a window.",
    "A portrait of a young girl, masterpiece, film grained, best quality. A dog runs on the beach at sunset.",
    "The quick brown fox jumps over the lazy dog. Convert the formula into latex code. How many people are there?",
]
_SPECIALS = [BOS, EOS, PAD, IMAGE, BEGIN_OF_IMAGE, END_OF_IMAGE, "<|User|>", "<|Assistant|>"]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (lossless round trip) with the special tokens the Janus chat format needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    if tok.get_vocab_size() > TINY_VOCAB:
        raise RuntimeError(f"Tiny tokenizer has {tok.get_vocab_size()} tokens, more than the tiny vocab {TINY_VOCAB}.")
    return tok


def tiny_original_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the original layout, including the parts real checkpoints carry but Janus does not use."""
    with torch.device("cpu"):
        model = JanusModel(TINY_CONFIG)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in sorted(model.state_dict().items()):
        if "norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif p.ndim >= 2 and not name.endswith(("embed_tokens.weight", "embedding.weight", "gen_embed.weight")):
            fan_in = math.prod(p.shape[1:])
            value = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        else:
            value = torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 1.0)
        sd[name] = value.contiguous()
    width = TINY_CONFIG.vision.width
    sd["vision_model.vision_tower.attn_pool.latent"] = torch.randn(1, 1, width, generator=g)
    sd["vision_model.vision_tower.attn_pool.q.weight"] = torch.randn(width, width, generator=g)
    sd["gen_vision_model.quantize.codebook_used"] = torch.zeros(TINY_CONFIG.vq.codebook_size)
    return sd


def _language_config_dict(vocab: int, tok) -> dict:
    lm = TINY_CONFIG.language
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": lm.hidden_size,
        "intermediate_size": lm.intermediate_size,
        "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads,
        "num_key_value_heads": lm.num_kv_heads,
        "max_position_embeddings": lm.max_position_embeddings,
        "rms_norm_eps": lm.rms_norm_eps,
        "rope_theta": lm.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "pad_token_id": tok.token_to_id(PAD),
    }


def original_config_json(tok) -> dict:
    c = TINY_CONFIG
    d = c.language.hidden_size
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            # num_heads is an addition for the tiny model: real configs name a SigLIP preset instead.
            "params": {"image_size": c.vision.image_size, "model_name": "siglip_tiny", "select_feature": "same",
                       "select_layer": -1, "num_heads": c.vision.num_heads},
        },
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": c.vision.width, "n_embed": d}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                              "params": {"image_token_size": c.vq.codebook_size, "n_embed": c.vq.codebook_dim}},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                               "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": c.vq.codebook_dim, "n_embed": d}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                            "params": {"image_token_embed": c.gen_head_hidden, "image_token_size": c.vq.codebook_size, "n_embed": d}},
        "language_config": {k: v for k, v in _language_config_dict(c.language.vocab_size, tok).items() if k != "model_type"},
        "torch_dtype": "float32",
    }  # fmt: skip


def hf_config_json(tok) -> dict:
    """A ``JanusConfig`` dict (model_type "janus") as transformers' conversion writes it."""
    c = TINY_CONFIG
    d = c.language.hidden_size
    return {
        "model_type": "janus",
        "architectures": ["JanusForConditionalGeneration"],
        "image_token_id": tok.token_to_id(IMAGE),
        "tie_word_embeddings": False,
        "text_config": _language_config_dict(c.language.vocab_size, tok),
        "vision_config": {
            "model_type": "janus_vision_model", "hidden_size": c.vision.width, "num_hidden_layers": c.vision.depth,
            "num_attention_heads": c.vision.num_heads, "image_size": c.vision.image_size,
            "patch_size": c.vision.patch_size, "mlp_ratio": c.vision.mlp_hidden / c.vision.width,
            "projection_dim": d, "depth": 2, "num_image_tokens": c.vision.num_patches,
        },
        "vq_config": {
            "model_type": "janus_vqgan", "embed_dim": c.vq.codebook_dim, "num_embeddings": c.vq.codebook_size,
            "latent_channels": c.vq.z_channels, "base_channels": c.vq.base_channels,
            "channel_multiplier": list(c.vq.channel_mult), "num_res_blocks": c.vq.num_res_blocks,
            "projection_dim": d, "image_token_embed_dim": d, "num_hidden_layers": 2,
        },
    }  # fmt: skip


def write_tiny_janus(folder: "str | Path", layout: str = "original", seed: int = 0) -> Path:
    """Write a loadable tiny Janus folder. layout "original": pytorch_model.bin (deepseek keys, multi_modality
    config.json); "hf": model.safetensors (transformers' converted keys, janus config.json)."""
    from safetensors.torch import save_file

    if layout not in ("original", "hf"):
        raise ValueError(f"layout must be 'original' or 'hf', got {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    sd = tiny_original_state_dict(seed)
    if layout == "original":
        torch.save(sd, folder / "pytorch_model.bin")
        config = original_config_json(tok)
    else:
        save_file(original_to_hf(sd), str(folder / "model.safetensors"))
        config = hf_config_json(tok)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    preprocessor = {
        "image_processor_type": "VLMImageProcessor",
        "image_size": TINY_CONFIG.vision.image_size,
        "min_size": 14,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1.0 / 255.0,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return folder
