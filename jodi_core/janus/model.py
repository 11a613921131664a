"""The whole Janus model: understanding (SigLIP -> aligner -> LLaMA -> lm_head) and generation
(gen_embed -> gen_aligner -> LLaMA -> gen_head, codes -> VQ decoder).

Top-level attribute names are the original checkpoint's (``vision_model``, ``aligner``, ``language_model``,
``gen_vision_model``, ``gen_aligner``, ``gen_head``, ``gen_embed``), so an original state dict loads as is once the
unused parts (MAP head, VQ encoder) are dropped; HF-converted checkpoints are renamed in loading.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import JanusConfig
from .llama import LlamaForCausalLM, StaticKVCache
from .siglip import MlpProjector, VisionModel
from .vq import VQDecoderModel


class VisionHead(nn.Module):
    """Image-token logits: Linear -> GELU -> Linear(codebook_size)."""

    def __init__(self, hidden: int, inner: int, codebook_size: int, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.output_mlp_projector = operations.Linear(hidden, inner, dtype=dtype, device=device)
        self.vision_head = operations.Linear(inner, codebook_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(F.gelu(self.output_mlp_projector(x)))


class JanusModel(nn.Module):
    def __init__(self, cfg: JanusConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        cfg.validate()
        self.config = cfg
        kw = dict(dtype=dtype, device=device, operations=operations)
        hidden = cfg.language.hidden_size
        self.vision_model = VisionModel(cfg.vision, **kw)
        self.aligner = MlpProjector(cfg.vision.width, hidden, **kw)
        self.language_model = LlamaForCausalLM(cfg.language, **kw)
        self.gen_vision_model = VQDecoderModel(cfg.vq, **kw)
        self.gen_aligner = MlpProjector(cfg.vq.codebook_dim, hidden, **kw)
        self.gen_head = VisionHead(hidden, cfg.gen_head_hidden, cfg.vq.codebook_size, **kw)
        self.gen_embed = operations.Embedding(cfg.vq.codebook_size, cfg.vq.codebook_dim, dtype=dtype, device=device)
        # Set by load_janus: the text tokenizer / prompt formatter and the image preprocessor.
        self.processor = None
        self.folder_name = None  # the model folder's name, set by load_janus
        # How decode steps run (decode.py): "auto" replays a CUDA graph on CUDA and runs eagerly elsewhere;
        # "eager", "static" (fixed-shape steps without a graph) and "graph" force one way.
        self.decode_mode = "auto"

    @property
    def tokenizer(self):
        return None if self.processor is None else self.processor.tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.gen_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.gen_embed.weight.device

    # --- understanding -------------------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels -> (N, patches, hidden) embeddings for the language model."""
        return self.aligner(self.vision_model(pixels.to(self.device, self.dtype)))

    def embed_prompt(
        self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None, image_token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text embeddings with the image-placeholder positions replaced, in order, by the images' features.

        input_ids (B, T); pixels (N, 3, S, S) for the N images in row order; image_token_mask (B, T) bool with
        exactly N * patches True entries.
        """
        embeds = self.language_model.model.embed_tokens(input_ids.clamp(min=0))
        if pixels is None or pixels.shape[0] == 0:
            return embeds
        features = self.encode_images(pixels).to(embeds.dtype)  # (N, patches, D)
        count = int(image_token_mask.sum())
        if count != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"The prompt has {count} image-token slots but {features.shape[0]} image(s) give "
                f"{features.shape[0] * features.shape[1]} features."
            )
        embeds = embeds.clone()
        embeds[image_token_mask] = features.reshape(-1, features.shape[-1])
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixels: torch.Tensor | None = None,
        image_token_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full-sequence text logits (B, T, vocab) without a cache (used by tests and scoring)."""
        embeds = self.embed_prompt(input_ids, pixels, image_token_mask)
        position_ids = positions_from_mask(attention_mask, input_ids.shape)
        hidden = self.language_model.model(embeds, position_ids.to(embeds.device), None, attention_mask)
        return self.language_model.lm_head(hidden)

    # --- generation ----------------------------------------------------------------------------------------------

    def embed_image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """(...,) image codes -> (..., hidden) language-model inputs."""
        return self.gen_aligner(self.gen_embed(codes))

    def decode_image_codes(self, codes: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        """(B, grid*grid) codes -> (B, 3, size, size) float32 images in [0, 1], ``chunk`` images at a time (the
        full-resolution decoder activations of 16 images at once would take several GB)."""
        codes = codes.to(self.device)
        images = [self.gen_vision_model.decode_codes(part).float() for part in codes.split(chunk)]
        return ((torch.cat(images) + 1.0) / 2.0).clamp(0.0, 1.0)

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(self.config.language, batch, max_len, dtype=self.dtype, device=self.device)

    def kv_cache_bytes(self, batch: int, max_len: int) -> int:
        """Bytes that ``new_cache(batch, max_len)`` takes (keys and values of every layer): what a host reserves."""
        lm = self.config.language
        elem = torch.finfo(self.dtype).bits // 8
        return int(2 * lm.num_layers * batch * max_len * lm.num_kv_heads * lm.head_dim * elem)

    def prompt_length(self, question: str, num_images: int) -> int:
        """Tokens of one understanding prompt once its image placeholders are expanded (boi, N image tokens, eoi)."""
        processor = self.processor
        ids = processor.tokenizer.encode(processor.understanding_prompt(question, num_images))
        return len(ids) + num_images * (processor.num_image_tokens + 1)

    def answer_room(self, questions, images_per_row) -> int:
        """Tokens left for the answer in the context after the longest of these prompts; a clear error when none."""
        longest = max(self.prompt_length(q, n) for q, n in zip(questions, images_per_row))
        room = self.config.language.max_position_embeddings - longest
        if room < 1:
            raise ValueError(f"The prompt takes {longest} tokens, the whole context of this Janus model; ask about "
                             "fewer images at once or shorten the question.")
        return room


def positions_from_mask(attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """Rotary positions that start at 0 on each row's first real token (left padding), as the reference's generate."""
    if attention_mask is None:
        return torch.arange(shape[1]).expand(shape[0], -1)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)
