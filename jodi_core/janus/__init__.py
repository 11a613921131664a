"""Janus / Janus-Pro (deepseek-ai) in plain PyTorch: image understanding and text-to-image generation.

API for the ComfyUI nodes (all functions run under ``torch.inference_mode``)::

    from jodi_core.janus import load_janus, janus_understand, janus_generate

    model = load_janus(folder, dtype=None, device=None)
        # folder: original deepseek layout (config.json + pytorch_model.bin or shards + index) or the HF-converted
        # layout (model.safetensors or shards + index), plus tokenizer.json and preprocessor_config.json.
        # dtype None keeps the checkpoint's dtype; device None means CPU. Raises CheckpointError (a ValueError) for
        # a missing/truncated shard or a non-Janus checkpoint, FileNotFoundError/ValueError for a missing or foreign
        # tokenizer.json. model.processor / model.tokenizer / model.config are attached.

    answers = janus_understand(model, images, questions, max_new_tokens=512, do_sample=False, temperature=1.0,
                               top_p=1.0, repetition_penalty=1.0, seed=0, callback=None, should_stop=None, top_k=50)
        # images: (B, 3, H, W) float [0, 1] -> one image per row; or a list with one entry per row, each None, one
        # image ((3, H, W) tensor or PIL) or several ((N, 3, H, W) tensor or list); or None (text only).
        # questions: one string (asked for every row) or one per row. Rows are left-padded into one batch.
        # Returns list[str]. callback(step, max_new_tokens) after each token; should_stop() -> True raises
        # JanusInterrupted. The repetition penalty applies to generated tokens, as in the reference (which calls
        # generate with inputs_embeds only); top_k applies when sampling (the reference's generate default is 50).

    images = janus_generate(model, prompt, cfg_weight=5.0, temperature=1.0, parallel_size=1, seed=0, callback=None,
                            should_stop=None)
        # (parallel_size, 3, 384, 384) float32 in [0, 1]. temperature 0 = greedy. callback(step, 576) per image
        # token. janus_generate_codes(...) returns the (P, 576) VQ codes; model.decode_image_codes(codes) decodes.

    janus_understand_tokens(...)  # same arguments as janus_understand, returns the generated token ids per row

    answers = janus_understand_in_chunks(model, images, questions, max_new_tokens=512, seed=0, callback=None,
                                         **sampling)
        # What the nodes run: images is a list with one entry per row; rows go UNDERSTAND_CHUNK at a time (chunk n
        # samples with seed + n), each chunk's answers cut to the context left after its prompts (with a warning).
        # callback(done, total) counts tokens over all chunks. understanding_cache_bytes(model, images, questions,
        # max_new_tokens) is the KV cache one chunk needs: what a host reserves.

Decoding steps run from a CUDA graph on CUDA (``model.decode_mode = "auto"``; "eager" turns that off). Tests build a
tiny random model folder with ``tests/janus_tiny.py::write_tiny_janus(folder, layout="original" | "hf", seed=0)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "JanusConfig",
    "JanusInterrupted",
    "JanusModel",
    "UNDERSTAND_CHUNK",
    "janus_generate",
    "janus_generate_codes",
    "janus_understand",
    "janus_understand_in_chunks",
    "janus_understand_tokens",
    "load_janus",
    "understanding_cache_bytes",
]

_LAZY = {
    "JanusConfig": ".config",
    "JanusModel": ".model",
    "JanusInterrupted": ".generate",
    "janus_generate": ".generate",
    "janus_generate_codes": ".generate",
    "janus_understand": ".generate",
    "janus_understand_tokens": ".generate",
    "janus_understand_in_chunks": ".chunking",
    "understanding_cache_bytes": ".chunking",
    "UNDERSTAND_CHUNK": ".chunking",
    "load_janus": ".loading",
}

if TYPE_CHECKING:  # pragma: no cover
    from .chunking import UNDERSTAND_CHUNK, janus_understand_in_chunks, understanding_cache_bytes
    from .config import JanusConfig
    from .generate import (
        JanusInterrupted,
        janus_generate,
        janus_generate_codes,
        janus_understand,
        janus_understand_tokens,
    )
    from .loading import load_janus
    from .model import JanusModel


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
