"""Janus prompt formatting, tokenisation (``tokenizers`` + the checkpoint's tokenizer.json) and image preprocessing.

The chat format is the reference "deepseek" template: ``system + "\\n\\n"`` (if any), then for each turn
``role + ": " + content`` followed by ``"\\n\\n"`` after a user turn and the EOS string after an assistant turn; an empty
final assistant turn renders as ``role + ":"``. Each ``<image_placeholder>`` token is then expanded in id space to
``<begin_of_image>`` + N x ``<image_placeholder>`` + ``<end_of_image>`` (N = 576 for the released models).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BEGIN_OF_IMAGE = "<begin_of_image>"
END_OF_IMAGE = "<end_of_image>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE, BEGIN_OF_IMAGE, END_OF_IMAGE)

# Janus-Pro's README writes the roles as tags; Janus-1.3B's as plain words.
PRO_ROLES = ("<|User|>", "<|Assistant|>")
JANUS_1_ROLES = ("User", "Assistant")


class JanusTokenizer:
    """tokenizer.json via the ``tokenizers`` library, with the ids of the tokens the chat format needs."""

    def __init__(self, path: "str | Path"):
        from tokenizers import Tokenizer  # imported here: importing jodi_core stays cheap

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No tokenizer.json in {path.parent}: Janus needs the checkpoint's tokenizer.json next to the weights."
            )
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a valid tokenizer.json ({e}).") from e
        ids = {}
        for token in SPECIAL_TOKENS:
            idx = self._tok.token_to_id(token)
            if idx is None:
                raise ValueError(f"{path} lacks the special token {token!r}: it is not a Janus tokenizer.")
            ids[token] = idx
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.image_id, self.boi_id, self.eoi_id = ids[IMAGE], ids[BEGIN_OF_IMAGE], ids[END_OF_IMAGE]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids with BOS first, as the reference's ``tokenizer.encode``."""
        return [self.bos_id] + self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@dataclass
class ImagePreprocessConfig:
    """preprocessor_config.json: longest side -> image_size (at least min_size), pad square, rescale, normalise."""

    image_size: int = 384
    min_size: int = 14
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1.0 / 255.0

    @classmethod
    def from_json(cls, path: "str | Path", image_size: int) -> "ImagePreprocessConfig":
        path = Path(path)
        if not path.is_file():
            log.warning("No preprocessor_config.json in %s; using SigLIP normalisation (mean = std = 0.5).", path.parent)
            return cls(image_size=image_size)
        raw = json.loads(path.read_text(encoding="utf-8"))
        size = raw.get("image_size", raw.get("size", image_size))
        if isinstance(size, dict):  # HF style {"height": 384, "width": 384}
            size = size.get("height") or size.get("shortest_edge") or image_size
        if int(size) != image_size:
            raise ValueError(f"{path} says image_size {size} but the vision encoder takes {image_size}.")
        return cls(
            image_size=image_size,
            min_size=int(raw.get("min_size", 14)),
            image_mean=tuple(float(m) for m in raw.get("image_mean", cls.image_mean)),
            image_std=tuple(float(s) for s in raw.get("image_std", cls.image_std)),
            rescale_factor=float(raw.get("rescale_factor", 1.0 / 255.0)),
        )

    @property
    def background(self) -> tuple[int, ...]:
        return tuple(int(m * 255) for m in self.image_mean)


def to_pil(image) -> Image.Image:
    """PIL image, or a (3, H, W) / (H, W, 3) float tensor in [0, 1], -> RGB PIL image (values rounded to uint8)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"An image must be a PIL image or a tensor, got {type(image).__name__}.")
    if image.ndim != 3:
        raise ValueError(f"An image tensor must be (3, H, W) or (H, W, 3), got shape {tuple(image.shape)}.")
    if image.shape[0] != 3 and image.shape[-1] == 3:
        image = image.permute(2, 0, 1)
    if image.shape[0] != 3:
        raise ValueError(f"An image tensor must have 3 channels, got shape {tuple(image.shape)}.")
    if image.is_floating_point():
        image = (image.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), mode="RGB")


def preprocess_image(image, cfg: ImagePreprocessConfig) -> torch.Tensor:
    """One image -> (3, S, S) float32 normalised pixels, exactly as the reference VLMImageProcessor."""
    pil = to_pil(image)
    w, h = pil.size
    if w <= 0 or h <= 0:
        raise ValueError(f"Cannot preprocess an empty image ({w}x{h}).")
    longest = max(w, h)
    new_h = max(int(h / longest * cfg.image_size), cfg.min_size)
    new_w = max(int(w / longest * cfg.image_size), cfg.min_size)
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    if new_w != new_h:  # pad to a square with the mean colour, image centred
        side = max(new_w, new_h)
        canvas = Image.new("RGB", (side, side), cfg.background)
        canvas.paste(pil, ((side - new_w) // 2, (side - new_h) // 2))
        pil = canvas
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32)).permute(2, 0, 1) * cfg.rescale_factor
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T) bool, False on padding
    image_token_mask: torch.Tensor  # (B, T) bool, True where image features go
    pixels: torch.Tensor | None  # (N, 3, S, S) images in row order, or None


class JanusProcessor:
    def __init__(
        self,
        tokenizer: JanusTokenizer,
        image_config: ImagePreprocessConfig,
        num_image_tokens: int,
        roles: tuple[str, str] = PRO_ROLES,
        system_prompt: str = SYSTEM_PROMPT,
    ):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.num_image_tokens = num_image_tokens
        self.roles = roles
        self.system_prompt = system_prompt

    # --- text ---------------------------------------------------------------------------------------------------

    def format_conversation(self, messages: Sequence[tuple[str, str]], system_prompt: str) -> str:
        """The reference "deepseek" template for ``[(role, content), ...]``; content is stripped as the reference."""
        seps = ("\n\n", EOS)
        text = system_prompt + seps[0] if system_prompt else ""
        for i, (role, content) in enumerate(messages):
            content = content.strip()
            text += f"{role}: {content}{seps[i % 2]}" if content else f"{role}:"
        return text.strip()

    def understanding_prompt(self, question: str, num_images: int) -> str:
        content = f"{IMAGE}\n" * num_images + question.strip()
        user, assistant = self.roles
        return self.format_conversation([(user, content), (assistant, "")], self.system_prompt)

    def generation_prompt(self, prompt: str) -> str:
        user, assistant = self.roles
        return self.format_conversation([(user, prompt), (assistant, "")], "") + BEGIN_OF_IMAGE

    def expand_image_tokens(self, ids: list[int]) -> list[int]:
        t = self.tokenizer
        out: list[int] = []
        for idx in ids:
            if idx == t.image_id:
                out += [t.boi_id] + [t.image_id] * self.num_image_tokens + [t.eoi_id]
            else:
                out.append(idx)
        return out

    def left_pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = True
        return ids, mask

    # --- batches ------------------------------------------------------------------------------------------------

    def understanding_batch(self, questions: Sequence[str], images: Sequence[Sequence]) -> PromptBatch:
        """One row per question; ``images[i]`` is the (possibly empty) list of images of question i."""
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} image lists.")
        rows, pixels = [], []
        for question, row_images in zip(questions, images):
            if not isinstance(question, str):
                raise TypeError(f"A question must be a string, got {type(question).__name__}.")
            markers = [m for m in (IMAGE, BEGIN_OF_IMAGE, END_OF_IMAGE) if m in question]
            if markers:
                raise ValueError(f"A question must not contain {', '.join(markers)}: images are placed by the "
                                 f"processor; pass them as images instead.")
            ids = self.tokenizer.encode(self.understanding_prompt(question, len(row_images)))
            rows.append(self.expand_image_tokens(ids))
            pixels += [preprocess_image(im, self.image_config) for im in row_images]
        input_ids, attention_mask = self.left_pad(rows)
        image_token_mask = (input_ids == self.tokenizer.image_id) & attention_mask
        return PromptBatch(input_ids, attention_mask, image_token_mask, torch.stack(pixels) if pixels else None)

    def generation_ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"The prompt must be a string, got {type(prompt).__name__}.")
        return self.tokenizer.encode(self.generation_prompt(prompt))
