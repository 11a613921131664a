"""Understanding many rows at once (a batch of images, one question each): how the rows are split and seeded.

Rows are answered in chunks of ``UNDERSTAND_CHUNK``, which bounds the KV cache; chunk ``n`` samples with ``seed + n``;
each chunk's answers are cut to the room the context leaves after its longest prompt.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from .generate import ProgressCallback, janus_understand
from .model import JanusModel

log = logging.getLogger(__name__)

UNDERSTAND_CHUNK = 4  # rows per chunk: bounds the KV cache (about 0.2 GB per row for Janus-Pro-1B)


def images_per_row(images: Sequence) -> list[int]:
    """Images in each row; a row is None, one (3, H, W) image or an (N, 3, H, W) stack."""
    return [0 if im is None else 1 if im.dim() == 3 else im.shape[0] for im in images]


def row_chunks(rows: int, chunk_size: int = UNDERSTAND_CHUNK) -> list[range]:
    return [range(i, min(i + chunk_size, rows)) for i in range(0, rows, chunk_size)]


def understanding_cache_bytes(model: JanusModel, images: Sequence, questions: Sequence[str], max_new_tokens: int,
                              chunk_size: int = UNDERSTAND_CHUNK) -> int:
    """KV cache of one chunk: its rows times the longest prompt (images expanded) plus the answer."""
    longest = max(map(model.prompt_length, questions, images_per_row(images)))
    return model.kv_cache_bytes(min(len(questions), chunk_size), longest + max_new_tokens)


def janus_understand_in_chunks(
    model: JanusModel,
    images: Sequence,
    questions: Sequence[str],
    *,
    max_new_tokens: int,
    seed: int = 0,
    chunk_size: int = UNDERSTAND_CHUNK,
    callback: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    **sampling,
) -> list[str]:
    """One answer per row. ``images``: one entry per row (None, (3, H, W) or (N, 3, H, W)); ``sampling``: the
    sampling arguments of ``janus_understand``. ``callback(done, total)`` counts tokens over all chunks, with
    ``max_new_tokens`` per chunk."""
    if len(images) != len(questions):
        raise ValueError(f"Got {len(questions)} questions for {len(images)} image rows; give one question per row.")
    counts = images_per_row(images)
    chunks = row_chunks(len(questions), chunk_size)
    total = max_new_tokens * len(chunks)
    answers: list[str] = []
    for n, rows in enumerate(chunks):
        chunk_questions = [questions[i] for i in rows]
        limit = model.answer_room(chunk_questions, [counts[i] for i in rows])
        if limit < max_new_tokens:
            log.warning("Janus: max_new_tokens %d does not fit the model's context after the prompt; using %d.",
                        max_new_tokens, limit)
        offset = n * max_new_tokens

        def chunk_progress(step: int, _steps: int, offset: int = offset) -> None:
            callback(min(offset + step, total), total)

        # Each chunk its own seed: otherwise rows i and i + chunk_size would draw the same random numbers.
        answers += janus_understand(
            model, [images[i] for i in rows], chunk_questions, max_new_tokens=min(max_new_tokens, limit),
            seed=seed + n, callback=None if callback is None else chunk_progress, should_stop=should_stop,
            **sampling,
        )
    return answers
