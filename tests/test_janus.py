"""jodi_core.janus without a reference model: prompt format, preprocessing, cache, loading errors, API behaviour."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from janus_tiny import TINY_CONFIG, tiny_original_state_dict, write_tiny_janus
from jodi_core.checkpoint import CheckpointError
from jodi_core.janus import JanusInterrupted, janus_generate, janus_generate_codes, janus_understand, load_janus
from jodi_core.janus.config import config_from_state_dict
from jodi_core.janus.generate import apply_repetition_penalty, apply_top_k, apply_top_p, janus_understand_tokens
from jodi_core.janus.model import positions_from_mask
from jodi_core.janus.processor import SYSTEM_PROMPT, preprocess_image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_janus(tmp_path_factory.mktemp("janus") / "Janus-Pro-Tiny", layout="original", seed=1)


@pytest.fixture(scope="module")
def model(folder):
    return load_janus(folder, dtype=torch.float32)


# --- prompt format ------------------------------------------------------------------------------------------------


def test_understanding_prompt_is_the_deepseek_template(model):
    # sft template: system + "\n\n", "<role>: <content>" + "\n\n" after the user turn, "<role>:" for the empty reply.
    expected = SYSTEM_PROMPT + "\n\n<|User|>: <image_placeholder>\n<image_placeholder>\nWhat differs?\n\n<|Assistant|>:"
    assert model.processor.understanding_prompt("  What differs? ", 2) == expected


def test_generation_prompt_has_no_system_prompt_and_ends_with_begin_of_image(model):
    assert model.processor.generation_prompt("A cat") == "<|User|>: A cat\n\n<|Assistant|>:<begin_of_image>"


def test_janus_1_3b_folder_uses_plain_roles(folder, tmp_path):
    old = shutil.copytree(folder, tmp_path / "Janus-1.3B")
    m = load_janus(old)
    assert m.processor.generation_prompt("x") == "User: x\n\nAssistant:<begin_of_image>"
    assert load_janus(old, roles=("<|User|>", "<|Assistant|>")).processor.roles == ("<|User|>", "<|Assistant|>")
    other_spelling = shutil.copytree(folder, tmp_path / "janus_1_3b")
    assert load_janus(other_spelling).processor.roles == m.processor.roles


def test_batch_expands_images_and_left_pads(model):
    tok = model.processor.tokenizer
    n = model.config.vision.num_patches
    img = torch.rand(3, 16, 16)
    batch = model.processor.understanding_batch(["Hi", "Describe both pictures in detail"], [[img], [img, img]])
    ids, mask = batch.input_ids, batch.attention_mask
    assert batch.pixels.shape == (3, 3, 16, 16)
    assert int(batch.image_token_mask.sum()) == 3 * n
    assert (ids[~mask] == tok.pad_id).all() and not mask[0, 0] and mask[:, -1].all()  # padding on the left
    for row, count in ((0, 1), (1, 2)):
        real = ids[row][mask[row]].tolist()
        assert real[0] == tok.bos_id
        assert real.count(tok.boi_id) == real.count(tok.eoi_id) == count
        start = real.index(tok.boi_id)
        assert real[start + 1 : start + 1 + n] == [tok.image_id] * n and real[start + 1 + n] == tok.eoi_id
    # Text round trip through the byte-level tokenizer (special tokens dropped).
    assert tok.decode(tok.encode("Describe the dog.")) == "Describe the dog."


# --- image preprocessing ------------------------------------------------------------------------------------------


def test_preprocess_resizes_longest_side_and_pads_with_mean_colour(model):
    cfg = model.processor.image_config
    x = preprocess_image(torch.ones(3, 20, 12), cfg)  # white, portrait: 20x12 -> 16 x max(int(9.6), 14) = 16x14
    assert x.shape == (3, 16, 16)
    pad_value = (int(0.5 * 255) / 255 - 0.5) / 0.5  # background = int(mean * 255) = 127, then normalised
    torch.testing.assert_close(x[:, :, 0], torch.full((3, 16), pad_value), rtol=0, atol=1e-6)
    assert torch.equal(x[:, :, 15], x[:, :, 0])
    torch.testing.assert_close(x[:, :, 1:15], torch.ones(3, 16, 14))  # white stays 1.0 after (1 - 0.5) / 0.5


def test_tensor_and_pil_inputs_agree(model):
    cfg = model.processor.image_config
    arr = (torch.rand(30, 18, 3) * 255).to(torch.uint8)
    from_pil = preprocess_image(Image.fromarray(arr.numpy()), cfg)
    from_chw = preprocess_image(arr.permute(2, 0, 1).float() / 255.0, cfg)
    from_hwc = preprocess_image(arr.float() / 255.0, cfg)
    assert torch.equal(from_pil, from_chw) and torch.equal(from_pil, from_hwc)


def test_bad_images_are_refused(model):
    with pytest.raises(ValueError, match="3 channels|must be"):
        janus_understand(model, torch.rand(2, 4, 16, 16), "Hi", max_new_tokens=1)
    with pytest.raises(ValueError, match="questions"):
        janus_understand(model, torch.rand(3, 3, 16, 16), ["a", "b"], max_new_tokens=1)
    with pytest.raises(TypeError):
        janus_understand(model, [object()], "Hi", max_new_tokens=1)


# --- language model and cache -------------------------------------------------------------------------------------


def test_cached_decoding_matches_full_forward_with_left_padding(model):
    batch = model.processor.understanding_batch(["Hi", "What is in the picture?"], [[torch.rand(3, 16, 16)], []])
    lm = model.language_model
    with torch.no_grad():
        embeds = model.embed_prompt(batch.input_ids, batch.pixels, batch.image_token_mask)
        b, t = batch.input_ids.shape
        steps = torch.randint(0, TINY_CONFIG.language.vocab_size, (b, 3))
        full_ids = torch.cat([batch.input_ids, steps], 1)
        full_mask = torch.cat([batch.attention_mask, torch.ones(b, 3, dtype=torch.bool)], 1)
        full_embeds = torch.cat([embeds, lm.model.embed_tokens(steps)], 1)
        ref = lm.model(full_embeds, positions_from_mask(full_mask, full_ids.shape), None, full_mask)

        cache = model.new_cache(b, t + 3)
        assert model.kv_cache_bytes(b, t + 3) == cache.k.nbytes + cache.v.nbytes  # what hosts reserve
        assert model.prompt_length("Hi", 1) == int(batch.attention_mask[0].sum())
        assert model.prompt_length("What is in the picture?", 0) == int(batch.attention_mask[1].sum())
        cache.set_padding(batch.attention_mask)
        pos = positions_from_mask(batch.attention_mask, (b, t))
        k_ptr = cache.k.data_ptr()
        out = [lm.model(embeds, pos, cache)]
        for i in range(3):
            out.append(lm.model(lm.model.embed_tokens(steps[:, i : i + 1]), pos[:, -1:] + 1 + i, cache))
    got = torch.cat(out, 1)
    real = full_mask
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-5)
    assert cache.k.data_ptr() == k_ptr and cache.length == t + 3  # written in place, never reallocated
    with pytest.raises(ValueError, match="overflow"):
        lm.model(lm.model.embed_tokens(steps[:, :1]), pos[:, -1:] + 4, cache)


def test_left_padding_does_not_change_a_row(model):
    """A row decoded alone and the same row left-padded in a batch give the same tokens."""
    img = torch.rand(3, 16, 16)
    alone = janus_understand_tokens(model, [[img]], ["Hi"], max_new_tokens=6)
    batched = janus_understand_tokens(model, [[img], []], ["Hi", "A much longer question about nothing"], max_new_tokens=6)
    assert batched[0] == alone[0]


def test_logit_processors_match_transformers():
    tr = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    prev = torch.randint(0, 50, (3, 7), generator=g)
    torch.testing.assert_close(
        apply_repetition_penalty(logits, prev, 1.3), tr.RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
    )
    torch.testing.assert_close(apply_top_k(logits, 5), tr.TopKLogitsWarper(5)(prev, logits.clone()))
    torch.testing.assert_close(apply_top_p(logits, 0.7), tr.TopPLogitsWarper(0.7)(prev, logits.clone()))


# --- API behaviour ------------------------------------------------------------------------------------------------


def test_understand_text_only_and_multi_image(model):
    answers = janus_understand(model, None, ["Hello", "Describe"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    answers = janus_understand(model, [torch.rand(2, 3, 16, 16)], "Compare", max_new_tokens=4)
    assert len(answers) == 1


def test_sampling_is_seeded(model):
    img = torch.rand(1, 3, 16, 16)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=0)
    a = janus_understand_tokens(model, img, "Hi", seed=1, **kw)
    assert a == janus_understand_tokens(model, img, "Hi", seed=1, **kw)
    assert any(janus_understand_tokens(model, img, "Hi", seed=s, **kw) != a for s in (2, 3, 4))


def test_questions_may_not_smuggle_image_tokens(model):
    with pytest.raises(ValueError, match="must not contain <image_placeholder>"):
        model.processor.understanding_batch(["Look: <image_placeholder>"], [[]])


def test_generate_shapes_progress_and_seed(model):
    calls = []
    images = janus_generate(model, "A cat", parallel_size=2, seed=4, callback=lambda i, n: calls.append((i, n)))
    size = TINY_CONFIG.gen_image_size
    n = TINY_CONFIG.gen_image_tokens
    assert images.shape == (2, 3, size, size) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert calls == [(i, n) for i in range(1, n + 1)]
    same = janus_generate_codes(model, "A cat", parallel_size=2, seed=4)
    assert torch.equal(same, janus_generate_codes(model, "A cat", parallel_size=2, seed=4))
    assert not torch.equal(same, janus_generate_codes(model, "A cat", parallel_size=2, seed=5))


def test_should_stop_interrupts(model):
    with pytest.raises(JanusInterrupted):
        janus_generate(model, "A cat", should_stop=lambda: True)
    with pytest.raises(JanusInterrupted):
        janus_understand(model, None, "Hi", max_new_tokens=5, should_stop=lambda: True)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="parallel_size"):
        janus_generate(model, "x", parallel_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        janus_understand(model, None, "x", max_new_tokens=0)
    with pytest.raises(TypeError, match="prompt"):
        janus_generate(model, 3)
    with pytest.raises(TypeError, match="JanusModel"):
        janus_generate(object(), "x")


# --- loading ------------------------------------------------------------------------------------------------------


def test_config_is_read_from_shapes(folder):
    sd = tiny_original_state_dict(0)
    cfg = config_from_state_dict(sd, {"vision_heads": 4, "lm_heads": 4, "max_position_embeddings": 512})
    assert cfg == TINY_CONFIG


def test_sharded_checkpoint_with_index(folder, tmp_path, model):
    sharded = shutil.copytree(folder, tmp_path / "sharded")
    sd = torch.load(sharded / "pytorch_model.bin", weights_only=True)
    (sharded / "pytorch_model.bin").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:])):
        torch.save({k: sd[k] for k in part}, sharded / name)
        weight_map.update({k: name for k in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_janus(sharded, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    # A truncated shard is named in the error.
    data = (sharded / names[1]).read_bytes()
    (sharded / names[1]).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="00002"):
        load_janus(sharded)
    # A missing shard too.
    (sharded / names[1]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_janus(sharded)


def test_dtype_and_hf_layout(tmp_path):
    m = load_janus(write_tiny_janus(tmp_path / "hf", layout="hf"), dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    codes = janus_generate_codes(m, "A cat", temperature=0)
    assert codes.shape == (1, TINY_CONFIG.gen_image_tokens)


def test_missing_tokenizer(folder, tmp_path):
    broken = shutil.copytree(folder, tmp_path / "no_tok")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_janus(broken)


def test_foreign_tokenizer(folder, tmp_path):
    from tokenizers import Tokenizer, models

    broken = shutil.copytree(folder, tmp_path / "foreign_tok")
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(broken / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a Janus tokenizer"):
        load_janus(broken)


def test_wrong_model_in_folder(folder, tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "jodi_in_janus_folder"
    wrong.mkdir()
    shutil.copy(folder / "tokenizer.json", wrong / "tokenizer.json")
    save_file({"role_embedder.weight": torch.zeros(2, 2), "x_embedders.0.proj.weight": torch.zeros(2, 2)},
              str(wrong / "model.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match="not a Janus checkpoint.*jodi"):
        load_janus(wrong)
    with pytest.raises(ValueError, match="folder"):
        load_janus(folder / "pytorch_model.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folder / "tokenizer.json", empty / "tokenizer.json")
    with pytest.raises(CheckpointError, match="No Janus weights"):
        load_janus(empty)


def test_static_step_matches_cached_step(model):
    """The fixed-shape step (CUDA-graph path) equals the ordinary cached step, with left padding."""
    batch = model.processor.understanding_batch(["Hi", "What is in the picture?"], [[torch.rand(3, 16, 16)], []])
    lm = model.language_model.model
    b, t = batch.input_ids.shape
    steps = torch.randint(0, TINY_CONFIG.language.vocab_size, (b, 3))
    outs = []
    with torch.no_grad():
        embeds = model.embed_prompt(batch.input_ids, batch.pixels, batch.image_token_mask)
        pos = positions_from_mask(batch.attention_mask, (b, t))
        for static in (False, True):
            cache = model.new_cache(b, t + 5)
            cache.set_padding(batch.attention_mask)
            lm(embeds, pos, cache)
            for i in range(3):
                x, p = lm.embed_tokens(steps[:, i : i + 1]), pos[:, -1:] + 1 + i
                if static:
                    outs.append(lm.forward_static_step(x, p, cache, torch.tensor([cache.length])))
                    cache.length += 1
                else:
                    outs.append(lm(x, p, cache))
    for dynamic, static in zip(outs[:3], outs[3:]):
        torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["static", "graph"])  # "graph" falls back to eager steps off CUDA
def test_decode_modes_give_the_same_tokens(model, mode):
    img = [[torch.rand(3, 16, 16)], []]
    questions = ["Hi", "Describe the picture"]
    runs = {}
    for m in ("eager", mode):
        model.decode_mode = m
        try:
            runs[m] = (
                janus_understand_tokens(model, img, questions, max_new_tokens=6),
                janus_generate_codes(model, "A cat", cfg_weight=2.0, temperature=1.0, parallel_size=2, seed=3),
            )
        finally:
            model.decode_mode = "auto"
    assert runs["eager"][0] == runs[mode][0]
    assert torch.equal(runs["eager"][1], runs[mode][1])
    with pytest.raises(ValueError, match="decode mode"):
        model.decode_mode = "fast"
        try:
            janus_generate_codes(model, "A cat")
        finally:
            model.decode_mode = "auto"
