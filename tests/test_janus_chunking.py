"""jodi_core.janus.chunking: how many rows are answered (chunks, their seeds, the context room), without ComfyUI."""

from __future__ import annotations

import logging

import pytest
import torch

from janus_tiny import write_tiny_janus
from jodi_core.janus import janus_understand, janus_understand_in_chunks, load_janus, understanding_cache_bytes
from jodi_core.janus.chunking import images_per_row, row_chunks

SAMPLING = dict(do_sample=True, temperature=1.5, top_p=1.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_janus(write_tiny_janus(tmp_path_factory.mktemp("janus") / "Janus-Tiny", seed=2), dtype=torch.float32)


def _rows(n: int, seed: int = 0) -> list[torch.Tensor]:
    return list(torch.rand(n, 3, 20, 12, generator=torch.Generator().manual_seed(seed)))


def test_rows_split_into_chunks_and_count_their_images():
    assert row_chunks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert images_per_row([None, torch.rand(3, 4, 4), torch.rand(2, 3, 4, 4)]) == [0, 1, 2]


def test_each_chunk_is_one_engine_call_with_its_own_seed(model):
    images, questions = _rows(5), ["What is this?"] * 5
    answers = janus_understand_in_chunks(model, images, questions, max_new_tokens=6, seed=7, chunk_size=2,
                                         **SAMPLING)
    expected = []
    for n, rows in enumerate(row_chunks(5, 2)):
        expected += janus_understand(model, [images[i] for i in rows], [questions[i] for i in rows],
                                     max_new_tokens=6, seed=7 + n, **SAMPLING)
    assert answers == expected


def test_equal_chunks_draw_different_numbers(model):
    images = [_rows(1, seed=3)[0]] * 4
    answers = janus_understand_in_chunks(model, images, ["Describe this image in detail."] * 4, max_new_tokens=16,
                                         seed=11, chunk_size=2, **SAMPLING)
    assert answers[:2] != answers[2:]


def test_progress_counts_tokens_over_all_chunks(model):
    seen = []
    janus_understand_in_chunks(model, _rows(3), ["Hi"] * 3, max_new_tokens=5, chunk_size=2,
                               callback=lambda done, total: seen.append((done, total)))
    assert {total for _, total in seen} == {10}  # 2 chunks x 5 tokens
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[0] == 1 and max(done) <= 10
    assert any(d > 5 for d in done)  # the second chunk continues the count


def test_answers_are_cut_to_the_context_room(model, caplog):
    question = "Compare these images."
    context = model.config.language.max_position_embeddings
    count = max(n for n in range(1, 64) if context - model.prompt_length(question, n) >= 2)  # leaves a little room
    room = model.answer_room([question], [count])
    images = [torch.stack(_rows(count, seed=4))]  # one row asking about all of them
    with caplog.at_level(logging.WARNING):
        answers = janus_understand_in_chunks(model, images, [question], max_new_tokens=room + 100)
    assert "does not fit the model's context" in caplog.text
    assert answers == janus_understand(model, images, [question], max_new_tokens=room)


def test_cache_bytes_cover_one_chunk_of_the_longest_prompt(model):
    images = [None, _rows(1)[0], torch.stack(_rows(2))]
    questions = ["Hi", "What is this?", "Compare them."]
    longest = max(model.prompt_length(q, n) for q, n in zip(questions, [0, 1, 2]))
    assert understanding_cache_bytes(model, images, questions, 8, chunk_size=2) == model.kv_cache_bytes(2, longest + 8)
    assert understanding_cache_bytes(model, images, questions, 8) == model.kv_cache_bytes(3, longest + 8)


def test_rows_and_questions_must_pair(model):
    with pytest.raises(ValueError, match="one question per row"):
        janus_understand_in_chunks(model, _rows(2), ["Hi"], max_new_tokens=2)
