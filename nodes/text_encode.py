"""Jodi Text Encode: a prompt through ComfyUI's Gemma-2 text encoder, laid out the way Jodi's DiT expects.

Input: the CLIP object of core ``CLIPLoader`` (type ``lumina2``) loaded from a single-file gemma-2-2b-it (made with
``python -m jodi_core convert-gemma``). Jodi was trained on gemma-2-2b-it, the instruction-tuned model; the base
gemma-2-2b file used by Lumina Image 2.0 loads without error but gives the wrong embeddings.

Output: standard CONDITIONING, ``[[emb (1, 300, C) float32, {"attention_mask": (1, 300) int64, "jodi_caption":
{"chi": bool, "null": (1, 300, C)}}]]``; ``null`` is the reference's unconditional caption (``""`` through the same
Gemma), the sampler's negative when none is connected. It is standard so that core plumbing works (reroutes,
switches); the ``jodi_caption`` marker lets the Jodi sampler refuse conditioning from other encoders with a clear
message instead of a shape error. Samplers turn it into the DiT's inputs with ``caption_from_conditioning``.

How the numbers match the reference (see ``jodi_core.text``):
- the final hidden state after the final RMSNorm: ComfyUI is asked for the last block's output (layer -1, an
  in-range index every host stores and re-applies, unlike an out-of-range "last" that 0.23+ forgets on its second
  ``set_clip_options`` call), and the final norm is applied here with the file's own ``model.norm.weight``;
- tokens: CHI prefix + prompt tokenized as one literal string (prompt-weight syntax off, since weights would make
  ComfyUI interpolate against an empty encoding), truncated / right-padded to ``n_chi + 298`` tokens;
- BOS + the last 299 positions, with the matching mask.
"""

from __future__ import annotations

import numbers

import torch
from comfy_api.v0_0_2 import io

from ..jodi_core.text import (
    CHI_PROMPT, MODEL_MAX_LENGTH, PAD_ID, caption_length, caption_text, gemma2_final_norm, layout_tokens,
    select_caption,
)

__all__ = ["JodiTextEncode", "encode_caption", "encode_null_caption", "caption_from_conditioning",
           "null_from_conditioning", "CAPTION_KEY"]

CAPTION_KEY = "jodi_caption"
_TOKENIZER_KEY = "gemma2_2b"

_GEMMA_IT_NOTE = (
    "Jodi needs Gemma-2-2B-IT (google/gemma-2-2b-it, instruction-tuned), NOT the base Gemma-2-2B file of Lumina "
    "Image 2.0: both load, but only the -it weights give the embeddings Jodi was trained on. Make the file with "
    "'python -m jodi_core convert-gemma <gemma-2-2b-it folder> models/text_encoders/gemma-2-2b-it.safetensors'."
)


def _gemma_encoder(clip):
    model = getattr(clip, "cond_stage_model", None)
    encoder = getattr(model, _TOKENIZER_KEY, None)
    if encoder is None or not hasattr(clip, "tokenize"):
        kind = type(model).__name__ if model is not None else type(clip).__name__
        raise ValueError(
            f"Jodi Text Encode needs a Gemma-2-2B text encoder (Load CLIP with type 'lumina2'), got {kind}. "
            + _GEMMA_IT_NOTE)
    return encoder


def _final_norm_weight(clip) -> torch.Tensor:
    """The Gemma file's ``model.norm.weight``, read through the CLIP's public state dict."""
    suffix = "model.norm.weight"
    weights = [v for k, v in clip.get_sd().items() if k.startswith(_TOKENIZER_KEY + ".") and k.endswith(suffix)]
    if len(weights) != 1:
        raise ValueError(f"the Gemma text encoder has {len(weights)} '{suffix}' tensors, expected one. "
                         + _GEMMA_IT_NOTE)
    return weights[0]


def _token_ids(clip, text: str) -> list[int]:
    # disable_weights keeps "(word:1.2)" literal and tokenizes the whole string at once, like the reference.
    pairs = clip.tokenize(text, disable_weights=True)[_TOKENIZER_KEY]
    if len(pairs) != 1:
        raise ValueError(f"expected one token section from the Gemma tokenizer, got {len(pairs)}")
    ids = []
    for token, *_ in pairs[0]:
        if not isinstance(token, numbers.Integral):
            raise ValueError("textual-inversion embeddings ('embedding:name') are not supported by Jodi Text Encode")
        ids.append(int(token))
    return ids


def encode_caption(clip, text: str, chi: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode one prompt: (1, 300, C) float32 embedding and (1, 300) int64 mask, as the reference computes them."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    _gemma_encoder(clip)  # refuses a CLIP that is not Gemma before any work
    clip = clip.clone()  # the layer choice below must not leak into the user's CLIP
    clip.clip_layer(-1)  # the last block's output, before the final norm (applied below)

    num_chi = len(_token_ids(clip, CHI_PROMPT)) if chi else None
    tokens = layout_tokens(_token_ids(clip, caption_text(text, chi)), caption_length(num_chi), PAD_ID)
    out = clip.encode_from_tokens({_TOKENIZER_KEY: [[(t, 1.0) for t in tokens.ids]]}, return_dict=True)
    hidden = out["cond"]  # (1, L, C)
    if hidden.shape[1] != len(tokens.ids):
        raise RuntimeError(f"the text encoder returned {hidden.shape[1]} positions for {len(tokens.ids)} tokens")
    hidden = gemma2_final_norm(hidden, _final_norm_weight(clip))
    mask = torch.tensor([tokens.mask], dtype=torch.long, device=hidden.device)
    emb, mask = select_caption(hidden, mask)  # (1, 1, 300, C), (1, 300)
    return emb[:, 0], mask


def encode_null_caption(clip) -> torch.Tensor:
    """The reference's unconditional caption for CFG, (1, 300, C): ``""`` without the instruction prefix, i.e. BOS
    and 299 pads through the same Gemma."""
    return encode_caption(clip, "", chi=False)[0]


def caption_from_conditioning(conditioning, what: str = "positive") -> tuple[torch.Tensor, torch.Tensor]:
    """CONDITIONING from Jodi Text Encode -> (B, 1, 300, C) caption embedding and (B, 300) mask for the DiT."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{what}: expected CONDITIONING from Jodi Text Encode, got {type(conditioning).__name__}")
    if len(conditioning) != 1:
        raise ValueError(
            f"{what}: Jodi takes one caption per conditioning input, got {len(conditioning)} entries "
            "(ConditioningCombine/Concat are not supported)")
    entry = conditioning[0]
    emb, extras = entry[0], entry[1] if len(entry) > 1 else {}
    if not isinstance(extras, dict) or CAPTION_KEY not in extras:
        raise ValueError(
            f"{what}: this CONDITIONING does not come from Jodi Text Encode (encode the prompt with Jodi Text Encode "
            "and a gemma-2-2b-it CLIP; other encoders' embeddings do not fit Jodi)")
    if not torch.is_tensor(emb) or emb.ndim != 3 or emb.shape[1] != MODEL_MAX_LENGTH:
        shape = tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__
        raise ValueError(f"{what}: expected a caption embedding of shape (B, {MODEL_MAX_LENGTH}, C), got {shape}")
    mask = extras.get("attention_mask")
    if mask is None:
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
    mask = mask.reshape(-1, MODEL_MAX_LENGTH).expand(emb.shape[0], -1)
    return emb[:, None], mask


def null_from_conditioning(conditioning) -> "torch.Tensor | None":
    """The ``""`` caption Jodi Text Encode attached to ``conditioning``, (1, 1, 300, C); None if it has none."""
    extras = conditioning[0][1] if len(conditioning[0]) > 1 else {}
    null = extras.get(CAPTION_KEY, {}).get("null")
    return null[:, None] if torch.is_tensor(null) else None


class JodiTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiTextEncode",
            display_name="Jodi Text Encode",
            category="Jodi/conditioning",
            description=(
                "Encodes a prompt for Jodi with Gemma-2-2B-IT exactly as the reference does (instruction prefix, "
                "final-norm hidden state, BOS + last 299 tokens, mask). " + _GEMMA_IT_NOTE),
            inputs=[
                io.Clip.Input(
                    "clip",
                    tooltip="Gemma text encoder from Load CLIP with type 'lumina2'. " + _GEMMA_IT_NOTE),
                io.String.Input(
                    "text", multiline=True, dynamic_prompts=True, default="",
                    tooltip="The prompt. Used literally: '(word:1.2)' weights are not parsed. Anything from "
                            "'--ar', '--aspect_ratio' or '--hw' on is dropped, as in the reference."),
                io.Boolean.Input(
                    "complex_human_instruction", default=True,
                    tooltip="Put the reference's 8-line 'Enhanced prompt' instruction in front of the prompt "
                            "(on for prompts, as Jodi was trained). Turn it off for a negative prompt: the reference "
                            "encodes negatives without it."),
            ],
            outputs=[io.Conditioning.Output(
                display_name="conditioning",
                tooltip="Caption embedding (1, 300, 2304) with its attention mask, for the Jodi sampler.")],
        )

    @classmethod
    def execute(cls, clip, text: str, complex_human_instruction: bool = True) -> io.NodeOutput:
        emb, mask = encode_caption(clip, text, chi=bool(complex_human_instruction))
        # The sampler's default negative, as the reference's: the empty caption through the same Gemma.
        null = encode_null_caption(clip)
        extras = {"attention_mask": mask, CAPTION_KEY: {"chi": bool(complex_human_instruction), "null": null}}
        return io.NodeOutput([[emb, extras]])
