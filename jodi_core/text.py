"""The caption pipeline of Jodi (inherited from Sana): how a prompt becomes the (300, C) Gemma embedding.

The reference (``app/jodi_pipeline.py`` with ``configs/inference.yaml``) does, for one prompt:

1. keep the text before any ``--aspect_ratio`` / ``--ar`` / ``--hw`` flag and strip it;
2. put the "complex human instruction" (CHI) in front of it: 8 fixed lines joined by newlines, the last of which
   ends with ``"User Prompt: "``;
3. tokenize with Gemma's tokenizer (BOS added, no EOS), truncate to ``n_chi + 300 - 2`` tokens, where ``n_chi`` is
   the length of the tokenized CHI text including its BOS, and right-pad with the pad id (0) to that length;
4. run gemma-2-2b-it and take the last hidden state after the final norm;
5. keep the BOS position and the last 299 positions (most of the CHI falls away; the prompt and its padding stay),
   with the matching slice of the attention mask.

The negative/null caption skips steps 2 and 5: ``""`` tokenized to 300 tokens (BOS + 299 pads, mask ``1, 0, ...``).

This module only does the token bookkeeping and the slicing; running Gemma is the caller's job (ComfyUI's CLIP,
or Hugging Face ``Gemma2Model`` in the tests), so it stays free of any text-model dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "CHI_PROMPT_LINES", "CHI_PROMPT", "MODEL_MAX_LENGTH", "BOS_ID", "PAD_ID", "CaptionTokens", "clean_prompt",
    "caption_text", "caption_length", "layout_tokens", "select_index", "select_caption", "null_caption_tokens",
    "GEMMA2_RMS_EPS", "gemma2_final_norm",
]

# The CHI prefix of the reference inference config (``text_encoder.chi_prompt``), one entry per line.
CHI_PROMPT_LINES: tuple[str, ...] = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
CHI_PROMPT = "\n".join(CHI_PROMPT_LINES)

MODEL_MAX_LENGTH = 300  # caption tokens the DiT sees (``text_encoder.model_max_length``)
BOS_ID = 2  # Gemma's <bos>
PAD_ID = 0  # Gemma's <pad>
GEMMA2_RMS_EPS = 1e-6  # Gemma-2's ``rms_norm_eps``

_ASPECT_FLAGS = ("--aspect_ratio", "--ar", "--hw")


@dataclass
class CaptionTokens:
    ids: list[int]  # (max_len,) token ids, right-padded with PAD_ID
    mask: list[int]  # (max_len,) 1 for real tokens, 0 for padding


def clean_prompt(prompt: str) -> str:
    """Drop the aspect-ratio flags the reference strips from prompts (everything from the first flag on)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    for flag in _ASPECT_FLAGS:
        prompt = prompt.split(flag)[0]
    return prompt.strip()


def caption_text(prompt: str, chi: bool = True) -> str:
    """The exact string the reference tokenizes: CHI prefix (if used) + cleaned prompt, no separator."""
    prompt = clean_prompt(prompt)
    return CHI_PROMPT + prompt if chi else prompt


def caption_length(num_chi_tokens: int | None, max_length: int = MODEL_MAX_LENGTH) -> int:
    """Padded token length before selection: ``n_chi + max_length - 2`` with the CHI prefix, else ``max_length``.

    ``num_chi_tokens`` counts the tokenized CHI text with its BOS (as ``tokenizer.encode(chi)`` does). The 2
    accounts for that BOS and for the piece that joins the CHI text to the prompt.
    """
    if num_chi_tokens is None:
        return max_length
    if num_chi_tokens < 1:
        raise ValueError(f"num_chi_tokens must be >= 1 (it includes the BOS), got {num_chi_tokens}")
    return num_chi_tokens + max_length - 2


def layout_tokens(ids: Sequence[int], length: int, pad_id: int = PAD_ID) -> CaptionTokens:
    """Truncate (keeping the start, BOS included) or right-pad ``ids`` to ``length`` and build the mask."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    ids = [int(t) for t in ids[:length]]
    if not ids:
        raise ValueError("the token list is empty; it must at least hold the BOS token")
    n_pad = length - len(ids)
    return CaptionTokens(ids=ids + [pad_id] * n_pad, mask=[1] * len(ids) + [0] * n_pad)


def select_index(length: int, max_length: int = MODEL_MAX_LENGTH) -> list[int]:
    """Positions kept from a ``length``-token encoding: BOS plus the last ``max_length - 1`` positions."""
    if length < max_length:
        raise ValueError(f"a caption encoding must have at least {max_length} tokens, got {length}")
    return [0] + list(range(length - max_length + 1, length))


def select_caption(
    emb: torch.Tensor, mask: torch.Tensor, max_length: int = MODEL_MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, C) hidden states + (B, L) mask -> (B, 1, max_length, C) caption embedding + (B, max_length) mask."""
    if emb.ndim != 3:
        raise ValueError(f"expected hidden states of shape (B, L, C), got {tuple(emb.shape)}")
    if mask.shape != emb.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(emb.shape)}")
    index = torch.tensor(select_index(emb.shape[1], max_length), device=emb.device)
    # (B, L, C) -> (B, 300, C) -> (B, 1, 300, C): the DiT takes captions with a singleton "view" axis.
    return emb.index_select(1, index)[:, None], mask.index_select(1, index.to(mask.device))


def null_caption_tokens(
    max_length: int = MODEL_MAX_LENGTH, bos_id: int = BOS_ID, pad_id: int = PAD_ID
) -> CaptionTokens:
    """Tokens of the reference's null caption ``""``: BOS then padding, mask ``1, 0, 0, ...``."""
    return layout_tokens([bos_id], max_length, pad_id)


def gemma2_final_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float = GEMMA2_RMS_EPS) -> torch.Tensor:
    """Gemma-2's final RMSNorm, as Hugging Face's ``Gemma2RMSNorm`` computes it: in float32, scaled by ``1 + w``.

    Step 4 above needs the last block's output after this norm. A host that hands out the last block's output
    without it (ComfyUI's in-range ``clip_layer(-1)``) gets the reference's state by applying it here.
    """
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * (1.0 + weight.to(device=x.device, dtype=torch.float32))
