"""Janus inference loops: image understanding (captioning / VQA) and text-to-image generation.

Both prefill the prompt once into a static KV cache and then decode one position per step; randomness comes only
from a ``torch.Generator`` seeded by the caller, so a seed reproduces a result on the same device.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from .decode import DecodeStepper
from .model import JanusModel, positions_from_mask

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


class JanusInterrupted(RuntimeError):
    """Raised when ``should_stop()`` returned True during a run."""


def _check_ready(model: JanusModel) -> None:
    if not isinstance(model, JanusModel):
        raise TypeError(f"Expected a JanusModel (from load_janus), got {type(model).__name__}.")
    if model.processor is None:
        raise ValueError("This JanusModel has no tokenizer/processor attached; load it with load_janus(folder).")


# ---------------------------------------------------------------------------------------------------------------------
# Logit processing (same order as the reference's sampling: repetition penalty, temperature, top-k, top-p)
# ---------------------------------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already generated: positive logits / penalty, negative logits * penalty."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, previous)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, previous, seen)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one token)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1.0 - top_p)
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def select_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) token ids: argmax when not sampling (or temperature 0), else multinomial."""
    if not do_sample or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) % 2**64)  # the generator's whole 64-bit range


# ---------------------------------------------------------------------------------------------------------------------
# Understanding
# ---------------------------------------------------------------------------------------------------------------------


def _image_list(item) -> list:
    """One question's images: None, a single image, an (N, 3, H, W) stack or a list of images -> a list."""
    if item is None:
        return []
    if isinstance(item, torch.Tensor) and item.ndim == 4:
        return list(item)
    if isinstance(item, (list, tuple)):
        return list(item)
    return [item]


def _pair_inputs(images, questions) -> tuple[list[str], list[list]]:
    """Rows of (question, images). A (B, 3, H, W) tensor gives one image per row; a list gives one entry per row."""
    if images is None:
        rows = [[]] * (1 if isinstance(questions, str) else len(questions))
    elif isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) floats in [0, 1], got shape {tuple(images.shape)}.")
        rows = [[im] for im in images]
    elif isinstance(images, (list, tuple)):
        rows = [_image_list(item) for item in images]
    else:
        rows = [[images]]  # a single PIL image
    if isinstance(questions, str):
        questions = [questions] * len(rows)
    questions = list(questions)
    if len(rows) == 1 and len(questions) > 1:
        rows = rows * len(questions)
    if len(questions) != len(rows):
        raise ValueError(f"Got {len(questions)} questions for {len(rows)} image rows; give one question per row.")
    if not questions:
        raise ValueError("No question given.")
    return questions, rows


@torch.inference_mode()
def janus_understand_tokens(
    model: JanusModel,
    images,
    questions: "str | Sequence[str]",
    max_new_tokens: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    callback: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    top_k: int = 50,
) -> list[list[int]]:
    """Like ``janus_understand`` but returns each row's generated token ids (up to, not including, EOS)."""
    _check_ready(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    questions, rows = _pair_inputs(images, questions)
    processor, lm = model.processor, model.language_model
    tok = processor.tokenizer
    batch = processor.understanding_batch(questions, rows)
    device = model.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    pixels = batch.pixels.to(device) if batch.pixels is not None else None

    embeds = model.embed_prompt(ids, pixels, batch.image_token_mask.to(device))
    b, t = ids.shape
    cache = model.new_cache(b, t + max_new_tokens)
    cache.set_padding(mask)
    positions = positions_from_mask(mask, (b, t)).to(device)
    hidden = lm.model(embeds, positions, cache)
    logits = lm.lm_head(hidden[:, -1])
    next_pos = positions[:, -1:] + 1
    step_fn = DecodeStepper(lm.model, cache, b, mode=model.decode_mode if max_new_tokens > 1 else "eager")

    generator = _generator(device, seed) if do_sample else None
    out = torch.full((b, max_new_tokens), tok.pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        if should_stop is not None and should_stop():
            raise JanusInterrupted("Janus understanding was interrupted.")
        scores = apply_repetition_penalty(logits.float(), out[:, :step], repetition_penalty)
        token = select_tokens(
            scores, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        token = torch.where(finished, torch.full_like(token, tok.pad_id), token)
        out[:, step] = token
        finished |= token == tok.eos_id
        steps = step + 1
        if callback is not None:
            callback(steps, max_new_tokens)
        if steps == max_new_tokens or bool(finished.all()):
            break
        hidden = step_fn(lm.model.embed_tokens(token[:, None]), next_pos)
        logits = lm.lm_head(hidden[:, -1])
        next_pos = next_pos + 1

    rows_out = []
    for row in out[:, :steps].tolist():
        rows_out.append(row[: row.index(tok.eos_id)] if tok.eos_id in row else row)
    return rows_out


def janus_understand(model: JanusModel, images, questions: "str | Sequence[str]", **options) -> list[str]:
    """Answer ``questions`` about ``images``; returns one string per row (special tokens removed).

    ``options`` are those of :func:`janus_understand_tokens` (max_new_tokens, sampling, seed, callback, should_stop).
    """
    rows = janus_understand_tokens(model, images, questions, **options)
    return [model.processor.tokenizer.decode(row, skip_special_tokens=True) for row in rows]


# ---------------------------------------------------------------------------------------------------------------------
# Text-to-image generation
# ---------------------------------------------------------------------------------------------------------------------


def cfg_prompt_ids(model: JanusModel, prompt: str, parallel_size: int) -> torch.Tensor:
    """(2P, T) ids: P conditional rows, then P unconditional rows where every token except the first (BOS) and the
    last (``<begin_of_image>``) is replaced by the pad token, as the reference does."""
    ids = torch.tensor(model.processor.generation_ids(prompt), dtype=torch.long)
    uncond = ids.clone()
    uncond[1:-1] = model.processor.tokenizer.pad_id
    return torch.cat([ids.expand(parallel_size, -1), uncond.expand(parallel_size, -1)])


@torch.inference_mode()
def janus_generate_codes(
    model: JanusModel,
    prompt: str,
    cfg_weight: float = 5.0,
    temperature: float = 1.0,
    parallel_size: int = 1,
    seed: int = 0,
    callback: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Sample (P, grid*grid) VQ codes with classifier-free guidance; temperature 0 means greedy (argmax)."""
    _check_ready(model)
    if parallel_size < 1:
        raise ValueError(f"parallel_size must be at least 1, got {parallel_size}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    lm, device = model.language_model, model.device
    ids = cfg_prompt_ids(model, prompt, parallel_size).to(device)
    rows, t = ids.shape
    n = model.config.gen_image_tokens
    cache = model.new_cache(rows, t + n)
    positions = torch.arange(t, device=device).expand(rows, -1)
    hidden = lm.model(lm.model.embed_tokens(ids), positions, cache)[:, -1]
    step_fn = DecodeStepper(lm.model, cache, rows, mode=model.decode_mode)

    generator = _generator(device, seed) if temperature > 0 else None
    codes = torch.empty(parallel_size, n, dtype=torch.long, device=device)
    position = torch.full((rows, 1), t, dtype=torch.long, device=device)
    for i in range(n):
        if should_stop is not None and should_stop():
            raise JanusInterrupted("Janus image generation was interrupted.")
        logits = model.gen_head(hidden).float()
        cond, uncond = logits[:parallel_size], logits[parallel_size:]
        guided = uncond + cfg_weight * (cond - uncond)
        token = select_tokens(
            guided, do_sample=temperature > 0, temperature=temperature, top_k=0, top_p=1.0, generator=generator
        )
        codes[:, i] = token
        if callback is not None:
            callback(i + 1, n)
        if i == n - 1:
            break
        # The same token feeds the conditional and the unconditional row of each pair.
        step_in = model.embed_image_tokens(torch.cat([token, token]))[:, None]  # (2P, 1, D)
        hidden = step_fn(step_in, position)[:, -1]
        position += 1
    return codes


@torch.inference_mode()
def janus_generate(model: JanusModel, prompt: str, **options) -> torch.Tensor:
    """Generate images for ``prompt``: (P, 3, S, S) float32 in [0, 1] (S = 384 for Janus).

    ``options`` are those of :func:`janus_generate_codes` (cfg_weight, temperature, parallel_size = P, seed, ...).
    """
    codes = janus_generate_codes(model, prompt, **options)  # checks the model before its decoder is looked up
    return model.decode_image_codes(codes)
